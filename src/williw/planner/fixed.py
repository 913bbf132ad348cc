"""A pipeline plan whose stage boundaries are chosen by hand (for experiments, tests and benchmarks).

The search in `make_plan` picks the cuts; this only lays tensors out for given ones, with the same rules:
blocks whole, embeddings on the first stage, final norm and heads on the last, a tied head's embedding
replicated on the last stage.
"""

from __future__ import annotations

from collections.abc import Sequence

from williw.errors import PlanError
from williw.metadata import ModelMetadata
from williw.planner.plan import NodeAssignment, Plan


def pipeline_from_cuts(meta: ModelMetadata, cuts: Sequence[int], node_ids: Sequence[str] | None = None, *,
                       model_name: str | None = None) -> Plan:
    """Stage ``i`` holds blocks ``[bounds[i], bounds[i+1])`` where ``bounds = [0, *cuts, number of blocks]``.

    Args:
        meta: the model's metadata.
        cuts: interior stage boundaries, strictly increasing block indices in ``(0, number of blocks)``.
        node_ids: one per stage (default ``stage-0``, ``stage-1``, ...).
        model_name: recorded in the plan (default: the metadata's).

    Returns:
        A pipeline `Plan` with per-stage GFLOPs and bytes; no times, since no nodes are known.

    Raises:
        PlanError: cuts out of order or out of range, or the wrong number of node ids.
    """
    indices = [b.index for b in meta.blocks]
    bounds = [0, *cuts, len(indices)]
    if any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
        raise PlanError(f"cuts {list(cuts)} must increase strictly within (0, {len(indices)})")
    ids = list(node_ids) if node_ids is not None else [f"stage-{i}" for i in range(len(bounds) - 1)]
    if len(ids) != len(bounds) - 1:
        raise PlanError(f"{len(bounds) - 1} stages need {len(bounds) - 1} node ids, got {len(ids)}")
    last = len(ids) - 1
    position = {index: i for i, index in enumerate(indices)}  # block index -> position in model order
    block_compute = {b.index: b.compute for b in meta.blocks}
    tied = meta.tied_lm_head
    assignments = []
    for stage, node_id in enumerate(ids):
        start, end = bounds[stage], bounds[stage + 1]
        layers = [x for x in meta.layers
                  if (x.block is not None and start <= position[x.block] < end)
                  or (x.placement == "first" and stage == 0) or (x.placement == "last" and stage == last)]
        shared = (tied.tensor,) if tied and stage == last and stage > 0 else ()
        compute = sum(block_compute[i] for i in indices[start:end]) + sum(
            x.compute_required for x in layers if x.block is None)
        if tied and stage == last:
            compute += tied.compute_required
        nbytes = sum(x.bytes for x in layers) + (tied.bytes if shared else 0)
        assignments.append(NodeAssignment(node_id, tuple(x.name for x in layers), compute, 0.0, bytes=nbytes,
                                          stage=stage, blocks=(start, end), shared_tensors=shared))
    return Plan("pipeline", tuple(assignments), model_name=model_name or meta.model_name)
