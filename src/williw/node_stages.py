"""The stage routes of a node agent's server: the node runs its own stage for the caller of ``williw generate``.

Routes, on the port where the agent serves its shards (`williw.serve.ShardServer`):

* ``POST /stage/{request_id}/v{version}/forward?session=S&start=N[&chain=1]``, body: safetensors holding ``x``
  (token ids ``[1, tokens]`` on the first stage, the previous stage's hidden state otherwise); answer: safetensors
  holding ``hidden`` (inner stage) or ``logits`` (last stage, last position). With ``chain=1`` an inner stage does
  not answer its hidden state: it posts it to the next stage of the plan (same route, same session) over a
  keep-alive HTTP connection of its own and answers what that stage answers, so one request to the first stage
  runs the whole pipeline and the last stage's logits come back along the chain (relayed as bytes, not parsed).
  ``X-Williw-Compute-Ms`` lists each stage's own compute time, in stage order, and ``X-Williw-Next-Ms`` each
  stage's round trip to the next one, so the caller can split every hop's transport cost from the compute.
* ``DELETE /stage/{request_id}/v{version}/sessions/{S}``: close a session, freeing its KV cache.
* ``GET /stage/{request_id}/v{version}``: JSON ``{"node_id", "state", "blocks", "load_s", "error", "device",
  "dtype", "weights"}``, state one of ``not loaded``, ``loading``, ``loaded``, ``failed``; the last three say what
  the stage runs on and in once its load has begun (None before).

A stage runs on the node's device at its compute dtype (``williw node --device --dtype``), its blocks' linear
weights in the format the plan of that version chose for the node (its entry's ``weights``), else in the first
format the node accepts (``--weights``, highest precision first); a plan that names a format the node does not
accept (it was restarted with other ``--weights``) is refused in one line.

A stage is built from the node's shard of that version alone (``DATA_DIR/<request_id>/v<version>/<node_id>/``),
with the blocks the worker's plan of that version gives the node and the KV budget of the request
(`williw.runtime.StageHost`). The agent calls `StageService.preload` once the shard is checked ready, so the load
runs in the background before any generation; a request that arrives during the load waits for it (and a
request for a stage never preloaded builds it itself). It stays loaded (in memory, so a generation started on a
version finishes on it even once a re-plan dropped the files) until `drop_except` frees it.
Errors are answered as one line of text, with ``X-Williw-Node`` naming the node that failed (relayed along a
chain): 404 no such shard or session, 409 a refused step, 500 a stage that cannot be built, 502 the next stage
did not answer.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from williw.errors import GenerateError, WilliwError
from williw.progress import get_logger

log = get_logger(__name__)
# One stage build at a time in a process: transformers' lazy module is not safe to import from two threads at once
# (`williw run --local-nodes` preloads its nodes' stages together, and one failed with "module 'transformers' has
# no attribute 'AutoConfig'" in about half the runs of tests/test_cli_processes.py).
_BUILD_LOCK = threading.Lock()

_ROUTE = re.compile(r"^/stage/([0-9a-f]{32})/v([1-9][0-9]{0,8})(?:/(forward|sessions/([0-9a-f]{32})))?$")
_SESSION = re.compile(r"^[0-9a-f]{32}$")
Answer = tuple[int, str, bytes, dict[str, str]]
Key = tuple[str, int]


class StageService:
    """Callable by the HTTP handler: ``service(method, path, body) -> (status, content type, body, headers)``.

    Args:
        data_dir, node_id: where this node's shards are.
        plan_of: ``(request_id, version) -> plan dict`` (the worker's plan of that version).
        request_of: ``request_id -> request dict`` (its ``batch_size`` and ``sequence_length``: the KV budget).
        urls_of: ``request_id -> {node_id: serve_url}`` (the worker's assignments), for passing a chained step to
            the next stage; None: chained steps are refused.
        device, dtype: where and at which compute dtype the stages run (`williw.devices`).
        weights: the weight formats the node accepts, highest precision first (`williw.precision.WEIGHTS`).
    """

    def __init__(self, data_dir: Path, node_id: str, plan_of: Callable[[str, int], dict[str, Any]],
                 request_of: Callable[[str], dict[str, Any]],
                 urls_of: Callable[[str], dict[str, str]] | None = None, *, device: str = "cpu",
                 dtype: str = "float32", weights: tuple[str, ...] = ("as-stored",)) -> None:
        self.data_dir, self.node_id = Path(data_dir), node_id
        self.plan_of, self.request_of, self.urls_of = plan_of, request_of, urls_of
        self.device, self.dtype, self.weights = device, dtype, tuple(weights)
        self.runs_in: dict[Key, dict[str, str]] = {}  # {device, dtype, weights} of each stage whose load began
        self.hosts: dict[Key, Future[Any]] = {}  # done: loaded (or failed); pending: loading
        self.load_s: dict[Key, float] = {}
        self.failures: dict[Key, str] = {}  # the last failed load of a version, for GET and to not preload again
        self.next_stage: dict[Key, str | None] = {}  # the node after this one in that version's plan
        self.routes: dict[str, dict[str, str]] = {}  # request_id -> node_id -> serve_url, looked up when needed
        self.lock = threading.Lock()
        self.stopped = False  # set by the agent as it stops: a load still running then ends quietly
        self._http: Any = None

    def __call__(self, method: str, path: str, body: bytes) -> Answer:
        parts = urlsplit(path)
        m = _ROUTE.match(parts.path)
        if m is None:
            return self._text(404, f"node '{self.node_id}': no route {parts.path}")
        request_id, version = m.group(1), int(m.group(2))
        try:
            if method == "GET" and m.group(3) is None:
                return 200, "application/json", json.dumps(self.state(request_id, version)).encode(), {}
            if method == "DELETE" and m.group(4):
                future = self.hosts.get((request_id, version))
                closed = future is not None and future.done() and not future.exception() and \
                    future.result().close(m.group(4))
                return self._text(200 if closed else 404, "closed" if closed else "no such session")
            if method == "POST" and m.group(3) == "forward":
                return self._forward(request_id, version, parse_qs(parts.query), body)
        except GenerateError as exc:
            return self._text(409, str(exc))
        except WilliwError as exc:
            log.warning("node %s: %s", self.node_id, exc)
            return self._text(500, str(exc))
        return self._text(405, f"node '{self.node_id}': {method} is not allowed on {parts.path}")

    def _text(self, status: int, message: str) -> Answer:
        return status, "text/plain; charset=utf-8", (message + "\n").encode(), {"X-Williw-Node": self.node_id}

    def state(self, request_id: str, version: int) -> dict[str, Any]:
        """Whether the stage of that version is loaded (the ``GET`` route's answer)."""
        key = (request_id, version)
        future = self.hosts.get(key)
        state = "loading" if future is not None and not future.done() else "loaded" if future is not None \
            else "failed" if key in self.failures else "not loaded"
        host = future.result() if state == "loaded" else None
        runs_in = self.runs_in.get(key) or dict.fromkeys(("device", "dtype", "weights"))
        return {"node_id": self.node_id, "state": state, "blocks": list(host.stage.blocks) if host else None,
                "load_s": self.load_s.get(key), "error": self.failures.get(key), **runs_in}

    def preload(self, request_id: str, version: int) -> None:
        """Build the stage of that version in a background thread, unless it is loaded, loading or failed to
        load; a forward that comes meanwhile waits for it. The agent calls it once the shard is checked ready."""
        key = (request_id, version)
        shard = self.data_dir / request_id / f"v{version}" / self.node_id / "model.safetensors"
        if key in self.hosts or key in self.failures or not shard.is_file():
            return

        def load() -> None:
            try:
                self._host(request_id, version)
            except Exception as exc:  # a thread's failure would otherwise only reach stderr, as a traceback
                if self.stopped:  # the agent stopped under the load (its worker client is closed): not a failure
                    return
                text = str(exc) if isinstance(exc, WilliwError) else \
                    f"loading the stage of request {request_id} version {version} failed: {type(exc).__name__}: {exc}"
                log.warning("node %s: %s", self.node_id, " ".join(text.split()))
                log.debug("the stage load's traceback", exc_info=True)  # WILLIW_DEBUG=1 shows it

        threading.Thread(target=load, name=f"stage-load-{request_id[:8]}-v{version}", daemon=True).start()

    def _forward(self, request_id: str, version: int, query: dict[str, list[str]], body: bytes) -> Answer:
        from williw.runtime import decode_tensor, encode_tensor

        session, start = (query.get("session") or [""])[0], (query.get("start") or [""])[0]
        if not _SESSION.match(session) or not start.isdigit():
            return self._text(400, f"node '{self.node_id}': forward needs ?session=<32 hex digits>&start=<position>")
        host = self._host(request_id, version)
        if host is None:
            return self._text(404, f"node '{self.node_id}' holds no shard of request {request_id} version {version}")
        x = decode_tensor(body, "x", f"node '{self.node_id}'")
        began = time.perf_counter()
        out = host.forward(session, x, int(start))
        ms = f"{(time.perf_counter() - began) * 1000:.3f}"
        name, t = next(iter(out.items()))
        if name == "hidden" and query.get("chain") == ["1"]:
            return self._pass_on(request_id, version, session, start, encode_tensor("x", t), ms)
        return 200, "application/octet-stream", encode_tensor(name, t), {"X-Williw-Compute-Ms": ms}

    def _pass_on(self, request_id: str, version: int, session: str, start: str, body: bytes, ms: str) -> Answer:
        """Post this stage's hidden state to the next stage of the plan and answer what it answers."""
        import httpx

        from williw.pipeline import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, not_answered

        node = self.next_stage.get((request_id, version))
        url = self._url_of(request_id, node) if node else None
        if node is None or url is None:
            return self._text(409, f"node '{self.node_id}': no next stage of request {request_id} version "
                                   f"{version} to pass the step to")
        if self._http is None:
            self._http = httpx.Client(timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
                                      trust_env=False)
        began = time.perf_counter()
        try:
            r = self._http.post(f"{url}/stage/{request_id}/v{version}/forward", content=body,
                                params={"session": session, "start": start, "chain": "1"})
        except httpx.TransportError as exc:
            self.routes.pop(request_id, None)  # its agent may serve elsewhere after a restart: ask again
            return 502, "text/plain; charset=utf-8", (not_answered(node, url, exc) + "\n").encode(), \
                {"X-Williw-Node": node}
        rtt = f"{(time.perf_counter() - began) * 1000:.3f}"
        headers = {k: r.headers[k] for k in ("X-Williw-Node",) if k in r.headers}
        if r.status_code == 200:
            later = r.headers.get("X-Williw-Next-Ms")
            headers = {"X-Williw-Compute-Ms": f"{ms},{r.headers.get('X-Williw-Compute-Ms', 'nan')}",
                       "X-Williw-Next-Ms": f"{rtt},{later}" if later else rtt}
        return r.status_code, r.headers.get("Content-Type", "application/octet-stream"), r.content, headers

    def _url_of(self, request_id: str, node_id: str) -> str | None:
        urls = self.routes.get(request_id)
        if (urls is None or node_id not in urls) and self.urls_of is not None:
            urls = self.routes[request_id] = self.urls_of(request_id)
        return (urls or {}).get(node_id)

    def _host(self, request_id: str, version: int) -> Any:
        """The loaded stage of that version (loading it here unless another thread is), or None without a shard."""
        key = (request_id, version)
        with self.lock:  # a stage is built once, however many callers wait for it; other versions go on meanwhile
            future = self.hosts.get(key)
            mine = future is None
            if mine:
                shard_dir = self.data_dir / request_id / f"v{version}" / self.node_id
                if not (shard_dir / "model.safetensors").is_file():
                    return None
                future = self.hosts[key] = Future()
        if mine:
            try:
                with _BUILD_LOCK:
                    began = time.perf_counter()
                    future.set_result(self._load(request_id, version, shard_dir))
                    self.load_s[key] = round(time.perf_counter() - began, 3)
                self.failures.pop(key, None)
            except BaseException as exc:
                with self.lock:  # the next request tries again
                    if self.hosts.get(key) is future:
                        del self.hosts[key]
                self.failures[key] = " ".join(str(exc).split()) or type(exc).__name__
                future.set_exception(exc)
        return future.result()

    def _load(self, request_id: str, version: int, shard_dir: Path) -> Any:
        from williw.planner.plan import Plan
        from williw.runtime import load_host
        from williw.stages import load_config
        from williw.verify import pipeline_stages

        raw = self.plan_of(request_id, version)
        plan = Plan.from_dict(raw, f"plan version {version}")
        n_blocks = load_config(shard_dir).get_text_config().num_hidden_layers
        order = pipeline_stages(plan, n_blocks)
        mine = [i for i, (node, _) in enumerate(order) if node == self.node_id]
        if not mine:
            raise GenerateError(f"node '{self.node_id}' is not a stage of plan version {version}")
        blocks = order[mine[0]][1]
        self.next_stage[(request_id, version)] = order[mine[0] + 1][0] if mine[0] + 1 < len(order) else None
        # The KV budget is the workload the plan reserved memory for (its batch and context; older plans: the
        # request's).
        request = self.request_of(request_id)
        sessions = plan.extra.get("batch_size") or request.get("batch_size") or 1
        tokens = plan.extra.get("context_length") or request.get("sequence_length") or 512
        where = f"node '{self.node_id}' (blocks [{blocks[0]}, {blocks[1]}))"
        weights = self._weights_of(raw, version)
        self.runs_in[(request_id, version)] = {"device": self.device, "dtype": self.dtype, "weights": weights}
        began = time.perf_counter()
        host = load_host(shard_dir, blocks, where, max_sessions=int(sessions), max_tokens=int(tokens),
                         dtype=self.dtype, weights=weights, device=self.device)
        log.info("node %s: stage of request %s version %d loaded in %.2f s", self.node_id, request_id, version,
                 time.perf_counter() - began)
        return host

    def _weights_of(self, plan: dict[str, Any], version: int) -> str:
        """The weight format of this node's stage: the plan's choice for it, else the first the node accepts."""
        entry = plan.get(self.node_id)
        chosen = entry.get("weights") if isinstance(entry, dict) else None
        if chosen is None:
            return self.weights[0]
        if chosen not in self.weights:
            raise GenerateError(f"node '{self.node_id}': plan version {version} runs its stage with weights "
                                f"{chosen!r}, which this node does not accept (it accepts {', '.join(self.weights)}: "
                                f"williw node --weights)")
        return chosen

    def drop_except(self, request_id: str, version: int) -> None:
        """Free the stages of the request's other versions (once ``version`` is in force)."""
        with self.lock:
            for key in [k for k in self.hosts if k[0] == request_id and k[1] != version]:
                del self.hosts[key]
            for key in [k for k in self.failures if k[0] == request_id and k[1] != version]:
                del self.failures[key]
            for key in [k for k in self.runs_in if k[0] == request_id and k[1] != version]:
                del self.runs_in[key]
