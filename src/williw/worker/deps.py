"""The injectable parts of the app (FastAPI dependencies): the store, the auth rules, the settings, the caller's
token. Tests or an embedding program override them with ``app.dependency_overrides``.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in the thread pool, and four thread
hops per request (each waiting for the GIL) cut heartbeat throughput from ~1,000/s to ~250/s."""

from __future__ import annotations

from fastapi import Header, Request

from williw.worker.auth import Auth, bearer_token
from williw.worker.service import WorkerSettings
from williw.worker.store import Store


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_auth(request: Request) -> Auth:
    return request.app.state.auth


async def get_settings(request: Request) -> WorkerSettings:
    return request.app.state.settings


async def get_token(authorization: str | None = Header(default=None)) -> str | None:
    return bearer_token(authorization)
