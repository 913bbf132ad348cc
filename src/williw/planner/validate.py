"""Plan validation (the seed's ``validate_split_plan``), reporting every problem at once.

Always: every tensor owned by exactly one node, no unknown names, no empty node. With ``nodes``: every plan node
is in the fleet and holds no more bytes than its memory, its tensors priced at the precision the plan records for
it (`williw.planner.costs.tensor_bytes`: float32 and as-stored when it records none). With ``metadata`` and a
``pipeline`` plan: no block is split, each node's blocks are contiguous and in stage order, embeddings are on the
first stage, the final norm and head on the last, a tied head's embedding is among the last stage's
``shared_tensors``, and the ``blocks`` and ``stage`` fields say what the node really holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from williw.errors import PlanError
from williw.fleet import Node
from williw.metadata import ModelMetadata
from williw.planner.costs import tensor_bytes
from williw.planner.plan import Plan


def validate_split_plan(all_layers: Sequence[str], plan: Plan | dict[str, Any], *,
                        metadata: ModelMetadata | None = None, nodes: Sequence[Node] | None = None) -> list[str]:
    """Every problem of ``plan``, one line each (empty when the plan is valid).

    Args:
        all_layers: the model's tensor names (e.g. ``[x.name for x in metadata.layers]``).
        plan: a `Plan` or its JSON dict.
        metadata: enables byte sizes from the model and the pipeline checks.
        nodes: enables the fleet and memory checks.

    Returns:
        The problems, in a stable order: per-tensor, per-node, then pipeline structure.
    """
    if not isinstance(plan, Plan):
        try:
            plan = Plan.from_dict(plan, "plan")
        except PlanError as exc:
            return [str(exc)]
    known = set(all_layers)
    problems: list[str] = []
    owners: dict[str, list[str]] = {}
    for a in plan.assignments:
        if not a.layer_names:
            problems.append(f"node '{a.node_id}' holds no tensors")
        for name in a.layer_names:
            if name not in known:
                problems.append(f"node '{a.node_id}': unknown tensor '{name}'")
            owners.setdefault(name, []).append(a.node_id)
        for name in a.shared_tensors:
            if name not in known:
                problems.append(f"node '{a.node_id}': unknown shared tensor '{name}'")
    for name, who in owners.items():
        if len(who) > 1 and name in known:
            problems.append(f"tensor '{name}' is assigned {len(who)} times: nodes "
                            + ", ".join(f"'{n}'" for n in who))
    problems += [f"tensor '{name}' is not assigned to any node" for name in all_layers if name not in owners]
    if nodes is not None:
        problems += _memory(plan, metadata, nodes)
    if metadata is not None and plan.strategy == "pipeline":
        problems += _pipeline(plan, metadata)
    return problems


def check_plan(all_layers: Sequence[str], plan: Plan | dict[str, Any], *, metadata: ModelMetadata | None = None,
               nodes: Sequence[Node] | None = None, shown: int | None = None) -> None:
    """`validate_split_plan`, raising when there is any problem.

    Args:
        shown: name at most this many problems (default: all), then ``"(and N more: williw validate lists them)"``.

    Raises:
        PlanError: ``"the plan has N problem(s): <p1>; <p2>; ..."``.
    """
    problems = validate_split_plan(all_layers, plan, metadata=metadata, nodes=nodes)
    if problems:
        more = len(problems) - shown if shown is not None and len(problems) > shown else 0
        tail = f" (and {more} more: williw validate lists them)" if more else ""
        raise PlanError(f"the plan has {len(problems)} problem{'s' if len(problems) > 1 else ''}: "
                        + "; ".join(problems[:len(problems) - more]) + tail)


def _memory(plan: Plan, metadata: ModelMetadata | None, nodes: Sequence[Node]) -> list[str]:
    from williw.units import format_bytes

    fleet = {v.node_id: v for v in nodes}
    layer = {x.name: x for x in metadata.layers} if metadata else {}
    out = []
    for a in plan.assignments:
        node = fleet.get(a.node_id)
        if node is None:
            out.append(f"node '{a.node_id}' is not in the fleet")
            continue
        runs = a.precision
        dtype, accepted = getattr(node, "dtype", "float32"), tuple(getattr(node, "weights", ("as-stored",)))
        if runs.dtype != dtype or runs.weights not in accepted:  # priced as the plan claims only if the node runs it
            out.append(f"node '{a.node_id}' runs {dtype} with weights {', '.join(accepted)}, but the plan gives it "
                       f"{runs.dtype} with weights {runs.weights}")
            continue
        held = sum(tensor_bytes(layer[n], a.precision) for n in set(a.tensor_names) if n in layer) if metadata \
            else a.bytes
        if held > node.memory_bytes:
            out.append(f"node '{a.node_id}' holds {format_bytes(held)} but has {format_bytes(node.memory_bytes)} "
                       f"(over by {format_bytes(held - node.memory_bytes)})")
    return out


def _pipeline(plan: Plan, meta: ModelMetadata) -> list[str]:
    out = []
    stage_of = {a.node_id: j for j, a in enumerate(plan.assignments)}
    first, last = plan.assignments[0].node_id, plan.assignments[-1].node_id
    held: dict[str, set[int]] = {a.node_id: set() for a in plan.assignments}
    block_owners: dict[int, list[str]] = {}
    owner = {n: a.node_id for a in plan.assignments for n in a.layer_names}
    for x in meta.layers:
        who = owner.get(x.name)
        if who is None:
            continue
        if x.block is not None:
            held[who].add(x.block)
            if who not in block_owners.setdefault(x.block, []):
                block_owners[x.block].append(who)
        elif x.placement == "first" and who != first:
            out.append(f"tensor '{x.name}' (embeddings) must be on the first stage '{first}', not on '{who}'")
        elif x.placement == "last" and who != last:
            out.append(f"tensor '{x.name}' (final norm or head) must be on the last stage '{last}', not on '{who}'")
    for block, who in sorted(block_owners.items()):
        if len(who) > 1:
            out.append(f"block {block} is split across nodes " + ", ".join(f"'{n}'" for n in who))
    index = [b.index for b in meta.blocks]
    position = {b: i for i, b in enumerate(index)}
    spans = []
    for j, a in enumerate(plan.assignments):
        mine = sorted(held[a.node_id])
        if a.stage is not None and a.stage != j:
            out.append(f"node '{a.node_id}': field 'stage' is {a.stage} but it is stage {j} of the plan")
        if not mine:
            continue
        if position[mine[-1]] - position[mine[0]] + 1 != len(mine):
            out.append(f"node '{a.node_id}': blocks {', '.join(map(str, mine))} are not contiguous")
        real = (mine[0], mine[-1] + 1)
        if a.blocks is not None and tuple(a.blocks) != real:
            out.append(f"node '{a.node_id}': field 'blocks' says [{a.blocks[0]}, {a.blocks[1]}) but it holds "
                       f"blocks [{real[0]}, {real[1]})")
        spans.append((position[mine[0]], a.node_id))
    visit = [n for _, n in sorted(spans)]
    if visit != sorted(visit, key=stage_of.__getitem__):
        out.append("blocks are not in stage order: model order visits nodes "
                   + ", ".join(f"'{n}'" for n in visit) + " but the stages are "
                   + ", ".join(f"'{n}'" for n in sorted(visit, key=stage_of.__getitem__)))
    tied = meta.tied_lm_head
    if tied and len(plan.assignments) > 1 and tied.tensor not in plan.assignments[-1].tensor_names:
        out.append(f"the last stage '{last}' needs the tied head's '{tied.tensor}' in shared_tensors")
    return out
