"""Plan validation reports every problem at once, with exact messages."""

from __future__ import annotations

import pytest

from test_planner_pipeline import build_meta
from williw.errors import PlanError
from williw.fleet import Node
from williw.planner import check_plan, make_plan, validate_split_plan

META = build_meta([(1, 4), (1, 4), (1, 4), (1, 4)], first=(0, 2), last=(1, 2))
NAMES = [x.name for x in META.layers]  # emb, h.0.w .. h.3.w, head
NODES = [Node("a", 1.0, 10e-9), Node("b", 1.0, 10e-9), Node("c", 1.0, 10e-9)]


def node(node_id: str, names: list[str], stage: int, blocks: list[int] | None = None) -> dict:
    d = {"node_id": node_id, "layer_names": names, "total_compute": 1.0, "compute_utilization": 1.0, "stage": stage}
    if blocks is not None:
        d["blocks"] = blocks
    return d


def pipeline(*nodes: dict) -> dict:
    return {**{n["node_id"]: n for n in nodes},
            "@plan": {"strategy": "pipeline", "stages": [n["node_id"] for n in nodes]}}


def test_a_planned_plan_is_valid() -> None:
    plan = make_plan(META, NODES)
    assert validate_split_plan(NAMES, plan, metadata=META, nodes=NODES) == []
    assert validate_split_plan(NAMES, plan.to_dict(), metadata=META, nodes=NODES) == []
    check_plan(NAMES, plan, metadata=META, nodes=NODES)


def test_tensor_problems_are_all_reported() -> None:
    plan = {"a": {"node_id": "a", "layer_names": ["emb", "h.0.w", "h.0.w", "ghost"], "total_compute": 1.0,
                  "compute_utilization": 0.5},
            "b": {"node_id": "b", "layer_names": ["h.1.w", "emb"], "total_compute": 1.0, "compute_utilization": 0.5}}
    assert validate_split_plan(NAMES, plan) == [
        "node 'a': unknown tensor 'ghost'",
        "tensor 'emb' is assigned 2 times: nodes 'a', 'b'",
        "tensor 'h.0.w' is assigned 2 times: nodes 'a', 'a'",
        "tensor 'h.2.w' is not assigned to any node",
        "tensor 'h.3.w' is not assigned to any node",
        "tensor 'head' is not assigned to any node",
    ]


def test_memory_and_fleet_problems() -> None:
    plan = pipeline(node("a", ["emb", "h.0.w", "h.1.w"], 0), node("z", ["h.2.w", "h.3.w", "head"], 1))
    assert validate_split_plan(NAMES, plan, metadata=META, nodes=[Node("a", 1.0, 9e-9)]) == [
        "node 'a' holds 10 bytes but has 9 bytes (over by 1 bytes)",
        "node 'z' is not in the fleet",
    ]


def test_pipeline_structure_problems() -> None:
    plan = pipeline(node("a", ["emb", "h.0.w", "h.2.w"], 0, [0, 2]), node("b", ["h.1.w", "h.3.w"], 1),
                    node("c", ["head"], 2))
    assert validate_split_plan(NAMES, plan, metadata=META) == [
        "node 'a': blocks 0, 2 are not contiguous",
        "node 'a': field 'blocks' says [0, 2) but it holds blocks [0, 3)",
        "node 'b': blocks 1, 3 are not contiguous",
    ]
    plan = pipeline(node("b", ["h.2.w", "h.3.w", "emb"], 0), node("a", ["h.0.w", "h.1.w", "head"], 1))
    assert validate_split_plan(NAMES, plan, metadata=META) == [
        "blocks are not in stage order: model order visits nodes 'a', 'b' but the stages are 'b', 'a'",
    ]


def test_group_placement_and_tied_replica() -> None:
    tied = build_meta([(1, 4), (1, 4)], first=(0, 2), last=(1, 2), tied=(2, 2))
    names = [x.name for x in tied.layers]
    plan = pipeline(node("a", ["h.0.w", "head"], 0), node("b", ["emb", "h.1.w"], 1))
    assert validate_split_plan(names, plan, metadata=tied) == [
        "tensor 'emb' (embeddings) must be on the first stage 'a', not on 'b'",
        "tensor 'head' (final norm or head) must be on the last stage 'b', not on 'a'",
    ]
    plan = pipeline(node("a", ["emb", "h.0.w"], 0), node("b", ["h.1.w", "head"], 1))
    assert validate_split_plan(names, plan, metadata=tied) == [
        "the last stage 'b' needs the tied head's 'emb' in shared_tensors"]
    plan["b"]["shared_tensors"] = ["emb"]
    assert validate_split_plan(names, plan, metadata=tied) == []


def test_check_plan_raises_one_line_with_all_problems() -> None:
    plan = {"a": {"node_id": "a", "layer_names": ["emb"], "total_compute": 0.0, "compute_utilization": 0.0}}
    with pytest.raises(PlanError) as exc:
        check_plan(["emb", "w"], plan)
    assert str(exc.value) == "the plan has 1 problem: tensor 'w' is not assigned to any node"
    with pytest.raises(PlanError) as exc:
        check_plan(["emb", "w", "v"], plan)
    assert str(exc.value) == ("the plan has 2 problems: tensor 'w' is not assigned to any node; "
                              "tensor 'v' is not assigned to any node")


def test_malformed_plan_is_one_problem() -> None:
    assert validate_split_plan(NAMES, {"a": {"node_id": "b", "layer_names": []}}) == [
        "'plan': node 'a' has node_id 'b'; the key and node_id must match"]


def test_plan_file_with_a_bad_number_names_node_and_field() -> None:
    from williw.errors import PlanError
    from williw.planner import Plan

    with pytest.raises(PlanError) as err:
        Plan.from_dict({"a": {"node_id": "a", "layer_names": [], "total_compute": 1, "compute_utilization": 1,
                              "bytes": "x"}}, "p.json")
    assert str(err.value) == "'p.json': node 'a': field 'bytes' must be a finite number >= 0, got 'x'"
