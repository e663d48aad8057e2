"""A Hugging Face Llama folder -> a Plan (convert_source.py) for the writer in convert.py.

Reads config.json, tokenizer.json (+ tokenizer_config.json, generation_config.json,
special_tokens_map.json, chat_template.jinja) and the safetensors weights (one file or
shards with an index), parsed and validated by hand and mmapped read-only. The name map
is declarative; the HF -> adjacent-pair RoPE permutation of q_proj/k_proj sits right
beside it in `hf_rope_permute`.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from pathlib import Path

import numpy as np

from . import format as fmt
from .convert_source import (BF16, Plan, SourceTensor, checked_config, drop_pages, map_name,
                             ordered_tensors, tokenizer_within_vocab)
from .errors import ModelFormatError
from .format import F16, F32, ModelConfig

# ----------------------------------------------------------------------------- name map

# Hugging Face -> internal. Per-layer names are "model.layers.{N}.<key>.weight".
HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_LAYER_NAMES = {
    "input_layernorm": "attention_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}
# HF tensors that carry nothing we need (old checkpoints stored the RoPE table).
HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_HF_LAYER_RE = re.compile(r"model\.layers\.(0|[1-9][0-9]*)\.(.+)\.weight$")


def hf_rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF half-split RoPE row order -> adjacent pairs (Meta/GGUF order).

    Within each head, HF keeps the rotated pairs at rows (i, i + head_dim/2); we
    want them at (2i, 2i+1). w: [n_heads * head_dim, in] (or any whole number of
    heads' rows).
    """
    out, cols = w.shape
    head_dim = out // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(out, cols)


# ----------------------------------------------------------------------------- safetensors

class SafetensorsFile:
    """A .safetensors file, parsed and validated by hand, mmapped read-only."""

    DTYPES = {"F32": (F32, 4), "F16": (F16, 2), "BF16": (BF16, 2)}
    ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8,
                "F8_E4M3": 1, "F8_E5M2": 1}

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ModelFormatError(f"{path}: too short for a safetensors file")
            n = int.from_bytes(f.read(8), "little")
            if n < 2 or n > min(size - 8, 1 << 28):
                raise ModelFormatError(f"{path}: safetensors header length {n} is invalid "
                                       f"(file is {size} bytes)")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise ModelFormatError(f"{path}: safetensors header is not valid JSON: "
                                       f"{str(e)[:200]}") from None
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n \
                else None
        if not isinstance(header, dict):
            raise ModelFormatError(f"{path}: safetensors header is not a JSON object")
        base = 8 + n
        self.tensors = {}  # name -> (dtype, shape, abs begin, abs end)
        for name, e in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (b, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
                ok = (dtype in self.ITEMSIZE and all(isinstance(d, int) and d >= 0
                                                     for d in shape)
                      and isinstance(b, int) and isinstance(end, int) and 0 <= b <= end)
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok:
                raise ModelFormatError(f"{path}: malformed safetensors entry for {name!r}")
            if base + end > size:
                raise ModelFormatError(f"{path}: tensor {name!r} runs past the end of the file")
            if end - b != math.prod(shape) * self.ITEMSIZE[dtype]:
                raise ModelFormatError(f"{path}: tensor {name!r} has {end - b} bytes, "
                                       f"{dtype} {list(shape)} needs "
                                       f"{math.prod(shape) * self.ITEMSIZE[dtype]}")
            self.tensors[name] = (dtype, shape, base + b, base + end)

    def source(self, src_name: str, name: str) -> SourceTensor:
        dtype, shape, begin, end = self.tensors[src_name]
        if dtype not in self.DTYPES:
            raise ModelFormatError(f"{self.path}: tensor {src_name!r} is {dtype}; only BF16, "
                                   "F16 and F32 weights are supported")
        type, itemsize = self.DTYPES[dtype]
        rb = (shape[-1] if shape else 1) * itemsize
        mm = self.mm

        def raw(r0, r1):
            return np.frombuffer(mm, np.uint8, (r1 - r0) * rb, begin + r0 * rb)

        def release(r0, r1):
            drop_pages(mm, begin + r0 * rb, begin + r1 * rb)

        return SourceTensor(name, src_name, type, shape, raw, release, nbytes=end - begin)

    def close(self):
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass
            self.mm = None


# ----------------------------------------------------------------------------- plan

def _read_json(path: Path, required: bool = True):
    if not path.is_file():
        if required:
            raise ModelFormatError(f"{path.parent}: missing {path.name}")
        return None
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelFormatError(f"{path}: not valid JSON ({str(e)[:200]})") from None


def _token_id(tokenizer: dict, token):
    """Id of a token given as text (or {"content": text}), from a tokenizer.json object."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    for t in tokenizer.get("added_tokens") or []:
        if isinstance(t, dict) and t.get("content") == token and isinstance(t.get("id"), int):
            return t["id"]
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and isinstance(vocab.get(token), int):
        return vocab[token]
    return None


def _ids(v) -> list:
    if v is None:
        return []
    if isinstance(v, list):
        return [x for x in v if isinstance(x, int) and not isinstance(x, bool)]
    if isinstance(v, int) and not isinstance(v, bool):
        return [v]
    return []


def _normalize_rope_scaling(rs, where: str):
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ModelFormatError(f"{where}: rope_scaling must be an object or null")
    rope_type = rs.get("rope_type", rs.get("type"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise ModelFormatError(f"{where}: rope_scaling type {rope_type!r} is not supported "
                               "(only 'llama3')")
    try:
        out = {"rope_type": "llama3",
               "factor": float(rs["factor"]),
               "low_freq_factor": float(rs["low_freq_factor"]),
               "high_freq_factor": float(rs["high_freq_factor"]),
               "original_max_position_embeddings": int(rs["original_max_position_embeddings"])}
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFormatError(f"{where}: rope_scaling is incomplete or malformed ({e})") \
            from None
    fmt.validate_rope_scaling(out)
    return out


def _hf_config(c: dict, where: str) -> ModelConfig:
    if not isinstance(c, dict):
        raise ModelFormatError(f"{where}: config.json is not an object")
    if c.get("model_type") != "llama":
        raise ModelFormatError(f"{where}: model_type is {c.get('model_type')!r}; only Llama "
                               "('llama') checkpoints are supported")
    archs = c.get("architectures")
    if archs is not None and archs != ["LlamaForCausalLM"]:
        raise ModelFormatError(f"{where}: architectures {archs!r}; only LlamaForCausalLM is "
                               "supported")
    if c.get("hidden_act", "silu") != "silu":
        raise ModelFormatError(f"{where}: hidden_act {c.get('hidden_act')!r}, only 'silu'")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ModelFormatError(f"{where}: attention/MLP biases are not supported")
    try:
        heads = c["num_attention_heads"]
        hidden = c["hidden_size"]
        config = {
            "architecture": "llama",
            "vocab_size": c["vocab_size"],
            "hidden_size": hidden,
            "intermediate_size": c["intermediate_size"],
            "num_hidden_layers": c["num_hidden_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": c.get("num_key_value_heads") or heads,
            "head_dim": c.get("head_dim") or hidden // heads,
            "rms_norm_eps": float(c.get("rms_norm_eps", 1e-6)),
            "rope_theta": float(c.get("rope_theta", 10000.0)),
            "rope_scaling": _normalize_rope_scaling(c.get("rope_scaling"), where),
            "max_position_embeddings": c.get("max_position_embeddings", 2048),
            "tie_word_embeddings": c.get("tie_word_embeddings", False),
            "rope_pairing": "adjacent",
        }
    except KeyError as e:
        raise ModelFormatError(f"{where}: config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ModelFormatError(f"{where}: config.json has a malformed value ({e})") from None
    return checked_config(config, where)


def _adds_bos(tok: dict) -> bool:
    """Does the tokenizer.json post-processor put a special token before the text?"""
    pp = tok.get("post_processor")
    procs = pp.get("processors", []) if isinstance(pp, dict) and pp.get("type") == "Sequence" \
        else [pp]
    for p in procs:
        if isinstance(p, dict) and p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            return bool(single) and isinstance(single[0], dict) and "SpecialToken" in single[0]
    return False


_GENERATION_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p",
                    "repetition_penalty", "max_new_tokens", "max_length")


def plan_hf(src: Path) -> Plan:
    where = str(src)
    raw_cfg = _read_json(src / "config.json")
    config = _hf_config(raw_cfg, where)
    tok_path = src / "tokenizer.json"
    tokenizer = tokenizer_within_vocab(_read_json(tok_path), config.vocab_size, where)
    tok_cfg = _read_json(src / "tokenizer_config.json", required=False) or {}
    gen_cfg = _read_json(src / "generation_config.json", required=False) or {}
    st_map = _read_json(src / "special_tokens_map.json", required=False) or {}
    for d, name in ((tok_cfg, "tokenizer_config.json"), (gen_cfg, "generation_config.json"),
                    (st_map, "special_tokens_map.json")):
        if not isinstance(d, dict):
            raise ModelFormatError(f"{where}: {name} is not a JSON object")
    files = [src / "config.json", tok_path] + [
        src / n for n in ("tokenizer_config.json", "generation_config.json",
                          "special_tokens_map.json") if (src / n).is_file()]

    # chat template: tokenizer_config.json, or a chat_template.jinja beside it
    chat_template = tok_cfg.get("chat_template")
    if isinstance(chat_template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
        chat_template = named.get("default", next(iter(named.values()), None))
    if chat_template is None and (src / "chat_template.jinja").is_file():
        chat_template = (src / "chat_template.jinja").read_text(encoding="utf-8")
        files.append(src / "chat_template.jinja")
    if chat_template is not None and not isinstance(chat_template, str):
        raise ModelFormatError(f"{where}: chat_template is not a string")

    # special tokens
    vocab = config.vocab_size

    def tok_id(key):
        v = tok_cfg.get(key, st_map.get(key))
        return _token_id(tokenizer, v)

    bos = next(iter(_ids(gen_cfg.get("bos_token_id")) or _ids(raw_cfg.get("bos_token_id"))),
               None)
    if bos is None:
        bos = tok_id("bos_token")
    eos = tok_id("eos_token")
    eos_ids = _ids(gen_cfg.get("eos_token_id")) + _ids(raw_cfg.get("eos_token_id"))
    if eos is None and eos_ids:
        eos = eos_ids[0]
    pad = next(iter(_ids(gen_cfg.get("pad_token_id")) or _ids(raw_cfg.get("pad_token_id"))),
               None)
    if pad is None:
        pad = tok_id("pad_token")
    add_bos = tok_cfg.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _adds_bos(tokenizer)
    eog = sorted({i for i in eos_ids + ([eos] if eos is not None else []) if 0 <= i < vocab})
    special = {"bos_token_id": bos if bos is not None and 0 <= bos < vocab else None,
               "eos_token_id": eos if eos is not None and 0 <= eos < vocab else None,
               "eog_token_ids": eog,
               "pad_token_id": pad if pad is not None and 0 <= pad < vocab else None,
               "add_bos_token": add_bos}
    generation = {k: gen_cfg[k] for k in _GENERATION_KEYS
                  if k in gen_cfg and isinstance(gen_cfg[k], (int, float))}

    # weights
    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.is_file():
        weight_map = None
        shard_names = ["model.safetensors"]
    elif index.is_file():
        idx = _read_json(index)
        weight_map = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) and v and os.path.basename(v) == v and v not in (".", "..")
                for v in weight_map.values()):
            raise ModelFormatError(f"{index}: weight_map is missing or malformed")
        shard_names = sorted(set(weight_map.values()))
        files.append(index)
    else:
        bin_hint = " (PyTorch .bin checkpoints are not supported)" \
            if any(src.glob("*.bin")) else ""
        raise ModelFormatError(f"{where}: no model.safetensors or "
                               f"model.safetensors.index.json{bin_hint}")
    plan = Plan("hf", src, files, config, tokenizer, chat_template, generation, special, [])
    try:
        shards = {}
        for n in shard_names:
            p = src / n
            if not p.is_file():
                raise ModelFormatError(f"{where}: missing weight file {n}")
            shards[n] = SafetensorsFile(p)
            plan.closers.append(shards[n].close)
            files.append(p)
        located = {}  # src name -> shard
        for n, sf in shards.items():
            for t in sf.tensors:
                if weight_map is not None and weight_map.get(t) != n:
                    if t in weight_map:
                        continue  # the index says another shard holds it
                    raise ModelFormatError(f"{where}: tensor {t!r} in {n} is not in the index")
                if t in located:
                    raise ModelFormatError(f"{where}: tensor {t!r} is in two shards")
                located[t] = sf
        if weight_map is not None:
            for t, n in weight_map.items():
                if t not in located:
                    raise ModelFormatError(f"{where}: index puts {t!r} in {n}, which lacks it")

        head_dim = config.head_dim
        sources = {}
        for t, sf in located.items():
            name = map_name(t, HF_NAMES, HF_LAYER_NAMES, _HF_LAYER_RE,
                            config.num_hidden_layers)
            if name is None:
                if HF_IGNORED.match(t):
                    continue
                raise ModelFormatError(f"{where}: unexpected tensor {t!r} (not a Llama weight "
                                       "this converter knows)")
            if name == "output.weight" and config.tie_word_embeddings:
                continue  # tied: the head is the embedding
            s = sf.source(t, name)
            if name.endswith(("attention.wq.weight", "attention.wk.weight")):
                s.reorder = lambda x: hf_rope_permute(x, len(x) // head_dim)  # whole heads
                s.row_group = head_dim
            sources[name] = s
        plan.tensors = ordered_tensors(sources, config, where)
    except BaseException:
        plan.close()
        raise
    return plan
