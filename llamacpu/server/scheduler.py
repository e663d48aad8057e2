"""The queue and the workers: `parallel` threads each run one job at a time, in arrival
order; the Llama decodes the running jobs together (batcher.py: one forward per step), so
a new request joins the batch at the next step."""
from __future__ import annotations

import asyncio
import collections
import math
import threading
import time

from .errors import APIError, api_error
from .parse import ChatRequest


class Job:
    """One request on its way through the Scheduler. The worker thread calls put(); the
    event loop awaits get()."""

    def __init__(self, request, loop: asyncio.AbstractEventLoop):
        self.request, self.loop = request, loop  # a parse.ChatRequest or CompletionRequest
        self.stream = request.stream
        self.items: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.handle = None   # its GenerationStream, once a worker started it

    def put(self, tag: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, (tag, value))
        except RuntimeError:   # the loop is closed: nobody is listening any more
            pass

    async def get(self):
        return await self.items.get()


class Scheduler:
    """`parallel` worker threads (default: the Llama's n_parallel) take jobs in arrival
    order. At most `max_waiting` jobs wait while all workers are busy; submit() refuses
    more (503 with Retry-After)."""

    def __init__(self, llm, max_waiting: int = 16, parallel: int | None = None):
        self.llm, self.max_waiting = llm, max_waiting
        self.parallel = parallel or llm.n_parallel
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: set[Job] = set()
        self._cv = threading.Condition()
        self._closed = False
        self._seconds = None       # moving average of a job's time, for Retry-After
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0,
                      "prompt_tokens": 0, "completion_tokens": 0}
        self._threads = [threading.Thread(target=self._work, name=f"llamacpu-generate-{i}", daemon=True)
                         for i in range(self.parallel)]

    def start(self) -> None:
        for t in self._threads:
            if not t.is_alive():
                t.start()

    def snapshot(self) -> dict:
        load = self.llm.load()
        with self._cv:
            st = dict(self.stats)
            return {"queue": {"running": len(self._running), "waiting": len(self._waiting),
                              "max_waiting": self.max_waiting},
                    "slots": {"total": load["slots"], "in_use": load["slots_in_use"]},
                    "requests": {k: st[k] for k in ("completed", "cancelled", "failed", "rejected")},
                    "tokens": {"prompt": st["prompt_tokens"], "completion": st["completion_tokens"],
                               "evaluated": self.llm.n_evaluated}}

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise APIError(503, "the server is shutting down", code="shutting_down",
                               headers={"Retry-After": "5"})
            busy = len(self._waiting) + len(self._running)
            if busy >= self.max_waiting + self.parallel:
                self.stats["rejected"] += 1
                wait = (self._seconds or 5.0) * (len(self._waiting) + 1) / self.parallel
                raise APIError(503, f"the server is busy: {len(self._waiting)} requests are waiting (the queue "
                                    f"holds {self.max_waiting}); retry later", code="queue_full",
                               headers={"Retry-After": str(max(1, min(60, math.ceil(wait))))})
            self._waiting.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop a waiting job, stop a running one (any thread)."""
        job.cancelled.set()
        with self._cv:
            if job in self._waiting:
                self._waiting.remove(job)
                self.stats["cancelled"] += 1
                return
        h = job.handle   # (a worker that starts it after this sees job.cancelled)
        if h is not None:
            h.cancel()

    def close(self) -> None:
        """Refuse new jobs, fail the waiting ones (503) and stop the running ones."""
        with self._cv:
            self._closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            running = list(self._running)
            self._cv.notify_all()
        for job in running:
            self.cancel(job)
        for job in waiting:
            job.put("error", APIError(503, "the server is shutting down", code="shutting_down"))

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                self._running.add(job)
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
                    self._running.discard(job)
                    self.stats[outcome] += 1
                    self.stats["prompt_tokens"] += used[0]
                    self.stats["completion_tokens"] += used[1]
                    self._seconds = dt if self._seconds is None else 0.8 * self._seconds + 0.2 * dt

    def _run(self, job: Job) -> tuple[int, int]:
        """Generate for one job in this worker thread, putting what comes out on the job;
        return its (prompt, completion) token counts."""
        req, llm = job.request, self.llm
        if isinstance(req, ChatRequest):
            it = llm.chat(**req.llama_kwargs(), stream=True)
            tag = "chunk" if job.stream else None
        else:
            it = llm.generate(**req.llama_kwargs(), stream=True)
            tag = "text"
        job.handle = it
        if job.cancelled.is_set():
            it.cancel()
        try:
            for item in it:
                if job.cancelled.is_set():
                    break
                if tag:
                    job.put(tag, item)
        finally:
            it.close()
        gen = it.generation
        if tag is None:   # a whole chat.completion
            job.put("result", it.result())
        else:
            job.put("end", gen)
        return gen.prompt_tokens, gen.completion_tokens
