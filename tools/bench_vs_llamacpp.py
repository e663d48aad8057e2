#!/usr/bin/env python3
"""llamacpu against llama.cpp on the same checkpoint, side by side; writes BENCHMARKS.md.

    python tools/bench_vs_llamacpp.py                 # the full comparison (-r 3, pp512, tg128, t=1,2)
    python tools/bench_vs_llamacpp.py --preset 3b     # the 3B config (default types: q4_k_m)
    python tools/bench_vs_llamacpp.py --quick         # smoke test: -p 64 -n 16 -r 1, prints only
    python tools/bench_vs_llamacpp.py --llama-bench /path/to/llama-bench [--llama-quantize PATH]
    python tools/bench_vs_llamacpp.py --avx2          # also an AVX2-only build of llama.cpp
    python tools/bench_vs_llamacpp.py --build-only --preset 3b --types q4_k_m   # make the files only
    python tools/bench_vs_llamacpp.py --depth 4096,16384,32768 --cache-types f16,q8_0   # long context
    python tools/bench_vs_llamacpp.py --depth 64 --quick   # its smoke test: -p 64 -n 16 -r 1, prints only

Depth mode (--depth D1,D2,..., 1B Q4_0 only): pp (-p) and tg (-n) after D tokens already in
the KV cache, for each KV type of --cache-types (f16, q8_0, q4_0) and thread count (-t);
llama.cpp as `llama-bench -d D -fa 1 -ctk T -ctv T`, llamacpu as `llamacpu bench -d D
-ctk T -ctv T` (no -ctk/-ctv for f16). One process per engine, KV type and depth runs
every thread count (each engine fills the cache once, untimed); runs alternate as in step 5
below, medians of -r runs; the table (ours, llama.cpp, ratio) goes between
<!-- depth:begin --> and <!-- depth:end -->. Decode on a busy machine: tools/bench_busy.py;
memory at 128k context: tools/bench_long_context.py.

Weight types (--types; default q4_0,q8_0,q4_k_m,q6_k for --preset 1b, q4_k_m for 3b):
  q4_0, q8_0        each engine converts the checkpoint with its own tools: llama.cpp's file
                    is llama-quantize's, llamacpu's is `llamacpu convert CKPT --type T`
                    (its own quantizers and type policy: a Q6_0 head with q4_0).
  q4_k_m, q6_k,     the GGUF files people download: llama-quantize makes the file, and
  q5_k_m, q4_k_s    llamacpu runs that very GGUF, imported (`llamacpu convert GGUF OUT`:
                    every tensor keeps its type, blocks bit-exact, in the x8 layout). Both
                    engines run the same weights; the report checks that tensor by tensor.

Steps (each cached; the cache is ~/.cache/llamacpu, or $LLAMACPU_CACHE; file names carry
the preset, e.g. llamacpp-3b-q4_k_m.gguf):
  1. llama.cpp: the source distribution of llama-cpp-python==0.3.36 from PyPI (folder
     vendor/llama.cpp), built with cmake (-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
     -DLLAMA_BUILD_TESTS=OFF; targets llama-bench llama-quantize, and llama-perplexity
     llama-tokenize for tools/quality_vs_llamacpp.py; about 10 minutes on 2 cores, a
     missing target is added by an incremental build: tools/bench_batched.py and
     tools/bench_serve.py add llama-batched-bench and llama-server to the same build folder)
     under llama.cpp-0.3.36/. cmake comes
     from PyPI when the machine has none. On a CPU with AMX the "native" build is
     native-noamx (NATIVE_ISA_FLAGS below).
     --llama-bench PATH skips the build (the source is still fetched, for the converter).
  2. The checkpoint: tools/make_checkpoint.py --preset 1b|3b (random weights, the exact
     Llama 3.2 1B or 3B config, Hugging Face layout, bf16).
  3. llama.cpp's files: its own convert_hf_to_gguf.py (PYTHONPATH=vendor/llama.cpp/gguf-py)
     to a BF16 GGUF (lossless from the bf16 checkpoint), then `llama-quantize BF16GGUF OUT
     TYPE` for every type (Q4_0, Q8_0, Q4_K_M, ...). The converter imports torch at the
     top and does every tensor operation in torch, so it needs torch: it runs in a venv of
     its own (convert-venv, made with --system-site-packages so it reuses
     numpy/transformers) with the CPU wheel `pip install torch==2.13.0`; the project's
     environment stays torch-free. --convert-python PATH uses another interpreter.
     Ours: q4_0/q8_0 `python -m llamacpu convert CKPT OUT --type q4_0|q8_0`; the K-quants
     `python -m llamacpu convert llamacpp-PRESET-TYPE.gguf OUT` (the import). Redone
     whenever the converter, the format or the C headers change, or the source file
     does (the file name carries their hash).
  4. Read bandwidth: a small C program (OpenMP, AVX2 loads summing a 1 GiB buffer of
     2 MB pages, 10 passes, best pass) for each thread count, before every round of runs
     and after the last; the median sample is the one used for the bound. Before the
     runs, both engines' files are dropped from the page cache and read back (recache),
     so that each engine maps its file as after a reboot.
  5. Runs alternate between the engines (the order flips every run), each run a fresh
     process: `llama-bench -m GGUF -p P -n N -t T -r 1 -o json` and
     `python -m llamacpu bench FILE -p P -n N -t T -r 1 --json`. Both do one warm-up per
     test. The table shows medians over the runs and the ratio ours / llama.cpp. Before
     each run the tool waits for a quiet machine; a run that other jobs disturbed is run
     again (--quiet-wait, --busy-threshold, --redo).
  6. Decode bound, per type and file: bytes read per token / bandwidth. Bytes per token =
     every tensor of the file once (each matrix of every layer, the norms, the output
     head: the tied embedding matrix when there is no output.weight) plus one row of the
     embedding (the token lookup). The KV cache (at most 4.2 MB per token at tg128 for
     1B, 14.7 MB for 3B) is left out.
  7. BENCHMARKS.md: the generated part lies between <!-- bench:begin --> and
     <!-- bench:end --> (1B), <!-- bench:3b:begin --> and <!-- bench:3b:end --> (3B, put
     after the 1B part the first time); the rest of the file is kept (created with an
     intro when missing). Each part starts with a heading naming its config.

The machine is shared: timings are noisy, which is why runs alternate and medians are
reported; the CPU other jobs used during each run is recorded.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TORCH_VERSION = "2.13.0"
CACHE = Path(os.environ.get("LLAMACPU_CACHE") or Path.home() / ".cache" / "llamacpu")
LLAMA_DIR = CACHE / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
LLAMA_SRC = LLAMA_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
BENCH_DIR = CACHE / "bench"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# llamacpu converts the checkpoint itself (its own quantizers and type policy)
OWN_TYPES = ("q4_0", "q8_0")
# llama-quantize's mixtures: llamacpu imports llama.cpp's GGUF (the same blocks)
GGUF_TYPES = ("q4_k_m", "q6_k", "q5_k_m", "q4_k_s")
PRESETS = ("1b", "3b")
DEFAULT_TYPES = {"1b": "q4_0,q8_0,q4_k_m,q6_k", "3b": "q4_k_m"}


def markers(preset: str) -> tuple[str, str]:
    """The begin/end markers of a preset's part of BENCHMARKS.md (1B: the original ones)."""
    return (BEGIN, END) if preset == "1b" else (f"<!-- bench:{preset}:begin -->", f"<!-- bench:{preset}:end -->")


def preset_label(preset: str) -> str:
    return f"Llama 3.2 {preset.upper()}"

CMAKE_FLAGS = {
    "native": ["-DGGML_NATIVE=ON"],
    # the same ISA as llamacpu's x86 kernels: no AVX-512 even where the CPU has it
    "avx2": ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
             "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX_VNNI=OFF"],
    # AVX-512 (VBMI, VNNI, BF16) without AVX-VNNI or AMX: a Zen 4's ISA; tools/device_scaling.sh
    # carries it beside native-noamx and avx2 for a CPU that lacks what the native build uses
    "avx512": ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
               "-DGGML_BMI2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON",
               "-DGGML_AVX512_BF16=ON", "-DGGML_AVX_VNNI=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
               "-DGGML_AMX_BF16=OFF"],
}
# llama.cpp 0.3.36's AMX matmuls die with SIGILL (tilezero) on AMX machines: the tile config
# and the XTILEDATA permission are not set up in the worker threads (ggml-org/llama.cpp PR
# #26954, open). There the "native" build is GGML_NATIVE=OFF with every ISA extension the CPU
# has except AMX: llama.cpp's fastest build that runs.
NATIVE_ISA_FLAGS = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C",
                    "bmi2": "GGML_BMI2", "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI",
                    "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16", "avx_vnni": "GGML_AVX_VNNI"}


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_variant() -> str:
    """'native', or 'native-noamx' on a CPU with AMX (see NATIVE_ISA_FLAGS)."""
    return "native-noamx" if "amx_int8" in cpu_flags() else "native"


CMAKE_FLAGS["native-noamx"] = ["-DGGML_NATIVE=OFF"] + [
    f"-D{opt}={'ON' if flag in cpu_flags() else 'OFF'}" for flag, opt in NATIVE_ISA_FLAGS.items()] + [
    "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]

# what build_llamacpp builds; llama-perplexity and llama-tokenize serve tools/quality_vs_llamacpp.py
LLAMA_TARGETS = ["llama-bench", "llama-quantize", "llama-perplexity", "llama-tokenize"]
# built on demand by tools/bench_batched.py and tools/bench_serve.py (build_llamacpp(variant, targets))
BATCHED_TARGETS = ["llama-batched-bench", "llama-quantize"]
SERVER_TARGETS = ["llama-server", "llama-quantize"]
COMMON_CMAKE_FLAGS = ["-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                      "-DCMAKE_BUILD_TYPE=Release"]

BW_C = r"""
/* Read bandwidth: each thread sums its slice of a buffer with 256-bit AVX2 loads.
   usage: bw THREADS [MiB] [PASSES]; prints JSON; GB/s = 1e9 bytes/s, best pass.
   The buffer asks for 2 MB pages, as the engines' weights get them (Linux THP). */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

__attribute__((target("avx2")))
static uint64_t sum_slice(const __m256i *p, size_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i + 4 <= n; i += 4) {
        a0 = _mm256_add_epi64(a0, _mm256_load_si256(p + i));
        a1 = _mm256_add_epi64(a1, _mm256_load_si256(p + i + 1));
        a2 = _mm256_add_epi64(a2, _mm256_load_si256(p + i + 2));
        a3 = _mm256_add_epi64(a3, _mm256_load_si256(p + i + 3));
    }
    __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    uint64_t o[4];
    _mm256_storeu_si256((__m256i *)o, s);
    return o[0] + o[1] + o[2] + o[3];
}

int main(int argc, char **argv) {
    int nt = argc > 1 ? atoi(argv[1]) : 1;
    size_t mib = argc > 2 ? (size_t)atol(argv[2]) : 1024;
    int passes = argc > 3 ? atoi(argv[3]) : 10;
    size_t bytes = mib << 20, nvec = bytes / 32;
    if (nt < 1 || passes < 1 || nvec < 4) { fprintf(stderr, "bw: bad arguments\n"); return 2; }
    __m256i *buf = NULL;
    if (posix_memalign((void **)&buf, 2 << 20, bytes)) { fprintf(stderr, "bw: cannot allocate %zu MiB\n", mib); return 1; }
#ifdef MADV_HUGEPAGE
    madvise(buf, bytes, MADV_HUGEPAGE);
#endif
    omp_set_num_threads(nt);
    volatile uint64_t sink = 0;
    /* first touch by the same static split that reads it */
    #pragma omp parallel
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        size_t lo = nvec * t / n, hi = nvec * (t + 1) / n;
        memset(buf + lo, t + 1, (hi - lo) * 32);
    }
    double best = 1e30, total = 0;
    for (int k = 0; k < passes; k++) {
        uint64_t s = 0;
        double t0 = now();
        #pragma omp parallel reduction(+:s)
        {
            int t = omp_get_thread_num(), n = omp_get_num_threads();
            size_t lo = nvec * t / n, hi = nvec * (t + 1) / n;
            s += sum_slice(buf + lo, hi - lo);
        }
        double dt = now() - t0;
        sink += s;
        total += dt;
        if (dt < best) best = dt;
    }
    printf("{\"threads\": %d, \"mib\": %zu, \"passes\": %d, \"best_gbs\": %.3f, \"mean_gbs\": %.3f}\n",
           nt, mib, passes, bytes / best / 1e9, bytes * (double)passes / total / 1e9);
    free(buf);
    return sink == 42 ? 3 : 0;
}
"""


# ----------------------------------------------------------------------------- helpers

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd, logfile=None, **kw) -> subprocess.CompletedProcess:
    """Run cmd (check=True); with logfile, its output goes there and its tail is shown on failure."""
    log("$ " + " ".join(str(c) for c in cmd) + (f"  > {logfile}" if logfile else ""))
    if logfile is None:
        return subprocess.run([str(c) for c in cmd], check=True, **kw)
    with open(logfile, "wb") as f:
        r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, **kw)
    if r.returncode != 0:
        tail = Path(logfile).read_text(errors="replace")[-4000:]
        raise SystemExit(f"bench_vs_llamacpp: command failed ({r.returncode}); end of {logfile}:\n{tail}")
    return r


def cpu_busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy (user, nice, system, irq, softirq, steal) since boot."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_measured(cmd, env=None, cwd=None) -> dict:
    """Run cmd. Returns rc, out, err, rss (peak RSS of the child, bytes), wall (s), and foreign:
    the CPU the rest of the machine used meanwhile, in cores (busy CPU time of all CPUs,
    steal included, minus the child's own user+system time, over the wall time)."""
    with tempfile.TemporaryFile() as err:
        b0 = cpu_busy_seconds()
        t0 = time.perf_counter()
        p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=err, env=env, cwd=cwd)
        out = p.stdout.read()
        p.stdout.close()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        b1 = cpu_busy_seconds()
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        errtext = err.read().decode(errors="replace")
    foreign = max(0.0, (b1 - b0) - (ru.ru_utime + ru.ru_stime)) / max(wall, 1e-9)
    return {"rc": p.returncode, "out": out.decode(errors="replace"), "err": errtext,
            "rss": ru.ru_maxrss * 1024, "wall": wall, "foreign": foreign}


def wait_quiet(max_wait: float, threshold: float) -> float:
    """Wait (at most max_wait s) until the other processes use under `threshold` cores over
    one second; return the last figure."""
    t_end = time.time() + max_wait
    said = False
    while True:
        b0, t0 = cpu_busy_seconds(), time.perf_counter()
        time.sleep(1.0)
        busy = (cpu_busy_seconds() - b0) / (time.perf_counter() - t0)
        if busy < threshold or time.time() >= t_end:
            if said:
                log(f"  machine {'quiet' if busy < threshold else 'still busy'}: {busy:.2f} cores in use")
            return busy
        if not said:
            log(f"  other jobs use {busy:.2f} cores: waiting (at most {max_wait:.0f} s) for a quiet machine")
            said = True
        time.sleep(4.0)


def add_quiet_args(ap, what: str = "run", redo: int = 2) -> None:
    """--quiet-wait, --busy-threshold, --redo: run_undisturbed's settings (every bench tool's)."""
    ap.add_argument("--quiet-wait", type=float, default=300,
                    help=f"before each {what}, wait at most this many seconds for other jobs to use under "
                         "--busy-threshold cores (0: do not wait; default 300)")
    ap.add_argument("--busy-threshold", type=float, default=0.25,
                    help="cores used by other jobs that count as a disturbance (default 0.25)")
    ap.add_argument("--redo", type=int, default=redo,
                    help=f"run again a {what} that other jobs disturbed, at most this many times; the least "
                         f"disturbed attempt is kept (default {redo})")


def llamacpp_and_files(given, targets: list, exe_name: str, types: list, our_types: list):
    """The llama.cpp program `exe_name` (`given`, or built with `targets`) and the 1B files of
    `types` for both engines (bench_batched.py, bench_serve.py): (exe, cmake flags, ggufs, ours)."""
    variant = native_variant()
    if given:
        exe = given.resolve()
        flags = f"given: {given}"
        quantize = exe.parent / "llama-quantize"
    else:
        d = build_llamacpp(variant, targets)
        exe, quantize = d / exe_name, d / "llama-quantize"
        flags = " ".join(CMAKE_FLAGS[variant] + COMMON_CMAKE_FLAGS)
    ck = ensure_checkpoint("1b")
    bf16 = BENCH_DIR / "llamacpp-1b-bf16.gguf"
    conv_py = None if bf16.exists() else convert_python(None)
    ggufs = ensure_llamacpp_files(ck, types, quantize, conv_py, "1b")
    ours = ensure_our_files(ck, our_types, ggufs, "1b", prune=False)
    recache([*ggufs.values(), *ours.values()])
    return exe, flags, ggufs, ours


def run_undisturbed(run, quiet_wait: float, busy_threshold: float, redo: int, on_redo=None) -> dict:
    """`run()` (it returns a dict with "foreign": cores other jobs used meanwhile, as
    run_measured's) after waiting for a quiet machine (wait_quiet; quiet_wait 0: no wait);
    run again, at most `redo` times, while other jobs used >= busy_threshold cores. Returns
    the least disturbed attempt; on_redo(foreign) is called for each repeat. Shared with
    tools/bench_batched.py."""
    best = None
    for attempt in range(redo + 1):
        if quiet_wait > 0:
            wait_quiet(quiet_wait, busy_threshold)
        r = run()
        if best is None or r["foreign"] < best["foreign"]:
            best = r
        if r["foreign"] < busy_threshold:
            break
        if attempt < redo:
            log(f"  disturbed by other jobs ({r['foreign']:.2f} cores): running it again")
            if on_redo is not None:
                on_redo(r["foreign"])
    return best


def src_hash(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


def engine_fingerprint() -> str:
    """Hash of the built llamacpu extension(s), to notice a rebuild during the runs."""
    libs = sorted((REPO / "llamacpu").glob("_core*.so")) + sorted((REPO / "llamacpu").glob("_core*.pyd"))
    return src_hash(libs) if libs else "none"


def git_describe() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_info() -> dict:
    info = {"model": platform.processor() or platform.machine(), "flags": set(), "family": None,
            "model_id": None}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k, v = k.strip(), v.strip()
                if k == "model name":
                    info["model"] = v
                elif k == "flags":
                    info["flags"] = set(v.split())
                elif k == "cpu family" and info["family"] is None:
                    info["family"] = v
                elif k == "model" and info["model_id"] is None:
                    info["model_id"] = v
                elif not line.strip() and info["flags"]:
                    break
    except OSError:
        pass
    info["cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            info["mem_gb"] = int(f.readline().split()[1]) / 1e6
    except (OSError, ValueError, IndexError):
        info["mem_gb"] = None
    return info


def machine_line(cpu: dict) -> str:
    """The machine in words, from cpu_info(): model, family/model ids, CPUs, RAM, kernel, ISA.
    Shared with tools/bench_batched.py and tools/bench_serve.py."""
    return (f"{cpu['model']} (family {cpu['family']}, model {cpu['model_id']}), "
            f"{cpu['cpus']} CPUs, {cpu['mem_gb']:.0f} GB RAM, Linux {platform.release()}; "
            f"ISA flags: {isa_summary(cpu['flags'])}")


def isa_summary(flags: set) -> str:
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx_vnni", "amx_int8"]
    have = [f for f in wanted if f in flags]
    return ", ".join(have) if have else "none of avx2/avx512"


# ----------------------------------------------------------------------------- llama.cpp

def fetch_llama_source() -> Path:
    if (LLAMA_SRC / "convert_hf_to_gguf.py").exists() and (LLAMA_SRC / "CMakeLists.txt").exists():
        return LLAMA_SRC
    LLAMA_DIR.mkdir(parents=True, exist_ok=True)
    sdist_dir = LLAMA_DIR / "sdist"
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not (sdist_dir / name).exists():
        # --no-binary for this one package only: with :all: pip would also build the build
        # backend's own dependencies (cmake, ninja, scikit-build-core) from source just to
        # read the metadata, which takes far longer than the download.
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", sdist_dir])
    log(f"extracting {name}")
    with tarfile.open(sdist_dir / name) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(LLAMA_DIR, filter="data")
        else:  # pragma: no cover (Python < 3.11.4)
            tf.extractall(LLAMA_DIR)
    if not (LLAMA_SRC / "convert_hf_to_gguf.py").exists():
        raise SystemExit(f"bench_vs_llamacpp: {LLAMA_SRC} has no convert_hf_to_gguf.py")
    return LLAMA_SRC


def find_cmake() -> str:
    c = shutil.which("cmake")
    if c:
        return c
    log("no cmake on PATH: installing it from PyPI")
    sh([sys.executable, "-m", "pip", "install", "cmake"])
    for cand in (shutil.which("cmake"), Path(sys.executable).parent / "cmake"):
        if cand and Path(cand).exists():
            return str(cand)
    raise SystemExit("bench_vs_llamacpp: cmake was installed but cannot be found")


def build_llamacpp(variant: str, targets=None) -> Path:
    """Build `targets` (default LLAMA_TARGETS; tools/bench_batched.py and tools/bench_serve.py
    ask for llama-batched-bench and llama-server) of llama.cpp's `variant` build; cached: only
    the missing targets are built, incrementally in the same build folder. Returns the bin folder."""
    targets = list(LLAMA_TARGETS if targets is None else targets)
    src = fetch_llama_source()
    build = src / ("build" if variant == "native" else f"build-{variant}")
    bindir = build / "bin"
    missing = [t for t in targets if not (bindir / t).exists()]
    if not missing:
        return bindir
    cmake = find_cmake()
    log(f"building llama.cpp ({variant}: {', '.join(missing)}); about 10 minutes on 2 cores from scratch")
    blog = LLAMA_DIR / f"build-{variant}.log"
    sh([cmake, "-S", src, "-B", build, *CMAKE_FLAGS[variant], *COMMON_CMAKE_FLAGS], logfile=blog)
    sh([cmake, "--build", build, "--target", *missing, "-j", str(os.cpu_count() or 2)],
       logfile=LLAMA_DIR / f"build-{variant}-make-{'-'.join(missing)}.log")
    return bindir


def convert_python(explicit) -> str:
    """An interpreter that can run convert_hf_to_gguf.py (it imports torch)."""
    if explicit:
        return explicit
    venv = CACHE / "convert-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        sh([sys.executable, "-m", "venv", "--system-site-packages", venv])
    probe = "import torch, numpy, transformers, sentencepiece"
    if subprocess.run([py, "-c", probe], capture_output=True).returncode != 0:
        sh([py, "-m", "pip", "install", f"torch=={TORCH_VERSION}", "numpy", "transformers", "safetensors",
           "sentencepiece"])  # imported before it looks for tokenizer.model
    return str(py)


# ----------------------------------------------------------------------------- model files

def ensure_checkpoint(preset: str = "1b") -> Path:
    ck = BENCH_DIR / f"ckpt-{preset}"
    if (ck / "config.json").exists() and (ck / "model.safetensors").exists():
        return ck
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    sh([sys.executable, REPO / "tools" / "fetch_assets.py"])
    tmp = BENCH_DIR / f"ckpt-{preset}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    sh([sys.executable, REPO / "tools" / "make_checkpoint.py", "--preset", preset, "--out", tmp])
    tmp.rename(ck)
    return ck


def llamacpp_input(ck: Path) -> Path:
    """The checkpoint as llama.cpp's converter will take it.

    The test tokenizer (tools/fetch_assets.py) is Llama 3.2's vision tokenizer: one added
    token more than the text models, <|image|> = 128256, which is not below vocab_size
    128256, and convert_hf_to_gguf.py asserts max(token id) < vocab_size. This folder
    links every file of the checkpoint except the tokenizer files, which lose the ids
    >= vocab_size (what the text model's own tokenizer.json has). Weights are shared.
    """
    d = BENCH_DIR / f"{ck.name}-for-llamacpp"
    vocab = json.loads((ck / "config.json").read_text())["vocab_size"]
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in ck.iterdir():
        if f.name == "tokenizer.json":
            tok = json.loads(f.read_text(encoding="utf-8"))
            tok["added_tokens"] = [a for a in tok.get("added_tokens", []) if a["id"] < vocab]
            (tmp / f.name).write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
        elif f.name == "tokenizer_config.json":
            cfg = json.loads(f.read_text(encoding="utf-8"))
            if isinstance(cfg.get("added_tokens_decoder"), dict):
                cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items()
                                               if int(k) < vocab}
            (tmp / f.name).write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
        else:
            (tmp / f.name).symlink_to(f.resolve())
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return d


def llama_quantize(quantize: Path, src: Path, out: Path, typ: str, logfile: Path, requantize=False) -> Path:
    """`llama-quantize [--allow-requantize] SRC OUT TYPE NTHREADS` once (cached: an existing OUT
    is kept), through a temporary file. Shared with tools/quality_vs_llamacpp.py."""
    if not out.exists():
        tmp = out.with_suffix(".gguf.tmp")
        sh([quantize, *(["--allow-requantize"] if requantize else []), src, tmp, typ.upper(),
            str(os.cpu_count() or 2)], logfile=logfile)
        tmp.rename(out)
    return out


def ensure_llamacpp_files(ck: Path, types, quantize: Path, conv_py: str, preset: str = "1b") -> dict:
    """llama.cpp's file of each type: its BF16 GGUF of the checkpoint, llama-quantize'd."""
    src = fetch_llama_source()
    bf16 = BENCH_DIR / f"llamacpp-{preset}-bf16.gguf"
    if not bf16.exists():
        env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
        tmp = bf16.with_suffix(".gguf.tmp")
        sh([conv_py, src / "convert_hf_to_gguf.py", llamacpp_input(ck), "--outtype", "bf16", "--outfile", tmp],
           logfile=BENCH_DIR / f"convert_hf_to_gguf-{preset}.log", env=env)
        tmp.rename(bf16)
    return {t: llama_quantize(quantize, bf16, BENCH_DIR / f"llamacpp-{preset}-{t}.gguf", t,
                              BENCH_DIR / f"llama-quantize-{preset}-{t}.log") for t in types}


def converted_files(src: Path, directory: Path, stem: str, type_args: dict, prune: bool = True) -> dict:
    """`llamacpu convert` of src once per type (type -> its extra convert arguments), cached
    in directory as {stem}-{type}-{hash}.bin and redone when the converter, the format, the
    C headers or the source file (size, mtime) change; prune: a new file replaces the older
    ones of its stem and type (prune=False keeps them: the cache is shared by checkouts at
    other commits). Shared with tools/quality_vs_llamacpp.py."""
    deps = sorted((REPO / "llamacpu").glob("convert*.py"))
    deps += [REPO / "llamacpu" / n for n in ("format.py", "_core.pyx", "quant_mix.py", "gguf.py",
                                                 "gguf_tokenizer.py")]
    deps += sorted((REPO / "csrc").glob("*.h"))
    h = src_hash([p for p in deps if p.exists()])
    src = Path(src)
    if src.is_file():  # a GGUF remade by llama-quantize must be imported again
        st = src.stat()
        h = hashlib.sha256(f"{h}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]
    out = {}
    for t, extra in type_args.items():
        f = directory / f"{stem}-{t}-{h}.bin"
        if not f.exists():
            for old in directory.glob(f"{stem}-{t}-*.bin") if prune else ():
                old.unlink()
            sh([sys.executable, "-m", "llamacpu", "convert", src, f, *extra, "--quiet"], cwd=REPO,
               env=our_env())
        out[t] = f
    return out


def ensure_our_files(ck: Path, types, ggufs: dict, preset: str = "1b", prune: bool = True) -> dict:
    """llamacpu's file of each type: its own conversion of the checkpoint (OWN_TYPES), or
    llama.cpp's GGUF of that type imported, every tensor's type and blocks kept (GGUF_TYPES)."""
    stem = f"llamacpu-{preset}"
    out = converted_files(ck, BENCH_DIR, stem, {t: ["--type", t] for t in types if t in OWN_TYPES}, prune)
    for t in types:
        if t in GGUF_TYPES:
            out.update(converted_files(ggufs[t], BENCH_DIR, stem, {t: []}, prune))
    return out


def made_by(typ: str, engine: str, preset: str) -> str:
    """How a file of the report was made, in words."""
    if engine != "ours":
        return f"llama-quantize llamacpp-{preset}-bf16.gguf → {typ.upper()}"
    if typ in OWN_TYPES:
        return f"own conversion: `llamacpu convert ckpt-{preset} --type {typ}`"
    return f"the llama.cpp file imported: `llamacpu convert llamacpp-{preset}-{typ}.gguf`"


def identical_tensors(our_file: Path, gguf: Path) -> tuple[int, int]:
    """(tensors whose bytes are identical in both files, tensors of the GGUF): our quantized
    matrices are unpacked from the x8 layout to GGUF's row-major blocks first (docs/FORMAT.md).
    Shared with tools/quality_vs_llamacpp.py.

    It reads both files whole, so it runs in a process of its own: Linux carries a process's
    peak RSS over fork + exec into the child's ru_maxrss, and the benchmark processes started
    from this one would report at least the pages this comparison touched."""
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(_identical_tensors, str(our_file), str(gguf)).result()


def _identical_tensors(our_file: str, gguf: str) -> tuple[int, int]:
    sys.path.insert(0, str(REPO))
    import numpy as np
    from llamacpu.convert_gguf import internal_name
    from llamacpu.format import read_model, x8_unpack
    from llamacpu.gguf import GGUFFile

    same = total = 0
    with read_model(our_file) as m, GGUFFile(gguf) as g:
        n_layers = m.config.num_hidden_layers
        for name, gt in g.tensors.items():
            ours = internal_name(name, n_layers)
            total += 1
            if ours not in m.tensors or m.tensors[ours].type != gt.type:
                continue
            t = m.tensors[ours]
            a = np.asarray(m.array(ours)).view(np.uint8).reshape(-1)
            if t.layout == 1:
                a = x8_unpack(a, t.type, t.shape[0]).reshape(-1)
            same += a.tobytes() == np.asarray(gt.data).view(np.uint8).reshape(-1).tobytes()
    return same, total


def our_env(repo: Path = REPO) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p))


def file_tensors(path: Path) -> tuple[list, str]:
    """[(name, type name, shape, nbytes, absolute offset)] of a llamacpu or GGUF file's
    tensors, and the name of its token embedding."""
    sys.path.insert(0, str(REPO))
    if path.suffix == ".gguf":
        from llamacpu.gguf import GGUFFile as opener
        emb = "token_embd.weight"
    else:
        from llamacpu.format import read_model as opener
        emb = "tok_embeddings.weight"
    with opener(path) as f:
        return [(t.name, t.type_name, tuple(t.shape), t.nbytes, t.offset) for t in f.tensors.values()], emb


def tensor_table(path: Path) -> dict:
    """Tensor bytes by type and the decode bytes per token of a llamacpu or GGUF file."""
    ts, emb = file_tensors(path)
    out_name = "output.weight"
    by = {t[0]: t for t in ts}
    total = sum(t[3] for t in ts)
    e = by[emb]
    row = e[3] // e[2][0]
    tied = out_name not in by
    per_token = total - (0 if tied else e[3]) + row
    types: dict[str, list] = {}
    for name, tname, shape, nb, _ in ts:
        s = types.setdefault(tname, [0, 0])
        s[0] += 1
        s[1] += nb
    return {"file_size": path.stat().st_size, "tensor_bytes": total, "bytes_per_token": per_token,
            "tied": tied, "embedding_type": e[1], "head_type": e[1] if tied else by[out_name][1],
            "types": types}


# ----------------------------------------------------------------------------- bandwidth

def recache(paths) -> None:
    """Drop the engines' files from the page cache and read them back, before the runs: a
    file llama-quantize or `llamacpu convert` has just written sits there in small folios,
    which every mapping maps with 4 KB pages; read back from disk, the kernel caches it in
    folios of up to 2 MB (Linux, large-folio filesystems), which each engine's mapping can
    map with 2 MB pages, as after a reboot (decode is 4-7% faster on them, BENCHMARKS.md,
    session 15). Reading them back here keeps the disk out of the first timed runs."""
    if not hasattr(os, "posix_fadvise"):
        return
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            while os.read(fd, 16 << 20):
                pass
        finally:
            os.close(fd)


def bandwidth(threads, quiet_wait: float = 0, busy_threshold: float = 0.25) -> dict:
    exe = BENCH_DIR / "bw"
    csrc = BENCH_DIR / "bw.c"
    if not exe.exists() or not csrc.exists() or csrc.read_text() != BW_C:
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        csrc.write_text(BW_C)
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or "cc"
        sh([cc, "-O2", "-fopenmp", csrc, "-o", exe])
    res = {}
    for t in threads:
        if quiet_wait > 0:
            wait_quiet(quiet_wait, busy_threshold)
        r = subprocess.run([exe, str(t), "1024", "10"], capture_output=True, text=True, check=True)
        res[t] = json.loads(r.stdout)
        log(f"read bandwidth, {t} thread(s): best {res[t]['best_gbs']:.1f} GB/s, "
            f"mean {res[t]['mean_gbs']:.1f}")
    return res


# ----------------------------------------------------------------------------- runs

def llama_bench_rows(out: str) -> tuple[dict, dict]:
    """llama-bench -o json's output as ({(threads, test): t/s}, meta of the build); the test
    named as llama-bench's table names it ('pp512', 'tg128 @ d4096')."""
    by = {}
    meta = {}
    for r in json.loads(out):
        test = f"pp{r['n_prompt']}" if r.get("n_gen", 0) == 0 else f"tg{r['n_gen']}"
        if r.get("n_depth"):
            test += f" @ d{r['n_depth']}"
        by[(int(r["n_threads"]), test)] = float(r["avg_ts"])
        meta = {k: r.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "model_type",
                                      "model_size", "model_n_params", "n_threads", "type_k", "type_v",
                                      "flash_attn")}
    return by, meta


def run_llama(bench: Path, gguf: Path, p: int, n: int, t, extra=()) -> dict:
    """One llama-bench process (-r 1). t: a thread count, a comma list, or None (its default).
    Returns ts {test: t/s} (of the last thread count), by_threads {(threads, test): t/s}."""
    m = run_measured([bench, "-m", gguf, "-p", p, "-n", n, *(["-t", t] if t is not None else []), *extra,
                      "-r", "1", "-o", "json"])
    if m["rc"] != 0:
        raise SystemExit(f"llama-bench failed ({m['rc']}):\n{m['err'][-3000:]}")
    by, meta = llama_bench_rows(m["out"])
    return {"ts": {test: v for (_, test), v in by.items()}, "by_threads": by, "rss": m["rss"], "wall": m["wall"],
            "foreign": m["foreign"], "meta": meta}


def run_ours(model: Path, p: int, n: int, t, extra=(), repo: Path = REPO, reps: int = 1) -> dict:
    """One `llamacpu bench` process (-r reps), as run_llama (t None: our default thread count);
    repo: the checkout whose build runs (tools/bench_ab.py's two)."""
    m = run_measured([sys.executable, "-m", "llamacpu", "bench", model, "-p", p, "-n", n,
                      *(["-t", t] if t is not None else []), *extra, "-r", reps, "--json"], env=our_env(repo), cwd=repo)
    if m["rc"] != 0:
        raise SystemExit(f"llamacpu bench failed ({m['rc']}):\n{m['err'][-3000:]}")
    r = json.loads(m["out"])
    by = {(int(x["n_threads"]), x["test"]): float(x["avg_ts"]) for x in r["results"]}
    return {"ts": {test: v for (_, test), v in by.items()}, "by_threads": by, "rss": m["rss"], "wall": m["wall"],
            "foreign": m["foreign"], "load_s": r["load_s"]["median"],
            "meta": {"kernels": r["kernels"], "version": r["version"], "model_type": r["model_type"],
                     "n_threads": sorted({t for t, _ in by})}}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- report

def fmt_mb(n) -> str:
    return f"{n / 1e6:,.1f} MB"


def render(ctx: dict) -> str:
    L = []
    cpu = ctx["cpu"]
    engines = ctx["engines"]           # [(key, label)], llama.cpp variants first, ours last
    llamas = [e for e in engines if e[0] != "ours"]
    p, n = ctx["p"], ctx["n"]
    preset, cfg = ctx["preset"], ctx["config"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    L.append(f"### {preset_label(preset)} config")
    L.append("")
    L.append(f"Measured {ctx['date']} by `python tools/bench_vs_llamacpp.py {ctx['argv']}`"
             f" ({ctx['elapsed_min']:.0f} min).")
    L.append("")
    L.append(f"- Machine: {machine_line(cpu)}.")
    allf = [x for v in ctx["foreign"].values() for x in v]
    L.append(f"- The machine is shared with other jobs, so timings are noisy: runs alternate between the "
             f"engines (order flipped every run) and the table shows medians of {ctx['reps']} run(s) each. "
             f"Before each run the tool waits for the other jobs to use under {ctx['busy_threshold']} cores; "
             f"a run during which they used more is run again (at most {ctx['redo_max']} times, the least "
             f"disturbed attempt kept; {len(ctx['redone'])} repeat(s) this time). CPU used by other jobs "
             f"during the kept runs: median {median(allf):.2f}, max {max(allf):.2f} cores (per run in the "
             f"details below). Two threads on two cores suffer most: a thread that loses its core stalls "
             f"the other at every barrier.")
    for key, label in llamas:
        m = ctx["llama_meta"].get(key, {})
        L.append(f"- {label}: llama.cpp from llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} "
                 f"(build {m.get('build_number')}, commit {m.get('build_commit')}), "
                 f"`{ctx['llama_flags'][key]}`; backends {m.get('backends')}.")
    om = ctx["our_meta"]
    L.append(f"- llamacpu {om.get('version')} (git {ctx['git']}), kernels `{om.get('kernels')}`."
             + (" **Warning: the llamacpu extension was rebuilt during the runs; the llamacpu column mixes "
                "two builds. Run again.**" if ctx["engine_changed"] else ""))
    L.append(f"- Model: random weights, the exact {preset_label(preset)} config (tools/make_checkpoint.py "
             f"--preset {preset}, bf16 safetensors: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} "
             f"layers, {cfg['num_attention_heads']} / {cfg['num_key_value_heads']} heads (q / kv), head_dim "
             f"{head_dim}, FFN {cfg['intermediate_size']}, vocab {cfg['vocab_size']}, tied "
             f"embedding). llama.cpp's files: its convert_hf_to_gguf.py --outtype bf16, then llama-quantize "
             f"to each type.")
    for typ in ctx["types"]:
        same, total = ctx["identical"][typ]
        if typ in OWN_TYPES:
            L.append(f"- {typ.upper()}: each engine's own conversion of the checkpoint. llama.cpp: "
                     f"`llama-quantize llamacpp-{preset}-bf16.gguf OUT {typ.upper()}`; llamacpu: "
                     f"`llamacpu convert ckpt-{preset} OUT --type {typ}` (its own type policy; "
                     f"{same} / {total} tensors byte-identical to llama.cpp's file).")
        else:
            L.append(f"- {typ.upper()}: one GGUF, run by both. llama.cpp: `llama-quantize "
                     f"llamacpp-{preset}-bf16.gguf OUT {typ.upper()}` (no importance matrix); llamacpu: that "
                     f"same GGUF imported, `llamacpu convert llamacpp-{preset}-{typ}.gguf OUT` (each "
                     f"tensor keeps its type, blocks copied bit-exact into the x8 layout; {same} / {total} "
                     f"tensors byte-identical once unpacked).")
    L.append(f"- Tests as llama-bench defines them: pp{p} = one batch of {p} random tokens from an empty "
             f"cache; tg{n} = {n} tokens decoded one at a time from an empty cache. Each run is a fresh "
             f"process with one warm-up per test (`llama-bench -r 1 -o json`, "
             f"`llamacpu bench -r 1 --json`).")
    L.append("")

    # main table
    head = ["type", "threads", "test"] + [f"{lab} t/s" for _, lab in llamas] + ["llamacpu t/s"]
    head += [f"ratio vs {lab}" for _, lab in llamas]
    head += ["decode bound t/s (llamacpu / llama.cpp file)", "llamacpu % of bound"]
    head += [f"{lab} % of bound" for _, lab in llamas]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|")
    for typ in ctx["types"]:
        for t in ctx["threads"]:
            for test in (f"pp{p}", f"tg{n}"):
                med = {k: median(ctx["samples"][(k, typ, t, test)]) for k, _ in engines}
                row = [typ.upper(), str(t), test] + [f"{med[k]:.2f}" for k, _ in llamas] + [f"{med['ours']:.2f}"]
                row += [f"**{med['ours'] / med[k]:.2f}×**" for k, _ in llamas]
                if test.startswith("tg"):
                    bw = ctx["bw_used"][t] * 1e9
                    b_ours = bw / ctx["files"][("ours", typ)]["bytes_per_token"]
                    b_ll = bw / ctx["files"][(llamas[0][0], typ)]["bytes_per_token"]
                    row += [f"{b_ours:.1f} / {b_ll:.1f}", f"{100 * med['ours'] / b_ours:.0f}%"]
                    row += [f"{100 * med[k] / b_ll:.0f}%" for k, _ in llamas]
                else:
                    row += [""] * (2 + len(llamas))
                L.append("| " + " | ".join(row) + " |")
    L.append("")
    L.append("Ratio = median llamacpu t/s / median llama.cpp t/s (above 1: llamacpu is faster). "
             "The llama.cpp builds share one GGUF file per type.")
    L.append("")

    # files
    L.append(f"Files (all from the same bf16 checkpoint; sizes in 10^6 bytes; bound t/s = the decode "
             f"bound at {', '.join(str(t) for t in ctx['threads'])} thread(s)):")
    L.append("")
    L.append("| type | engine | made by | file | file size | tensor bytes | types (tensors, bytes) | "
             "decode bytes/token | bound t/s |")
    L.append("|---|---|---|---|---:|---:|---|---:|---:|")
    for typ in ctx["types"]:
        for key, label in [llamas[0], ("ours", "llamacpu")]:
            f = ctx["files"][(key, typ)]
            tys = ", ".join(f"{k} ×{v[0]} {fmt_mb(v[1])}" for k, v in
                            sorted(f["types"].items(), key=lambda kv: -kv[1][1]))
            bounds = " / ".join(f"{ctx['bw_used'][t] * 1e9 / f['bytes_per_token']:.1f}" for t in ctx["threads"])
            L.append(f"| {typ.upper()} | {label if key == 'ours' else 'llama.cpp'} | "
                     f"{made_by(typ, key, preset)} | {f['name']} | "
                     f"{fmt_mb(f['file_size'])} | {fmt_mb(f['tensor_bytes'])} | {tys} | "
                     f"{fmt_mb(f['bytes_per_token'])} | {bounds} |")
    L.append("")
    L.append("Output head: " + "; ".join(
        f"{typ.upper()} llama.cpp {ctx['files'][(llamas[0][0], typ)]['head_type']}, "
        f"llamacpu {ctx['files'][('ours', typ)]['head_type']}" for typ in ctx["types"])
        + " (both files tie it to the embedding)."
        + (" llama-quantize gives the tied embedding/output Q6_K when asked for Q4_0; llamacpu gives it "
           "Q6_0, its own 6-bit type (docs/FORMAT.md), with q4_0." if "q4_0" in ctx["types"] else "")
        + (" The K-quant files are llama-quantize's per-tensor mixtures (the types column), one file "
           "run as it is by both engines."
           if any(t in GGUF_TYPES for t in ctx["types"]) else ""))
    L.append("")
    kv = cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2 * 2 * n
    L.append("Decode bound: bound t/s = read bandwidth (threads) / bytes per token; bytes per token = "
             "Σ nbytes of every tensor in the file (each matrix of every layer, norms, the tied "
             "embedding read once as the output head) + one embedding row (the lookup). The KV cache "
             f"(F16 K and V: at most {fmt_mb(kv)} per token at tg{n}) and activations are left out, so the "
             "bound is a little optimistic.")
    L.append("")

    # bandwidth
    L.append("Read bandwidth (tools/bench_vs_llamacpp.py's C program: OpenMP threads sum a 1 GiB "
             "buffer of 2 MB pages with AVX2 loads, 10 passes, best pass; GB/s = 10^9 B/s), measured before "
             "each round of runs and after the last; their median is used for the bound. The machine is a "
             "VM: its memory bandwidth moves with the host's other tenants, which the busy-core check cannot "
             "see. Before the runs both engines' files were dropped from the page cache and read back, so "
             "each engine mapped its file as after a reboot (in 2 MB pages where the kernel could).")
    L.append("")
    L.append("| threads | " + " | ".join(f"#{i + 1}" for i in range(len(ctx["bw_samples"]))) + " | used |")
    L.append("|---:|" + "---:|" * (len(ctx["bw_samples"]) + 1))
    for t in ctx["threads"]:
        L.append(f"| {t} | " + " | ".join(f"{b[t]['best_gbs']:.1f}" for b in ctx["bw_samples"])
                 + f" | {ctx['bw_used'][t]:.1f} GB/s |")
    L.append("")

    # load & RSS
    L.append("Load and memory (medians over the runs; peak RSS = ru_maxrss of each benchmark process: "
             "the whole process, both tests, including the touched pages of the mmapped file):")
    L.append("")
    L.append("| type | llamacpu load (Model()) | " + " | ".join(f"{lab} peak RSS" for _, lab in llamas)
             + " | llamacpu peak RSS |")
    L.append("|---|---:|" + "---:|" * (len(llamas) + 1))
    for typ in ctx["types"]:
        loads = [x for t in ctx["threads"] for x in ctx["loads"][(typ, t)]]
        rss = {k: median([x for t in ctx["threads"] for x in ctx["rss"][(k, typ, t)]]) for k, _ in engines}
        L.append(f"| {typ.upper()} | {median(loads) * 1e3:.0f} ms | "
                 + " | ".join(fmt_mb(rss[k]) for k, _ in llamas) + f" | {fmt_mb(rss['ours'])} |")
    L.append("")

    # raw samples
    L.append("<details><summary>All runs: t/s (cores used by other jobs during the run), in run order"
             "</summary>")
    L.append("")
    L.append("| type | threads | test | " + " | ".join(lab for _, lab in engines) + " |")
    L.append("|---|---|---|" + "---|" * len(engines))
    for typ in ctx["types"]:
        for t in ctx["threads"]:
            for test in (f"pp{p}", f"tg{n}"):
                cells = [", ".join(f"{x:.2f} ({f:.2f})" for x, f in zip(ctx["samples"][(k, typ, t, test)],
                                                                        ctx["foreign"][(k, typ, t, test)]))
                         for k, _ in engines]
                L.append(f"| {typ.upper()} | {t} | {test} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("</details>")
    return "\n".join(L)


INTRO = """# Benchmarks

llamacpu against llama.cpp on this machine, side by side: the same random-weight checkpoint
with the exact Llama 3.2 1B configuration (and the 3B one for Q4_K_M), Q4_0 and Q8_0
converted by each engine's own tools, Q4_K_M and Q6_K made by llama-quantize and run as the
same GGUF by both; prompt processing (pp512) and generation (tg128) with 1 and 2 threads.

## How to rerun

```bash
python tools/bench_vs_llamacpp.py            # full: builds llama.cpp once (cached in ~/.cache/llamacpu), -r 3
python tools/bench_vs_llamacpp.py --preset 3b   # the 3B config (Q4_K_M by default)
python tools/bench_vs_llamacpp.py --avx2     # also an AVX2-only llama.cpp build (llamacpu's x86 ISA)
python tools/bench_vs_llamacpp.py -r 5 -t 1,2,4 --types q4_k_m,q5_k_m
python tools/bench_vs_llamacpp.py --quick    # smoke test (-p 64 -n 16 -r 1), prints the table only
llamacpu bench MODEL -p 512 -n 128 -t 1,2 -r 5   # our engine alone, llama-bench style
```

The tool writes the sections between the `bench:begin` / `bench:end` markers (1B) and the
`bench:3b:begin` / `bench:3b:end` markers (3B) below and keeps the rest of this file.

## Results

"""

TRIED = """

## What we tried

"""


def write_marked(path: Path, begin: str, end: str, body: str, new_file, after: str | None = None) -> None:
    """Put `body` between the begin/end marker lines of the file at `path`, keeping the
    rest; without markers, put them right after the line `after` when the file has it, else
    append them under "## Results"; a missing file becomes new_file(block). Shared with
    tools/quality_vs_llamacpp.py."""
    block = f"{begin}\n{body}\n{end}"
    if path.exists():
        text = path.read_text()
        i, j = text.find(begin), text.find(end)
        k = text.find(after) if after else -1
        if i >= 0 and j > i:
            text = text[:i] + block + text[j + len(end):]
        elif k >= 0:
            k += len(after)
            text = text[:k] + "\n\n" + block + text[k:]
        else:
            text = text.rstrip("\n") + "\n\n## Results\n\n" + block + "\n"
    else:
        text = new_file(block)
    path.write_text(text)


def write_part(path: Path, begin: str, end: str, body: str, part: str, after=(), new_file=None) -> None:
    """A tool's section into `path` between its markers (write_marked), placed after the
    first of the `after` marker lines that the file has; a new file is "# Benchmarks" and
    the section (or new_file(block))."""
    text = path.read_text() if path.exists() else ""
    at = next((m for m in after if m in text), None)
    write_marked(path, begin, end, body, new_file or (lambda block: "# Benchmarks\n\n" + block + "\n"), after=at)
    log(f"wrote {path} ({part} part)")


def keyed(d: dict) -> dict:
    """A dict keyed by tuples, for JSON: each key joined with '|'."""
    return {"|".join(map(str, k)): v for k, v in d.items()}


def publish(body: str, out_path: Path | None, raw_name: str | None, raw, write) -> int:
    """Every tool's end: print the section, keep the raw results as JSON in
    BENCH_DIR/raw_name, and write(out_path, body) unless out_path is None."""
    print(body)
    if raw_name:
        path = BENCH_DIR / raw_name
        path.write_text(json.dumps(raw, indent=1, default=str))
        log(f"raw results: {path}")
    if out_path is not None:
        write(out_path, body)
    return 0


def write_benchmarks(path: Path, body: str, preset: str = "1b") -> None:
    begin, end = markers(preset)
    write_marked(path, begin, end, body, lambda block: INTRO + block + TRIED,
                 after=None if preset == "1b" else END)
    log(f"wrote {path} ({preset_label(preset)} part)")


# ----------------------------------------------------------------------------- depth mode (--depth)

DEPTH_BEGIN, DEPTH_END = "<!-- depth:begin -->", "<!-- depth:end -->"
CACHE_TYPES = ("f16", "q8_0", "q4_0")   # KV cache types: llama-bench's -ctk/-ctv, llamacpu bench's


def kv_args(engine: str, cache_type: str) -> list:
    """The KV-cache arguments of a depth run. llama.cpp: flash attention on (its quantized V
    cache needs it) and -ctk/-ctv; llamacpu bench: -ctk/-ctv, left out for f16 (its default)."""
    if engine == "llama":
        return ["-fa", "1", "-ctk", cache_type, "-ctv", cache_type]
    return [] if cache_type == "f16" else ["-ctk", cache_type, "-ctv", cache_type]


def thread_arg(threads) -> str:
    """-t of a depth run, most threads first: llama-bench fills the cache with its first
    test's threads (llamacpu bench with the most)."""
    return ",".join(map(str, sorted(threads, reverse=True)))


def run_depth(args, argv, out_path) -> int:
    """--depth: pp and tg at each depth and KV type, both engines, alternating; one process per
    (engine, KV type, depth) runs every thread count (llama-bench fills the cache once per depth
    and restores it for the other tests; llamacpu bench fills once and rewinds). The thread
    counts go most first: llama-bench fills with the first test's threads (llamacpu bench with
    the most), and its fill at 1 thread was half of a 16384-deep run's time."""
    depths = [int(x) for x in args.depth.split(",") if x.strip()]
    ctypes = [x.strip().lower() for x in args.cache_types.split(",") if x.strip()]
    threads = [int(x) for x in args.threads.split(",") if x.strip()]
    bad = [c for c in ctypes if c not in CACHE_TYPES]
    if bad or not ctypes or len(set(ctypes)) != len(ctypes):
        raise SystemExit(f"bench_vs_llamacpp: --cache-types: {args.cache_types!r} (each once, of "
                         f"{', '.join(CACHE_TYPES)})")
    if not depths or min(depths) < 1 or len(set(depths)) != len(depths):
        raise SystemExit(f"bench_vs_llamacpp: --depth: {args.depth!r} (depths >= 1, each once)")
    t_start = time.time()
    exe, flags, ggufs, ours = llamacpp_and_files(args.llama_bench, ["llama-bench", "llama-quantize"],
                                                 "llama-bench", ["q4_0"], ["q4_0"])
    config = json.loads((ensure_checkpoint("1b") / "config.json").read_text())
    if max(depths) + args.p + args.n > config["max_position_embeddings"]:
        raise SystemExit(f"bench_vs_llamacpp: --depth {max(depths)} + -p + -n exceeds the model's context of "
                         f"{config['max_position_embeddings']}")
    engines = [("llama", "llama.cpp"), ("ours", "llamacpu")]
    engine_before = engine_fingerprint()
    samples, foreign, walls, redone = {}, {}, {}, []
    meta = {}
    tlist = thread_arg(threads)
    for rep in range(args.runs):
        for cfg, (ct, d) in enumerate((ct, d) for ct in ctypes for d in depths):
            order = engines if (rep + cfg) % 2 == 0 else engines[::-1]
            for key, label in order:
                def once(key=key, label=label, ct=ct, d=d, rep=rep):
                    extra = ["-d", d, *kv_args(key, ct)]
                    r = (run_ours(ours["q4_0"], args.p, args.n, tlist, extra) if key == "ours"
                         else run_llama(exe, ggufs["q4_0"], args.p, args.n, tlist, extra))
                    log(f"run {rep + 1}/{args.runs} KV {ct} depth {d} {label}: "
                        + ", ".join(f"t={t} {test} {v:.2f} t/s" for (t, test), v in r["by_threads"].items())
                        + f" ({r['wall']:.0f} s, other jobs {r['foreign']:.2f} cores)")
                    return r

                r = run_undisturbed(once, args.quiet_wait, args.busy_threshold, args.redo,
                                    on_redo=lambda f, key=key, ct=ct, d=d: redone.append((key, ct, d, f)))
                meta[key] = r["meta"]
                for (t, test), v in r["by_threads"].items():
                    samples.setdefault((key, ct, d, t, test), []).append(v)
                    foreign.setdefault((key, ct, d, t, test), []).append(r["foreign"])
                walls.setdefault((key, ct, d), []).append(r["wall"])
    ctx = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
           "argv": " ".join(sys.argv[1:] if argv is None else argv),
           "elapsed_min": (time.time() - t_start) / 60, "cpu": cpu_info(), "git": git_describe(),
           "depths": depths, "ctypes": ctypes, "threads": threads, "p": args.p, "n": args.n, "reps": args.runs,
           "samples": samples, "foreign": foreign, "walls": walls, "redone": redone, "meta": meta,
           "llama_flags": flags, "engine_changed": engine_fingerprint() != engine_before,
           "busy_threshold": args.busy_threshold, "redo_max": args.redo}
    return publish(render_depth(ctx), out_path, "last-run-depth-quick.json" if args.quick else "last-run-depth.json",
                   {"samples": keyed(samples), "foreign_cores": keyed(foreign), "walls": keyed(walls),
                    "redone": redone, "meta": meta}, write_depth)


def render_depth(ctx: dict) -> str:
    """The --depth section of BENCHMARKS.md: ours, llama.cpp and the ratio per KV type, depth,
    threads and test (medians of the runs), then every run."""
    p, n = ctx["p"], ctx["n"]
    engines = [("llama", "llama.cpp"), ("ours", "llamacpu")]
    lm, om = ctx["meta"].get("llama", {}), ctx["meta"].get("ours", {})
    allf = [x for v in ctx["foreign"].values() for x in v]
    L = [f"### Long context: pp{p} and tg{n} after D tokens in the KV cache (Llama 3.2 1B config, Q4_0)", ""]
    L.append(f"Measured {ctx['date']} by `python tools/bench_vs_llamacpp.py {ctx['argv']}` "
             f"({ctx['elapsed_min']:.0f} min).")
    L.append("")
    L.append(f"- Machine: {machine_line(ctx['cpu'])}.")
    L.append(f"- Runs alternate between the engines (order flipped every configuration and run); medians of "
             f"{ctx['reps']} run(s). Before each run the tool waits for other jobs to use under "
             f"{ctx['busy_threshold']} cores and runs again a disturbed one (at most {ctx['redo_max']} times; "
             f"{len(ctx['redone'])} repeat(s) this time). CPU used by other jobs during the kept runs: median "
             f"{median(allf):.2f}, max {max(allf) if allf else float('nan'):.2f} cores.")
    L.append(f"- llama.cpp from llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (build {lm.get('build_number')}, "
             f"commit {lm.get('build_commit')}), `{ctx['llama_flags']}`: `llama-bench -m llamacpp-1b-q4_0.gguf "
             f"-p {p} -n {n} -t {thread_arg(ctx['threads'])} -d D -fa 1 -ctk T -ctv T -r 1 -o json`.")
    L.append(f"- llamacpu {om.get('version')} (git {ctx['git']}), kernels `{om.get('kernels')}`: `llamacpu bench "
             f"llamacpu-1b-q4_0.bin -p {p} -n {n} -t {thread_arg(ctx['threads'])} -d D [-ctk T -ctv T] "
             f"-r 1 --json` (no -ctk/-ctv for F16, its default)."
             + (" **Warning: the llamacpu extension was rebuilt during the runs. Run again.**"
                if ctx["engine_changed"] else ""))
    L.append(f"- Each process fills the cache once with D random tokens (untimed, with the most threads: "
             f"the thread counts go most first), then runs each thread "
             f"count's pp{p} (one batch at positions D..D+{p - 1}) and tg{n} ({n} single-token steps from "
             f"position D) after one warm-up; the context is D + {p} + {n}, as llama-bench sizes it. Both "
             f"engines run the same random-weight checkpoint, each converted to Q4_0 by its own tools.")
    L.append("")
    L.append("| KV type | depth | threads | test | llama.cpp t/s | llamacpu t/s | ratio |")
    L.append("|---|---:|---:|---|---:|---:|---:|")
    for ct in ctx["ctypes"]:
        for d in ctx["depths"]:
            for t in ctx["threads"]:
                for kind, k in (("pp", p), ("tg", n)):
                    test = f"{kind}{k} @ d{d}"
                    med = {e: median(ctx["samples"].get((e, ct, d, t, test), [])) for e, _ in engines}
                    L.append(f"| {ct.upper()} | {d} | {t} | {test} | {med['llama']:.2f} | {med['ours']:.2f} | "
                             f"**{med['ours'] / med['llama']:.2f}×** |")
    L.append("")
    L.append("Ratio = median llamacpu t/s / median llama.cpp t/s (above 1: llamacpu is faster).")
    L.append("")
    L.append("<details><summary>All runs: t/s (cores used by other jobs during the run), in run order"
             "</summary>")
    L.append("")
    L.append("| KV type | depth | threads | test | " + " | ".join(lab for _, lab in engines) + " |")
    L.append("|---|---:|---:|---|" + "---|" * len(engines))
    for ct in ctx["ctypes"]:
        for d in ctx["depths"]:
            for t in ctx["threads"]:
                for kind, k in (("pp", p), ("tg", n)):
                    test = f"{kind}{k} @ d{d}"
                    cells = [", ".join(f"{x:.2f} ({f:.2f})" for x, f in
                                       zip(ctx["samples"].get((e, ct, d, t, test), []),
                                           ctx["foreign"].get((e, ct, d, t, test), []))) for e, _ in engines]
                    L.append(f"| {ct.upper()} | {d} | {t} | {test} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("</details>")
    return "\n".join(L)


def write_depth(path: Path, body: str) -> None:
    """The --depth section: between its own markers, after the 3B part (or the 1B one)."""
    write_part(path, DEPTH_BEGIN, DEPTH_END, body, "depth", after=(markers("3b")[1], END),
               new_file=lambda block: INTRO + block + TRIED)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-p", type=int, default=512, help="prompt tokens (default 512)")
    ap.add_argument("-n", type=int, default=128, help="generated tokens (default 128)")
    ap.add_argument("-t", "--threads", default="1,2", help="thread counts (default 1,2)")
    ap.add_argument("-r", "--runs", type=int, default=3, help="alternating runs per engine (default 3)")
    ap.add_argument("--preset", default="1b", choices=PRESETS,
                    help="the checkpoint's config: the exact Llama 3.2 1B or 3B one (default 1b)")
    ap.add_argument("--types", default=None,
                    help=f"weight types, of {', '.join(OWN_TYPES + GGUF_TYPES)} (default "
                         f"{DEFAULT_TYPES['1b']} for 1b, {DEFAULT_TYPES['3b']} for 3b). "
                         f"{', '.join(OWN_TYPES)}: each engine converts the checkpoint; the others: "
                         f"llama-quantize's GGUF, imported by llamacpu")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: -p 64 -n 16 -r 1; prints the table, writes no file unless --out")
    ap.add_argument("--llama-bench", type=Path, help="use this llama-bench instead of building one")
    ap.add_argument("--llama-quantize", type=Path,
                    help="llama-quantize to use (default: next to llama-bench, or the build)")
    ap.add_argument("--avx2", action="store_true",
                    help="also build and run an AVX2-only llama.cpp (no AVX-512), the ISA of llamacpu's "
                         "x86 kernels")
    ap.add_argument("--convert-python", help="Python with torch for convert_hf_to_gguf.py "
                                             "(default: a venv in the cache with torch CPU)")
    ap.add_argument("--out", type=Path, default=None, help="file to write (default BENCHMARKS.md; "
                                                          "none with --quick)")
    ap.add_argument("--depth", default=None,
                    help="depth mode: comma-separated depths D (e.g. 4096,16384,32768); pp (-p) and tg (-n) "
                         "run after D untimed tokens in the KV cache (llama-bench -d D -fa 1), 1B Q4_0 only, "
                         "for each --cache-types; written between the depth:begin/end markers")
    ap.add_argument("--cache-types", default="f16",
                    help=f"depth mode: KV cache types, of {', '.join(CACHE_TYPES)} (default f16); both engines "
                         "get -ctk T -ctv T")
    add_quiet_args(ap)
    ap.add_argument("--build-only", action="store_true", help="build/fetch everything, run nothing")
    args = ap.parse_args(argv)
    if args.quick:
        args.p, args.n, args.runs = 64, 16, 1
        args.quiet_wait, args.redo = min(args.quiet_wait, 10), 0
    out_path = args.out if args.out is not None else (None if args.quick else REPO / "BENCHMARKS.md")
    if args.depth is not None:
        if args.preset != "1b" or args.types or args.avx2 or args.build_only:
            ap.error("--depth runs the 1B Q4_0 files only (no --preset 3b, --types, --avx2, --build-only)")
        return run_depth(args, argv, out_path)
    threads = [int(x) for x in args.threads.split(",") if x.strip()]
    types = [x.strip().lower() for x in (args.types or DEFAULT_TYPES[args.preset]).split(",") if x.strip()]
    if not threads or min(threads) < 1 or args.runs < 1 or args.p < 1 or args.n < 1:
        ap.error("need threads >= 1, -r >= 1, -p >= 1, -n >= 1")
    for t in types:
        if t not in OWN_TYPES + GGUF_TYPES:
            ap.error(f"--types: {t} ({', '.join(OWN_TYPES + GGUF_TYPES)})")
    if len(set(types)) != len(types):
        ap.error("--types: a type is given twice")
    t_start = time.time()

    # 1. llama.cpp
    engines = []
    bins = {}
    flags = {}
    if args.llama_bench:
        bins["llama"] = args.llama_bench.resolve()
        flags["llama"] = f"given: {args.llama_bench}"
        quantize = args.llama_quantize or args.llama_bench.parent / "llama-quantize"
    else:
        variant = native_variant()
        d = build_llamacpp(variant)
        bins["llama"] = d / "llama-bench"
        flags["llama"] = " ".join(CMAKE_FLAGS[variant] + COMMON_CMAKE_FLAGS)
        quantize = args.llama_quantize or d / "llama-quantize"
    engines.append(("llama", "llama.cpp"))
    if args.avx2:
        d = build_llamacpp("avx2")
        bins["llama_avx2"] = d / "llama-bench"
        flags["llama_avx2"] = " ".join(CMAKE_FLAGS["avx2"] + COMMON_CMAKE_FLAGS)
        engines.append(("llama_avx2", "llama.cpp AVX2"))
    engines.append(("ours", "llamacpu"))
    if not Path(quantize).exists():
        raise SystemExit(f"bench_vs_llamacpp: no llama-quantize at {quantize} (give --llama-quantize)")

    # 2-3. model files
    ck = ensure_checkpoint(args.preset)
    config = json.loads((ck / "config.json").read_text())
    conv_py = convert_python(args.convert_python)
    ggufs = ensure_llamacpp_files(ck, types, Path(quantize), conv_py, args.preset)
    ours = ensure_our_files(ck, types, ggufs, args.preset)
    files = {}
    for typ in types:
        for key, _ in engines:
            path = ours[typ] if key == "ours" else ggufs[typ]
            files[(key, typ)] = dict(tensor_table(path), name=path.name)
    identical = {}
    for typ in types:
        identical[typ] = identical_tensors(ours[typ], ggufs[typ])
        log(f"{typ}: {identical[typ][0]} / {identical[typ][1]} tensors of llama.cpp's file byte-identical "
            f"in llamacpu's ({made_by(typ, 'ours', args.preset)})")
        if typ in GGUF_TYPES and identical[typ][0] != identical[typ][1]:
            log(f"  WARNING: {typ}: the import should keep every tensor of the GGUF bit-exact")
    if args.build_only:
        for k, v in files.items():
            log(f"{k}: {v['name']} {fmt_mb(v['file_size'])}, {fmt_mb(v['bytes_per_token'])} per token")
        return 0
    recache([*ggufs.values(), *ours.values()])

    engine_before = engine_fingerprint()

    # 4. bandwidth: before every round of runs and after the last
    bw_samples = []

    # 5. runs
    samples = {}
    foreign = {}
    rss = {}
    loads = {}
    llama_meta = {}
    our_meta = {}
    redone = []
    for rep in range(args.runs):
        bw_samples.append(bandwidth(threads, args.quiet_wait, args.busy_threshold))
        for cfg, (typ, t) in enumerate((typ, t) for typ in types for t in threads):
            # the order flips from one configuration to the next and from one run to the next
            order = engines if (rep + cfg) % 2 == 0 else engines[::-1]
            for key, label in order:
                def once(key=key, label=label, typ=typ, t=t, rep=rep):
                    if key == "ours":
                        r = run_ours(ours[typ], args.p, args.n, t)
                    else:
                        r = run_llama(bins[key], ggufs[typ], args.p, args.n, t)
                    log(f"run {rep + 1}/{args.runs} {typ} t={t} {label}: "
                        + ", ".join(f"{k} {v:.2f} t/s" for k, v in r["ts"].items())
                        + f" ({r['wall']:.0f} s, peak RSS {fmt_mb(r['rss'])}, "
                          f"other jobs {r['foreign']:.2f} cores)")
                    return r

                r = run_undisturbed(once, args.quiet_wait, args.busy_threshold, args.redo,
                                    on_redo=lambda f, key=key, typ=typ, t=t: redone.append((key, typ, t, f)))
                if key == "ours":
                    loads.setdefault((typ, t), []).append(r["load_s"])
                    our_meta = r["meta"]
                else:
                    llama_meta[key] = r["meta"]
                for test, v in r["ts"].items():
                    samples.setdefault((key, typ, t, test), []).append(v)
                    foreign.setdefault((key, typ, t, test), []).append(r["foreign"])
                rss.setdefault((key, typ, t), []).append(r["rss"])

    # bandwidth after
    bw_samples.append(bandwidth(threads, args.quiet_wait, args.busy_threshold))
    # the median sample: one outlier (54 against 33 GB/s at 2 threads in one run) would set the
    # bound by itself; every sample is in the report
    bw_used = {t: median([b[t]["best_gbs"] for b in bw_samples]) for t in threads}

    ctx = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "argv": " ".join(sys.argv[1:] if argv is None else argv),
        "elapsed_min": (time.time() - t_start) / 60,
        "cpu": cpu_info(), "engines": engines, "types": types, "threads": threads, "p": args.p, "n": args.n,
        "reps": args.runs, "preset": args.preset, "config": config, "identical": identical,
        "samples": samples, "rss": rss, "loads": loads, "files": files,
        "bw_samples": bw_samples, "bw_used": bw_used, "llama_meta": llama_meta,
        "our_meta": our_meta, "llama_flags": flags, "git": git_describe(),
        "engine_changed": engine_fingerprint() != engine_before,
        "foreign": foreign, "redone": redone, "busy_threshold": args.busy_threshold, "redo_max": args.redo,
    }
    body = render(ctx)
    print(body)
    raw = BENCH_DIR / (("last-run-quick" if args.quick else "last-run")
                       + ("" if args.preset == "1b" else f"-{args.preset}") + ".json")
    raw.write_text(json.dumps({
        "samples": {"|".join(map(str, k)): v for k, v in samples.items()},
        "foreign_cores": {"|".join(map(str, k)): v for k, v in foreign.items()},
        "redone": redone,
        "rss": {"|".join(map(str, k)): v for k, v in rss.items()},
        "loads": {"|".join(map(str, k)): v for k, v in loads.items()},
        "bw_samples": bw_samples,
        "files": {"|".join(k): v for k, v in files.items()},
        "preset": args.preset, "identical": identical,
        "llama_meta": llama_meta, "our_meta": our_meta,
    }, indent=1, default=str))
    log(f"raw results: {raw}")
    if out_path is not None:
        write_benchmarks(out_path, body, args.preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
