"""Where only counts matter: the end of a model made of identical blocks.

Inside the model's last run of identical blocks a run's cost and memory depend on its position only through
rounding, so from a cut ``p >= 1`` there the free nodes' longest middle runs (their counts) and the best last stage
decide whether the rest can be covered: no branching over orders (`branch._dfs` calls this at every such state).
"""

from __future__ import annotations

from collections.abc import Callable

from williw.planner.bound import SLACK
from williw.planner.pipeline import Stage, _Costs


def first_finish(c: _Costs, v: int, t: float) -> int:
    """The first ``p >= 1`` from which ``v`` can hold ``[p, n)`` and the last group (``n`` if none)."""
    n = c.m.n
    lo, hi = 1, n  # finish(v, p) is monotone for p >= 1: the runs nest
    while lo < hi:
        mid = (lo + hi) // 2
        if c.finish(v, mid, t):
            hi = mid
        else:
            lo = mid + 1
    return lo


class CountingClose:
    """At threshold ``t``, with the search's exact ``ext(v, p)`` (memoised) and first-finish table ``fin``."""

    def __init__(self, c: _Costs, t: float, ext: Callable[[int, int], int], fin: list[int]) -> None:
        self.c, self.t, self.ext, self.fin = c, t, ext, fin
        self.loose = t * (1 + SLACK)
        self.loose_ext: dict[int, int] = {}
        self.loose_fin: dict[int, int] = {}

    def _ext_loose(self, u: int, q: int) -> int:
        key = u * (self.c.m.n + 1) + q
        if key not in self.loose_ext:
            self.loose_ext[key] = self.c.ext(u, q, self.loose)
        return self.loose_ext[key]

    def _fin_loose(self, u: int) -> int:
        if u not in self.loose_fin:
            self.loose_fin[u] = first_finish(self.c, u, self.loose)
        return self.loose_fin[u]

    def _counts(self, p: int, used: int, ext_of, fin_of) -> tuple[int, int, int, dict[int, int]]:
        """Blocks of [p, n) the free nodes hold as middle stages (summed), the most one of them adds by being the
        last stage instead (below 0 when the last group costs it blocks), that node (-1 if none can finish),
        and the counts."""
        n = self.c.m.n
        held, gain, last, cnt = 0, 0, -1, {}
        for u in range(len(self.c.nodes)):
            if not used >> u & 1:
                cnt[u] = ext_of(u, p) - p
                held += cnt[u]
                finish = n - max(p, fin_of(u))
                if finish >= 1 and (last < 0 or finish - cnt[u] > gain):
                    gain, last = finish - cnt[u], u
        return held, gain, last, cnt

    def __call__(self, p: int, used: int) -> tuple[Stage, ...] | None | bool:
        """Stages for [p, n) with the nodes not in ``used`` (a bit mask); None when even at ``t · (1 + SLACK)``
        they fall short (a proof); False when undecided (rounding between positions)."""
        c, t, n = self.c, self.t, self.c.m.n
        held, gain, last, _ = self._counts(p, used, self._ext_loose, self._fin_loose)
        if last < 0 or held + gain < n - p:  # no free node can be the last stage, or too few blocks held
            return None
        held, gain, last, cnt = self._counts(p, used, self.ext, self.fin.__getitem__)
        if last < 0 or held + gain < n - p:
            return False
        split = max(p, self.fin[last])  # the last stage holds [split, n); the others cover [p, split)
        stages, q = [], p
        for u in sorted((u for u in cnt if u != last and cnt[u] > 0), key=lambda u: (-cnt[u], u)):
            if q >= split:
                break
            e = min(q + cnt[u], split)
            if not c.fits(u, q, e, False, t):
                return False
            stages.append(Stage(u, q, e))
            q = e
        if q < split or not c.finish(last, q, t):
            return False
        return (*stages, Stage(last, q, n))
