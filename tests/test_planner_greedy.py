"""The greedy strategy is the seed's algorithm, step by step."""

from __future__ import annotations

import pytest

from williw.errors import InfeasiblePlan
from williw.fleet import Node
from williw.metadata import generate_metadata
from williw.planner import make_plan, validate_split_plan


def seed_greedy(layers, nodes):
    """The seed, "Worker 使用贪心算法": 1. sort every layer by compute, high to low; 2. give the heavy layers to
    the strong nodes; 3. keep each node's total compute within its available compute (TFLOPS x 1000 GFLOPs)."""
    layers = sorted(layers, key=lambda x: x.compute_required, reverse=True)  # 1
    nodes = sorted(nodes, key=lambda v: v.compute_tflops, reverse=True)  # 2
    plan = {}
    for layer in layers:
        for node in nodes:
            entry = plan.setdefault(node.node_id, {"node_id": node.node_id, "layer_names": [], "total_compute": 0.0})
            if entry["total_compute"] + layer.compute_required <= node.compute_tflops * 1000:  # 3
                entry["layer_names"].append(layer.name)
                entry["total_compute"] += layer.compute_required
                break
    available = {v.node_id: v.compute_tflops * 1000 for v in nodes}
    return {k: {**v, "compute_utilization": v["total_compute"] / available[k]}
            for k, v in plan.items() if v["layer_names"]}


def test_greedy_reproduces_the_seed_on_tiny_llama(tiny_llama) -> None:
    meta = generate_metadata(tiny_llama)
    total = sum(x.compute_required for x in meta.layers)
    # Capacities of 45%, 30%, 30% and 20% of the tensors' GFLOPs: the strongest fills up, then the next...
    nodes = [Node("small", total * 0.2 / 1000, 1.0), Node("big", total * 0.45 / 1000, 1.0),
             Node("mid", total * 0.3 / 1000, 1.0), Node("mid2", total * 0.3 / 1000, 1.0)]

    plan = make_plan(meta, nodes, strategy="greedy")

    got = {k: {f: v[f] for f in ("node_id", "layer_names", "total_compute", "compute_utilization")}
           for k, v in plan.to_dict().items() if k != "@plan"}
    assert got == seed_greedy(meta.layers, nodes)
    assert list(got) == ["big", "mid", "mid2", "small"][:len(got)]
    assert len(got) >= 3
    assert validate_split_plan([x.name for x in meta.layers], plan, nodes=nodes) == []


def test_greedy_times_count_attention_cores_on_the_largest_attention_tensor(tiny_llama) -> None:
    meta = generate_metadata(tiny_llama)
    nodes = [Node("big", 1.0, 1.0), Node("other", 0.5, 1.0)]
    plan = make_plan(meta, nodes, strategy="greedy")
    # 1 TFLOPS = 1000 GFLOPs/s of capacity: everything fits on "big", cores included in its time.
    assert plan.node_ids == ("big",)
    assert plan.assignments[0].stage_time_s == pytest.approx(meta.total_compute / 1000, rel=1e-12)
    assert plan.excluded[0].node_id == "other"


def test_greedy_refuses_a_tensor_that_fits_no_capacity(tiny_llama) -> None:
    meta = generate_metadata(tiny_llama)
    biggest = max(x.compute_required for x in meta.layers)
    with pytest.raises(InfeasiblePlan, match=r"^greedy: tensor '[^']+' needs .* GFLOPs but the most capacity left "
                                             r"on any node is .* try --strategy pipeline$"):
        make_plan(meta, [Node("a", biggest / 2000, 1.0)], strategy="greedy")


def test_greedy_refuses_a_node_over_memory(tiny_llama) -> None:
    meta = generate_metadata(tiny_llama)
    with pytest.raises(InfeasiblePlan) as exc:
        make_plan(meta, [Node("a", 1.0, 100_000 / 1e9)], strategy="greedy")
    assert str(exc.value) == (f"greedy: node 'a' would hold {meta.total_bytes / 1e6:.2f} MB but has 0.10 MB "
                              f"(over by {(meta.total_bytes - 100_000) / 1e6:.2f} MB); the seed's greedy ignores "
                              "memory, try --strategy pipeline")
