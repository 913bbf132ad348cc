"""The linear-programming bound: stronger than the window bound where nodes hold few blocks each.

Why: the window bound (`bound.py`) only counts what the nodes can hold in total. With a few blocks per node the
blocks' granularity decides: 40 uneven blocks over 40 nodes, its bound is 1.3-5.6% below the proven optimum, while
this relaxation is within 0.01% of it on all six instances measured (`bench/planner.py certified`).

The relaxation, at a threshold ``T``: a plan is a partition of the blocks into runs (a path from block 0 to ``n``)
and distinct nodes that hold them. Order the candidates by their middle-stage capacity ``(T - transfers) · rate``
(largest first) and let a run's **reach** be the worst rank of a node that can hold it (its amount within the
node's capacity for the run's role; memory is left out, which only loosens the bound). Runs of reach ``<= j`` need
distinct nodes among the ``N_j`` of rank ``<= j``, so every plan is a path with, for each ``j``::

    #{runs of reach <= j} <= N_j.

The fractional version (a unit flow over runs) is a small LP: one variable per run, ``n`` flow rows and one row per
rank. HiGHS (`highspy`, an optional dependency) solves it; its duals ``λ_j >= 0`` give every run the price
``Σ_{j >= reach} λ_j``. When the cheapest path under those prices costs more than ``Σ_j N_j λ_j``, no plan exists at
``T`` (the Lagrangian argument of `lagrange.py`, with ranks in place of nodes). That last check is done here, in
exact arithmetic on the solver's numbers, so a solver's rounding can weaken the bound but never make it wrong.
Without highspy the planner keeps the window bound.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from bisect import bisect_left

from williw.planner.bound import SLACK
from williw.planner.pipeline import _Costs

# Runs the relaxation keeps (the maximal ones: the LP's columns) beyond which it is skipped. 1,000 blocks: over
# 1,000 nodes 7,500 (0.24-0.34 s a solve), over 96 nodes 23,400 (0.57 s), over 48 nodes 20,800 (0.44 s); measured
# with HiGHS 1.16 on an idle 2-core machine.
MAX_RUNS = 30_000
# Runs looked at before keeping the maximal ones (`Runs` builds them in CPython, ~0.3 µs each): 48 nodes have
# 168,000 (0.05 s), 96 nodes 73,000. Beyond this the bound is skipped without building them.
MAX_SCAN = 1_000_000
# The bound's bisection stops once hi / lo - 1 is below this: its last solves (0.3 s each on 1,000 x 1,000) would
# gain 0.01-0.02%, and that time is what rounding (`rounding`) needs to bring the plan to 0.8%.
REL_TOL = 3e-4
# One LP's seconds per kept run (HiGHS's interior point, measured 24-45 µs: 0.57 s for 23,400 runs, 0.34 s for
# 7,500): a solve that cannot end before the deadline is not started, since it cannot be interrupted and its time
# is the packing's.
SECONDS_PER_RUN = 5e-5
IMPORT_S = 0.3  # the first import of highspy and numpy: 0.12 s on an idle 2-core machine, ~1 s at load average 11


def available() -> bool:
    """Whether the LP solver (``highspy``) can be imported (a broken install, e.g. a missing library, cannot)."""
    try:
        import highspy  # noqa: F401
    except Exception:  # noqa: BLE001 (ImportError, and OSError or worse from a broken build: all mean "no solver")
        return False
    return True


class Runs:
    """Every run a node could hold at one threshold, with its reach; ``count`` is how many were kept (the LP's
    columns), None when there are too many (beyond ``max_runs`` kept or `MAX_SCAN` looked at).

    ``runs[i] = (p, e, reach)``: blocks ``[p, e)``; ``limit[j - 1] = N_j``, how many nodes have rank ``<= j``;
    ``capacity[j - 1]``: the middle-stage capacity (amount, GFLOPs or bytes) of the node of rank ``j``.
    ``single`` is True when one node can hold the whole model (the relaxation then proves nothing).
    """

    def __init__(self, c: _Costs, t: float, max_runs: int = MAX_RUNS) -> None:
        c = c.relaxed  # nodes of different precisions: the relaxation (`formats.relax`), which no plan beats
        n = c.m.n
        k = len(c.nodes)
        top = t * (1 + SLACK)
        self.single = False
        mid = [(top - c.hop(v, 1, False)) * c.rate[v] for v in range(k)]
        asc = sorted(mid)
        m = k
        # rank(v): how many nodes are at least as large as v (ties share the worst rank: a node may be any of them)
        rank = [m - bisect_left(asc, x) for x in mid]
        limit = [0] * m
        for r in rank:
            limit[r - 1] += 1
        for j in range(1, m):
            limit[j] += limit[j - 1]
        # The first and last roles' transfers differ by node: their runs take the worst rank of a node able to
        # hold them. Per role, nodes sorted by role capacity, with the running maximum of their ranks.
        roles = {}
        for role, (p_role, last) in (("first", (0, False)), ("last", (1, True))):
            caps = sorted(((top - c.hop(v, p_role, last)) * c.rate[v], rank[v]) for v in range(k))
            worst = [0] * k
            acc = 0
            for i in range(k - 1, -1, -1):
                acc = max(acc, caps[i][1])
                worst[i] = acc
            roles[role] = ([x for x, _ in caps], worst)
        biggest = max(max(mid), max(roles["first"][0][-1], roles["last"][0][-1]))
        self.n, self.m, self.limit = n, m, limit
        self.capacity = asc[::-1]  # capacity[j - 1]: the middle-stage capacity of rank j (amount)
        self.runs: list[tuple[int, int, int]] = []
        # Count first (the longest run from p only grows with p): a threshold with too many runs costs O(n) here.
        self.count: int | None = None
        count, e = 0, 1
        for p in range(n):
            e = max(e, p + 1)
            while e <= n and c.amount(p, e, e == n) <= biggest:
                e += 1
            count += e - 1 - p
        if count > MAX_SCAN:
            return
        self.single = any(c.finish(v, 0, t) for v in range(k))
        for p in range(n):
            # Only runs that one more block would make harder to place (a smaller reach) are kept: a plan's run can
            # grow to the last block of its reach, and the next run, now shorter, only gains reach.
            held = (0, 0)  # the last run from p with a reach: (end, reach)
            for e in range(p + 1, n + 1):
                if p == 0 and e == n:
                    break  # one node for everything: `single`
                a = c.amount(p, e, e == n)
                if a > biggest:
                    break
                if p == 0 or e == n:
                    caps, worst = roles["first" if p == 0 else "last"]
                    i = bisect_left(caps, a)
                    reach = worst[i] if i < k else 0
                else:
                    reach = m - bisect_left(asc, a)
                if held[1] > reach:
                    self.runs.append((p, *held))
                held = (e, reach)
            if held[1]:
                self.runs.append((p, *held))
        if len(self.runs) <= max_runs:
            self.count = len(self.runs)


def refutes(r: Runs, prices: list[float]) -> bool:
    """True when the prices prove that no plan exists: the cheapest path over the runs, each priced
    ``Σ_{j >= reach} λ_j``, costs more than ``Σ_j N_j λ_j`` (exact check; ``prices[j - 1] = λ_j``, clipped at 0)."""
    lam = [max(0.0, x) if math.isfinite(x) else 0.0 for x in prices]
    m = r.m
    tail = [0.0] * (m + 2)
    for j in range(m, 0, -1):
        tail[j] = tail[j + 1] + lam[j - 1]
    budget = sum(n_j * x for n_j, x in zip(r.limit, lam, strict=True))
    inf = math.inf
    f = [inf] * (r.n + 1)  # f[p]: the cheapest path from block p to the end
    f[r.n] = 0.0
    by_start: list[list[tuple[int, int]]] = [[] for _ in range(r.n)]
    for p, e, reach in r.runs:
        by_start[p].append((e, reach))
    for p in range(r.n - 1, -1, -1):
        best = inf
        for e, reach in by_start[p]:
            x = tail[reach] + f[e]
            if x < best:
                best = x
        f[p] = best
    # Sums of non-negative terms: each rounds by under 1e-15 relative, far inside the margin below.
    return f[0] > budget * (1 + 1e-9) and f[0] > 0


def solve(r: Runs) -> tuple[float, list[float]]:
    """The LP's largest flow (1 when a fractional plan exists) and its rank prices ``λ_j`` (``[j - 1]``)."""
    highspy = _solver()
    import numpy as np

    nx, m = len(r.runs), r.m
    lp = model(r)
    lp.col_cost_ = np.concatenate([np.zeros(nx + m), [-1.0]])  # maximise F
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    # The interior-point method without crossover: the simplex method took 250 s on the 1,000 x 1,000 LP
    # (degenerate), this 0.4-0.6 s; its duals are checked by `refutes` anyway.
    h.setOptionValue("solver", "ipm")
    h.setOptionValue("run_crossover", "off")
    # Threads: HiGHS's default. Its scheduler is one per process, and a solve asking another thread count than the
    # first solve's fails: so williw's solves and the application's own highspy ones must both leave it alone.
    h.passModel(lp)
    if h.run() != highspy.HighsStatus.kOk:  # e.g. the application set another thread count first
        return 1.0, [0.0] * m  # proves nothing
    duals = h.getSolution().col_dual
    return -h.getInfo().objective_function_value, [-float(duals[nx + j]) for j in range(m)]


def model(r: Runs):
    """The relaxation as a ``highspy.HighsLp`` with no objective (set ``col_cost_``).

    Columns: ``x`` (one per run, ``>= 0``), ``z_j`` (runs of reach ``<= j``, cumulated; ``0 <= z_j <= N_j``), ``F``
    (the flow, ``0 <= F <= 1``). Rows: ``n`` flow rows (out - in - ``[p == 0] F`` = 0), then ``m`` rank rows
    (``z_j - z_{j-1} - Σ_{reach = j} x = 0``).
    """
    highspy = _solver()
    import numpy as np

    n, m, runs = r.n, r.m, r.runs
    nx = len(runs)
    starts, index, value = [0], [], []
    for p, e, reach in runs:
        index += [p, n + reach - 1] if e == n else [p, e, n + reach - 1]
        value += [1.0, -1.0] if e == n else [1.0, -1.0, -1.0]
        starts.append(len(index))
    for j in range(m):
        index += [n + j, n + j + 1] if j + 1 < m else [n + j]
        value += [1.0, -1.0] if j + 1 < m else [1.0]
        starts.append(len(index))
    index.append(0)
    value.append(-1.0)
    starts.append(len(index))
    lp = highspy.HighsLp()
    lp.num_col_ = nx + m + 1
    lp.num_row_ = n + m
    lp.col_cost_ = np.zeros(nx + m + 1)
    lp.col_lower_ = np.zeros(nx + m + 1)
    lp.col_upper_ = np.concatenate([np.full(nx, highspy.kHighsInf), np.array(r.limit, dtype=float), [1.0]])
    lp.row_lower_ = np.zeros(n + m)
    lp.row_upper_ = np.zeros(n + m)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.array(starts, dtype=np.int32)
    lp.a_matrix_.index_ = np.array(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.array(value)
    return lp


_quiet = threading.Lock()
_started = False


def _solver():
    """highspy, imported; its first solver object prints a banner on standard output, which goes to /dev/null
    (file descriptor 1 points there for that moment: another thread's write to it then is lost; a process whose
    standard output is closed gets no banner anyway)."""
    global _started
    import highspy

    with _quiet:
        if not _started:
            try:
                if sys.stdout is not None:
                    sys.stdout.flush()
                saved = os.dup(1)
            except (OSError, ValueError):  # standard output closed: nothing to protect
                saved = -1
            try:
                if saved >= 0:
                    with open(os.devnull, "wb") as null:
                        os.dup2(null.fileno(), 1)
                highspy.Highs()
            finally:
                if saved >= 0:
                    os.dup2(saved, 1)
                    os.close(saved)
            _started = True
    return highspy


def lp_lower_bound(c: _Costs, lo: float, hi: float, deadline: float, rel_tol: float = REL_TOL) -> float:
    """Raise a certified lower bound ``lo`` (a threshold no plan meets) towards ``hi`` with the LP relaxation.

    Each LP at a refuted threshold also gives its flow ``F < 1``; ``F`` grows about linearly to 1 at the LP's
    bound, so the next threshold is the line through the last two refuted ones, aimed a little short of ``F = 1``
    (kept inside the bracket); the first steps gallop up from ``lo`` (1/512, doubling). Stops once the bracket is
    within ``rel_tol``, past ``deadline`` (monotonic seconds), or where `_verdict` cannot answer. Returns the largest
    threshold `refutes` confirmed (``lo`` if none).
    """
    return lp_bracket(c, lo, hi, deadline, rel_tol)[0]


def lp_bracket(c: _Costs, lo: float, hi: float, deadline: float, rel_tol: float = REL_TOL) -> tuple[float, float]:
    """`lp_lower_bound`, with the bracket's top: the least threshold at which the LP was feasible (``hi`` if none).
    Passing both back as ``lo`` and ``hi`` goes on where it stopped."""
    if not 0 < lo < hi:
        return lo, hi
    step = 1 / 512
    top = hi
    seen: list[tuple[float, float]] = []  # (threshold, flow) of refuted thresholds
    while top > lo * (1 + rel_tol) and time.monotonic() < deadline:
        mid = lo * (1 + step)
        if len(seen) >= 2 and seen[-1][1] > seen[-2][1]:
            (t1, f1), (t2, f2) = seen[-2:]
            mid = t2 + (t2 - t1) * (1 - 1e-4 - f2) / (f2 - f1)
        if not lo < mid < top:
            mid = math.sqrt(lo) * math.sqrt(top)
        if top < hi:  # a bracket: stay inside its middle three quarters, so it shrinks by an eighth at least
            mid = min(max(mid, lo + (top - lo) / 8), top - (top - lo) / 8)
        if not lo < mid < top:
            break
        verdict = _verdict(c, mid, deadline)
        if verdict is None:
            return lo, top
        refuted, flow = verdict
        if refuted:
            lo, step = mid, step * 2
            seen.append((mid, flow))
        else:
            top = mid
    return lo, top


def refutes_at(c: _Costs, t: float, deadline: float = math.inf) -> bool:
    """Whether the LP relaxation proves that no plan meets ``t``; False where `_verdict` cannot answer."""
    verdict = _verdict(c, t, deadline)
    return verdict is not None and verdict[0]


def _verdict(c: _Costs, t: float, deadline: float) -> tuple[bool, float] | None:
    """(whether the LP proves that no plan meets ``t``, its flow); None beyond `MAX_RUNS` runs, without highspy (or
    when it fails: an old or broken build), or when the solve (and the first import, which counts too: it is other
    phases' time) would end after ``deadline`` (monotonic seconds)."""
    r = Runs(c, t)
    if r.count is None:
        return None
    if r.single:  # one node can hold everything: a plan exists
        return False, 1.0
    if not r.runs:  # and no node can hold any part: none does
        return True, 0.0
    cold = 0.0 if "highspy" in sys.modules else IMPORT_S
    if time.monotonic() + r.count * SECONDS_PER_RUN + cold > deadline or not available():
        return None
    try:
        flow, lam = solve(r)
    except Exception:  # noqa: BLE001 (an old or broken highspy: its failure proves nothing, the planner goes on)
        return None
    return flow < 1 - 1e-7 and refutes(r, lam), flow
