"""Text in, text out over the placed model: the tokenizer and the pipeline of `williw.pipeline` put together for
``williw generate`` and the OpenAI-compatible API (`williw.openai_api`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from williw.pipeline import Pipeline, generate_tokens, load_tokenizer

__all__ = ["Generator", "Stats"]


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
    """

    def __init__(self, worker_url: str, request_id: str, token: str | None = None) -> None:
        self.worker_url, self.request_id, self.token = worker_url, request_id, token
        self._tokenizer: Any = None

    def pipeline(self) -> Pipeline:
        """The pipeline of the plan in force now (`Pipeline.from_worker`)."""
        return Pipeline.from_worker(self.worker_url, self.request_id, self.token)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            p = self.pipeline()
            try:
                self._tokenizer = load_tokenizer(p)
            finally:
                p.close()
        return self._tokenizer

    def prompt_ids(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of a plain prompt, or of chat ``messages`` through the model's chat template (with the
        assistant's turn opened)."""
        tok = self.tokenizer
        if messages is not None:
            out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        return list(tok(prompt or "")["input_ids"])

    def stream(self, prompt_ids: list[int], stats: Stats, *, max_new_tokens: int, temperature: float = 0.0,
               seed: int | None = None) -> Iterator[str]:
        """Yield the text of each new token as it comes (decoded with everything before it, so multi-byte
        characters split over up to 4 tokens come out whole); ``stats`` is filled as it goes.

        Raises:
            GenerateError: a node failed (one line naming it), or the pipeline is not ready.
        """
        tok = self.tokenizer
        eos = tok.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, list) else () if eos is None else (eos,)
        pipeline = self.pipeline()
        stats.prompt_tokens, stats.version, stats.nodes = len(prompt_ids), pipeline.version, \
            tuple(h.node_id for h in pipeline.hops)
        began = time.perf_counter()
        first = None
        shown, held = "", 0
        try:
            for token in generate_tokens(pipeline, prompt_ids, max_new_tokens=max_new_tokens,
                                         temperature=temperature, seed=seed, eos_ids=eos_ids, renew=self.pipeline):
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
                held += 1
                if text.endswith("\ufffd") and held < 4:  # maybe half a UTF-8 character (4 bytes at most): wait
                    continue
                delta, shown, held = text[len(shown):], text, 0
                if delta:
                    yield delta
            text = tok.decode(stats.token_ids, skip_special_tokens=True)
            if text[len(shown):]:
                yield text[len(shown):]
        finally:
            pipeline.close()
