"""Plans are trusted no further than their schema and the model: ``@plan`` garbage is one line, and split,
pull, replan and show-plan refuse a plan that ``validate`` refuses before writing anything (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_split_helpers import greedy_plan
from williw.errors import PlanError
from williw.planner.plan import NodeAssignment, Plan
from williw.splitter import split_all

BASE = {"a": {"node_id": "a", "layer_names": ["x"], "total_compute": 1.0, "compute_utilization": 1.0}}


@pytest.mark.parametrize(("head", "message"), [
    ([1, 2], "'p': '@plan' must be an object, got [1, 2]"),
    ({"bottleneck_s": "slow"}, "'p': '@plan.bottleneck_s' must be null or a finite number >= 0, got 'slow'"),
    ({"stages": ["a", "ghost"]}, "'p': '@plan.stages' must be a list naming each node of the plan once, "
                                 "got ['a', 'ghost']"),
    ({"stages": ["a", "a"]}, "'p': '@plan.stages' must be a list naming each node of the plan once, got ['a', 'a']"),
    ({"version": 10**30}, "'p': '@plan.version' must be an integer in [1, 9223372036854775807], "
                          "got 1000000000000000000000000000000"),
    ({"exact": "yes"}, "'p': '@plan.exact' must be null, true or false, got 'yes'"),
    ({"excluded": [{"node_id": 1}]}, "'p': '@plan.excluded' must be a list of {\"node_id\": <string>, "
                                     "\"reason\": <string>}, got [{'node_id': 1}]"),
    ({"strategy": "magic"}, "'p': '@plan.strategy' must be one of pipeline, greedy, got 'magic'"),
    ({"model_name": 5}, "'p': '@plan.model_name' must be a string, got 5"),
])
def test_plan_head_schema(head, message):
    with pytest.raises(PlanError) as exc:
        Plan.from_dict({**BASE, "@plan": head}, "p")
    assert str(exc.value) == message


def test_show_plan_refuses_garbage_in_one_line(williw, tmp_path):
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({**BASE, "@plan": {"bottleneck_s": "slow", "stages": ["zzz"]}}))
    r = williw("show-plan", str(plan), "--svg", str(tmp_path / "p.svg"))
    assert (r.returncode, r.stdout, r.stderr) == (
        2, "", f"error: '{plan}': '@plan.bottleneck_s' must be null or a finite number >= 0, got 'slow'\n")
    assert not (tmp_path / "p.svg").exists()


def _with(plan: Plan, node: int, names: tuple[str, ...]) -> Plan:
    changed = list(plan.assignments)
    changed[node] = NodeAssignment(changed[node].node_id, names, 1.0, 0.5)
    return Plan("greedy", tuple(changed))


def test_split_refuses_a_duplicated_or_unassigned_tensor(tiny_llama: Path, tmp_path: Path):
    plan = greedy_plan(tiny_llama)
    first = plan.assignments[0].layer_names
    dup = _with(plan, 1, plan.assignments[1].layer_names + first[:1])
    with pytest.raises(PlanError) as exc:
        split_all(tiny_llama, dup, tmp_path / "out")
    assert str(exc.value) == (f"the plan has 1 problem: tensor '{first[0]}' is assigned 2 times: nodes 'node_000', "
                              "'node_001'")
    missing = _with(plan, 0, first[1:])
    with pytest.raises(PlanError) as exc:
        split_all(tiny_llama, missing, tmp_path / "out")
    assert str(exc.value) == f"the plan has 1 problem: tensor '{first[0]}' is not assigned to any node"
    half = _with(plan, 0, first[:1])
    with pytest.raises(PlanError) as exc:
        split_all(tiny_llama, half, tmp_path / "out")
    unassigned = len(first) - 1
    assert str(exc.value).startswith(f"the plan has {unassigned} problems: tensor ")
    assert str(exc.value).endswith(f" (and {unassigned - 3} more: williw validate lists them)")
    assert str(exc.value).count(";") == 2
    assert not (tmp_path / "out").exists()


def test_replan_refuses_a_plan_validate_refuses(williw, tiny_llama, tmp_path):
    meta, plan, nodes = tmp_path / "meta.json", tmp_path / "plan.json", tmp_path / "nodes.json"
    williw("metadata", str(tiny_llama), "-o", str(meta), check=True)
    nodes.write_text(json.dumps([{"node_id": "node_000", "compute_tflops": 1, "memory_gb": 1}]))
    good = greedy_plan(tiny_llama)
    bad = _with(good, 0, good.assignments[0].layer_names[1:])
    plan.write_text(json.dumps(bad.to_dict()))
    r = williw("replan", str(meta), "--plan", str(plan), "--nodes", str(nodes))
    missing = good.assignments[0].layer_names[0]
    assert (r.returncode, r.stderr) == (2, f"error: the plan has 1 problem: tensor '{missing}' is not assigned to "
                                           "any node\n")


def test_show_plan_checks_the_plan_against_the_model_and_the_fleet(williw, tiny_llama, tmp_path):
    meta, plan_file, nodes = tmp_path / "meta.json", tmp_path / "plan.json", tmp_path / "nodes.json"
    williw("metadata", str(tiny_llama), "-o", str(meta), check=True)
    plan = greedy_plan(tiny_llama)
    first = plan.assignments[0].layer_names
    from williw.planner.plan import save_plan

    save_plan(_with(plan, 0, first[1:]), plan_file)
    r = williw("show-plan", str(plan_file), "--svg", str(tmp_path / "p.svg"), "--metadata", str(meta))
    assert (r.returncode, r.stderr) == (
        2, f"error: the plan has 1 problem: tensor '{first[0]}' is not assigned to any node\n")
    assert not (tmp_path / "p.svg").exists()

    save_plan(plan, plan_file)
    nodes.write_text(json.dumps([{"node_id": "node_000", "compute_tflops": 1, "memory_gb": 1}]))
    r = williw("show-plan", str(plan_file), "--svg", str(tmp_path / "p.svg"), "--nodes", str(nodes))
    assert r.returncode == 2 and r.stderr.startswith("error: the plan has ") and "node_001" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and not (tmp_path / "p.svg").exists()
    r = williw("show-plan", str(plan_file), "--svg", str(tmp_path / "p.svg"), "--metadata", str(meta))
    assert r.returncode == 0 and (tmp_path / "p.svg").exists()


@pytest.mark.parametrize(("key", "value"), [("batch_size", 0), ("batch_size", 1.5), ("context_length", -3),
                                            ("context_length", True)])
def test_a_recorded_workload_must_be_a_positive_integer(key: str, value: object) -> None:
    # replan plans for the recorded workload again; an invalid one was replaced by the metadata's defaults unsaid.
    d = {"@plan": {"strategy": "greedy", key: value}, "n1": {"node_id": "n1", "layer_names": ["a"]}}
    with pytest.raises(PlanError) as e:
        Plan.from_dict(d, "p.json")
    assert str(e.value) == (f"'p.json': '@plan.{key}' must be null or an integer in [1, 9223372036854775807], "
                            f"got {value!r}")
