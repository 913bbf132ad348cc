"""The single-request objective: minimise the sum of the stages' decode costs, transfers included.

One request's next token passes every stage in turn, so its time per token is the sum of the stages' times and
of the hops between them (the cost model of exo#957), not the slowest stage. Same stages, memory and cost
functions as the bottleneck search (`pipeline._Costs` with the ``latency`` objective prices as ``decode``).

Exact up to `EXACT_MAX_NODES` candidates: a dynamic program over (used nodes ``S``, next block ``p``) holding the
cheapest way to cover ``[0, p)`` with the nodes of ``S`` (any order); every stage is a contiguous run that fits
its node's memory, the last one finishing with the last group. ``2^k · n`` states, each extended by every free
node and every end that fits (the runs nest, so the ends from ``p`` are ``(p, ext(v, p)]``). Beyond the limit the
same program runs over the nodes in a fixed order (fastest first), which is exact for that order only.

Both programs grow with ``n^2`` (every end of every run): on a 1,000-block model they take minutes. With a
deadline (`williw plan --time-limit`) each stops when it passes, and the plan is the last fallback's: the nodes
fastest first, each filled to its memory (``ext`` at no threshold), never proven optimal.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from williw.fleet import Node
from williw.planner.costs import PipelineModel
from williw.planner.pipeline import SearchResult, Stage, _Costs

EXACT_MAX_NODES = 8  # 2^8 · n states · 8 nodes · n ends: ~0.5 s for n = 80 in CPython
INF = float("inf")
CHECK_EVERY = 1024  # inner steps between looks at the clock


class _OutOfTime(Exception):
    pass


def _clock(deadline: float | None):
    """A function to call in inner loops: raises _OutOfTime once ``deadline`` (time.monotonic) has passed."""
    steps = 0

    def tick() -> None:
        nonlocal steps
        steps += 1
        if deadline is not None and steps % CHECK_EVERY == 0 and time.monotonic() > deadline:
            raise _OutOfTime

    return tick


def search_latency(model: PipelineModel, nodes: Sequence[Node], deadline: float | None = None) -> SearchResult | None:
    """The pipeline with the least summed decode cost over ``nodes`` (every node has a memory bandwidth).

    Args:
        deadline: a ``time.monotonic()`` value; past it the searches give way to filling the nodes fastest first.

    Returns:
        The stages in pipeline order, or None when no split fits the nodes' memory (None is only proven when the
        search finished: the fill's None may miss a split the searches would have found).
    """
    c = _Costs(model, nodes, "latency")
    k = len(nodes)
    order = sorted(range(k), key=lambda i: (-c.rate[i], -c.mem[i], i))
    try:
        if k <= EXACT_MAX_NODES:
            return _subsets(c, _clock(deadline))
        plan = _ordered(c, order, _clock(deadline))
    except _OutOfTime:
        plan = _fill(c, order)
    return SearchResult(plan, False) if plan is not None else None


def _fill(c: _Costs, order: list[int]) -> tuple[Stage, ...] | None:
    """Each node in ``order`` takes the longest run its memory holds; the first that can finish does."""
    n, p, stages = c.m.n, 0, []
    for v in order:
        if c.finish(v, p, INF):
            return (*stages, Stage(v, p, n))
        e = c.ext(v, p, INF)
        if e > p:
            stages.append(Stage(v, p, e))
            p = e
    return None


def total(c: _Costs, stages: Sequence[Stage]) -> float:
    """Seconds per token of one request: the sum of the stages' costs."""
    n = c.m.n
    return sum(c.cost(s.node, s.start, s.end, s.end == n) for s in stages)


def _subsets(c: _Costs, tick) -> SearchResult | None:
    n, k = c.m.n, len(c.nodes)
    inf = float("inf")
    # best[S][p]: (cost, previous state) of covering [0, p) with exactly the nodes of S, p < n.
    best: list[dict[int, tuple[float, int, int, int]]] = [{} for _ in range(1 << k)]
    best[0][0] = (0.0, -1, -1, -1)
    done: tuple[float, int, int, int] = (inf, -1, -1, -1)  # (cost, S, p, v) of the best finished plan
    for s in sorted(range(1 << k), key=lambda x: (x.bit_count(), x)):
        for p, (cost, *_rest) in best[s].items():
            if cost >= done[0]:
                continue
            for v in range(k):
                if s >> v & 1:
                    continue
                if c.finish(v, p, inf):
                    t = cost + c.cost(v, p, n, True)
                    if t < done[0]:
                        done = (t, s, p, v)
                top = c.ext(v, p, inf)
                s2 = s | 1 << v
                for e in range(p + 1, top + 1):
                    tick()
                    t = cost + c.cost(v, p, e, False)
                    old = best[s2].get(e)
                    if t < done[0] and (old is None or t < old[0]):
                        best[s2][e] = (t, s, p, v)
    if done[1] < 0:
        return None
    _, s, p, v = done
    stages = [Stage(v, p, n)]
    while p > 0:
        _, s_prev, p_prev, u = best[s][p]
        stages.append(Stage(u, p_prev, p))
        s, p = s_prev, p_prev
    return SearchResult(tuple(reversed(stages)), True)


def _ordered(c: _Costs, order: list[int], tick) -> tuple[Stage, ...] | None:
    """The cheapest plan using the nodes in ``order`` (each at most once, skipping allowed): a DP over cuts."""
    n = c.m.n
    # f[p]: (cost, stages) of covering [0, p) with the nodes processed so far.
    f: dict[int, tuple[float, tuple[Stage, ...]]] = {0: (0.0, ())}
    finished: tuple[float, tuple[Stage, ...]] | None = None
    for v in order:
        nxt = dict(f)
        for p, (cost, stages) in f.items():
            if c.finish(v, p, INF):
                t = cost + c.cost(v, p, n, True)
                if finished is None or t < finished[0]:
                    finished = (t, (*stages, Stage(v, p, n)))
            for e in range(p + 1, c.ext(v, p, INF) + 1):
                tick()
                t = cost + c.cost(v, p, e, False)
                if e not in nxt or t < nxt[e][0]:
                    nxt[e] = (t, (*stages, Stage(v, p, e)))
        f = nxt
    return finished[1] if finished else None
