"""The HTTP layer: FastAPI routes over one Engine (OpenAI chat completions, health, Prometheus metrics).

FastAPI + uvicorn: the stack of vLLM's and llama-cpp-python's OpenAI servers; pydantic models state
the protocol (`protocol.py`), Starlette's streaming response stops the generator when the client
disconnects (the request then leaves the engine), and uvicorn is one small maintained dependency.
Thin on purpose: parsing is `protocol.py`, queueing and generation are `engine.py`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sts_export.errors import StsError
from sts_export.serve.engine import Done, Engine, Event, Failed, QueueFull, Token
from sts_export.serve.protocol import ChatRequest, Completion, error_body, parse_chat

log = logging.getLogger("sts_export.serve")


def create_app(engine: Engine, model: str) -> FastAPI:
    """The OpenAI-compatible app serving `engine` under the model name `model`."""
    app = FastAPI(title="sts-export", docs_url=None, redoc_url=None, openapi_url=None)
    # image decoding and preprocessing (CPU-bound, numpy under the GIL) on a few threads of their own: each thread
    # that allocates keeps a malloc arena, and anyio's 40 would hold the memory of 40 images after a load
    prepare_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="sts-prepare")

    def bad_request(message: str) -> JSONResponse:
        engine.metrics.requests.labels("bad_request").inc()
        return JSONResponse(error_body(message), status_code=400)

    @app.exception_handler(StsError)
    async def _sts_error(request: Request, e: StsError) -> JSONResponse:
        return bad_request(str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        return bad_request(" ".join(f"{where}: {err.get('msg', 'invalid')}".split()))

    @app.exception_handler(QueueFull)
    async def _full(request: Request, e: QueueFull) -> JSONResponse:
        return JSONResponse(error_body(str(e), "rate_limit_error"), status_code=429, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        engine.metrics.requests.labels("error").inc()
        return JSONResponse(error_body(f"internal error ({type(e).__name__}); see the server log", "server_error"),
                            status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model, "queue": engine.queue_length, "running": engine.running}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        plan, pipe = engine.pipe.plan, engine.pipe
        return {"object": "list", "data": [{
            "id": model, "object": "model", "created": 0, "owned_by": "sts-export",
            "recipe": pipe.recipe.name, "family": pipe.recipe.family, "method": plan.method, "budget": plan.budget,
            "backend": pipe.backend.name, "max_context": pipe.recipe.max_context}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        chat = parse_chat(body, model)
        loop = asyncio.get_running_loop()
        req = await loop.run_in_executor(prepare_pool, engine.prepare, chat.image, chat.prompt, chat.max_tokens)
        events: asyncio.Queue[Event] = asyncio.Queue()
        ticket = engine.submit(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        out = Completion(model)
        if chat.stream:
            return StreamingResponse(_sse(engine, ticket, events, out, chat.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, Done):
                    return out.whole(ev)
                if isinstance(ev, Failed):
                    return JSONResponse(error_body(ev.message, "server_error"), status_code=500)
        finally:
            engine.cancel(ticket)  # a no-op once ended; frees the slot if this handler was cancelled

    return app


async def _sse(engine: Engine, ticket: Any, events: "asyncio.Queue[Event]", out: Completion,
               include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, one chunk per token, the finish chunk, [usage], [DONE]. A client that
    disconnects cancels this generator: the request then leaves the engine."""

    def data(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        yield data(out.first())
        while True:
            ev = await events.get()
            if isinstance(ev, Token):
                yield data(out.token(ev))
            elif isinstance(ev, Done):
                yield data(out.last(ev))
                if include_usage:
                    yield data(out.usage(ev))
                break
            else:  # Failed
                yield data(error_body(ev.message, "server_error"))
                break
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(ticket)
