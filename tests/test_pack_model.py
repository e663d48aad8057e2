"""tools/pack_model.py: a packed and unpacked model file keeps every byte outside the tensor
data, the size and the mtime, and each matrix is its first 16 rows repeated."""
import gzip
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import llamacpu
from llamacpu.format import read_model
from llamacpu.gguf import GGUFFile

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import pack_model  # noqa: E402


def round_trip(src: Path, tmp_path: Path) -> Path:
    packed, out = tmp_path / "packed", tmp_path / ("out" + src.suffix)
    pack_model.main(["pack", str(src), str(packed)])
    assert packed.stat().st_size < src.stat().st_size / 4
    pack_model.main(["unpack", str(packed), str(out)])
    assert out.stat().st_size == src.stat().st_size
    assert out.stat().st_mtime_ns == src.stat().st_mtime_ns
    return out


def check_bytes(src: Path, out: Path, tensors) -> int:
    """Outside the tensors: identical; a matrix: its first 16 rows over and over; anything
    else: identical. Returns how many tensors were repeated rows."""
    a = np.fromfile(src, np.uint8)
    b = np.fromfile(out, np.uint8)
    outside = np.ones(a.size, bool)
    repeated = 0
    for off, nb, shape in tensors:
        outside[off:off + nb] = False
        per = pack_model.period(nb, shape)
        want = np.tile(a[off:off + per], nb // per)
        np.testing.assert_array_equal(b[off:off + nb], want)
        repeated += per < nb
    np.testing.assert_array_equal(a[outside], b[outside])
    return repeated


def test_llamacpu_file_round_trip_loads_and_runs(converted, tmp_path):
    src = converted("tiny64", "q4_0")
    out = round_trip(src, tmp_path)
    with read_model(src) as m:
        tensors = [(t.offset, t.nbytes, tuple(t.shape)) for t in m.tensors.values()]
    assert check_bytes(src, out, tensors) > 0
    with llamacpu.Model(out, n_ctx=16, n_threads=1) as m:
        assert m.forward([1, 2, 3]).shape[-1] == 128256


def test_gguf_round_trip(smollm_gguf, tmp_path):
    out = round_trip(Path(smollm_gguf), tmp_path)
    with GGUFFile(smollm_gguf) as g:
        tensors = [(t.offset, t.nbytes, tuple(t.shape)) for t in g.tensors.values()]
        n = len(tensors)
    assert check_bytes(Path(smollm_gguf), out, tensors) == n - sum(len(s) == 1 for _, _, s in tensors)
    with GGUFFile(out) as g:   # parses: header, metadata and tensor directory are the original's
        assert len(g.tensors) == n


def test_unpack_refuses_other_files(tmp_path):
    bad = tmp_path / "bad"
    with gzip.open(bad, "wb") as f:
        f.write(b"not a packed model")
    with pytest.raises(SystemExit, match="not a file written by"):
        pack_model.main(["unpack", str(bad), str(tmp_path / "x")])
    assert not os.path.exists(tmp_path / "x")
