"""Generations in OpenAI's JSON shapes: the one place they are built.

Llama.chat builds its chat.completion and chat.completion.chunk dicts with
ChatCompletion; the server (llamacpu serve) re-labels them with ServedChat and builds
its text_completion objects with ServedCompletion. usage, finish_reason, logprobs and
parse_tool_calls (Llama 3.2's tool-call JSON) are shared by all of them.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Iterable, Iterator

from .generation import Generation, Step

PYTHON_TAG = "<|python_tag|>"


def usage(gen: Generation, truncated: dict | None = None) -> dict:
    """OpenAI's usage; with truncated ({"messages", "tokens"}: turns dropped to fit the
    context, context_fit.py) an extra field "truncated" says what was dropped."""
    u = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
         "total_tokens": gen.prompt_tokens + gen.completion_tokens}
    if truncated:
        u["truncated"] = dict(truncated)
    return u


def finish_reason(gen: Generation) -> str:
    """OpenAI's finish_reason: "stop" (the model ended it, or a stop string), "length", or
    "cancelled" (not one of OpenAI's: cancel(), a closed stream or a client that went away
    cut it short; "stop" would say that the reply is complete). A generation with no
    finish_reason was closed before it started: "cancelled" too."""
    return "cancelled" if gen.finish_reason is None else gen.finish_reason


def logprobs(steps: Iterable[Step], tokenizer) -> dict:
    """OpenAI's logprobs object ({"content": [...]}) for the steps that sampled a token."""
    content = []
    for s in steps:
        if s.token < 0 or s.logprob is None:
            continue
        content.append({"token": tokenizer.decode([s.token]), "logprob": s.logprob,
                        "bytes": list(tokenizer.token_bytes(s.token)),
                        "top_logprobs": [{"token": tokenizer.decode([t]), "logprob": v,
                                          "bytes": list(tokenizer.token_bytes(t))} for t, v in s.top_logprobs]})
    return {"content": content}


def parse_tool_calls(text: str):
    """Llama 3.2's tool-call format: a JSON object {"name": ..., "parameters": {...}}
    (optionally after <|python_tag|>, or several separated by ';' or in a list).
    Returns OpenAI-shaped tool_calls, or None when the text is not a tool call."""
    try:
        return _parse_tool_calls(text)
    except RecursionError:  # JSON nested deeper than the parser's recursion limit: text
        return None


def _parse_tool_calls(text: str):
    s = text.strip()
    if s.startswith(PYTHON_TAG):
        s = s[len(PYTHON_TAG):].strip()
    if not s or s[0] not in "[{":
        return None
    objs = None
    try:
        v = json.loads(s)
        objs = v if isinstance(v, list) else [v]
    except json.JSONDecodeError:
        parts = [p.strip() for p in re.split(r";\s*(?=\{)", s)]
        try:
            objs = [json.loads(p) for p in parts]
        except json.JSONDecodeError:
            return None
    calls = []
    for o in objs:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            return None
        args = o.get("parameters", o.get("arguments", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": o["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
    return calls or None


class ChatCompletion:
    """One chat completion's OpenAI shapes; its id and created time are fixed when it is
    made. tools: a reply may be a tool call (message.tool_calls, finish_reason
    "tool_calls"); tokenizer: give logprobs (None: no logprobs); truncated: what was
    dropped to fit the context (usage["truncated"])."""

    def __init__(self, model: str, *, tools: bool = False, tokenizer=None, truncated: dict | None = None):
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model, self.tools, self.tokenizer, self.truncated = model, tools, tokenizer, truncated

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _logprobs(self, steps):
        return logprobs(steps, self.tokenizer) if self.tokenizer is not None else None

    def result(self, gen: Generation) -> dict:
        """The chat.completion dict of a finished generation."""
        message = {"role": "assistant", "content": gen.text}
        finish = finish_reason(gen)
        calls = parse_tool_calls(gen.text) if self.tools else None
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            finish = "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": self._logprobs(gen.steps)}
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage(gen, self.truncated)}

    def chunks(self, steps: Iterable[Step], gen: Generation) -> Iterator[dict]:
        """chat.completion.chunk dicts as `steps` (filling `gen`) come: a role chunk, the
        content, a last chunk with finish_reason and usage. With tools, text is held back
        while it may still be a tool call, which comes as one tool_calls delta."""
        def chunk(delta, finish=None, lp=None):
            c = {"index": 0, "delta": delta, "finish_reason": finish}
            if self.tokenizer is not None:
                c["logprobs"] = lp
            return {**self._head("chat.completion.chunk"), "choices": [c]}

        yield chunk({"role": "assistant", "content": ""})
        held = []      # with tools, text is held until it cannot be a tool call
        holding = self.tools
        for step in steps:
            if holding:
                held.append(step)
                head = "".join(s.text for s in held).lstrip()
                if head and not head.startswith(("{", "[", PYTHON_TAG)):
                    holding = False
                    for s in held:
                        if s.text:
                            yield chunk({"content": s.text}, lp=self._logprobs([s]))
                    held = []
                continue
            if step.text:
                yield chunk({"content": step.text}, lp=self._logprobs([step]))
        finish = finish_reason(gen)
        calls = parse_tool_calls(gen.text) if self.tools else None
        if calls:
            yield chunk({"tool_calls": [dict(c, index=i) for i, c in enumerate(calls)]})
            finish = "tool_calls"
        elif held:
            text = "".join(s.text for s in held)
            if text:
                yield chunk({"content": text})
        final = chunk({}, finish)
        final["usage"] = usage(gen, self.truncated)
        yield final


class ServedChat:
    """Llama.chat's dicts as the server sends them: the served model name, and usage only
    where stream_options.include_usage puts it (a last chunk with no choices), with
    "truncated" when the server dropped turns to fit the context."""

    def __init__(self, model_id: str, include_usage: bool, truncated: dict | None = None):
        self.model_id, self.include_usage, self.truncated = model_id, include_usage, truncated
        self.usage, self.head = None, None

    def result(self, d: dict) -> dict:
        d["model"] = self.model_id
        if self.truncated:   # dropped before the Llama saw the messages (server/prompts.py)
            d["usage"]["truncated"] = dict(self.truncated)
        return d

    def events(self, chunk: dict) -> list[dict]:
        chunk["model"] = self.model_id
        self.head = {k: chunk[k] for k in ("id", "object", "created", "model")}
        u = chunk.pop("usage", None)
        if u is not None:
            self.usage = u
            if self.truncated:
                u["truncated"] = dict(self.truncated)
        if self.include_usage:
            chunk["usage"] = None
        return [chunk]

    def end(self, gen: Generation) -> list[dict]:
        if self.include_usage and self.head is not None:
            return [{**self.head, "choices": [], "usage": self.usage or usage(gen)}]
        return []


class ServedCompletion:
    """Text pieces of Llama.generate as the server's /v1/completions sends them:
    text_completion objects, the prompt first with echo."""

    def __init__(self, model_id: str, include_usage: bool, echo_text: str | None):
        self.include_usage, self.echo = include_usage, echo_text
        self.head = {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion",
                     "created": int(time.time()), "model": model_id}

    def _chunk(self, text, finish=None):
        return {**self.head, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    def events(self, piece: str) -> list[dict]:
        out = [self._chunk(self.echo)] if self.echo else []
        self.echo = None
        return out + [self._chunk(piece)]

    def end(self, gen: Generation) -> list[dict]:
        out = [self._chunk(self.echo)] if self.echo else []
        out.append(self._chunk("", finish_reason(gen)))
        if self.include_usage:
            out.append({**self.head, "choices": [], "usage": usage(gen)})
        return out

    def whole(self, gen: Generation) -> dict:
        return {**self._chunk((self.echo or "") + gen.text, finish_reason(gen)), "usage": usage(gen)}
