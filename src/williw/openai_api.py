"""An OpenAI-compatible API over the placed model (``williw serve-api``): ``POST /v1/completions``,
``POST /v1/chat/completions`` (the model's chat template), both with ``stream`` (server-sent events, one
``data: {...}`` chunk per token and ``data: [DONE]``), and ``GET /v1/models``, so existing clients (the ``openai``
package, curl) work unchanged. The fields follow OpenAI's API reference (platform.openai.com/docs/api-reference);
fields this server does not use (``top_p``, ``n`` > 1, ``logprobs``) are accepted and ignored, except ``n``.

One generation runs at a time (the stages' KV budget is the request's batch size); the routes are plain ``def``
so that FastAPI runs them in its thread pool and the event loop never waits on a node.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from williw.errors import GenerateError
from williw.generation import Generator, Stats

__all__ = ["create_app"]


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = None
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

    @app.exception_handler(GenerateError)
    def _failed(_request: Any, exc: GenerateError) -> JSONResponse:
        return JSONResponse(status_code=502, content={"error": {"message": str(exc), "type": "node_error"}})

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
        if not turn.acquire(timeout=600):
            raise HTTPException(503, "the pipeline is busy")
        stats = Stats()
        chunks = generator.stream(ids, stats, max_new_tokens=limit, temperature=body.temperature, seed=body.seed)
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


def _events(chunks: Iterator[str], stats: Stats, head: dict[str, Any], kind: str, chat: bool,
            turn: threading.Lock) -> Iterator[str]:
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
    except GenerateError as exc:  # the status line is sent already: the error goes into the stream
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'node_error'}})}\n\n"
    finally:
        turn.release()
    yield "data: [DONE]\n\n"
