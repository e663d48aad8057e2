"""A GGUF file of the llama architecture -> a Plan (convert_source.py) for the writer.

The config comes from the llama.* keys, the tokenizer is rebuilt from tokenizer.ggml.*
(gguf_tokenizer.py), and each tensor is read from the GGUF mmap (gguf.py) in its own
type: blocks of a type we support are carried over bit-exact by the writer unless a
--type asks for another.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from .convert_source import (BF16, Plan, SourceTensor, checked_config, drop_pages, map_name,
                             ordered_tensors, tokenizer_within_vocab)
from .errors import ModelFormatError
from .format import TYPE_NAMES, ModelConfig
from .gguf import GGML_TYPE_NAMES, GGUFFile
from .gguf_tokenizer import tokenizer_from_gguf

# ----------------------------------------------------------------------------- types

# The GGUF types a tensor may have: every type the engine has kernels for (format.TYPE_NAMES,
# the ids are GGUF's; their blocks are kept bit-exact), and BF16 (read as float).
_GGUF_SUPPORTED = {tid for tid in TYPE_NAMES if tid < 100} | {BF16}
SUPPORTED_NAMES = ", ".join(GGML_TYPE_NAMES[t] for t in sorted(_GGUF_SUPPORTED))


def _check_types(g, where: str) -> None:
    """Refuse a tensor type we cannot read, before anything else is parsed."""
    for t in g.tensors.values():
        if t.type not in _GGUF_SUPPORTED:
            raise ModelFormatError(
                f"{where}: tensor {t.name!r} has type {GGML_TYPE_NAMES.get(t.type, t.type)}, which "
                f"llamacpu cannot run; it runs GGUF files whose tensors are {SUPPORTED_NAMES} "
                "(Q4_K_M, Q5_K_M, Q6_K and Q8_0 files, for example)")

# ----------------------------------------------------------------------------- name map

# GGUF -> internal. Per-layer names are "blk.{N}.<key>.weight".
GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "rope_freqs.weight": "rope_freqs.weight",
}
GGUF_LAYER_NAMES = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}

_GGUF_LAYER_RE = re.compile(r"blk\.(0|[1-9][0-9]*)\.(.+)\.weight$")


def internal_name(gguf_name: str, n_layers: int):
    """Our name for a GGUF tensor name, or None when it is not in the map."""
    return map_name(gguf_name, GGUF_NAMES, GGUF_LAYER_NAMES, _GGUF_LAYER_RE, n_layers)


# ----------------------------------------------------------------------------- plan

def _gguf_config(g, where: str) -> ModelConfig:
    kv = g.kv
    arch = kv.get("general.architecture")
    if not isinstance(arch, str) or arch != "llama":  # (an array value would make != ambiguous)
        raise ModelFormatError(f"{where}: general.architecture is {arch!r}; only 'llama' GGUF "
                               "files are supported")

    def get(key, default=None, required=True):
        v = kv.get(f"llama.{key}", default)
        if v is None and required:
            raise ModelFormatError(f"{where}: GGUF key llama.{key} is missing")
        return v

    def as_int(v, key):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ModelFormatError(f"{where}: GGUF key llama.{key} must be an integer")
        return int(v)

    def as_float(v, key):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
            raise ModelFormatError(f"{where}: GGUF key llama.{key} must be a number")
        return float(str(np.float32(v))) if isinstance(v, float) else float(v)

    emb = g.tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise ModelFormatError(f"{where}: token_embd.weight is missing or not 2-D")
    vocab = emb.shape[0]
    if "llama.vocab_size" in kv and as_int(kv["llama.vocab_size"], "vocab_size") != vocab:
        raise ModelFormatError(f"{where}: llama.vocab_size {kv['llama.vocab_size']} differs "
                               f"from token_embd rows {vocab}")
    hidden = as_int(get("embedding_length"), "embedding_length")
    heads = as_int(get("attention.head_count"), "attention.head_count")
    kv_heads = as_int(get("attention.head_count_kv", heads), "attention.head_count_kv")
    if heads <= 0:
        raise ModelFormatError(f"{where}: llama.attention.head_count must be positive")
    head_dim = as_int(get("attention.key_length", hidden // heads), "attention.key_length")
    rot = get("rope.dimension_count", head_dim, required=False)
    if as_int(rot, "rope.dimension_count") != head_dim:
        raise ModelFormatError(f"{where}: partial rotary embeddings (rope.dimension_count "
                               f"{rot} != head_dim {head_dim}) are not supported")
    scaling = kv.get("llama.rope.scaling.type")
    if scaling is not None and (not isinstance(scaling, str) or scaling != "none"):
        raise ModelFormatError(f"{where}: llama.rope.scaling.type {scaling!r} is not supported")
    config = {
        "architecture": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": as_int(get("feed_forward_length"), "feed_forward_length"),
        "num_hidden_layers": as_int(get("block_count"), "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": as_float(get("attention.layer_norm_rms_epsilon"),
                                 "attention.layer_norm_rms_epsilon"),
        "rope_theta": as_float(get("rope.freq_base", 10000.0), "rope.freq_base"),
        "rope_scaling": None,
        "max_position_embeddings": as_int(get("context_length"), "context_length"),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "rope_pairing": "adjacent",
    }
    return checked_config(config, where)


def plan_gguf(src: Path) -> Plan:
    where = str(src)
    g = GGUFFile(src)
    plan = Plan("gguf", src, [src], None, {}, None, {}, {}, [], closers=[g.close])
    try:
        _check_types(g, where)
        config = _gguf_config(g, where)
        _check_tokenizer_kv_types(g.kv, where)
        tk = tokenizer_from_gguf(g.kv)
        try:
            tokenizer = json.loads(tk["tokenizer_json"])
        except (ValueError, RecursionError) as e:
            raise ModelFormatError(f"{where}: rebuilt tokenizer is not JSON ({e})") from None
        tokenizer = tokenizer_within_vocab(tokenizer, config.vocab_size, where)
        vocab = config.vocab_size

        def in_vocab(i):
            if isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < vocab:
                return int(i)
            return None

        pad = in_vocab(g.kv.get("tokenizer.ggml.padding_token_id"))
        plan.config = config
        plan.tokenizer = tokenizer
        ct = g.kv.get("tokenizer.chat_template")
        plan.chat_template = ct if isinstance(ct, str) else None
        plan.special_tokens = {
            "bos_token_id": in_vocab(tk.get("bos_token_id")),
            "eos_token_id": in_vocab(tk.get("eos_token_id")),
            "eog_token_ids": sorted({i for i in tk.get("eog_token_ids") or []
                                     if in_vocab(i) is not None}),
            "pad_token_id": pad,
            "add_bos_token": bool(tk.get("add_bos_token")),
        }
        plan.generation = _sampling_defaults(g.kv, where)

        sources = {}
        for t in g.tensors.values():
            name = internal_name(t.name, config.num_hidden_layers)
            if name is None:
                raise ModelFormatError(f"{where}: unexpected tensor {t.name!r}")
            sources[name] = _gguf_source(t, name, g.mmap)
        plan.tensors = ordered_tensors(sources, config, where)
    except BaseException:
        plan.close()
        raise
    return plan


# GGUF's recommended-sampling keys (llama.cpp's general.sampling.*) -> generation_config.json's
GGUF_SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
                      "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
                      "general.sampling.penalty_repeat": "repetition_penalty"}

# What a model's publisher recommends when its GGUF files carry no general.sampling.* keys, by
# general.basename. SmolLM2-Instruct's model card generates with temperature=0.2, top_p=0.9
# (at Llama 3.2's 0.6 the 135M model drifts: "La femme ... is the capital of France").
RECOMMENDED_SAMPLING = {"smollm2": {"temperature": 0.2, "top_p": 0.9}}


def _sampling_defaults(kv: dict, where: str) -> dict:
    """The file's sampling defaults as generation_config.json keys: its general.sampling.*
    values, else the publisher's recommendation for its family (RECOMMENDED_SAMPLING), else none
    (the Llama 3.2 defaults of SamplingParams apply)."""
    from .sampling import SamplingParams

    gen = {}
    for key, name in GGUF_SAMPLING_KEYS.items():
        v = kv.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ModelFormatError(f"{where}: {key} must be a number, got {v!r}")
        gen[name] = int(v) if name == "top_k" else float(v)
    base = kv.get("general.basename")
    if not gen and isinstance(base, str):
        gen = dict(RECOMMENDED_SAMPLING.get(base.lower(), {}))
    try:
        SamplingParams.from_generation_config(gen)
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"{where}: general.sampling.*: {e}") from None
    return gen


def _check_tokenizer_kv_types(kv: dict, where: str) -> None:
    """Types that tokenizer_from_gguf takes for granted (found by tools/fuzz_loader.py: an
    array for the model name made `!=` ambiguous; float token types with inf overflowed int())."""
    model = kv.get("tokenizer.ggml.model")
    if model is not None and not isinstance(model, str):
        raise ModelFormatError(f"{where}: tokenizer.ggml.model must be a string")
    types = kv.get("tokenizer.ggml.token_type")
    if types is not None and not (isinstance(types, np.ndarray) and types.dtype.kind in "iu"):
        raise ModelFormatError(f"{where}: tokenizer.ggml.token_type must be an array of integers")


def _gguf_source(t, name: str, mm) -> SourceTensor:
    """t: a GGUFTensor of the GGUF file mapped by mm."""
    type = t.type
    shape = tuple(t.shape)
    rb = t.nbytes // math.prod(shape[:-1])
    data = t.data

    def raw(r0, r1):
        return data[r0 * rb:r1 * rb]

    def release(r0, r1):
        drop_pages(mm, t.offset + r0 * rb, t.offset + r1 * rb)

    return SourceTensor(name, t.name, type, shape, raw, release, nbytes=t.nbytes)
