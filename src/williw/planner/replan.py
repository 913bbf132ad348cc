"""Re-planning when nodes leave or join: a plan almost as fast as the best one that moves the fewest bytes.

Megaphone (Hoffmann et al., VLDB 2019) in the weights' setting: when the fleet changes, move as little state as
possible. The best bottleneck ``T*`` for the new fleet is `make_plan`'s; the re-plan is, among all pipeline
plans whose every stage takes at most ``B = (1 + max_slowdown) · T*``, one that moves the fewest bytes: a node
pulls every tensor of its new stage that it does not hold now (a tensor that stays put costs nothing; a node
that left holds nothing). Ties go to the lower bottleneck.

Search. Feasible stages are ``(v, [p, e))`` with ``time ≤ B`` and ``bytes ≤ memory``; for each ``(v, p)`` they
are the ``e`` up to some limit (costs and bytes only grow with ``e``). The cost is additive over stages, so:

* **exact**, while ``2^k · (n + 1)`` states fit `EXACT_MAX_STATES` (``k`` candidate nodes, ``n`` blocks): a DP
  over (set of nodes used, blocks covered), the same state space as the bottleneck search in `pipeline`, keeping
  for each state the lexicographically least (bytes moved, bottleneck so far), which is monotone under adding a
  stage, so the optimum is exact over every node subset, order and cut;
* **heuristic** beyond that: the same DP along fixed node orders (a node may be skipped, not reordered): the
  fresh plan's order, so the re-plan never moves more than the fresh plan, and the nodes sorted by where their
  weights sit now. The result reports ``moved_lower_bound`` (bytes no live node holds: someone pulls them).

For the ``latency`` objective the bound is on the plan's summed decode cost, ``(1 + max_slowdown) · L*``, and the
search keeps Pareto fronts instead of one pair per state (`replan_latency`), exact while ``2^k · k · (n + 1)^2``
fits its `EXACT_MAX_WORK`. Every figure named ``bottleneck`` is then that sum (as ``Plan.bottleneck_s`` is), and
``T*`` is the fresh plan's sum added stage by stage, as the search adds (it may differ from ``fresh_plan``'s
``math.fsum`` in the last bit).

The workload is the current plan's (``@plan.batch_size`` and ``context_length``, when it records them): a
re-plan must hold the same KV cache as the plan it replaces.

When make_plan itself is heuristic (large fleets), ``T*`` is its bottleneck, not a proven optimum.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from williw.errors import PlanError
from williw.fleet import Node
from williw.metadata import ModelMetadata
from williw.planner.costs import OBJECTIVES, PipelineModel, pipeline_model, stage_times, usable_bytes
from williw.planner.formats import search_precision
from williw.planner.make import _assemble, make_plan
from williw.planner.migrate import MigrationSchedule, bytes_to_move, check_step_bytes, holdings, migration_schedule
from williw.planner.pipeline import Stage, _Costs, lower_bound
from williw.planner.plan import ExcludedNode, Plan
from williw.planner.replan_latency import latency_replan, summed_cost
from williw.planner.validate import validate_split_plan
from williw.units import format_seconds

# 2^14 node subsets x 23 block positions (377k states) take 0.2-0.8 s in CPython on the 1.1B Llama when no node
# holds anything yet (nothing to prune); measured beside bench/replan.py.
EXACT_MAX_STATES = 1 << 19


@dataclass(frozen=True)
class Replan:
    """A re-plan and how it compares with planning from scratch.

    Attributes:
        plan: the new plan; ``version`` is the current one's + 1, ``@plan.replan`` records the figures below.
        migration: the steps from the current plan to ``plan``.
        bytes_moved: bytes the nodes pull to hold ``plan``.
        fresh_plan: `make_plan`'s optimum for the new fleet, the bottleneck reference.
        fresh_bytes_moved: bytes the nodes would pull to hold ``fresh_plan`` instead.
        best_bottleneck_s: ``fresh_plan``'s bottleneck, ``T*``.
        bound_s: ``(1 + max_slowdown) · T*``: no stage of ``plan`` is slower.
        bottleneck_before_s: the current plan's bottleneck on the new fleet, None when it no longer runs there
            (a node left, or it does not fit).
        bottleneck_after_s: ``plan``'s bottleneck.
        exact: True when no plan within the bound moves fewer bytes (the search was exhaustive).
        moved_lower_bound: bytes of tensors no live node holds; every plan moves at least these.
        departed: nodes of the current plan missing from the fleet.
        joined: fleet nodes the current plan does not use.
    """

    plan: Plan
    migration: MigrationSchedule
    bytes_moved: int
    fresh_plan: Plan
    fresh_bytes_moved: int
    best_bottleneck_s: float
    bound_s: float
    bottleneck_before_s: float | None
    bottleneck_after_s: float
    exact: bool
    moved_lower_bound: int
    departed: tuple[str, ...] = ()
    joined: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        """The figures, JSON-ready (without the plans and the steps)."""
        return {"version": self.plan.version, "bytes_moved": self.bytes_moved,
                "fresh_bytes_moved": self.fresh_bytes_moved, "moved_lower_bound": self.moved_lower_bound,
                "exact": self.exact, "best_bottleneck_s": self.best_bottleneck_s, "bound_s": self.bound_s,
                "bottleneck_before_s": self.bottleneck_before_s, "bottleneck_after_s": self.bottleneck_after_s,
                "stages": list(self.plan.node_ids), "departed": list(self.departed), "joined": list(self.joined),
                "steps": len(self.migration.steps), "peer_bytes": self.migration.peer_bytes}


def replan(metadata: ModelMetadata, current_plan: Plan, nodes: Sequence[Node], max_slowdown: float = 0.05,
           objective: str | None = None, max_step_bytes: int | None = None, *, batch_size: int | None = None,
           context_length: int | None = None) -> Replan:
    """Re-plan ``current_plan`` for the fleet ``nodes``, moving as few bytes as the bottleneck bound allows.

    Args:
        metadata: the model.
        current_plan: the plan in force (any strategy); its nodes missing from ``nodes`` have left.
        nodes: the fleet now.
        max_slowdown: how much slower than the best plan for ``nodes`` the re-plan may be (0.05: 5%); for
            ``latency``, how much more its seconds per token may be.
        objective: ``prefill``, ``decode`` or ``latency``; by default the current plan's.
        max_step_bytes: the most bytes one migration pull step carries (None: no limit).
        batch_size, context_length: the workload (`make_plan`'s); by default the current plan's, else the
            metadata's.

    Returns:
        The new pipeline plan (version + 1), its migration schedule and the comparison with a fresh plan.

    Raises:
        PlanError: a bad argument, or a current plan naming tensors the model does not have.
        InfeasiblePlan: no plan fits the new fleet (the message is `make_plan`'s).
    """
    if isinstance(max_slowdown, bool) or not isinstance(max_slowdown, int | float) \
            or not math.isfinite(max_slowdown) or max_slowdown < 0:
        raise PlanError(f"max_slowdown must be a finite number >= 0 (0.05 = 5% slower), got {max_slowdown!r}")
    check_step_bytes(max_step_bytes)
    objective = objective or (current_plan.objective if current_plan.objective in OBJECTIVES else "prefill")
    # The plan's recorded workload: null or a positive integer (`plan.check_head` refuses anything else).
    batch_size = batch_size or current_plan.extra.get("batch_size")
    context_length = context_length or current_plan.extra.get("context_length")
    known = {x.name for x in metadata.layers}
    for a in current_plan.assignments:
        unknown = next((t for t in a.tensor_names if t not in known), None)
        if unknown is not None:
            raise PlanError(f"the current plan's node '{a.node_id}' holds '{unknown}', which the model "
                            f"'{metadata.model_name}' does not have: the plan is for another model")
    # Also checks the fleet, the objective and the workload.
    fresh = make_plan(metadata, nodes, objective=objective, batch_size=batch_size, context_length=context_length)
    best = fresh.bottleneck_s or 0.0
    bound = best * (1 + max_slowdown)
    live = {v.node_id for v in nodes}
    held = holdings(current_plan, live)
    fresh_moved = bytes_to_move(metadata, held, fresh)
    model = pipeline_model(metadata, batch_size, context_length)
    # Every node make_plan could use (it also drops dominated nodes, but a dominated node may hold weights now).
    candidates = [v for v in nodes
                  if v.memory_bytes >= min(model.at(search_precision(model, v)).block_bytes, default=0)
                  and (objective == "prefill" or v.memory_bandwidth_gbps is not None)]
    usable = {v.node_id for v in candidates}
    search = _Search(metadata, model, candidates, objective, bound, held)
    position = {b: i for i, b in enumerate(model.block_index)}
    gaps = [(position[a.blocks[0]] + position[a.blocks[1] - 1]) / 2 for a in current_plan.assignments
            if a.node_id not in live and a.blocks and a.blocks[0] in position and a.blocks[1] - 1 in position]
    if objective == "latency" and model.n:
        costs = _Costs(model, candidates, objective)
        fresh_stages = _stages_of(model, fresh, [v.node_id for v in candidates])
        best = summed_cost(costs, fresh_stages)  # as the search adds costs: the fresh plan meets exactly L*
        bound = best * (1 + max_slowdown)
        found = latency_replan(costs, search.moved, search.must_pull, search.twins(), search.orders(fresh, gaps),
                               bound, fresh_moved)
        stages, exact = found or (fresh_stages, False)
    else:
        stages, exact = search.run(fresh, fresh_moved, gaps)
    plan_nodes = [candidates[s.node] for s in stages]
    plan = _assemble(metadata, model, stages, plan_nodes, objective, exact,
                     lower_bound(model, candidates, objective), [])
    used = set(plan.node_ids)
    excluded = [e for e in fresh.excluded if e.node_id not in usable]
    figure = "seconds per token" if objective == "latency" else "bottleneck"
    excluded += [ExcludedNode(v.node_id, f"not used: the plan moving the fewest bytes within {max_slowdown:.0%} of "
                                         f"the best {figure} ({format_seconds(best)}) does without it")
                 for v in candidates if v.node_id not in used]
    moved = bytes_to_move(metadata, held, plan)
    record = {"from_version": current_plan.version, "from_digest": current_plan.digest(),
              "max_slowdown": max_slowdown, "best_bottleneck_s": best, "bound_s": bound, "bytes_moved": moved,
              "fresh_bytes_moved": fresh_moved}
    plan = Plan(**{**plan.__dict__, "excluded": tuple(excluded), "version": current_plan.version + 1,
                   "extra": {**plan.extra, "replan": record}})
    size = {x.name: x.bytes for x in metadata.layers}
    anywhere = set().union(*held.values()) if held else set()
    return Replan(plan=plan, migration=migration_schedule(metadata, current_plan, plan, nodes, max_step_bytes),
                  bytes_moved=moved, fresh_plan=fresh, fresh_bytes_moved=fresh_moved, best_bottleneck_s=best,
                  bound_s=bound, bottleneck_before_s=_before(metadata, model, current_plan, nodes, objective),
                  bottleneck_after_s=plan.bottleneck_s or 0.0, exact=exact,
                  moved_lower_bound=sum(b for t, b in size.items() if t not in anywhere),
                  departed=tuple(u for u in current_plan.node_ids if u not in live),
                  joined=tuple(v.node_id for v in nodes if v.node_id not in current_plan.node_ids))


def _stages_of(model: PipelineModel, plan: Plan, candidates: list[str]) -> tuple[Stage, ...]:
    """A pipeline plan of this model as stages over ``candidates`` (node ids)."""
    position = {b: i for i, b in enumerate(model.block_index)}
    return tuple(Stage(candidates.index(a.node_id), position[a.blocks[0]], position[a.blocks[1] - 1] + 1)
                 for a in plan.assignments if a.blocks is not None)


def _before(meta: ModelMetadata, model: PipelineModel, plan: Plan, nodes: Sequence[Node],
            objective: str) -> float | None:
    """The current plan's bottleneck on the new fleet's nodes, if it is a pipeline plan that still runs there."""
    fleet = {v.node_id: v for v in nodes}
    if plan.strategy != "pipeline" or any(u not in fleet for u in plan.node_ids):
        return None
    if validate_split_plan([x.name for x in meta.layers], plan, metadata=meta, nodes=nodes):
        return None
    position = {b: i for i, b in enumerate(model.block_index)}
    times = []
    for a in plan.assignments:
        if a.blocks is None or a.blocks[1] <= a.blocks[0]:
            if model.n:
                return None  # a stage without blocks: not a plan this planner makes
            p = e = 0
        else:
            p, e = position[a.blocks[0]], position[a.blocks[1] - 1] + 1
        times.append(_time(model.at(a.precision), fleet[a.node_id], p, e, objective))
    return math.fsum(times) if objective == "latency" else max(times)


def _time(model: PipelineModel, v: Node, p: int, e: int, objective: str) -> float:
    # The same expressions make._assemble reports, so a stage of the fresh plan meets a bound of exactly T*.
    pre, dec = stage_times(model, p, e, v)
    return pre if objective == "prefill" else dec  # type: ignore[return-value]


class _Search:
    """Feasible stages under the bound, what each costs in moved bytes, and the two searches over them."""

    def __init__(self, meta: ModelMetadata, model: PipelineModel, nodes: Sequence[Node], objective: str,
                 bound: float, held: dict[str, frozenset[str]]) -> None:
        self.m, self.nodes, self.objective, self.bound = model, nodes, objective, bound
        self.ms = [model.at(search_precision(model, v)) for v in nodes]  # each node's bytes (`formats`)
        size = {x.name: x.bytes for x in meta.layers}
        n = model.n
        self.pb = list(accumulate((sum(size[t] for t in model.block_names[i]) for i in range(n)), initial=0))
        self.first = sum(size[t] for t in model.first_names)
        self.last = sum(size[t] for t in model.last_names)
        self.rep = size[model.replica] if model.replica else 0
        self.kept = []  # per node: (block prefix sums, first, last, replica) of the bytes it holds now
        for v in nodes:
            h = held.get(v.node_id, frozenset())
            own = lambda names, h=h: sum(size[t] for t in names if t in h)  # noqa: E731
            self.kept.append((list(accumulate((own(model.block_names[i]) for i in range(n)), initial=0)),
                              own(model.first_names), own(model.last_names),
                              own((model.replica,)) if model.replica else 0))
        self.holds = [bool(held.get(v.node_id)) for v in nodes]
        # Bytes of blocks [p, n) and the last group that no candidate holds: someone pulls them (a bound for pruning).
        anywhere = set().union(*(held.get(v.node_id, frozenset()) for v in nodes))
        nowhere = lambda names: sum(size[t] for t in names if t not in anywhere)  # noqa: E731
        self.unheld = list(accumulate((nowhere(model.block_names[i]) for i in range(n)), initial=0))
        self.unheld_last = nowhere(model.last_names)
        self._opts: dict[tuple[int, int], list[tuple[int, int, float]]] = {}

    def moved(self, v: int, p: int, e: int) -> int:
        kb, kf, kl, kr = self.kept[v]
        out = self.pb[e] - self.pb[p] - (kb[e] - kb[p])
        if p == 0:
            out += self.first - kf
        if e == self.m.n:
            out += self.last - kl + (self.rep - kr if p > 0 else 0)
        return out

    def must_pull(self, p: int) -> int:
        """Bytes every plan pulls for blocks ``[p, n)`` and the last group, whoever holds them."""
        return self.unheld[-1] - self.unheld[p] + self.unheld_last

    def options(self, v: int, p: int) -> list[tuple[int, int, float]]:
        """(end, moved bytes, time) of every stage from ``p`` that node ``v`` can run under the bound."""
        key = (v, p)
        if key not in self._opts:
            out = []
            node, n, m = self.nodes[v], self.m.n, self.ms[v]
            for e in range(p + 1, n + 1):
                t = _time(m, node, p, e, self.objective)
                if t > self.bound or m.stage_memory(p, e) > usable_bytes(node):
                    break  # time and bytes only grow with e
                out.append((e, self.moved(v, p, e), t))
            self._opts[key] = out
        return self._opts[key]

    def run(self, fresh: Plan, fresh_moved: int, gaps: Sequence[float] = ()) -> tuple[tuple[Stage, ...], bool]:
        n = self.m.n
        if n == 0:  # no blocks: one node holds everything; the fewest bytes to pull among those fast enough
            fits = [(self.moved(v, 0, 0), _time(self.ms[v], self.nodes[v], 0, 0, self.objective), v)
                    for v in range(len(self.nodes)) if self.ms[v].stage_memory(0, 0) <= usable_bytes(self.nodes[v])
                    and _time(self.ms[v], self.nodes[v], 0, 0, self.objective) <= self.bound]
            return (Stage(min(fits)[2], 0, 0),), True
        if (1 << len(self.nodes)) * (n + 1) <= EXACT_MAX_STATES:
            return self._exact(fresh_moved), True
        found = [self._ordered(o) for o in self.orders(fresh, gaps)]
        return min((f for f in found if f is not None), key=lambda f: f[0])[1], False

    def orders(self, fresh: Plan, gaps: Sequence[float] = ()) -> list[list[int]]:
        """The heuristic's node orders: the fresh plan's; the nodes holding weights by where their weights sit, the
        others (fastest first) after them, before them, and at each of ``gaps`` (where departed stages sat)."""
        index = {v.node_id: i for i, v in enumerate(self.nodes)}
        where, rest = [], []
        for v in range(len(self.nodes)):
            kb = self.kept[v][0]
            ends = [i for i in range(self.m.n) if kb[i + 1] > kb[i]]
            if ends:
                where.append(((ends[0] + ends[-1]) / 2, v))
            else:
                rest.append((-self.nodes[v].compute_tflops, -usable_bytes(self.nodes[v]), v))
        where.sort()
        others = [v for *_, v in sorted(rest)]
        out = [[index[u] for u in fresh.node_ids]]
        for g in (math.inf, -math.inf, *sorted(set(gaps))):
            order = [v for m, v in where if m < g] + others + [v for m, v in where if m >= g]
            if order not in out:
                out.append(order)
        return out

    def twins(self) -> list[int]:
        """Per node, an earlier node it is interchangeable with (-1: none): both hold nothing now and have the same
        speed and memory, so a plan using the later maps onto one using the earlier at the same cost."""
        k = len(self.nodes)
        twin = [-1] * k
        for v in range(k):
            for u in range(v):
                a, b = self.nodes[u], self.nodes[v]
                if not self.holds[u] and not self.holds[v] and dataclasses.replace(a, node_id="") == \
                        dataclasses.replace(b, node_id="", labels=a.labels):
                    twin[v] = u
        return twin

    def _exact(self, upper: int) -> tuple[Stage, ...]:
        k, n = len(self.nodes), self.m.n
        twin = self.twins()  # use interchangeable nodes in list order
        dp: list[dict[int, tuple[int, float]]] = [{} for _ in range(1 << k)]
        back: dict[tuple[int, int], tuple[int, int, int]] = {}
        dp[0][0] = (0, 0.0)
        done: list[tuple[int, float, int, int]] = []
        for s in range(1 << k):
            for p, (moved, worst) in dp[s].items():
                if p == n:
                    done.append((moved, worst, s.bit_count(), s))
                    continue
                for v in range(k):
                    if s >> v & 1 or (twin[v] >= 0 and not s >> twin[v] & 1):
                        continue
                    nxt = s | 1 << v
                    for e, cost, t in self.options(v, p):
                        key = (moved + cost, max(worst, t))
                        if key[0] > upper:  # the fresh plan already does this well
                            continue
                        cur = dp[nxt].get(e)
                        if cur is None or key < cur:
                            dp[nxt][e] = key
                            back[(nxt, e)] = (s, p, v)
        *_, s = min(done)
        stages = []
        p = n
        while s:
            prev, start, v = back[(s, p)]
            stages.append(Stage(v, start, p))
            s, p = prev, start
        return tuple(reversed(stages))

    def _ordered(self, order: list[int]) -> tuple[tuple[int, float], tuple[Stage, ...]] | None:
        n = self.m.n
        dp: dict[int, tuple[tuple[int, float], tuple[Stage, ...]]] = {0: ((0, 0.0), ())}
        for v in order:
            nxt = dict(dp)
            for p, ((moved, worst), stages) in dp.items():
                if p == n:
                    continue
                for e, cost, t in self.options(v, p):
                    key = (moved + cost, max(worst, t))
                    if e not in nxt or key < nxt[e][0]:
                        nxt[e] = (key, (*stages, Stage(v, p, e)))
            dp = nxt
        return dp.get(n)
