#!/usr/bin/env python3
"""Fuzz the model-file loader and the GGUF importer with structured mutations of valid files.

    python tools/fuzz_loader.py --n 100000              # a long campaign, one worker per core
    python tools/fuzz_loader.py --n 2000 --seed 0 --jobs 2
    python tools/fuzz_loader.py --replay 1234           # re-run one case in this process
    python tools/fuzz_loader.py --replay 1234 --keep m.bin   # ... and keep the mutated file

A case is one integer seed: the seed alone picks the target, the base file and the
mutations (random.Random(seed)), so any finding replays from its seed (same tool
version; the bases are rebuilt deterministically). Case k of a campaign has seed
--seed + k. Targets:

  model  a valid llamacpu model file, mutated, then read_model(). When it loads:
         Model(n_ctx <= 8) and forwards of a few tokens, and (half the time) the
         tokenizer from the metadata. Bases: converted from small random Hugging Face
         checkpoints (tools/make_checkpoint.py pieces, a 261/264-token byte-level BPE)
         at q4_0 / f16 / q4_1 / q8_0, tied and untied; the small GGUF below converted
         with its types kept; or a random small shape written with ModelWriter.
  gguf   a small valid GGUF (written by the encoder below; byte-level BPE tokenizer,
         F32/F16/BF16/Q4_0/Q4_1/Q8_0 tensors, rope_freqs, tied and untied variants),
         mutated, then llamacpu.gguf.GGUFFile() and llamacpu.convert.convert() (type
         kept or a random target type). When it converts, the result is loaded and run
         as above.
  smol   the real SmolLM2-135M Q4_1 GGUF (tools/fetch_assets.py), truncated or with its
         header / metadata / tensor infos mutated; GGUFFile() and convert(). Costly
         (100 MB per case): only with --smol FRACTION.

Mutations: truncation (anywhere, and around every region boundary), byte flips and
set bytes in the header, the metadata, the directory / tensor infos and the data;
header fields, directory fields and GGUF counts, lengths, types, dims and offsets set
to interesting values (0, 1, -1, 2^31, 2^32, 2^63, 2^64-1, off by one, the file
size, other fields' values); huge dimensions; overlapping, misaligned and
out-of-range offsets; invalid JSON (cut, garbage, deep nesting, NaN, duplicate keys,
invalid UTF-8, huge numbers); wrong JSON types and values for every metadata key;
tensors dropped, duplicated, renamed, retyped, reshaped, moved; consistent edits that
must still load (tie flipped with the head added or dropped, rope_freqs with odd
values, x8 layout toggled, small max_position_embeddings, extreme rope/eps values).

Contract: every case ends in ModelFormatError, or loads (the mutation was harmless)
and the forward returns. Anything else is a finding: another exception ("error"),
the worker dying ("crash": a signal, or an exit such as a sanitizer's report), or no
answer within --timeout seconds, twice ("hang": a case that times out runs once more
with 5x the time, since a busy machine can starve a worker). Cases run in worker
processes that are restarted after a crash or a timeout. Findings are printed with their seeds and written
to --out (JSON lines). Exit status: 0 when there was no finding, 1 otherwise.

The tokenizer stage runs the project's Tokenizer (tokenizers underneath) on the
metadata of a file that loaded; it may also answer with ValueError (Tokenizer's
error for a tokenizer.json it cannot use), never with anything else.

From Python (tests/test_fuzz.py): run_campaign(n, seed=0, jobs=2) -> Summary.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TOOLS = Path(__file__).resolve().parent
for _p in (str(REPO), str(TOOLS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# ============================================================================= small shapes

# Every base has the same small shape; only vocab, tie, types and the tokenizer differ.
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]

INTERESTING_U64 = [0, 1, 2, 3, 7, 8, 31, 32, 63, 64, 65, 127, 128, 255, 256, 4095, 4096, 65535, 65536,
                   (1 << 24) + 1, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 40) + 1,
                   (1 << 62), (1 << 63) - 1, 1 << 63, (1 << 64) - 64, (1 << 64) - 1]
INTERESTING_U32 = [v for v in INTERESTING_U64 if v < (1 << 32)]


def _byte_alphabet() -> list:
    from llamacpu.tokenizer import bytes_to_unicode
    b2u = bytes_to_unicode()
    return [b2u[b] for b in range(256)]


def tiny_vocab(n_merges: int):
    """(tokens, token types, merges as "a b") of a byte-level BPE: 256 bytes, merges, specials."""
    tokens = _byte_alphabet()
    for a, b in MERGES[:n_merges]:
        tokens.append(a + b)
    types = [1] * len(tokens) + [3] * len(SPECIALS)
    tokens += SPECIALS
    return tokens, types, [f"{a} {b}" for a, b in MERGES[:n_merges]]


def hf_tokenizer_json(n_merges: int) -> dict:
    tokens, types, merges = tiny_vocab(n_merges)
    bos = tokens.index("<|begin_of_text|>")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(tokens) if types[i] == 3]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos],
                                                     "tokens": ["<|begin_of_text|>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens) if types[i] == 1},
                  "merges": [m.split(" ") for m in merges]},
    }


def write_hf_checkpoint(out: Path, n_merges: int, tie: bool, seed: int) -> Path:
    """A small random-weight Llama checkpoint in the Hugging Face layout (make_checkpoint's
    config, tensor order, initialisation and safetensors writer; a tiny tokenizer)."""
    import make_checkpoint as mc

    out.mkdir(parents=True, exist_ok=True)
    tok = hf_tokenizer_json(n_merges)
    tokens, _, _ = tiny_vocab(n_merges)
    ids = {t: i for i, t in enumerate(tokens)}
    config = mc.make_config("tiny64")
    config.update(SMALL, vocab_size=len(tokens), tie_word_embeddings=tie,
                  bos_token_id=ids["<|begin_of_text|>"],
                  eos_token_id=[ids["<|end_of_text|>"], ids["<|eot_id|>"]])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": mc.LLAMA32_CHAT_TEMPLATE, "model_max_length": 256}))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|begin_of_text|>"], "do_sample": True,
        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]], "temperature": 0.6, "top_p": 0.9}))
    specs = mc.tensor_specs(config)
    entries = [(n, "BF16", s, int(np.prod(s)) * 2) for n, s, _ in specs]
    with open(out / "model.safetensors", "wb") as f:
        f.write(mc.safetensors_header(entries))
        for name, shape, kind in specs:
            for chunk in mc.tensor_chunks(name, shape, kind, seed, "bf16"):
                f.write(chunk)
    return out


# ============================================================================= GGUF encoder

U8, I8, U16, I16, U32, I32, F32V, BOOL, STR, ARR, U64, I64, F64 = range(13)
_VFMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32V: "<f", BOOL: "<B",
         U64: "<Q", I64: "<q", F64: "<d"}
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q4_1, GGML_Q8_0, GGML_BF16 = 0, 1, 2, 3, 8, 30
# ggml type -> (elements per block, bytes per block), for the types the mutator uses
GGML_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
               9: (32, 36), 10: (256, 84), 12: (256, 144), 14: (256, 210), 20: (32, 18), 24: (1, 1),
               26: (1, 4), 28: (1, 8), 30: (1, 2), 39: (32, 17)}


class Raw(bytes):
    """Bytes emitted as they are where a value (or a string's bytes) is expected."""


def _enc_str(s) -> bytes:
    b = s if isinstance(s, bytes) else s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def enc_value(vtype: int, value) -> bytes:
    if isinstance(value, Raw):
        return bytes(value)
    if vtype in _VFMT:
        return struct.pack(_VFMT[vtype], value)
    if vtype == STR:
        return _enc_str(value)
    if vtype == ARR:
        itype, items = value[0], value[1]
        count = value[2] if len(value) > 2 else len(items)
        return struct.pack("<IQ", itype, count) + b"".join(enc_value(itype, v) for v in items)
    return b""  # an unknown value type: no payload


@dataclass
class GTensor:
    name: str | bytes
    dims: list            # GGUF order: innermost first
    type: int
    data: bytes
    offset: int | None = None  # None: placed by the encoder


@dataclass
class GGUFImage:
    kvs: list              # [key, vtype, value]
    tensors: list          # [GTensor]
    version: int = 3
    magic: bytes = b"GGUF"
    alignment: int = 32    # what the encoder aligns to (general.alignment may say otherwise)
    tensor_count: int | None = None
    kv_count: int | None = None

    def serialize(self):
        """-> (bytes, regions): regions name -> (start, end), plus per-item positions."""
        out = bytearray()
        out += self.magic + struct.pack("<I", self.version)
        out += struct.pack("<QQ", len(self.tensors) if self.tensor_count is None else self.tensor_count,
                           len(self.kvs) if self.kv_count is None else self.kv_count)
        regions = {"header": (0, len(out))}
        kv_pos = []
        k0 = len(out)
        for key, vtype, value in self.kvs:
            start = len(out)
            out += _enc_str(key) + struct.pack("<I", vtype)
            vstart = len(out)
            out += enc_value(vtype, value)
            kv_pos.append((start, vstart, len(out)))
        regions["kv"] = (k0, len(out))
        a = max(1, self.alignment)
        placed, off = [], 0
        for t in self.tensors:
            if t.offset is None:
                off = (off + a - 1) // a * a
                placed.append(off)
                off += len(t.data)
            else:
                placed.append(t.offset)
        ti_pos = []
        t0 = len(out)
        for t, o in zip(self.tensors, placed):
            start = len(out)
            out += _enc_str(t.name) + struct.pack("<I", len(t.dims))
            dpos = len(out)
            out += b"".join(struct.pack("<Q", d % (1 << 64)) for d in t.dims)
            tpos = len(out)
            out += struct.pack("<IQ", t.type, o)
            ti_pos.append((start, dpos, tpos, tpos + 4, len(out)))
        regions["tensor_info"] = (t0, len(out))
        out += b"\0" * ((-len(out)) % a)
        data_start = len(out)
        regions["data"] = (data_start, None)
        end = data_start
        for t, o in zip(self.tensors, placed):
            if t.offset is None:
                need = data_start + o + len(t.data)
                if len(out) < need:
                    out += b"\0" * (need - len(out))
                out[data_start + o:need] = t.data
                end = max(end, need)
        regions["data"] = (data_start, len(out))
        regions["kv_pos"] = kv_pos
        regions["ti_pos"] = ti_pos
        return bytes(out), regions


def _quant(x: np.ndarray, ggml_type: int) -> bytes:
    from llamacpu import _core
    if ggml_type == GGML_F32:
        return x.astype("<f4").tobytes()
    if ggml_type == GGML_F16:
        return x.astype("<f2").tobytes()
    if ggml_type == GGML_BF16:
        return (np.ascontiguousarray(x, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    return _core.quantize(np.ascontiguousarray(x, np.float32), ggml_type).tobytes()


def gguf_base(n_merges: int, tie: bool, seed: int, rope_freqs: bool, pre: str) -> GGUFImage:
    """A small valid llama GGUF: adjacent RoPE rows (GGUF convention), mixed tensor types."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab(n_merges)
    ids = {t: i for i, t in enumerate(tokens)}
    V, D, F = len(tokens), SMALL["hidden_size"], SMALL["intermediate_size"]
    H, KV, hd, L = (SMALL["num_attention_heads"], SMALL["num_key_value_heads"], SMALL["head_dim"],
                    SMALL["num_hidden_layers"])
    kvs = [
        ["general.architecture", STR, "llama"],
        ["general.name", STR, "fuzz-base"],
        ["general.alignment", U32, 32],
        ["llama.block_count", U32, L],
        ["llama.context_length", U32, SMALL["max_position_embeddings"]],
        ["llama.embedding_length", U32, D],
        ["llama.feed_forward_length", U32, F],
        ["llama.attention.head_count", U32, H],
        ["llama.attention.head_count_kv", U32, KV],
        ["llama.attention.key_length", U32, hd],
        ["llama.attention.value_length", U32, hd],
        ["llama.rope.dimension_count", U32, hd],
        ["llama.rope.freq_base", F32V, 500000.0],
        ["llama.attention.layer_norm_rms_epsilon", F32V, 1e-5],
        ["llama.vocab_size", U32, V],
        ["tokenizer.ggml.model", STR, "gpt2"],
        ["tokenizer.ggml.pre", STR, pre],
        ["tokenizer.ggml.tokens", ARR, (STR, tokens)],
        ["tokenizer.ggml.token_type", ARR, (I32, types)],
        ["tokenizer.ggml.merges", ARR, (STR, merges)],
        ["tokenizer.ggml.bos_token_id", U32, ids["<|begin_of_text|>"]],
        ["tokenizer.ggml.eos_token_id", U32, ids["<|eot_id|>"]],
        ["tokenizer.ggml.add_bos_token", BOOL, True],
        ["tokenizer.chat_template", STR,
         "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
         "{{ m.content }}<|eot_id|>{% endfor %}"],
    ]
    mats = [GGML_Q4_0, GGML_Q4_1, GGML_Q8_0, GGML_F16, GGML_BF16, GGML_F32]

    def w(rows, cols, t, scale=None):
        x = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(scale or cols ** -0.5)
        return GTensor(None, [cols, rows], t, _quant(x, t))

    tensors = []

    def add(name, t):
        t.name = name
        tensors.append(t)

    add("token_embd.weight", w(V, D, GGML_Q8_0 if tie else GGML_Q4_1))
    k = 0
    for i in range(L):
        p = f"blk.{i}."
        norm = rng.normal(1.0, 0.1, D).astype(np.float32)
        add(p + "attn_norm.weight", GTensor(None, [D], GGML_F32, norm.astype("<f4").tobytes()))
        for nm, (r, c) in (("attn_q", (H * hd, D)), ("attn_k", (KV * hd, D)), ("attn_v", (KV * hd, D)),
                           ("attn_output", (D, H * hd)), ("ffn_gate", (F, D)), ("ffn_down", (D, F)),
                           ("ffn_up", (F, D))):
            add(p + nm + ".weight", w(r, c, mats[k % len(mats)]))
            k += 1
        add(p + "ffn_norm.weight", GTensor(None, [D], GGML_F32, norm.astype("<f4").tobytes()))
    add("output_norm.weight", GTensor(None, [D], GGML_F32,
                                      rng.normal(6.0, 0.6, D).astype("<f4").tobytes()))
    if not tie:
        add("output.weight", w(V, D, GGML_Q8_0))
    if rope_freqs:
        add("rope_freqs.weight", GTensor(None, [hd // 2], GGML_F32,
                                         np.linspace(1, 8, hd // 2, dtype="<f4").tobytes()))
    return GGUFImage(kvs, tensors)


# ============================================================================= our format

_HDR = struct.Struct("<8sIIQQQQQQ")
_ENT = struct.Struct("<64sII4QQQII")
HEADER_FIELDS = ("magic", "version", "header_size", "meta_offset", "meta_size", "dir_offset",
                 "n_tensors", "data_offset", "file_size")
# field -> (offset in the header, struct format)
HEADER_AT = {"version": (8, "<I"), "header_size": (12, "<I"), "meta_offset": (16, "<Q"),
             "meta_size": (24, "<Q"), "dir_offset": (32, "<Q"), "n_tensors": (40, "<Q"),
             "data_offset": (48, "<Q"), "file_size": (56, "<Q")}
# directory field -> (offset in the entry, struct format)
ENTRY_AT = {"type": (64, "<I"), "n_dims": (68, "<I"), "d0": (72, "<Q"), "d1": (80, "<Q"),
            "d2": (88, "<Q"), "d3": (96, "<Q"), "offset": (104, "<Q"), "nbytes": (112, "<Q"),
            "layout": (120, "<I"), "reserved": (124, "<I")}
OUR_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34)}


@dataclass
class Entry:
    name: bytes
    type: int
    dims: list            # outermost first, as written (n_dims of them)
    data: bytes
    layout: int = 0
    reserved: int = 0


@dataclass
class ModelImage:
    meta: bytes
    entries: list

    @classmethod
    def parse(cls, raw: bytes) -> "ModelImage":
        h = dict(zip(HEADER_FIELDS, _HDR.unpack_from(raw, 0)))
        meta = raw[h["meta_offset"]:h["meta_offset"] + h["meta_size"]].rstrip(b" ")
        entries = []
        for i in range(h["n_tensors"]):
            name, t, nd, d0, d1, d2, d3, rel, nb, layout, res = _ENT.unpack_from(raw, h["dir_offset"] + 128 * i)
            start = h["data_offset"] + rel
            entries.append(Entry(name.rstrip(b"\0"), t, [d0, d1, d2, d3][:nd], raw[start:start + nb], layout, res))
        return cls(meta, entries)

    def serialize(self, extra_slots: int = 0):
        meta = self.meta + b" " * ((-(64 + len(self.meta))) % 8)
        dir_offset = 64 + len(meta)
        n = len(self.entries)
        dir_end = dir_offset + 128 * (n + extra_slots)
        data_offset = (dir_end + 63) // 64 * 64
        out = bytearray(data_offset)
        rel, ent_pos = 0, []
        for i, e in enumerate(self.entries):
            dims = list(e.dims) + [1] * (4 - len(e.dims))
            pos = dir_offset + 128 * i
            _ENT.pack_into(out, pos, e.name[:64], e.type, len(e.dims), *(d % (1 << 64) for d in dims[:4]), rel,
                           len(e.data), e.layout, e.reserved)
            ent_pos.append(pos)
            out += e.data
            out += b"\0" * ((-len(out)) % 64)
            rel = len(out) - data_offset
        out[64:dir_offset] = meta
        _HDR.pack_into(out, 0, b"LLAMACPU", 1, 64, 64, len(meta), dir_offset, n, data_offset, len(out))
        regions = {"header": (0, 64), "meta": (64, dir_offset), "dir": (dir_offset, dir_end),
                   "pad": (dir_end, data_offset), "data": (data_offset, len(out)), "ent_pos": ent_pos}
        return bytes(out), regions


def _x8_pack(raw: np.ndarray, t: int) -> bytes:
    from llamacpu.format import x8_pack
    return x8_pack(raw, t).tobytes()


def random_shape_model(rng: random.Random) -> tuple[ModelImage, list]:
    """A valid model of a random small shape, written directly (types, layouts and values
    random; every matrix type where its shape allows it). Returns (image, description)."""
    from llamacpu import format as fmt
    nrng = np.random.default_rng(rng.getrandbits(32))
    heads = rng.choice([1, 1, 2, 3, 4, 8])
    kv = rng.choice([d for d in range(1, heads + 1) if heads % d == 0])
    head_dim = rng.choice([2, 4, 6, 8, 16, 32, 64])
    dim = rng.choice([1, 2, 5, 8, 31, 32, 33, 64, 96, 128, heads * head_dim])
    hidden = rng.choice([1, 3, 32, 64, 95, 96, 160])
    vocab = rng.choice([1, 2, 7, 8, 9, 64, 100, 257])
    layers = rng.choice([1, 1, 2, 3])
    tie = rng.random() < 0.5
    rope_scaling = rng.choice([None, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                               {"rope_type": "llama3", "factor": 1e6, "low_freq_factor": 1e-6,
                                "high_freq_factor": 1e6, "original_max_position_embeddings": 1}])
    config = {"architecture": "llama", "vocab_size": vocab, "hidden_size": dim,
              "intermediate_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "head_dim": head_dim,
              "rms_norm_eps": rng.choice([1e-5, 1e-30, 0.999]),
              "rope_theta": rng.choice([1.0, 10000.0, 500000.0, 1e12]), "rope_scaling": rope_scaling,
              "max_position_embeddings": rng.choice([1, 2, 3, 8, 1 << 24]), "tie_word_embeddings": tie,
              "rope_pairing": "adjacent"}
    meta = {"format_version": 1, "config": config,
            "tokenizer": json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}}),
            "chat_template": None, "generation": {},
            "special_tokens": {"bos_token_id": rng.choice([None, 0, vocab - 1]), "eos_token_id": None,
                               "eog_token_ids": [vocab - 1], "pad_token_id": None,
                               "add_bos_token": rng.random() < 0.5},
            "provenance": {}}
    shapes = fmt.expected_tensors(fmt.ModelConfig.from_dict(config))
    if rng.random() < 0.4:
        shapes["rope_freqs.weight"] = (head_dim // 2,)
    entries = []
    for name, shape in shapes.items():
        if len(shape) == 1:
            if name == "rope_freqs.weight":
                x = np.array([rng.choice([1.0, 8.0, 0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf")])
                              for _ in range(shape[0])], dtype="<f4")
            else:
                x = nrng.normal(1.0, 0.1, shape).astype("<f4")
            entries.append(Entry(name.encode(), 0, list(shape), x.tobytes()))
            continue
        rows, cols = shape
        types = [0, 1] + ([2, 3, 8] if cols % 32 == 0 else []) + ([100] if cols % 32 == 0 and rows % 8 == 0 else [])
        t = rng.choice(types)
        x = nrng.standard_normal(shape, dtype=np.float32) * np.float32(cols ** -0.5)
        if rng.random() < 0.05:
            x[...] = rng.choice([0.0, 1e30, -1e30])
        layout = 0
        if t in (0, 1):
            data = x.astype("<f4" if t == 0 else "<f2").tobytes()
        else:
            from llamacpu import _core
            q = _core.quantize(x, t)
            if t == 100 or (rows % 8 == 0 and rng.random() < 0.7):  # Q6_0: x8 only
                layout, data = 1, _x8_pack(q, t)
            else:
                data = q.tobytes()
        entries.append(Entry(name.encode(), t, list(shape), data, layout))
    rng.shuffle(entries)  # readers must not depend on the order
    desc = [f"shape vocab={vocab} dim={dim} ffn={hidden} layers={layers} heads={heads}/{kv} hd={head_dim} "
            f"tie={tie}"]
    return ModelImage(json.dumps(meta).encode(), entries), desc


# ============================================================================= mutations

def _weird_json_value(rng: random.Random):
    return rng.choice([None, True, False, 0, -1, 1, 2, 3, 1.5, -0.0, 0.5, 2 ** 31, 2 ** 63, 2 ** 64,
                       10 ** 30, -(10 ** 30), 1e308, -1e-308, float("nan"), float("inf"), float("-inf"),
                       "", "x", "llama", "adjacent", "half", [], {}, [1, 2], {"a": 1}, [[[[[]]]]],
                       "\u0000", 1 << 24, (1 << 24) + 1, 1 << 16, 65537, 1025, 1024])


def _paths(obj, prefix=(), depth=0):
    """Paths to every value inside dicts / lists (tokenizer text excluded: it is a string)."""
    out = []
    if depth > 3:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,), depth + 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            out.append(prefix + (i,))
            out += _paths(v, prefix + (i,), depth + 1)
    return out


def _get_parent(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    return obj


def mutate_meta_json(meta: dict, rng: random.Random, ops: list) -> None:
    """Structured edits of the metadata object, in place."""
    paths = _paths(meta)
    if not paths:
        return
    kind = rng.choice(["set", "set", "set", "delete", "config", "config", "config", "rope",
                       "special", "tokenizer", "tokenizer", "add", "harmless"])
    if kind == "set":
        p = rng.choice(paths)
        v = _weird_json_value(rng)
        _get_parent(meta, p)[p[-1]] = v
        ops.append(f"meta {'.'.join(map(str, p))} = {v!r:.40}")
    elif kind == "delete":
        p = rng.choice(paths)
        parent = _get_parent(meta, p)
        del parent[p[-1]]
        ops.append(f"meta del {'.'.join(map(str, p))}")
    elif kind == "add":
        p = rng.choice([q for q in paths if isinstance(_get_parent(meta, q + ("x",)), dict)] or [("config",)])
        target = _get_parent(meta, p + ("x",))
        target[rng.choice(["extra", "config", "tokenizer", "vocab_size"])] = _weird_json_value(rng)
        ops.append(f"meta add key under {'.'.join(map(str, p))}")
    elif kind == "config":
        cfg = meta.get("config")
        if not isinstance(cfg, dict):
            return
        key = rng.choice(["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "num_key_value_heads", "head_dim",
                          "max_position_embeddings", "tie_word_embeddings", "architecture",
                          "rope_pairing", "rms_norm_eps", "rope_theta"])
        old = cfg.get(key)
        if isinstance(old, bool):
            v = not old
        elif isinstance(old, int):
            v = rng.choice([0, 1, 2, old - 1, old + 1, old * 2, old // 2, 1 << 16, 1 << 24, -old,
                            (1 << 31), 1 << 40])
        elif isinstance(old, float):
            v = rng.choice([0.0, 1e-30, 0.999, 1.0, 1e12, 1.1e12, -1.0, 1e-5, 0.5])
        else:
            v = _weird_json_value(rng)
        cfg[key] = v
        ops.append(f"config.{key} {old!r} -> {v!r:.40}")
    elif kind == "rope":
        cfg = meta.get("config")
        if not isinstance(cfg, dict):
            return
        v = rng.choice([None, {}, {"rope_type": "llama3"}, {"rope_type": "yarn", "factor": 2.0},
                        {"rope_type": "llama3", "factor": 0, "low_freq_factor": 1, "high_freq_factor": 4,
                         "original_max_position_embeddings": 8192},
                        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192},
                        {"rope_type": "llama3", "factor": 1e6, "low_freq_factor": 1e-6,
                         "high_freq_factor": 1e6, "original_max_position_embeddings": 1},
                        {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 1 << 24},
                        {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 0},
                        {"rope_type": "llama3", "factor": float("nan"), "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8}])
        cfg["rope_scaling"] = v
        ops.append(f"config.rope_scaling = {v!r:.60}")
    elif kind == "special":
        st = meta.get("special_tokens")
        if not isinstance(st, dict):
            return
        key = rng.choice(["bos_token_id", "eos_token_id", "pad_token_id", "eog_token_ids", "add_bos_token"])
        cfg = meta.get("config")
        vocab = cfg.get("vocab_size", 1) if isinstance(cfg, dict) else 1
        vocab = vocab if isinstance(vocab, int) else 1
        if key == "eog_token_ids":
            v = rng.choice([[], [vocab], [-1], [0, 0, 0], [True], None, "x", [vocab - 1, 0]])
        elif key == "add_bos_token":
            v = rng.choice([True, False, 0, 1, None, "true"])
        else:
            v = rng.choice([None, 0, vocab - 1, vocab, -1, True, 1.0, "1", 2 ** 63])
        st[key] = v
        ops.append(f"special_tokens.{key} = {v!r}")
    elif kind == "tokenizer":
        tok = meta.get("tokenizer")
        choice = rng.randrange(8)
        if choice == 0 and isinstance(tok, str):
            cut = rng.randrange(len(tok) + 1)
            meta["tokenizer"] = tok[:cut]
            ops.append(f"tokenizer text cut at {cut}")
        elif choice == 1:
            meta["tokenizer"] = rng.choice(['{"model": 1}', '{"model":', '{"model": {}}', '{}', "[]", "",
                                            '{"model": {"type": "WordPiece", "vocab": {}}}',
                                            '{"model": {"type": "BPE", "vocab": [], "merges": []}}',
                                            '{"added_tokens": 5, "model": {"vocab": {}}}', "model"])
            ops.append(f"tokenizer = {meta['tokenizer']!r}")
        elif choice == 2 and isinstance(tok, str):
            try:
                obj = json.loads(tok)
            except (ValueError, RecursionError):
                return
            meta["tokenizer"] = obj  # readers accept the object itself
            ops.append("tokenizer as an object")
        elif isinstance(tok, str) and tok:
            # a structured edit inside the tokenizer.json
            try:
                obj = json.loads(tok)
            except (ValueError, RecursionError):
                return
            sub = _paths(obj)
            if not sub:
                return
            p = rng.choice(sub)
            if rng.random() < 0.3:
                del _get_parent(obj, p)[p[-1]]
                ops.append(f"tokenizer del {'.'.join(map(str, p))}")
            else:
                v = _weird_json_value(rng)
                _get_parent(obj, p)[p[-1]] = v
                ops.append(f"tokenizer {'.'.join(map(str, p))} = {v!r:.40}")
            meta["tokenizer"] = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
    else:  # edits that must not matter
        which = rng.randrange(4)
        if which == 0:
            meta["provenance"] = {"anything": [1, 2, {"x": None}]}
        elif which == 1:
            meta["generation"] = {"temperature": 0.0, "top_k": 1}
        elif which == 2:
            meta["chat_template"] = None if meta.get("chat_template") else "{{ messages }}"
        else:
            meta = dict(reversed(list(meta.items())))
        ops.append(f"harmless meta edit {which}")


def mutate_meta_text(text: bytes, rng: random.Random, ops: list) -> bytes:
    """Edits of the JSON text itself (mostly invalid JSON)."""
    k = rng.randrange(13)
    n = len(text)
    if k == 0:
        i = rng.randrange(n + 1)
        ops.append(f"meta text cut at {i}")
        return text[:i]
    if k == 1:
        i, j = sorted(rng.randrange(n + 1) for _ in range(2))
        ops.append(f"meta text delete [{i}, {j})")
        return text[:i] + text[j:]
    if k == 2:
        i = rng.randrange(n + 1)
        ins = rng.choice([b",", b"}", b"{", b"]", b"[", b"\"", b"\\", b":", b"\xff", b"\xc0\x80",
                          b"\xed\xa0\x80", b"\0", b"NaN", b"-Infinity", b"1e999", b"\xef\xbb\xbf", b"\t\n"])
        ops.append(f"meta text insert {ins!r} at {i}")
        return text[:i] + ins + text[i:]
    if k == 3:
        depth = rng.choice([100, 1000, 100000])
        ops.append(f"meta nested {depth} deep")
        return text[:-1] + b',"deep":' + b"[" * depth + b"]" * depth + b"}"
    if k == 4:
        ops.append("meta is not an object")
        return rng.choice([b"[]", b"null", b"1", b'"meta"', b"{}", b"true", b" ", b""])
    if k == 5:
        ops.append("meta duplicate config key")
        return text[:-1] + b',"config":{"architecture":"llama"}}'
    if k == 6:
        ops.append("meta trailing garbage")
        return text + rng.choice([b"x", b"}", b"{}", b"\0", b"\xff"])
    if k == 7:
        ops.append("meta BOM")
        return b"\xef\xbb\xbf" + text
    if k == 8:
        digits = rng.choice([20, 400, 5000])
        ops.append(f"meta number with {digits} digits")
        return text.replace(b'"vocab_size":', b'"vocab_size":' + b"9" * digits + b",\"x\":", 1)
    if k == 9:
        ops.append("meta whitespace (harmless)")
        return b" \n\t" + text.replace(b",", b", ", 50) + b"\n"
    if k == 10:
        ops.append("meta invalid UTF-8 in a string")
        i = text.find(b'"architecture"')
        return text[:i + 1] + b"\xfe" + text[i + 1:] if i >= 0 else text + b"\xfe"
    if k == 11:
        ops.append("meta NaN for rms_norm_eps")
        return text.replace(b'"rms_norm_eps":', b'"rms_norm_eps":NaN,"x":', 1)
    i = rng.randrange(max(n, 1))
    b = bytearray(text)
    for _ in range(rng.randint(1, 8)):
        if b:
            j = min(len(b) - 1, i + rng.randrange(16))
            b[j] = rng.randrange(256)
    ops.append(f"meta text bytes set near {i}")
    return bytes(b)


def _resize_for(e: Entry, rng: random.Random) -> None:
    """Make e.data the size its type and dims imply (random bytes or repeated)."""
    per, bsz = OUR_BLOCKS.get(e.type, (1, 1))
    if not e.dims or e.dims[-1] % per or any(d <= 0 for d in e.dims):
        return
    want = math.prod(e.dims[:-1]) * (e.dims[-1] // per) * bsz
    if want > 1 << 24:
        return
    if len(e.data) >= want:
        e.data = e.data[:want]
    else:
        e.data = e.data + bytes(rng.getrandbits(8) for _ in range(min(want - len(e.data), 4096))) \
            if want - len(e.data) <= 4096 else e.data + b"\0" * (want - len(e.data))


def mutate_entries(img: ModelImage, rng: random.Random, ops: list) -> None:
    """Structured edits of the tensor directory (serialized consistently afterwards)."""
    es = img.entries
    if not es:
        return
    k = rng.randrange(14)
    i = rng.randrange(len(es))
    e = es[i]
    nm = e.name.decode("utf-8", "replace")
    if k == 0:
        del es[i]
        ops.append(f"drop tensor {nm}")
    elif k == 1:
        es.insert(rng.randrange(len(es) + 1), copy.copy(e))
        ops.append(f"duplicate tensor {nm}")
    elif k == 2:
        new = rng.choice([b"layers.99.attention.wq.weight", b"layers.-1.ffn_norm.weight", b"", b"x" * 63,
                          b"x" * 64, b"norm.weight\0x", b"\xff\xfe.weight", b"output.weight", b"rope_freqs.weight",
                          b"tok_embeddings.weight", b"layers.01.attention.wq.weight",
                          es[rng.randrange(len(es))].name])
        ops.append(f"rename {nm} -> {new!r}")
        e.name = new
    elif k == 3:
        j = rng.randrange(len(es))
        e.name, es[j].name = es[j].name, e.name
        ops.append(f"swap names {nm} <-> {es[i].name!r}")
    elif k == 4:
        t = rng.choice([0, 1, 2, 3, 8, 4, 6, 30, 99, 2 ** 31])
        ops.append(f"retype {nm} {e.type} -> {t} (data resized)")
        e.type = t
        if rng.random() < 0.5:
            e.layout = 0
        _resize_for(e, rng)
    elif k == 5:
        old = list(e.dims)
        c = rng.randrange(6)
        if c == 0:
            e.dims = list(reversed(e.dims))
        elif c == 1:
            e.dims = e.dims + [1]
        elif c == 2:
            e.dims = [d * 2 for d in e.dims]
        elif c == 3:
            e.dims = [1] + e.dims[1:] if len(e.dims) > 1 else [e.dims[0] // 2 or 1]
        elif c == 4:
            e.dims = [rng.choice([1 << 40, (1 << 63) + 5, 1 << 20])] + e.dims[1:]
        else:
            e.dims = [0] + e.dims[1:]
        ops.append(f"reshape {nm} {old} -> {e.dims} (data resized)")
        _resize_for(e, rng)
    elif k == 6:
        e.layout = rng.choice([0, 1, 2, 2 ** 32 - 1])
        ops.append(f"layout of {nm} = {e.layout}")
    elif k == 7:
        e.reserved = rng.choice([1, 2 ** 31])
        ops.append(f"reserved of {nm} = {e.reserved}")
    elif k == 8:
        # data bytes (the mutation a loader cannot see; the forward must survive it)
        b = bytearray(e.data)
        for _ in range(rng.randint(1, 32)):
            if b:
                b[rng.randrange(len(b))] = rng.choice([0xFF, 0x7C, 0x7F, 0x80, 0x00, rng.randrange(256)])
        e.data = bytes(b)
        ops.append(f"data bytes of {nm}")
    elif k == 9:
        # the tensor's whole data: NaN / inf / huge / zero (F32/F16 bit patterns)
        pat = rng.choice([b"\xff\xff\xff\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff", b"\0\0\0\0",
                          b"\xff\xff\x7f\x7f", b"\x00\x7c", b"\xff\x7f"])
        e.data = (pat * (len(e.data) // len(pat) + 1))[:len(e.data)]
        ops.append(f"data of {nm} filled with {pat!r}")
    elif k == 10:
        # consistent: drop or add rope_freqs (values odd)
        names = [x.name for x in es]
        if b"rope_freqs.weight" in names:
            es[:] = [x for x in es if x.name != b"rope_freqs.weight"]
            ops.append("drop rope_freqs")
        else:
            try:
                hd = json.loads(img.meta)["config"]["head_dim"]
            except (ValueError, KeyError, TypeError, RecursionError):
                hd = 16
            if isinstance(hd, int) and 2 <= hd <= 1024:
                v = rng.choice([1.0, 0.0, -1.0, 1e-38, 1e38, float("nan"), float("inf")])
                es.append(Entry(b"rope_freqs.weight", 0, [hd // 2], np.full(hd // 2, v, "<f4").tobytes()))
                ops.append(f"add rope_freqs = {v}")
    elif k == 11:
        # consistent: flip tie_word_embeddings and add / drop output.weight
        try:
            meta = json.loads(img.meta)
            cfg = meta["config"]
            tie = cfg["tie_word_embeddings"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return
        if tie is True:
            emb = next((x for x in es if x.name == b"tok_embeddings.weight"), None)
            if emb is None:
                return
            es.append(Entry(b"output.weight", emb.type, list(emb.dims), emb.data, emb.layout))
        elif tie is False:
            es[:] = [x for x in es if x.name != b"output.weight"]
        else:
            return
        cfg["tie_word_embeddings"] = not tie
        img.meta = json.dumps(meta, ensure_ascii=False).encode("utf-8", "surrogatepass")
        ops.append(f"tie {tie} -> {not tie}, head adjusted")
    elif k == 12:
        # consistent: toggle the x8 layout where it is allowed (a byte permutation; same size)
        if e.type in (2, 3, 8) and len(e.dims) == 2 and e.dims[0] % 8 == 0:
            e.layout ^= 1
            ops.append(f"toggle x8 layout of {nm} -> {e.layout}")
    else:
        rng.shuffle(es)
        ops.append("shuffle tensor order (harmless)")


def mutate_model_raw(buf: bytearray, regions: dict, rng: random.Random, ops: list) -> bytearray:
    """Byte-level edits of a serialized model file."""
    size = len(buf)
    k = rng.randrange(10)
    if k <= 1:
        field = rng.choice(list(HEADER_AT))
        off, f = HEADER_AT[field]
        cur = struct.unpack_from(f, buf, off)[0]
        pool = INTERESTING_U32 if f == "<I" else INTERESTING_U64
        v = rng.choice(pool + [cur + 1, cur - 1, cur + 8, cur + 64, cur - 64, size, size + 1, size - 1,
                               regions["dir"][0], regions["data"][0], regions["meta"][1] - 64])
        v %= 1 << (32 if f == "<I" else 64)
        struct.pack_into(f, buf, off, v)
        ops.append(f"header {field} {cur} -> {v}")
    elif k <= 3 and regions["ent_pos"]:
        i = rng.randrange(len(regions["ent_pos"]))
        pos = regions["ent_pos"][i]
        field = rng.choice(list(ENTRY_AT))
        off, f = ENTRY_AT[field]
        cur = struct.unpack_from(f, buf, pos + off)[0]
        if field == "offset":
            others = [struct.unpack_from("<Q", buf, p + 104)[0] for p in regions["ent_pos"]]
            v = rng.choice(INTERESTING_U64 + others + [cur + 64, cur - 64, cur + 1, cur + 32,
                                                       size - regions["data"][0]])
        elif field == "nbytes":
            v = rng.choice(INTERESTING_U64 + [cur + 1, cur - 1, cur * 2, cur + 64, 0])
        else:
            pool = INTERESTING_U32 if f == "<I" else INTERESTING_U64
            v = rng.choice(pool + [cur + 1, cur - 1, cur * 2])
        v %= 1 << (32 if f == "<I" else 64)
        struct.pack_into(f, buf, pos + off, v)
        ops.append(f"entry {i} {field} {cur} -> {v}")
    elif k == 4:
        # truncation: anywhere, or around a region boundary
        marks = [0, 1, 8, 63, 64, 65, size - 1, size - 64]
        for r in ("meta", "dir", "data"):
            marks += [regions[r][0] - 1, regions[r][0], regions[r][0] + 1, regions[r][1] - 1]
        cut = rng.choice(marks) if rng.random() < 0.5 else rng.randrange(size)
        cut = max(0, min(size, cut))
        ops.append(f"truncate to {cut} of {size}")
        return buf[:cut]
    elif k == 5:
        extra = rng.choice([1, 63, 64, 4096])
        buf += bytes(rng.getrandbits(8) for _ in range(min(extra, 64))) + b"\0" * max(0, extra - 64)
        if rng.random() < 0.5:
            struct.pack_into("<Q", buf, 56, len(buf))
            ops.append(f"append {extra} bytes, file_size updated")
        else:
            ops.append(f"append {extra} bytes")
    else:
        region = rng.choice(["header", "header", "meta", "dir", "dir", "pad", "data"])
        a, b = regions[region]
        if b <= a:
            return buf
        n = rng.randint(1, 8)
        for _ in range(n):
            j = rng.randrange(a, b)
            if rng.random() < 0.5:
                buf[j] ^= 1 << rng.randrange(8)
            else:
                buf[j] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        ops.append(f"{n} byte flips in {region}")
    return buf


def mutate_model(base: bytes, rng: random.Random, ops: list, shape_image=None) -> bytes:
    img = shape_image if shape_image is not None else ModelImage.parse(base)
    # structured edits (then a consistent layout), 0-2 of them
    for _ in range(rng.choice([0, 1, 1, 1, 2])):
        c = rng.random()
        if c < 0.40:
            try:
                meta = json.loads(img.meta)
            except (ValueError, RecursionError):
                continue
            if isinstance(meta, dict):
                mutate_meta_json(meta, rng, ops)
                # surrogatepass: a lone surrogate that an earlier edit put in goes back as it came
                img.meta = json.dumps(meta, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
        elif c < 0.55:
            img.meta = mutate_meta_text(img.meta, rng, ops)
        else:
            mutate_entries(img, rng, ops)
    buf, regions = img.serialize(extra_slots=rng.choice([0, 0, 0, 1, 3]))
    buf = bytearray(buf)
    # byte-level edits, 0-3 of them; a truncation ends them (the regions no longer hold)
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        size = len(buf)
        buf = mutate_model_raw(buf, regions, rng, ops)
        if len(buf) < size:
            break
    return bytes(buf)


# ----------------------------------------------------------------------------- GGUF mutations

def _find_kv(img: GGUFImage, key: str):
    for kv in img.kvs:
        if kv[0] == key:
            return kv
    return None


def _find_array(img: GGUFImage, key: str, elem: int):
    """The key's entry when it is an array of `elem` (an earlier edit may have changed its type), else None."""
    kv = _find_kv(img, key)
    return kv if kv is not None and kv[1] == ARR and kv[2][0] == elem else None


INT_TYPES = [U8, I8, U16, I16, U32, I32, U64, I64]


def _weird_gguf_value(rng: random.Random, old_type: int):
    c = rng.randrange(10)
    if c == 0:
        return I32, rng.choice([-1, -2 ** 31, 0])
    if c == 1:
        return U64, rng.choice([0, 1, 2 ** 63, 2 ** 64 - 1, 2 ** 31, 2 ** 32])
    if c == 2:
        return F32V, rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e-45, 3e38, 64.0])
    if c == 3:
        return F64, rng.choice([float("nan"), 1e308, 64.0, -0.0])
    if c == 4:
        return STR, rng.choice(["", "64", "llama", b"\xff\xfe", "x" * 1000])
    if c == 5:
        return BOOL, rng.choice([0, 1])
    if c == 6:
        return ARR, (U32, [1, 2, 3])
    if c == 7:
        return rng.choice([13, 99, 2 ** 32 - 1]), b""  # unknown value type, no payload
    if c == 8:
        return U8, rng.choice([0, 1, 255])
    return old_type, None  # keep the type, value chosen by the caller


def mutate_gguf_struct(img: GGUFImage, rng: random.Random, ops: list) -> None:
    k = rng.randrange(18)
    if k <= 3:
        # a llama.* or general.* scalar
        keys = [kv for kv in img.kvs if isinstance(kv[0], str) and kv[1] != ARR]
        if rng.random() < 0.3:  # the keys the importer reads first, and one it refuses
            want = rng.choice(["general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                               "general.alignment", "llama.rope.scaling.type", "tokenizer.ggml.add_bos_token"])
            kv = _find_kv(img, want)
            if kv is None:
                kv = [want, STR, "linear"]
                img.kvs.append(kv)
        else:
            kv = rng.choice(keys)
        t, v = _weird_gguf_value(rng, kv[1])
        if v is None:
            if kv[1] in INT_TYPES:
                v = rng.choice([0, 1, 2, 3, 8, 15, 16, 17, 31, 33, 64, 65, 255, 1024, 1025,
                                (1 << 31) - 1 if kv[1] in (U32, I32, U64, I64) else 127])
                if kv[1] in (U8, I8):
                    v = min(v, 127)
                if kv[1] in (U16, I16):
                    v = min(v, 32767)
            elif kv[1] in (F32V, F64):
                v = rng.choice([float("nan"), float("inf"), 0.0, -1.0, 1e-38, 1e30, 0.5, 2.0])
            elif kv[1] == STR:
                v = rng.choice(["", "gpt2", "llama", "llama-bpe", "smollm", "mistral", "bert", "none",
                                "linear", "{{ raise_exception('x') }}", "{% for %}"])
            else:
                v = rng.choice([0, 1, 2])
        ops.append(f"kv {kv[0]}: type {kv[1]} -> {t}, value {v!r:.40}")
        kv[1], kv[2] = t, (Raw(v) if isinstance(v, bytes) and t != STR else v)
    elif k == 4:
        kv = _find_array(img, "tokenizer.ggml.tokens", STR)
        if kv is None:
            return
        toks = list(kv[2][1])
        c = rng.randrange(7)
        if c == 0 and toks:
            toks.pop()
        elif c == 1:
            toks.append(toks[rng.randrange(len(toks))] if toks else "")
        elif c == 2 and toks:
            toks[rng.randrange(len(toks))] = ""
        elif c == 3 and toks:
            toks[rng.randrange(len(toks))] = b"\xff\xfe"
        elif c == 4:
            toks = toks[:rng.randrange(len(toks) + 1)]
        elif c == 5:
            toks.append("<|new|>")
        else:
            kv[2] = rng.choice([(U32, [1, 2]), (I32, [1, 2]), (99, [1, 2]), (ARR, [(U8, [1]), (STR, ["a"])]),
                                (STR, [])])
            ops.append(f"tokens array replaced by {kv[2]!r:.40}")
            return
        kv[2] = (STR, toks)
        ops.append(f"tokens edit {c} ({len(toks)} tokens)")
    elif k == 5:
        kv = _find_array(img, "tokenizer.ggml.token_type", I32)
        if kv is None:
            return
        types = list(kv[2][1])
        c = rng.randrange(5)
        if c == 0 and types:
            types.pop()
        elif c == 1 and types:
            types[rng.randrange(len(types))] = rng.choice([0, 2, 3, 4, 5, 6, 7, -1, 255, 2 ** 31 - 1])
        elif c == 2:
            types = [3] * len(types)
        elif c == 3:
            kv[2] = (F32V, [float(t) for t in types])
            if rng.random() < 0.5:
                kv[2][1][rng.randrange(len(types))] = rng.choice([float("inf"), float("nan"), 1e30, -1.0])
            ops.append("token_type as float32")
            return
        else:
            kv[2] = (STR, ["1"] * len(types))
            ops.append("token_type as strings")
            return
        kv[2] = (I32, types)
        ops.append(f"token_type edit {c}")
    elif k == 6:
        kv = _find_array(img, "tokenizer.ggml.merges", STR)
        if kv is None:
            return
        merges = list(kv[2][1])
        merges.append(rng.choice(["a", "a ", " a", "x y", "Ġ t", "ĠĠ ĠĠ", "", "a b c", "<|eot_id|> a",
                                  "Ġt he"]))
        kv[2] = (STR, merges)
        ops.append(f"merge added {merges[-1]!r}")
    elif k == 7:
        kv = rng.choice([kv for kv in img.kvs if isinstance(kv[0], str)])
        img.kvs.remove(kv)
        ops.append(f"kv {kv[0]} removed")
    elif k == 8:
        kv = rng.choice(img.kvs)
        img.kvs.insert(rng.randrange(len(img.kvs) + 1), list(kv))
        ops.append(f"kv {kv[0]!r} duplicated")
    elif k == 9:
        depth = rng.randint(1, 5)
        v = (U8, [1, 2, 3])
        for _ in range(depth):
            v = (ARR, [v, v])
        key = rng.choice(["junk.nested", "", b"\xff\xfe", "x" * 300])
        img.kvs.insert(rng.randrange(len(img.kvs) + 1), [key, ARR, v])
        ops.append(f"nested array {depth} deep under {key!r:.20}")
    elif k == 10:
        count = rng.choice([2 ** 32, 2 ** 63, 2 ** 64 - 1, 10 ** 6, 3])
        itype = rng.choice([U8, STR, ARR, U64, 99])
        img.kvs.insert(rng.randrange(len(img.kvs) + 1), ["junk.big", ARR, (itype, [], count)])
        ops.append(f"array claims {count} items of type {itype}")
    elif k == 11:
        t = rng.choice(img.tensors)
        t.name = rng.choice(["blk.99.attn_q.weight", "blk.-1.attn_q.weight", "blk.01.attn_q.weight", "",
                             "unknown.weight", b"\xff.weight", "output.weight", "rope_freqs.weight",
                             "token_embd.weight", rng.choice(img.tensors).name, "blk.0.attn_q.bias"])
        ops.append(f"tensor renamed to {t.name!r}")
    elif k == 12:
        t = rng.choice(img.tensors)
        old = list(t.dims)
        c = rng.randrange(8) if t.dims else 1
        if c == 0:
            t.dims = list(reversed(t.dims))
        elif c == 1:
            t.dims = t.dims + [1]
        elif c == 2:
            t.dims = t.dims + [1, 1, 1, 1]
        elif c == 3:
            t.dims = []
        elif c == 4:
            t.dims = [0] + t.dims[1:]
        elif c == 5:
            t.dims = t.dims[:-1] + [rng.choice([2 ** 40, 2 ** 63, 2 ** 64 - 1, 2 ** 32 + 1])]
        elif c == 6:
            t.dims = [2 ** 32, 2 ** 32]
        else:
            t.dims = [t.dims[0] * 2] + t.dims[1:]
        ops.append(f"tensor {t.name!r} dims {old} -> {t.dims}")
    elif k == 13:
        t = rng.choice(img.tensors)
        old = t.type
        t.type = rng.choice([0, 1, 2, 3, 8, 30, 6, 9, 10, 12, 14, 20, 24, 26, 28, 39, 99, 2 ** 31])
        if rng.random() < 0.5 and t.type in GGML_BLOCKS:
            per, bsz = GGML_BLOCKS[t.type]
            if t.dims and t.dims[0] % per == 0:
                want = math.prod(t.dims[1:]) * (t.dims[0] // per) * bsz
                if want <= 1 << 22:
                    t.data = (t.data * (want // max(len(t.data), 1) + 1))[:want]
        ops.append(f"tensor {t.name!r} type {old} -> {t.type}")
    elif k == 14:
        t = rng.choice(img.tensors)
        img.tensors.remove(t)
        ops.append(f"tensor {t.name!r} dropped")
    elif k == 15:
        t = rng.choice(img.tensors)
        img.tensors.insert(rng.randrange(len(img.tensors) + 1), copy.copy(t))
        ops.append(f"tensor {t.name!r} duplicated")
    elif k == 16:
        kv = _find_kv(img, "general.alignment")
        a = rng.choice([1, 8, 16, 64, 128, 0, 3, 48, 2 ** 31, 2 ** 32])
        consistent = rng.random() < 0.5 and a in (1, 8, 16, 64, 128)
        if kv is not None:
            kv[1], kv[2] = (U32, a) if a < 2 ** 32 else (U64, a)
        if consistent:
            img.alignment = a
        ops.append(f"general.alignment = {a} ({'layout follows' if consistent else 'layout kept'})")
    else:
        c = rng.randrange(4)
        if c == 0:
            img.version = rng.choice([0, 1, 2, 4, 0x03000000, 2 ** 32 - 1])
            ops.append(f"version {img.version}")
        elif c == 1:
            img.tensor_count = len(img.tensors) + rng.choice([-1, 1, 2 ** 32, 2 ** 63])
            ops.append(f"tensor_count {img.tensor_count}")
        elif c == 2:
            img.kv_count = max(0, len(img.kvs) + rng.choice([-1, 1, 2 ** 32, 2 ** 63]))
            ops.append(f"kv_count {img.kv_count}")
        else:
            img.magic = rng.choice([b"GGUG", b"FUGG", b"\0\0\0\0", b"GGML"])
            ops.append(f"magic {img.magic!r}")


def mutate_gguf_raw(buf: bytearray, regions: dict, rng: random.Random, ops: list) -> bytearray:
    size = len(buf)
    k = rng.randrange(9)
    if k <= 1:
        marks = [0, 4, 8, 16, 23, 24, 25, size - 1]
        for r in ("kv", "tensor_info", "data"):
            marks += [regions[r][0] - 1, regions[r][0], regions[r][0] + 1, regions[r][1] - 1]
        for start, vstart, end in regions["kv_pos"][:64]:
            marks += [vstart, end - 1]
        cut = rng.choice(marks) if rng.random() < 0.6 else rng.randrange(size)
        cut = max(0, min(size, cut))
        ops.append(f"truncate to {cut} of {size}")
        return buf[:cut]
    if k <= 3 and regions["ti_pos"]:
        start, dpos, tpos, opos, end = rng.choice(regions["ti_pos"])
        c = rng.randrange(5)
        if c == 0:
            v = rng.choice(INTERESTING_U32)
            struct.pack_into("<I", buf, dpos - 4, v)
            ops.append(f"tensor info n_dims -> {v}")
        elif c == 1 and tpos > dpos:
            j = dpos + 8 * rng.randrange((tpos - dpos) // 8)
            v = rng.choice(INTERESTING_U64)
            struct.pack_into("<Q", buf, j, v)
            ops.append(f"tensor info dim -> {v}")
        elif c == 2:
            v = rng.choice(INTERESTING_U32)
            struct.pack_into("<I", buf, tpos, v)
            ops.append(f"tensor info type -> {v}")
        elif c == 3:
            others = [struct.unpack_from("<Q", buf, p[3])[0] for p in regions["ti_pos"]]
            cur = struct.unpack_from("<Q", buf, opos)[0]
            v = rng.choice(INTERESTING_U64 + others + [cur + 32, cur - 32, cur + 1, size])
            v %= 1 << 64
            struct.pack_into("<Q", buf, opos, v)
            ops.append(f"tensor info offset {cur} -> {v}")
        else:
            v = rng.choice(INTERESTING_U64)
            struct.pack_into("<Q", buf, start, v)
            ops.append(f"tensor name length -> {v}")
        return buf
    if k == 4 and regions["kv_pos"]:
        start, vstart, end = rng.choice(regions["kv_pos"])
        c = rng.randrange(3)
        if c == 0:
            v = rng.choice(INTERESTING_U64)
            struct.pack_into("<Q", buf, start, v)
            ops.append(f"kv key length -> {v}")
        elif c == 1:
            v = rng.choice(list(range(14)) + [99, 2 ** 32 - 1])
            struct.pack_into("<I", buf, vstart - 4, v)
            ops.append(f"kv value type -> {v}")
        elif end - vstart >= 12:
            v = rng.choice(INTERESTING_U64)
            j = vstart if rng.random() < 0.5 else vstart + 4
            struct.pack_into("<Q", buf, j, v)
            ops.append(f"kv value length/count at +{j - vstart} -> {v}")
        return buf
    if k == 5:
        struct.pack_into("<Q", buf, rng.choice([8, 16]), rng.choice(INTERESTING_U64))
        ops.append("header count set")
        return buf
    if k == 6:
        extra = rng.choice([1, 31, 32, 4096])
        ops.append(f"append {extra} bytes")
        return buf + bytes(extra)
    region = rng.choice(["header", "kv", "kv", "tensor_info", "tensor_info", "data"])
    a, b = regions[region]
    if b <= a:
        return buf
    n = rng.randint(1, 8)
    for _ in range(n):
        j = rng.randrange(a, b)
        buf[j] = buf[j] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
    ops.append(f"{n} byte flips in {region}")
    return buf


def mutate_gguf(base: GGUFImage, rng: random.Random, ops: list) -> bytes:
    # the mutators replace values and lists, never edit them in place: shallow copies do
    img = dataclasses.replace(base, kvs=[list(kv) for kv in base.kvs],
                              tensors=[copy.copy(t) for t in base.tensors])
    for _ in range(rng.choice([0, 1, 1, 1, 2])):
        mutate_gguf_struct(img, rng, ops)
    buf, regions = img.serialize()
    buf = bytearray(buf)
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        size = len(buf)
        buf = mutate_gguf_raw(buf, regions, rng, ops)
        if len(buf) < size:
            break
    return bytes(buf)


# ----------------------------------------------------------------------------- the real GGUF

def scan_gguf(raw) -> dict:
    """Positions of the fields of a valid GGUF (the real SmolLM2 file): for raw edits."""
    pos = 24
    kv_count = struct.unpack_from("<Q", raw, 16)[0]
    t_count = struct.unpack_from("<Q", raw, 8)[0]
    kv_pos, lengths = [], []
    align = 32

    def skip(vtype, p):
        if vtype in _VFMT:
            return p + struct.calcsize(_VFMT[vtype])
        if vtype == STR:
            n = struct.unpack_from("<Q", raw, p)[0]
            lengths.append(p)
            return p + 8 + n
        itype, count = struct.unpack_from("<IQ", raw, p)
        lengths.append(p + 4)
        p += 12
        if itype in _VFMT:
            return p + count * struct.calcsize(_VFMT[itype])
        for _ in range(count):
            p = skip(itype, p)
        return p

    for _ in range(kv_count):
        start = pos
        n = struct.unpack_from("<Q", raw, pos)[0]
        key = bytes(raw[pos + 8:pos + 8 + n]).decode()
        pos += 8 + n
        vtype = struct.unpack_from("<I", raw, pos)[0]
        pos += 4
        vstart = pos
        pos = skip(vtype, pos)
        if key == "general.alignment":
            align = struct.unpack_from(_VFMT[vtype], raw, vstart)[0]
        kv_pos.append((start, vstart, pos))
    kv_end = pos
    ti_pos = []
    for _ in range(t_count):
        start = pos
        n = struct.unpack_from("<Q", raw, pos)[0]
        pos += 8 + n
        nd = struct.unpack_from("<I", raw, pos)[0]
        dpos = pos + 4
        tpos = dpos + 8 * nd
        ti_pos.append((start, dpos, tpos, tpos + 4, tpos + 12))
        pos = tpos + 12
    data = pos + (-pos) % align
    return {"header": (0, 24), "kv": (24, kv_end), "tensor_info": (kv_end, pos), "data": (data, len(raw)),
            "kv_pos": kv_pos, "ti_pos": ti_pos, "lengths": lengths}


def mutate_smol(raw, regions: dict, rng: random.Random, ops: list):
    """-> (prefix bytes, keep_rest): the mutated head, and whether the rest of the real file follows."""
    head_end = regions["data"][0]
    if rng.random() < 0.35:
        cut = rng.choice([rng.randrange(head_end), rng.randrange(len(raw)), head_end, head_end - 1,
                          len(raw) - 1, regions["tensor_info"][0]])
        ops.append(f"truncate to {cut} of {len(raw)}")
        return bytes(raw[:cut]), False
    buf = bytearray(raw[:head_end])
    for _ in range(rng.randint(1, 3)):
        c = rng.randrange(5)
        if c == 0 and regions["lengths"]:
            p = rng.choice(regions["lengths"])
            cur = struct.unpack_from("<Q", buf, p)[0]
            v = rng.choice(INTERESTING_U64 + [cur + 1, cur - 1, cur * 2]) % (1 << 64)
            struct.pack_into("<Q", buf, p, v)
            ops.append(f"length/count at {p} {cur} -> {v}")
        elif c == 1:
            buf = mutate_gguf_raw(buf, dict(regions, data=(head_end, head_end)), rng, ops)
            if len(buf) < head_end:
                return bytes(buf), False
        elif c == 2:
            start, vstart, end = rng.choice(regions["kv_pos"])
            struct.pack_into("<I", buf, vstart - 4, rng.choice(list(range(13)) + [99]))
            ops.append(f"kv value type at {vstart - 4} changed")
        else:
            a, b = regions[rng.choice(["kv", "tensor_info", "header"])]
            for _ in range(rng.randint(1, 6)):
                j = rng.randrange(a, b)
                buf[j] = rng.randrange(256)
            ops.append(f"bytes set in [{a}, {b})")
    return bytes(buf), True


# ============================================================================= bases

MODEL_BASES = ("hf-q4_0", "hf-f16", "hf-untied-q4_1", "hf-untied-q8_0", "gguf-source")
GGUF_BASES = ("gguf-untied", "gguf-tied")


def build_bases(workdir: Path) -> Path:
    """Write every base file into workdir/bases (deterministic); return that folder."""
    from llamacpu.convert import convert

    d = Path(workdir) / "bases"
    if (d / "done").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    tied = write_hf_checkpoint(d / "hf-tied", n_merges=3, tie=True, seed=1)          # vocab 264
    untied = write_hf_checkpoint(d / "hf-untied", n_merges=0, tie=False, seed=2)     # vocab 261
    convert(tied, d / "hf-q4_0.lcpu", type="q4_0", progress=False, quiet=True)
    convert(tied, d / "hf-f16.lcpu", type="f16", progress=False, quiet=True)
    convert(untied, d / "hf-untied-q4_1.lcpu", type="q4_1", progress=False, quiet=True)
    convert(untied, d / "hf-untied-q8_0.lcpu", type="q8_0", progress=False, quiet=True)
    bases = {"gguf-untied": gguf_base(3, tie=False, seed=3, rope_freqs=True, pre="llama-bpe"),
             "gguf-tied": gguf_base(0, tie=True, seed=4, rope_freqs=False, pre="smollm")}
    for name, img in bases.items():
        (d / f"{name}.gguf").write_bytes(img.serialize()[0])
    convert(d / "gguf-untied.gguf", d / "gguf-source.lcpu", progress=False, quiet=True)
    (d / "done").write_text("ok\n")
    return d


# ============================================================================= running one case

class Context:
    """What a worker keeps between cases: the bases in memory, a scratch folder."""

    def __init__(self, bases_dir: Path, scratch: Path, smol_path=None):
        self.bases_dir = Path(bases_dir)
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.models = {n: (self.bases_dir / f"{n}.lcpu").read_bytes() for n in MODEL_BASES}
        self.ggufs = {"gguf-untied": gguf_base(3, tie=False, seed=3, rope_freqs=True, pre="llama-bpe"),
                      "gguf-tied": gguf_base(0, tie=True, seed=4, rope_freqs=False, pre="smollm")}
        self.smol_path = smol_path
        self._smol = None

    def smol(self):
        if self._smol is None:
            import mmap
            f = open(self.smol_path, "rb")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._smol = (f, mm, scan_gguf(mm))
        return self._smol


def pick_target(rng: random.Random, smol: float) -> str:
    # the same draws whatever `smol` is: a seed that is not a smol case is the same case
    # with any --smol
    if rng.random() < smol:
        return "smol"
    return "model" if rng.random() < 0.7 else "gguf"


def exercise(path, rng: random.Random, ops: list) -> str:
    """read_model -> Model -> forwards (-> tokenizer). Raises what the code under test raises."""
    from llamacpu.format import read_model
    from llamacpu.model import Model

    with read_model(path) as mf:
        n_ctx = min(8, mf.config.max_position_embeddings)
        meta = mf.meta
    # mostly one thread: OpenMP barriers cost a scheduler slice on a busy machine (a 2-thread
    # forward of this tiny model took 440 ms on a loaded 2-core box, 0.03 ms with one thread)
    with Model(path, n_ctx=n_ctx, n_threads=2 if rng.random() < 0.02 else 1) as m:
        v = m.vocab_size
        n = min(rng.choice([1, 2, 3]), n_ctx)
        toks = [rng.choice([0, v - 1, rng.randrange(v)]) for _ in range(n)]
        out = m.forward(toks, pos=0, all_logits=rng.random() < 0.3)
        if out.shape[-1] != v:
            raise AssertionError(f"logits shape {out.shape}, vocab {v}")
        if n < n_ctx:
            m.forward([toks[-1]], pos=n)
    stage = "loaded"
    if rng.random() < 0.5:
        from llamacpu.tokenizer import Tokenizer
        try:
            tok = Tokenizer.from_metadata(meta)
            ids = tok.encode("Hello, world! <|eot_id|>", special=True)
            tok.decode([i for i in ids if i < tok.vocab_size])
            stage = "loaded+tokenizer"
        except ValueError as e:  # Tokenizer's answer to a tokenizer.json it cannot use
            ops.append(f"tokenizer: {type(e).__name__}: {str(e)[:80]}")
            stage = "loaded, tokenizer refused"
    return stage


def run_case(seed: int, ctx: Context, smol: float = 0.0, keep=None) -> dict:
    """Run one case; never raises. Returns {seed, target, base, ops, outcome, detail, secs}."""
    from llamacpu.errors import ModelFormatError

    t0 = time.perf_counter()
    rng = random.Random(seed)
    target = pick_target(rng, smol)
    ops: list = []
    res = {"seed": seed, "target": target, "base": None, "ops": ops, "stage": "mutate"}
    path = ctx.scratch / f"case-{os.getpid()}"
    out = ctx.scratch / f"out-{os.getpid()}.lcpu"
    try:
        for p in (path, out):
            if p.exists():
                p.unlink()
        if target == "model":
            if rng.random() < 0.2:
                res["base"] = "random-shape"
                img, desc = random_shape_model(rng)
                ops += desc
                data = mutate_model(b"", rng, ops, shape_image=img) if rng.random() < 0.7 \
                    else img.serialize()[0]
            else:
                res["base"] = rng.choice(MODEL_BASES)
                data = mutate_model(ctx.models[res["base"]], rng, ops)
            path.write_bytes(data)
        elif target == "gguf":
            res["base"] = rng.choice(GGUF_BASES)
            path.write_bytes(mutate_gguf(ctx.ggufs[res["base"]], rng, ops))
        else:
            res["base"] = "smollm2"
            f, mm, regions = ctx.smol()
            head, keep_rest = mutate_smol(mm, regions, rng, ops)
            with open(path, "wb") as g:
                g.write(head)
                if keep_rest:
                    rest = regions["data"][0]
                    f.seek(rest)
                    shutil.copyfileobj(f, g, 16 << 20)
        if keep:
            shutil.copyfile(path, keep)
        res["stage"] = "run"
        if target == "model":
            res["outcome"] = exercise(path, rng, ops)
        else:
            from llamacpu.convert import convert
            from llamacpu.gguf import GGUFFile
            with GGUFFile(path) as g:
                n_t = len(g.tensors)
            ops.append(f"GGUFFile read ({n_t} tensors)")
            ttype = rng.choice([None, None, None, None, "q8_0", "f16", "q4_0", "q4_1", "f32"]) \
                if target == "gguf" else None
            convert(path, out, type=ttype, progress=False, quiet=True)
            ops.append(f"converted (type {ttype})")
            res["outcome"] = "converted+" + exercise(out, rng, ops)
    except ModelFormatError as e:
        res["outcome"] = "rejected"
        res["detail"] = str(e)[-300:]
    except BaseException as e:  # noqa: BLE001 - anything else is what we are looking for
        if isinstance(e, KeyboardInterrupt):
            raise
        res["outcome"] = "error" if res["stage"] == "run" else "tool-error"
        res["detail"] = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-4000:]
    res["secs"] = round(time.perf_counter() - t0, 4)
    for p in (path, out):
        try:
            p.unlink()
        except OSError:
            pass
    return res


def _selftest_hook(seed: int) -> None:
    """LLAMACPU_FUZZ_SELFTEST="crash:5,hang:7,raise:9,abort:11,slow:13": misbehave on those
    seeds (tests of the harness itself; slow: take 2 s, then run the case)."""
    spec = os.environ.get("LLAMACPU_FUZZ_SELFTEST")
    if not spec:
        return
    for item in spec.split(","):
        what, _, s = item.partition(":")
        if s and int(s) == seed:
            if what == "crash":
                import ctypes
                ctypes.string_at(0)  # SIGSEGV
            elif what == "abort":
                os.abort()
            elif what == "hang":
                while True:
                    time.sleep(1)
            elif what == "slow":
                time.sleep(2)
            elif what == "raise":
                raise KeyError("selftest")
            elif what == "exit":
                os._exit(1)


# ============================================================================= worker process

def worker_main(args) -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stray prints (C or Python) must not corrupt the protocol
    import faulthandler
    import warnings
    faulthandler.enable(sys.stderr)
    warnings.simplefilter("ignore", RuntimeWarning)  # numpy overflow / NaN casts of mutated values
    if args.mem_limit_gb and "asan" not in os.environ.get("LD_PRELOAD", ""):
        import resource
        lim = int(args.mem_limit_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    ctx = Context(args.bases, args.scratch, args.smol_path)
    proto.write("ready\n")
    for line in sys.stdin:
        seed = int(line)
        sys.stderr.write(f"case {seed}\n")
        sys.stderr.flush()
        try:
            _selftest_hook(seed)
            res = run_case(seed, ctx, args.smol)
        except KeyError as e:  # the selftest's "raise"
            res = {"seed": seed, "target": "selftest", "base": None, "ops": [], "outcome": "error",
                   "detail": repr(e), "secs": 0.0}
        proto.write(json.dumps(res) + "\n")
    return 0


BAD = ("error", "tool-error", "crash", "hang")  # outcomes that are findings ("tool-error": a mutator bug)


@dataclass
class Summary:
    n: int = 0
    counts: dict = field(default_factory=dict)   # "target outcome" -> count
    findings: list = field(default_factory=list)  # dicts with seed, kind, detail
    seconds: float = 0.0
    restarts: int = 0
    distinct_rejections: int = 0
    smol: float = 0.0

    @property
    def rate(self) -> float:
        return self.n / self.seconds if self.seconds else 0.0

    def report(self) -> str:
        lines = [f"{self.n} cases in {self.seconds:.1f} s ({self.rate:.1f}/s), {len(self.findings)} findings, "
                 f"{self.restarts} worker restarts, {self.distinct_rejections} distinct ModelFormatError messages"]
        for k in sorted(self.counts):
            lines.append(f"  {k:<40} {self.counts[k]}")
        for f in self.findings[:50]:
            lines.append(f"FINDING seed={f['seed']} {f['kind']} target={f.get('target')} base={f.get('base')} "
                         f"ops={f.get('ops')}\n    " + str(f.get("detail", "")).strip().replace("\n", "\n    "))
        if self.findings:
            lines.append(f"replay one with: python tools/fuzz_loader.py --replay SEED --smol {self.smol}")
        return "\n".join(lines)


class _Worker:
    def __init__(self, idx: int, argv: list, log: Path, env: dict):
        self.idx, self.argv, self.log_path, self.env = idx, argv, log, env
        self.proc = None
        self.buf = b""
        self.seed = None
        self.deadline = None

    def start(self):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=self.env, cwd=str(REPO))
        self.buf = b""
        self.seed = None
        self.ready = False
        os.set_blocking(self.proc.stdout.fileno(), False)

    def send(self, seed: int, timeout: float):
        self.seed = seed
        self.deadline = time.monotonic() + timeout
        self.proc.stdin.write(f"{seed}\n".encode())
        self.proc.stdin.flush()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait()
            for s in (self.proc.stdin, self.proc.stdout):
                try:
                    s.close()
                except OSError:
                    pass
        self.log.close()

    def log_tail(self, n=3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - n))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


def run_campaign(n: int, seed: int = 0, jobs: int | None = None, timeout: float = 20.0, out=None,
                 smol: float = 0.0, workdir=None, progress: bool = True, mem_limit_gb: float = 8.0,
                 env: dict | None = None, retry_factor: float = 5.0) -> Summary:
    """Run cases seed .. seed + n - 1 in `jobs` worker processes; return the Summary.

    A case that does not answer within `timeout` seconds runs once more, on a fresh
    worker, with retry_factor * timeout (a busy machine can starve a worker); only a
    second timeout is a hang."""
    jobs = jobs or os.cpu_count() or 1
    own_tmp = None
    if workdir is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        own_tmp = tempfile.mkdtemp(prefix="llamacpu-fuzz-", dir=base)
        workdir = own_tmp
    workdir = Path(workdir)
    smol_path = None
    if smol > 0:
        import fetch_assets
        smol_path = str(fetch_assets.asset_path("SmolLM2-135M-Instruct.Q4_1.gguf"))
    bases = build_bases(workdir)
    wenv = dict(os.environ if env is None else env)
    wenv.setdefault("OPENBLAS_NUM_THREADS", "1")
    wenv["PYTHONFAULTHANDLER"] = "1"
    outf = None  # opened at the first finding
    summary = Summary(smol=smol)
    t0 = time.monotonic()
    messages = set()
    workers = []
    sel = selectors.DefaultSelector()

    def argv_for(i):
        a = [sys.executable, str(Path(__file__).resolve()), "--worker", "--bases", str(bases),
             "--scratch", str(workdir / f"w{i}"), "--smol", str(smol), "--mem-limit-gb", str(mem_limit_gb)]
        if smol_path:
            a += ["--smol-path", smol_path]
        return a

    def start(w):
        w.start()
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        w.deadline = time.monotonic() + max(120.0, timeout)  # start-up: imports, bases

    def restart(w):
        try:
            sel.unregister(w.proc.stdout)
        except (KeyError, ValueError):
            pass
        w.kill()
        summary.restarts += 1
        start(w)

    def record(res):
        summary.n += 1
        outcome = res["outcome"] if res["outcome"] in BAD + ("rejected",) else "loaded"
        key = f"{res['target']} {outcome}"
        summary.counts[key] = summary.counts.get(key, 0) + 1
        detail_key = f"{res['target']} {res['outcome']}"
        if detail_key != key:
            summary.counts["  " + detail_key] = summary.counts.get("  " + detail_key, 0) + 1
        if res["outcome"] == "rejected":
            msg = res.get("detail", "")
            msg = msg.split(": ", 1)[-1] if "case-" in msg.split(": ", 1)[0] else msg
            messages.add(''.join(c for c in msg if not c.isdigit())[:120])
        if res["outcome"] in BAD:
            f = {"seed": res["seed"], "kind": res["outcome"], "target": res["target"], "base": res.get("base"),
                 "ops": res.get("ops"), "detail": res.get("detail", ""), "smol": smol}
            summary.findings.append(f)
            if out:
                nonlocal outf
                if outf is None:
                    outf = open(out, "a")
                outf.write(json.dumps(f) + "\n")
                outf.flush()
            if progress:
                print(f"\nFINDING seed={f['seed']} {f['kind']}: {str(f['detail']).strip().splitlines()[-1:]}",
                      file=sys.stderr, flush=True)

    pending = list(range(seed, seed + n))
    pending.reverse()  # a stack: pop() gives the next seed; a timed-out seed is pushed back on top
    retried = set()
    try:
        for i in range(min(jobs, n)):
            w = _Worker(i, argv_for(i), workdir / f"worker-{i}.log", wenv)
            workers.append(w)
            start(w)
        last_print = 0.0
        while summary.n < n:
            now = time.monotonic()
            wait = min([w.deadline for w in workers if w.deadline] + [now + 1.0]) - now
            for key, _ in sel.select(timeout=max(0.0, wait)):
                w = key.data
                try:
                    chunk = os.read(w.proc.stdout.fileno(), 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:  # the worker died
                    rc = w.proc.wait()
                    if w.seed is not None:
                        sig = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
                        record({"seed": w.seed, "target": "?", "outcome": "crash",
                                "detail": f"worker died ({sig}); its log ends:\n{w.log_tail()}"})
                    elif not w.ready:
                        raise RuntimeError(f"fuzz worker failed to start:\n{w.log_tail()}")
                    restart(w)
                    continue
                w.buf += chunk
                while b"\n" in w.buf:
                    line, w.buf = w.buf.split(b"\n", 1)
                    if line == b"ready":
                        w.ready = True
                    else:
                        res = json.loads(line)
                        res["target"] = res.get("target") or "?"
                        record(res)
                    w.seed = None
                    w.deadline = None
                    if pending:
                        nxt = pending.pop()
                        w.send(nxt, timeout * (retry_factor if nxt in retried else 1))
            now = time.monotonic()
            for w in workers:
                if w.deadline and now > w.deadline:
                    if w.seed is not None and w.seed not in retried:
                        # a busy machine can starve a worker: run the case again before calling it a hang
                        retried.add(w.seed)
                        pending.append(w.seed)
                        summary.counts["(timeouts retried)"] = summary.counts.get("(timeouts retried)", 0) + 1
                    elif w.seed is not None:
                        record({"seed": w.seed, "target": "?", "outcome": "hang",
                                "detail": f"no answer in {timeout} s, nor in {retry_factor * timeout} s on a "
                                          f"second try; its log ends:\n{w.log_tail()}"})
                    elif not w.ready:
                        raise RuntimeError(f"fuzz worker did not start:\n{w.log_tail()}")
                    restart(w)
            # a restarted worker gets its next seed once it says ready (handled above)
            if progress and now - last_print > 2.0:
                last_print = now
                el = now - t0
                print(f"\r{summary.n}/{n} cases, {summary.n / max(el, 1e-9):.1f}/s, "
                      f"{len(summary.findings)} findings", end="", file=sys.stderr, flush=True)
    finally:
        for w in workers:
            try:
                w.proc.stdin.close()
            except OSError:
                pass
            w.kill()
        if outf:
            outf.close()
        summary.seconds = time.monotonic() - t0
        summary.distinct_rejections = len(messages)
        if own_tmp:
            shutil.rmtree(own_tmp, ignore_errors=True)
    if progress:
        print(file=sys.stderr)
    return summary


def replay(seed: int, smol: float, keep=None) -> int:
    """Run one case in this process and print everything about it."""
    import faulthandler
    import warnings
    faulthandler.enable()
    warnings.simplefilter("ignore", RuntimeWarning)
    tmp = tempfile.mkdtemp(prefix="llamacpu-fuzz-replay-")
    try:
        bases = build_bases(Path(tmp))
        smol_path = None
        if smol > 0:
            import fetch_assets
            smol_path = str(fetch_assets.asset_path("SmolLM2-135M-Instruct.Q4_1.gguf"))
        ctx = Context(bases, Path(tmp) / "scratch", smol_path)
        _selftest_hook(seed)
        res = run_case(seed, ctx, smol, keep=keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"seed {seed}: target {res['target']}, base {res['base']}")
    for op in res["ops"]:
        print(f"  {op}")
    print(f"outcome: {res['outcome']} ({res['secs']:.3f} s)")
    if res.get("detail"):
        print(res["detail"])
    return 1 if res["outcome"] in ("error", "tool-error") else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="number of cases (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--out", default="fuzz-findings.jsonl", help="findings, one JSON object a line")
    ap.add_argument("--smol", type=float, default=None,
                    help="fraction of cases on the real SmolLM2 GGUF (about 0.15 s each; default 0.01 "
                         "when tools/fetch_assets.py has fetched it, else 0)")
    ap.add_argument("--mem-limit-gb", type=float, default=8.0, help="address-space limit of a worker (0: none)")
    ap.add_argument("--replay", type=int, default=None, metavar="SEED", help="run one case here and explain it")
    ap.add_argument("--keep", default=None, help="with --replay: copy the mutated input file here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bases", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    ap.add_argument("--smol-path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.smol is None:
        import fetch_assets
        have = (fetch_assets.assets_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
        args.smol = 0.01 if have else 0.0
    if args.replay is not None:
        return replay(args.replay, args.smol, args.keep)
    if args.n < 1:
        ap.error("--n must be >= 1")
    print(f"fuzzing {args.n} cases (seeds {args.seed}..{args.seed + args.n - 1}), "
          f"{args.jobs or os.cpu_count()} workers, timeout {args.timeout} s, smol {args.smol}", file=sys.stderr)
    s = run_campaign(args.n, seed=args.seed, jobs=args.jobs, timeout=args.timeout, out=args.out, smol=args.smol,
                     mem_limit_gb=args.mem_limit_gb)
    print(s.report())
    if s.findings:
        print(f"findings written to {args.out}")
    return 1 if s.findings else 0


if __name__ == "__main__":
    sys.exit(main())
