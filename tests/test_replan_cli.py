"""``williw replan`` as a user runs it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from test_planner_pipeline import build_meta
from williw.cli import cli
from williw.fleet import Node
from williw.metadata import save_metadata
from williw.planner import make_plan, save_plan


@pytest.fixture
def files(tmp_path):
    meta = build_meta([(10, 3)] * 8)
    save_metadata(meta, tmp_path / "meta.json")
    nodes = [Node("a", 1.0, 10e-9), Node("b", 1.0, 10e-9), Node("c", 2.0, 20e-9)]
    save_plan(make_plan(meta, nodes), tmp_path / "plan.json")  # b [0, 2), a [2, 4), c [4, 8)
    after = [nodes[0], nodes[2], Node("d", 1.0, 10e-9)]  # b left, d joined
    (tmp_path / "nodes.json").write_text(json.dumps([v.to_dict() for v in after]))
    return tmp_path


def test_replan_writes_the_plan_and_migration_and_prints_the_figures(files) -> None:
    d = files
    result = CliRunner().invoke(cli, ["replan", str(d / "meta.json"), "--plan", str(d / "plan.json"), "--nodes",
                                      str(d / "nodes.json"), "-o", str(d / "new.json"), "--migration",
                                      str(d / "mig.json"), "--max-step-bytes", "4"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[2:] == [
        "d         0  [0, 2)   7 bytes  7 bytes     0 bytes  20.0 ms",
        "a         1  [2, 4)   6 bytes  0 bytes     0 bytes  20.0 ms",
        "c         2  [4, 8)  13 bytes  0 bytes     0 bytes  20.5 ms",
        "plan v2 (prefill): bottleneck before - ('b' left), after 20.5 ms (best 20.5 ms, bound +5% 21.5 ms)",
        "bytes moved 7 bytes (fewest possible); a fresh plan moves 7 bytes",
        "migration: 2 pull steps (0 bytes from peers), switch to v2, 0 drop steps",
        f"wrote {d / 'new.json'}",
        f"wrote {d / 'mig.json'}"]
    new = json.loads((d / "new.json").read_text())
    assert new["@plan"]["version"] == 2 and new["@plan"]["stages"] == ["d", "a", "c"]
    steps = json.loads((d / "mig.json").read_text())["steps"]
    assert [(s["action"], s.get("tensors")) for s in steps] == [
        ("pull", ["emb", "h.0.w"]), ("pull", ["h.1.w"]), ("switch", None)]


def test_replan_json_carries_the_plan_and_schedule_when_not_written(files) -> None:
    d = files
    result = CliRunner().invoke(cli, ["replan", str(d / "meta.json"), "--plan", str(d / "plan.json"), "--nodes",
                                      str(d / "nodes.json"), "--json", "--max-slowdown", "0"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert {k: out[k] for k in ("version", "bytes_moved", "fresh_bytes_moved", "bottleneck_before_s",
                                "bottleneck_after_s", "bound_s", "departed", "joined", "exact")} == {
        "version": 2, "bytes_moved": 7, "fresh_bytes_moved": 7, "bottleneck_before_s": None,
        "bottleneck_after_s": 0.0205, "bound_s": 0.0205, "departed": ["b"], "joined": ["d"], "exact": True}
    assert out["plan"]["@plan"]["version"] == 2
    assert out["migration_schedule"]["pull_bytes"] == 7


def test_replan_errors_are_one_line_and_exit_2(files, williw) -> None:
    d = files
    bad = williw("replan", str(d / "meta.json"), "--plan", str(d / "plan.json"), "--nodes", str(d / "nodes.json"),
                 "--max-step-bytes", "0")
    assert (bad.returncode, bad.stdout, bad.stderr) == (
        2, "", "error: max_step_bytes must be a positive integer of bytes, got 0\n")
    missing = williw("replan", str(d / "meta.json"), "--plan", str(d / "none.json"), "--nodes", str(d / "nodes.json"))
    assert (missing.returncode, missing.stderr) == (2, f"error: '{d / 'none.json'}': no such plan file\n")
    # A link table replan would not price is refused, not silently dropped.
    nodes = json.loads((d / "nodes.json").read_text())
    (d / "linked.json").write_text(json.dumps({"nodes": nodes, "links": [{"between": ["a", "c"], "latency_ms": 9}]}))
    linked = williw("replan", str(d / "meta.json"), "--plan", str(d / "plan.json"), "--nodes", str(d / "linked.json"))
    assert (linked.returncode, linked.stderr) == (
        2, f"error: '{d / 'linked.json'}': williw replan does not price a link table ('links', 1 entry), only "
           "`williw plan` does: remove 'links' to use each node's own link\n")


def test_replan_for_the_latency_objective(tmp_path) -> None:
    # As tests/test_replan_latency.py's node leaving, in megabytes: 'b' takes a's blocks and two of c's, the least
    # within +60% of the best 6.5 ms per token; c keeps [4, 8).
    mb = 1_000_000
    meta = build_meta([(10, 3 * mb)] * 8, first=(0, mb), last=(1, mb))
    save_metadata(meta, tmp_path / "meta.json")
    a, c = Node("a", 1.0, 10e-3, 1.0), Node("c", 1.0, 20e-3, 2.0)
    save_plan(make_plan(meta, [a, c], objective="latency"), tmp_path / "plan.json")  # a [0, 2), c [2, 8)
    (tmp_path / "nodes.json").write_text(json.dumps([Node("b", 1.0, 30e-3, 4.0).to_dict(), c.to_dict()]))
    result = CliRunner().invoke(cli, ["replan", str(tmp_path / "meta.json"), "--plan", str(tmp_path / "plan.json"),
                                      "--nodes", str(tmp_path / "nodes.json"), "--max-slowdown", "0.6",
                                      "--objective", "latency"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[2:] == [
        "b         0  [0, 4)  13.00 MB  13.00 MB     6.00 MB  3.2 ms",
        "c         1  [4, 8)  13.00 MB   0 bytes     0 bytes  6.5 ms",
        "plan v2 (latency): seconds per token before - ('a' left), after 9.8 ms (best 6.5 ms, bound +60% 10.4 ms)",
        "bytes moved 13.00 MB (fewest possible); a fresh plan moves 26.00 MB",
        "migration: 2 pull steps (6.00 MB from peers), switch to v2, 1 drop steps"]


def test_a_plan_of_another_model_is_named_in_a_short_line(files, williw) -> None:
    # The plan covers 8 of the 30 blocks: the line named every problem (120 and 13 KB for a
    # 4-block MoE against a Llama's plan); split and show-plan already stop at 3.
    d = files
    save_metadata(build_meta([(10, 3)] * 30), d / "other.json")  # h.8 to h.29 are in no stage
    bad = williw("replan", str(d / "other.json"), "--plan", str(d / "plan.json"), "--nodes", str(d / "nodes.json"))
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr.startswith("error: the plan has ") and bad.stderr.count("\n") == 1
    assert bad.stderr.endswith(" more: williw validate lists them)\n") and bad.stderr.count("; ") == 2
