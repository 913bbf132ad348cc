"""The pipeline search for a fleet with a link table: exact up to a node count, a fixed-order search beyond.

With links a stage's cost depends on its neighbours (`linkcost`), so the longest-run argument of
`pipeline._exact_feasible` no longer holds: a node that runs as far as it can may leave its successor, which
the pair's link forces, no block it can take, while a shorter run would have worked (every used node holds at
least one block; skipping it would price a different hop). The searches therefore keep every reachable cut.

**Bottleneck objectives** (``prefill``, ``decode``): for a threshold ``T`` a dynamic program over states
``(S, c, w)``: the nodes ``S`` hold ``[0, e)`` with every stage at most ``T``, ``w`` starts next, and ``c`` is the
class of the last node of ``S`` (itself when its pair with ``w`` is listed, otherwise "own link": the future
depends on the predecessor only through ``w``'s receive time). The state holds the set ``E`` of every reachable
``e`` as a bit mask. From a start ``e`` node ``w`` reaches the ends ``(e, ext(e)]`` (runs nest; ``ext`` is
non-decreasing in ``e``), so for a run ``[a, b]`` of consecutive starts the ends are ``(a, ext(b)]`` minus
``{s + 1 : s in [a, b], w cannot hold block s alone}``: a few big-integer operations per run. ``T`` is found as in
`pipeline._minimise` (bisection on the doubles, then over the stage costs left), so the plan is the exact optimum
over every node subset, order and cut. ``2^k · k²`` states (``k(k-1)(k-2)·2^(k-3)`` transitions) per threshold.

**Latency** (sum of the stages' decode costs): a shortest path over ``(S, x, f)`` ("``x`` starts at ``f``, its
receive time paid") and ``(S, x, g)`` ("``x`` ran to ``g``"); as costs add up, a hop's two sides are paid when
the successor is chosen, and the state forgets the predecessor.

**Beyond the limits**: the same programs over one node order with skips (the link-free plan's nodes in its order,
then the rest fastest first; and fastest first), each node followed by one of the next `ORDER_WINDOW`, exact
for that space only (``exact`` False). The link-free plan (consecutive in the first order) is one of its plans,
so the result is never worse than that plan priced with the links.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from williw.fleet import Link, Node
from williw.planner.costs import PipelineModel
from williw.planner.latency import search_latency
from williw.planner.linkcost import CLIENT, OWN, LinkCosts, Plan, minimise
from williw.planner.pipeline import HEURISTIC_REL_TOL, SearchResult, Stage, lower_bound, search

# Exact up to these candidate counts: with every pair of 8 nodes listed and 80 blocks, 0.4-0.9 s per objective
# (bench/planner_links.py); 9 nodes took up to 6.7 s for prefill.
EXACT_MAX_NODES = 8
LATENCY_EXACT_MAX_NODES = 8
# In a fixed order a node is followed by one of the next ORDER_WINDOW nodes (skipping at most ORDER_WINDOW - 1), so
# an order of L nodes takes O(L · ORDER_WINDOW) steps per threshold (2,000 nodes, 1,000 blocks, 200 pairs: 15 s).
ORDER_WINDOW = 8
INF = float("inf")


class _Space:
    """Which node may follow which: any unused one (``order`` None: exact), or a later one in ``order``.

    ``S`` is the set of nodes no longer available: used, or (in an order) skipped."""

    def __init__(self, k: int, order: Sequence[int] | None = None) -> None:
        self.k = k
        self.order = order
        if order is not None:
            self.pos = {v: i for i, v in enumerate(order)}
            self.before = [0] * (len(order) + 1)  # bits of order[:i]
            for i, v in enumerate(order):
                self.before[i + 1] = self.before[i] | 1 << v

    def starts(self) -> Iterator[tuple[int, int]]:
        if self.order is None:
            yield from ((0, v) for v in range(self.k))
        else:
            yield from ((self.before[i], v) for i, v in enumerate(self.order))

    def nexts(self, s: int, w: int) -> Iterator[tuple[int, int]]:
        """(successor, its ``S``) after ``w`` runs with ``s`` unavailable."""
        if self.order is None:
            s2 = s | 1 << w
            yield from ((x, s2) for x in range(self.k) if not s2 >> x & 1)
        else:
            i = self.pos[w]
            for j in range(i + 1, min(len(self.order), i + 1 + ORDER_WINDOW)):
                yield self.order[j], self.before[j]

    def preds(self, s: int, w: int) -> list[int]:
        """The nodes that may have run just before ``w`` in a state whose ``S`` is ``s``."""
        if self.order is None:
            return [u for u in range(self.k) if s >> u & 1]
        i = self.pos[w]
        return list(self.order[max(0, i - ORDER_WINDOW):i])

    def prev(self, s: int, u: int) -> int:
        """The ``S`` of ``u``'s state when ``u`` ran just before a state whose ``S`` is ``s``."""
        return s & ~(1 << u) if self.order is None else self.before[self.pos[u]]


class _OutOfTime(Exception):
    pass


def _check(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise _OutOfTime


def _feasible(lc: LinkCosts, t: float, space: _Space, deadline: float | None = None) -> Plan | None:
    """A plan with every stage at most ``t``, or None when ``space`` holds none. Raises _OutOfTime past
    ``deadline``."""
    n, k = lc.m.n, lc.k
    levels: list[dict[tuple[int, int, int], int]] = [{} for _ in range(k + 1)]
    ext_memo: dict[tuple[int, int, int, int], int] = {}
    bad_memo: dict[tuple[int, int, int], int] = {}
    first_finish: dict[tuple[int, int], int] = {}
    pair = lc.pair

    # Memo keys name the successor by its class too (itself when its pair with w is listed, else OWN): with a
    # sparse table most successors share w's own-link send time, and so every figure below.
    def ext(w: int, p: int, cls: int, x: int) -> int:
        key = (w, p, cls, lc.in_class(x, w))
        e = ext_memo.get(key)
        if e is None:
            e = ext_memo[key] = lc.ext(w, p, lc.tin(cls, w), lc.tout(w, x), t)
        return e

    def bad(w: int, cls: int, x: int) -> int:
        """Bits ``s`` where ``w`` cannot hold the block ``s`` alone as a non-final stage."""
        key = (w, cls, lc.in_class(x, w))
        mask = bad_memo.get(key)
        if mask is None:
            mask = bad_memo[key] = lc.bad_mask(w, lc.tin(cls, w), lc.tout(w, x), t)
        return mask

    def finish_from(w: int, cls: int) -> int:
        """The first start ``p >= 1`` from which ``w`` can hold ``[p, n)`` and the last group (``n`` if none)."""
        key = (w, cls)
        p = first_finish.get(key)
        if p is None:
            tin, tout = lc.tin(cls, w), lc.last_out[w]
            lo, hi = 1, n
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if lc.fits(w, mid, n, True, tin, tout, t) else (mid + 1, hi)
            p = first_finish[key] = lo
        return p

    def step(w: int, cls: int, x: int, starts: int, tin: float, tout: float) -> int:
        ends = 0
        while starts:
            low = starts & -starts
            run = starts & ~(starts + low)  # the lowest run of consecutive starts [a, b]
            starts ^= run
            a, b = low.bit_length() - 1, run.bit_length() - 1
            key = (w, b, cls, x if (w, x) in pair else OWN)
            top = ext_memo.get(key)
            if top is None:
                top = ext_memo[key] = lc.ext(w, b, tin, tout, t)
            if top > a:
                span = (1 << (top + 1)) - (1 << (a + 1))
                ends |= span & ~((bad(w, cls, x) & run) << 1) if b > a else span
        return ends

    for s0, v in space.starts():
        levels[s0.bit_count()][s0, CLIENT, v] = 1
    for level in levels:
        for (s, cls, w), starts in level.items():
            _check(deadline)
            if cls == CLIENT:
                if lc.fits(w, 0, n, True, lc.first_in[w], lc.last_out[w], t):
                    return (Stage(w, 0, n),)
            else:
                p = finish_from(w, cls)
                if starts >> p:
                    e = ((starts >> p) & -(starts >> p)).bit_length() - 1 + p
                    return _trace(lc, space, levels, ext, (s, cls, w), e)
            tin = lc.tin(cls, w)
            for x, s2 in space.nexts(s, w):
                ends = step(w, cls, x, starts, tin, lc.send(w, x))
                if ends:
                    key = (s2, lc.in_class(w, x), x)
                    target = levels[s2.bit_count()]
                    target[key] = target.get(key, 0) | ends
    return None


def _trace(lc: LinkCosts, space: _Space, levels: list[dict[tuple[int, int, int], int]], ext,
           state: tuple[int, int, int], e: int) -> Plan:
    """The stages behind ``state`` finishing from ``e``: each predecessor is a stored state with a start ``e'``
    whose run reaches ``e`` (``e' < e <= ext(e')``; the union in `_feasible`'s step guarantees one)."""
    n = lc.m.n
    s, cls, w = state
    stages = [Stage(w, e, n)]
    while cls != CLIENT:
        found = None
        for u in ([cls] if cls >= 0 else [u for u in space.preds(s, w) if not lc.linked(u, w)]):
            su = space.prev(s, u)
            for cu in (CLIENT, OWN, *lc.neighbours[u]):
                # The latest start before e reaches farthest (ext is non-decreasing): it reaches e if any does.
                starts = levels[su.bit_count()].get((su, cu, u), 0) & ((1 << e) - 1)
                p = starts.bit_length() - 1
                if starts and ext(u, p, cu, w) >= e:
                    found = (su, cu, u, p)
                    break
            if found:
                break
        assert found is not None, "a reachable cut has a predecessor"  # the union in `step` is exact
        s, cls, w, p = found
        stages.append(Stage(w, p, e))
        e = p
    return tuple(reversed(stages))


def _latency(lc: LinkCosts, space: _Space, deadline: float | None = None) -> tuple[float, Plan] | None:
    """The plan in ``space`` with the least sum of stage costs. Raises _OutOfTime past ``deadline``."""
    n, k, c = lc.m.n, lc.k, lc.c
    ready: list[dict[tuple[int, int, int], tuple[float, tuple[int, int, int] | None]]] = [{} for _ in range(k + 1)]
    ran: list[dict[tuple[int, int, int], tuple[float, tuple[int, int, int]]]] = [{} for _ in range(k + 1)]
    best: tuple[float, tuple[int, int, int] | None] = (INF, None)
    for s0, v in space.starts():
        ready[s0.bit_count()][s0, v, 0] = (lc.first_in[v], None)
    for level in range(k + 1):
        for key, (d, _) in ready[level].items():
            _check(deadline)
            s, x, f = key
            if d >= best[0]:
                continue
            rate = c.rate[x]
            if c.nbytes(f, n, True, x) <= c.mem[x]:
                total = d + c.amount(f, n, True, x) / rate + lc.last_out[x]
                if total < best[0]:
                    best = (total, key)
            for g in range(f + 1, c.ext(x, f, INF) + 1):
                r = d + c.amount(f, g, False, x) / rate
                old = ran[level].get((s, x, g))
                if r < best[0] and (old is None or r < old[0]):
                    ran[level][s, x, g] = (r, key)
        for key, (r, _) in ran[level].items():
            _check(deadline)
            s, x, g = key
            if r >= best[0]:
                continue
            for y, s2 in space.nexts(s, x):
                d = r + lc.send(x, y) + lc.recv(x, y)
                target = ready[s2.bit_count()]
                old = target.get((s2, y, g))
                if d < best[0] and (old is None or d < old[0]):
                    target[s2, y, g] = (d, key)
    if best[1] is None:
        return None
    s, x, f = best[1]
    stages = [Stage(x, f, n)]
    back = ready[s.bit_count()][s, x, f][1]
    while back is not None:
        s, x, g = back
        _, prev = ran[s.bit_count()][back]
        stages.append(Stage(x, prev[2], g))
        back = ready[prev[0].bit_count()][prev][1]
    plan = tuple(reversed(stages))
    return sum(lc.stage_costs(plan)), plan


def exact_limit(objective: str) -> int:
    """The most candidates `search_links` searches exactly for ``objective``."""
    return LATENCY_EXACT_MAX_NODES if objective == "latency" else EXACT_MAX_NODES


def search_links(model: PipelineModel, nodes: Sequence[Node], objective: str, table: dict[tuple[str, str], Link],
                 seed: Sequence[Stage] | None = None, deadline: float | None = None) -> SearchResult | None:
    """The best pipeline over ``nodes`` with hops priced by ``table`` (`williw.fleet.link_table`).

    Exact (every subset, order and cut) up to `exact_limit` candidates; beyond, the best over fixed node orders
    (``exact`` False): ``seed``'s nodes in its order (default: the link-free search's plan) followed by the others
    fastest first, and fastest first. The seed plan is one of the first order's plans, so the result is never
    worse than the seed priced with the links. Past ``deadline`` (``time.monotonic()``) the fixed-order search
    stops with the best plan found so far, or the seed.

    Returns:
        The stages in pipeline order, or None when no split fits the nodes' memory.
    """
    lc = LinkCosts(model, nodes, objective, table)
    k = len(nodes)
    fastest = sorted(range(k), key=lambda i: (-lc.c.rate[i], -lc.c.mem[i], i))
    if objective == "latency":
        if k <= LATENCY_EXACT_MAX_NODES:
            found = _latency(lc, _Space(k))
            return SearchResult(found[1], True) if found else None
        free = seed if seed is not None else _stages(search_latency(model, nodes, deadline))
        plans: list[tuple[float, Plan]] = []
        try:
            for order in _orders(free, fastest):
                found = _latency(lc, _Space(k, order), deadline)
                plans += [found] if found is not None else []
        except _OutOfTime:
            pass
        best = min(plans, key=lambda p: p[0], default=None)
        return SearchResult(best[1], False) if best else _seed(free)
    lower = lower_bound(model, nodes, objective)
    if k <= EXACT_MAX_NODES:
        start = minimise(lc, lambda t: _feasible(lc, t, _Space(k, fastest)), lower, 1e-3)
        plan = minimise(lc, lambda t: _feasible(lc, t, _Space(k)), lower, start=start)
        return SearchResult(plan, True) if plan is not None else None
    best_plan: Plan | None = None
    free = seed if seed is not None else _stages(search(model, nodes, objective))
    try:
        for order in _orders(free, fastest):
            plan = minimise(lc, lambda t, o=order: _feasible(lc, t, _Space(k, o), deadline), lower,
                            HEURISTIC_REL_TOL)
            if plan is not None and (best_plan is None or lc.bottleneck(plan) < lc.bottleneck(best_plan)):
                best_plan = plan
    except _OutOfTime:
        if free is not None and (best_plan is None or lc.bottleneck(tuple(free)) < lc.bottleneck(best_plan)):
            best_plan = tuple(free)
    return SearchResult(best_plan, False) if best_plan is not None else None


def _seed(free: Sequence[Stage] | None) -> SearchResult | None:
    return SearchResult(tuple(free), False) if free is not None else None


def _stages(found: SearchResult | None) -> Sequence[Stage] | None:
    return found.stages if found is not None else None


def _orders(free: Sequence[Stage] | None, fastest: list[int]) -> list[list[int]]:
    """The link-free plan's nodes in its order, then the others fastest first; and fastest first."""
    if free is None:
        return [fastest]
    used = [s.node for s in free]
    taken = set(used)
    return [used + [v for v in fastest if v not in taken], fastest]
