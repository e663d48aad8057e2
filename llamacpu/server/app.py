"""The ASGI app: routes, their handlers, and how errors are answered.

A POST's body is read here (at most MAX_BODY_BYTES); decoding and checking it and
counting its prompt run in a thread (`prepare_chat`, `prepare_completion`), so that a
large body never stalls the event loop, which keeps serving /health and the streams of
other requests meanwhile.
"""
from __future__ import annotations

import asyncio
import json
import os
import time

from ..openai_format import ServedChat, ServedCompletion
from .errors import APIError
from .guard import Guard
from .parse import ChatRequest, CompletionRequest, check_structured, parse_chat, parse_completion, parse_json
from .prompts import PromptCheck
from .responses import JobResponse
from .scheduler import Job, Scheduler

MAX_BODY_BYTES = 32 << 20   # a body this large is already ~8M tokens of text: far past any context
STATIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")


def create_app(llm, *, api_key: str | None = None, queue_size: int = 16, model_id: str | None = None,
               host: str = "127.0.0.1", allowed_hosts=(), cors_origins=()):
    """The ASGI application serving `llm` (a llamacpu.Llama), behind the Guard (guard.py:
    host, origin, API key and content type). Its lifespan starts the worker thread and
    stops it; `app.state.scheduler` is the queue."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    model_id = model_id or llm.model_name
    created = int(time.time())
    scheduler = Scheduler(llm, queue_size)
    prompts = PromptCheck(llm)
    renders_tool_calls = llm.template.renders_tool_calls
    vocab_size = llm.tokenizer.vocab_size
    with open(os.path.join(STATIC, "chat.html"), encoding="utf-8") as fh:
        page = fh.read()

    def error(e: APIError):
        # ASCII JSON: a message may quote the request, whose strings may hold lone surrogates
        return Response(json.dumps(e.body()).encode(), e.status, headers=e.headers, media_type="application/json")

    async def read_body(request) -> bytes:
        too_big = APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
        size = request.headers.get("content-length") or "0"
        if size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise too_big
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > MAX_BODY_BYTES:
                raise too_big
        return bytes(raw)

    def check(req) -> None:
        """What parse.py cannot know: the Llama's own rules for sampling, the prompt's fit,
        whether the constraint engine takes response_format's schema or the forced tools'."""
        try:
            llm.sampling_params(**req.sampling)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e)) from None
        if isinstance(req, ChatRequest):
            check_structured(req, llm.tokenizer)
        prompts.check(req)

    def prepare_chat(raw: bytes) -> ChatRequest:
        req = parse_chat(parse_json(raw), llm.n_ctx, renders_tool_calls)
        check(req)
        return req

    def prepare_completion(raw: bytes) -> CompletionRequest:
        req = parse_completion(parse_json(raw), llm.n_ctx, vocab_size)
        check(req)
        if req.echo:
            req.echo_text = req.prompt if isinstance(req.prompt, str) else llm.detokenize(req.prompt)
        return req

    def submit(req, fmt):
        job = Job(req, asyncio.get_running_loop())
        scheduler.submit(job)
        return JobResponse(scheduler, job, fmt)

    async def chat_completions(request):
        req = await asyncio.to_thread(prepare_chat, await read_body(request))
        return submit(req, ServedChat(model_id, req.include_usage, req.truncated))

    async def completions(request):
        req = await asyncio.to_thread(prepare_completion, await read_body(request))
        return submit(req, ServedCompletion(model_id, req.include_usage, req.echo_text))

    def model_obj():
        return {"id": model_id, "object": "model", "created": created, "owned_by": "llamacpu"}

    async def models(request):
        return JSONResponse({"object": "list", "data": [model_obj()]})

    async def model(request):
        if request.path_params["model"] != model_id:
            raise APIError(404, f"The model '{request.path_params['model']}' does not exist; this server has "
                                f"'{model_id}'", "model", "model_not_found")
        return JSONResponse(model_obj())

    async def health(request):
        if not request.scope.get("state", {}).get("authorized", True):
            # without the key, liveness only: the token counters and the prompt cache's use
            # would let one client test guesses about another's prompt
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "model": model_id, "n_ctx": llm.n_ctx, **scheduler.snapshot()})

    async def index(request):
        return HTMLResponse(page)

    async def on_api_error(request, exc):
        return error(exc)

    async def on_http_error(request, exc):
        if exc.status_code == 404:
            msg = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            msg = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return error(APIError(exc.status_code, msg, headers=dict(exc.headers or {})))

    async def on_crash(request, exc):
        return error(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.close()

    routes = [Route("/", index, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{model:path}", model, methods=["GET"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_crash})
    guarded = Guard(app, host=host, allowed_hosts=allowed_hosts, cors_origins=cors_origins, api_key=api_key)
    guarded.state = app.state
    app.state.scheduler = scheduler
    app.state.model_id = model_id
    return guarded
