"""`llamacpu serve [MODEL]`: an OpenAI-compatible HTTP server, and a chat page.

    llamacpu serve [MODEL] [--host 127.0.0.1] [--port 8080] [--api-key KEY] [--queue-size 16]
                   [--allowed-host NAME] [--cors-origin ORIGIN]

Endpoints (bodies and errors in OpenAI's shapes, errors as
``{"error": {"message", "type", "param", "code"}}``):

    POST /v1/chat/completions   Llama.chat: messages, tools/tool_choice, sampling, stop, seed,
                                logprobs/top_logprobs, stream (SSE, stream_options.include_usage),
                                response_format json_object / json_schema and tool_choice
                                "required" / a named function (constrained: structured.py)
    POST /v1/completions        text continuation of `prompt` (text_completion objects, stream too)
    GET  /v1/models             the one model served
    GET  /health                status, queue, counters (requests, tokens, prompt-cache use);
                                with --api-key, only {"status": "ok"} without the key
    GET  /                      a small chat page (static HTML and JS, streamed replies)

The modules, in the order a request meets them:

    command.py    the flags; uvicorn, with deadlines for idle connections
    guard.py      who may talk to the server: Host, Origin (CORS), API key, Content-Type
    app.py        routes; reads the body, then prepares the job in a thread
    parse.py      the JSON body -> a ChatRequest / CompletionRequest, or a 400 naming the field
    prompts.py    does the prompt fit the context (a byte bound, then its tokens)
    scheduler.py  Job and Scheduler: the bounded queue and the one worker thread
    responses.py  a job's output as one JSON body or server-sent events (the objects
                  themselves: llamacpu/openai_format.py)
    errors.py     APIError

How a request flows: the Guard checks who is asking; the handler reads the body and, in a
thread, parses and checks it (`parse_chat` / `parse_completion`) and renders and counts its
prompt (`PromptCheck`: a prompt that does not fit the context is a 400 before it queues),
then submits a `Job` to the `Scheduler`. One worker thread owns the Llama and runs jobs one at a
time in arrival order; the C forward releases the GIL, so the event loop keeps serving. The
worker pushes chunks into the job's asyncio queue (call_soon_threadsafe); `JobResponse`
sends them as JSON or server-sent events. The Llama's prompt cache is reused across
requests that share a prefix, since they all go through the one Llama.

Queue: one request generates while at most `queue_size` wait; one more gets 503 with a
Retry-After estimate. Disconnect: `JobResponse` listens for http.disconnect; a waiting job
leaves the queue, a running one is stopped after the token in progress (Scheduler.cancel).
A reply the server itself stops (at shutdown) ends with finish_reason "cancelled", as
Llama.chat's do (openai_format.finish_reason).

A schema the constraint engine cannot take is a 400 naming its part (param
"response_format" or "tools", code "invalid_schema").

Deliberately not supported (400 with a message saying so): n > 1, presence/frequency penalties (use `repeat_penalty`), logit_bias, and
logprobs on /v1/completions. The request's `model` is not checked: the one model answers.
Fields of llama.cpp's server `top_k`, `min_p` and `repeat_penalty` are accepted too.
Other unknown fields are ignored.
"""
from .app import create_app  # noqa: F401
from .command import cmd_serve, register_serve  # noqa: F401
from .errors import APIError  # noqa: F401

__all__ = ["create_app", "register_serve", "cmd_serve", "APIError"]
