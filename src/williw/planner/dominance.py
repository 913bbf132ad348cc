"""Dominance pruning: with ``n`` blocks a plan uses at most ``n`` nodes, so a node that ``n`` others weakly
dominate (at least as fast, as much memory, as good a link) can be swapped out of any plan without loss."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from williw.fleet import Node
from williw.planner.costs import usable_bytes

DOMINANCE_BUDGET = 3_000_000  # node comparisons `dominated` may make when nodes differ in their links (~1 s)


def dominated(nodes: Sequence[Node], limit: int, objective: str,
              key: Callable[[Node], Hashable] | None = None) -> list[int]:
    """Indices of nodes that at least ``limit`` others weakly dominate in (rate, usable memory, and link: latency
    and 1 / network_gbps, when nodes differ in them); ties are broken by list order, so of identical nodes the
    earlier ones count as dominating the later ones. With ``key`` (the precisions a node accepts), only nodes of
    the same key compare: their bytes are alike, others' may be fewer."""
    if limit <= 0 or len(nodes) <= limit:
        return []
    if key is not None:
        groups: dict[Hashable, list[int]] = {}
        for i, v in enumerate(nodes):
            groups.setdefault(key(v), []).append(i)
        if len(groups) > 1:
            return sorted(g[j] for g in groups.values() for j in dominated([nodes[i] for i in g], limit, objective))

    def rate(v: Node) -> float:
        return (v.memory_bandwidth_gbps or 0.0) if objective != "prefill" else v.compute_tflops

    def link(v: Node) -> tuple[float, float]:
        return v.latency_ms or 0.0, 1.0 / v.network_gbps if v.network_gbps else 0.0

    mem = [usable_bytes(v) for v in nodes]
    if len({link(v) for v in nodes}) > 1:  # four criteria
        return _dominated_by_keys([(rate(v), m, -link(v)[0], -link(v)[1]) for v, m in zip(nodes, mem, strict=True)],
                                  limit)
    order = sorted(range(len(nodes)), key=lambda i: (-rate(nodes[i]), -mem[i], i))
    mems = sorted(set(mem), reverse=True)
    rank = {m: i + 1 for i, m in enumerate(mems)}  # 1 = largest memory
    tree = [0] * (len(mems) + 1)  # Fenwick tree: how many processed nodes have memory rank <= r
    out = []
    for i in order:
        r = rank[mem[i]]
        count, j = 0, r
        while j > 0:
            count += tree[j]
            j -= j & -j
        if count >= limit:
            out.append(i)
        j = r
        while j < len(tree):
            tree[j] += 1
            j += j & -j
    return sorted(out)


def _dominated_by_keys(keys: list[tuple[float, int, float, float]], limit: int) -> list[int]:
    """`dominated` on four criteria. A node's dominators come before it in descending key order (componentwise >=
    implies lexicographically >=; equal keys keep list order), so each node scans only that prefix and stops at
    ``limit``; all of it stops after DOMINANCE_BUDGET comparisons (pairwise it is O(k²): 9 s for 2,000 nodes), and
    a node left undecided is kept, which costs the search time, never a plan."""
    order = sorted(range(len(keys)), key=lambda i: (*(-x for x in keys[i]), i))
    out, spent = [], 0
    for pos, i in enumerate(order):
        r, m, lat, net = keys[i]
        count = q = 0
        while q < pos and count < limit:
            b = keys[order[q]]
            count += b[0] >= r and b[1] >= m and b[2] >= lat and b[3] >= net
            q += 1
        if count >= limit:
            out.append(i)
        spent += q
        if spent > DOMINANCE_BUDGET:
            break
    return sorted(out)
