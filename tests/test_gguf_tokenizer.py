"""Tests of llamacpu.gguf_tokenizer (GGUF tokenizer keys -> tokenizers tokenizer.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from llamacpu.errors import ModelFormatError
from llamacpu.gguf import GGUFFile
from llamacpu.gguf_tokenizer import LLAMA3_SPLIT_REGEX, tokenizer_from_gguf


CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nand    runs of spaces",
    "Numbers: 12345, 3.14159, -42, 1e10, 2024-09-25, 0x1F, 1,000,000",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber Stra\u00dfe \u0153uvre \u00c5ngstr\u00f6m",
    "Emoji: \U0001F600\U0001F44D\U0001F3FD \U0001F468\u200d\U0001F469\u200d\U0001F467 \u2764\ufe0f",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01 \u3053\u3093\u306b\u3061\u306f \uc548\ub155\ud558\uc138\uc694",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 "
    "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd \u0928\u092e\u0938\u094d\u0924\u0947",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "I'm sure you've heard they'll say it's OK, isn't it? DON'T SHOUT, WE'RE HERE.",
    "URL: https://example.com/path?q=1&r=two#frag  email: a.b@c.de",
    "Math: \u2211_{i=1}^{n} x_i \u2264 \u221e, \u03b1\u00b2 + \u03b2\u00b2 = \u03b3\u00b2",
    "mixed\u00a0nbsp and zero\u200bwidth and \u00adsoft-hyphen",
    "",
    " ",
    "\n",
    "a",
    "!!!???...,,,;;;",
    "   \n   \n",
]


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable char -> byte."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_U2B = _bytes_to_unicode()
_B2U = {b: c for c, b in _U2B.items()}


def _token_text(tok: str) -> str | None:
    """The text a byte-level token stands for, None when its bytes are not valid UTF-8."""
    try:
        return bytes(_U2B[c] for c in tok).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return None


# --------------------------------------------------------------------------------------
# SmolLM2 (the real GGUF)

@pytest.fixture(scope="module")
def smol(assets):
    with GGUFFile(assets["SmolLM2-135M-Instruct.Q4_1.gguf"]) as g:
        kv = g.kv
    info = tokenizer_from_gguf(kv)
    return kv, info, Tokenizer.from_str(info["tokenizer_json"])


def test_smol_metadata(smol):
    kv, info, tok = smol
    assert tok.get_vocab_size() == 49152 == info["vocab_size"]
    assert info["bos_token_id"] == 1 and info["eos_token_id"] == 2
    # <|endoftext|> (0) is also an end of generation; <|im_end|> is the eos
    assert info["eog_token_ids"] == [0, 2]
    assert info["add_bos_token"] is False
    assert info["special_tokens"] == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                      "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
    assert info["pre_tokenizer"] == "smollm"
    tj = json.loads(info["tokenizer_json"])
    assert tj["post_processor"] is None
    assert [t["id"] for t in tj["added_tokens"]] == list(range(17))
    assert all(t["special"] for t in tj["added_tokens"])


def test_smol_special_tokens_inline(smol):
    _, _, tok = smol
    assert tok.encode("<|im_start|>").ids == [1]
    assert tok.encode("<|im_end|>").ids == [2]
    enc = tok.encode("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert enc.ids[0] == 1 and enc.ids.count(1) == 2 and enc.ids.count(2) == 1
    assert enc.tokens[:3] == ["<|im_start|>", "user", "\u010a"]
    assert tok.decode(enc.ids, skip_special_tokens=False) == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(enc.ids, skip_special_tokens=True) == "user\nHi there\nassistant\n"
    # no BOS is added by the tokenizer itself
    assert tok.encode("Hello").ids == tok.encode("Hello", add_special_tokens=True).ids
    assert 1 not in tok.encode("Hello").ids


def test_smol_round_trip(smol):
    _, _, tok = smol
    for s in CORPUS:
        assert tok.decode(tok.encode(s).ids, skip_special_tokens=False) == s, s


def test_smol_digits_split_individually(smol):
    _, _, tok = smol
    assert tok.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert tok.encode("x 2024!").tokens == ["x", "\u0120", "2", "0", "2", "4", "!"]
    vocab = json.loads(smol[1]["tokenizer_json"])["model"]["vocab"]
    # the vocabulary itself has no multi-digit tokens
    assert not [t for t in vocab if sum(ch.isdigit() for ch in t) > 1]


def test_smol_every_word_piece_encodes_to_itself(smol):
    """Independent check: each normal token whose bytes are valid UTF-8, encoded alone,
    gives back its own id (48822 of 49135 normal tokens; the other 313 are partial
    UTF-8 sequences, e.g. single bytes 0x80-0xFF, which no text can produce alone)."""
    kv, _, tok = smol
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    ids, texts, partial = [], [], 0
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty != 1:
            continue
        text = _token_text(t)
        if text is None:
            partial += 1
            continue
        ids.append(i)
        texts.append(text)
    assert len(ids) == 48822 and partial == 313
    encs = tok.encode_batch(texts)
    bad = [(i, texts[k], e.ids) for k, (i, e) in enumerate(zip(ids, encs)) if e.ids != [i]]
    assert bad == [], bad[:20]


# --------------------------------------------------------------------------------------
# Llama 3.2: GGUF keys as llama.cpp's converter writes them, made from the HF tokenizer.json

@pytest.fixture(scope="module")
def llama(assets):
    raw = assets["llama3.2-tokenizer.json"].read_text(encoding="utf-8")
    j = json.loads(raw)
    n = 128256  # the text models' vocabulary; the file's extra <|image|> (128256) is dropped
    tokens = [None] * n
    for t, i in j["model"]["vocab"].items():
        tokens[i] = t
    types = [1] * n
    for a in j["added_tokens"]:
        if a["id"] < n:
            tokens[a["id"]] = a["content"]
            types[a["id"]] = 3
        else:
            assert a["content"] == "<|image|>" and a["id"] == 128256
    assert None not in tokens
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    kv = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": np.array(types, np.int32),
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 128000,
        "tokenizer.ggml.eos_token_id": 128009,
    }
    info = tokenizer_from_gguf(kv)
    return j, Tokenizer.from_str(raw), kv, info, Tokenizer.from_str(info["tokenizer_json"])


@pytest.mark.slow
def test_llama_metadata(llama):
    j, ref, kv, info, tok = llama
    assert tok.get_vocab_size() == 128256
    assert info["eog_token_ids"] == [128001, 128008, 128009]
    assert info["add_bos_token"] is True  # llama.cpp's default for llama-bpe
    assert info["special_tokens"]["bos_token"] == "<|begin_of_text|>"
    assert info["special_tokens"]["eos_token"] == "<|eot_id|>"
    tj = json.loads(info["tokenizer_json"])
    # the pre-tokenizer is exactly the real file's (trim_offsets aside, which only moves offsets)
    assert tj["pre_tokenizer"]["pretokenizers"][0] == j["pre_tokenizer"]["pretokenizers"][0]
    assert tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == LLAMA3_SPLIT_REGEX
    assert tj["pre_tokenizer"]["pretokenizers"][1]["use_regex"] is False
    # like tiktoken and llama.cpp, a pre-token that is itself in the vocabulary is used as is
    assert tj["model"]["ignore_merges"] is True


@pytest.mark.slow
def test_llama_matches_reference_on_corpus(llama):
    _, ref, _, _, tok = llama
    text = ("<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    corpus = CORPUS + [text, "<|python_tag|>x<|eom_id|>"]
    for s in corpus:
        ours = tok.encode(s).ids
        assert ours == ref.encode(s, add_special_tokens=False).ids, s
        assert tok.decode(ours, skip_special_tokens=False) == s
    assert tok.encode("<|eot_id|>").ids == [128009]
    assert tok.encode("<|begin_of_text|>x").ids[0] == 128000


@pytest.mark.slow
def test_llama_every_token_encodes_to_itself(llama):
    """Every base token with valid UTF-8 text encodes alone to its own id with ours.

    The asset's tokenizer.json says ignore_merges=false: with it, 588 of these
    tokens (e.g. ' việc', ' Việt', 'ektedir') come out as 2-4 pieces, where
    tiktoken / llama.cpp (ignore_merges for llama-bpe) give the single token. With
    ignore_merges switched off, our rebuild gives exactly the reference's ids."""
    j, ref, kv, info, tok = llama
    tokens = kv["tokenizer.ggml.tokens"]
    ids, texts = [], []
    for i in range(128000):
        text = _token_text(tokens[i])
        if text is not None:
            ids.append(i)
            texts.append(text)
    ours = tok.encode_batch(texts)
    assert [(i, t) for i, t, e in zip(ids, texts, ours) if e.ids != [i]] == []
    theirs = ref.encode_batch(texts, add_special_tokens=False)
    differ = [k for k, (a, b) in enumerate(zip(ours, theirs)) if a.ids != b.ids]
    assert 0 < len(differ) < 1000
    tj = json.loads(info["tokenizer_json"])
    tj["model"]["ignore_merges"] = False
    tok_nim = Tokenizer.from_str(json.dumps(tj))
    sub = [texts[k] for k in differ] + texts[::50]
    same = ref.encode_batch(sub, add_special_tokens=False)
    assert [e.ids for e in tok_nim.encode_batch(sub)] == [e.ids for e in same]


# --------------------------------------------------------------------------------------
# synthetic tokenizers: pre-tokenizer choices, user-defined tokens, errors

def _tiny_kv(pre="gpt2", extra=(), merges=("h e", "l l", "he ll", "hell o", "\u0120 w")):
    tokens = [_B2U[b] for b in range(256)]
    for m in merges:
        a, b = m.split(" ")
        tokens.append(a + b)
    types = [1] * len(tokens)
    for text, ty in extra:
        tokens.append(text)
        types.append(ty)
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": np.array(types, np.int32),
          "tokenizer.ggml.merges": list(merges)}
    if pre is not None:
        kv["tokenizer.ggml.pre"] = pre
    return kv


@pytest.mark.parametrize("pre", [None, "gpt2", "default", "llama-bpe", "llama3", "llama-v3",
                                 "smollm"])
def test_tiny_pre_tokenizers_round_trip(pre):
    info = tokenizer_from_gguf(_tiny_kv(pre, merges=("h e", "l l", "he ll", "hell o", "\u0120 w",
                                                     "1 2")))
    tok = Tokenizer.from_str(info["tokenizer_json"])
    enc = tok.encode("hello world")
    assert enc.tokens[:2] == ["hello", "\u0120w"]
    for s in CORPUS:
        assert tok.decode(tok.encode(s).ids) == s
    digits = tok.encode("1234").tokens
    assert digits == (["1", "2", "3", "4"] if pre == "smollm" else ["12", "3", "4"])
    assert info["add_bos_token"] is (pre in ("llama-bpe", "llama3", "llama-v3"))
    assert info["bos_token_id"] is None and info["eog_token_ids"] == []


def test_tiny_pre_tokenizer_shapes():
    def pre_of(p):
        return json.loads(tokenizer_from_gguf(_tiny_kv(p))["tokenizer_json"])["pre_tokenizer"]

    assert pre_of("gpt2") == {"type": "ByteLevel", "add_prefix_space": False,
                              "trim_offsets": True, "use_regex": True}
    assert pre_of(None) == pre_of("gpt2") == pre_of("default")
    sm = pre_of("smollm")
    assert sm["type"] == "Sequence"
    assert sm["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}
    assert sm["pretokenizers"][1]["type"] == "ByteLevel" and sm["pretokenizers"][1]["use_regex"]
    ll = pre_of("llama-bpe")
    assert ll["pretokenizers"][0]["behavior"] == "Isolated"


def test_user_defined_and_control_tokens():
    kv = _tiny_kv(extra=[("<|custom|>", 4), ("[tool]", 4), ("<|eot_id|>", 3), ("</s>", 4),
                         ("<unused0>", 5)])
    kv["tokenizer.ggml.eos_token_id"] = 0
    kv["tokenizer.ggml.bos_token_id"] = 261
    kv["tokenizer.ggml.add_bos_token"] = False
    info = tokenizer_from_gguf(kv)
    n = len(kv["tokenizer.ggml.tokens"])
    added = {t["content"]: t for t in json.loads(info["tokenizer_json"])["added_tokens"]}
    assert set(added) == {"<|custom|>", "[tool]", "<|eot_id|>", "</s>"}
    assert added["<|custom|>"]["special"] is True   # user-defined, looks like <|...|>
    assert added["[tool]"]["special"] is False
    assert added["<|eot_id|>"]["special"] is True   # control
    assert added["</s>"]["special"] is False
    assert info["eog_token_ids"] == [0, n - 3, n - 2]
    assert info["add_bos_token"] is False
    assert info["special_tokens"]["bos_token"] == "<|custom|>"
    tok = Tokenizer.from_str(info["tokenizer_json"])
    enc = tok.encode("hello<|custom|>[tool]<|eot_id|> world")
    assert enc.ids[1:4] == [n - 5, n - 4, n - 3]
    assert tok.decode(enc.ids, skip_special_tokens=False) == "hello<|custom|>[tool]<|eot_id|> world"
    # the unused token stays an ordinary vocabulary entry
    assert tok.token_to_id("<unused0>") == n - 1


def test_eot_eom_ids():
    kv = _tiny_kv(extra=[("<a>", 3), ("<b>", 3)])
    n = len(kv["tokenizer.ggml.tokens"])
    kv["tokenizer.ggml.eot_token_id"] = n - 2
    kv["tokenizer.ggml.eom_token_id"] = n - 1
    info = tokenizer_from_gguf(kv)
    assert info["eog_token_ids"] == [n - 2, n - 1] and info["eos_token_id"] is None


@pytest.mark.parametrize("model", ["llama", "bert", "t5", "rwkv", ""])
def test_unsupported_models(model):
    kv = _tiny_kv()
    kv["tokenizer.ggml.model"] = model
    with pytest.raises(ModelFormatError, match="not supported yet"):
        tokenizer_from_gguf(kv)


def test_missing_tokenizer():
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.model"):
        tokenizer_from_gguf({})


@pytest.mark.parametrize("pre", ["qwen2", "deepseek-llm", "starcoder", "LLAMA-BPE"])
def test_unsupported_pre_tokenizer(pre):
    with pytest.raises(ModelFormatError, match=pre):
        tokenizer_from_gguf(_tiny_kv(pre))


def _expect_error(kv, match):
    with pytest.raises(ModelFormatError, match=match):
        tokenizer_from_gguf(kv)


def test_malformed_tokenizers():
    kv = _tiny_kv()
    kv["tokenizer.ggml.tokens"] = kv["tokenizer.ggml.tokens"] + ["he"]
    _expect_error(kv, "token_type")  # length mismatch
    kv["tokenizer.ggml.token_type"] = np.ones(len(kv["tokenizer.ggml.tokens"]), np.int32)
    _expect_error(kv, "duplicate token")
    kv = _tiny_kv()
    kv["tokenizer.ggml.merges"] = ["h e", "he x y"]  # splits as "he" + "x y": not in vocab
    _expect_error(kv, "merge 1")
    kv = _tiny_kv()
    kv["tokenizer.ggml.merges"] = kv["tokenizer.ggml.merges"] + ["q z"]  # result not in vocab
    _expect_error(kv, "not in the vocabulary")
    kv = _tiny_kv()
    kv["tokenizer.ggml.merges"] = kv["tokenizer.ggml.merges"] + ["nospace"]
    _expect_error(kv, "two tokens")
    kv = _tiny_kv()
    del kv["tokenizer.ggml.merges"]
    _expect_error(kv, "merges")
    kv = _tiny_kv()
    kv["tokenizer.ggml.eos_token_id"] = 10**6
    _expect_error(kv, "out of range")
    kv = _tiny_kv()
    kv["tokenizer.ggml.token_type"] = kv["tokenizer.ggml.token_type"].copy()
    kv["tokenizer.ggml.token_type"][3] = 9
    _expect_error(kv, "token type 9")
    kv = _tiny_kv()
    kv["tokenizer.ggml.tokens"] = []
    _expect_error(kv, "tokens")
    kv = _tiny_kv()
    kv["tokenizer.ggml.add_bos_token"] = "yes"
    _expect_error(kv, "add_bos_token")
    kv = _tiny_kv()
    kv["tokenizer.ggml.tokens"] = list(kv["tokenizer.ggml.tokens"])
    kv["tokenizer.ggml.tokens"][5] = ""
    _expect_error(kv, "empty")


def test_through_a_gguf_file(tmp_path):
    """Tokenizer keys written by gguf.GGUFWriter, read by our reader, rebuilt."""
    gguf = pytest.importorskip("gguf")
    kv = _tiny_kv("smollm", extra=[("<|im_end|>", 3)])
    p = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(p), arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(kv["tokenizer.ggml.tokens"])
    w.add_token_types(kv["tokenizer.ggml.token_type"].tolist())
    w.add_token_merges(kv["tokenizer.ggml.merges"])
    w.add_eos_token_id(len(kv["tokenizer.ggml.tokens"]) - 1)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(p) as g:
        info = tokenizer_from_gguf(g.kv)
    tok = Tokenizer.from_str(info["tokenizer_json"])
    assert tok.encode("hello<|im_end|>").tokens == ["hello", "<|im_end|>"]
    assert info["eog_token_ids"] == [len(kv["tokenizer.ggml.tokens"]) - 1]


def test_token_and_merge_counts_are_bounded():
    """A GGUF vocabulary or merge list larger than any real tokenizer's is refused before
    the tokenizer.json is built."""
    from llamacpu.tokenizer import MAX_TOKENIZER_MERGES, MAX_TOKENIZER_TOKENS
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
          "tokenizer.ggml.tokens": [f"t{i}" for i in range(MAX_TOKENIZER_TOKENS + 1)]}
    with pytest.raises(ModelFormatError, match="tokens, more than the"):
        tokenizer_from_gguf(kv)
    kv = {**kv, "tokenizer.ggml.tokens": ["a", "b", "ab"],
          "tokenizer.ggml.merges": ["a b"] * (MAX_TOKENIZER_MERGES + 1)}
    with pytest.raises(ModelFormatError, match="merges, more than the"):
        tokenizer_from_gguf(kv)
