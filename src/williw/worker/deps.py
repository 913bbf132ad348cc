"""The injectable parts of the app (FastAPI dependencies): the store, the auth rules, the settings, the caller's
token. Tests or an embedding program override them with ``app.dependency_overrides``.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in the thread pool, and four thread
hops per request (each waiting for the GIL) cut heartbeat throughput from ~1,000/s to ~250/s."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Path, Request

from williw.worker.auth import Auth, bearer_token
from williw.worker.schemas import ID_MAX, NODE_ID_MAX
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


# The parameter types every router declares.
StoreDep = Annotated[Store, Depends(get_store)]
AuthDep = Annotated[Auth, Depends(get_auth)]
SettingsDep = Annotated[WorkerSettings, Depends(get_settings)]
TokenDep = Annotated[str | None, Depends(get_token)]
NodeIdPath = Annotated[str, Path(min_length=1, max_length=NODE_ID_MAX)]
RequestIdPath = Annotated[str, Path(min_length=1, max_length=ID_MAX)]
