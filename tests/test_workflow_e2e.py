"""The complete workflow with real processes: a `williw worker`, three `williw node` agents, the user node's
`NodeClient` in this process serving the model folder (or the fake Hub as the source), and faults on the way."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from williw import tinymodels
from williw.client import WorkerClient
from williw.workflow import NodeClient, WorkflowError
from workerproc import VENV_BIN, WorkerProcess

NODES = (("node-a", 8.0, 0.0016), ("node-b", 4.0, 0.0016), ("node-c", 2.0, 0.0016))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wf") / "model"
    tinymodels.build_causal_lm(path, "llama", layers=8, shard_bytes=400_000)
    return path


class Fleet:
    """A worker and node agent processes, all stopped by `close`."""

    def __init__(self, tmp: Path, node_ttl: float = 3.0, extra_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.worker = WorkerProcess(f"sqlite:///{tmp / 'worker.db'}", node_ttl=node_ttl, extra_args=extra_args,
                                    log_path=tmp / "worker.log").start()
        self.nodes: dict[str, subprocess.Popen] = {}

    def start_node(self, node_id: str, tflops: float, memory_gb: float) -> None:
        log = open(self.tmp / f"{node_id}.log", "a")  # noqa: SIM115 - the process owns it
        self.nodes[node_id] = subprocess.Popen(
            [str(VENV_BIN / "williw"), "node", "--worker", self.worker.url, "--node-id", node_id,
             "--compute-tflops", str(tflops), "--memory-gb", str(memory_gb), "--data-dir", str(self.tmp / node_id),
             "--heartbeat-s", "0.5", "--poll-s", "0.1"], stdout=log, stderr=subprocess.STDOUT)

    def start_all(self) -> Fleet:
        for n in NODES:
            self.start_node(*n)
        with WorkerClient(self.worker.url) as c:
            deadline = time.monotonic() + 30
            while len(c.list_nodes(online=True)) < len(NODES):
                assert time.monotonic() < deadline, "node agents did not register"
                time.sleep(0.05)
        return self

    def close(self) -> None:
        try:
            for p in self.nodes.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGCONT)
                    p.terminate()
            for p in self.nodes.values():
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        finally:
            self.worker.stop()


@pytest.fixture
def fleet(tmp_path: Path):
    f = Fleet(tmp_path)
    try:
        yield f.start_all()
    finally:
        f.close()


def source_tensors(model: Path) -> dict[str, bytes]:
    out = {}
    for file in model.glob("*.safetensors"):
        with safe_open(file, "np") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[name] = f.get_tensor(name).tobytes()
    return out


def assert_shards_exact(result, model: Path, worker_url: str) -> None:
    src = source_tensors(model)
    for node_id, shard in result.shards.items():
        with safe_open(Path(shard["shard_path"]) / "model.safetensors", "np") as f:
            names = list(f.keys())
            for name in names:
                assert f.get_tensor(name).tobytes() == src[name], f"{node_id}: {name} differs from the source"
        assert set(result.plan[node_id]["layer_names"]) <= set(names)
    with WorkerClient(worker_url) as c:
        records = c.request_assignments(result.request_id)["assignments"]
    assert {r["node_id"]: r["state"] for r in records} == {n: "ready" for n in result.plan if n != "@plan"}
    assert {r["node_id"]: r["sha256"] for r in records} == {n: s["sha256"] for n, s in result.shards.items()}


def test_run_distributes_every_shard_and_resumes(fleet: Fleet, model: Path, tmp_path: Path) -> None:
    client = NodeClient(fleet.worker.url, node_id="user", work_dir=tmp_path / "run", model_label="t/tiny",
                        timeout_s=60)
    result = client.execute_complete_workflow(str(model), 1, 32)
    assert [(s.step, s.status) for s in result.steps] == [
        ("request", "done"), ("download", "skipped"), ("metadata", "done"), ("upload", "skipped"),
        ("process", "done"), ("plan", "done"), ("distribute", "done")]
    assert len(result.shards) == 3
    assert_shards_exact(result, model, fleet.worker.url)

    again = NodeClient(fleet.worker.url, node_id="user", work_dir=tmp_path / "run", model_label="t/tiny",
                       timeout_s=60).execute_complete_workflow(str(model), 1, 32)
    assert again.request_id == result.request_id
    # the plan is read again (cheap, and it must be the one in force); ready shards are not pulled again
    assert [s.status for s in again.steps] == ["skipped"] * 5 + ["done", "done"]
    assert again.shards == result.shards

    # Each agent said one line per state change: registered, pulling, ready (path and seconds), stopped.
    for p in fleet.nodes.values():
        p.terminate()
        p.wait(10)
    rid = result.request_id
    for node_id, shard in result.shards.items():
        lines = (tmp_path / f"{node_id}.log").read_text().splitlines()
        assert lines[0] == (f"node {node_id} registered with {fleet.worker.url}; shards go to {tmp_path / node_id} "
                            "(Ctrl-C to stop)")
        assert lines[1] == f"node {node_id} pulling request {rid} plan version 1"
        assert re.fullmatch(rf"node {node_id} ready: request {rid} plan version 1 at "
                            rf"{re.escape(shard['shard_path'])} in [0-9.]+ s", lines[2]), lines[2]
        assert lines[3:] == [f"node {node_id} stopped (1 shard(s) ready, 0 failed)"]


class _SlowServer:
    """Patch the in-process model server so each range of a weights file takes 0.3 s: long enough to kill
    processes in the middle of a pull."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import williw.serve as serve

        class Handler(serve._Handler):
            def _send_file(self, f, start: int, end: int) -> int:
                if f.name.endswith(".safetensors"):
                    time.sleep(0.3)
                return super()._send_file(f, start, end)

        class Slow(serve.ModelServer):
            def __init__(self, *a, **k) -> None:
                super().__init__(*a, **k)
                self.RequestHandlerClass = Handler

        monkeypatch.setattr(serve, "ModelServer", Slow)


def _wait_state(url: str, node_id: str, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with WorkerClient(url) as c:
        while time.monotonic() < deadline:
            try:
                if any(a["state"] == state for a in c.node_assignments(node_id)):
                    return
            except Exception:  # noqa: BLE001, S110 - the worker may be restarting
                pass
            time.sleep(0.02)
    raise AssertionError(f"{node_id} never reached {state}")


def _run_in_thread(client: NodeClient, model: Path) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def go() -> None:
        try:
            out["result"] = client.execute_complete_workflow(str(model), 1, 32)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


def test_agent_killed_mid_pull_and_worker_restart_lose_nothing(tmp_path: Path, model: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _SlowServer(monkeypatch)
    fleet = Fleet(tmp_path, node_ttl=6.0).start_all()
    try:
        client = NodeClient(fleet.worker.url, work_dir=tmp_path / "run", model_label="t/tiny", timeout_s=60)
        thread, out = _run_in_thread(client, model)
        _wait_state(fleet.worker.url, "node-a", "pulling")
        fleet.nodes["node-a"].send_signal(signal.SIGKILL)
        fleet.nodes["node-a"].wait(5)
        fleet.worker.restart()
        fleet.start_node(*NODES[0])  # same data dir: reuses its saved node token and its partial work
        thread.join(90)
        assert "error" not in out, out.get("error")
        assert_shards_exact(out["result"], model, fleet.worker.url)
        with WorkerClient(fleet.worker.url) as c:
            assert {n["node_id"] for n in c.list_nodes(online=True)} == {"node-a", "node-b", "node-c"}
    finally:
        fleet.close()


def test_node_that_stops_heartbeating_fails_the_run(tmp_path: Path, model: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _SlowServer(monkeypatch)
    # 4 s, not 1.5: the agents heartbeat every 0.5 s while they pull, and on a loaded machine a live agent could
    # miss three in a row and be named instead of node-b. The wait below is for the event, up to 60 s.
    fleet = Fleet(tmp_path, node_ttl=4.0).start_all()
    try:
        client = NodeClient(fleet.worker.url, work_dir=tmp_path / "run", model_label="t/tiny", timeout_s=60)
        thread, out = _run_in_thread(client, model)
        _wait_state(fleet.worker.url, "node-b", "pulling")
        fleet.nodes["node-b"].send_signal(signal.SIGSTOP)  # alive but silent: no heartbeat, no progress
        thread.join(60)
        err = out.get("error")
        assert isinstance(err, WorkflowError), out
        assert err.step == "distribute"
        assert str(err).startswith("step 'distribute' failed: node 'node-b' stopped heartbeating before its shard "
                                   "was ready (last heartbeat ")
        assert str(err).endswith(" s ago, state 'pulling')")
    finally:
        fleet.close()


def test_run_through_the_hub(tmp_path: Path, model: Path, fake_hub, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.add_repo("org/tiny", model)
    fake_hub.add_token("hf_write", write=True)
    monkeypatch.setenv("HF_TOKEN", "hf_write")  # the node processes inherit it and HF_ENDPOINT
    # A 6 s TTL, not 3: at load average 10 a live agent's heartbeat (every 0.5 s) once lapsed for 3 s, and the
    # worker re-planned around it too (version 3) after the victim's version 2.
    fleet = Fleet(tmp_path, node_ttl=6.0, extra_args=("--hub-endpoint", fake_hub.url)).start_all()
    try:
        client = NodeClient(fleet.worker.url, "hf_write", "org/williw-metadata", "user", work_dir=tmp_path / "run",
                            pull_from="hub", timeout_s=60, auto_replan=True)
        result = client.execute_complete_workflow("org/tiny", 1, 32)
        # Nothing to download: the metadata comes from the repo's headers, the nodes pull from the Hub.
        assert [s.status for s in result.steps] == ["done", "skipped"] + ["done"] * 5
        assert not (tmp_path / "run" / "model").exists()
        assert result.source == "org/tiny"
        assert "org/williw-metadata" in fake_hub.repos
        assert_shards_exact(result, model, fleet.worker.url)

        # With auto_replan, a node that dies is re-planned around, its blocks pulled from the Hub again.
        victim = next(n for n in ("node-c", "node-b", "node-a") if n in result.plan)
        fleet.nodes[victim].kill()
        with WorkerClient(fleet.worker.url) as c:
            assert c.request_plans(result.request_id)["auto_replan"] == {"max_slowdown": 0.05, "max_step_bytes": None}
            deadline = time.monotonic() + 60
            while (plans := c.request_plans(result.request_id))["plan_version"] < 2:
                assert time.monotonic() < deadline, plans
                time.sleep(0.1)
            assert plans["plan_version"] == 2, plans  # a later version: another node was taken for gone
            assert plans["migration"]["reason"] == f"{victim} left" and plans["migration"]["model_bytes"] > 0
            v2 = c.get_plan(result.request_id)
            src = source_tensors(model)
            for a in c.request_assignments(result.request_id)["assignments"]:
                assert a["node_id"] != victim and a["plan_version"] == 2
                with safe_open(Path(a["shard_path"]) / "model.safetensors", "np") as f:
                    assert sorted(f.keys()) == sorted(v2[a["node_id"]]["layer_names"])
                    assert all(f.get_tensor(t).tobytes() == src[t] for t in f.keys())  # noqa: SIM118
    finally:
        fleet.close()
