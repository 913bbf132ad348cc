"""One worker at a time runs the fleet-wide background work (automatic re-planning), however many share a
PostgreSQL database.

The leader is whoever holds a PostgreSQL session-level advisory lock (``pg_try_advisory_lock``,
https://www.postgresql.org/docs/current/explicit-locking.html#ADVISORY-LOCKS) on a connection it keeps for that
purpose. The server releases the lock when that session ends, so when the leader dies (even by SIGKILL: the kernel
closes its socket and the server ends the session) another worker takes the lock on its next try. There is no
lease to renew and no clock to trust. On SQLite only one worker process may use the file, so it always leads.
"""

from __future__ import annotations

import threading

from sqlalchemy import Connection, select, text
from sqlalchemy.exc import DBAPIError

from williw.progress import get_logger
from williw.worker.store import Store

log = get_logger(__name__)

# The advisory lock's key: "rpln" in ASCII, paired with a hash of the schema, since advisory locks are per database
# and two worker deployments in two schemas of one database must each have a leader. Migrations use another lock
# (schema.PG_MIGRATION_LOCK_KEY).
REPLANNER_LOCK_KEY = 0x72706C6E
_TRY_LOCK = text("SELECT pg_try_advisory_lock(:key, hashtext(current_schema()))")


class LeaderLock:
    """Whether this process leads; ``held()`` takes the lock when it is free. Thread-safe.

    Args:
        store: the worker's store (its engine lends the connection that holds the lock).
        key: the advisory lock's key; workers that should exclude each other use the same one.
    """

    def __init__(self, store: Store, key: int = REPLANNER_LOCK_KEY) -> None:
        self.store, self.key = store, key
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    @property
    def holding(self) -> bool:
        """Whether this process held the lock at its last `held` call (takes nothing)."""
        return self.store.is_sqlite or self._conn is not None

    def held(self) -> bool:
        """Whether this process holds the lock now, taking it if no other session does.

        A database error (the server restarting, the connection cut) counts as not holding it: the session that
        held it is gone, so another worker may already have taken it.
        """
        if self.store.is_sqlite:
            return True
        with self._lock:
            try:
                if self._conn is not None:
                    self._conn.execute(select(1))  # still our session, so still our lock
                    self._conn.commit()
                    return True
                conn = self.store._writer.connect()
                got = bool(conn.execute(_TRY_LOCK, {"key": self.key}).scalar())
                conn.commit()
                if not got:
                    conn.close()
                    return False
                self._conn = conn
                log.info("this worker now leads automatic re-planning")
                return True
            except DBAPIError as exc:
                log.warning("lost the re-planning lock's connection (%s); another worker may lead now",
                            type(exc).__name__)
                self._drop()
                return False

    def release(self) -> None:
        """Give the lock up (closing its session), e.g. on shutdown."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            # Never back to the pool: the session would keep the lock. invalidate() closes it instead.
            self._conn.invalidate()
            self._conn.close()
            self._conn = None


__all__ = ["REPLANNER_LOCK_KEY", "LeaderLock"]
