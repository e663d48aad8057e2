"""The llamacpu model file: writer/reader round trip and the validating reader.

Every corruption must raise ModelFormatError (and nothing else).
"""

import copy
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamacpu import format as fmt
from llamacpu.errors import ModelFormatError
from llamacpu.format import F16, F32, Q4_0, Q4_1, Q8_0, ModelWriter, read_model

CONFIG = {
    "architecture": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "max_position_embeddings": 2048, "tie_word_embeddings": True, "rope_pairing": "adjacent",
}
META = {
    "format_version": 1,
    "config": CONFIG,
    "tokenizer": {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                  "added_tokens": []},
    "chat_template": "{{ messages }}",
    "generation": {"temperature": 0.6, "top_p": 0.9},
    "special_tokens": {"bos_token_id": 1, "eos_token_id": 2, "eog_token_ids": [2, 3],
                       "pad_token_id": None, "add_bos_token": True},
    "provenance": {"source_format": "hf", "source": "test", "source_sha256": "0" * 64,
                   "files": [], "converter": "llamacpu test", "type": "q4_0",
                   "tensor_types": {}},
}
# weight types cycle through everything, so the round trip covers each type
WEIGHT_TYPES = [Q4_0, Q4_1, Q8_0, F16, F32]


def tensor_list(config=CONFIG, rope_freqs=False, seed=0):
    """(name, type, shape, bytes) for a valid model of `config`."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (name, shape) in enumerate(fmt.expected_tensors(fmt.ModelConfig.from_dict(config)).items()):
        t = F32 if len(shape) == 1 else WEIGHT_TYPES[i % len(WEIGHT_TYPES)]
        n = fmt.tensor_nbytes(t, shape)
        out.append((name, t, shape, rng.integers(0, 256, n, dtype=np.uint8).tobytes()))
    if rope_freqs:
        hd = config["head_dim"]
        out.append(("rope_freqs.weight", F32, (hd // 2,),
                    np.linspace(1, 8, hd // 2, dtype=np.float32).tobytes()))
    return out


def write(path, meta=META, tensors=None, n_tensors=None):
    tensors = tensor_list(meta["config"]) if tensors is None else tensors
    with ModelWriter(path, meta, n_tensors=n_tensors) as w:
        for name, t, shape, data in tensors:
            w.add_tensor(name, t, shape, data)
    return path


def header(raw: bytes) -> dict:
    names = ("magic", "version", "header_size", "meta_offset", "meta_size", "dir_offset",
             "n_tensors", "data_offset", "file_size")
    return dict(zip(names, struct.unpack_from("<8sIIQQQQQQ", raw, 0)))


@pytest.fixture
def valid(tmp_path):
    p = write(tmp_path / "m.lcpu")
    return p, p.read_bytes()


def expect_error(path, raw, match=None):
    path.write_bytes(raw)
    with pytest.raises(ModelFormatError, match=match):
        read_model(path)


def patched(raw: bytes, offset: int, fmt_: str, *values) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt_, b, offset, *values)
    return bytes(b)


def entry_offset(raw: bytes, i: int) -> int:
    return header(raw)["dir_offset"] + 128 * i


# ----------------------------------------------------------------------------- basics

def test_constants():
    assert fmt.MAGIC == b"LLAMACPU" and fmt.FORMAT_VERSION == 1
    assert (fmt.F32, fmt.F16, fmt.Q4_0, fmt.Q4_1, fmt.Q8_0, fmt.Q6_0) == (0, 1, 2, 3, 8, 100)
    assert fmt.TYPE_NAMES == {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
                              12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 20: "IQ4_NL", 23: "IQ4_XS", 100: "Q6_0"}
    # ids, names and block sizes are GGUF's (the `gguf` package, maintained with llama.cpp)
    gguf = pytest.importorskip("gguf")
    for tid, t in fmt.TYPES.items():
        if tid != fmt.Q6_0:
            gt = gguf.GGMLQuantizationType(tid)
            assert gt.name == t.name and gguf.GGML_QUANT_SIZES[gt] == (t.block_elems, t.block_bytes)
    assert fmt.row_bytes(fmt.Q4_K, 512) == 288 and fmt.row_bytes(fmt.Q6_K, 256) == 210
    assert fmt.row_bytes(fmt.Q6_0, 64) == 52
    assert fmt.row_bytes(F32, 7) == 28 and fmt.row_bytes(F16, 7) == 14
    assert fmt.row_bytes(Q4_0, 64) == 36 and fmt.row_bytes(Q4_1, 64) == 40
    assert fmt.row_bytes(Q8_0, 2048) == 64 * 34
    assert fmt.tensor_nbytes(Q8_0, (3, 64)) == 3 * 68
    assert fmt.tensor_nbytes(F32, (5,)) == 20
    with pytest.raises(ModelFormatError):
        fmt.row_bytes(Q4_0, 48)
    with pytest.raises(ModelFormatError):
        fmt.row_bytes(5, 32)


def test_round_trip(tmp_path):
    tensors = tensor_list(rope_freqs=True)
    p = write(tmp_path / "m.lcpu", tensors=tensors)
    raw = p.read_bytes()
    h = header(raw)
    assert h["magic"] == b"LLAMACPU" and h["version"] == 1 and h["header_size"] == 64
    assert h["file_size"] == len(raw) and h["data_offset"] % 64 == 0 and h["dir_offset"] % 8 == 0
    assert h["n_tensors"] == len(tensors)
    assert h["meta_offset"] + h["meta_size"] == h["dir_offset"]  # padded with spaces
    with read_model(p) as m:
        assert m.meta == META
        assert m.config == fmt.ModelConfig(**CONFIG) and m.config.to_dict() == CONFIG
        assert list(m.tensors) == [t[0] for t in tensors]
        for name, t, shape, data in tensors:
            info = m.tensors[name]
            assert (info.name, info.type, info.shape) == (name, t, shape)
            assert info.offset % 64 == 0 and info.nbytes == len(data)
            a = m.array(name)
            assert not a.flags.writeable and not a.flags.owndata  # a view into the mmap
            if t == F32:
                assert a.dtype == np.float32 and a.shape == shape
            elif t == F16:
                assert a.dtype == np.uint16 and a.shape == shape
            else:
                assert a.dtype == np.uint8
                assert a.shape == (shape[0], fmt.row_bytes(t, shape[1]))
            assert a.tobytes() == data
        kept = m.array("norm.weight")
    # closing with a live view must not raise; the view stays valid
    assert kept.shape == (64,)


def test_writer_reserved_capacity_and_default(tmp_path):
    # default capacity is the config's maximum (9 * layers + 4); fewer tensors is fine
    p = write(tmp_path / "a.lcpu")
    with read_model(p) as m:
        assert len(m.tensors) == len(fmt.expected_tensors(fmt.ModelConfig(**CONFIG)))
    with pytest.raises(ValueError):
        write(tmp_path / "b.lcpu", n_tensors=3)


def test_writer_rejects_bad_input(tmp_path):
    with ModelWriter(tmp_path / "w.lcpu", META, n_tensors=4) as w:
        with pytest.raises(ValueError):
            w.add_tensor("x", F32, (4,), b"\0" * 15)  # too few bytes
        with pytest.raises(ValueError):
            w.add_tensor("x" * 64, F32, (1,), b"\0" * 4)  # name too long
        w.add_tensor("a", F32, (2,), [b"\0" * 4, np.zeros(1, np.float32)])  # chunks
        with pytest.raises(ValueError):
            w.add_tensor("a", F32, (1,), b"\0" * 4)  # duplicate


# ----------------------------------------------------------------------------- header

def test_truncated_at_many_lengths(valid, tmp_path):
    _, raw = valid
    h = header(raw)
    cuts = {0, 1, 7, 8, 63, 64, 65, h["dir_offset"] - 1, h["dir_offset"], h["dir_offset"] + 127,
            h["data_offset"] - 1, h["data_offset"], h["data_offset"] + 1, len(raw) - 1}
    cuts |= set(np.random.default_rng(1).integers(0, len(raw), 40).tolist())
    q = tmp_path / "cut.lcpu"
    for n in sorted(c for c in cuts if 0 <= c < len(raw)):
        expect_error(q, raw[:n])
    # also: truncated but with the header's file_size patched to match
    n = (h["data_offset"] + len(raw)) // 2
    expect_error(q, patched(raw[:n], 56, "<Q", n))


@pytest.mark.parametrize("offset,fmt_,value,match", [
    (0, "<8s", b"LLAMAGPU", "magic"),
    (0, "<4s", b"GGUF", "magic"),
    (8, "<I", 2, "version"),
    (8, "<I", 0, "version"),
    (12, "<I", 128, "header size"),
    (16, "<Q", 72, "meta_offset"),
    (24, "<Q", 1 << 40, "meta_size"),
    (24, "<Q", 0, "meta_size"),
    (32, "<Q", 1 << 50, "dir_offset"),
    (32, "<Q", 68, "dir_offset"),  # inside the metadata
    (40, "<Q", 1 << 60, "n_tensors"),
    (48, "<Q", 1 << 62, "data_offset"),
    (48, "<Q", 64, "data_offset"),
    (56, "<Q", 12345, "file"),
])
def test_bad_header_fields(valid, tmp_path, offset, fmt_, value, match):
    _, raw = valid
    expect_error(tmp_path / "x.lcpu", patched(raw, offset, fmt_, value), match)


def test_appended_bytes(valid, tmp_path):
    _, raw = valid
    expect_error(tmp_path / "x.lcpu", raw + b"\0" * 64, "file")


def test_misaligned_data_offset(valid, tmp_path):
    _, raw = valid
    h = header(raw)
    expect_error(tmp_path / "x.lcpu", patched(raw, 48, "<Q", h["data_offset"] - 8), "data_offset")


# ----------------------------------------------------------------------------- metadata

def write_meta(tmp_path, meta):
    return write(tmp_path / "meta.lcpu", meta=meta)


def test_bad_json_and_utf8(valid, tmp_path):
    _, raw = valid
    b = bytearray(raw)
    b[64] = ord("[")  # '{' -> '[': not JSON any more
    expect_error(tmp_path / "x.lcpu", bytes(b), "JSON")
    b = bytearray(raw)
    i = raw.index(b'"llama"', 64)
    b[i + 1] = 0xFF
    expect_error(tmp_path / "x.lcpu", bytes(b), "UTF-8")


def test_meta_not_an_object(tmp_path):
    raw = write(tmp_path / "a.lcpu").read_bytes()
    h = header(raw)
    text = b"[1, 2, 3]".ljust(h["meta_size"])
    b = bytearray(raw)
    b[64:64 + h["meta_size"]] = text
    expect_error(tmp_path / "x.lcpu", bytes(b), "object")


def test_deeply_nested_json(tmp_path):
    raw = write(tmp_path / "a.lcpu").read_bytes()
    h = header(raw)
    n = h["meta_size"]
    b = bytearray(raw)
    b[64:64 + n] = (b"[" * n)
    expect_error(tmp_path / "x.lcpu", bytes(b), "JSON")


def test_nan_in_config(tmp_path):
    raw = write(tmp_path / "a.lcpu").read_bytes()
    i = raw.index(b'"rms_norm_eps":1e-05')
    b = bytearray(raw)
    b[i + 15:i + 20] = b"NaN  "
    expect_error(tmp_path / "x.lcpu", bytes(b), "rms_norm_eps")


def _mutated(path, value):
    meta = copy.deepcopy(META)
    keys = path.split(".")
    d = meta
    for k in keys[:-1]:
        d = d[k]
    if value is KeyError:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value
    return meta


@pytest.mark.parametrize("path,value", [
    ("format_version", 2), ("format_version", True), ("config", KeyError),
    ("tokenizer", KeyError), ("tokenizer", "{}"), ("tokenizer", {"no": "model"}), ("tokenizer", "[1, 2]"),
    ("chat_template", 3), ("generation", []), ("special_tokens", None),
    ("provenance", "x"), ("special_tokens.bos_token_id", 96),
    ("special_tokens.eos_token_id", -1), ("special_tokens.eog_token_ids", 2),
    ("special_tokens.eog_token_ids", [2, None]), ("special_tokens.add_bos_token", 1),
    ("special_tokens.pad_token_id", "x"),
    ("config.architecture", "mistral"), ("config.vocab_size", 0),
    ("config.vocab_size", (1 << 24) + 1), ("config.vocab_size", 96.0),
    ("config.vocab_size", True), ("config.hidden_size", 1 << 17),
    ("config.num_hidden_layers", 1025), ("config.num_hidden_layers", 0),
    ("config.num_key_value_heads", 3), ("config.num_key_value_heads", 8),
    ("config.head_dim", 15), ("config.rms_norm_eps", 0), ("config.rms_norm_eps", "1e-5"),
    ("config.rope_theta", -1.0), ("config.rope_theta", 10 ** 400),
    ("config.max_position_embeddings", 0), ("config.tie_word_embeddings", 1),
    ("config.rope_pairing", "half"), ("config.rope_pairing", KeyError),
    ("config.rope_scaling", "llama3"), ("config.rope_scaling.rope_type", "yarn"),
    ("config.rope_scaling.factor", 0), ("config.rope_scaling.high_freq_factor", 0.5),
    ("config.rope_scaling.original_max_position_embeddings", 8192.5),
    ("config.rope_scaling.low_freq_factor", KeyError),
])
def test_bad_metadata(tmp_path, path, value):
    meta = _mutated(path, value)
    # the tensors follow CONFIG so that only the metadata is wrong
    p = write(tmp_path / "m.lcpu", meta=meta, tensors=tensor_list(), n_tensors=20)
    with pytest.raises(ModelFormatError):
        read_model(p)


def test_rope_scaling_null_ok(tmp_path):
    meta = _mutated("config.rope_scaling", None)
    with read_model(write(tmp_path / "m.lcpu", meta=meta)) as m:
        assert m.config.rope_scaling is None


# ----------------------------------------------------------------------------- directory

def test_offsets_past_the_end(valid, tmp_path):
    _, raw = valid
    e = entry_offset(raw, 1)
    expect_error(tmp_path / "x.lcpu", patched(raw, e + 104, "<Q", len(raw)), "past the end")
    expect_error(tmp_path / "x.lcpu", patched(raw, e + 104, "<Q", 1 << 63))


def test_overlapping_tensors(valid, tmp_path):
    _, raw = valid
    first = struct.unpack_from("<Q", raw, entry_offset(raw, 0) + 104)[0]
    expect_error(tmp_path / "x.lcpu", patched(raw, entry_offset(raw, 2) + 104, "<Q", first),
                 "overlap")


@pytest.mark.parametrize("field,fmt_,value,match", [
    (0, "<64s", b"tok_embeddings.weight\0junk", "NUL"),
    (0, "<64s", b"x" * 64, "NUL"),
    (0, "<64s", b"\0", "empty"),
    (0, "<64s", b"\xff\xfe", "UTF-8"),
    (64, "<I", 5, "type"),
    (64, "<I", 9, "type"),  # Q8_1: a GGUF type with no kernels
    (68, "<I", 3, "n_dims"),
    (68, "<I", 0, "n_dims"),
    (88, "<Q", 2, "unused"),
    (72, "<Q", 0, "shape"),
    (72, "<Q", 1 << 41, "shape"),
    (104, "<Q", 32, "multiple"),
    (112, "<Q", 17, "nbytes"),
    (120, "<I", 2, "layout"),
    (124, "<I", 7, "reserved"),
])
def test_bad_directory_entry(valid, tmp_path, field, fmt_, value, match):
    _, raw = valid
    expect_error(tmp_path / "x.lcpu", patched(raw, entry_offset(raw, 0) + field, fmt_, value),
                 match)


def test_x8_layout_only_where_allowed(valid, tmp_path):
    _, raw = valid
    # entry 1 is layers.0.attention_norm.weight, F32 1-D: layout 1 (x8) is not possible there
    assert raw[entry_offset(raw, 1):entry_offset(raw, 1) + 64].rstrip(b"\0") == b"layers.0.attention_norm.weight"
    expect_error(tmp_path / "x.lcpu", patched(raw, entry_offset(raw, 1) + 120, "<I", 1), "layout 1")
    # entry 0 (tok_embeddings, Q4_0, rows % 8 == 0) may carry it
    ok = tmp_path / "ok.lcpu"
    ok.write_bytes(patched(raw, entry_offset(raw, 0) + 120, "<I", 1))
    with read_model(ok) as m:
        assert m.tensors["tok_embeddings.weight"].layout == fmt.LAYOUT_X8


def test_q6_0_only_in_the_x8_layout(tmp_path):
    """Q6_0 has kernels for layout 1 only: the writer and the reader refuse it row-major."""
    tensors = tensor_list()
    name, _, shape, _ = tensors[0]  # tok_embeddings (rows % 8 == 0)
    q6 = [(name, fmt.Q6_0, shape, bytes(fmt.tensor_nbytes(fmt.Q6_0, shape)))] + tensors[1:]
    with pytest.raises(ValueError, match="layout 0 is not possible for Q6_0"):
        write(tmp_path / "w.lcpu", tensors=q6)
    ok = tmp_path / "ok.lcpu"
    with ModelWriter(ok, META) as w:
        for n, t, s, data in q6:
            w.add_tensor(n, t, s, data, layout=fmt.LAYOUT_X8 if t == fmt.Q6_0 else fmt.LAYOUT_ROW_MAJOR)
    raw = ok.read_bytes()
    with read_model(ok) as m:
        assert m.tensors[name].type_name == "Q6_0" and m.tensors[name].layout == fmt.LAYOUT_X8
    expect_error(tmp_path / "x.lcpu", patched(raw, entry_offset(raw, 0) + 120, "<I", 0), "Q6_0 must use layout 1")


def test_duplicate_names(valid, tmp_path):
    _, raw = valid
    name = raw[entry_offset(raw, 1):entry_offset(raw, 1) + 64]
    b = bytearray(raw)
    b[entry_offset(raw, 2):entry_offset(raw, 2) + 64] = name
    expect_error(tmp_path / "x.lcpu", bytes(b), "duplicate")


def test_nbytes_mismatch_with_consistent_shape(valid, tmp_path):
    _, raw = valid
    # tok_embeddings [96, 64]: claim 95 rows -> nbytes no longer matches
    expect_error(tmp_path / "x.lcpu", patched(raw, entry_offset(raw, 0) + 72, "<Q", 95),
                 "nbytes")


# ----------------------------------------------------------------------------- tensor set

def with_tensor(tensors, name, t=None, shape=None):
    out = []
    for n, tt, s, d in tensors:
        if n == name:
            tt = t if t is not None else tt
            s = shape if shape is not None else s
            d = bytes(fmt.tensor_nbytes(tt, s))
        out.append((n, tt, s, d))
    return out


def test_missing_tensor(tmp_path):
    tensors = [t for t in tensor_list() if t[0] != "layers.0.feed_forward.w2.weight"]
    with pytest.raises(ModelFormatError, match="feed_forward.w2.weight.*missing"):
        read_model(write(tmp_path / "m.lcpu", tensors=tensors))


def test_unknown_tensor(tmp_path):
    tensors = tensor_list() + [("layers.1.attention_norm.weight", F32, (64,), bytes(256))]
    with pytest.raises(ModelFormatError, match="unknown tensor"):
        read_model(write(tmp_path / "m.lcpu", tensors=tensors))
    tensors = tensor_list() + [("extra", F32, (64,), bytes(256))]
    with pytest.raises(ModelFormatError, match="unknown tensor"):
        read_model(write(tmp_path / "m.lcpu", tensors=tensors))


def test_shape_mismatch_with_config(tmp_path):
    tensors = with_tensor(tensor_list(), "layers.0.attention.wk.weight", shape=(64, 64))
    with pytest.raises(ModelFormatError, match="wk.weight.*shape"):
        read_model(write(tmp_path / "m.lcpu", tensors=tensors))
    tensors = with_tensor(tensor_list(), "norm.weight", shape=(1, 64))
    with pytest.raises(ModelFormatError, match="shape"):
        read_model(write(tmp_path / "m.lcpu", tensors=tensors))


def test_types_per_tensor(tmp_path):
    for name, t, match in [("norm.weight", F16, "F32"),
                           ("layers.0.ffn_norm.weight", Q8_0, "F32")]:
        tensors = with_tensor(tensor_list(), name, t=t)
        with pytest.raises(ModelFormatError, match=match):
            read_model(write(tmp_path / "m.lcpu", tensors=tensors))


def test_output_head_iff_untied(tmp_path):
    tensors = tensor_list() + [("output.weight", Q8_0, (96, 64), bytes(96 * 68))]
    with pytest.raises(ModelFormatError, match="tie_word_embeddings"):
        read_model(write(tmp_path / "m.lcpu", tensors=tensors))
    untied = _mutated("config.tie_word_embeddings", False)
    with pytest.raises(ModelFormatError, match="output.weight.*missing"):
        read_model(write(tmp_path / "m.lcpu", meta=untied, tensors=tensor_list()))
    with read_model(write(tmp_path / "m.lcpu", meta=untied, tensors=tensors)) as m:
        assert m.tensors["output.weight"].type == Q8_0


def test_rope_freqs(tmp_path):
    with read_model(write(tmp_path / "m.lcpu", tensors=tensor_list(rope_freqs=True))) as m:
        np.testing.assert_array_equal(m.array("rope_freqs.weight"),
                                      np.linspace(1, 8, 8, dtype=np.float32))
    for t, shape in [(F32, (16,)), (F16, (8,))]:
        tensors = tensor_list() + [("rope_freqs.weight", t, shape,
                                    bytes(fmt.tensor_nbytes(t, shape)))]
        with pytest.raises(ModelFormatError, match="rope_freqs"):
            read_model(write(tmp_path / "m.lcpu", tensors=tensors))


def test_quantized_needs_whole_blocks(tmp_path):
    cfg = dict(CONFIG, hidden_size=48, num_attention_heads=3, num_key_value_heads=1)
    meta = dict(META, config=cfg)
    tensors = [(n, F32 if len(s) == 1 else F16, s,
                bytes(fmt.tensor_nbytes(F32 if len(s) == 1 else F16, s)))
               for n, s in fmt.expected_tensors(fmt.ModelConfig.from_dict(cfg)).items()]
    write(tmp_path / "ok.lcpu", meta=meta, tensors=tensors)
    read_model(tmp_path / "ok.lcpu").close()
    # a Q8_0 tensor with 48 columns cannot exist: the reader refuses the entry
    raw = bytearray((tmp_path / "ok.lcpu").read_bytes())
    e = entry_offset(bytes(raw), 0)
    struct.pack_into("<I", raw, e + 64, Q8_0)
    struct.pack_into("<Q", raw, e + 112, 96 * 51)
    expect_error(tmp_path / "x.lcpu", bytes(raw), "cols")


def test_closed_model(tmp_path):
    m = read_model(write(tmp_path / "m.lcpu"))
    m.close()
    m.close()
    with pytest.raises(ValueError):
        m.array("norm.weight")


def test_not_a_model(tmp_path):
    p = tmp_path / "empty"
    p.write_bytes(b"")
    with pytest.raises(ModelFormatError):
        read_model(p)
    p.write_bytes(b"GGUF" + bytes(200))
    with pytest.raises(ModelFormatError, match="magic"):
        read_model(p)


# ----------------------------------------------------------------------------- fuzz

_FUZZ_CFG = dict(CONFIG, vocab_size=32, hidden_size=32, intermediate_size=32,
                 num_attention_heads=2, num_key_value_heads=1)
_FUZZ_META = dict(META, config=_FUZZ_CFG)


_FUZZ_RAW = []


def _fuzz_raw() -> bytes:
    """A small valid file (built once): every tensor type, rope_freqs included."""
    if not _FUZZ_RAW:
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            path = write(f"{d}/base.lcpu", meta=_FUZZ_META,
                         tensors=tensor_list(_FUZZ_CFG, rope_freqs=True))
            _FUZZ_RAW.append(open(path, "rb").read())
    return _FUZZ_RAW[0]


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_header_meta_directory(tmp_path, data):
    raw = bytearray(_fuzz_raw())
    data_offset = header(bytes(raw))["data_offset"]
    n = data.draw(st.integers(1, 8), label="n_flips")
    for _ in range(n):
        where = data.draw(st.one_of(st.integers(0, 63), st.integers(0, data_offset - 1)),
                          label="offset")
        how = data.draw(st.sampled_from(["xor", "set"]), label="how")
        v = data.draw(st.integers(0, 255), label="value")
        raw[where] = raw[where] ^ (v or 1) if how == "xor" else v
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw)), label="length")]
    p = tmp_path / "fuzz.lcpu"
    p.write_bytes(bytes(raw))
    try:
        m = read_model(p)
    except ModelFormatError:
        return
    # it loaded: then every tensor must be readable and consistent
    with m:
        for name, info in m.tensors.items():
            a = m.array(name)
            assert a.nbytes == info.nbytes
            assert info.offset + info.nbytes <= m.file_size


def test_tokenizer_text_is_parsed_on_first_use():
    """The converter stores tokenizer.json as text; it is parsed (and checked) when used."""
    good = {"tokenizer": json.dumps(META["tokenizer"])}
    assert fmt.tokenizer_dict(good) == META["tokenizer"]
    assert fmt.tokenizer_dict({"tokenizer": META["tokenizer"]}) is META["tokenizer"]
    for bad in ('{"model": ', '{"model": 1}', '{"x": "model"}'):
        with pytest.raises(ModelFormatError, match="tokenizer"):
            fmt.tokenizer_dict({"tokenizer": bad})


# ----------------------------------------------------------------------------- rewriting a loaded file

def test_rewriting_a_mapped_file_keeps_the_old_bytes(tmp_path):
    """ModelWriter writes beside the target and renames: a process that has the old file
    mapped keeps its bytes (written in place, a shorter new file killed it with SIGBUS)."""
    import subprocess
    import sys
    from pathlib import Path
    code = f"""
import copy, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_format import META, write
from llamacpu.format import read_model
path = {str(tmp_path / 'm.lcpu')!r}
larger = copy.deepcopy(META)
larger["config"]["vocab_size"] = 4096  # the old file spans pages past the new one's end
write(path, meta=larger)
old = read_model(path)
arrays = {{n: old.array(n) for n in old.tensors}}
before = {{n: a.tobytes() for n, a in arrays.items()}}
smaller = copy.deepcopy(META)
smaller["config"]["vocab_size"] = 8
write(path, meta=smaller)
assert read_model(path).config.vocab_size == 8
assert all(arrays[n].tobytes() == before[n] for n in arrays), "the mapped bytes changed"
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


def test_writer_failure_leaves_the_target_as_it_was(tmp_path):
    import os
    path = write(tmp_path / "m.lcpu")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="expected"):
        with ModelWriter(path, META, n_tensors=2) as w:
            w.add_tensor("norm.weight", F32, (64,), b"\0" * 12)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.lcpu"]  # no temporary file left behind
    write(path, meta=META)
    assert os.listdir(tmp_path) == ["m.lcpu"]


# ----------------------------------------------------------------------------- the page cache, 2 MB pages

def resident_pages(path) -> tuple[int, int]:
    """(pages of `path` in the page cache, pages), by mincore(2) on a fresh mapping that
    touches nothing."""
    import ctypes
    import mmap
    import os
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size, page = os.path.getsize(path), mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        n = (size + page - 1) // page
        vec = ctypes.create_string_buffer(n)
        try:
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw), n


@pytest.mark.skipif(not hasattr(__import__("os"), "posix_fadvise"), reason="no posix_fadvise here")
def test_a_written_file_leaves_the_page_cache(tmp_path):
    """ModelWriter syncs the file and drops it from the page cache, where writing left it
    in small folios (4 KB pages in every mapping): the first load reads it back in folios
    that can be mapped with 2 MB pages."""
    import os
    import subprocess
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip()
    if fs in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {fs}: the file is its page cache")
    big = copy.deepcopy(META)
    big["config"]["vocab_size"] = 65536  # MBs of embedding
    path = write(tmp_path / "m.lcpu", meta=big)
    resident, pages = resident_pages(path)
    assert pages > 256
    assert resident <= pages // 4, f"{resident} of {pages} pages still cached after the write"
    with read_model(path) as m:  # reading brings it back
        for name in m.tensors:
            m.array(name).view(np.uint8).sum()
    assert resident_pages(path)[0] > pages // 2
    # a plain file written the same way stays cached: the check above can fail
    plain = tmp_path / "plain.bin"
    with open(plain, "wb") as f:
        f.write(os.urandom(pages * 4096))
    assert resident_pages(plain)[0] > pages // 2


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE here")
def test_read_model_asks_for_2mb_pages(tmp_path):
    """The model's mapping carries MADV_HUGEPAGE ('hg' in /proc/self/smaps' VmFlags)."""
    import os
    path = write(tmp_path / "m.lcpu")
    with read_model(path) as m:
        m.array("norm.weight")
        smaps = open("/proc/self/smaps").read().split("\n")
    starts = [i for i, line in enumerate(smaps) if line.endswith(" " + os.fspath(path))]
    assert starts, "the model file is not mapped"
    flags = next(line for line in smaps[starts[-1]:] if line.startswith("VmFlags:"))
    assert " hg" in flags, flags


def test_chat_template_and_tokenizer_sizes_are_bounded(tmp_path):
    meta = copy.deepcopy(META)
    meta["chat_template"] = "x" * (fmt.MAX_CHAT_TEMPLATE_CHARS + 1)
    expect_meta_error(meta, "chat_template' has .* more than the")
    meta = copy.deepcopy(META)
    meta["tokenizer"] = '{"model": {}, "x": "' + " " * fmt.MAX_TOKENIZER_JSON_CHARS + '"}'
    expect_meta_error(meta, "tokenizer' has .* more than the")


def expect_meta_error(meta, match):
    with pytest.raises(ModelFormatError, match=match):
        fmt.validate_meta(meta)
