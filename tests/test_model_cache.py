"""A GGUF where a model is expected (`llamacpu run X.gguf`, `Llama(X.gguf)`, bench,
perplexity): converted once into the cache, keyed by the file's identity, reconverted
when the file changes (llamacpu/model_cache.py)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import llamacpu
import llamacpu.convert
from llamacpu.errors import ModelFormatError
from llamacpu.format import read_model
from llamacpu.model_cache import resolve_model

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France?"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("LLAMACPU_CACHE", str(d))
    return d


def cached(cache) -> list:
    return sorted((cache / "gguf").glob("*.llamacpu")) if (cache / "gguf").exists() else []


def tiny_gguf(path: Path, seed: int) -> Path:
    """A small valid llama GGUF (tools/fuzz_loader.py's base: Q4_0/Q4_1/Q8_0/F16/BF16/F32)."""
    import fuzz_loader
    path.write_bytes(fuzz_loader.gguf_base(0, tie=True, seed=seed, rope_freqs=False, pre="smollm").serialize()[0])
    return path


def cli(*args, cache):
    env = dict(os.environ, LLAMACPU_CACHE=str(cache),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "llamacpu", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)


def no_conversion(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("converted again")
    monkeypatch.setattr(llamacpu.convert, "convert", boom)


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_run_gguf_converts_once_then_reuses(smollm_gguf, smollm_model, tmp_path):
    """The README's `llamacpu run FILE.gguf`: the same answer as the converted file, the
    conversion announced on stderr the first time only."""
    with llamacpu.Llama(smollm_model) as llm:
        want = llm.chat([{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0.0)
    want = want["choices"][0]["message"]["content"] + "\n"
    cache = tmp_path / "cache"
    r = cli("run", smollm_gguf, "-p", QUESTION, "-n", "16", "--temp", "0", cache=cache)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want
    assert "converting it once into the cache" in r.stderr and "Traceback" not in r.stderr
    [f] = cached(cache)
    before = f.stat()
    r = cli("run", smollm_gguf, "-p", QUESTION, "-n", "16", "--temp", "0", cache=cache)
    assert r.returncode == 0 and r.stdout == want
    assert r.stderr == ""
    assert cached(cache) == [f] and f.stat().st_mtime_ns == before.st_mtime_ns


@pytest.mark.slow
def test_llama_takes_a_gguf(smollm_gguf, smollm_model, cache, monkeypatch, tmp_path):
    # a private copy: other tests hard-link the shared asset, which changes its ctime (part
    # of the cache key) and would make the second Llama() below convert it again
    smollm_gguf = Path(shutil.copy(smollm_gguf, tmp_path / smollm_gguf.name))
    with llamacpu.Llama(smollm_model) as llm:
        want = "".join(llm.generate("The capital of France is", max_tokens=8, temperature=0))
    with llamacpu.Llama(smollm_gguf) as llm:
        assert "".join(llm.generate("The capital of France is", max_tokens=8, temperature=0)) == want
        assert llm.model_name == smollm_gguf.name
    [f] = cached(cache)
    no_conversion(monkeypatch)
    with llamacpu.Llama(str(smollm_gguf)) as llm:  # a str path too; no second conversion
        assert Path(llm.model.path) == f


def test_bench_and_perplexity_take_a_gguf(tmp_path):
    cache = tmp_path / "cache"
    g = tiny_gguf(tmp_path / "tiny.gguf", seed=3)
    r = cli("bench", g, "-p", "8", "-n", "2", "-r", "1", "--loads", "1", "-t", "1", "--json", cache=cache)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["engine"] == "llamacpu"  # the conversion's lines are on stderr
    assert "converting it once" in r.stderr
    text = tmp_path / "t.txt"
    text.write_text("the the them the then " * 40, encoding="utf-8")
    r = cli("perplexity", g, text, "-c", "16", "--chunks", "2", "-t", "1", "--json", cache=cache)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_chunks"] == 2
    assert "converting" not in r.stderr
    assert len(cached(cache)) == 1


# ----------------------------------------------------------------------------- the cache key

def test_a_changed_file_is_reconverted_and_the_old_conversion_removed(tmp_path, cache, monkeypatch):
    g = tiny_gguf(tmp_path / "m.gguf", seed=3)
    first = resolve_model(g, quiet=True)
    assert first.parent == cache / "gguf" and first.name.startswith("m-")
    with monkeypatch.context() as m:
        no_conversion(m)
        assert resolve_model(g, quiet=True) == first
        assert resolve_model(str(g), quiet=True) == first

    # other weights, the same size, and the old mtime put back: still a new conversion
    st = g.stat()
    new = tiny_gguf(tmp_path / "other.gguf", seed=4).read_bytes()
    assert len(new) == st.st_size
    g.write_bytes(new)
    os.utime(g, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = resolve_model(g, quiet=True)
    assert second != first and cached(cache) == [second]
    with read_model(second) as m:
        assert m.meta["provenance"]["source_sha256"] == hashlib.sha256(new).hexdigest()

    os.utime(g)  # touched: reconverted (identity, not contents)
    third = resolve_model(g, quiet=True)
    assert third != second and cached(cache) == [third]


def test_same_name_elsewhere_is_another_file(tmp_path, cache):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = resolve_model(tiny_gguf(tmp_path / "a" / "m.gguf", seed=3), quiet=True)
    b = resolve_model(tiny_gguf(tmp_path / "b" / "m.gguf", seed=4), quiet=True)
    assert a != b and cached(cache) == sorted([a, b])  # neither supersedes the other


def test_concurrent_starts_share_the_cache(tmp_path, cache):
    g = tiny_gguf(tmp_path / "m.gguf", seed=3)
    code = "import sys; from llamacpu.model_cache import resolve_model; print(resolve_model(sys.argv[1], quiet=True))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(g)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    [f] = cached(cache)
    assert {o[0].strip() for o in outs} == {str(f)}
    # no temporary file left: the conversion and its record (name and source, for `list`)
    assert sorted(p.name for p in f.parent.iterdir()) == [f.with_suffix(".json").name, f.name]
    with llamacpu.Model(f, n_ctx=16, n_threads=1) as m:
        assert m.forward([1, 2, 3]).shape == (m.vocab_size,)


def test_paths_that_are_not_ggufs_pass_through(tmp_path, converted, cache):
    model = converted("tiny64", "f32")
    assert resolve_model(model) is model
    assert resolve_model(str(tmp_path / "missing.bin")) == str(tmp_path / "missing.bin")
    assert not cache.exists()


# ----------------------------------------------------------------------------- errors

def test_a_gguf_we_cannot_run_is_one_clear_line(tmp_path, cache):
    from test_convert import write_gguf
    from gguf import GGMLQuantizationType as GQ
    k = write_gguf(tmp_path / "k.gguf", GQ.Q2_K)  # a type without kernels
    r = cli("run", k, "-p", "hi", cache=cache)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("llamacpu run: error: ")
    assert "Q2_K, which llamacpu cannot run" in r.stderr
    assert cached(cache) == [] and list((cache / "gguf").iterdir()) == []  # nothing half-written
    with pytest.raises(ModelFormatError, match="Q2_K, which llamacpu cannot run"):
        llamacpu.Llama(k)


def test_model_and_info_name_the_way_to_run_a_gguf(tmp_path, cache):
    g = tiny_gguf(tmp_path / "m.gguf", seed=3)
    with pytest.raises(ModelFormatError, match="a GGUF file.*llamacpu.Llama"):
        llamacpu.Model(g)
    r = cli("info", g, cache=cache)
    assert r.returncode == 2 and "GGUF" in r.stderr and "Traceback" not in r.stderr
    assert not cache.exists()  # Model and info never write into the cache


def test_a_symlinked_gguf_keeps_its_name(tmp_path, cache):
    """huggingface_hub's cache: snapshots/REV/NAME.gguf -> ../../blobs/SHA256. The model is
    named after the link, as the user typed it, not after the blob."""
    blob = tiny_gguf(tmp_path / "0123abcd", seed=3)
    (tmp_path / "snap").mkdir()
    link = tmp_path / "snap" / "Tiny-Q4_0.gguf"
    link.symlink_to(blob)
    out = resolve_model(link, quiet=True)
    assert out.name.startswith("Tiny-Q4_0-")
    with read_model(out) as m:
        assert m.meta["provenance"]["source"] == "Tiny-Q4_0.gguf"
