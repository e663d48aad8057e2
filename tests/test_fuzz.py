"""Hostile files: the loader and the GGUF importer under tools/fuzz_loader.py.

Every mutated file must end in ModelFormatError or load and run; a crash (signal or
sanitizer exit), a hang or any other exception is a finding. The campaign here is the
CI-sized one (2,000 cases, seeds 0..1999); `python tools/fuzz_loader.py --n 100000`
runs the long one. The harness itself is tested too: it must notice a worker that
segfaults, aborts or hangs, and an exception that is not ModelFormatError.
"""
import os
import subprocess
import sys

import pytest

import fuzz_loader as fz
from llamacpu.convert import convert
from llamacpu.format import read_model
from llamacpu.gguf import GGUFFile
from llamacpu.model import Model

ROOT = fz.REPO
TOOL = str(ROOT / "tools" / "fuzz_loader.py")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return fz.build_bases(tmp_path_factory.mktemp("fuzz"))


def test_bases_are_valid_and_run(bases, tmp_path):
    """The starting points load and run, or every case would be a trivial rejection."""
    for name in fz.MODEL_BASES:
        with Model(bases / f"{name}.lcpu", n_ctx=8, n_threads=1) as m:
            assert m.forward([1, 2], pos=0).shape == (m.vocab_size,)
    with read_model(bases / "hf-q4_0.lcpu") as f:
        assert {t.layout for t in f.tensors.values() if len(t.shape) == 2} == {1}  # x8 everywhere
    with read_model(bases / "hf-untied-q8_0.lcpu") as f:
        assert "output.weight" in f.tensors
        assert f.tensors["tok_embeddings.weight"].layout == 0  # 261 rows: not a multiple of 8
    with read_model(bases / "gguf-source.lcpu") as f:
        assert "rope_freqs.weight" in f.tensors
        assert {t.type for t in f.tensors.values()} == {0, 1, 2, 3, 8}  # BF16 became F32
    gguf = pytest.importorskip("gguf")
    for name in fz.GGUF_BASES:
        p = bases / f"{name}.gguf"
        ours = GGUFFile(p)
        theirs = gguf.GGUFReader(str(p))  # llama.cpp's reader agrees the file is well formed
        assert [t.name for t in theirs.tensors] == list(ours.tensors)
        assert [int(t.tensor_type) for t in theirs.tensors] == [t.type for t in ours.tensors.values()]
        ours.close()
        out = convert(p, tmp_path / f"{name}.lcpu", progress=False, quiet=True)
        with Model(out, n_ctx=4, n_threads=1) as m:
            m.forward([0], pos=0)


@pytest.mark.slow
def test_fuzz_campaign_2000_cases():
    """2,000 mutated files (our format 70%, the small GGUFs 29%, the real SmolLM2 GGUF 1%):
    0 crashes, 0 hangs, 0 exceptions other than ModelFormatError."""
    s = fz.run_campaign(2000, seed=0, jobs=2, timeout=30, smol=0.01, progress=False)
    print(s.report())
    assert s.n == 2000
    assert not s.findings, s.report()
    c = s.counts
    # the mutations reach both answers: some files are harmless (load and run), most are refused
    assert c.get("model loaded", 0) > 150 and c.get("model rejected", 0) > 600, c
    assert c.get("gguf loaded", 0) > 30 and c.get("gguf rejected", 0) > 250, c
    assert c.get("smol rejected", 0) >= 5, c  # the real 100 MB GGUF, truncated or mutated
    assert s.distinct_rejections > 200  # many different checks fire, not one early one


@pytest.mark.slow
def test_harness_reports_crashes_hangs_and_other_exceptions():
    """The selftest hook makes chosen seeds segfault, abort, hang, raise KeyError, or take
    2 s (longer than the timeout: it must pass on the retry with 3 x the time)."""
    env = dict(os.environ, LLAMACPU_FUZZ_SELFTEST="crash:1,abort:2,hang:3,raise:4,slow:5")
    s = fz.run_campaign(8, seed=0, jobs=2, timeout=1.5, retry_factor=3, progress=False, env=env)
    kinds = {f["seed"]: (f["kind"], f["detail"]) for f in s.findings}
    assert sorted(kinds) == [1, 2, 3, 4], s.report()
    # (under ASan the runtime catches the signal and exits 1; faulthandler still names it)
    assert kinds[1][0] == "crash" and ("SIGSEGV" in kinds[1][1] or "Segmentation fault" in kinds[1][1])
    assert kinds[2][0] == "crash" and ("SIGABRT" in kinds[2][1] or "Aborted" in kinds[2][1])
    assert kinds[3][0] == "hang" and "second try" in kinds[3][1]
    assert kinds[4][0] == "error" and "KeyError" in kinds[4][1]
    assert s.counts["(timeouts retried)"] == 2  # the hang and the slow case
    assert s.n == 8 and s.restarts == 5  # the other cases ran, on restarted workers


def test_replay_explains_one_case(tmp_path):
    keep = tmp_path / "case.bin"
    r = subprocess.run([sys.executable, TOOL, "--replay", "7", "--keep", str(keep)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("seed 7: target ") and "outcome: " in r.stdout
    assert keep.stat().st_size > 0
    r2 = subprocess.run([sys.executable, TOOL, "--replay", "7", "--keep", str(tmp_path / "again.bin")],
                        capture_output=True, text=True, timeout=120)
    # a seed is one file and one list of mutations
    assert r2.stdout.split("outcome:")[0] == r.stdout.split("outcome:")[0]
    assert (tmp_path / "again.bin").read_bytes() == keep.read_bytes()
    env = dict(os.environ, LLAMACPU_FUZZ_SELFTEST="raise:7")
    r = subprocess.run([sys.executable, TOOL, "--replay", "7"], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode != 0
