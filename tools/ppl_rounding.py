#!/usr/bin/env python3
"""Why llamacpu's and llama.cpp's perplexities differ on the same file: the NumPy reference
(tests/reference.py) on the file's own dequantized weights, with the input of each matmul
rounded to 8 bits as each engine rounds it; writes its part of docs/QUALITY.md.

    python tools/ppl_rounding.py                     # SmolLM2's Q4_K_M, Q5_K_M, Q6_K files
    python tools/ppl_rounding.py --types q6_k --chunks 4   # a smoke test: prints only (--out FILE: writes)

The files are tools/quality_vs_llamacpp.py's (llama-quantize'd from an F16 GGUF of
SmolLM2-135M-Instruct; llamacpu imports the same GGUF), the text and the method too
(-c 512, the second half of each chunk scored: llamacpu/perplexity.py). For each file:

  llama.cpp   llama-perplexity on the GGUF
  llamacpu    llamacpu perplexity on the imported file
  NumPy, float      the reference in float32, no rounding: the weights' own error
  NumPy, ggml's     each matmul's input rounded as ggml rounds it for the weight's type
                    (its vec_dot_type, ggml-cpu.c): Q8_0 blocks (one fp16 scale = max|x| / 127
                    per 32, round to nearest even as its AVX2 quantizer does) against Q4_0,
                    Q5_0, Q8_0 and IQ4_NL; the same values (Q8_1) against Q4_1 and Q5_1; Q8_K
                    (one f32 scale = -max / 127 per 256, max the element of largest magnitude)
                    against Q2_K..Q6_K and IQ4_XS; F16 against F16 weights
  NumPy, llamacpu's the engine's q8a (docs/ARCHITECTURE.md, Numerics): one f32 scale per group
                    of 8 (elements 4g..4g+3 and 16+4g..16+4g+3 of each 32), round to nearest
                    even, and wv's input to about 16 bits (a second q8a pass over the rounding
                    error); F16 and F32 weights see float inputs

Both rounded modes keep K and V in F16 (the engines' default KV cache) and ggml's also Q
(its flash attention's F16 dot products). Nothing else of either engine's arithmetic is
modelled (summation order, ggml's F16 accumulation of V): if the NumPy figure with an
engine's rounding lands on that engine's figure, the rounding of the activations is what
separates the two engines.
The generated part of docs/QUALITY.md lies between <!-- rounding:begin --> and
<!-- rounding:end -->.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import bench_vs_llamacpp as bv  # noqa: E402
import fetch_assets  # noqa: E402
import quality_vs_llamacpp as qv  # noqa: E402

BEGIN, END = "<!-- rounding:begin -->", "<!-- rounding:end -->"
MODES = ("float", "ggml", "llamacpu")
# GGUF tensor names -> the reference's matmul names (tests/reference.py's mm_hook)
MATMULS = {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo", "ffn_gate": "wg",
           "ffn_up": "wu", "ffn_down": "wd"}
# ggml's vec_dot_type of each weight type (ggml-cpu.c type_traits_cpu), by GGML type id
GGML_ACT = {0: None, 1: "f16", 2: "q8_0", 3: "q8_1", 6: "q8_0", 7: "q8_1", 8: "q8_0", 10: "q8_k",
            11: "q8_k", 12: "q8_k", 13: "q8_k", 14: "q8_k", 20: "q8_0", 23: "q8_k"}


# ----------------------------------------------------------------------------- rounding

def _safe_div(a, b):
    """a / b in float32, 0 where b == 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, np.float32(a) / b, np.float32(0)).astype(np.float32)


def ggml_q8_0(x):
    """ggml's Q8_0 / Q8_1 values (quantize_row_q8_0 / _q8_1 of its AVX2 build): per 32,
    q = rint(x * 127 / max|x|), times d = max|x| / 127 stored as fp16."""
    n, cols = x.shape
    b = x.astype(np.float32).reshape(n, cols // 32, 32)
    amax = np.abs(b).max(axis=2, keepdims=True)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    return (np.rint(b * _safe_div(127, amax)) * d).reshape(n, cols)


def ggml_q8_k(x):
    """ggml's Q8_K values (quantize_row_q8_K_ref): per 256, iscale = -127 / max with max the
    element of largest magnitude, q = min(127, nearest_int(iscale * x)), times d = 1 / iscale."""
    n, cols = x.shape
    b = x.astype(np.float32).reshape(n, cols // 256, 256)
    mx = np.take_along_axis(b, np.abs(b).argmax(axis=2)[..., None], axis=2)
    iscale = _safe_div(-127, mx)
    return (np.minimum(np.rint(b * iscale), 127) * _safe_div(1, iscale)).reshape(n, cols)


def q8a(x):
    """llamacpu's q8a values (kernels_scalar.c quantize_act): per group of 8 (elements
    4g..4g+3 and 16+4g..16+4g+3 of each 32), d = max|x| / 127, q = rint(x * (1 / d)), times d."""
    n, cols = x.shape
    b = x.astype(np.float32).reshape(n, cols // 32, 2, 4, 4)      # (half of 16, g, 4)
    d = np.abs(b).max(axis=(2, 4), keepdims=True) / np.float32(127)
    return (np.rint(b * _safe_div(1, d)) * d).reshape(n, cols)


def f16(x):
    return x.astype(np.float16).astype(np.float32)


def hook(mode: str, types: dict):
    """The reference's mm_hook for `mode`; types: (layer, name) -> GGML type id."""
    if mode == "float":
        return None

    def ggml(layer, name, x):
        act = GGML_ACT[types[(layer, name)]]
        if act is None:
            return x
        if act == "f16":
            return f16(x)
        return ggml_q8_k(x) if act == "q8_k" else ggml_q8_0(x)

    def ours(layer, name, x):
        if types[(layer, name)] in (0, 1):
            return x
        r = q8a(x)
        return r + q8a(x.astype(np.float32) - r) if name == "wv" else r

    return ggml if mode == "ggml" else ours


# ----------------------------------------------------------------------------- the NumPy model

class NumpyModel:
    """The reference with a KV cache behind llamacpu.perplexity's model interface."""

    def __init__(self, gguf: Path, meta: dict, n_ctx: int, mode: str):
        import gguf as gg
        from reference import ReferenceLlama, weights_from_gguf

        cfg, w, div = weights_from_gguf(gguf)
        self.ref = ReferenceLlama(cfg, w, rope_pairing="adjacent", rope_freq_divisors=div, dtype=np.float32)
        tensors = {t.name: int(t.tensor_type) for t in gg.GGUFReader(str(gguf)).tensors}
        types = {(None, "head"): tensors.get("output.weight", tensors["token_embd.weight"])}
        for name, typ in tensors.items():
            parts = name.split(".")
            if len(parts) == 4 and parts[0] == "blk" and parts[2] in MATMULS:
                types[(int(parts[1]), MATMULS[parts[2]])] = typ
        unknown = {v for v in types.values() if v not in GGML_ACT}
        if unknown:
            raise SystemExit(f"{gguf.name}: GGML types {sorted(unknown)} have no rounding here")
        self.ref.mm_hook = hook(mode, types)
        if mode != "float":  # both engines' F16 KV cache; ggml's flash attention takes Q in F16 too
            self.ref.kv_hook = lambda q, k, v: (f16(q) if mode == "ggml" else q, f16(k), f16(v))
        self.metadata, self.n_ctx, self.path = meta, n_ctx, str(gguf)
        self.cache = None

    def forward(self, ids, pos=0, all_logits=False):
        if pos == 0:
            self.cache = self.ref.new_cache()
        if pos != self.cache.length:
            raise ValueError(f"position {pos}, the cache holds {self.cache.length}")
        logits = self.ref.forward_chunk(np.asarray(ids), self.cache)
        return logits if all_logits else logits[-1]


def run_numpy(gguf: Path, our_file: Path, mode: str, n_ctx: int, chunks) -> dict:
    from llamacpu.format import read_model
    from llamacpu.perplexity import perplexity

    with read_model(our_file) as f:
        meta = f.meta
    t0 = time.time()
    r = perplexity(NumpyModel(gguf, meta, n_ctx, mode), qv.text_as_read(), n_ctx=n_ctx, n_chunks=chunks)
    return {"ppl": r.ppl, "err": r.ppl_err, "running": r.running_ppl, "n_chunks": r.n_chunks,
            "wall": time.time() - t0}


# ----------------------------------------------------------------------------- report

def pct(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.2f}%"


def render(ctx: dict) -> str:
    res, L = ctx["res"], []
    L.append(f"Measured {ctx['date']} by `{' '.join(['python tools/ppl_rounding.py', ctx['argv']]).strip()}` "
             f"({ctx['elapsed_min']:.0f} min; llamacpu git {ctx['git']}, kernels `{ctx['kernels']}`, "
             f"{ctx['threads']} threads; {res[ctx['types'][0], 'llama']['n_chunks']} chunks of {ctx['n_ctx']}).")
    L.append("")
    L.append("| file | llama.cpp | NumPy, ggml's rounding | llamacpu | NumPy, llamacpu's rounding | NumPy, float "
             "| llamacpu vs llama.cpp | NumPy: llamacpu's vs ggml's rounding |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for t in ctx["types"]:
        r = {k: res[t, k]["ppl"] for k in ("llama", "ggml", "ours", "llamacpu", "float")}
        L.append(f"| {qv.LABEL[t]} | {r['llama']:.4f} | {r['ggml']:.4f} ({pct(r['ggml'], r['llama'])}) "
                 f"| {r['ours']:.4f} | {r['llamacpu']:.4f} ({pct(r['llamacpu'], r['ours'])}) | {r['float']:.4f} "
                 f"| {pct(r['ours'], r['llama'])} | {pct(r['llamacpu'], r['ggml'])} |")
    L.append("")
    L.append("In parentheses: the NumPy figure against the engine whose rounding it models. "
             "NumPy's seconds per run: " + ", ".join(
                 f"{t} " + " / ".join(f"{res[t, m]['wall']:.0f}" for m in MODES) for t in ctx["types"])
             + f" ({' / '.join(MODES)}).")
    return "\n".join(L) + "\n"


def write_doc(path: Path, body: str) -> None:
    bv.write_marked(path, BEGIN, END, body.rstrip("\n"), lambda block: block + "\n")
    bv.log(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=",".join(qv.KQUANT_TYPES),
                    help=f"files of tools/quality_vs_llamacpp.py (default {','.join(qv.KQUANT_TYPES)})")
    ap.add_argument("-c", "--ctx-size", type=int, default=512, help="n_ctx (default 512)")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads of both engines (default 2)")
    ap.add_argument("--chunks", type=int, default=None, help="only the first N chunks (prints; writes no file unless --out)")
    ap.add_argument("--out", type=Path, default=None, help="file to write (default docs/QUALITY.md; none with --chunks)")
    args = ap.parse_args(argv)
    types = [x.strip().lower() for x in args.types.split(",") if x.strip()]
    for t in types:
        if t not in qv.TYPES or t == "f32":
            ap.error(f"--types: {t} (one of {', '.join(x for x in qv.TYPES if x != 'f32')})")
    out_path = args.out if args.out is not None else (None if args.chunks else REPO / "docs" / "QUALITY.md")
    t_start = time.time()
    qv.QDIR.mkdir(parents=True, exist_ok=True)
    gguf = fetch_assets.asset_path(qv.GGUF_NAME)
    bindir = bv.build_llamacpp(bv.native_variant())
    ggufs = qv.llama_files(gguf, types, bindir / "llama-quantize")
    ours = qv.our_files(gguf, types, ggufs)
    res = {}
    for t in types:
        res[t, "llama"] = qv.run_llama(bindir, ggufs[t], args.ctx_size, args.threads, args.chunks)
        res[t, "ours"] = qv.run_ours(ours[t], args.ctx_size, args.threads, args.chunks)
        for mode in MODES:
            res[t, mode] = run_numpy(ggufs[t], ours[t], mode, args.ctx_size, args.chunks)
        bv.log(f"{t}: " + ", ".join(f"{k} {res[t, k]['ppl']:.4f}" for k in ("llama", "ours") + MODES))
    from llamacpu import Model
    with Model(ours[types[0]], n_ctx=8) as m:
        kernels = m.kernels
    ctx = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
           "argv": " ".join(sys.argv[1:] if argv is None else argv), "elapsed_min": (time.time() - t_start) / 60,
           "types": types, "n_ctx": args.ctx_size, "threads": args.threads, "git": bv.git_describe(),
           "kernels": kernels, "res": res}
    body = render(ctx)
    print(body)
    if out_path is not None:
        write_doc(out_path, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
