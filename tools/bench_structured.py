#!/usr/bin/env python3
"""Structured output's cost: decode tokens/s with and without a JSON-schema constraint,
the grammar engine's per-token cost, and schema compile times over the validity suite.

    python tools/bench_structured.py MODEL [-t 1,2] [--tokens 128] [--repeat 3]

What is measured:

  decode: Llama(MODEL, n_threads=T, n_parallel=1).generate of up to --tokens tokens after a
  short prompt, greedy; constrained by a schema that cannot end early (an array of at least
  --tokens strings), unconstrained with the same max_tokens (it may end earlier, at an
  end-of-generation token). Reported: tokens/s of each (completion tokens after the first
  over generation_seconds, the first token to the last), medians of --repeat runs that
  alternate the two, and their ratio.
  engine: per-token mask time (Constraint.mask: llguidance's compute_bitmask plus the
  unpacking into a bool array) and advance time, measured on the tokens of the constrained
  run, on this thread alone (on the critical path it overlaps the forward).
  compile: for every schema of tests/data/structured_schemas.json, the grammar text
  (compile_grammar), the matcher and its first mask: median and max in ms.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from llamacpu.constrained import Constraint, compile_grammar  # noqa: E402
from llamacpu.llama import Llama  # noqa: E402

PROMPT = "List many animal names."


def decode(llm, n, schema) -> float:
    fmt = {"type": "json_schema", "json_schema": {"name": "b", "schema": schema}} if schema else None
    it = llm.generate(llm.tokenizer.encode(PROMPT, special=False), max_tokens=n, stream=True, temperature=0,
                      response_format=fmt)
    for _ in it:
        pass
    g = it.generation
    return (g.completion_tokens - 1) / g.generation_seconds, g


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("-t", "--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per run (default 128)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, alternating; medians reported (default 3)")
    a = ap.parse_args(argv)
    schema = {"type": "array", "minItems": a.tokens, "items": {"type": "string", "maxLength": 12}}
    for t in [int(x) for x in a.threads.split(",")]:
        with Llama(a.model, n_ctx=512, n_threads=t, n_parallel=1) as llm:
            decode(llm, 8, None)   # warm-up
            frees, runs = [], []
            for i in range(a.repeat):  # alternating, so a slow spell of the machine hits both
                pair = [(frees, None), (runs, schema)]
                for dst, sch in (pair if i % 2 == 0 else pair[::-1]):
                    r = decode(llm, a.tokens, sch)
                    dst.append(r if sch else r[0])
            free, con = statistics.median(frees), statistics.median([r[0] for r in runs])
            print(f"threads {t}: unconstrained {free:.1f} t/s, constrained {con:.1f} t/s, ratio {con / free:.3f} "
                  f"(medians of {a.repeat} alternating runs; unconstrained {', '.join(f'{x:.1f}' for x in frees)}, "
                  f"constrained {', '.join(f'{r[0]:.1f}' for r in runs)})")
            toks = [s.token for s in runs[-1][1].steps if s.token >= 0]
            c = Constraint.compile("json_schema", schema, llm.tokenizer)
            tm = ta = 0.0
            for tok in toks:
                t0 = time.perf_counter()
                c.mask()
                t1 = time.perf_counter()
                c.advance(tok)
                tm += t1 - t0
                ta += time.perf_counter() - t1
            print(f"  engine per token: mask {tm / len(toks) * 1e3:.3f} ms, advance {ta / len(toks) * 1e3:.3f} ms "
                  f"({len(toks)} tokens, vocabulary {llm.tokenizer.vocab_size})")
            tok = llm.tokenizer
    suite = json.loads((HERE.parent / "tests" / "data" / "structured_schemas.json").read_text())["schemas"]
    times = []
    for name, item in suite.items():
        t0 = time.perf_counter()
        Constraint(compile_grammar("json_schema", item["schema"], name), tok).mask()
        times.append((time.perf_counter() - t0) * 1e3)
    print(f"compile ({len(times)} suite schemas, grammar + matcher + first mask): median "
          f"{statistics.median(times):.2f} ms, max {max(times):.2f} ms")


if __name__ == "__main__":
    main()
