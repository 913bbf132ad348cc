"""The worker's API over real HTTP: the request → process → get-plan cycle, validation, body limits, unknown
ids. One service per backend (SQLite, PostgreSQL) for the module, with an admin token."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from williw.client import WorkerClient, WorkerHTTPError
from williw.fleet import parse_nodes
from williw.metadata import ModelMetadata, generate_metadata
from workerproc import WorkerProcess, backends, database

TOKEN = "admin-secret"
LIMIT = 1_000_000
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
JSON = {**ADMIN, "Content-Type": "application/json"}


@pytest.fixture(scope="module", params=backends())
def worker(request, tmp_path_factory):
    with database(request.param, tmp_path_factory.mktemp("worker")) as url, \
            WorkerProcess(url, TOKEN, extra_args=("--max-body-bytes", str(LIMIT))) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(worker):
    with WorkerClient(worker.url, TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
def meta(tiny_llama) -> dict:
    # Through JSON, as the worker receives it (to_dict keeps tuples).
    return json.loads(json.dumps(generate_metadata(tiny_llama, model_name="tiny/llama").to_dict()))


@pytest.fixture(scope="module")
def fleet(client):
    nodes = [("gpu-a", 40.0, 8.0), ("gpu-b", 20.0, 4.0), ("cpu-c", 2.0, 16.0)]
    for node_id, tflops, mem in nodes:
        client.register_node(node_id, tflops, mem, memory_bandwidth_gbps=100.0, labels=["test"])
    return [n for n, _, _ in nodes]


def _post(worker, path, body=None, headers=ADMIN, **kw):
    return httpx.post(f"{worker.url}{path}", json=body, headers=headers, **kw)


def test_healthz(worker):
    r = httpx.get(f"{worker.url}/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body == {"status": "ok", "database": body["database"], "schema_version": 5, "auth": "token",
                    "node_ttl_s": 30.0, "replanning": "leader"}
    assert body["database"] == ("sqlite" if worker.db_url.startswith("sqlite") else "postgresql")


def test_full_cycle(worker, client, fleet, meta):
    from williw.planner import make_plan

    created = client.create_request("tiny/llama", node_id="user-1", batch_size=1, sequence_length=512)
    rid = created["request_id"]
    assert created == {"request_id": rid, "status": "received"}
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert client.get_request(rid)["status"] == "received"
    assert client.get_request(rid)["plan_version"] is None

    done = client.process(rid, metadata=meta)
    assert (done["request_id"], done["status"], done["plan_version"]) == (rid, "planned", 1)
    plan = done["plan"]
    # The reference: the planner on the same nodes, in-process.
    online = [n for n in client.list_nodes() if n["online"]]
    fields = ("node_id", "compute_tflops", "memory_gb", "memory_bandwidth_gbps", "network_gbps", "labels")
    nodes = parse_nodes([{k: n[k] for k in fields if n[k] is not None} for n in online], "reference")
    expected = make_plan(ModelMetadata.from_dict(meta), nodes).to_dict()
    assert plan == expected
    assert plan["@plan"]["version"] == 1
    assert client.get_plan(rid) == plan
    first = plan["@plan"]["stages"][0]
    assert client.get_plan(rid, node_id=first) == plan[first]

    request = client.get_request(rid)
    assert (request["status"], request["plan_version"], request["reason"]) == ("planned", 1, None)
    assert (request["model_name"], request["node_id"], request["batch_size"], request["sequence_length"]) == \
        ("tiny/llama", "user-1", 1, 512)

    again = client.process(rid, metadata=meta)
    assert again["plan_version"] == 2
    assert again["plan"]["@plan"]["version"] == 2
    assert client.get_plan(rid)["@plan"]["version"] == 2
    assert client.get_plan(rid, version=1) == plan
    assert client.get_request(rid)["plan_version"] == 2


def test_the_plan_holds_the_requests_workload(worker, client, fleet, meta):
    """The KV cache is sized for the request's batch and sequence length, or the context ``process`` asks for,
    exactly as `make_plan` sizes it for them, whatever workload the metadata was generated for."""
    from williw.planner import make_plan

    online = [n for n in client.list_nodes() if n["online"]]
    fields = ("node_id", "compute_tflops", "memory_gb", "memory_bandwidth_gbps", "network_gbps", "labels")
    nodes = parse_nodes([{k: n[k] for k in fields if n[k] is not None} for n in online], "reference")
    rid = client.create_request("tiny/llama", batch_size=3, sequence_length=2048)["request_id"]
    plan = client.process(rid, metadata=meta)["plan"]
    assert (plan["@plan"]["batch_size"], plan["@plan"]["context_length"]) == (3, 2048)
    expected = make_plan(ModelMetadata.from_dict(meta), nodes, batch_size=3, context_length=2048).to_dict()
    assert plan == {**expected, "@plan": {**expected["@plan"], "version": 1}}
    kv = {a["node_id"]: a["kv_bytes"] for a in expected.values() if isinstance(a, dict) and "kv_bytes" in a}
    assert all(v > 0 for v in kv.values())
    longer = client.process(rid, metadata=meta, context_length=8192)["plan"]
    assert (longer["@plan"]["batch_size"], longer["@plan"]["context_length"]) == (3, 8192)
    assert [longer[n]["kv_bytes"] for n in longer["@plan"]["stages"]] == \
        [4 * x for x in (make_plan(ModelMetadata.from_dict(meta), nodes, batch_size=3, context_length=2048)
                         .to_dict()[n]["kv_bytes"] for n in longer["@plan"]["stages"])]


def test_process_with_bad_inline_metadata_is_422_and_leaves_the_request(worker, client, meta):
    rid = client.create_request("tiny/llama")["request_id"]
    bad = dict(meta, batch_size=0)
    r = _post(worker, "/api/process", {"request_id": rid, "metadata": bad})
    assert r.status_code == 422
    with pytest.raises(Exception) as exc:
        ModelMetadata.from_dict(bad, "metadata")
    assert r.json() == {"detail": str(exc.value)}
    assert client.get_request(rid)["status"] == "received"


def test_process_needs_exactly_one_source(worker, client, meta):
    rid = client.create_request("tiny/llama")["request_id"]
    message = ("body: give exactly one of 'metadata' (the JSON inline), 'metadata_repo' (a Hub repo holding it) or "
               "'model_repo' (the model's Hub repo: the worker reads its headers)")
    for body in ({"request_id": rid}, {"request_id": rid, "metadata": meta, "metadata_repo": "a/b"},
                 {"request_id": rid, "model_repo": "a/m", "metadata_repo": "a/b"}):
        r = _post(worker, "/api/process", body)
        assert (r.status_code, r.json()["detail"]) == (422, message)


def test_get_plan_before_planning_is_409(worker, client):
    rid = client.create_request("tiny/llama")["request_id"]
    r = _post(worker, "/api/get-plan", {"request_id": rid}, headers={})
    assert (r.status_code, r.json()) == (409, {"detail": f"request '{rid}' has no plan: its status is 'received'"})


def test_get_plan_for_a_node_outside_the_plan_is_404(worker, client, fleet, meta):
    rid = client.create_request("tiny/llama")["request_id"]
    plan = client.process(rid, metadata=meta)["plan"]
    nodes = ", ".join(k for k in plan if k != "@plan")
    with pytest.raises(WorkerHTTPError) as exc:
        client.get_plan(rid, node_id="nobody")
    assert exc.value.status_code == 404
    assert str(exc.value) == (f"POST /api/get-plan: 404 node 'nobody' is not in plan version 1 of request "
                              f"'{rid}' (nodes: {nodes})")


@pytest.mark.parametrize(("method", "path", "body", "detail"), [
    ("GET", "/api/requests/nope", None, "request 'nope' does not exist"),
    ("POST", "/api/get-plan", {"request_id": "nope"}, "request 'nope' does not exist"),
    ("POST", "/api/process", {"request_id": "nope", "metadata": {}}, "request 'nope' does not exist"),
    ("POST", "/api/nodes/ghost/heartbeat", None, "node 'ghost' is not registered"),
    ("DELETE", "/api/nodes/ghost", None, "node 'ghost' is not registered"),
    ("GET", "/api/nodes/ghost", None, "node 'ghost' is not registered"),
    # Quotes and SQL in an id are data: bound parameters, so they only fail to match.
    ("GET", "/api/requests/x' OR '1'='1", None, "request 'x' OR '1'='1' does not exist"),
])
def test_unknown_ids_are_404(worker, method, path, body, detail):
    r = httpx.request(method, f"{worker.url}{path}", json=body, headers=ADMIN)
    assert (r.status_code, r.json()) == (404, {"detail": detail})


@pytest.mark.parametrize(("body", "detail"), [
    ({}, "body field 'model_name': Field required"),
    ({"model_name": "a/b", "batch_size": 0}, "body field 'batch_size': Input should be greater than or equal to 1"),
    ({"model_name": "a/b", "batch_size": "x"}, "body field 'batch_size': Input should be a valid integer"),
    # No coercion: true was batch 1 and "64" was 64 before the bodies were strict.
    ({"model_name": "a/b", "batch_size": True}, "body field 'batch_size': Input should be a valid integer"),
    ({"model_name": "a/b", "sequence_length": "64"}, "body field 'sequence_length': Input should be a valid integer"),
    ({"model_name": "../../etc/passwd"}, "body field 'model_name': String should match pattern "
                                         "'^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$'"),
    ({"model_name": "a/b", "colour": "red"}, "body field 'colour': Extra inputs are not permitted"),
    ({"model_name": "a/b", "node_id": "a b"}, "body field 'node_id': node_id must be 1-64 characters from "
                                              "A-Z a-z 0-9 . _ - (and not '.' or '..'), got 'a b'"),
    ([1, 2], "body must be a JSON object sent with 'Content-Type: application/json'"),
])
def test_malformed_request_bodies_are_422_naming_the_field(worker, body, detail):
    r = _post(worker, "/api/request", body)
    assert r.status_code == 422
    assert r.json()["detail"] == detail


def test_invalid_json_and_wrong_content_type_are_422(worker):
    r = httpx.post(f"{worker.url}/api/request", content=b'{"model_name": ', headers={
        **ADMIN, "Content-Type": "application/json"})
    assert (r.status_code, r.json()["detail"]) == (
        422, "body is not valid JSON (Expecting value: line 1 column 16 (char 15))")
    r = httpx.post(f"{worker.url}/api/request", content=b'{"model_name": "a/b"}', headers={
        **ADMIN, "Content-Type": "text/plain"})
    assert (r.status_code, r.json()["detail"]) == (
        422, "body must be a JSON object sent with 'Content-Type: application/json'")


@pytest.mark.parametrize(("body", "detail"), [
    ({"node_id": "n", "compute_tflops": 0, "memory_gb": 1},
     "body field 'compute_tflops': must be a finite number in [1e-6, 1e9], got 0.0"),
    ({"node_id": "n", "compute_tflops": 1}, "body field 'memory_gb': Field required"),
    ({"node_id": "n/../x", "compute_tflops": 1, "memory_gb": 1},
     "body field 'node_id': node_id must be 1-64 characters from A-Z a-z 0-9 . _ - (and not '.' or '..'), "
     "got 'n/../x'"),
    ({"node_id": "n", "compute_tflops": 1, "memory_gb": 1, "labels": "gpu"},
     "body field 'labels': Input should be a valid list"),
])
def test_malformed_node_bodies_are_422(worker, body, detail):
    r = _post(worker, "/api/nodes", body)
    assert (r.status_code, r.json()["detail"]) == (422, detail)


def test_bodies_over_the_limit_are_413(worker):
    at_limit = b" " * LIMIT  # valid size, invalid JSON: reaches the validator
    r = httpx.post(f"{worker.url}/api/request", content=at_limit, headers=JSON)
    assert r.status_code == 422
    over = b" " * (LIMIT + 1)
    r = httpx.post(f"{worker.url}/api/request", content=over, headers=JSON)
    assert (r.status_code, r.json()) == (413, {"detail": "request body is 1,000,001 bytes; this worker accepts at "
                                                         "most 1,000,000 (--max-body-bytes)"})

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(4):
            yield b" " * 300_000

    r = httpx.post(f"{worker.url}/api/request", content=chunks(), headers=JSON)
    assert r.status_code == 413
    assert re.fullmatch(r"request body is more than [0-9,]+ bytes; this worker accepts at most 1,000,000 "
                     r"\(--max-body-bytes\)", r.json()["detail"])


def test_node_registry_lists_and_filters(worker, client, fleet):
    nodes = {n["node_id"]: n for n in client.list_nodes()}
    assert set(fleet) <= set(nodes)
    a = nodes["gpu-a"]
    assert (a["compute_tflops"], a["memory_gb"], a["memory_bandwidth_gbps"], a["network_gbps"], a["labels"],
            a["online"]) == (40.0, 8.0, 100.0, None, ["test"], True)
    assert {n["node_id"] for n in client.list_nodes(online=False)} == set()
    assert client.get_node("gpu-b")["compute_tflops"] == 20.0
    before = client.get_node("gpu-b")["last_heartbeat"]
    beat = client.heartbeat("gpu-b")
    assert beat["node_id"] == "gpu-b" and beat["ttl_s"] == 30.0 and beat["last_heartbeat"] > before
    assert client.get_node("gpu-b")["last_heartbeat"] == beat["last_heartbeat"]


def test_register_update_and_delete(worker, client):
    first = client.register_node("tmp-node", 1.0, 1.0)
    assert first["created"] is True and first["node_token"].startswith("wn_")
    second = client.register_node("tmp-node", 3.0, 2.0, network_gbps=1.25)
    assert second["created"] is False
    assert (second["node"]["compute_tflops"], second["node"]["network_gbps"]) == (3.0, 1.25)
    assert second["node"]["registered_at"] == first["node"]["registered_at"]
    assert client.delete_node("tmp-node") == {"node_id": "tmp-node", "deleted": True}
    with pytest.raises(WorkerHTTPError, match="404 node 'tmp-node' is not registered"):
        client.get_node("tmp-node")
