"""Stage costs when the fleet has a link table: a stage's transfers depend on its neighbours.

The costs of `williw.planner.costs` with each hop priced on the pair's link when the table lists the pair
(``costs.transfer_time(bytes, node, link)``): a stage on node ``v`` from block ``p`` to ``e`` after node ``u`` and
before node ``x`` costs ``amount / rate + receive(u → v) + send(v → x)``, where the first stage receives token ids
from the client and the last sends them back on its own link. Memory is unchanged. Every figure is summed in the
order of `costs.stage_times`, so a plan reports exactly the value the search optimised.

A hop's two sides are precomputed per listed pair: ``send(u, x)`` (on ``u``) and ``recv(u, x)`` (on ``x``); for an
unlisted pair they are the nodes' own-link figures, so a stage's incoming time depends on its predecessor only
when the pair is listed. ``in_class(u, v)`` names that dependence: ``u`` for a listed pair, `OWN` otherwise, and
`CLIENT` for the first stage.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence

from williw.fleet import Link, Node
from williw.planner.costs import PipelineModel, transfer_time
from williw.planner.pipeline import Stage, _Costs, _minimise

OWN = -1  # the hop is priced on the nodes' own links
CLIENT = -2  # the first stage's token ids from the client

Plan = tuple[Stage, ...]


class LinkCosts:
    """Stage fitting for one model, one candidate list, one objective and a link table (``latency`` prices as
    ``decode``, as in `pipeline._Costs`, whose memory, rates and amounts this reuses)."""

    def __init__(self, model: PipelineModel, nodes: Sequence[Node], objective: str,
                 table: dict[tuple[str, str], Link]) -> None:
        self.c = c = _Costs(model, nodes, objective)
        self.m = model
        self.nodes = nodes
        self.k = k = len(nodes)
        i = 1 if c.decode else 0
        hop, tok = model.hop_bytes[i], model.token_bytes[i]
        self.first_in = [transfer_time(tok, v) for v in nodes]
        self.last_out = [transfer_time(tok, v) for v in nodes]
        self.own = [transfer_time(hop, v) for v in nodes]  # either side of a hop between unlisted nodes
        index = {v.node_id: i for i, v in enumerate(nodes)}
        self.pair: dict[tuple[int, int], tuple[float, float]] = {}  # listed (u, x): (u's send, x's receive)
        for (a, b), link in table.items():
            if a in index and b in index:
                u, x = index[a], index[b]
                self.pair[u, x] = (transfer_time(hop, nodes[u], link), transfer_time(hop, nodes[x], link))
        self.neighbours = [sorted(x for u_, x in self.pair if u_ == u) for u in range(k)]
        self._mem_top: dict[int, int] = {}
        self._singles: list[tuple[list[float], list[int], int] | None] = [None] * k

    def linked(self, u: int, v: int) -> bool:
        return (u, v) in self.pair

    def in_class(self, u: int, v: int) -> int:
        return u if (u, v) in self.pair else OWN

    def send(self, u: int, x: int) -> float:
        """``u``'s side of the hop ``u → x``."""
        both = self.pair.get((u, x))
        return self.own[u] if both is None else both[0]

    def recv(self, u: int, x: int) -> float:
        """``x``'s side of the hop ``u → x``."""
        both = self.pair.get((u, x))
        return self.own[x] if both is None else both[1]

    def tin(self, cls: int, v: int) -> float:
        """``v``'s receive time after a predecessor of class ``cls``."""
        if cls == CLIENT:
            return self.first_in[v]
        return self.recv(cls, v) if cls >= 0 else self.own[v]

    def tout(self, v: int, x: int) -> float:
        """``v``'s send time to ``x`` (-1: the client, after the last stage)."""
        return self.last_out[v] if x < 0 else self.send(v, x)

    def cost(self, v: int, p: int, e: int, last: bool, tin: float, tout: float) -> float:
        return self.c.amount(p, e, last, v) / self.c.rate[v] + tin + tout

    def fits(self, v: int, p: int, e: int, last: bool, tin: float, tout: float, t: float) -> bool:
        return self.c.nbytes(p, e, last, v) <= self.c.mem[v] and self.cost(v, p, e, last, tin, tout) <= t

    def ext(self, v: int, p: int, tin: float, tout: float, t: float) -> int:
        """The end of the longest non-final run from ``p`` that fits ``v`` under ``t`` with these transfers (``p``
        if none); as `pipeline._Costs.ext`, non-decreasing in ``p``. Memory alone bounds the run at `mem_top`
        (runs nest), so only the cost is checked below it."""
        c = self.c
        top = self.mem_top(v, p)
        if t == float("inf"):
            return top
        rate, prefix = c.rate[v], c.pre[v]
        cap = (t - (tin + tout)) * rate  # an estimate; the exact predicate below decides
        first = c.amount(0, 0, False, v) if p == 0 else 0
        base = prefix[p]
        e = max(p, min(top, bisect_right(prefix, base - first + cap) - 1))
        # `cost` inlined (the same operations, so the same doubles): amount = prefix[e] - prefix[p] + first.
        while e < top and (prefix[e + 1] - base + first) / rate + tin + tout <= t:
            e += 1
        while e > p and (prefix[e] - base + first) / rate + tin + tout > t:
            e -= 1
        return e

    def mem_top(self, v: int, p: int) -> int:
        """The end of the longest non-final run from ``p`` that fits ``v``'s memory (any threshold)."""
        key = v * (self.m.n + 1) + p
        e = self._mem_top.get(key)
        if e is None:
            e = self._mem_top[key] = self.c.ext(v, p, float("inf"))
        return e

    def bad_mask(self, v: int, tin: float, tout: float, t: float) -> int:
        """Bits ``s >= 1`` of the blocks ``v`` cannot hold alone as a non-final stage with these transfers under
        ``t`` (always ``n - 1``: a non-final stage ends before the last block)."""
        if self._singles[v] is None:
            self._singles[v] = self._single_blocks(v)
        costs, suffix, memory = self._singles[v]  # type: ignore[misc]
        lo, hi = 0, len(costs)  # the first single block over t: the predicate is monotone in the sorted cost
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if costs[mid] + tin + tout > t else (mid + 1, hi)
        return memory | suffix[lo]

    def _single_blocks(self, v: int) -> tuple[list[float], list[int], int]:
        n, c = self.m.n, self.c
        memory = 1 << (n - 1)
        singles = []
        for s in range(1, n - 1):
            if c.nbytes(s, s + 1, False, v) > c.mem[v]:
                memory |= 1 << s
            singles.append((c.amount(s, s + 1, False, v) / c.rate[v], s))
        singles.sort()
        suffix = [0] * (len(singles) + 1)  # suffix[i]: the bits of singles[i:]
        for i in range(len(singles) - 1, -1, -1):
            suffix[i] = suffix[i + 1] | 1 << singles[i][1]
        return [q for q, _ in singles], suffix, memory

    def stage_costs(self, plan: Plan) -> list[float]:
        """Each stage's cost in ``plan``, its neighbours' links included."""
        n = self.m.n
        out = []
        for j, s in enumerate(plan):
            tin = self.first_in[s.node] if j == 0 else self.recv(plan[j - 1].node, s.node)
            tout = self.tout(s.node, plan[j + 1].node if j + 1 < len(plan) else -1)
            out.append(self.cost(s.node, s.start, s.end, s.end == n, tin, tout))
        return out

    def bottleneck(self, plan: Plan) -> float:
        return max(self.stage_costs(plan))

    def candidates(self, lo: float, hi: float) -> list[float]:
        """Every stage cost in ``(lo, hi]`` over every node, run, predecessor and successor: the optimum is one."""
        c, n = self.c, self.m.n
        out = set()
        for v in range(self.k):
            rate, prefix = c.rate[v], c.pre[v]
            ins = sorted({self.own[v], *(self.recv(u, v) for u in self.neighbours[v])})  # a superset is harmless
            outs = sorted({self.own[v], *(self.send(v, x) for x in self.neighbours[v])})
            for p in range(n):
                for tin in ([self.first_in[v]] if p == 0 else ins):
                    t = self.cost(v, p, n, True, tin, self.last_out[v])
                    if lo < t <= hi:
                        out.add(t)
                    base = prefix[p] - (c.amount(0, 0, False, v) if p == 0 else 0)
                    for tout in outs:
                        hop = tin + tout  # a non-final stage: amount = (cost - hop) · rate
                        a = max(p + 1, bisect_right(prefix, base + (lo - hop) * rate) - 2)
                        b = min(n - 1, bisect_right(prefix, base + (hi - hop) * rate) + 1)
                        for e in range(a, b + 1):
                            t = self.cost(v, p, e, False, tin, tout)
                            if lo < t <= hi:
                                out.add(t)
        return sorted(out)


def minimise(lc: LinkCosts, feasible: Callable[[float], Plan | None], lower: float, rel_tol: float = 0.0,
             start: Plan | None = None) -> Plan | None:
    """Smallest threshold at which ``feasible`` finds a plan: `pipeline._minimise` over `LinkCosts.candidates`."""
    return _minimise(lc, feasible, lower, rel_tol, start)
