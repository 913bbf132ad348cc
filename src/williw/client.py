"""`WorkerClient`: the worker's HTTP API as Python methods (httpx), for the CLI, the node agent and scripts.

Retries: a connection that cannot be opened (refused, reset while connecting, timed out connecting) is tried
again with exponential backoff for every method, since nothing reached the worker. A connection lost after the
request was sent is tried again only for idempotent calls (reads, heartbeats, registration, get-plan), because
a repeated ``create_request`` or ``process`` would create a second request or plan version.
Every 4xx/5xx answer raises `WorkerError` with the worker's one-line ``detail``.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from williw.errors import WorkerError
from williw.progress import get_logger

log = get_logger(__name__)

_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
_LOST_ERRORS = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadTimeout)


class WorkerHTTPError(WorkerError):
    """The worker answered with an error status; ``status_code`` and ``detail`` hold what it said."""

    def __init__(self, message: str, status_code: int, detail: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


class WorkerClient:
    """A client for one worker.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        token: the admin token or a node token, sent as ``Authorization: Bearer``.
        timeout: seconds for each HTTP exchange.
        retries: further attempts after a connection error (see the module docstring).
        backoff: seconds before the first retry; doubles each time.
        transport: an httpx transport (for tests or an in-process app).
    """

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30.0, retries: int = 4,
                 backoff: float = 0.25, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.retries = retries
        self.backoff = backoff
        self._timeout = timeout
        self._transport = transport
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers, transport=transport)

    def with_token(self, token: str | None) -> WorkerClient:
        """A client for the same worker that sends ``token`` (e.g. the node token ``register_node`` returned)."""
        return WorkerClient(self.base_url, token, timeout=self._timeout, retries=self.retries, backoff=self.backoff,
                            transport=self._transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------------------

    def create_request(self, model_name: str, node_id: str | None = None, batch_size: int = 1,
                       sequence_length: int = 512) -> dict[str, Any]:
        """``POST /api/request``: record a request. Returns ``{request_id, status: "received"}``."""
        body: dict[str, Any] = {"model_name": model_name, "batch_size": batch_size, "sequence_length": sequence_length}
        if node_id is not None:
            body["node_id"] = node_id
        return self._call("POST", "/api/request", json=body, idempotent=False)

    def process(self, request_id: str, *, metadata: dict[str, Any] | None = None, metadata_repo: str | None = None,
                revision: str | None = None, strategy: str = "pipeline", objective: str = "prefill",
                model_repo: str | None = None, context_length: int | None = None) -> dict[str, Any]:
        """``POST /api/process``: plan the request from inline ``metadata``, a Hub ``metadata_repo``, or the
        headers of the model's own Hub repo ``model_repo`` (read by the worker; nothing is downloaded), for the
        request's batch size and ``context_length`` tokens of KV cache per sequence (default: its sequence length).

        Returns:
            ``{request_id, status: "planned", plan_version, plan}``.

        Raises:
            WorkerError: e.g. 409 when the request failed (the reason is in the message).
        """
        body: dict[str, Any] = {"request_id": request_id, "strategy": strategy, "objective": objective}
        if metadata is not None:
            body["metadata"] = metadata
        if metadata_repo is not None:
            body["metadata_repo"] = metadata_repo
        if model_repo is not None:
            body["model_repo"] = model_repo
        if revision is not None:
            body["revision"] = revision
        if context_length is not None:
            body["context_length"] = context_length
        return self._call("POST", "/api/process", json=body, idempotent=False)

    def get_plan(self, request_id: str, node_id: str | None = None, version: int | None = None) -> dict[str, Any]:
        """``POST /api/get-plan``: the plan in force (or ``version``), or only ``node_id``'s part."""
        body: dict[str, Any] = {"request_id": request_id}
        if node_id is not None:
            body["node_id"] = node_id
        if version is not None:
            body["version"] = version
        return self._call("POST", "/api/get-plan", json=body)

    def get_request(self, request_id: str) -> dict[str, Any]:
        """``GET /api/requests/{request_id}``: status, reason and plan version."""
        return self._call("GET", f"/api/requests/{_segment(request_id)}")

    # -- nodes ---------------------------------------------------------------------------------------------

    def register_node(self, node_id: str, compute_tflops: float, memory_gb: float, *,
                      memory_bandwidth_gbps: float | None = None, network_gbps: float | None = None,
                      labels: list[str] | tuple[str, ...] = (), latency_ms: float | None = None,
                      memory_reserve_gb: float | None = None, device: str | None = None,
                      device_name: str | None = None, dtype: str | None = None,
                      weights: list[str] | tuple[str, ...] | None = None,
                      device_memory_bytes: int | None = None) -> dict[str, Any]:
        """``POST /api/nodes``: register or update a node (a field left None is stored as not given: for
        ``device``, ``dtype`` and ``weights`` that is a CPU node at float32 with its weights as stored).

        Returns ``{node, created, node_token}``.
        """
        body: dict[str, Any] = {"node_id": node_id, "compute_tflops": compute_tflops, "memory_gb": memory_gb,
                                "labels": list(labels)}
        optional = {"memory_bandwidth_gbps": memory_bandwidth_gbps, "network_gbps": network_gbps,
                    "latency_ms": latency_ms, "memory_reserve_gb": memory_reserve_gb, "device": device,
                    "device_name": device_name, "dtype": dtype, "weights": None if weights is None else list(weights),
                    "device_memory_bytes": device_memory_bytes}
        body.update({key: value for key, value in optional.items() if value is not None})
        return self._call("POST", "/api/nodes", json=body)

    def heartbeat(self, node_id: str) -> dict[str, Any]:
        """``POST /api/nodes/{node_id}/heartbeat``."""
        return self._call("POST", f"/api/nodes/{_segment(node_id)}/heartbeat")

    def list_nodes(self, online: bool | None = None) -> list[dict[str, Any]]:
        """``GET /api/nodes``: every node (or only the online or offline ones), with ``online``."""
        params = {} if online is None else {"online": "true" if online else "false"}
        return self._call("GET", "/api/nodes", params=params)["nodes"]

    def get_node(self, node_id: str) -> dict[str, Any]:
        """``GET /api/nodes/{node_id}``."""
        return self._call("GET", f"/api/nodes/{_segment(node_id)}")

    def delete_node(self, node_id: str) -> dict[str, Any]:
        """``DELETE /api/nodes/{node_id}``."""
        return self._call("DELETE", f"/api/nodes/{_segment(node_id)}", idempotent=False)

    def healthz(self) -> dict[str, Any]:
        """``GET /healthz``: status, database kind, schema version, auth mode, node TTL."""
        return self._call("GET", "/healthz")

    # -- assignments (issue 7) -----------------------------------------------------------------------------

    def distribute(self, request_id: str, source: str, revision: str | None = None, *,
                   auto_replan: bool | None = None, max_slowdown: float | None = None,
                   max_step_bytes: int | None = None) -> dict[str, Any]:
        """``POST /api/requests/{id}/distribute``: one assignment per plan node, pulling from ``source``.

        Args:
            auto_replan: True lets the worker re-plan the request when nodes leave or join (with ``max_slowdown``
                and ``max_step_bytes``), False stops it, None leaves it as it is.

        Returns:
            ``{request_id, plan_version, assignments: [...]}``. Calling it again keeps ready assignments.
        """
        body: dict[str, Any] = {"source": source}
        for key, value in (("revision", revision), ("auto_replan", auto_replan), ("max_slowdown", max_slowdown),
                           ("max_step_bytes", max_step_bytes)):
            if value is not None:
                body[key] = value
        # Idempotent on the worker (same plan version: states are kept), so a lost answer may be retried.
        return self._call("POST", f"/api/requests/{_segment(request_id)}/distribute", json=body)

    def request_assignments(self, request_id: str) -> dict[str, Any]:
        """``GET /api/requests/{id}/assignments``: each node's state with ``online`` and ``heartbeat_age_s``."""
        return self._call("GET", f"/api/requests/{_segment(request_id)}/assignments")

    def node_assignments(self, node_id: str) -> list[dict[str, Any]]:
        """``GET /api/nodes/{node_id}/assignments``: the node's assignments in every request."""
        return self._call("GET", f"/api/nodes/{_segment(node_id)}/assignments")["assignments"]

    def report_assignment(self, request_id: str, node_id: str, state: str, *, plan_version: int | None = None,
                          shard_path: str | None = None, sha256: str | None = None,
                          error: str | None = None) -> dict[str, Any]:
        """``POST /api/assignments/{request_id}/{node_id}``: move the node's assignment to ``state``."""
        body = {k: v for k, v in {"state": state, "plan_version": plan_version, "shard_path": shard_path,
                                  "sha256": sha256, "error": error}.items() if v is not None}
        return self._call("POST", f"/api/assignments/{_segment(request_id)}/{_segment(node_id)}", json=body)

    # -- re-planning (issue 9) ------------------------------------------------------------------------------

    def request_plans(self, request_id: str) -> dict[str, Any]:
        """``GET /api/requests/{id}/plans``: every plan version and the migrations between them."""
        return self._call("GET", f"/api/requests/{_segment(request_id)}/plans")

    def replan(self, request_id: str, *, max_slowdown: float | None = None,
               max_step_bytes: int | None = None) -> dict[str, Any]:
        """``POST /api/requests/{id}/replan``: re-plan a distributed request for the online nodes now."""
        body = {k: v for k, v in {"max_slowdown": max_slowdown, "max_step_bytes": max_step_bytes}.items()
                if v is not None}
        return self._call("POST", f"/api/requests/{_segment(request_id)}/replan", json=body, idempotent=False)

    def set_serve_url(self, node_id: str, serve_url: str | None) -> dict[str, Any]:
        """``PUT /api/nodes/{node_id}/serve-url``: where this node serves its shards to peers."""
        return self._call("PUT", f"/api/nodes/{_segment(node_id)}/serve-url", json={"serve_url": serve_url})

    # -- transport -----------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None,
              idempotent: bool = True) -> Any:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, json=json, params=params)
                break
            except _CONNECT_ERRORS + _LOST_ERRORS as exc:
                retry = isinstance(exc, _CONNECT_ERRORS) or idempotent
                if not retry or attempt >= self.retries:
                    raise WorkerError(f"{method} {self.base_url}{path}: cannot reach the worker "
                                      f"({type(exc).__name__}: {exc or 'no detail'}) after {attempt + 1} "
                                      f"attempt(s)") from None
                delay = self.backoff * 2 ** attempt
                log.info("%s %s: %s; retrying in %.2f s", method, path, type(exc).__name__, delay)
                time.sleep(delay)
                attempt += 1
        if response.status_code >= 400:
            detail = _detail(response)
            raise WorkerHTTPError(f"{method} {path}: {response.status_code} {detail}", response.status_code, detail)
        return response.json()


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return " ".join(response.text.split())[:300] or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return detail
    return " ".join(str(body).split())[:300]


def _segment(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")
