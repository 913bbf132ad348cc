"""The planner's optional node fields in the worker's registry (``latency_ms``, ``memory_reserve_gb``): stored,
listed, validated, carried by `williw node`, and planned with. One real worker process per backend."""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest

from williw.client import WorkerClient
from williw.fleet import Node
from williw.metadata import ModelMetadata, generate_metadata
from williw.planner import make_plan
from workerproc import VENV_BIN, WorkerProcess, backends, database, wait_for

TOKEN = "fields-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module", params=backends())
def worker(request, tmp_path_factory):
    with database(request.param, tmp_path_factory.mktemp("fields")) as url, WorkerProcess(url, TOKEN) as proc:
        yield proc


@pytest.fixture
def client(worker):
    with WorkerClient(worker.url, TOKEN) as c:
        yield c
        for n in c.list_nodes():  # each test starts with an empty registry
            c.delete_node(n["node_id"])


@pytest.fixture(scope="module")
def meta(tiny_llama) -> dict:
    return json.loads(json.dumps(generate_metadata(tiny_llama, model_name="tiny/llama").to_dict()))


def _fields(node: dict) -> tuple:
    return node["node_id"], node["latency_ms"], node["memory_reserve_gb"], node["network_gbps"]


def test_the_fields_round_trip_through_register_list_and_get(client):
    answer = client.register_node("far", 2.0, 4.0, network_gbps=1.25, latency_ms=40.5, memory_reserve_gb=0.75)
    assert _fields(answer["node"]) == ("far", 40.5, 0.75, 1.25)
    client.register_node("near", 2.0, 4.0)
    assert [_fields(n) for n in client.list_nodes()] == [("far", 40.5, 0.75, 1.25), ("near", None, None, None)]
    assert _fields(client.get_node("far")) == ("far", 40.5, 0.75, 1.25)
    # Zero is a value (a node on the same switch, a runtime with no reserve), not "not given".
    client.register_node("near", 2.0, 4.0, latency_ms=0, memory_reserve_gb=0)
    assert _fields(client.get_node("near")) == ("near", 0.0, 0.0, None)
    # Registering again states the node anew: a field left out is no longer given.
    client.register_node("far", 2.0, 4.0)
    assert _fields(client.get_node("far")) == ("far", None, None, None)


@pytest.mark.parametrize(("field", "value", "detail"), [
    ("latency_ms", -1, "body field 'latency_ms': must be a finite number in [0, 1e9], got -1.0"),
    ("latency_ms", 1e10, "body field 'latency_ms': must be a finite number in [0, 1e9], got 10000000000.0"),
    ("latency_ms", "fast", "body field 'latency_ms': Input should be a valid number"),
    # As in a nodes file: a bool or a numeric string is not a number (lax parsing stored true as 1.0 ms).
    ("latency_ms", True, "body field 'latency_ms': Input should be a valid number"),
    ("memory_reserve_gb", "5", "body field 'memory_reserve_gb': Input should be a valid number"),
    ("compute_tflops", False, "body field 'compute_tflops': Input should be a valid number"),
    ("memory_reserve_gb", -0.5, "body field 'memory_reserve_gb': must be a finite number in [0, 1e9], got -0.5"),
])
def test_out_of_range_fields_are_one_line_422s_naming_the_field(worker, field, value, detail):
    body = {"node_id": "bad", "compute_tflops": 1, "memory_gb": 1, field: value}
    r = httpx.post(f"{worker.url}/api/nodes", json=body, headers=ADMIN)
    assert (r.status_code, r.json()["detail"]) == (422, detail)


def test_a_memory_reserve_changes_the_workers_plan(client, meta):
    # The whole tiny Llama needs 2.62 MB to run (weights, KV cache, activations): 'big' holds it alone, and is so
    # much faster than 'small' that the best plan uses it alone. With 1 MB kept free it no longer does.
    client.register_node("big", 100.0, 0.003)
    client.register_node("small", 1.0, 0.003)
    rid = client.create_request("tiny/llama")["request_id"]
    plan = client.process(rid, metadata=meta)["plan"]
    assert plan["@plan"]["stages"] == ["big"]
    client.register_node("big", 100.0, 0.003, memory_reserve_gb=0.001)
    plan = client.process(rid, metadata=meta)["plan"]
    expected = make_plan(ModelMetadata.from_dict(meta), [Node("big", 100.0, 0.003, memory_reserve_gb=0.001),
                                                         Node("small", 1.0, 0.003)])
    assert plan["@plan"]["stages"] == list(expected.node_ids) == ["small", "big"]
    assert {u: plan[u]["layer_names"] for u in expected.node_ids} == \
        {a.node_id: list(a.layer_names) for a in expected.assignments}
    assert plan["big"]["headroom_bytes"] == expected.assignments[1].headroom_bytes < 2_000_000 - 1_753_600


def test_the_node_agent_registers_its_latency_and_reserve(worker, client, tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "WILLIW_TOKEN"}, "WILLIW_NO_PROGRESS": "1"}
    agent = subprocess.Popen(
        [str(VENV_BIN / "williw"), "node", "--worker", worker.url, "--node-id", "agent-a", "--compute-tflops", "1",
         "--memory-gb", "2", "--network-gbps", "1.5", "--latency-ms", "12.5", "--memory-reserve-gb", "0.5",
         "--data-dir", str(tmp_path / "a"), "--token", TOKEN, "--serve-host", "none", "--json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        node = wait_for("agent-a's registration", lambda: next(
            (n for n in client.list_nodes() if n["node_id"] == "agent-a"), None), timeout=60)
        assert _fields(node) == ("agent-a", 12.5, 0.5, 1.5)
    finally:
        agent.terminate()
        agent.communicate(timeout=30)


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--latency-ms", "-3", "[0, 1e9], got -3.0"),
    # click's float reads these as nan and inf, which reached the JSON encoder as a traceback.
    ("--latency-ms", "nan", "[0, 1e9], got nan"),
    ("--memory-reserve-gb", "inf", "[0, 1e9], got inf"),
    ("--compute-tflops", "1e400", "[1e-6, 1e9], got inf"),
])
def test_the_node_agent_refuses_a_bad_number_in_one_line(worker, tmp_path, option, value, expected):
    env = {**{k: v for k, v in os.environ.items() if k != "WILLIW_TOKEN"}, "WILLIW_NO_PROGRESS": "1"}
    done = subprocess.run(
        [str(VENV_BIN / "williw"), "node", "--worker", worker.url, "--node-id", "agent-b", "--compute-tflops", "1",
         "--memory-gb", "2", option, value, "--data-dir", str(tmp_path / "b"), "--token", TOKEN,
         "--serve-host", "none"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: williw node: Invalid value for '{option}': must be a finite number in {expected} "
        "(see 'williw node --help')"]
