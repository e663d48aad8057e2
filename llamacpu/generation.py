"""What one generated sequence is made of, with no model, lock or OpenAI in it.

Step and Generation are the plain results; TextTracker turns one sequence's tokens into
the text it may release (UTF-8 safe, stop strings never partly emitted); GenerationStream
is the iterator a streaming call returns, with its Generation and a cancel flag.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class Step:
    """One generated token: its id (-1 for the held-back text released at the end), the
    text it releases (may be empty while a multi-byte character or a possible stop string
    is held back), and logprobs."""
    token: int
    text: str
    logprob: float | None = None
    top_logprobs: list = field(default_factory=list)


@dataclass
class Generation:
    """What a generation left behind: finish_reason "stop" (end-of-generation token
    or stop string), "length" (max_tokens or the context is full) or "cancelled"
    (cancel(), or its stream closed; None while it runs, or when its stream was closed
    before it started). Of the prompt_tokens,
    prompt_cached had their K/V in the sequence slot already (the prompt cache: a
    previous turn, or a running conversation's prefix) and prompt_evaluated ran through
    the model (their sum, unless it was cancelled while its prompt was evaluated);
    prompt_seconds is the time to the first token."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_cached: int = 0
    prompt_evaluated: int = 0
    finish_reason: str | None = None
    text: str = ""
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    steps: list = field(default_factory=list)


class TextTracker:
    """The text of one sequence as its tokens arrive. `decoder` is a StreamDecoder
    (push(token) -> str, flush() -> str); text that could still become one of the `stop`
    strings is held back until it cannot."""

    def __init__(self, decoder, stop=()):
        self._dec = decoder
        self._stop = list(stop)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._pending = ""   # decoded text not yet released because it may start a stop string
        self.stopped = False  # a stop string ended the text

    def push(self, token: int) -> tuple[str, bool]:
        """The text `token` releases, and whether a stop string was hit (the text then
        ends before it, and the sequence is over)."""
        pending = self._pending + self._dec.push(token)
        emit, hit = pending, None
        if self._stop:
            for s in self._stop:
                i = pending.find(s)
                if i >= 0 and (hit is None or i < hit):
                    hit = i
            if hit is not None:
                emit = pending[:hit]
            else:  # hold back a tail that could still become a stop string
                keep = 0
                for k in range(min(self._max_stop - 1, len(pending)), 0, -1):
                    tail = pending[-k:]
                    if any(s.startswith(tail) for s in self._stop):
                        keep = k
                        break
                emit = pending[:len(pending) - keep]
        self._pending = pending[len(emit):] if hit is None else ""
        self.stopped = hit is not None
        return emit, self.stopped

    def finish(self) -> tuple[str, bool]:
        """At the end of the sequence: the text still held back (cut at a stop string),
        and whether a stop string ended the text."""
        if self.stopped:
            return "", True
        tail, self._pending = self._pending + self._dec.flush(), ""
        cut = [i for i in (tail.find(s) for s in self._stop) if i >= 0]
        if cut:
            tail, self.stopped = tail[:min(cut)], True
        return tail, self.stopped


class GenerationStream:
    """What a streaming generate() or chat() returns: an iterator over its output (text
    pieces, or chat.completion.chunk dicts). `generation` is its Generation, complete once
    the iterator is exhausted or closed; cancel() stops it after the current token (from
    any thread, before or while it runs); close() ends it now and frees the Llama."""

    def __init__(self, items: Iterator, generation: Generation, cancelled: threading.Event, result=None):
        self._items, self.generation, self._cancelled, self._result = items, generation, cancelled, result

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._items)

    def cancel(self) -> None:
        self._cancelled.set()

    def result(self):
        """Once the stream is over: the whole result as the same call without stream=True
        returns it (chat(): the chat.completion dict; generate(): the text)."""
        return self._result(self.generation) if self._result else self.generation.text

    def close(self) -> None:
        self._items.close()
