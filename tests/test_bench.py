"""`llamacpu bench`: JSON shape, positive rates, and the markdown table (tiny model, fast)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFILL_REL = 1e-5  # test_engine.py's: a chunked prefill against one forward


def _bench(model, *extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "llamacpu", "bench", str(model), "-p", "16", "-n", "4",
                        "-r", "1", *extra], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def tiny(converted):
    return converted("tiny64", "q4_0")


def test_bench_json(tiny):
    res = json.loads(_bench(tiny, "-t", "1", "--json").stdout)
    assert res["engine"] == "llamacpu"
    assert res["type"] == "Q4_0"
    assert res["file_size"] == os.path.getsize(tiny)
    assert 0 < res["model_size"] <= res["file_size"]
    assert res["model_n_params"] > 0
    assert res["n_ctx"] == 20
    assert res["load_s"]["median"] > 0 and len(res["load_s"]["samples"]) == 3
    assert res["peak_rss_bytes"] > res["file_size"]
    assert res["kv_cache_bytes"] == 2 * 2 * 20 * 2 * 2 * 64  # K+V, f16, n_ctx, layers, kv heads, head_dim
    tests = [(r["test"], r["n_threads"]) for r in res["results"]]
    assert tests == [("pp16", 1), ("tg4", 1)]
    for r in res["results"]:
        assert len(r["samples_ts"]) == len(r["samples_ns"]) == 1
        assert r["avg_ts"] > 0 and r["stddev_ts"] == 0.0
        assert all(ns > 0 for ns in r["samples_ns"])
    pp, tg = res["results"]
    assert (pp["n_prompt"], pp["n_gen"], tg["n_prompt"], tg["n_gen"]) == (16, 0, 0, 4)


@pytest.mark.slow
def test_bench_table(tiny):
    out = _bench(tiny, "-t", "1,2").stdout
    lines = out.splitlines()
    assert lines[0].startswith("| model") and "t/s" in lines[0]
    assert set(lines[1].replace("|", "").replace(" ", "")) <= {"-", ":"}
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:6]]
    assert [(r[4], r[5]) for r in rows] == [("1", "pp16"), ("1", "tg4"), ("2", "pp16"), ("2", "tg4")]
    for r in rows:
        assert r[0] == "llama 34M Q4_0" and r[1].endswith("MiB") and r[2].endswith(" M")
        mean, sd = (float(x) for x in r[6].split("±"))
        assert mean > 0 and sd >= 0
    assert any(ln.startswith("load:") and "peak RSS" in ln for ln in lines)


def test_bench_bad_threads(tiny):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "llamacpu", "bench", str(tiny), "-t", "0"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert r.returncode == 1 and "threads" in r.stderr


@pytest.mark.slow
def test_bench_depth_json(tiny):
    res = json.loads(_bench(tiny, "-t", "1", "-d", "0,24", "--json").stdout)
    assert res["n_ctx"] == 24 + 16 + 4  # the largest depth + -p + -n, as llama-bench sizes it
    rows = [(r["test"], r["n_depth"], r["n_threads"], r["n_past"]) for r in res["results"]]
    # n_past: the cache held the depth's positions and the test wrote the ones after them
    assert rows == [("pp16", 0, 1, 16), ("tg4", 0, 1, 4), ("pp16 @ d24", 24, 1, 40), ("tg4 @ d24", 24, 1, 28)]
    assert all(r["avg_ts"] > 0 for r in res["results"])


@pytest.mark.slow
def test_bench_depth_table(tiny):
    lines = _bench(tiny, "-t", "2", "-d", "8").stdout.splitlines()
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:4]]
    assert [(r[4], r[5]) for r in rows] == [("2", "pp16 @ d8"), ("2", "tg4 @ d8")]


def test_depth_tests_run_on_the_filled_cache(tiny):
    """A pp test at depth D continues the D filled positions: its logits are those of one
    forward of fill + prompt from an empty cache (a chunk-invariant kernel table, as in
    test_engine.py's continuation test); a tg step at D + i likewise."""
    import numpy as np

    from conftest import INVARIANT_KERNELS
    from llamacpu import Model
    from llamacpu.bench import _tokens, fill_cache

    rng = np.random.default_rng(1)
    kw = dict(n_ctx=64, n_threads=1, kernels=INVARIANT_KERNELS)
    with Model(tiny, **kw) as m, Model(tiny, **kw) as ref:
        fill = _tokens(rng, 21, m.vocab_size, 1)
        seen = []
        fill_cache(m, fill, chunk=8, progress=lambda done, total: seen.append((done, total)))
        assert seen == [(8, 21), (16, 21), (21, 21)] and m.n_past == 21
        prompt = _tokens(rng, 5, m.vocab_size, None)
        got = m.forward(prompt, pos=21)
        want = ref.forward(np.concatenate([fill, prompt]), pos=0)
        assert np.abs(got - want).max() / np.abs(want).max() < PREFILL_REL
        # a second test at the same depth rewinds to it: the filled positions are kept
        got2 = m.forward(prompt[:1], pos=21)
        want2 = ref.forward(prompt[:1], pos=21)
        assert np.abs(got2 - want2).max() / np.abs(want2).max() < PREFILL_REL


@pytest.mark.parametrize("depth, message", [
    ("-1", "-d/--n-depth must be >= 0, got -1"),
    ("x", "-d/--n-depth: not an integer: 'x'"),
    ("8,8", "a depth is given twice"),
    ("1000000", "-d 1000000 + -p + -n = 1000020 tokens do not fit the model's context"),
])
def test_bench_bad_depth(tiny, depth, message):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "llamacpu", "bench", str(tiny), "-p", "16", "-n", "4",
                        "-d", depth], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert r.returncode == 1 and message in r.stderr, r.stderr
