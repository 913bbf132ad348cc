"""The worker's planning process: it plans like the planner in-process, and it never outlives the worker (stopped
or SIGKILLed)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from williw.metadata import generate_metadata
from williw.worker.planning import PlanningPool, plan_dict
from workerproc import WorkerProcess

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

FLEET = [{"node_id": "a", "compute_tflops": 40.0, "memory_gb": 8.0, "labels": []},
         {"node_id": "b", "compute_tflops": 20.0, "memory_gb": 8.0, "labels": []}]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_pool_plans_like_the_planner_in_process(tiny_llama):
    meta = json.loads(json.dumps(generate_metadata(tiny_llama, model_name="tiny/llama").to_dict()))
    args = (meta, "metadata", FLEET, (("c", "offline: last heartbeat 99 s ago (TTL 30 s)"),), "pipeline", "prefill")
    pool = PlanningPool()
    try:
        assert asyncio.run(pool.plan_dict(*args)) == plan_dict(*args)
    finally:
        pool.close()


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_the_planning_process_ends_with_the_worker(tmp_path, how):
    worker = WorkerProcess(f"sqlite:///{tmp_path / 'w.db'}", "t").start()
    deadline = time.monotonic() + 20
    # Two: the planning process and multiprocessing's resource tracker.
    while len(children := _children(worker.proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(children) == 2, f"the worker started {children}, not a planning process"
    worker.stop() if how == "stop" else worker.kill()
    deadline = time.monotonic() + 5  # the child checks for its parent every second
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if _alive(p)], f"left running after {how}: {children}"
    assert os.path.exists(tmp_path / "w.db")
