"""The worker's state in SQL: nodes, requests and versioned plans. The only module that talks to the database.

SQLite (the default) allows one writer at a time; when two connections of one process write at once, the
loser sleeps in SQLite's busy handler (in steps of up to 100 ms), which is what ruins tail latency. So on SQLite
every write goes through one connection (a pool of size 1: writers queue in the pool, in-process, in order) and
starts with ``BEGIN IMMEDIATE`` (so another process on the same file waits in ``busy_timeout`` at BEGIN instead
of failing when a read lock is upgraded); reads use a separate pool and, in WAL mode, never wait for the writer.
``synchronous=NORMAL`` in WAL mode keeps every committed transaction across a process crash (SIGKILL); only an
OS crash or power loss can lose the last ones (https://www.sqlite.org/wal.html, "Performance Considerations").
On PostgreSQL several worker processes can share the database. There a commit waits ~4 ms for the WAL flush, too
long to wait on the event loop, and SQL in the thread pool made the loop wait for the GIL behind those threads
(heartbeats' p99 ~800 ms under bench/worker.py's load). So the routes run their store calls on the loop through
`Store.run`: the same synchronous code, on psycopg's asyncio connections via SQLAlchemy's greenlet bridge (the
machinery of ``AsyncConnection.run_sync``), so a query's wait lets the loop serve others. Threads (the re-planning
check, other routes) get a second, ordinary pool; which one a call uses depends on where it runs.

Every value a client sends is a bound parameter; the only literal SQL is the constant DDL in `schema`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, bindparam, delete, func, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.util.concurrency import greenlet_spawn, in_greenlet

from williw.errors import WilliwError
from williw.progress import get_logger
from williw.worker import schema
from williw.worker.engines import postgres_engines, sqlite_engine
from williw.worker.heartbeat_store import PG_HEARTBEATS
from williw.worker.records import NodeRecord, RequestRecord
from williw.worker.schema import nodes, plans, requests

log = get_logger(__name__)

READ_POOL_SIZE = 8
T = TypeVar("T")


class StoreError(WilliwError):
    """The database cannot be opened or used (bad URL, schema newer than this williw)."""


class NotFound(WilliwError, LookupError):
    """An id names no node, request or plan."""


def normalize_url(url: str) -> str:
    """Accept a bare path as SQLite and ``postgresql://`` as psycopg 3 (the driver williw installs).

    Raises:
        StoreError: an in-memory SQLite database (its state would die with the process) or another backend.
    """
    if "://" not in url:
        url = f"sqlite:///{url}"
    try:
        parsed = make_url(url)
    except ValueError as exc:  # sqlalchemy's ArgumentError, or a port that is not a number
        raise StoreError(f"the database URL cannot be parsed: {exc}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise StoreError("the worker needs a SQLite file (e.g. sqlite:///williw-worker.db), not an in-memory "
                         "database: its state must survive a restart")
    if backend not in ("sqlite", "postgresql"):
        raise StoreError(f"unsupported database {parsed.drivername!r}: use sqlite:///FILE or "
                         "postgresql+psycopg://USER@HOST/DB")
    return parsed.render_as_string(hide_password=False)


# The heartbeat statements, built once: building a statement and its cache key costs ~100 µs per call, half of a
# heartbeat's time in the store.
_HEARTBEAT = (update(nodes).where(nodes.c.node_id == bindparam("b_node_id"))
              .values(last_heartbeat=bindparam("b_now")))
_HEARTBEAT_CHECKED = _HEARTBEAT.where(nodes.c.token_hash == bindparam("b_token_hash"))
# NodeRecord's fields (named as their columns), in its order, and the statement `process` runs on every call.
_NODE_COLUMNS = tuple(nodes.c[f.name] for f in dataclasses.fields(NodeRecord))
_OPTIONAL_NODE_FIELDS = ("memory_bandwidth_gbps", "network_gbps", "latency_ms", "memory_reserve_gb", "device",
                         "device_name", "dtype", "device_memory_bytes")
_LIST_NODES = select(*_NODE_COLUMNS).order_by(nodes.c.node_id)


class Store:
    """Open (and migrate) the database at ``url``.

    Args:
        url: a SQLAlchemy URL (``sqlite:///file.db``, ``postgresql+psycopg://...``) or a SQLite file path.
        pool_size: connections for reads (and, on PostgreSQL, writes).

    Raises:
        StoreError: unsupported URL, or a schema written by a newer williw.
    """

    def __init__(self, url: str, *, pool_size: int = READ_POOL_SIZE) -> None:
        self.url = normalize_url(url)
        try:
            self.is_sqlite = make_url(self.url).get_backend_name() == "sqlite"
            if self.is_sqlite:
                self._writer = sqlite_engine(self.url, pool_size=1, writer=True)
                self._reader = sqlite_engine(self.url, pool_size=pool_size, writer=False)
                self._on_loop: Engine | None = None
            else:
                # Threads (the re-planning check, some routes) and the loop's two pools (user work takes turns on the
                # loop) each need few: with 8, up to 2 * (4 + 2 * 4) + 2 connections per worker (`postgres_engines`).
                n = max(1, pool_size // 2)
                self._writer, self._on_loop, loop_auto = postgres_engines(self.url, pool_size=n, loop_pool_size=n)
                self._reader = self._writer
                # Reads and one-statement writes run in autocommit: one round trip instead of three (psycopg sends
                # BEGIN and COMMIT/ROLLBACK as commands of their own), which is what a query costs when the server's
                # process waits for a CPU on a busy machine.
                self._auto = {False: self._writer.execution_options(isolation_level="AUTOCOMMIT"), True: loop_auto}
            self._migrate()
        except (SQLAlchemyError, ImportError) as exc:  # unreachable server, bad login, missing driver or schema
            shown, cause = make_url(self.url).render_as_string(hide_password=True), getattr(exc, "orig", None) or exc
            raise StoreError(f"cannot open the database {shown}: {' '.join(str(cause).split())}") from None

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` (synchronous code that calls this store) on the running event loop.

        On PostgreSQL its queries use the loop's connections and, while one waits for the server, the loop serves
        other requests (`sqlalchemy.util.greenlet_spawn`, what ``AsyncConnection.run_sync`` runs on). On SQLite
        it simply runs: its calls are short and never wait for a network.
        """
        if self._on_loop is None:
            return work(*args)
        return await greenlet_spawn(work, *args)

    async def aclose(self) -> None:
        """Close the event loop's connections (PostgreSQL), on the loop they were opened on."""
        if self._on_loop is not None:
            await greenlet_spawn(self._on_loop.dispose)
            await greenlet_spawn(self._auto[True].dispose)

    def close(self) -> None:
        self._writer.dispose()
        if self._reader is not self._writer:
            self._reader.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A transaction (committed at the end of the block, rolled back on an error)."""
        engine = self._on_loop if self._on_loop is not None and in_greenlet() else self._writer
        with engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """Reads; on PostgreSQL each statement is its own transaction (autocommit)."""
        if self._on_loop is None:
            with self._reader.connect() as conn:
                yield conn
        else:
            with self._auto[in_greenlet()].connect() as conn:
                yield conn

    @contextmanager
    def _single(self) -> Iterator[Connection]:
        """For one writing statement, atomic on its own: autocommit on PostgreSQL, the writer on SQLite."""
        if self._on_loop is None:
            with self._writer.begin() as conn:
                yield conn
        else:
            with self._auto[in_greenlet()].connect() as conn:
                yield conn

    # -- schema --------------------------------------------------------------------------------------------

    def _migrate(self) -> None:
        with self._write() as conn:
            if not self.is_sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": schema.PG_MIGRATION_LOCK_KEY})
            conn.execute(text(schema.SCHEMA_VERSION_DDL))
            current = conn.execute(select(func.max(schema.schema_version.c.version))).scalar() or 0
            if current > schema.LATEST_VERSION:
                raise StoreError(f"the database is at schema version {current}, newer than this williw's "
                                 f"{schema.LATEST_VERSION}: upgrade williw")
            for version, name, statements in schema.MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    conn.execute(text(statement))
                conn.execute(insert(schema.schema_version).values(version=version, name=name,
                                                                  applied_at=time.time()))
                log.info("migrated the worker database to schema version %d (%s)", version, name)

    def schema_version(self) -> int:
        """The highest migration the database has run."""
        with self._read() as conn:
            return conn.execute(select(func.max(schema.schema_version.c.version))).scalar() or 0

    def ping(self) -> None:
        """Run a trivial query; raises the driver's error when the database is unreachable."""
        with self._read() as conn:
            conn.execute(select(1))

    # -- nodes ---------------------------------------------------------------------------------------------

    def upsert_node(self, fields: dict[str, Any], token_hash: str | None, now: float) -> tuple[NodeRecord, bool]:
        """Register a node or update its fields; either counts as a heartbeat.

        Args:
            fields: node_id, compute_tflops, memory_gb, labels, weights and `_OPTIONAL_NODE_FIELDS` (absent: NULL).
            token_hash: the new node token's hash, or None to keep the current one (required for a new node).
            now: the time to record.

        Returns:
            The stored node and whether it was created.
        """
        values = {"compute_tflops": fields["compute_tflops"], "memory_gb": fields["memory_gb"],
                  **{key: fields.get(key) for key in _OPTIONAL_NODE_FIELDS},
                  "labels": json.dumps(list(fields.get("labels", ()))), "updated_at": now, "last_heartbeat": now,
                  "weights": None if fields.get("weights") is None else json.dumps(list(fields["weights"]))}
        if token_hash is not None:
            values["token_hash"] = token_hash
        node_id = fields["node_id"]
        # Two workers on PostgreSQL may insert the same new node at once; the loser updates instead.
        for _ in range(3):
            try:
                with self._write() as conn:
                    found = conn.execute(select(nodes.c.node_id).where(nodes.c.node_id == node_id)
                                         .with_for_update()).first()
                    if found:
                        conn.execute(update(nodes).where(nodes.c.node_id == node_id).values(**values))
                    else:
                        if token_hash is None:
                            raise NotFound(f"node '{node_id}' is not registered")
                        conn.execute(insert(nodes).values(node_id=node_id, registered_at=now, **values))
                    row = conn.execute(select(*_NODE_COLUMNS).where(nodes.c.node_id == node_id)).one()
                return NodeRecord.from_row(row), not found
            except IntegrityError:
                continue
        raise StoreError(f"could not register node '{node_id}': concurrent registrations kept conflicting")

    def node_token_hash(self, node_id: str) -> str:
        """The stored hash of ``node_id``'s token.

        Raises:
            NotFound: no such node.
        """
        with self._read() as conn:
            found = conn.execute(select(nodes.c.token_hash).where(nodes.c.node_id == node_id)).scalar()
        if found is None:
            raise NotFound(f"node '{node_id}' is not registered")
        return found

    def heartbeat(self, node_id: str, now: float, token_hash: str | None = None) -> bool:
        """Record that ``node_id`` is alive at ``now``; with ``token_hash``, only if it is the node's.

        One conditional UPDATE, so that the common case (a node beating with its own token) costs one statement.

        Returns:
            Whether a row was updated: False when the node is unknown or ``token_hash`` is not its hash.
        """
        params = {"b_node_id": node_id, "b_now": now, "b_token_hash": token_hash}
        with self._single() as conn:
            done = conn.execute(_HEARTBEAT if token_hash is None else _HEARTBEAT_CHECKED, params)
        return done.rowcount > 0

    def heartbeat_many(self, beats: list[tuple[str, str | None, float]]) -> set[str]:
        """Record many heartbeats ``(node_id, token_hash or None, now)`` in one transaction (`heartbeats`' batches).

        Each beat follows `heartbeat`'s rule. ``node_id`` must not repeat within one call. On PostgreSQL a beat
        never moves ``last_heartbeat`` back (two workers' batches may commit out of order); it is one statement
        (one round trip, its own transaction) that locks the rows in ``node_id`` order, so that two workers'
        overlapping batches cannot deadlock.

        Returns:
            The node ids whose row was updated.
        """
        if not beats:
            return set()
        if self.is_sqlite:
            return {n for n, h, t in beats if self.heartbeat(n, t, h)}
        with self._single() as conn:
            done = conn.execute(PG_HEARTBEATS, {"ids": [b[0] for b in beats], "hashes": [b[1] for b in beats],
                                                 "ts": [b[2] for b in beats]})
            return {row[0] for row in done}

    def get_node(self, node_id: str) -> NodeRecord:
        """Raises: NotFound: no such node."""
        with self._read() as conn:
            row = conn.execute(select(*_NODE_COLUMNS).where(nodes.c.node_id == node_id)).first()
        if row is None:
            raise NotFound(f"node '{node_id}' is not registered")
        return NodeRecord.from_row(row)

    def list_nodes(self) -> list[NodeRecord]:
        """Every registered node, by node_id."""
        with self._read() as conn:
            return [NodeRecord.from_row(r) for r in conn.execute(_LIST_NODES)]

    def delete_node(self, node_id: str) -> None:
        """Raises: NotFound: no such node."""
        with self._single() as conn:
            done = conn.execute(delete(nodes).where(nodes.c.node_id == node_id))
        if done.rowcount == 0:
            raise NotFound(f"node '{node_id}' is not registered")

    # -- requests and plans --------------------------------------------------------------------------------

    def create_request(self, request_id: str, model_name: str, node_id: str | None, batch_size: int,
                       sequence_length: int, now: float) -> RequestRecord:
        """Record a new request with status ``received``."""
        with self._single() as conn:
            conn.execute(insert(requests).values(request_id=request_id, model_name=model_name, node_id=node_id,
                                                 batch_size=batch_size, sequence_length=sequence_length,
                                                 status="received", reason=None, plan_version=None,
                                                 created_at=now, updated_at=now))
        return RequestRecord(request_id, model_name, node_id, batch_size, sequence_length, "received", None, None,
                             now, now)

    def get_request(self, request_id: str) -> RequestRecord:
        """Raises: NotFound: no such request."""
        with self._read() as conn:
            row = conn.execute(select(requests).where(requests.c.request_id == request_id)).first()
        if row is None:
            raise NotFound(f"request '{request_id}' does not exist")
        return RequestRecord(**row._mapping)

    def mark_failed(self, request_id: str, reason: str, now: float) -> None:
        """Set the request's status to ``failed`` with ``reason``; a plan already in force stays readable."""
        with self._single() as conn:
            conn.execute(update(requests).where(requests.c.request_id == request_id)
                         .values(status="failed", reason=reason, updated_at=now))

    def save_plan(self, request_id: str, render: Callable[[int], dict[str, Any]], now: float,
                  also: Callable[[Connection], dict[str, Any]] | None = None) -> tuple[int, dict[str, Any]]:
        """Store the next plan version of a request and make it the one in force.

        Args:
            render: the plan JSON for a given version (the version is written inside the plan too).
            also: more writes that belong to the same transaction (one commit instead of two); returns more
                values for the request's row, written by the same UPDATE.

        Returns:
            The new version (1 for the first plan, then one more than the last) and the plan JSON stored.

        Raises:
            NotFound: no such request.
        """
        with self._write() as conn:
            # The row lock orders two PostgreSQL workers planning the same request; SQLite's BEGIN IMMEDIATE
            # already did. The last version is read after the lock, by a statement of its own: in READ COMMITTED
            # only a new statement sees what the previous holder of the lock committed.
            found = conn.execute(select(requests.c.request_id).where(requests.c.request_id == request_id)
                                 .with_for_update()).first()
            if found is None:
                raise NotFound(f"request '{request_id}' does not exist")
            last = conn.execute(select(func.max(plans.c.version)).where(plans.c.request_id == request_id)).scalar()
            version = (last or 0) + 1
            plan = render(version)
            conn.execute(insert(plans).values(request_id=request_id, version=version, plan_json=json.dumps(plan),
                                              created_at=now))
            more = also(conn) if also is not None else {}
            conn.execute(update(requests).where(requests.c.request_id == request_id)
                         .values(status="planned", reason=None, plan_version=version, updated_at=now, **more))
        return version, plan

    def get_plan(self, request_id: str, version: int) -> dict[str, Any]:
        """The stored plan JSON.

        Raises:
            NotFound: no such version for this request.
        """
        with self._read() as conn:
            found = conn.execute(select(plans.c.plan_json).where(plans.c.request_id == request_id,
                                                                 plans.c.version == version)).scalar()
        if found is None:
            raise NotFound(f"request '{request_id}' has no plan version {version}")
        return json.loads(found)


# -- listing requests (the dashboard) ------------------------------------------------------------------------

def list_requests(store: Store, limit: int = 100) -> list[RequestRecord]:
    """The newest ``limit`` requests, newest first (the dashboard's list; ids are capabilities, see `dashboard`)."""
    with store._read() as conn:
        rows = conn.execute(select(requests).order_by(requests.c.created_at.desc()).limit(limit))
        return [RequestRecord(**r._mapping) for r in rows]


__all__ = ["NodeRecord", "NotFound", "RequestRecord", "Store", "StoreError", "list_requests", "normalize_url"]
