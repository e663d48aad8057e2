"""llamacpu.Llama: text in, text out.

Tokenizer, chat template and sampler around one `Model`, with streaming, stop
strings, a prompt cache (the KV cache of the longest common token prefix is
reused across calls), cancellation from another thread, and OpenAI-shaped chat
results. Calls on one Llama are serialised by a lock.
"""
from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .chat_prompt import chat_ids
from .chat_template import ChatTemplate
from .model import DEFAULT_N_CTX, Model
from .model_cache import resolve_model
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed")


@dataclass
class Step:
    """One generated token: its id, the text it releases (may be empty while a
    multi-byte character or a possible stop string is held back), and logprobs."""
    token: int
    text: str
    logprob: float | None = None
    top_logprobs: list = field(default_factory=list)


@dataclass
class Generation:
    """What a generation left behind: finish_reason "stop" (end-of-generation token
    or stop string), "length" (max_tokens or the context is full) or "cancelled"."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    text: str = ""
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    steps: list = field(default_factory=list)


def _check_max_tokens(n):
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"max_tokens must be a non-negative integer or None, got {n!r}")
    return int(n)


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    out = []
    for s in stop:
        if not isinstance(s, str):
            raise TypeError(f"stop strings must be str, got {type(s).__name__}")
        if s:
            out.append(s)
    return out


class Llama:
    """A model ready to chat.

    model_path: a llamacpu model file, a GGUF file (converted once into the cache:
    model_cache.py), or None for the default model (SmolLM2-135M-Instruct).

    >>> llm = Llama("model.bin")
    >>> for piece in llm.generate("Once upon a time", max_tokens=20): print(piece, end="")
    >>> llm.chat([{"role": "user", "content": "Hi"}])["choices"][0]["message"]["content"]
    """

    def __init__(self, model_path, n_ctx: int = DEFAULT_N_CTX, n_threads=None, *, kernels=None):
        self.model = Model(resolve_model(model_path), n_ctx=n_ctx, n_threads=n_threads, kernels=kernels)
        meta = self.model.metadata
        try:
            self.tokenizer = Tokenizer.from_metadata(meta)
        except BaseException:
            self.model.close()
            raise
        st = meta.get("special_tokens", {})
        self._bos_text = self._token_text(st.get("bos_token_id"))
        self._eos_text = self._token_text(st.get("eos_token_id"))
        self.template = ChatTemplate(meta.get("chat_template"), bos_token=self._bos_text, eos_token=self._eos_text)
        self.generation_defaults = dict(meta.get("generation") or {})
        self.model_name = meta.get("provenance", {}).get("source") or str(model_path)
        self._lock = threading.Lock()
        self._owner = None
        self._cancel = threading.Event()
        self._cache: list[int] = []  # tokens whose K/V are in the cache, positions 0..len-1
        self.n_evaluated = 0         # tokens the engine has evaluated, in total (prompt cache accounting)

    def _token_text(self, tid):
        if tid is None:
            return ""
        return self.tokenizer.decode([tid])

    # ------------------------------------------------------------------ text
    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    def tokenize(self, text: str, special: bool = True, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special=True parses special tokens written inline.
        add_bos defaults to the model's add_bos_token."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return self.tokenizer.encode(text, special=special, add_bos=self.tokenizer.add_bos if add_bos is None else add_bos)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def apply_chat_template(self, messages, tools=None, add_generation_prompt: bool = True) -> str:
        """The model's own chat template rendered as transformers would (a Llama 3 header
        format fallback for models without one)."""
        _check_messages(messages)
        return self.template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)

    def tokenize_chat(self, messages, tools=None, add_generation_prompt: bool = True,
                      parse_special_in_content: bool = False) -> list[int]:
        """Token ids of the chat prompt, as chat() runs it: the template's markup becomes
        special tokens, the text of messages and tools is tokenized as text (a message
        cannot forge a turn with "<|eot_id|>..."; chat_prompt.py). Ids are transformers'
        whenever that text holds no special-token text. parse_special_in_content=True
        parses special tokens in it too, as transformers does."""
        _check_messages(messages)
        if not isinstance(parse_special_in_content, bool):
            raise TypeError("parse_special_in_content must be True or False")
        return chat_ids(self.tokenizer, lambda m, t: self.apply_chat_template(
            m, tools=t, add_generation_prompt=add_generation_prompt), messages, tools,
            parse_special=parse_special_in_content)

    def sampling_params(self, **overrides) -> SamplingParams:
        """The model's generation defaults with explicit overrides (None = default)."""
        unknown = set(overrides) - set(SAMPLING_KEYS)
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        return SamplingParams.from_generation_config(self.generation_defaults, **overrides)

    # ------------------------------------------------------------------ control
    def cancel(self) -> None:
        """Stop the generation in progress (from any thread) after the current token."""
        self._cancel.set()

    def reset(self) -> None:
        """Forget the prompt cache."""
        with self._lock:
            self._cache = []
            self.model.reset()

    def _acquire(self):
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("a generation on this Llama is still open in this thread; "
                               "exhaust or close() its iterator first")
        self._lock.acquire()
        self._owner = me
        self._cancel.clear()

    def _release(self):
        self._owner = None
        self._lock.release()

    # ------------------------------------------------------------------ core loop
    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Logits after `ids`, reusing the cached prefix."""
        n = 0
        for a, b in zip(self._cache, ids):
            if a != b:
                break
            n += 1
        if n == len(ids):
            n -= 1  # the last prompt token must run again to give its logits
        self._cache = self._cache[:n]
        logits = self.model.forward(ids[n:], pos=n)
        self._cache = list(ids)
        self.n_evaluated += len(ids) - n
        return logits

    def _steps(self, ids: list[int], max_tokens, params: SamplingParams, stop: list[str],
               logprobs: int | None, gen: Generation) -> Iterator[Step]:
        """The generation loop. Caller holds the lock."""
        self._check_prompt(ids)
        gen.prompt_tokens = len(ids)
        sampler = Sampler(params)
        dec = self.tokenizer.stream_decoder()
        history = list(ids)
        pending = ""   # released text not yet emitted because it may start a stop string
        t0 = time.perf_counter()
        logits = self._prefill(ids)
        gen.prompt_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        limit = max_tokens if max_tokens is not None else self.n_ctx
        max_stop = max((len(s) for s in stop), default=0)
        hit = None
        try:
            while True:
                if self._cancel.is_set():
                    gen.finish_reason = "cancelled"
                    break
                if gen.completion_tokens >= limit:
                    gen.finish_reason = "length"
                    break
                tok = sampler.sample(logits, history)
                lp, top = (None, [])
                if logprobs is not None:
                    lp, top = sampler.logprobs(logits, tok, logprobs)
                gen.completion_tokens += 1
                if tok in self.tokenizer.eog_ids:
                    gen.finish_reason = "stop"
                    break
                history.append(tok)
                pending += dec.push(tok)
                emit = pending
                hit = None
                if stop:
                    for s in stop:
                        i = pending.find(s)
                        if i >= 0 and (hit is None or i < hit):
                            hit = i
                    if hit is not None:
                        emit = pending[:hit]
                    else:  # hold back a tail that could still become a stop string
                        keep = 0
                        for k in range(min(max_stop - 1, len(pending)), 0, -1):
                            tail = pending[-k:]
                            if any(s.startswith(tail) for s in stop):
                                keep = k
                                break
                        emit = pending[:len(pending) - keep]
                pending = pending[len(emit):] if hit is None else ""
                gen.text += emit
                step = Step(tok, emit, lp, top)
                gen.steps.append(step)
                yield step
                if hit is not None:
                    gen.finish_reason = "stop"
                    break
                if len(history) > self.n_ctx:  # tok would need position n_ctx: the cache is full
                    gen.finish_reason = "length"
                    break
                logits = self.model.forward([tok], pos=len(history) - 1)
                self._cache.append(tok)
                self.n_evaluated += 1
            if hit is None:  # not ended by a stop string: release what was held back
                tail = pending + dec.flush()
                cut = [i for i in (tail.find(x) for x in stop) if i >= 0]
                if cut:
                    tail, gen.finish_reason = tail[:min(cut)], "stop"
                if tail:
                    gen.text += tail
                    yield Step(-1, tail)
        finally:
            gen.generation_seconds = time.perf_counter() - t1

    def _check_prompt(self, ids) -> None:
        """Refuse a prompt that leaves no room to generate (never truncate it silently)."""
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.n_ctx:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {self.n_ctx} "
                             "(load with a larger n_ctx or shorten the prompt)")

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt, special=True)
        if isinstance(prompt, (bytes, bytearray, memoryview)) or not hasattr(prompt, "__iter__"):
            raise TypeError(f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}")
        ids = []
        for i in prompt:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"token ids must be integers, got {type(i).__name__} {i!r}")
            ids.append(int(i))
        bad = [i for i in ids if not 0 <= i < self.model.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.model.vocab_size})")
        return ids

    # ------------------------------------------------------------------ public generation
    def generate(self, prompt, max_tokens: int | None = 256, stream: bool = True, stop=None, **sampling):
        """Continue `prompt` (a string, or token ids). stream=True yields text pieces as
        they are decoded; stream=False returns the whole text. Sampling options:
        temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed
        (defaults from the model's generation config)."""
        self._check_open()
        max_tokens = _check_max_tokens(max_tokens)
        params = self.sampling_params(**sampling)
        stops = _stops(stop)
        ids = self._prompt_ids(prompt)
        self._check_prompt(ids)  # now, not at the first next() of a stream
        if stream:
            return self._stream_text(ids, max_tokens, params, stops)
        gen = Generation()
        self._acquire()
        try:
            for _ in self._steps(ids, max_tokens, params, stops, None, gen):
                pass
        finally:
            self._release()
        self.last = gen
        return gen.text

    def _stream_text(self, ids, max_tokens, params, stops):
        gen = Generation()
        self._acquire()
        try:
            for step in self._steps(ids, max_tokens, params, stops, None, gen):
                if step.text:
                    yield step.text
        finally:
            self.last = gen
            self._release()

    def chat(self, messages, tools=None, stream: bool = False, max_tokens: int | None = 512, stop=None,
             logprobs: bool = False, top_logprobs: int = 0, parse_special_in_content: bool = False, **sampling):
        """OpenAI-shaped chat completion: a dict (choices[0].message, finish_reason
        "stop" / "length" / "tool_calls", usage), or with stream=True an iterator of
        chat.completion.chunk dicts. A reply in Llama 3.2's tool-call format
        ({"name": ..., "parameters": ...}) becomes message.tool_calls.
        Special-token text in messages is tokenized as text unless
        parse_special_in_content=True (tokenize_chat)."""
        self._check_open()
        max_tokens = _check_max_tokens(max_tokens)
        params = self.sampling_params(**sampling)
        stops = _stops(stop)
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20:
            raise ValueError("top_logprobs must be an integer in [0, 20]")
        ids = self.tokenize_chat(messages, tools=tools, parse_special_in_content=parse_special_in_content)
        self._check_prompt(ids)  # now, not at the first next() of a stream
        lp = top_logprobs if (logprobs or top_logprobs) else None
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        if stream:
            return self._chat_stream(ids, max_tokens, params, stops, lp, bool(tools), cid, created)
        gen = Generation()
        self._acquire()
        try:
            for _ in self._steps(ids, max_tokens, params, stops, lp, gen):
                pass
        finally:
            self._release()
        self.last = gen
        message = {"role": "assistant", "content": gen.text}
        finish = gen.finish_reason if gen.finish_reason != "cancelled" else "stop"
        calls = parse_tool_calls(gen.text) if tools else None
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            finish = "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": finish,
                  "logprobs": self._logprobs_obj(gen.steps) if lp is not None else None}
        return {"id": cid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [choice], "usage": _usage(gen)}

    def _chat_stream(self, ids, max_tokens, params, stops, lp, tools, cid, created):
        def chunk(delta, finish=None, logprobs=None):
            c = {"index": 0, "delta": delta, "finish_reason": finish}
            if lp is not None:
                c["logprobs"] = logprobs
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [c]}

        gen = Generation()
        self._acquire()
        try:
            yield chunk({"role": "assistant", "content": ""})
            held = []      # with tools, text is held until it cannot be a tool call
            holding = tools
            for step in self._steps(ids, max_tokens, params, stops, lp, gen):
                if holding:
                    held.append(step)
                    head = "".join(s.text for s in held).lstrip()
                    if head and not (head.startswith("{") or head.startswith("[") or head.startswith("<|python_tag|>")):
                        holding = False
                        for s in held:
                            if s.text:
                                yield chunk({"content": s.text}, logprobs=self._logprobs_obj([s]) if lp is not None else None)
                        held = []
                    continue
                if step.text:
                    yield chunk({"content": step.text}, logprobs=self._logprobs_obj([step]) if lp is not None else None)
            finish = gen.finish_reason if gen.finish_reason != "cancelled" else "stop"
            calls = parse_tool_calls(gen.text) if tools else None
            if calls:
                yield chunk({"tool_calls": [dict(c, index=i) for i, c in enumerate(calls)]})
                finish = "tool_calls"
            elif held:
                text = "".join(s.text for s in held)
                if text:
                    yield chunk({"content": text})
            final = chunk({}, finish)
            final["usage"] = _usage(gen)
            yield final
        finally:
            self.last = gen
            self._release()

    def _logprobs_obj(self, steps):
        content = []
        for s in steps:
            if s.token < 0 or s.logprob is None:
                continue
            content.append({"token": self.tokenizer.decode([s.token]), "logprob": s.logprob,
                            "bytes": list(self.tokenizer.token_bytes(s.token)),
                            "top_logprobs": [{"token": self.tokenizer.decode([t]), "logprob": v,
                                              "bytes": list(self.tokenizer.token_bytes(t))} for t, v in s.top_logprobs]})
        return {"content": content}

    # ------------------------------------------------------------------ misc
    def _check_open(self) -> None:
        if self.model.closed:
            raise ValueError("this Llama is closed")

    def close(self) -> None:
        self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<llamacpu.Llama {self.model_name!r} n_ctx={self.n_ctx}>"


def _usage(gen: Generation) -> dict:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


_ROLES = {"system", "user", "assistant", "tool", "ipython"}


def _check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with a 'role'")
        if m["role"] not in _ROLES:
            raise ValueError(f"messages[{i}] has unknown role {m['role']!r} (expected one of {sorted(_ROLES)})")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list, dict)):
            raise ValueError(f"messages[{i}].content must be a string")


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
    if s.startswith("<|python_tag|>"):
        s = s[len("<|python_tag|>"):].strip()
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


def pipeline(task: str, model, **kwargs):
    """A transformers-style pipeline: pipeline("text-generation", model="model.bin").

    pipe(messages, max_new_tokens=256)[0]["generated_text"][-1] is the assistant's
    message dict; a string input returns the prompt followed by its continuation."""
    if task != "text-generation":
        raise ValueError(f"only the 'text-generation' task is supported, not {task!r}")
    llm = model if isinstance(model, Llama) else Llama(model, **kwargs)
    return TextGenerationPipeline(llm)


class TextGenerationPipeline:
    def __init__(self, llm: Llama):
        self.llm = llm

    def __call__(self, inputs, max_new_tokens: int = 256, do_sample: bool | None = None, temperature=None,
                 top_p=None, top_k=None, return_full_text: bool = True, **kw):
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k, **kw}
        if do_sample is False:
            sampling["temperature"] = 0.0
        sampling = {k: v for k, v in sampling.items() if v is not None}
        if isinstance(inputs, str):
            text = self.llm.generate(inputs, max_tokens=max_new_tokens, stream=False, **sampling)
            return [{"generated_text": (inputs + text) if return_full_text else text}]
        if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], dict):
            out = self.llm.chat(list(inputs), max_tokens=max_new_tokens, **sampling)
            msg = out["choices"][0]["message"]
            reply = {"role": "assistant", "content": msg["content"] if msg["content"] is not None else ""}
            if "tool_calls" in msg:
                reply["tool_calls"] = msg["tool_calls"]
            return [{"generated_text": list(inputs) + [reply]}]
        if isinstance(inputs, (list, tuple)):
            return [self(x, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                         top_p=top_p, top_k=top_k, return_full_text=return_full_text, **kw) for x in inputs]
        raise TypeError("inputs must be a string, a list of chat messages, or a list of those")
