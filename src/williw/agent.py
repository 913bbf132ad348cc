"""The node agent (``williw node``): register, heartbeat, pull each assigned shard, check it, report it ready.

Identity: the node token the worker issues at the first registration is kept in ``DATA_DIR/node.json`` (mode
0600), so a restarted agent re-registers with it and keeps its token; registering again with the admin token
would revoke it. Only when the worker no longer accepts the saved token (its database was reset) does the agent
fall back to the admin token, if it has one.

Work: every ``poll_s`` the agent asks for its assignments; each one that is not ``ready`` is gathered with
`williw.gather.gather_shard` into ``DATA_DIR/<request_id>/v<version>/<node_id>/``: tensors this node holds in a
shard of an earlier version are copied locally, those the worker's migration steps name a peer for come from
that peer's shard server, the rest from the model's source (a complete shard is skipped, so a restart after a
crash costs only the unfinished file). It is checked against its manifest (the plan's sha256 and the file's
sha256 recomputed), then reported ``ready`` with its path. A failed pull is reported ``failed`` with the reason;
a failure involving peers is first retried from the model alone.

Make-before-break: the shards of older versions are dropped only once the worker has put this node's new version
in force (or, for a node no longer in the plan, once its assignment is gone). Heartbeats run in their own
thread, so a long pull does not make the node look dead; the shard server (`williw.serve.ShardServer`, bound
to ``serve_host``) answers peers in its own threads, and runs this node's stage for ``williw generate``
(`williw.node_stages`).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from williw import jsonio
from williw.client import WorkerClient, WorkerHTTPError
from williw.devices import device_kind
from williw.errors import WilliwError, WorkerError
from williw.fleet import check_node_id
from williw.fsutil import write_json
from williw.progress import get_logger

log = get_logger(__name__)

IDENTITY_FILE = "node.json"
# Request ids are the worker's uuid4 hex; anything else is refused before it becomes a folder name.
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
VERSION_DIR = re.compile(r"^v([1-9][0-9]{0,8})$")


@dataclass(frozen=True)
class AgentConfig:
    """One node agent.

    Attributes:
        worker_url, node_id, compute_tflops, memory_gb: where to register and what this node offers.
        memory_bandwidth_gbps, network_gbps, latency_ms, memory_reserve_gb: the optional planner fields
            (`williw.fleet.Node`); None: not given.
        data_dir: where the identity file and the shards live.
        token: the admin token, needed for the first registration when the worker has one.
        heartbeat_s, poll_s: seconds between heartbeats and between assignment polls.
        hf_token, hub_endpoint: for pulls from the Hub (default ``HF_TOKEN``, ``HF_ENDPOINT``).
        serve_host, serve_port: where the shard server listens for peers (None: no server, peers pull from the
            model instead); serve_url: the URL peers use, when it is not ``http://serve_host:port``.
        device, dtype, weights: what the node runs its stages on (``cpu``, ``cuda:N``, ``mps``) and in: the compute
            dtype and the weight formats it accepts, highest precision first (`williw.devices.resolve_node`).
        device_name, device_memory_bytes: what the device is, registered with the worker (None: not given).
    """

    worker_url: str
    node_id: str
    compute_tflops: float
    memory_gb: float
    data_dir: str
    token: str | None = None
    memory_bandwidth_gbps: float | None = None
    heartbeat_s: float = 5.0
    poll_s: float = 1.0
    hf_token: str | None = None
    hub_endpoint: str | None = None
    serve_host: str | None = "127.0.0.1"
    serve_port: int = 0
    serve_url: str | None = None
    network_gbps: float | None = None
    latency_ms: float | None = None
    memory_reserve_gb: float | None = None
    device: str = "cpu"
    dtype: str = "float32"
    weights: tuple[str, ...] = ("as-stored",)
    device_name: str | None = None
    device_memory_bytes: int | None = None


class NodeAgent:
    """Run with `run` until `stop` is called (the CLI calls it on SIGTERM/SIGINT)."""

    def __init__(self, config: AgentConfig) -> None:
        check_node_id(config.node_id, "--node-id")
        self.config = config
        self.data_dir = Path(config.data_dir)
        self._stop = threading.Event()
        self.client: WorkerClient | None = None
        self.ready: dict[str, str] = {}  # request_id → shard folder this process reported ready
        self.failed: set[str] = set()  # requests whose pull failed in this process: not retried until restart
        self.dropped: list[str] = []  # shard folders this process dropped (superseded versions)
        self.server: Any = None  # the ShardServer, while running
        # Called with (event, fields) on each change of an assignment's state: "pulling", "ready" (shard_path,
        # seconds) and "failed" (error). The library never prints; `williw node` prints one line per event.
        self.on_event: Callable[[str, dict[str, Any]], None] = lambda event, fields: None

    def stop(self) -> None:
        self._stop.set()

    def register(self) -> WorkerClient:
        """Register (or re-register) with the worker; returns a client that sends this node's token.

        Raises:
            WorkerError: the worker refuses the registration.
        """
        c = self.config
        self.data_dir.mkdir(parents=True, exist_ok=True)
        saved = self._saved_token()
        fields: dict[str, Any] = {"memory_bandwidth_gbps": c.memory_bandwidth_gbps, "network_gbps": c.network_gbps,
                                  "latency_ms": c.latency_ms, "memory_reserve_gb": c.memory_reserve_gb,
                                  "device": device_kind(c.device), "device_name": c.device_name, "dtype": c.dtype,
                                  "weights": list(c.weights), "device_memory_bytes": c.device_memory_bytes}
        base = WorkerClient(c.worker_url, saved or c.token)
        try:
            answer = base.register_node(c.node_id, c.compute_tflops, c.memory_gb, **fields)
        except WorkerHTTPError as exc:
            if saved is None or exc.status_code not in (401, 403):
                raise
            log.info("node %s: the worker refused the saved token (%s); registering with the admin token",
                     c.node_id, exc.detail)
            base = WorkerClient(c.worker_url, c.token)
            answer = base.register_node(c.node_id, c.compute_tflops, c.memory_gb, **fields)
        finally:
            base.close()
        self._save_token(answer["node_token"])
        self.client = WorkerClient(c.worker_url, answer["node_token"])
        return self.client

    def run(self) -> None:
        """Register, then heartbeat and work until `stop`.

        Raises:
            WorkerError: the first registration fails (later worker outages are waited out).
        """
        client = self.register()
        beat = threading.Thread(target=self._heartbeats, name=f"heartbeat-{self.config.node_id}", daemon=True)
        beat.start()
        self._start_server(client)
        try:
            while not self._stop.is_set():
                try:
                    self.work_once(client)
                except WorkerError as exc:  # the worker is restarting or unreachable: try again later
                    log.info("node %s: %s", self.config.node_id, exc)
                self._stop.wait(self.config.poll_s)
        finally:
            self._stop.set()
            beat.join(5)
            if self.server is not None:
                self.server.stages.stopped = True
                self.server.shutdown()
                self.server.server_close()
            client.close()

    def _start_server(self, client: WorkerClient) -> None:
        from williw.serve import ShardServer

        c = self.config
        if c.serve_host is None:
            return
        from williw.node_stages import StageService

        self.server = ShardServer(self.data_dir, c.node_id, c.serve_host, c.serve_port)
        self.server.stages = StageService(self.data_dir, c.node_id, lambda r, v: client.get_plan(r, version=v),
                                          client.get_request, lambda r: serve_urls(client, r), device=c.device,
                                          dtype=c.dtype, weights=c.weights)
        self.server.start()
        client.set_serve_url(c.node_id, c.serve_url or self.server.url)

    def work_once(self, client: WorkerClient) -> int:
        """Pull every assignment that is not ready yet; returns how many became ready."""
        made = 0
        assignments = client.node_assignments(self.config.node_id)
        for a in assignments:
            if self._stop.is_set():
                break
            if a["state"] == "ready":
                self._preload(a["request_id"], a["plan_version"])  # an agent restarted on a ready shard
                continue
            if a["state"] == "failed" and a["request_id"] in self.failed:
                continue
            made += self._pull(client, a)
        self._drop_superseded(client, assignments)
        return made

    def _pull(self, client: WorkerClient, a: dict[str, Any]) -> int:
        request_id, version, node_id = a["request_id"], a["plan_version"], self.config.node_id
        if not REQUEST_ID.match(request_id):
            log.warning("node %s: ignoring assignment with malformed request id %r", node_id, request_id)
            return 0
        client.report_assignment(request_id, node_id, "pulling", plan_version=version)
        what = {"request_id": request_id, "plan_version": version}
        self.on_event("pulling", what)
        started = time.monotonic()
        try:
            shard_dir, sha = self._pull_and_check(client, a)
        except (WilliwError, OSError) as exc:  # a pull's failure is reported; the worker's goes to `run`
            if isinstance(exc, WorkerError):
                raise
            message = " ".join(str(exc).split())[:1900]
            log.warning("node %s: pulling request %s failed: %s", node_id, request_id, message)
            client.report_assignment(request_id, node_id, "failed", plan_version=version, error=message)
            self.failed.add(request_id)
            self.on_event("failed", {**what, "error": message})
            return 0
        client.report_assignment(request_id, node_id, "ready", plan_version=version, shard_path=str(shard_dir),
                                 sha256=sha)
        self.ready[request_id] = str(shard_dir)
        self._preload(request_id, version)
        self.on_event("ready", {**what, "shard_path": str(shard_dir),
                                "seconds": round(time.monotonic() - started, 2)})
        return 1

    def _preload(self, request_id: str, version: int) -> None:
        """Load the stage of a ready shard in the background, so the first generation does not wait for it."""
        if self.server is not None and self.server.stages is not None:
            self.server.stages.preload(request_id, version)

    def _pull_and_check(self, client: WorkerClient, a: dict[str, Any]) -> tuple[Path, str]:
        from williw.errors import SplitError
        from williw.gather import gather_shard
        from williw.planner.plan import Plan
        from williw.shards import read_manifest, sha256_file

        request_id, version, node_id = a["request_id"], a["plan_version"], self.config.node_id
        plan = Plan.from_dict(client.get_plan(request_id, version=version), f"plan version {version}")
        out = self.data_dir / request_id / f"v{version}"
        local = [d / node_id for d, _ in self._versions(request_id) if d != out]
        peers = {t: step["url"] for step in a.get("pulls") or () if step.get("url") for t in step["tensors"]}
        options = dict(revision=a.get("revision"), token=self.config.hf_token, endpoint=self.config.hub_endpoint)
        try:
            gather_shard(a["source"], plan, node_id, out, local=local, peers=peers, **options)
        except WilliwError as exc:
            if not peers:
                raise
            log.info("node %s: gathering from peers failed (%s); reading the model instead", node_id, exc)
            gather_shard(a["source"], plan, node_id, out, local=local, **options)
        shard_dir = out / node_id
        manifest = read_manifest(shard_dir)
        if manifest.plan_sha256 != plan.digest():
            raise SplitError(f"'{shard_dir}': the shard was cut for another plan (sha256 {manifest.plan_sha256[:12]})")
        actual = sha256_file(shard_dir / manifest.file)
        if actual != manifest.file_sha256:
            raise SplitError(f"'{shard_dir / manifest.file}': sha256 {actual[:12]}… does not match the manifest's "
                             f"{manifest.file_sha256[:12]}…")
        return shard_dir.resolve(), actual

    def _versions(self, request_id: str) -> list[tuple[Path, int]]:
        """(folder, version) of every version folder of the request on disk, oldest first."""
        root = self.data_dir / request_id
        found = [(d, int(m.group(1))) for d in root.iterdir() if (m := VERSION_DIR.match(d.name)) and d.is_dir()] \
            if root.is_dir() else []
        return sorted(found, key=lambda x: x[1])

    def _drop_superseded(self, client: WorkerClient, assignments: list[dict[str, Any]]) -> None:
        """Delete this node's shards of versions the worker no longer needs it to hold (make-before-break).

        With an assignment ready on the version in force, every other version's folder goes; with no assignment in
        a request the worker still knows, the whole request's folder goes (the node left its plan). A request the
        worker does not know (its database was reset) is kept: deleting weights is not undone by a re-pull.
        """
        rows = {a["request_id"]: a for a in assignments}
        for root in sorted(self.data_dir.iterdir()) if self.data_dir.is_dir() else ():
            request_id = root.name
            if not REQUEST_ID.match(request_id) or not root.is_dir():
                continue
            row = rows.get(request_id)
            if row is None:
                try:
                    client.get_request(request_id)
                except WorkerHTTPError:
                    continue  # unknown to the worker (404) or refused: keep
                doomed = [d for d, _ in self._versions(request_id)]
            elif row["state"] == "ready" and row["plan_version"] == row.get("in_force_version"):
                doomed = [d for d, v in self._versions(request_id) if v != row["plan_version"]]
            else:
                continue
            if doomed and self.server is not None and self.server.stages is not None:
                self.server.stages.drop_except(request_id, row["plan_version"] if row else 0)
            for folder in doomed:
                shutil.rmtree(folder, ignore_errors=True)
                self.dropped.append(str(folder))
                log.info("node %s: dropped %s (superseded)", self.config.node_id, folder)
            if row is None:
                with contextlib.suppress(OSError):  # not empty: a file this agent did not write
                    root.rmdir()  # empty now: the worker need not be asked about it again

    def _heartbeats(self) -> None:
        client = self.client
        while client is not None and not self._stop.wait(self.config.heartbeat_s):
            try:
                client.heartbeat(self.config.node_id)
            except WorkerError as exc:
                log.info("node %s: heartbeat failed: %s", self.config.node_id, exc)

    def _identity_path(self) -> Path:
        return self.data_dir / IDENTITY_FILE

    def _saved_token(self) -> str | None:
        try:
            data = jsonio.parse(self._identity_path().read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        if isinstance(data, dict) and data.get("node_id") == self.config.node_id and isinstance(
                data.get("node_token"), str):
            return data["node_token"]
        return None

    def _save_token(self, token: str) -> None:
        write_json(self._identity_path(), {"node_id": self.config.node_id, "node_token": token,
                                           "worker_url": self.config.worker_url}, perms=0o600)


def serve_urls(client: WorkerClient, request_id: str) -> dict[str, str]:
    """Where each node of the request serves its stage (the worker's assignments), for passing a step on."""
    rows = client.request_assignments(request_id)["assignments"]
    return {r["node_id"]: r["serve_url"].rstrip("/") for r in rows if r.get("serve_url")}
