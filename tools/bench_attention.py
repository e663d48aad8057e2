#!/usr/bin/env python3
"""One layer's attention (csrc/attention.c) of the exact Llama 3.2 1B config: time and FLOP rate.

    python tools/bench_attention.py                          # depths 4096,16384, f16 and q8_0, 1 and 2 threads
    python tools/bench_attention.py --depths 32768 --cache-types f16 --threads 2

Prefill: 512 tokens at positions D..D+511 (each sees its causal prefix); decode: one token
at position D. The cache holds random rows (K and V of N(0, 1), stored in the KV type as
the engine stores them); the query is random. FLOPs: 4 x heads x head_dim per (query
token, visible position) (Q K^T and P V, a multiply-add = 2). Each figure is the best of
--calls calls (the median of --rounds rounds). The 16 layers of a token take 16 x the
layer's time: compare with `llamacpu bench -d D` for attention's share of a token.

Peak: the FP32 FMA rate of the cores used, threads x 2 FMA units x vector lanes x 2 x
the clock /proc/cpuinfo reports (lanes 16 with AVX-512, 8 with AVX2, 4 with NEON); a
virtual machine's reported clock may not be the one the cores run at.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llamacpu import _core  # noqa: E402
from llamacpu.cache_types import CACHE_TYPES  # noqa: E402

N_HEADS, N_KV, HD, LAYERS = 32, 8, 64, 16


def clock_ghz() -> float | None:
    try:
        mhz = [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
    except OSError:
        return None
    return max(mhz) / 1000 if mhz else None


def lanes(kernels: str) -> int:
    return 16 if kernels.startswith("avx512") else 8 if kernels == "avx2" else 4


def cache(rng, n_ctx, name):
    x = rng.standard_normal((N_KV * n_ctx, HD)).astype(np.float32)
    raw = _core.kv_store(x, CACHE_TYPES[name])
    return raw.reshape(1, N_KV, n_ctx, -1)


def best(fn, calls):
    t = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--depths", default="4096,16384", help="positions already in the cache (default 4096,16384)")
    ap.add_argument("--cache-types", default="f16,q8_0", help=f"of {', '.join(CACHE_TYPES)} (default f16,q8_0)")
    ap.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    ap.add_argument("-p", type=int, default=512, help="prefill tokens (default 512)")
    ap.add_argument("--calls", type=int, default=3, help="calls per figure, the best kept (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, the median kept (default 3)")
    args = ap.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    ctypes = args.cache_types.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    if any(c not in CACHE_TYPES for c in ctypes) or min(depths) < 1 or min(threads) < 1 or args.p < 1:
        ap.error("--depths, --threads and -p must be positive, --cache-types of " + ", ".join(CACHE_TYPES))
    kernels = _core.best_kernels()
    ghz = clock_ghz()
    rng = np.random.default_rng(0)
    print(f"kernels {kernels}; clock {ghz or '?'} GHz; peak per thread "
          + (f"{2 * lanes(kernels) * 2 * ghz:.0f} GFLOP/s" if ghz else "unknown"))
    print("| KV type | depth | test | threads | layer ms | x16 layers ms | GFLOP/s | % of peak |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for ct in ctypes:
        for d in depths:
            n_ctx = d + args.p
            kc, vc = cache(rng, n_ctx, ct), cache(rng, n_ctx, ct)
            for test, nt in (("pp", args.p), ("tg", 1)):
                q = rng.standard_normal((nt, N_HEADS, HD)).astype(np.float32)
                seq, pos = np.zeros(nt, np.int32), np.arange(d, d + nt, dtype=np.int32)
                flop = 4.0 * N_HEADS * HD * float(np.sum(pos + 1))
                for th in threads:
                    def call():
                        _core.attention(q, kc, vc, CACHE_TYPES[ct], CACHE_TYPES[ct], seq, pos, N_KV, th)
                    t = statistics.median(best(call, args.calls) for _ in range(args.rounds))
                    rate = flop / t / 1e9
                    peak = f"{100 * rate / (th * 2 * lanes(kernels) * 2 * ghz):.0f}%" if ghz else "?"
                    label = f"pp{nt}" if test == "pp" else "tg1"
                    print(f"| {ct} | {d} | {label} | {th} | {t * 1e3:.2f} | {LAYERS * t * 1e3:.0f} | {rate:.1f} | "
                          f"{peak} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
