"""The worker's side of re-planning: when the fleet of a distributed request changes, re-plan it with
`williw.planner.replan.replan`, hand the pulls to the node agents, and switch versions once they are all ready.

* `replan_request` computes the re-plan from the version in force and the online nodes, and stores it as the next
  version with its migration (`migration_store.begin`): the nodes of the new version get assignments on it, each
  with its pull steps (`node_pulls`: which tensors from which peer's shard server, the rest from the model).
* `switch_if_ready` (called when a node reports ready, and by the `Replanner`) puts the new version in force when
  every node of it is ready; agents drop superseded shards only then (make-before-break).
* `Replanner`, a thread of the worker process, checks every few seconds the requests whose automatic re-planning
  is on: a node of the plan (or of the migration under way) that went offline, or an online node the plan never
  considered (it registered, or came back, after the plan was made), triggers a re-plan. A node that leaves in
  the middle of a migration triggers a re-plan from the version still in force, which supersedes it.
  A fleet it already re-planned for is not tried again until the fleet changes (a re-plan that finds nothing to
  change, or no plan at all, would otherwise repeat every tick).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

from williw.errors import InfeasiblePlan
from williw.planner.plan import PLAN_KEY, ExcludedNode, Plan
from williw.progress import get_logger
from williw.worker import assignment_store
from williw.worker import migration_store as db
from williw.worker.leader import LeaderLock
from williw.worker.service import OFFLINE, Conflict, WorkerSettings, is_online, split_fleet
from williw.worker.store import RequestRecord, Store

log = get_logger(__name__)

DEFAULT_MAX_SLOWDOWN = 0.05


def replan_request(store: Store, settings: WorkerSettings, request_id: str, *, reason: str,
                   max_slowdown: float | None = None, max_step_bytes: int | None = None,
                   now: float | None = None) -> db.MigrationRecord | None:
    """Re-plan a distributed request for the online nodes and start the migration to the new version.

    Args:
        reason: recorded with the migration (which nodes left or joined, or who asked).
        max_slowdown, max_step_bytes: default to the request's automatic re-planning options, then 5% and none.

    Returns:
        The migration, or None when the re-plan is the plan in force (nothing would move).

    Raises:
        NotFound: unknown request.
        Conflict: no plan in force, not distributed, no stored metadata, or no plan fits the online nodes (then
            the request is also marked ``failed`` with the reason; its plan in force stays readable).
        Stale (from `migration_store`): the request moved on meanwhile.
    """
    from williw.fleet import parse_nodes
    from williw.metadata import ModelMetadata
    from williw.planner.replan import replan

    now = time.time() if now is None else now
    request = store.get_request(request_id)
    if request.plan_version is None:
        raise Conflict(f"request '{request_id}' has no plan to re-plan: its status is '{request.status}'")
    if not assignment_store.for_request(store, request_id):
        raise Conflict(f"request '{request_id}' is not distributed, so nothing is to migrate: POST /api/process "
                       "plans it again")
    data = db.request_metadata(store, request_id)
    if data is None:
        raise Conflict(f"request '{request_id}' was planned before this worker kept metadata: POST /api/process "
                       "it again to re-plan it")
    options = db.auto_replan_options(request) or {}
    slowdown = max_slowdown if max_slowdown is not None else options.get("max_slowdown", DEFAULT_MAX_SLOWDOWN)
    step = max_step_bytes if max_step_bytes is not None else options.get("max_step_bytes")
    meta = ModelMetadata.from_dict(data, f"the stored metadata of request '{request_id}'")
    current = Plan.from_dict(store.get_plan(request_id, request.plan_version), f"plan version {request.plan_version}")
    online, offline = split_fleet(store.list_nodes(), now, settings.node_ttl_s)
    if not online:
        return _infeasible(store, request_id, reason, "no online nodes")
    try:
        r = replan(meta, current, parse_nodes([n.fleet_dict() for n in online], "the worker's registry"),
                   slowdown, max_step_bytes=step)
    except InfeasiblePlan as exc:
        return _infeasible(store, request_id, reason, str(exc))
    if _layout(r.plan) == _layout(current):
        return None
    active = db.active_migrations(store, [request_id]).get(request_id)

    def render(version: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        excluded = r.plan.excluded + tuple(ExcludedNode(n, why) for n, why in offline)
        plan = dataclasses.replace(r.plan, version=version, excluded=excluded)
        schedule = dataclasses.replace(r.migration, to_version=version)
        return plan.to_dict(), schedule.to_dict(), {**r.summary(), "version": version}

    record = db.begin(store, request_id, from_version=current.version,
                      expected_active=None if active is None else active.to_version, render=render, reason=reason,
                      now=now)
    log.info("request %s: re-planned (%s): version %d, %s bytes to pull", request_id, reason, record.to_version,
             f"{r.bytes_moved:,}")
    return record


def switch_if_ready(store: Store, request_id: str) -> int | None:
    """Put the request's pulling migration in force if every node of it is ready; returns the new version."""
    version = db.switch_if_ready(store, request_id, time.time())
    if version is not None:
        log.info("request %s: plan version %d is in force", request_id, version)
    return version


def node_pulls(store: Store, node_id: str, records: list[Any]) -> dict[str, list[dict[str, Any]]]:
    """request id → ``node_id``'s pull steps, for each of its assignments on a version being migrated to.

    Each step: ``{id, source, url, tensors, bytes}``; ``url`` is the peer's shard folder on its shard server
    (None for the model's source, or a peer that serves nothing: the agent then reads the model).
    """
    active = db.active_migrations(store, [r.request_id for r in records])
    wanted = {r.request_id for r in records if r.request_id in active
              and active[r.request_id].to_version == r.plan_version}
    if not wanted:
        return {}
    urls = db.serve_urls(store)
    out: dict[str, list[dict[str, Any]]] = {}
    for request_id in wanted:
        m = active[request_id]
        steps = []
        for s in m.schedule["steps"]:
            if s["action"] != "pull" or s.get("node_id") != node_id:
                continue
            peer = s["source"] if s["source"] in urls else None
            url = None if peer is None else f"{urls[peer].rstrip('/')}/{request_id}/v{m.from_version}/{peer}"
            steps.append({"id": s["id"], "source": s["source"], "url": url, "tensors": s["tensors"],
                          "bytes": s["bytes"]})
        out[request_id] = steps
    return out


def _layout(plan: Plan) -> list[tuple[str, tuple[str, ...]]]:
    return [(a.node_id, a.tensor_names) for a in plan.assignments]


def _infeasible(store: Store, request_id: str, reason: str, why: str) -> None:
    message = " ".join(f"{db.REPLAN_FAILURE}{reason} failed: {why}".split())
    store.mark_failed(request_id, message, time.time())
    raise Conflict(f"request '{request_id}': {message}")


class Replanner:
    """The background check of `replan_request`'s triggers (see the module doc); one per worker process.

    Several workers on one PostgreSQL database each run one, but only the one holding the re-planning lock
    (`leader.LeaderLock`) checks, so a fleet change is re-planned once, not once per worker; when that worker
    dies, another takes the lock on its next tick. Should two ever race anyway (a manual re-plan and the leader),
    the first to store its version wins and the other finds the request moved on (`migration_store.Stale`).
    """

    def __init__(self, store: Store, settings: WorkerSettings, interval_s: float | None = None) -> None:
        self.store, self.settings = store, settings
        self.interval_s = interval_s if interval_s is not None else min(5.0, max(0.1, settings.node_ttl_s / 4))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tried: dict[str, tuple[int, frozenset[str]]] = {}  # request → the last fleet it re-planned for
        self.leader = LeaderLock(store)

    def start(self) -> None:
        self.leader.held()  # the first worker on the database leads from its start (shown by /healthz)
        self._thread = threading.Thread(target=self._run, name="williw-replanner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.leader.release()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self.leader.held():
                    self.tick()
            except Exception:  # the database is restarting, ...: try again next tick
                log.exception("re-planning check failed")

    def tick(self, now: float | None = None) -> None:
        """Check every request with automatic re-planning on once."""
        now = time.time() if now is None else now
        requests = db.auto_requests(self.store)
        if not requests:
            return
        online = frozenset(n.node_id for n in self.store.list_nodes()
                           if is_online(n, now, self.settings.node_ttl_s))
        active = db.active_migrations(self.store, [r.request_id for r in requests])
        for request in requests:
            m = active.get(request.request_id)
            try:
                self._check(request, m, online)
            except (Conflict, db.Stale) as exc:
                log.info("request %s: %s", request.request_id, exc)

    def _check(self, request: RequestRecord, active: db.MigrationRecord | None, online: frozenset[str]) -> None:
        request_id, in_force = request.request_id, request.plan_version
        target = self.store.get_plan(request_id, active.to_version if active else in_force)
        members = [k for k in target if k != PLAN_KEY]
        known = set(members) | {e["node_id"] for e in target[PLAN_KEY].get("excluded", [])
                                if not str(e.get("reason", "")).startswith(OFFLINE)}
        departed = [n for n in members if n not in online]
        joined = sorted(online - known)
        if not departed and not joined:
            if request.status == "failed" and db.clear_replan_failure(self.store, request_id, time.time()):
                log.info("request %s: the nodes of its plan are back; it is planned again", request_id)
            if active is not None:
                switch_if_ready(self.store, request_id)
            return
        key = (active.to_version if active else in_force, online)
        if self._tried.get(request_id) == key:
            return
        self._tried[request_id] = key
        parts = ([f"{', '.join(departed)} left"] if departed else []) + \
                ([f"{', '.join(joined)} joined"] if joined else [])
        replan_request(self.store, self.settings, request_id, reason=" and ".join(parts))


__all__ = ["Replanner", "node_pulls", "replan_request", "switch_if_ready"]
