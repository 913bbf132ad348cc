"""The migration schedule: every missing tensor pulled once by its new holder from a live holder or the model's
source, steps within max_step_bytes, drops only after the switch and the pulls they wait for."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_planner_pipeline import build_meta
from test_replan import changes, held_now
from williw.errors import InfeasiblePlan, PlanError
from williw.fleet import Node
from williw.planner import MODEL_SOURCE, make_plan, migration_schedule, pipeline_from_cuts, replan


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(changes(), st.sampled_from([None, 1, 3, 7, 20]))
def test_schedule_pulls_each_missing_tensor_once_and_drops_after_the_switch(case, max_step) -> None:
    meta, current, after, objective, slowdown = case
    try:
        r = replan(meta, current, after, slowdown, max_step_bytes=max_step)
    except InfeasiblePlan:
        return
    size = {x.name: x.bytes for x in meta.layers}
    block = {x.name: x.block for x in meta.layers}
    held = held_now(current, after)
    new = {a.node_id: set(a.tensor_names) for a in r.plan.assignments}
    steps = r.migration.steps
    assert [s.id for s in steps] == list(range(len(steps)))
    assert all(d < s.id for s in steps for d in s.after)
    pulls = [s for s in steps if s.action == "pull"]
    switch = [s for s in steps if s.action == "switch"]
    drops = [s for s in steps if s.action == "drop"]
    assert [s.action for s in steps] == ["pull"] * len(pulls) + ["switch"] + ["drop"] * len(drops)
    assert switch[0].after == tuple(s.id for s in pulls)

    assert Counter((s.node_id, t) for s in pulls for t in s.tensors) == \
        Counter((u, t) for u, names in new.items() for t in names - held.get(u, set()))
    for s in pulls:
        assert s.bytes == sum(size[t] for t in s.tensors) and s.tensors
        assert s.blocks == tuple(sorted({block[t] for t in s.tensors if block[t] is not None}))
        if max_step is not None:
            assert s.bytes <= max_step or (s.oversize and len(s.tensors) == 1 and s.bytes > max_step)
            assert s.oversize == (s.bytes > max_step)
        holders = {u for u, names in held.items() if s.tensors[0] in names}
        if holders:
            assert s.source in holders and all(t in held[s.source] for t in s.tensors)
        else:
            assert s.source == MODEL_SOURCE
    if max_step is None:  # one step per node and source
        assert len(pulls) == len({(s.node_id, s.source) for s in pulls})

    assert Counter((s.node_id, t) for s in drops for t in s.tensors) == \
        Counter((u, t) for u, names in held.items() for t in names - new.get(u, set()))
    for s in drops:
        waits = {p.id for p in pulls if set(p.tensors) & set(s.tensors)}
        assert switch[0].id in s.after and waits <= set(s.after)
    assert r.migration.pull_bytes == r.bytes_moved


def test_schedule_of_a_departed_first_stage() -> None:
    meta = build_meta([(1, 3), (1, 3), (1, 9), (1, 3)], first=(0, 2), last=(0, 1), tied=(1, 2))
    current = pipeline_from_cuts(meta, [2], ["a", "b"])  # a: emb h.0 h.1; b: h.2 h.3 head + emb replica
    new = replace(pipeline_from_cuts(meta, [3], ["c", "b"]), version=2)  # a left, c joined
    fleet = [Node("b", 1.0, 14e-9), Node("c", 1.0, 1.0)]
    m = migration_schedule(meta, current, new, fleet, max_step_bytes=4)
    assert m.to_dict() == {
        "from_version": 1, "to_version": 2, "max_step_bytes": 4, "model_source": "@model",
        "pull_bytes": 17, "peer_bytes": 11, "model_bytes": 6,
        "steps": [
            # emb from b, which keeps it, rather than the model; h.2.w alone exceeds 4 bytes: a step of its own.
            {"id": 0, "action": "pull", "node_id": "c", "source": "b", "tensors": ["emb"], "blocks": [], "bytes": 2,
             "after": []},
            {"id": 1, "action": "pull", "node_id": "c", "source": "b", "tensors": ["h.2.w"], "blocks": [2],
             "bytes": 9, "after": [], "oversize": True},
            {"id": 2, "action": "pull", "node_id": "c", "source": "@model", "tensors": ["h.0.w"], "blocks": [0],
             "bytes": 3, "after": []},
            {"id": 3, "action": "pull", "node_id": "c", "source": "@model", "tensors": ["h.1.w"], "blocks": [1],
             "bytes": 3, "after": []},
            {"id": 4, "action": "switch", "after": [0, 1, 2, 3]},
            {"id": 5, "action": "drop", "node_id": "b", "tensors": ["h.2.w"], "blocks": [2], "bytes": 9,
             "after": [4, 1]}],
        "nodes": [
            {"node_id": "c", "pull_bytes": 17, "drop_bytes": 0, "held_bytes": 0, "new_bytes": 17, "peak_bytes": 17,
             "memory_bytes": 1_000_000_000, "over_memory": False},
            # b keeps h.2.w until the switch: 15 bytes at once on a 14-byte node.
            {"node_id": "b", "pull_bytes": 0, "drop_bytes": 9, "held_bytes": 15, "new_bytes": 6, "peak_bytes": 15,
             "memory_bytes": 14, "over_memory": True}]}


def test_unchanged_plan_is_only_a_switch() -> None:
    meta = build_meta([(1, 3)] * 4)
    nodes = [Node("a", 1.0, 1.0)]
    current = make_plan(meta, nodes)
    m = migration_schedule(meta, current, replace(current, version=2), nodes, 1)
    assert [s.to_dict() for s in m.steps] == [{"id": 0, "action": "switch", "after": []}]


def test_schedule_errors() -> None:
    meta = build_meta([(1, 3)] * 4)
    nodes = [Node("a", 1.0, 1.0)]
    current = make_plan(meta, nodes)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(PlanError) as exc:
            migration_schedule(meta, current, current, nodes, bad)
        assert str(exc.value) == f"max_step_bytes must be a positive integer of bytes, got {bad!r}"
    with pytest.raises(PlanError) as exc:
        migration_schedule(meta, current, current, [Node("b", 1.0, 1.0)])
    assert str(exc.value) == "the new plan's node 'a' is not in the fleet"
    other = make_plan(build_meta([(1, 3)] * 5), nodes)
    with pytest.raises(PlanError) as exc:
        migration_schedule(meta, current, other, nodes)
    assert str(exc.value) == "the new plan's node 'a' holds 'h.4.w', which the model 'toy' does not have"
