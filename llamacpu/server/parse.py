"""Request parsing: a JSON body in, the job's settings out (or a 400 naming the field).

`parse_chat` checks a /v1/chat/completions body and returns a ChatRequest, `parse_completion`
a /v1/completions body and returns a CompletionRequest; their `llama_kwargs()` are the
arguments of Llama.chat / Llama.generate (the one place a request becomes a call).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..context_fit import TRUNCATE_CHOICES
from ..sampling import REPEAT_PENALTY_RANGE  # checked here too: a 400 before the request queues
from ..structured import output_spec
from .errors import bad

MAX_STOP = 4          # OpenAI's limit on stop strings
# Nesting deeper than this is refused: tool schemas nest a dozen levels, and every consumer
# of these values that recurses (json, the Jinja template) stays far from Python's limit of
# 1000 frames (json.loads of 100,000 levels raised RecursionError: a 500).
MAX_JSON_DEPTH = 64


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object (a 400 if it is not one, or nests too deeply)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})") from None
    stack = [(body, 1)]   # depth-first, without recursion
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(v, (dict, list)):
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v)
                         if isinstance(x, (dict, list)))
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {_json_type(body)}")
    return body


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
        raise bad(f"'{p}' must be {want}, got {_json_type(v)}{shown}", p)

    def get(self, name, kind, default=None, lo=None, hi=None):
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
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                self._fail(name, "a finite number", v)
            try:
                v = float(v)   # an integer of 400 digits is valid JSON, and too large for a float
            except OverflowError:
                v = math.inf
            if not math.isfinite(v):
                self._fail(name, "a finite number", v)
        elif not isinstance(v, kind):
            self._fail(name, _JSON_TYPES[kind], v)
        if kind in (int, float):
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise bad(f"'{p}' must be in [{lo if lo is not None else '-inf'}, "
                           f"{hi if hi is not None else 'inf'}], got {v}", p)
        return v


@dataclass
class _Request:
    """What both endpoints take: streaming, the reply's length and stops, the sampling
    arguments (Llama.sampling_params' keywords, checked against its rules by the caller)."""
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    max_tokens: int | None = None
    stop: list | None = None
    sampling: dict = field(default_factory=dict)


@dataclass
class ChatRequest(_Request):
    messages: list = field(default_factory=list)
    tools: list | None = None
    tool_choice: object = None
    response_format: dict | None = None  # json_object / json_schema (None: text)
    logprobs: bool = False
    top_logprobs: int = 0
    truncate: str | None = None  # "oldest": drop the oldest turns that do not fit (context_fit.py)
    truncated: dict | None = None  # what "oldest" dropped (PromptCheck.fit sets it)

    def llama_kwargs(self) -> dict:
        """Llama.chat's arguments (stream=False: the caller chooses)."""
        return dict(messages=self.messages, tools=self.tools, max_tokens=self.max_tokens, stop=self.stop,
                    logprobs=self.logprobs, top_logprobs=self.top_logprobs, response_format=self.response_format,
                    tool_choice=self.tool_choice, **self.sampling)


@dataclass
class CompletionRequest(_Request):
    prompt: str | list = ""  # text, or token ids
    echo: bool = False
    echo_text: str | None = None  # the prompt as text when echo (app.py fills it in)

    def llama_kwargs(self) -> dict:
        """Llama.generate's arguments (stream=False: the caller chooses)."""
        return dict(prompt=self.prompt, max_tokens=self.max_tokens, stop=self.stop, **self.sampling)


def _common(f: _Fields, n_ctx: int, default_max_tokens, min_max_tokens: int) -> dict:
    """Fields shared by both endpoints: n, stream, max_tokens, stop, sampling (_Request's)."""
    n = f.get("n", int, 1)
    if n != 1:
        raise bad("only n=1 is supported (one choice per request)", "n")
    stream = f.get("stream", bool, False)
    opts = f.get("stream_options", dict)
    if opts is not None and not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include_usage = _Fields(opts or {}, "stream_options.").get("include_usage", bool, False)
    max_tokens = f.get("max_tokens", int, default_max_tokens, lo=min_max_tokens, hi=n_ctx)
    if "max_completion_tokens" in f.d:
        max_tokens = f.get("max_completion_tokens", int, max_tokens, lo=min_max_tokens, hi=n_ctx)
    stop = f.d.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad("'stop' must be a string or an array of strings", "stop")
        if len(stop) > MAX_STOP:
            raise bad(f"'stop' may hold at most {MAX_STOP} strings, got {len(stop)}", "stop")
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
                     ("repeat_penalty", dict(lo=REPEAT_PENALTY_RANGE[0], hi=REPEAT_PENALTY_RANGE[1]))):
        v = f.get(name, int if name == "top_k" else float, **kw)
        if v is not None:
            sampling[name] = v
    for name in ("presence_penalty", "frequency_penalty"):
        if f.get(name, float, 0.0, lo=-2, hi=2) != 0:
            raise bad(f"'{name}' is not supported; use 'repeat_penalty' (llama.cpp's, "
                      f"{REPEAT_PENALTY_RANGE[0]:g} to {REPEAT_PENALTY_RANGE[1]:g}, 1 = off)", name)
    if f.d.get("logit_bias"):
        raise bad("'logit_bias' is not supported", "logit_bias")
    return {"stream": stream, "include_usage": include_usage, "max_tokens": max_tokens,
            "stop": stop, "sampling": sampling}


_ROLES = {"system", "developer", "user", "assistant", "tool", "ipython"}


def _content_text(content, i: int, role: str):
    """A message's content as a string: text parts are joined, other parts refused."""
    p = f"messages[{i}].content"
    if content is None:
        if role in ("assistant", "tool"):
            return None
        raise bad(f"'{p}' is required for a {role} message", p)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                kind = part.get("type") if isinstance(part, dict) else _json_type(part)
                raise bad(f"'{p}[{j}]' is a {kind!r} part; only text parts are supported", p)
            if not isinstance(part.get("text"), str):
                raise bad(f"'{p}[{j}].text' must be a string", p)
            out.append(part["text"])
        return "".join(out)
    raise bad(f"'{p}' must be a string or an array of text parts, got {_json_type(content)}", p)


def _messages(raw, template_renders_tool_calls: bool) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty array of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise bad(f"'messages[{i}]' must be an object, got {_json_type(m)}", "messages")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise bad(f"'messages[{i}].role' must be one of {', '.join(sorted(_ROLES))}, got {role!r}",
                       f"messages[{i}].role")
        msg = {k: v for k, v in m.items() if v is not None}
        msg["role"] = "system" if role == "developer" else role
        content = _content_text(m.get("content"), i, role)
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise bad(f"'messages[{i}].tool_calls' is only allowed on assistant messages",
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
            raise bad(f"'messages[{i}].name' must be a string", f"messages[{i}].name")
        out.append(msg)
    return out


def _tool_calls(calls, i: int) -> list[dict]:
    p = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise bad(f"'{p}' must be an array", p)
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"'{p}[{j}]' must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}", p)
        args = fn.get("arguments", {})
        if isinstance(args, str):   # OpenAI sends a JSON string; templates want the object
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise bad(f"'{p}[{j}].function.arguments' is not valid JSON", p) from None
        if not isinstance(args, dict):
            raise bad(f"'{p}[{j}].function.arguments' must be a JSON object", p)
        out.append({**c, "type": "function", "function": {**fn, "arguments": args}})
    return out


def _tools(f: _Fields):
    tools = f.d.get("tools")
    choice = f.d.get("tool_choice")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("'tools' must be an array of {\"type\": \"function\", \"function\": {...}}", "tools")
        for j, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                    or not isinstance(fn.get("name"), str):
                raise bad(f"'tools[{j}]' must be {{\"type\": \"function\", \"function\": {{\"name\", "
                           "\"description\", \"parameters\"}}", f"tools[{j}]")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise bad(f"'tools[{j}].function.parameters' must be a JSON schema object", f"tools[{j}]")
    if choice is None or choice == "auto":
        return tools or None, None
    if choice == "none":
        return None, None
    if choice == "required" or isinstance(choice, dict):   # forced: structured.py checks the rest
        if not tools:
            raise bad("tool_choice 'required' or a named function needs 'tools'", "tool_choice")
        return tools, choice
    raise bad(f"'tool_choice' must be 'none', 'auto', 'required' or an object, got {choice!r}", "tool_choice")


def parse_chat(body: dict, n_ctx: int, template_renders_tool_calls: bool = True) -> ChatRequest:
    """Check a /v1/chat/completions body; return the job's settings (400 APIError if bad)."""
    f = _Fields(body)
    f.get("model", str)
    rf = f.get("response_format", dict)
    if rf is not None and rf.get("type", "text") not in ("text", "json_object", "json_schema"):
        raise bad(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {rf.get('type')!r}",
                  "response_format")
    common = _common(f, n_ctx, None, 1)
    messages = _messages(body.get("messages"), template_renders_tool_calls)
    tools, tool_choice = _tools(f)
    logprobs = f.get("logprobs", bool, False)
    top = f.get("top_logprobs", int, lo=0, hi=20)
    if top is not None and not logprobs:
        raise bad("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    truncate = body.get("truncate")
    if truncate is not None and truncate not in TRUNCATE_CHOICES:
        raise bad(f"'truncate' must be null (a conversation longer than the context is an error) or "
                  f"\"oldest\" (drop its oldest turns), got {truncate!r}", "truncate")
    return ChatRequest(**common, messages=messages, tools=tools, tool_choice=tool_choice,
                       response_format=rf if rf is not None and rf.get("type", "text") != "text" else None,
                       logprobs=logprobs, top_logprobs=top or 0, truncate=truncate)


def check_structured(req: ChatRequest, tokenizer) -> None:
    """A 400 when the constraint engine cannot take the chat's response_format schema or its
    forced tools' (param "response_format" / "tools", code "invalid_schema")."""
    if not (req.response_format or req.tool_choice):
        return
    try:
        output_spec(tokenizer, response_format=req.response_format, tools=req.tools, tool_choice=req.tool_choice)
    except ValueError as e:
        param = "response_format" if req.response_format else \
            ("tools" if str(e).startswith("tools") else "tool_choice")
        raise bad(str(e), param, "invalid_schema" if param != "tool_choice" else None) from None


def parse_completion(body: dict, n_ctx: int, vocab_size: int) -> CompletionRequest:
    """Check a /v1/completions body; return the job's settings (400 APIError if bad)."""
    f = _Fields(body)
    f.get("model", str)
    common = _common(f, n_ctx, 16, 0)   # OpenAI's default max_tokens here is 16
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]           # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise bad("'prompt' must be a string or an array of token ids (one prompt per request)", "prompt")
        if len(prompt) >= n_ctx:
            raise bad(f"This model's maximum context length is {n_ctx} tokens; your prompt has {len(prompt)} "
                       "tokens, which leaves no room for a reply", "prompt", "context_length_exceeded")
        outside = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if outside is not None:
            raise bad(f"token id {outside} is outside the vocabulary [0, {vocab_size})", "prompt")
    elif not isinstance(prompt, str):
        raise bad(f"'prompt' must be a string, got {_json_type(prompt)}", "prompt")
    if f.get("suffix", str):
        raise bad("'suffix' is not supported", "suffix")
    if body.get("logprobs") is not None:
        raise bad("'logprobs' is not supported on /v1/completions; /v1/chat/completions has "
                   "logprobs and top_logprobs", "logprobs")
    if f.get("best_of", int, 1) != 1:
        raise bad("only best_of=1 is supported", "best_of")
    return CompletionRequest(**common, prompt=prompt, echo=f.get("echo", bool, False))
