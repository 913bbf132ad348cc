"""The seed's greedy allocation, exactly as the seed writes it, kept for compatibility and as the baseline.

The seed (Worker, "按算力切分算法"): 1. sort all tensors by compute, highest first; 2. give the heavy tensors to
the strong nodes; 3. keep every node's total compute under its available compute. Read literally:

* tensors sorted by ``compute_required`` descending (stable: ties keep model order); nodes sorted by
  ``compute_tflops`` descending (stable: ties keep file order);
* each tensor goes to the first node in that order with room left (first-fit decreasing);
* a node's **capacity** is its TFLOPS over one second: ``compute_tflops · 1000`` GFLOPs, since a tensor's
  ``compute_required`` is the GFLOPs of one forward pass and TFLOPS is FLOPs per second;
* ``compute_utilization`` = the node's ``total_compute`` / its capacity (0-1), the seed's "算力利用率".

The seed looks at compute only; memory is checked afterwards and a plan that overflows a node is refused, each
tensor priced at the node's compute dtype as stored (`williw.planner.costs.tensor_bytes`; greedy quantizes nothing).
``total_compute`` is the seed's sum over the node's tensors. To compare bottlenecks with ``pipeline``,
``stage_time_s`` also counts work that belongs to no tensor: each block's attention core goes to the node holding
the block's largest attention tensor (by compute, then model order), and a tied head's compute to the node holding
the embedding it reuses. Greedy's bottleneck (its slowest node) assumes nodes work in parallel, which scattered
tensors cannot really do; its latency is the sum of node times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from williw.errors import InfeasiblePlan
from williw.fleet import TFLOPS_IN_GFLOPS, Node
from williw.metadata import ModelMetadata
from williw.planner.costs import decode_time, prefill_time, tensor_bytes
from williw.planner.formats import node_device, node_dtype
from williw.planner.plan import ExcludedNode, NodeAssignment, Plan
from williw.precision import Precision
from williw.units import format_gflops


def greedy_plan(meta: ModelMetadata, nodes: Sequence[Node], objective: str = "prefill") -> Plan:
    """The seed's first-fit-decreasing allocation of tensors to nodes by compute.

    Args:
        meta: the model.
        nodes: the fleet.
        objective: which bottleneck ``bottleneck_s`` reports (prefill or decode); the allocation ignores it.

    Returns:
        A ``greedy`` plan with the nodes that received tensors, strongest first.

    Raises:
        InfeasiblePlan: a tensor fits no node's remaining capacity, or a node's tensors exceed its memory.
    """
    from williw.units import format_bytes

    order = sorted(nodes, key=lambda v: -v.compute_tflops)
    capacity = [v.compute_tflops * TFLOPS_IN_GFLOPS for v in order]
    used = [0.0] * len(order)
    names: list[list[str]] = [[] for _ in order]
    nbytes = [0] * len(order)
    owner: dict[str, int] = {}
    for x in sorted(meta.layers, key=lambda x: -x.compute_required):
        for j in range(len(order)):
            if used[j] + x.compute_required <= capacity[j]:
                used[j] += x.compute_required
                names[j].append(x.name)
                nbytes[j] += tensor_bytes(x, Precision(node_dtype(order[j])))
                owner[x.name] = j
                break
        else:
            room = max(c - u for c, u in zip(capacity, used, strict=True))
            raise InfeasiblePlan(f"greedy: tensor '{x.name}' needs {format_gflops(x.compute_required)} but the most "
                                 f"capacity left on any node is {format_gflops(room)} (short by "
                                 f"{format_gflops(x.compute_required - room)}; capacity = compute_tflops x 1000 "
                                 "GFLOPs per forward pass); try --strategy pipeline")
    for j, v in enumerate(order):
        if nbytes[j] > v.memory_bytes:
            over = format_bytes(nbytes[j] - v.memory_bytes)
            raise InfeasiblePlan(f"greedy: node '{v.node_id}' would hold {format_bytes(nbytes[j])} but has "
                                 f"{format_bytes(v.memory_bytes)} (over by {over}); "
                                 "the seed's greedy ignores memory, try --strategy pipeline")
    extra = [[u] for u in used]  # GFLOPs of each node, plus work that belongs to no tensor
    for block in meta.blocks:
        if block.attention_compute > 0:
            extra[_core_owner(meta, block.index, owner)].append(block.attention_compute)
    if meta.tied_lm_head:
        extra[owner[meta.tied_lm_head.tensor]].append(meta.tied_lm_head.compute_required)

    assignments, excluded = [], []
    for j, v in enumerate(order):
        if not names[j]:
            excluded.append(ExcludedNode(v.node_id, "the seed's greedy gave it no tensors (stronger nodes had "
                                                    "capacity for everything)"))
            continue
        assignments.append(NodeAssignment(
            node_id=v.node_id, layer_names=tuple(names[j]), total_compute=used[j],
            compute_utilization=used[j] / capacity[j], bytes=nbytes[j],
            stage_time_s=prefill_time(math.fsum(extra[j]), v), decode_time_s=decode_time(nbytes[j], v),
            dtype=node_dtype(v), weights="as-stored", device=node_device(v)))
    prefill = max(a.stage_time_s for a in assignments)  # type: ignore[type-var]
    decodes = [a.decode_time_s for a in assignments]
    decode = max(decodes) if all(d is not None for d in decodes) else None  # type: ignore[type-var]
    bottleneck = prefill if objective == "prefill" else decode
    tokens = meta.batch_size * meta.sequence_length
    lower = meta.total_compute / sum(capacity)
    return Plan(strategy="greedy", assignments=tuple(assignments), model_name=meta.model_name, objective=objective,
                bottleneck_s=bottleneck, prefill_bottleneck_s=prefill, decode_bottleneck_s=decode,
                latency_s=math.fsum(a.stage_time_s for a in assignments),  # type: ignore[misc]
                tokens_per_s=_tokens_per_s(objective, prefill, decode, tokens), lower_bound_s=lower,
                exact=None, excluded=tuple(excluded))


def _core_owner(meta: ModelMetadata, block: int, owner: dict[str, int]) -> int:
    members = [x for x in meta.layers if x.block == block]
    attention = [x for x in members if x.layer_type == "attention"] or members
    best = max(attention, key=lambda x: x.compute_required)  # max keeps the first of equals: model order
    return owner[best.name]


def _tokens_per_s(objective: str, prefill: float | None, decode: float | None, tokens: int) -> float | None:
    # Prefill: one B·S-token batch leaves the pipeline every bottleneck seconds. Decode: one token per bottleneck.
    if objective == "prefill":
        return tokens / prefill if prefill else None
    return 1.0 / decode if decode else None
