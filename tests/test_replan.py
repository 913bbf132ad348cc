"""The re-plan moves the fewest bytes of any plan within the bottleneck bound: exhaustive searches on random
fleets with one node removed or added; and fixed cases for the figures it reports."""

from __future__ import annotations

import itertools
from functools import lru_cache

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from test_planner_pipeline import build_meta, instances, stage_cost
from williw.errors import InfeasiblePlan, PlanError
from williw.fleet import Node
from williw.metadata import ModelMetadata
from williw.planner import Plan, make_plan, replan, validate_split_plan


def stage_tensors(meta: ModelMetadata, p: int, e: int) -> set[str]:
    """Everything a stage holding blocks [p, e) stores, from the plan format's definitions."""
    n = len(meta.blocks)
    out = {x.name for x in meta.layers if x.block is not None and p <= x.block < e}
    if p == 0:
        out |= {x.name for x in meta.layers if x.placement == "first"}
    if e == n:
        out |= {x.name for x in meta.layers if x.placement == "last"}
        if meta.tied_lm_head and p > 0:
            out.add(meta.tied_lm_head.tensor)
    return out


def held_now(plan: Plan, nodes: list[Node]) -> dict[str, set[str]]:
    live = {v.node_id for v in nodes}
    return {a.node_id: set(a.tensor_names) for a in plan.assignments if a.node_id in live}


def moved(meta: ModelMetadata, held: dict[str, set[str]], plan: Plan) -> int:
    size = {x.name: x.bytes for x in meta.layers}
    return sum(size[t] for a in plan.assignments for t in set(a.tensor_names) - held.get(a.node_id, set()))


def fewest_bytes(meta: ModelMetadata, nodes: list[Node], held: dict[str, set[str]], bound: float, objective: str,
                 allowed=lambda v, p, e: True) -> tuple[int, float] | None:
    """min over ordered node subsets and cuts, within the bound, of (bytes moved, bottleneck); memoised."""
    n = len(meta.blocks)
    size = {x.name: x.bytes for x in meta.layers}
    usable = [v for v in nodes if objective == "prefill" or v.memory_bandwidth_gbps is not None]

    @lru_cache(maxsize=None)
    def best(p: int, used: frozenset[str]) -> tuple[int, float] | None:
        out = None
        for v in usable:
            if v.node_id in used:
                continue
            for e in range(p + 1, n + 1):
                t, b = stage_cost(meta, v, p, e, objective)
                if b > v.memory_bytes or t > bound or not allowed(v, p, e):
                    continue
                rest = (0, 0.0) if e == n else best(e, used | {v.node_id})
                if rest is None:
                    continue
                cost = sum(size[x] for x in stage_tensors(meta, p, e) - held.get(v.node_id, set()))
                cand = (cost + rest[0], max(t, rest[1]))
                out = cand if out is None else min(out, cand)
        return out

    return best(0, frozenset())


def literal_fewest_bytes(meta: ModelMetadata, nodes: list[Node], held: dict[str, set[str]], bound: float,
                         objective: str) -> tuple[int, float] | None:
    """Every ordered node subset times every composition of the blocks, spelled out."""
    n = len(meta.blocks)
    size = {x.name: x.bytes for x in meta.layers}
    out = None
    for k in range(1, min(n, len(nodes)) + 1):
        for order in itertools.permutations(nodes, k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = (0, *cuts, n)
                stages = [(v, bounds[j], bounds[j + 1]) for j, v in enumerate(order)]
                costs = [stage_cost(meta, v, p, e, objective) for v, p, e in stages]
                if any(b > v.memory_bytes or t > bound for (t, b), v in zip(costs, order, strict=True)):
                    continue
                cost = sum(size[x] for v, p, e in stages for x in stage_tensors(meta, p, e) - held.get(v.node_id,
                                                                                                         set()))
                cand = (cost, max(t for t, _ in costs))
                out = cand if out is None else min(out, cand)
    return out


def leave_or_join(draw, current: Plan, nodes: list[Node], newcomer) -> list[Node]:
    """The fleet after one of ``current``'s nodes left (when it has two or more) or ``newcomer()`` joined."""
    if draw(st.booleans()) and len(current.assignments) > 1:
        gone = draw(st.sampled_from(current.node_ids))
        return [v for v in nodes if v.node_id != gone]
    return [*nodes, newcomer()]


@st.composite
def changes(draw, max_nodes: int = 6, max_blocks: int = 12, tied: bool = True):
    """A model, a fleet and its plan, and the fleet after one node left (a stage) or joined."""
    meta, nodes = draw(instances(max_nodes=max_nodes, max_blocks=max_blocks))
    assume(tied or meta.tied_lm_head is None)
    objective = draw(st.sampled_from(["prefill", "decode"]))
    try:
        current = make_plan(meta, nodes, objective=objective)
    except InfeasiblePlan:
        assume(False)
    after = leave_or_join(draw, current, nodes, lambda: Node(
        "new", float(draw(st.integers(1, 8))), draw(st.integers(1, 45)) / 1e9, float(draw(st.integers(1, 8)))))
    slowdown = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    return meta, current, after, objective, slowdown


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(changes(max_nodes=4, max_blocks=6))
def test_memoised_reference_matches_the_literal_enumeration(case) -> None:
    meta, current, after, objective, slowdown = case
    held = held_now(current, after)
    for bound in (0.0, 1e-9, 1e-6, float("inf")):
        assert fewest_bytes(meta, after, held, bound, objective) == \
            literal_fewest_bytes(meta, after, held, bound, objective)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(changes())
def test_replan_moves_the_fewest_bytes_within_the_bound(case) -> None:
    meta, current, after, objective, slowdown = case
    try:
        fresh = make_plan(meta, after, objective=objective)
    except InfeasiblePlan:
        with pytest.raises(InfeasiblePlan):
            replan(meta, current, after, slowdown)
        return
    r = replan(meta, current, after, slowdown)
    plan = r.plan
    assert validate_split_plan([x.name for x in meta.layers], plan, metadata=meta, nodes=after) == []
    assert plan.version == current.version + 1 and plan.objective == objective and r.exact is True
    assert r.best_bottleneck_s == fresh.bottleneck_s
    assert plan.bottleneck_s == r.bottleneck_after_s <= fresh.bottleneck_s * (1 + slowdown) == r.bound_s
    held = held_now(current, after)
    assert r.fresh_bytes_moved == moved(meta, held, fresh)
    assert r.bytes_moved == moved(meta, held, plan) == r.migration.pull_bytes <= r.fresh_bytes_moved
    # The exhaustive optimum, ties to the lower bottleneck: no plan within the bound moves fewer bytes.
    assert (r.bytes_moved, plan.bottleneck_s) == fewest_bytes(meta, after, held, r.bound_s, objective)
    assert r.moved_lower_bound <= r.bytes_moved


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(changes(tied=False))
def test_staying_nodes_keep_their_blocks_unless_the_bound_forbids_it(case) -> None:
    """When some plan within the bound leaves every surviving node's blocks where they are, the re-plan does, and
    moves exactly what the departed node held. (Untied models only: with a tied head, moving a survivor's small
    block can be cheaper than pulling the embedding again, and the exhaustive test above covers that.)"""
    meta, current, after, objective, slowdown = case
    gone = [u for u in current.node_ids if u not in {v.node_id for v in after}]
    assume(gone)
    try:
        fresh = make_plan(meta, after, objective=objective)
    except InfeasiblePlan:
        assume(False)
    held = held_now(current, after)
    blocks_of = {u: {b for b in range(len(meta.blocks)) if f"h.{b}.w" in names} for u, names in held.items()}
    keeps = fewest_bytes(meta, after, held, fresh.bottleneck_s * (1 + slowdown), objective,
                         allowed=lambda v, p, e: all(u == v.node_id or not blocks_of[u] & set(range(p, e))
                                                     for u in blocks_of))
    r = replan(meta, current, after, slowdown)
    kept = all(names & {x for x in held[u] if x.startswith("h.")} == {x for x in held[u] if x.startswith("h.")}
               for u, names in ((a.node_id, set(a.layer_names)) for a in r.plan.assignments) if u in held)
    kept = kept and all(u in r.plan.node_ids for u in held)
    size = {x.name: x.bytes for x in meta.layers}
    if keeps is not None:
        assert kept
        assert r.bytes_moved == sum(size[t] for t in current.node(gone[0]).tensor_names) == r.moved_lower_bound
    else:
        assert not kept


def test_a_node_leaving_the_middle_gives_its_blocks_to_the_newcomer() -> None:
    meta = build_meta([(10, 3)] * 8)
    nodes = [Node("a", 1.0, 10e-9), Node("b", 1.0, 10e-9), Node("c", 2.0, 20e-9)]
    current = make_plan(meta, nodes)
    assert [(a.node_id, a.blocks) for a in current.assignments] == [("b", (0, 2)), ("a", (2, 4)), ("c", (4, 8))]
    r = replan(meta, current, [nodes[0], nodes[2], Node("d", 1.0, 10e-9)])
    assert [(a.node_id, a.blocks) for a in r.plan.assignments] == [("d", (0, 2)), ("a", (2, 4)), ("c", (4, 8))]
    assert (r.bytes_moved, r.fresh_bytes_moved, r.moved_lower_bound) == (7, 7, 7)
    assert (r.departed, r.joined, r.bottleneck_before_s) == (("b",), ("d",), None)
    assert r.plan.extra["replan"] == {"from_version": 1, "from_digest": current.digest(), "max_slowdown": 0.05,
                                      "best_bottleneck_s": 0.0205, "bound_s": 0.0205 * 1.05, "bytes_moved": 7,
                                      "fresh_bytes_moved": 7}
    assert Plan.from_dict(r.plan.to_dict()).version == 2


def test_a_joining_node_moves_nothing_while_the_current_plan_is_within_the_bound() -> None:
    meta = build_meta([(10, 3)] * 8)
    nodes = [Node("a", 1.0, 30e-9), Node("b", 1.0, 30e-9)]
    current = make_plan(meta, nodes)
    joined = [*nodes, Node("c", 1.0, 30e-9)]
    # Three equal nodes: best 3 blocks per stage (30 GFLOPs + the head's 1 = 31 ms on the last); now 4 blocks.
    tight = replan(meta, current, joined, max_slowdown=0.1)
    assert (tight.best_bottleneck_s, tight.bottleneck_before_s) == (0.03, 0.041)
    assert tight.bytes_moved > 0 and tight.bottleneck_after_s <= 0.033
    loose = replan(meta, current, joined, max_slowdown=0.5)
    assert (loose.bytes_moved, loose.bottleneck_after_s, loose.plan.node_ids) == (0, 0.041, current.node_ids)
    assert [s.action for s in loose.migration.steps] == ["switch"]
    assert loose.plan.excluded[-1].reason == ("not used: the plan moving the fewest bytes within 50% of the best "
                                              "bottleneck (30.0 ms) does without it")


def test_large_fleets_use_the_heuristic_and_never_move_more_than_a_fresh_plan() -> None:
    meta = build_meta([(10 + i % 7, 5 + i % 3) for i in range(40)])
    nodes = [Node(f"n{i}", float(1 + i % 5), (30 + 7 * (i % 4)) / 1e9) for i in range(16)]
    current = make_plan(meta, nodes)
    after = [v for v in nodes if v.node_id != current.node_ids[2]]
    r = replan(meta, current, after, 0.05)
    assert r.exact is False and r.plan.exact is False
    assert validate_split_plan([x.name for x in meta.layers], r.plan, metadata=meta, nodes=after) == []
    assert r.bottleneck_after_s <= r.bound_s
    assert r.moved_lower_bound <= r.bytes_moved <= r.fresh_bytes_moved
    assert r.moved_lower_bound == current.assignments[2].bytes


def test_bad_arguments_and_a_plan_for_another_model() -> None:
    meta = build_meta([(1, 4)] * 2)
    nodes = [Node("a", 1.0, 1.0)]
    current = make_plan(meta, nodes)
    for bad in (-0.1, float("nan"), True):
        with pytest.raises(PlanError) as exc:
            replan(meta, current, nodes, bad)
        assert str(exc.value) == f"max_slowdown must be a finite number >= 0 (0.05 = 5% slower), got {bad!r}"
    other = make_plan(build_meta([(1, 4)] * 3), nodes)
    with pytest.raises(PlanError) as exc:
        replan(meta, other, nodes)
    assert str(exc.value) == ("the current plan's node 'a' holds 'h.2.w', which the model 'toy' does not have: "
                              "the plan is for another model")
    with pytest.raises(InfeasiblePlan) as exc:
        replan(meta, current, [Node("b", 1.0, 3e-9)])
    assert str(exc.value) == ("no node can hold a single block: the smallest block needs 4 bytes but the largest "
                              "node 'b' has 3 bytes (short by 1 bytes)")


def test_when_every_plan_moves_the_same_bytes_the_fastest_wins() -> None:
    meta = build_meta([(10, 3)] * 8)
    current = make_plan(meta, [Node("a", 1.0, 1.0)])
    after = [Node("slow", 1.0, 1.0), Node("fast", 2.0, 1.0)]  # "a" left: every plan pulls all 26 bytes
    r = replan(meta, current, after, max_slowdown=1.0)
    assert (r.bytes_moved, r.fresh_bytes_moved) == (26, 26)
    assert r.bottleneck_after_s == r.best_bottleneck_s == make_plan(meta, after).bottleneck_s
