"""The distribution endpoints: a request's plan becomes one assignment per node, each node reports its progress.

* ``POST /api/requests/{request_id}/distribute`` ``{source, revision?, auto_replan?, max_slowdown?,
  max_step_bytes?}`` (admin): one ``assigned`` row per node of the plan in force; ``source`` is where nodes pull
  from (a ``williw serve-model`` URL or a Hub repo id). ``auto_replan: true`` lets the worker re-plan the request
  when its nodes leave or new ones join (`williw.worker.replanning`); false turns it off; absent leaves it.
* ``GET /api/requests/{request_id}/assignments``: every node's state, with its liveness (``online``,
  ``heartbeat_age_s``), so the user node can tell a slow node from a dead one, and where it serves its shards
  and its stage (``serve_url``), so ``williw generate`` can run the pipeline.
* ``GET /api/nodes/{node_id}/assignments``: what a node has to do (reads need no token, as every read), with
  the version in force (``in_force_version``) and, on a version being migrated to, the node's ``pulls``.
* ``POST /api/assignments/{request_id}/{node_id}`` ``{state, plan_version?, shard_path?, sha256?, error?}``: only
  that node's token or the admin; illegal transitions answer 409. The last ``ready`` of a migration switches the
  request to its version.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import Field, model_validator
from starlette.concurrency import run_in_threadpool

from williw.fleet import check_node_id
from williw.jsonio import INT64_MAX
from williw.planner.plan import PLAN_KEY
from williw.worker import assignment_store as db
from williw.worker import migration_store
from williw.worker.deps import AuthDep, NodeIdPath, RequestIdPath, SettingsDep, StoreDep, TokenDep
from williw.worker.replanning import node_pulls, switch_if_ready
from williw.worker.schemas import REPO_ID_PATTERN, StrictBody
from williw.worker.service import Conflict, WorkerSettings, is_online
from williw.worker.store import NotFound, Store

router = APIRouter()

# A serve-model URL (http(s), no spaces or quotes) or a Hub repo id.
SOURCE_PATTERN = rf"^(https?://[A-Za-z0-9._~:/?#\[\]@!$&()*+,;=%-]{{1,2000}}|{REPO_ID_PATTERN[1:-1]})$"


class DistributeIn(StrictBody):
    source: str = Field(pattern=SOURCE_PATTERN, description="serve-model URL or Hub repo id the nodes pull from")
    revision: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._/-]{1,128}$")
    auto_replan: bool | None = Field(default=None, description="re-plan when nodes leave or join")
    max_slowdown: float = Field(default=0.05, ge=0, le=10, allow_inf_nan=False)
    max_step_bytes: int | None = Field(default=None, ge=1, le=INT64_MAX)


class AssignmentIn(StrictBody):
    state: Literal["pulling", "ready", "failed"]
    plan_version: int | None = Field(default=None, ge=1, le=INT64_MAX)
    shard_path: str | None = Field(default=None, min_length=1, max_length=4096)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    error: str | None = Field(default=None, min_length=1, max_length=2000)

    @model_validator(mode="after")
    def _fields_of_state(self) -> AssignmentIn:
        if self.state == "ready" and (self.shard_path is None or self.sha256 is None):
            raise ValueError("state 'ready' needs 'shard_path' and 'sha256'")
        if self.state == "failed" and self.error is None:
            raise ValueError("state 'failed' needs 'error'")
        return self


def _with_liveness(store: Store, settings: WorkerSettings, records: list[db.AssignmentRecord]) -> list[dict]:
    now = time.time()
    nodes = {n.node_id: n for n in store.list_nodes()}
    urls = migration_store.serve_urls(store)
    out = []
    for r in records:
        node = nodes.get(r.node_id)
        out.append({**r.to_dict(), "serve_url": urls.get(r.node_id),
                    "online": node is not None and is_online(node, now, settings.node_ttl_s),
                    "heartbeat_age_s": None if node is None else round(max(0.0, now - node.last_heartbeat), 3)})
    return out


@router.post("/api/requests/{request_id}/distribute")
async def distribute(request_id: RequestIdPath, body: DistributeIn, store: StoreDep, auth: AuthDep,
                     settings: SettingsDep, token: TokenDep) -> dict[str, Any]:
    def work() -> Any:
        auth.require_admin(token, "distributing a request")
        request = store.get_request(request_id)
        if request.plan_version is None:
            raise Conflict(f"request '{request_id}' has no plan to distribute: its status is '{request.status}'")
        plan = store.get_plan(request_id, request.plan_version)
        node_ids = sorted(k for k in plan if k != PLAN_KEY)
        records = db.distribute(store, request_id, request.plan_version, node_ids, body.source, body.revision,
                                time.time())
        if body.auto_replan is not None:
            options = {"max_slowdown": body.max_slowdown, "max_step_bytes": body.max_step_bytes}
            migration_store.set_auto_replan(store, request_id, options if body.auto_replan else None)
        return {"request_id": request_id, "plan_version": request.plan_version,
                "assignments": _with_liveness(store, settings, records)}

    return await run_in_threadpool(work)


@router.get("/api/requests/{request_id}/assignments")
async def request_assignments(request_id: RequestIdPath, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    def work() -> Any:
        request = store.get_request(request_id)
        return {"request_id": request_id, "plan_version": request.plan_version,
                "assignments": _with_liveness(store, settings, db.for_request(store, request_id))}

    return await run_in_threadpool(work)


@router.get("/api/nodes/{node_id}/assignments")
async def node_assignments(node_id: NodeIdPath, store: StoreDep) -> dict[str, Any]:
    def work() -> Any:
        check_node_id(node_id, "path 'node_id'")
        records = db.for_node(store, node_id)
        pulls = node_pulls(store, node_id, records)
        in_force = {r.request_id: store.get_request(r.request_id).plan_version for r in records}
        return {"node_id": node_id, "assignments": [
            {**r.to_dict(), "in_force_version": in_force[r.request_id], "pulls": pulls.get(r.request_id)}
            for r in records]}

    return await run_in_threadpool(work)


@router.post("/api/assignments/{request_id}/{node_id}")
async def report(request_id: RequestIdPath, node_id: NodeIdPath, body: AssignmentIn, store: StoreDep,
                 auth: AuthDep, token: TokenDep) -> dict[str, Any]:
    def work() -> Any:
        check_node_id(node_id, "path 'node_id'")
        auth.require_node(token, node_id, lambda: store.node_token_hash(node_id), "reporting an assignment")
        try:
            record = db.set_state(store, request_id, node_id, body.state, time.time(),
                                  plan_version=body.plan_version, shard_path=body.shard_path, sha256=body.sha256,
                                  error=body.error)
        except db.IllegalTransition as exc:
            raise Conflict(str(exc)) from None
        if body.state == "ready":
            switch_if_ready(store, request_id)
        return record.to_dict()

    return await run_in_threadpool(work)


__all__ = ["NotFound", "router"]
