"""PostgreSQL heartbeat batches on a psycopg connection of their own, without SQLAlchemy (`heartbeats`' writer).

A batch is one prepared statement in autocommit (`PG_HEARTBEATS`, the statement `Store.heartbeat_many` runs
too). Through SQLAlchemy's greenlet bridge (`Store.run`) a statement cost ~0.8 ms of the worker's CPU (a pool
checkout, toggling autocommit, resetting the connection, seven awaits through the bridge); on a bare
``psycopg.AsyncConnection`` it costs ~0.25 ms (a batch of 5, 300 times each way, same run). At 1,000
heartbeats/s the flusher runs a batch every few milliseconds, so this is the hot statement of a loaded worker.

The connection is opened on first use, on the loop of the batcher that owns it, and is the only one the batches
use (they are written one at a time). When the server drops it (a restart, ``pg_terminate_backend``), the batch is
written again once on a new connection: the statement only moves ``last_heartbeat`` forward, so running it twice
is harmless, and a heartbeat is still acknowledged only after its batch committed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from williw.progress import get_logger

if TYPE_CHECKING:
    from williw.worker.store import Store

log = get_logger(__name__)

# A batch of heartbeats on PostgreSQL: the three arrays are one bound parameter each, so the statement text is the
# same for every batch size and psycopg prepares it once (after 5 uses: its ``prepare_threshold``).
# The subquery locks the rows in node_id order (a sorted subquery is not merged into the UPDATE, and its row locks
# are taken above its sort), so two workers' overlapping batches wait for each other instead of deadlocking.
PG_HEARTBEATS = text(
    "UPDATE nodes SET last_heartbeat = GREATEST(nodes.last_heartbeat, b.t) FROM ("
    "SELECT n.node_id, v.t FROM nodes n JOIN unnest(CAST(:ids AS TEXT[]), CAST(:hashes AS TEXT[]), "
    "CAST(:ts AS DOUBLE PRECISION[])) AS v(node_id, token_hash, t) ON n.node_id = v.node_id "
    "AND (v.token_hash IS NULL OR n.token_hash = v.token_hash) ORDER BY n.node_id FOR UPDATE OF n) AS b "
    "WHERE nodes.node_id = b.node_id RETURNING nodes.node_id")

APPLICATION_NAME = "williw-heartbeats"  # in pg_stat_activity: the connection an operator sees, and tests find


class PgHeartbeatWriter:
    """Write heartbeat batches for one event loop on one psycopg ``AsyncConnection``."""

    def __init__(self, store: Store) -> None:
        engine = store._writer  # the store's own dialect turns its URL into psycopg's connection arguments
        self._connect_args: tuple[list[Any], dict[str, Any]] = engine.dialect.create_connect_args(engine.url)
        self._sql = str(PG_HEARTBEATS.compile(dialect=engine.dialect))
        self._conn: Any = None
        self.connections = 0  # connections opened so far (tests read it)

    async def write(self, beats: list[tuple[str, str | None, float]]) -> set[str]:
        """`Store.heartbeat_many` for PostgreSQL, committed when it returns.

        Returns:
            The node ids whose row was updated.

        Raises:
            psycopg.Error: the database's error (after one retry on a new connection when the old one was lost).
        """
        import psycopg

        params = {"ids": [b[0] for b in beats], "hashes": [b[1] for b in beats], "ts": [b[2] for b in beats]}
        conn = await self._connection()
        try:
            return await self._run(conn, params)
        except psycopg.OperationalError:
            lost = conn.closed or conn.broken
            await self.aclose()
            if not lost:
                raise
        log.warning("the heartbeat connection to PostgreSQL was lost; writing the batch on a new one")
        return await self._run(await self._connection(), params)

    async def _run(self, conn: Any, params: dict[str, list[Any]]) -> set[str]:
        cursor = await conn.execute(self._sql, params, prepare=True)
        return {row[0] for row in await cursor.fetchall()}

    async def _connection(self) -> Any:
        if self._conn is None:
            import psycopg

            args, kwargs = self._connect_args
            self._conn = await psycopg.AsyncConnection.connect(*args, **{
                **kwargs, "autocommit": True, "application_name": APPLICATION_NAME})
            self.connections += 1
        return self._conn

    async def aclose(self) -> None:
        """Close the connection (a later `write` opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


__all__ = ["APPLICATION_NAME", "PG_HEARTBEATS", "PgHeartbeatWriter"]
