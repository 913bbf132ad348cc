"""The dashboard: ``GET /`` serves ``static/index.html``, whose script (``static/dashboard.js``, with
``static/migration.js`` for re-plans, style in ``static/dashboard.css``) polls the read endpoints;
``GET /api/requests`` lists requests for it and ``GET /api/plans/{request_id}.svg`` draws a plan with
`williw.planviz`, the code behind ``williw plan --svg``.

Auth: a request id is 32 random hex digits and is all a reader needs for ``/api/get-plan`` and
``/api/requests/{id}``, so an id works like a capability. Listing every id would hand those out to anyone who can
reach the port; with a token set, ``GET /api/requests`` therefore needs the admin token (the page asks for it
once). The plan picture shows what ``/api/get-plan`` shows for the same id, so it is as open as that.
"""

from __future__ import annotations

import time
from functools import lru_cache
from importlib.resources import files
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Response
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from williw.jsonio import INT64_MAX
from williw.worker import service
from williw.worker.deps import AuthDep, StoreDep, TokenDep
from williw.worker.schemas import ID_MAX, RequestOut
from williw.worker.store import list_requests

router = APIRouter()


# Scripts only from this origin's files (no inline script can run); inline style stays allowed for the plan picture,
# an SVG with its own <style>. The page can only talk to the worker that served it.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
            "img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
STATIC = files("williw.worker") / "static"
# The page's files, by the name they are served under, with their media types: nothing else is served.
STATIC_TYPES = {"index.html": "text/html; charset=utf-8", "dashboard.css": "text/css; charset=utf-8",
                "dashboard.js": "text/javascript; charset=utf-8", "migration.js": "text/javascript; charset=utf-8"}
_HEADERS = {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


@lru_cache(maxsize=None)
def _static(name: str) -> bytes:
    return (STATIC / name).read_bytes()
# An SVG opened on its own is a document: no scripts, whatever it contained.
SVG_CSP = "default-src 'none'; style-src 'unsafe-inline'"


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(_static("index.html"), headers=_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def static_file(name: str) -> Response:
    """One of the page's files (`STATIC_TYPES`); any other name is 404, so no path from outside reaches the disk."""
    if name not in STATIC_TYPES or name == "index.html":
        raise HTTPException(404, f"no dashboard file {name!r}")
    return Response(_static(name), media_type=STATIC_TYPES[name], headers=_HEADERS)


@router.get("/api/requests")
async def requests_list(store: StoreDep, auth: AuthDep, token: TokenDep,
                        limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    """The newest requests, newest first. Needs the admin token when the worker has one (see the module doc)."""

    def work() -> Any:
        auth.require_admin(token, "listing requests")
        return {"requests": [RequestOut(**vars(r)) for r in list_requests(store, limit)], "now": time.time()}

    return await run_in_threadpool(work)


@router.get("/api/plans/{request_id}.svg", response_class=Response)
async def plan_picture(request_id: Annotated[str, Path(min_length=1, max_length=ID_MAX)], store: StoreDep,
                       version: Annotated[int | None, Query(ge=1, le=INT64_MAX)] = None) -> Response:
    """The request's plan in force (or ``version``) as SVG, memory drawn against the registered nodes."""

    def work() -> Any:
        from williw.planner.plan import Plan
        from williw.planviz import plan_svg

        plan = Plan.from_dict(service.plan_for(store, request_id, version=version), f"request '{request_id}'")
        return plan_svg(plan, store.list_nodes())

    svg = await run_in_threadpool(work)
    return Response(svg, media_type="image/svg+xml",
                    headers={"Content-Security-Policy": SVG_CSP, "Cache-Control": "no-store",
                             "X-Content-Type-Options": "nosniff"})
