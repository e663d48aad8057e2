"""Continuous batching: one thread runs every live generation of a Llama, one forward per step.

A `Request` (prompt ids, sampler, limits, and a `Sink` that takes its tokens) is
submitted from any thread and joins the running batch at the next step. Each running
request holds one sequence slot of the engine (`Model(n_seq=...)`); each step is one
`Model.forward_batch` over

- one token of every request that is decoding, and
- prompt chunks of the requests still prefilling, in arrival order, up to `n_batch`
  tokens in all, or PREFILL_WHILE_DECODING while some request is decoding: a long prompt
  is spread over steps, and the streams of the others stall for a step of that size at
  most (128 prompt tokens: ~0.5 s for 1B on 2 cores, instead of ~2 s for 512).

Prompt-prefix reuse: every slot remembers the tokens whose K/V it holds. A new request
takes the free slot sharing the longest prefix with its prompt (least recently used on
ties); when a busy slot shares a longer one, that prefix is copied in (`seq_copy`, a
fork), so conversations with one system prompt evaluate it once.

Sampling, the end-of-generation and length checks run here, per request, after each
step; what a token means as text is the Sink's business (Llama's: generation.py).

Constrained requests (structured output: constrained.py) carry their own Constraint. The
mask of the tokens it allows next is computed on a worker thread while the forward runs
(llguidance and the C forward both release the GIL), then applied to the request's
logits before its sampler's chain, so logprobs report the constrained distribution.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .constrained import apply_mask
from .sampling import Sampler, SamplingParams


PREFILL_WHILE_DECODING = 128


class Sink:
    """Where a request's results go (called on the batcher's thread)."""

    def token(self, tok: int, logprob, top) -> bool:
        """A sampled token that is not end-of-generation; True ends the request (a stop
        string), with finish_reason "stop"."""
        raise NotImplementedError

    def end(self, finish_reason: str | None, completion_tokens: int, error: BaseException | None = None, *,
            prompt_cached: int = 0, prompt_evaluated: int = 0) -> None:
        """The request is over: "stop", "length" or "cancelled", or error; completion_tokens
        counts an end-of-generation token too. Of its prompt, prompt_cached tokens were in
        the slot already (prefix reuse or a fork) and prompt_evaluated ran in the model."""
        raise NotImplementedError


@dataclass
class Request:
    ids: list[int]                    # the prompt
    params: SamplingParams
    max_tokens: int | None            # None: until the context is full
    sink: Sink
    logprobs: int | None = None       # top-n logprobs wanted (None: none)
    cancelled: threading.Event = field(default_factory=threading.Event)
    constraint: object = None         # a constrained.Constraint (its own, not shared), or None
    # the batcher's bookkeeping
    slot: int = -1
    fed: int = 0                      # tokens of `history` whose K/V are in the slot
    cached: int = 0                   # prompt tokens whose K/V the slot held when it was admitted
    history: list = field(default_factory=list)
    completion_tokens: int = 0
    sampler: Sampler | None = None
    mask: object = None               # the Future of this step's allowed-token mask

    def cancel(self) -> None:
        """Stop after the current step (any thread)."""
        self.cancelled.set()


class _Slot:
    __slots__ = ("tokens", "request", "used")

    def __init__(self):
        self.tokens: list[int] = []   # K/V held for positions 0..len-1
        self.request: Request | None = None
        self.used = 0.0               # when it last ran a request (LRU)


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


class Batcher:
    """Runs the Requests of one Model, all at once, on its own thread (started on the
    first submit). n_batch: most tokens per step."""

    def __init__(self, model, eog_ids, n_batch: int = 512):
        self.model = model
        self.eog_ids = frozenset(eog_ids)
        self.n_batch = n_batch
        self.slots = [_Slot() for _ in range(model.n_seq)]
        self.n_evaluated = 0            # tokens the engine has evaluated, in total
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._mask_pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ outside
    def submit(self, req: Request) -> None:
        with self._cv:
            if self._closed:
                raise ValueError("this Llama is closed")
            req.history = list(req.ids)
            self._waiting.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llamacpu-batcher", daemon=True)
                self._thread.start()
            self._cv.notify()

    def cancel_all(self) -> None:
        with self._cv:
            for r in list(self._waiting) + self._running:
                r.cancel()

    def forget(self) -> None:
        """Drop the prompt cache of the idle slots."""
        with self._cv:
            for i, s in enumerate(self.slots):
                if s.request is None:
                    s.tokens = []
                    self.model.seq_clear(i)

    def snapshot(self) -> dict:
        with self._cv:
            return {"slots": len(self.slots), "slots_in_use": len(self._running), "waiting": len(self._waiting)}

    def close(self) -> None:
        """Cancel everything and stop the thread (waits for the current step)."""
        with self._cv:
            self._closed = True
            for r in list(self._waiting) + self._running:
                r.cancel()
            self._cv.notify_all()
            t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()
        if self._mask_pool is not None:
            self._mask_pool.shutdown(wait=True)

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._running and not self._closed:
                    self._cv.wait()
                if self._closed and not self._waiting and not self._running:
                    return
            try:
                with self._cv:
                    self._admit()
                    plan = self._plan()
                self._start_masks(plan[4])
                out = self.model.forward_batch(*plan[:4]) if plan[0] else None
                with self._cv:
                    self._after(plan, out)
            except BaseException as e:  # noqa: BLE001 - every running request learns of it; the thread goes on
                with self._cv:
                    for r in list(self._running):
                        self.slots[r.slot].tokens = []   # what its cache holds is unknown now
                        self._finish(r, None, e)

    def _admit(self) -> None:
        """Waiting requests take free slots (cancelled ones end here)."""
        for r in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(r)
            r.sink.end("cancelled", 0)
        while self._waiting:
            r = self._waiting[0]
            free = [i for i, s in enumerate(self.slots) if s.request is None]
            if not free:
                return
            self._waiting.popleft()
            best = max(free, key=lambda i: (_common(self.slots[i].tokens, r.ids), -self.slots[i].used))
            keep = _common(self.slots[best].tokens, r.ids)
            for i, s in enumerate(self.slots):  # a running sequence shares a longer prefix: fork it
                if s.request is not None:
                    n = min(_common(s.tokens[:s.request.fed], r.ids), len(r.ids) - 1)
                    if n > keep:
                        self.model.seq_copy(i, best, n)
                        keep = n
            keep = min(keep, len(r.ids) - 1)  # the last prompt token runs again for its logits
            slot = self.slots[best]
            slot.request, slot.tokens = r, r.ids[:keep]
            r.slot, r.fed, r.cached = best, keep, keep
            self._running.append(r)

    def _plan(self):
        """This step's tokens: every decoding request's next one, then prompt chunks."""
        toks, seqs, poss, want, owners = [], [], [], [], []
        for r in self._running:
            if r.fed == len(r.history) - 1 and r.fed >= len(r.ids):  # decoding: feed the last sampled token
                toks.append(r.history[-1]); seqs.append(r.slot); poss.append(r.fed); want.append(True)
                owners.append(r)
        budget = min(self.n_batch, PREFILL_WHILE_DECODING) if toks else self.n_batch
        for r in self._running:
            if r.fed < len(r.ids) and budget > 0:
                k = min(len(r.ids) - r.fed, budget)
                toks += r.ids[r.fed:r.fed + k]
                seqs += [r.slot] * k
                poss += range(r.fed, r.fed + k)
                done = r.fed + k == len(r.ids)
                want += [False] * (k - 1) + [done]
                owners += [None] * (k - 1) + [r if done else None]
                budget -= k
        return toks, seqs, poss, want, owners

    def _start_masks(self, owners) -> None:
        """The masks of the constrained requests sampling this step, on the worker thread
        (the forward runs meanwhile)."""
        for r in owners:
            if r is not None and r.constraint is not None and (
                    r.max_tokens is None or r.completion_tokens < r.max_tokens):   # else it ends: "length"
                if self._mask_pool is None:
                    self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="llamacpu-mask")
                r.mask = self._mask_pool.submit(r.constraint.mask)

    def _after(self, plan, out) -> None:
        toks, seqs, poss, want, owners = plan
        # bookkeeping of what the slots now hold
        for t, s, p in zip(toks, seqs, poss):
            slot = self.slots[s]
            del slot.tokens[p:]
            slot.tokens.append(t)
        self.n_evaluated += len(toks)
        for r in self._running:
            r.fed = len(self.slots[r.slot].tokens)
        rows = iter(out) if out is not None else iter(())
        for r, w in zip(owners, want):
            if w:
                self._step(r, next(rows))
        for r in list(self._running):  # cancelled while prefilling, or finished above
            if r.cancelled.is_set() and r.slot >= 0:
                self._finish(r, "cancelled")

    def _step(self, r: Request, logits) -> None:
        """One token for r from its logits row."""
        if r.cancelled.is_set():
            return self._finish(r, "cancelled")
        limit = r.max_tokens if r.max_tokens is not None else self.model.n_ctx
        if r.completion_tokens >= limit:
            return self._finish(r, "length")
        try:
            if r.sampler is None:
                r.sampler = Sampler(r.params)
            if r.constraint is not None:
                logits = apply_mask(logits, r.mask.result())
            tok = r.sampler.sample(logits, r.history)
            lp, top = (None, [])
            if r.logprobs is not None:
                lp, top = r.sampler.logprobs(logits, tok, r.logprobs)
                if r.constraint is not None:   # tokens the constraint refuses are not alternatives
                    top = [(t, v) for t, v in top if v != -np.inf]
        except Exception as e:  # noqa: BLE001 - this request's failure, not the batch's
            return self._finish(r, None, e)
        r.completion_tokens += 1
        if tok in self.eog_ids:
            return self._finish(r, "stop")
        if r.constraint is not None:
            try:
                r.constraint.advance(tok)
            except Exception as e:  # noqa: BLE001 - this request's failure, not the batch's
                return self._finish(r, None, e)
        r.history.append(tok)
        try:
            hit = r.sink.token(tok, lp, top)
        except BaseException as e:  # noqa: BLE001 - the request's own failure
            return self._finish(r, None, e)
        if hit:
            return self._finish(r, "stop")
        if len(r.history) > self.model.n_ctx:  # tok would need position n_ctx: the cache is full
            return self._finish(r, "length")

    def _finish(self, r: Request, reason, error=None) -> None:
        if r.mask is not None:   # a mask computed for a step that did not sample (cancel, EOG, error)
            r.mask.cancel()
            r.mask = None
        if r.slot >= 0:
            slot = self.slots[r.slot]
            slot.request, slot.used = None, time.perf_counter()
            r.slot = -1
        if r in self._running:
            self._running.remove(r)
        r.sink.end(reason, r.completion_tokens, error, prompt_cached=r.cached,
                   prompt_evaluated=max(0, min(r.fed, len(r.ids)) - r.cached))
