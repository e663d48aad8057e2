"""llama-quantize's K-quant output, frozen for tests/test_quantize_k.py, and checked whole.

CI cannot build llama.cpp, so tests/data keeps what llama-quantize wrote (no importance
matrix) for our quantizers (csrc/quants_ref.c) and mixtures (llamacpu/quant_mix.py) to
match byte for byte:

  tests/data/llama_quantize_rows.npz       fixture_rows() (10 rows of 256 F16 values,
      generated here from integers, so no RNG version can change them) quantized by
      `llama-quantize --pure` to Q4_K, Q5_K, Q6_K, Q5_0 and Q5_1, one array each, plus
      the SHA-256 of the input bits
  tests/data/llama_quantize_mixtures.json  the type llama-quantize gives each tensor for
      Q4_K_M, Q4_K_S, Q5_K_M and Q6_K, for the exact Llama 3.2 1B and 3B configs,
      SmolLM2-135M's (shapes from the asset GGUF) and, for the rules those never reach,
      Llama 3.1 8B's and 70B's (CONFIGS), read from `llama-quantize --dry-run` on F16 GGUFs
      whose data is sparse zeros (the dry run never reads it)

    python tools/make_kquant_fixtures.py                    # rewrite both fixtures
    python tools/make_kquant_fixtures.py --check-model assets/SmolLM2-135M-Instruct.Q4_1.gguf
    python tools/make_kquant_fixtures.py --check-model ~/.cache/llamacpu/bench/llamacpp-1b-bf16.gguf --ftypes q4_k_m

--check-model runs llama-quantize on a whole model for each ftype (a quantized source is
first made F16 by `llama-quantize --allow-requantize ... F16`) and checks every tensor
of the result: its type against quant_mix.mixture() and its bytes against
_core.quantize() of the same F16/BF16 values. It prints the counts.

llama.cpp is the one tools/bench_vs_llamacpp.py builds (`--build-only`), or --bin DIR.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llamacpu import _core  # noqa: E402
from llamacpu.format import F16, F32, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, TYPES  # noqa: E402
from llamacpu.quant_mix import FTYPES, mixture  # noqa: E402

CACHE = Path(os.environ.get("LLAMACPU_CACHE") or Path.home() / ".cache" / "llamacpu")
LLAMA_BIN = CACHE / "llama.cpp-0.3.36" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "build" / "bin"
ROWS_FILE = REPO / "tests" / "data" / "llama_quantize_rows.npz"
MIXTURES_FILE = REPO / "tests" / "data" / "llama_quantize_mixtures.json"
SMOLLM2 = REPO / "assets" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# the type of each rows fixture -> the llama-quantize ftype that, with --pure, gives it
ROW_TYPES = {Q4_K: "Q4_K_S", Q5_K: "Q5_K_S", Q6_K: "Q6_K", Q5_0: "Q5_0", Q5_1: "Q5_1"}

# The configs whose mixtures are frozen (besides SmolLM2's, read from its GGUF): the
# models llamacpu targets, Llama 3.2 1B and 3B (tied embeddings), and two that reach the
# other rules, Llama 3.1 8B (untied: output and token_embd differ) and 70B (llama.cpp's
# LLM_TYPE_70B: 80 layers with GQA).
def _llama(vocab, dim, ffn, layers, heads, kv_heads, tied):
    return {"vocab_size": vocab, "hidden_size": dim, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": dim // heads,
            "tie_word_embeddings": tied}


def model_config(shape: dict):
    """format.ModelConfig of a shape dict as the mixtures fixture keeps it (the keys mixture()
    reads): Llama 3's other constants, which no type choice depends on."""
    from llamacpu.format import ModelConfig
    return ModelConfig.from_dict({"architecture": "llama", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                                  "rope_scaling": None, "max_position_embeddings": 131072,
                                  "rope_pairing": "adjacent", **shape})


CONFIGS = {
    "Llama-3.2-1B": _llama(128256, 2048, 8192, 16, 32, 8, True),
    "Llama-3.2-3B": _llama(128256, 3072, 8192, 28, 24, 8, True),
    "Llama-3.1-8B": _llama(128256, 4096, 14336, 32, 32, 8, False),
    "Llama-3.1-70B": _llama(128256, 8192, 28672, 80, 64, 8, False),
}

# GGUF per-layer tensor -> llamacpu's (llamacpu/convert.py GGUF_LAYER_NAMES)
GGUF_LAYER = {"attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
              "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
              "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3"}
GGUF_GLOBAL = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}


def internal_name(gguf_name: str) -> str:
    base = gguf_name.removesuffix(".weight")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m:
        return f"layers.{m.group(1)}.{GGUF_LAYER[m.group(2)]}.weight"
    return GGUF_GLOBAL[base] + ".weight"


# ---------------------------------------------------------------- the fixture rows

def _hash_u32(seed: int, n: int) -> np.ndarray:
    """n pseudo-random uint32 (splitmix64's finalizer of seed * 2^32 + i): integers only."""
    z = (np.arange(n, dtype=np.uint64) + np.uint64(seed << 32)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) >> np.uint64(32)).astype(np.uint32)


def _gauss(seed: int, n: int) -> np.ndarray:
    """About N(0, 1): a sum of 4 uniform 16-bit integers, scaled exactly by a power of 2."""
    u = _hash_u32(seed, 2 * n).reshape(2, n)
    s = ((u & 0xFFFF) + (u >> 16)).sum(0).astype(np.int64) - 2 * 65535
    return (s.astype(np.float64) / 2.0 ** 16 * 1.5).astype(np.float16)  # float64: exact, one f16 rounding


def fixture_rows() -> np.ndarray:
    """(10, 256) F16: ordinary rows and the edge cases of the K-quant search."""
    n = 256
    u = _hash_u32(99, n)
    rows = [
        _gauss(1, n),                                                    # ordinary weights
        _gauss(2, n) * np.float16(2.0) ** ((_hash_u32(3, 16) % 13).astype(np.float16) - 6).repeat(16),
        # sub-blocks of 16 scaled by 2^-6 .. 2^6: the 6-bit / int8 scales of the scales
        np.where(np.arange(n) < 128, np.float16(0), np.float16(-0.0)),  # all zeros, +0 then -0
        np.full(n, 0.3, np.float16),                                     # constant (positive: min > 0)
        np.where(u % 3 == 0, np.float16(60000), np.float16(6e-8) * (u % 5).astype(np.float16)),
        # huge dynamic range: fp16's largest values beside subnormals and zeros
        np.where(np.arange(n) == 77, np.float16(100), _gauss(4, n) * np.float16(0.01)),  # one outlier
        -np.abs(_gauss(5, n)) - np.float16(0.5),                         # negative only
        _gauss(6, n) * np.float16(2.0 ** -20),                           # subnormal: d underflows in fp16
        ((u % 33).astype(np.float16) - np.float16(16)) / np.float16(2),  # on a half-step grid: ties
        np.where(np.arange(n) < 128, np.float16(0), np.abs(_gauss(7, n))),  # half zero, half positive
    ]
    return np.stack(rows).astype(np.float16)


def rows_sha256(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype="<f2").tobytes()).hexdigest()


# ---------------------------------------------------------------- GGUF in and out

def config_of_gguf(path) -> dict:
    """The keys quant_mix.mixture() reads (a shape dict for model_config), from a llama GGUF's
    metadata and shapes."""
    import gguf
    r = gguf.GGUFReader(str(path))

    def kv(key):
        return r.fields[key].contents()
    shapes = {t.name: [int(d) for d in t.shape] for t in r.tensors}
    heads = kv("llama.attention.head_count")
    return {"vocab_size": shapes["token_embd.weight"][1],
            "hidden_size": kv("llama.embedding_length"),
            "intermediate_size": kv("llama.feed_forward_length"),
            "num_hidden_layers": kv("llama.block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": kv("llama.attention.head_count_kv"),
            "head_dim": kv("llama.embedding_length") // heads,
            "tie_word_embeddings": "output.weight" not in shapes}


def gguf_tensors(config: dict) -> dict:
    """GGUF name -> shape (numpy order) of a llama model with shape dict `config`, in GGUF names."""
    from llamacpu.format import expected_tensors
    inv = {v: k for k, v in GGUF_LAYER.items()}
    out = {}
    for name, shape in expected_tensors(model_config(config)).items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
        if m:
            out[f"blk.{m.group(1)}.{inv[m.group(2)]}.weight"] = shape
        else:
            out[{v: k for k, v in GGUF_GLOBAL.items()}[name.removesuffix(".weight")] + ".weight"] = shape
    return out


def write_gguf(path, config: dict, tensors: dict) -> None:
    """A llama GGUF: tensors name -> (shape, data or None); 2-D tensors are F16, 1-D F32.
    None leaves the data a hole in a sparse file (read as zeros; --dry-run never reads it)."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(4096)
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_dimension_count(config["head_dim"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type(1)  # MOSTLY_F16
    layout = []
    for name, (shape, data) in tensors.items():
        dtype = np.float16 if len(shape) == 2 else np.float32
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        w.add_tensor_info(name, shape, np.dtype(dtype), nbytes)
        layout.append((nbytes, None if data is None else np.ascontiguousarray(data, dtype)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]  # the one shard
    w.write_padding(fout, fout.tell())
    offset = fout.tell()
    for nbytes, data in layout:
        if data is not None:
            fout.seek(offset)
            data.tofile(fout)
        offset += gguf.GGUFWriter.ggml_pad(nbytes, w.data_alignment)
    fout.truncate(offset)
    w.close()


def tensor_rows_f32(t) -> np.ndarray:
    """A GGUFReader tensor of F32/F16/BF16 as float32 (rows, cols), exactly."""
    import gguf
    a = np.asarray(t.data)
    cols = int(t.shape[0])
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        a = (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32).reshape(-1, cols)


def llama_quantize(bin_dir: Path, args, log: Path | None = None) -> str:
    cmd = [str(bin_dir / "llama-quantize"), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + p.stderr
    if log:
        log.write_text(out)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-3000:]}")
    return out


# "[  12/ 147]   blk.0.attn_v.weight - [ 2048,  512, ...], type =    f16, size = ... MiB -> ... MiB (q6_K)"
_DRY_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size = [^(\n]*?(?:\((\w+)\))?$", re.M)


def dry_run_types(bin_dir: Path, src: Path, ftype: str) -> dict:
    """GGUF name -> type name that `llama-quantize --dry-run src ftype` reports."""
    out = llama_quantize(bin_dir, ["--dry-run", src, ftype.upper()])
    types = {m.group(1): (m.group(3) or m.group(2)).upper() for m in _DRY_LINE.finditer(out)}
    if not types:
        raise RuntimeError(f"no tensor lines in llama-quantize --dry-run's output:\n{out[-3000:]}")
    return types


# ---------------------------------------------------------------- writing the fixtures

def make_rows_fixture(bin_dir: Path, tmp: Path) -> dict:
    rows = fixture_rows()
    config = {"vocab_size": rows.shape[0], "hidden_size": rows.shape[1], "intermediate_size": 256,
              "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
              "head_dim": rows.shape[1]}
    src = tmp / "rows-f16.gguf"
    write_gguf(src, config, {"token_embd.weight": (rows.shape, rows)})
    import gguf
    out = {"input_sha256": np.array(rows_sha256(rows))}
    for type, ftype in ROW_TYPES.items():
        dst = tmp / f"rows-{ftype}.gguf"
        llama_quantize(bin_dir, ["--pure", src, dst, ftype])
        (t,) = gguf.GGUFReader(str(dst)).tensors
        assert int(t.tensor_type) == type, (t.tensor_type, type)
        out[TYPES[type].name] = np.asarray(t.data).reshape(rows.shape[0], -1)
    return out


def make_mixtures_fixture(bin_dir: Path, tmp: Path) -> dict:
    models = {**CONFIGS, "SmolLM2-135M": config_of_gguf(SMOLLM2)}
    fixture = {}
    for model, config in models.items():
        src = tmp / f"{model}-sparse-f16.gguf"
        write_gguf(src, config, {n: (s, None) for n, s in gguf_tensors(config).items()})
        entry = {"config": config}
        for ftype in FTYPES:
            entry[ftype] = compact_types(dry_run_types(bin_dir, src, ftype), config)
        fixture[model] = entry
        src.unlink()
    return fixture


def compact_types(types: dict, config: dict) -> dict:
    """GGUF name -> type, as {global name: type, per-layer kind: its types layer by layer,
    runs written TYPE*n: "Q6_K*2 Q4_K*2 Q6_K ..."}."""
    out = {}
    for name in gguf_tensors(config):
        if not name.startswith("blk."):
            out[name.removesuffix(".weight")] = types[name]
    for kind in GGUF_LAYER:
        runs = []
        for i in range(config["num_hidden_layers"]):
            t = types[f"blk.{i}.{kind}.weight"]
            if runs and runs[-1][0] == t:
                runs[-1][1] += 1
            else:
                runs.append([t, 1])
        out[kind] = " ".join(t if n == 1 else f"{t}*{n}" for t, n in runs)
    return out


def expand_types(compact: dict) -> dict:
    """compact_types' inverse: internal tensor name -> type name."""
    out = {}
    for key, val in compact.items():
        if key in GGUF_LAYER:
            per_layer = [t for run in val.split() for t in [run.split("*")[0]] * int((run + "*1").split("*")[1])]
            for i, t in enumerate(per_layer):
                out[f"layers.{i}.{GGUF_LAYER[key]}.weight"] = t
        else:
            out[internal_name(key)] = val
    return out


# ---------------------------------------------------------------- a whole model

def check_model(bin_dir: Path, src: Path, ftypes, tmp: Path) -> bool:
    """llama-quantize src to each ftype; every tensor's type against mixture() and every
    quantized row against _core.quantize() of the same source values. True when all agree."""
    import gguf
    r = gguf.GGUFReader(str(src))
    float_types = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)
    if any(t.tensor_type not in float_types for t in r.tensors):
        f16 = tmp / (src.stem + "-F16.gguf")
        print(f"{src.name}: quantized; llama-quantize --allow-requantize ... F16 -> {f16.name}")
        llama_quantize(bin_dir, ["--allow-requantize", src, f16, "F16"])
        src, r = f16, gguf.GGUFReader(str(f16))
    config = config_of_gguf(src)
    source = {t.name: t for t in r.tensors}
    ok = True
    for ftype in ftypes:
        dst = tmp / f"{src.stem}-{ftype}.gguf"
        llama_quantize(bin_dir, [src, dst, ftype.upper()])
        want = mixture(model_config(config), ftype)
        n_types_ok = n_types_bad = n_rows_bad = 0
        counts = {}  # type name -> [tensors, rows] compared byte for byte
        for t in gguf.GGUFReader(str(dst)).tensors:
            if t.name == "rope_freqs.weight":  # 1-D, kept as it is; not in mixture()
                continue
            name, type = internal_name(t.name), int(t.tensor_type)
            if want.get(name) != type:
                n_types_bad += 1
                print(f"  {ftype} {t.name}: llama-quantize {TYPES[type].name}, mixture "
                      f"{TYPES[want[name]].name if name in want else None}")
                continue
            n_types_ok += 1
            if type in (F32, F16):
                continue
            x = tensor_rows_f32(source[t.name])
            differ = (_core.quantize(x, type) != np.asarray(t.data).reshape(x.shape[0], -1)).any(axis=1)
            c = counts.setdefault(TYPES[type].name, [0, 0])
            c[0] += 1
            c[1] += x.shape[0]
            n_rows_bad += int(differ.sum())
            if differ.any():
                print(f"  {ftype} {t.name} ({TYPES[type].name}): {int(differ.sum())} of {x.shape[0]} rows differ")
        dst.unlink()
        ok &= n_rows_bad == 0 and n_types_bad == 0
        print(f"{src.name} {ftype}: types {n_types_ok} as mixture(), {n_types_bad} not; "
              f"{sum(c[0] for c in counts.values())} quantized tensors, {sum(c[1] for c in counts.values())} rows "
              f"compared, {n_rows_bad} differ (" + ", ".join(f"{k}: {v[0]} tensors, {v[1]} rows"
                                                          for k, v in sorted(counts.items())) + ")")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, default=LLAMA_BIN, help="folder with llama-quantize")
    ap.add_argument("--check-model", type=Path, help="a llama GGUF to quantize whole and compare")
    ap.add_argument("--ftypes", default="q4_k_m,q5_k_m,q6_k",
                    help=f"with --check-model: comma-separated, of {', '.join(FTYPES)}")
    args = ap.parse_args(argv)
    if not (args.bin / "llama-quantize").exists():
        ap.error(f"no llama-quantize in {args.bin} (python tools/bench_vs_llamacpp.py --build-only builds it)")
    with tempfile.TemporaryDirectory(prefix="kquant-") as tmp:
        tmp = Path(tmp)
        if args.check_model:
            ftypes = [f.strip().lower() for f in args.ftypes.split(",")]
            return 0 if check_model(args.bin, args.check_model, ftypes, tmp) else 1
        np.savez_compressed(ROWS_FILE, **make_rows_fixture(args.bin, tmp))
        print(f"wrote {ROWS_FILE.relative_to(REPO)} ({ROWS_FILE.stat().st_size} bytes)")
        MIXTURES_FILE.write_text(json.dumps(make_mixtures_fixture(args.bin, tmp), indent=1) + "\n")
        print(f"wrote {MIXTURES_FILE.relative_to(REPO)} ({MIXTURES_FILE.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
