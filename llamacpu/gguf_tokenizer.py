"""Rebuild a Hugging Face ``tokenizers`` tokenizer.json from GGUF ``tokenizer.ggml.*`` keys.

Only byte-level BPE (``tokenizer.ggml.model == "gpt2"``) is supported. The result
mirrors what llama.cpp does with the same keys:

* every GGUF token goes into the BPE vocabulary with its GGUF id (ids must be
  contiguous, so duplicate token strings are refused);
* control tokens (type 3) and user-defined tokens (type 4) also become
  ``added_tokens`` so they are matched inline in text (``special`` is True for
  control tokens and for user-defined tokens that look like ``<|...|>``);
* the pre-tokenizer follows ``tokenizer.ggml.pre``;
* no post-processor: BOS is never added here (``add_bos_token`` is reported for
  the caller, the chat layer adds BOS itself).
"""

from __future__ import annotations

import json
import operator

from .errors import ModelFormatError
from .tokenizer import MAX_TOKENIZER_MERGES, MAX_TOKENIZER_TOKENS

__all__ = ["tokenizer_from_gguf", "LLAMA3_SPLIT_REGEX"]

# GGUF token types
TOKEN_UNDEFINED, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL = 0, 1, 2, 3
TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 4, 5, 6

# The split regex of the real Llama 3 / 3.1 / 3.2 tokenizer.json (pre_tokenizer[0]).
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")
_SMOLLM_PRE = ("smollm",)
_GPT2_PRE = ("gpt2", "gpt-2", "default", "")

# token texts that end a generation when they exist as control / user tokens
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>",
    "<end_of_turn>", "</s>",
})

# GGUF key suffix -> name in special_tokens
_SPECIAL_ID_KEYS = (
    ("bos_token_id", "bos_token"),
    ("eos_token_id", "eos_token"),
    ("unknown_token_id", "unk_token"),
    ("padding_token_id", "pad_token"),
    ("seperator_token_id", "sep_token"),  # (sic) the GGUF key is spelled this way
    ("separator_token_id", "sep_token"),
    ("cls_token_id", "cls_token"),
    ("mask_token_id", "mask_token"),
    ("eot_token_id", "eot_token"),
    ("eom_token_id", "eom_token"),
)

_BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                       "use_regex": True}


def _pre_tokenizer(pre: str) -> tuple[dict, bool, bool]:
    """-> (pre_tokenizer json, ignore_merges, default add_bos)"""
    if pre in _LLAMA3_PRE:
        return ({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_REGEX},
                 "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": False},
            ],
        }, True, True)
    if pre in _SMOLLM_PRE:
        return ({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": True},
            ],
        }, False, False)
    if pre in _GPT2_PRE:
        return ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": True}, False, False)
    raise ModelFormatError(
        f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: "
        f"{', '.join(repr(p) for p in _LLAMA3_PRE + _SMOLLM_PRE + _GPT2_PRE[:3])}")


def _as_int(v, what: str) -> int:
    if isinstance(v, bool):
        raise ModelFormatError(f"{what} must be an integer, got a bool")
    try:
        return operator.index(v)
    except TypeError:
        raise ModelFormatError(f"{what} must be an integer, got {type(v).__name__}") from None


def _looks_special(text: str) -> bool:
    return len(text) > 4 and text.startswith("<|") and text.endswith("|>")


def tokenizer_from_gguf(kv: dict) -> dict:
    """Build a tokenizer.json from GGUF metadata (as read by llamacpu.gguf.GGUFFile).

    Returns a dict with:
      tokenizer_json: str, loadable by tokenizers.Tokenizer.from_str
      bos_token_id, eos_token_id: int or None
      eog_token_ids: sorted list of ids that end a generation
      add_bos_token: bool (tokenizer.ggml.add_bos_token, else llama.cpp's default)
      special_tokens: {"bos_token": text, "eos_token": text, ...} for the ids present
      vocab_size: int; pre_tokenizer: str (tokenizer.ggml.pre, "" if missing)
    Raises ModelFormatError for an unsupported or malformed tokenizer.
    """
    model = kv.get("tokenizer.ggml.model")
    if model is None:
        raise ModelFormatError("GGUF file has no tokenizer (tokenizer.ggml.model missing)")
    if model != "gpt2":
        raise ModelFormatError(f"tokenizer model {model!r} not supported yet "
                               f"(only 'gpt2', byte-level BPE)")
    pre = kv.get("tokenizer.ggml.pre", "")
    if not isinstance(pre, str):
        raise ModelFormatError("tokenizer.ggml.pre must be a string")
    pre_json, ignore_merges, default_add_bos = _pre_tokenizer(pre)

    tokens = kv.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelFormatError("tokenizer.ggml.tokens must be a non-empty array of strings")
    n = len(tokens)
    if n > MAX_TOKENIZER_TOKENS:
        raise ModelFormatError(f"tokenizer.ggml.tokens has {n:,} tokens, more than the "
                               f"{MAX_TOKENIZER_TOKENS:,} allowed")

    types = kv.get("tokenizer.ggml.token_type")
    if types is None:
        types = [TOKEN_NORMAL] * n
    else:
        try:
            types = [int(t) for t in types]
        except (TypeError, ValueError):
            raise ModelFormatError("tokenizer.ggml.token_type must be an array of integers") from None
        if len(types) != n:
            raise ModelFormatError(f"tokenizer.ggml.token_type has {len(types)} entries, "
                                   f"tokenizer.ggml.tokens has {n}")
        bad = next((i for i, t in enumerate(types) if not 0 <= t <= 6), None)
        if bad is not None:
            raise ModelFormatError(f"token {bad} ({tokens[bad]!r}) has unknown token type {types[bad]}")

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t == "":
            raise ModelFormatError(f"token {i} is an empty string")
        j = vocab.setdefault(t, i)
        if j != i:
            raise ModelFormatError(f"duplicate token string {t!r} at ids {j} and {i}")

    merges_in = kv.get("tokenizer.ggml.merges")
    if not isinstance(merges_in, list) or not all(isinstance(m, str) for m in merges_in):
        raise ModelFormatError("tokenizer.ggml.merges must be an array of strings "
                               "(required for a gpt2 tokenizer)")
    if len(merges_in) > MAX_TOKENIZER_MERGES:
        raise ModelFormatError(f"tokenizer.ggml.merges has {len(merges_in):,} merges, more than the "
                               f"{MAX_TOKENIZER_MERGES:,} allowed")
    merges = []
    for k, m in enumerate(merges_in):
        sp = m.find(" ", 1)  # like llama.cpp: the first space after the first character
        a, b = (m[:sp], m[sp + 1:]) if sp > 0 else (m, "")
        if not a or not b:
            raise ModelFormatError(f"merge {k} ({m!r}) is not two tokens separated by a space")
        for part in (a, b, a + b):
            if part not in vocab:
                raise ModelFormatError(f"merge {k} ({m!r}): {part!r} is not in the vocabulary")
        merges.append([a, b])

    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == TOKEN_CONTROL or ty == TOKEN_USER_DEFINED:
            added.append({
                "id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False,
                "special": ty == TOKEN_CONTROL or _looks_special(t),
            })

    special_ids: dict[str, int] = {}
    special_tokens: dict[str, str] = {}
    for suffix, name in _SPECIAL_ID_KEYS:
        key = "tokenizer.ggml." + suffix
        if key not in kv or name in special_ids:
            continue
        tid = _as_int(kv[key], key)
        if tid == -1 or tid == 0xFFFFFFFF:  # "none" as some converters write it
            continue
        if not 0 <= tid < n:
            raise ModelFormatError(f"{key} = {tid} is out of range (vocabulary of {n} tokens)")
        special_ids[name] = tid
        special_tokens[name] = tokens[tid]

    eog = set()
    for name in ("eos_token", "eot_token", "eom_token"):
        if name in special_ids:
            eog.add(special_ids[name])
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if (ty == TOKEN_CONTROL or ty == TOKEN_USER_DEFINED) and t in EOG_TEXTS:
            eog.add(i)

    add_bos = kv.get("tokenizer.ggml.add_bos_token", default_add_bos)
    if not isinstance(add_bos, bool):
        raise ModelFormatError("tokenizer.ggml.add_bos_token must be a bool")

    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_json,
        "post_processor": None,
        "decoder": _BYTE_LEVEL_DECODER,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merges,
        },
    }
    tokenizer_json = json.dumps(tj, ensure_ascii=False)
    _check_loads(tokenizer_json, n)
    return {
        "tokenizer_json": tokenizer_json,
        "bos_token_id": special_ids.get("bos_token"),
        "eos_token_id": special_ids.get("eos_token"),
        "eog_token_ids": sorted(eog),
        "add_bos_token": add_bos,
        "special_tokens": special_tokens,
        "vocab_size": n,
        "pre_tokenizer": pre,
    }


def _check_loads(tokenizer_json: str, n: int) -> None:
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        return
    try:
        tok = Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # tokenizers raises plain Exception
        raise ModelFormatError(f"GGUF tokenizer could not be rebuilt: {e}") from None
    if tok.get_vocab_size(with_added_tokens=True) != n:
        raise ModelFormatError(f"rebuilt tokenizer has {tok.get_vocab_size(with_added_tokens=True)} "
                               f"tokens, the GGUF file {n}")
