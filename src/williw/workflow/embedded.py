"""A worker inside the ``williw run`` process (no ``--worker``): the real app and SQLite store under uvicorn in a
thread, on a free loopback port, and optionally in-process node agents for a local fleet (``--local-nodes``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from williw.agent import AgentConfig, NodeAgent
from williw.errors import WorkerError


class EmbeddedWorker:
    """Serve the worker app on ``127.0.0.1:<free port>`` with its database at ``db_path`` until `stop`."""

    def __init__(self, db_path: str | Path, *, node_ttl_s: float = 30.0) -> None:
        import uvicorn

        from williw.worker.app import create_app
        from williw.worker.server import bind
        from williw.worker.service import WorkerSettings

        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = create_app(WorkerSettings(db_url=str(db_path), node_ttl_s=node_ttl_s))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="williw-embedded-worker")
        self.agents: list[tuple[NodeAgent, threading.Thread]] = []

    def start(self, timeout: float = 30.0) -> EmbeddedWorker:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise WorkerError(f"the embedded worker did not start within {timeout:g} s")
            time.sleep(0.02)
        return self

    def start_local_nodes(self, nodes: list[dict[str, Any]], data_root: Path) -> None:
        """One in-process agent per entry of a nodes file, with its data under ``data_root/<node_id>``."""
        for n in nodes:
            agent = NodeAgent(AgentConfig(self.url, n["node_id"], n["compute_tflops"], n["memory_gb"],
                                          str(data_root / n["node_id"]),
                                          memory_bandwidth_gbps=n.get("memory_bandwidth_gbps"),
                                          network_gbps=n.get("network_gbps"), latency_ms=n.get("latency_ms"),
                                          memory_reserve_gb=n.get("memory_reserve_gb"), heartbeat_s=2.0,
                                          poll_s=0.2, device=n.get("device") or "cpu",
                                          dtype=n.get("dtype") or "float32",
                                          weights=tuple(n.get("weights") or ("as-stored",))))
            agent.register()  # before planning: the worker plans only on registered, online nodes
            thread = threading.Thread(target=agent.run, daemon=True, name=f"williw-agent-{n['node_id']}")
            thread.start()
            self.agents.append((agent, thread))

    def stop(self) -> None:
        for agent, _ in self.agents:
            agent.stop()
        for _, thread in self.agents:
            thread.join(10)
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
