"""Text in, text out over the placed model: the tokenizer and the pipeline of `williw.pipeline` put together for
``williw generate`` and the OpenAI-compatible API (`williw.openai_api`).

The caller's mistakes are found before any node is asked, and raised as `GenerationInputError` (one line, with
the field it concerns and OpenAI's error code): an empty prompt, a prompt longer than the context, text that is
not valid Unicode, a model without a chat template, messages its template refuses, a temperature or a seed out
of range. The context is the request's ``sequence_length``, the KV budget every stage holds per session
(`williw.runtime.StageHost` refuses a step that would make a session hold more). The prefill holds the prompt's
``P`` tokens and each decode step one more, and the last new token is never fed back, so a generation makes at
most ``sequence_length - P + 1`` tokens; asked for more, it stops there with finish reason ``length`` and keeps
its text, as ``max_new_tokens`` does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from williw.errors import GenerateError, GenerationInputError
from williw.pipeline import Pipeline, generate_tokens, load_tokenizer

__all__ = ["GenerationInputError", "Generator", "Stats"]

# What torch.Generator.manual_seed accepts: an int64 or a uint64 ("Overflow when unpacking long long" beyond).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass
class Stats:
    """One generation's figures: tokens, seconds (prefill: the prompt to the first token; decode: the rest), the
    plan version and the nodes it ran on, and the finish reason (``stop``: an end-of-sequence token; ``length``)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    version: int = 0
    nodes: tuple[str, ...] = ()
    finish_reason: str = "length"
    token_ids: list[int] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s and self.new_tokens > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4),
                "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2), "plan_version": self.version,
                "nodes": list(self.nodes), "finish_reason": self.finish_reason, "token_ids": self.token_ids}


class Generator:
    """Generates for one request of a worker; the pipeline is looked up again for every generation, so a
    generation after a re-plan runs on the version then in force.

    Args:
        worker_url, request_id, token: the worker, the request (its plan in force), the admin token if needed.
        tokenizer: the model's tokenizer if the caller has it; None: fetched from the first node's shard folder.
    """

    def __init__(self, worker_url: str, request_id: str, token: str | None = None, *,
                 tokenizer: Any = None) -> None:
        self.worker_url, self.request_id, self.token = worker_url, request_id, token
        self._tokenizer: Any = tokenizer
        self._request: dict[str, Any] | None = None
        self._rules: Any = None  # the model's decode rules: one request, one model, read from a node once

    def pipeline(self) -> Pipeline:
        """The pipeline of the plan in force now (`Pipeline.from_worker`), with the model's decode rules read once
        for every generation (before, each one fetched and parsed the config again)."""
        p = Pipeline.from_worker(self.worker_url, self.request_id, self.token)
        if self._rules is None:
            try:
                self._rules = p.rules()
            except BaseException:
                p.close()
                raise
        p._rules = self._rules
        return p

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            p = self.pipeline()
            try:
                self._tokenizer = load_tokenizer(p)
            finally:
                p.close()
        return self._tokenizer

    @property
    def model_name(self) -> str:
        """The request's model, as the worker names it."""
        return str(self._worker_request()["model_name"])

    @property
    def context_tokens(self) -> int:
        """The tokens a session may hold on every stage, prompt included: the context the plan in force was made
        for (its ``context_length``), else the request's ``sequence_length`` (`williw.node_stages` budgets the
        same)."""
        from williw.client import WorkerClient

        with WorkerClient(self.worker_url, self.token) as c:
            context = c.get_plan(self.request_id).get("@plan", {}).get("context_length")
        return int(context or self._worker_request()["sequence_length"])

    def _worker_request(self) -> dict[str, Any]:
        if self._request is None:  # both fields are fixed when the request is created
            from williw.client import WorkerClient

            with WorkerClient(self.worker_url, self.token) as c:
                self._request = c.get_request(self.request_id)
        return self._request

    def prompt_ids(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of a plain prompt, or of chat ``messages`` through the model's chat template (with the
        assistant's turn opened).

        Raises:
            GenerationInputError: text that is not valid Unicode (a lone surrogate), a model without a chat
                template, or messages its template refuses (an unknown role).
        """
        tok = self.tokenizer
        if messages is None:
            _check_text(prompt or "", "prompt")
            return list(tok(prompt or "")["input_ids"])
        for i, m in enumerate(messages):
            for key, text in m.items():
                if isinstance(text, str):
                    _check_text(text, f"messages.[{i}].{key}")
        if not getattr(tok, "chat_template", None):
            raise GenerationInputError(f"the model's tokenizer has no chat template: '{self.model_name}' can only "
                                       "complete a plain prompt (/v1/completions, or williw generate without "
                                       "--chat)", "messages", "invalid_value")
        from jinja2 import TemplateError, TemplateSyntaxError

        try:
            out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except TemplateSyntaxError as exc:  # the model's fault, not the caller's
            raise GenerateError(f"the chat template of '{self.model_name}' does not parse: {exc}") from None
        except TemplateError as exc:  # the template's raise_exception(): an unknown role, a wrong order
            raise GenerationInputError(f"the chat template of '{self.model_name}' refused the messages: "
                                       f"{_line(exc)}", "messages", "invalid_value") from None
        except Exception as exc:  # Python raised inside the template ({{ 1 / 0 }}, str + int) on these messages
            raise GenerationInputError(f"the chat template of '{self.model_name}' failed on the messages: "
                                       f"{type(exc).__name__}: {_line(exc)}", "messages", "invalid_value") from None
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def stream(self, prompt_ids: list[int], stats: Stats, *, max_new_tokens: int, temperature: float = 0.0,
               seed: int | None = None) -> Iterator[str]:
        """The text of each new token as it comes (decoded with everything before it, so multi-byte characters
        split over up to 4 tokens come out whole); ``stats`` is filled as it goes. The arguments are checked now,
        before any node is asked; the nodes run as the iterator is consumed. At most ``context_tokens -
        len(prompt_ids) + 1`` tokens come (the module's docstring says why), then finish reason ``length``.

        Raises:
            GenerationInputError: at once: an empty prompt, one longer than the context (code
                ``context_length_exceeded``), ``max_new_tokens`` below 1, a temperature that is negative or not
                finite, a seed out of ``[-2**63, 2**64)``.
            GenerateError: while iterating: a node failed (one line naming it), or the pipeline is not ready.
        """
        if not prompt_ids:
            raise GenerationInputError("the prompt gives no tokens: send at least one character", "prompt",
                                       "invalid_value")
        context = self.context_tokens
        if len(prompt_ids) > context:
            raise GenerationInputError(f"the prompt has {len(prompt_ids)} tokens, over the context of {context} "
                                       f"tokens (the request's sequence_length); shorten it", "prompt",
                                       "context_length_exceeded")
        if max_new_tokens < 1:
            raise GenerationInputError(f"max_new_tokens is {max_new_tokens}; ask for at least 1",
                                       "max_tokens", "invalid_value")
        if not math.isfinite(temperature) or temperature < 0:
            raise GenerationInputError(f"temperature is {temperature}; give a number from 0 (greedy) up",
                                       "temperature", "invalid_value")
        if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
            raise GenerationInputError(f"seed is {seed}, outside [-2**63, 2**64) (what torch can seed with)",
                                       "seed", "invalid_value")
        limit = min(max_new_tokens, context - len(prompt_ids) + 1)
        return self._stream(prompt_ids, stats, limit, temperature, seed)

    def _stream(self, prompt_ids: list[int], stats: Stats, max_new_tokens: int, temperature: float,
                seed: int | None) -> Iterator[str]:
        tok = self.tokenizer
        eos = tok.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, list) else () if eos is None else (eos,)
        pipeline = self.pipeline()
        stats.prompt_tokens, stats.version, stats.nodes = len(prompt_ids), pipeline.version, \
            tuple(h.node_id for h in pipeline.hops)
        began = time.perf_counter()
        first = None
        shown = ""
        tokens: Any = ()
        try:
            tokens = generate_tokens(pipeline, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                     seed=seed, eos_ids=eos_ids, renew=self.pipeline)
            for token in tokens:
                now = time.perf_counter()
                if first is None:
                    first = now
                    stats.prefill_s = now - began
                stats.decode_s = now - first
                stats.token_ids.append(token)
                stats.new_tokens += 1
                if token in eos_ids:
                    stats.finish_reason = "stop"
                    break
                text = tok.decode(stats.token_ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # maybe the first bytes of a character: held until it is whole
                    continue
                delta, shown = text[len(shown):], text
                if delta:
                    yield delta
            text = tok.decode(stats.token_ids, skip_special_tokens=True)
            if text[len(shown):]:
                yield text[len(shown):]
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:  # a caller that stops early (a client gone) ends the stages' session now
                close()
            pipeline.close()


def _check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's "\ud800", or bytes of a command line that are not UTF-8
        raise GenerationInputError(f"'{param}' is not valid Unicode: a lone surrogate {text[exc.start]!r} at "
                                   f"character {exc.start} ({exc.reason} in UTF-8)", param, "invalid_value") from None


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
