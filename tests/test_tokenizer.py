"""llamacpu.tokenizer against transformers, on the real Llama 3.2 and SmolLM2 tokenizers.

transformers is a test-only dependency (tokenizes without torch). The Llama 3.2
tokenizer comes from a converted tiny checkpoint's metadata (and from the asset
json, which still holds `<|image|>` 128256); the SmolLM2 one is rebuilt from its
GGUF by the converter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamacpu.tokenizer import StreamDecoder, Tokenizer
from llamacpu.format import tokenizer_dict  # noqa: E402

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).resolve().parent / "data"
CORPUS_TEXT = (DATA / "multilingual.txt").read_text(encoding="utf-8")
# every section (English, German, ..., code, emoji, special tokens) and every line
SECTIONS = [s for s in CORPUS_TEXT.split("\n\n#") if s.strip()]
EXTRA = [
    "", " ", "  ", "\n", "\r\n", "a\r\nb\r\n\r\n", "\t", "Hello", " Hello", "Hello ",
    "line1\r\nline2\rline3\n", "12345678901234567890", "3.14159e-10", "\u00a0nbsp\u200bzwsp",
    "<|eot_id|>", "<|eot_id|><|eot_id|>", " <|eot_id|> ", "<|eot_id", "eot_id|>",
    "<|begin_of_text|>", "text<|start_header_id|>user<|end_header_id|>\n\nhi",
    "<|im_start|>system\nx<|im_end|>", "<|reserved_special_token_5|>",
    "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466", "\U0001F1FA\U0001F1F8\U0001F1E9\U0001F1EA",
    "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F",
    "\ufffd", "\x00\x01\x7f", "\U0010FFFF", "a" * 500, " " * 50 + "x",
]
TEXTS = [CORPUS_TEXT] + SECTIONS + CORPUS_TEXT.splitlines() + EXTRA

LLAMA_EOG = {128001, 128008, 128009}
SMOL_MISSING_BYTES = (0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100))
# text SmolLM2 can encode: no control character without a byte token, no plane >= 4
SMOL_SAFE_TEXT = st.characters(codec="utf-8", exclude_characters="\x04\x06\x13\x14\x16\x1d",
                               max_codepoint=0x3FFFF)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def llama(llama_meta):
    return Tokenizer.from_metadata(llama_meta)


@pytest.fixture(scope="module")
def llama_asset(assets):
    return Tokenizer(assets["llama3.2-tokenizer.json"], vocab_size=128256)


@pytest.fixture(scope="module")
def smol(smol_meta):
    return Tokenizer.from_metadata(smol_meta)


@pytest.fixture(scope="module")
def hf_smol(smol_meta, tmp_path_factory):
    path = tmp_path_factory.mktemp("smol-hf") / "tokenizer.json"
    path.write_text(json.dumps(tokenizer_dict(smol_meta)), encoding="utf-8")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))


@pytest.fixture(params=["llama", "smol"])
def pair(request):
    """(our tokenizer, transformers' tokenizer) for both models."""
    if request.param == "llama":
        return request.getfixturevalue("llama"), request.getfixturevalue("hf_llama")
    return request.getfixturevalue("smol"), request.getfixturevalue("hf_smol")


def hf_encode(hf, text, special):
    if special:
        return hf.encode(text, add_special_tokens=False)
    return hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def hf_decode(hf, ids, skip):
    return hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------- against transformers

def test_corpus_covers_languages_and_specials():
    for marker in ("# English", "# German", "# French", "# Italian", "# Portuguese", "# Hindi",
                   "# Spanish", "# Thai", "# Code", "# Emoji", "# Special tokens inline"):
        assert marker in CORPUS_TEXT
    assert "\u200d" in CORPUS_TEXT and "\U0001F1FA\U0001F1F8" in CORPUS_TEXT  # ZWJ sequence, flag


@pytest.mark.parametrize("special", [True, False], ids=["special", "plain"])
def test_encode_matches_transformers(pair, special):
    ours, hf = pair
    for text in TEXTS:
        assert ours.encode(text, special=special) == hf_encode(hf, text, special), text


def test_special_tokens_parsed_inline(llama, smol):
    ids = llama.encode("Hi<|eot_id|>there<|start_header_id|>")
    assert 128009 in ids and 128006 in ids
    assert not {128009, 128006} & set(llama.encode("Hi<|eot_id|>there<|start_header_id|>", special=False))
    assert 2 in smol.encode("x<|im_end|>y")
    assert 2 not in smol.encode("x<|im_end|>y", special=False)
    # special=False never yields a special id, whatever the text
    for text in TEXTS:
        assert not any(llama.is_special(i) for i in llama.encode(text, special=False))
        assert not any(smol.is_special(i) for i in smol.encode(text, special=False))


def test_decode_matches_transformers_on_corpus(pair):
    ours, hf = pair
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, special=special)
            assert ours.decode(ids) == text  # byte-level BPE is lossless
            for skip in (False, True):
                assert ours.decode(ids, skip_special=skip) == hf_decode(hf, ids, skip)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_decode_matches_transformers_on_random_ids(llama, hf_llama, data):
    # random ids, heavy in single-byte tokens so that invalid/incomplete UTF-8 is common
    ids = data.draw(st.lists(st.one_of(st.sampled_from(_single_byte_ids(llama)),
                                       st.integers(0, llama.vocab_size - 1)), max_size=30))
    skip = data.draw(st.booleans())
    assert llama.decode(ids, skip_special=skip) == hf_decode(hf_llama, ids, skip)


def test_llama_from_metadata_equals_asset(llama, llama_asset):
    assert llama.vocab_size == llama_asset.vocab_size == 128256
    for text in SECTIONS:
        assert llama.encode(text) == llama_asset.encode(text)


# ----------------------------------------------------------------------------- special ids, BOS

def test_special_ids(llama, smol, llama_asset):
    assert llama.bos_id == 128000 and llama.eos_id == 128001 and llama.add_bos
    assert llama.eog_ids == frozenset(LLAMA_EOG)
    assert llama.bos_token == "<|begin_of_text|>" and llama.eos_token == "<|end_of_text|>"
    assert llama.is_special(128009) and llama.is_special(128000) and not llama.is_special(9906)
    assert not llama.is_special(10**9) and not llama.is_special(-1)
    assert llama.token_to_id("<|eot_id|>") == 128009 and llama.id_to_token(9906) == "Hello"
    # without special_tokens: inferred from the post-processor and the well-known texts
    assert llama_asset.bos_id == 128000 and llama_asset.add_bos
    assert llama_asset.eog_ids == frozenset(LLAMA_EOG)
    # SmolLM2: BOS <|im_start|> is not added to prompts; EOS <|im_end|>
    assert (smol.bos_id, smol.eos_id, smol.add_bos) == (1, 2, False)
    assert smol.eog_ids == frozenset({0, 2})
    assert smol.vocab_size == 49152


def test_add_bos(llama, smol, hf_llama):
    assert llama.encode("Hello", add_bos=True) == hf_llama.encode("Hello")  # post-processor adds BOS
    assert llama.encode("", add_bos=True) == [128000]
    # the text already starts with BOS: never doubled
    assert llama.encode("<|begin_of_text|>Hello", add_bos=True) == [128000, 9906]
    assert llama.encode("<|begin_of_text|>", add_bos=True) == [128000]
    # ... unless it is plain text
    plain = llama.encode("<|begin_of_text|>Hello", special=False, add_bos=True)
    assert plain[0] == 128000 and plain[1] != 128000 and llama.decode(plain) == "<|begin_of_text|>" * 2 + "Hello"
    assert llama.encode(" <|begin_of_text|>", add_bos=True)[:2] == [128000, 220]
    assert smol.encode("hi", add_bos=True)[0] == 1


def test_ids_beyond_vocab_refused(llama_asset, llama):
    # the asset json still has <|image|> = 128256, one past the embedding
    with pytest.raises(ValueError, match=r"<\|image\|>.*128256"):
        llama_asset.encode("look: <|image|>")
    assert 128256 not in llama_asset.encode("look: <|image|>", special=False)
    # the converter dropped it from the metadata: plain text there
    assert max(llama.encode("look: <|image|>")) < 128256


def test_decode_out_of_range(llama, smol):
    for bad in (128256, 10**12, -1):
        with pytest.raises(ValueError, match="out of range"):
            llama.decode([9906, bad])
        with pytest.raises(ValueError, match="out of range"):
            llama.stream_decoder().push(bad)
        with pytest.raises(ValueError, match="out of range"):
            llama.token_bytes(bad)
    with pytest.raises(ValueError, match="out of range"):
        smol.decode([49152])
    with pytest.raises(TypeError):
        llama.decode(["a"])
    with pytest.raises(TypeError):
        llama.decode([True])


def test_token_bytes(llama, smol):
    assert llama.token_bytes(9906) == b"Hello"
    assert llama.token_bytes(1917) == b" world"
    assert llama.token_bytes(198) == b"\n"
    assert llama.token_bytes(128009) == b"<|eot_id|>"
    assert smol.token_bytes(2) == b"<|im_end|>"
    # Llama 3.2's 256 single-byte tokens stand for every byte value exactly once
    singles = [llama.token_bytes(i) for i in _single_byte_ids(llama)]
    assert len(singles) == 256 and set(singles) == {bytes([b]) for b in range(256)}
    # SmolLM2's vocabulary lacks 21 byte values (6 control characters, bytes that
    # never occur in UTF-8, lead bytes of unassigned planes)
    singles = {smol.token_bytes(i) for i in _single_byte_ids(smol)}
    assert {bytes([b]) for b in range(256)} - singles == {bytes([b]) for b in SMOL_MISSING_BYTES}
    # numpy integers are ids too
    np = pytest.importorskip("numpy")
    assert llama.decode(np.array([9906, 1917])) == "Hello world"


# ----------------------------------------------------------------------------- streaming

_SINGLES: dict[int, list[int]] = {}


def _single_byte_ids(tok) -> list[int]:
    key = id(tok)
    if key not in _SINGLES:
        tab = tok._table()
        _SINGLES[key] = [i for i in range(tok.vocab_size) if len(tab[i]) == 1 and not tok.is_special(i)]
    return _SINGLES[key]


def _stream(dec: StreamDecoder, ids) -> str:
    out = [dec.push(i) for i in ids]
    for piece in out:
        piece.encode("utf-8")  # every piece is complete text (no lone surrogates)
    return "".join(out) + dec.flush()


@pytest.fixture(params=["llama", "smol"])
def tok(request):
    return request.getfixturevalue(request.param)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stream_random_ids(tok, data):
    ids = data.draw(st.lists(st.one_of(st.sampled_from(_single_byte_ids(tok)),
                                       st.integers(0, tok.vocab_size - 1)), max_size=40))
    for skip in (False, True):
        dec = tok.stream_decoder(skip_special=skip)
        assert _stream(dec, ids) == tok.decode(ids, skip_special=skip)
        # the decoder is reusable after flush
        assert _stream(dec, ids[::-1]) == tok.decode(ids[::-1], skip_special=skip)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(SMOL_SAFE_TEXT, max_size=60), special=st.booleans())
def test_stream_encoded_text(tok, text, special):
    ids = tok.encode(text, special=special)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == tok.decode(ids) == text
    # nothing is held back longer than needed: once a character is complete it is out
    if not special:
        assert "".join(pieces) == text


def test_bytes_without_a_token_are_dropped_as_transformers_does(smol, hf_smol):
    # SmolLM2 has no token for byte 0x04: tokenizers' BPE (no unk token) drops it
    for text, expect in (("a\x04b", "ab"), ("\x06", ""), ("\U00050000x", "\ufffd" * 3 + "x")):
        ids = smol.encode(text)
        assert ids == hf_encode(hf_smol, text, True)
        assert smol.decode(ids) == expect  # (U+50000 is f1 90 80 80: f1 is lost)


def test_lone_surrogate_refused(llama):
    with pytest.raises(ValueError, match="not valid Unicode"):
        llama.encode("ab\ud800")


def test_stream_holds_split_character(llama):
    # U+20AC (euro sign) is e2 82 ac: push its bytes as three single-byte tokens
    by_byte = {llama.token_bytes(i)[0]: i for i in _single_byte_ids(llama)}
    dec = llama.stream_decoder()
    assert dec.push(by_byte[0xE2]) == ""
    assert dec.pending == b"\xe2"
    assert dec.push(by_byte[0x82]) == ""
    assert dec.push(by_byte[0xAC]) == "\u20ac"
    assert dec.pending == b""
    # an invalid continuation is replaced as soon as it is known, like decode does
    assert dec.push(by_byte[0xE2]) == ""
    assert dec.push(by_byte[0x41]) == "\ufffdA"
    # an incomplete tail at the end becomes U+FFFD
    assert dec.push(by_byte[0xF0]) == "" and dec.push(by_byte[0x9F]) == ""
    assert dec.flush() == "\ufffd"
    assert llama.decode([by_byte[0xF0], by_byte[0x9F]]) == "\ufffd"
    # a special token between two halves: skipped when skip_special
    ids = [by_byte[0xE2], 128009, by_byte[0x82], by_byte[0xAC]]
    assert _stream(llama.stream_decoder(skip_special=True), ids) == "\u20ac" == llama.decode(ids, True)
    assert _stream(llama.stream_decoder(), ids) == llama.decode(ids) == "\ufffd<|eot_id|>\ufffd\ufffd"


def test_stream_emoji_tokens(llama):
    text = "Family: \U0001F468\u200d\U0001F469\u200d\U0001F467 flag \U0001F1EB\U0001F1F7 \u0e20\u0e32\u0e29\u0e32"
    ids = llama.encode(text)
    dec = llama.stream_decoder()
    out, held = [], 0
    for i in ids:
        piece = dec.push(i)
        held += piece == ""
        out.append(piece)
        assert len(dec.pending) <= 3
    assert held > 0  # some emoji are split across tokens
    assert "".join(out) + dec.flush() == text


def test_stream_is_linear(llama):
    # push costs O(len(token)), not O(sequence): a long stream stays fast
    import time
    ids = llama.encode(CORPUS_TEXT, special=False) * 20
    dec = llama.stream_decoder()
    t = time.perf_counter()
    text = "".join(dec.push(i) for i in ids) + dec.flush()
    elapsed = time.perf_counter() - t
    assert text == CORPUS_TEXT * 20
    assert elapsed < 2.0, f"{len(ids)} pushes took {elapsed:.2f} s"


@pytest.mark.slow
def test_constructor_inputs(smol_meta, tmp_path):
    # (SmolLM2's tokenizer.json: a third the size of Llama's, quicker to build)
    text = json.dumps(tokenizer_dict(smol_meta))
    path = tmp_path / "tokenizer.json"
    path.write_text(text, encoding="utf-8")
    st_ids = smol_meta["special_tokens"]
    toks = [Tokenizer(text, st_ids), Tokenizer(path, st_ids), Tokenizer(str(path), st_ids)]
    assert all(t.encode("Hello world") == [19556, 905] for t in toks)
    # vocab_size defaults to one more than the largest id
    assert toks[0].vocab_size == 49152
    with pytest.raises(ValueError, match="byte-level"):
        tj = json.loads(text)
        tj["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always"}
        Tokenizer(tj)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Tokenizer(text, {"bos_token_id": 49152})
    no_bos = Tokenizer(text, {"bos_token_id": None})
    with pytest.raises(ValueError, match="no BOS"):
        no_bos.encode("x", add_bos=True)
    small = Tokenizer(text, {}, vocab_size=1000)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        small.encode("Hello world, this is a longer text")


def test_encode_thread_safe(llama):
    # special=False flips a flag of the shared tokenizers object: it must not leak
    from concurrent.futures import ThreadPoolExecutor
    text = "Hi<|eot_id|>there " * 20
    want = {True: llama.encode(text, special=True), False: llama.encode(text, special=False)}
    assert want[True] != want[False]

    def work(special):
        return all(llama.encode(text, special=special) == want[special] for _ in range(100))

    with ThreadPoolExecutor(4) as ex:
        assert all(ex.map(work, [True, False] * 4))


# ----------------------------------------------------------------------------- hostile tokenizers

def test_deeply_nested_tokenizer_is_a_model_format_error(smol_meta, tmp_path):
    """A tokenizer.json nested 200,000 levels inside a model file: ModelFormatError, not
    RecursionError."""
    from llamacpu import Llama
    from llamacpu.errors import ModelFormatError
    from test_format import META, write
    deep = '{"model": ' + "[" * 200_000 + "]" * 200_000 + "}"
    with pytest.raises(ModelFormatError, match="nested too deeply"):
        Tokenizer.from_metadata({**smol_meta, "tokenizer": deep})
    with pytest.raises(ModelFormatError, match="tokenizer: tokenizer.json is nested too deeply"):
        Llama(write(tmp_path / "deep.lcpu", meta={**META, "tokenizer": deep}), n_ctx=8)
    with pytest.raises(ValueError, match="nested too deeply"):
        Tokenizer(deep)


@pytest.mark.slow
def test_tokenizer_size_bounds(smol_meta):
    """More merges, vocabulary entries or characters than any real tokenizer has: refused
    before tokenizers builds it (3 million merges took 2.8 GB)."""
    from llamacpu import tokenizer as tok_mod
    from llamacpu.errors import ModelFormatError
    tj = tokenizer_dict(smol_meta)
    merges = {**tj, "model": {**tj["model"], "merges": [["a", "b"]] * (tok_mod.MAX_TOKENIZER_MERGES + 1)}}
    with pytest.raises(ModelFormatError, match="merges, more than the"):
        Tokenizer.from_metadata({**smol_meta, "tokenizer": json.dumps(merges)})
    vocab = {**tj, "model": {**tj["model"], "merges": [],
                             "vocab": {f"t{i}": i for i in range(tok_mod.MAX_TOKENIZER_TOKENS + 1)}}}
    with pytest.raises(ValueError, match="vocabulary entries, more than the"):
        Tokenizer(vocab)
    with pytest.raises(ValueError, match="characters, more than the"):
        Tokenizer('{"model": {}, "x": "' + " " * tok_mod.MAX_TOKENIZER_JSON_CHARS + '"}')
