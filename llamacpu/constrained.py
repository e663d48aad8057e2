"""Constrained decoding: which tokens may come next so that the output matches a JSON
schema, JSON at all, a regular expression or a grammar.

The engine is llguidance (https://github.com/guidance-ai/llguidance, the one llama.cpp
can use too: ``pip install llamacpu[structured]``); this module is the bridge to it.

    c = Constraint.from_response_format({"type": "json_schema", "json_schema": {"schema": s}}, tok)
    allowed = c.mask()          # bool array over the vocabulary (compute it while the forward runs)
    c.advance(token)            # the token that was sampled (must be allowed)
    c.is_stopped                # nothing but an end-of-generation token may follow

Grammar kinds (Constraint.compile's ``kind``):

* ``"json_schema"``: a JSON Schema (draft 2020-12 as llguidance implements it: objects,
  arrays with min/maxItems, enum/const, anyOf/oneOf/allOf, $ref/$defs, string
  pattern/format/min/maxLength, number bounds, additionalProperties). Output is
  compact JSON (", " and ": " separators, no newlines), which small models keep to.
* ``"json_object"``: any JSON object (OpenAI's JSON mode).
* ``"regex"``: the whole output matches the regular expression (Rust regex syntax).
* ``"grammar"``: a Lark grammar as llguidance takes it (it has a ``start: ...`` rule;
  lexer rules in UPPER case, ``%json {...}`` for an embedded schema), else a llama.cpp
  GBNF grammar (``name ::= ...`` rules, root rule ``root``), converted by llguidance.

A schema or grammar the engine cannot handle raises ValueError naming the part.

The tokenizer bridge gives llguidance every id's raw bytes (byte-level BPE pieces as the
bytes they stand for), marks our special tokens as special (llguidance never lets a
grammar produce them as text) and the model's end-of-generation ids as its EOS set: a
finished grammar allows exactly those.
"""
from __future__ import annotations

import json
import threading
import weakref

import numpy as np

__all__ = ["Constraint", "compile_grammar", "lltokenizer"]

# Compact JSON: llguidance's default allows any whitespace, and a small model given that
# freedom can emit newlines until max_tokens.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_bridges: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_bridges_lock = threading.Lock()


def _llg():
    try:
        import llguidance
    except ImportError:
        raise ValueError("structured output (response_format, regex, grammar, tool_choice) needs "
                         "llguidance: pip install 'llamacpu[structured]'") from None
    return llguidance


class _Wrapper:
    """What llguidance.LLTokenizer reads from a tokenizer (its TokenizerWrapper protocol)."""

    is_tokenizer_wrapper = True

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id = tok.eos_id if tok.eos_id is not None else min(tok.eog_ids)
        self.bos_token_id = tok.bos_id
        self.tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        self.special_token_ids = [i for i in range(tok.vocab_size) if tok.is_special(i)]

    def __call__(self, s) -> list[int]:
        if isinstance(s, bytes):
            s = s.decode("utf-8", errors="replace")
        return self._tok.encode(s, special=False)


def lltokenizer(tok):
    """The llguidance LLTokenizer of a llamacpu Tokenizer (built once per tokenizer: ~1 s
    for Llama 3's 128k ids)."""
    with _bridges_lock:
        lt = _bridges.get(tok)
        if lt is None:
            llg = _llg()
            lt = llg.LLTokenizer(_Wrapper(tok), n_vocab=tok.vocab_size, eos_token=sorted(tok.eog_ids))
            _bridges[tok] = lt
        return lt


def compile_grammar(kind: str, spec, what: str | None = None) -> str:
    """llguidance's grammar text for `spec` of `kind` (see the module docstring); ValueError
    (prefixed with `what`, default the kind) when the engine cannot take it."""
    llg = _llg()
    what = what or kind
    try:
        if kind == "json_schema":
            if isinstance(spec, bool):
                spec = {} if spec else {"not": {}}
            if not isinstance(spec, dict):
                raise ValueError(f"a JSON schema must be an object, got {type(spec).__name__}")
            g = llg.LLMatcher.grammar_from_json_schema(json.dumps(spec), overrides=_JSON_OPTIONS)
        elif kind == "json_object":
            g = llg.LLMatcher.grammar_from_json_schema(json.dumps({"type": "object"}), overrides=_JSON_OPTIONS)
        elif kind == "regex":
            if not isinstance(spec, str):
                raise ValueError(f"a regex must be a string, got {type(spec).__name__}")
            g = llg.LLMatcher.grammar_from_regex(spec)
        elif kind == "grammar":
            if not isinstance(spec, str) or not spec.strip():
                raise ValueError("a grammar must be a non-empty string (Lark or GBNF)")
            from llguidance.gbnf_to_lark import any_to_lark
            g = llg.LLMatcher.grammar_from_lark(any_to_lark(spec))
        else:
            raise ValueError(f"unknown grammar kind {kind!r}")
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    except Exception as e:  # noqa: BLE001 - llguidance raises its own types for bad input
        raise ValueError(f"{what}: {e}") from None
    err = llg.LLMatcher.validate_grammar(g)
    if err and not err.startswith("WARNING"):
        raise ValueError(f"{what}: {err}")
    return g


class Constraint:
    """One sequence's constraint: an llguidance matcher over a tokenizer's ids. Not
    thread safe; mask() may run on another thread than the one that advances, never at
    the same time."""

    def __init__(self, grammar: str, tokenizer, what: str = "grammar"):
        llg = _llg()
        self.grammar, self.tokenizer, self.what = grammar, tokenizer, what
        self._m = llg.LLMatcher(lltokenizer(tokenizer), grammar, log_level=0)
        if self._m.is_error():
            raise ValueError(f"{what}: {self._m.get_error()}")
        self._n = tokenizer.vocab_size

    @classmethod
    def compile(cls, kind: str, spec, tokenizer, what: str | None = None) -> "Constraint":
        return cls(compile_grammar(kind, spec, what), tokenizer, what or kind)

    def fresh(self) -> "Constraint":
        """A new constraint of the same grammar, at its start."""
        return Constraint(self.grammar, self.tokenizer, self.what)

    def bitmask(self) -> np.ndarray:
        """The allowed ids as llguidance's bitmask: uint32 words, bit i%32 of word i//32."""
        return np.frombuffer(self._m.compute_bitmask(), dtype=np.uint32)

    def mask(self) -> np.ndarray:
        """Bool array of the tokenizer's vocabulary size: which ids may come next."""
        bits = np.unpackbits(self.bitmask().view(np.uint8), bitorder="little")
        return bits[:self._n].astype(bool)

    def advance(self, token: int) -> None:
        """Take a sampled token; ValueError if the grammar does not allow it."""
        if not self._m.consume_token(int(token)):
            raise ValueError(f"{self.what}: token {int(token)} is not allowed here ({self._m.get_error()})")

    @property
    def is_stopped(self) -> bool:
        """Only an end-of-generation token may follow."""
        return self._m.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """The output so far is complete (an end-of-generation token is allowed)."""
        return self._m.is_accepting()


def apply_mask(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """A copy of `logits` with the ids `allowed` does not cover (ids past its end too) at
    -inf."""
    x = np.array(logits, dtype=np.float32, copy=True)
    n = min(allowed.size, x.size)
    x[:n][~allowed[:n]] = -np.inf
    x[n:] = -np.inf
    return x
