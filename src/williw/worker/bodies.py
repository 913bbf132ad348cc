"""Every JSON body passes williw's strict reader (`williw.jsonio`) before FastAPI sees it.

FastAPI parses a body with ``json.loads``: nesting 100,000 deep raises ``RecursionError``, invalid UTF-8 and a
5,000-digit integer raise a bare ``ValueError``, and each became a 400 "There was an error parsing the body";
nesting 500-900 deep parsed, then failed as a 500 when the inline metadata was pickled for the planning process;
``NaN`` parsed and reached the planner. Here each is a 422 ``{"detail": "body is not valid JSON (...)"}`` naming
what is wrong, and FastAPI then parses a body known to be small, shallow and finite.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException

from williw.jsonio import JsonInputError, parse


class StrictJsonBody:
    """Pure ASGI middleware: buffer a JSON request body (the size is already bounded by `BodyLimit`, which
    must wrap this one), check it with `williw.jsonio.parse`, answer 422 when it fails, else pass it on."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not _json_content(scope):
            await self.app(scope, receive, send)
            return
        chunks = []
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
        except HTTPException as exc:  # BodyLimit's 413 for a chunked body
            await reply(send, exc.status_code, str(exc.detail))
            return
        body = b"".join(chunks)
        if body.strip():
            try:
                parse(body)
            except JsonInputError as exc:
                await reply(send, 422, f"body is {exc}")
                return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _json_content(scope: dict[str, Any]) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return b"json" in value.lower()
    return False


async def reply(send: Any, status_code: int, detail: str) -> None:
    """Answer ``{"detail": detail}`` with ``status_code`` and close the connection."""
    body = json.dumps({"detail": " ".join(detail.split())}).encode()
    await send({"type": "http.response.start", "status": status_code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
