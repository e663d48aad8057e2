# cython: language_level=3
"""Thin binding of the C core (csrc/llamacpu.h).

Python-facing functions allocate their outputs; the GIL is released around
every kernel and around the forward pass.
"""
from libc.stdint cimport int32_t, int64_t, uint16_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset

import numpy as np
cimport numpy as cnp

cnp.import_array()


from . import format as _fmt

# The type table agrees between C (csrc/quants.h lc_types) and Python (format.TYPES):
# ids, names, block sizes and x8 headers are defined once on each side and checked here.
assert LC_N_TYPES == 15 and len(_fmt.TYPES) == LC_N_TYPES
for _i in range(LC_N_TYPES):
    _t = _fmt.TYPES[lc_types[_i].type]
    assert (_t.name, _t.block_elems, _t.block_bytes, _t.hdr, _t.row_major) == (
        lc_types[_i].name.decode(), lc_types[_i].block_elems, lc_types[_i].block_bytes,
        tuple(lc_types[_i].hdr[h] for h in range(lc_types[_i].n_hdr)), bool(lc_types[_i].row_major)), _t
assert (QK, QK_K, LC_LAYOUT_ROWS, LC_LAYOUT_X8) == (_fmt.QK, _fmt.QK_K, _fmt.LAYOUT_ROW_MAJOR, _fmt.LAYOUT_X8)
assert sizeof(block_q8a) == 64
F32, F16, Q6_0 = _fmt.F32, _fmt.F16, _fmt.Q6_0
QUANTIZED = tuple(sorted(_fmt.QUANTIZED_TYPES))

#: numpy view of the C activation block (block_q8a)
Q8A_DTYPE = np.dtype([("qs", "i1", (32,)), ("d", "<f4", (4,)), ("s", "<f4"), ("s16", "<f4", (2,)),
                      ("pad", "<f4")])
#: numpy view of the AMX int8 activation block (block_q16a): x = d (256 hi + lo)
Q16A_DTYPE = np.dtype([("hi", "i1", (32,)), ("lo", "u1", (32,)), ("d", "<f4"), ("s", "<f4"), ("s16", "<f4", (2,))])


def row_bytes(int type, int64_t cols):
    cdef int64_t r = lc_row_bytes(type, cols)
    if r < 0:
        raise ValueError(f"unknown tensor type {type}")
    return r


cdef const lc_kernels *_kernels(impl) except NULL:
    cdef const lc_kernels *k
    if impl is None:
        return lc_kernels_best()
    k = lc_kernels_by_name(impl.encode())
    if k == NULL:
        raise ValueError(f"kernels {impl!r} are not available on this CPU/build (have: {available_kernels()})")
    return k


def available_kernels():
    """Names of the kernel tables this CPU can run, best last."""
    return [n for n in ("scalar", "avx2", "avx512vnni", "avx512amx", "neon", "neon-dotprod")
            if lc_kernels_by_name(n.encode()) != NULL]


def best_kernels():
    """The kernel table the engine picks (honours LLAMACPU_KERNELS)."""
    return lc_kernels_best().name.decode()


# ------------------------------------------------------------ weight quantizers

def quantize(x, int type):
    """Scalar reference quantizer (ggml's quantize_row_*_ref): float32 (rows, cols) -> uint8 (rows, row_bytes)."""
    cdef cnp.ndarray[cnp.float32_t, ndim=2, mode="c"] a = np.ascontiguousarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError("quantize expects a 2-D array")
    cdef int64_t rows = a.shape[0], cols = a.shape[1], i
    if type not in QUANTIZED:
        raise ValueError(f"quantize: type {type} is not a quantized type")
    cdef int64_t per = _fmt.TYPES[type].block_elems
    if cols % per:
        raise ValueError(f"quantize: {cols} columns is not a multiple of {per}")
    cdef int64_t rb = lc_row_bytes(type, cols)
    cdef cnp.ndarray[cnp.uint8_t, ndim=2, mode="c"] out = np.empty((rows, rb), dtype=np.uint8)
    cdef const float *src = <const float *>a.data
    cdef unsigned char *dst = <unsigned char *>out.data
    cdef int rc = 0
    with nogil:
        for i in range(rows):
            rc = lc_quantize_row_ref(type, src + i * cols, dst + i * rb, cols)
            if rc != 0:
                break
    if rc != 0:
        raise ValueError(f"quantize: no quantizer for {_fmt.TYPE_NAMES[type]}")
    return out


def dequantize(raw, int type, int64_t cols, impl="scalar"):
    """Rows of `type` (uint8 (rows, row_bytes), or uint16 / float32 (rows, cols)) -> float32 (rows, cols)."""
    cdef const lc_kernels *k = _kernels(impl)
    cdef int64_t rb = row_bytes(type, cols)
    if cols % _fmt.TYPES[type].block_elems:
        raise ValueError(f"dequantize: {cols} columns is not a multiple of {_fmt.TYPES[type].block_elems}")
    b = np.ascontiguousarray(raw).view(np.uint8)
    if b.size % rb:
        raise ValueError("dequantize: data is not a whole number of rows")
    cdef cnp.ndarray[cnp.uint8_t, ndim=1, mode="c"] flat = b.reshape(-1)
    cdef int64_t rows = flat.shape[0] // rb, i
    cdef cnp.ndarray[cnp.float32_t, ndim=2, mode="c"] out = np.empty((rows, cols), dtype=np.float32)
    cdef const unsigned char *src = <const unsigned char *>flat.data
    cdef float *dst = <float *>out.data
    with nogil:
        for i in range(rows):
            k.dequantize_row(type, src + i * rb, dst + i * cols, cols)
    return out


# ------------------------------------------------------------ kernels, for tests

def quantize_act(x, impl=None):
    """float32 (n,) -> q8a blocks (n/32,) as a Q8A_DTYPE structured array."""
    cdef const lc_kernels *k = _kernels(impl)
    cdef cnp.ndarray[cnp.float32_t, ndim=1, mode="c"] a = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    cdef int64_t n = a.shape[0]
    if n % 32:
        raise ValueError("quantize_act: length must be a multiple of 32")
    out = np.zeros(n // 32, dtype=Q8A_DTYPE)
    cdef cnp.ndarray[cnp.uint8_t, ndim=1, mode="c"] ob = out.view(np.uint8)
    with nogil:
        k.quantize_act(<const float *>a.data, <block_q8a *>ob.data, n)
    return out


def quantize_act16(x, impl="avx512amx"):
    """float32 (n,) -> q16a blocks (n/32,) as a Q16A_DTYPE structured array (the table's
    quantize_act16: avx512amx only)."""
    cdef const lc_kernels *k = _kernels(impl)
    cdef cnp.ndarray[cnp.float32_t, ndim=1, mode="c"] a = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    cdef int64_t n = a.shape[0]
    if n % 32:
        raise ValueError("quantize_act16: length must be a multiple of 32")
    if k.quantize_act16 == NULL:
        raise ValueError(f"kernels {k.name.decode()!r} have no quantize_act16 (only avx512amx)")
    out = np.zeros(n // 32, dtype=Q16A_DTYPE)
    cdef cnp.ndarray[cnp.uint8_t, ndim=1, mode="c"] ob = out.view(np.uint8)
    with nogil:
        k.quantize_act16(<const float *>a.data, <block_q16a *>ob.data, n)
    return out


def gemm(w, int type, int64_t rows, int64_t cols, x, impl=None, int layout=0):
    """Y (nt, rows) = X (nt, cols) @ W^T with W stored in `type` (raw bytes as stored in a model
    file; layout 1 = x8 block groups, rows % 8 == 0).

    For quantized W, X is first quantized to q8a with the same kernel table."""
    cdef const lc_kernels *k = _kernels(impl)
    cdef cnp.ndarray[cnp.float32_t, ndim=2, mode="c"] X = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, cols)
    cdef int nt = X.shape[0]
    cdef int64_t rb = row_bytes(type, cols)
    cdef cnp.ndarray[cnp.uint8_t, ndim=1, mode="c"] W = np.ascontiguousarray(w).view(np.uint8).reshape(-1)
    if W.shape[0] != rows * rb:
        raise ValueError("gemm: weight size does not match rows x cols")
    if cols % _fmt.TYPES[type].block_elems:
        raise ValueError(f"gemm: cols must be a multiple of {_fmt.TYPES[type].block_elems} for this type")
    if layout == 1 and rows % 8:
        raise ValueError("gemm: layout 1 (x8) needs rows % 8 == 0")
    cdef lc_gemm g = lc_gemm_of(k, type, layout)
    if g.q == NULL and g.f == NULL:
        raise ValueError(f"gemm: no kernel for {_fmt.TYPE_NAMES[type]} in layout {layout}")
    cdef cnp.ndarray[cnp.float32_t, ndim=2, mode="c"] Y = np.zeros((nt, rows), dtype=np.float32)
    cdef cnp.ndarray[cnp.uint8_t, ndim=1, mode="c"] XQ
    cdef block_q8a *xq = NULL
    cdef int t
    if g.q != NULL:
        XQ = np.zeros(nt * (cols // 32) * sizeof(block_q8a), dtype=np.uint8)
        xq = <block_q8a *>XQ.data
    with nogil:
        if g.q != NULL:
            for t in range(nt):
                k.quantize_act(<const float *>X.data + t * cols, xq + t * (cols // 32), cols)
            g.q(W.data, cols, xq, nt, <float *>Y.data, rows, 0, rows)
        else:
            g.f(W.data, cols, <const float *>X.data, nt, <float *>Y.data, rows, 0, rows)
    return Y


AMX_MIN_TOKENS = LC_AMX_MIN_TOKENS


def has_amx(impl=None):
    """Whether the kernel table has the AMX prefill gemm (the avx512amx table)."""
    return _kernels(impl).gemm_amx != NULL


def gemm_amx(w, int type, int64_t rows, int64_t cols, x, impl="avx512amx", int64_t r0=0, int64_t r1=-1, int terms=2):
    """Y (nt, rows) = X (nt, cols) @ W^T on AMX: W in the x8 layout, X as two bf16 terms (the
    table's act_to_amx); rows [r0, r1) computed (multiples of 8), the others left 0."""
    cdef const lc_kernels *k = _kernels(impl)
    if k.gemm_amx == NULL:
        raise ValueError(f"kernels {k.name.decode()!r} have no AMX gemm (only avx512amx)")
    if r1 < 0:
        r1 = rows
    cdef cnp.ndarray[cnp.float32_t, ndim=2, mode="c"] X = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, cols)
    cdef int nt = X.shape[0], t
    cdef cnp.ndarray[cnp.uint8_t, ndim=1, mode="c"] W = np.ascontiguousarray(w).view(np.uint8).reshape(-1)
    if type not in QUANTIZED or rows % 8 or cols % _fmt.TYPES[type].block_elems or W.shape[0] != rows * row_bytes(type, cols):
        raise ValueError("gemm_amx: a quantized W in the x8 layout (rows % 8 == 0) of rows x cols")
    if terms not in (1, 2):
        raise ValueError("gemm_amx: terms is 1 or 2")
    if r0 < 0 or r0 > r1 or r1 > rows or r0 % 8 or r1 % 8:
        raise ValueError("gemm_amx: r0 <= r1 <= rows, multiples of 8")
    cdef int ntp = (nt + 31) // 32 * 32
    cdef cnp.ndarray[cnp.uint16_t, ndim=1, mode="c"] XB = np.zeros(LC_AMX_ACT(nt, cols), dtype=np.uint16)
    cdef cnp.ndarray[cnp.uint8_t, ndim=1, mode="c"] S = np.empty(LC_AMX_SCRATCH(cols), dtype=np.uint8)
    cdef cnp.ndarray[cnp.float32_t, ndim=2, mode="c"] Y = np.zeros((nt, rows), dtype=np.float32)
    with nogil:
        for t in range(nt):  # the padding tokens stay zero
            k.act_to_amx(<uint16_t *>XB.data, <const float *>X.data + t * cols, cols, t)
        k.gemm_amx(type, terms, W.data, cols, <const uint16_t *>XB.data, nt, <float *>Y.data, rows, r0, r1, S.data)
    return Y


AMX_I8_MIN_TOKENS = LC_AMX_I8_MIN_TOKENS


def gemm_amx_i8(w, int type, int64_t rows, int64_t cols, xq, impl="avx512amx", int64_t r0=0, int64_t r1=-1):
    """Y (nt, rows) = X W^T on AMX int8 tiles: W quantized in the x8 layout, X as q16a blocks
    (nt, cols/32) (quantize_act16's arrays); rows [r0, r1) computed (multiples of 8), the
    others left 0."""
    cdef const lc_kernels *k = _kernels(impl)
    cdef cnp.ndarray[cnp.uint8_t, ndim=1, mode="c"] W = np.ascontiguousarray(w).view(np.uint8).reshape(-1)
    q = np.ascontiguousarray(xq, dtype=Q16A_DTYPE)
    cdef int nt = q.shape[0] if q.ndim == 2 else 0
    if r1 < 0:
        r1 = rows
    if type not in QUANTIZED or rows % 8 or cols % _fmt.TYPES[type].block_elems or W.shape[0] != rows * row_bytes(type, cols):
        raise ValueError("gemm_amx_i8: a quantized W in the x8 layout (rows % 8 == 0) of rows x cols")
    if q.ndim != 2 or q.shape[1] != cols // 32 or nt < 1:
        raise ValueError("gemm_amx_i8: xq is (nt, cols / 32) q16a blocks")
    if r0 < 0 or r0 > r1 or r1 > rows or r0 % 8 or r1 % 8:
        raise ValueError("gemm_amx_i8: r0 <= r1 <= rows, multiples of 8")
    cdef lc_gemm_q16a g = k.gemm_amx_i8[lc_type_index(type)] if k.quantize_act16 != NULL else NULL
    if g == NULL:
        raise ValueError(f"gemm_amx_i8: no int8 tiles for {_fmt.TYPE_NAMES[type]} in kernels {k.name.decode()!r}")
    cdef cnp.ndarray[cnp.uint8_t, ndim=1, mode="c"] XQ = q.view(np.uint8).reshape(-1)
    cdef cnp.ndarray[cnp.float32_t, ndim=2, mode="c"] Y = np.zeros((nt, rows), dtype=np.float32)
    with nogil:
        g(W.data, cols, <const block_q16a *>XQ.data, nt, <float *>Y.data, rows, r0, r1)
    return Y


def rmsnorm(x, w, float eps, impl=None):
    cdef const lc_kernels *k = _kernels(impl)
    cdef cnp.ndarray[cnp.float32_t, ndim=1, mode="c"] a = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    cdef cnp.ndarray[cnp.float32_t, ndim=1, mode="c"] b = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    if a.shape[0] != b.shape[0]:
        raise ValueError("rmsnorm: x and w differ in length")
    cdef cnp.ndarray[cnp.float32_t, ndim=1, mode="c"] out = np.empty_like(a)
    with nogil:
        k.rmsnorm(<float *>out.data, <const float *>a.data, <const float *>b.data, a.shape[0], eps)
    return out


def rope(x, int pos, inv_freq, impl=None):
    """x float32 (n_heads, head_dim), adjacent pairs; returns the rotated copy."""
    cdef const lc_kernels *k = _kernels(impl)
    cdef cnp.ndarray[cnp.float32_t, ndim=2, mode="c"] a = np.array(x, dtype=np.float32, order="C", ndmin=2)
    cdef cnp.ndarray[cnp.float32_t, ndim=1, mode="c"] f = np.ascontiguousarray(inv_freq, dtype=np.float32).reshape(-1)
    cdef int hd = a.shape[1]
    if hd % 2 or hd > 1024 or f.shape[0] != hd // 2:
        raise ValueError("rope: head_dim must be even, <= 1024, and inv_freq head_dim/2 long")
    with nogil:
        k.rope(<float *>a.data, a.shape[0], hd, pos, <const float *>f.data)
    return a


def kv_store(x, int type, impl=None):
    """x float32 (rows, hd) -> uint8 (rows, row bytes): each row as the KV cache stores it
    (lc_kv_store: F16, Q8_0 or Q4_0)."""
    cdef const lc_kernels *k = _kernels(impl)
    cdef cnp.ndarray[cnp.float32_t, ndim=2, mode="c"] a = np.array(x, dtype=np.float32, order="C", ndmin=2)
    cdef int rows = a.shape[0], hd = a.shape[1], i
    if not lc_kv_type_ok(type, hd):
        raise ValueError(f"KV cache type {type} with head_dim {hd}: F16, or Q8_0/Q4_0 with head_dim % 32 == 0")
    cdef int64_t rb = lc_row_bytes(type, hd)
    cdef cnp.ndarray[cnp.uint8_t, ndim=2, mode="c"] out = np.empty((rows, rb), dtype=np.uint8)
    with nogil:
        for i in range(rows):
            lc_kv_store(k, type, <unsigned char *>out.data + i * rb, <const float *>a.data + <int64_t>i * hd, hd)
    return out


def attention(q, kcache, vcache, int type_k, int type_v, seq, pos, int n_kv_heads, int n_threads=1, impl=None):
    """The attention of one layer (lc_attention): q float32 (nt, n_heads, hd); kcache and
    vcache uint8 (n_seq, n_kv_heads, n_ctx, row bytes) as kv_store writes rows; token t of
    sequence seq[t] sees its positions [0, pos[t]]. -> float32 (nt, n_heads, hd)."""
    cdef const lc_kernels *k = _kernels(impl)
    cdef cnp.ndarray[cnp.float32_t, ndim=3, mode="c"] Q = np.ascontiguousarray(q, dtype=np.float32)
    cdef cnp.ndarray[cnp.uint8_t, ndim=4, mode="c"] KC = np.ascontiguousarray(kcache, dtype=np.uint8)
    cdef cnp.ndarray[cnp.uint8_t, ndim=4, mode="c"] VC = np.ascontiguousarray(vcache, dtype=np.uint8)
    cdef cnp.ndarray[cnp.int32_t, ndim=1, mode="c"] S = np.ascontiguousarray(seq, dtype=np.int32).reshape(-1)
    cdef cnp.ndarray[cnp.int32_t, ndim=1, mode="c"] P = np.ascontiguousarray(pos, dtype=np.int32).reshape(-1)
    cdef int nt = Q.shape[0], nh = Q.shape[1], hd = Q.shape[2], rc
    cdef lc_attn a
    if not (lc_kv_type_ok(type_k, hd) and lc_kv_type_ok(type_v, hd)):
        raise ValueError("attention: KV types must be F16, or Q8_0/Q4_0 with head_dim % 32 == 0")
    if nt < 1 or n_kv_heads < 1 or nh % n_kv_heads or S.shape[0] != nt or P.shape[0] != nt or n_threads < 1:
        raise ValueError("attention: shapes do not agree")
    if KC.shape[1] != n_kv_heads or KC.shape[3] != lc_row_bytes(type_k, hd) or VC.shape[3] != lc_row_bytes(type_v, hd) \
            or VC.shape[0] != KC.shape[0] or VC.shape[1] != n_kv_heads or VC.shape[2] != KC.shape[2]:
        raise ValueError("attention: cache shapes do not agree with the types and head_dim")
    if np.any(S < 0) or np.any(S >= KC.shape[0]) or np.any(P < 0) or np.any(P >= KC.shape[2]):
        raise ValueError("attention: seq or pos outside the cache")
    cdef cnp.ndarray[cnp.float32_t, ndim=1, mode="c"] scratch = np.empty(
        n_threads * lc_attention_scratch(hd, nh, n_kv_heads), dtype=np.float32)
    cdef cnp.ndarray[cnp.float32_t, ndim=3, mode="c"] out = np.empty((nt, nh, hd), dtype=np.float32)
    a.k = k; a.n_heads = nh; a.n_kv_heads = n_kv_heads; a.head_dim = hd; a.n_ctx = KC.shape[2]
    a.type_k = type_k; a.type_v = type_v
    a.kcache = <const unsigned char *>KC.data; a.vcache = <const unsigned char *>VC.data
    a.row_k = KC.shape[3]; a.row_v = VC.shape[3]; a.scratch = <float *>scratch.data
    a.pool = lc_pool_new(n_threads)
    if a.pool == NULL:
        raise MemoryError("attention: out of memory")
    with nogil:
        rc = lc_attention(&a, <const float *>Q.data, <const int32_t *>S.data, <const int32_t *>P.data, nt,
                          <float *>out.data)
        lc_pool_free(a.pool)
    if rc != LC_OK:
        raise MemoryError("attention: out of memory")
    return out


def f32_to_f16(x, impl=None):
    cdef const lc_kernels *k = _kernels(impl)
    cdef cnp.ndarray[cnp.float32_t, ndim=1, mode="c"] a = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    cdef cnp.ndarray[cnp.uint16_t, ndim=1, mode="c"] out = np.empty(a.shape[0], dtype=np.uint16)
    with nogil:
        k.f32_to_f16(<uint16_t *>out.data, <const float *>a.data, a.shape[0])
    return out


def swiglu(a, b, impl=None):
    cdef const lc_kernels *k = _kernels(impl)
    cdef cnp.ndarray[cnp.float32_t, ndim=1, mode="c"] x = np.array(a, dtype=np.float32, order="C").reshape(-1)
    cdef cnp.ndarray[cnp.float32_t, ndim=1, mode="c"] y = np.ascontiguousarray(b, dtype=np.float32).reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise ValueError("swiglu: lengths differ")
    with nogil:
        k.swiglu(<float *>x.data, <const float *>y.data, x.shape[0])
    return x


# ------------------------------------------------------------ engine

cdef lc_tensor _tensor(spec) except *:
    """spec = (address, type, rows, cols, layout) of a validated tensor."""
    cdef lc_tensor t
    t.data = <const void *><uintptr_t>spec[0]
    t.type = spec[1]
    t.rows = spec[2]
    t.cols = spec[3]
    t.layout = spec[4] if len(spec) > 4 else 0
    if t.layout == 1 and (t.type not in QUANTIZED or t.rows % 8):
        raise ValueError("the x8 layout needs a quantized tensor with rows % 8 == 0")
    return t  # lc_model_new checks that the kernels have (type, layout)


cdef lc_config _config(cfg, int n_ctx, int n_seq, int n_batch, int n_threads, int type_k, int type_v):
    """cfg: a format.ModelConfig"""
    cdef lc_config c
    c.vocab_size = cfg.vocab_size; c.dim = cfg.hidden_size; c.hidden_dim = cfg.intermediate_size
    c.n_layers = cfg.num_hidden_layers; c.n_heads = cfg.num_attention_heads; c.n_kv_heads = cfg.num_key_value_heads
    c.head_dim = cfg.head_dim; c.norm_eps = cfg.rms_norm_eps
    c.n_ctx = n_ctx; c.n_seq = n_seq; c.n_batch = n_batch; c.n_threads = n_threads
    c.type_k = type_k; c.type_v = type_v
    return c


def model_bytes(cfg, int n_ctx, int n_seq, int n_batch, int n_threads, kernels=None, int type_k=LC_TYPE_F16,
                int type_v=LC_TYPE_F16):
    """(bytes Engine(...) allocates with these settings, bytes per extra thread):
    lc_model_bytes, the same sums lc_model_new allocates. cfg: a format.ModelConfig; type_k, type_v: the KV cache's
    types (F16, Q8_0, Q4_0)."""
    cdef lc_config c = _config(cfg, n_ctx, n_seq, n_batch, n_threads, type_k, type_v)
    cdef int64_t per_thread = 0
    cdef int64_t total = lc_model_bytes(&c, _kernels(kernels), &per_thread)
    if total < 0:
        raise ValueError("invalid engine configuration")
    return total, per_thread


cdef class Engine:
    """The C model. Built from validated tensor addresses (the caller keeps the
    mmap alive in `keepalive`). Not thread-safe: callers serialise."""
    cdef lc_model *m
    cdef readonly object keepalive
    cdef readonly int vocab_size, n_ctx, n_seq, n_threads

    def __cinit__(self, cfg, dict tensors, layers, inv_freq, int n_ctx, int n_batch, int n_threads,
                  kernels=None, keepalive=None, int n_seq=1, int type_k=LC_TYPE_F16, int type_v=LC_TYPE_F16):
        cdef lc_config c = _config(cfg, n_ctx, n_seq, n_batch, n_threads, type_k, type_v)
        cdef lc_weights w
        cdef char err[256]
        cdef int i, nl = cfg.num_hidden_layers
        cdef const lc_kernels *k = _kernels(kernels)
        cdef cnp.ndarray[cnp.float32_t, ndim=1, mode="c"] f = np.ascontiguousarray(inv_freq, dtype=np.float32)
        if len(layers) != nl:
            raise ValueError("layers and n_layers disagree")
        if f.shape[0] != c.head_dim // 2:
            raise ValueError("inv_freq must have head_dim/2 entries")
        memset(&w, 0, sizeof(w))
        w.tok_embeddings = _tensor(tensors["tok_embeddings"])
        w.output = _tensor(tensors["output"])
        w.norm = <const float *><uintptr_t>tensors["norm"]
        w.inv_freq = <const float *>f.data
        w.layers = <lc_layer_weights *>malloc(sizeof(lc_layer_weights) * nl)
        if w.layers == NULL:
            raise MemoryError()
        try:
            for i in range(nl):
                L = layers[i]
                w.layers[i].attention_norm = <const float *><uintptr_t>L["attention_norm"]
                w.layers[i].ffn_norm = <const float *><uintptr_t>L["ffn_norm"]
                w.layers[i].wq = _tensor(L["wq"]); w.layers[i].wk = _tensor(L["wk"])
                w.layers[i].wv = _tensor(L["wv"]); w.layers[i].wo = _tensor(L["wo"])
                w.layers[i].w1 = _tensor(L["w1"]); w.layers[i].w2 = _tensor(L["w2"])
                w.layers[i].w3 = _tensor(L["w3"])
            with nogil:
                self.m = lc_model_new(&c, &w, k, err, sizeof(err))
        finally:
            free(w.layers)
        if self.m == NULL:
            raise MemoryError(err.decode())
        self.keepalive = keepalive
        self.vocab_size = c.vocab_size
        self.n_ctx = n_ctx
        self.n_seq = n_seq
        self.n_threads = n_threads

    def __dealloc__(self):
        if self.m != NULL:
            lc_model_free(self.m)
            self.m = NULL

    @property
    def kernels(self):
        return lc_model_kernels(self.m).name.decode()

    def set_threads(self, int n):
        if n < 1:
            raise ValueError("n_threads must be >= 1")
        lc_model_set_threads(self.m, n)
        self.n_threads = n

    def forward(self, tokens, int pos, bint all_logits=False):
        """tokens int32 (n,) at positions [pos, pos+n) -> float32 logits ((n, vocab) or (vocab,))."""
        cdef cnp.ndarray[cnp.int32_t, ndim=1, mode="c"] t = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        cdef int n = t.shape[0], rc
        cdef cnp.ndarray[cnp.float32_t, ndim=2, mode="c"] out
        if all_logits:
            out = np.empty((n, self.vocab_size), dtype=np.float32)
        else:
            out = np.empty((1, self.vocab_size), dtype=np.float32)
        with nogil:
            rc = lc_forward(self.m, <const int32_t *>t.data, n, pos, <float *>out.data, all_logits)
        if rc == LC_E_CTX:
            raise OverflowError(f"positions {pos}..{pos + n - 1} do not fit the context of {self.n_ctx} tokens")
        if rc == LC_E_TOKEN:
            raise ValueError(f"token id outside [0, {self.vocab_size})")
        if rc == LC_E_MEM:
            raise MemoryError("out of memory in attention")
        if rc != LC_OK:
            raise ValueError("forward needs at least one token and pos >= 0")
        return out if all_logits else out[0]

    def forward_batch(self, tokens, seq, pos, want):
        """One step of several sequences: token i of sequence seq[i] at position pos[i]
        (int32 (n,) each); want (n,) bool. -> float32 logits (want.sum(), vocab), rows in
        token order (lc_forward_batch: the caller keeps each sequence's earlier positions
        in the cache, and no (seq, pos) twice)."""
        cdef cnp.ndarray[cnp.int32_t, ndim=1, mode="c"] t = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        cdef cnp.ndarray[cnp.int32_t, ndim=1, mode="c"] s = np.ascontiguousarray(seq, dtype=np.int32).reshape(-1)
        cdef cnp.ndarray[cnp.int32_t, ndim=1, mode="c"] p = np.ascontiguousarray(pos, dtype=np.int32).reshape(-1)
        cdef cnp.ndarray[cnp.int8_t, ndim=1, mode="c"] w = np.ascontiguousarray(want, dtype=np.int8).reshape(-1)
        cdef int n = t.shape[0], rc
        if s.shape[0] != n or p.shape[0] != n or w.shape[0] != n:
            raise ValueError("tokens, seq, pos and want must have the same length")
        cdef cnp.ndarray[cnp.float32_t, ndim=2, mode="c"] out = np.empty((int(np.count_nonzero(w)), self.vocab_size),
                                                                      dtype=np.float32)
        with nogil:
            rc = lc_forward_batch(self.m, <const int32_t *>t.data, <const int32_t *>s.data, <const int32_t *>p.data,
                                  <const int8_t *>w.data, n, <float *>out.data)
        if rc == LC_E_CTX:
            raise OverflowError(f"a position is outside the context of {self.n_ctx} tokens")
        if rc == LC_E_TOKEN:
            raise ValueError(f"token id outside [0, {self.vocab_size})")
        if rc == LC_E_MEM:
            raise MemoryError("out of memory in attention")
        if rc != LC_OK:
            raise ValueError(f"a batch needs at least one token, positions >= 0 and sequences in [0, {self.n_seq})")
        return out

    def seq_copy(self, int src, int dst, int n_pos):
        """Sequence dst's positions [0, n_pos) of K/V become a copy of src's."""
        if lc_seq_copy(self.m, src, dst, n_pos) != LC_OK:
            raise ValueError(f"seq_copy({src}, {dst}, {n_pos}): sequences must be in [0, {self.n_seq}) and "
                             f"n_pos in [0, {self.n_ctx}]")
