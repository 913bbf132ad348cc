"""The long-running commands as real processes: `williw serve-model`, `williw node` (its identity file, its stop on
SIGTERM mid-pull) and `williw run`. Each test waits for events (a line printed, a state on the worker, a connection
accepted), with generous limits, never for a fixed time."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import httpx

from test_split_helpers import raw_tensors
from williw.client import WorkerClient
from williw.metadata import generate_metadata
from williw.shards import sha256_file
from workerproc import VENV_BIN, WorkerProcess, _read_line

TOKEN = "cli-admin"


def _popen(*args: str, **kwargs) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "WILLIW_TOKEN"}
    return subprocess.Popen([str(VENV_BIN / "williw"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**env, "WILLIW_NO_PROGRESS": "1"}, **kwargs)


def _first_json_line(proc: subprocess.Popen[str], timeout: float = 60) -> dict:
    """The first JSON document the process prints (``--json`` output is indented over several lines)."""
    text = ""
    deadline = time.monotonic() + timeout
    while True:
        line = _read_line(proc, max(0.1, deadline - time.monotonic()))
        assert line, f"no startup output within {timeout} s (exit code {proc.poll()}); got {text!r}"
        text += line
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            continue


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


def _wait_for(what: str, check, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)
    return found


def test_serve_model_serves_the_folder_with_ranges(tiny_llama: Path) -> None:
    proc = _popen("serve-model", str(tiny_llama), "--port", "0", "--json")
    try:
        info = _first_json_line(proc)
        assert info["files"] == sorted(p.name for p in tiny_llama.iterdir() if p.is_file())
        data = (tiny_llama / "model.safetensors").read_bytes()
        with httpx.Client(base_url=info["url"], timeout=30) as http:
            part = http.get("/model.safetensors", headers={"Range": "bytes=100-1099"})
            whole = http.get("/config.json")
            outside = http.get(f"/%2e%2e/{tiny_llama.name}/config.json")
            stats = http.get("/_stats").json()
        assert (part.status_code, part.content) == (206, data[100:1100])
        assert whole.content == (tiny_llama / "config.json").read_bytes()
        assert outside.status_code == 404
        assert stats["bytes_sent"]["model.safetensors"] == 1000
    finally:
        _stop(proc)


class StallingServer:
    """Accepts connections and never answers: a model source on which a pull hangs mid-request."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.accepted.set()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_node_agent_identity_file_and_sigterm_mid_pull(tiny_llama: Path, tmp_path: Path) -> None:
    meta = json.loads(json.dumps(generate_metadata(tiny_llama, model_name="t/tiny").to_dict()))
    stall = StallingServer()
    data_dir = tmp_path / "node-a"
    with WorkerProcess(f"sqlite:///{tmp_path / 'worker.db'}", TOKEN) as worker, \
            WorkerClient(worker.url, TOKEN) as admin:
        agent = _popen("node", "--worker", worker.url, "--node-id", "node-a", "--compute-tflops", "1",
                       "--memory-gb", "1", "--data-dir", str(data_dir), "--token", TOKEN, "--heartbeat-s", "0.5",
                       "--poll-s", "0.1", "--serve-host", "none", "--json")
        try:
            assert _first_json_line(agent)["status"] == "running"

            # The node token is kept in node.json, readable by its owner only, and it is the node's credential.
            identity = data_dir / "node.json"
            assert stat.S_IMODE(identity.stat().st_mode) == 0o600
            token = json.loads(identity.read_text())["node_token"]
            assert token.startswith("wn_")
            assert WorkerClient(worker.url, token, retries=0).heartbeat("node-a")["node_id"] == "node-a"

            rid = admin.create_request("t/tiny")["request_id"]
            admin.process(rid, metadata=meta)
            admin.distribute(rid, stall.url)
            assert stall.accepted.wait(60), "the agent never started pulling"
            _wait_for("the 'pulling' report", lambda: admin.request_assignments(rid)["assignments"][0]["state"]
                      == "pulling")

            # Mid-pull, its reader blocked on a source that never answers: SIGTERM stops it within 3 s.
            start = time.monotonic()
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
            elapsed = time.monotonic() - start
            # 3 s is the agent's own deadline for its pull threads; 1 s more for a loaded machine to schedule it.
            assert elapsed < 4.0, f"the agent took {elapsed:.2f} s to stop"
            assert agent.returncode == 0
            # Nothing that looks like a shard was left: no manifest, no weights file under its final name.
            assert list(data_dir.rglob("shard.json")) == [] and list(data_dir.rglob("model.safetensors")) == []
        finally:
            _stop(agent)
            stall.close()


def test_williw_run_with_local_nodes(tiny_llama: Path, tmp_path: Path) -> None:
    nodes = {"nodes": [{"node_id": "run-a", "compute_tflops": 2.0, "memory_gb": 0.0012},
                       {"node_id": "run-b", "compute_tflops": 1.0, "memory_gb": 0.0012}]}
    (tmp_path / "nodes.json").write_text(json.dumps(nodes))
    args = ("run", str(tiny_llama), "--local-nodes", str(tmp_path / "nodes.json"), "--work-dir",
            str(tmp_path / "work"), "--model-name", "t/tiny", "--sequence-length", "32", "--timeout", "120",
            "--json")
    proc = _popen(*args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert [(s["step"], s["status"]) for s in result["steps"]] == [
        ("request", "done"), ("download", "skipped"), ("metadata", "done"), ("upload", "skipped"),
        ("process", "done"), ("plan", "done"), ("distribute", "done")]
    assert sorted(result["shards"]) == ["run-a", "run-b"]
    source = raw_tensors(tiny_llama / "model.safetensors")
    held = set()
    for node_id, shard in result["shards"].items():
        folder = Path(shard["shard_path"])
        assert folder.is_relative_to(tmp_path / "work" / "nodes" / node_id)
        assert sha256_file(folder / "model.safetensors") == shard["sha256"]
        raw = raw_tensors(folder / "model.safetensors")
        assert all(raw[n] == source[n] for n in raw)
        held |= set(raw)
    assert held == set(source)
    assert err == ""  # no progress bars or warnings on the terminal
