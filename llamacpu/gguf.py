"""A validating GGUF (v2/v3) reader with no dependency on the ``gguf`` package.

The file is memory-mapped read-only. Every length and count read from the file is
checked against the bytes that remain before anything is read or allocated, so a
hostile or truncated file raises :class:`llamacpu.errors.ModelFormatError` (with a
message naming the problem) and never another exception type.

Layout (little-endian)::

    magic "GGUF", u32 version, u64 tensor_count, u64 kv_count
    kv_count x  (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, u64 dims[n_dims] innermost first,
                    u32 ggml_type, u64 offset relative to the data section)
    padding to general.alignment (default 32)
    data section

Strings are a u64 byte length followed by UTF-8 bytes. Arrays are u32 item type,
u64 count, items.
"""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np

from .errors import ModelFormatError

__all__ = [
    "GGUFFile",
    "GGUFTensor",
    "GGML_TYPE_NAMES",
    "GGML_BLOCK_SIZES",
    "ggml_nbytes",
]

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_DEPTH = 3  # an array may hold arrays, which may hold arrays, no deeper
MAX_NESTED_ARRAY_ITEMS = 1 << 16  # arrays of arrays: bound the Python objects created
_INT64_MAX = (1 << 63) - 1

# GGML type id -> (name, elements per block, bytes per block). Values follow ggml's
# type_traits (note Q8_1 is 36 bytes: fp16 d, fp16 s, 32 int8).
_GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

#: GGML type id -> name ("F32", "Q4_1", ...)
GGML_TYPE_NAMES: dict[int, str] = {k: v[0] for k, v in _GGML_TYPES.items()}
#: GGML type id -> (elements per block, bytes per block)
GGML_BLOCK_SIZES: dict[int, tuple[int, int]] = {k: (v[1], v[2]) for k, v in _GGML_TYPES.items()}

# GGUF metadata value types
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32 = 0, 1, 2, 3, 4, 5, 6
T_BOOL, T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = 7, 8, 9, 10, 11, 12

_SCALAR_FORMATS: dict[int, tuple[str, str]] = {
    # type -> (struct format, numpy dtype)
    T_UINT8: ("<B", "<u1"),
    T_INT8: ("<b", "<i1"),
    T_UINT16: ("<H", "<u2"),
    T_INT16: ("<h", "<i2"),
    T_UINT32: ("<I", "<u4"),
    T_INT32: ("<i", "<i4"),
    T_FLOAT32: ("<f", "<f4"),
    T_BOOL: ("<B", "<u1"),
    T_UINT64: ("<Q", "<u8"),
    T_INT64: ("<q", "<i8"),
    T_FLOAT64: ("<d", "<f8"),
}
_VALUE_TYPE_NAMES = {
    T_UINT8: "uint8", T_INT8: "int8", T_UINT16: "uint16", T_INT16: "int16",
    T_UINT32: "uint32", T_INT32: "int32", T_FLOAT32: "float32", T_BOOL: "bool",
    T_STRING: "string", T_ARRAY: "array", T_UINT64: "uint64", T_INT64: "int64",
    T_FLOAT64: "float64",
}
# smallest encoded size of one value of each type (used to bound counts)
_MIN_VALUE_SIZE = {t: struct.calcsize(f) for t, (f, _) in _SCALAR_FORMATS.items()}
_MIN_VALUE_SIZE[T_STRING] = 8
_MIN_VALUE_SIZE[T_ARRAY] = 12
_MIN_KV_SIZE = 8 + 4 + 1  # empty key, type, one-byte value
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset
_HEADER_SIZE = 4 + 4 + 8 + 8
_U64 = struct.Struct("<Q")


def ggml_type_name(ggml_type: int) -> str:
    return GGML_TYPE_NAMES.get(ggml_type, f"unknown type {ggml_type}")


def ggml_nbytes(ggml_type: int, shape) -> int:
    """Bytes taken by a tensor of ``ggml_type`` and ``shape`` (numpy order, innermost last).

    Raises ModelFormatError for an unknown type, a non-positive dimension or an
    innermost dimension that is not a multiple of the type's block size.
    """
    try:
        blk, size = GGML_BLOCK_SIZES[int(ggml_type)]
    except (KeyError, TypeError, ValueError):
        raise ModelFormatError(f"unknown GGML tensor type {ggml_type!r}") from None
    shape = tuple(int(d) for d in shape)
    if not shape:
        raise ModelFormatError("tensor shape must have at least one dimension")
    n = 1
    for d in shape:
        if d <= 0:
            raise ModelFormatError(f"tensor dimension {d} must be > 0 (shape {shape})")
        n *= d
    if shape[-1] % blk:
        raise ModelFormatError(
            f"innermost dimension {shape[-1]} is not a multiple of the block size {blk} "
            f"of {GGML_TYPE_NAMES[int(ggml_type)]}"
        )
    return n // blk * size


class GGUFTensor:
    """One tensor of a GGUF file.

    name: str; type: GGML type id; shape: numpy order (outermost first, i.e. the
    GGUF dims reversed); offset: absolute file offset of the data; nbytes;
    data: read-only uint8 array (memory-mapped view of the raw bytes, len nbytes).
    """

    __slots__ = ("name", "type", "shape", "offset", "nbytes", "data")

    def __init__(self, name: str, type: int, shape: tuple, offset: int, nbytes: int, data):
        self.name = name
        self.type = type
        self.shape = shape
        self.offset = offset
        self.nbytes = nbytes
        self.data = data

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.type)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def __repr__(self) -> str:
        return (f"GGUFTensor({self.name!r}, {self.type_name}, shape={self.shape}, "
                f"offset={self.offset}, nbytes={self.nbytes})")


class _Cursor:
    """Bounds-checked little-endian reader over a buffer."""

    __slots__ = ("buf", "pos", "end", "path")

    def __init__(self, buf, pos: int, end: int, path: str):
        self.buf = buf
        self.pos = pos
        self.end = end
        self.path = path

    def fail(self, msg: str):
        raise ModelFormatError(f"{self.path}: {msg}")

    def remaining(self) -> int:
        return self.end - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.end - self.pos:
            self.fail(f"truncated file: {what} needs {n} bytes at offset {self.pos}, "
                      f"only {max(self.end - self.pos, 0)} left")

    def unpack(self, fmt: str, size: int, what: str):
        self.need(size, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return b

    def string(self, what: str) -> str:
        b = self.raw_string(what)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})")


class GGUFFile:
    """A parsed, validated GGUF file (v2 or v3), memory-mapped read-only.

    Attributes: path, version, kv (dict key -> value; scalars as int/float/bool/str,
    numeric arrays as numpy arrays, string arrays as list[str], arrays of arrays as
    lists), kv_types (key -> GGUF value type id of the top-level value), tensors
    (dict name -> GGUFTensor, file order), alignment, data_offset (absolute offset
    of the data section), file_size.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.version = 0
        self.kv: dict[str, object] = {}
        self.kv_types: dict[str, int] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        self.alignment = GGUF_DEFAULT_ALIGNMENT
        self.data_offset = 0
        self._mm = None
        self._buf = None
        with open(self.path, "rb") as f:
            self.file_size = os.fstat(f.fileno()).st_size
            if self.file_size < _HEADER_SIZE:
                with_magic = f.read(4)
                if len(with_magic) >= 4 and with_magic != GGUF_MAGIC:
                    raise ModelFormatError(f"{self.path}: not a GGUF file (bad magic {with_magic!r})")
                raise ModelFormatError(
                    f"{self.path}: truncated file: {self.file_size} bytes is smaller than "
                    f"the {_HEADER_SIZE}-byte GGUF header")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            # np.frombuffer holds a buffer export on the mmap, so the mapping cannot be
            # closed (mmap.close raises BufferError) while any tensor view is alive.
            # (np.ndarray(buffer=mm) would not, and a closed mapping would segfault.)
            # The chain is data.base -> self._buf, ._buf.base -> memoryview, .obj -> mmap.
            self._buf = np.frombuffer(self._mm, dtype=np.uint8)
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- context manager -------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def mmap(self):
        """The read-only mmap.mmap of the file (None once closed)."""
        return self._mm

    def close(self) -> None:
        """Drop this object's hold on the mapping. Tensor ``data`` arrays that are
        still referenced elsewhere keep the mapping alive until they go away."""
        self._buf = None
        for t in self.tensors.values():
            t.data = None
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views still exported; the mapping closes when they are gone

    # -- parsing ---------------------------------------------------------------
    def _parse(self) -> None:
        c = _Cursor(self._mm, 0, self.file_size, self.path)
        magic = bytes(self._mm[0:4])
        if magic != GGUF_MAGIC:
            c.fail(f"not a GGUF file (bad magic {magic!r})")
        c.pos = 4
        version = c.u32("version")
        if version == 1:
            c.fail("GGUF version 1 is not supported (only versions 2 and 3)")
        if version not in (2, 3):
            if version & 0xFFFF == 0 and (version >> 24) in (2, 3):
                c.fail("big-endian GGUF files are not supported")
            c.fail(f"unsupported GGUF version {version} (only versions 2 and 3)")
        self.version = version
        tensor_count = c.u64("tensor_count")
        kv_count = c.u64("kv_count")
        if kv_count > c.remaining() // _MIN_KV_SIZE:
            c.fail(f"kv_count {kv_count} is impossible for a file of {self.file_size} bytes")
        if tensor_count > c.remaining() // _MIN_TENSOR_INFO_SIZE:
            c.fail(f"tensor_count {tensor_count} is impossible for a file of {self.file_size} bytes")

        for i in range(kv_count):
            key = c.string(f"key of metadata entry {i}")
            if key in self.kv:
                c.fail(f"duplicate metadata key {key!r}")
            vtype = c.u32(f"value type of {key!r}")
            self.kv[key] = self._read_value(c, vtype, key, 0)
            self.kv_types[key] = vtype

        if "general.alignment" in self.kv:
            a = self.kv["general.alignment"]
            if self.kv_types["general.alignment"] not in (T_UINT8, T_UINT16, T_UINT32, T_UINT64,
                                                          T_INT8, T_INT16, T_INT32, T_INT64):
                c.fail("general.alignment must be an integer")
            if a <= 0 or a & (a - 1) or a > (1 << 30):
                c.fail(f"general.alignment {a} is not a power of two in 1..2^30")
            self.alignment = int(a)

        if tensor_count > c.remaining() // _MIN_TENSOR_INFO_SIZE:
            c.fail(f"tensor_count {tensor_count} is impossible: only {c.remaining()} bytes "
                   f"left for tensor infos")
        infos = []
        seen: set[str] = set()
        for i in range(tensor_count):
            name = c.string(f"name of tensor {i}")
            if not name:
                c.fail(f"tensor {i} has an empty name")
            if name in seen:
                c.fail(f"duplicate tensor name {name!r}")
            seen.add(name)
            n_dims = c.u32(f"n_dims of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                c.fail(f"tensor {name!r}: n_dims {n_dims} is not in 1..{MAX_DIMS}")
            c.need(8 * n_dims, f"dims of tensor {name!r}")
            dims = struct.unpack_from(f"<{n_dims}Q", self._mm, c.pos)
            c.pos += 8 * n_dims
            n = 1
            for d in dims:
                if d == 0:
                    c.fail(f"tensor {name!r}: dimension 0 in dims {list(dims)}")
                n *= d
                if n > _INT64_MAX:
                    c.fail(f"tensor {name!r}: element count overflows int64 (dims {list(dims)})")
            ttype = c.u32(f"type of tensor {name!r}")
            if ttype not in _GGML_TYPES:
                c.fail(f"tensor {name!r}: unknown GGML type {ttype}")
            blk, bsize = GGML_BLOCK_SIZES[ttype]
            if dims[0] % blk:
                c.fail(f"tensor {name!r}: innermost dimension {dims[0]} is not a multiple of "
                       f"the block size {blk} of {GGML_TYPE_NAMES[ttype]}")
            nbytes = n // blk * bsize
            offset = c.u64(f"offset of tensor {name!r}")
            if offset % self.alignment:
                c.fail(f"tensor {name!r}: offset {offset} is not a multiple of the "
                       f"alignment {self.alignment}")
            infos.append((name, ttype, tuple(int(d) for d in reversed(dims)), offset, nbytes))

        pad = (-c.pos) % self.alignment
        self.data_offset = c.pos + pad
        if infos:
            data_size = self.file_size - self.data_offset
            if data_size < 0:
                c.fail(f"truncated file: data section would start at {self.data_offset}, "
                       f"past the end of the file ({self.file_size} bytes)")
            for name, ttype, shape, offset, nbytes in infos:
                if offset > data_size or nbytes > data_size - offset:
                    c.fail(f"tensor {name!r}: data [{offset}, {offset + nbytes}) is out of the "
                           f"data section of {data_size} bytes (file truncated?)")
            spans = sorted((offset, offset + nbytes, name) for name, _, _, offset, nbytes in infos)
            for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
                if s1 < e0:
                    c.fail(f"tensors {n0!r} and {n1!r} overlap ([{s0}, {e0}) and [{s1}, {e1}))")
        for name, ttype, shape, offset, nbytes in infos:
            start = self.data_offset + offset
            data = self._buf[start:start + nbytes]
            self.tensors[name] = GGUFTensor(name, ttype, shape, start, nbytes, data)

    def _read_value(self, c: _Cursor, vtype: int, key: str, depth: int):
        if vtype in _SCALAR_FORMATS:
            fmt, _ = _SCALAR_FORMATS[vtype]
            size = _MIN_VALUE_SIZE[vtype]
            v = c.unpack(fmt, size, f"value of {key!r}")
            if vtype == T_BOOL:
                if v > 1:
                    c.fail(f"{key!r}: bool value {v} is not 0 or 1")
                return bool(v)
            return v
        if vtype == T_STRING:
            return c.string(f"value of {key!r}")
        if vtype == T_ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                c.fail(f"{key!r}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
            itype = c.u32(f"item type of array {key!r}")
            count = c.u64(f"length of array {key!r}")
            if itype not in _VALUE_TYPE_NAMES:
                c.fail(f"{key!r}: unknown array item type {itype}")
            if count > c.remaining() // _MIN_VALUE_SIZE[itype]:
                c.fail(f"{key!r}: array of {count} {_VALUE_TYPE_NAMES[itype]} items does not fit "
                       f"in the {c.remaining()} bytes left (truncated or corrupt file)")
            if itype in _SCALAR_FORMATS:
                dt = np.dtype(_SCALAR_FORMATS[itype][1])
                arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=c.pos).copy()
                c.pos += count * dt.itemsize
                if itype == T_BOOL:
                    if count and arr.max() > 1:
                        c.fail(f"{key!r}: bool array holds a value other than 0 or 1")
                    return arr.astype(np.bool_)
                return arr.astype(dt.newbyteorder("="), copy=False)
            if itype == T_STRING:
                return self._read_string_array(c, count, key)
            if count > MAX_NESTED_ARRAY_ITEMS:
                c.fail(f"{key!r}: array of {count} arrays is longer than the "
                       f"{MAX_NESTED_ARRAY_ITEMS} allowed")
            return [self._read_value(c, T_ARRAY, f"{key}[{j}]", depth + 1) for j in range(count)]
        c.fail(f"{key!r}: unknown metadata value type {vtype}")

    def _read_string_array(self, c: _Cursor, count: int, key: str) -> list:
        # hot path (vocabularies, merges): the same checks as _Cursor.string, inlined
        buf, pos, end = self._mm, c.pos, c.end
        unpack = _U64.unpack_from
        out = []
        append = out.append
        for j in range(count):
            if end - pos < 8:
                c.pos = pos
                c.need(8, f"length of item {j} of {key!r}")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos:
                c.pos = pos
                c.need(n, f"item {j} of {key!r} ({n} bytes)")
            b = buf[pos:pos + n]
            pos += n
            try:
                append(b.decode("utf-8"))
            except UnicodeDecodeError as e:
                c.fail(f"item {j} of {key!r} is not valid UTF-8 ({e.reason} at byte {e.start})")
        c.pos = pos
        return out

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, version={self.version}, {len(self.kv)} keys, "
                f"{len(self.tensors)} tensors)")
