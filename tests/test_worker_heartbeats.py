"""Heartbeats in batches (`williw.worker.heartbeats`, `Store.heartbeat_many`) on both backends: the same answers as
one heartbeat at a time, a beat never moves a node's time back on PostgreSQL, and concurrent beats share
statements."""

from __future__ import annotations

import asyncio

import pytest

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
        await store.aclose()
        return answers, batcher.batches

    answers, batches = asyncio.run(main())
    assert answers == [bool(i % 4) for i in range(40)]
    assert batches < 40
    times = _times(store)
    assert [times[f"n{i:02d}"] for i in range(40)] == [500.0 + i if i % 4 else 100.0 for i in range(40)]
