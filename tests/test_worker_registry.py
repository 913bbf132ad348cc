"""Heartbeat expiry and planning on online nodes only, on an open worker (no token) with a 2 s TTL.

A node must stay online across a few requests here while others expire, so the TTL is 2 s rather than 1 s: a
loaded machine can stall a process for a second. Expiry is waited for as an event, never by a fixed sleep."""

from __future__ import annotations

import json
import re
import time

import pytest

from williw.client import WorkerClient, WorkerHTTPError
from williw.errors import InfeasiblePlan
from williw.fleet import Node
from williw.metadata import ModelMetadata, generate_metadata
from workerproc import WorkerProcess, backends, database

TTL = 2.0


@pytest.fixture(scope="module", params=backends())
def client(request, tmp_path_factory):
    with database(request.param, tmp_path_factory.mktemp("registry")) as url, \
            WorkerProcess(url, None, node_ttl=TTL) as proc, WorkerClient(proc.url) as c:
        yield c


@pytest.fixture(scope="module")
def meta(tiny_llama) -> dict:
    return json.loads(json.dumps(generate_metadata(tiny_llama, model_name="tiny/llama").to_dict()))


def online(client) -> set[str]:
    return {n["node_id"] for n in client.list_nodes(online=True)}


def wait_until_offline(client, timeout: float = 30.0) -> None:
    """Until no node is online."""
    deadline = time.monotonic() + timeout
    while online(client):
        assert time.monotonic() < deadline, f"still online after {timeout} s: {online(client)}"
        time.sleep(0.05)


def test_open_worker_needs_no_token(client):
    assert client.healthz()["auth"] == "open"
    r = client.register_node("open-node", 1.0, 1.0)
    assert r["created"] is True and r["node_token"].startswith("wn_")
    assert client.heartbeat("open-node")["node_id"] == "open-node"
    assert client.delete_node("open-node")["deleted"] is True


def test_heartbeat_expiry_and_return(client):
    client.register_node("beat-a", 4.0, 4.0)
    assert "beat-a" in online(client)
    wait_until_offline(client)
    node = client.get_node("beat-a")
    assert node["online"] is False and node["heartbeat_age_s"] > TTL
    assert "beat-a" in {n["node_id"] for n in client.list_nodes(online=False)}
    client.heartbeat("beat-a")
    assert online(client) == {"beat-a"}
    client.delete_node("beat-a")


def test_no_online_node_fails_the_request(client, meta):
    client.register_node("sleepy", 4.0, 4.0)
    wait_until_offline(client)
    registered = len(client.list_nodes())
    rid = client.create_request("tiny/llama")["request_id"]
    reason = f"no online nodes: {registered} registered, none heartbeated in the last 2 s"
    with pytest.raises(WorkerHTTPError) as exc:
        client.process(rid, metadata=meta)
    assert (exc.value.status_code, exc.value.detail) == (409, f"request '{rid}' failed: {reason}")
    request = client.get_request(rid)
    assert (request["status"], request["reason"], request["plan_version"]) == ("failed", reason, None)
    with pytest.raises(WorkerHTTPError) as exc:
        client.get_plan(rid)
    assert exc.value.detail == f"request '{rid}' has no plan: its status is 'failed' ({reason})"
    client.delete_node("sleepy")


def test_offline_nodes_are_not_planned_on(client, meta):
    client.register_node("leaves", 10.0, 8.0)
    wait_until_offline(client)
    client.register_node("stays", 10.0, 8.0)
    rid = client.create_request("tiny/llama")["request_id"]
    plan = client.process(rid, metadata=meta)["plan"]
    assert [k for k in plan if k != "@plan"] == ["stays"]
    excluded = {e["node_id"]: e["reason"] for e in plan["@plan"]["excluded"]}
    assert re.fullmatch(r"offline: last heartbeat \d+ s ago \(TTL 2 s\)", excluded["leaves"])
    client.delete_node("stays")
    client.delete_node("leaves")


def test_infeasible_plan_fails_the_request_with_the_planners_reason(client, meta):
    from williw.planner import make_plan

    wait_until_offline(client)
    client.register_node("tiny-mem", 1.0, 1e-6)
    with pytest.raises(InfeasiblePlan) as expected:
        make_plan(ModelMetadata.from_dict(meta), [Node("tiny-mem", 1.0, 1e-6, labels=())])
    reason = " ".join(str(expected.value).split())
    rid = client.create_request("tiny/llama")["request_id"]
    with pytest.raises(WorkerHTTPError) as exc:
        client.process(rid, metadata=meta)
    assert (exc.value.status_code, exc.value.detail) == (409, f"request '{rid}' failed: {reason}")
    assert client.get_request(rid)["reason"] == reason
    client.delete_node("tiny-mem")
