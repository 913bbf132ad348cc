"""Two ``williw worker`` processes on one PostgreSQL database behave as one service, and either may die.

Registrations and heartbeats go to both workers at once while one of them is SIGKILLed (the re-planning leader,
or the standby): every acknowledged registration and heartbeat is in the database afterwards, the survivor keeps
planning, concurrent ``process`` calls through both never issue a plan version twice, both show the same state,
and a node whose TTL runs out is re-planned for exactly once, by whichever worker leads.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from williw.client import WorkerClient
from williw.metadata import generate_metadata
from workerproc import WorkerProcess, postgres_schema

pytestmark = pytest.mark.postgres

TOKEN = "two-workers"
TTL = 1.0
SHA = "0" * 64
# As in test_worker_replan: four equal nodes of 2.2 MB; the tiny Llama is cut over all four.
NODES = {f"n{i}": (10.0, 0.0022) for i in range(1, 5)}
BURST = 48  # registrations, each followed by three heartbeats, over 8 threads alternating between the workers


@pytest.fixture(scope="module")
def meta(tiny_llama: Path) -> dict:
    return json.loads(json.dumps(generate_metadata(tiny_llama, model_name="tiny/llama").to_dict()))


def _leader(workers: list[WorkerProcess]) -> int:
    """The index of the worker that leads re-planning (exactly one does)."""
    roles = [httpx.get(f"{w.url}/healthz").json()["replanning"] for w in workers]
    assert sorted(roles) == ["leader", "standby"], roles
    return roles.index("leader")


def _burst(workers: list[WorkerProcess], victim: WorkerProcess) -> tuple[dict, dict]:
    """Register BURST nodes and heartbeat them through both workers; SIGKILL ``victim`` halfway.

    Returns what was acknowledged: node id → its compute_tflops, and node id → its last acknowledged heartbeat.
    """
    registered: dict[str, float] = {}
    beats: dict[str, float] = {}
    lock = threading.Lock()
    half = threading.Event()

    def one(i: int) -> None:
        worker = workers[i % 2]
        node_id = f"b{i:02d}"
        try:
            with httpx.Client(base_url=worker.url, timeout=10) as http:
                r = http.post("/api/nodes", json={"node_id": node_id, "compute_tflops": float(i + 1),
                                                  "memory_gb": 1.0},
                              headers={"Authorization": f"Bearer {TOKEN}"})
                if r.status_code != 201:
                    return
                with lock:
                    registered[node_id] = float(i + 1)
                    if len(registered) >= BURST // 2:
                        half.set()
                node = {"Authorization": f"Bearer {r.json()['node_token']}"}
                for _ in range(3):
                    b = http.post(f"/api/nodes/{node_id}/heartbeat", headers=node)
                    if b.status_code != 200:
                        return
                    with lock:
                        beats[node_id] = b.json()["last_heartbeat"]
        except httpx.TransportError:
            return  # the victim died under this call: nothing was acknowledged

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(BURST)]
        assert half.wait(30), "half of the registrations never came back"
        victim.kill()
        for f in futures:
            f.result()
    return registered, beats


def _report(worker: WorkerProcess, token: str, rid: str, node_id: str, version: int) -> None:
    with WorkerClient(worker.url, token) as c:
        c.report_assignment(rid, node_id, "ready", plan_version=version, shard_path=f"/d/{node_id}/v{version}",
                            sha256=SHA)


@pytest.mark.parametrize("kill", ["leader", "standby"])
def test_two_workers_one_database(kill: str, tmp_path: Path, meta: dict) -> None:
    with postgres_schema() as url, \
            WorkerProcess(url, TOKEN, node_ttl=TTL, log_path=tmp_path / "a.log") as a, \
            WorkerProcess(url, TOKEN, node_ttl=TTL, log_path=tmp_path / "b.log") as b:
        workers = [a, b]
        victim = workers[_leader(workers)] if kill == "leader" else workers[1 - _leader(workers)]
        survivor = b if victim is a else a

        # A burst over both workers, one of them SIGKILLed in the middle of it.
        registered, beats = _burst(workers, victim)
        assert len(registered) >= BURST // 2
        admin = WorkerClient(survivor.url, TOKEN)
        stored = {n["node_id"]: n for n in admin.list_nodes()}
        lost = {n for n in registered if n not in stored or stored[n]["compute_tflops"] != registered[n]}
        assert lost == set()
        stale = {n for n, t in beats.items() if stored[n]["last_heartbeat"] < t}
        assert stale == set()
        # The survivor leads re-planning now (the victim's session, and with it its lock, is gone).
        deadline = time.monotonic() + 10
        while httpx.get(f"{survivor.url}/healthz").json()["replanning"] != "leader":
            assert time.monotonic() < deadline, "the survivor never took over re-planning"
            time.sleep(0.05)
        for node_id in stored:
            admin.delete_node(node_id)

        # The victim comes back; the fleet registers and heartbeats through both.
        victim.start()
        one, two = WorkerClient(a.url, TOKEN), WorkerClient(b.url, TOKEN)
        tokens = {n: (one if i % 2 else two).register_node(n, t, m)["node_token"]
                  for i, (n, (t, m)) in enumerate(NODES.items())}
        gone: set[str] = set()
        stop = threading.Event()

        def beat() -> None:
            with httpx.Client(timeout=5) as http:
                i = 0
                while not stop.wait(0.15):
                    for n, token in tokens.items():
                        if n not in gone:
                            i += 1
                            http.post(f"{workers[i % 2].url}/api/nodes/{n}/heartbeat",
                                      headers={"Authorization": f"Bearer {token}"})

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        try:
            # Concurrent process calls through both workers: every version from 1 to 12 exactly once.
            rid = one.create_request("tiny/llama")["request_id"]
            with ThreadPoolExecutor(6) as pool:
                versions = list(pool.map(lambda i: (one, two)[i % 2].process(rid, metadata=meta)["plan_version"],
                                         range(12)))
            assert sorted(versions) == list(range(1, 13))
            assert one.get_plan(rid) == two.get_plan(rid)
            assert one.get_plan(rid)["@plan"]["version"] == 12

            # A distributed request with automatic re-planning, planned through one and reported through the other.
            rid = two.create_request("tiny/llama")["request_id"]
            v1 = one.process(rid, metadata=meta)["plan"]
            assert sorted(k for k in v1 if k != "@plan") == sorted(NODES)
            two.distribute(rid, "http://127.0.0.1:9/model", auto_replan=True)
            for i, n in enumerate(NODES):
                _report(workers[i % 2], tokens[n], rid, n, 1)
            assert one.request_plans(rid)["plan_version"] == 1

            gone.add("n4")  # its TTL runs out: one re-plan, by the leader, whichever worker that is
            deadline = time.monotonic() + 15
            while one.request_plans(rid)["migration"] is None:
                assert time.monotonic() < deadline, "no re-plan after n4 left"
                time.sleep(0.05)
            time.sleep(5 * TTL)  # many re-planning checks of both workers (every TTL/4)
            p = one.request_plans(rid)
            assert [(m["from_version"], m["to_version"], m["reason"]) for m in p["migrations"]] == \
                [(1, 2, "n4 left")]
            assert [v["version"] for v in p["plans"]] == [1, 2]
            # Both workers show the same state (what the dashboard of either polls).
            assert two.request_plans(rid) == p
            assert one.list_nodes() == two.list_nodes() or _same_nodes(one, two)
            assert httpx.get(f"{a.url}/api/requests", headers={"Authorization": f"Bearer {TOKEN}"}).json()[
                "requests"] == httpx.get(f"{b.url}/api/requests",
                                         headers={"Authorization": f"Bearer {TOKEN}"}).json()["requests"]
        finally:
            stop.set()
            beater.join(5)
            for c in (admin, one, two):
                c.close()


def _same_nodes(one: WorkerClient, two: WorkerClient) -> bool:
    # Heartbeats keep landing between the two reads; compare what does not move.
    def fixed(c: WorkerClient) -> list[dict]:
        return [{k: v for k, v in n.items() if k not in ("last_heartbeat", "heartbeat_age_s")}
                for n in c.list_nodes()]

    return fixed(one) == fixed(two)


def test_workers_in_two_schemas_each_lead(tmp_path: Path) -> None:
    """Advisory locks belong to the database, not the schema: two deployments in two schemas of one database must
    not take each other's re-planning lock (each run of this suite, and CI beside it, has a schema of its own)."""
    with postgres_schema() as one, postgres_schema() as two, \
            WorkerProcess(one, TOKEN, log_path=tmp_path / "a.log") as a, \
            WorkerProcess(two, TOKEN, log_path=tmp_path / "b.log") as b:
        deadline = time.monotonic() + 60
        while (roles := [httpx.get(f"{w.url}/healthz").json()["replanning"] for w in (a, b)]) != ["leader"] * 2:
            assert time.monotonic() < deadline, roles
            time.sleep(0.1)
