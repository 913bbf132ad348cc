"""Generation over the placed model: each step goes through the node stages in plan order.

The caller (``williw generate``, ``williw serve-api``) asks the worker for the plan in force and where each node
serves (`Pipeline.from_worker`). For each step it posts the token ids to the first stage, which passes its hidden
state on to the next stage itself, and so on; the last stage's logits come back along the chain (``chained``,
the default; `williw.node_stages` for the routes). With ``chained=False`` the caller drives every hop: it posts to
each stage in turn and forwards each hidden state itself (like Petals' client-driven sequence); both cost the
same number of requests (one per stage), and ``bench/generate.py`` measures both. A session id names the
generation on every stage, which keeps its KV cache: a prefill sends the prompt once, each decode step one
token. The caller picks the next token (greedy, or sampled at a temperature with a seeded generator), so the
nodes never hold a sampler.

Transport: HTTP/1.1 keep-alive (httpx here and between stages, the agents' threaded servers there), the body
safetensors bytes.

A node that does not answer (dead: connection refused or reset; a timeout) fails the request with one line naming
it (the stage before it names it, along a chain); a stage whose version was replaced under a running generation
(404) makes `generate_tokens` start the prefill again on the version now in force.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from williw.errors import GenerateError, GenerationInputError

if TYPE_CHECKING:
    import httpx
    import torch

    from williw.decode_rules import DecodeRules

__all__ = ["Hop", "Pipeline", "generate_tokens", "load_tokenizer", "not_answered"]

CONNECT_TIMEOUT_S = 3.0
# A stage loads once its shard is ready, in the background; a step that comes during the load waits for it
# (SmolLM2-135M: about 1 s; a 7B stage: tens of seconds).
READ_TIMEOUT_S = 300.0


def not_answered(node_id: str, url: str, exc: Exception) -> str:
    """The one line for a node that did not answer (connection refused or reset, a timeout)."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return f"node '{node_id}' ({url}) did not answer: {reason}"


@dataclass(frozen=True)
class Hop:
    """One stage: the node, the URL it serves at, its blocks ``[start, end)``."""

    node_id: str
    url: str
    blocks: tuple[int, int]


class StageGone(GenerateError):
    """A stage answered 404: it holds no shard of that version (a re-plan dropped it) or lost the session."""


@dataclass
class Pipeline:
    """The stages of a request's plan version, in plan order, and the per-hop timings of the last step, lists of
    ``len(hops)`` in ms: ``hop_ms`` the round trip of the request to each stage (along a chain it includes the
    stages after it), ``compute_ms`` the stage's own time. ``chained``: the stages pass the step on themselves."""

    request_id: str
    version: int
    hops: tuple[Hop, ...]
    http: httpx.Client
    chained: bool = True
    hop_ms: list[float] = field(default_factory=list)
    compute_ms: list[float] = field(default_factory=list)
    _rules: DecodeRules | None = field(default=None, repr=False)

    def overhead_ms(self) -> list[float]:
        """Each hop's transport cost in the last step (HTTP, safetensors encoding and decoding, the socket): its
        round trip minus its stage's compute, and along a chain minus the next hop's round trip too."""
        later = [*self.hop_ms[1:], 0.0] if self.chained else [0.0] * len(self.hop_ms)
        return [h - c - n for h, c, n in zip(self.hop_ms, self.compute_ms, later, strict=True)]

    @classmethod
    def from_worker(cls, worker_url: str, request_id: str, token: str | None = None, *,
                    chained: bool = True) -> Pipeline:
        """The plan in force of ``request_id`` and where its nodes serve (``chained``: see the class).

        Raises:
            GenerateError: the request has no plan in force, a node's shard of that version is not ready, or a
                node serves nowhere.
            WorkerError: the worker refuses or does not answer.
        """
        import httpx

        from williw.client import WorkerClient
        from williw.planner.plan import Plan

        with WorkerClient(worker_url, token) as c:
            plan = Plan.from_dict(c.get_plan(request_id), f"request {request_id}'s plan")
            rows = {r["node_id"]: r for r in c.request_assignments(request_id)["assignments"]}
        version = plan.version
        hops = []
        for a in plan.assignments:
            row = rows.get(a.node_id)
            state = row["state"] if row and row["plan_version"] == version else "not assigned"
            if state != "ready":
                raise GenerateError(f"node '{a.node_id}' is not ready for plan version {version} of request "
                                    f"{request_id} (state: {state}); wait for distribution to finish")
            if not row.get("serve_url"):
                raise GenerateError(f"node '{a.node_id}' serves no stage (its agent runs with --serve-host none)")
            if a.blocks is None:
                raise GenerateError(f"plan version {version} gives node '{a.node_id}' no block range: only a "
                                    f"pipeline plan can generate")
            hops.append(Hop(a.node_id, row["serve_url"].rstrip("/"), a.blocks))
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        return cls(request_id, version, tuple(hops), httpx.Client(timeout=timeout, trust_env=False), chained)

    def close(self) -> None:
        self.http.close()

    def step(self, session: str, x: torch.Tensor, start: int) -> torch.Tensor:
        """Run ``x`` (token ids ``[1, tokens]`` at positions ``[start, start + tokens)``) through every stage;
        returns the last position's logits ``[1, vocab]`` (float32).

        Raises:
            GenerateError: a node did not answer or refused the step (one line naming it); `StageGone` on a 404.
        """
        from williw.runtime import decode_tensor, encode_tensor

        params = {"session": session, "start": str(start)}
        if self.chained and len(self.hops) > 1:
            hop = self.hops[0]
            began = time.perf_counter()
            r = self._call(hop, "POST", f"{hop.url}/stage/{self.request_id}/v{self.version}/forward",
                           content=encode_tensor("x", x), params={**params, "chain": "1"})
            self.hop_ms = [(time.perf_counter() - began) * 1000, *_floats(r.headers.get("X-Williw-Next-Ms"))]
            self.compute_ms = _floats(r.headers.get("X-Williw-Compute-Ms"))
            return decode_tensor(r.content, "logits", f"node '{self.hops[-1].node_id}'")
        self.hop_ms, self.compute_ms = [], []
        for hop in self.hops:
            url = f"{hop.url}/stage/{self.request_id}/v{self.version}/forward"
            began = time.perf_counter()
            r = self._call(hop, "POST", url, content=encode_tensor("x", x), params=params)
            self.hop_ms.append((time.perf_counter() - began) * 1000)
            self.compute_ms.append(float(r.headers.get("X-Williw-Compute-Ms", "nan")))
            x = decode_tensor(r.content, "logits" if hop is self.hops[-1] else "hidden", f"node '{hop.node_id}'")
        return x

    def end(self, session: str) -> None:
        """Close the session on every stage that still answers (its KV cache is freed)."""
        for hop in self.hops:
            with contextlib.suppress(Exception):  # a dead node holds no session; expiry frees the rest
                self.http.delete(f"{hop.url}/stage/{self.request_id}/v{self.version}/sessions/{session}")

    def rules(self) -> DecodeRules:
        """The model's decode rules (`williw.decode_rules`), from the config the first node keeps beside its shard.

        Raises:
            GenerateError: the node keeps no config.json, or the pipeline cannot generate with the model (one line
                naming the architecture).
        """
        if self._rules is None:
            from transformers import AutoConfig

            from williw.decode_rules import decode_rules
            from williw.progress import quiet_transformers

            data = self.fetch("config.json")
            if data is None:
                raise GenerateError(f"node '{self.hops[0].node_id}' keeps no config.json beside its shard")
            with tempfile.TemporaryDirectory(prefix="williw-config-") as tmp, quiet_transformers():
                (Path(tmp) / "config.json").write_bytes(data)
                try:
                    config = AutoConfig.from_pretrained(tmp)
                except (ValueError, KeyError, OSError) as exc:
                    raise GenerateError(f"node '{self.hops[0].node_id}': transformers cannot read the model's "
                                        f"config.json ({' '.join(str(exc).split())})") from None
            self._rules = decode_rules(config)
        return self._rules

    def fetch(self, name: str) -> bytes | None:
        """A file copied beside the first node's shard (``tokenizer.json``, ``config.json``), or None."""
        hop = self.hops[0]
        r = self.http.get(f"{hop.url}/{self.request_id}/v{self.version}/{hop.node_id}/{name}")
        return r.content if r.status_code == 200 else None

    def _call(self, hop: Hop, method: str, url: str, **kwargs: Any) -> httpx.Response:
        import httpx

        try:
            r = self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise GenerateError(not_answered(hop.node_id, hop.url, exc)) from None
        if r.status_code == 200:
            return r
        # Along a chain the answer may come from a later stage: it names itself.
        failed = next((h for h in self.hops if h.node_id == r.headers.get("X-Williw-Node")), hop)
        if r.status_code == 404:  # the node's own line names it already
            raise StageGone(r.text.strip() or f"node '{failed.node_id}' ({failed.url}) answered 404")
        raise GenerateError(r.text.strip() or f"node '{failed.node_id}' ({failed.url}) answered {r.status_code}")


def _floats(header: str | None) -> list[float]:
    return [float(v) for v in header.split(",")] if header else []


def load_tokenizer(pipeline: Pipeline) -> Any:
    """The model's tokenizer, from the files the first node keeps beside its shard (no shared filesystem).

    Raises:
        GenerateError: the pipeline cannot generate with the model (`Pipeline.rules`), or the node keeps no
            tokenizer file.
    """
    from transformers import AutoTokenizer

    from williw.progress import quiet_transformers
    from williw.shards import COPIED_FILES

    pipeline.rules()  # a model the pipeline cannot generate with is refused first, naming its architecture
    with tempfile.TemporaryDirectory(prefix="williw-tokenizer-") as tmp:
        got = 0
        for name in COPIED_FILES:
            data = pipeline.fetch(name)
            if data is not None:
                (Path(tmp) / name).write_bytes(data)
                got += name != "config.json" and name != "generation_config.json"
        if not got:
            raise GenerateError(f"node '{pipeline.hops[0].node_id}' keeps no tokenizer beside its shard")
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(tmp)


def generate_tokens(pipeline: Pipeline, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
                    seed: int | None = None, eos_ids: tuple[int, ...] = (), renew: Any = None) -> Iterator[int]:
    """Yield new token ids as they come: a prefill of ``prompt_ids``, then one decode step per token, stopping
    after ``max_new_tokens`` or after an end-of-sequence id (yielded, as ``model.generate`` keeps it).

    Greedy at ``temperature == 0`` (the argmax, like ``model.generate(do_sample=False)``); otherwise sampled from
    ``softmax(logits / temperature)`` with a ``torch.Generator`` seeded by ``seed``. What ``model.generate`` does
    per model is done here too (`williw.decode_rules`: Phi-3 recomputes the sequence at its long-rope switch), or
    the model is refused before the first step.

    Args:
        renew: ``() -> Pipeline``; when a stage's version is gone (a re-plan switched versions, before or during the
            generation), the prefill starts again on the pipeline it returns, with the prompt and the tokens so far;
            a 404 again before any step succeeds there fails the request. None: the request fails.

    Raises:
        GenerateError: a node failed (one line naming it), the prompt is empty, or the pipeline cannot generate
            with the model (one line naming the architecture).
    """
    import torch

    if not prompt_ids:
        raise GenerationInputError("the prompt gives no tokens: send at least one character", "prompt",
                                   "invalid_value")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    rules = pipeline.rules()
    tokens, produced, session = list(prompt_ids), 0, uuid.uuid4().hex
    x, start = torch.tensor([tokens], dtype=torch.long), 0
    renewed = False  # the last step ran on a pipeline renew gave and has not succeeded yet: a second 404 fails
    own: list[Pipeline] = []  # pipelines renew gave: closed here (the caller closes its own)
    try:
        while produced < max_new_tokens:
            if start and start == rules.recompute_at:
                # Phi-3's long-rope switch: model.generate drops the cache here and runs the whole sequence again.
                x, start = torch.tensor([tokens], dtype=torch.long), 0
            try:
                logits = pipeline.step(session, x, start)
            except StageGone:
                if renew is None or renewed:
                    raise
                pipeline.end(session)
                pipeline, session, renewed = renew(), uuid.uuid4().hex, True
                own.append(pipeline)
                x, start = torch.tensor([tokens], dtype=torch.long), 0
                continue
            renewed = False
            if temperature > 0:
                scaled = logits[0] / temperature
                if not bool(torch.isfinite(scaled).all()):  # a tiny temperature overflows: the same distribution,
                    top = logits[0].double()  # float64: a temperature below float32's range is not 0 there
                    scaled = (top - top.max()) / temperature  # from the largest logit (never NaN)
                probs = torch.softmax(scaled, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=gen))
            else:
                token = int(logits[0].argmax())
            start += int(x.shape[1])
            tokens.append(token)
            produced += 1
            yield token
            if token in eos_ids:
                break
            x = torch.tensor([[token]], dtype=torch.long)
    finally:
        pipeline.end(session)
        for p in own:
            p.close()
