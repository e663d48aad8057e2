#!/usr/bin/env python3
"""Memory at long context: peak RSS of llamacpu with the KV cache filled to 128k tokens,
against the model file size + the KV cache bytes; writes BENCHMARKS.md.

    python tools/bench_long_context.py                          # 1B and 3B, f16 KV, fill 131072
    python tools/bench_long_context.py --cache-type q8_0        # a quantized KV cache
    python tools/bench_long_context.py --fill 8192 --presets 1b # fill less, extrapolate (said so)
    python tools/bench_long_context.py --quick                  # smoke test: 1B, fill 1024, prints only

For each preset (the random-weight checkpoints of tools/bench_vs_llamacpp.py with the exact
Llama 3.2 1B / 3B config, converted by `llamacpu convert --type TYPE`, default q4_0) a fresh
worker process loads llamacpu.Model(FILE, n_ctx=--n-ctx) with the KV type of --cache-type
(f16: the default Model; q8_0/q4_0: Model(cache_type_k=T, cache_type_v=T)), writes --fill
random tokens into the cache (forwards of --chunk tokens, a progress line every --every
seconds with the rate and a time estimate), and reports its own peak RSS (getrusage
ru_maxrss: Python, numpy, the touched pages of the mmapped file, the written KV cache,
the scratch buffers).

KV bytes = 2 (K and V) x layers x KV heads x head_dim x positions x bytes per element
(F16 2, Q8_0 34/32, Q4_0 18/32). The cache takes memory as positions are written, so
with --fill below --n-ctx the peak RSS at n_ctx is extrapolated as measured peak RSS +
KV bytes per position x (n_ctx - fill), and the output says "extrapolated". The fill
time to n_ctx is estimated too: the measured time scaled by the arithmetic of n_ctx
positions over that of the filled ones (attention grows with the position, so it
dominates at 128k); at today's speed on 2 cores the full 128k fill takes hours for 1B
and most of a day for 3B: start with --fill and read the estimate.

The result goes between <!-- longctx:begin --> and <!-- longctx:end --> in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_llamacpp as bv  # noqa: E402

BEGIN, END = "<!-- longctx:begin -->", "<!-- longctx:end -->"
KV_ELEMENT_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def kv_bytes(cfg: dict, positions: int, cache_type: str) -> int:
    hd = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    return int(2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * hd * positions
               * KV_ELEMENT_BYTES[cache_type])


def fill_flops(cfg: dict, n: int) -> float:
    """Arithmetic of writing n positions from an empty cache: the matrices (2 flops per weight
    per token, the output head included) plus attention (token p reads p + 1 positions:
    4 flops per element of Q.K and of the weighted V sum, per head and layer)."""
    dim, ffn, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = int(cfg.get("head_dim") or dim // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    weights = L * (dim * (q + 2 * kv) + q * dim + 3 * dim * ffn) + cfg["vocab_size"] * dim
    attention = 4 * L * cfg["num_attention_heads"] * hd
    return 2.0 * weights * n + attention * n * (n + 1) / 2


def estimate_time(cfg: dict, done: int, secs: float, n: int) -> float:
    """Seconds to write n positions, scaled from `secs` for the first `done` by fill_flops
    (assumes attention runs at the matrices' arithmetic rate: an estimate)."""
    return secs * fill_flops(cfg, n) / fill_flops(cfg, done)


# ----------------------------------------------------------------------------- worker

def worker(args) -> int:
    """One model: load, fill, print one JSON line (run in a process of its own)."""
    import numpy as np

    sys.path.insert(0, str(bv.REPO))
    from llamacpu import Model
    from llamacpu.bench import _peak_rss_bytes, _tokens, fill_cache

    kw = {} if args.cache_type == "f16" else {"cache_type_k": args.cache_type, "cache_type_v": args.cache_type}
    t0 = time.perf_counter()
    try:
        m = Model(args.worker, n_ctx=args.n_ctx, n_threads=args.threads, **kw)
    except TypeError as e:
        raise SystemExit(f"bench_long_context: this llamacpu's Model takes no KV cache type ({e}); "
                         f"use --cache-type f16") from None
    load_s = time.perf_counter() - t0
    rss_load = _peak_rss_bytes()
    toks = _tokens(np.random.default_rng(0), args.fill, m.vocab_size, 1)
    last = [time.perf_counter()]
    t_fill = time.perf_counter()

    def progress(done, total):
        now = time.perf_counter()
        if now - last[0] >= args.every or done == total:
            last[0] = now
            eta = estimate_time(m.config.to_dict(), done, now - t_fill, total) - (now - t_fill)
            print(f"  fill {done}/{total} tokens, {now - t_fill:.0f} s, {done / (now - t_fill):.1f} t/s, "
                  f"about {max(eta, 0) / 60:.1f} min to go (estimate)", file=sys.stderr, flush=True)

    fill_cache(m, toks, chunk=args.chunk, progress=progress)
    fill_s = time.perf_counter() - t_fill
    out = {"load_s": load_s, "rss_after_load": rss_load, "fill": args.fill, "n_past": m.n_past, "fill_s": fill_s,
           "peak_rss": _peak_rss_bytes(), "kernels": m.kernels, "n_threads": m.n_threads}
    m.close()
    print(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------- report

def render(ctx: dict) -> str:
    n_ctx, ct = ctx["n_ctx"], ctx["cache_type"]
    L = [f"### Memory at long context: the KV cache filled at n_ctx {n_ctx} ({ct.upper()} KV, "
         f"{ctx['type'].upper()} weights)", ""]
    L.append(f"Measured {ctx['date']} by `python tools/bench_long_context.py {ctx['argv']}` "
             f"({ctx['elapsed_min']:.0f} min).")
    L.append("")
    L.append(f"- Machine: {bv.machine_line(ctx['cpu'])}.")
    L.append(f"- llamacpu (git {ctx['git']}), kernels `{ctx['kernels']}`, {ctx['threads']} thread(s): "
             f"`Model(FILE, n_ctx={n_ctx}"
             + ("" if ct == "f16" else f", cache_type_k='{ct}', cache_type_v='{ct}'")
             + f")`, then random tokens written in forwards of {ctx['chunk']}. Peak RSS = the worker process's "
             f"ru_maxrss (Python and numpy included). KV bytes = 2 × layers × KV heads × head_dim × positions "
             f"× {KV_ELEMENT_BYTES[ct]:g} bytes.")
    L.append("")
    L.append("| model | file size | filled | KV bytes (filled) | file + KV (filled) | peak RSS "
             f"| peak RSS − file − KV | KV bytes at {n_ctx} | file + KV at {n_ctx} | peak RSS at {n_ctx} | fill time to {n_ctx} |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    partial = False
    for r in ctx["rows"]:
        full = r["fill"] >= n_ctx
        partial |= not full
        kv_fill, kv_full = r["kv_fill"], r["kv_full"]
        rss_full = r["peak_rss"] + (kv_full - kv_fill)
        t_full = r["fill_s"] if full else estimate_time(r["config"], r["fill"], r["fill_s"], n_ctx)
        mark = "" if full else " (extrapolated)"
        L.append(f"| {r['preset'].upper()} | {bv.fmt_mb(r['file_size'])} | {r['fill']} | {bv.fmt_mb(kv_fill)} | "
                 f"{bv.fmt_mb(r['file_size'] + kv_fill)} | {bv.fmt_mb(r['peak_rss'])} | "
                 f"{bv.fmt_mb(r['peak_rss'] - r['file_size'] - kv_fill)} | {bv.fmt_mb(kv_full)} | "
                 f"{bv.fmt_mb(r['file_size'] + kv_full)} | {bv.fmt_mb(rss_full)}{mark} | "
                 f"{t_full / 60:.0f} min{mark} |")
    L.append("")
    if partial:
        L.append(f"Rows filled below {n_ctx} are extrapolated: peak RSS at {n_ctx} = measured peak RSS + the KV "
                 f"bytes of the positions not written; the fill time = the measured fill time × the "
                 f"arithmetic of {n_ctx} positions / that of the filled ones (weights: 2 flops per weight "
                 f"per token; attention: 4 flops per head element per cached position; assumes attention "
                 f"runs at the matrices' rate). Measured values are the columns before them.")
    else:
        L.append(f"Every row filled the cache to {n_ctx}: all values measured.")
    return "\n".join(L)


def write_section(path: Path, body: str) -> None:
    bv.write_part(path, BEGIN, END, body, "long-context",
                  after=("<!-- busy:end -->", bv.DEPTH_END, bv.markers("3b")[1], bv.END))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--presets", default="1b,3b", help="checkpoints: 1b, 3b or both (default 1b,3b)")
    ap.add_argument("--type", default="q4_0", choices=bv.OWN_TYPES,
                    help="weight type of `llamacpu convert` (default q4_0)")
    ap.add_argument("--cache-type", default="f16", choices=tuple(KV_ELEMENT_BYTES),
                    help="KV cache type (default f16; q8_0/q4_0 need Model(cache_type_k=, cache_type_v=))")
    ap.add_argument("--n-ctx", type=int, default=131072, help="context of the Model (default 131072)")
    ap.add_argument("--fill", type=int, default=None,
                    help="tokens written into the cache (default --n-ctx); less: the rest is extrapolated")
    ap.add_argument("--chunk", type=int, default=512, help="tokens per forward of the fill (default 512)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="threads (default: the Model's default)")
    ap.add_argument("--every", type=float, default=30.0, help="seconds between progress lines (default 30)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1B, --fill 1024; prints, writes no file "
                                                         "unless --out")
    ap.add_argument("--out", type=Path, default=None, help="file to write (default BENCHMARKS.md; none with --quick)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.presets, args.fill = "1b", 1024 if args.fill is None else args.fill
    fill = args.n_ctx if args.fill is None else args.fill
    if not 1 <= fill <= args.n_ctx or args.chunk < 1 or (args.threads is not None and args.threads < 1):
        ap.error(f"need 1 <= --fill <= --n-ctx ({args.n_ctx}), --chunk >= 1, -t >= 1")
    args.fill = fill
    if args.worker:
        return worker(args)
    presets = [x.strip() for x in args.presets.split(",") if x.strip()]
    if not presets or any(p not in bv.PRESETS for p in presets):
        ap.error(f"--presets: {args.presets!r} (1b, 3b)")
    out_path = args.out if args.out is not None else (None if args.quick else bv.REPO / "BENCHMARKS.md")
    t_start = time.time()
    rows = []
    res = {}
    for preset in presets:
        ck = bv.ensure_checkpoint(preset)
        cfg = json.loads((ck / "config.json").read_text())
        if args.n_ctx > cfg["max_position_embeddings"]:
            raise SystemExit(f"bench_long_context: --n-ctx {args.n_ctx} exceeds {preset}'s context of "
                             f"{cfg['max_position_embeddings']}")
        path = bv.ensure_our_files(ck, [args.type], {}, preset, prune=False)[args.type]
        bv.log(f"{preset}: {path.name}, n_ctx {args.n_ctx}, KV {args.cache_type}, filling {fill} tokens "
               f"(KV {bv.fmt_mb(kv_bytes(cfg, fill, args.cache_type))})")
        cmd = [sys.executable, Path(__file__).resolve(), "--worker", path, "--n-ctx", args.n_ctx, "--fill", fill,
               "--cache-type", args.cache_type, "--chunk", args.chunk, "--every", args.every]
        if args.threads:
            cmd += ["-t", args.threads]
        # stderr (the progress lines) straight to ours: run_measured would hold it to the end
        p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, text=True, env=bv.our_env(), cwd=bv.REPO)
        if p.returncode != 0:
            raise SystemExit(f"bench_long_context: the {preset} worker failed ({p.returncode})")
        res = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append(dict(res, preset=preset, config=cfg, file_size=path.stat().st_size,
                         kv_fill=kv_bytes(cfg, fill, args.cache_type),
                         kv_full=kv_bytes(cfg, args.n_ctx, args.cache_type)))
        bv.log(f"{preset}: peak RSS {bv.fmt_mb(res['peak_rss'])}, file {bv.fmt_mb(path.stat().st_size)}, "
               f"KV {bv.fmt_mb(rows[-1]['kv_fill'])}; fill {res['fill_s']:.0f} s")
    ctx = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
           "argv": " ".join(sys.argv[1:] if argv is None else argv), "elapsed_min": (time.time() - t_start) / 60,
           "cpu": bv.cpu_info(), "git": bv.git_describe(), "n_ctx": args.n_ctx, "cache_type": args.cache_type,
           "type": args.type, "chunk": args.chunk, "threads": res.get("n_threads"), "kernels": res.get("kernels"),
           "rows": rows}
    return bv.publish(render(ctx), out_path, None, None, write_section)


if __name__ == "__main__":
    sys.exit(main())
