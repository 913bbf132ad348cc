"""Re-planning for the ``latency`` objective: the fewest bytes moved among the plans whose summed decode cost is
within the bound.

The bottleneck objectives bound every stage (``time ≤ B``), so `replan`'s DP keeps one (bytes moved, bottleneck)
pair per state. The latency objective bounds a *sum* (``Σ cost ≤ B``, `williw.planner.latency`): a partial plan
that moved more bytes but spent less of the budget may be the only one that can still finish within it, so one
pair per state is not enough. Each state (nodes used, blocks covered) keeps instead its Pareto front of (bytes
moved, cost so far): both add up over stages, so a label that another beats in both can be dropped (every
completion of it completes the other no worse), and the answer is the least (bytes, cost) finished label whose
cost is at most ``B``; ties go to the lower cost, as for the other objectives.

* **exact** while ``2^k · (n + 1)`` states fit `EXACT_MAX_STATES`: every node subset, order and cut;
* **heuristic** beyond: the same fronts along fixed node orders (a node may be skipped, not reordered), one of
  them the fresh plan's, so the re-plan never moves more than the fresh plan.

Costs are `pipeline._Costs`' (decode time and transfers, memory against ``memory − reserve``), added left to
right in stage order: the bound is ``(1 + max_slowdown) · L*`` with ``L*`` the fresh plan's cost added the same
way, so the fresh plan itself meets a bound of exactly ``L*``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from williw.planner.pipeline import Stage, _Costs

# A (set, block) state holds a front, not one pair: 2^14 states x a few labels take ~1 s in CPython on the tiny
# fixtures of tests/test_replan_latency.py; the bottleneck re-plan's 2^19 would take minutes.
EXACT_MAX_STATES = 1 << 15
INF = float("inf")

# A label: (bytes moved, cost so far, its last stage, the label it extends); the stages are read back through it.
Label = tuple[int, float, Any, Any]
Moved = Callable[[int, int, int], int]


def latency_replan(c: _Costs, moved: Moved, twin: Sequence[int], orders: Sequence[Sequence[int]], bound: float,
                   upper: int) -> tuple[tuple[Stage, ...], bool] | None:
    """The stages moving the fewest bytes with a summed cost ``≤ bound``, and whether the search was exhaustive.

    Args:
        c: the candidates' costs under the ``latency`` objective (a model with at least one block).
        moved: bytes node ``v`` pulls to hold the stage ``[p, e)`` (`replan._Search.moved`).
        twin: per node, an earlier interchangeable node that must be used first, or -1.
        orders: the node orders of the heuristic (used only beyond `EXACT_MAX_STATES`).
        bound: the most seconds per token the plan may cost.
        upper: no plan moving more bytes is wanted (the fresh plan's bytes: it meets the bound).

    Returns:
        The stages in pipeline order and True (exact) or False (heuristic), or None when no plan meets both limits.
    """
    k, n = len(c.nodes), c.m.n
    if (1 << k) * (n + 1) <= EXACT_MAX_STATES:
        best = _subsets(c, moved, twin, bound, upper)
        return None if best is None else (_stages(best), True)
    found = [f for f in (_ordered(c, moved, order, bound, upper) for order in orders) if f is not None]
    if not found:
        return None
    return _stages(min(found, key=lambda label: (label[0], label[1]))), False


def _subsets(c: _Costs, moved: Moved, twin: Sequence[int], bound: float, upper: int) -> Label | None:
    k = len(c.nodes)
    fronts: list[dict[int, list[Label]]] = [{} for _ in range(1 << k)]
    fronts[0][0] = [(0, 0.0, None, None)]
    best: Label | None = None
    for s in range(1 << k):  # s | 1 << v > s: every state is complete before it is extended
        for p, front in fronts[s].items():
            for v in range(k):
                if s >> v & 1 or (twin[v] >= 0 and not s >> twin[v] & 1):
                    continue
                best = _extend(c, moved, v, p, front, fronts[s | 1 << v], bound, upper, best)
        fronts[s] = {}  # done with: free its labels (the chain of a live label keeps what it needs)
    return best


def _ordered(c: _Costs, moved: Moved, order: Sequence[int], bound: float, upper: int) -> Label | None:
    fronts: dict[int, list[Label]] = {0: [(0, 0.0, None, None)]}
    best: Label | None = None
    for v in order:
        nxt = {p: list(front) for p, front in fronts.items()}
        for p, front in fronts.items():
            best = _extend(c, moved, v, p, front, nxt, bound, upper, best)
        fronts = nxt
    return best


def _extend(c: _Costs, moved: Moved, v: int, p: int, front: list[Label], into: dict[int, list[Label]],
            bound: float, upper: int, best: Label | None) -> Label | None:
    """Extend every label of ``front`` (blocks ``[0, p)`` covered) by a stage of node ``v``; returns the best
    finished label so far."""
    n = c.m.n
    if c.finish(v, p, INF):
        cost, pulled = c.cost(v, p, n, True), moved(v, p, n)
        for label in front:
            key = (label[0] + pulled, label[1] + cost)
            if key[1] <= bound and key[0] <= upper and (best is None or key < (best[0], best[1])):
                best = (*key, Stage(v, p, n), label)
    limit = upper if best is None else min(upper, best[0])  # moved bytes only add up: beyond it nothing wins
    for e in range(p + 1, c.ext(v, p, INF) + 1):
        cost, pulled = c.cost(v, p, e, False), moved(v, p, e)
        for label in front:
            m, t = label[0] + pulled, label[1] + cost
            if t <= bound and m <= limit:
                _insert(into.setdefault(e, []), (m, t, Stage(v, p, e), label))
    return best


def _insert(front: list[Label], label: Label) -> None:
    m, t = label[0], label[1]
    if any(x[0] <= m and x[1] <= t for x in front):
        return
    front[:] = [x for x in front if not (m <= x[0] and t <= x[1])]
    front.append(label)


def _stages(label: Label) -> tuple[Stage, ...]:
    out = []
    while label[2] is not None:
        out.append(label[2])
        label = label[3]
    return tuple(reversed(out))


def summed_cost(c: _Costs, stages: Sequence[Stage]) -> float:
    """Seconds per token of ``stages``, added left to right in stage order (as the search adds them)."""
    n = c.m.n
    total = 0.0
    for s in stages:
        total += c.cost(s.node, s.start, s.end, s.end == n)
    return total
