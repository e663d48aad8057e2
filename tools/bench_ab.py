"""Two builds of llamacpu side by side: `llamacpu bench` on the same files, alternating
the builds call by call, medians per (file, threads) and their ratio (B / A).

    git worktree add /tmp/before HEAD~1 && (cd /tmp/before && python setup.py build_ext --inplace -q)
    python tools/bench_ab.py /tmp/before . FILE... [-t 1,2] [-p 512] [-n 0] [-r 5]

A and B are checkouts with their extension built in place (each call runs with PYTHONPATH set
to one of them). Each call is one `llamacpu bench ... -r 2 --json` process; the sample is its
mean t/s. On a shared, noisy machine alternating keeps both builds under the same load, and
the median of several rounds is the figure to quote (BENCHMARKS.md, "What we tried").
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_llamacpp as bv  # noqa: E402


def bench(build: Path, path: str, threads: int, p: int, n: int) -> float:
    return bv.run_ours(Path(path), p, n, threads, repo=build, reps=2)["by_threads"][(threads, f"pp{p}" if p else f"tg{n}")]


def table(samples: dict, files, threads, test: str) -> str:
    rows = [f"| file | threads | {test} A t/s | {test} B t/s | B / A |", "|---|---:|---:|---:|---:|"]
    for f in files:
        for t in threads:
            a, b = statistics.median(samples[(f, t, "A")]), statistics.median(samples[(f, t, "B")])
            rows.append(f"| {Path(f).name} | {t} | {a:.1f} | {b:.1f} | {b / a:.3f}× |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="checkout A (the reference: before)")
    ap.add_argument("b", type=Path, help="checkout B (after)")
    ap.add_argument("files", nargs="+", help="model files (llamacpu or GGUF)")
    ap.add_argument("-t", "--threads", default="1,2", help="thread counts (default 1,2)")
    ap.add_argument("-p", type=int, default=512, help="prompt tokens (default 512)")
    ap.add_argument("-n", type=int, default=0, help="generated tokens (default 0; with -p 0, a tg test)")
    ap.add_argument("-r", "--rounds", type=int, default=5, help="alternating rounds (default 5)")
    args = ap.parse_args(argv)
    threads = [int(x) for x in args.threads.split(",")]
    for d in (args.a, args.b):
        if not any((d / "llamacpu").glob("_core*.so")):
            ap.error(f"{d}: no llamacpu/_core*.so (build it: cd {d} && python setup.py build_ext --inplace)")
    test = f"pp{args.p}" if args.p else f"tg{args.n}"
    samples = {}
    for rnd in range(args.rounds):
        for f in args.files:
            for t in threads:
                for key, build in (("A", args.a), ("B", args.b)) if rnd % 2 == 0 else (("B", args.b), ("A", args.a)):
                    v = bench(build.resolve(), f, t, args.p, args.n)
                    samples.setdefault((f, t, key), []).append(v)
                    print(f"round {rnd + 1} {Path(f).name} t={t} {key}: {v:.1f} t/s", file=sys.stderr, flush=True)
    print(f"{test}, medians of {args.rounds} alternating rounds; A = {args.a}, B = {args.b}\n")
    print(table(samples, args.files, threads, test))
    return 0


if __name__ == "__main__":
    sys.exit(main())
