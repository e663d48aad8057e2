#!/usr/bin/env python3
"""Single-thread x8 gemm microbenchmark, one line per (weight type, kernel table).

    python tools/bench_kernels.py                      # every quantized type, every table here
    python tools/bench_kernels.py --types q4_0,q4_k,q6_k --tables avx512vnni --rounds 5

Weights: random valid blocks (as tests/test_kernels.py makes them) of COLS columns, in
the x8 layout. Decode: one token against ROWS1 rows (--decode-mb of weights: the default, 1000 MB,
is larger than a 1B model and than the 480 MB L3 of the Xeon VMs seen here, so it streams
from memory as decoding does; at 96 MB, the old default, it ran from that L3 and
favoured other kernels than decoding does, BENCHMARKS.md session 10): GB/s of weight bytes read. Prefill: 64 tokens
against 4096 rows: GMAC/s. Each figure is the best of --calls calls, the median of
--rounds rounds that alternate the tables. It includes quantizing the activations
(as the engine does once per matmul), which is small beside the matmul.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llamacpu import _core, format as fmt  # noqa: E402


def random_blocks(rng, t, rows, nblocks):
    info = fmt.TYPES[t]
    raw = rng.integers(0, 256, (rows, nblocks, info.block_bytes), dtype=np.uint8)
    for off in info.hdr:
        v = (rng.uniform(1e-4, 0.05, (rows, nblocks)) * rng.choice([-1, 1], (rows, nblocks))).astype(np.float16)
        raw[..., off:off + 2] = v.view(np.uint8).reshape(rows, nblocks, 2)
    return raw.reshape(rows, -1)


CLOCK = time.perf_counter


def best_time(fn, calls):
    best = float("inf")
    for _ in range(calls):
        t0 = CLOCK()
        fn()
        best = min(best, CLOCK() - t0)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default=",".join(fmt.TYPES[t].name.lower() for t in sorted(fmt.QUANTIZED_TYPES)))
    ap.add_argument("--tables", default=",".join(k for k in _core.available_kernels() if k != "scalar"))
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--decode-mb", type=float, default=1000,
                    help="weight megabytes for the one-token test (default 1000: larger than the L3)")
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the thread's CPU time instead of the wall clock (on a machine busy with "
                         "other work: compares kernels, though memory bandwidth is still shared)")
    args = ap.parse_args(argv)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.thread_time
    ids = {t.name.lower(): tid for tid, t in fmt.TYPES.items()}
    types = [ids[n.strip().lower()] for n in args.types.split(",") if n.strip()]
    tables = [n.strip() for n in args.tables.split(",") if n.strip()]
    rng = np.random.default_rng(0)
    cols = args.cols
    data = {}
    for t in types:
        rb = fmt.row_bytes(t, cols)
        rows1 = max(8, int(args.decode_mb * 1e6 / rb) // 8 * 8)
        w1 = fmt.x8_pack(random_blocks(rng, t, rows1, cols // fmt.TYPES[t].block_elems), t)
        w64 = fmt.x8_pack(random_blocks(rng, t, 4096, cols // fmt.TYPES[t].block_elems), t)
        data[t] = (rows1, w1, w64)
    x1 = rng.standard_normal((1, cols)).astype(np.float32)
    x64 = rng.standard_normal((64, cols)).astype(np.float32)
    res = {}
    for r in range(args.rounds):
        for t in types:
            rows1, w1, w64 = data[t]
            for impl in (tables if r % 2 == 0 else tables[::-1]):
                dt1 = best_time(lambda: _core.gemm(w1, t, rows1, cols, x1, impl, layout=1), args.calls)
                dt64 = best_time(lambda: _core.gemm(w64, t, 4096, cols, x64, impl, layout=1), max(2, args.calls // 2))
                res.setdefault((t, impl), []).append((w1.nbytes / dt1 / 1e9, 64 * 4096 * cols / dt64 / 1e9))
    print(f"{'type':8} {'table':11} {'1 token GB/s':>13} {'64 tokens GMAC/s':>17}   (median of {args.rounds} rounds, "
          f"{cols} cols, 1 thread)")
    for t in types:
        for impl in tables:
            v = res[(t, impl)]
            print(f"{fmt.TYPES[t].name:8} {impl:11} {statistics.median(a for a, _ in v):13.1f} "
                  f"{statistics.median(b for _, b in v):17.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
