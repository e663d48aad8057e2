#!/usr/bin/env python3
"""Write a random-weight Llama 3.2 checkpoint in the exact Hugging Face layout.

    python tools/make_checkpoint.py --preset 1b --out /tmp/ckpt1b [--seed 0] [--shards 1]
                                    [--layers N] [--dtype bf16|f16|f32]

The folder looks like `huggingface-cli download meta-llama/Llama-3.2-1B-Instruct`:
config.json, generation_config.json, model.safetensors (or model-0000i-of-0000K
shards + model.safetensors.index.json), tokenizer.json, tokenizer_config.json
(with a chat_template), special_tokens_map.json.

Tensors are generated and written one chunk at a time, so peak memory stays small
even for the 3B preset. Every tensor has its own random stream seeded by
(seed, crc32(name)): the values of a tensor do not depend on the preset's layer
count, on sharding or on the output dtype (bf16/f16 are rounded from the same
float32 draws, round to nearest even).

Python API (tests do `sys.path.insert(0, "tools")`):
    write_checkpoint(out_dir, preset="tiny64", seed=0, shards=1, layers=None,
                     tokenizer_json=..., tokenizer_config=..., dtype="bf16") -> Path
"""
from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER_JSON = REPO / "assets" / "llama3.2-tokenizer.json"
DEFAULT_TOKENIZER_CONFIG = REPO / "assets" / "llama3.2-tokenizer_config.json"

# Shapes. Everything else in config.json is the real Llama 3.2 Instruct value.
# rope_theta 500000 exercises all three llama3 frequency branches for head_dim 64
# (i 0-14 unchanged, 15-17 smoothed, 18-31 divided by factor) and for head_dim 128
# (0-28, 29-34, 35-63), so the tiny presets keep the real value.
PRESETS = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, head_dim=128),
    "tiny64": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "tiny128": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=128),
}

ROPE_SCALING = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

# Llama 3.2 Instruct's chat template (tool calling as JSON in the first user message,
# "Environment: ipython" system line, ipython role for tool results).
LLAMA32_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

SAFETENSORS_DTYPE = {"bf16": "BF16", "f16": "F16", "f32": "F32"}
ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4}
CHUNK_ELEMS = 1 << 22          # 4 Mi values (16 MiB of float32) per generation step


# ----------------------------------------------------------------------------- config

def make_config(preset: str, layers: int | None = None) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = dict(PRESETS[preset])
    if layers is not None:
        if layers < 1:
            raise ValueError("layers must be >= 1")
        p["num_hidden_layers"] = int(layers)
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "head_dim": p["head_dim"],
        "hidden_act": "silu",
        "hidden_size": p["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": p["intermediate_size"],
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": p["num_attention_heads"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_key_value_heads": p["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": dict(ROPE_SCALING),
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0",
        "use_cache": True,
        "vocab_size": 128256,
    }


GENERATION_CONFIG = {
    "bos_token_id": 128000,
    "do_sample": True,
    "eos_token_id": [128001, 128008, 128009],
    "temperature": 0.6,
    "top_p": 0.9,
    "transformers_version": "4.45.0.dev0",
}


def rope_branches(head_dim: int, theta: float, rope_scaling: dict) -> dict:
    """Which inv_freq indices fall in each llama3 branch: {'unchanged', 'smooth', 'scaled'} -> [i]."""
    orig = float(rope_scaling["original_max_position_embeddings"])
    high_wl = orig / float(rope_scaling["high_freq_factor"])
    low_wl = orig / float(rope_scaling["low_freq_factor"])
    out = {"unchanged": [], "smooth": [], "scaled": []}
    for i in range(head_dim // 2):
        wavelen = 2 * math.pi / (theta ** (-2 * i / head_dim))
        key = "unchanged" if wavelen < high_wl else "scaled" if wavelen > low_wl else "smooth"
        out[key].append(i)
    return out


# ----------------------------------------------------------------------------- tensors

def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init kind) in the order transformers' state_dict lists them."""
    D, F = config["hidden_size"], config["intermediate_size"]
    H, KV, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    specs = [("model.embed_tokens.weight", (config["vocab_size"], D), "embed")]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        specs += [
            (p + "self_attn.q_proj.weight", (H * hd, D), "qk"),
            (p + "self_attn.k_proj.weight", (KV * hd, D), "qk"),
            (p + "self_attn.v_proj.weight", (KV * hd, D), "in"),
            (p + "self_attn.o_proj.weight", (D, H * hd), "out"),
            (p + "mlp.gate_proj.weight", (F, D), "in"),
            (p + "mlp.up_proj.weight", (F, D), "in"),
            (p + "mlp.down_proj.weight", (D, F), "out"),
            (p + "input_layernorm.weight", (D,), "norm"),
            (p + "post_attention_layernorm.weight", (D,), "norm"),
        ]
    specs.append(("model.norm.weight", (D,), "final_norm"))
    if not config.get("tie_word_embeddings", True):
        specs.append(("lm_head.weight", (config["vocab_size"], D), "head"))
    return specs


def _init(kind: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor's normal draw. All activations stay O(1)-O(10).

    v/gate/up get std 1/sqrt(in). q/k get 1/sqrt(in), so q.k/sqrt(head_dim) has std
    ~1: attention is position-selective without being one-hot (a RoPE mistake still
    moves the logits by O(1)), and the F16 KV cache costs about 4e-4 of the logits,
    as in the engine issue's tolerance budget (with std ~4 it cost 2e-3). o_proj/down_proj get 2/sqrt(in), so the blocks' output
    dominates the residual stream over the token embedding (std 1/sqrt(hidden)):
    with a tied head, a large embedding makes a random model predict its input token
    again and again. The final norm's weights (mean 6) then spread the logits to
    std ~6 over the vocabulary (median top1-top2 gap ~1; greedy runs rarely repeat a
    token). Norm weights vary +-10% around their mean, so a misapplied norm weight
    is caught.
    """
    if kind in ("in", "head"):
        return 0.0, 1.0 / math.sqrt(shape[-1])
    if kind == "qk":
        return 0.0, 1.0 / math.sqrt(shape[-1])
    if kind == "out":
        return 0.0, 2.0 / math.sqrt(shape[-1])
    if kind == "embed":
        return 0.0, 1.0 / math.sqrt(shape[-1])
    if kind == "norm":
        return 1.0, 0.1
    if kind == "final_norm":
        return 6.0, 0.6
    raise ValueError(kind)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (no NaNs expected)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).copy()
    lsb = (u >> 16) & 1
    u += 0x7FFF
    u += lsb
    u >>= 16
    return u.astype("<u2")


def tensor_chunks(name: str, shape, kind: str, seed: int, dtype: str = "bf16"):
    """Yield the tensor's encoded little-endian bytes in row-major order, chunk by chunk."""
    mean, std = _init(kind, tuple(shape))
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    total = int(np.prod(shape, dtype=np.int64))
    for start in range(0, total, CHUNK_ELEMS):
        x = rng.standard_normal(min(CHUNK_ELEMS, total - start), dtype=np.float32)
        x *= np.float32(std)
        if mean:
            x += np.float32(mean)
        if dtype == "bf16":
            yield f32_to_bf16_bits(x).tobytes()
        elif dtype == "f16":
            yield x.astype("<f2").tobytes()
        elif dtype == "f32":
            yield x.astype("<f4").tobytes()
        else:
            raise ValueError(dtype)


def safetensors_header(entries, metadata=None) -> bytes:
    """entries: [(name, st_dtype, shape, nbytes)] in file order -> 8-byte length + JSON + spaces.

    Same bytes as the safetensors library: compact JSON, __metadata__ first, header
    padded with spaces to a multiple of 8.
    """
    hdr = {"__metadata__": dict(metadata if metadata is not None else {"format": "pt"})}
    off = 0
    for name, st_dtype, shape, nbytes in entries:
        hdr[name] = {"dtype": st_dtype, "shape": [int(s) for s in shape], "data_offsets": [off, off + nbytes]}
        off += nbytes
    js = json.dumps(hdr, separators=(",", ":")).encode("utf-8")
    js += b" " * ((-len(js)) % 8)
    return struct.pack("<Q", len(js)) + js


def split_shards(sizes: list[int], k: int) -> list[int]:
    """Shard index of each tensor (contiguous, every shard non-empty, bytes roughly balanced)."""
    n = len(sizes)
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} tensors into {k} shards")
    total = sum(sizes)
    out, cum, prev = [], 0, 0
    for i, s in enumerate(sizes):
        want = min(k - 1, (k * cum) // total) if total else 0
        idx = max(prev, want, k - (n - i))   # never go back; leave enough tensors for later shards
        idx = min(idx, prev + 1 if i else 0)  # never skip a shard
        out.append(idx)
        prev = idx
        cum += s
    return out


# ----------------------------------------------------------------------------- writer

def _json_dump(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _special_tokens_map(tok_cfg: dict, tokenizer: dict) -> dict:
    added = {t["content"]: t for t in tokenizer.get("added_tokens", [])}
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = tok_cfg.get(key)
        if v is None:
            continue
        if isinstance(v, dict):
            out[key] = v
            continue
        t = added.get(v, {})
        out[key] = {"content": v, "lstrip": t.get("lstrip", False), "normalized": t.get("normalized", False),
                    "rstrip": t.get("rstrip", False), "single_word": t.get("single_word", False)}
    return out


def write_checkpoint(out_dir, preset: str = "tiny64", seed: int = 0, shards: int = 1, layers: int | None = None,
                     tokenizer_json=DEFAULT_TOKENIZER_JSON, tokenizer_config=DEFAULT_TOKENIZER_CONFIG,
                     dtype: str = "bf16", progress: bool = False) -> Path:
    if dtype not in SAFETENSORS_DTYPE:
        raise ValueError(f"dtype must be one of {sorted(SAFETENSORS_DTYPE)}")
    tokenizer_json, tokenizer_config = Path(tokenizer_json), Path(tokenizer_config)
    for p in (tokenizer_json, tokenizer_config):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found (run `python tools/fetch_assets.py`)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = make_config(preset, layers)
    if dtype != "bf16":
        config["torch_dtype"] = {"f16": "float16", "f32": "float32"}[dtype]

    # tokenizer files
    tok_text = tokenizer_json.read_text(encoding="utf-8")
    tokenizer = json.loads(tok_text)
    (out / "tokenizer.json").write_text(tok_text, encoding="utf-8")
    tok_cfg = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    if "chat_template" not in tok_cfg:
        tok_cfg["chat_template"] = LLAMA32_CHAT_TEMPLATE
    _json_dump(tok_cfg, out / "tokenizer_config.json")
    _json_dump(_special_tokens_map(tok_cfg, tokenizer), out / "special_tokens_map.json")
    _json_dump(config, out / "config.json")
    _json_dump(GENERATION_CONFIG, out / "generation_config.json")

    # weights
    specs = tensor_specs(config)
    item = ITEMSIZE[dtype]
    sizes = [int(np.prod(shape, dtype=np.int64)) * item for _, shape, _ in specs]
    total = sum(sizes)
    assign = split_shards(sizes, shards)
    for old in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        if old.exists():
            old.unlink()
    weight_map = {}
    done, t0, next_report = 0, time.time(), 0.1
    for s in range(shards):
        fname = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        members = sorted((spec, size) for spec, size, a in zip(specs, sizes, assign) if a == s)
        entries = [(name, SAFETENSORS_DTYPE[dtype], shape, size) for (name, shape, _), size in members]
        with open(out / fname, "wb") as f:
            f.write(safetensors_header(entries))
            for (name, shape, kind), size in members:
                written = 0
                for chunk in tensor_chunks(name, shape, kind, seed, dtype):
                    f.write(chunk)
                    written += len(chunk)
                assert written == size, (name, written, size)
                weight_map[name] = fname
                done += size
                if progress and done >= next_report * total:
                    print(f"  {100 * done / total:5.1f}%  {done / 2**20:8.0f} MiB  {time.time() - t0:6.1f} s",
                          flush=True)
                    while next_report * total <= done:
                        next_report += 0.1
    if shards > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}
        _json_dump(index, out / "model.safetensors.index.json")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny64", choices=sorted(PRESETS))
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    ap.add_argument("--dtype", default="bf16", choices=sorted(SAFETENSORS_DTYPE))
    ap.add_argument("--tokenizer-json", default=str(DEFAULT_TOKENIZER_JSON))
    ap.add_argument("--tokenizer-config", default=str(DEFAULT_TOKENIZER_CONFIG))
    args = ap.parse_args(argv)

    config = make_config(args.preset, args.layers)
    n_params = sum(int(np.prod(s)) for _, s, _ in tensor_specs(config))
    print(f"preset {args.preset}: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
          f"{n_params / 1e6:.1f} M parameters, {args.dtype}, {args.shards} shard(s) -> {args.out}", flush=True)
    br = rope_branches(config["head_dim"], config["rope_theta"], config["rope_scaling"])
    print("rope llama3 branches (head_dim %d, theta %g): " % (config["head_dim"], config["rope_theta"])
          + ", ".join(f"{k} i={v[0]}..{v[-1]}" if v else f"{k} none" for k, v in br.items()), flush=True)
    t0 = time.time()
    try:
        write_checkpoint(args.out, args.preset, args.seed, args.shards, args.layers,
                         args.tokenizer_json, args.tokenizer_config, args.dtype, progress=True)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done in {time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
