"""A split killed with SIGKILL half-way leaves no shard that looks complete, and a re-run finishes it exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import VENV_BIN
from test_split_helpers import greedy_plan, raw_tensors
from williw.header import serialize_header
from williw.planner.plan import save_plan
from williw.splitter import check_shards

# 3 files of 64 MiB: big enough that the copy takes a few hundred milliseconds, so the kill lands mid-copy.
FILES, TENSORS_PER_FILE, ROWS, COLS = 3, 8, 1024, 4096


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big-model")
    rng = np.random.default_rng(0)
    weight_map = {}
    for f in range(FILES):
        file = f"model-{f + 1:05d}-of-{FILES:05d}.safetensors"
        names = [f"model.layers.{f * TENSORS_PER_FILE + i}.mlp.up_proj.weight" for i in range(TENSORS_PER_FILE)]
        prefix, _ = serialize_header([(n, "F16", (ROWS, COLS)) for n in names], {"format": "pt"})
        with open(path / file, "wb") as out:
            out.write(prefix)
            for n in names:
                out.write(rng.bytes(ROWS * COLS * 2))
                weight_map[n] = file
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return path


def test_sigkill_mid_split_then_rerun(big_model: Path, tmp_path: Path):
    plan = greedy_plan(big_model, 3)
    save_plan(plan, tmp_path / "plan.json")
    out = tmp_path / "shards"
    cmd = [str(VENV_BIN / "williw"), "split", str(big_model), "--plan", str(tmp_path / "plan.json"), "--all",
           "-o", str(out), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "WILLIW_NO_PROGRESS": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in out.glob("*/*.incomplete") if p.stat().st_size > 8 << 20] if out.exists() else []
        if partial:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the split finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert list(out.glob("*/shard.json")) == []  # nothing looks complete
    assert list(out.glob("*/model.safetensors")) == []
    assert list(out.glob("*/*.incomplete"))  # the kill left its temporaries, which the re-run removes

    rerun = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WILLIW_NO_PROGRESS": "1"})
    assert rerun.returncode == 0, rerun.stderr
    assert [s["status"] for s in json.loads(rerun.stdout)["shards"]] == ["written"] * 3
    assert list(out.glob("*/*.incomplete")) == []
    source = {}
    for f in sorted(big_model.glob("*.safetensors")):
        source.update(raw_tensors(f))
    for a in plan.assignments:
        raw = raw_tensors(out / a.node_id / "model.safetensors")
        assert sorted(raw) == sorted(a.tensor_names) and all(raw[n] == source[n] for n in raw)
    assert check_shards(out, plan, big_model).ok
