"""Responses: a job's output sent as one JSON body or as server-sent events.

The objects themselves come from the job's format (openai_format.ServedChat or
ServedCompletion)."""
from __future__ import annotations

import asyncio
import json

from .scheduler import Scheduler


def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


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
            for obj in (self.fmt.end(value) if tag == "end" else self.fmt.events(value)):
                await event(obj)
            if tag == "end":
                break
        await event(b"[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
