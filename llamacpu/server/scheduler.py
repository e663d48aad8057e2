"""The queue and the worker: one thread owns the Llama and runs jobs one at a time, in arrival order."""
from __future__ import annotations

import asyncio
import collections
import math
import threading
import time

from .errors import APIError, api_error


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
        # Llama.cancel() reaches only a generation that has started: repeat until the job is off the worker
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
            outcome, used = "failed", (0, 0)
            try:
                used = self._run(job)
                outcome = "cancelled" if job.cancelled.is_set() else "completed"
            except BaseException as e:  # noqa: BLE001 - reported to the client; the worker goes on
                job.put("error", api_error(e))
            finally:
                dt = time.perf_counter() - t0
                with self._cv:
                    self._running = None
                    self.stats[outcome] += 1
                    self.stats["prompt_tokens"] += used[0]
                    self.stats["completion_tokens"] += used[1]
                    self._seconds = dt if self._seconds is None else 0.8 * self._seconds + 0.2 * dt

    def _run(self, job: Job) -> tuple[int, int]:
        """Generate for one job in this (the worker) thread, putting what comes out on the job;
        return its (prompt, completion) token counts."""
        s, llm = job.settings, self.llm
        if job.kind == "chat":
            kw = dict(messages=s["messages"], tools=s["tools"], max_tokens=s["max_tokens"], stop=s["stop"],
                      logprobs=s["logprobs"], top_logprobs=s["top_logprobs"], **s["sampling"])
            if not job.stream:
                result = llm.chat(**kw)
                job.put("result", result)
                return result["usage"]["prompt_tokens"], result["usage"]["completion_tokens"]
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
        gen = it.generation
        job.put("end", gen)
        return gen.prompt_tokens, gen.completion_tokens
