"""The stage routes of a node agent's server: the node runs its own stage for the caller of ``williw generate``.

Routes, on the port where the agent serves its shards (`williw.serve.ShardServer`):

* ``POST /stage/{request_id}/v{version}/forward?session=S&start=N``, body: safetensors holding ``x`` (token ids
  ``[1, tokens]`` on the first stage, the previous stage's hidden state otherwise); answer: safetensors holding
  ``hidden`` (inner stage) or ``logits`` (last stage, last position), with ``X-Williw-Compute-Ms`` (the time the
  stage ran, so the caller can tell the hop's transport cost from its compute).
* ``DELETE /stage/{request_id}/v{version}/sessions/{S}``: close a session, freeing its KV cache.

A stage is built on its first request from the node's shard of that version alone
(``DATA_DIR/<request_id>/v<version>/<node_id>/``), with the blocks the worker's plan of that version gives the
node and the KV budget of the request (`williw.runtime.StageHost`). It stays loaded (in memory, so a generation
started on a version finishes on it even once a re-plan dropped the files) until `drop_except` frees it.
Errors are answered as one line of text: 404 no such shard or session, 409 a refused step, 500 a stage that cannot
be built.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from williw.errors import GenerateError, WilliwError
from williw.progress import get_logger

log = get_logger(__name__)

_ROUTE = re.compile(r"^/stage/([0-9a-f]{32})/v([1-9][0-9]{0,8})/(forward|sessions/([0-9a-f]{32}))$")
_SESSION = re.compile(r"^[0-9a-f]{32}$")
Answer = tuple[int, str, bytes, dict[str, str]]


def _text(status: int, message: str) -> Answer:
    return status, "text/plain; charset=utf-8", (message + "\n").encode(), {}


class StageService:
    """Callable by the HTTP handler: ``service(method, path, body) -> (status, content type, body, headers)``.

    Args:
        data_dir, node_id: where this node's shards are.
        plan_of: ``(request_id, version) -> plan dict`` (the worker's plan of that version).
        request_of: ``request_id -> request dict`` (its ``batch_size`` and ``sequence_length``: the KV budget).
    """

    def __init__(self, data_dir: Path, node_id: str, plan_of: Callable[[str, int], dict[str, Any]],
                 request_of: Callable[[str], dict[str, Any]]) -> None:
        self.data_dir, self.node_id = Path(data_dir), node_id
        self.plan_of, self.request_of = plan_of, request_of
        self.hosts: dict[tuple[str, int], Any] = {}
        self.lock = threading.Lock()

    def __call__(self, method: str, path: str, body: bytes) -> Answer:
        parts = urlsplit(path)
        m = _ROUTE.match(parts.path)
        if m is None:
            return _text(404, f"node '{self.node_id}': no route {parts.path}")
        request_id, version = m.group(1), int(m.group(2))
        try:
            if method == "DELETE" and m.group(4):
                host = self.hosts.get((request_id, version))
                closed = host is not None and host.close(m.group(4))
                return _text(200 if closed else 404, "closed" if closed else "no such session")
            if method == "POST" and m.group(3) == "forward":
                return self._forward(request_id, version, parse_qs(parts.query), body)
        except GenerateError as exc:
            return _text(409, str(exc))
        except WilliwError as exc:
            log.warning("node %s: %s", self.node_id, exc)
            return _text(500, str(exc))
        return _text(405, f"node '{self.node_id}': {method} is not allowed on {parts.path}")

    def _forward(self, request_id: str, version: int, query: dict[str, list[str]], body: bytes) -> Answer:
        from williw.runtime import decode_tensor, encode_tensor

        session, start = (query.get("session") or [""])[0], (query.get("start") or [""])[0]
        if not _SESSION.match(session) or not start.isdigit():
            return _text(400, f"node '{self.node_id}': forward needs ?session=<32 hex digits>&start=<position>")
        host = self._host(request_id, version)
        if host is None:
            return _text(404, f"node '{self.node_id}' holds no shard of request {request_id} version {version}")
        x = decode_tensor(body, "x", f"node '{self.node_id}'")
        began = time.perf_counter()
        out = host.forward(session, x, int(start))
        ms = (time.perf_counter() - began) * 1000
        name, t = next(iter(out.items()))
        return 200, "application/octet-stream", encode_tensor(name, t), {"X-Williw-Compute-Ms": f"{ms:.3f}"}

    def _host(self, request_id: str, version: int) -> Any:
        key = (request_id, version)
        with self.lock:  # one load at a time: a stage is built once, however many callers wait for it
            if key in self.hosts:
                return self.hosts[key]
            shard_dir = self.data_dir / request_id / f"v{version}" / self.node_id
            if not (shard_dir / "model.safetensors").is_file():
                return None
            self.hosts[key] = self._load(request_id, version, shard_dir)
            return self.hosts[key]

    def _load(self, request_id: str, version: int, shard_dir: Path) -> Any:
        from williw.planner.plan import Plan
        from williw.runtime import load_host
        from williw.stages import load_config
        from williw.verify import pipeline_stages

        plan = Plan.from_dict(self.plan_of(request_id, version), f"plan version {version}")
        n_blocks = load_config(shard_dir).get_text_config().num_hidden_layers
        blocks = dict(pipeline_stages(plan, n_blocks)).get(self.node_id)
        if blocks is None:
            raise GenerateError(f"node '{self.node_id}' is not a stage of plan version {version}")
        request = self.request_of(request_id)
        where = f"node '{self.node_id}' (blocks [{blocks[0]}, {blocks[1]}))"
        began = time.perf_counter()
        host = load_host(shard_dir, blocks, where, max_sessions=int(request.get("batch_size") or 1),
                         max_tokens=int(request.get("sequence_length") or 512))
        log.info("node %s: stage of request %s version %d loaded in %.2f s", self.node_id, request_id, version,
                 time.perf_counter() - began)
        return host

    def drop_except(self, request_id: str, version: int) -> None:
        """Free the stages of the request's other versions (once ``version`` is in force)."""
        with self.lock:
            for key in [k for k in self.hosts if k[0] == request_id and k[1] != version]:
                del self.hosts[key]
