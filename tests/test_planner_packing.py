"""Best-fit packing, the branch and bound's start plan on large fleets: its plans keep every stage under the
threshold and in memory (checked with the tests' own cost reference), it never beats the exhaustive optimum, and on
uneven blocks it packs far tighter than the fixed node orders."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import HealthCheck, given, settings

from test_planner_pipeline import brute_force, build_meta, instances, stage_cost
from williw.fleet import Node
from williw.planner import make_plan
from williw.planner.bound import Windows, certified_lower_bound
from williw.planner.costs import pipeline_model
from williw.planner.packing import best_fit, pack, repack
from williw.planner.pipeline import _Costs, lower_bound, search


def check_plan(meta, nodes: list[Node], stages, t: float, objective: str, batch: int | None = None,
               context: int | None = None) -> None:
    """A plan from the definitions: contiguous stages from block 0 to the end, distinct nodes, each within ``t``
    and within its node's memory less the reserve."""
    n = len(meta.blocks)
    assert stages[0].start == 0 and stages[-1].end == n
    assert all(a.end == b.start and a.start < a.end for a, b in zip(stages, stages[1:], strict=False))
    assert len({s.node for s in stages}) == len(stages)
    for s in stages:
        node = nodes[s.node]
        cost, nbytes = stage_cost(meta, node, s.start, s.end, objective, batch, context)
        assert cost <= t and nbytes <= node.memory_bytes - node.reserve_bytes


@pytest.mark.parametrize("objective", ("prefill", "decode"))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=instances(max_nodes=7, max_blocks=8))
def test_packed_plans_fit_and_never_beat_the_optimum(objective: str, case) -> None:
    meta, nodes = case
    expected = brute_force(meta, nodes, objective)
    c = _Costs(pipeline_model(meta), nodes, objective)
    if expected is None:
        assert all(pack(c, t) is None for t in (1.0, 1e9))
        return
    for t in (expected, expected * 1.5, expected * 4, 1e9):
        found = pack(c, t) if t > 0 else None
        if found is not None:
            check_plan(meta, nodes, found, t, objective)
    plan = best_fit(c, 0.0, 1e9, float("inf"))
    if plan is not None:
        check_plan(meta, nodes, plan, c.bottleneck(plan), objective)
        assert c.bottleneck(plan) >= expected


def _uneven(n: int, k: int) -> tuple:
    """n blocks of 40-60 GFLOPs and 80-120 bytes; k nodes of 1-1000 TFLOPS (spread by a fixed stride), roomy."""
    meta = build_meta([(40 + (37 * i) % 21, 80 + (53 * i) % 41) for i in range(n)], (0, 10), (30, 10))
    nodes = [Node(f"n{i}", float(10 ** ((i * 0.618034) % 1 * 3)), 1e-5) for i in range(k)]
    return meta, nodes


def test_packing_is_within_one_percent_of_the_certified_bound_where_fixed_orders_are_not() -> None:
    meta, nodes = _uneven(300, 120)
    model = pipeline_model(meta)
    c = _Costs(model, nodes, "prefill")
    heuristic = c.bottleneck(search(model, nodes, "prefill").stages)
    bound = certified_lower_bound(Windows(c), lower_bound(model, nodes, "prefill") * (1 - 1e-9), heuristic)
    packed = c.bottleneck(best_fit(c, bound, heuristic, float("inf")))
    assert heuristic / bound - 1 > 0.03
    assert packed / bound - 1 < 0.01


def test_make_plan_keeps_to_the_time_limit_on_a_large_fleet() -> None:
    meta, nodes = _uneven(400, 3000)
    start = time.monotonic()
    plan = make_plan(meta, nodes, time_limit_s=1.0)
    took = time.monotonic() - start
    assert took < 1.0 + 2.0  # the limit, plus the model, pruning and one bound and plan that are always computed
    assert plan.exact is False and plan.lower_bound_s < plan.bottleneck_s
    # 0.5% measured at a 0.3 s limit under load 9 on 2 cores; the fixed orders alone left 42%.
    assert plan.extra["gap_to_lower_bound"] == plan.bottleneck_s / plan.lower_bound_s - 1 < 0.05


def test_make_plan_keeps_to_the_time_limit_on_a_large_fleet_of_identical_blocks() -> None:
    # Found by the session's breaker: after the limit, the fixed orders' refinement below the final plan ran
    # unbounded (every order fits below it when blocks are identical): 7.4 s at a 0.2 s limit here, 2.1 s now
    # (both beside a test run at load average 4).
    meta = build_meta([(500, 1_000_000_000)] * 1000, (0, 10), (30, 10))
    rng = random.Random(10000)
    nodes = [Node(f"n{i}", round(10 ** rng.uniform(0, 3), 3), round(rng.uniform(0.5, 80), 2),
                  round(rng.uniform(50, 3000), 1), network_gbps=round(rng.uniform(0.1, 50), 2),
                  latency_ms=round(rng.uniform(0, 5), 3)) for i in range(3000)]
    start = time.monotonic()
    plan = make_plan(meta, nodes, objective="decode", time_limit_s=0.2)
    assert time.monotonic() - start < 0.2 + 4.0  # the limit, the refinement's 0.5 s grace, the model and pruning
    assert plan.lower_bound_s <= plan.bottleneck_s


def two_hundred():
    """200 random blocks over a log-uniform fleet of 200 nodes (bench/planner.py's shapes, smaller): (metadata,
    nodes, costs, the fixed orders' bottleneck, the window bound)."""
    rng = random.Random(1)
    meta = build_meta([(rng.uniform(40, 60), rng.randint(80, 120)) for _ in range(200)], (0, 10), (30, 10))
    nodes = [Node(f"n{i}", round(10 ** rng.uniform(0, 3), 3), 1e-5) for i in range(200)]
    model = pipeline_model(meta)
    c = _Costs(model, nodes, "prefill")
    heuristic = c.bottleneck(search(model, nodes, "prefill").stages)
    bound = certified_lower_bound(Windows(c), lower_bound(model, nodes, "prefill") * (1 - 1e-9), heuristic)
    return meta, nodes, c, heuristic, bound


def test_randomised_repacking_beats_best_fit_stays_valid_and_repeats() -> None:
    # Best-fit ends on ill-fitting nodes.
    meta, nodes, c, heuristic, bound = two_hundred()
    packed = best_fit(c, bound, heuristic, float("inf"))
    assert repack(c, packed, bound, float("inf"), tries=0) == packed
    repacked = repack(c, packed, bound, float("inf"), tries=100)
    # The tests' cost reference sums in another order: allow its last bits.
    check_plan(meta, nodes, repacked, c.bottleneck(repacked) * (1 + 1e-12), "prefill")
    # Measured: 2.83% above the bound packed, 2.43% re-packed (100 tries).
    assert bound < c.bottleneck(repacked) < c.bottleneck(packed) * (1 - 0.002)
    assert repack(c, packed, bound, float("inf"), tries=100) == repacked


def test_repacking_goes_on_in_smaller_steps_when_the_bound_is_nearer_than_the_first() -> None:
    # The first step is 1/256 below the plan; a bound nearer than that once ended re-packing before its first try
    # (48 nodes x 1,000 blocks: 0.3% above the bound, 1.8 s of the time limit unused).
    meta, nodes, c, heuristic, bound = two_hundred()
    packed = best_fit(c, bound, heuristic, float("inf"))
    near = c.bottleneck(packed) * (1 - 1 / 300)
    repacked = repack(c, packed, near, float("inf"), tries=100)
    check_plan(meta, nodes, repacked, c.bottleneck(repacked) * (1 + 1e-12), "prefill")
    assert near < c.bottleneck(repacked) < c.bottleneck(packed)
    # A plan within the smallest step (`packing.REL_TOL`) of the bound is left as it is, without a try.
    assert repack(c, packed, c.bottleneck(packed) * (1 - 1e-7), float("inf")) == packed
