"""Plan pictures: one stage element per pipeline stage carrying its node and block range, the slowest stage marked,
greedy plans as per-node load bars, memory against capacity, excluded nodes with their reasons; always valid XML.
And the two commands that write them (``williw plan --svg``, ``williw show-plan``)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from williw.fleet import Node
from williw.metadata import generate_metadata
from williw.planner import ExcludedNode, NodeAssignment, Plan, make_plan
from williw.planviz import MEM_OVER, SLOW, plan_svg, stage_widths

SVG = "{http://www.w3.org/2000/svg}"


def pipeline(n: int, rng: random.Random, objective: str = "prefill", **kw) -> Plan:
    """n stages over 3n blocks cut at random points, random times and bytes."""
    cuts = sorted(rng.sample(range(1, 3 * n), n - 1))
    bounds = [0, *cuts, 3 * n]
    stages = tuple(NodeAssignment(node_id=f"node-{i}", layer_names=(f"t{i}",), total_compute=rng.uniform(1, 100),
                                  compute_utilization=0.5, bytes=rng.randrange(10**6, 10**9), stage=i,
                                  blocks=(bounds[i], bounds[i + 1]), stage_time_s=rng.uniform(0.01, 1.0),
                                  decode_time_s=rng.uniform(0.001, 0.1)) for i in range(n))
    times = [a.decode_time_s if objective == "decode" else a.stage_time_s for a in stages]
    return Plan("pipeline", stages, model_name="toy/model", objective=objective, bottleneck_s=max(times), **kw)


def parts(svg: str, cls: str) -> list[ET.Element]:
    root = ET.fromstring(svg.encode("utf-8"))  # raises on anything that is not well-formed XML
    return [g for g in root.iter(f"{SVG}g") if cls in (g.get("class") or "").split()]


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("objective", ["prefill", "decode"])
def test_one_stage_element_per_stage_and_the_slowest_marked(n, objective):
    rng = random.Random(n * 7 + len(objective))
    plan = pipeline(n, rng, objective)
    stages = parts(plan_svg(plan), "stage")
    assert [(g.get("data-node"), g.get("data-stage"), g.get("data-blocks")) for g in stages] == \
        [(a.node_id, str(a.stage), f"[{a.blocks[0]},{a.blocks[1]})") for a in plan.assignments]
    times = [a.decode_time_s if objective == "decode" else a.stage_time_s for a in plan.assignments]
    slowest = plan.assignments[times.index(max(times))].node_id
    assert [g.get("data-node") for g in stages if g.get("data-bottleneck") == "true"] == [slowest]
    assert [g.get("data-node") for g in stages if "bottleneck" in g.get("class").split()] == [slowest]
    # Its time meter is full and red; every other stage's is its share of the bottleneck.
    for g, a, t in zip(stages, plan.assignments, times, strict=True):
        meter = next(m for m in g.iter(f"{SVG}g") if m.get("data-kind") == "time")
        assert float(meter.get("data-fraction")) == pytest.approx(t / max(times), abs=1e-4)
        assert (SLOW in ET.tostring(meter, encoding="unicode")) == (a.node_id == slowest)


def test_bars_are_wider_for_more_blocks_and_fill_the_width():
    widths = stage_widths([1, 2, 7], 900)
    assert sum(widths) == pytest.approx(900)
    assert widths[0] < widths[1] < widths[2]
    assert (widths[2] - widths[1]) == pytest.approx(5 * (widths[1] - widths[0]))  # the spare width ∝ blocks
    assert stage_widths([0, 0], 400) == [200, 200]


def test_a_tie_marks_one_stage():
    a = NodeAssignment("a", ("x",), 1.0, 1.0, 10, 0, (0, 1), 0.5, 0.1)
    b = NodeAssignment("b", ("y",), 1.0, 1.0, 10, 1, (1, 2), 0.5, 0.1)
    marked = [g.get("data-node") for g in parts(plan_svg(Plan("pipeline", (a, b), bottleneck_s=0.5)), "stage")
              if g.get("data-bottleneck") == "true"]
    assert marked == ["a"]


def test_memory_is_drawn_against_the_nodes_capacity():
    plan = pipeline(3, random.Random(1))
    nodes = [Node(a.node_id, 10.0, a.bytes / 1e9 * f) for a, f in zip(plan.assignments, (2.0, 1.0, 0.5), strict=True)]
    svg = plan_svg(plan, nodes)
    fractions = [float(m.get("data-fraction")) for g in parts(svg, "stage") for m in g.iter(f"{SVG}g")
                 if m.get("data-kind") == "memory"]
    assert fractions == pytest.approx([0.5, 1.0, 2.0], abs=1e-3)
    overflowing = parts(svg, "stage")[2]
    assert MEM_OVER in ET.tostring(overflowing, encoding="unicode") and "(200%)" in ET.tostring(overflowing,
                                                                                               encoding="unicode")
    assert "capacity unknown" in plan_svg(plan) and "capacity unknown" not in svg


def test_greedy_plan_is_drawn_as_per_node_load_bars():
    nodes = [Node("big", 100.0, 8.0), Node("mid", 50.0, 4.0), Node("small", 5.0, 1.0)]
    assignments = tuple(NodeAssignment(n.node_id, (f"t{i}",), total_compute=1000.0 * u, compute_utilization=u,
                                       bytes=int(1e9 * (i + 1)), stage_time_s=t)
                        for i, (n, u, t) in enumerate(zip(nodes, (0.9, 0.4, 0.2), (0.9, 0.8, 2.0), strict=True)))
    svg = plan_svg(Plan("greedy", assignments, model_name="toy/model"), nodes)
    assert parts(svg, "stage") == []
    loads = parts(svg, "node-load")
    assert [g.get("data-node") for g in loads] == ["big", "mid", "small"]
    assert [g.get("data-node") for g in loads if g.get("data-bottleneck") == "true"] == ["small"]
    compute = [float(m.get("data-fraction")) for g in loads for m in g.iter(f"{SVG}g") if m.get("data-kind") ==
               "compute"]
    assert compute == pytest.approx([0.9, 0.4, 0.2])
    memory = [float(m.get("data-fraction")) for g in loads for m in g.iter(f"{SVG}g") if m.get("data-kind") ==
              "memory"]
    assert memory == pytest.approx([1 / 8, 2 / 4, 3 / 1])


def test_excluded_nodes_are_listed_with_their_reason_and_text_is_escaped():
    excluded = (ExcludedNode("cpu-z", "offline: last heartbeat 40 s ago <TTL & co>"),
                ExcludedNode("tiny", "cannot hold a single block " * 30))
    plan = pipeline(2, random.Random(2), excluded=excluded)
    plan = Plan(**{**plan.__dict__, "model_name": 'evil"/<script>alert(1)</script>'})
    svg = plan_svg(plan)
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    excluded = parts(svg, "excluded")
    assert [g.get("data-node") for g in excluded] == ["cpu-z", "tiny"]
    text = " ".join(t.text for t in excluded[0].iter(f"{SVG}text"))
    assert text == "• cpu-z: offline: last heartbeat 40 s ago <TTL & co>"
    assert len(list(excluded[1].iter(f"{SVG}text"))) == 3  # a long reason wraps to at most 3 lines


def test_a_real_plan_of_the_tiny_llama(tiny_llama):
    meta = generate_metadata(tiny_llama, model_name="tiny/llama")
    nodes = [Node("gpu-a", 40.0, 0.00201), Node("gpu-b", 20.0, 0.00201), Node("cpu-c", 2.0, 0.00201),
             Node("far", 1.0, 0.00001)]
    plan = make_plan(meta, nodes)
    svg = plan_svg(plan, nodes)
    assert [(g.get("data-node"), g.get("data-blocks")) for g in parts(svg, "stage")] == \
        [(a.node_id, f"[{a.blocks[0]},{a.blocks[1]})") for a in plan.assignments]
    assert [g.get("data-node") for g in parts(svg, "excluded")] == ["far"]


def test_plan_svg_and_show_plan_commands(williw, tmp_path, tiny_llama):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(generate_metadata(tiny_llama, model_name="tiny/llama").to_dict()))
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps([{"node_id": "gpu-a", "compute_tflops": 40, "memory_gb": 0.0022},
                                 {"node_id": "gpu-b", "compute_tflops": 20, "memory_gb": 0.0022}]))
    done = williw("plan", str(meta), "--nodes", str(nodes), "-o", str(tmp_path / "plan.json"), "--svg",
                  str(tmp_path / "a.svg"), "--json", check=True)
    assert json.loads(done.stdout)["svg"] == str(tmp_path / "a.svg")
    plan = json.loads((tmp_path / "plan.json").read_text())
    drawn = [g.get("data-node") for g in parts((tmp_path / "a.svg").read_text(), "stage")]
    assert drawn == plan["@plan"]["stages"] and len(drawn) == 2

    done = williw("show-plan", str(tmp_path / "plan.json"), "--svg", str(tmp_path / "b.svg"), "--nodes", str(nodes),
                  "--json", check=True)
    assert json.loads(done.stdout) == {"svg": str(tmp_path / "b.svg"), "strategy": "pipeline", "kind": "stages",
                                       "parts": 2, "excluded": 0, "nodes_known": True}
    assert (tmp_path / "b.svg").read_text() == (tmp_path / "a.svg").read_text()
    human = williw("show-plan", str(tmp_path / "plan.json"), "--svg", str(tmp_path / "c.svg"), check=True)
    assert human.stdout.strip() == f"wrote {tmp_path / 'c.svg'} (2 stages)"
    bad = williw("show-plan", str(tmp_path / "missing.json"), "--svg", str(tmp_path / "d.svg"))
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: '{tmp_path / 'missing.json'}': no such plan file"
    assert not (tmp_path / "d.svg").exists()


def test_show_plan_imports_no_heavy_module(tmp_path):
    plan = pipeline(2, random.Random(3))
    (tmp_path / "p.json").write_text(json.dumps(plan.to_dict()))
    code = ("import sys; from williw.cli import cli; "
            f"cli.main(['show-plan', {str(tmp_path / 'p.json')!r}, '--svg', {str(tmp_path / 'p.svg')!r}], "
            "standalone_mode=False); "
            "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'sqlalchemy', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert len(parts((tmp_path / "p.svg").read_text(), "stage")) == 2
