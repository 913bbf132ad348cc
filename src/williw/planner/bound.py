"""Necessary conditions for a bottleneck threshold, and the certified lower bound they give.

For a threshold ``T`` a node ``v`` can hold a run of consecutive blocks whose amount (GFLOPs for prefill, bytes
for decode) is at most ``a_v = (T - transfers) · rate_v`` (its own two transfers as a middle, first or last stage)
and whose bytes are at most ``m_v`` (its memory). From the blocks
alone, independent of ``T``, we keep four window tables: ``min_a[L]``, ``max_a[L]``, ``min_b[L]``, ``max_b[L]``,
the least and greatest amount and bytes of any ``L`` consecutive blocks (non-decreasing in ``L``: every block is
non-negative). Then any stage of ``v`` has

* at most ``cnt_v = max{L : min_a[L] <= a_v and min_b[L] <= m_v}`` blocks,
* amount at most ``min(a_v, max_a[cnt_v])`` and bytes at most ``min(m_v, max_b[cnt_v])``;

the first stage also carries the first group (embeddings) and the last stage the last group (norm, head, and
the tied head's replica), which shrink what is left for blocks (``cnt`` of that role) and add their own amount.

A plan at ``T`` covers every block, all the amount and all the bytes with at most ``n`` stages, so
``Σ cnt_v + (best first-role change) + (best last-role change) >= n`` over the ``n`` largest ``cnt``, and the same
for amount and bytes. Each is the linear-programming dual of the covering relaxation with block prices 1, the
blocks' amounts, or their bytes (Pinar and Aykanat 2004 use the same window reasoning for fixed orders). A
threshold that fails one condition, and that no single node can hold the whole model under, is infeasible; so
every plan's bottleneck is above it, a **certified** lower bound.

Windows over the whole model let every node take the lightest blocks' windows: where blocks differ (a mixture of
experts' dense first blocks, then expert blocks six times their bytes) that says little. So each run of identical
blocks also gets its own count condition (`Windows.region_counts`): every stage meets the run in a run of its
blocks, which fits the stage's node, so the nodes' longest such runs must add up to its length.
"""

from __future__ import annotations

import heapq
import math
import time
from bisect import bisect_right
from dataclasses import dataclass
from operator import sub

from williw.planner.pipeline import _Costs

SLACK = 1e-12  # relative: a stage that fits ``amount / rate + transfers <= T`` has
# ``amount <= (T · (1 + SLACK) - transfers) · rate`` (the cost's sums round by far less than 1e-12 · T)
# Relative: the amounts (GFLOPs) the nodes can hold are summed in another order than the model's total, so a plan
# whose stages hold their caps exactly sums to a total a few ulps off (two nodes, two blocks of 1.024001e-3 GFLOPs:
# 2.049001999e-3 against 2.049002e-3); without it such a threshold, and every one above, was "refuted".
SUM_TOL = 1e-9
MAX_REGIONS = 8  # runs of identical blocks whose own count condition `Windows.necessary` checks
NONE = -(1 << 62)  # a role the node cannot take (the first or last group alone overflows it)


@dataclass(frozen=True)
class Caps:
    """Per node, at one threshold: (count, amount, bytes) as a middle stage, and how much a first or a last
    stage changes each (``NONE`` when the node cannot take the role)."""

    mid: tuple[tuple[float, ...], ...]  # [count, amount, bytes] -> per node
    first: tuple[tuple[float, ...], ...]  # deltas to mid
    last: tuple[tuple[float, ...], ...]


class Windows:
    """The window tables of one model and objective, extended on demand."""

    def __init__(self, c: _Costs) -> None:
        exact = c
        c = c.relaxed  # nodes of different precisions: the relaxation (`formats.relax`), which no plan beats
        m = c.m
        self.c = c
        # Bytes are weights + KV cache: activations only add to a stage, so leaving them out keeps
        # every condition necessary (and the bound below every plan).
        self.pa = list(m.prefix_mem if c.decode else m.prefix_compute)
        self.pb = list(m.prefix_mem)
        self.min_a, self.max_a, self.min_b, self.max_b = [0.0], [0.0], [0], [0]
        self.first_a = m.first_bytes if c.decode else m.first_compute
        self.first_b = m.first_bytes
        # The last stage of a plan with two or more stages holds the tied head's replica.
        self.last_b = m.last_bytes + m.replica_bytes
        self.last_a = self.last_b if c.decode else m.last_compute
        self.total = (self.pa[-1] + self.first_a + self.last_a, self.pb[-1] + self.first_b + self.last_b)
        # The lightest block's amount: a node whose threshold allows less holds nothing (most of a large fleet).
        self.least = min(map(sub, self.pa[1:], self.pa[:-1]), default=0.0)
        runs = _identical_runs([m, *{id(x): x for x in exact.ms}.values()], c.decode)
        self.regions = _uniform_regions(runs, m.n)
        # Per region, the amount and bytes of its first L blocks (any L of them: they are identical).
        self.region_sums = [([x - self.pa[s] for x in self.pa[s:e + 1]], [x - self.pb[s] for x in self.pb[s:e + 1]])
                            for s, e in self.regions]
        # Where the model's last run of identical blocks starts: from there on only counts matter (`branch`).
        self.uniform_from = runs[-1][0] if runs else m.n

    def _extend(self, a: float, b: float) -> None:
        """Grow the tables until ``a`` or ``b`` is exceeded by a window, or they cover every length."""
        n = len(self.pa) - 1
        while len(self.min_a) <= n and self.min_a[-1] <= a and self.min_b[-1] <= b:
            size = len(self.min_a)
            wa = list(map(sub, self.pa[size:], self.pa[:-size]))
            wb = list(map(sub, self.pb[size:], self.pb[:-size]))
            self.min_a.append(min(wa))
            self.max_a.append(max(wa))
            self.min_b.append(min(wb))
            self.max_b.append(max(wb))

    def _run(self, a: float, b: float) -> tuple[int, float, int] | None:
        """(blocks, amount, bytes) bounds of a run under amount ``a`` and bytes ``b``; None if not one block."""
        if a < 0 or b < 0:
            return None
        self._extend(a, b)
        cnt = min(bisect_right(self.min_a, a), bisect_right(self.min_b, b)) - 1
        if cnt < 1:
            return None
        return cnt, min(a, self.max_a[cnt]), min(b, self.max_b[cnt])

    def caps(self, t: float) -> Caps:
        c = self.c
        mid: list[list[float]] = [[], [], []]
        first: list[list[float]] = [[], [], []]
        last: list[list[float]] = [[], [], []]
        inf = float("inf")
        for v in range(len(c.nodes)):
            # A stage costs amount / rate + its node's two transfers, which depend on the role only: so its amount
            # is at most (T - transfers) · rate, for a middle, a first and a last stage.
            a, a_first, a_last = (inf, inf, inf) if t == inf else (
                (t * (1 + SLACK) - c.hop(v, p, end)) * c.rate[v] for p, end in ((1, False), (0, False), (1, True)))
            b = c.mem[v]
            if max(a, a_first, a_last) < self.least:  # what `_run` gives such a node, without its searches
                for i in range(3):
                    mid[i].append(0)
                    first[i].append(NONE)
                    last[i].append(NONE)
                continue
            base = self._run(a, b) or (0, 0.0, 0)
            for i in range(3):
                mid[i].append(base[i])
            for role, ar, ra, rb in ((first, a_first, self.first_a, self.first_b),
                                     (last, a_last, self.last_a, self.last_b)):
                r = self._run(ar - ra, b - rb)
                extra = (0, ra, rb)
                for i in range(3):
                    role[i].append(NONE if r is None else r[i] + extra[i] - base[i])
        return Caps(tuple(map(tuple, mid)), tuple(map(tuple, first)), tuple(map(tuple, last)))

    def necessary(self, t: float) -> bool:
        """False only when no plan has bottleneck <= ``t`` (some node holding everything, or all three sums)."""
        c = self.c
        n = c.m.n
        if any(c.finish(v, 0, t) for v in range(len(c.nodes)) if t * c.rate[v] * (1 + SLACK) >= self.least):
            return True
        if n < 2:
            return False
        caps = self.caps(t)
        totals = (n, *self.total)
        for i in range(3):
            top = heapq.nlargest(n, caps.mid[i]) if len(caps.mid[i]) > n else caps.mid[i]
            have = sum(top) + max(caps.first[i]) + max(caps.last[i])
            if have < totals[i] * (1 - SUM_TOL):
                return False
        return self._region_holds(t)

    def region_counts(self, t: float) -> list[tuple[int, int, list[int], list[int] | None]]:
        """Per run of identical blocks ``[s, e)`` (`_uniform_regions`): ``(s, e, other, end)``, the most of its
        blocks each node can hold in one stage (``other``: the loosest of the roles its stage may have, all its
        memory) and, where the run starts or ends the model, as the stage that also holds the first or last
        group (``end``; None elsewhere).

        Every stage meets the run in a run of its blocks (maybe empty) that fits the stage's node, so with the
        node of the end stage counted by ``end``, the nodes' counts must add up to ``e - s`` (`_region_holds`).
        """
        c = self.c
        top = t * (1 + SLACK)
        out = []
        for (s, e), (ra, rb) in zip(self.regions, self.region_sums, strict=True):
            size = e - s

            def count(a: float, b: float, size=size, ra=ra, rb=rb) -> int:
                if a < ra[1] or b < rb[1]:
                    return 0
                return min(size, bisect_right(ra, a) - 1, bisect_right(rb, b) - 1)

            other, end = [], []
            for v in range(len(c.nodes)):
                first, mid, last = ((top - c.hop(v, p, fin)) * c.rate[v] for p, fin in ((0, False), (1, False),
                                                                                         (1, True)))
                if s == 0:  # the first stage meets these blocks: the others are middle or last stages
                    other.append(count(max(mid, last), c.mem[v]))
                    end.append(count(first - self.first_a, c.mem[v] - self.first_b))
                elif e == c.m.n:
                    other.append(count(max(first, mid), c.mem[v]))
                    end.append(count(last - self.last_a, c.mem[v] - self.last_b))
                else:
                    other.append(count(max(first, mid, last), c.mem[v]))
            out.append((s, e, other, end if s == 0 or e == c.m.n else None))
        return out

    def _region_holds(self, t: float) -> bool:
        for s, e, other, end in self.region_counts(t):
            # The end stage's node: what it holds there minus its count in the other roles, at best (often < 0).
            gain = 0 if end is None else max((x - y for x, y in zip(end, other, strict=True)), default=s - e)
            if sum(other) + gain < e - s:
                return False
        return True


def _identical_runs(models, decode: bool) -> list[tuple[int, int]]:
    """The maximal runs ``[i, j)`` of identical blocks, in model order: the same amount, bytes (weights and KV
    cache) and transient (activations), everything a stage's cost and memory take from its blocks (`_Costs`), in
    each of ``models`` (the precisions the nodes are searched at, and the relaxation)."""
    n = models[0].n
    keys = [tuple((0.0 if decode else m.block_compute[i], m.prefix_mem[i + 1] - m.prefix_mem[i],
                   m.block_act[i] if m.block_act else 0) for m in models) for i in range(n)]
    out = []
    i = 0
    while i < n:
        j = i + 1
        while j < n and keys[j] == keys[i]:
            j += 1
        out.append((i, j))
        i = j
    return out


def _uniform_regions(runs: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The longest runs of identical blocks (two or more, not the whole model), at most `MAX_REGIONS`: where
    blocks differ in size (a mixture of experts' dense first blocks, hybrid models) the condition on the whole
    model lets every node take the lightest blocks' windows, and these runs' own count condition is what binds
    (3 dense and 58 expert blocks over 64 nodes: certified gap 61% -> 0)."""
    out = [(i, j) for i, j in runs if 2 <= j - i < n]
    return sorted(out, key=lambda r: r[0] - r[1])[:MAX_REGIONS]


def certified_lower_bound(w: Windows, lo: float, hi: float, rel_tol: float = 1e-6,
                          deadline: float = float("inf")) -> float:
    """The largest threshold in ``[lo, hi)`` found to fail `Windows.necessary` (``lo`` must fail or be 0).

    Bisection: ``necessary`` is monotone in ``T`` (every cap grows with ``T``). Returns ``lo`` if nothing above fails;
    past ``deadline`` (monotonic seconds) it stops with the largest failing threshold found so far, still a bound.
    """
    step = 1 / 64
    while hi > lo * (1 + rel_tol) and hi - lo > 0 and time.monotonic() < deadline:
        # Up from lo in doubling steps, then geometric: the bracket can span orders of magnitude (a poor start
        # plan), and a test far above the answer is slow (window tables as long as a node's run).
        mid = min(math.sqrt(lo) * math.sqrt(hi), lo * (1 + step)) if lo > 0 else hi / 2 if hi / 2 > 1e-300 else 0.0
        if mid <= lo or mid >= hi:
            break
        if w.necessary(mid):
            hi = mid
        else:
            lo, step = mid, step * 2
    return lo
