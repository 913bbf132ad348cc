"""Re-planning for the ``latency`` objective: the fewest bytes moved among the plans whose summed decode cost is
within the bound.

The bottleneck objectives bound every stage (``time ≤ B``), so `replan`'s DP keeps one (bytes moved, bottleneck)
pair per state. The latency objective bounds a *sum* (``Σ cost ≤ B``, `williw.planner.latency`): a partial plan
that moved more bytes but spent less of the budget may be the only one that can still finish within it, so one
pair per state is not enough. Each state (nodes used, blocks covered) keeps instead its Pareto front of (bytes
moved, cost so far): both add up over stages, so a label that another beats in both can be dropped (every
completion of it completes the other no worse), and the answer is the least (bytes, cost) finished label whose
cost is at most ``B``; ties go to the lower cost, as for the other objectives.

* **exact** while the work ``2^k · k · (n + 1)^2`` (states, times the nodes and ends that extend each) fits
  `EXACT_MAX_WORK`: every node subset, order and cut;
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

# A sum bound prunes far less than a per-stage one, so the exact search extends most states. On a 2-core machine at
# load ~5 (bench/replan_latency.py): a whole new fleet of 8 nodes over 31 blocks (work 2^21) takes 0.8 s; before
# this limit, 10 nodes over 31 blocks (2^23.3) took 4.5-6.6 s and an empty newcomer with 9 nodes over 63 blocks
# (2^24.2) 7-20 s. A node that left, the survivors holding the rest, is cheaper: the orders' answer prunes it.
EXACT_MAX_WORK = 1 << 21
INF = float("inf")

# A label: (bytes moved, cost so far, its last stage, the label it extends); the stages are read back through it.
Label = tuple[int, float, Any, Any]
Moved = Callable[[int, int, int], int]
# A label is dropped when its cost plus a lower bound of the rest exceeds the bound by more than this (relative):
# the float sums may differ from the exact ones by ~1e-15, and a label must never be dropped by rounding.
PRUNE_MARGIN = 1e-9


class _Limits:
    """What a label may still spend: ``bound`` seconds and ``upper`` bytes, with lower bounds of the rest."""

    def __init__(self, c: _Costs, must_pull: Callable[[int], int], bound: float, upper: int) -> None:
        n, fastest = c.m.n, max(c.rate)
        # Every stage costs at least its bytes at the fastest bandwidth (transfers only add).
        self.rest_s = [c.amount(p, n, True) / fastest for p in range(n + 1)]
        self.rest_bytes = [must_pull(p) for p in range(n + 1)]
        self.bound, self.slack, self.upper = bound, bound * (1 + PRUNE_MARGIN), upper

    def keeps(self, moved: int, cost: float, e: int, best: Label | None) -> bool:
        most = self.upper if best is None else min(self.upper, best[0])  # bytes only add up: beyond, nothing wins
        return cost <= self.bound and moved + self.rest_bytes[e] <= most and cost + self.rest_s[e] <= self.slack


def latency_replan(c: _Costs, moved: Moved, must_pull: Callable[[int], int], twin: Sequence[int],
                   orders: Sequence[Sequence[int]], bound: float,
                   upper: int) -> tuple[tuple[Stage, ...], bool] | None:
    """The stages moving the fewest bytes with a summed cost ``≤ bound``, and whether the search was exhaustive.

    Args:
        c: the candidates' costs under the ``latency`` objective (a model with at least one block).
        moved: bytes node ``v`` pulls to hold the stage ``[p, e)`` (`replan._Search.moved`).
        must_pull: bytes of blocks ``[p, n)`` and the last group that no candidate holds now.
        twin: per node, an earlier interchangeable node that must be used first, or -1.
        orders: the node orders of the heuristic; its answer also bounds the exact search's bytes.
        bound: the most seconds per token the plan may cost.
        upper: no plan moving more bytes is wanted (the fresh plan's bytes: it meets the bound).

    Returns:
        The stages in pipeline order and True (exact) or False (heuristic), or None when no plan meets both limits.
    """
    k, n = len(c.nodes), c.m.n
    limits = _Limits(c, must_pull, bound, upper)
    found = [f for f in (_ordered(c, moved, order, limits) for order in orders) if f is not None]
    heuristic = min(found, key=lambda label: (label[0], label[1]), default=None)
    if (1 << k) * k * (n + 1) ** 2 > EXACT_MAX_WORK:
        return None if heuristic is None else (_stages(heuristic), False)
    # The orders' answer first: the exhaustive search then drops every label that cannot move as few bytes.
    if heuristic is not None:
        limits.upper = heuristic[0]
    best = _subsets(c, moved, twin, limits)
    if best is None:  # not expected (the orders' plan is one of those searched), but never answer worse than it
        return None if heuristic is None else (_stages(heuristic), False)
    return _stages(best), True


def _subsets(c: _Costs, moved: Moved, twin: Sequence[int], limits: _Limits) -> Label | None:
    k = len(c.nodes)
    fronts: list[dict[int, list[Label]]] = [{} for _ in range(1 << k)]
    fronts[0][0] = [(0, 0.0, None, None)]
    best: Label | None = None
    for s in range(1 << k):  # s | 1 << v > s: every state is complete before it is extended
        for p, front in fronts[s].items():
            for v in range(k):
                if s >> v & 1 or (twin[v] >= 0 and not s >> twin[v] & 1):
                    continue
                best = _extend(c, moved, v, p, front, fronts[s | 1 << v], limits, best)
        fronts[s] = {}  # done with: free its labels (the chain of a live label keeps what it needs)
    return best


def _ordered(c: _Costs, moved: Moved, order: Sequence[int], limits: _Limits) -> Label | None:
    fronts: dict[int, list[Label]] = {0: [(0, 0.0, None, None)]}
    best: Label | None = None
    for v in order:
        nxt = {p: list(front) for p, front in fronts.items()}
        for p, front in fronts.items():
            best = _extend(c, moved, v, p, front, nxt, limits, best)
        fronts = nxt
    return best


def _extend(c: _Costs, moved: Moved, v: int, p: int, front: list[Label], into: dict[int, list[Label]],
            limits: _Limits, best: Label | None) -> Label | None:
    """Extend every label of ``front`` (blocks ``[0, p)`` covered) by a stage of node ``v``; returns the best
    finished label so far."""
    n = c.m.n
    if c.finish(v, p, INF):
        cost, pulled = c.cost(v, p, n, True), moved(v, p, n)
        for label in front:
            key = (label[0] + pulled, label[1] + cost)
            if key[1] <= limits.bound and key[0] <= limits.upper and (best is None or key < (best[0], best[1])):
                best = (*key, Stage(v, p, n), label)
    for e in range(p + 1, c.ext(v, p, INF) + 1):
        cost, pulled = c.cost(v, p, e, False), moved(v, p, e)
        for label in front:
            m, t = label[0] + pulled, label[1] + cost
            if limits.keeps(m, t, e, best):
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
