"""The worker's automatic re-planning over HTTP, with the node agents played by this test (it heartbeats for the
nodes and reports their assignments with their tokens): a node that leaves starts a migration from the version
in force, the last ready report switches, a second departure mid-migration supersedes it, a node with nothing to
offer changes nothing, and the endpoints' rules and messages."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from williw.client import WorkerClient, WorkerHTTPError
from williw.metadata import generate_metadata
from workerproc import WorkerProcess, backends, database

TOKEN = "replan-admin"
# Heartbeats every 0.15 s from a thread of this test: a live node would have to miss 13 in a row to look offline,
# which a loaded machine does not do (with 1 s, a one-second stall made a live node leave). The worker checks
# for re-planning every TTL/4.
TTL = 2.0
TICK = TTL / 4
SHA = "0" * 64
# Equal nodes of 2.2 MB: the tiny Llama (0.66 MB of weights in 4 blocks; at 512 tokens 0.13 MB of KV cache a block
# and a 1.44 MB transient a stage) is cut over all four; any two can still hold it.
NODES = {f"n{i}": (10.0, 0.0022) for i in range(1, 5)}


class Fleet:
    """A worker, registered nodes heartbeating on a thread until `leave`, and one distributed request."""

    def __init__(self, tmp: Path, db_url: str, meta: dict, *, auto_replan: bool = True,
                 objective: str = "prefill") -> None:
        self.worker = WorkerProcess(db_url, TOKEN, node_ttl=TTL, log_path=tmp / "worker.log").start()
        self.admin = WorkerClient(self.worker.url, TOKEN)
        self.gone: set[str] = set()
        self.tokens: dict[str, str] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        try:
            # The decode objectives need a memory bandwidth; 1 GB/s per TFLOPS keeps the nodes' ranking.
            bandwidth = (lambda t: None) if objective == "prefill" else (lambda t: t)
            self.tokens.update({n: self.admin.register_node(n, t, m, memory_bandwidth_gbps=bandwidth(t))["node_token"]
                                for n, (t, m) in NODES.items()})
            self.thread.start()
            self.rid = self.admin.create_request("tiny/llama")["request_id"]
            self.v1 = self.admin.process(self.rid, metadata=meta, objective=objective)["plan"]
            self.admin.distribute(self.rid, "http://127.0.0.1:9/model", auto_replan=auto_replan or None)
            for n in self.members(self.v1):
                self.report(n, "ready", 1)
        except BaseException:
            self.close()  # a failed set-up must not leave the worker running
            raise

    def _beat(self) -> None:
        with httpx.Client(base_url=self.worker.url, timeout=5) as http:
            while not self.stop.wait(0.15):
                for n, token in list(self.tokens.items()):
                    if n not in self.gone:
                        http.post(f"/api/nodes/{n}/heartbeat", headers={"Authorization": f"Bearer {token}"})

    @staticmethod
    def members(plan: dict) -> list[str]:
        return [k for k in plan if k != "@plan"]

    def node(self, node_id: str) -> WorkerClient:
        return WorkerClient(self.worker.url, self.tokens[node_id])

    def report(self, node_id: str, state: str, version: int) -> dict:
        extra = {"shard_path": f"/data/{node_id}/v{version}", "sha256": SHA} if state == "ready" else {}
        with self.node(node_id) as c:
            return c.report_assignment(self.rid, node_id, state, plan_version=version, **extra)

    def plans(self) -> dict:
        return self.admin.request_plans(self.rid)

    def wait_plans(self, what: str, check, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.plans()
            if check(p):
                return p
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {json.dumps(self.plans())[:2000]}")

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(5)
        self.admin.close()
        self.worker.stop()


@pytest.fixture(scope="module")
def meta(tiny_llama: Path) -> dict:
    return json.loads(json.dumps(generate_metadata(tiny_llama, model_name="tiny/llama").to_dict()))


@pytest.fixture
def fleet(tmp_path: Path, meta: dict):
    with database("sqlite", tmp_path) as url:
        f = Fleet(tmp_path, url, meta)
        try:
            yield f
        finally:
            f.close()


@pytest.mark.parametrize("backend", backends())
def test_a_departure_migrates_and_the_last_ready_switches(backend: str, tmp_path: Path, meta: dict) -> None:
    with database(backend, tmp_path) as url:
        f = Fleet(tmp_path, url, meta)
        try:
            assert sorted(f.members(f.v1)) == sorted(NODES)
            with f.node("n1") as c:
                c.set_serve_url("n1", "http://10.0.0.1:7001")
            f.gone.add("n4")
            p = f.wait_plans("a migration", lambda p: p["migration"] is not None)
            m = p["migration"]
            assert (p["plan_version"], m["from_version"], m["to_version"], m["state"]) == (1, 1, 2, "pulling")
            assert m["reason"] == "n4 left"
            assert [(v["version"], v["state"]) for v in p["plans"]] == [(1, "in force"), (2, "migrating")]
            v2 = f.admin.get_plan(f.rid, version=2)
            members = f.members(v2)
            assert "n4" not in members and v2["@plan"]["replan"]["from_version"] == 1
            assert f.admin.get_plan(f.rid)["@plan"]["version"] == 1  # the old version serves until the switch

            # Each node sees its version-2 assignment, the version in force, and its pulls (peer URLs if known).
            pulls = [s for s in m["steps"] if s["action"] == "pull"]
            for n in members:
                with f.node(n) as c:
                    (a,) = c.node_assignments(n)
                assert (a["plan_version"], a["state"], a["in_force_version"]) == (2, "assigned", 1)
                mine = [s for s in pulls if s["node_id"] == n]
                assert [s["id"] for s in a["pulls"]] == [s["id"] for s in mine]
                for s in a["pulls"]:
                    want = f"http://10.0.0.1:7001/{f.rid}/v1/n1" if s["source"] == "n1" else None
                    assert s["url"] == want
            with f.node("n4") as c:  # the departed node keeps its version-1 row until the switch
                assert [(a["plan_version"], a["state"]) for a in c.node_assignments("n4")] == [(1, "ready")]

            *first, last = members
            for n in first:
                f.report(n, "pulling", 2)
                f.report(n, "ready", 2)
            p = f.plans()
            assert p["plan_version"] == 1 and p["migration"]["state"] == "pulling"
            assert {s["node_id"]: s["state"] for s in p["migration"]["steps"] if s["action"] == "pull"
                    and s["node_id"] in first} == {s["node_id"]: "done" for s in pulls if s["node_id"] in first}
            f.report(last, "ready", 2)
            p = f.plans()
            assert (p["plan_version"], p["migration"]["state"]) == (2, "switched")
            assert [v["state"] for v in p["plans"]] == ["replaced", "in force"]
            assert all(s["state"] == "done" for s in p["migration"]["steps"])
            rows = f.admin.request_assignments(f.rid)["assignments"]
            assert sorted(r["node_id"] for r in rows) == sorted(members)  # n4's row is gone: it may drop
            assert f.admin.get_request(f.rid)["plan_version"] == 2
        finally:
            f.close()


def test_a_latency_plan_is_replanned_for_latency_at_its_batch_and_context(tmp_path: Path, meta: dict) -> None:
    with database("sqlite", tmp_path) as url:
        f = Fleet(tmp_path, url, meta, objective="latency")
        try:
            gone = f.members(f.v1)[-1]
            f.gone.add(gone)
            p = f.wait_plans("a migration", lambda p: p["migration"] is not None)
            assert p["migration"]["reason"] == f"{gone} left"
            v2 = f.admin.get_plan(f.rid, version=2)
            workload = ("objective", "batch_size", "context_length")
            assert [v2["@plan"][k] for k in workload] == [f.v1["@plan"][k] for k in workload] == ["latency", 1, 512]
            assert gone not in f.members(v2)
            summary = p["migration"]["replan"]
            assert summary["bound_s"] == pytest.approx(1.05 * summary["best_bottleneck_s"], rel=1e-12)
            assert summary["exact"] is True and v2["@plan"]["bottleneck_s"] <= summary["bound_s"] * (1 + 1e-9)
        finally:
            f.close()


def test_a_departure_mid_migration_replans_from_the_version_in_force(fleet: Fleet) -> None:
    fleet.gone.add("n4")
    fleet.wait_plans("migration to 2", lambda p: p["migration"] and p["migration"]["to_version"] == 2)
    fleet.gone.add("n3")
    p = fleet.wait_plans("migration to 3", lambda p: p["migration"]["to_version"] == 3)
    assert (p["plan_version"], p["migration"]["from_version"], p["migration"]["state"]) == (1, 1, "pulling")
    assert p["migration"]["reason"] == "n3 left"
    assert [(m["to_version"], m["state"]) for m in p["migrations"]] == [(2, "superseded"), (3, "pulling")]
    assert [v["state"] for v in p["plans"]] == ["in force", "abandoned", "migrating"]
    v3 = fleet.admin.get_plan(fleet.rid, version=3)
    assert sorted(fleet.members(v3)) == ["n1", "n2"]
    with pytest.raises(WorkerHTTPError) as e:  # a late report on the abandoned version is refused
        fleet.report("n1", "ready", 2)
    assert e.value.detail == (f"node 'n1' reported on plan version 2 of request '{fleet.rid}', but its "
                              "assignment is for version 3")
    for n in ("n1", "n2"):
        fleet.report(n, "ready", 3)
    assert fleet.plans()["plan_version"] == 3


def test_a_node_with_nothing_to_offer_changes_nothing(fleet: Fleet) -> None:
    fleet.tokens["slow"] = fleet.admin.register_node("slow", 0.001, 0.0022)["node_token"]
    time.sleep(6 * TICK)  # several re-planning checks: a re-plan, had it been wrongly started, would show
    p = fleet.plans()
    assert (p["plan_version"], p["migration"], [v["version"] for v in p["plans"]]) == (1, None, [1])
    changed = fleet.admin.replan(fleet.rid)
    assert changed == {"request_id": fleet.rid, "changed": False, "migration": None}


def test_no_plan_for_the_survivors_fails_the_request_and_keeps_the_plan(fleet: Fleet) -> None:
    fleet.gone.update({"n2", "n3", "n4"})
    deadline = time.monotonic() + 60
    while fleet.admin.get_request(fleet.rid)["status"] != "failed":
        assert time.monotonic() < deadline, "the request never failed"
        time.sleep(0.05)
    request = fleet.admin.get_request(fleet.rid)
    # The three heartbeats stop together, but a check may see one of them go first (and re-plan on the other two).
    assert request["reason"].startswith("re-planning after ")
    # One node holds 0.66 MB of weights, 0.52 MB of KV cache (4 blocks · 256 bytes · 512 tokens) and a 1.44 MB
    # transient; with 2.20 MB it holds a context of (2,200,000 - 657,664 - 1,441,792) // 1,024 = 98 tokens.
    assert request["reason"].endswith(" left failed: the model needs 2.62 MB at batch 1 and context 512 but the "
                                      "only usable node has 2.20 MB in total (short by 0.42 MB); at batch 1 the "
                                      "fleet holds a context of at most 98 tokens")
    assert request["plan_version"] == 1 and fleet.admin.get_plan(fleet.rid)["@plan"]["version"] == 1
    fleet.gone.clear()  # the nodes come back: the plan in force runs again, and the request is planned again
    deadline = time.monotonic() + 60
    while (request := fleet.admin.get_request(fleet.rid))["status"] != "planned":
        assert time.monotonic() < deadline, request
        time.sleep(0.05)
    assert (request["reason"], request["plan_version"]) == (None, 1)


def test_without_auto_replan_a_departure_changes_nothing(tmp_path: Path, meta: dict) -> None:
    with database("sqlite", tmp_path) as url:
        f = Fleet(tmp_path, url, meta, auto_replan=False)
        try:
            f.gone.add("n4")
            deadline = time.monotonic() + 30
            while f.admin.get_node("n4")["online"]:
                assert time.monotonic() < deadline, "n4 never went offline"
                time.sleep(0.05)
            time.sleep(4 * TICK)  # several re-planning checks after n4 left: a migration, had one started, would show
            p = f.plans()
            assert (p["auto_replan"], p["migration"], p["plan_version"]) == (None, None, 1)
            f.admin.distribute(f.rid, "http://127.0.0.1:9/model", auto_replan=True, max_slowdown=0.1)
            p = f.wait_plans("a migration once it is on", lambda p: p["migration"] is not None)
            assert p["auto_replan"] == {"max_slowdown": 0.1, "max_step_bytes": None}
            assert p["migration"]["replan"]["bound_s"] == pytest.approx(1.1 * p["migration"]["replan"]
                                                                        ["best_bottleneck_s"])
        finally:
            f.close()


def test_endpoint_rules_and_messages(fleet: Fleet, meta: dict) -> None:
    url = fleet.worker.url
    assert httpx.post(f"{url}/api/requests/{fleet.rid}/replan", json={}).status_code == 401
    with fleet.node("n1") as c, pytest.raises(WorkerHTTPError) as e:
        c.replan(fleet.rid)
    assert e.value.status_code == 403
    with fleet.node("n1") as c, pytest.raises(WorkerHTTPError) as e:
        c.set_serve_url("n2", "http://x:1")
    assert e.value.status_code == 403
    with fleet.node("n1") as c, pytest.raises(WorkerHTTPError) as e:
        c.set_serve_url("n1", "file:///etc/passwd")
    assert e.value.status_code == 422 and e.value.detail.startswith("body field 'serve_url': String should match")
    other = fleet.admin.create_request("tiny/llama")["request_id"]
    with pytest.raises(WorkerHTTPError) as e:
        fleet.admin.replan(other)
    assert (e.value.status_code, e.value.detail) == (409, f"request '{other}' has no plan to re-plan: its status "
                                                          "is 'received'")
    with pytest.raises(WorkerHTTPError) as e:
        fleet.admin.replan(fleet.rid, max_slowdown=-1)
    assert e.value.status_code == 422 and "max_slowdown" in e.value.detail
    assert httpx.get(f"{url}/api/requests/{'0' * 32}/plans").status_code == 404
    fleet.admin.process(other, metadata=meta)
    with pytest.raises(WorkerHTTPError) as e:
        fleet.admin.replan(other)
    assert (e.value.status_code, e.value.detail) == (409, f"request '{other}' is not distributed, so nothing is to "
                                                          "migrate: POST /api/process plans it again")
