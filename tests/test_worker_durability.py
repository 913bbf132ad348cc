"""A worker killed with SIGKILL and restarted serves the same nodes, requests and plans; two worker processes
on one PostgreSQL database see each other's writes."""

from __future__ import annotations

import json

import pytest

from williw.client import WorkerClient
from williw.metadata import generate_metadata
from workerproc import WorkerProcess, backends, database, postgres_schema

TOKEN = "durable"


@pytest.fixture(scope="module")
def meta(tiny_llama) -> dict:
    return json.loads(json.dumps(generate_metadata(tiny_llama, model_name="tiny/llama").to_dict()))


def _state(client: WorkerClient, request_ids: list[str]) -> dict:
    nodes = [{k: v for k, v in n.items() if k not in ("online", "heartbeat_age_s")} for n in client.list_nodes()]
    requests = [client.get_request(r) for r in request_ids]
    plans = [client.get_plan(r) for r in request_ids if client.get_request(r)["plan_version"]]
    return {"nodes": nodes, "requests": requests, "plans": plans}


@pytest.mark.parametrize("kind", backends())
def test_sigkill_and_restart_loses_nothing(kind, tmp_path, meta):
    with database(kind, tmp_path) as url, WorkerProcess(url, TOKEN) as proc:
        admin = WorkerClient(proc.url, TOKEN, retries=0)
        token = admin.register_node("keep-a", 10.0, 8.0, labels=["x"])["node_token"]
        admin.register_node("keep-b", 5.0, 8.0)
        planned = admin.create_request("tiny/llama", node_id="keep-a")["request_id"]
        plan = admin.process(planned, metadata=meta)["plan"]
        waiting = admin.create_request("tiny/llama", batch_size=4)["request_id"]
        beat = admin.with_token(token).heartbeat("keep-a")["last_heartbeat"]
        before = _state(admin, [planned, waiting])
        proc.kill()  # right after the last answer: every answered change must already be committed

        proc.start()
        after = _state(admin, [planned, waiting])
        assert after == before
        assert after["plans"] == [plan]
        assert admin.get_node("keep-a")["last_heartbeat"] == beat
        # The node token survives too.
        assert admin.with_token(token).heartbeat("keep-a")["node_id"] == "keep-a"
        admin.close()


@pytest.mark.postgres
def test_two_workers_share_one_postgres(tmp_path, meta):
    with postgres_schema() as url, WorkerProcess(url, TOKEN) as one, WorkerProcess(url, TOKEN) as two:
        a, b = WorkerClient(one.url, TOKEN), WorkerClient(two.url, TOKEN)
        token = a.register_node("shared-1", 10.0, 8.0)["node_token"]
        assert [n["node_id"] for n in b.list_nodes()] == ["shared-1"]
        b.with_token(token).heartbeat("shared-1")  # the token issued by one worker is honoured by the other
        rid = b.create_request("tiny/llama")["request_id"]
        plan = a.process(rid, metadata=meta)["plan"]
        assert b.get_plan(rid) == plan
        assert b.get_request(rid)["status"] == "planned"
        second = b.process(rid, metadata=meta)["plan_version"]
        assert (second, a.get_request(rid)["plan_version"]) == (2, 2)
        b.delete_node("shared-1")
        assert a.list_nodes() == []
        a.close()
        b.close()
