"""Build of llamacpu's C core (Cython + plain C, no cmake).

Environment switches:
  DEBUG=1                    -O0 -g
  LLAMACPU_SANITIZE=address,undefined   build with those sanitizers (any -fsanitize= list);
                             every report is fatal (-fno-sanitize-recover=all). Running it
                             needs the ASan runtime first: LD_PRELOAD=$(cc -print-file-name=libasan.so)
                             ASAN_OPTIONS=detect_leaks=0 (README.md, "Sanitizers")
"""
import os
import platform
import sys

import numpy
from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # pragma: no cover - pyproject's build-system lists Cython
    sys.exit("llamacpu needs Cython to build: pip install cython")


machine = platform.machine().lower()
is_x86 = machine in ("x86_64", "amd64", "i686", "x86")
is_arm64 = machine in ("aarch64", "arm64")

sources = ["llamacpu/_core.pyx", "csrc/kernels_scalar.c", "csrc/quants_ref.c", "csrc/dispatch.c", "csrc/forward.c",
           "csrc/threads.c", "csrc/attention.c"]
# each SIMD table: a tiny .c that includes its ISA's .inc with its own flavour macro; compiled
# with in-file target pragmas, chosen at run time (dispatch.c)
if is_x86:
    sources += ["csrc/kernels_avx2.c", "csrc/kernels_avx512vnni.c"]
if is_arm64:
    sources += ["csrc/kernels_neon.c", "csrc/kernels_neon_dotprod.c"]

cflags = ["-std=c11", "-ffp-contract=off", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function"]
ldflags = []
if os.name != "nt":
    cflags.append("-pthread")
    ldflags.append("-pthread")
san = os.environ.get("LLAMACPU_SANITIZE")
if os.environ.get("DEBUG") == "1":
    cflags += ["-O0", "-g"]
elif san:
    # -O1: the kernel files' unrolled tiles take GCC ~14 minutes to compile at -O3 with the
    # sanitizers (~1 at -O1, where the C kernel driver's sanitized build runs too)
    cflags += ["-O1"]
else:
    cflags += ["-O3"]
if san:
    if not all(part and part.replace("-", "").isalnum() for part in san.split(",")):
        sys.exit(f"LLAMACPU_SANITIZE={san!r}: give a comma-separated list such as address,undefined")
    # -fno-sanitize-recover: a UBSan report aborts (exit status != 0) instead of printing and going on
    cflags += [f"-fsanitize={san}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
    ldflags += [f"-fsanitize={san}"]

ext = Extension(
    "llamacpu._core",
    sources=sources,
    include_dirs=["csrc", numpy.get_include()],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    depends=[os.path.join("csrc", f) for f in os.listdir("csrc")] if os.path.isdir("csrc") else [],
)

setup(ext_modules=cythonize([ext], language_level=3, compiler_directives={"boundscheck": False, "wraparound": False}))
