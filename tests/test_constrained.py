"""constrained.py: the llguidance bridge over the real Llama 3.2 and SmolLM2 tokenizers, and
Constraint (masks, advancing, errors that name the bad part)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from llamacpu.constrained import Constraint, apply_mask, lltokenizer
from llamacpu.tokenizer import Tokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "tags", "n"],
          "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                              "maxItems": 2},
                         "n": {"type": "integer", "minimum": 0, "maximum": 9}}}


@pytest.fixture(scope="module", params=["llama3.2", "smollm2"])
def tok(request, assets):
    if request.param == "llama3.2":
        return Tokenizer(assets["llama3.2-tokenizer.json"])
    return Tokenizer.from_metadata(request.getfixturevalue("smol_meta"))


def _walk(c: Constraint, tok, text: str) -> None:
    """Feed text's tokens, checking each is allowed by the mask before it."""
    for i in tok.encode(text, special=False):
        m = c.mask()
        assert m.shape == (tok.vocab_size,)
        assert m[i], f"{tok.decode([i])!r} refused in {text!r}"
        c.advance(i)


def test_bridge_bytes_and_specials(tok):
    lt = lltokenizer(tok)
    assert lltokenizer(tok) is lt                       # built once per tokenizer
    assert lt.vocab_size == tok.vocab_size
    assert sorted(lt.eos_tokens) == sorted(tok.eog_ids)
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(0, tok.vocab_size, 400)]
    plain = [i for i in ids if not tok.is_special(i)]
    assert lt.decode_bytes(plain) == b"".join(tok.token_bytes(i) for i in plain)   # byte-level pieces as bytes
    for i in tok.eog_ids:
        assert lt.is_special_token(i)


def test_schema_text_is_allowed_then_only_eog(tok):
    c = Constraint.compile("json_schema", SCHEMA, tok)
    text = json.dumps({"name": "h\u00e9llo \U0001f600 \u4e2d", "tags": ["a", "b"], "n": 7}, ensure_ascii=False)
    _walk(c, tok, text)   # multi-byte characters split across byte-level tokens
    assert c.is_accepting
    assert set(np.flatnonzero(c.mask())) == set(tok.eog_ids)


def test_special_tokens_never_allowed_inside(tok):
    c = Constraint.compile("json_schema", SCHEMA, tok)
    _walk(c, tok, '{"name": "')
    m = c.mask()
    specials = [i for i in range(tok.vocab_size) if tok.is_special(i)]
    assert not m[specials].any()
    assert m.sum() > 1000        # inside a string: most text tokens


def test_refused_token_raises_and_constraint_holds(tok):
    c = Constraint.compile("json_schema", SCHEMA, tok)
    bad = tok.encode("hello", special=False)[0]
    assert not c.mask()[bad]
    with pytest.raises(ValueError, match="not allowed"):
        c.advance(bad)


def test_json_object_regex_and_grammars(tok):
    c = Constraint.compile("json_object", None, tok)
    _walk(c, tok, '{"x": [1, {"y": null}]}')
    assert c.is_accepting
    c = Constraint.compile("regex", r"[0-9]{3}-[a-z]+", tok)
    _walk(c, tok, "123-abc")
    assert c.is_accepting and not c.mask()[tok.encode("-", special=False)[0]]
    for g in ('start: "yes" | "no"', 'root ::= "yes" | "no"'):   # Lark, GBNF
        c = Constraint.compile("grammar", g, tok)
        texts = {tok.decode([int(i)]) for i in np.flatnonzero(c.mask())}
        assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts)
        _walk(c, tok, "no")
        assert c.is_stopped


def test_fresh_restarts(tok):
    c = Constraint.compile("regex", "[ab]+c", tok)
    _walk(c, tok, "abc")
    assert c.is_accepting
    d = c.fresh()
    assert not d.is_accepting and d.mask()[tok.encode("a", special=False)[0]]


@pytest.mark.parametrize("kind, spec, words", [
    ("json_schema", {"type": "object", "properties": {"a": {"type": "nope"}}}, "json_schema: Invalid type: nope"),
    ("json_schema", {"$ref": "#/$defs/missing"}, "/$defs/missing"),
    ("json_schema", {"type": "string", "pattern": "(a"}, "json_schema"),
    ("json_schema", [1], "must be an object"),
    ("regex", "a(", "regex"),
    ("grammar", "start: undefined_rule", "undefined_rule"),
    ("grammar", "", "non-empty"),
])
def test_errors_name_the_part(tok, kind, spec, words):
    with pytest.raises(ValueError, match=None) as e:
        Constraint.compile(kind, spec, tok)
    assert words in str(e.value)


def test_apply_mask():
    x = np.array([1.0, 5.0, 3.0, 2.0], dtype=np.float32)
    y = apply_mask(x, np.array([True, False, True]))
    assert list(y) == [1.0, -np.inf, 3.0, -np.inf]   # past the mask's end: refused too
    assert x[1] == 5.0                                # a copy
