"""The re-planning endpoints.

* ``GET /api/requests/{request_id}/plans``: every plan version (which one is in force) and the migrations between
  them, the latest with each step's state (a read: no token, like every read).
* ``POST /api/requests/{request_id}/replan`` ``{max_slowdown?, max_step_bytes?}`` (admin): re-plan a distributed
  request for the online nodes now (the automatic re-planning does the same when the fleet changes).
* ``PUT /api/nodes/{node_id}/serve-url`` ``{serve_url}`` (that node or the admin): where the node's agent serves
  its shards, so that peers pull blocks from it instead of from the model's source.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from williw.fleet import check_node_id
from williw.jsonio import INT64_MAX
from williw.planner.plan import PLAN_KEY
from williw.worker import assignment_store, migration_store
from williw.worker.deps import AuthDep, NodeIdPath, RequestIdPath, SettingsDep, StoreDep, TokenDep
from williw.worker.replanning import replan_request
from williw.worker.schemas import StrictBody
from williw.worker.service import Conflict
from williw.worker.store import Store

router = APIRouter()

# assignment state on the migration's version → state of that node's pull steps
_PULL_STATE = {"assigned": "pending", "pulling": "pulling", "ready": "done", "failed": "failed"}


class ReplanIn(StrictBody):
    max_slowdown: float | None = Field(default=None, ge=0, le=10, allow_inf_nan=False)
    max_step_bytes: int | None = Field(default=None, ge=1, le=INT64_MAX)


class ServeUrlIn(StrictBody):
    serve_url: str | None = Field(pattern=r"^https?://[A-Za-z0-9._~:/\[\]@%-]{1,2000}$")


def plans_view(store: Store, request_id: str) -> dict[str, Any]:
    """The body of ``GET /api/requests/{id}/plans``."""
    request = store.get_request(request_id)
    migrations = migration_store.list_migrations(store, request_id)
    state_of = {m.to_version: m.state for m in migrations}
    versions = []
    for version, created_at, plan in migration_store.plan_versions(store, request_id):
        head = plan.get(PLAN_KEY, {})
        if version == request.plan_version:
            state = "in force"
        elif state_of.get(version) == migration_store.PULLING:
            state = "migrating"
        elif state_of.get(version) == migration_store.SUPERSEDED:
            state = "abandoned"
        else:
            state = "replaced"
        versions.append({"version": version, "created_at": created_at, "state": state,
                         "strategy": head.get("strategy"), "stages": head.get("stages", []),
                         "bottleneck_s": head.get("bottleneck_s"), "replan": head.get("replan")})
    latest = migrations[-1] if migrations else None
    return {"request_id": request_id, "status": request.status, "plan_version": request.plan_version,
            "auto_replan": migration_store.auto_replan_options(request), "plans": versions,
            "migration": None if latest is None else _with_states(store, latest),
            "migrations": [_summary(m) for m in migrations]}


def _summary(m: migration_store.MigrationRecord) -> dict[str, Any]:
    s = m.schedule
    return {"from_version": m.from_version, "to_version": m.to_version, "state": m.state, "reason": m.reason,
            "created_at": m.created_at, "updated_at": m.updated_at, "pull_bytes": s["pull_bytes"],
            "peer_bytes": s["peer_bytes"], "model_bytes": s["model_bytes"], "replan": m.summary}


def _with_states(store: Store, m: migration_store.MigrationRecord) -> dict[str, Any]:
    rows = {r.node_id: r for r in assignment_store.for_request(store, m.request_id)}
    steps = []
    for s in m.schedule["steps"]:
        if m.state == migration_store.SUPERSEDED:
            state = "abandoned"
        elif s["action"] == "pull":
            row = rows.get(s["node_id"])
            state = "done" if m.state == migration_store.SWITCHED else \
                _PULL_STATE[row.state] if row is not None and row.plan_version == m.to_version else "pending"
        else:  # the switch, and the drops that wait for it
            state = "done" if m.state == migration_store.SWITCHED else "pending"
        step = {k: v for k, v in s.items() if k != "tensors"}  # names are in the plan; counts are enough here
        if "tensors" in s:
            step["tensor_count"] = len(s["tensors"])
        steps.append({**step, "state": state})
    return {**_summary(m), "steps": steps, "nodes": m.schedule["nodes"]}


@router.get("/api/requests/{request_id}/plans")
async def request_plans(request_id: RequestIdPath, store: StoreDep) -> dict[str, Any]:
    return await run_in_threadpool(plans_view, store, request_id)


@router.post("/api/requests/{request_id}/replan")
async def replan(request_id: RequestIdPath, body: ReplanIn, store: StoreDep, auth: AuthDep, settings: SettingsDep,
                 token: TokenDep) -> dict[str, Any]:
    def work() -> Any:
        auth.require_admin(token, "re-planning a request")
        try:
            record = replan_request(store, settings, request_id, reason="an admin asked",
                                    max_slowdown=body.max_slowdown, max_step_bytes=body.max_step_bytes)
        except migration_store.Stale as exc:
            raise Conflict(str(exc)) from None
        return {"request_id": request_id, "changed": record is not None,
                "migration": None if record is None else _with_states(store, record)}

    return await run_in_threadpool(work)


@router.put("/api/nodes/{node_id}/serve-url")
async def serve_url(node_id: NodeIdPath, body: ServeUrlIn, store: StoreDep, auth: AuthDep,
                    token: TokenDep) -> dict[str, Any]:
    def work() -> Any:
        check_node_id(node_id, "path 'node_id'")
        auth.require_node(token, node_id, lambda: store.node_token_hash(node_id), "setting a node's serve URL")
        migration_store.set_serve_url(store, node_id, body.serve_url)
        return {"node_id": node_id, "serve_url": body.serve_url}

    return await run_in_threadpool(work)


__all__ = ["plans_view", "router"]
