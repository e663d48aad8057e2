"""Convert a Hugging Face Llama folder or a GGUF file into a llamacpu model file.

    convert(src, out, type=None) -> Path

The converter streams: one tensor at a time, big matrices in row chunks, straight
into a temporary file beside OUT (.OUT.tmp-PID-XXXXXXXX) that is renamed over OUT
only when everything succeeded: an interrupted conversion never leaves a partial OUT
(Ctrl-C deletes the temporary file; one left by a killed process is deleted by the
next conversion to the same OUT). The type policy (which tensor gets which type)
and the reasons for it are in docs/FORMAT.md, "Type policy".

Name maps are declarative (below); the HF -> adjacent-pair RoPE permutation of
q_proj/k_proj sits right beside them in `hf_rope_permute`.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from . import format as fmt
from .errors import ModelFormatError
from .format import F16, F32, Q4_0, Q4_1, Q6_0, Q8_0, TYPE_NAMES

BF16 = 30  # GGUF's id; accepted only as an input type

TARGET_TYPES = {"f32": F32, "f16": F16, "q8_0": Q8_0, "q4_0": Q4_0, "q4_1": Q4_1}
#: choices for the output head's type (convert(head_type=...), --head-type)
HEAD_TYPES = {"f32": F32, "f16": F16, "q8_0": Q8_0, "q6_0": Q6_0}
DEFAULT_HF_TYPE = "q4_0"

# ----------------------------------------------------------------------------- name maps

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

_HF_LAYER_RE = re.compile(r"model\.layers\.(0|[1-9][0-9]*)\.(.+)\.weight$")
_GGUF_LAYER_RE = re.compile(r"blk\.(0|[1-9][0-9]*)\.(.+)\.weight$")


def _map_name(name: str, names: dict, layer_names: dict, layer_re, n_layers: int):
    """Internal name for a source name, or None when it is not in the map."""
    if name in names:
        return names[name]
    m = layer_re.match(name)
    if m and int(m.group(1)) < n_layers and m.group(2) in layer_names:
        return f"layers.{m.group(1)}.{layer_names[m.group(2)]}.weight"
    return None


def hf_rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF half-split RoPE row order -> adjacent pairs (Meta/GGUF order).

    Within each head, HF keeps the rotated pairs at rows (i, i + head_dim/2); we
    want them at (2i, 2i+1). w: [n_heads * head_dim, in] (or any whole number of
    heads' rows).
    """
    out, cols = w.shape
    head_dim = out // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(out, cols)


# ----------------------------------------------------------------------------- decoding

def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def dequantize_blocks(raw: np.ndarray, type: int, cols: int) -> np.ndarray:
    """GGUF/ggml blocks -> float32, in NumPy (mirrors ggml's dequantize_row_*).

    raw: uint8 [rows, row_bytes] -> float32 [rows, cols].
    """
    rows = raw.shape[0]
    nb = cols // 32
    if type == Q8_0:
        b = raw.reshape(rows, nb, 34)
        d = b[:, :, 0:2].copy().view(np.float16).astype(np.float32)  # [rows, nb, 1]
        q = b[:, :, 2:34].view(np.int8).astype(np.float32)
        return (q * d).reshape(rows, cols)
    if type in (Q4_0, Q4_1):
        bs = 18 if type == Q4_0 else 20
        b = raw.reshape(rows, nb, bs)
        d = b[:, :, 0:2].copy().view(np.float16).astype(np.float32)
        qs = b[:, :, bs - 16:bs]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)  # element j low, j + 16 high
        if type == Q4_0:
            x = (q.astype(np.float32) - np.float32(8)) * d
        else:
            m = b[:, :, 2:4].copy().view(np.float16).astype(np.float32)
            x = q.astype(np.float32) * d + m
        return x.reshape(rows, cols)
    raise ModelFormatError(f"cannot dequantize type {type}")


def _quantize(x: np.ndarray, type: int) -> np.ndarray:
    """float32 [rows, cols] -> uint8 [rows, row_bytes] with ggml's reference quantizer."""
    try:
        from . import _core
    except ImportError as e:  # pragma: no cover - depends on the build
        raise RuntimeError("quantizing needs the compiled core (llamacpu._core): "
                           "build it with `pip install -e .`") from e
    return _core.quantize(np.ascontiguousarray(x, dtype=np.float32), type)


def _encode(x: np.ndarray, type: int):
    """float32 rows -> the bytes of those rows in `type`."""
    if type == F32:
        return np.ascontiguousarray(x, dtype="<f4")
    if type == F16:
        return np.ascontiguousarray(x.astype("<f2"))
    return _quantize(x, type)


# ----------------------------------------------------------------------------- sources

def _drop_pages(mm: mmap.mmap, start: int, end: int) -> None:
    """Tell the kernel we are done with [start, end) of a read-only file mapping,
    so pages already read stop counting in our RSS (they stay in the page cache)."""
    if not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start -= start % mmap.PAGESIZE
    end = min(end, len(mm))
    if end > start:
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass


def _mmap_of(arr: np.ndarray):
    """The mmap.mmap an array views (walking .base), or None."""
    b = arr
    for _ in range(8):
        b = b.obj if isinstance(b, memoryview) else getattr(b, "base", None)
        if b is None:
            return None
        if isinstance(b, mmap.mmap):
            return b
    return None


@dataclass
class SourceTensor:
    """One tensor to read: where it lives and how to decode rows of it."""
    name: str  # internal name
    src_name: str
    type: int  # source type id (F32/F16/BF16/Q4_0/Q4_1/Q8_0)
    shape: tuple
    raw: Callable  # (r0, r1) -> uint8 array of the raw rows (a view)
    release: Callable  # (r0, r1) -> None, the rows are no longer needed
    permute_heads: int = 0  # > 0: apply hf_rope_permute with this many heads
    nbytes: int = 0

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def cols(self) -> int:
        return self.shape[-1]

    def f32_rows(self, r0: int, r1: int) -> np.ndarray:
        raw = self.raw(r0, r1)
        n = r1 - r0
        if self.type == F32:
            x = raw.view("<f4").reshape(n, self.cols).astype(np.float32)
        elif self.type == F16:
            x = raw.view("<f2").reshape(n, self.cols).astype(np.float32)
        elif self.type == BF16:
            x = bf16_to_f32(raw.view("<u2").reshape(n, self.cols))
        else:
            x = dequantize_blocks(raw.reshape(n, -1), self.type, self.cols)
        if self.permute_heads:
            x = hf_rope_permute(x, (r1 - r0) * self.permute_heads // self.rows)
        return x


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
            _drop_pages(mm, begin + r0 * rb, begin + r1 * rb)

        return SourceTensor(name, src_name, type, shape, raw, release, nbytes=end - begin)

    def close(self):
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass
            self.mm = None


# ----------------------------------------------------------------------------- plan

@dataclass
class Plan:
    """Everything known before the first byte is written."""
    source_format: str  # "hf" | "gguf"
    src: Path
    files: list  # source files read, in hashing order
    config: dict
    tokenizer: dict
    chat_template: object
    generation: dict
    special_tokens: dict
    tensors: list  # SourceTensor in output order
    closers: list = field(default_factory=list)

    def close(self):
        for c in self.closers:
            c()


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


def _checked_config(config: dict, where: str) -> dict:
    try:
        fmt.validate_config(config)
    except ModelFormatError as e:
        raise ModelFormatError(f"{where}: {e}") from None
    return config


def _hf_config(c: dict, where: str) -> dict:
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
    return _checked_config(config, where)


def _hf_tokenizer(tok: dict, vocab_size: int, where: str) -> dict:
    if not isinstance(tok, dict) or not isinstance(tok.get("model"), dict):
        raise ModelFormatError(f"{where}: tokenizer.json is not a tokenizer object")
    added = tok.get("added_tokens")
    if isinstance(added, list):
        # e.g. Llama 3.2's <|image|> (128256) has no row in the 128256-row embedding.
        tok = dict(tok)
        tok["added_tokens"] = [t for t in added
                               if not (isinstance(t, dict) and isinstance(t.get("id"), int)
                                       and t["id"] >= vocab_size)]
    return tok


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


def _plan_hf(src: Path) -> Plan:
    where = str(src)
    raw_cfg = _read_json(src / "config.json")
    config = _hf_config(raw_cfg, where)
    tok_path = src / "tokenizer.json"
    tokenizer = _hf_tokenizer(_read_json(tok_path), config["vocab_size"], where)
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
    vocab = config["vocab_size"]

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

        sources = {}
        for t, sf in located.items():
            name = _map_name(t, HF_NAMES, HF_LAYER_NAMES, _HF_LAYER_RE,
                             config["num_hidden_layers"])
            if name is None:
                if HF_IGNORED.match(t):
                    continue
                raise ModelFormatError(f"{where}: unexpected tensor {t!r} (not a Llama weight "
                                       "this converter knows)")
            if name == "output.weight" and config["tie_word_embeddings"]:
                continue  # tied: the head is the embedding
            s = sf.source(t, name)
            if name.endswith("attention.wq.weight"):
                s.permute_heads = config["num_attention_heads"]
            elif name.endswith("attention.wk.weight"):
                s.permute_heads = config["num_key_value_heads"]
            sources[name] = s
        plan.tensors = _order_and_check(sources, config, where)
    except BaseException:
        plan.close()
        raise
    return plan


def _order_and_check(sources: dict, config: dict, where: str) -> list:
    """Check the tensor set against the config; return the tensors in file order."""
    try:
        fmt.check_tensor_set(config, {n: (F32 if fmt.is_norm(n) or n == "rope_freqs.weight"
                                          else F16, s.shape) for n, s in sources.items()})
    except ModelFormatError as e:
        src_of = {n: s.src_name for n, s in sources.items()}
        msg = str(e)
        for n, s in src_of.items():
            msg = msg.replace(f"'{n}'", f"'{n}' ({s})")
        raise ModelFormatError(f"{where}: {msg}") from None
    order = list(fmt.expected_tensors(config)) + ["rope_freqs.weight"]
    return [sources[n] for n in order if n in sources]


# GGUF ---------------------------------------------------------------------------

_GGUF_SUPPORTED = {0: F32, 1: F16, 2: Q4_0, 3: Q4_1, 8: Q8_0, 30: BF16}
_K_QUANTS = {10, 11, 12, 13, 14, 15}  # Q2_K .. Q8_K


def _gguf_config(g, where: str) -> dict:
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
    return _checked_config(config, where)


def _plan_gguf(src: Path) -> Plan:
    from .gguf import GGML_TYPE_NAMES, GGUFFile
    from .gguf_tokenizer import tokenizer_from_gguf

    where = str(src)
    g = GGUFFile(src)
    plan = Plan("gguf", src, [src], {}, {}, None, {}, {}, [], closers=[g.close])
    try:
        # refuse unsupported tensor types before anything else
        for t in g.tensors.values():
            if t.type in _K_QUANTS:
                raise ModelFormatError(
                    f"{where}: tensor {t.name!r} is {GGML_TYPE_NAMES.get(t.type, t.type)}: "
                    "K-quant tensors are not supported yet; use a Q4_0/Q4_1/Q8_0/F16 GGUF")
            if t.type not in _GGUF_SUPPORTED:
                raise ModelFormatError(
                    f"{where}: tensor {t.name!r} has type "
                    f"{GGML_TYPE_NAMES.get(t.type, t.type)}, which is not supported; use a "
                    "Q4_0/Q4_1/Q8_0/F16 GGUF")
        config = _gguf_config(g, where)
        _check_tokenizer_kv_types(g.kv, where)
        tk = tokenizer_from_gguf(g.kv)
        try:
            tokenizer = json.loads(tk["tokenizer_json"])
        except (ValueError, RecursionError) as e:
            raise ModelFormatError(f"{where}: rebuilt tokenizer is not JSON ({e})") from None
        tokenizer = _hf_tokenizer(tokenizer, config["vocab_size"], where)
        vocab = config["vocab_size"]

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
        plan.generation = {}

        sources = {}
        for t in g.tensors.values():
            name = _map_name(t.name, GGUF_NAMES, GGUF_LAYER_NAMES, _GGUF_LAYER_RE,
                             config["num_hidden_layers"])
            if name is None:
                raise ModelFormatError(f"{where}: unexpected tensor {t.name!r}")
            sources[name] = _gguf_source(t, name)
        plan.tensors = _order_and_check(sources, config, where)
    except BaseException:
        plan.close()
        raise
    return plan


def _check_tokenizer_kv_types(kv: dict, where: str) -> None:
    """Types that tokenizer_from_gguf takes for granted (found by tools/fuzz_loader.py: an
    array for the model name made `!=` ambiguous; float token types with inf overflowed int())."""
    model = kv.get("tokenizer.ggml.model")
    if model is not None and not isinstance(model, str):
        raise ModelFormatError(f"{where}: tokenizer.ggml.model must be a string")
    types = kv.get("tokenizer.ggml.token_type")
    if types is not None and not (isinstance(types, np.ndarray) and types.dtype.kind in "iu"):
        raise ModelFormatError(f"{where}: tokenizer.ggml.token_type must be an array of integers")


def _gguf_source(t, name: str) -> SourceTensor:
    type = _GGUF_SUPPORTED[t.type]
    shape = tuple(t.shape)
    rows = math.prod(shape[:-1])
    rb = t.nbytes // rows
    data = t.data
    mm = _mmap_of(data)
    base_addr = None
    if mm is not None:
        base_addr = np.frombuffer(mm, np.uint8, 1).ctypes.data

    def raw(r0, r1):
        return data[r0 * rb:r1 * rb]

    def release(r0, r1):
        if mm is not None:
            start = data.ctypes.data - base_addr
            _drop_pages(mm, start + r0 * rb, start + r1 * rb)

    return SourceTensor(name, t.name, type, shape, raw, release, nbytes=t.nbytes)


# ----------------------------------------------------------------------------- policy

def tensor_type(name: str, src_type: int, target: str | None, config: dict,
                source_format: str, cols: int = 0, rows: int = 0, head_type: str | None = None) -> int:
    """The output type of one tensor (docs/FORMAT.md, "Type policy")."""
    if fmt.is_norm(name) or name == "rope_freqs.weight":
        return F32
    head = name == fmt.output_head_name(config)
    if head and head_type is not None:
        t = HEAD_TYPES[head_type]
    elif target is None and source_format == "gguf":
        return F32 if src_type == BF16 else src_type  # carry blocks over untouched
    else:
        t = TARGET_TYPES[target or DEFAULT_HF_TYPE]
        if t in (Q4_0, Q4_1) and head:
            t = Q6_0  # the output head produces every logit: 6 bits, as llama.cpp's Q4 files
    if t == Q6_0 and rows % 8:
        t = Q8_0  # Q6_0 exists in the x8 layout only (rows % 8 == 0: every real vocabulary)
    if t in fmt.QUANTIZED_TYPES and cols % fmt.QK:
        t = F16  # blocks need cols % 32 == 0 (never the case for real Llama shapes)
    return t


# ----------------------------------------------------------------------------- progress

class _Progress:
    """Tensors done / bytes, rate, ETA on stderr; a bar only on a TTY."""

    def __init__(self, progress, quiet: bool, stream=None):
        self.stream = stream or sys.stderr
        self.callback = progress if callable(progress) else None
        self.bar = (progress is True and not quiet and hasattr(self.stream, "isatty")
                    and self.stream.isatty())
        self.quiet = quiet
        self._last = 0.0
        self.phase, self.total_n, self.total_b = "", 0, 0
        self.t0 = time.monotonic()

    def start(self, phase: str, total_n: int, total_b: int):
        self.phase, self.total_n, self.total_b = phase, total_n, total_b
        self.t0 = time.monotonic()
        self._last = 0.0
        self._finished = False
        self._width = 0
        self.update(0, 0)

    def update(self, done_n: int, done_b: int):
        if self.callback is not None:
            self.callback(self.phase, done_n, self.total_n, done_b, self.total_b)
        if not self.bar or self._finished:
            return
        now = time.monotonic()
        final = done_b >= self.total_b and done_n >= self.total_n
        if not final and now - self._last < 0.1:
            return
        self._last = now
        self._finished = final
        dt = max(now - self.t0, 1e-9)
        frac = done_b / self.total_b if self.total_b else 1.0
        rate = done_b / dt
        eta = (self.total_b - done_b) / rate if rate > 0 else 0.0
        width = 24
        fill = int(frac * width)
        count = f" {done_n}/{self.total_n} tensors" if self.total_n else ""
        line = (f"\r{self.phase:<10} [{'#' * fill}{'.' * (width - fill)}]{count} "
                f"{_fmt_bytes(done_b)}/{_fmt_bytes(self.total_b)} {_fmt_bytes(rate)}/s "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        pad = " " * max(0, self._width - len(line))  # erase what a longer line left
        self._width = len(line)
        self.stream.write(line + pad + ("\n" if final else ""))
        self.stream.flush()

    def message(self, text: str):
        if not self.quiet:
            self.stream.write(text + "\n")
            self.stream.flush()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ----------------------------------------------------------------------------- convert

CHUNK_ELEMENTS = 1 << 22  # rows per chunk ~ 4M elements: 16 MB of float32


def _hash_files(files: list, prog: _Progress) -> tuple[str, list]:
    """sha256 of each file, and of the manifest ("<sha256>  <name>\\n" per file)."""
    total = sum(p.stat().st_size for p in files)
    prog.start("hashing", 0, total)
    done = 0
    entries = []
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                h.update(view[:n])
                done += n
                prog.update(0, done)
        entries.append({"name": p.name, "size": p.stat().st_size, "sha256": h.hexdigest()})
    prog.update(0, total)
    if len(entries) == 1:
        return entries[0]["sha256"], entries
    manifest = "".join(f"{e['sha256']}  {e['name']}\n" for e in sorted(entries,
                                                                       key=lambda e: e["name"]))
    return hashlib.sha256(manifest.encode()).hexdigest(), entries


def _tensor_chunks(s: SourceTensor, out_type: int, on_rows: Callable, x8: bool = False):
    """Yield the output bytes of one tensor in row chunks (x8: repacked into 8-row
    block groups, a byte permutation, so raw GGUF blocks stay bit-exact)."""
    rows, cols = s.rows, s.cols
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    unit = 8 if x8 else 1
    if s.permute_heads:
        head_rows = rows // s.permute_heads
        unit = math.lcm(unit, head_rows)
    step = max(unit, step // unit * unit)
    copy_raw = out_type == s.type and not s.permute_heads
    rb = fmt.row_bytes(out_type, cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if copy_raw:
            data = s.raw(r0, r1)  # bit-exact: never requantize a block of the target type
        else:
            data = _encode(s.f32_rows(r0, r1), out_type)
        if x8:
            data = fmt.x8_pack(np.frombuffer(data, dtype=np.uint8).reshape(r1 - r0, rb), out_type)
        yield data
        s.release(r0, r1)
        on_rows(r0, r1)


def _resolve_out(src: Path, out: Path, plan_files, overwrite: bool) -> None:
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory; give the output file's path")
    real_out = out.resolve()
    for f in plan_files:
        if f.resolve() == real_out or (out.exists() and os.path.samefile(f, out)):
            raise ValueError(f"refusing to write {out}: it is the source file {f}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (use --force / overwrite=True to replace it)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")


def convert(src, out, type: str | None = None, progress=True, overwrite: bool = False,
            quiet: bool = False, head_type: str | None = None) -> Path:
    """Convert SRC (an HF Llama folder or a .gguf file) to a llamacpu model file OUT.

    type: None (HF: q4_0; GGUF: keep each tensor's type), "f32", "f16", "q8_0",
    "q4_0" or "q4_1" (with q4_0 / q4_1 the output head is q6_0). head_type: the
    output head's type instead ("q6_0", "q8_0", "f16", "f32"). progress: True (a bar on stderr when it is a TTY), False, or
    a callable(phase, done_tensors, total_tensors, done_bytes, total_bytes).
    quiet: print nothing at all (not even the final summary line).
    Returns the Path of OUT.
    """
    src, out = Path(src), Path(out)
    if type is not None:
        type = type.lower()
        if type not in TARGET_TYPES:
            raise ValueError(f"unknown type {type!r}; choose from {', '.join(TARGET_TYPES)}")
    if head_type is not None:
        head_type = head_type.lower()
        if head_type not in HEAD_TYPES:
            raise ValueError(f"unknown head type {head_type!r}; choose from {', '.join(HEAD_TYPES)}")
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    # refuse before parsing anything big when OUT is SRC itself
    if out.exists() and not src.is_dir() and os.path.samefile(src, out):
        raise ValueError(f"refusing to write {out}: it is the source file")

    t_start = time.monotonic()
    plan = _plan_hf(src) if src.is_dir() else _plan_gguf(src)
    try:
        _resolve_out(src, out, plan.files, overwrite)
        prog = _Progress(progress, quiet)
        sha, file_entries = _hash_files(plan.files, prog)
        out_types = {s.name: tensor_type(s.name, s.type, type, plan.config, plan.source_format,
                                         s.cols, s.rows, head_type)
                     for s in plan.tensors}
        meta = {
            "format_version": fmt.FORMAT_VERSION,
            "config": plan.config,
            # as text: JSON-parsing a 9 MB object costs 0.12 s at every load, a string 0.04 s
            "tokenizer": json.dumps(plan.tokenizer, ensure_ascii=False, separators=(",", ":")),
            "chat_template": plan.chat_template,
            "generation": plan.generation,
            "special_tokens": plan.special_tokens,
            "provenance": {
                "source_format": plan.source_format,
                "source": src.resolve().name,
                "source_sha256": sha,
                "files": file_entries,
                "converter": f"llamacpu {__version__}",
                "type": type or (DEFAULT_HF_TYPE if plan.source_format == "hf" else "source"),
                "tensor_types": {n: TYPE_NAMES[t] for n, t in out_types.items()},
            },
        }
        fmt.validate_meta(meta)
        _remove_stale_temps(out, prog)
        tmp = None
        try:
            # OUT appears only complete: written beside it, then renamed over it. Ctrl-C
            # (KeyboardInterrupt) deletes the temporary file; after SIGKILL it stays, named
            # .OUT.tmp-PID-XXXXXXXX, and the next conversion to OUT removes it.
            fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(out)}{os.getpid()}-", dir=out.parent)
            os.close(fd)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give OUT the usual mode
            _write(tmp, meta, plan, out_types, prog)
            os.replace(tmp, out)
        except BaseException:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            raise
    finally:
        plan.close()

    size = out.stat().st_size
    counts = {}
    for t in out_types.values():
        counts[TYPE_NAMES[t]] = counts.get(TYPE_NAMES[t], 0) + 1
    by_type = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    prog.message(f"converted {src} -> {out}: {len(out_types)} tensors ({by_type}), "
                 f"{_fmt_bytes(size)} in {time.monotonic() - t_start:.1f} s")
    return out


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def _remove_stale_temps(out: Path, prog: _Progress) -> None:
    """Delete the temporary files that killed conversions to OUT left behind: those whose
    process (the PID in the name) no longer exists. A live conversion's file is kept."""
    prefix = _temp_prefix(out)
    try:
        names = os.listdir(out.parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            os.unlink(out.parent / name)
            prog.message(f"removed {out.parent / name}, left by an interrupted conversion")
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process of its own: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it exists, someone else's
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write(path: str, meta: dict, plan: Plan, out_types: dict, prog: _Progress) -> None:
    total_b = sum(s.nbytes for s in plan.tensors)
    prog.start("converting", len(plan.tensors), total_b)
    done_b = 0
    with fmt.ModelWriter(path, meta, n_tensors=len(plan.tensors)) as w:
        for i, s in enumerate(plan.tensors):
            base = done_b
            row_b = s.nbytes // s.rows

            def on_rows(r0, r1, base=base, row_b=row_b, i=i):
                prog.update(i, base + r1 * row_b)

            t = out_types[s.name]
            x8 = fmt.x8_allowed(t, s.shape)  # every quantized matrix of a real Llama
            w.add_tensor(s.name, t, s.shape, _tensor_chunks(s, t, on_rows, x8),
                         layout=fmt.LAYOUT_X8 if x8 else fmt.LAYOUT_ROW_MAJOR)
            done_b += s.nbytes
            prog.update(i + 1, done_b)
