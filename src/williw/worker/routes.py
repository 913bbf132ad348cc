"""The endpoints. Each parses its body (pydantic), checks the caller (`auth`), calls one store or service
function and shapes the answer; errors become HTTP statuses in `app`.

Handlers are ``async def`` and hand their blocking part (SQL, the planner) to the thread pool in one hop: for a
plain ``def`` handler FastAPI also validates and serialises the response in the pool, and each hop waits for the
GIL, which halved heartbeat throughput. On SQLite the request → process → get-plan routes run their SQL on the
loop instead, one at a time (`turns`), and `williw worker` plans in a child process (`planning`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from williw.fleet import check_node_id
from williw.worker import service
from williw.worker.auth import AuthError, hash_token, new_node_token
from williw.worker.deps import AuthDep, NodeIdPath, RequestIdPath, SettingsDep, StoreDep, TokenDep
from williw.worker.heartbeats import batcher_of
from williw.worker.schemas import (
    GetPlanIn,
    HeartbeatOut,
    NodeIn,
    NodeOut,
    ProcessIn,
    ProcessOut,
    RegisterOut,
    RequestIn,
    RequestOut,
)
from williw.worker.service import WorkerSettings
from williw.worker.store import NodeRecord, NotFound, Store
from williw.worker.turns import turns_of

router = APIRouter()
T = TypeVar("T")



def _node_out(node: NodeRecord, settings: WorkerSettings, now: float) -> NodeOut:
    return NodeOut(node_id=node.node_id, compute_tflops=node.compute_tflops, memory_gb=node.memory_gb,
                   memory_bandwidth_gbps=node.memory_bandwidth_gbps, network_gbps=node.network_gbps,
                   labels=list(node.labels), latency_ms=node.latency_ms, memory_reserve_gb=node.memory_reserve_gb,
                   device=node.device, device_name=node.device_name, dtype=node.dtype, weights=list(node.weights),
                   device_memory_bytes=node.device_memory_bytes,
                   registered_at=node.registered_at, updated_at=node.updated_at,
                   last_heartbeat=node.last_heartbeat, online=service.is_online(node, now, settings.node_ttl_s),
                   heartbeat_age_s=round(max(0.0, now - node.last_heartbeat), 3))


@router.get("/healthz")
async def healthz(request: Request, store: StoreDep, auth: AuthDep, settings: SettingsDep) -> dict[str, Any]:
    replanner = getattr(request.app.state, "replanner", None)

    def work() -> Any:
        store.ping()
        # "leader": this worker runs automatic re-planning; "standby": another worker on the database does.
        leading = replanner is None or replanner.leader.holding
        return {"status": "ok", "database": "sqlite" if store.is_sqlite else "postgresql",
                "schema_version": store.schema_version(), "auth": "token" if auth.enabled else "open",
                "node_ttl_s": settings.node_ttl_s, "replanning": "leader" if leading else "standby"}

    return await run_in_threadpool(work)


# -- requests ------------------------------------------------------------------------------------------------

@router.post("/api/request", status_code=status.HTTP_201_CREATED)
async def create_request(body: RequestIn, request: Request, store: StoreDep, auth: AuthDep,
                         token: TokenDep) -> dict[str, str]:
    def work() -> Any:
        auth.require_admin(token, "creating a request")
        if body.node_id is not None:
            check_node_id(body.node_id, "body field 'node_id'")
        record = store.create_request(service.new_request_id(), body.model_name, body.node_id, body.batch_size,
                                      body.sequence_length, time.time())
        return {"request_id": record.request_id, "status": record.status}

    # One INSERT: on the loop on SQLite (see `process`).
    return await _on_loop(request, work)


# Plans are JSON already (built by Plan.to_dict or read from the store) and tens of KB for a large fleet, so these
# routes answer with a JSONResponse: FastAPI's jsonable_encoder walks every value again, which cost more than the
# planner itself. ``response_model`` still documents the shape.
#
# On SQLite the store calls of these routes run on the event loop (each well under a millisecond, like the
# heartbeat's) and `williw worker` plans in its child process: with no thread holding the GIL, the loop gets it back
# at once after each SQLite call, instead of waiting up to a switch interval (5 ms) behind a thread; with 50
# users planning back to back those waits made heartbeats' p99 ~300-900 ms. PostgreSQL calls wait on the network
# and on WAL flushes; they run on the loop too, but on non-blocking connections (`Store.run`), so the loop serves
# others while they wait.
@router.post("/api/process", response_model=ProcessOut)
async def process(body: ProcessIn, request: Request, store: StoreDep, auth: AuthDep, settings: SettingsDep,
                  token: TokenDep) -> JSONResponse:
    auth.require_admin(token, "processing a request")
    # `williw worker` (server.serve) puts its planning process in app.state; an app built by create_app alone
    # plans in the thread pool.
    pool = getattr(request.app.state, "planning_pool", None)

    def answer(version: int, plan: dict[str, Any]) -> JSONResponse:
        return JSONResponse({"request_id": body.request_id, "status": "planned", "plan_version": version,
                             "plan": plan})

    if pool is None:
        return await run_in_threadpool(lambda: answer(*service.process_request(
            store, settings, body.request_id, metadata=body.metadata, metadata_repo=body.metadata_repo,
            model_repo=body.model_repo, revision=body.revision, strategy=body.strategy, objective=body.objective,
            context_length=body.context_length)))

    def prepare() -> service.PlanningJob:
        return service.planning_job(store, settings, body.request_id, metadata=body.metadata,
                                    metadata_repo=body.metadata_repo, model_repo=body.model_repo,
                                    revision=body.revision,
                                    strategy=body.strategy, objective=body.objective,
                                    context_length=body.context_length)

    # A Hub fetch is network I/O: never on the loop.
    job = await _on_loop(request, prepare) if body.metadata is not None else await run_in_threadpool(prepare)
    planned = asyncio.ensure_future(pool.plan_dict(*job.args))
    await asyncio.wait([planned])

    def save() -> JSONResponse:
        return answer(*service.save_outcome(store, job, planned.result))

    return await _on_loop(request, save)


@router.post("/api/get-plan")
async def get_plan(body: GetPlanIn, request: Request, store: StoreDep) -> JSONResponse:
    def work() -> Any:
        return JSONResponse(service.plan_for(store, body.request_id, node_id=body.node_id, version=body.version))

    return await _on_loop(request, work)


async def _on_loop(request: Request, work: Callable[[], T]) -> T:
    # A user request's store work on the loop, in its turn (see `turns`), so heartbeats never queue behind more than
    # one of these. On PostgreSQL through `Store.run`: while its queries wait, the loop serves heartbeats (whose
    # batches do not take turns), but other user work waits for the turn. Without turns, 50 users' result
    # processing came due together and heartbeats' p99 was 4.5 s at 624/s; with them, 117 ms at 942/s
    # (bench/worker.py, same machine and hour).
    store: Store = request.app.state.store
    async with turns_of(request.app.state).turn():
        return work() if store.is_sqlite else await store.run(work)


@router.get("/api/requests/{request_id}")
async def get_request(request_id: RequestIdPath, store: StoreDep) -> RequestOut:
    def work() -> Any:
        return RequestOut(**vars(store.get_request(request_id)))

    return await store.run(work)


# -- nodes ---------------------------------------------------------------------------------------------------

@router.post("/api/nodes", status_code=status.HTTP_200_OK)
async def register_node(body: NodeIn, response: Response, store: StoreDep, auth: AuthDep, settings: SettingsDep,
                        token: TokenDep) -> RegisterOut:
    def work() -> Any:
        node_id = check_node_id(body.node_id, "body field 'node_id'")
        who = auth.require_node(token, node_id, lambda: _existing_hash(store, node_id), "registering a node")
        # The admin (or anyone, on an open service) gets a fresh token, which revokes the old one; a node
        # updating itself keeps the token it authenticated with.
        node_token = token if who == "node" and token else new_node_token()
        now = time.time()
        new_hash = hash_token(node_token) if who == "admin" else None
        record, created = store.upsert_node(body.model_dump(), new_hash, now)
        if created:
            response.status_code = status.HTTP_201_CREATED
        return RegisterOut(node=_node_out(record, settings, now), created=created, node_token=node_token)

    return await run_in_threadpool(work) if store.is_sqlite else await store.run(work)


def _existing_hash(store: Store, node_id: str) -> str:
    try:
        return store.node_token_hash(node_id)
    except NotFound:
        raise AuthError(f"registering a new node ('{node_id}') needs the admin token", 403) from None


@router.post("/api/nodes/{node_id}/heartbeat", response_model=HeartbeatOut)
async def heartbeat(node_id: NodeIdPath, request: Request, store: StoreDep, auth: AuthDep, settings: SettingsDep,
                    token: TokenDep) -> JSONResponse:
    # The hot path (~1,000/s): one prebuilt conditional UPDATE that checks the node's token hash in its WHERE
    # clause, and a JSONResponse built here, which skips FastAPI's response validation. On SQLite it runs on the
    # event loop (~0.1 ms, less than a thread-pool hop); on PostgreSQL each commit waits for a round trip and a WAL
    # flush, so heartbeats are committed in batches, without blocking the loop (`heartbeats`). Only when the
    # UPDATE matches nothing does the slow path work out why (401, 403 or 404) with the rules every other endpoint
    # uses.
    check_node_id(node_id, "path 'node_id'")
    admin = auth.is_admin(token)
    if admin or token is not None:
        now = time.time()
        token_hash = None if admin else hash_token(token)
        if store.is_sqlite:
            done = store.heartbeat(node_id, now, token_hash)
        else:
            done = await batcher_of(request.app.state).beat(node_id, token_hash, now)
        if done:
            return JSONResponse({"node_id": node_id, "last_heartbeat": now, "ttl_s": settings.node_ttl_s})

    def why() -> None:
        auth.require_node(token, node_id, lambda: store.node_token_hash(node_id), "a heartbeat")
        raise NotFound(f"node '{node_id}' is not registered")

    return await run_in_threadpool(why)


@router.get("/api/nodes")
async def list_nodes(store: StoreDep, settings: SettingsDep, online: bool | None = None) -> dict[str, Any]:
    def work() -> Any:
        now = time.time()
        out = [_node_out(n, settings, now) for n in store.list_nodes()]
        if online is not None:
            out = [n for n in out if n.online == online]
        return {"nodes": out, "ttl_s": settings.node_ttl_s}

    return await run_in_threadpool(work)


@router.get("/api/nodes/{node_id}")
async def get_node(node_id: NodeIdPath, store: StoreDep, settings: SettingsDep) -> NodeOut:
    def work() -> Any:
        check_node_id(node_id, "path 'node_id'")
        return _node_out(store.get_node(node_id), settings, time.time())

    return await run_in_threadpool(work)


@router.delete("/api/nodes/{node_id}")
async def delete_node(node_id: NodeIdPath, store: StoreDep, auth: AuthDep, token: TokenDep) -> dict[str, Any]:
    def work() -> Any:
        check_node_id(node_id, "path 'node_id'")
        auth.require_node(token, node_id, lambda: store.node_token_hash(node_id), "deleting a node")
        store.delete_node(node_id)
        return {"node_id": node_id, "deleted": True}


    return await run_in_threadpool(work)
