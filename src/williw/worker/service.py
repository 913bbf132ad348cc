"""What the routes ask for, without HTTP: settings, node liveness, and planning a request.

``process_request`` is the seed's "read the metadata, select nodes, run the algorithm": it reads the metadata
(inline, or from a Hub repo through `williw.hub`), takes the nodes that heartbeated within the TTL, calls
`williw.planner.make_plan`, and stores the plan as the request's next version.

Failure policy (documented in the README):
  * the body is wrong (inline metadata that does not validate, an unknown objective): 422, the request is not
    touched — the client fixes its body and sends it again;
  * the body is right but the plan cannot be made (no online node, the model does not fit, the Hub repo is
    unreachable or holds bad metadata): the request becomes ``failed`` with the reason, and the answer is 409
    (502 when the Hub failed). ``process`` may be called again: a failed request can still be planned, and a
    planned one gets a new plan version (versions only grow).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from williw.errors import HubError, InfeasiblePlan, MetadataError, WilliwError
from williw.jsonio import dumps_strict
from williw.planner.plan import PLAN_KEY
from williw.progress import get_logger
from williw.worker.planning import PlanningUnavailable, plan_dict
from williw.worker.store import NodeRecord, NotFound, RequestRecord, Store

log = get_logger(__name__)

DEFAULT_NODE_TTL_S = 30.0
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_DB_FILE = "williw-worker.db"


@dataclass(frozen=True)
class WorkerSettings:
    """How one worker process runs.

    Attributes:
        db_url: SQLAlchemy URL or SQLite file path.
        token: the admin token; None leaves the service open (see `williw.worker.auth`).
        node_ttl_s: a node whose last heartbeat is older than this is offline and not planned on.
        max_body_bytes: larger request bodies get 413.
        hub_endpoint, hub_token: where ``metadata_repo`` is read from (default: huggingface.co, ``HF_TOKEN``).
    """

    db_url: str = DEFAULT_DB_FILE
    token: str | None = None
    node_ttl_s: float = DEFAULT_NODE_TTL_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    hub_endpoint: str | None = None
    hub_token: str | None = None


class Conflict(WilliwError):
    """The request exists but is not in a state that allows the action (409, or ``status_code``)."""

    def __init__(self, message: str, status_code: int = 409) -> None:
        super().__init__(message)
        self.status_code = status_code


def new_request_id() -> str:
    """A random request id (uuid4, 32 hex digits): unguessable, and safe in URLs, SQL and file names."""
    return uuid.uuid4().hex


def is_online(node: NodeRecord, now: float, ttl_s: float) -> bool:
    """Whether the node heartbeated within ``ttl_s`` seconds of ``now``."""
    return now - node.last_heartbeat <= ttl_s


OFFLINE = "offline: "  # how a plan's reason for excluding an offline node starts (the re-planning check reads it)


def split_fleet(records: list[NodeRecord], now: float,
                ttl_s: float) -> tuple[list[NodeRecord], tuple[tuple[str, str], ...]]:
    """The online nodes, and ``(node_id, reason)`` for each of the others (the plan lists them as excluded)."""
    online = [r for r in records if is_online(r, now, ttl_s)]
    offline = tuple((r.node_id, f"{OFFLINE}last heartbeat {now - r.last_heartbeat:.0f} s ago (TTL {ttl_s:g} s)")
                    for r in records if not is_online(r, now, ttl_s))
    return online, offline


@dataclass(frozen=True)
class PlanningJob:
    """What the planner needs for one ``process`` call, read from the store: `planning.plan_dict`'s arguments."""

    request_id: str
    source: str  # "metadata" (inline) or "Hub repo '<repo>'"
    args: tuple[Any, ...]


def process_request(store: Store, settings: WorkerSettings, request_id: str, *, metadata: dict[str, Any] | None,
                    metadata_repo: str | None, revision: str | None = None, strategy: str = "pipeline",
                    objective: str = "prefill", model_repo: str | None = None,
                    context_length: int | None = None) -> tuple[int, dict[str, Any]]:
    """Plan a request on the online nodes, in this thread, and store the plan as its next version.

    `planning_job`, `williw.worker.planning.plan_dict` and `save_outcome` in a row; `williw worker` runs the middle
    step in its planning process instead.

    Args:
        metadata: the metadata JSON inline, or None to read ``metadata_repo``.
        metadata_repo: a Hub repo id holding the metadata of the request's model.
        model_repo: the model's own Hub repo: the worker makes the metadata from its config and headers, read by
            HTTP range (`williw.remote_checkpoint`), for the request's batch size and sequence length.
        revision: the Hub revision of ``metadata_repo`` or ``model_repo``.
        strategy, objective: passed to `williw.planner.make_plan`.
        context_length: tokens of context the KV cache of each sequence must hold (default: the request's
            sequence length); the batch is the request's batch size.

    Returns:
        The plan version and the stored plan JSON.

    Raises:
        NotFound: unknown request.
        MetadataError, PlanError: the inline metadata or the options are invalid (the request is unchanged).
        Conflict: planning failed; the request is now ``failed`` with the same message as its reason.
    """
    job = planning_job(store, settings, request_id, metadata=metadata, metadata_repo=metadata_repo,
                       revision=revision, strategy=strategy, objective=objective, model_repo=model_repo,
                       context_length=context_length)
    return save_outcome(store, job, lambda: plan_dict(*job.args))


def planning_job(store: Store, settings: WorkerSettings, request_id: str, *, metadata: dict[str, Any] | None,
                 metadata_repo: str | None, revision: str | None = None, strategy: str = "pipeline",
                 objective: str = "prefill", model_repo: str | None = None,
                 context_length: int | None = None) -> PlanningJob:
    """Read what planning ``request_id`` needs: its metadata (inline, or fetched from the Hub) and the nodes.

    Raises:
        NotFound: unknown request.
        Conflict: the Hub repo is unreachable (502) or no node is online (409); the request is now ``failed``.
    """
    request = store.get_request(request_id)
    if metadata is not None:
        source = "metadata"
    elif model_repo is not None:
        source = f"Hub model '{model_repo}'"
        metadata = _metadata_of_model(store, settings, request, model_repo, revision)
    else:
        repo = metadata_repo or ""
        metadata, source = _fetch_metadata(store, settings, request, repo, revision), f"Hub repo '{repo}'"
    now = time.time()
    records = store.list_nodes()
    live, offline = split_fleet(records, now, settings.node_ttl_s)
    online = [r.fleet_dict() for r in live]
    if not online:
        _fail(store, request_id, f"no online nodes: {len(records)} registered, none heartbeated in the last "
                                 f"{settings.node_ttl_s:g} s")
    # The workload is the request's: its batch, and its sequence length as the context unless one is given.
    return PlanningJob(request_id, source, (metadata, source, online, offline, strategy, objective,
                                            request.batch_size, context_length or request.sequence_length))


def save_outcome(store: Store, job: PlanningJob, result: Callable[[], dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """Store the plan that ``result()`` returns as the request's next version, or what went wrong.

    Args:
        result: returns `plan_dict`'s answer or raises its error (a done future's ``result``).

    Returns:
        The plan version and the stored plan JSON.

    Raises:
        MetadataError, PlanError: bad inline metadata or options (the request is unchanged).
        Conflict: the model does not fit, or the Hub repo holds bad metadata: the request is now ``failed``
            (409); the planning process died twice (503, the request is unchanged).
    """
    try:
        plan = result()
    except InfeasiblePlan as exc:
        _fail(store, job.request_id, str(exc))
    except MetadataError as exc:
        if job.source == "metadata":
            raise  # the client's body is wrong: 422, the request is unchanged
        _fail(store, job.request_id, str(exc))  # the Hub repo holds bad metadata
    except PlanningUnavailable as exc:
        raise Conflict(f"request '{job.request_id}' was not planned: {exc}", 503) from None

    def render(version: int) -> dict[str, Any]:
        plan[PLAN_KEY]["version"] = version
        return plan

    try:  # a plan is stored only as strict JSON: one NaN would make every later get-plan of it a 500
        dumps_strict(plan)
    except ValueError:
        _fail(store, job.request_id, "the planner produced a number that is not finite; no plan stored")
    # The metadata is kept, in the plan's transaction, so that the worker can re-plan the request when its fleet
    # changes (williw.worker.replanning).
    from williw.worker.migration_store import store_metadata_in

    now = time.time()
    version, stored = store.save_plan(job.request_id, render, now, also=lambda conn: {
        "metadata_digest": store_metadata_in(conn, job.args[0], now)})
    log.info("request %s planned: version %d on %d node(s)", job.request_id, version,
             len(stored[PLAN_KEY]["stages"]))
    return version, stored


def _fetch_metadata(store: Store, settings: WorkerSettings, request: RequestRecord, repo: str,
                    revision: str | None) -> Any:
    try:
        from williw.hub import fetch_metadata

        return fetch_metadata(repo, request.model_name, token=settings.hub_token or os.environ.get("HF_TOKEN"),
                              endpoint=settings.hub_endpoint, revision=revision)
    except (HubError, ImportError) as exc:
        _fail(store, request.request_id, f"cannot read the metadata of '{request.model_name}' from Hub repo "
                                         f"'{repo}': {exc}", status_code=502)


def _metadata_of_model(store: Store, settings: WorkerSettings, request: RequestRecord, repo: str,
                       revision: str | None) -> Any:
    from williw.errors import CheckpointError

    try:
        from williw.metadata import generate_metadata
        from williw.remote_checkpoint import open_remote_checkpoint

        fetched = open_remote_checkpoint(repo, revision=revision, endpoint=settings.hub_endpoint,
                                         token=settings.hub_token or os.environ.get("HF_TOKEN"))
        meta = generate_metadata(fetched.checkpoint, model_name=request.model_name, batch_size=request.batch_size,
                                 sequence_length=request.sequence_length)
        return json.loads(dumps_strict(meta.to_dict()))  # as inline metadata arrives: lists, not tuples
    except HubError as exc:
        _fail(store, request.request_id, f"cannot read the headers of Hub model '{repo}': {exc}", status_code=502)
    except (CheckpointError, MetadataError) as exc:
        _fail(store, request.request_id, f"Hub model '{repo}': {exc}")


def _fail(store: Store, request_id: str, reason: str, status_code: int = 409) -> Any:
    reason = " ".join(reason.split())
    store.mark_failed(request_id, reason, time.time())
    log.info("request %s failed: %s", request_id, reason)
    raise Conflict(f"request '{request_id}' failed: {reason}", status_code)


def plan_for(store: Store, request_id: str, *, node_id: str | None = None,
             version: int | None = None) -> dict[str, Any]:
    """The request's plan in force (or ``version``), whole or only ``node_id``'s part.

    Raises:
        NotFound: unknown request, version, or a node that is not in the plan.
        Conflict: the request has no plan yet.
    """
    request = store.get_request(request_id)
    if version is None:
        if request.plan_version is None:
            why = f" ({request.reason})" if request.reason else ""
            raise Conflict(f"request '{request_id}' has no plan: its status is '{request.status}'{why}")
        version = request.plan_version
    plan = store.get_plan(request_id, version)
    if node_id is None:
        return plan
    if node_id not in plan or node_id == PLAN_KEY:
        names = ", ".join(k for k in plan if k != PLAN_KEY)
        raise NotFound(f"node '{node_id}' is not in plan version {version} of request '{request_id}' "
                       f"(nodes: {names})")
    return plan[node_id]


__all__ = ["Conflict", "NotFound", "PlanningJob", "WorkerSettings", "is_online", "new_request_id", "plan_for",
           "planning_job", "process_request", "save_outcome"]
