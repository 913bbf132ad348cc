"""The user node's complete workflow (the seed's ``node_client/complete_workflow.py``), in seven steps:

1. request   ``POST /api/request`` with the model name;
2. download  the model, only when nodes pull from this node (``pull_from="serve"``; a local folder is used as is);
3. metadata  generated from the checkpoint headers: a folder's, or the Hub repo's read by HTTP range (config and
             headers only, pinned to the commit the revision resolves to);
4. upload    to the metadata repo (skipped without one: the metadata then goes inline in step 5);
5. process   ``POST /api/process``: the worker plans on its online nodes;
6. plan      ``POST /api/get-plan``, validated against the metadata;
7. distribute ``POST /api/requests/{id}/distribute`` with where nodes pull from (this node's model folder served
             over HTTP with ranges, or the Hub repo itself), then wait until every node of the plan reports its
             shard ready, failing at once if one fails or stops heartbeating.

Resume: each step's result is written to ``WORK_DIR/run-state.json``; a re-run with the same model and worker
skips the steps whose results are still there and valid (the request still exists, the metadata file still
parses, the plan version is still in force), and distribution keeps the shards that are already ready.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from williw import jsonio
from williw.client import WorkerClient, WorkerHTTPError
from williw.errors import WilliwError, WorkerError
from williw.fsutil import write_json
from williw.progress import get_logger

log = get_logger(__name__)

STEPS = ("request", "download", "metadata", "upload", "process", "plan", "distribute")
STATE_FILE = "run-state.json"


class WorkflowError(WilliwError):
    """A step failed; ``step`` names it and the message says why."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"step '{step}' failed: {message}")
        self.step = step


@dataclass(frozen=True)
class StepResult:
    """One step as it ended: ``status`` is ``done`` or ``skipped`` (its result was already there)."""

    step: str
    status: str
    seconds: float
    detail: str


@dataclass
class WorkflowResult:
    """What a run produced: the request, its plan, and where each node's shard lives."""

    request_id: str
    model_name: str
    model_dir: str
    plan_version: int
    plan: dict[str, Any]
    source: str
    shards: dict[str, dict[str, Any]]  # node_id → {shard_path, sha256, state}
    steps: list[StepResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "model_name": self.model_name, "model_dir": self.model_dir,
                "plan_version": self.plan_version, "source": self.source, "shards": self.shards,
                "steps": [vars(s) for s in self.steps], "plan": self.plan}


Reporter = Callable[[str, StepResult | None], None]  # called with (step, None) at its start, then its result


class NodeClient:
    """The seed's user node.

    Args:
        worker_url: the worker (``WORKER_URL``).
        hf_token: Hub token (``HF_TOKEN``) for the download and the metadata upload.
        metadata_repo: Hub repo for the metadata (``METADATA_REPO``); None sends it inline.
        node_id: this user node's id (``NODE_ID``), recorded with the request.
        token: the worker's admin token (``WILLIW_TOKEN``).
        work_dir: where the run state, the metadata and (for a Hub model) the download go.
        pull_from: ``"hub"``: the metadata is made from the repo's headers (nothing downloaded here) and the nodes
            pull their ranges from the Hub, pinned to that commit; ``"serve"``: nodes pull from this node's folder
            (a Hub model is downloaded first), served here. None: ``hub`` for a repo id, ``serve`` for a folder.
        revision: the Hub branch, tag or commit (default main), resolved once to a commit.
        hub_endpoint: the Hub address (default ``HF_ENDPOINT``).
        timeout_s: how long distribution may take before the run fails.
        auto_replan: let the worker re-plan the request when nodes leave or join (issue 9). Blocks nobody alive
            holds are then pulled from the model's source, which must still be reachable: the Hub, not this run's
            short-lived server (with ``pull_from="serve"`` only peers can serve them).
        reporter: told when each step starts and ends (the CLI prints it; the library never does).
    """

    def __init__(self, worker_url: str, hf_token: str | None = None, metadata_repo: str | None = None,
                 node_id: str | None = None, *, token: str | None = None, work_dir: str | os.PathLike[str] = ".",
                 pull_from: str | None = None, hub_endpoint: str | None = None, serve_host: str = "127.0.0.1",
                 timeout_s: float = 600.0, poll_s: float = 0.25, model_label: str | None = None,
                 reporter: Reporter | None = None, auto_replan: bool = False, revision: str | None = None) -> None:
        if pull_from not in ("serve", "hub", None):
            raise WorkflowError("distribute", f"pull_from must be 'serve' or 'hub', not {pull_from!r}")
        self.worker_url = worker_url
        self.hf_token = hf_token
        self.metadata_repo = metadata_repo
        self.node_id = node_id
        self.work_dir = Path(work_dir)
        self.pull_from_option = pull_from
        self.pull_from = pull_from or "serve"  # set for each run's model by `execute_complete_workflow`
        self.revision = revision
        self.hub_endpoint = hub_endpoint
        self.serve_host = serve_host
        self.timeout_s = timeout_s
        self.model_label = model_label  # the name the worker records for a local folder (default local/<folder>)
        self.poll_s = poll_s
        self.auto_replan = auto_replan
        self.reporter = reporter or (lambda _step, _result: None)
        self.client = WorkerClient(worker_url, token)
        self.state: dict[str, Any] = {}
        self.steps: list[StepResult] = []

    # -- the run -------------------------------------------------------------------------------------------

    def execute_complete_workflow(self, model_name: str, batch_size: int = 1,
                                  sequence_length: int = 512) -> WorkflowResult:
        """Run the seven steps (skipping those a previous run finished) and wait for every shard.

        Returns:
            A `WorkflowResult`.

        Raises:
            WorkflowError: a step failed; the message names it and says why.
        """
        from williw.workflow.steps import Steps

        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.pull_from = self.pull_from_option or ("serve" if Path(model_name).expanduser().is_dir() else "hub")
        self.state = self._load_state(model_name, batch_size, sequence_length)
        steps = Steps(self, model_name, batch_size, sequence_length)
        for name in STEPS:
            with self._step(name) as note:
                note(getattr(steps, name)())
        return steps.result(self.steps)

    @contextmanager
    def _step(self, name: str) -> Iterator[Callable[[tuple[str, str]], None]]:
        self.reporter(name, None)
        start = time.monotonic()
        outcome: list[tuple[str, str]] = []
        try:
            yield outcome.append
        except WorkflowError:
            raise
        except WilliwError as exc:
            raise WorkflowError(name, " ".join(str(exc).split())) from exc
        status, detail = outcome[0] if outcome else ("done", "")
        result = StepResult(name, status, round(time.monotonic() - start, 3), detail)
        self.steps.append(result)
        self.save_state()
        self.reporter(name, result)

    # -- run state -----------------------------------------------------------------------------------------

    def _load_state(self, model_name: str, batch_size: int, sequence_length: int) -> dict[str, Any]:
        # Not the worker's URL: an embedded worker gets a new port each run; `Steps.request` asks the worker
        # whether it still knows the request instead.
        key = {"model_name": model_name, "model_label": self.model_label, "batch_size": batch_size,
               "sequence_length": sequence_length, "metadata_repo": self.metadata_repo, "pull_from": self.pull_from,
               "revision": self.revision}
        path = self.work_dir / STATE_FILE
        try:
            saved = jsonio.parse(path.read_bytes())
        except (FileNotFoundError, ValueError):
            saved = {}
        # A state written for another model or option set describes another run: start over.
        if not isinstance(saved, dict) or saved.get("key") != key:
            return {"key": key}
        return saved

    def save_state(self) -> None:
        """Write the run state atomically (a crash leaves the old file or the new one, never half of one)."""
        write_json(self.work_dir / STATE_FILE, self.state)

    # -- waiting for the nodes -----------------------------------------------------------------------------

    def wait_ready(self, request_id: str, plan_version: int) -> dict[str, dict[str, Any]]:
        """Poll the request's assignments until every one is ready.

        Raises:
            WorkflowError: a node failed, stopped heartbeating before it was ready, or the timeout passed.
        """
        deadline = time.monotonic() + self.timeout_s
        last: list[dict[str, Any]] = []
        while True:
            try:
                answer = self.client.request_assignments(request_id)
            except WorkerHTTPError:
                raise
            except WorkerError as exc:  # the worker is restarting: keep waiting until the deadline
                log.info("waiting for the worker: %s", exc)
                answer = None
            if answer is not None:
                last = [a for a in answer["assignments"] if a["plan_version"] == plan_version]
                for a in last:
                    if a["state"] == "failed":
                        raise WorkflowError("distribute", f"node '{a['node_id']}' failed to pull its shard: "
                                                          f"{a['error']}")
                    if a["state"] != "ready" and not a["online"]:
                        age = a["heartbeat_age_s"]
                        since = "it is no longer registered" if age is None else f"last heartbeat {age:.1f} s ago"
                        raise WorkflowError("distribute", f"node '{a['node_id']}' stopped heartbeating before its "
                                                          f"shard was ready ({since}, state '{a['state']}')")
                if last and all(a["state"] == "ready" for a in last):
                    return {a["node_id"]: {"state": a["state"], "shard_path": a["shard_path"], "sha256": a["sha256"]}
                            for a in last}
            if time.monotonic() > deadline:
                waiting = ", ".join(f"{a['node_id']} ({a['state']})" for a in last if a["state"] != "ready")
                raise WorkflowError("distribute", f"timed out after {self.timeout_s:g} s waiting for the nodes' "
                                                  f"shards: {waiting or 'no assignment seen'}")
            time.sleep(self.poll_s)


__all__ = ["STEPS", "NodeClient", "StepResult", "WorkflowError", "WorkflowResult"]
