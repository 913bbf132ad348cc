"""The worker's assignments endpoints on the real worker process: who may report, which transitions are legal,
and that the records survive a SIGKILL of the worker."""

from __future__ import annotations

import httpx
import pytest

from williw import tinymodels
from williw.client import WorkerClient, WorkerHTTPError
from williw.metadata import generate_metadata
from workerproc import WorkerProcess

SHA = "a" * 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("assign")
    model = tinymodels.build_causal_lm(tmp / "model", "llama", layers=2)
    meta = generate_metadata(model, model_name="t/tiny").to_dict()
    with WorkerProcess(f"sqlite:///{tmp / 'w.db'}", token="admin-secret") as proc:
        admin = WorkerClient(proc.url, "admin-secret")
        tokens = {n: admin.register_node(n, 10, 1)["node_token"] for n in ("n1", "n2")}
        rid = admin.create_request("t/tiny")["request_id"]
        admin.process(rid, metadata=meta, strategy="greedy")
        yield proc, admin, tokens, rid


def test_distribute_then_report_through_every_state(setup) -> None:
    proc, admin, tokens, rid = setup
    out = admin.distribute(rid, "http://127.0.0.1:9/model")
    nodes = [a["node_id"] for a in out["assignments"]]
    assert {a["state"] for a in out["assignments"]} == {"assigned"}
    me = WorkerClient(proc.url, tokens[nodes[0]])
    assert me.node_assignments(nodes[0])[0]["source"] == "http://127.0.0.1:9/model"
    assert me.report_assignment(rid, nodes[0], "pulling", plan_version=1)["state"] == "pulling"
    done = me.report_assignment(rid, nodes[0], "ready", plan_version=1, shard_path="/data/x", sha256=SHA)
    assert (done["state"], done["sha256"], done["shard_path"]) == ("ready", SHA, "/data/x")
    with pytest.raises(WorkerHTTPError) as e:
        me.report_assignment(rid, nodes[0], "pulling")
    assert e.value.status_code == 409
    assert e.value.detail == (f"the assignment of node '{nodes[0]}' in request '{rid}' is 'ready'; it cannot "
                              "become 'pulling'")
    proc.restart()  # SIGKILL: the records are committed before each answer
    states = {a["node_id"]: a["state"] for a in admin.request_assignments(rid)["assignments"]}
    assert states[nodes[0]] == "ready"
    # Distributing the same plan version again keeps what is ready.
    again = admin.distribute(rid, "http://127.0.0.1:10/model")
    assert {a["node_id"]: a["state"] for a in again["assignments"]}[nodes[0]] == "ready"


def test_only_the_node_itself_or_the_admin_may_report(setup) -> None:
    proc, admin, tokens, rid = setup
    admin.distribute(rid, "org/tiny")
    node = admin.request_assignments(rid)["assignments"][-1]["node_id"]
    other = next(n for n in tokens if n != node)
    with pytest.raises(WorkerHTTPError) as e:
        WorkerClient(proc.url, tokens[other]).report_assignment(rid, node, "failed", error="x")
    assert e.value.status_code == 403
    assert e.value.detail == (f"reporting an assignment needs the admin token or node '{node}''s own token; the "
                              "token sent is neither")
    with pytest.raises(WorkerHTTPError) as e:
        WorkerClient(proc.url).report_assignment(rid, node, "pulling")
    assert e.value.status_code == 401
    with pytest.raises(WorkerHTTPError) as e:
        WorkerClient(proc.url, tokens[node]).report_assignment(rid, node, "ready", shard_path="/x")
    assert e.value.status_code == 422
    assert e.value.detail == "body: state 'ready' needs 'shard_path' and 'sha256'"
    with pytest.raises(WorkerHTTPError) as e:
        WorkerClient(proc.url, tokens[node]).report_assignment(rid, node, "pulling", plan_version=7)
    assert e.value.status_code == 409
    assert "reported on plan version 7" in e.value.detail


def test_distribute_needs_a_plan_and_a_valid_source(setup) -> None:
    proc, admin, _tokens, _rid = setup
    fresh = admin.create_request("t/tiny")["request_id"]
    with pytest.raises(WorkerHTTPError) as e:
        admin.distribute(fresh, "org/tiny")
    assert e.value.status_code == 409
    assert e.value.detail == f"request '{fresh}' has no plan to distribute: its status is 'received'"
    with pytest.raises(WorkerHTTPError) as e:
        admin.distribute(fresh, "../../etc")
    assert e.value.status_code == 422


@pytest.mark.parametrize(("path", "body", "detail"), [
    # No coercion, as in every other body: "yes" was auto_replan true and "0.1" was 0.1 before.
    ("distribute", {"source": "org/tiny", "auto_replan": "yes"},
     "body field 'auto_replan': Input should be a valid boolean"),
    ("distribute", {"source": "org/tiny", "max_slowdown": "0.1"},
     "body field 'max_slowdown': Input should be a valid number"),
    ("replan", {"max_step_bytes": 1.0}, "body field 'max_step_bytes': Input should be a valid integer"),
])
def test_distribute_and_replan_bodies_are_strict(setup, path: str, body: dict, detail: str) -> None:
    proc, admin, _tokens, rid = setup
    r = httpx.post(f"{proc.url}/api/requests/{rid}/{path}", json=body,
                   headers={"Authorization": "Bearer admin-secret"})
    assert (r.status_code, r.json()["detail"]) == (422, detail)


def test_assignment_reports_are_strict(setup) -> None:
    proc, _admin, tokens, rid = setup
    r = httpx.post(f"{proc.url}/api/assignments/{rid}/n1", json={"state": "pulling", "plan_version": "1"},
                   headers={"Authorization": f"Bearer {tokens['n1']}"})
    assert (r.status_code, r.json()["detail"]) == (422, "body field 'plan_version': Input should be a valid integer")
