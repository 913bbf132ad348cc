"""How the store connects: SQLite's pragmas and transaction mode (why: see `williw.worker.store`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event

SQLITE_BUSY_TIMEOUT_MS = 5000


def sqlite_engine(url: str, *, pool_size: int, writer: bool) -> Engine:
    """An engine on the SQLite file at ``url``: the single writer (``BEGIN IMMEDIATE``, WAL) or a read-only pool."""
    engine = create_engine(url, pool_size=pool_size, max_overflow=0, pool_timeout=60,
                           connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Autocommit at the driver level, so that BEGIN below is the only transaction control (the SQLAlchemy
        # pysqlite recipe for SERIALIZABLE/IMMEDIATE transactions).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if writer:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        if not writer:
            cur.execute("PRAGMA query_only=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

    return engine


__all__ = ["SQLITE_BUSY_TIMEOUT_MS", "sqlite_engine"]
