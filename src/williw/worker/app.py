"""The ASGI app: routes from `routes`, the store and auth injected through `deps`, one table of errors → HTTP
statuses, and a body-size limit. Every error body is ``{"detail": "<one line>"}`` (422s add ``errors``, the
validator's list), so a client can show ``detail`` as it is."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError

from williw.errors import MetadataError, NodesError, PlanError
from williw.progress import get_logger
from williw.worker.assignments import router as assignments_router
from williw.worker.auth import Auth, AuthError
from williw.worker.bodies import StrictJsonBody, reply
from williw.worker.dashboard import router as dashboard_router
from williw.worker.heartbeats import close_batcher
from williw.worker.migration_routes import router as migration_router
from williw.worker.replanning import Replanner
from williw.worker.routes import router
from williw.worker.service import Conflict, WorkerSettings
from williw.worker.store import NotFound, Store

log = get_logger(__name__)


def create_app(settings: WorkerSettings, store: Store | None = None) -> FastAPI:
    """Build the app for ``settings``; opens (and migrates) the database unless ``store`` is given.

    Args:
        settings: database URL, admin token, node TTL, body limit.
        store: an already open store (an embedding program or a test may share one).

    Returns:
        The FastAPI app; it closes the store it opened on shutdown.

    Raises:
        StoreError: the database cannot be opened.
    """
    own = store is None
    store = store or Store(settings.db_url)
    app = FastAPI(title="williw worker", version="1", docs_url="/docs", redoc_url=None)
    app.state.store = store
    app.state.auth = Auth(settings.token)
    app.state.settings = settings
    app.include_router(router)
    app.include_router(dashboard_router)
    app.include_router(assignments_router)
    app.include_router(migration_router)
    _add_error_handlers(app)
    app.add_middleware(StrictJsonBody)  # inside BodyLimit: it reads only bodies already known to be small
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    replanner = app.state.replanner = Replanner(store, settings)
    app.router.add_event_handler("startup", replanner.start)
    app.router.add_event_handler("shutdown", replanner.stop)
    # The loop's PostgreSQL connections belong to this app's event loop: closed with it even when the store is
    # shared (its pool opens new ones on the next loop); so does the heartbeat batches' connection.
    async def close_heartbeats() -> None:
        await close_batcher(app.state)

    app.router.add_event_handler("shutdown", close_heartbeats)
    app.router.add_event_handler("shutdown", store.aclose)
    if own:
        app.router.add_event_handler("shutdown", store.close)
    return app


def _detail(status_code: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": " ".join(detail.split()), **extra}, status_code=status_code, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        return _detail(422, "; ".join(_one_error(e) for e in errors[:5]),
                       errors=[{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                               for e in errors])

    @app.exception_handler(NotFound)
    async def _not_found(_request: Request, exc: NotFound) -> JSONResponse:
        return _detail(404, str(exc))

    @app.exception_handler(AuthError)
    async def _auth(_request: Request, exc: AuthError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return _detail(exc.status_code, str(exc), headers)

    @app.exception_handler(Conflict)
    async def _conflict(_request: Request, exc: Conflict) -> JSONResponse:
        return _detail(exc.status_code, str(exc))

    async def _database(_request: Request, exc: Exception) -> JSONResponse:
        # The server closed a pooled connection (restart, failover, pg_terminate_backend) or is down: SQLAlchemy
        # has dropped that connection and the pool's older ones, so a retry gets a fresh one. Before, a 500 in plain
        # text with a 100-line traceback in the log, and uvicorn closed the client's connection.
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        log.warning("database unavailable: %s", reason)
        return _detail(503, f"the database is unavailable ({reason}); retry", {"Retry-After": "1"})

    for lost in (OperationalError, InterfaceError, *_psycopg_errors()):  # psycopg's: the heartbeat batches' own
        app.add_exception_handler(lost, _database)

    for bad_input in (MetadataError, NodesError, PlanError):
        @app.exception_handler(bad_input)
        async def _bad(_request: Request, exc: Exception) -> JSONResponse:
            return _detail(422, str(exc))


def _psycopg_errors() -> tuple[type[Exception], ...]:
    try:
        import psycopg
    except ImportError:  # a SQLite-only install
        return ()
    return (psycopg.OperationalError, psycopg.InterfaceError)


def _one_error(error: dict[str, Any]) -> str:
    loc = [str(x) for x in error.get("loc", ())]
    where = ".".join(loc[1:]) if loc and loc[0] in ("body", "path", "query") and len(loc) > 1 else ".".join(loc)
    kind = loc[0] if loc else "body"
    msg = error.get("msg", "invalid")
    if error.get("type") == "json_invalid":
        return f"body is not valid JSON ({error.get('ctx', {}).get('error', msg)})"
    msg = msg.removeprefix("Value error, ")
    if kind == "body" and len(loc) == 1 and error.get("type") == "value_error":
        return f"body: {msg}"
    if kind == "body" and len(loc) == 1:
        # FastAPI parses a body as JSON only with a JSON content type (so a browser's text/plain form cannot post
        # here); anything else arrives as bytes and fails as "not an object".
        return "body must be a JSON object sent with 'Content-Type: application/json'"
    return f"{kind} field '{where}': {msg}" if where else f"{kind}: {msg}"


class BodyLimit:
    """Answer 413 when a body is larger than ``max_bytes``: at once from Content-Length, or as soon as the
    chunks read so far pass the limit (a chunked body has no Content-Length). Pure ASGI, so a request costs no
    extra task as with Starlette's BaseHTTPMiddleware."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await self._reply(send, 400, "Content-Length is not an integer")
                    return
                if length > self.max_bytes:
                    await self._too_large(send, length)
                    return
        seen = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException passes through FastAPI's body reader (which turns other errors into
                    # 400) to the exception handlers, which answer with this status and detail.
                    raise HTTPException(413, self._message(seen, at_least=True))
            return message

        await self.app(scope, limited_receive, send)

    def _message(self, size: int, at_least: bool = False) -> str:
        more = "more than " if at_least else ""
        return (f"request body is {more}{size:,} bytes; this worker accepts at most {self.max_bytes:,} "
                "(--max-body-bytes)")

    async def _too_large(self, send: Any, size: int) -> None:
        await self._reply(send, 413, self._message(size))

    @staticmethod
    async def _reply(send: Any, status_code: int, detail: str) -> None:
        await reply(send, status_code, detail)
