"""A split killed with SIGKILL at any step leaves no shard that looks complete, and a re-run finishes it exactly.

The kill points are real: ``WILLIW_TEST_KILL_AT`` makes the ``williw split`` process SIGKILL itself at a named
step (williw.fsutil.kill_point), so each test crashes at exactly the step it names, whatever the machine's load.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import VENV_BIN
from test_split_helpers import greedy_plan, raw_tensors, write_sharded_model
from williw.planner.plan import save_plan
from williw.splitter import check_shards

# 3 files of 8 tensors of 256 KiB: small and quick, yet each shard interleaves bytes of every file.
FILES, TENSORS_PER_FILE, ROWS, COLS = 3, 8, 256, 512


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sharded_model(tmp_path_factory.mktemp("kill-model"), FILES, TENSORS_PER_FILE, ROWS, COLS)


@pytest.fixture(scope="module")
def finished(model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, list[str]]:
    """The plan, its uninterrupted split (the reference for every byte), and the split command's arguments."""
    tmp = tmp_path_factory.mktemp("kill-reference")
    plan = greedy_plan(model, 3)
    save_plan(plan, tmp / "plan.json")
    args = ["split", str(model), "--plan", str(tmp / "plan.json"), "--all", "--json"]
    subprocess.run(_cmd(args, tmp / "shards"), check=True, capture_output=True, env=_env(None))
    return plan, tmp / "shards", args


def _cmd(args: list[str], out: Path) -> list[str]:
    return [str(VENV_BIN / "williw"), *args, "-o", str(out)]


def _env(kill_at: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "WILLIW_TEST_KILL_AT"}
    return {**env, "WILLIW_NO_PROGRESS": "1", **({"WILLIW_TEST_KILL_AT": kill_at} if kill_at else {})}


def _files(shard_dir: Path) -> list[str]:
    return sorted(p.name if not p.name.endswith(".incomplete") else "<temporary>" for p in shard_dir.iterdir())


def _assert_prefix_of(temporaries: list[Path], reference: Path, whole: bool) -> None:
    (tmp,) = temporaries
    data, ref = tmp.read_bytes(), reference.read_bytes()
    assert 0 < len(data) <= len(ref) and ref.startswith(data)  # what was written is right, only not all of it
    if not whole:
        assert len(data) < len(ref)


@pytest.mark.parametrize("point", ["split-copying", "split-copied", "split-renamed", "split-manifest"])
def test_sigkill_at_each_step_then_rerun(finished, model: Path, tmp_path: Path, point: str):
    plan, reference, args = finished
    out = tmp_path / "shards"
    nodes = [a.node_id for a in plan.assignments]

    killed = subprocess.run(_cmd(args, out), capture_output=True, text=True, env=_env(point))

    assert killed.returncode == -signal.SIGKILL, killed.stderr  # it died at the point, not before or after
    left = {n: _files(out / n) for n in nodes}
    manifest_msg = "'{}': no shard manifest (the shard is missing or its split did not finish)"
    if point in ("split-copying", "split-copied"):
        # Only temporaries, each a correct prefix of its final file (while copying: a strict prefix).
        assert left == dict.fromkeys(nodes, ["<temporary>"])
        for n in nodes:
            _assert_prefix_of(list((out / n).glob("*.incomplete")), reference / n / "model.safetensors",
                              whole=point == "split-copied")
    else:
        # Killed between the weights' rename and the manifests: complete weights, but no shard looks complete.
        complete = nodes[:1] if point == "split-manifest" else []
        assert left == {n: ["config.json", "model.safetensors", "shard.json"] if n in complete
                        else ["model.safetensors"] for n in nodes}
        for n in nodes:
            assert (out / n / "model.safetensors").read_bytes() == (reference / n / "model.safetensors").read_bytes()
        report = check_shards(out, plan, model)
        assert [c.ok for c in report.nodes] == [n in complete for n in nodes]
        assert [c.problems[0] for c in report.nodes if not c.ok] == [
            f"node '{n}': " + manifest_msg.format(out / n / "shard.json") for n in nodes if n not in complete]

    rerun = subprocess.run(_cmd(args, out), capture_output=True, text=True, env=_env(None))

    assert rerun.returncode == 0, rerun.stderr
    assert [s["status"] for s in json.loads(rerun.stdout)["shards"]] == \
        ["skipped" if point == "split-manifest" and n == nodes[0] else "written" for n in nodes]
    for n in nodes:
        assert _files(out / n) == ["config.json", "model.safetensors", "shard.json"]  # temporaries removed
        for name in ("model.safetensors", "shard.json"):
            assert (out / n / name).read_bytes() == (reference / n / name).read_bytes()
    source = {}
    for f in sorted(model.glob("*.safetensors")):
        source.update(raw_tensors(f))
    for a in plan.assignments:
        raw = raw_tensors(out / a.node_id / "model.safetensors")
        assert sorted(raw) == sorted(a.tensor_names) and all(raw[n] == source[n] for n in raw)
    assert check_shards(out, plan, model).ok
