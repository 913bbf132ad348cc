"""Exact search beyond the subset DP: branch and bound on a threshold, with a certified gap when time runs out.

For a threshold ``T`` the question "can some nodes, in some order, cover the blocks with every stage at most ``T``
and within memory?" is answered by a depth-first search that builds the pipeline from block 0, one node per step,
each taking its longest run (``ext``; runs nest, so longer is never worse), the nodes that waste least of their
threshold first (as best-fit packing chooses). It is exact, and kept small by:

* **bounds:** at block ``p`` with the nodes ``R`` still free, the conditions of `bound` on the blocks ``[p, n)``
  must hold (count, amount and bytes of what ``R`` can still hold), else the branch is cut;
* **dominance between nodes:** among free nodes whose runs from ``p`` end at the same block, only those that no
  other such node is weaker than (no slower and no smaller) are tried: using the weaker one now leaves the stronger
  one for later, which is never worse;
* **dominance between states:** a failed state (``p``, used set ``U``) fails for every ``p' <= p`` with the same
  ``U`` (``ext`` is non-decreasing in ``p``), so each used set keeps the largest failed ``p``.

The outer loop bisects ``T`` between a certified lower bound (`bound.certified_lower_bound`, then the LP
relaxation's `relaxation.lp_bracket` when highspy is installed, raised by every threshold the search proves
infeasible) and the best plan found (at first the heuristic's), and ends, as the
subset DP does, on the stage costs left in the interval: the plan is then the exact optimum. When the time limit
runs out the best plan is returned with the certified bound, so the gap ``bottleneck / bound - 1`` is a proof.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

from williw.planner.bound import NONE, SLACK, SUM_TOL, Caps, Windows, certified_lower_bound
from williw.planner.counting import CountingClose, first_finish
from williw.planner.lagrange import prices
from williw.planner.packing import best_fit, least_waste_per_node, repack
from williw.planner.pipeline import Stage, _candidates, _Costs
from williw.planner.relaxation import lp_bracket, refutes_at
from williw.planner.rounding import improve

CHECK_EVERY = 256  # search steps between looks at the clock
PRICE_ROUNDS = 40  # subgradient steps for the node prices of each threshold (`lagrange.prices`)
BISECT_REL_TOL = 1e-6  # bisect to here, then over the stage costs left (as `pipeline._minimise`)
BOUND_SHARE = 0.3  # of the time limit: the window bound's bisection (it stops early with a weaker, valid bound)
# Of the time limit: the LP bound (`relaxation.lp_bracket`) after the window bound; 1,000 blocks over 1,000 nodes
# take 2-2.5 s to reach it within `relaxation.REL_TOL` (0.27-0.38% above the window bound), most instances far less.
LP_SHARE = 0.3
PACK_SHARE = 0.3  # of the time left after it: best-fit packing (`packing.best_fit`), before the exact probes
# A probe first tabulates every node's run from every block (k·n runs, ~3 µs each in CPython): beyond this many it
# cannot finish in any sensible limit (1,000 x 1,000: 3 s for each probe's table), so packing gets all the time.
PROBE_MAX_RUNS = 250_000
# Of the time limit: randomised re-packing (`packing.repack`) once the probes have not proven the plan optimal. Kept
# for the end so it never delays a proof (24 nodes x 1,000 blocks: proven in 4.4 s, 7.2 s with re-packing before
# the probes); on 48 and 96 nodes it lowers the gap from 0.92% and 0.51% to about 0.83% and 0.40%.
REPACK_SHARE = 0.15
# Of the time left after packing, before the probes: plans rounded from the LP (`rounding.improve`, with highspy,
# where nodes hold a few blocks each). The probes start from its plan; where they cannot run (1,000 x 1,000) it has
# all the time until re-packing, before packing: one threshold there takes 3-4 s and brings the plan from 1.6-1.9%
# to 0.8% above the bound.
ROUND_SHARE = 0.5
# Where the probes look while none has found a plan below the best one: this share of the interval below its top,
# not its middle. Plans are likelier there and each lowers the top; a probe that runs out of time moves the top
# down as before. 48 nodes x 1,000 blocks, 10 s: certified gap 0.30% (0.45% at 0.1, 0.78% at the middle).
PROBE_UP = 0.25
TWIN_PROBE_S = 0.2  # seconds for the stage costs within `SLACK` below the plan (`certify`)


class _OutOfTime(Exception):
    pass


@dataclass(frozen=True)
class Certified:
    stages: tuple[Stage, ...]
    exact: bool
    lower_s: float  # every plan's bottleneck is above this (proven); the bottleneck itself when exact


def _dfs(c: _Costs, w: Windows, t: float, deadline: float) -> tuple[Stage, ...] | None:
    """A plan with bottleneck <= ``t``, or None when there is none. Raises _OutOfTime past ``deadline``."""
    n = c.m.n
    k = len(c.nodes)
    caps: Caps = w.caps(t)
    ext_memo: dict[int, int] = {}
    fail: dict[int, int] = {}  # used-set bitmask -> largest block index known to fail from

    def ext(v: int, p: int) -> int:
        key = v * (n + 1) + p
        e = ext_memo.get(key)
        if e is None:
            e = ext_memo[key] = c.ext(v, p, t)
        return e

    def finisher(p: int, used: int) -> int:
        for v in range(k):
            if not used >> v & 1 and c.finish(v, p, t):
                return v
        return -1

    cap = [max(0.0, (t - c.hop(v, 1, False)) * c.rate[v]) if t < math.inf else 0.0 for v in range(k)]
    least_waste = least_waste_per_node(c, cap, sorted((cap[v], v) for v in range(k)))
    by_last = [sorted(range(k), key=lambda v, i=i: -caps.last[i][v]) for i in range(3)]
    by_first = [sorted(range(k), key=lambda v, i=i: -caps.first[i][v]) for i in range(3)]
    whole = [sum(col) for col in caps.mid]

    def best(role: tuple[tuple[float, ...], ...], order: list[list[int]], i: int, used: int) -> float:
        return next((role[i][v] for v in order[i] if not used >> v & 1), NONE)

    # Runs of identical blocks (`Windows.region_counts`): their own count condition, with the free nodes' counts
    # summed in ``sums[3:3 + R]``; the end stage's node is the free one that loses least there.
    regions = w.region_counts(t)
    gains = [None if end is None else sorted(((x - y, v) for v, (x, y) in enumerate(zip(end, other, strict=True))),
                                              reverse=True) for _, _, other, end in regions]
    r_count = len(regions)

    def hopeful(p: int, used: int, sums: list[float]) -> bool:
        """The count, amount and bytes conditions on [p, n) with the free nodes (a last stage included), and the
        count condition on what is left of each run of identical blocks."""
        head = p == 0
        need = (n - p, w.pa[n] - w.pa[p] + w.last_a + (w.first_a if head else 0),
                w.pb[n] - w.pb[p] + w.last_b + (w.first_b if head else 0))
        for i in range(3):
            have = best(caps.last, by_last, i, used) + (best(caps.first, by_first, i, used) if head else 0)
            if have <= NONE // 2 or sums[i] + have < need[i] * (1 - SUM_TOL):
                return False
        for r, (s, e, _, end) in enumerate(regions):
            if e <= p:
                continue
            gain = 0
            if end is not None and (e == n or head):  # its end stage is still to come
                gain = next((g for g, v in gains[r] if not used >> v & 1), s - e)
            if sums[3 + r] + gain < e - max(p, s):
                return False
        return True

    def weaker(u: int, v: int) -> bool:  # u no faster, no smaller, no quicker link than v, same precision; by index
        a = (c.rate[u], c.mem[u], -c.t_in[u][1], -c.t_out[u][0], -c.t_out[u][1])
        b = (c.rate[v], c.mem[v], -c.t_in[v][1], -c.t_out[v][0], -c.t_out[v][1])
        return c.same_bytes(u, v) and all(x <= y for x, y in zip(a, b, strict=True)) and (a != b or u < v)

    def children(p: int, used: int) -> list[tuple[int, int]]:
        groups: dict[int, list[int]] = {}
        for v in range(k):
            if not used >> v & 1:
                e = ext(v, p)
                if e > p:
                    groups.setdefault(e, []).append(v)
        out = []
        for e in sorted(groups, reverse=True):
            g = groups[e]
            out += [(v, e) for v in g if not any(u != v and weaker(u, v) for u in g)]
        # Least excess waste first (packing's choice): the first dive is a best-fit pack, and backtracking then
        # revisits the last stages first, where best fit fails (48 nodes x 1,000 blocks: a plan at 1.005 times the
        # window bound in 5 s, none in 10 s with the longest run first). Ties keep the longest run first.
        out.sort(key=lambda ve: (t - c.cost(ve[0], p, ve[1], False)) * c.rate[ve[0]] - least_waste[ve[0]])
        return out

    v = finisher(0, 0)
    if v >= 0:
        return (Stage(v, 0, n),)
    sums0 = [float(x) for x in whole] + [float(sum(other)) for _, _, other, _ in regions]
    if not hopeful(0, 0, sums0) or n < 2:
        return None
    ext_all = []
    for v in range(k):  # k·n runs: the slow part on large fleets, so it watches the clock too
        if time.monotonic() > deadline:
            raise _OutOfTime
        ext_all.append([ext(v, p) for p in range(n)])
    fin = [first_finish(c, v, t) for v in range(k)]
    closing = CountingClose(c, t, ext, fin)
    vectors = prices(ext_all, fin, n, PRICE_ROUNDS, lambda: time.monotonic() > deadline)
    mus = [mu for mu, _ in vectors]
    fs = [f for _, f in vectors]
    # Sums below are updated by subtraction: allow their rounding (1e-9 of the whole price) before cutting.
    tol = [sum(mu) * 1e-9 for mu in mus]
    if any(f[0] > sum(mu) + eps for mu, f, eps in zip(mus, fs, tol, strict=True)):
        return None
    sums0 += [sum(mu) for mu in mus]
    # Each frame: (p, used, sums, children, next child index); the path is the chosen (node, p, e).
    stack = [(0, 0, sums0, children(0, 0), 0)]
    path: list[Stage] = []
    steps = 0
    while stack:
        p, used, sums, kids, i = stack[-1]
        if i == len(kids):
            stack.pop()
            fail[used] = max(fail.get(used, -1), p)
            if path:
                path.pop()
            continue
        stack[-1] = (p, used, sums, kids, i + 1)
        steps += 1
        if steps % CHECK_EVERY == 0 and time.monotonic() > deadline:
            raise _OutOfTime
        v, e = kids[i]
        used2 = used | 1 << v
        if fail.get(used2, -1) >= e:
            continue
        last = finisher(e, used2)
        if last >= 0:
            return (*path, Stage(v, p, e), Stage(last, e, n))
        if e >= w.uniform_from:  # only counts matter from here: decided without branching, mostly
            rest = closing(e, used2)
            if rest is None:
                fail[used2] = max(fail.get(used2, -1), e)
                continue
            if rest is not False:
                return (*path, Stage(v, p, e), *rest)
        sums2 = ([sums[j] - caps.mid[j][v] for j in range(3)]
                 + [sums[3 + r] - regions[r][2][v] for r in range(r_count)]
                 + [x - mu[v] for x, mu in zip(sums[3 + r_count:], mus, strict=True)])
        if not hopeful(e, used2, sums2) or any(
                f[e] > x + eps for f, x, eps in zip(fs, sums2[3 + r_count:], tol, strict=True)):
            fail[used2] = max(fail.get(used2, -1), e)
            continue
        path.append(Stage(v, p, e))
        stack.append((e, used2, sums2, children(e, used2), 0))
    return None


def any_plan(c: _Costs, deadline: float) -> tuple[Stage, ...] | None:
    """A plan that fits memory, found by the search at no threshold; None when there is none (proven) or when
    ``deadline`` (monotonic seconds) passes first."""
    try:
        return _dfs(c, Windows(c), float("inf"), deadline)
    except _OutOfTime:
        return None


def certify(c: _Costs, start: tuple[Stage, ...] | None, lower: float, time_limit_s: float) -> Certified | None:
    """The best plan the time allows, exact when the search closes the interval.

    Args:
        c: the model, candidate nodes and objective.
        start: a plan to improve on (the heuristic's), or None.
        lower: a valid lower bound on every plan's bottleneck (`pipeline.lower_bound`).
        time_limit_s: wall-clock seconds for the whole search: 30% for the window bound's bisection, then up to
            30% for the LP bound (`relaxation`, with highspy; most instances take far less); of the rest but the
            last 15%, 30% for best-fit packing, half of what is then left for plans rounded from the LP
            (`rounding`, with highspy) and the rest for the exact probes; the last 15% for randomised
            re-packing when the probes did not prove the plan optimal (one round of the bound and the start plan
            are always computed); when a probe could not tabulate its runs, all the time after the bounds but the
            last 15% to rounding, then what is left to packing and re-packing when rounding gave no plan. The
            exact phase tries the LP's proof at each stage cost before the search's.

    Returns:
        The plan, whether it is proven optimal, and the certified lower bound; None when no plan fits (proven)
        or none was found in time.
    """
    now = time.monotonic()
    deadline = now + time_limit_s
    # Re-packing's reserve at the end: none without a limit (inf - inf would be nan, and every phase after it lost).
    reserve = time_limit_s * REPACK_SHARE if math.isfinite(time_limit_s) else 0.0
    w = Windows(c)
    plan = start
    if plan is None:
        try:
            plan = _dfs(c, w, float("inf"), deadline)
        except _OutOfTime:
            return None
        if plan is None:
            return None
    hi = c.bottleneck(plan)
    # Proven: every plan's bottleneck is above lo.
    lo = certified_lower_bound(w, lower * (1 - 1e-9), hi, deadline=now + time_limit_s * BOUND_SHARE)
    lo, top = lp_bracket(c, lo, hi, deadline=time.monotonic() + time_limit_s * LP_SHARE)
    base = top if top < hi else lo  # rounding's thresholds are ratios to the LP's value: at most top
    now = time.monotonic()
    if len(c.nodes) * c.m.n > PROBE_MAX_RUNS:  # no probe could tabulate its runs: no proof, the plan matters
        # Rounding first (1,000 x 1,000: 3-4 s a threshold). When it gives nothing, packing (0.5 s) and re-packing
        # take what is left.
        rounded = improve(c, base, hi, deadline - reserve)
        if rounded is not None and c.bottleneck(rounded) < hi:  # packing from scratch does not come near it
            return Certified(rounded, False, lo)
        packed = best_fit(c, lo, hi, deadline)
        if packed is not None and c.bottleneck(packed) < hi:
            plan = packed
        return Certified(repack(c, plan, lo, deadline), False, lo)
    probes_until = max(now, deadline - reserve)
    packed = best_fit(c, lo, hi, now + (probes_until - now) * PACK_SHARE)
    if packed is not None and c.bottleneck(packed) < hi:
        plan, hi = packed, c.bottleneck(packed)
    now = time.monotonic()
    rounded = improve(c, base, hi, now + (probes_until - now) * ROUND_SHARE)
    if rounded is not None and c.bottleneck(rounded) < hi:
        plan, hi = rounded, c.bottleneck(rounded)
    top = hi  # probes stay below this: above it a probe ran out of time (and hi is the best plan)
    try:
        while top > lo * (1 + BISECT_REL_TOL):
            mid = (lo + top) / 2 if lo > 0 else top / 2
            if top >= hi and lo > 0:  # no probe has found a plan yet: look near the best one (`PROBE_UP`)
                mid = top - (top - lo) * PROBE_UP
            if not lo < mid < top:
                break
            found = _probe(c, w, mid, probes_until)
            if found is None:
                lo = mid
            elif found is False:  # undecided: look lower, to raise the certified bound
                top = mid
            else:
                plan, hi = found, min(hi, c.bottleneck(found))
                top = min(top, hi)
        if top >= hi:
            values = [x for x in _candidates(c, lo, hi) if x < hi]
            # Stage costs within `SLACK` below the plan's are mostly its cost summed in another order (identical
            # blocks at other positions: Llama-3-70B's shape over 256 nodes left one 2e-15 below the plan, and the
            # search spent the whole limit on it). They are tried last, for `TWIN_PROBE_S` at most: past that the
            # plan stands as the optimum to the bounds' precision.
            twins = [x for x in values if x >= hi * (1 - SLACK)]
            plan = _lowest(c, w, values[:len(values) - len(twins)], plan, probes_until)
            if c.bottleneck(plan) >= hi and twins:
                with contextlib.suppress(_OutOfTime):
                    plan = _lowest(c, w, twins, plan, min(probes_until, time.monotonic() + TWIN_PROBE_S))
            return Certified(plan, True, c.bottleneck(plan))
    except _OutOfTime:
        pass
    return Certified(repack(c, plan, lo, deadline), False, lo)


def _lowest(c: _Costs, w: Windows, values: list[float], plan: tuple[Stage, ...],
            deadline: float) -> tuple[Stage, ...]:
    """The plan at the least of ``values`` (ascending stage costs below ``plan``'s) that has one, else ``plan``:
    a bisection, each threshold decided by the LP's proof (one solve) or else the search (which may take long where
    the LP is tight, few blocks a node). Raises _OutOfTime past ``deadline``."""
    i, j = 0, len(values)
    while i < j:  # the optimum is one of values[i:j], or plan's
        mid = (i + j) // 2
        found = None if refutes_at(c, values[mid], deadline) else _dfs(c, w, values[mid], deadline)
        if found is None:
            i = mid + 1
        else:
            j, plan = mid, found
    return plan


def _probe(c: _Costs, w: Windows, t: float, deadline: float) -> tuple[Stage, ...] | None | bool:
    """_dfs at ``t`` with a share of the time left: a plan, None (proven infeasible), or False (out of time)."""
    now = time.monotonic()
    if now >= deadline:
        raise _OutOfTime
    try:
        return _dfs(c, w, t, now + max((deadline - now) / 5, 0.01))
    except _OutOfTime:
        return False
