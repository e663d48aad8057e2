"""The C kernel driver (tests/c/test_kernels.c): every SIMD table against the
scalar reference, natively and, for NEON / NEON-dotprod, under qemu-aarch64. The
thread pool's stress driver (tests/c/test_threads.c): natively, under ThreadSanitizer
and under qemu-aarch64 (a weaker memory model than x86's).

The aarch64 run needs Debian's gcc-aarch64-linux-gnu and qemu-user; .ci/run
installs them and sets LLAMACPU_REQUIRE_QEMU=1, so there it fails instead of skipping.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# compiling and running the C driver (native, qemu, TSan) takes a minute; the fast lane
# checks the kernels through the binding (test_kernels.py, test_attention.py)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
DRIVER = ROOT / "tests" / "c" / "test_kernels.c"
FLAGS = ["-O2", "-std=c11", "-ffp-contract=off", "-Wall", "-Werror", f"-I{CSRC}"]


def build_and_run(cc, sources, out, runner=()):
    subprocess.run([cc, *FLAGS, str(DRIVER), *map(str, sources), "-lm", "-o", str(out)], check=True,
                   capture_output=True, text=True)
    r = subprocess.run([*runner, str(out)], capture_output=True, text=True, timeout=600)
    print(r.stdout)
    return r


def summary(stdout):
    m = re.search(r"(\d+) passed, (\d+) failed", stdout)
    assert m, stdout
    return int(m.group(1)), int(m.group(2))


def test_native_kernels(tmp_path):
    import platform
    srcs = [CSRC / "kernels_scalar.c", CSRC / "dispatch.c"]
    if platform.machine() in ("x86_64", "AMD64"):
        srcs += [CSRC / "kernels_avx2.c", CSRC / "kernels_avx512vnni.c"]
    if platform.machine() in ("aarch64", "arm64"):
        srcs += [CSRC / "kernels_neon.c", CSRC / "kernels_neon_dotprod.c"]
    r = build_and_run(shutil.which("cc") or "gcc", srcs, tmp_path / "tk")
    passed, failed = summary(r.stdout)
    assert r.returncode == 0 and failed == 0 and passed > 500


@pytest.mark.parametrize("cpu,tables", [("max", ("neon", "neon-dotprod")), ("cortex-a53", ("neon",))])
def test_aarch64_kernels_under_qemu(tmp_path, cpu, tables):
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not (cc and qemu):
        if os.environ.get("LLAMACPU_REQUIRE_QEMU") == "1":
            pytest.fail("aarch64-linux-gnu-gcc and qemu-aarch64 are required (LLAMACPU_REQUIRE_QEMU=1)")
        pytest.skip("no aarch64 cross compiler / qemu-aarch64 (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    srcs = [CSRC / "kernels_scalar.c", CSRC / "dispatch.c", CSRC / "kernels_neon.c", CSRC / "kernels_neon_dotprod.c"]
    r = build_and_run(cc, srcs, tmp_path / "tk_arm", runner=(qemu, "-L", "/usr/aarch64-linux-gnu", "-cpu", cpu))
    passed, failed = summary(r.stdout)
    assert r.returncode == 0 and failed == 0
    for t in tables:
        assert f"kernels {t}\n" in r.stdout  # the table really ran
    if "neon-dotprod" not in tables:
        assert "kernels neon-dotprod: not available here" in r.stdout  # runtime dispatch saw no dotprod


THREADS_DRIVER = ROOT / "tests" / "c" / "test_threads.c"


def run_threads_driver(cc, out, extra=(), runner=(), calls=20000):
    subprocess.run([cc, *FLAGS, *extra, "-pthread", str(THREADS_DRIVER), str(CSRC / "threads.c"), "-o", str(out)],
                   check=True, capture_output=True, text=True)
    r = subprocess.run([*runner, str(out), str(calls)], capture_output=True, text=True, timeout=600)
    print(r.stdout, r.stderr)
    passed, failed = summary(r.stdout)
    assert r.returncode == 0 and failed == 0 and passed == 5, r.stderr


def test_thread_pool(tmp_path):
    run_threads_driver(shutil.which("cc") or "gcc", tmp_path / "tt")


def test_thread_pool_under_tsan(tmp_path):
    """ThreadSanitizer sees no data race in the pool's job hand-over (fewer calls: TSan is slow)."""
    cc = shutil.which("cc") or "gcc"
    probe = subprocess.run([cc, "-fsanitize=thread", "-x", "c", "-", "-o", str(tmp_path / "probe")],
                           input="int main(void){return 0;}", capture_output=True, text=True)
    if probe.returncode != 0 or subprocess.run([str(tmp_path / "probe")]).returncode != 0:
        pytest.skip(f"{cc} cannot build or run -fsanitize=thread programs here")
    run_threads_driver(cc, tmp_path / "tt_tsan", extra=("-fsanitize=thread", "-g"), calls=2000)


def test_thread_pool_under_qemu(tmp_path):
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not (cc and qemu):
        if os.environ.get("LLAMACPU_REQUIRE_QEMU") == "1":
            pytest.fail("aarch64-linux-gnu-gcc and qemu-aarch64 are required (LLAMACPU_REQUIRE_QEMU=1)")
        pytest.skip("no aarch64 cross compiler / qemu-aarch64 (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    run_threads_driver(cc, tmp_path / "tt_arm", runner=(qemu, "-L", "/usr/aarch64-linux-gnu"), calls=3000)
