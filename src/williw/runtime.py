"""A node's stage, served for generation: the stage built from the node's own shard (`williw.stages.build_stage`,
the construction `verify` uses) runs its blocks for sessions whose KV cache it keeps.

One session is one generation: a prefill (the prompt's tokens, positions ``[0, n)``) and then one decode step per
token (position ``n``, ``n + 1``, ...). Each session owns one transformers ``DynamicCache`` of the whole model: the
stage's blocks keep their absolute layer indices, so they fill their own layers of it, and the stand-in blocks of
other stages never touch it. The model's forward reads the cache's length (for ``position_ids`` and the attention
mask) from layer 0, or from the first layer of a kind (sliding window); on a later stage those layers stay empty,
so `_StageCache` answers those questions from the stage's first layer of the same kind instead. That is the only
change to transformers' cache, and no modeling code is copied.

Memory is bounded by the plan's KV budget: the request's ``batch_size`` sessions of at most ``sequence_length``
tokens each (the budget the planner reserved on every node). A session idle for ``ttl_s`` is expired; a closed
or expired one frees its cache.

The wire format of a hop is safetensors bytes (one tensor, ``x`` in, ``hidden`` or ``logits`` out): the hidden
state arrives bit for bit, with its dtype and shape, and parsing it copies nothing but the body.

torch and transformers are imported inside the functions (they are an extra).
"""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from williw.errors import GenerateError, VerifyError

if TYPE_CHECKING:
    import torch

    from williw.stages import Stage

__all__ = ["Session", "StageHost", "decode_tensor", "encode_tensor", "load_host"]

SESSION_TTL_S = 300.0


def encode_tensor(name: str, t: torch.Tensor) -> bytes:
    """One tensor as safetensors bytes (the body of a hop)."""
    from safetensors.torch import save

    return save({name: t.contiguous()})


def decode_tensor(body: bytes, name: str, where: str) -> torch.Tensor:
    """The tensor ``name`` of a safetensors body, copied into 64-byte aligned memory (`williw.stages.ALIGNMENT`:
    the same numerics as a tensor computed here).

    Raises:
        GenerateError: the body is not safetensors or lacks ``name``.
    """
    from safetensors.torch import load

    from williw.stages import ALIGNMENT

    try:
        t = load(body)[name]
    except Exception as exc:  # safetensors raises its own SafetensorError and KeyError
        raise GenerateError(f"{where}: the body is not safetensors holding '{name}' ({exc})") from None
    return t.clone() if t.data_ptr() % ALIGNMENT else t


def _stage_cache(config: Any, blocks: tuple[int, int]) -> Any:
    """A ``DynamicCache`` of the whole model whose lengths are read from the stage's own layers."""
    from transformers import DynamicCache
    from transformers.cache_utils import CacheLayerMixin

    start, end = blocks
    types = list(getattr(config.get_text_config(), "layer_types", None) or [])

    class _StageCache(DynamicCache):
        """Asked about a layer of another stage (always empty here), answer for this stage's first layer of the
        same kind (cache layer class, then config ``layer_types``); a kind this stage lacks is answered from the
        tokens the session holds."""

        def _own(self, layer_idx: int) -> int | None:
            layers = getattr(self, "layers", None) or []
            if layer_idx < len(layers) and not isinstance(layers[layer_idx], CacheLayerMixin):
                # A state-space layer tracks no length: transformers answers for the first attention layer
                layer_idx = next((j for j, layer in enumerate(layers) if isinstance(layer, CacheLayerMixin)), -1)
                if layer_idx < 0:
                    return None
            if start <= layer_idx < end:
                return layer_idx
            if layer_idx < len(layers) and end <= len(layers):  # the same kind of cache layer (Bamba: no types)
                kind = type(layers[layer_idx])
                same = [j for j in range(start, end) if type(layers[j]) is kind]
                if types and layer_idx < len(types):
                    same = [j for j in same if types[j] == types[layer_idx]] or same
                return same[0] if same else None
            if types and layer_idx < len(types):
                return next((j for j in range(start, end) if types[j] == types[layer_idx]), start)
            return start

        # The tokens the session holds, set before each step: the answer for a kind of layer this stage lacks
        # (Bamba asks its one attention layer's length on a stage of state-space layers only).
        held = 0

        def get_seq_length(self, layer_idx: int = 0) -> int:
            own = self._own(layer_idx)
            if own is None:
                return self.held
            return super().get_seq_length(own)

        def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> Any:
            own = self._own(layer_idx)
            if own is None:  # as a full-attention layer holding the session's tokens would (no layer uses it)
                return query_length + self.held, 0
            return super().get_mask_sizes(query_length, own)

    return _StageCache(config=config)


@dataclass
class Session:
    """One generation's state on this stage: its cache, the tokens it holds, when it was last used (monotonic s)."""

    cache: Any
    tokens: int
    used: float


class StageHost:
    """A stage serving sessions. Thread-safe: the forward runs under one lock (torch uses every core for one
    forward; two at once would only share them).

    Args:
        stage: from `williw.stages.build_stage`.
        config: the model's config.
        where: the node and stage, for messages (``node 'b' (blocks [10, 20))``).
        max_sessions, max_tokens: the KV budget (the request's batch size and sequence length).
        ttl_s: seconds after which an idle session is expired.
    """

    def __init__(self, stage: Stage, config: Any, where: str, *, max_sessions: int, max_tokens: int,
                 ttl_s: float = SESSION_TTL_S) -> None:
        self.stage, self.config, self.where = stage, config, where
        self.max_sessions, self.max_tokens, self.ttl_s = max_sessions, max_tokens, ttl_s
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.device, self.dtype = "cpu", stage.model.dtype  # load_host sets the device, and the precision
        self.precision: Any = None
        self.converted: dict[str, int] = {}  # linears converted to int8/int4 (`williw.quantize.quantize_linears`)
        from williw.stages import cache_argument

        params = inspect.signature(stage.model.forward).parameters
        self._cache_arg = cache_argument(stage.model)
        self._keep_last = "logits_to_keep" in params
        # The first of the stage's blocks whose output holds NaN or Inf in the current step (an isfinite per block:
        # microseconds next to the block's own arithmetic).
        self._nonfinite: list[int] = []
        for i in range(*stage.blocks):
            stage.stack[i].register_forward_hook(self._finite_hook(i))

    def _finite_hook(self, index: int) -> Any:
        import torch

        def check(_module: Any, _args: Any, out: Any) -> None:
            hidden = out[0] if isinstance(out, tuple) else out
            if not self._nonfinite and isinstance(hidden, torch.Tensor) and not bool(torch.isfinite(hidden).all()):
                self._nonfinite.append(index)
        return check

    def forward(self, session_id: str, x: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        """Run the stage on ``x`` at positions ``[start, start + tokens)`` of session ``session_id``.

        ``x`` is token ids ``[1, tokens]`` (first stage) or the previous stage's hidden state
        ``[1, tokens, hidden]``. ``start == 0`` opens the session (or restarts it); any other start must equal the
        tokens the session holds.

        Returns:
            ``{"hidden": [1, tokens, hidden]}`` on an inner stage; ``{"logits": [1, vocab]}`` (the last position's,
            float32) on the last.

        Raises:
            GenerateError: an unknown or expired session, a start that skips or repeats positions, the KV budget
                (sessions or tokens) exceeded; the model's forward raised, or a block computed NaN or Inf (the
                session is closed: its cache holds that step's state).
        """
        import torch

        from williw.stages import run_stage

        n = int(x.shape[1])
        # A hidden state crosses in the sending stage's dtype and is cast here (nodes of different dtypes form one
        # pipeline); token ids stay integers.
        x = x.to(self.device)
        if x.is_floating_point():
            x = x.to(self.dtype)
        with self.lock:
            session = self._session(session_id, start, n)
            positions = torch.arange(start, start + n, dtype=torch.long, device=self.device).unsqueeze(0)
            kwargs: dict[str, Any] = {"use_cache": True, self._cache_arg: session.cache, "position_ids": positions}
            if self._keep_last:
                kwargs["logits_to_keep"] = 1
            self._nonfinite.clear()
            session.cache.held = start
            try:
                out = run_stage(self.stage, x, kwargs)
            except Exception as exc:  # the model's own forward refused: one line, never a dropped connection
                self.sessions.pop(session_id, None)
                raise GenerateError(f"{self.where}: the model's forward failed on this stage: "
                                    f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None
            result = out["hidden"] if "hidden" in out else out["logits"][:, -1, :].float()
            if self._nonfinite or not bool(torch.isfinite(result).all()):
                # A token picked from NaN logits is a silent wrong answer: stop the generation and say where.
                self.sessions.pop(session_id, None)
                block = f"block {self._nonfinite[0]}" if self._nonfinite else "the stage's head"
                raise GenerateError(f"{self.where}: {block} computed NaN or Inf at positions [{start}, "
                                    f"{start + n}); the stage's weights or inputs are not what the model expects")
            session.tokens, session.used = start + n, time.monotonic()
        return {"hidden": result.cpu()} if "hidden" in out else {"logits": result.cpu()}

    def _session(self, session_id: str, start: int, n: int) -> Session:
        now = time.monotonic()
        for sid in [s for s, v in self.sessions.items() if now - v.used > self.ttl_s]:
            del self.sessions[sid]
        if start + n > self.max_tokens:
            raise GenerateError(f"{self.where}: session {session_id[:8]} would hold {start + n} tokens, over the "
                                f"plan's KV budget of {self.max_tokens} tokens (the request's sequence_length)")
        session = self.sessions.get(session_id)
        if start == 0:
            if session is None and len(self.sessions) >= self.max_sessions:
                raise GenerateError(f"{self.where}: {len(self.sessions)} sessions are open, the plan's KV budget is "
                                    f"{self.max_sessions} (the request's batch_size); close one or wait "
                                    f"{self.ttl_s:.0f} s for an idle one to expire")
            session = Session(_stage_cache(self.config, self.stage.blocks), 0, now)
            self.sessions[session_id] = session
        elif session is None:
            raise GenerateError(f"{self.where}: no session {session_id[:8]} (closed, expired after "
                                f"{self.ttl_s:.0f} s idle, or opened on another process)")
        elif start != session.tokens:
            raise GenerateError(f"{self.where}: session {session_id[:8]} holds {session.tokens} tokens, the step "
                                f"starts at position {start}")
        return session

    def close(self, session_id: str) -> bool:
        """Free a session's cache; False if it was not open."""
        with self.lock:
            return self.sessions.pop(session_id, None) is not None


def load_host(shard_dir: Path, blocks: tuple[int, int], where: str, *, max_sessions: int, max_tokens: int,
              dtype: str = "float32", weights: str = "as-stored", device: str = "cpu") -> StageHost:
    """Build the stage of ``blocks`` from ``shard_dir`` (its ``model.safetensors`` and ``config.json``) alone, at
    compute ``dtype``, its blocks' linear weights in format ``weights`` (`williw.precision`,
    `williw.quantize.quantize_linears`), on ``device`` (``cpu``, ``cuda:N``, ``mps``: `williw.devices`).

    Raises:
        GenerateError: the pipeline cannot generate with the model (`williw.decode_rules`), the format cannot run
            on the device, or the shard does not hold the stage (`williw.stages.build_stage`'s line, with the
            architecture named).
    """
    import torch

    from williw import stages as st
    from williw.decode_rules import decode_rules
    from williw.precision import Precision
    from williw.progress import quiet_transformers
    from williw.quantize import quantize_linears, to_device
    from williw.shards.reader import ShardReader

    precision = Precision(dtype, weights)
    shard = shard_dir / "model.safetensors"
    with quiet_transformers():
        config = st.load_config(shard_dir)
        name = decode_rules(config).architecture  # refused in generation's words before anything is built
        _, cls = st.model_class(config)
        with ShardReader(shard) as f:
            state = f.read_all()
        try:
            stage = st.build_stage(config, cls, blocks, state, getattr(torch, dtype), where=where,
                                   source=f"shard '{shard}'")
        except VerifyError as exc:  # named: a tensor the metadata placed by name where this model does not run it
            text = str(exc)
            raise GenerateError(text if text.startswith("architecture") else f"architecture '{name}': {text}") \
                from None
    del state
    try:
        converted = quantize_linears([stage.stack[i] for i in range(*blocks)], weights, device=device)
    except ValueError as exc:
        raise GenerateError(f"{where}: {exc}") from None
    to_device(stage.model, device)
    host = StageHost(stage, config, where, max_sessions=max_sessions, max_tokens=max_tokens)
    host.device, host.precision, host.converted = device, precision, converted
    return host
