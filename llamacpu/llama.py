"""llamacpu.Llama: text in, text out.

Tokenizer, chat template and sampler around one `Model`: the session (prompt cache:
the KV cache of the longest common token prefix is reused across calls; a lock
serialises calls on one Llama) and the sampling loop. The text of a sequence (stop
strings, held-back text) is generation.TextTracker's; the OpenAI shapes of chat() are
openai_format's; streams are generation.GenerationStream.
"""
from __future__ import annotations

import threading
import time
from typing import Iterator

import numpy as np

from .chat_prompt import chat_ids
from .chat_template import ChatTemplate
from .generation import Generation, GenerationStream, Step, TextTracker
from .model import DEFAULT_N_CTX, Model
from .model_cache import resolve_model
from .openai_format import ChatCompletion, parse_tool_calls  # noqa: F401 (parse_tool_calls: importable here)
from .sampling import Sampler, SamplingParams
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
        self._cancel = threading.Event()  # the running (or last) generation's
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
        """Stop the generation in progress (from any thread) after the current token
        (a stream's own cancel() stops that one)."""
        self._cancel.set()

    def reset(self) -> None:
        """Forget the prompt cache."""
        with self._lock:
            self._cache = []
            self.model.reset()

    def _acquire(self, cancel: threading.Event):
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("a generation on this Llama is still open in this thread; "
                               "exhaust or close() its iterator first")
        self._lock.acquire()
        self._owner = me
        self._cancel = cancel

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
        text = TextTracker(self.tokenizer.stream_decoder(), stop)
        history = list(ids)
        t0 = time.perf_counter()
        logits = self._prefill(ids)
        gen.prompt_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        limit = max_tokens if max_tokens is not None else self.n_ctx
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
                emit, stopped = text.push(tok)
                gen.text += emit
                step = Step(tok, emit, lp, top)
                gen.steps.append(step)
                yield step
                if stopped:
                    gen.finish_reason = "stop"
                    break
                if len(history) > self.n_ctx:  # tok would need position n_ctx: the cache is full
                    gen.finish_reason = "length"
                    break
                logits = self.model.forward([tok], pos=len(history) - 1)
                self._cache.append(tok)
                self.n_evaluated += 1
            tail, stopped = text.finish()  # what was held back (cut at a stop string)
            if stopped:
                gen.finish_reason = "stop"
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
    def _stream(self, ids, max_tokens, params, stops, logprobs, shape) -> GenerationStream:
        """A GenerationStream of shape(steps, generation): it takes the lock at its first
        next() and gives it back when exhausted or closed."""
        gen, cancel = Generation(), threading.Event()

        def run():
            self._acquire(cancel)
            try:
                yield from shape(self._steps(ids, max_tokens, params, stops, logprobs, gen), gen)
            finally:
                self._release()
        return GenerationStream(run(), gen, cancel)

    def generate(self, prompt, max_tokens: int | None = 256, stream: bool = True, stop=None, **sampling):
        """Continue `prompt` (a string, or token ids). stream=True returns a
        GenerationStream of the text pieces as they are decoded (its .generation holds
        token counts and finish_reason); stream=False returns the whole text. Sampling
        options: temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed
        (defaults from the model's generation config)."""
        self._check_open()
        max_tokens = _check_max_tokens(max_tokens)
        params = self.sampling_params(**sampling)
        stops = _stops(stop)
        ids = self._prompt_ids(prompt)
        self._check_prompt(ids)  # now, not at the first next() of a stream
        it = self._stream(ids, max_tokens, params, stops, None, lambda steps, gen: (s.text for s in steps if s.text))
        return it if stream else _finish(it).text

    def chat(self, messages, tools=None, stream: bool = False, max_tokens: int | None = 512, stop=None,
             logprobs: bool = False, top_logprobs: int = 0, parse_special_in_content: bool = False, **sampling):
        """OpenAI-shaped chat completion: a dict (choices[0].message, finish_reason
        "stop" / "length" / "tool_calls", usage), or with stream=True a GenerationStream
        of chat.completion.chunk dicts. A reply in Llama 3.2's tool-call format
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
        shape = ChatCompletion(self.model_name, tools=bool(tools), tokenizer=self.tokenizer if lp is not None else None)
        if stream:
            return self._stream(ids, max_tokens, params, stops, lp, shape.chunks)
        return shape.result(_finish(self._stream(ids, max_tokens, params, stops, lp, lambda steps, gen: steps)))

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
