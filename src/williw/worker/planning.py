"""The CPU part of ``process`` (metadata JSON → planner → plan JSON), and a one-process pool that runs it off the
serving process.

Why a process: the worker answers everything from one event loop, and the GIL is shared by that loop and the
thread pool. A ``process`` call holds the GIL for ~3 ms of pure Python (validating the metadata, building the
nodes, the planner, the plan dict); with 50 users planning back to back the loop waited for the GIL so often that
heartbeats went from a p99 of ~10 ms to ~300-900 ms on a 2-core machine. In a child process the planner runs on
the other core and the serving process only does I/O and SQL. Planning is pure (data in, a plan dict out), so a
call can be retried on a fresh child when the previous one died.

`plan_dict` is the same function inline (tests, an embedded worker) and in the child, so both raise the same
errors with the same messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from williw.errors import WilliwError
from williw.progress import get_logger

log = get_logger(__name__)


class PlanningUnavailable(WilliwError):
    """The planning process died twice in a row on one call."""


def plan_dict(metadata: dict[str, Any], source: str, fleet: list[dict[str, Any]],
              offline: tuple[tuple[str, str], ...], strategy: str, objective: str, batch_size: int | None = None,
              context_length: int | None = None) -> dict[str, Any]:
    """Plan ``metadata`` on ``fleet`` and return the plan JSON (version 1; the store sets the real one).

    Args:
        metadata: the model's metadata JSON.
        source: where the metadata came from, for error messages ("metadata", "Hub repo 'x'").
        fleet: the online nodes as entries of the planner's nodes file.
        offline: ``(node_id, reason)`` of the registered nodes that are not online, added to the plan's
            ``excluded`` list.
        strategy, objective: passed to `williw.planner.make_plan`.
        batch_size, context_length: the workload every stage's memory must hold (KV cache for ``B × C`` tokens;
            `williw.planner.make_plan`); None: the metadata's batch size and sequence length.

    Raises:
        MetadataError: the metadata does not validate.
        NodesError: a registered node is not a valid planner node.
        InfeasiblePlan: the model does not fit the nodes.
        PlanError: a bad strategy or objective.
    """
    from williw.fleet import parse_nodes
    from williw.metadata import ModelMetadata
    from williw.planner import make_plan
    from williw.planner.plan import ExcludedNode

    meta = ModelMetadata.from_dict(metadata, source)
    nodes = parse_nodes(fleet, "the worker's registry")
    plan = make_plan(meta, nodes, strategy=strategy, objective=objective, batch_size=batch_size,
                     context_length=context_length)
    plan = dataclasses.replace(plan, excluded=plan.excluded + tuple(ExcludedNode(n, r) for n, r in offline))
    return plan.to_dict()


def _exit_with_parent(parent_pid: int) -> None:
    # The child holds both ends of its task queue, so it never sees EOF when the worker is SIGKILLed (a crash, the
    # durability tests): it watches its parent instead and leaves within a second of it.
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="williw-exit-with-parent", daemon=True).start()


def _warm() -> None:
    # Import the planner in the child before the first call needs it (~0.3 s).
    import williw.fleet
    import williw.metadata
    import williw.planner  # noqa: F401


class PlanningPool:
    """One child process that runs `plan_dict`; spawned on first use (or `warm`), stopped by `close`.

    ``spawn`` rather than ``fork``: the serving process has threads (the SQL pool, uvicorn's), and a fork copies
    their locks in whatever state they are.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False

    def _get(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise PlanningUnavailable("the worker is shutting down")
            if self._executor is None:
                self._executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                                     initializer=_exit_with_parent, initargs=(os.getpid(),))
            return self._executor

    def warm(self) -> None:
        """Start the child now, so the first ``process`` call does not wait for it."""
        self._get().submit(_warm)

    async def plan_dict(self, *args: Any) -> dict[str, Any]:
        """`plan_dict` in the child; the event loop serves other requests meanwhile.

        Raises:
            the errors of `plan_dict`, and PlanningUnavailable when the child died twice.
        """
        for attempt in range(2):
            executor = self._get()
            try:
                return await asyncio.wrap_future(executor.submit(plan_dict, *args))
            except BrokenProcessPool:
                log.warning("the planning process died; starting a new one (attempt %d)", attempt + 1)
                with self._lock:
                    if self._executor is executor:
                        self._executor = None
                executor.shutdown(wait=False)
        raise PlanningUnavailable("the planning process died twice while planning this request; see the log")

    def close(self) -> None:
        """Stop the child (waiting for a call in progress)."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


__all__ = ["PlanningPool", "PlanningUnavailable", "plan_dict"]
