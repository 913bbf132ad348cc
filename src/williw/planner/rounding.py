"""Plans from the LP relaxation, where packing is the weak side: nodes that hold a few blocks each.

Why: there the LP of `relaxation` is within 0.01% of the proven optimum (40 blocks over 40 nodes) and an integer
plan within 0.05% of it exists (200 x 200, found by HiGHS's branch and cut), while best-fit packing and its
randomised re-packing end 1.5-2% above it (1,000 x 1,000): they fill the first stages well and are left with
ill-fitting nodes for the last ones. The LP plans all the stages at once.

At a threshold ``T`` (`at`):

1. the LP of `relaxation` with the flow fixed to 1 and each run priced by the capacity it leaves unused on a node
   of its reach (its waste), solved by the dual simplex method: the price keeps the vertex close to an integer plan
   and the simplex method out of the degenerate pivots a zero objective gets (no answer in 120 s against 0.4-0.6 s
   on 1,000 x 1,000);
2. the integer program over the runs between two of the vertex's cuts (1,600-1,900 of 7,600 on 1,000 x 1,000 at
   0.8% above the bound), solved by HiGHS's branch and cut up to its first solution: a path whose runs meet every
   rank count;
3. nodes for its runs: the first and last runs first (their transfers differ by node), then the others by amount,
   largest first, each on the smallest free node that holds it (`_Costs.fits`: memory and transfers count). With
   the rank counts met and memory not binding, the nodes able to hold a middle run nest, and this finds one for
   every run; otherwise the threshold yields no plan (not a proof of anything).

`improve` tries thresholds from 1.008 times the LP's value down (`STEPS`) while they give a plan, and keeps the
lowest.
"""

from __future__ import annotations

import time
from bisect import bisect_left

from williw.planner.pipeline import Stage, _Costs
from williw.planner.relaxation import Runs, _solver, available, model

# Thresholds tried, as ratios to the LP's value: on 1,000 x 1,000 rounding gives a plan at 1.008 (3-4 s) and
# mostly not at 1.005; on 200 x 200 down to 1.001 (under 1 s each). A step that fails ends the search (the next
# lower one would fail too, mostly); one that succeeds is followed by the next.
STEPS = (1.008, 1.005, 1.0025, 1.001, 1.0005)
# Seconds a threshold takes per run of the relaxation (LP and integer program; 1,000 x 1,000: 2.6-3.9 s for 7,600
# runs on a 2-core machine): a threshold that cannot end before the deadline is not started, its time is packing's.
SECONDS_PER_RUN = 5e-4


def improve(c: _Costs, base: float, hi: float, deadline: float) -> tuple[Stage, ...] | None:
    """The best plan `at` finds at the thresholds ``base · STEPS`` below ``hi`` (from the largest), or None.

    Args:
        c: the model, candidate nodes and objective.
        base: the LP's value, or a threshold at or above it (`relaxation.lp_bracket`'s top), seconds.
        hi: the bottleneck of the best plan known (seconds).
        deadline: monotonic seconds; a solve running past it is stopped.
    """
    if not available() or not 0 < base < hi:
        return None
    best = None
    steps = [x for x in STEPS if base * x < hi] or [(hi / base) ** 0.5]
    for x in steps:
        if time.monotonic() >= deadline:
            break
        found = at(c, base * x, deadline)
        if found is None:
            break
        best = found
    return best


def at(c: _Costs, t: float, deadline: float) -> tuple[Stage, ...] | None:
    """A plan with every stage at most ``t`` (seconds) rounded from the LP, or None (not a proof): also beyond
    `relaxation.MAX_RUNS` runs, when the threshold's estimated time (`SECONDS_PER_RUN`) runs past ``deadline``, or
    when highspy fails."""
    r = Runs(c, t)
    if r.count is None or r.single or not r.runs or time.monotonic() + r.count * SECONDS_PER_RUN > deadline:
        return None
    try:
        path = _path(r, c, deadline)
    except Exception:  # noqa: BLE001 (an old or broken highspy: no plan from it, the planner goes on)
        return None
    return _assign(c, path, t) if path is not None else None


def _path(r: Runs, c: _Costs, deadline: float) -> list[tuple[int, int]] | None:
    """Steps 1 and 2: the runs ``[p, e)`` of an integer path that meets the rank counts, or None."""
    highspy = _solver()
    import numpy as np

    nx, m = len(r.runs), r.m
    lp = model(r)
    top = r.capacity[0]
    waste = [max(0.0, r.capacity[reach - 1] - c.relaxed.amount(p, e, e == r.n)) / top for p, e, reach in r.runs]
    lp.col_cost_ = np.concatenate([np.array(waste), np.zeros(m + 1)])
    lower = np.asarray(lp.col_lower_)  # highspy's arrays are copies: set them whole
    lower[nx + m] = 1.0  # the whole flow: one path, fractionally
    lp.col_lower_ = lower
    h = _highs(highspy, deadline)
    h.setOptionValue("solver", "simplex")
    # Dantzig's pricing: 3,800 iterations and 0.4 s where the default's dual steepest edge took 19,700 and 2.9 s
    # (1,000 x 1,000, HiGHS 1.16).
    h.setOptionValue("simplex_dual_edge_weight_strategy", 0)
    h.passModel(lp)
    if h.run() != highspy.HighsStatus.kOk or h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    x = np.asarray(h.getSolution().col_value[:nx])
    upper = np.asarray(lp.col_upper_)  # a copy, as above
    # The integer program's runs: those between two of the vertex's cuts. Its own runs alone are too few (on
    # 1,000 x 1,000 they hold a plan at 1.01 times the bound, not at 1.009); every run between the blocks of its
    # regions is too many (4,300 runs: 8.9 s to a plan at 1.008).
    cuts = np.zeros(r.n + 1, dtype=bool)
    for i in np.nonzero(x > 1e-9)[0]:
        p, e, _ = r.runs[i]
        cuts[p] = cuts[e] = True
    upper[:nx] = [1.0 if cuts[p] and cuts[e] else 0.0 for p, e, _ in r.runs]
    lp.col_upper_ = upper
    lp.integrality_ = [highspy.HighsVarType.kInteger] * nx + [highspy.HighsVarType.kContinuous] * (m + 1)
    # Any integer path will do: no objective, so the first one found is optimal (2.1-3.4 s on 1,000 x 1,000
    # where the waste prices took 3.1-4.6 s).
    lp.col_cost_ = np.zeros(nx + m + 1)
    h = _highs(highspy, deadline)
    h.passModel(lp)
    if h.run() != highspy.HighsStatus.kOk or h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    x = h.getSolution().col_value
    step = {r.runs[i][0]: r.runs[i][1] for i in range(nx) if x[i] > 0.5}
    path, p = [], 0
    while p < r.n and p in step:
        path.append((p, step[p]))
        p = step[p]
    return path if p == r.n else None


def _highs(highspy, deadline: float):
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", max(0.01, deadline - time.monotonic()))
    return h


def _assign(c: _Costs, path: list[tuple[int, int]], t: float) -> tuple[Stage, ...] | None:
    """Step 3: a free node for every run of ``path`` (pipeline order), or None when the greedy finds none."""
    n = c.m.n
    k = len(c.nodes)
    order = sorted(range(k), key=lambda v: ((t - c.hop(v, 1, False)) * c.rate[v], v))  # smallest first
    caps = [(t - c.hop(v, 1, False)) * c.rate[v] for v in order]
    after = list(range(k + 1))  # after[i]: the first free position >= i in `order` (path-halving union-find)

    def free(i: int) -> int:
        while after[i] != i:
            after[i] = after[after[i]]
            i = after[i]
        return i

    ends = [(p, e) for p, e in path if p == 0 or e == n]
    middle = sorted(((p, e) for p, e in path if p > 0 and e < n), key=lambda run: -c.amount(*run, False))
    node = {}
    for p, e in ends + middle:
        last = e == n
        # A middle run fits no node of smaller estimated capacity (rounding aside); an end run may fit any.
        i = free(0 if p == 0 or last else bisect_left(caps, c.amount(p, e, False) * (1 - 1e-9)))
        while i < k and not c.fits(order[i], p, e, last, t):
            i = free(i + 1)
        if i == k:
            return None
        node[p] = order[i]
        after[i] = i + 1
    stages = tuple(Stage(node[p], p, e) for p, e in path)
    return stages if c.bottleneck(stages) <= t else None
