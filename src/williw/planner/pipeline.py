"""The pipeline search: which nodes, in which order, hold which contiguous run of blocks.

Problem: blocks ``0..n-1`` in model order; choose distinct nodes ``v_1..v_k`` and cuts ``0 = p_0 < ... < p_k = n``
so that every stage fits its node's memory, minimising the bottleneck ``max_j cost(stage j on v_j)``. Choosing the
nodes and their order is NP-hard in general (one-dimensional partitioning on heterogeneous processors; Pinar and
Aykanat 2004 solve the fixed-order case exactly); we use:

* **Threshold feasibility.** For a threshold ``T``, a node ``v`` starting at block ``p`` can take any run that
  fits both ``T`` and its memory; runs nest (a sub-run of a fitting run fits, since costs and bytes are
  non-negative), so taking the *longest* run is never worse (exchange argument), and ``ext(v, p)`` is
  non-decreasing in ``p``.
* **Exact, up to `EXACT_MAX_NODES` candidates:** a DP over node subsets, ``reach[S] = max_{v in S}
  ext(v, reach[S - v])`` (the farthest block a set of nodes can cover, in its best order), then ``T`` feasible iff
  some ``v`` outside ``S`` can finish ``[reach[S], n)`` with the last group. ``T`` is found by binary search on the
  bit patterns of positive doubles (which order like the doubles), so the result is the exact minimum over all
  the float values the cost functions can produce: at most 64 rounds of ``2^k · k`` steps.
* **Heuristic, for larger fleets:** the same threshold search for a few fixed node orders (fastest first,
  largest memory first, fastest first with one of the fastest able to hold the last group kept for the last
  stage), where the longest-run greedy is exact for the order; the plan reports its gap to a lower bound.
* **Exact pruning first:** with ``n`` blocks at most ``n`` nodes are used, so a node that ``n`` others weakly
  dominate (at least as fast and at least as much memory) can be swapped out of any plan without loss.
"""

from __future__ import annotations

import math
import struct
import time
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice

from williw.fleet import GB, TFLOPS_IN_GFLOPS, Node
from williw.planner.costs import PipelineModel, transfer_time, usable_bytes
from williw.planner.formats import Precisions, node_models, relax

# 2^12 subsets · 12 nodes · up to 64 threshold rounds: ~0.3 s in CPython, measured in bench/planner.py.
EXACT_MAX_NODES = 12
HEURISTIC_REL_TOL = 1e-9  # the heuristic stops bisecting once hi/lo - 1 is below this
LAST_STAGE_ORDERS = 4  # fixed orders that keep one of the fastest nodes for the last stage (`search`)


@dataclass(frozen=True)
class Stage:
    node: int  # index into the candidate list
    start: int  # block positions, [start, end)
    end: int


@dataclass(frozen=True)
class SearchResult:
    stages: tuple[Stage, ...]
    exact: bool


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", b))[0]


class _Costs:
    """Stage fitting for one model, one candidate list and one objective (``latency`` prices as ``decode``).

    Every figure is the one of `williw.planner.costs`: memory = weights + KV cache + activations against
    ``memory - reserve``; cost = amount / rate + the stage's two transfers. Bytes are node ``v``'s at its search
    precision (`formats.node_models`: ``ms[v]``). Without a node, ``amount``, ``nbytes`` and ``prefix`` are the
    least over the nodes (exact when all share one precision, ``uniform``); ``relaxed`` is the relaxation the
    bounds run on (`formats.relax`; ``self`` when all share one precision).
    """

    def __init__(self, model: PipelineModel, nodes: Sequence[Node], objective: str) -> None:
        self.nodes = nodes
        self.decode = objective != "prefill"
        self.mem = [usable_bytes(v) for v in nodes]
        # Cost = amount / rate: GFLOPs / (TFLOPS·1000) or bytes / (GB/s·1e9).
        if self.decode:
            self.rate = [v.memory_bandwidth_gbps * GB for v in nodes]  # type: ignore[operator]
        else:
            self.rate = [v.compute_tflops * TFLOPS_IN_GFLOPS for v in nodes]
        found = node_models(model, nodes) if nodes else Precisions((), True, True, ())
        self.ms = list(found.models)
        self.uniform, self.exact_formats = found.uniform, found.exact
        if found.uniform and found.exact:
            self._setup(self.ms[0] if nodes else model)
            self.relaxed = self
        else:
            env, mem, rate = relax(found, self.mem, self.rate, self.decode)
            self._setup(env)
            self.relaxed = _Costs.__new__(_Costs)
            r = self.relaxed
            r.nodes, r.decode, r.mem, r.rate, r.ms = nodes, self.decode, mem, rate, [env] * len(nodes)
            r.uniform = r.exact_formats = True
            r._setup(env)
            r.relaxed = r

    def _setup(self, m: PipelineModel) -> None:
        """``m`` the model without a node (the least over the nodes); ``ms`` already set."""
        self.m = m
        self.pre = [x.prefix_mem if self.decode else x.prefix_compute for x in self.ms]
        i = 1 if self.decode else 0
        hop, tok = m.hop_bytes[i], m.token_bytes[i]
        # Per node: the transfers of a stage (received + sent) that starts at block 0 or later, and ends before
        # the last block or with it.
        self.t_in = [(transfer_time(tok, v), transfer_time(hop, v)) for v in self.nodes]
        self.t_out = [(transfer_time(hop, v), transfer_time(tok, v)) for v in self.nodes]
        self.prefix = m.prefix_mem if self.decode else m.prefix_compute

    def hop(self, v: int, p: int, last: bool) -> float:
        return self.t_in[v][p > 0] + self.t_out[v][last]

    def amount(self, p: int, e: int, last: bool, v: int | None = None) -> float:
        m = self.m if v is None else self.ms[v]
        if self.decode:
            b = m.prefix_mem[e] - m.prefix_mem[p] + (m.first_bytes if p == 0 else 0)
            return b + (m.last_bytes + (m.replica_bytes if p > 0 else 0) if last else 0)
        c = m.prefix_compute[e] - m.prefix_compute[p] + (m.first_compute if p == 0 else 0.0)
        return c + (m.last_compute if last else 0.0)

    def nbytes(self, p: int, e: int, last: bool, v: int | None = None) -> int:
        m = self.m if v is None else self.ms[v]
        b = m.prefix_mem[e] - m.prefix_mem[p] + (m.first_bytes if p == 0 else 0)
        b += m.stage_activation(p, e, last)
        return b + (m.last_bytes + (m.replica_bytes if p > 0 else 0) if last else 0)

    def cost(self, v: int, p: int, e: int, last: bool) -> float:
        # Summed in the order of `costs.stage_times`, so the plan reports exactly the value searched for.
        return self.amount(p, e, last, v) / self.rate[v] + self.t_in[v][p > 0] + self.t_out[v][last]

    def fits(self, v: int, p: int, e: int, last: bool, t: float) -> bool:
        return self.nbytes(p, e, last, v) <= self.mem[v] and self.cost(v, p, e, last) <= t

    def ext(self, v: int, p: int, t: float) -> int:
        """The end of the longest non-final run from ``p`` that fits ``v`` under ``t`` (``p`` if none)."""
        m = self.ms[v]
        top = m.n - 1
        first_b = m.first_bytes if p == 0 else 0
        e = min(top, bisect_right(m.prefix_mem, m.prefix_mem[p] + self.mem[v] - first_b) - 1)
        if t != float("inf"):
            cap = (t - self.hop(v, p, False)) * self.rate[v]  # an estimate; the exact predicate below decides
            first = self.amount(0, 0, False, v) if p == 0 else 0
            prefix = self.pre[v]
            e = min(e, bisect_right(prefix, prefix[p] - first + cap) - 1)
        e = max(e, p)
        while e < top and self.fits(v, p, e + 1, False, t):
            e += 1
        while e > p and not self.fits(v, p, e, False, t):
            e -= 1
        return e

    def finish(self, v: int, p: int, t: float) -> bool:
        return self.fits(v, p, self.m.n, True, t)

    def same_bytes(self, u: int, v: int) -> bool:
        """Whether ``u`` and ``v`` price every stage alike (the same precision)."""
        return self.ms[u] is self.ms[v]

    def candidates(self, lo: float, hi: float) -> list[float]:
        return _candidates(self, lo, hi)

    def bottleneck(self, stages: Sequence[Stage]) -> float:
        n = self.m.n
        return max(self.cost(s.node, s.start, s.end, s.end == n) for s in stages)


def _exact_feasible(c: _Costs, t: float, by_size: list[int]) -> tuple[Stage, ...] | None:
    k = len(c.nodes)
    n = c.m.n
    full = 1 << k
    reach = [0] * full
    choice = [-1] * full
    memo: list[dict[int, int]] = [{} for _ in range(k)]
    for s in range(1, full):
        best, who = -1, -1
        rest = s
        while rest:
            low = rest & -rest
            v = low.bit_length() - 1
            p = reach[s ^ low]
            r = memo[v].get(p)
            if r is None:
                r = memo[v][p] = c.ext(v, p, t)
            if r > best:
                best, who = r, v
            rest ^= low
        reach[s], choice[s] = best, who
    done: list[dict[int, bool]] = [{} for _ in range(k)]
    for s in by_size:  # fewest nodes first
        p = reach[s]
        for v in range(k):
            if s >> v & 1:
                continue
            ok = done[v].get(p)
            if ok is None:
                ok = done[v][p] = c.finish(v, p, t)
            if ok:
                stages = [Stage(v, p, n)]
                cur = s
                while cur:
                    u = choice[cur]
                    prev = cur ^ (1 << u)
                    if reach[cur] > reach[prev]:
                        stages.append(Stage(u, reach[prev], reach[cur]))
                    cur = prev
                return tuple(reversed(stages))
    return None


def _ordered_feasible(c: _Costs, t: float, order: Sequence[int], least: float = 0.0) -> tuple[Stage, ...] | None:
    """The longest-run greedy over ``order``; nodes whose threshold ``t · rate`` is below ``least`` (the lightest
    block's amount: every stage costs at least its amount / rate) are skipped unasked."""
    n = c.m.n
    p = 0
    stages: list[Stage] = []
    for v in order:
        room = t * c.rate[v] * (1 + 1e-9)
        if room < least:
            continue
        # Finishing needs the rest's amount and bytes: two subtractions rule out most nodes before `finish`.
        mv = c.ms[v]
        if room >= c.amount(p, n, True, v) and c.mem[v] >= mv.prefix_mem[n] - mv.prefix_mem[p] and c.finish(v, p, t):
            stages.append(Stage(v, p, n))
            return tuple(stages)
        e = c.ext(v, p, t)
        if e > p:
            stages.append(Stage(v, p, e))
            p = e
    return None


def _candidates(c: _Costs, lo: float, hi: float) -> list[float]:
    """Every stage cost in ``(lo, hi]``: the optimum is one of them (it is the cost of some stage)."""
    m = c.m
    n = m.n
    out = set()
    for v in range(len(c.nodes)):
        rate, prefix = c.rate[v], c.pre[v]
        for p in range(n):
            t = c.cost(v, p, n, True)
            if lo < t <= hi:
                out.add(t)
            base = prefix[p] - (c.amount(0, 0, False, v) if p == 0 else 0)  # the first group counts on stage 0
            hop = c.hop(v, p, False)  # a non-final stage's transfers: amount = (cost - hop) · rate
            a = max(p + 1, bisect_right(prefix, base + (lo - hop) * rate) - 2)
            b = min(n - 1, bisect_right(prefix, base + (hi - hop) * rate) + 1)
            for e in range(a, b + 1):
                t = c.cost(v, p, e, False)
                if lo < t <= hi:
                    out.add(t)
    return sorted(out)


def _minimise(c, feasible, lower: float, rel_tol: float = 0.0, start=None, deadline: float = float("inf")):
    """Smallest threshold at which ``feasible`` finds a plan.

    Bisection on the doubles' bit patterns down to ``rel_tol`` (heuristic; it stops early past ``deadline``,
    monotonic seconds), or (exact, ``rel_tol`` 0) down to 1e-6 and then over the stage costs left in the interval
    (``c.candidates``), which contain the optimum. ``c`` is `_Costs` or `linkcost.LinkCosts` (its ``bottleneck``
    and ``candidates``; plans are what ``feasible`` returns).
    """
    plan = start or feasible(float("inf"))
    if plan is None:
        return None
    hi_t = c.bottleneck(plan)
    found = feasible(hi_t)
    if found is None:  # rounding between the search's prefix sums and the plan's own sums
        return plan
    if c.bottleneck(found) < hi_t:
        plan = found
    hi = _bits(c.bottleneck(plan))
    lo = _bits(lower * (1 - 1e-9)) if lower > 0 else -1  # known (or assumed) infeasible
    stop = rel_tol or 1e-6
    while hi - lo > 1:
        if lo >= 0 and _float(hi) <= _float(lo) * (1 + stop) or rel_tol and time.monotonic() > deadline:
            break
        mid = (lo + hi) // 2
        found = feasible(_float(mid))
        if found is None:
            lo = mid
        else:
            hi, plan = mid, found
            hi = min(hi, _bits(c.bottleneck(plan)))
    if rel_tol or hi - lo <= 1:
        return plan
    values = c.candidates(_float(lo) if lo >= 0 else -1.0, _float(hi))
    i, j = 0, len(values)  # the answer is values[i:j] or, if none is feasible, the plan at hi
    while i < j:
        mid = (i + j) // 2
        found = feasible(values[mid])
        if found is None:
            i = mid + 1
        else:
            j, plan = mid, found
    return plan


def lower_bound(model: PipelineModel, nodes: Sequence[Node], objective: str) -> float:
    """A bound no plan beats.

    A plan uses some ``j <= n`` nodes (``n`` blocks); every used node runs at least the lightest block, so
    ``T >= w_min / r_j`` (``r_j`` the j-th largest rate), and all the work runs at the used nodes' summed rate, at
    most the ``j`` largest rates' sum ``R_j``: ``T >= W / R_j``. So ``T >= min_j max(W / R_j, w_min / r_j)``; and
    ``T >= w_max / r_1`` for the heaviest block. With ``j`` = all nodes this is ``total / Σ rate``. Transfers
    and activations are left out: they only add to every stage, so the bound stays below every plan. Nodes of
    different precisions: on the relaxation (`formats.relax`), whose bytes and rates no plan beats.
    """
    if objective != "prefill":
        nodes = [v for v in nodes if v.memory_bandwidth_gbps]
    if not nodes or model.n == 0:
        return 0.0
    c = _Costs(model, nodes, objective).relaxed
    m = c.m
    rates = sorted(c.rate, reverse=True)
    if objective != "prefill":
        work = [float(m.prefix_mem[i + 1] - m.prefix_mem[i]) for i in range(m.n)]
        total = float(m.prefix_mem[-1] + m.first_bytes + m.last_bytes)
    else:
        work = list(m.block_compute)
        total = m.prefix_compute[-1] + m.first_compute + m.last_compute
    if not rates:
        return 0.0
    best = float("inf")
    summed = 0.0
    for j, r in enumerate(rates[:model.n]):
        summed += r
        best = min(best, max(total / summed, min(work) / r))
        if j + 1 == len(rates):
            break
    return max(best, max(work) / rates[0])


def search(model: PipelineModel, nodes: Sequence[Node], objective: str, deadline: float = float("inf"),
           below: float = float("inf")) -> SearchResult | None:
    """The best pipeline over ``nodes`` (every node able to hold a block; for decode, every node has a bandwidth).

    Beyond `EXACT_MAX_NODES` the fixed-order heuristic stops refining its thresholds past ``deadline`` (monotonic
    seconds; each order still returns a plan when one fits). With ``below``, it tries only the orders whose
    greedy fits under ``below`` (one threshold each: it is monotone in the threshold) and refines those fully:
    what the unhurried heuristic would have found, when that beats a plan of bottleneck ``below``, else None.

    Returns:
        The stages in pipeline order, or None when no split fits the nodes' memory.
    """
    c = _Costs(model, nodes, objective)
    lower = lower_bound(model, nodes, objective)
    k = len(nodes)
    if k <= EXACT_MAX_NODES:
        by_size = sorted(range(1 << k), key=lambda s: (s.bit_count(), s))
        order = sorted(range(k), key=lambda i: (-c.rate[i], -c.mem[i], i))
        start = _minimise(c, lambda t: _ordered_feasible(c, t, order), lower, 1e-3)  # a good first upper bound
        plan = _minimise(c, lambda t: _exact_feasible(c, t, by_size), lower, start=start)
        return SearchResult(plan, True) if plan is not None else None
    fastest = sorted(range(k), key=lambda i: (-c.rate[i], -c.mem[i], i))
    orders = [fastest, sorted(range(k), key=lambda i: (-c.mem[i], -c.rate[i], i))]
    # Fastest first, with one of the fastest that can hold the last group kept for the last stage: the last group
    # (norm and head) is often heavier than a block, and fastest-first leaves only slow nodes at the end.
    # Llama-3-70B's shape over 256 nodes: 1.2-3.6% above the window bound without these orders, within 1e-6 of it
    # with them.
    enders = islice((v for v in fastest if c.fits(v, model.n - 1, model.n, True, math.inf)), LAST_STAGE_ORDERS)
    orders += [[v for v in fastest if v != last] + [last] for last in enders]
    least = min(c.amount(p, p + 1, False) for p in range(model.n)) if model.n else 0.0
    best: tuple[Stage, ...] | None = None
    for order in orders:
        def feasible(t: float, o: list[int] = order) -> tuple[Stage, ...] | None:
            return _ordered_feasible(c, t, o, least)

        first = None
        if below < float("inf"):
            first = feasible(math.nextafter(below, 0.0))
            if first is None:
                continue
        plan = _minimise(c, feasible, lower, HEURISTIC_REL_TOL, start=first, deadline=deadline)
        if plan is not None and (best is None or c.bottleneck(plan) < c.bottleneck(best)):
            best = plan
    return SearchResult(best, False) if best is not None else None


def max_coverage(model: PipelineModel, nodes: Sequence[Node]) -> int:
    """How many leading blocks the nodes can hold in non-final contiguous runs (memory only): for messages."""
    c = _Costs(model, nodes, "prefill")
    k = len(nodes)
    if k <= EXACT_MAX_NODES:
        reach = [0] * (1 << k)
        for s in range(1, 1 << k):
            reach[s] = max(c.ext(v, reach[s ^ (1 << v)], float("inf")) for v in range(k) if s >> v & 1)
        return max(reach)
    p = 0
    for v in sorted(range(k), key=lambda i: -c.mem[i]):
        p = c.ext(v, p, float("inf"))
    return p
