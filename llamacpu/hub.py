"""Models by Hugging Face name: the Hub side of `resolve_model` (model_cache.py).

    org/name          a repo of safetensors (config.json, *.safetensors, tokenizer.json),
                      or a GGUF repo holding a single .gguf file
    org/name:TAG      a GGUF repo and a quant tag: the .gguf file whose name ends in TAG
                      (`...-Q4_K_M.gguf`, `....Q4_1.gguf`), case-insensitive

`fetch(name)` returns the local file or folder: from the Hugging Face cache when it is
there (no network: local_files_only), else downloaded into that cache by huggingface_hub
with its own progress bar (gated and private repos use the user's token: HF_TOKEN or
`hf auth login`). huggingface_hub's errors become one ModelFetchError line that says what
to do. `snapshot_of(folder)` reads the cache's own layout (models--org--name/refs/main ->
snapshots/COMMIT), so such a folder works as a path too.

huggingface_hub is an extra (`pip install 'llamacpu[hub]'`): only names need it.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from .errors import ModelFetchError

# org/name[:TAG]; a name ending like a model file is a missing file, not a repo
_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*?)(?::(?P<tag>[\w.-]+))?$")
_FILE_SUFFIXES = (".gguf", ".bin", ".llamacpu", ".safetensors", ".json")
INSTALL = "pip install 'llamacpu[hub]'"


def parse_name(name) -> tuple[str, str | None] | None:
    """(repo_id, tag or None) when `name` reads as a Hub name, else None."""
    if not isinstance(name, str):
        return None
    m = _NAME.match(name)
    if not m or m["repo"].lower().endswith(_FILE_SUFFIXES):
        return None
    return m["repo"], m["tag"]


def _hf():
    try:
        import huggingface_hub
        import huggingface_hub.errors  # noqa: F401
        import huggingface_hub.utils  # noqa: F401
    except ImportError:
        raise ModelFetchError(f"model names from the Hugging Face Hub need huggingface_hub: "
                              f"{INSTALL}") from None
    return huggingface_hub


def hub_cache() -> Path | None:
    """huggingface_hub's cache folder (HF_HUB_CACHE, HF_HOME/hub, ...), None without it."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return Path(constants.HF_HUB_CACHE)


def repo_folder(repo: str) -> Path | None:
    c = hub_cache()
    return None if c is None else c / ("models--" + repo.replace("/", "--"))


def snapshot_of(folder: Path) -> tuple[Path, str] | None:
    """(snapshot folder, "org/name") for a folder in the cache's layout, else None."""
    if not folder.name.startswith("models--") or not (folder / "snapshots").is_dir():
        return None
    repo = folder.name[len("models--"):].replace("--", "/", 1)
    ref = folder / "refs" / "main"
    if ref.is_file():
        snap = folder / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap, repo
    snaps = [s for s in (folder / "snapshots").iterdir() if s.is_dir()]
    if len(snaps) != 1:
        raise ModelFetchError(f"{folder} has {len(snaps)} snapshots and no refs/main: "
                              f"name one of {folder / 'snapshots'}/*")
    return snaps[0], repo


def _stem(filename: str) -> str:
    """A GGUF file's name without .gguf and without a split part's -00001-of-00003."""
    return re.sub(r"-\d{5}-of-\d{5}$", "", Path(filename).name[:-len(".gguf")])


def file_tag(filename: str) -> str:
    """The quant tag of a GGUF file name: what follows its last '-' or '.'
    (`Llama-3.2-1B-Instruct-Q4_K_M.gguf`: Q4_K_M)."""
    return re.split(r"[-.]", _stem(filename))[-1]


def pick_gguf(files, repo: str, tag: str | None) -> str:
    """The one .gguf among `files` (repo paths) that `tag` names; ModelFetchError else."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf")
                   and "mmproj" not in Path(f).name.lower())
    if not ggufs:
        raise ModelFetchError(f"{repo} has no .gguf file" + ("" if tag else
                              " and no config.json with safetensors"))
    tags = sorted({file_tag(f) for f in ggufs}, key=str.lower)
    if tag is None:
        if len(ggufs) == 1:
            return ggufs[0]
        raise ModelFetchError(f"{repo} holds {len(ggufs)} GGUF files: name one with a tag, "
                              f"{repo}:TAG, TAG one of {', '.join(tags)}")
    hits = [f for f in ggufs if tag_matches(f, tag)]
    if not hits:
        raise ModelFetchError(f"{repo} has no GGUF file tagged {tag}; its tags: {', '.join(tags)}")
    if len({_stem(f) for f in hits}) > 1:
        raise ModelFetchError(f"{repo}:{tag} names {len(hits)} files ({', '.join(hits)}): give "
                              "more of the name as the tag (the part after the model's name)")
    if len(hits) > 1:
        raise ModelFetchError(f"{repo}:{tag} names {len(hits)} files ({', '.join(hits)}); "
                              "a GGUF split into parts is not supported: merge it with "
                              "llama-gguf-split --merge and run the file")
    return hits[0]


def tag_matches(filename: str, tag: str) -> bool:
    """Whether a GGUF file name ends in the tag (after a '-' or '.'), case-insensitive."""
    stem, t = _stem(filename).lower(), tag.lower()
    return stem.endswith(("-" + t, "." + t))


def is_complete_hf(folder: Path) -> bool:
    """A safetensors folder with everything the converter reads."""
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return bool(shards) and all((folder / s).is_file() for s in shards)
    return (folder / "model.safetensors").is_file()


HF_PATTERNS = ["*.json", "*.safetensors"]
HF_IGNORE = ["original/*"]  # Meta's own consolidated.pth copy


def fetch(name: str, quiet: bool = False) -> Path:
    """The local .gguf file or safetensors folder for a Hub `name` (see the module doc)."""
    repo, tag = parse_name(name)
    hf = _hf()
    with _errors(hf, name, repo):
        local = _from_cache(hf, repo, tag)
        if local is not None:
            return local
        with _progress(hf, quiet):
            # model_info, not list_repo_files: its paginated listing retries a refused
            # connection with backoff for 23 s, model_info fails at once
            files = [s.rfilename for s in hf.model_info(repo).siblings or []]
            if tag is None and "config.json" in files and any(f.endswith(".safetensors") for f in files):
                hf.hf_hub_download(repo, "config.json")  # a gated repo fails here, before a bar
                return Path(hf.snapshot_download(repo, allow_patterns=HF_PATTERNS,
                                                 ignore_patterns=HF_IGNORE))
            return Path(hf.hf_hub_download(repo, pick_gguf(files, repo, tag)))


def _from_cache(hf, repo: str, tag: str | None) -> Path | None:
    """The file or folder already in the Hugging Face cache, without the network."""
    try:
        snap = Path(hf.snapshot_download(repo, local_files_only=True))
    except hf.errors.LocalEntryNotFoundError:
        return None
    if tag is None and is_complete_hf(snap):
        return snap
    files = [p.relative_to(snap).as_posix() for p in snap.rglob("*.gguf")]
    try:
        return snap / pick_gguf(files, repo, tag)
    except ModelFetchError:
        return None  # not (all) here: ask the Hub


@contextlib.contextmanager
def _progress(hf, quiet: bool):
    if not quiet:
        yield
        return
    hf.utils.disable_progress_bars()
    try:
        yield
    finally:
        hf.utils.enable_progress_bars()


@contextlib.contextmanager
def _errors(hf, name: str, repo: str):
    """huggingface_hub's exceptions -> one ModelFetchError line saying what to do."""
    e = hf.errors
    url = f"https://huggingface.co/{repo}"
    try:
        yield
    except e.GatedRepoError as x:
        status = getattr(getattr(x, "response", None), "status_code", None)
        if status == 403:
            raise ModelFetchError(f"{repo} is gated and your Hugging Face token has no access "
                                  f"yet: accept its license at {url}, then retry") from None
        raise ModelFetchError(f"{repo} is gated: accept its license at {url}, then log in with "
                              "`hf auth login` (or set HF_TOKEN) and retry") from None
    except e.RepositoryNotFoundError:
        raise ModelFetchError(f"{name}: no such file here, and no repo {repo} on the Hugging "
                              "Face Hub (a private repo needs `hf auth login` or HF_TOKEN)") from None
    except e.RevisionNotFoundError:
        raise ModelFetchError(f"{repo} has no revision main") from None
    except e.OfflineModeIsEnabled:
        raise ModelFetchError(f"{name} is not in the Hugging Face cache and HF_HUB_OFFLINE is "
                              f"set: unset it and run `llamacpu pull {name}` with network") from None
    except e.LocalEntryNotFoundError:
        raise ModelFetchError(f"{name} is not in the Hugging Face cache and the Hub cannot be "
                              f"reached: run `llamacpu pull {name}` with network") from None
    except e.EntryNotFoundError as x:
        raise ModelFetchError(f"{repo}: a file is missing on the Hub ({x})") from None
    except e.HfHubHTTPError as x:
        status = getattr(getattr(x, "response", None), "status_code", "?")
        raise ModelFetchError(f"{name}: the Hugging Face Hub answered HTTP {status}; "
                              "retry later") from None
    except Exception as x:  # the HTTP client's connection errors and timeouts
        if type(x).__module__.split(".")[0].startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise ModelFetchError(f"{name} is not in the Hugging Face cache and the Hub cannot be "
                                  f"reached ({type(x).__name__}): run `llamacpu pull {name}` "
                                  "with network") from None
        raise
