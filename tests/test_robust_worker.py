"""Input at the edges reaches the worker over real HTTP and gets a documented answer: 422 with one-line
``{"detail": ...}``, never a 500, and the worker keeps serving what it served before (issue 16)."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import pytest

from williw.client import WorkerClient
from williw.metadata import generate_metadata
from workerproc import WorkerProcess, database

TOKEN = "robust-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
JSON = {**ADMIN, "Content-Type": "application/json"}
INT64_MAX = 2**63 - 1


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with database("sqlite", tmp_path_factory.mktemp("robust")) as url, WorkerProcess(url, TOKEN) as proc:
        yield proc


@pytest.fixture(scope="module")
def planned(worker, tiny_llama):
    """A request planned before any bad input, which must stay readable afterwards."""
    meta = json.loads(json.dumps(generate_metadata(tiny_llama, model_name="tiny/llama").to_dict()))
    with WorkerClient(worker.url, TOKEN) as c:
        c.register_node("a", 40.0, 8.0)
        c.register_node("b", 20.0, 8.0)
        rid = c.create_request("tiny/llama")["request_id"]
        plan = c.process(rid, metadata=meta)["plan"]
    return rid, plan, meta


def _raw(worker, path, content: bytes):
    return httpx.post(f"{worker.url}{path}", content=content, headers=JSON)


def _nested(depth: int) -> bytes:
    return b'{"request_id": "x", "metadata": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


@pytest.mark.parametrize(("content", "detail"), [
    (_nested(100_000), "body is not valid JSON (nested deeper than 64 levels)"),
    (_nested(600), "body is not valid JSON (nested deeper than 64 levels)"),
    (b'{"request_id": "\xff"}', "body is not UTF-8 (byte 16 is 0xff)"),
    (b'{"request_id": "x", "metadata": {"n": ' + b"9" * 5000 + b"}}",
     "body is not valid JSON (Exceeds the limit (4300 digits) for integer string conversion: value has 5000 "
     "digits; use sys.set_int_max_str_digits() to increase the limit)"),
    (b'{"request_id": "x", "metadata": {"n": NaN}}',
     "body is not valid JSON (NaN is not a number; only finite numbers are allowed)"),
    (b'{"request_id": "x", "metadata": {"n": -Infinity}}',
     "body is not valid JSON (-Infinity is not a number; only finite numbers are allowed)"),
    (b'{"request_id": "x", "metadata": {"n": 1e999}}',
     "body is not valid JSON (a number overflows a 64-bit float; only finite numbers are allowed)"),
])
def test_unparsable_bodies_are_422_naming_the_problem(worker, planned, content, detail):
    r = _raw(worker, "/api/process", content)
    assert (r.status_code, r.json()) == (422, {"detail": detail})


@pytest.mark.parametrize(("tflops", "got"), [(5e-324, "5e-324"), (1e308, "1e+308"), (0, "0.0")])
def test_node_numbers_outside_the_range_are_422(worker, tflops, got):
    r = httpx.post(f"{worker.url}/api/nodes", json={"node_id": "edge", "compute_tflops": tflops, "memory_gb": 1},
                   headers=ADMIN)
    assert (r.status_code, r.json()["detail"]) == (
        422, f"body field 'compute_tflops': must be a finite number in [1e-6, 1e9], got {got}")


def test_versions_above_int64_are_422_and_keep_the_connection(worker, planned):
    rid, _, _ = planned
    with httpx.Client(base_url=worker.url) as http:
        r = http.post("/api/get-plan", json={"request_id": rid, "version": INT64_MAX + 1})
        assert (r.status_code, r.json()["detail"]) == (
            422, f"body field 'version': Input should be less than or equal to {INT64_MAX}")
        r = http.get(f"/api/plans/{rid}.svg", params={"version": str(10**30)})
        assert (r.status_code, r.json()["detail"]) == (
            422, f"query field 'version': Input should be less than or equal to {INT64_MAX}")
        r = http.post("/api/get-plan", json={"request_id": rid, "version": INT64_MAX})
        assert r.status_code == 404


def test_metadata_numbers_outside_float64_sums_are_422(worker, planned):
    rid, _, meta = planned
    bad = dict(meta, total_compute=1e300)
    r = httpx.post(f"{worker.url}/api/process", json={"request_id": rid, "metadata": bad}, headers=ADMIN)
    assert (r.status_code, r.json()["detail"]) == (
        422, "'metadata': field 'total_compute' expected a finite number >= 0 and <= 1e+18, got 1e+300")


def test_the_worker_still_serves_the_earlier_request(worker, planned):
    rid, plan, _ = planned
    r = httpx.post(f"{worker.url}/api/get-plan", json={"request_id": rid})
    assert (r.status_code, r.json()) == (200, plan)


@pytest.mark.parametrize("revision", ["../../x", "main/..", "a//b", "/main"])
def test_a_revision_with_dot_dot_or_empty_parts_is_422(worker, planned, revision):
    rid, _, _ = planned
    r = httpx.post(f"{worker.url}/api/process", json={"request_id": rid, "metadata_repo": "a/b", "revision": revision},
                   headers=ADMIN)
    assert (r.status_code, r.json()["detail"]) == (
        422, f"body field 'revision': must be a branch, tag or commit without empty, '.' or '..' parts, got "
             f"{revision!r}")


def test_sigterm_leaves_no_leaked_semaphore_warning(tmp_path, tiny_llama):
    log = tmp_path / "worker.log"
    meta = json.loads(json.dumps(generate_metadata(tiny_llama, model_name="tiny/llama").to_dict()))
    with database("sqlite", tmp_path) as url:
        proc = WorkerProcess(url, TOKEN, log_path=log).start()
        try:
            with WorkerClient(proc.url, TOKEN) as c:  # the planning process has run
                c.register_node("a", 40.0, 8.0)
                c.process(c.create_request("tiny/llama")["request_id"], metadata=meta)
        finally:
            proc.stop()
    assert proc.proc.returncode in (0, -15)
    time.sleep(2)  # the resource tracker (its own process) warns after the worker is gone
    assert "leaked semaphore" not in log.read_text()


@pytest.mark.parametrize("length", [b"abc", b"99999999999999999999999", b"-5"])
def test_a_bad_content_length_is_a_json_400(worker, length):
    import socket

    from williw.worker.protocol import BAD_REQUEST

    host, port = worker.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /api/request HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                  + length + b"\r\n\r\n{}")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head
    assert json.loads(body) == {"detail": BAD_REQUEST}


def test_a_huggingface_hub_log_line_reaches_the_worker_log_once() -> None:
    """The worker's log once held every huggingface_hub retry twice (its own handler, and the root's)."""
    code = """
import logging, io
from williw.cli.worker import configure_logging
configure_logging("info")
logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
"""
    import subprocess
    import sys

    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert [line.split(": ", 1)[1] for line in err.splitlines()] == ["Retrying in 1s [Retry 1/5]."]


@pytest.mark.postgres
def test_connections_the_server_drops_are_a_json_503_then_served_again(tmp_path):
    """pg_terminate_backend (as a server restart or failover does) on every connection of a running worker: the
    next call on each stale pooled connection is a one-line 503 (was a plain-text 500, a traceback in the log and
    the client's connection closed), and the call after it is served."""
    from sqlalchemy import create_engine, text

    log = tmp_path / "worker.log"
    with database("postgres", tmp_path) as url:
        name = f"williw-robust-{time.time_ns()}"
        proc = WorkerProcess(f"{url}&application_name={name}", log_path=log).start()
        try:
            with httpx.Client(base_url=proc.url, timeout=30) as http:
                node = {"node_id": "a", "compute_tflops": 1.0, "memory_gb": 1.0}
                assert http.post("/api/nodes", json=node).status_code == 201
                assert http.get("/api/nodes").status_code == 200
                admin = create_engine(url.split("?")[0])
                with admin.connect() as conn:
                    dropped = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                                "WHERE application_name = :n"), {"n": name}).scalar()
                admin.dispose()
                assert dropped >= 1
                # Each of the worker's pools loses one call at most: SQLAlchemy then drops its older connections.
                reads = [http.get("/api/nodes") for _ in range(4)]
                writes = [http.post("/api/nodes", json={**node, "node_id": "b"}) for _ in range(4)]
                assert {r.status_code for r in reads + writes} <= {200, 201, 503}
                for r in reads + writes:
                    if r.status_code == 503:
                        assert r.json()["detail"].startswith("the database is unavailable (terminating connection")
                assert (reads[-1].status_code, writes[-1].status_code) == (200, 200)
        finally:
            proc.stop()
    assert "Traceback" not in log.read_text()


class _Proxy:
    """A TCP relay to the PostgreSQL server; `cut` closes every relayed connection and refuses new ones, as a
    server that went down does; `restore` accepts again on the same port."""

    def __init__(self, host: str, port: int) -> None:
        import socket

        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list = []
        self.up = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            client, _ = self.listener.accept()
            if not self.up:
                client.close()
                continue
            server = socket.create_connection(self.target)
            self.open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            s.close()

    def cut(self) -> None:
        import socket

        self.up = False
        for s in self.open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.open = []

    def restore(self) -> None:
        self.up = True


@pytest.mark.postgres
def test_a_database_that_goes_down_is_a_json_503_for_every_route_then_served_again(tmp_path):
    """The server goes away: registrations, heartbeats (their own psycopg connection), reads and requests answer
    a one-line 503 (heartbeats were a plain-text 500 with a traceback, and the client's connection was closed),
    and when it is back the same worker serves them again."""
    from sqlalchemy.engine import make_url

    log = tmp_path / "worker.log"
    with database("postgres", tmp_path) as url:
        real = make_url(url)
        proxy = _Proxy(real.host or "127.0.0.1", real.port or 5432)
        proc = WorkerProcess(real.set(port=proxy.port).render_as_string(hide_password=False), log_path=log).start()
        try:
            with httpx.Client(base_url=proc.url, timeout=30) as http:
                node = {"node_id": "a", "compute_tflops": 1.0, "memory_gb": 1.0}
                calls = [("POST", "/api/nodes", node), ("POST", "/api/nodes/a/heartbeat", None),
                         ("GET", "/api/nodes", None), ("POST", "/api/request", {"model_name": "m"})]
                assert [http.request(m, p, json=b).status_code for m, p, b in calls] == [201, 200, 200, 201]
                proxy.cut()
                for _ in range(2):
                    for m, p, b in calls:
                        r = http.request(m, p, json=b)
                        assert r.status_code == 503, (p, r.text)
                        assert r.json()["detail"].startswith("the database is unavailable (")
                proxy.restore()
                assert [http.request(m, p, json=b).status_code for m, p, b in calls] == [200, 200, 200, 201]
        finally:
            proc.stop()
    assert "Traceback" not in log.read_text()
