"""The ASGI app: routes, their handlers, and how errors are answered."""
from __future__ import annotations

import asyncio
import json
import os
import time

from .errors import APIError, bad as _bad
from .guard import _RequireKey
from .parse import _json_type, parse_chat, parse_completion
from .prompts import _check_prompt
from .responses import JobResponse, _ChatFormat, _CompletionFormat
from .scheduler import Job, Scheduler

MAX_BODY_BYTES = 32 << 20
STATIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")


def create_app(llm, *, api_key: str | None = None, queue_size: int = 16, model_id: str | None = None):
    """The ASGI application serving `llm` (a llamacpu.Llama). Its lifespan starts the
    worker thread and stops it; `app.state.scheduler` is the queue."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    model_id = model_id or llm.model_name
    created = int(time.time())
    scheduler = Scheduler(llm, queue_size)
    renders_tool_calls = "tool_calls" in (llm.template.source or "")
    with open(os.path.join(STATIC, "chat.html"), encoding="utf-8") as fh:
        page = fh.read()

    def error(e: APIError):
        return JSONResponse(e.body(), e.status, headers=e.headers)

    async def read_json(request) -> dict:
        size = request.headers.get("content-length") or "0"
        if size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise _bad(f"the request body must be a JSON object, got {_json_type(body)}")
        return body

    async def submit(kind, settings, fmt):
        await asyncio.to_thread(_check_prompt, llm, settings)
        job = Job(kind, settings, asyncio.get_running_loop())
        scheduler.submit(job)
        return JobResponse(scheduler, job, fmt)

    async def chat_completions(request):
        settings = parse_chat(await read_json(request), llm.n_ctx, renders_tool_calls)
        return await submit("chat", settings, _ChatFormat(model_id, settings["include_usage"]))

    async def completions(request):
        settings = parse_completion(await read_json(request), llm.n_ctx)
        echo = None
        if settings["echo"]:
            p = settings["prompt"]
            echo = p if isinstance(p, str) else llm.detokenize(p)
        return await submit("completion", settings, _CompletionFormat(model_id, settings["include_usage"], echo))

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
    app.state.scheduler = scheduler
    app.state.model_id = model_id
    if api_key:
        outer = _RequireKey(app, api_key)
        outer.state = app.state
        return outer
    return app
