#!/usr/bin/env python3
"""Serving: K concurrent streaming OpenAI clients against `llamacpu serve` and `llama-server`; writes BENCHMARKS.md.

    python tools/bench_serve.py                     # full: Q4_0 and Q4_K_M, K = 1,4,8, -t 2, 3 rounds
    python tools/bench_serve.py --types q4_k_m -k 1,8
    python tools/bench_serve.py --quick             # smoke test: short prompts, K = 1,2, 1 round, max_tokens 16
    python tools/bench_serve.py --out /tmp/s.md     # write the table elsewhere

What is measured:

  Servers, one pair per K (both up together, the same port kind, 127.0.0.1):
    llamacpu:  python -m llamacpu serve MODEL --parallel K -c SLOT_CTX -t T --port P (its -c is
               per slot: K slots of SLOT_CTX each, as llama-server's K*SLOT_CTX split K ways)
               (when `llamacpu serve --help` has no --parallel, the tool runs it without the
               flag: one request at a time, the others queued, and the table says so)
    llama.cpp: llama-server -m GGUF -np K -c K*SLOT_CTX -t T --port P, built from the same
               llama.cpp sources as tools/bench_vs_llamacpp.py (target llama-server, added
               to its build incrementally); its other defaults kept (continuous batching,
               -b 2048 -ub 512, flash attention auto, the RAM prompt cache). -np K without
               --kv-unified: each slot gets SLOT_CTX cells.
  Model files are tools/bench_vs_llamacpp.py's (exact Llama 3.2 1B config, random weights):
  Q4_K_M: both run the same GGUF (llamacpu is given the .gguf and converts it into its
  cache once, at its first start); Q4_0: each engine its own conversion of the checkpoint.

  A round: the REQUESTS chat requests (default 8: the 8 fixed prompts below, 100-300 tokens
  each with the chat template) sent by K client threads at once, each thread taking the
  next request when its previous one has finished streaming (the `openai` package,
  stream=True, stream_options.include_usage, max_tokens 128, temperature 0). Each request's
  system message names the round and the request, so no prompt repeats from one round to
  the next and a prompt cache can reuse only the template's first line.
    aggregate t/s = sum of completion tokens of the round / wall time of the round (first
                    request sent to last stream ended); completion tokens from the usage of
                    the last chunk, or the number of content chunks when a server gives none.
    TTFT          = per request, the time from sending it to the first chunk with content
                    (so, under load, queueing time included); p50 and p95 over the round's
                    requests (linear interpolation).
  One warm-up request per server first; then the rounds, engines alternating (the order
  flips every round and every K); before each round the tool waits for a quiet machine and
  a round that other jobs disturbed is run again (--quiet-wait, --busy-threshold, --redo;
  "other jobs" = the CPU the machine used minus the two servers' and this process's). The
  table shows medians over the rounds of each figure.

  With random weights and greedy decoding a reply may end early at an end-of-turn token;
  the table shows the completion tokens per request, and t/s counts only the tokens given.

Output: a markdown table (type, K, t/s of each engine and the ratio, TTFT p50/p95 of each)
with the machine and git commit, printed, and written into BENCHMARKS.md between
<!-- serve:begin --> and <!-- serve:end --> (--out PATH: that file; --quick: none unless
--out). Raw results: ~/.cache/llamacpu/bench/last-run-serve[-quick].json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import bench_vs_llamacpp as bv  # noqa: E402

BEGIN, END = "<!-- serve:begin -->", "<!-- serve:end -->"
TYPES = ("q4_0", "q4_k_m")
SLOT_CTX = 1024          # context per slot: the longest prompt (~300 tokens) + 128 + margin
READY_TIMEOUT_S = 900    # a server's start, llamacpu's first import of a GGUF included
LOG_DIR = bv.BENCH_DIR / "serve-logs"

PROMPTS = [
    "Explain how a hash table works to a student who knows arrays and loops but has never seen hashing. "
    "Cover what a hash function does, why two keys can land in the same bucket, and two common ways of "
    "dealing with such collisions (separate chaining and open addressing). Then describe what happens when "
    "the table gets too full, why the table is resized, and what that costs on average per insertion. Finish "
    "with one paragraph on when a balanced binary search tree would be the better choice, with an example.",

    "I am planning a three-day walking trip in a hilly region in late autumn. The days will be short, the "
    "weather can change quickly, and I will stay in small guesthouses, so I only carry a daypack. Write a "
    "packing list grouped into clothing, navigation, food and water, first aid, and small comforts, and for "
    "each item say in a few words why it earns its place. Point out the three mistakes first-time autumn "
    "walkers make most often and how to avoid them.",

    "Summarise the main causes of the French Revolution for a reader who remembers only that it began in "
    "1789. Discuss the state's debt and the failed attempts at tax reform, the privileges of the clergy and "
    "the nobility, the bad harvests and the price of bread, the influence of Enlightenment ideas, and the "
    "calling of the Estates-General. Keep it to about five short paragraphs, and end with a sentence on "
    "which of these causes historians argue about most.",

    "Write a short story, about four hundred words, about a lighthouse keeper who finds a message in a "
    "bottle that seems to have been written by her own grandmother fifty years earlier. The story should "
    "take place over a single stormy night, include at least one line of dialogue with a radio operator on "
    "the mainland, and end on a quiet, hopeful note rather than a twist. Avoid cliches about the sea being "
    "cruel; let the weather be simply weather.",

    "Compare three ways to make a small Python web service handle more requests per second: running several "
    "worker processes behind a load balancer, rewriting the request handlers with asyncio, and moving the "
    "expensive part of the work into a C extension or a separate service. For each option, explain what it "
    "improves, what it costs in complexity, which kinds of workload it helps (CPU-bound or I/O-bound) and "
    "which it does not, and what you would measure before and after the change to know it worked. Assume "
    "the service currently runs a single process with a thread pool of eight threads, talks to a "
    "PostgreSQL database, and spends about a third of each request parsing and validating large JSON "
    "bodies. Conclude with the order in which you would try the three options and why.",

    "My tomato plants on a sunny balcony have yellow lower leaves, some brown spots with rings on them, and "
    "the fruit is splitting after heavy rain. They grow in 20-litre pots with bagged compost, watered by "
    "hand every evening. What are the likely causes of each symptom, how can I tell them apart, and what "
    "should I change this season and next?",

    "Give a clear explanation of how public-key cryptography lets two people who have never met agree on a "
    "secret over a channel that everyone can read. Use the Diffie-Hellman key exchange as the worked "
    "example, with small numbers that a reader can check by hand, and then explain why the same idea is safe "
    "with very large numbers. Mention what a man-in-the-middle attacker could do if the exchange were not "
    "authenticated, and how certificates or signatures prevent it. Keep the mathematics to modular "
    "arithmetic and avoid elliptic curves.",

    "Draft a polite but firm email to a landlord about a heating system that has failed three times in six "
    "weeks. The first two repairs were quick patches by different contractors, and the flat has now been "
    "without heating for four days while the outside temperature is near freezing. Ask for a permanent "
    "repair by a named date, a temporary heater in the meantime, and a partial rent reduction for the days "
    "without heat. Keep it under three hundred words and make the requests easy to say yes to.",
]
QUICK_PROMPTS = [p.split(". ")[0] + "." for p in PROMPTS]


# ----------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llamacpu_has_parallel() -> bool:
    r = subprocess.run([sys.executable, "-m", "llamacpu", "serve", "--help"], capture_output=True, text=True,
                       env=bv.our_env(), cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"bench_serve: `llamacpu serve --help` failed:\n{(r.stdout + r.stderr)[-2000:]}")
    return "--parallel" in r.stdout


def proc_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of process pid and its waited-for children (/proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in v[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Server:
    """A server process started by this tool (its own session), its log, its port."""

    def __init__(self, key: str, label: str, cmd: list, log: Path, env=None, cwd=None):
        self.key, self.label, self.cmd, self.log_path = key, label, [str(c) for c in cmd], log
        self.port = int(self.cmd[self.cmd.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        log.parent.mkdir(parents=True, exist_ok=True)
        bv.log("$ " + " ".join(self.cmd) + f"  > {log}")
        self.logf = open(log, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.logf, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     start_new_session=True)
        self.model_id = None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        t_end = time.time() + timeout
        while time.time() < t_end:
            if self.proc.poll() is not None:
                raise SystemExit(f"bench_serve: {self.label} exited ({self.proc.returncode}); end of "
                                 f"{self.log_path}:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as m:
                            self.model_id = json.loads(m.read())["data"][0]["id"]
                        return
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError):
                pass
            time.sleep(1.0)
        self.stop()
        raise SystemExit(f"bench_serve: {self.label} not ready after {timeout:.0f} s (log {self.log_path})")

    def cpu(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()


# ----------------------------------------------------------------------------- clients

def percentile(xs, q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def one_request(client, model_id: str, prompt: str, tag: str, max_tokens: int) -> dict:
    messages = [{"role": "system", "content": f"You are a helpful assistant. Session {tag}."},
                {"role": "user", "content": prompt}]
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    ttft = None
    chunks = 0
    usage = None
    finish = None
    for ch in stream:
        if getattr(ch, "usage", None) is not None:
            usage = ch.usage
        for c in ch.choices or []:
            if c.delta is not None and c.delta.content:
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if c.finish_reason:
                finish = c.finish_reason
    t1 = time.perf_counter()
    return {"ttft": ttft if ttft is not None else t1 - t0, "t": t1 - t0, "t_end": t1, "t_start": t0,
            "completion_tokens": usage.completion_tokens if usage is not None else chunks,
            "prompt_tokens": usage.prompt_tokens if usage is not None else None,
            "from_usage": usage is not None, "chunks": chunks, "finish": finish}


def run_round(server: Server, others: list, k: int, prompts: list, n_requests: int, max_tokens: int,
              tag: str) -> dict:
    """n_requests chat requests over k client threads; the round's figures."""
    import openai
    work = queue.Queue()
    for i in range(n_requests):
        work.put(i)
    results, errors = [None] * n_requests, []

    def client_thread():
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=1800)
        while True:
            try:
                i = work.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = one_request(client, server.model_id, prompts[i % len(prompts)], f"{tag}-{i}",
                                         max_tokens)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"request {i}: {type(e).__name__}: {e}")

    busy0, own0 = bv.cpu_busy_seconds(), os.times()
    srv0 = {s.key: s.cpu() for s in [server] + others}
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_thread) for _ in range(k)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    busy1, own1 = bv.cpu_busy_seconds(), os.times()
    srv = sum(s.cpu() - srv0[s.key] for s in [server] + others)
    own = (own1.user - own0.user) + (own1.system - own0.system)
    if errors:
        raise SystemExit(f"bench_serve: {server.label}: {len(errors)} request(s) failed: {errors[:3]} (log "
                         f"{server.log_path})")
    foreign = max(0.0, (busy1 - busy0) - srv - own) / max(wall, 1e-9)
    tokens = sum(r["completion_tokens"] for r in results)
    ttfts = [r["ttft"] for r in results]
    return {"tps": tokens / wall, "wall": wall, "tokens": tokens, "ttft_p50": percentile(ttfts, 0.5),
            "ttft_p95": percentile(ttfts, 0.95), "tokens_per_request": tokens / n_requests,
            "prompt_tokens": [r["prompt_tokens"] for r in results], "from_usage": all(r["from_usage"] for r in results),
            "finish": sorted({str(r["finish"]) for r in results}), "foreign": foreign,
            "server_cpu": srv, "client_cpu": own}


# ----------------------------------------------------------------------------- report

def render(ctx: dict) -> str:
    med = bv.median
    L = []
    L.append(f"### Serving: K concurrent streaming clients (Llama 3.2 1B config, {ctx['threads']} threads)")
    L.append("")
    L.append(f"Measured {ctx['date']} by `python tools/bench_serve.py {ctx['argv']}` "
             f"({ctx['elapsed_min']:.0f} min), git {ctx['git']}.")
    L.append("")
    if ctx.get("note"):
        L.append(f"**{ctx['note']}**")
        L.append("")
    L.append(f"- Machine: {bv.machine_line(ctx['cpu'])}.")
    L.append(f"- llama.cpp: `llama-server -m GGUF -np K -c K×{ctx['slot_ctx']} -t {ctx['threads']}` from "
             f"llama-cpp-python=={bv.LLAMA_CPP_PYTHON_VERSION} (`{ctx['llama_flags']}`), other settings "
             f"its defaults.")
    if ctx["parallel"]:
        L.append(f"- llamacpu (git {ctx['git']}): `python -m llamacpu serve MODEL --parallel K -c "
                 f"{ctx['slot_ctx']} -t {ctx['threads']}` (its -c is per slot).")
    else:
        L.append(f"- llamacpu (git {ctx['git']}): `python -m llamacpu serve MODEL -c K×{ctx['slot_ctx']} -t "
                 f"{ctx['threads']}`. **This llamacpu has no `serve --parallel`: it answers one request at a "
                 f"time and queues the others, so at K > 1 its t/s is its one-stream speed and its TTFT "
                 f"includes the queue.**")
    L.append("- Files: Q4_K_M: the same GGUF for both (llamacpu imports it into its cache at first start); "
             "Q4_0: each engine's own conversion of the checkpoint (tools/bench_vs_llamacpp.py's files).")
    L.append(f"- A round: {ctx['n_requests']} chat requests (the tool's {len(ctx['prompts'])} fixed prompts, "
             f"{ctx['prompt_tokens']} prompt tokens each with the template) sent by K client threads of the "
             f"`openai` package (stream, max_tokens {ctx['max_tokens']}, temperature 0), each thread sending "
             f"its next request when the previous one has ended; t/s = completion tokens of the round / its "
             f"wall time; TTFT = send to first content chunk (queueing included), p50/p95 over the round's "
             f"requests. One warm-up request per server, then {ctx['reps']} round(s) per engine and K, "
             f"engines alternating (order flipped every round); the table shows medians over the rounds.")
    allf = [r["foreign"] for r in ctx["rounds"]]
    L.append(f"- Shared machine: before each round the tool waited (at most {ctx['quiet_wait']:.0f} s) for the "
             f"other jobs to use under {ctx['busy_threshold']} cores and ran a disturbed round again (at most "
             f"{ctx['redo']} times; {len(ctx['redone'])} repeat(s)); other jobs during the kept rounds: median "
             f"{med(allf):.2f}, max {max(allf):.2f} cores.")
    L.append("")
    L.append("| type | K | llama.cpp t/s | llamacpu t/s | ratio | llama.cpp TTFT p50 / p95 s | "
             "llamacpu TTFT p50 / p95 s | tokens/request (llama.cpp / llamacpu) |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for typ in ctx["types"]:
        for k in ctx["ks"]:
            f = {(e, q): med([r[q] for r in ctx["rounds"] if (r["key"], r["typ"], r["k"]) == (e, typ, k)])
                 for e in ("llama", "ours") for q in ("tps", "ttft_p50", "ttft_p95", "tokens_per_request")}
            L.append(f"| {typ.upper()} | {k} | {f[('llama', 'tps')]:.2f} | {f[('ours', 'tps')]:.2f} | "
                     f"**{f[('ours', 'tps')] / f[('llama', 'tps')]:.2f}×** | "
                     f"{f[('llama', 'ttft_p50')]:.2f} / {f[('llama', 'ttft_p95')]:.2f} | "
                     f"{f[('ours', 'ttft_p50')]:.2f} / {f[('ours', 'ttft_p95')]:.2f} | "
                     f"{f[('llama', 'tokens_per_request')]:.0f} / {f[('ours', 'tokens_per_request')]:.0f} |")
    L.append("")
    L.append("Ratio = llamacpu t/s / llama.cpp t/s (above 1: llamacpu is faster).")
    L.append("")
    L.append("<details><summary>All rounds, in run order</summary>")
    L.append("")
    L.append("| type | K | round | engine | t/s | wall s | tokens | TTFT p50 / p95 s | other jobs | finish |")
    L.append("|---|---:|---:|---|---:|---:|---:|---:|---:|---|")
    for r in ctx["rounds"]:
        L.append(f"| {r['typ'].upper()} | {r['k']} | {r['rep'] + 1} | {r['label']} | {r['tps']:.2f} | "
                 f"{r['wall']:.1f} | {r['tokens']} | {r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | "
                 f"{r['foreign']:.2f} | {', '.join(r['finish'])} |")
    L.append("")
    L.append("</details>")
    return "\n".join(L)


def write_section(path: Path, body: str) -> None:
    bv.write_part(path, BEGIN, END, body, "serve", after=("<!-- batched:end -->", "<!-- bench:3b:end -->"))


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", "--clients", default="1,4,8", help="numbers of concurrent clients K (default 1,4,8); "
                                                             "each server runs with K slots")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads of each server (default 2)")
    ap.add_argument("-r", "--rounds", type=int, default=3, help="rounds per engine and K (default 3)")
    ap.add_argument("--requests", type=int, default=None,
                    help=f"requests per round (default {len(PROMPTS)}, one per prompt; more cycle the prompts)")
    ap.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each request (default 128)")
    ap.add_argument("--types", default=",".join(TYPES), help=f"weight types, of {', '.join(TYPES)} (default both)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: short prompts, K = 1,2, 1 round, 4 requests, max_tokens 16, short quiet "
                         "wait; prints the table, writes no file unless --out")
    ap.add_argument("--out", type=Path, default=None,
                    help="file to write the table into, between the serve markers (default BENCHMARKS.md; "
                         "none with --quick)")
    ap.add_argument("--note", default=None, help="a line put in bold above the table (e.g. on noise)")
    ap.add_argument("--llama-server", type=Path, help="use this llama-server instead of building one")
    bv.add_quiet_args(ap, "round", redo=1)
    args = ap.parse_args(argv)
    prompts = PROMPTS
    if args.quick:
        prompts = QUICK_PROMPTS
        args.clients = "1,2" if args.clients == "1,4,8" else args.clients
        args.rounds, args.max_tokens = 1, min(args.max_tokens, 16)
        args.requests = args.requests or 4
        args.quiet_wait, args.redo = min(args.quiet_wait, 10), 0
    n_requests = args.requests or len(PROMPTS)
    try:
        ks = [int(x) for x in args.clients.split(",") if x.strip()]
    except ValueError:
        ap.error("-k takes comma-separated integers")
    types = [x.strip().lower() for x in args.types.split(",") if x.strip()]
    if not ks or min(ks) < 1 or args.threads < 1 or args.rounds < 1 or n_requests < 1 or args.max_tokens < 1:
        ap.error("need K >= 1, -t >= 1, -r >= 1, --requests >= 1, --max-tokens >= 1")
    for typ in types:
        if typ not in TYPES:
            ap.error(f"--types: {typ} (one of {', '.join(TYPES)})")
    out_path = args.out if args.out is not None else (None if args.quick else REPO / "BENCHMARKS.md")
    t_start = time.time()

    exe, flags, ggufs, ours = bv.llamacpp_and_files(args.llama_server, bv.SERVER_TARGETS, "llama-server", types,
                                                    [t for t in types if t in bv.OWN_TYPES])
    # Q4_K_M: llamacpu gets the very GGUF (it converts it into its cache); Q4_0: its own file
    our_model = {t: (ours[t] if t in bv.OWN_TYPES else ggufs[t]) for t in types}
    parallel = llamacpu_has_parallel()
    if not parallel:
        bv.log("`llamacpu serve --help` has no --parallel: running llamacpu serve without it (one request at a "
               "time, the rest queued)")

    engines = [("llama", "llama.cpp"), ("ours", "llamacpu")]
    rounds, redone = [], []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for ci, (typ, k) in enumerate((typ, k) for typ in types for k in ks):
        ctx_total = k * SLOT_CTX
        servers = {}
        try:
            for key, label in engines:
                port = free_port()
                log = LOG_DIR / f"{stamp}-{typ}-k{k}-{key}.log"
                if key == "llama":
                    cmd = [exe, "-m", ggufs[typ], "-np", k, "-c", ctx_total, "-t", args.threads,
                           "--host", "127.0.0.1", "--port", port]
                    servers[key] = Server(key, label, cmd, log)
                else:
                    cmd = [sys.executable, "-m", "llamacpu", "serve", our_model[typ],
                           *(["--parallel", k, "-c", SLOT_CTX] if parallel else ["-c", ctx_total]), "-t", args.threads,
                           "--queue-size", max(16, n_requests), "--log-level", "warning",
                           "--host", "127.0.0.1", "--port", port]
                    servers[key] = Server(key, label, cmd, log, env=bv.our_env(), cwd=REPO)
                servers[key].wait_ready()
                bv.log(f"{label} ready at {servers[key].url} (model id {servers[key].model_id!r})")
            for key, label in engines:   # warm-up: one short request each
                run_round(servers[key], [], 1, ["Say hello."], 1, min(8, args.max_tokens), f"warmup-{key}")
            for rep in range(args.rounds):
                order = engines if (rep + ci) % 2 == 0 else engines[::-1]
                for key, label in order:
                    others = [s for kk, s in servers.items() if kk != key]

                    def once(key=key, label=label, rep=rep, others=others):
                        r = run_round(servers[key], others, k, prompts, n_requests, args.max_tokens,
                                      f"{stamp}-{typ}-k{k}-r{rep}")
                        bv.log(f"round {rep + 1}/{args.rounds} {typ} K={k} {label}: {r['tps']:.2f} t/s "
                               f"({r['tokens']} tokens in {r['wall']:.1f} s), TTFT p50 {r['ttft_p50']:.2f} s "
                               f"p95 {r['ttft_p95']:.2f} s, other jobs {r['foreign']:.2f} cores")
                        return r

                    r = bv.run_undisturbed(once, args.quiet_wait, args.busy_threshold, args.redo,
                                           on_redo=lambda f, key=key, k=k: redone.append((key, typ, k, f)))
                    rounds.append(dict(r, key=key, label=label, typ=typ, k=k, rep=rep))
        finally:
            for s in servers.values():
                s.stop()

    pt = sorted({p for r in rounds for p in r["prompt_tokens"] if p is not None})
    ctx = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
           "argv": " ".join(sys.argv[1:] if argv is None else argv),
           "elapsed_min": (time.time() - t_start) / 60, "cpu": bv.cpu_info(), "git": bv.git_describe(),
           "threads": args.threads, "types": types, "ks": ks, "reps": args.rounds, "rounds": rounds,
           "redone": redone, "parallel": parallel, "slot_ctx": SLOT_CTX, "llama_flags": flags,
           "n_requests": n_requests, "prompts": prompts, "max_tokens": args.max_tokens,
           "prompt_tokens": f"{pt[0]}-{pt[-1]}" if pt else "?", "quiet_wait": args.quiet_wait,
           "busy_threshold": args.busy_threshold, "redo": args.redo, "note": args.note}
    return bv.publish(render(ctx), out_path, "last-run-serve-quick.json" if args.quick else "last-run-serve.json",
                      {"rounds": rounds, "redone": redone, "parallel": parallel, "argv": ctx["argv"],
                       "git": ctx["git"]}, write_section)


if __name__ == "__main__":
    sys.exit(main())
