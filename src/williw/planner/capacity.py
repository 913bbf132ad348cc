"""What a plan leaves: each stage's headroom, the largest context and batch the plan holds, and the one-line
refusal when a fleet cannot hold the model at the asked batch and context.

A stage on node ``v`` holds ``weights + KV(B, C) + activations(B) <= memory_v - reserve_v`` (`costs`), each at the
precision the stage runs in (a model per stage: `formats.choose`). KV grows
with ``C`` (up to each sliding window) and both KV and activations grow linearly with ``B``, so

* the largest context at batch ``B`` is the largest ``C`` with ``KV(B, C) <= room - activations(B)`` on every
  stage (found by bisection on ``C``; None when no context fills the stage: only windows and states);
* the largest batch at context ``C`` is ``min_stages floor(room / (KV(1, C) + activations(1)))``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

from williw.fleet import Node
from williw.planner.costs import PipelineModel, usable_bytes
from williw.planner.formats import search_precision
from williw.planner.pipeline import EXACT_MAX_NODES, Stage, _Costs, _exact_feasible, _ordered_feasible, max_coverage
from williw.units import format_bytes

MAX_CONTEXT = 1 << 40  # tokens; a stage that still fits here holds any context


def with_workload(model: PipelineModel, batch: int, context: int) -> PipelineModel:
    """The same model for ``batch`` sequences of ``context`` tokens (KV cache and activations rescaled)."""
    kv = tuple(r.kv_bytes(batch, context) for r in model.block_runtime)
    act = [batch * model.prefill_tokens * r.activation_bytes_per_token for r in model.block_runtime]
    table = [act]
    while 2 << (len(table) - 1) <= len(act):
        half = 1 << (len(table) - 1)
        table.append([max(table[-1][i], table[-1][i + half]) for i in range(len(table[-1]) - half)])
    scale = batch / model.batch_size
    return dataclasses.replace(
        model, batch_size=batch, context_length=context, block_kv=kv,
        prefix_mem=tuple(accumulate((w + k for w, k in zip(model.block_bytes, kv, strict=True)), initial=0)),
        block_act=tuple(act), act_table=tuple(tuple(r) for r in table), last_act=round(model.last_act * scale),
        hop_bytes=tuple(round(x * scale) for x in model.hop_bytes),  # type: ignore[arg-type]
        token_bytes=tuple(round(x * scale) for x in model.token_bytes))  # type: ignore[arg-type]


def max_context(models: Sequence[PipelineModel], stages: Sequence[Stage], nodes: Sequence[Node],
                batch: int) -> int | None:
    """The largest context (tokens) every stage holds at ``batch`` (``models``: each stage's, at its precision); 0
    if not even one token; None if unbounded."""
    def ok(c: int) -> bool:
        return all(with_workload(m, batch, c).stage_memory(s.start, s.end) <= usable_bytes(v)
                   for m, s, v in zip(models, stages, nodes, strict=True))

    if ok(MAX_CONTEXT):
        return None
    lo, hi = 0, MAX_CONTEXT  # ok(lo) or lo == 0; not ok(hi)
    if not ok(1):
        return 0
    lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def max_batch(models: Sequence[PipelineModel], stages: Sequence[Stage], nodes: Sequence[Node]) -> int | None:
    """The largest batch every stage holds at the model's context (None: no stage grows with the batch)."""
    best: int | None = None
    for m, s, v in zip(models, stages, nodes, strict=True):
        one = with_workload(m, 1, m.context_length)
        grow = one.stage_kv(s.start, s.end) + one.stage_activation(s.start, s.end)
        if grow:
            room = usable_bytes(v) - one.stage_bytes(s.start, s.end)
            best = min(best if best is not None else room // grow, room // grow)
    return best


def capacity(models: Sequence[PipelineModel], stages: Sequence[Stage], nodes: Sequence[Node]) -> dict[str, Any]:
    """The plan-level figures of what a plan leaves (JSON-ready, for the ``@plan`` object); ``models``: each
    stage's, at its precision."""
    model = models[0]
    return {"batch_size": model.batch_size, "context_length": model.context_length,
            "max_context_length": max_context(models, stages, nodes, model.batch_size),
            "max_batch_size": max_batch(models, stages, nodes)}


def short(what: str, need: int, nodes: Sequence[Node], where: str = "") -> str:
    """``<what> needs X<where> but the largest node 'n' has Y (short by Z)``."""
    big = max(nodes, key=usable_bytes)
    have = usable_bytes(big)
    return (f"{what} needs {format_bytes(need)}{where} but the largest node '{big.node_id}' has {format_bytes(have)} "
            f"(short by {format_bytes(need - have)})")


def _fits_at(model: PipelineModel, nodes: list[Node], context: int) -> bool:
    c = _Costs(with_workload(model, model.batch_size, context), nodes, "prefill")
    k = len(nodes)
    if k <= EXACT_MAX_NODES:
        return _exact_feasible(c, float("inf"), sorted(range(1 << k), key=lambda s: (s.bit_count(), s))) is not None
    order = sorted(range(k), key=lambda i: (-c.relaxed.mem[i], i))
    return _ordered_feasible(c, float("inf"), order) is not None


def _largest_context(model: PipelineModel, nodes: list[Node]) -> str:
    if model.n == 0 or not _fits_at(model, nodes, 1):
        return f"; at batch {model.batch_size} not even a context of 1 token fits"
    lo, hi = 1, model.context_length  # fits at lo, not at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits_at(model, nodes, mid) else (lo, mid)
    return f"; at batch {model.batch_size} the fleet holds a context of at most {lo:,} tokens"


def context_tail(model: PipelineModel, nodes: list[Node]) -> str:
    """``"; at batch B the fleet holds a context of at most N tokens"`` (empty for weights-only metadata)."""
    runtime = any(model.block_kv) or any(model.block_act)
    return _largest_context(model, nodes) if runtime and model.context_length > 1 else ""


def why_infeasible(model: PipelineModel, nodes: list[Node]) -> str:
    """The first memory constraint that fails, with the shortfall, and the largest context that would fit (priced
    at the largest node's search precision, `formats.search_precision`)."""
    tail = context_tail(model, nodes)
    big = max(nodes, key=usable_bytes)
    model = model.at(search_precision(model, big))
    have = usable_bytes(big)
    n = model.n
    runtime = any(model.block_kv) or any(model.block_act)  # metadata written before run-time memory: weights only
    at = f" at batch {model.batch_size} and context {model.context_length:,}" if runtime else ""
    for i in range(n):
        b = model.prefix_mem[i + 1] - model.prefix_mem[i] + model.block_act[i]
        if b > have:
            return short(f"block {model.block_index[i]}", b, nodes, at) + tail
    if n > 1 and model.stage_memory(0, 1) > have:
        return short(f"the first stage (embeddings and block {model.block_index[0]})", model.stage_memory(0, 1),
                     nodes, at) + tail
    if n > 1 and model.stage_memory(n - 1, n) > have:
        return short(f"the last stage (block {model.block_index[-1]}, final norm and head)",
                     model.stage_memory(n - 1, n), nodes, at) + tail
    if n == 1:
        return short("the only block with the embeddings and head", model.stage_memory(0, 1), nodes, at) + tail
    # One node would hold it all as one stage; more nodes need 2+ stages (the replica, a transient each).
    total_need = model.stage_memory(0, n) if len(nodes) == 1 else model.stage_memory(0, 1) + model.stage_memory(1, n)
    total_have = sum(usable_bytes(v) for v in nodes)
    if total_need > total_have:
        replica = " (with the tied head's replica)" if model.replica_bytes else ""
        who = "the only usable node has" if len(nodes) == 1 else f"the {len(nodes)} usable nodes have"
        return (f"the model needs {format_bytes(total_need)}{replica}{at} but {who} "
                f"{format_bytes(total_have)} in total (short by {format_bytes(total_need - total_have)})" + tail)
    p = max_coverage(model, nodes)
    return (f"the blocks do not pack into contiguous runs on these {len(nodes)} nodes{at}: the best split holds "
            f"blocks [{model.block_index[0]}, {model.block_index[p] if p < n else n}) and leaves "
            f"{format_bytes(model.stage_memory(p, n))} (blocks from {model.block_index[p]} on, with the final norm "
            f"and head) without a node with room" + tail)
