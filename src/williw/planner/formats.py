"""What each node runs its stage in: the precisions a node accepts, the one the search prices it at, the one its
stage gets, and the relaxation that keeps the certified bounds valid when nodes differ.

A node runs at its compute ``dtype`` and accepts one or more weight formats (``weights``, highest precision first;
`williw.precision`). Bytes depend on both (`costs.tensor_bytes`), so a stage's memory and its decode time depend
on the node that runs it.

* **Search.** Each node is priced at the format it accepts with the fewest bytes (`search_precision`; ties go to
  the higher precision): the most blocks fit and a token reads the least, so no choice of formats makes a plan
  fit that the search rejects, or makes a stage cheaper. The searches are then exact over all format choices
  whenever that format has the fewest bytes block by block (true of every model whose linears the formats
  accept; `Precisions.exact` checks it, and a plan where it fails is reported with ``exact`` false).
* **Choice.** After the search each stage takes the highest-precision format its node accepts with which the
  stage still fits the node's memory and its time stays within the plan's objective value: the bottleneck
  (``prefill``, ``decode``; prefill time does not depend on the format) or, for ``latency``, the stage's own time
  at the search's format (`choose`). The plan's figures are unchanged or better, and the format is recorded.
* **Bounds.** The window and LP bounds reason over one model for all nodes. With nodes of different precisions
  they run on a relaxation (`relax`): every block, first and last group, transient and logits at the least bytes
  any accepted precision gives it (the envelope ``E``), and node ``v``'s memory and decode rate scaled by
  ``ρ_v = max_item E(item) / F_v(item) <= 1``, ``F_v`` the least over ``v``'s own formats. Then for every stage
  ``bytes_E <= ρ_v · bytes_v`` (each part is), so a stage that fits ``v`` fits ``ρ_v · memory`` in the
  relaxation, and ``bytes_E / (ρ_v · rate) <= bytes_v / rate``: every plan is a plan of the relaxation at no more
  cost, and a bound proven there holds for every plan and every choice of formats.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from williw.fleet import Link, Node
from williw.planner.costs import PipelineModel, stage_times, usable_bytes
from williw.precision import Precision

RELAX_SLACK = 1e-12  # the relaxed memory and rates are rounded up by this (relative): float products never tighten


def node_dtype(node: Node) -> str:
    """The node's compute dtype (``float32`` for a fleet file that names none)."""
    return getattr(node, "dtype", "float32")


def node_device(node: Node) -> str:
    return getattr(node, "device", "cpu")


def precisions(node: Node) -> tuple[Precision, ...]:
    """The precisions ``node`` accepts, highest first: its dtype with each accepted weight format."""
    return tuple(Precision(node_dtype(node), w) for w in getattr(node, "weights", ("as-stored",)))


def search_precision(model: PipelineModel, node: Node) -> Precision:
    """The accepted precision with the fewest weight bytes over the model (ties: the higher precision)."""
    options = precisions(node)
    if len(options) == 1:
        return options[0]
    return min(options, key=lambda p: (_weights(model.at(p)), options.index(p)))


def _weights(m: PipelineModel) -> int:
    return m.prefix_bytes[-1] + m.first_bytes + m.last_bytes + m.replica_bytes


@dataclass(frozen=True)
class Precisions:
    """Per node, the model priced at its search precision; whether all nodes share one model; whether each
    node's search format has the fewest bytes block by block (the searches are then exact over every choice)."""

    models: tuple[PipelineModel, ...]
    uniform: bool
    exact: bool
    floors: tuple[PipelineModel, ...]  # per node: the least bytes of its formats, item by item (== models[v] if exact)


def node_models(model: PipelineModel, nodes: Sequence[Node]) -> Precisions:
    """The models the nodes are searched at (see the module docstring)."""
    cache: dict[tuple[Precision, ...], tuple[PipelineModel, PipelineModel, bool]] = {}
    models, floors, exact = [], [], True
    for v in nodes:
        key = precisions(v)
        if key not in cache:
            found = model.at(search_precision(model, v))
            floor = _floor([model.at(p) for p in key]) if len(key) > 1 else found
            cache[key] = (found, floor, floor.block_bytes == found.block_bytes)
        found, floor, ok = cache[key]
        models.append(found)
        floors.append(floor)
        exact = exact and ok
    uniform = all(x is models[0] for x in models)
    return Precisions(tuple(models), uniform, exact, tuple(floors))


def _floor(options: list[PipelineModel]) -> PipelineModel:
    """Item by item the least bytes of models that share a dtype (formats change only the blocks' weights)."""
    base = options[0]
    weights = tuple(min(col) for col in zip(*(m.block_bytes for m in options), strict=True))
    if weights == base.block_bytes:
        return base
    return _with_blocks(base, weights, base.block_kv, base.block_act)


def _with_blocks(base: PipelineModel, weights: tuple[int, ...], kv: tuple[int, ...],
                 act: tuple[int, ...]) -> PipelineModel:
    table = [list(act)]
    while 2 << (len(table) - 1) <= len(act):
        half = 1 << (len(table) - 1)
        table.append([max(table[-1][i], table[-1][i + half]) for i in range(len(table[-1]) - half)])
    return dataclasses.replace(
        base, block_bytes=weights, block_kv=kv, block_act=act, act_table=tuple(tuple(r) for r in table),
        prefix_bytes=tuple(accumulate(weights, initial=0)),
        prefix_mem=tuple(accumulate((w + k for w, k in zip(weights, kv, strict=True)), initial=0)))


def relax(found: Precisions, mem: Sequence[int], rate: Sequence[float],
          decode: bool) -> tuple[PipelineModel, list[int], list[float]]:
    """The envelope model and each node's relaxed memory and rate (see the module docstring)."""
    floors = list({id(f): f for f in found.floors}.values())
    if len(floors) == 1:
        return floors[0], list(mem), list(rate)
    n = floors[0].n
    unit = [min(f.prefix_mem[i + 1] - f.prefix_mem[i] for f in floors) for i in range(n)]
    weights = tuple(min(f.block_bytes[i] for f in floors) for i in range(n))
    act = tuple(min(f.block_act[i] for f in floors) for i in range(n))
    env = _with_blocks(floors[0], weights, tuple(u - w for u, w in zip(unit, weights, strict=True)), act)
    env = dataclasses.replace(env, first_bytes=min(f.first_bytes for f in floors),
                              last_bytes=min(f.last_bytes for f in floors),
                              replica_bytes=min(f.replica_bytes for f in floors),
                              last_act=min(f.last_act for f in floors))

    def items(m: PipelineModel) -> list[int]:
        return [*(m.prefix_mem[i + 1] - m.prefix_mem[i] for i in range(n)), *m.block_act, m.first_bytes,
                m.last_bytes, m.replica_bytes, m.last_act]

    ratio: dict[int, float] = {}
    top = items(env)
    for f in floors:
        ratio[id(f)] = max((a / b for a, b in zip(top, items(f), strict=True) if b > 0), default=1.0)
    mem_out, rate_out = [], []
    for f, m, r in zip(found.floors, mem, rate, strict=True):
        rho = ratio[id(f)]
        mem_out.append(m if rho >= 1.0 else math.ceil(m * rho * (1 + RELAX_SLACK)))
        rate_out.append(r if rho >= 1.0 or not decode else r * rho * (1 + RELAX_SLACK))
    return env, mem_out, rate_out


def choose(model: PipelineModel, node: Node, p: int, e: int, objective: str, limit: float,
           hops: tuple[Link | None, Link | None] = (None, None)) -> tuple[Precision, PipelineModel]:
    """The highest precision ``node`` accepts with which the stage ``[p, e)`` fits its memory and its time under
    ``objective`` stays within ``limit`` seconds; the search's precision when none does."""
    for precision in precisions(node):
        m = model.at(precision)
        if m.stage_memory(p, e) > usable_bytes(node):
            continue
        pre, dec = stage_times(m, p, e, node, *hops)
        t = pre if objective == "prefill" else dec
        if t is None or t <= limit:
            return precision, m
    precision = search_precision(model, node)
    return precision, model.at(precision)
