"""Responses: a job's output as OpenAI's JSON objects or server-sent events."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from .scheduler import Scheduler


def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _usage(info: dict) -> dict:
    p, c = info["prompt_tokens"], info["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class ChatFormat:
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


class CompletionFormat:
    """Text pieces from Llama.generate as text_completion objects."""

    def __init__(self, model_id: str, include_usage: bool, echo_text: str | None):
        self.model_id, self.include_usage, self.echo = model_id, include_usage, echo_text
        self.prompt = echo_text or ""   # (events() clears self.echo once it has sent it)
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
        text = self.prompt + "".join(self.text)
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
