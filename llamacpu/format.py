"""The llamacpu model file (format version 1): constants, writer, validating reader.

docs/FORMAT.md is the binary contract; this module is its only implementation.

    offset 0    header (64 bytes)
    offset 64   metadata: UTF-8 JSON object, padded with spaces up to dir_offset
    dir_offset  tensor directory, 128 bytes per tensor
    data_offset tensor data, each tensor 64-byte aligned

`ModelWriter` streams tensor data straight into the file: the space for the
metadata and the directory is reserved up front (their sizes are known from the
metadata and the number of tensors), so no tensor is ever held in memory whole. It
writes a temporary file beside the target and renames it over the target when it is
complete: a process that has the old file mapped keeps reading the old bytes (writing
the mapped file in place would kill it with SIGBUS).
`read_model` mmaps the file read-only and validates every byte that says where
or what something is before it returns; any malformed content raises
`ModelFormatError` and nothing else.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import secrets
import struct
from dataclasses import asdict, dataclass, fields
from typing import Iterable

import numpy as np

from .errors import ModelFormatError
from .tokenizer import MAX_TOKENIZER_JSON_CHARS

MAGIC = b"LLAMACPU"
FORMAT_VERSION = 1
HEADER_SIZE = 64
DIR_ENTRY_SIZE = 128
ALIGNMENT = 64
NAME_BYTES = 64  # name field; at most 63 bytes of UTF-8 plus at least one NUL
LAYOUT_ROW_MAJOR = 0
LAYOUT_X8 = 1  # quantized 2-D tensors with rows % 8 == 0: 8-row block groups (see x8_pack)

# Tensor type ids are GGUF's, plus llamacpu's own Q6_0 (100, outside GGUF's range).
F32 = 0
F16 = 1
Q4_0 = 2
Q4_1 = 3
Q5_0 = 6
Q5_1 = 7
Q8_0 = 8
Q2_K = 10
Q3_K = 11
Q4_K = 12
Q5_K = 13
Q6_K = 14
IQ4_NL = 20
IQ4_XS = 23
Q6_0 = 100  # 6-bit, fp16 scale per 32 (csrc/quants.h block_q6_0); x8 layout only

QK = 32  # elements per block of the 32-element types
QK_K = 256  # elements per super-block of the K-quants and IQ4_XS


@dataclass(frozen=True)
class TypeInfo:
    """One weight type, as csrc/quants.h's lc_types has it (checked at import by _core)."""
    id: int
    name: str
    block_elems: int  # 1 (float), QK or QK_K
    block_bytes: int
    hdr: tuple  # byte offsets of the block's fp16 header fields (first in an x8 block group)
    row_major: bool  # layout 0 allowed (else x8 only)
    kernels: bool  # the engine can run it (Q2_K and Q3_K: not yet; read as GGUF only to refuse them)


TYPES = {t.id: t for t in (
    TypeInfo(F32, "F32", 1, 4, (), True, True),
    TypeInfo(F16, "F16", 1, 2, (), True, True),
    TypeInfo(Q4_0, "Q4_0", QK, 18, (0,), True, True),
    TypeInfo(Q4_1, "Q4_1", QK, 20, (0, 2), True, True),
    TypeInfo(Q5_0, "Q5_0", QK, 22, (0,), False, True),
    TypeInfo(Q5_1, "Q5_1", QK, 24, (0, 2), False, True),
    TypeInfo(Q8_0, "Q8_0", QK, 34, (0,), True, True),
    TypeInfo(Q2_K, "Q2_K", QK_K, 84, (80, 82), False, False),
    TypeInfo(Q3_K, "Q3_K", QK_K, 110, (108,), False, False),
    TypeInfo(Q4_K, "Q4_K", QK_K, 144, (0, 2), False, True),
    TypeInfo(Q5_K, "Q5_K", QK_K, 176, (0, 2), False, True),
    TypeInfo(Q6_K, "Q6_K", QK_K, 210, (208,), False, True),
    TypeInfo(IQ4_NL, "IQ4_NL", QK, 18, (0,), False, True),
    TypeInfo(IQ4_XS, "IQ4_XS", QK_K, 136, (0, 2), False, True),
    TypeInfo(Q6_0, "Q6_0", QK, 26, (0,), False, True),
)}
#: the types a model file may hold (those the engine has kernels for)
TYPE_NAMES = {tid: t.name for tid, t in TYPES.items() if t.kernels}
TYPE_IDS = {name: tid for tid, name in TYPE_NAMES.items()}
QUANTIZED_TYPES = frozenset(tid for tid in TYPE_NAMES if TYPES[tid].block_elems > 1)
X8_ONLY_TYPES = frozenset(tid for tid in QUANTIZED_TYPES if not TYPES[tid].row_major)
# (elements per block, bytes per block)
BLOCK_SIZES = {tid: (TYPES[tid].block_elems, TYPES[tid].block_bytes) for tid in TYPE_NAMES}

# Sanity bounds on the config (generous: Llama 3.x 405B fits comfortably).
MAX_VOCAB = 1 << 24
MAX_DIM = 1 << 16
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_POSITIONS = 1 << 24
MAX_TENSOR_ELEMENTS = 1 << 40
MAX_META_SIZE = 1 << 30
# A chat template is a few KB (Llama 3.2's: 3.7 KB; the longest in use ~20 KB); Jinja compiles
# it into Python code, so a megabyte-sized one is an attack on memory and time, not a template.
MAX_CHAT_TEMPLATE_CHARS = 256 << 10

_HEADER = struct.Struct("<8sIIQQQQQQ")
_DIR_ENTRY = struct.Struct("<64sII4QQQII")
assert _HEADER.size == HEADER_SIZE and _DIR_ENTRY.size == DIR_ENTRY_SIZE

REQUIRED_META_KEYS = ("format_version", "config", "tokenizer", "chat_template",
                      "generation", "special_tokens", "provenance")


@dataclass(frozen=True)
class ModelConfig:
    """A model's shape and position constants: the metadata's "config" object (Hugging Face's
    key names, plus head_dim and rope_pairing), validated. `from_dict` is the one way in from
    JSON (a converter's source, a file's metadata), `to_dict` the way back out."""
    architecture: str  # "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # null, or Hugging Face's llama3 object (validate_rope_scaling)
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_pairing: str  # "adjacent": RoPE rotates elements (2i, 2i + 1) of a head

    @classmethod
    def from_dict(cls, d) -> ModelConfig:
        """The config of JSON object `d` (other keys ignored); ModelFormatError naming the
        field if one is missing or out of range."""
        _validate_config(d)
        return cls(**{k: d[k] for k in REQUIRED_CONFIG_KEYS})

    def to_dict(self) -> dict:
        return asdict(self)


REQUIRED_CONFIG_KEYS = tuple(f.name for f in fields(ModelConfig))

# Per-layer tensors: suffix -> (shape as a function of the config, is a norm).
LAYER_TENSORS = ("attention_norm", "attention.wq", "attention.wk", "attention.wv",
                 "attention.wo", "ffn_norm", "feed_forward.w1", "feed_forward.w2",
                 "feed_forward.w3")


def align(n: int, a: int = ALIGNMENT) -> int:
    return (n + a - 1) // a * a


def row_bytes(type: int, cols: int) -> int:
    """Bytes of one row of `cols` elements of tensor type `type`."""
    if type not in BLOCK_SIZES:
        raise ModelFormatError(f"unknown tensor type {type}")
    per_block, block_bytes = BLOCK_SIZES[type]
    if cols % per_block:
        raise ModelFormatError(
            f"{TYPE_NAMES[type]} needs the innermost dimension to be a multiple of "
            f"{per_block}, got {cols}")
    return cols // per_block * block_bytes


def tensor_nbytes(type: int, shape) -> int:
    """Bytes of a whole tensor: rows (product of the outer dims) times row_bytes."""
    shape = tuple(int(d) for d in shape)
    if not shape:
        raise ModelFormatError("a tensor needs at least one dimension")
    return math.prod(shape[:-1]) * row_bytes(type, shape[-1])


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: int
    shape: tuple
    offset: int  # absolute offset in the file
    nbytes: int
    layout: int = LAYOUT_ROW_MAJOR

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.type]


def expected_tensors(config: ModelConfig) -> dict:
    """Internal tensor name -> shape (numpy order) that `config` requires.

    `rope_freqs.weight` is optional and therefore not included.
    """
    vocab, dim = config.vocab_size, config.hidden_size
    hidden = config.intermediate_size
    hd = config.head_dim
    q_dim = config.num_attention_heads * hd
    kv_dim = config.num_key_value_heads * hd
    layer_shapes = {
        "attention_norm": (dim,),
        "attention.wq": (q_dim, dim),
        "attention.wk": (kv_dim, dim),
        "attention.wv": (kv_dim, dim),
        "attention.wo": (dim, q_dim),
        "ffn_norm": (dim,),
        "feed_forward.w1": (hidden, dim),
        "feed_forward.w2": (dim, hidden),
        "feed_forward.w3": (hidden, dim),
    }
    out = {"tok_embeddings.weight": (vocab, dim)}
    for i in range(config.num_hidden_layers):
        for suffix in LAYER_TENSORS:
            out[f"layers.{i}.{suffix}.weight"] = layer_shapes[suffix]
    out["norm.weight"] = (dim,)
    if not config.tie_word_embeddings:
        out["output.weight"] = (vocab, dim)
    return out


def is_norm(name: str) -> bool:
    return name.endswith("_norm.weight") or name == "norm.weight"


def output_head_name(config: ModelConfig) -> str:
    """The tensor that produces the logits: the embedding when tied."""
    return "tok_embeddings.weight" if config.tie_word_embeddings else "output.weight"


def max_tensor_count(n_layers: int) -> int:
    return 9 * n_layers + 4  # + tok, norm, output, rope_freqs


# ----------------------------------------------------------------------------- writer

class ModelWriter:
    """Write a model file, streaming tensor data to disk as it is added.

    The file layout is fixed at construction: the metadata JSON is serialized now
    and the directory is reserved for `n_tensors` entries (default: the most the
    config allows), so tensor data goes straight to its final offset.
    Everything goes to `.NAME.tmp-PID-XXXXXXXX` beside `path`; `close()` writes the
    directory and the header, then renames that file over `path`. Use as a context
    manager: on an exception (or `abort()`) the temporary file is deleted and `path`
    is left as it was.
    """

    def __init__(self, path, meta: dict, n_tensors: int | None = None):
        self.path = os.fspath(path)
        meta_bytes = json.dumps(meta, ensure_ascii=False, allow_nan=False,
                                separators=(",", ":")).encode("utf-8")
        if n_tensors is None:
            try:
                n_tensors = max_tensor_count(meta["config"]["num_hidden_layers"])
            except (KeyError, TypeError) as e:
                raise ValueError("n_tensors not given and meta has no usable config") from e
        self._capacity = int(n_tensors)
        self._dir_offset = align(HEADER_SIZE + len(meta_bytes), 8)
        # Pad the JSON with spaces up to the directory: no unexplained bytes.
        meta_bytes += b" " * (self._dir_offset - HEADER_SIZE - len(meta_bytes))
        self._meta_bytes = meta_bytes
        self._data_offset = align(self._dir_offset + DIR_ENTRY_SIZE * self._capacity)
        self._entries: list[TensorInfo] = []
        self._names: set[str] = set()
        self._pos = 0  # next free offset relative to data_offset
        head, name = os.path.split(self.path)
        self._tmp = os.path.join(head, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        self._f = open(self._tmp, "xb")  # the mode open() gives any new file (0666 & ~umask)
        self._f.seek(self._data_offset)
        self._closed = False

    def add_tensor(self, name: str, type: int, shape, data, layout: int = LAYOUT_ROW_MAJOR) -> TensorInfo:
        """Append one tensor.

        `data` is a bytes-like object / numpy array holding exactly the tensor's
        bytes (already in `layout`), or an iterable of such chunks (written as
        they come, so a large tensor can be produced piece by piece).
        """
        if self._closed:
            raise ValueError("ModelWriter is closed")
        if len(self._entries) >= self._capacity:
            raise ValueError(f"more than the {self._capacity} tensors reserved")
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        raw_name = name.encode("utf-8")
        if not raw_name or len(raw_name) >= NAME_BYTES or b"\0" in raw_name:
            raise ValueError(f"invalid tensor name {name!r}")
        if type not in TYPE_NAMES:
            raise ValueError(f"unknown tensor type {type}")
        shape = tuple(int(d) for d in shape)
        if not 1 <= len(shape) <= 4 or any(d < 1 for d in shape):
            raise ValueError(f"invalid shape {shape} for {name}")
        nbytes = tensor_nbytes(type, shape)
        if layout not in (LAYOUT_ROW_MAJOR, LAYOUT_X8) or (layout == LAYOUT_X8 and not x8_allowed(type, shape)) \
                or (type in X8_ONLY_TYPES and layout != LAYOUT_X8):
            raise ValueError(f"{name}: layout {layout} is not possible for {TYPE_NAMES[type]} {shape}")
        start = self._pos
        self._f.seek(self._data_offset + start)
        written = 0
        chunks = [data] if isinstance(data, (bytes, bytearray, memoryview, np.ndarray)) else data
        for chunk in chunks:
            if isinstance(chunk, np.ndarray):
                chunk = np.ascontiguousarray(chunk)
            mv = memoryview(chunk).cast("B")
            written += len(mv)
            if written > nbytes:
                raise ValueError(f"{name}: more than {nbytes} bytes of data")
            self._f.write(mv)
        if written != nbytes:
            raise ValueError(f"{name}: got {written} bytes of data, expected {nbytes}")
        info = TensorInfo(name, type, shape, self._data_offset + start, nbytes, layout)
        self._entries.append(info)
        self._names.add(name)
        self._pos = align(start + nbytes)
        return info

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        f = self._f
        try:
            file_size = self._data_offset + self._pos
            f.truncate(file_size)  # pads the last tensor to 64 bytes with zeros
            f.seek(HEADER_SIZE)
            f.write(self._meta_bytes)
            for e in self._entries:
                dims = list(e.shape) + [1] * (4 - len(e.shape))
                f.write(_DIR_ENTRY.pack(e.name.encode("utf-8"), e.type, len(e.shape), *dims,
                                        e.offset - self._data_offset, e.nbytes,
                                        e.layout, 0))
            f.seek(0)
            f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, HEADER_SIZE,
                                 len(self._meta_bytes), self._dir_offset, len(self._entries),
                                 self._data_offset, file_size))
            f.flush()
            os.fsync(f.fileno())  # on disk before it takes the name
            _drop_cached(f.fileno())
            f.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self._discard()
            raise

    def abort(self) -> None:
        """Delete the temporary file; `path` is left as it was."""
        self._closed = True
        self._discard()

    def _discard(self) -> None:
        self._f.close()
        try:
            os.unlink(self._tmp)
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_model(path, meta: dict, tensors: Iterable) -> None:
    """Convenience: write (name, type, shape, data) tuples in one go."""
    tensors = list(tensors)
    with ModelWriter(path, meta, n_tensors=len(tensors)) as w:
        for name, type, shape, data in tensors:
            w.add_tensor(name, type, shape, data)


def _drop_cached(fd: int) -> None:
    """Drop a just-written (and synced) file from the page cache, where writing left it in
    small pieces: read back at the first load, the kernel caches it in large folios
    that read_model's mapping can map with 2 MB pages (decode, which reads every weight once
    per token, is 4-7% faster on them than on 4 KB pages: BENCHMARKS.md, session 15)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:  # advice: never a reason to fail a conversion
            pass


# ----------------------------------------------------------------------------- reader

class ModelFile:
    """A validated model file, mmapped read-only. Arrays are views, never copies."""

    def __init__(self, path, mm: mmap.mmap, meta: dict, config: ModelConfig, tensors: dict, data_offset: int):
        self.path = path
        self._mm = mm
        self.meta = meta  # the JSON metadata as it is in the file
        self.config = config  # its "config", typed
        self.tensors = tensors
        self.data_offset = data_offset

    @property
    def file_size(self) -> int:
        return len(self._mm)

    def array(self, name: str) -> np.ndarray:
        """Zero-copy view: float32 (F32), uint16 (F16), uint8 [rows, row_bytes] (quantized,
        row-major) or uint8 [rows / 8, 8 * row_bytes] (quantized, x8 layout)."""
        if self._mm is None:
            raise ValueError("ModelFile is closed")
        t = self.tensors[name]
        if t.type == F32:
            return np.frombuffer(self._mm, np.float32, math.prod(t.shape), t.offset).reshape(t.shape)
        if t.type == F16:
            return np.frombuffer(self._mm, np.uint16, math.prod(t.shape), t.offset).reshape(t.shape)
        rows = math.prod(t.shape[:-1])
        if t.layout == LAYOUT_X8:
            return np.frombuffer(self._mm, np.uint8, t.nbytes, t.offset).reshape(
                rows // 8, 8 * row_bytes(t.type, t.shape[-1]))
        return np.frombuffer(self._mm, np.uint8, t.nbytes, t.offset).reshape(
            rows, row_bytes(t.type, t.shape[-1]))

    def rows_array(self, name: str) -> np.ndarray:
        """A quantized tensor's blocks in the row-major GGUF layout (a copy when stored x8)."""
        t = self.tensors[name]
        a = self.array(name)
        return x8_unpack(a, t.type, t.shape[0]) if t.layout == LAYOUT_X8 else a

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # arrays still point into it; it is unmapped when they go away

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<ModelFile {self.path!r} {len(self.tensors)} tensors>"


def read_model(path) -> ModelFile:
    """Open and validate a model file. Raises ModelFormatError on any defect."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_SIZE:
            raise ModelFormatError(f"{path}: file is {size} bytes, shorter than the "
                                   f"{HEADER_SIZE}-byte header")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # 2 MB pages where the kernel can (Linux THP for files): what is not cached yet is
        # read in 2 MB folios, which the mapping then maps whole
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    try:
        meta, config, tensors, data_offset = _validate(mm, size)
    except ModelFormatError as e:
        mm.close()
        raise ModelFormatError(f"{path}: {e}") from None
    except BaseException:
        mm.close()
        raise
    return ModelFile(path, mm, meta, config, tensors, data_offset)


def _validate(mm, size: int):
    (magic, version, header_size, meta_offset, meta_size, dir_offset, n_tensors,
     data_offset, file_size) = _HEADER.unpack_from(mm, 0)
    if magic[:4] == b"GGUF":
        raise ModelFormatError("magic 'GGUF': a GGUF file, not a llamacpu model file; "
                               "llamacpu.Llama and `llamacpu run|serve|bench|perplexity` take "
                               "it directly, or `llamacpu convert` it")
    if magic != MAGIC:
        raise ModelFormatError(f"bad magic {magic!r}, not a llamacpu model file")
    if version != FORMAT_VERSION:
        raise ModelFormatError(f"format version {version}, this llamacpu reads version "
                               f"{FORMAT_VERSION}")
    if header_size != HEADER_SIZE:
        raise ModelFormatError(f"header size {header_size}, expected {HEADER_SIZE}")
    if file_size != size:
        raise ModelFormatError(f"header says the file is {file_size} bytes but it is {size} "
                               "(truncated or appended to?)")
    if meta_offset != HEADER_SIZE:
        raise ModelFormatError(f"meta_offset {meta_offset}, expected {HEADER_SIZE}")
    if not 2 <= meta_size <= MAX_META_SIZE or meta_offset + meta_size > size:
        raise ModelFormatError(f"meta_size {meta_size} out of bounds")
    if dir_offset % 8 or dir_offset < meta_offset + meta_size or dir_offset > size:
        raise ModelFormatError(f"dir_offset {dir_offset} invalid (must be a multiple of 8, "
                               f">= {meta_offset + meta_size}, <= {size})")
    if n_tensors > (size - dir_offset) // DIR_ENTRY_SIZE:
        raise ModelFormatError(f"n_tensors {n_tensors} does not fit in the file")
    dir_end = dir_offset + DIR_ENTRY_SIZE * n_tensors
    if data_offset % ALIGNMENT or data_offset < dir_end or data_offset > size:
        raise ModelFormatError(f"data_offset {data_offset} invalid (must be a multiple of "
                               f"{ALIGNMENT}, >= {dir_end}, <= {size})")

    meta = _parse_meta(mm[meta_offset:meta_offset + meta_size])
    config = validate_meta(meta)

    tensors = {}
    for i in range(n_tensors):
        info = _parse_entry(mm, dir_offset + i * DIR_ENTRY_SIZE, i, data_offset, size)
        if info.name in tensors:
            raise ModelFormatError(f"duplicate tensor {info.name!r}")
        tensors[info.name] = info
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ModelFormatError(f"tensors {n0!r} and {n1!r} overlap")
    check_tensor_set(config, {n: (t.type, t.shape) for n, t in tensors.items()})
    return meta, config, tensors, data_offset


def _parse_meta(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"metadata is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ModelFormatError(f"metadata is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise ModelFormatError(f"metadata must be a JSON object, got {type(meta).__name__}")
    return meta


def _parse_entry(mm, pos: int, index: int, data_offset: int, size: int) -> TensorInfo:
    raw_name, ttype, n_dims, d0, d1, d2, d3, rel, nbytes, layout, reserved = \
        _DIR_ENTRY.unpack_from(mm, pos)
    where = f"directory entry {index}"
    nul = raw_name.find(b"\0")
    if nul <= 0:
        raise ModelFormatError(f"{where}: name is empty or not NUL-terminated")
    if raw_name[nul:].strip(b"\0"):
        raise ModelFormatError(f"{where}: bytes after the name's NUL are not NUL")
    try:
        name = raw_name[:nul].decode("utf-8")
    except UnicodeDecodeError:
        raise ModelFormatError(f"{where}: name is not valid UTF-8") from None
    where = f"tensor {name!r}"
    if ttype not in TYPE_NAMES:
        raise ModelFormatError(f"{where}: unknown type {ttype}")
    if not 1 <= n_dims <= 2:
        raise ModelFormatError(f"{where}: n_dims {n_dims}, must be 1 or 2")
    dims = (d0, d1, d2, d3)
    if any(d != 1 for d in dims[n_dims:]):
        raise ModelFormatError(f"{where}: unused dimensions must be 1, got {dims}")
    shape = dims[:n_dims]
    if any(d < 1 or d > MAX_TENSOR_ELEMENTS for d in shape) or \
            math.prod(shape) > MAX_TENSOR_ELEMENTS:
        raise ModelFormatError(f"{where}: shape {shape} out of bounds")
    if ttype in QUANTIZED_TYPES and shape[-1] % TYPES[ttype].block_elems:
        raise ModelFormatError(f"{where}: {TYPE_NAMES[ttype]} needs cols % {TYPES[ttype].block_elems} == 0, "
                               f"shape {shape}")
    want = tensor_nbytes(ttype, shape)
    if nbytes != want:
        raise ModelFormatError(f"{where}: nbytes {nbytes}, but {TYPE_NAMES[ttype]} {shape} "
                               f"takes {want}")
    if layout == LAYOUT_X8 and not x8_allowed(ttype, shape):
        raise ModelFormatError(f"{where}: layout 1 (x8) needs a quantized 2-D tensor with rows % 8 == 0, "
                               f"got {TYPE_NAMES[ttype]} {shape}")
    if layout not in (LAYOUT_ROW_MAJOR, LAYOUT_X8):
        raise ModelFormatError(f"{where}: unknown layout {layout}")
    if ttype in X8_ONLY_TYPES and layout != LAYOUT_X8:
        raise ModelFormatError(f"{where}: {TYPE_NAMES[ttype]} must use layout 1 (x8), got {layout}")
    if reserved != 0:
        raise ModelFormatError(f"{where}: reserved field is {reserved}, must be 0")
    if rel % ALIGNMENT:
        raise ModelFormatError(f"{where}: offset {rel} not a multiple of {ALIGNMENT}")
    if data_offset + rel + nbytes > size:
        raise ModelFormatError(f"{where}: data [{data_offset + rel}, "
                               f"{data_offset + rel + nbytes}) runs past the end of the file "
                               f"({size} bytes)")
    return TensorInfo(name, ttype, shape, data_offset + rel, nbytes, layout)


def tokenizer_dict(meta: dict) -> dict:
    """The tokenizer.json object of a model file's metadata (stored as its text since
    the converter writes it so; parsed here, on first use)."""
    tok = meta["tokenizer"]
    if isinstance(tok, dict):
        return tok
    try:
        obj = json.loads(tok)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ModelFormatError(f"metadata 'tokenizer' is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise ModelFormatError("metadata 'tokenizer' must be a tokenizer.json object (with a 'model')")
    return obj


# ----------------------------------------------------------------------------- x8 layout

def x8_allowed(type: int, shape) -> bool:
    return type in QUANTIZED_TYPES and len(shape) == 2 and shape[0] % 8 == 0


def _x8_order(type: int) -> np.ndarray:
    """Byte positions in a block, in x8 order: the fp16 header fields, then the other
    bytes in block order (csrc/quants.h lc_x8_copy)."""
    t = TYPES[type]
    hdr = [p for h in t.hdr for p in (h, h + 1)]
    rest = [p for p in range(t.block_bytes) if p not in hdr]
    return np.array(hdr + rest), len(t.hdr), len(rest)


def x8_pack(raw: np.ndarray, type: int) -> np.ndarray:
    """Row-major blocks uint8 (rows, row_bytes), rows % 8 == 0 -> the x8 layout, uint8
    (rows / 8, 8 * row_bytes). Per group of 8 rows and block column: each fp16 header
    field of the 8 rows (row 0 first), then the other bytes of the blocks in chunks of
    32, chunk c = the c-th 4 of those bytes of each row, row after row (csrc/quants.h)."""
    rows, rb = raw.shape
    order, nh, nrest = _x8_order(type)
    bs = TYPES[type].block_bytes
    nb, g = rb // bs, rows // 8
    a = raw.reshape(g, 8, nb, bs)[..., order]  # (g, row, nb, bytes in x8 order)
    parts = [a[..., 2 * h:2 * h + 2].transpose(0, 2, 1, 3).reshape(g, nb, 16) for h in range(nh)]
    q = a[..., 2 * nh:].reshape(g, 8, nb, nrest // 4, 4).transpose(0, 2, 3, 1, 4).reshape(g, nb, 8 * nrest)
    return np.concatenate(parts + [q], axis=-1).reshape(g, nb * 8 * bs)


def x8_unpack(packed: np.ndarray, type: int, rows: int) -> np.ndarray:
    """The inverse of x8_pack: uint8 (rows, row_bytes) in the GGUF row-major layout."""
    order, nh, nrest = _x8_order(type)
    bs = TYPES[type].block_bytes
    g = rows // 8
    a = np.asarray(packed, dtype=np.uint8).reshape(g, -1, 8 * bs)
    nb = a.shape[1]
    blocks = np.empty((g, 8, nb, bs), dtype=np.uint8)  # in x8 byte order
    for h in range(nh):
        blocks[..., 2 * h:2 * h + 2] = a[..., 16 * h:16 * h + 16].reshape(g, nb, 8, 2).transpose(0, 2, 1, 3)
    blocks[..., 2 * nh:] = a[..., 16 * nh:].reshape(g, nb, nrest // 4, 8, 4).transpose(0, 3, 1, 2, 4) \
        .reshape(g, 8, nb, nrest)
    out = np.empty_like(blocks)
    out[..., order] = blocks
    return out.reshape(rows, nb * bs)


# ----------------------------------------------------------------------------- metadata

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    """A finite JSON number (huge ints count as finite; the range checks bound them)."""
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, float) and math.isfinite(v))


def _int(d: dict, key: str, lo: int, hi: int, where: str) -> int:
    v = d.get(key)
    if not _is_int(v) or not lo <= v <= hi:
        raise ModelFormatError(f"{where}.{key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _validate_config(config) -> None:
    """Check a `config` dict (our schema); raise ModelFormatError naming the field."""
    if not isinstance(config, dict):
        raise ModelFormatError("metadata 'config' must be an object")
    for key in REQUIRED_CONFIG_KEYS:
        if key not in config:
            raise ModelFormatError(f"config.{key} is missing")
    if config["architecture"] != "llama":
        raise ModelFormatError(f"config.architecture is {config['architecture']!r}, "
                               "only 'llama' is supported")
    w = "config"
    _int(config, "vocab_size", 1, MAX_VOCAB, w)
    _int(config, "hidden_size", 1, MAX_DIM, w)
    _int(config, "intermediate_size", 1, MAX_DIM * 4, w)
    _int(config, "num_hidden_layers", 1, MAX_LAYERS, w)
    heads = _int(config, "num_attention_heads", 1, MAX_HEADS, w)
    kv = _int(config, "num_key_value_heads", 1, heads, w)
    if heads % kv:
        raise ModelFormatError(f"config.num_attention_heads ({heads}) is not a multiple of "
                               f"num_key_value_heads ({kv})")
    hd = _int(config, "head_dim", 2, 1024, w)
    if hd % 2:
        raise ModelFormatError(f"config.head_dim ({hd}) must be even")
    if heads * hd > MAX_DIM:
        raise ModelFormatError(f"num_attention_heads * head_dim = {heads * hd} > {MAX_DIM}")
    _int(config, "max_position_embeddings", 1, MAX_POSITIONS, w)
    eps = config["rms_norm_eps"]
    if not _is_num(eps) or not 0 < eps < 1:
        raise ModelFormatError(f"config.rms_norm_eps must be a number in (0, 1), got {eps!r}")
    theta = config["rope_theta"]
    if not _is_num(theta) or not 1 <= theta <= 1e12:
        raise ModelFormatError(f"config.rope_theta must be a number in [1, 1e12], got {theta!r}")
    if not isinstance(config["tie_word_embeddings"], bool):
        raise ModelFormatError("config.tie_word_embeddings must be true or false")
    if config["rope_pairing"] != "adjacent":
        raise ModelFormatError(f"config.rope_pairing is {config['rope_pairing']!r}, "
                               "must be 'adjacent'")
    validate_rope_scaling(config["rope_scaling"])


def validate_rope_scaling(rs) -> None:
    """null, or {"rope_type": "llama3", factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings}."""
    if rs is None:
        return
    if not isinstance(rs, dict):
        raise ModelFormatError("config.rope_scaling must be an object or null")
    if rs.get("rope_type") != "llama3":
        raise ModelFormatError(f"config.rope_scaling.rope_type {rs.get('rope_type')!r} is not "
                               "supported (only 'llama3')")
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        v = rs.get(key)
        if not _is_num(v) or not 0 < v <= 1e6:
            raise ModelFormatError(f"config.rope_scaling.{key} must be a positive number, "
                                   f"got {v!r}")
    if not rs["high_freq_factor"] > rs["low_freq_factor"]:
        raise ModelFormatError("config.rope_scaling.high_freq_factor must be greater than "
                               "low_freq_factor")
    _int(rs, "original_max_position_embeddings", 1, MAX_POSITIONS, "config.rope_scaling")


def _token_id(v, vocab: int, where: str, nullable: bool = True):
    if v is None and nullable:
        return
    if not _is_int(v) or not 0 <= v < vocab:
        raise ModelFormatError(f"{where} must be a token id in [0, {vocab}), got {v!r}")


def validate_meta(meta: dict) -> ModelConfig:
    """Check the whole metadata object (see docs/FORMAT.md, "Metadata"); its config, typed."""
    for key in REQUIRED_META_KEYS:
        if key not in meta:
            raise ModelFormatError(f"metadata key {key!r} is missing")
    if meta["format_version"] != FORMAT_VERSION or not _is_int(meta["format_version"]):
        raise ModelFormatError(f"metadata format_version {meta['format_version']!r}, "
                               f"expected {FORMAT_VERSION}")
    config = ModelConfig.from_dict(meta["config"])
    vocab = config.vocab_size
    tok = meta["tokenizer"]
    if isinstance(tok, str):
        # the tokenizer.json text: parsed when the tokenizer is first used (tokenizer_dict),
        # which keeps loading a model for logits at a few milliseconds
        if len(tok) > MAX_TOKENIZER_JSON_CHARS:
            raise ModelFormatError(f"metadata 'tokenizer' has {len(tok):,} characters, more than "
                                   f"the {MAX_TOKENIZER_JSON_CHARS:,} allowed")
        if not tok.lstrip().startswith("{") or '"model"' not in tok:
            raise ModelFormatError("metadata 'tokenizer' must hold tokenizer.json text (a JSON object "
                                   "with a 'model')")
    elif not isinstance(tok, dict) or not isinstance(tok.get("model"), dict):
        raise ModelFormatError("metadata 'tokenizer' must be a tokenizer.json object "
                               "(with a 'model') or its text")
    if meta["chat_template"] is not None and not isinstance(meta["chat_template"], str):
        raise ModelFormatError("metadata 'chat_template' must be a string or null")
    if len(meta["chat_template"] or "") > MAX_CHAT_TEMPLATE_CHARS:
        raise ModelFormatError(f"metadata 'chat_template' has {len(meta['chat_template']):,} characters, "
                               f"more than the {MAX_CHAT_TEMPLATE_CHARS:,} allowed")
    if not isinstance(meta["generation"], dict):
        raise ModelFormatError("metadata 'generation' must be an object")
    st = meta["special_tokens"]
    if not isinstance(st, dict):
        raise ModelFormatError("metadata 'special_tokens' must be an object")
    _token_id(st.get("bos_token_id"), vocab, "special_tokens.bos_token_id")
    _token_id(st.get("eos_token_id"), vocab, "special_tokens.eos_token_id")
    _token_id(st.get("pad_token_id"), vocab, "special_tokens.pad_token_id")
    eog = st.get("eog_token_ids")
    if not isinstance(eog, list):
        raise ModelFormatError("special_tokens.eog_token_ids must be a list")
    for t in eog:
        _token_id(t, vocab, "special_tokens.eog_token_ids[]", nullable=False)
    if not isinstance(st.get("add_bos_token"), bool):
        raise ModelFormatError("special_tokens.add_bos_token must be true or false")
    if not isinstance(meta["provenance"], dict):
        raise ModelFormatError("metadata 'provenance' must be an object")
    return config


def check_tensor_set(config: ModelConfig, tensors: dict) -> None:
    """`tensors`: name -> (type, shape). The set must match the config exactly."""
    want = expected_tensors(config)
    hd = config.head_dim
    for name, (ttype, shape) in tensors.items():
        if name == "rope_freqs.weight":
            if shape != (hd // 2,) or ttype != F32:
                raise ModelFormatError(f"rope_freqs.weight must be F32 [{hd // 2}], got "
                                       f"{TYPE_NAMES.get(ttype, ttype)} {list(shape)}")
            continue
        if name not in want:
            if name == "output.weight":
                raise ModelFormatError("output.weight present but config.tie_word_embeddings "
                                       "is true")
            raise ModelFormatError(f"unknown tensor {name!r} (config has "
                                   f"{config.num_hidden_layers} layers)")
        if tuple(shape) != want[name]:
            raise ModelFormatError(f"tensor {name!r} has shape {list(shape)}, the config "
                                   f"implies {list(want[name])}")
        if len(shape) == 1 and ttype != F32:
            raise ModelFormatError(f"tensor {name!r} is {TYPE_NAMES.get(ttype, ttype)}, "
                                   "norms must be F32")
        if ttype in QUANTIZED_TYPES and (len(shape) != 2 or shape[-1] % TYPES[ttype].block_elems):
            raise ModelFormatError(f"tensor {name!r}: {TYPE_NAMES[ttype]} only on 2-D "
                                   f"weights with cols % {TYPES[ttype].block_elems} == 0")
    missing = [n for n in want if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFormatError(f"tensor {missing[0]!r} is missing{more}")
