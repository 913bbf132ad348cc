"""Heartbeats in batches (`williw.worker.heartbeats`, `Store.heartbeat_many`) on both backends: the same answers as
one heartbeat at a time, a beat never moves a node's time back on PostgreSQL, and concurrent beats share
statements."""

from __future__ import annotations

import asyncio

import pytest

from williw.worker.heartbeat_store import APPLICATION_NAME
from williw.worker.heartbeats import HeartbeatBatcher
from williw.worker.store import Store
from workerproc import backends, database


@pytest.fixture(params=backends())
def store(request, tmp_path):
    with database(request.param, tmp_path) as url:
        s = Store(url)
        for i in range(40):
            s.upsert_node({"node_id": f"n{i:02d}", "compute_tflops": 1.0, "memory_gb": 1.0}, f"hash-{i}", 100.0)
        yield s
        s.close()


def _times(store: Store) -> dict[str, float]:
    return {n.node_id: n.last_heartbeat for n in store.list_nodes()}


def test_heartbeat_many_checks_each_token(store):
    beats = [("n00", "hash-0", 200.0), ("n01", "wrong", 200.0), ("n02", None, 201.0), ("ghost", None, 200.0)]
    assert store.heartbeat_many(beats) == {"n00", "n02"}
    times = _times(store)
    assert (times["n00"], times["n01"], times["n02"], times["n03"]) == (200.0, 100.0, 201.0, 100.0)
    assert store.heartbeat_many([]) == set()


def test_a_late_batch_never_moves_time_back(store):
    store.heartbeat_many([("n00", None, 300.0)])
    store.heartbeat_many([("n00", None, 250.0)])  # another worker's batch, committed after
    expected = 250.0 if store.is_sqlite else 300.0  # SQLite has one worker process: its beats arrive in order
    assert _times(store)["n00"] == expected


def test_concurrent_beats_share_statements_and_all_get_their_answer(store):
    async def main() -> tuple[list[bool], int]:
        batcher = HeartbeatBatcher(store)
        beats = [batcher.beat(f"n{i:02d}", f"hash-{i}" if i % 4 else "wrong", 500.0 + i) for i in range(40)]
        answers = await asyncio.gather(*beats)
        await batcher.aclose()
        await store.aclose()
        return answers, batcher.batches

    answers, batches = asyncio.run(main())
    assert answers == [bool(i % 4) for i in range(40)]
    assert batches < 40
    times = _times(store)
    assert [times[f"n{i:02d}"] for i in range(40)] == [500.0 + i if i % 4 else 100.0 for i in range(40)]


def _heartbeat_backends(db_url: str, worker_pid: int) -> list[int]:
    # The server processes serving this worker's heartbeat connection: its application name, at one of the
    # worker's own client ports (other workers may share the server).
    import psutil
    from sqlalchemy import create_engine, text

    ports = {c.laddr.port for c in psutil.Process(worker_pid).net_connections("tcp") if c.raddr}
    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT pid, client_port FROM pg_stat_activity WHERE application_name = :name"),
                            {"name": APPLICATION_NAME}).all()
    engine.dispose()
    return [pid for pid, port in rows if port in ports]


@pytest.mark.postgres
def test_a_lost_heartbeat_connection_is_replaced_and_the_beat_still_committed(tmp_path):
    from sqlalchemy import create_engine, text

    from williw.client import WorkerClient
    from workerproc import WorkerProcess, postgres_schema

    with postgres_schema() as url, WorkerProcess(url, "admin", cwd=tmp_path) as worker:
        admin = WorkerClient(worker.url, token="admin", retries=0)  # a 500 must not be hidden by a retry
        token = admin.register_node("beater", 1.0, 1.0)["node_token"]
        node = admin.with_token(token)
        node.heartbeat("beater")
        [backend] = _heartbeat_backends(url, worker.proc.pid)
        engine = create_engine(url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend}).scalar() is True
        engine.dispose()
        beat = node.heartbeat("beater")["last_heartbeat"]
        assert admin.get_node("beater")["last_heartbeat"] == beat
        [replaced] = _heartbeat_backends(url, worker.proc.pid)
        assert replaced != backend
