#!/usr/bin/env python3
"""Decode speed on a busy machine: tg128 of llamacpu and llama.cpp while one other
CPU-bound process runs, and on the idle machine; writes BENCHMARKS.md.

    python tools/bench_busy.py               # -r 3, tg128, idle and busy rows
    python tools/bench_busy.py --quick       # smoke test: tg16, -r 1, prints only
    python tools/bench_busy.py --llama-bench /path/to/llama-bench

What it measures (the 1B Q4_0 files of tools/bench_vs_llamacpp.py, each engine's own
conversion of the same random-weight checkpoint):
  - llamacpu at its default thread count (`llamacpu bench FILE -p 0 -n 128`, no -t) and
    at each fixed count 1..CPUs (-t k);
  - llama.cpp's `llama-bench -p 0 -n 128` at its default thread count (no -t) and at the
    same fixed counts;
  - "busy": while a competing process spins (a Python busy loop in a child process,
    pinned nowhere, killed on every way out of this tool: normal end, error, Ctrl-C,
    SIGTERM; it also dies with this tool's process, PR_SET_PDEATHSIG);
  - "idle": the same runs without it.
Each run is a fresh process; the engines alternate (order flipped every configuration and
run); the table shows medians of -r runs. Before each run the tool waits for the machine
to be quiet apart from the competitor (--quiet-wait, --busy-threshold: the competitor's
one core is added to the threshold in busy rows) and runs a disturbed run again (--redo).
The table reports ours-default / best-fixed-ours (the default's cost against the best
choice one could make by hand) and ours-default / llama.cpp-default.

The generated part lies between <!-- busy:begin --> and <!-- busy:end --> in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_llamacpp as bv  # noqa: E402

BEGIN, END = "<!-- busy:begin -->", "<!-- busy:end -->"
LOADS = ("idle", "busy")
SPIN = "while True:\n    pass\n"


def _die_with_parent() -> None:
    """In the competitor, before exec: SIGKILL it when this tool's process dies (Linux)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def competitor(active: bool = True):
    """A CPU-bound child process (a busy loop) for the duration of the with-block; killed
    and reaped on every exit path. SIGTERM to this tool becomes SystemExit so the block's
    exit runs too."""
    if not active:
        yield None
        return
    old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.DEVNULL,
                         preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    try:
        bv.log(f"competing process {p.pid} started (a busy loop)")
        time.sleep(0.5)  # let it reach the loop
        yield p
    finally:
        p.kill()
        p.wait()
        signal.signal(signal.SIGTERM, old)
        bv.log(f"competing process {p.pid} stopped")


def configs(cpus: int) -> list:
    """Thread settings: None (the engine's default) then 1..cpus."""
    return [None] + list(range(1, cpus + 1))


def summarize(samples: dict, load: str, cpus: int, test: str) -> dict:
    """Medians of one load's runs: {engine: {setting: t/s}} and the two ratios."""
    med = {e: {c: bv.median(samples.get((e, load, c, test), [])) for c in configs(cpus)} for e in ("ours", "llama")}
    fixed = {c: v for c, v in med["ours"].items() if c is not None}
    best = max(fixed, key=lambda c: fixed[c])
    return {"med": med, "best_fixed": best, "vs_best_fixed": med["ours"][None] / fixed[best],
            "vs_llama_default": med["ours"][None] / med["llama"][None]}


def render(ctx: dict) -> str:
    n, cpus = ctx["n"], ctx["cpus"]
    test = f"tg{n}"
    fixed = list(range(1, cpus + 1))
    lm, om = ctx["meta"].get("llama", {}), ctx["meta"].get("ours", {})
    L = [f"### Decode on a busy machine: tg{n} with one competing CPU-bound process (Llama 3.2 1B config, Q4_0)",
         ""]
    L.append(f"Measured {ctx['date']} by `python tools/bench_busy.py {ctx['argv']}` ({ctx['elapsed_min']:.0f} min).")
    L.append("")
    L.append(f"- Machine: {bv.machine_line(ctx['cpu'])}.")
    L.append(f"- busy: a Python busy loop in a child process (pinned nowhere) runs during every busy run; "
             f"idle: it does not. Each run is a fresh process; the engines alternate (order flipped every "
             f"configuration and run); medians of {ctx['reps']} run(s). Before each run the tool waits for "
             f"other jobs to use under {ctx['busy_threshold']} cores (plus the competitor's one in busy rows) "
             f"and runs again a disturbed run (at most {ctx['redo_max']} times; {len(ctx['redone'])} repeat(s) "
             f"this time).")
    L.append(f"- llamacpu {om.get('version')} (git {ctx['git']}), kernels `{om.get('kernels')}`: `llamacpu bench "
             f"llamacpu-1b-q4_0.bin -p 0 -n {n} [-t k] -r 1 --json`; default = no -t"
             f" ({', '.join(f'{ld}: {t} thread(s)' for ld, t in ctx['default_threads']['ours'].items())})."
             + (" **Warning: the llamacpu extension was rebuilt during the runs. Run again.**"
                if ctx["engine_changed"] else ""))
    L.append(f"- llama.cpp from llama-cpp-python=={bv.LLAMA_CPP_PYTHON_VERSION} (build {lm.get('build_number')}, "
             f"commit {lm.get('build_commit')}), `{ctx['llama_flags']}`: `llama-bench -m llamacpp-1b-q4_0.gguf "
             f"-p 0 -n {n} [-t k] -r 1 -o json`; default = no -t"
             f" ({', '.join(f'{ld}: {t} thread(s)' for ld, t in ctx['default_threads']['llama'].items())}).")
    L.append("")
    head = (["machine", "llamacpu default"] + [f"llamacpu t={k}" for k in fixed]
            + ["llama.cpp default"] + [f"llama.cpp t={k}" for k in fixed]
            + ["ours default / best fixed ours", "ours default / llama.cpp default"])
    L.append("| " + " | ".join(head) + " |")
    L.append("|---|" + "---:|" * (len(head) - 1))
    for load in ctx["loads"]:
        s = summarize(ctx["samples"], load, cpus, test)
        cells = [load] + [f"{s['med']['ours'][c]:.2f}" for c in configs(cpus)]
        cells += [f"{s['med']['llama'][c]:.2f}" for c in configs(cpus)]
        cells += [f"**{s['vs_best_fixed']:.2f}×** (best: t={s['best_fixed']})", f"**{s['vs_llama_default']:.2f}×**"]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L.append(f"t/s of tg{n}, medians. Ratios above 1: our default beats the best fixed thread count / "
             "llama.cpp's default.")
    L.append("")
    L.append("<details><summary>All runs: t/s (cores used by other jobs during the run, the competitor "
             "included), in run order</summary>")
    L.append("")
    L.append("| machine | threads | llamacpu | llama.cpp |")
    L.append("|---|---|---|---|")
    for load in ctx["loads"]:
        for c in configs(cpus):
            cells = [", ".join(f"{x:.2f} ({f:.2f})" for x, f in zip(ctx["samples"].get((e, load, c, test), []),
                                                                    ctx["foreign"].get((e, load, c, test), [])))
                     for e in ("ours", "llama")]
            L.append(f"| {load} | {'default' if c is None else c} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("</details>")
    return "\n".join(L)


def write_section(path: Path, body: str) -> None:
    bv.write_part(path, BEGIN, END, body, "busy", after=(bv.DEPTH_END, bv.markers("3b")[1], bv.END))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("-n", type=int, default=128, help="generated tokens per run (default 128)")
    ap.add_argument("-r", "--runs", type=int, default=3, help="alternating runs per engine and setting (default 3)")
    ap.add_argument("--loads", default="idle,busy", help="which rows: idle, busy or both (default idle,busy)")
    ap.add_argument("--cpus", type=int, default=None,
                    help="fixed thread counts 1..CPUS (default: the CPUs this process may run on)")
    ap.add_argument("--llama-bench", type=Path, help="use this llama-bench instead of building one")
    ap.add_argument("--quick", action="store_true", help="smoke test: -n 16 -r 1; prints, writes no file unless --out")
    ap.add_argument("--out", type=Path, default=None, help="file to write (default BENCHMARKS.md; none with --quick)")
    bv.add_quiet_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.runs = 16, 1
        args.quiet_wait, args.redo = min(args.quiet_wait, 10), 0
    loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    if not loads or any(x not in LOADS for x in loads) or len(set(loads)) != len(loads):
        ap.error(f"--loads: {args.loads!r} (idle, busy)")
    cpus = args.cpus or len(os.sched_getaffinity(0))
    if cpus < 1 or args.n < 1 or args.runs < 1:
        ap.error("need --cpus >= 1, -n >= 1, -r >= 1")
    out_path = args.out if args.out is not None else (None if args.quick else bv.REPO / "BENCHMARKS.md")
    t_start = time.time()
    exe, flags, ggufs, ours = bv.llamacpp_and_files(args.llama_bench, ["llama-bench", "llama-quantize"],
                                                    "llama-bench", ["q4_0"], ["q4_0"])
    engine_before = bv.engine_fingerprint()
    engines = [("llama", "llama.cpp"), ("ours", "llamacpu")]
    samples, foreign, redone, meta = {}, {}, [], {}
    default_threads = {"ours": {}, "llama": {}}
    for rep in range(args.runs):
        for load in loads:
            threshold = args.busy_threshold + (1.0 if load == "busy" else 0.0)
            with competitor(load == "busy"):
                for cfg, c in enumerate(configs(cpus)):
                    order = engines if (rep + cfg) % 2 == 0 else engines[::-1]
                    for key, label in order:
                        def once(key=key, label=label, c=c, load=load, rep=rep):
                            r = (bv.run_ours(ours["q4_0"], 0, args.n, c) if key == "ours"
                                 else bv.run_llama(exe, ggufs["q4_0"], 0, args.n, c))
                            (t, _), v = next(iter(r["by_threads"].items()))
                            bv.log(f"run {rep + 1}/{args.runs} {load} {label} "
                                   f"{'default' if c is None else f't={c}'} ({t} threads): tg{args.n} {v:.2f} t/s "
                                   f"({r['wall']:.0f} s, other jobs {r['foreign']:.2f} cores)")
                            return r

                        r = bv.run_undisturbed(once, args.quiet_wait, threshold, args.redo,
                                               on_redo=lambda f, key=key, c=c, load=load:
                                               redone.append((key, load, c, f)))
                        meta[key] = r["meta"]
                        (t, test), v = next(iter(r["by_threads"].items()))
                        if c is None:
                            default_threads[key][load] = t
                        samples.setdefault((key, load, c, test), []).append(v)
                        foreign.setdefault((key, load, c, test), []).append(r["foreign"])
    ctx = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
           "argv": " ".join(sys.argv[1:] if argv is None else argv), "elapsed_min": (time.time() - t_start) / 60,
           "cpu": bv.cpu_info(), "git": bv.git_describe(), "n": args.n, "cpus": cpus, "loads": loads,
           "reps": args.runs, "samples": samples, "foreign": foreign, "redone": redone, "meta": meta,
           "default_threads": default_threads, "llama_flags": flags,
           "engine_changed": bv.engine_fingerprint() != engine_before,
           "busy_threshold": args.busy_threshold, "redo_max": args.redo}
    return bv.publish(render(ctx), out_path, "last-run-busy-quick.json" if args.quick else "last-run-busy.json",
                      {"samples": bv.keyed(samples), "foreign_cores": bv.keyed(foreign), "redone": redone,
                       "meta": meta, "default_threads": default_threads}, write_section)


if __name__ == "__main__":
    sys.exit(main())
