"""``williw plan`` and ``williw validate`` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from williw.cli import cli
from williw.errors import PlanError
from williw.fleet import Node
from williw.metadata import generate_metadata, save_metadata
from williw.planner import make_plan


@pytest.fixture(scope="module")
def files(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("plan-cli")
    meta = generate_metadata(tiny_llama, model_name="tiny")
    save_metadata(meta, d / "meta.json")
    # Room for 2.5 blocks of weights and their KV caches for the 512-token context, and one block's transient.
    block = max(b.bytes + b.kv_bytes_per_token * 512 for b in meta.blocks)
    act = max(b.activation_bytes_per_token * 512 for b in meta.blocks)
    nodes = [{"node_id": "a", "compute_tflops": 2, "memory_gb": (2.5 * block + act) / 1e9,
              "memory_bandwidth_gbps": 100},
             {"node_id": "b", "compute_tflops": 1, "memory_gb": 10.0, "memory_bandwidth_gbps": 50},
             {"node_id": "tiny", "compute_tflops": 9, "memory_gb": 1e-6}]
    (d / "nodes.json").write_text(json.dumps(nodes))
    return d, meta


def test_plan_prints_a_table_and_summary_and_validates(files, williw) -> None:
    d, meta = files
    out = williw("plan", str(d / "meta.json"), "--nodes", str(d / "nodes.json"), "-o", str(d / "plan.json"),
                 check=True).stdout.splitlines()
    assert out[0].split() == ["node", "stage", "blocks", "tensors", "compute", "weights", "kv", "activations",
                              "headroom", "prefill", "decode", "util"]
    assert [line.split()[:3] for line in out[2:4]] == [["b", "0", "[0,"], ["a", "1", "[2,"]]
    assert out[4].startswith("pipeline (prefill): 2 of 3 nodes, bottleneck ")
    assert ", exact), prefill " in out[4] and out[4].endswith(" tokens/s predicted")
    assert out[5].startswith("holds batch 1 x context 512; at most context ")
    smallest = min(b.bytes + (b.kv_bytes_per_token + b.activation_bytes_per_token) * 512 for b in meta.blocks)
    assert out[6] == f"excluded tiny: cannot hold a single block: the smallest needs {smallest / 1e6:.2f} MB, it " \
        "has 1,000 bytes"
    assert out[7] == f"wrote {d / 'plan.json'}"
    plan = json.loads((d / "plan.json").read_text())
    assert plan["@plan"]["stages"] == ["b", "a"] and plan["a"]["blocks"] == [2, 4]

    ok = williw("validate", str(d / "meta.json"), str(d / "plan.json"), "--nodes", str(d / "nodes.json"))
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, f"{d / 'plan.json'}: valid pipeline plan, 2 nodes, "
                                                       f"{len(meta.layers)} tensors\n", "")


def test_plan_json_is_the_plan(files) -> None:
    d, meta = files
    result = CliRunner().invoke(cli, ["plan", str(d / "meta.json"), "--nodes", str(d / "nodes.json"), "--json",
                                      "--objective", "decode", "--strategy", "pipeline"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["@plan"]["objective"] == "decode"
    assert plan["@plan"]["bottleneck_s"] == plan["@plan"]["decode_bottleneck_s"] > 0
    assert sum(len(v["layer_names"]) for k, v in plan.items() if k != "@plan") == len(meta.layers)


def test_validate_reports_every_problem_and_exits_2(files, williw) -> None:
    d, meta = files
    plan = json.loads((d / "plan.json").read_text()) if (d / "plan.json").exists() else None
    if plan is None:
        williw("plan", str(d / "meta.json"), "--nodes", str(d / "nodes.json"), "-o", str(d / "plan.json"),
               check=True)
        plan = json.loads((d / "plan.json").read_text())
    lost = plan["a"]["layer_names"].pop()
    plan["a"]["layer_names"].append("ghost")
    (d / "broken.json").write_text(json.dumps(plan))
    bad = williw("validate", str(d / "meta.json"), str(d / "broken.json"))
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == (f"error: the plan has 2 problems: node 'a': unknown tensor 'ghost'; tensor '{lost}' is "
                          "not assigned to any node\n")
    js = williw("validate", str(d / "meta.json"), str(d / "broken.json"), "--json")
    assert js.returncode == 2
    assert json.loads(js.stdout) == {"valid": False, "plan": str(d / "broken.json"), "problems": [
        "node 'a': unknown tensor 'ghost'", f"tensor '{lost}' is not assigned to any node"]}


def test_bad_nodes_file_is_one_line(files, williw, tmp_path) -> None:
    d, _ = files
    (tmp_path / "nodes.yaml").write_text("- node_id: a\n  compute_tflops: fast\n  memory_gb: 1\n")
    bad = williw("plan", str(d / "meta.json"), "--nodes", str(tmp_path / "nodes.yaml"))
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == (f"error: '{tmp_path / 'nodes.yaml'}': entry 0 (node 'a'): field 'compute_tflops' must be "
                          "a finite number in [1e-6, 1e9], got 'fast'\n")


def test_infeasible_plan_is_one_line(files, williw, tmp_path) -> None:
    d, meta = files
    (tmp_path / "n.json").write_text(json.dumps([{"node_id": "a", "compute_tflops": 1, "memory_gb": 1e-6}]))
    bad = williw("plan", str(d / "meta.json"), "--nodes", str(tmp_path / "n.json"))
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: no node can hold a single block: the smallest block needs ")


def test_plan_command_does_not_import_torch() -> None:
    code = ("import sys; from williw.cli import cli; import williw.planner, williw.fleet; "
            "print(sorted(m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_context_length_beyond_int64_is_one_line(files, williw) -> None:
    # Found by the session's breaker: 10**400 tokens passed the option's check and overflowed a float in the
    # planner's messages (a traceback, exit 1). The same bound as the metadata's integers.
    d, meta = files
    bad = williw("plan", str(d / "meta.json"), "--nodes", str(d / "nodes.json"), "--context-length", str(10**400))
    assert (bad.returncode, bad.stdout) == (2, "")
    assert "Invalid value for '--context-length'" in bad.stderr and "Traceback" not in bad.stderr
    with pytest.raises(PlanError, match=r"^the batch size must be an integer in \[1, 9223372036854775807\], got 1"):
        make_plan(meta, [Node("a", 1.0, 1.0)], batch_size=10**19)
