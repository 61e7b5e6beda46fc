"""The Starlette app: OpenAI's routes over one ``TritonLlm``.

- ``GET /v1/models`` (and ``/v1/models/{id}``): the one served model.
- ``POST /v1/completions``, ``POST /v1/chat/completions``: streamed (SSE) or not.
- ``GET /health``: 200 once the app runs (the model was ready at start-up).
Every error is OpenAI-shaped (``{"error": {message, type, param, code}}``): before a stream
starts with its status (400, 404, 500); once it has started, as a last ``data: {"error": ...}``
event before ``data: [DONE]``. A client that disconnects cancels its request in Triton: a
stream through Starlette's disconnect handling (the response task is cancelled), a
non-streamed request through a watch on the connection.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from backends.openai_api.bodies import DONE, Shaper, sse
from backends.openai_api.protocol import (
    Endpoint,
    LlmRequest,
    OpenAIError,
    parse_body,
    parse_request,
)
from backends.openai_api.triton import LlmEvent, LlmFailed, TritonLlm

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Events = AsyncGenerator[LlmEvent, None]


def _error(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@dataclass(slots=True)
class _Totals:
    """What a request's responses added up to."""

    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, event: LlmEvent) -> None:
        self.text += event.text
        self.finish_reason = event.finish_reason or self.finish_reason
        self.prompt_tokens = event.num_input_tokens or self.prompt_tokens
        self.completion_tokens += event.num_output_tokens


async def _next(req: LlmRequest, events: Events) -> LlmEvent:
    try:
        return await anext(events)
    except LlmFailed as exc:
        raise req.error_for(str(exc)) from None


async def _disconnected(request: Request) -> None:
    """Returns when the HTTP client has gone (the body is read: receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _whole(request: Request, req: LlmRequest, events: Events, shape: Shaper) -> Response:
    totals = _Totals()

    async def collect() -> None:
        async with aclosing(events):
            while not totals.finish_reason:
                totals.add(await _next(req, events))

    work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            task.cancel()  # a gone client: collect()'s cancel closes events, Triton cancels
        await asyncio.gather(work, watch, return_exceptions=True)
    if not work.done() or work.cancelled():
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    if work.exception() is not None:
        raise work.exception()  # type: ignore[misc]
    return JSONResponse(shape.whole(totals.text, totals.finish_reason, totals.prompt_tokens,
                                    totals.completion_tokens))


async def _stream(req: LlmRequest, events: Events, first: LlmEvent,
                  shape: Shaper) -> AsyncIterator[bytes]:
    totals = _Totals()
    async with aclosing(events):
        if req.chat:
            yield sse(shape.chunk("", role=True))
        event: LlmEvent | None = first
        while event is not None:
            totals.add(event)
            if event.text:
                yield sse(shape.chunk(event.text))
            if event.finish_reason:
                break
            try:
                event = await _next(req, events)
            except OpenAIError as exc:
                yield sse(exc.body())
                yield DONE
                return
    yield sse(shape.chunk(None, totals.finish_reason))
    if req.include_usage:
        yield sse(shape.usage_chunk(totals.prompt_tokens, totals.completion_tokens))
    yield DONE


def _llm(request: Request) -> TritonLlm:
    llm: TritonLlm = request.app.state.llm
    return llm


async def _generate(request: Request, endpoint: Endpoint) -> Response:
    llm = _llm(request)
    req = parse_request(endpoint, parse_body(await request.body()), llm.served)
    prefix = "chatcmpl" if req.chat else "cmpl"
    shape = Shaper(endpoint, f"{prefix}-{uuid.uuid4().hex}", int(time.time()), req.model,
                   req.include_usage)
    events = llm.generate(req, shape.request_id)
    if not req.stream:
        return await _whole(request, req, events, shape)
    try:
        first = await _next(req, events)  # llm's refusal is still an HTTP error status here
    except BaseException:
        await events.aclose()
        raise
    return StreamingResponse(_stream(req, events, first, shape), media_type="text/event-stream",
                             headers=SSE_HEADERS)


async def completions(request: Request) -> Response:
    return await _generate(request, "completions")


async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat")


def _model_card(llm: TritonLlm) -> dict[str, object]:
    return {"id": llm.served.name, "object": "model", "created": llm.served.created,
            "owned_by": "triton-pd"}


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(_llm(request))]})


async def model(request: Request) -> Response:
    llm = _llm(request)
    name = request.path_params["model"]
    if name != llm.served.name:
        raise OpenAIError(404, f"model: the model {name!r} does not exist; this server serves "
                          f"{llm.served.name!r}", "model", code="model_not_found")
    return JSONResponse(_model_card(llm))


async def health(request: Request) -> Response:
    return Response(status_code=200)


async def _openai_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, OpenAIError):  # registered for OpenAIError only
        raise exc
    return _error(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):  # registered for HTTPException only
        raise exc
    return _error(OpenAIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))


async def _server_error(request: Request, exc: Exception) -> Response:
    return _error(OpenAIError(500, f"{type(exc).__name__}: {exc}", None, "server_error"))


def create_app(llm: TritonLlm) -> Starlette:
    """The app over ``llm``; the caller owns ``llm`` (closes it after the server stops)."""
    app = Starlette(routes=[
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ], exception_handlers={OpenAIError: _openai_error, HTTPException: _http_error,
                           Exception: _server_error})
    app.state.llm = llm
    return app
