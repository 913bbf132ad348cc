"""Heartbeats on PostgreSQL, committed in batches (group commit), each acknowledged only after its batch commits.

At 1,000 heartbeats/s, one transaction per heartbeat costs each a round trip and a WAL flush (~4 ms here), and
in the thread pool a wait for the GIL: the worker reached ~500/s with p99 ~800 ms (bench/worker.py). Here every
heartbeat joins the pending batch; one flusher writes the whole batch with one statement (`Store.heartbeat_many`'s,
on a non-blocking psycopg connection of its own: `heartbeat_store`) while the next batch gathers, so the batch size
follows the load (one heartbeat when idle, tens under load) and no timer delays a lone heartbeat. The answer (and so
the node's ``last_heartbeat``) is sent only once its batch has committed: an acknowledged heartbeat is as durable
as before, and its time is the time it arrived, so the TTL means what it did.
"""

from __future__ import annotations

import asyncio
from typing import Any

from williw.worker.heartbeat_store import PgHeartbeatWriter
from williw.worker.store import Store

# An upper bound on one statement's size; at 1,000/s and a few ms per flush batches stay far below it.
MAX_BATCH = 1000


class HeartbeatBatcher:
    """Batch heartbeats into `Store.heartbeat_many` calls. Bound to the loop it is made on; one per process."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.loop = asyncio.get_running_loop()
        self._pending: list[tuple[str, str | None, float, asyncio.Future[bool]]] = []
        self._flushing = False
        self._task: asyncio.Task[None] | None = None
        self._pg = None if store.is_sqlite else PgHeartbeatWriter(store)
        self.batches = 0  # statements written so far (the bench and tests read it)

    async def beat(self, node_id: str, token_hash: str | None, now: float) -> bool:
        """Record a heartbeat as `Store.heartbeat` would; returns once it is committed.

        Returns:
            Whether the node exists (and, with ``token_hash``, has that hash).

        Raises:
            the database's error, for every heartbeat of a batch that failed.
        """
        done: asyncio.Future[bool] = self.loop.create_future()
        self._pending.append((node_id, token_hash, now, done))
        if not self._flushing:
            self._flushing = True
            self._task = self.loop.create_task(self._flush())  # kept: the loop holds only weak references
        return await done

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, later, seen = [], [], set()
                for beat in self._pending:
                    # A node twice in one batch (a retry) waits for the next one: one row, one new value.
                    if beat[0] in seen or len(batch) >= MAX_BATCH:
                        later.append(beat)
                    else:
                        seen.add(beat[0])
                        batch.append(beat)
                self._pending = later
                await self._write(batch)
        finally:
            self._flushing = False

    async def _write(self, batch: list[tuple[str, str | None, float, asyncio.Future[bool]]]) -> None:
        self.batches += 1
        try:
            beats = [(n, h, t) for n, h, t, _ in batch]
            updated = self.store.heartbeat_many(beats) if self._pg is None else await self._pg.write(beats)
        except Exception as exc:  # the database's error goes to every heartbeat of the batch
            for *_, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for node_id, _, _, done in batch:
            if not done.done():
                done.set_result(node_id in updated)

    async def aclose(self) -> None:
        """Close the PostgreSQL connection of the batches (after the last heartbeat; a later one reopens it)."""
        if self._pg is not None:
            await self._pg.aclose()


def batcher_of(state: Any) -> HeartbeatBatcher:
    """The app's `HeartbeatBatcher` (in ``app.state``) for the running loop, made on first use."""
    batcher = getattr(state, "heartbeats", None)
    if batcher is None or batcher.loop is not asyncio.get_running_loop():
        batcher = state.heartbeats = HeartbeatBatcher(state.store)
    return batcher


async def close_batcher(state: Any) -> None:
    """Close the app's `HeartbeatBatcher`, if it has one on the running loop (the app's shutdown)."""
    batcher = getattr(state, "heartbeats", None)
    if batcher is not None and batcher.loop is asyncio.get_running_loop():
        await batcher.aclose()


__all__ = ["MAX_BATCH", "HeartbeatBatcher", "batcher_of", "close_batcher"]
