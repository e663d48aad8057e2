"""`llamacpu bench`: JSON shape, positive rates, and the markdown table (tiny model, fast)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
