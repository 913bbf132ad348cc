"""The ``assignments`` table: which node of a request's plan must pull its shard from where, and how far it got.

Kept beside `williw.worker.store` (whose `Store` it uses for connections) so that the store stays under the size
budget; like the store, every client value reaches SQL as a bound parameter.

States: ``assigned → pulling → ready | failed``. A node may report ``pulling`` again (a restarted agent resumes),
``ready`` again (idempotent), and ``pulling`` after ``failed`` (a retry); ``ready`` is final for its plan version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import delete, insert, select, update

from williw.worker.schema import assignments
from williw.worker.store import NotFound, Store

STATES = ("assigned", "pulling", "ready", "failed")
# state → states a node (or the admin) may move it to
TRANSITIONS: dict[str, frozenset[str]] = {
    "assigned": frozenset({"pulling", "ready", "failed"}),
    "pulling": frozenset({"pulling", "ready", "failed"}),
    "failed": frozenset({"pulling", "failed"}),
    "ready": frozenset({"ready"}),
}


class IllegalTransition(Exception):
    """The assignment's current state does not allow the new one (the message says both)."""


@dataclass(frozen=True)
class AssignmentRecord:
    """One node's part of a request's distribution."""

    request_id: str
    node_id: str
    plan_version: int
    state: str
    source: str
    revision: str | None
    shard_path: str | None
    sha256: str | None
    error: str | None
    created_at: float
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def distribute(store: Store, request_id: str, plan_version: int, node_ids: list[str], source: str,
               revision: str | None, now: float) -> list[AssignmentRecord]:
    """Create (or refresh) one assignment per plan node; rows of other nodes or versions are replaced.

    A row already on ``plan_version`` keeps its state (a re-run resumes: ready shards stay ready) but takes the
    new source, which may be a new URL of the same folder; a ``failed`` one goes back to ``assigned`` for a retry.

    Returns:
        The request's assignments, by node id.
    """
    with store._write() as conn:
        rows = {r.node_id: r for r in conn.execute(select(assignments)
                                                   .where(assignments.c.request_id == request_id))}
        for node_id, row in rows.items():
            if node_id not in node_ids or row.plan_version != plan_version:
                conn.execute(delete(assignments).where(assignments.c.request_id == request_id,
                                                       assignments.c.node_id == node_id))
        for node_id in node_ids:
            row = rows.get(node_id)
            if row is not None and row.plan_version == plan_version:
                values: dict[str, Any] = {"source": source, "revision": revision, "updated_at": now}
                if row.state == "failed":
                    values.update(state="assigned", error=None)
                conn.execute(update(assignments).where(assignments.c.request_id == request_id,
                                                       assignments.c.node_id == node_id).values(**values))
            else:
                conn.execute(insert(assignments).values(request_id=request_id, node_id=node_id,
                                                        plan_version=plan_version, state="assigned", source=source,
                                                        revision=revision, shard_path=None, sha256=None, error=None,
                                                        created_at=now, updated_at=now))
    return for_request(store, request_id)


def set_state(store: Store, request_id: str, node_id: str, state: str, now: float, *,
              plan_version: int | None = None, shard_path: str | None = None, sha256: str | None = None,
              error: str | None = None) -> AssignmentRecord:
    """Move one assignment to ``state``, checking the transition inside the write transaction.

    Raises:
        NotFound: the node has no assignment in this request.
        IllegalTransition: the move is not allowed, or ``plan_version`` is not the assignment's.
    """
    with store._write() as conn:
        row = conn.execute(select(assignments).where(assignments.c.request_id == request_id,
                                                     assignments.c.node_id == node_id).with_for_update()).first()
        if row is None:
            raise NotFound(f"node '{node_id}' has no assignment in request '{request_id}'")
        if plan_version is not None and plan_version != row.plan_version:
            raise IllegalTransition(f"node '{node_id}' reported on plan version {plan_version} of request "
                                    f"'{request_id}', but its assignment is for version {row.plan_version}")
        if state not in TRANSITIONS[row.state]:
            raise IllegalTransition(f"the assignment of node '{node_id}' in request '{request_id}' is "
                                    f"'{row.state}'; it cannot become '{state}'")
        values: dict[str, Any] = {"state": state, "updated_at": now, "error": error}
        if state == "ready":
            values.update(shard_path=shard_path, sha256=sha256)
        conn.execute(update(assignments).where(assignments.c.request_id == request_id,
                                               assignments.c.node_id == node_id).values(**values))
        row = conn.execute(select(assignments).where(assignments.c.request_id == request_id,
                                                     assignments.c.node_id == node_id)).one()
    return AssignmentRecord(**row._mapping)


def for_request(store: Store, request_id: str) -> list[AssignmentRecord]:
    """The request's assignments, by node id (empty before it is distributed)."""
    with store._read() as conn:
        rows = conn.execute(select(assignments).where(assignments.c.request_id == request_id)
                            .order_by(assignments.c.node_id))
        return [AssignmentRecord(**r._mapping) for r in rows]


def for_node(store: Store, node_id: str) -> list[AssignmentRecord]:
    """The node's assignments in every request, oldest first."""
    with store._read() as conn:
        rows = conn.execute(select(assignments).where(assignments.c.node_id == node_id)
                            .order_by(assignments.c.created_at, assignments.c.request_id))
        return [AssignmentRecord(**r._mapping) for r in rows]
