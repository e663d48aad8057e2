"""Tests of llamacpu.gguf (the validating GGUF reader).

The `gguf` package (llama.cpp's own reader/writer) is the test-only reference:
its GGUFReader is compared with ours on the real SmolLM2 file, its GGUFWriter makes
small valid files, and a hand-rolled byte builder below makes the broken ones.
"""

from __future__ import annotations

import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamacpu.errors import ModelFormatError
from llamacpu.gguf import GGML_BLOCK_SIZES, GGML_TYPE_NAMES, GGUFFile, ggml_nbytes

gguf = pytest.importorskip("gguf")

REPO = pathlib.Path(__file__).resolve().parent.parent
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol_path(assets) -> pathlib.Path:
    return assets[SMOL]  # conftest fetches it


# --------------------------------------------------------------------------------------
# a hand-rolled GGUF byte builder (independent of both readers)

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
        U64: "<Q", I64: "<q", F64: "<d"}


def enc_str(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def enc_value(vtype: int, value) -> bytes:
    if vtype in _FMT:
        return struct.pack(_FMT[vtype], value)
    if vtype == STR:
        return enc_str(value)
    if vtype == ARR:
        itype, items = value
        return struct.pack("<IQ", itype, len(items)) + b"".join(enc_value(itype, v) for v in items)
    return b""  # unknown type: no payload


def build_gguf(kvs=(), tensors=(), version=3, alignment=32, magic=b"GGUF",
               tensor_count=None, kv_count=None, data_pad=0) -> bytes:
    """kvs: (key, type, value); tensors: (name, dims innermost first, ggml type, offset, data).

    Tensor data are written at their offsets in the data section (zero fill between).
    """
    out = bytearray(magic + struct.pack("<I", version))
    out += struct.pack("<QQ", len(tensors) if tensor_count is None else tensor_count,
                       len(kvs) if kv_count is None else kv_count)
    for key, vtype, value in kvs:
        out += enc_str(key) + struct.pack("<I", vtype) + enc_value(vtype, value)
    for name, dims, ttype, offset, _ in tensors:
        out += enc_str(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ttype, offset)
    out += b"\0" * ((-len(out)) % alignment)
    data = bytearray()
    for _, _, _, offset, payload in tensors:
        if payload is None:
            continue
        if len(data) < offset + len(payload):
            data += b"\0" * (offset + len(payload) - len(data))
        data[offset:offset + len(payload)] = payload
    return bytes(out + data + b"\0" * data_pad)


def f32_tensor(name, n, offset):
    return (name, [n], 0, offset, np.arange(n, dtype="<f4").tobytes())


def _write(tmp_path, data: bytes, name="t.gguf") -> pathlib.Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _bad(tmp_path, data: bytes, match: str | None = None):
    p = _write(tmp_path, data)
    with pytest.raises(ModelFormatError, match=match):
        GGUFFile(p)


# --------------------------------------------------------------------------------------
# the real SmolLM2 file against gguf.GGUFReader

@pytest.mark.slow
def test_smollm2_matches_gguf_reader(smol_path):
    ref = gguf.GGUFReader(smol_path)
    with GGUFFile(smol_path) as g:
        assert g.version == 3
        assert g.alignment == 32
        ref_keys = [k for k in ref.fields if not k.startswith("GGUF.")]
        assert list(g.kv) == ref_keys
        for key in ref_keys:
            f = ref.fields[key]
            ours = g.kv[key]
            assert g.kv_types[key] == int(f.types[0]), key
            if f.types[0] == gguf.GGUFValueType.ARRAY:
                if f.types[-1] == gguf.GGUFValueType.STRING:
                    assert isinstance(ours, list) and ours == f.contents(), key
                else:
                    assert isinstance(ours, np.ndarray), key
                    ref_arr = np.concatenate([f.parts[i] for i in f.data]) if f.data else []
                    assert ours.dtype == np.asarray(ref_arr).dtype, key
                    np.testing.assert_array_equal(ours, ref_arr)
            else:
                want = f.contents()
                assert ours == want and type(ours) is type(want), key
        # tensors: same names (same order), types, shapes (ours outermost first), bytes
        assert list(g.tensors) == [t.name for t in ref.tensors]
        assert g.data_offset == ref.data_offset
        for rt in ref.tensors:
            t = g.tensors[rt.name]
            assert t.type == int(rt.tensor_type), rt.name
            assert t.shape == tuple(int(d) for d in reversed(rt.shape)), rt.name
            assert t.nbytes == int(rt.n_bytes) == t.data.size, rt.name
            assert t.offset == int(rt.data_offset), rt.name
            assert t.data.dtype == np.uint8 and not t.data.flags.writeable
            assert np.array_equal(t.data, np.asarray(rt.data).reshape(-1).view(np.uint8)), rt.name


def test_smollm2_contents(smol_path):
    """Facts about the asset the rest of the project relies on (see the final report)."""
    with GGUFFile(smol_path) as g:
        kv = g.kv
        assert kv["general.architecture"] == "llama"
        assert kv["llama.block_count"] == 30
        assert kv["llama.embedding_length"] == 576
        assert kv["llama.feed_forward_length"] == 1536
        assert kv["llama.attention.head_count"] == 9
        assert kv["llama.attention.head_count_kv"] == 3
        assert kv["llama.rope.freq_base"] == 100000.0
        assert kv["llama.vocab_size"] == 49152
        assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "smollm"
        assert len(g.tensors) == 272
        types = {}
        for t in g.tensors.values():
            types[t.type_name] = types.get(t.type_name, 0) + 1
        # token_embd is Q8_0 (not Q4_1), norms F32, everything else Q4_1; no output.weight (tied)
        assert types == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
        assert g.tensors["token_embd.weight"].type_name == "Q8_0"
        assert g.tensors["token_embd.weight"].shape == (49152, 576)
        assert g.tensors["blk.0.ffn_down.weight"].shape == (576, 1536)
        assert g.tensors["blk.0.attn_k.weight"].shape == (192, 576)
        assert "output.weight" not in g.tensors and "rope_freqs.weight" not in g.tensors


# --------------------------------------------------------------------------------------
# round trips through gguf.GGUFWriter

def _writer_file(path, alignment=None, tensors=None):
    w = gguf.GGUFWriter(str(path), arch="llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -32000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.str", "héllo wörld 😀")
    w.add_key_value("t.empty", "", gguf.GGUFValueType.STRING)  # add_string skips ""
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_f32", [0.5, -1.25])
    w.add_array("t.arr_str", ["a", "", "ü", "<|im_end|>"])
    w.add_array("t.arr_bool", [True, False, True])
    rng = np.random.default_rng(0)
    if tensors is None:
        tensors = [
            ("f32_1d", rng.standard_normal(7).astype(np.float32), None),
            ("f32_2d", rng.standard_normal((3, 5)).astype(np.float32), None),
            ("f16_3d", rng.standard_normal((2, 3, 4)).astype(np.float16), None),
            ("i32_4d", np.arange(2 * 3 * 4 * 5, dtype=np.int32).reshape(2, 3, 4, 5), None),
            ("q4_0", rng.integers(0, 256, (4, 2 * 18), dtype=np.uint8),
             gguf.GGMLQuantizationType.Q4_0),
            ("q4_1", rng.integers(0, 256, (3, 20), dtype=np.uint8), gguf.GGMLQuantizationType.Q4_1),
            ("q8_0", rng.integers(0, 256, (2, 3 * 34), dtype=np.uint8),
             gguf.GGMLQuantizationType.Q8_0),
            ("q6_k", rng.integers(0, 256, (2, 210), dtype=np.uint8), gguf.GGMLQuantizationType.Q6_K),
            ("bf16", rng.integers(0, 2**16, (2, 8), dtype=np.uint16).view(np.uint8),
             gguf.GGMLQuantizationType.BF16),
        ]
    for name, arr, raw in tensors:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.mark.parametrize("alignment", [None, 64, 1])
def test_writer_round_trip(tmp_path, alignment):
    p = tmp_path / "rt.gguf"
    tensors = _writer_file(p, alignment)
    with GGUFFile(p) as g:
        kv = g.kv
        assert g.version == 3
        assert g.alignment == (alignment or 32)
        assert kv["general.architecture"] == "llama"
        assert kv["t.u8"] == 250 and kv["t.i8"] == -7
        assert kv["t.u16"] == 65000 and kv["t.i16"] == -32000
        assert kv["t.u32"] == 4_000_000_000 and kv["t.i32"] == -2_000_000_000
        assert kv["t.f32"] == float(np.float32(0.1))
        assert kv["t.u64"] == 2**64 - 1 and kv["t.i64"] == -(2**63)
        assert kv["t.f64"] == 1e-300
        assert kv["t.true"] is True and kv["t.false"] is False
        assert kv["t.str"] == "héllo wörld 😀" and kv["t.empty"] == ""
        assert kv["t.arr_i32"].dtype == np.int32 and kv["t.arr_i32"].tolist() == [1, -2, 3]
        assert kv["t.arr_f32"].dtype == np.float32 and kv["t.arr_f32"].tolist() == [0.5, -1.25]
        assert kv["t.arr_str"] == ["a", "", "ü", "<|im_end|>"]
        assert kv["t.arr_bool"].dtype == np.bool_ and kv["t.arr_bool"].tolist() == [True, False, True]
        assert list(g.tensors) == [t[0] for t in tensors]
        for name, arr, raw in tensors:
            t = g.tensors[name]
            if raw is None:
                assert t.shape == arr.shape
                assert GGML_TYPE_NAMES[t.type] == {"float32": "F32", "float16": "F16",
                                                   "int32": "I32"}[arr.dtype.name]
            else:
                assert t.type == int(raw)
                blk, size = GGML_BLOCK_SIZES[t.type]
                assert t.shape == arr.shape[:-1] + (arr.shape[-1] // size * blk,)
            assert t.nbytes == ggml_nbytes(t.type, t.shape) == arr.nbytes
            assert t.offset % g.alignment == 0
            assert t.data.tobytes() == arr.tobytes()
        # closing keeps arrays handed out alive and usable
        kept = g.tensors["f32_2d"].data
    assert kept.view(np.float32).reshape(3, 5).tolist() == tensors[1][1].tolist()


def test_version_2_accepted_and_1_refused(tmp_path):
    p = tmp_path / "v.gguf"
    _writer_file(p)
    data = bytearray(p.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    p.write_bytes(bytes(data))
    with GGUFFile(p) as g:
        assert g.version == 2 and len(g.tensors) == 9
    data[4:8] = struct.pack("<I", 1)
    _bad(tmp_path, bytes(data), "version 1")
    data[4:8] = struct.pack("<I", 4)
    _bad(tmp_path, bytes(data), "version 4")
    data[4:8] = struct.pack(">I", 3)
    _bad(tmp_path, bytes(data), "big-endian")


def test_builder_matches_gguf_reader(tmp_path):
    """The hand-rolled builder writes what gguf.GGUFReader reads (so the corrupt-file
    tests below start from files that are valid)."""
    data = build_gguf(
        kvs=[("a", U32, 7), ("s", STR, "x"), ("arr", ARR, (STR, ["p", "q"])),
             ("nest", ARR, (ARR, [(I32, [1, 2]), (I32, [3])]))],
        tensors=[f32_tensor("w", 8, 0), ("q", [32, 2], 2, 64, bytes(range(36)))],
    )
    p = _write(tmp_path, data)
    ref = gguf.GGUFReader(p)
    assert [t.name for t in ref.tensors] == ["w", "q"]
    with GGUFFile(p) as g:
        assert g.kv["a"] == 7 and g.kv["s"] == "x" and g.kv["arr"] == ["p", "q"]
        assert [a.tolist() for a in g.kv["nest"]] == [[1, 2], [3]]
        assert g.tensors["q"].shape == (2, 32) and g.tensors["q"].nbytes == 36
        assert g.tensors["q"].data.tobytes() == bytes(range(36))
        assert g.tensors["w"].data.view(np.float32).tolist() == list(range(8))


def test_kv_only_file_and_empty_arrays(tmp_path):
    data = build_gguf(kvs=[("k", STR, "v"), ("e", ARR, (U32, [])), ("es", ARR, (STR, []))])
    with GGUFFile(_write(tmp_path, data)) as g:
        assert g.kv["k"] == "v" and g.tensors == {}
        assert g.kv["e"].dtype == np.uint32 and g.kv["e"].size == 0 and g.kv["es"] == []


# --------------------------------------------------------------------------------------
# corrupt files

def test_truncated_at_every_length(tmp_path):
    full = build_gguf(
        kvs=[("general.architecture", STR, "llama"), ("n", U32, 3),
             ("arr", ARR, (STR, ["ab", "c"])), ("f", ARR, (F32, [1.0, 2.0]))],
        tensors=[f32_tensor("a", 8, 0), ("b", [32], 8, 32, bytes(34)), f32_tensor("c", 3, 96)],
    )
    needed = len(full)  # the last tensor ends exactly at the end of the file
    with GGUFFile(_write(tmp_path, full)) as g:
        assert g.data_offset + 96 + 12 == needed
    p = tmp_path / "trunc.gguf"
    for n in range(needed):
        p.write_bytes(full[:n])
        with pytest.raises(ModelFormatError):
            GGUFFile(p)


@pytest.mark.slow
def test_truncated_real_file_prefixes(tmp_path, smol_path):
    with GGUFFile(smol_path) as g:
        data_offset = g.data_offset
    with open(smol_path, "rb") as f:
        head = f.read(data_offset + 4096)
    p = tmp_path / "trunc.gguf"
    rng = np.random.default_rng(1)
    lengths = sorted(set(list(range(0, 64)) + rng.integers(0, len(head), 60).tolist()
                         + [data_offset - 1, data_offset, data_offset + 100]))
    for n in lengths:
        p.write_bytes(head[:n])
        with pytest.raises(ModelFormatError):
            GGUFFile(p)


def test_empty_and_tiny_files(tmp_path):
    _bad(tmp_path, b"", "truncated")
    _bad(tmp_path, b"GGUF", "truncated")
    _bad(tmp_path, b"GGML", "magic")
    _bad(tmp_path, b"\0" * 100, "magic")


def test_wrong_magic(tmp_path):
    _bad(tmp_path, build_gguf(kvs=[("k", U8, 1)], magic=b"GGML"), "magic")


@pytest.mark.parametrize("field", ["tensor_count", "kv_count"])
@pytest.mark.parametrize("count", [2**64 - 1, 2**63, 2**40, 10_000])
def test_huge_counts(tmp_path, field, count):
    data = build_gguf(kvs=[("k", U8, 1)], tensors=[f32_tensor("a", 4, 0)], **{field: count})
    _bad(tmp_path, data, field)


def test_huge_string_lengths(tmp_path):
    base = build_gguf(kvs=[("key", STR, "value")])
    # key length, then value length
    for pos in (24, 24 + 8 + 3 + 4):
        for n in (2**64 - 1, 2**63, 10**12, 1000):
            data = bytearray(base)
            data[pos:pos + 8] = struct.pack("<Q", n)
            _bad(tmp_path, bytes(data), "truncated")


def test_huge_array_counts(tmp_path):
    for itype in (U8, F64, STR, ARR):
        data = bytearray(build_gguf(kvs=[("arr", ARR, (itype, []))]))
        pos = 24 + 8 + 3 + 4 + 4  # header, key, value type, item type
        data[pos:pos + 8] = struct.pack("<Q", 2**64 - 1)
        _bad(tmp_path, bytes(data), "does not fit")
    # an array of arrays is bounded as a count too
    items = [(U8, [])] * 70_000
    _bad(tmp_path, build_gguf(kvs=[("arr", ARR, (ARR, items))]), "arrays")


def test_array_nesting_bounded(tmp_path):
    v = (U8, [1])
    for _ in range(3):
        v = (ARR, [v])
    ok = build_gguf(kvs=[("deep", ARR, v[1][0])])  # 3 levels: accepted
    with GGUFFile(_write(tmp_path, ok)) as g:
        assert g.kv["deep"][0][0].tolist() == [1]
    _bad(tmp_path, build_gguf(kvs=[("deep", ARR, v)]), "nested")


def test_unknown_types(tmp_path):
    _bad(tmp_path, build_gguf(kvs=[("k", 13, None)]), "unknown metadata value type 13")
    _bad(tmp_path, build_gguf(kvs=[("k", 2**32 - 1, None)]), "unknown metadata value type")
    _bad(tmp_path, build_gguf(kvs=[("k", ARR, (42, []))]), "unknown array item type 42")
    for t in (4, 5, 31, 1000):
        _bad(tmp_path, build_gguf(tensors=[("w", [32], t, 0, bytes(4096))]),
             f"unknown GGML type {t}")


def test_bool_values(tmp_path):
    _bad(tmp_path, build_gguf(kvs=[("b", BOOL, 2)]), "bool")
    _bad(tmp_path, build_gguf(kvs=[("b", ARR, (BOOL, [1, 0, 7]))]), "bool")


def test_duplicates(tmp_path):
    _bad(tmp_path, build_gguf(kvs=[("k", U8, 1), ("k", U8, 2)]), "duplicate metadata key")
    _bad(tmp_path, build_gguf(tensors=[f32_tensor("w", 8, 0), f32_tensor("w", 8, 32)]),
         "duplicate tensor name")


def test_bad_utf8(tmp_path):
    _bad(tmp_path, build_gguf(kvs=[(b"k\xff", U8, 1)]), "UTF-8")
    _bad(tmp_path, build_gguf(kvs=[("k", STR, b"\xc3")]), "UTF-8")
    _bad(tmp_path, build_gguf(kvs=[("k", ARR, (STR, ["ok", b"\xed\xa0\x80"]))]), "UTF-8")
    _bad(tmp_path, build_gguf(tensors=[(b"w\x80", [4], 0, 0, bytes(16))]), "UTF-8")


def test_bad_dims(tmp_path):
    _bad(tmp_path, build_gguf(tensors=[("w", [], 0, 0, bytes(32))]), "n_dims 0")
    _bad(tmp_path, build_gguf(tensors=[("w", [1] * 5, 0, 0, bytes(32))]), "n_dims 5")
    _bad(tmp_path, build_gguf(tensors=[("w", [4, 0], 0, 0, bytes(32))]), "dimension 0")
    _bad(tmp_path, build_gguf(tensors=[("w", [2**40, 2**40], 0, 0, bytes(32))]), "overflow")
    _bad(tmp_path, build_gguf(tensors=[("w", [2**32, 2**20], 0, 0, bytes(32))]), "out of")
    _bad(tmp_path, build_gguf(tensors=[("w", [48, 2], 2, 0, bytes(256))]), "multiple of")
    _bad(tmp_path, build_gguf(tensors=[("w", [128, 2], 12, 0, bytes(512))]), "block size 256")
    # n_dims far beyond the file, before any dims are read
    data = bytearray(build_gguf(tensors=[("w", [4], 0, 0, bytes(16))]))
    pos = 24 + 8 + 1
    data[pos:pos + 4] = struct.pack("<I", 2**32 - 1)
    _bad(tmp_path, bytes(data), "n_dims")


def test_bad_offsets(tmp_path):
    _bad(tmp_path, build_gguf(tensors=[("w", [4], 0, 16, None)], data_pad=64), "multiple of the alignment")
    _bad(tmp_path, build_gguf(tensors=[("w", [4], 0, 64, None)], data_pad=64), "out of the data section")
    _bad(tmp_path, build_gguf(tensors=[("w", [4], 0, 2**64 - 32, None)], data_pad=64), "out of")
    _bad(tmp_path, build_gguf(tensors=[f32_tensor("a", 16, 0), f32_tensor("b", 4, 32)]), "overlap")
    # tensor data beyond the end (file truncated inside the data section)
    full = build_gguf(tensors=[f32_tensor("a", 64, 0)])
    _bad(tmp_path, full[:-1], "out of the data section")


def test_bad_alignment(tmp_path):
    for a in (0, 3, 48, 2**31):
        _bad(tmp_path, build_gguf(kvs=[("general.alignment", U32, a)]), "alignment")
    _bad(tmp_path, build_gguf(kvs=[("general.alignment", STR, "32")]), "alignment")
    ok = build_gguf(kvs=[("general.alignment", U32, 64)], tensors=[f32_tensor("a", 4, 64)],
                    alignment=64)
    with GGUFFile(_write(tmp_path, ok)) as g:
        assert g.alignment == 64 and g.data_offset % 64 == 0
        assert g.tensors["a"].data.view(np.float32).tolist() == [0, 1, 2, 3]


def test_ggml_nbytes():
    assert ggml_nbytes(0, (3, 5)) == 60
    assert ggml_nbytes(2, (4, 64)) == 4 * 2 * 18
    assert ggml_nbytes(3, (576, 1536)) == 576 * 48 * 20
    assert ggml_nbytes(14, (2, 512)) == 2 * 2 * 210
    with pytest.raises(ModelFormatError):
        ggml_nbytes(5, (32,))
    with pytest.raises(ModelFormatError):
        ggml_nbytes(8, (33,))
    with pytest.raises(ModelFormatError):
        ggml_nbytes(0, (0, 4))


def test_type_table_matches_gguf_package():
    """Our block table against gguf-py's. One known difference: gguf-py says Q8_1 is 40
    bytes, ggml's block_q8_1 (fp16 d, fp16 s, 32 int8) is 36."""
    brief = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
             6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
             10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
             13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
             24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
             28: ("F64", 1, 8), 30: ("BF16", 1, 2)}
    for t, (name, blk, size) in brief.items():
        assert GGML_TYPE_NAMES[t] == name and GGML_BLOCK_SIZES[t] == (blk, size)
    for t, (blk, size) in GGML_BLOCK_SIZES.items():
        q = gguf.GGMLQuantizationType(t)
        assert q.name == GGML_TYPE_NAMES[t]
        if t != 9:
            assert gguf.GGML_QUANT_SIZES[q] == (blk, size), q.name


# --------------------------------------------------------------------------------------
# fuzzing: random byte flips in the header / kv / tensor-info region

def _fuzz_base() -> tuple[bytes, int]:
    data = build_gguf(
        kvs=[("general.architecture", STR, "llama"), ("general.alignment", U32, 32),
             ("n", U64, 5), ("b", BOOL, 1), ("arr", ARR, (STR, ["ab", "c", "é"])),
             ("f", ARR, (F32, [1.0, 2.0])), ("nest", ARR, (ARR, [(I8, [1, 2])]))],
        tensors=[f32_tensor("a", 8, 0), ("b", [32, 2], 2, 32, bytes(72)),
                 ("c", [256], 12, 128, bytes(144))],
    )
    meta_end = len(data) - (128 + 144)
    return data, meta_end


_FUZZ_BASE, _FUZZ_META_END = _fuzz_base()


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, _FUZZ_META_END - 1), st.integers(0, 255)),
                      min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, len(_FUZZ_BASE))))
def test_fuzz_header_bytes(tmp_path, flips, cut):
    data = bytearray(_FUZZ_BASE)
    for pos, val in flips:
        data[pos] = val
    if cut is not None:
        data = data[:cut]
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(bytes(data))
    try:
        g = GGUFFile(p)
    except ModelFormatError:
        return
    with g:
        # whatever parsed is self-consistent
        for t in g.tensors.values():
            assert t.nbytes == ggml_nbytes(t.type, t.shape) == t.data.size
            assert g.data_offset <= t.offset and t.offset + t.nbytes <= len(data)


def test_fetch_assets_script_check_mode(smol_path):
    """The script verifies the assets (sha256) and exits 0."""
    r = subprocess.run([sys.executable, str(REPO / "tools" / "fetch_assets.py"), "--check",
                        "--dest", str(smol_path.parent), SMOL],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sha256 verified" in r.stdout
    r = subprocess.run([sys.executable, str(REPO / "tools" / "fetch_assets.py"), "--check",
                        "--dest", str(smol_path.parent / "no-such-dir")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "missing" in r.stderr


def test_close_is_safe(tmp_path):
    """Views handed out stay valid after close(): the mapping cannot be unmapped under them."""
    p = _write(tmp_path, build_gguf(tensors=[f32_tensor("a", 8, 0)]))
    g = GGUFFile(p)
    mm = g.mmap
    data = g.tensors["a"].data
    g.close()
    g.close()  # idempotent
    assert g.mmap is None
    with pytest.raises(BufferError):
        mm.close()
    assert data.view(np.float32).tolist() == list(range(8))
    with GGUFFile(p) as g2:
        pass
    assert g2.mmap is None and g2.tensors["a"].data is None
