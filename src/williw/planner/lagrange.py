"""A position-aware bound for the branch and bound: node prices and the cheapest pipeline with reuse allowed.

Give every node a price ``μ_v >= 0``. A plan at threshold ``T`` that covers the blocks ``[p, n)`` with free nodes
``R`` uses each node once, so its total price is at most ``Σ_{v in R} μ_v``; and it is one of the pipelines in
which a node may appear any number of times. So with ``f(p)`` the cheapest such pipeline from ``p`` (every stage
its node's longest run, the last one finishing), ``f(p) > Σ_{v in R} μ_v`` proves the state infeasible. ``f`` is
one backward pass over ``p``, and holds for every state at once. This is the Lagrangian relaxation of "each node
at most once" (Fisher 1981, "The Lagrangian relaxation method for solving integer programming problems"); the
prices are improved by projected subgradient steps (Held, Wolfe and Crowder 1974): a node used more than once by
the cheapest pipeline becomes dearer, an unused one cheaper.
"""

from __future__ import annotations

from collections.abc import Callable

INF = float("inf")


def cheapest(mu: list[float], ext: list[list[int]], fin: list[int], n: int) -> tuple[list[float], list[int]]:
    """``f[p]`` for ``p`` in ``0..n`` (``f[n]`` unused) and the node each best pipeline starts with.

    ``ext[v][p]``: end of ``v``'s longest non-final run from ``p``; ``fin[v]``: first ``p >= 1`` from which ``v``
    can finish (``n`` if none). ``p = 0`` as a finishing start (one stage for all) is left to the caller.
    """
    k = len(mu)
    f = [INF] * (n + 1)
    first = [-1] * (n + 1)
    for p in range(n - 1, 0, -1):
        best, who = INF, -1
        for v in range(k):
            m = mu[v]
            if fin[v] <= p:
                if m < best:
                    best, who = m, v
            else:
                e = ext[v][p]
                if e > p:
                    x = m + f[e]
                    if x < best:
                        best, who = x, v
        f[p], first[p] = best, who
    best, who = INF, -1
    for v in range(k):
        e = ext[v][0]
        if e > 0 and mu[v] + f[e] < best:
            best, who = mu[v] + f[e], v
    f[0], first[0] = best, who
    return f, first


def prices(ext: list[list[int]], fin: list[int], n: int, rounds: int,
           out_of_time: Callable[[], bool]) -> list[tuple[list[float], list[float]]]:
    """Price vectors and their ``f``, best first (by ``f[0] - Σ μ``), after up to ``rounds`` subgradient steps.

    Starts from each node's longest run (the count bound's prices).
    """
    k = len(ext)
    mu = [float(max(max((e - p for p, e in enumerate(ext[v][:n])), default=0), n - fin[v] if fin[v] < n else 0))
          for v in range(k)]
    kept: list[tuple[float, list[float], list[float]]] = []
    for _ in range(rounds):
        f, first = cheapest(mu, ext, fin, n)
        total = sum(mu)
        kept.append((f[0] - total, mu, f))
        if f[0] > total * (1 + 1e-9) or f[0] == INF or out_of_time():
            break
        uses = [0] * k
        p = 0
        while p < n and first[p] >= 0:
            v = first[p]
            uses[v] += 1
            p = n if fin[v] <= p else ext[v][p]
        # Polyak's step towards a certificate, f(0) - Σ μ a little above 0: (target - value) / |subgradient|²
        norm = sum((u - 1) ** 2 for u in uses)
        if norm == 0:
            break
        step = (total - f[0] + 1e-3 * total / k) / norm
        mu = [max(0.0, m + step * (u - 1)) for m, u in zip(mu, uses, strict=True)]
    kept.sort(key=lambda x: -x[0])
    return [(mu, f) for _, mu, f in kept[:3]]
