"""A pull killed half-way resumes from the bytes on disk: the re-run fetches only the missing tensor bytes
(counted by the real server), and a re-run on a complete shard makes no request at all (issue 16)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import VENV_BIN
from test_split_helpers import greedy_plan, raw_tensors, write_sharded_model
from williw.header import FIRST_RANGE_BYTES
from williw.planner.plan import save_plan
from williw.pull import pull_shard
from williw.serve import ModelServer
from williw.shards.manifest import safetensors_prefix, shard_layout
from williw.shards.resume import local_segments, subtract
from williw.splitter import check_shards, open_source


def _overlap(intervals: list[tuple[int, int]], lo: int, hi: int) -> int:
    return sum(max(0, min(e, hi) - max(s, lo)) for s, e in intervals)


FILES, TENSORS_PER_FILE, ROWS, COLS = 3, 8, 1024, 4096  # 3 files of 64 MiB: a pull takes long enough to kill


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sharded_model(tmp_path_factory.mktemp("big-model"), FILES, TENSORS_PER_FILE, ROWS, COLS)


def test_a_killed_pull_resumes_from_the_bytes_on_disk(big_model: Path, tmp_path: Path):
    plan = greedy_plan(big_model, 1)  # one node holds everything: a 192 MiB shard
    node = plan.assignments[0].node_id
    save_plan(plan, tmp_path / "plan.json")
    out = tmp_path / "shards"
    server = ModelServer(big_model).start()
    try:
        cmd = [str(VENV_BIN / "williw"), "pull", server.url, "--plan", str(tmp_path / "plan.json"), "--node", node,
               "-o", str(out), "--json"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "WILLIW_NO_PROGRESS": "1"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in out.glob("*/*.incomplete") if p.stat().st_size > 16 << 20] if out.exists() else []
            if partial:
                break
            time.sleep(0.002)
        assert proc.poll() is None, "the pull finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        (partial,) = out.glob(f"{node}/*.incomplete")
        _, tensors, _ = open_source(big_model)
        mine = [tensors[n] for n in plan.assignments[0].tensor_names]
        prefix = len(safetensors_prefix(shard_layout(mine)))
        have = partial.stat().st_size
        total = prefix + sum(t.nbytes for t in mine)
        assert prefix < have < total
        local = local_segments(mine, have)
        expected = {}
        for f in sorted(big_model.glob("*.safetensors")):
            size = f.stat().st_size
            wanted = [(min(t.start for t in mine if t.file == f.name), size)]
            missing = subtract(wanted, local.get(f.name, []))
            expected[f.name] = FIRST_RANGE_BYTES + _overlap(missing, FIRST_RANGE_BYTES, size)
        assert sum(expected.values()) < total - have + 3 * FIRST_RANGE_BYTES + 1

        # The server may still be writing a response to the killed process: count from when its counters settle.
        before, settle_by = dict(server.bytes_sent), time.monotonic() + 30
        while time.monotonic() < settle_by:
            time.sleep(0.5)
            if (now := dict(server.bytes_sent)) == before:
                break
            before = now
        r = pull_shard(server.url, plan, node, out)
        fetched = {f: server.bytes_sent[f] - before.get(f, 0) for f in expected}
        assert fetched == expected
        assert not r.skipped and r.shard_bytes == total
        source = {}
        for f in sorted(big_model.glob("*.safetensors")):
            source.update(raw_tensors(f))
        raw = raw_tensors(out / node / "model.safetensors")
        assert sorted(raw) == sorted(plan.assignments[0].tensor_names) and all(raw[n] == source[n] for n in raw)
        assert check_shards(out, plan, big_model).ok
        assert sorted(p.name for p in (out / node).iterdir()) == ["config.json", "model.safetensors", "shard.json"]

        before = dict(server.bytes_sent)
        again = pull_shard(server.url, plan, node, out)
        assert (again.skipped, again.requests, again.bytes_downloaded) == (True, 0, 0)
        assert dict(server.bytes_sent) == before
    finally:
        server.shutdown()
        server.server_close()
