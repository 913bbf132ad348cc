"""Best-fit packing: a start plan for the branch and bound that wastes little of each node's threshold.

Why: on large fleets the bottleneck is decided by packing, not by speed. At a threshold ``T`` a node of rate ``r``
holds a run of blocks worth at most ``T · r``; whatever of that it cannot use (the next block does not fit) is
lost, and every plan must cover the whole model with what is left. The fixed orders of `pipeline.search` (fastest
first) lose up to half a block per stage: on 1,000 uneven blocks over 1,000 nodes their plan is 15% above the
certified bound, while the window bound (`bound.py`) and the LP relaxation of the position formulation (HiGHS,
measured: 0.13% above the window bound at 96 nodes) are close to each other, so the plan was the weak side.

For a threshold, `pack` builds the pipeline from block 0; at each cut ``p`` it finishes if a free node can hold
the rest with the last group, else it takes the free node whose longest run from ``p`` fills its threshold best
(``cost / T``, the largest; ties: the longer run, then the node list order). Candidates come from the free nodes
sorted by their estimated capacity ``(T - transfers) · rate``: for each run length ``L`` the few smallest nodes
whose capacity covers ``[p, p + L)``; `_Costs.ext` and `_Costs.cost` decide, so memory and transfers count exactly.
That is ``O(stages · L · SCAN)`` runs per threshold instead of ``O(k²)``. `best_fit` bisects ``T``.
"""

from __future__ import annotations

import math
import random
import time
from bisect import bisect_left, bisect_right

from williw.planner.pipeline import Stage, _Costs

SCAN = 4  # candidate nodes per run length (and for finishing): the next ones up rarely fill better
FINISH_SCAN = 16  # free nodes tried for the last stage, from the smallest estimated capacity that covers it
REL_TOL = 1e-6  # bisection stops once hi / lo - 1 is below this
# Randomised re-packing, once the deterministic search has settled: each choice's excess waste gets a random
# discount of up to NOISE of the node's capacity, so near-ties go either way. Best-fit wastes almost nothing early
# and most at the end, where only ill-fitting nodes are left (1,000 blocks over 1,000 nodes: 3 GFLOPs over the
# first 30 stages, 800 over the last 30); other early choices leave other ends. 0.002 did best of 0.002-0.03.
NOISE = 0.002
TRIES_PER_LEVEL = 32  # failed randomised packs at one threshold before trying one closer to the best plan


def pack(c: _Costs, t: float, deadline: float = float("inf"),
         rng: random.Random | None = None) -> tuple[Stage, ...] | None:
    """A pipeline with every stage's cost at most ``t`` (> 0), or None if best-fit packing finds none (not a proof)
    or ``deadline`` (monotonic seconds) passes. With ``rng``, each choice's excess waste is discounted by a random
    share of up to `NOISE` of the node's capacity (randomised re-packing)."""
    n = c.m.n
    k = len(c.nodes)
    prefix = c.prefix
    head = c.amount(0, 0, False)  # the first group: on stage 0 only
    # Estimated capacity in amount (GFLOPs or bytes) of a non-final stage after block 0; memory is left to ext.
    cap = [max(0.0, (t - c.hop(v, 1, False)) * c.rate[v]) for v in range(k)]
    least = min(c.amount(q, q + 1, False) for q in range(n)) if n else 0.0
    free = sorted((cap[v], v) for v in range(k) if t * c.rate[v] * (1 + 1e-9) >= least)  # the others hold nothing
    slack = least_waste_per_node(c, cap, free)
    noise = NOISE if rng is not None else 0.0
    p = 0
    stages: list[Stage] = []
    while True:
        if time.monotonic() > deadline:
            return None
        rest = c.amount(p, n, True)
        i = bisect_left(free, (rest * (1 - 1e-9), -1))
        for _, v in free[i:i + FINISH_SCAN]:
            if c.finish(v, p, t):
                return (*stages, Stage(v, p, n))
        for _, v in free[-2:]:  # the largest: memory may bind where the estimate does not
            if c.finish(v, p, t):
                return (*stages, Stage(v, p, n))
        seen: set[int] = set()
        top = free[-1][0] if free else 0.0
        hopeful: list[tuple[float, int]] = []  # (a lower bound on the excess waste, node)
        for e in range(p + 1, n):
            need = prefix[e] - prefix[p] + (head if p == 0 else 0)
            if need > top * (1 + 1e-9):
                break
            i = bisect_left(free, (need * (1 - 1e-9), -1))
            for _, v in free[i:i + SCAN]:
                if v not in seen:
                    seen.add(v)
                    hopeful.append((_waste_at_least(c, v, p, cap[v]) - slack[v], v))
        hopeful.sort()
        best: tuple[float, int, int, int] | None = None  # (-excess waste, end, -index, node)
        for least_excess, v in hopeful:  # exact wastes, until no estimate can beat the best
            if best is not None and least_excess > -best[0] + (1e-9 + noise) * cap[v]:
                break
            end = c.ext(v, p, t)
            if end > p:
                waste = (t - c.cost(v, p, end, False)) * c.rate[v]
                if noise:
                    waste -= rng.random() * noise * cap[v]  # type: ignore[union-attr]
                key = (slack[v] - waste, end, -v, v)
                if best is None or key > best:
                    best = key
        if best is None:
            return None
        _, end, _, v = best
        del free[bisect_left(free, (cap[v], v))]
        stages.append(Stage(v, p, end))
        p = end


def best_fit(c: _Costs, lower: float, upper: float, deadline: float) -> tuple[Stage, ...] | None:
    """The least threshold in ``(lower, upper]`` at which `pack` finds a plan, and that plan; None if none is found
    before ``deadline`` (monotonic seconds).

    Packing near the answer is cheap and far above it slow (long runs to try), so the search gallops up from
    ``lower`` (steps of 1/16, doubling) and then bisects geometrically. Packing is not monotone in ``T``; the
    bisection treats it as if it were, which only costs plan quality, never validity.
    """
    lo, hi = max(lower, 0.0), upper
    if not hi > 0:  # a plan that costs nothing is already the best
        return None
    plan: tuple[Stage, ...] | None = None
    step = 1 / 16
    while plan is None and time.monotonic() < deadline:
        t = min(hi, lo * (1 + step)) if lo > 0 else hi
        plan = pack(c, t, deadline)
        if plan is None:
            if t >= hi:
                return None
            lo, step = t, step * 2
    if plan is None:
        return None
    hi = c.bottleneck(plan)
    while hi > lo * (1 + REL_TOL) and time.monotonic() < deadline:
        mid = math.sqrt(lo) * math.sqrt(hi) if lo > 0 else hi / 2
        if not lo < mid < hi:
            break
        found = pack(c, mid, deadline)
        if found is None:
            lo = mid
        else:
            plan, hi = found, min(mid, c.bottleneck(found))
    # Packing is not monotone: a little below the answer it may succeed again. Polish while the time lasts.
    # Each success lowers hi by a factor (1 - shrink), and nothing goes below the bound passed in or 0.
    shrink = 1 / 128
    while shrink > REL_TOL and hi * (1 - shrink) > lower and time.monotonic() < deadline:
        found = pack(c, hi * (1 - shrink), deadline)
        if found is None:
            shrink /= 2
        else:
            plan, hi = found, min(hi * (1 - shrink), c.bottleneck(found))
    return plan


def repack(c: _Costs, plan: tuple[Stage, ...], lower: float, deadline: float,
           tries: int | None = None) -> tuple[Stage, ...]:
    """Randomised re-packing until ``deadline`` (monotonic seconds) or after ``tries`` packs: `pack` with a seeded
    ``rng`` at thresholds below ``plan``'s bottleneck (1/256 below it, halving the step after `TRIES_PER_LEVEL`
    failures, and from 1/256 again once the step is below `REL_TOL`), never below ``lower`` (a step that would go
    below it is halved; the search ends when it is below `REL_TOL`). Returns the best plan
    found, ``plan`` if none is better. Seeded: the same number of tries gives the same plan.
    """
    hi = c.bottleneck(plan)
    rng = random.Random(0)
    shrink, failed = 1 / 256, 0
    left = math.inf if tries is None else tries
    while left > 0 and time.monotonic() < deadline:
        if hi * (1 - shrink) <= lower:  # a step that would go below the bound: a smaller one (48 x 1,000 blocks
            shrink /= 2  # end 0.3% above it, under the first step: re-packing did nothing there)
            if shrink <= REL_TOL:
                break
            continue
        left -= 1
        found = pack(c, hi * (1 - shrink), deadline, rng)
        if found is not None and c.bottleneck(found) < hi:
            plan, hi, failed = found, c.bottleneck(found), 0
            continue
        failed += 1
        if failed >= TRIES_PER_LEVEL:
            shrink, failed = shrink / 2, 0
            if shrink <= REL_TOL:  # every step down failed: start again from the largest (new random draws)
                if math.isinf(left) and math.isinf(deadline):  # unbounded: stop here instead
                    break
                shrink = 1 / 256
    return plan


def _waste_at_least(c: _Costs, v: int, p: int, cap: float) -> float:
    """A lower bound on the capacity ``v``'s longest non-final run from ``p > 0`` leaves unused (memory left out: it
    only shortens the run); ``-inf`` for ``p = 0``, where the first group's transfers differ (always evaluated)."""
    if p == 0:
        return float("-inf")
    e = min(c.m.n - 1, bisect_right(c.prefix, c.prefix[p] + cap * (1 + 1e-9)) - 1)
    return cap - (c.prefix[e] - c.prefix[p])


def least_waste_per_node(c: _Costs, cap: list[float],
                         free: list[tuple[float, int]]) -> dict[int, float]:
    """Per node, the least capacity any run of up to three blocks leaves unused (0 for larger nodes: many runs)."""
    n = c.m.n
    prefix = c.prefix
    sums = sorted(prefix[e] - prefix[p] for p in range(n) for e in range(p + 1, min(n, p + 3) + 1))
    top = sums[-1] if sums else 0.0
    out = {}
    for a, v in free:
        i = bisect_right(sums, a) - 1
        out[v] = 0.0 if a > top or i < 0 else a - sums[i]
    return out
