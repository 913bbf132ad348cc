"""An OpenAI-compatible API over the placed model (``williw serve-api``): ``POST /v1/completions``,
``POST /v1/chat/completions`` (the model's chat template), both with ``stream`` (server-sent events, one
``data: {...}`` chunk per token and ``data: [DONE]``), and ``GET /v1/models``, so existing clients (the ``openai``
package, curl) work unchanged. The fields follow OpenAI's API reference (platform.openai.com/docs/api-reference);
fields this server does not use (``top_p``, ``n`` > 1, ``logprobs``) are accepted and ignored, except ``n``.

One generation runs at a time (the stages' KV budget is the request's batch size); the routes are plain ``def``
so that FastAPI runs them in its thread pool and the event loop never waits on a node.

Errors come in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, never as a traceback on the
server's terminal. The caller's mistakes are 400 ``invalid_request_error``: a body that does not validate (FastAPI
would answer 422 in its own shape; a NaN, or a seed torch cannot take, would have been a bare 500), and what
`Generator` refuses before asking a node (`GenerationInputError`: an empty prompt, one longer than the context with
code ``context_length_exceeded``, a lone surrogate, a model without a chat template, messages the template
refuses). They are all found before the status line, so a streamed call gets them as a 400 too; a node that fails
later is a 502 ``node_error``, or, once a stream has begun, a ``data: {"error": ...}`` event before ``[DONE]``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from williw.errors import GenerateError, WilliwError
from williw.generation import SEED_MAX, SEED_MIN, GenerationInputError, Generator, Stats

__all__ = ["create_app"]


class _Common(BaseModel):
    # allow_inf_nan: Python's json reads NaN and Infinity, which no range check refuses (NaN compares False)
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


class CompletionIn(_Common):
    prompt: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str


class ChatIn(_Common):
    messages: list[Message] = Field(min_length=1)


def create_app(generator: Generator, model_name: str, default_max_tokens: int = 64) -> FastAPI:
    """The app; ``model_name`` is what ``/v1/models`` lists and the answers name."""
    app = FastAPI(title="williw OpenAI-compatible API")
    turn = threading.Lock()

    @app.exception_handler(RequestValidationError)
    def _invalid(_request: Any, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=400, content=_validation_error(exc.errors()))

    @app.exception_handler(WilliwError)
    def _failed(_request: Any, exc: WilliwError) -> JSONResponse:
        return JSONResponse(status_code=400 if isinstance(exc, GenerationInputError) else 502,
                            content=_library_error(exc))

    @app.exception_handler(StarletteHTTPException)
    def _http(_request: Any, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(status_code=exc.status_code, content=_error(str(exc.detail), kind),
                            headers=exc.headers)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "williw"}]}

    @app.post("/v1/completions", response_model=None)
    def completions(body: CompletionIn) -> Any:
        return _answer(body, generator.prompt_ids(prompt=body.prompt), chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    def chat(body: ChatIn) -> Any:
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        return _answer(body, generator.prompt_ids(messages=messages), chat=True)

    def _answer(body: _Common, ids: list[int], chat: bool) -> Any:
        limit = body.max_completion_tokens or body.max_tokens or default_max_tokens
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model_name}
        stats = Stats()
        # Checked now, before the status line: a mistake is a 400 even when streamed. The nodes run under the lock.
        chunks = generator.stream(ids, stats, max_new_tokens=limit, temperature=body.temperature, seed=body.seed)
        if not turn.acquire(timeout=600):
            raise HTTPException(503, "the pipeline is busy: one generation runs at a time; try again")
        if body.stream:
            return StreamingResponse(_events(chunks, stats, head, kind, chat, turn), media_type="text/event-stream")
        try:
            text = "".join(chunks)
        finally:
            turn.release()
        usage = {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
                 "total_tokens": stats.prompt_tokens + stats.new_tokens}
        choice: dict[str, Any] = {"index": 0, "finish_reason": stats.finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {**head, "object": kind, "choices": [choice], "usage": usage}

    return app


async def _events(chunks: Iterator[str], stats: Stats, head: dict[str, Any], kind: str, chat: bool,
                  turn: threading.Lock) -> AsyncIterator[str]:
    """The stream's events, each step run in the thread pool. However the stream ends (done, failed, or the client
    gone: Starlette cancels this task when it disconnects), the generation is closed, which ends its session on
    every stage, and the pipeline is free for the next caller; before, a client that hung up held the lock until
    the garbage collector ran, and the stages' sessions for 300 s."""
    import anyio
    from starlette.concurrency import run_in_threadpool

    lines = _event_lines(chunks, stats, head, kind, chat)
    try:
        while True:
            line = await run_in_threadpool(next, lines, None)
            if line is None:
                break
            yield line
    finally:
        with anyio.CancelScope(shield=True):  # the task may be cancelled: the clean-up runs all the same
            await run_in_threadpool(_close, lines, chunks, turn)


def _close(lines: Iterator[str], chunks: Iterator[str], turn: threading.Lock) -> None:
    try:
        for it in (lines, chunks):
            close = getattr(it, "close", None)
            if close is not None:
                close()
    finally:
        turn.release()


def _event_lines(chunks: Iterator[str], stats: Stats, head: dict[str, Any], kind: str, chat: bool) -> Iterator[str]:
    obj = f"{kind}.chunk" if chat else kind

    def event(delta: str | None, finish: str | None) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["delta"] = {} if delta is None else {"role": "assistant", "content": delta}
        else:
            choice["text"] = delta or ""
        return f"data: {json.dumps({**head, 'object': obj, 'choices': [choice]})}\n\n"

    try:
        for delta in chunks:
            yield event(delta, None)
        yield event(None, stats.finish_reason)
    except WilliwError as exc:  # the status line is sent already: the error goes into the stream
        yield f"data: {json.dumps(_library_error(exc))}\n\n"
    yield "data: [DONE]\n\n"


def _error(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body (platform.openai.com/docs/guides/error-codes)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _library_error(exc: WilliwError) -> dict[str, Any]:
    if isinstance(exc, GenerationInputError):
        return _error(str(exc), "invalid_request_error", exc.param, exc.code)
    return _error(str(exc), "node_error" if isinstance(exc, GenerateError) else "worker_error")


def _validation_error(errors: Any) -> dict[str, Any]:
    """The first of pydantic's errors, one line naming the field as OpenAI does (``messages.[0].role``). The input
    is never echoed: FastAPI's own 422 echoed it, and a NaN there (which JSON cannot carry) made that a bare 500."""
    first = errors[0]
    kind, loc, msg = first["type"], tuple(first["loc"]), first["msg"]
    if kind == "json_invalid":
        where = f" at character {loc[-1]}" if isinstance(loc[-1], int) else ""
        return _error(f"the body is not valid JSON: {first.get('ctx', {}).get('error', msg)}{where}",
                      "invalid_request_error")
    parts = loc[1:] if loc[:1] == ("body",) else loc
    param = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in parts) or None
    if kind == "missing":
        return _error(f"'{param}' is required", "invalid_request_error", param, "missing_required_parameter")
    code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
    what = f"'{param}'" if param else "body"
    return _error(f"invalid {what}: {msg[:1].lower()}{msg[1:]}", "invalid_request_error", param, code)
