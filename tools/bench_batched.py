#!/usr/bin/env python3
"""Batched decoding: llamacpu against llama-batched-bench, B sequences at once; writes BENCHMARKS.md.

    python tools/bench_batched.py                       # full: Q4_0 and Q4_K_M, -t 2, B = 1,2,4,8,16, -r 3
    python tools/bench_batched.py --types q4_0 -t 1,2   # one type, 1 and 2 threads
    python tools/bench_batched.py --quick               # smoke test: -npp 64 -ntg 16 -npl 1,2,4 -r 1, prints only
    python tools/bench_batched.py --out /tmp/b.md       # write the table elsewhere

What is measured (the same thing, the same way, by both engines):

  llama.cpp: `llama-batched-bench -m GGUF -c B_max*(PP+TG) -b 2048 -ub 512 -npp PP -ntg TG
  -npl 1,2,4,8,16 -t T --output-format jsonl`, built from the same llama.cpp sources as
  tools/bench_vs_llamacpp.py (llama-cpp-python 0.3.36's vendor/llama.cpp; target
  llama-batched-bench, added to the build incrementally). Its defaults are kept: prompts not
  shared (no -pps), decode not separate (no -tgs), flash attention "auto". What it does
  (tools/batched-bench/batched-bench.cpp): one warm-up decode of 16 tokens of sequence 0;
  then for each B, the KV cache cleared, one batch of B separate prompts of PP random tokens
  (sequence j at positions 0..PP-1, only each prompt's last token asks for logits),
  decoded in chunks of n_batch=2048 tokens (ubatch 512): T_PP; then TG steps, each one
  batch of B random tokens (sequence j at position PP+i, logits for all): T_TG.
  S_PP = B*PP / T_PP, S_TG = B*TG / T_TG (aggregate tokens/s over all sequences). -c is
  B_max*(PP+TG): without pps llama.cpp skips a B whose B*(PP+TG) exceeds it, and its
  non-unified KV cache gives each of the B_max sequences c/B_max = PP+TG cells.

  llamacpu: this script in a fresh process (`bench_batched.py --worker FILE`):
  Model(FILE, n_ctx=PP+TG, n_threads=T, n_seq=B_max) (each sequence its own PP+TG
  positions, as above); the same warm-up (16 random tokens of sequence 0, no logits); then
  for each B: reset(), one Model.forward_batch of the B*PP prompt tokens laid out the same
  way (the engine runs them in chunks of its n_batch, 512 tokens), want = each prompt's
  last token: T_PP; then TG calls of forward_batch with B tokens (sequence j at PP+i),
  logits for all: T_TG. Random tokens come from a seeded generator, drawn before the
  clock starts. S_PP and S_TG as above.

  Model files: tools/bench_vs_llamacpp.py's (the exact Llama 3.2 1B config, random weights,
  cached in ~/.cache/llamacpu/bench): Q4_0 is each engine's own conversion of the
  checkpoint; Q4_K_M is llama-quantize's GGUF, run by llama.cpp as it is and by llamacpu
  imported (every tensor's blocks bit-exact).

  Runs: each run is one fresh process per engine covering every B (as one
  llama-batched-bench invocation does); engines alternate and the order flips from one run
  and one configuration to the next; before each run the tool waits for a quiet machine
  and a run that other jobs disturbed is run again (--quiet-wait, --busy-threshold,
  --redo: tools/bench_vs_llamacpp.py's machinery). The table shows medians of the runs.

Output: a markdown table (B, S_TG of each engine, the ratio, each engine's S_TG at B over
its S_TG at B=1, and S_PP) with the machine and git commit, printed, and written into
BENCHMARKS.md between <!-- batched:begin --> and <!-- batched:end --> (--out PATH: that
file instead; --quick writes nothing unless --out). Raw results:
~/.cache/llamacpu/bench/last-run-batched[-quick].json. Targets: S_TG at B=8 >= 3x our B=1,
and >= 1.2x llama.cpp at every B >= 2.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import bench_vs_llamacpp as bv  # noqa: E402

BEGIN, END = "<!-- batched:begin -->", "<!-- batched:end -->"
TYPES = ("q4_0", "q4_k_m")      # q4_0: each engine's conversion; q4_k_m: one GGUF for both
N_BATCH, N_UBATCH = 2048, 512   # llama-batched-bench's defaults, passed explicitly
WARMUP_TOKENS = 16              # llama-batched-bench's warm-up: 16 tokens of sequence 0
TARGET_SCALING_B, TARGET_SCALING = 8, 3.0
TARGET_RATIO = 1.2
MEMORY_SLACK_MB = 200            # target: peak RSS <= file + every slot's KV + this


# ----------------------------------------------------------------------------- our side (worker)

def worker(model: str, npp: int, ntg: int, npl: list, threads: int, seed: int) -> int:
    """The llamacpu side of one run, in its own process: prints one JSON line per B, with
    llama-batched-bench's field names, after a header line."""
    sys.path.insert(0, str(REPO))
    import numpy as np
    from llamacpu.model import Model

    t0 = time.perf_counter()
    m = Model(model, n_ctx=npp + ntg, n_threads=threads, n_seq=max(npl))
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    vocab = m.vocab_size
    import llamacpu
    print(json.dumps({"header": True, "load_s": load_s, "kernels": m.kernels, "n_threads": m.n_threads,
                      "version": getattr(llamacpu, "__version__", "?"), "n_ctx": m.n_ctx, "n_seq": m.n_seq}),
          flush=True)

    # warm up, as llama-batched-bench: 16 random tokens of sequence 0, no logits
    w = min(WARMUP_TOKENS, npp + ntg)
    m.forward_batch(rng.integers(0, vocab, w), np.zeros(w, np.int64), np.arange(w), np.zeros(w, bool))

    for pl in npl:
        # the B prompts one after the other in one batch: sequence j at positions 0..PP-1
        toks = rng.integers(0, vocab, pl * npp)
        seq = np.repeat(np.arange(pl), npp)
        pos = np.tile(np.arange(npp), pl)
        want = pos == npp - 1
        steps = rng.integers(0, vocab, (ntg, pl))
        seqs, ones = np.arange(pl), np.ones(pl, bool)
        m.reset()
        t0 = time.perf_counter()
        m.forward_batch(toks, seq, pos, want)
        t_pp = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(ntg):
            m.forward_batch(steps[i], seqs, np.full(pl, npp + i), ones)
        t_tg = time.perf_counter() - t0
        print(json.dumps({"pp": npp, "tg": ntg, "pl": pl, "t_pp": t_pp, "speed_pp": pl * npp / t_pp,
                          "t_tg": t_tg, "speed_tg": pl * ntg / t_tg, "n_threads": threads}), flush=True)
    return 0


# ----------------------------------------------------------------------------- runs

def parse_jsonl(text: str) -> list:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def by_b(rows: list, npl: list, who: str, text: str) -> dict:
    got = {int(r["pl"]): r for r in rows if "pl" in r}
    missing = [b for b in npl if b not in got]
    if missing:
        raise SystemExit(f"bench_batched: {who} gave no result for B = {missing}:\n{text[-3000:]}")
    return {b: {"s_pp": float(got[b]["speed_pp"]), "s_tg": float(got[b]["speed_tg"]),
                "t_pp": float(got[b]["t_pp"]), "t_tg": float(got[b]["t_tg"])} for b in npl}


def run_llama(exe: Path, gguf: Path, npp: int, ntg: int, npl: list, t: int) -> dict:
    cmd = [exe, "-m", gguf, "-c", max(npl) * (npp + ntg), "-b", N_BATCH, "-ub", N_UBATCH,
           "-npp", npp, "-ntg", ntg, "-npl", ",".join(map(str, npl)), "-t", t, "--output-format", "jsonl"]
    m = bv.run_measured(cmd)
    text = m["out"] + "\n" + m["err"]
    if m["rc"] != 0:
        raise SystemExit(f"llama-batched-bench failed ({m['rc']}):\n{text[-3000:]}")
    rows = parse_jsonl(m["out"]) or parse_jsonl(m["err"])
    meta = {k: rows[0].get(k) for k in ("n_kv_max", "n_batch", "n_ubatch", "flash_attn", "is_pp_shared",
                                         "n_threads", "n_threads_batch")} if rows else {}
    return {"res": by_b(rows, npl, "llama-batched-bench", text), "rss": m["rss"], "wall": m["wall"],
            "foreign": m["foreign"], "meta": meta, "cmd": " ".join(str(c) for c in cmd)}


def run_ours(model: Path, npp: int, ntg: int, npl: list, t: int, seed: int) -> dict:
    cmd = [sys.executable, Path(__file__).resolve(), "--worker", model, "--npp", npp, "--ntg", ntg,
           "--npl", ",".join(map(str, npl)), "-t", t, "--seed", seed]
    m = bv.run_measured(cmd, env=bv.our_env(), cwd=REPO)
    text = m["out"] + "\n" + m["err"]
    if m["rc"] != 0:
        raise SystemExit(f"llamacpu worker failed ({m['rc']}):\n{text[-3000:]}")
    rows = parse_jsonl(m["out"])
    head = next((r for r in rows if r.get("header")), {})
    return {"res": by_b([r for r in rows if not r.get("header")], npl, "llamacpu", text), "rss": m["rss"],
            "wall": m["wall"], "foreign": m["foreign"], "meta": head}


def kv_and_file(model: Path, n_ctx: int, n_seq: int) -> dict:
    """MB of the model file and of the F16 KV cache of n_seq slots of n_ctx positions."""
    from llamacpu.format import read_model
    with read_model(model) as f:
        c = f.config
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * n_ctx * n_seq * 2
    return {"file_mb": Path(model).stat().st_size / 1e6, "kv_mb": kv / 1e6}


# ----------------------------------------------------------------------------- report

def render(ctx: dict) -> str:
    med = bv.median
    L = []
    npp, ntg, npl = ctx["npp"], ctx["ntg"], ctx["npl"]
    L.append(f"### Batched decoding: B sequences at once (Llama 3.2 1B config, PP {npp}, TG {ntg})")
    L.append("")
    L.append(f"Measured {ctx['date']} by `python tools/bench_batched.py {ctx['argv']}` "
             f"({ctx['elapsed_min']:.0f} min), git {ctx['git']}.")
    L.append("")
    if ctx.get("note"):
        L.append(f"**{ctx['note']}**")
        L.append("")
    L.append(f"- Machine: {bv.machine_line(ctx['cpu'])}.")
    lm = ctx["llama_meta"]
    L.append(f"- llama.cpp: `llama-batched-bench` from llama-cpp-python=={bv.LLAMA_CPP_PYTHON_VERSION} "
             f"(`{ctx['llama_flags']}`), run as `{ctx['llama_cmd']}` (prompts not shared, n_kv_max "
             f"{lm.get('n_kv_max')}, flash_attn {lm.get('flash_attn')} (-1: auto, llama.cpp's default)).")
    om = ctx["our_meta"]
    L.append(f"- llamacpu {om.get('version')} (git {ctx['git']}), kernels `{om.get('kernels')}`: "
             f"`tools/bench_batched.py --worker` (Model(n_ctx={npp + ntg}, n_seq={max(npl)}), one "
             f"forward_batch of the B prompts, then {ntg} forward_batch steps of B tokens)."
             + (" **Warning: the llamacpu extension was rebuilt during the runs.**" if ctx["engine_changed"] else ""))
    L.append(f"- Both: B separate prompts of {npp} random tokens prefilled as one batch (S_PP = B×{npp} / "
             f"T_PP), then {ntg} steps each decoding one token of every sequence (S_TG = B×{ntg} / T_TG, "
             f"aggregate over the B sequences); a warm-up of 16 tokens first; one fresh process per run "
             f"and engine covering every B. Medians of {ctx['reps']} run(s), engines alternating (order "
             f"flipped every run).")
    allf = [r["foreign"] for r in ctx["runs"]]
    L.append(f"- Shared machine: before each run the tool waited (at most {ctx['quiet_wait']:.0f} s) for "
             f"the other jobs to use under {ctx['busy_threshold']} cores and ran a disturbed run again (at "
             f"most {ctx['redo']} times; {len(ctx['redone'])} repeat(s)). CPU used by other jobs during the "
             f"kept runs: median {med(allf):.2f}, max {max(allf):.2f} cores.")
    L.append("")
    L.append(f"| type | threads | B | llama.cpp S_TG t/s | llamacpu S_TG t/s | ratio | llama.cpp B/B={npl[0]} | "
             f"llamacpu B/B={npl[0]} | llama.cpp S_PP t/s | llamacpu S_PP t/s | PP ratio |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for typ in ctx["types"]:
        for t in ctx["threads"]:
            m = {(k, b, q): med(ctx["samples"][(k, typ, t, b, q)]) for k in ("llama", "ours") for b in npl
                 for q in ("s_tg", "s_pp")}
            b1 = npl[0]
            for b in npl:
                L.append(f"| {typ.upper()} | {t} | {b} | {m[('llama', b, 's_tg')]:.2f} | {m[('ours', b, 's_tg')]:.2f} | "
                         f"**{m[('ours', b, 's_tg')] / m[('llama', b, 's_tg')]:.2f}×** | "
                         f"{m[('llama', b, 's_tg')] / m[('llama', b1, 's_tg')]:.2f}× | "
                         f"{m[('ours', b, 's_tg')] / m[('ours', b1, 's_tg')]:.2f}× | "
                         f"{m[('llama', b, 's_pp')]:.1f} | {m[('ours', b, 's_pp')]:.1f} | "
                         f"{m[('ours', b, 's_pp')] / m[('llama', b, 's_pp')]:.2f}× |")
            v = []
            if TARGET_SCALING_B in npl and b1 == 1:
                sc = m[("ours", TARGET_SCALING_B, "s_tg")] / m[("ours", 1, "s_tg")]
                v.append(f"B={TARGET_SCALING_B} is {sc:.2f}× our B=1 (target ≥ {TARGET_SCALING:g}×: "
                         f"{'met' if sc >= TARGET_SCALING else 'not met'})")
            low = [(b, m[("ours", b, "s_tg")] / m[("llama", b, "s_tg")]) for b in npl if b >= 2]
            if low:
                worst = min(low, key=lambda x: x[1])
                v.append(f"lowest ratio at B ≥ 2: {worst[1]:.2f}× at B={worst[0]} (target ≥ {TARGET_RATIO:g}× "
                         f"at every B ≥ 2: {'met' if worst[1] >= TARGET_RATIO else 'not met'})")
            if v:
                verdicts.append(f"- {typ.upper()}, {t} thread(s): " + "; ".join(v) + ".")
    L.append("")
    L.append("Ratio = median llamacpu / median llama.cpp (above 1: llamacpu is faster); "
             f"B/B={npl[0]} = an engine's S_TG at B over its own S_TG at B={npl[0]}.")
    L.append("")
    L.extend(verdicts)
    for typ in ctx["types"]:
        mem = ctx["memory"][typ]
        peak = {e: max(r["rss"] for r in ctx["runs"] if r["typ"] == typ and r["engine"] == e) / 1e6
                for e in ("llamacpu", "llama.cpp")}
        bound = mem["file_mb"] + mem["kv_mb"] + MEMORY_SLACK_MB
        L.append(f"- Memory, {typ.upper()}: peak RSS (the process's ru_maxrss, largest of the runs) llamacpu "
                 f"{peak['llamacpu']:,.1f} MB with {max(npl)} sequences of {npp + ntg} positions, against file + "
                 f"all slots' KV + {MEMORY_SLACK_MB} MB = {mem['file_mb']:,.1f} + {mem['kv_mb']:,.1f} + "
                 f"{MEMORY_SLACK_MB} = {bound:,.1f} MB ({'met' if peak['llamacpu'] <= bound else 'not met'}); "
                 f"llama-batched-bench {peak['llama.cpp']:,.1f} MB.")
    L.append("")
    L.append("<details><summary>All runs: S_TG / S_PP t/s per B (cores used by other jobs during the run), "
             "in run order</summary>")
    L.append("")
    L.append("| run | type | threads | engine | other jobs | " + " | ".join(f"B={b}" for b in npl) + " |")
    L.append("|---:|---|---:|---|---:|" + "---|" * len(npl))
    for r in ctx["runs"]:
        L.append(f"| {r['rep'] + 1} | {r['typ'].upper()} | {r['t']} | {r['engine']} | {r['foreign']:.2f} | "
                 + " | ".join(f"{r['res'][b]['s_tg']:.2f} / {r['res'][b]['s_pp']:.1f}" for b in npl) + " |")
    L.append("")
    L.append("</details>")
    return "\n".join(L)


def write_section(path: Path, body: str) -> None:
    bv.write_part(path, BEGIN, END, body, "batched", after=("<!-- bench:3b:end -->",))


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--npp", type=int, default=512, help="prompt tokens of each sequence (default 512)")
    ap.add_argument("--ntg", type=int, default=128, help="tokens generated by each sequence (default 128)")
    ap.add_argument("--npl", default="1,2,4,8,16", help="numbers of sequences B (default 1,2,4,8,16)")
    ap.add_argument("-t", "--threads", default="2", help="thread counts (default 2; e.g. 1,2)")
    ap.add_argument("-r", "--runs", type=int, default=3, help="alternating runs per engine (default 3)")
    ap.add_argument("--types", default=",".join(TYPES),
                    help=f"weight types, of {', '.join(TYPES)} (default both). q4_0: each engine's own "
                         "conversion of the checkpoint; q4_k_m: llama-quantize's GGUF, imported by llamacpu")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: --npp 64 --ntg 16 --npl 1,2,4 -r 1, short quiet wait, no redo; prints "
                         "the table, writes no file unless --out")
    ap.add_argument("--out", type=Path, default=None,
                    help="file to write the table into, between the batched markers (default BENCHMARKS.md; "
                         "none with --quick)")
    ap.add_argument("--note", default=None, help="a line put in bold above the table (e.g. on noise)")
    ap.add_argument("--llama-batched-bench", type=Path, help="use this llama-batched-bench instead of building one")
    bv.add_quiet_args(ap, "run", redo=2)
    ap.add_argument("--seed", type=int, default=1234, help="seed of our worker's random tokens")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)   # internal: our side of one run
    args = ap.parse_args(argv)
    try:
        npl = [int(x) for x in args.npl.split(",") if x.strip()]
        threads = [int(x) for x in args.threads.split(",") if x.strip()]
    except ValueError:
        ap.error("--npl and -t take comma-separated integers")
    if args.worker:
        return worker(str(args.worker), args.npp, args.ntg, npl, threads[0], args.seed)
    if args.quick:
        args.npp, args.ntg, args.runs = 64, 16, 1
        npl = [b for b in npl if b <= 4] if args.npl == "1,2,4,8,16" else npl
        args.quiet_wait, args.redo = min(args.quiet_wait, 10), 0
    types = [x.strip().lower() for x in args.types.split(",") if x.strip()]
    if not npl or min(npl) < 1 or not threads or min(threads) < 1 or args.runs < 1 or args.npp < 1 or args.ntg < 1:
        ap.error("need B >= 1, threads >= 1, -r >= 1, --npp >= 1, --ntg >= 1")
    if npl != sorted(set(npl)):
        ap.error("--npl: increasing, without repeats")
    for typ in types:
        if typ not in TYPES:
            ap.error(f"--types: {typ} (one of {', '.join(TYPES)})")
    out_path = args.out if args.out is not None else (None if args.quick else REPO / "BENCHMARKS.md")
    t_start = time.time()

    # llama.cpp: the same sources and build as tools/bench_vs_llamacpp.py, plus llama-batched-bench
    exe, flags, ggufs, ours = bv.llamacpp_and_files(args.llama_batched_bench, bv.BATCHED_TARGETS,
                                                    "llama-batched-bench", types, types)
    engine_before = bv.engine_fingerprint()

    engines = [("llama", "llama.cpp"), ("ours", "llamacpu")]
    samples, runs, redone = {}, [], []
    partial = bv.BENCH_DIR / ("last-run-batched-quick.partial.json" if args.quick else "last-run-batched.partial.json")
    llama_meta, our_meta, llama_cmd = {}, {}, ""
    for rep in range(args.runs):
        for cfg, (typ, t) in enumerate((typ, t) for typ in types for t in threads):
            order = engines if (rep + cfg) % 2 == 0 else engines[::-1]
            for key, label in order:
                def once(key=key, label=label, typ=typ, t=t, rep=rep):
                    if key == "ours":
                        r = run_ours(ours[typ], args.npp, args.ntg, npl, t, args.seed + rep)
                    else:
                        r = run_llama(exe, ggufs[typ], args.npp, args.ntg, npl, t)
                    bv.log(f"run {rep + 1}/{args.runs} {typ} t={t} {label}: S_TG "
                           + ", ".join(f"B={b} {r['res'][b]['s_tg']:.1f}" for b in npl)
                           + f"; S_PP B=1 {r['res'][npl[0]]['s_pp']:.1f} ({r['wall']:.0f} s, "
                             f"other jobs {r['foreign']:.2f} cores)")
                    return r

                r = bv.run_undisturbed(once, args.quiet_wait, args.busy_threshold, args.redo,
                                       on_redo=lambda f, key=key, typ=typ, t=t: redone.append((key, typ, t, f)))
                if key == "ours":
                    our_meta = r["meta"]
                else:
                    llama_meta, llama_cmd = r["meta"], r["cmd"]
                for b in npl:
                    for q in ("s_tg", "s_pp"):
                        samples.setdefault((key, typ, t, b, q), []).append(r["res"][b][q])
                runs.append({"rep": rep, "typ": typ, "t": t, "engine": label, "foreign": r["foreign"],
                             "wall": r["wall"], "rss": r["rss"], "res": r["res"]})
                partial.write_text(json.dumps({"runs": runs, "argv": sys.argv[1:] if argv is None else argv},
                                              indent=1, default=str))   # kept if the tool is stopped

    llama_cmd = llama_cmd.replace(str(bv.BENCH_DIR) + "/", "").replace(str(exe.parent) + "/", "")
    ctx = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
           "argv": " ".join(sys.argv[1:] if argv is None else argv),
           "elapsed_min": (time.time() - t_start) / 60, "cpu": bv.cpu_info(), "git": bv.git_describe(),
           "npp": args.npp, "ntg": args.ntg, "npl": npl, "types": types, "threads": threads, "reps": args.runs,
           "samples": samples, "runs": runs, "redone": redone, "llama_meta": llama_meta, "our_meta": our_meta,
           "llama_flags": flags, "llama_cmd": llama_cmd, "engine_changed": bv.engine_fingerprint() != engine_before,
           "quiet_wait": args.quiet_wait, "busy_threshold": args.busy_threshold, "redo": args.redo,
           "note": args.note, "memory": {typ: kv_and_file(ours[typ], args.npp + args.ntg, max(npl)) for typ in types}}
    return bv.publish(render(ctx), out_path,
                      "last-run-batched-quick.json" if args.quick else "last-run-batched.json",
                      {"samples": bv.keyed(samples), "runs": runs, "redone": redone, "llama_meta": llama_meta,
                       "our_meta": our_meta, "llama_cmd": llama_cmd, "argv": ctx["argv"], "git": ctx["git"]},
                      write_section)


if __name__ == "__main__":
    sys.exit(main())
