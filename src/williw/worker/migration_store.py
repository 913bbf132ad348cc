"""The re-planning tables: the metadata a request was planned from, its automatic re-planning options, the
nodes' shard servers, and the ``migrations`` from one plan version to the next.

Kept beside `williw.worker.store` (whose `Store` it uses for connections), like `assignment_store`; every client
value reaches SQL as a bound parameter.

A migration is ``pulling`` while the nodes of its new plan version gather their shards (the version in force
keeps serving), ``switched`` once they all reported ready (the new version is in force), or ``superseded`` when
the fleet changed again before that and a newer migration replaced it. At most one is ``pulling`` per request.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, text, update

from williw.worker.schema import assignments, migrations, model_metadata, nodes, plans, requests
from williw.worker.store import NotFound, RequestRecord, Store

PULLING, SWITCHED, SUPERSEDED = "pulling", "switched", "superseded"

_REMEMBER = text("INSERT INTO model_metadata (digest, metadata_json, created_at) VALUES (:digest, :json, :now) "
                 "ON CONFLICT (digest) DO NOTHING")


class Stale(Exception):
    """The request moved on (another plan in force, another migration) while a re-plan was computed."""


@dataclass(frozen=True)
class MigrationRecord:
    request_id: str
    from_version: int
    to_version: int
    state: str
    reason: str
    schedule: dict[str, Any]
    summary: dict[str, Any]
    created_at: float
    updated_at: float

    @property
    def node_ids(self) -> list[str]:
        """The nodes of the new plan version, in stage order."""
        return list(self.summary.get("stages", []))


def remember_metadata(store: Store, request_id: str, metadata: dict[str, Any], now: float) -> str:
    """Keep the metadata ``request_id`` was planned from, so that the worker can re-plan it later.

    Stored once per distinct metadata (by the sha256 of its canonical JSON).

    Returns:
        The digest.
    """
    with store._write() as conn:
        return remember_metadata_in(conn, request_id, metadata, now)


def remember_metadata_in(conn: Connection, request_id: str, metadata: dict[str, Any], now: float) -> str:
    """`remember_metadata` inside the caller's transaction."""
    digest = store_metadata_in(conn, metadata, now)
    conn.execute(update(requests).where(requests.c.request_id == request_id).values(metadata_digest=digest))
    return digest


def store_metadata_in(conn: Connection, metadata: dict[str, Any], now: float) -> str:
    """Store ``metadata`` (once per digest) in the caller's transaction and return its digest, which the caller
    writes into the request's row (`Store.save_plan`'s ``also``: in the UPDATE it runs anyway)."""
    blob = json.dumps(metadata, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()
    conn.execute(_REMEMBER, {"digest": digest, "json": blob, "now": now})
    return digest


def request_metadata(store: Store, request_id: str) -> dict[str, Any] | None:
    """The metadata of the request's latest plan, or None when it was planned before the worker kept it."""
    with store._read() as conn:
        found = conn.execute(select(model_metadata.c.metadata_json)
                             .join(requests, requests.c.metadata_digest == model_metadata.c.digest)
                             .where(requests.c.request_id == request_id)).scalar()
    return None if found is None else json.loads(found)


def set_auto_replan(store: Store, request_id: str, options: dict[str, Any] | None) -> None:
    """Turn automatic re-planning on (with ``options``: max_slowdown, max_step_bytes) or off (None)."""
    with store._write() as conn:
        conn.execute(update(requests).where(requests.c.request_id == request_id)
                     .values(auto_replan=None if options is None else json.dumps(options)))


def auto_replan_options(record: RequestRecord) -> dict[str, Any] | None:
    return None if record.auto_replan is None else json.loads(record.auto_replan)


def auto_requests(store: Store) -> list[RequestRecord]:
    """Requests with automatic re-planning on and a plan in force, oldest first."""
    with store._read() as conn:
        rows = conn.execute(select(requests).where(requests.c.auto_replan.is_not(None),
                                                   requests.c.plan_version.is_not(None))
                            .order_by(requests.c.created_at))
        return [RequestRecord(**r._mapping) for r in rows]


REPLAN_FAILURE = "re-planning after "  # how `replanning` starts the reason of a request it could not re-plan


def clear_replan_failure(store: Store, request_id: str, now: float) -> bool:
    """The fleet of the plan in force is whole again: a request that failed only because re-planning failed is
    ``planned`` again. Returns whether it was."""
    with store._write() as conn:
        done = conn.execute(update(requests).where(requests.c.request_id == request_id, requests.c.status == "failed",
                                                   requests.c.reason.startswith(REPLAN_FAILURE, autoescape=True))
                            .values(status="planned", reason=None, updated_at=now))
    return done.rowcount > 0


def set_serve_url(store: Store, node_id: str, url: str | None) -> None:
    """Record where ``node_id``'s agent serves its shards (None: nowhere).

    Raises:
        NotFound: no such node.
    """
    with store._write() as conn:
        done = conn.execute(update(nodes).where(nodes.c.node_id == node_id).values(serve_url=url))
    if done.rowcount == 0:
        raise NotFound(f"node '{node_id}' is not registered")


def serve_urls(store: Store) -> dict[str, str]:
    """node id → shard server URL, for the nodes that have one."""
    with store._read() as conn:
        rows = conn.execute(select(nodes.c.node_id, nodes.c.serve_url).where(nodes.c.serve_url.is_not(None)))
        return {r.node_id: r.serve_url for r in rows}


def begin(store: Store, request_id: str, *, from_version: int, expected_active: int | None,
          render: Callable[[int], tuple[dict[str, Any], dict[str, Any], dict[str, Any]]], reason: str,
          now: float) -> MigrationRecord:
    """Store the next plan version (not in force yet) and its migration; its nodes' assignments move to it.

    In one transaction: the request must still have ``from_version`` in force and ``expected_active`` as its
    pulling migration (None: none), else `Stale`; that migration becomes ``superseded``. Every node of the new
    plan gets an ``assigned`` row on the new version (its source stays the request's); the rows of nodes that
    are not in it keep the version in force until the switch.

    Args:
        render: version → (plan JSON, schedule JSON, summary JSON) for that version.

    Raises:
        NotFound: no such request. Stale: see above.
    """
    with store._write() as conn:
        found = conn.execute(select(requests.c.plan_version).where(requests.c.request_id == request_id)
                             .with_for_update()).first()
        if found is None:
            raise NotFound(f"request '{request_id}' does not exist")
        active = conn.execute(select(migrations.c.to_version).where(migrations.c.request_id == request_id,
                                                                    migrations.c.state == PULLING)).scalar()
        if found.plan_version != from_version or active != expected_active:
            raise Stale(f"request '{request_id}' moved on: version {found.plan_version} in force, migration to "
                        f"{active} under way")
        rows = {r.node_id: r for r in conn.execute(select(assignments)
                                                   .where(assignments.c.request_id == request_id))}
        if not rows:
            raise Stale(f"request '{request_id}' is not distributed")
        source = next(iter(rows.values()))
        last = conn.execute(select(func.max(plans.c.version)).where(plans.c.request_id == request_id)).scalar()
        version = (last or 0) + 1
        plan, schedule, summary = render(version)
        conn.execute(update(migrations).where(migrations.c.request_id == request_id, migrations.c.state == PULLING)
                     .values(state=SUPERSEDED, updated_at=now))
        conn.execute(insert(plans).values(request_id=request_id, version=version, plan_json=json.dumps(plan),
                                          created_at=now))
        conn.execute(insert(migrations).values(request_id=request_id, to_version=version, from_version=from_version,
                                               state=PULLING, reason=reason, schedule_json=json.dumps(schedule),
                                               summary_json=json.dumps(summary), created_at=now, updated_at=now))
        fresh = {"plan_version": version, "state": "assigned", "shard_path": None, "sha256": None, "error": None,
                 "updated_at": now}
        for node_id in summary["stages"]:
            if node_id in rows:
                conn.execute(update(assignments).where(assignments.c.request_id == request_id,
                                                       assignments.c.node_id == node_id).values(**fresh))
            else:
                conn.execute(insert(assignments).values(request_id=request_id, node_id=node_id, source=source.source,
                                                        revision=source.revision, created_at=now, **fresh))
    return MigrationRecord(request_id, from_version, version, PULLING, reason, schedule, summary, now, now)


def switch_if_ready(store: Store, request_id: str, now: float) -> int | None:
    """Put the pulling migration's version in force once every node of it reported ready.

    The request becomes ``planned`` on the new version; the assignments of nodes outside it are removed (their
    agents then drop their shards, see `williw.agent`).

    Returns:
        The version switched to, or None (no migration pulling, or a node not ready yet).
    """
    with store._write() as conn:
        conn.execute(select(requests.c.request_id).where(requests.c.request_id == request_id).with_for_update())
        row = conn.execute(select(migrations).where(migrations.c.request_id == request_id,
                                                    migrations.c.state == PULLING)).first()
        if row is None:
            return None
        members = set(json.loads(row.summary_json)["stages"])
        states = {r.node_id: (r.plan_version, r.state) for r in conn.execute(
            select(assignments.c.node_id, assignments.c.plan_version, assignments.c.state)
            .where(assignments.c.request_id == request_id))}
        if any(states.get(n) != (row.to_version, "ready") for n in members):
            return None
        conn.execute(update(requests).where(requests.c.request_id == request_id)
                     .values(plan_version=row.to_version, status="planned", reason=None, updated_at=now))
        conn.execute(update(migrations).where(migrations.c.request_id == request_id,
                                              migrations.c.to_version == row.to_version)
                     .values(state=SWITCHED, updated_at=now))
        for node_id in set(states) - members:
            conn.execute(delete(assignments).where(assignments.c.request_id == request_id,
                                                   assignments.c.node_id == node_id))
    return row.to_version


def list_migrations(store: Store, request_id: str) -> list[MigrationRecord]:
    """The request's migrations, oldest first."""
    with store._read() as conn:
        rows = conn.execute(select(migrations).where(migrations.c.request_id == request_id)
                            .order_by(migrations.c.to_version))
        return [_migration(r) for r in rows]


def active_migrations(store: Store, request_ids: list[str]) -> dict[str, MigrationRecord]:
    """request id → its pulling migration, for those of ``request_ids`` that have one."""
    if not request_ids:
        return {}
    with store._read() as conn:
        rows = conn.execute(select(migrations).where(migrations.c.request_id.in_(request_ids),
                                                     migrations.c.state == PULLING))
        return {r.request_id: _migration(r) for r in rows}


def plan_versions(store: Store, request_id: str) -> list[tuple[int, float, dict[str, Any]]]:
    """(version, created_at, plan JSON) of every stored plan of the request, oldest first."""
    with store._read() as conn:
        rows = conn.execute(select(plans.c.version, plans.c.created_at, plans.c.plan_json)
                            .where(plans.c.request_id == request_id).order_by(plans.c.version))
        return [(r.version, r.created_at, json.loads(r.plan_json)) for r in rows]


def _migration(row: Any) -> MigrationRecord:
    return MigrationRecord(row.request_id, row.from_version, row.to_version, row.state, row.reason,
                           json.loads(row.schedule_json), json.loads(row.summary_json), row.created_at,
                           row.updated_at)
