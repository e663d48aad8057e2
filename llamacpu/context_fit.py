"""When a conversation no longer fits the context: drop its oldest turns.

The policy (`truncate="oldest"`, shared by `llamacpu run`, `Llama.chat` and the server):

* a reply gets room for `reply_room(n_ctx, max_tokens)` tokens: max_tokens, but at most a
  quarter of the context (a reply of -n 512 must not empty a context of 1024);
* when prompt + room exceed n_ctx, the oldest turns are dropped, whole (a turn is a user
  message with the assistant and tool messages that follow it), until prompt + room take
  at most half the context (as llama.cpp's context shift frees half): every drop evaluates
  the kept turns again, so it should come once per half a context of conversation, not at
  every turn. The leading system message(s) and the newest user message (with what
  follows it) are never dropped;
* when nothing is left to drop, what remains is sent if it fits at all (it then has less
  room than asked), else it is a ContextOverflowError (a ValueError): the system prompt
  and the newest message alone do not fit.

Only whole messages are dropped, so the kept prompt is a prefix of the old one up to the
first dropped message: the KV cache keeps the system prompt (batcher.py's prefix reuse) and
evaluates the rest again (its positions changed; llamacpu does not re-rotate cached keys).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import ContextOverflowError

TRUNCATE_CHOICES = ("oldest",)


def check_truncate(truncate):
    """None (a conversation too long is an error) or "oldest"; anything else a ValueError."""
    if truncate is not None and truncate not in TRUNCATE_CHOICES:
        raise ValueError(f"truncate must be None or 'oldest', got {truncate!r}")
    return truncate


def reply_room(n_ctx: int, max_tokens: int | None) -> int:
    """Positions kept free for the reply: max_tokens, at most n_ctx // 4, at least 1."""
    quarter = max(1, n_ctx // 4)
    return quarter if max_tokens is None else max(1, min(max_tokens, quarter))


@dataclass
class Fit:
    """What is sent: `messages` (the kept ones, in order) and their prompt `ids`; what was
    dropped: `dropped_messages` and `dropped_tokens` (prompt tokens saved; None when the
    whole conversation was too long to tokenize)."""
    messages: list
    ids: list[int]
    dropped_messages: int = 0
    dropped_tokens: int | None = 0

    @property
    def dropped(self) -> dict | None:
        """{"messages": n, "tokens": t} when something was dropped, else None."""
        if not self.dropped_messages:
            return None
        return {"messages": self.dropped_messages, "tokens": self.dropped_tokens}


def _turns(messages: list) -> tuple[list, list[list], list]:
    """(leading system messages, the turns between, the newest user message and after)."""
    n_head = 0
    while n_head < len(messages) and messages[n_head].get("role") == "system":
        n_head += 1
    users = [i for i in range(n_head, len(messages)) if messages[i].get("role") == "user"]
    newest = users[-1] if users else len(messages) - 1
    newest = max(newest, n_head)
    turns: list[list] = []
    for i in range(n_head, newest):
        if not turns or messages[i].get("role") == "user":
            turns.append([])
        turns[-1].append(messages[i])
    return messages[:n_head], turns, messages[newest:]


def fit_oldest(messages: list, ids_of: Callable[[list], list[int] | None], n_ctx: int, room: int) -> Fit:
    """The conversation as it fits n_ctx: unchanged if prompt + room <= n_ctx, else with its
    fewest oldest turns dropped so that prompt + room <= n_ctx // 2 (see the module
    docstring). ids_of(messages): the prompt's token ids, or None when it is known to be
    too long without tokenizing it."""
    full = ids_of(messages)
    if full is not None and len(full) + room <= n_ctx:
        return Fit(list(messages), full)
    head, turns, tail = _turns(messages)

    def kept(k):
        return head + [m for t in turns[k:] for m in t] + tail

    lo, hi = 1, len(turns)          # find the fewest turns k to drop that bring it to half
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        ids = ids_of(kept(mid))
        if ids is not None and len(ids) + room <= n_ctx // 2:
            best, hi = (mid, ids), mid - 1
        else:
            lo = mid + 1
    if best is None:                # only the system prompt and the newest message are left
        ids = ids_of(kept(len(turns))) if turns else full
        if ids is None or len(ids) >= n_ctx:
            size = f"{len(ids)} tokens" if ids is not None else "too long"
            raise ContextOverflowError(f"the system prompt and the newest message alone are {size}; the context "
                             f"holds {n_ctx} (shorten the message, or load with a larger n_ctx)")
        best = (len(turns), ids)
    k, ids = best
    return Fit(kept(k), ids, sum(len(t) for t in turns[:k]), None if full is None else len(full) - len(ids))
