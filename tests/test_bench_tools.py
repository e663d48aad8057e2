"""tools/bench_batched.py, bench_serve.py, bench_ab.py, ppl_rounding.py and x86_op_costs.c: the parts that need
neither llama.cpp nor a server (our worker on a tiny model, the parsers, the statistics, the
report, the models of each engine's 8-bit activations)."""
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llamacpu import _core

pytestmark = pytest.mark.slow   # the benchmark tools, not the package: the full run's

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import bench_ab  # noqa: E402
import bench_batched  # noqa: E402
import bench_serve  # noqa: E402
import ppl_rounding  # noqa: E402


def test_worker_rows_have_llama_batched_bench_fields(converted):
    path = converted("tiny64", "q4_0")
    r = subprocess.run([sys.executable, str(TOOLS / "bench_batched.py"), "--worker", str(path), "--npp", "8",
                        "--ntg", "3", "--npl", "1,2,3", "-t", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = bench_batched.parse_jsonl(r.stdout)
    head = [x for x in rows if x.get("header")]
    assert len(head) == 1 and head[0]["n_seq"] == 3 and head[0]["n_ctx"] == 11
    res = bench_batched.by_b([x for x in rows if not x.get("header")], [1, 2, 3], "worker", r.stdout)
    for b in (1, 2, 3):
        assert res[b]["s_tg"] == pytest.approx(b * 3 / res[b]["t_tg"], rel=1e-6)
        assert res[b]["s_pp"] == pytest.approx(b * 8 / res[b]["t_pp"], rel=1e-6)


def test_by_b_refuses_a_missing_b():
    rows = [{"pl": 1, "speed_pp": 1, "speed_tg": 1, "t_pp": 1, "t_tg": 1}]
    with pytest.raises(SystemExit, match=r"B = \[2\]"):
        bench_batched.by_b(rows, [1, 2], "llama-batched-bench", "")


def test_parse_jsonl_skips_log_lines():
    text = "llama_model_loader: blah\n" + json.dumps({"pl": 2, "x": 1}) + "\n{not json}\n"
    assert bench_batched.parse_jsonl(text) == [{"pl": 2, "x": 1}]


def test_percentile():
    assert bench_serve.percentile([3, 1, 2], 0.5) == 2
    assert bench_serve.percentile([1, 2, 3, 4], 0.5) == 2.5
    assert bench_serve.percentile([1, 2, 3, 4, 5], 0.95) == pytest.approx(4.8)
    assert bench_serve.percentile([7], 0.95) == 7


def test_batched_render_and_markers(tmp_path):
    npl = [1, 2, 8]
    samples, runs = {}, []
    for key, label, scale, rss in (("llama", "llama.cpp", 1.0, 1.9e9), ("ours", "llamacpu", 1.5, 1.25e9)):
        for b in npl:
            samples[(key, "q4_0", 2, b, "s_tg")] = [10.0 * b * scale]
            samples[(key, "q4_0", 2, b, "s_pp")] = [100.0 * scale]
        runs.append({"rep": 0, "typ": "q4_0", "t": 2, "engine": label, "foreign": 0.1, "rss": rss,
                     "res": {b: {"s_tg": 10.0 * b * scale, "s_pp": 100.0 * scale} for b in npl}})
    ctx = {"date": "d", "argv": "", "elapsed_min": 1, "cpu": bench_batched.bv.cpu_info(), "git": "g",
           "npp": 512, "ntg": 128, "npl": npl, "types": ["q4_0"], "threads": [2], "reps": 1, "samples": samples,
           "runs": runs, "redone": [], "llama_meta": {}, "our_meta": {}, "llama_flags": "", "llama_cmd": "",
           "engine_changed": False, "quiet_wait": 0, "busy_threshold": 0.25, "redo": 0, "note": "noisy",
           "memory": {"q4_0": {"file_mb": 768.0, "kv_mb": 335.5}}}
    body = bench_batched.render(ctx)
    assert ("llamacpu 1,250.0 MB with 8 sequences of 640 positions, against file + all slots' KV + 200 MB = "
            "768.0 + 335.5 + 200 = 1,303.5 MB (met); llama-batched-bench 1,900.0 MB.") in body
    assert "| Q4_0 | 2 | 8 | 80.00 | 120.00 | **1.50×** | 8.00× | 8.00× |" in body
    assert "B=8 is 8.00× our B=1 (target ≥ 3×: met)" in body
    assert "lowest ratio at B ≥ 2: 1.50× at B=2" in body
    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\n<!-- bench:3b:begin -->\nx\n<!-- bench:3b:end -->\n\n## What we tried\n")
    bench_batched.write_section(out, body)
    bench_batched.write_section(out, body)   # replaced, not added twice
    text = out.read_text()
    assert text.count(bench_batched.BEGIN) == 1
    assert text.index("<!-- bench:3b:end -->") < text.index(bench_batched.BEGIN) < text.index("## What we tried")


def test_help_runs():
    for tool in ("bench_batched.py", "bench_serve.py", "bench_vs_llamacpp.py", "bench_busy.py",
                 "bench_long_context.py"):
        r = subprocess.run([sys.executable, str(TOOLS / tool), "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "--quick" in r.stdout


def test_bench_attention_prints_a_row_per_case():
    r = subprocess.run([sys.executable, str(TOOLS / "bench_attention.py"), "--depths", "64,100", "-p", "8",
                        "--cache-types", "f16,q8_0", "--threads", "1", "--calls", "1", "--rounds", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| f16 |") or line.startswith("| q8_0 |")]
    assert len(rows) == 2 * 2 * 2   # KV types x depths x (pp, tg)
    assert "| f16 | 100 | pp8 | 1 |" in r.stdout and "| q8_0 | 64 | tg1 | 1 |" in r.stdout


# ---------------------------------------------------------------- bench_vs_llamacpp.py --depth

import bench_vs_llamacpp as bv  # noqa: E402


def test_llama_bench_rows_name_depth_tests():
    out = json.dumps([{"n_prompt": 512, "n_gen": 0, "n_depth": 4096, "n_threads": 2, "avg_ts": 50.5},
                      {"n_prompt": 0, "n_gen": 128, "n_depth": 4096, "n_threads": 2, "avg_ts": 9.5},
                      {"n_prompt": 0, "n_gen": 128, "n_depth": 0, "n_threads": 1, "avg_ts": 7.0}])
    by, _ = bv.llama_bench_rows(out)
    assert by == {(2, "pp512 @ d4096"): 50.5, (2, "tg128 @ d4096"): 9.5, (1, "tg128"): 7.0}


def test_kv_args():
    assert bv.kv_args("llama", "q8_0") == ["-fa", "1", "-ctk", "q8_0", "-ctv", "q8_0"]
    assert bv.kv_args("ours", "q4_0") == ["-ctk", "q4_0", "-ctv", "q4_0"]
    assert bv.kv_args("ours", "f16") == []  # our default; no flag before the KV-type branch lands


def test_run_ours_at_depth(converted):
    r = bv.run_ours(converted("tiny64", "q4_0"), 8, 3, "1,2", ["-d", 12])
    assert sorted(r["by_threads"]) == [(1, "pp8 @ d12"), (1, "tg3 @ d12"), (2, "pp8 @ d12"), (2, "tg3 @ d12")]
    assert all(v > 0 for v in r["by_threads"].values()) and r["meta"]["n_threads"] == [1, 2]


def _depth_ctx():
    samples, foreign = {}, {}
    for e, scale in (("llama", 1.0), ("ours", 2.0)):
        for ct in ("f16", "q8_0"):
            for t in (1, 2):
                for test, v in (("pp512 @ d4096", 40.0), ("tg128 @ d4096", 8.0)):
                    samples[(e, ct, 4096, t, test)] = [v * scale * t, v * scale * t + 1, v * scale * t + 2]
                    foreign[(e, ct, 4096, t, test)] = [0.1, 0.0, 0.2]
    return {"date": "d", "argv": "--depth 4096", "elapsed_min": 1, "cpu": bv.cpu_info(), "git": "g",
            "depths": [4096], "ctypes": ["f16", "q8_0"], "threads": [1, 2], "p": 512, "n": 128, "reps": 3,
            "samples": samples, "foreign": foreign, "walls": {}, "redone": [], "engine_changed": False,
            "meta": {"llama": {"build_number": 1}, "ours": {"version": "v", "kernels": "k"}},
            "llama_flags": "-DX", "busy_threshold": 0.25, "redo_max": 2}


def test_depth_render_and_markers(tmp_path):
    body = bv.render_depth(_depth_ctx())
    # medians of the three runs: llama.cpp 81 (2 threads: 80, 81, 82), ours 161
    assert "| Q8_0 | 4096 | 2 | pp512 @ d4096 | 81.00 | 161.00 | **1.99×** |" in body
    assert "| F16 | 4096 | 1 | tg128 @ d4096 | 9.00 | 17.00 | **1.89×** |" in body
    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\n<!-- bench:begin -->\n1b\n<!-- bench:end -->\n\n<!-- bench:3b:begin -->\n3b\n"
                   "<!-- bench:3b:end -->\n\n<!-- batched:begin -->\nb\n<!-- batched:end -->\n\n## What we tried\n")
    bv.write_depth(out, body)
    bv.write_depth(out, body)  # replaced, not added twice
    text = out.read_text()
    assert text.count(bv.DEPTH_BEGIN) == 1 and text.count("| Q8_0 | 4096 | 2 | pp512 @ d4096 | 81.00 |") == 1
    assert text.index("<!-- bench:3b:end -->") < text.index(bv.DEPTH_BEGIN) < text.index("<!-- batched:begin -->")


def test_depth_mode_refuses_bad_values():
    for args, msg in ((["--depth", "0"], "--depth"), (["--depth", "64", "--cache-types", "q5_0"], "--cache-types"),
                      (["--depth", "64", "--preset", "3b"], "1B Q4_0 files only")):
        r = subprocess.run([sys.executable, str(TOOLS / "bench_vs_llamacpp.py"), *args, "--quick"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and msg in r.stderr, r.stderr


# ---------------------------------------------------------------- bench_busy.py

import bench_busy  # noqa: E402


def _gone(pid, timeout=10.0):
    import time
    t_end = time.time() + timeout
    while time.time() < t_end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":  # a zombie no longer runs
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_competitor_spins_and_dies_on_ctrl_c():
    with pytest.raises(KeyboardInterrupt):
        with bench_busy.competitor() as p:
            pid = p.pid
            assert p.poll() is None
            t0 = _cpu_seconds(pid)
            import time
            time.sleep(1.0)
            assert _cpu_seconds(pid) - t0 > 0.05  # it burns CPU (a shared machine may give it little)
            raise KeyboardInterrupt
    assert p.poll() is not None and _gone(pid)


def _cpu_seconds(pid):
    import os
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().split(")")[-1].split()
    return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_competitor_dies_with_the_tool(how):
    """SIGTERM: the with-block's exit kills it; SIGKILL (no Python code runs): PR_SET_PDEATHSIG."""
    import signal
    code = ("import sys, time; sys.path.insert(0, %r); import bench_busy\n"
            "with bench_busy.competitor() as p:\n    print(p.pid, flush=True)\n    time.sleep(60)\n") % str(TOOLS)
    tool = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = int(tool.stdout.readline())
    assert not _gone(pid, timeout=0.2)
    tool.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    tool.wait(timeout=30)
    assert _gone(pid)
    if how == "sigterm":
        assert tool.returncode == 143 and f"competing process {pid} stopped" in tool.stderr.read()


def test_busy_summary_and_render(tmp_path):
    samples = {}
    for load, slow in (("idle", 1.0), ("busy", 0.5)):
        for e, base in (("ours", 20.0), ("llama", 16.0)):
            for c, f in ((None, 0.9), (1, 0.7), (2, 1.0)):
                samples[(e, load, c, "tg128")] = [base * slow * f, base * slow * f * 2, 0.0]  # median: the first
    s = bench_busy.summarize(samples, "busy", 2, "tg128")
    assert s["best_fixed"] == 2
    assert s["vs_best_fixed"] == pytest.approx(0.9) and s["vs_llama_default"] == pytest.approx(20 / 16)
    ctx = {"date": "d", "argv": "", "elapsed_min": 1, "cpu": bv.cpu_info(), "git": "g", "n": 128, "cpus": 2,
           "loads": ["idle", "busy"], "reps": 3, "samples": samples, "foreign": {}, "redone": [],
           "meta": {}, "default_threads": {"ours": {"idle": 2, "busy": 2}, "llama": {"idle": 2, "busy": 2}},
           "llama_flags": "", "engine_changed": False, "busy_threshold": 0.25, "redo_max": 2}
    body = bench_busy.render(ctx)
    assert "| busy | 9.00 | 7.00 | 10.00 | 7.20 | 5.60 | 8.00 | **0.90×** (best: t=2) | **1.25×** |" in body
    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\n<!-- bench:begin -->\n1b\n<!-- bench:end -->\n\n## What we tried\n")
    bench_busy.write_section(out, body)
    bench_busy.write_section(out, body)
    text = out.read_text()
    assert text.count(bench_busy.BEGIN) == 1
    assert text.index("<!-- bench:end -->") < text.index(bench_busy.BEGIN) < text.index("## What we tried")


# ---------------------------------------------------------------- bench_long_context.py

import bench_long_context  # noqa: E402


def test_long_context_worker_fills_the_cache(converted):
    path = converted("tiny64", "q4_0")
    r = subprocess.run([sys.executable, str(TOOLS / "bench_long_context.py"), "--worker", str(path), "--n-ctx", "64",
                        "--fill", "40", "--chunk", "16", "--every", "0", "-t", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["n_past"] == 40
    assert res["peak_rss"] >= res["rss_after_load"] > 0 and res["fill_s"] > 0
    assert "fill 40/40 tokens" in r.stderr


def test_long_context_kv_bytes_and_time_fit():
    from conftest import llama_1b_config
    from llamacpu.bench import _kv_bytes
    cfg = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 16,
           "head_dim": 64}
    assert bench_long_context.kv_bytes(cfg, 131072, "f16") == _kv_bytes(llama_1b_config(), 131072) == 4 * 2**30
    assert bench_long_context.kv_bytes(cfg, 131072, "q8_0") == 4 * 2**30 * 34 // 64
    assert bench_long_context.kv_bytes(cfg, 131072, "q4_0") == 4 * 2**30 * 18 // 64
    cfg.update(intermediate_size=8192, vocab_size=128256)
    # 2 flops per matrix weight per token; attention 4 * 16 * 32 * 64 per cached position
    weights = 16 * (2048 * (2048 + 2 * 512) + 2048 * 2048 + 3 * 2048 * 8192) + 128256 * 2048
    assert weights == 1235814400 - (2 * 16 + 1) * 2048  # the 1B parameter count less the norms
    assert bench_long_context.fill_flops(cfg, 3) == 2 * weights * 3 + 131072 * (1 + 2 + 3)
    assert bench_long_context.estimate_time(cfg, 1, 10.0, 3) == pytest.approx(
        10.0 * (6 * weights + 6 * 131072) / (2 * weights + 131072))


def test_long_context_render_says_extrapolated():
    cfg = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 16,
           "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256}
    row = {"preset": "1b", "file_size": 700e6, "fill": 1024, "kv_fill": 33554432, "kv_full": 4 * 2**30,
           "peak_rss": 900e6, "fill_s": 60.0, "config": cfg}
    t_full = bench_long_context.estimate_time(cfg, 1024, 60.0, 131072) / 60
    ctx = {"date": "d", "argv": "", "elapsed_min": 1, "cpu": bv.cpu_info(), "git": "g", "n_ctx": 131072,
           "cache_type": "f16", "type": "q4_0", "chunk": 512, "threads": 2, "kernels": "k", "rows": [row]}
    body = bench_long_context.render(ctx)
    # 900 MB measured + the 4,261.4 MB of KV not written
    assert f"| 5,161.4 MB (extrapolated) | {t_full:.0f} min (extrapolated) |" in body and "are extrapolated" in body
    assert 128 * 3 < t_full < 128 * 10  # 128 min at the linear rate; attention makes it several times that
    full = dict(row, fill=131072, kv_fill=4 * 2**30, peak_rss=5e9, fill_s=7200.0)
    body = bench_long_context.render(dict(ctx, rows=[full]))
    assert "extrapolated" not in body.split("|---")[1] and "| 5,000.0 MB | 120 min |" in body


def test_bench_ab_alternates_two_builds(converted):
    """Both builds this checkout: two rounds, a row per thread count, the ratio of the medians."""
    path = str(converted("tiny64", "q4_0"))
    root = TOOLS.parent
    r = subprocess.run([sys.executable, str(TOOLS / "bench_ab.py"), str(root), str(root), path, "-t", "1,2",
                        "-p", "16", "-r", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(" A: ") == 4 and r.stderr.count(" B: ") == 4
    rows = [x for x in r.stdout.splitlines() if x.startswith(f"| {Path(path).name} |")]
    assert [x.split("|")[2].strip() for x in rows] == ["1", "2"]
    for x in rows:
        a, b, ratio = (float(v.strip().rstrip("×")) for v in x.split("|")[3:6])
        assert ratio == pytest.approx(b / a, abs=2e-3)


def test_bench_ab_table_takes_medians():
    s = {("m.bin", 1, "A"): [100.0, 300.0, 200.0], ("m.bin", 1, "B"): [250.0, 240.0, 1000.0]}
    assert bench_ab.table(s, ["m.bin"], [1], "pp512").splitlines()[-1] == "| m.bin | 1 | 200.0 | 250.0 | 1.250× |"


def test_bench_ab_refuses_a_checkout_without_a_build(tmp_path):
    with pytest.raises(SystemExit):
        bench_ab.main([str(tmp_path), str(TOOLS.parent), "x.bin"])


def test_device_scaling_builds_are_the_tools_variants():
    """tools/device_scaling.sh builds llama.cpp through bench_vs_llamacpp.build_llamacpp: every
    variant it names has CMAKE_FLAGS, and the folders it copies are those builds'."""
    import re
    import bench_vs_llamacpp as bv
    text = (TOOLS / "device_scaling.sh").read_text()
    built = re.search(r"for v in \(([^)]*)\): b\.build_llamacpp", text).group(1)
    variants = [v.strip(" '") for v in built.split(",")]
    copied = re.search(r"for b in ([^;]*); do", text).group(1).split()
    assert [c.split(":")[0] for c in copied] == variants
    assert all(v in bv.CMAKE_FLAGS for v in variants)
    assert not any(f.startswith("-DGGML_AMX") and f.endswith("=ON") for v in variants for f in bv.CMAKE_FLAGS[v])


def _heavy_tailed(n, seed):
    """Activations with a few massive channels, as SmolLM2's are."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * np.exp(2 * rng.standard_normal(n))).astype(np.float32)


@pytest.mark.parametrize("impl", _core.available_kernels())
def test_ppl_rounding_models_the_engines_q8a(impl):
    """tools/ppl_rounding.py's model of llamacpu's 8-bit activations is the engine's, value for value."""
    x = _heavy_tailed(8192, 1)
    x[:32] = 0                                     # an all-zero block
    q = _core.quantize_act(x, impl)
    groups = (np.arange(32) % 16) // 4
    engine = (q["qs"].astype(np.float32) * q["d"][:, groups]).reshape(-1)
    assert np.array_equal(ppl_rounding.q8a(x[None])[0], engine)


def test_ppl_rounding_models_ggmls_q8_0():
    """ggml's Q8_0 activations against the gguf package's reference quantizer (roundf of x / d,
    where ggml's AVX2 build rounds x * 127 / max to even): the same values but for a rare tie."""
    from gguf import GGMLQuantizationType as GT, quants
    x = _heavy_tailed(32 * 1024, 2).reshape(4, -1)
    ref = quants.dequantize(quants.quantize(x, GT.Q8_0), GT.Q8_0)
    ours = ppl_rounding.ggml_q8_0(x)
    step = np.repeat(np.abs(x.reshape(4, -1, 32)).max(axis=2) / 127, 32, axis=1)
    assert np.mean(ours != ref) < 1e-3
    assert np.all(np.abs(ours - ref) <= step * 1.01)


def test_ppl_rounding_models_ggmls_q8_k():
    """ggml's Q8_K (quantize_row_q8_K_ref): per 256, the element of largest magnitude becomes
    -127 steps of d = -max / 127, every element lies within half a step."""
    x = _heavy_tailed(256 * 64, 3).reshape(2, -1)
    x[0, :256] = 0
    y = ppl_rounding.ggml_q8_k(x)
    b, yb = x.reshape(2, -1, 256), y.reshape(2, -1, 256)
    i = np.abs(b).argmax(axis=2)[..., None]
    mx = np.take_along_axis(b, i, axis=2)
    assert np.allclose(np.take_along_axis(yb, i, axis=2), mx, rtol=1e-6)
    d = np.abs(mx) / 127
    assert np.all(np.abs(yb - b) <= d / 2 * (1 + 1e-5) + 1e-30)
    assert not y[0, :256].any()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("cc") is None,
                    reason="an x86-64 C compiler")
def test_x86_op_costs_prints_a_ratio_per_loop(tmp_path):
    exe = tmp_path / "x86_op_costs"
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", str(TOOLS / "x86_op_costs.c"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    assert out[0].split()[:2] == ["loop", "body"]
    rows = [line.rsplit(None, 3) for line in out[1:]]
    names = [r[0] for r in rows]
    assert names[:2] == ["6 vpmaddubsw", "+ 6 vpaddw"] and len(rows) == 13
    ns = [float(r[1]) for r in rows]
    ratios = [float(r[3]) for r in rows]
    assert ratios[0] == 1.0 and all(n > 0 for n in ns)
    # ratios printed to 2 decimals from times printed to 3: the rounding of all three
    for r, n in zip(ratios, ns):
        assert abs(r - n / ns[0]) <= 0.005 + r * (0.0005 / n + 0.0005 / ns[0]) + 1e-9
    # 6 more multiplies can never be free beside 6 (x86 cores run at most 2 per cycle), and
    # 3 whole groups hold those 9 multiplies and more
    mul9 = ratios[names.index("+ 6 vpmaddwd (3 multiplies per group)")]
    assert mul9 > 1.3 and ratios[names.index("3 q8a groups (6 vpmaddubsw, 3 vpmaddwd, ...)")] > 1.3
