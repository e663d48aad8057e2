"""llamacpu.Llama: text in, text out.

Tokenizer, chat template and sampler settings around one `Model`: the public
generation API. Every generation is a batcher.Request: calls from several threads
(and chat_batch / generate_batch) decode together, one forward per step, each in a
sequence slot that reuses its cached prompt prefix. The text of a sequence (stop
strings, held-back text) is generation.TextTracker's; the OpenAI shapes of chat() are
openai_format's; streams are generation.GenerationStream; structured output
(response_format, regex, grammar, tool_choice) is structured.py's.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from typing import Iterator

import numpy as np

from .chat_prompt import chat_ids
from .chat_template import ChatTemplate
from .context_fit import Fit, check_truncate, fit_oldest, reply_room
from .errors import ContextOverflowError
from .generation import Generation, GenerationStream, Step, TextTracker
from .batcher import Batcher, Request, Sink
from .cache_types import cache_type
from .model import DEFAULT_N_CTX, Model, default_parallel
from .model_cache import resolve_model
from .openai_format import ChatCompletion, parse_tool_calls  # noqa: F401 (parse_tool_calls: importable here)
from .progress import JobProgress
from .sampling import SamplingParams
from .structured import output_spec, tools_for_prompt
from .tokenizer import Tokenizer

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed")


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

    model_path: a llamacpu model file, a GGUF file or Hugging Face folder (converted once
    into the cache), a Hub name "org/name" or "org/name:TAG" (model_cache.py, hub.py), or
    None for the default model (SmolLM2-135M-Instruct).
    cache_type_k, cache_type_v: the KV cache's types, "f16" (default), "q8_0" (about half
    the memory) or "q4_0" (about a quarter; Model).
    n_parallel: sequences decoded together (calls from several threads, chat_batch),
    each with a KV cache of n_ctx positions that takes memory as it fills. Default:
    model.default_parallel() (twice the physical cores, 2 to 16), fewer when the
    memory cannot hold all their caches full.

    >>> llm = Llama("model.bin")
    >>> for piece in llm.generate("Once upon a time", max_tokens=20): print(piece, end="")
    >>> llm.chat([{"role": "user", "content": "Hi"}])["choices"][0]["message"]["content"]
    """

    def __init__(self, model_path, n_ctx: int = DEFAULT_N_CTX, n_threads=None, *, kernels=None, n_parallel=None,
                 cache_type_k: str = "f16", cache_type_v: str = "f16"):
        cache_type(cache_type_k, "cache_type_k"), cache_type(cache_type_v, "cache_type_v")  # before any loading
        path = resolve_model(model_path)
        n = default_parallel() if n_parallel is None else n_parallel
        while True:
            try:
                self.model = Model(path, n_ctx=n_ctx, n_threads=n_threads, kernels=kernels, n_seq=n,
                                   cache_type_k=cache_type_k, cache_type_v=cache_type_v)
                break
            except ValueError as e:  # the default, halved until the memory holds it
                if n_parallel is not None or n == 1 or "memory is available" not in str(e):
                    raise
                n //= 2
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
        self._batcher = Batcher(self.model, self.tokenizer.eog_ids)

    def _token_text(self, tid):
        if tid is None:
            return ""
        return self.tokenizer.decode([tid])

    # ------------------------------------------------------------------ text
    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    @property
    def n_parallel(self) -> int:
        """Sequences decoded together."""
        return self.model.n_seq

    @property
    def n_evaluated(self) -> int:
        """Tokens the engine has evaluated, in total (prompt cache accounting)."""
        return self._batcher.n_evaluated

    def load(self) -> dict:
        """What runs now: {"slots", "slots_in_use", "waiting"}."""
        return self._batcher.snapshot()

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
        """Stop every generation in progress (from any thread) after the current token
        (a stream's own cancel() stops that one)."""
        self._batcher.cancel_all()

    def reset(self) -> None:
        """Forget the prompt cache (of the sequence slots not running now)."""
        self._batcher.forget()

    # ------------------------------------------------------------------ core loop
    def _request(self, ids: list[int], max_tokens, params: SamplingParams, stop: list[str],
                 logprobs: int | None, spec, gen: Generation, cancel: threading.Event) -> Iterator[Step]:
        """Submit one generation to the batcher now (spec: its structured.OutputSpec or
        None); the iterator of its Steps."""
        self._check_prompt(ids)
        gen.prompt_tokens = len(ids)
        out: queue.SimpleQueue = queue.SimpleQueue()
        sink = _QueueSink(TextTracker(self.tokenizer.stream_decoder(), stop), gen, out.put)
        self._batcher.submit(Request(ids, params, max_tokens, sink, logprobs, cancelled=cancel,
                                     constraint=spec.constraint() if spec is not None else None))
        return _results(out, cancel)

    def _check_prompt(self, ids, what: str = "prompt",
                      hint: str = "load with a larger n_ctx or shorten the prompt") -> None:
        """Refuse a prompt that leaves no room to generate (never truncate it silently):
        ContextOverflowError (a ValueError) that names `what` and suggests `hint`."""
        if not ids:
            raise ValueError(f"the {what} is empty")
        if len(ids) >= self.n_ctx:
            raise ContextOverflowError(f"the {what} has {len(ids)} tokens; the context holds {self.n_ctx} ({hint})")

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
    def _stream(self, ids, max_tokens, params, stops, logprobs, spec, shape, now: bool = False,
                result=None) -> GenerationStream:
        """A GenerationStream of shape(steps, generation) (result(generation): its whole
        result): the request joins the batch at its first next(), or at once with now=True."""
        gen, cancel = Generation(), threading.Event()

        def start():
            return self._request(ids, max_tokens, params, stops, logprobs, spec, gen, cancel)
        steps = start() if now else _later(start)
        return GenerationStream(shape(steps, gen), gen, cancel, result)

    def generate(self, prompt, max_tokens: int | None = 256, stream: bool = True, stop=None, *,
                 response_format=None, regex=None, grammar=None, **sampling):
        """Continue `prompt` (a string, or token ids). stream=True returns a
        GenerationStream of the text pieces as they are decoded (its .generation holds
        token counts and finish_reason); stream=False returns the whole text. Sampling
        options: temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed
        (defaults from the model's generation config). Structured output (one of):
        response_format (as chat's), regex= (the whole text matches it), grammar= (Lark
        or GBNF); see constrained.py."""
        self._check_open()
        max_tokens = _check_max_tokens(max_tokens)
        params = self.sampling_params(**sampling)
        stops = _stops(stop)
        spec = output_spec(self.tokenizer, response_format=response_format, regex=regex, grammar=grammar)
        ids = self._prompt_ids(prompt)
        self._check_prompt(ids)  # now, not at the first next() of a stream
        it = self._stream(ids, max_tokens, params, stops, None, spec,
                          lambda steps, gen: (s.text for s in steps if s.text))
        return it if stream else _finish(it).text

    def chat(self, messages, tools=None, stream: bool = False, max_tokens: int | None = 512, stop=None,
             logprobs: bool = False, top_logprobs: int = 0, parse_special_in_content: bool = False, *,
             truncate: str | None = None, response_format=None, tool_choice=None, regex=None, grammar=None,
             **sampling):
        """OpenAI-shaped chat completion: a dict (choices[0].message, finish_reason
        "stop" / "length" / "tool_calls", or "cancelled" when cancel() or closing the stream
        cut the reply short, usage), or with stream=True a GenerationStream
        of chat.completion.chunk dicts. A reply in Llama 3.2's tool-call format
        ({"name": ..., "parameters": ...}) becomes message.tool_calls.
        Special-token text in messages is tokenized as text unless
        parse_special_in_content=True (tokenize_chat).
        Structured output (one of; ValueError for what the engine cannot take):
        response_format={"type": "json_schema", "json_schema": {"schema": {...}}} or
        {"type": "json_object"}; regex=; grammar= (Lark or GBNF); tool_choice="required"
        or {"type": "function", "function": {"name": ...}} forces a call of the tools
        with valid arguments ("auto", the default: the model decides; "none": no tools).
        truncate: None (default), a conversation that does not fit n_ctx is a ValueError;
        "oldest", its oldest turns are dropped (fit_chat), and usage["truncated"] says
        {"messages": n, "tokens": t} when any were."""
        job, shape = self._chat_job(messages, tools, max_tokens, stop, logprobs, top_logprobs,
                                    parse_special_in_content, sampling,
                                    dict(response_format=response_format, tool_choice=tool_choice,
                                         regex=regex, grammar=grammar), truncate)
        if stream:
            return self._stream(*job, shape.chunks, result=shape.result)
        return shape.result(_finish(self._stream(*job, lambda steps, gen: steps)))

    def _chat_job(self, messages, tools, max_tokens, stop, logprobs, top_logprobs, parse_special_in_content, sampling,
                  structure, truncate=None):
        """chat()'s arguments checked: (ids, max_tokens, params, stops, logprobs, spec), its
        ChatCompletion. structure: the structured-output options (structured.output_spec);
        truncate: context_fit's policy (None or "oldest")."""
        self._check_open()
        max_tokens = _check_max_tokens(max_tokens)
        params = self.sampling_params(**sampling)
        stops = _stops(stop)
        spec = output_spec(self.tokenizer, tools=tools, **structure)
        tools = tools_for_prompt(tools, structure["tool_choice"])
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20:
            raise ValueError("top_logprobs must be an integer in [0, 20]")
        dropped = None
        if check_truncate(truncate) is None:
            ids = self.tokenize_chat(messages, tools=tools, parse_special_in_content=parse_special_in_content)
            self._check_prompt(ids, "conversation", "pass truncate='oldest' to drop its oldest turns, "
                                                    "or load with a larger n_ctx")
        else:
            fit = self.fit_chat(messages, tools=tools, max_tokens=max_tokens,
                                parse_special_in_content=parse_special_in_content)
            ids, dropped = fit.ids, fit.dropped
            self._check_prompt(ids, "conversation")  # now, not at the first next() of a stream
        lp = top_logprobs if (logprobs or top_logprobs) else None
        shape = ChatCompletion(self.model_name, tools=bool(tools), tokenizer=self.tokenizer if lp is not None else None,
                               truncated=dropped)
        return (ids, max_tokens, params, stops, lp, spec), shape

    def fit_chat(self, messages, tools=None, max_tokens: int | None = 512,
                 parse_special_in_content: bool = False) -> Fit:
        """The conversation as chat(truncate="oldest") sends it (context_fit.py): when it
        leaves no room for a reply of min(max_tokens, n_ctx // 4) tokens, its oldest turns
        dropped, whole, until prompt + room take half the context; never the system prompt
        or the newest user message (ContextOverflowError, a ValueError, when those alone do
        not fit). A Fit: .messages (kept), .ids, .dropped_messages, .dropped_tokens."""
        _check_messages(messages)
        return fit_oldest(list(messages), lambda m: self.tokenize_chat(
            m, tools=tools, parse_special_in_content=parse_special_in_content), self.n_ctx,
            reply_room(self.n_ctx, _check_max_tokens(max_tokens)))

    def chat_batch(self, conversations, *, tools=None, max_tokens: int | None = 512, stop=None,
                   logprobs: bool = False, top_logprobs: int = 0, parse_special_in_content: bool = False,
                   truncate: str | None = None, progress: bool | None = None, stream: bool = False,
                   response_format=None, tool_choice=None, regex=None, grammar=None, **sampling) -> list[dict]:
        """chat() of every message list in `conversations`, decoded together (n_parallel
        at a time, the others queued in order): the chat.completion dicts, in order.
        Options as chat()'s (not stream). Every conversation is checked before any runs
        (a ValueError names the bad one). progress: a requests / tokens-per-second / ETA
        line on stderr (None: on a terminal, for more conversations than n_parallel)."""
        if stream:
            raise ValueError("chat_batch returns whole results; use chat(stream=True) from threads to stream")
        jobs = []
        for i, messages in enumerate(_as_list(conversations, "conversations")):
            try:
                jobs.append(self._chat_job(messages, tools, max_tokens, stop, logprobs, top_logprobs,
                                           parse_special_in_content, sampling,
                                           dict(response_format=response_format, tool_choice=tool_choice,
                                                regex=regex, grammar=grammar), truncate))
            except (ValueError, TypeError) as e:
                raise type(e)(f"conversations[{i}]: {e}") from None
        return [shape.result(gen) for gen, (_, shape) in zip(self._run_all([j for j, _ in jobs], progress), jobs)]

    def generate_batch(self, prompts, *, max_tokens: int | None = 256, stop=None,
                       progress: bool | None = None, response_format=None, regex=None, grammar=None,
                       **sampling) -> list[str]:
        """generate(stream=False) of every prompt (strings or token-id lists), decoded
        together: the texts, in order (as chat_batch)."""
        self._check_open()
        max_tokens = _check_max_tokens(max_tokens)
        params = self.sampling_params(**sampling)
        stops = _stops(stop)
        spec = output_spec(self.tokenizer, response_format=response_format, regex=regex, grammar=grammar)
        jobs = []
        for i, p in enumerate(_as_list(prompts, "prompts")):
            try:
                ids = self._prompt_ids(p)
                self._check_prompt(ids)
            except (ValueError, TypeError) as e:
                raise type(e)(f"prompts[{i}]: {e}") from None
            jobs.append((ids, max_tokens, params, stops, None, spec))
        return [gen.text for gen in self._run_all(jobs, progress)]

    def _run_all(self, jobs, progress) -> list[Generation]:
        """Submit every job at once; their Generations, in order (Ctrl-C or an error
        cancels the rest)."""
        show = progress if progress is not None else (len(jobs) > self.n_parallel and sys.stderr.isatty())
        bar = JobProgress(len(jobs), label="requests") if show else None
        streams = [self._stream(*job, lambda steps, gen: steps, now=True) for job in jobs]
        try:
            for s in streams:
                _finish(s)
                if bar:
                    bar.update(1, s.generation.completion_tokens)
        except BaseException:
            for s in streams:
                s.cancel()
            for s in streams:
                s.close()
            raise
        finally:
            if bar:
                bar.close()
        return [s.generation for s in streams]

    # ------------------------------------------------------------------ misc
    def _check_open(self) -> None:
        if self.model.closed:
            raise ValueError("this Llama is closed")

    def close(self) -> None:
        self._batcher.close()
        self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<llamacpu.Llama {self.model_name!r} n_ctx={self.n_ctx}>"


class _QueueSink(Sink):
    """A request's tokens as Steps on a queue (on the batcher's thread): the text from its
    TextTracker, then None at the end (or the error)."""

    def __init__(self, text: TextTracker, gen: Generation, put):
        self.text, self.gen, self.put = text, gen, put
        self.t0, self.t1 = time.perf_counter(), None

    def token(self, tok, lp, top) -> bool:
        if self.t1 is None:
            self.t1 = time.perf_counter()
            self.gen.prompt_seconds = self.t1 - self.t0
        emit, stopped = self.text.push(tok)
        self.gen.text += emit
        step = Step(tok, emit, lp, top)
        self.gen.steps.append(step)
        self.put(step)
        return stopped

    def end(self, finish_reason, completion_tokens, error=None, *, prompt_cached=0, prompt_evaluated=0) -> None:
        gen, now = self.gen, time.perf_counter()
        if self.t1 is None:
            gen.prompt_seconds, self.t1 = now - self.t0, now
        gen.generation_seconds = now - self.t1
        gen.completion_tokens = completion_tokens
        gen.prompt_cached, gen.prompt_evaluated = prompt_cached, prompt_evaluated
        if error is not None:
            self.put(error)
            return
        gen.finish_reason = finish_reason
        tail, stopped = self.text.finish()  # what was held back (cut at a stop string)
        if stopped:
            gen.finish_reason = "stop"
        if tail:
            gen.text += tail
            self.put(Step(-1, tail))
        self.put(None)


def _results(out: queue.SimpleQueue, cancel: threading.Event) -> Iterator[Step]:
    """A request's Steps from its queue. Closed early, it cancels the request and waits
    for its end (one step at most), so that its Generation is complete."""
    ended = False
    try:
        while True:
            item = out.get()
            if item is None:
                ended = True
                return
            if isinstance(item, BaseException):
                ended = True
                raise item
            yield item
    finally:
        if not ended:
            cancel.set()
            while not isinstance(out.get(), (type(None), BaseException)):  # until the batcher lets it go
                pass


def _later(start) -> Iterator[Step]:
    yield from start()


def _as_list(xs, name) -> list:
    if isinstance(xs, (str, bytes, dict)) or not hasattr(xs, "__iter__"):
        raise TypeError(f"{name} must be a list")
    return list(xs)


def _finish(stream: GenerationStream) -> Generation:
    """Run a stream to its end; its Generation."""
    try:
        for _ in stream:
            pass
    finally:
        stream.close()
    return stream.generation


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
