"""`llamacpu bench MODEL`: prompt and generation speed, measured the way llama-bench does.

    llamacpu bench MODEL [-p 512] [-n 128] [-t 1,2] [-d 0,4096] [-r 5] [--json]

For each depth D (-d, default 0) and thread count:
  ppP  one forward of P random prompt tokens at positions D..D+P-1 (the engine chunks it
       by its n_batch, 512); t/s = P / time of that call.
  tgN  N tokens decoded one at a time (one forward([tok], pos=D+i) each), as
       llama-bench's tg test does; t/s = N / total time.
With D > 0 the cache first holds D random tokens (llama-bench's -d/--n-depth; the test is
named "pp512 @ d4096"): they are written once per depth, untimed, by forwards of n_batch
tokens, and stay in the cache for every test at that depth (each test rewinds to D and
overwrites the positions after it). The context is max(D) + P + N.
The first token of both is BOS when the model adds one, the others are uniform random
ids (llama-bench does the same). Each test runs once untimed (warm-up), then -r
timed repetitions; the table shows mean ± sample standard deviation of t/s.

Also reported: load time (construction of llamacpu.Model, median of --loads), and the
peak resident set size of this process (getrusage ru_maxrss: Python, numpy, the KV
cache, and every page of the mmapped model file that was touched; it is the peak of the
whole process, never a per-model figure).

The t/s include the Python call of each forward (argument checks, the logits array):
that is what a user of llamacpu.Model gets.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time

from .cache_types import add_cache_type_args, check_cache_type_args
from .cli_flags import warn_threads


def register_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure prompt (ppP) and generation (tgN) speed, llama-bench style",
        description="Measure prompt processing (ppP: one forward of P random tokens from an empty "
                    "cache) and text generation (tgN: N tokens decoded one at a time from an empty "
                    "cache) in tokens/s, plus load time and peak RSS. One warm-up run per test. With "
                    "-d D, each test runs after D tokens are already in the cache (the fill is not "
                    "timed), reported as e.g. 'pp512 @ d4096'.")
    p.add_argument("model", help="llamacpu model file, GGUF file, Hugging Face folder or Hub name org/name[:TAG] (converted once into the cache)")
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (0 = skip pp; default 512)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (0 = skip tg; default 128)")
    p.add_argument("-t", "--threads", default=None,
                   help="comma-separated thread counts (default: physical cores)")
    p.add_argument("-d", "--n-depth", default="0",
                   help="comma-separated depths: tokens already in the KV cache before each test, written "
                        "untimed (llama-bench's -d; default 0); the context becomes max depth + -p + -n")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="timed runs per test (default 5)")
    p.add_argument("--loads", type=int, default=3, help="model loads timed for the load time (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    add_cache_type_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_bench)


def _int_list(s, flag: str, lo: int, hi: int | None = None) -> list[int]:
    """A comma-separated list of integers in [lo, hi] (hi None: no upper bound)."""
    out = []
    for part in str(s).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            n = int(part)
        except ValueError:
            raise ValueError(f"{flag}: not an integer: {part!r}") from None
        if n < lo or (hi is not None and n > hi):
            raise ValueError(f"{flag} must be >= {lo}, got {n}" if hi is None
                             else f"{flag} must be in [{lo}, {hi}], got {n}")
        out.append(n)
    if not out:
        raise ValueError(f"{flag}: give at least one value")
    return out


def _thread_list(s) -> list[int]:
    from .model import MAX_THREADS, physical_cores

    if s is None:
        return [physical_cores()]
    return _int_list(s, "--threads", 1, MAX_THREADS)


def _depth_list(s) -> list[int]:
    """-d/--n-depth: depths >= 0, each once, in the order given."""
    out = _int_list(s, "-d/--n-depth", 0)
    if len(set(out)) != len(out):
        raise ValueError(f"-d/--n-depth: a depth is given twice: {s}")
    return out


def bench_label(kind: str, n: int, depth: int) -> str:
    """llama-bench's test label: 'pp512', 'tg128', 'pp512 @ d4096'."""
    return f"{kind}{n}" + (f" @ d{depth}" if depth else "")


def _check_counts(n_prompt: int, n_gen: int, repetitions: int, loads: int) -> None:
    if n_prompt < 0:
        raise ValueError(f"-p/--n-prompt must be >= 0, got {n_prompt}")
    if n_gen < 0:
        raise ValueError(f"-n/--n-gen must be >= 0, got {n_gen}")
    if n_prompt == 0 and n_gen == 0:
        raise ValueError("nothing to measure: -p and -n are both 0")
    if repetitions < 1:
        raise ValueError(f"-r/--repetitions must be >= 1, got {repetitions}")
    if loads < 1:
        raise ValueError(f"--loads must be >= 1, got {loads}")


def _check_context(desc: dict, n: int, depth: int = 0) -> None:
    """The context given to the model is depth + -p + -n (as llama-bench does): it must fit."""
    max_pos = desc["config"].max_position_embeddings
    if depth + n > max_pos:
        what = f"-d {depth} + -p + -n = {depth + n}" if depth else f"-p + -n = {n}"
        raise ValueError(f"{what} tokens do not fit the model's context of {max_pos}")


def _describe(path) -> dict:
    """Size, parameter count and the type label of a model file (llama-bench's columns)."""
    from .format import TYPE_NAMES, read_model

    with read_model(path) as f:
        tensors = list(f.tensors.values())
        prov = f.meta.get("provenance") or {}
        cfg = f.config
        st = dict(f.meta.get("special_tokens") or {})
        file_size = f.file_size
    n_params = sum(math.prod(t.shape) for t in tensors)
    tensor_bytes = sum(t.nbytes for t in tensors)
    by_type: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) >= 2:
            by_type[TYPE_NAMES[t.type]] = by_type.get(TYPE_NAMES[t.type], 0) + math.prod(t.shape)
    # the label: the converter's --type if it recorded one, else the type of most matrix weights
    label = prov.get("type")
    if not label or label == "source":
        label = max(by_type, key=by_type.get) if by_type else "?"
    size = f"{n_params / 1e9:.0f}B" if n_params >= 1e9 else f"{n_params / 1e6:.0f}M"
    return {"file_size": file_size, "tensor_bytes": tensor_bytes, "n_params": n_params,
            "type": str(label).upper(), "model_type": f"llama {size} {str(label).upper()}",
            "config": cfg, "special_tokens": st}


def _fmt_size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _peak_rss_bytes() -> int:
    try:
        import resource
    except ImportError:  # not Unix
        return 0
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # Linux: KiB


def _tokens(rng, n: int, vocab: int, bos):
    import numpy as np

    t = rng.integers(0, vocab, size=n, dtype=np.int64).astype(np.int32)
    if bos is not None and n:
        t[0] = bos
    return t


def fill_cache(m, toks, chunk: int = 512, progress=None) -> None:
    """Write `toks` at positions 0.. of sequence 0 (the cache of a depth test), `chunk`
    tokens per forward; progress(done, total) after each. Shared with
    tools/bench_long_context.py."""
    m.reset()
    total = len(toks)
    for i in range(0, total, chunk):
        m.forward(toks[i:i + chunk], pos=i)
        if progress is not None:
            progress(min(i + chunk, total), total)


def _run_pp(m, rng, n_prompt: int, vocab: int, bos, depth: int = 0) -> float:
    """P tokens at positions depth.. (positions below depth must be in the cache)."""
    toks = _tokens(rng, n_prompt, vocab, None if depth else bos)
    t0 = time.perf_counter()
    m.forward(toks, pos=depth)
    return time.perf_counter() - t0


def _run_tg(m, rng, n_gen: int, vocab: int, bos, depth: int = 0) -> float:
    """N tokens one at a time at positions depth.. (positions below depth must be in the cache)."""
    toks = _tokens(rng, n_gen, vocab, None if depth else bos)
    fwd = m.forward
    t0 = time.perf_counter()
    for i in range(n_gen):
        fwd(toks[i:i + 1], pos=depth + i)
    return time.perf_counter() - t0


def run_bench(path, n_prompt: int = 512, n_gen: int = 128, threads=(1,), repetitions: int = 5,
              loads: int = 3, seed: int = 0, depths=(0,), cache_type_k: str = "f16",
              cache_type_v: str = "f16") -> dict:
    """Run the benchmark and return the JSON-able result (what --json prints). cache_type_k,
    cache_type_v: the KV cache's types (f16, q8_0, q4_0; cache_types.py)."""
    import numpy as np

    from . import __version__
    from .model import Model

    _check_counts(n_prompt, n_gen, repetitions, loads)
    threads = list(threads)
    depths = _depth_list(",".join(map(str, depths)))
    desc = _describe(path)
    _check_context(desc, n_prompt + n_gen, max(depths))
    # what llama-bench gives its context: n_depth + n_prompt + n_gen (here the largest depth's)
    n_ctx = max(max(depths) + n_prompt + n_gen, 1)

    load_s = []
    m = None
    for i in range(loads):
        if m is not None:
            m.close()
            m = None
        t0 = time.perf_counter()
        m = Model(path, n_ctx=n_ctx, n_threads=threads[0], cache_type_k=cache_type_k, cache_type_v=cache_type_v)
        load_s.append(time.perf_counter() - t0)

    vocab = m.vocab_size
    st = desc["special_tokens"]
    bos = st.get("bos_token_id") if st.get("add_bos_token", True) else None
    rng = np.random.default_rng(seed)
    tests = []
    if n_prompt:
        tests.append(("pp", n_prompt))
    if n_gen:
        tests.append(("tg", n_gen))
    results = []
    try:
        for depth in depths:
            if depth:  # untimed; every test at this depth rewinds to it
                m.n_threads = max(threads)
                fill_cache(m, _tokens(rng, depth, vocab, bos))
            for nt in threads:
                m.n_threads = nt
                for kind, n in tests:
                    run = _run_pp if kind == "pp" else _run_tg
                    run(m, rng, n, vocab, bos, depth)  # warm-up
                    secs = [run(m, rng, n, vocab, bos, depth) for _ in range(repetitions)]
                    ts = [n / s for s in secs]
                    results.append({
                        "test": bench_label(kind, n, depth),
                        "n_prompt": n if kind == "pp" else 0,
                        "n_gen": n if kind == "tg" else 0,
                        "n_depth": depth,
                        "n_threads": nt,
                        "n_past": m.n_past,  # positions in the cache after the test: depth + n
                        "samples_ns": [int(s * 1e9) for s in secs],
                        "samples_ts": ts,
                        "avg_ts": statistics.fmean(ts),
                        "stddev_ts": statistics.stdev(ts) if len(ts) > 1 else 0.0,
                    })
        kernels = m.kernels
    finally:
        m.close()
    return {
        "engine": "llamacpu",
        "version": __version__,
        "model_filename": os.fspath(path),
        "model_type": desc["model_type"],
        "type": desc["type"],
        "file_size": desc["file_size"],
        "model_size": desc["tensor_bytes"],
        "model_n_params": desc["n_params"],
        "kernels": kernels,
        "n_ctx": n_ctx,
        "cpu": _cpu_name(),
        "load_s": {"median": statistics.median(load_s), "samples": load_s},
        "peak_rss_bytes": _peak_rss_bytes(),
        "type_k": cache_type_k,
        "type_v": cache_type_v,
        "kv_cache_bytes": _kv_bytes(desc["config"], n_ctx, cache_type_k, cache_type_v),
        "results": results,
    }


def _kv_bytes(cfg, n_ctx: int, cache_type_k: str = "f16", cache_type_v: str = "f16") -> int:
    """Bytes of the KV cache of n_ctx positions (cfg: format.ModelConfig)."""
    from . import _core
    from .cache_types import cache_type

    hd = cfg.head_dim
    row = _core.row_bytes(cache_type(cache_type_k), hd) + _core.row_bytes(cache_type(cache_type_v), hd)
    return row * n_ctx * cfg.num_hidden_layers * cfg.num_key_value_heads


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(res: dict) -> str:
    """The llama-bench-style markdown table plus the load / RSS lines."""
    head = ["model", "size", "params", "backend", "threads", "test", "t/s"]
    rows = []
    for r in res["results"]:
        rows.append([res["model_type"], _fmt_size(res["model_size"]), _fmt_params(res["model_n_params"]),
                     f"CPU ({res['kernels']})", str(r["n_threads"]), r["test"],
                     f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}"])
    right = {1, 2, 4, 5, 6}
    w = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w[i]) if i in right else c.ljust(w[i])
                                 for i, c in enumerate(cells)) + " |"
    sep = "| " + " | ".join(("-" * (w[i] - 1) + ":") if i in right else "-" * w[i]
                            for i in range(len(head))) + " |"
    out = [line(head), sep] + [line(r) for r in rows]
    ld = res["load_s"]
    out.append("")
    out.append(f"load: {ld['median'] * 1e3:.1f} ms (median of {len(ld['samples'])}); "
               f"peak RSS of this process: {res['peak_rss_bytes'] / 1e6:,.1f} MB "
               f"(file {res['file_size'] / 1e6:,.1f} MB, KV cache {res['kv_cache_bytes'] / 1e6:,.1f} MB "
               f"at n_ctx {res['n_ctx']}, K {res.get('type_k', 'f16')} V {res.get('type_v', 'f16')})")
    reps = len(res["results"][0]["samples_ts"]) if res["results"] else 0
    out.append(f"{reps} timed run(s) per test after one warm-up; {res['cpu']}; llamacpu {res['version']}")
    return "\n".join(out)


def cmd_bench(args) -> int:
    from .model_cache import resolve_model

    threads = _thread_list(args.threads)
    depths = _depth_list(args.n_depth)
    check_cache_type_args(args)
    _check_counts(args.n_prompt, args.n_gen, args.repetitions, args.loads)  # before any output
    warn_threads("bench", max(threads))
    path = resolve_model(args.model)  # a GGUF: converted once into the cache, not timed
    _check_context(_describe(path), args.n_prompt + args.n_gen, max(depths))
    if not args.json:
        print(f"llamacpu bench: {args.model}, threads {','.join(map(str, threads))}, "
              f"-p {args.n_prompt} -n {args.n_gen} -d {','.join(map(str, depths))} -r {args.repetitions} ...",
              file=sys.stderr, flush=True)
    res = run_bench(path, n_prompt=args.n_prompt, n_gen=args.n_gen, threads=threads,
                    repetitions=args.repetitions, loads=args.loads, seed=args.seed, depths=depths,
                    cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(format_table(res))
    return 0
