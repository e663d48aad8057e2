"""Every kernel against an independent NumPy reference (scalar C) and every SIMD
table against the scalar one, property-tested over odd sizes.

Tolerances (named): SIMD_REL bounds the SIMD-vs-scalar difference, which comes
from summation order only; REF_REL bounds scalar C against float64 NumPy.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from llamacpu import _core
from llamacpu import format as fmt

gguf = pytest.importorskip("gguf")  # test-only dependency, installed by .ci/run
from gguf import GGMLQuantizationType as GT, quants  # noqa: E402

SIMD_REL = 2e-5   # |simd - scalar| / the magnitudes summed (sum |w| |x|), per output
REF_REL = 2e-5    # |scalar - numpy| / the magnitudes summed, per output; elsewhere / max |numpy|
SIMD = [k for k in _core.available_kernels() if k != "scalar"]
QTYPES = {fmt.Q4_0: GT.Q4_0, fmt.Q4_1: GT.Q4_1, fmt.Q8_0: GT.Q8_0}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def assert_within_magnitudes(got, ref, w, x, tol):
    """got and ref (nt, rows) agree within tol of the magnitudes each output sums, sum |w| |x|:
    a dot product may cancel far below its terms (a sparse row against one token did: 2.2e-5
    of max |y|; a Q4_1 row 2.6e-5), so a bound relative to max |y| is flaky. w: the
    dequantized weights (rows, cols), x: the activations (nt, cols)."""
    mag = np.abs(np.asarray(w, np.float64)) @ np.abs(np.asarray(x, np.float64)).T
    assert np.all(np.abs(np.asarray(got, np.float64) - ref) <= tol * mag.T + 1e-30)


def assert_summation_order_only(got, ref, w, x):
    """SIMD against scalar: they differ by summation order only."""
    assert_within_magnitudes(got, ref, w, x, SIMD_REL)


@st.composite
def matrices(draw, max_rows=9, max_blocks=9):
    rows = draw(st.integers(1, max_rows))
    cols = 32 * draw(st.integers(1, max_blocks))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["normal", "uniform", "sparse", "wide"]))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    if kind == "uniform":
        x = rng.uniform(-3, 3, (rows, cols)).astype(np.float32)
    elif kind == "sparse":
        x[rng.random((rows, cols)) < 0.7] = 0.0
    elif kind == "wide":
        x *= np.exp(rng.uniform(-8, 8, (rows, 1))).astype(np.float32)
    return x


def test_simd_is_available_on_this_machine():
    import platform
    if platform.machine() in ("x86_64", "AMD64"):
        flags = open("/proc/cpuinfo").read()
        if " avx2 " in flags and " fma " in flags and " f16c " in flags:
            assert "avx2" in _core.available_kernels()
            vnni = all(f" {f} " in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"))
            assert ("avx512vnni" in _core.available_kernels()) == vnni
            amx = vnni and all(f" {f} " in flags for f in ("amx_tile", "amx_bf16", "avx512_bf16"))
            # avx512amx also needs the OS's permission to use the tiles: its absence is allowed
            best = ("avx512amx", "avx512vnni") if amx else ("avx512vnni",) if vnni else ("avx2",)
            assert _core.best_kernels() in best + ("scalar",)  # scalar only when forced by LLAMACPU_KERNELS


@SETTINGS
@given(matrices(), st.sampled_from(sorted(QTYPES)))
def test_quantize_matches_gguf_reference(x, t):
    ours = _core.quantize(x, t)
    ref = quants.quantize(x, QTYPES[t])
    assert ours.tobytes() == ref.tobytes()
    np.testing.assert_array_equal(_core.dequantize(ours, t, x.shape[1]), quants.dequantize(ref, QTYPES[t]))


def test_quantize_edge_blocks():
    x = np.zeros((4, 64), np.float32)
    x[1] = 1.0                   # constant block
    x[2, :32] = -7.5             # negative constant
    x[3] = np.linspace(-1e4, 1e4, 64, dtype=np.float32)
    for t, gt in QTYPES.items():
        assert _core.quantize(x, t).tobytes() == quants.quantize(x, gt).tobytes()


@pytest.mark.parametrize("impl", SIMD)
@SETTINGS
@given(x=matrices())
def test_dequantize_simd_matches_scalar(impl, x):
    for t in QTYPES:
        q = _core.quantize(x, t)
        np.testing.assert_array_equal(_core.dequantize(q, t, x.shape[1], impl), _core.dequantize(q, t, x.shape[1], "scalar"))
    h = x.astype(np.float16)
    np.testing.assert_array_equal(_core.dequantize(h, fmt.F16, x.shape[1], impl), h.astype(np.float32))


def q8a_numpy(x):
    """Independent model of the activation quantizer: per group of 8 (group g of a
    32-element block is elements 4g..4g+3 and 16+4g..16+4g+3), f32 scale amax/127,
    round half to even. Returns (d (n/32, 4), q (n/32, 32))."""
    g = x.astype(np.float32).reshape(-1, 2, 4, 4)  # [block, half, group, element]
    d = (np.abs(g).max(axis=(1, 3)) / np.float32(127)).astype(np.float32)
    d[d < np.finfo(np.float32).tiny] = 0  # 1/d would overflow: such a group quantizes to 0
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint(g * inv[:, None, :, None]).astype(np.int8)
    return d, q.reshape(-1, 32)


def q8a_dequantize_numpy(d, q):
    return (q.reshape(-1, 2, 4, 4).astype(np.float64) * d[:, None, :, None]).reshape(-1)


@SETTINGS
@given(matrices(max_rows=1))
def test_quantize_act_scalar_matches_numpy(x):
    blocks = _core.quantize_act(x[0], "scalar")
    d, q = q8a_numpy(x[0])
    np.testing.assert_array_equal(blocks["d"], d)
    np.testing.assert_array_equal(blocks["qs"], q)
    terms = d.astype(np.float64) * q.reshape(-1, 2, 4, 4).astype(np.int64).sum(axis=(1, 3))
    # f32 sum of 4 terms: error bounded relative to the sum of their magnitudes (they can cancel)
    assert np.all(np.abs(blocks["s"] - terms.sum(axis=1)) <= 1e-6 * np.abs(terms).sum(axis=1) + 1e-30)


@pytest.mark.parametrize("impl", ["scalar"] + SIMD)
def test_quantize_act_tiny_groups(impl):
    """Groups whose scale would fall below FLT_MIN (1/d overflows) quantize to 0 in every
    table, bit for bit (found under qemu: scalar, NEON and AVX2 disagreed there)."""
    x = np.array([1e-30, -3e-37, 2e-38, 1e-40, 5e-45, 0.0, -1e-39, 4e-36] * 4, np.float32)
    x[8:16] *= np.float32(1e3)
    x[20] = 1.0  # one ordinary group among them
    got = _core.quantize_act(x, impl)
    d, q = q8a_numpy(x)
    np.testing.assert_array_equal(got["d"], d)
    np.testing.assert_array_equal(got["qs"], q)
    assert np.all(np.isfinite(got["s"]))


@pytest.mark.parametrize("impl", SIMD)
@SETTINGS
@given(x=matrices(max_rows=1))
def test_quantize_act_simd_bit_exact(impl, x):
    assert _core.quantize_act(x[0], impl).tobytes() == _core.quantize_act(x[0], "scalar").tobytes()


@SETTINGS
@given(w=matrices(), nt=st.integers(1, 9), seed=st.integers(0, 1000), t=st.sampled_from(sorted(QTYPES)))
def test_gemm_scalar_matches_numpy(w, nt, seed, t):
    rows, cols = w.shape
    x = np.random.default_rng(seed).standard_normal((nt, cols)).astype(np.float32)
    q = _core.quantize(w, t)
    wd = quants.dequantize(q, QTYPES[t]).astype(np.float64)
    xs = [q8a_numpy(row) for row in x]
    xd = np.stack([q8a_dequantize_numpy(d, qq) for d, qq in xs])
    ref = xd @ wd.T
    got = _core.gemm(q, t, rows, cols, x, "scalar")
    assert_within_magnitudes(got, ref, wd, xd, REF_REL)


@pytest.mark.parametrize("impl", SIMD)
@SETTINGS
@given(w=matrices(), nt=st.integers(1, 9), seed=st.integers(0, 1000))
def test_gemm_simd_matches_scalar(impl, w, nt, seed):
    rows, cols = w.shape
    x = np.random.default_rng(seed).standard_normal((nt, cols)).astype(np.float32)
    for t in QTYPES:
        q = _core.quantize(w, t)
        assert_summation_order_only(_core.gemm(q, t, rows, cols, x, impl), _core.gemm(q, t, rows, cols, x, "scalar"),
                                    quants.dequantize(q, QTYPES[t]), x)
    for t, arr in ((fmt.F16, w.astype(np.float16)), (fmt.F32, w)):
        ref = x.astype(np.float64) @ arr.astype(np.float64).T
        # within the magnitudes summed: a row of 224 terms of about 1 once summed to -0.14,
        # 4.8e-5 off relative to the result
        wd = arr.astype(np.float64)
        assert_within_magnitudes(_core.gemm(arr, t, rows, cols, x, "scalar"), ref, wd, x, REF_REL)
        assert_within_magnitudes(_core.gemm(arr, t, rows, cols, x, impl), ref, wd, x, REF_REL)


@pytest.mark.parametrize("impl", ["scalar"] + SIMD)
@SETTINGS
@given(n=st.integers(1, 700), seed=st.integers(0, 1000))
def test_float_gemm_odd_cols(impl, n, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((5, n)).astype(np.float32)
    x = rng.standard_normal((3, n)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    assert_within_magnitudes(_core.gemm(w, fmt.F32, 5, n, x, impl), ref, w.astype(np.float64), x, REF_REL)


@pytest.mark.parametrize("impl", ["scalar"] + SIMD)
@SETTINGS
@given(n=st.integers(1, 600), seed=st.integers(0, 1000))
def test_rmsnorm(impl, n, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 3).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    xd = x.astype(np.float64)
    ref = xd / np.sqrt(np.mean(xd * xd) + 1e-5) * w
    assert rel(_core.rmsnorm(x, w, 1e-5, impl), ref) < REF_REL


def rope_numpy(x, pos, inv_freq):
    """Adjacent pairs (2i, 2i+1) rotated by the float32 angle pos * inv_freq[i]."""
    ang = (np.float32(pos) * inv_freq.astype(np.float32)).astype(np.float64)
    c, s = np.cos(ang), np.sin(ang)
    x = x.astype(np.float64)
    out = np.empty_like(x)
    out[:, 0::2] = x[:, 0::2] * c - x[:, 1::2] * s
    out[:, 1::2] = x[:, 0::2] * s + x[:, 1::2] * c
    return out


@pytest.mark.parametrize("impl", ["scalar"] + SIMD)
@SETTINGS
@given(half=st.integers(1, 80), heads=st.integers(1, 5), pos=st.integers(0, 131071), seed=st.integers(0, 1000))
def test_rope(impl, half, heads, pos, seed):
    rng = np.random.default_rng(seed)
    hd = 2 * half
    x = rng.standard_normal((heads, hd)).astype(np.float32)
    inv = (500000.0 ** (-2 * np.arange(half) / hd)).astype(np.float32)
    got = _core.rope(x, pos, inv, impl)
    assert np.abs(got - rope_numpy(x, pos, inv)).max() < 1e-5 * max(1.0, np.abs(x).max())
    if impl != "scalar":
        np.testing.assert_array_equal(got, _core.rope(x, pos, inv, "scalar"))


# attention: tests/test_attention.py (flash attention over every KV cache type)


@pytest.mark.parametrize("impl", ["scalar"] + SIMD)
@SETTINGS
@given(n=st.integers(1, 500), seed=st.integers(0, 1000), scale=st.sampled_from([1e-6, 1.0, 1e3, 7e4]))
def test_f32_to_f16_round_to_nearest_even(impl, n, seed, scale):
    x = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    with np.errstate(over="ignore"):  # values past 65504 become inf, in both
        ref = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(_core.f32_to_f16(x, impl), ref)


@pytest.mark.parametrize("impl", ["scalar"] + SIMD)
@SETTINGS
@given(n=st.integers(1, 500), seed=st.integers(0, 1000))
def test_swiglu(impl, n, seed):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(n) * 4).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    ad = a.astype(np.float64)
    ref = ad / (1 + np.exp(-ad)) * b
    assert np.abs(_core.swiglu(a, b, impl) - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())


def test_unknown_kernels_name_is_a_clear_error():
    with pytest.raises(ValueError, match="not available"):
        _core.rmsnorm(np.ones(4, np.float32), np.ones(4, np.float32), 1e-5, impl="sse9")


@pytest.mark.parametrize("impl", ["scalar"] + SIMD)
@SETTINGS
@given(w=matrices(max_rows=3), nt=st.integers(1, 13), seed=st.integers(0, 1000))
def test_gemm_x8_layout_matches_row_major(impl, w, nt, seed):
    """x8 block groups (docs/FORMAT.md layout 1) give the row-major scalar results."""
    from llamacpu.format import x8_pack, x8_unpack
    w = np.tile(w, (8, 1))[: 8 * w.shape[0]]  # rows % 8 == 0
    rows, cols = w.shape
    x = np.random.default_rng(seed).standard_normal((nt, cols)).astype(np.float32)
    for t in QTYPES:
        q = _core.quantize(w, t)
        p = x8_pack(q, t)
        np.testing.assert_array_equal(x8_unpack(p, t, rows), q)
        assert_summation_order_only(_core.gemm(p, t, rows, cols, x, impl, layout=1),
                                    _core.gemm(q, t, rows, cols, x, "scalar"), quants.dequantize(q, QTYPES[t]), x)


@SETTINGS
@given(matrices())
def test_quantize_q6_0_matches_numpy_model(x):
    """Q6_0 (llamacpu's own type): the C quantizer and dequantizer against tests/reference.py,
    written from docs/FORMAT.md."""
    import reference
    q = _core.quantize(x, fmt.Q6_0)
    assert q.tobytes() == reference.quantize_q6_0(x).tobytes()
    np.testing.assert_array_equal(_core.dequantize(q, fmt.Q6_0, x.shape[1]), reference.dequantize_q6_0(q, x.shape[1]))
    for impl in SIMD:  # SIMD tables fall back to (or equal) scalar here
        np.testing.assert_array_equal(_core.dequantize(q, fmt.Q6_0, x.shape[1], impl),
                                      reference.dequantize_q6_0(q, x.shape[1]))


@pytest.mark.parametrize("impl", ["scalar"] + SIMD)
@SETTINGS
@given(w=matrices(max_rows=3), nt=st.integers(1, 13), seed=st.integers(0, 1000))
def test_gemm_q6_0_x8(impl, w, nt, seed):
    """Q6_0 exists in the x8 layout only: scalar against NumPy on the dequantized weights and
    q8a activations, SIMD against scalar (summation order only)."""
    import reference
    from llamacpu.format import x8_pack
    w = np.tile(w, (8, 1))[: 8 * w.shape[0]]
    rows, cols = w.shape
    x = np.random.default_rng(seed).standard_normal((nt, cols)).astype(np.float32)
    q = _core.quantize(w, fmt.Q6_0)
    p = x8_pack(q, fmt.Q6_0)
    wd = reference.dequantize_q6_0(q, cols).astype(np.float64)
    xd = np.stack([q8a_dequantize_numpy(*q8a_numpy(row)) for row in x])
    ref = xd @ wd.T
    got = _core.gemm(p, fmt.Q6_0, rows, cols, x, impl, layout=1)
    if impl == "scalar":
        assert_within_magnitudes(got, ref, wd, xd, REF_REL)
    else:
        assert_summation_order_only(got, _core.gemm(p, fmt.Q6_0, rows, cols, x, "scalar", layout=1), wd, x)
    with pytest.raises(ValueError, match="no kernel for Q6_0 in layout 0"):
        _core.gemm(q, fmt.Q6_0, rows, cols, x, impl)


def test_x8_layout_needs_quantized_rows_multiple_of_8():
    w = np.zeros((12, 32), np.float32)
    with pytest.raises(ValueError, match="layout"):
        _core.gemm(_core.quantize(w, fmt.Q8_0), fmt.Q8_0, 12, 32, np.zeros((1, 32), np.float32), layout=1)


# ---------------------------------------------------------------- every quantized type
# Weights as random valid blocks (every bit pattern of the quants and scales; the fp16
# header fields finite), the reference their dequantization by `gguf` (independent of
# llamacpu; tests/reference.py for Q6_0, which GGUF lacks).

GGUF_OF = {fmt.Q4_0: GT.Q4_0, fmt.Q4_1: GT.Q4_1, fmt.Q5_0: GT.Q5_0, fmt.Q5_1: GT.Q5_1, fmt.Q8_0: GT.Q8_0,
           fmt.Q4_K: GT.Q4_K, fmt.Q5_K: GT.Q5_K, fmt.Q6_K: GT.Q6_K, fmt.IQ4_NL: GT.IQ4_NL, fmt.IQ4_XS: GT.IQ4_XS}
ALL_QTYPES = sorted(fmt.QUANTIZED_TYPES)


def random_blocks(rng, t, rows, nblocks):
    """uint8 (rows, nblocks * block bytes): random bytes, fp16 headers set to finite scales."""
    info = fmt.TYPES[t]
    raw = rng.integers(0, 256, (rows, nblocks, info.block_bytes), dtype=np.uint8)
    for i, off in enumerate(info.hdr):
        # d in +-[1e-4, 0.05] (Q4_1/Q5_1's m and the K-quants' dmin likewise, either sign)
        v = (rng.uniform(1e-4, 0.05, (rows, nblocks)) * rng.choice([-1, 1], (rows, nblocks))).astype(np.float16)
        raw[..., off:off + 2] = v.view(np.uint8).reshape(rows, nblocks, 2)
    return raw.reshape(rows, -1)


def dequantize_reference(raw, t):
    if t == fmt.Q6_0:
        import reference
        return reference.dequantize_q6_0(raw, raw.shape[1] // fmt.TYPES[t].block_bytes * fmt.QK)
    return quants.dequantize(raw, GGUF_OF[t])


def test_every_kernel_type_has_a_reference():
    assert set(ALL_QTYPES) == set(GGUF_OF) | {fmt.Q6_0}


@pytest.mark.parametrize("impl", ["scalar"] + SIMD)
@pytest.mark.parametrize("t", ALL_QTYPES, ids=lambda t: fmt.TYPE_NAMES[t])
@SETTINGS
@given(groups=st.integers(1, 3), nblocks=st.integers(1, 3), nt=st.integers(1, 13), seed=st.integers(0, 2**32 - 1))
def test_dequantize_and_dequantize_gemm_match_reference(impl, t, groups, nblocks, nt, seed):
    """Every quantized type, every table, every layout it has: dequantize bit-exact against
    the reference; gemm (scalar) against NumPy on the reference weights and the q8a
    activations, SIMD against scalar (summation order only)."""
    rng = np.random.default_rng(seed)
    info = fmt.TYPES[t]
    rows, cols = 8 * groups, nblocks * info.block_elems
    raw = random_blocks(rng, t, rows, nblocks)
    wd = dequantize_reference(raw, t).astype(np.float64)
    np.testing.assert_array_equal(_core.dequantize(raw, t, cols, impl), wd.astype(np.float32))
    x = (rng.standard_normal((nt, cols)) * np.exp(rng.uniform(-2, 2, (nt, 1)))).astype(np.float32)
    xd = np.stack([q8a_dequantize_numpy(*q8a_numpy(row)) for row in x])
    for layout in ((0, 1) if info.row_major else (1,)):
        w = fmt.x8_pack(raw, t) if layout else raw
        got = _core.gemm(w, t, rows, cols, x, impl, layout=layout)
        if impl == "scalar":
            assert_within_magnitudes(got, xd @ wd.T, wd, xd, REF_REL)
        else:
            assert_summation_order_only(got, _core.gemm(w, t, rows, cols, x, "scalar", layout=layout), wd, xd)
    if not info.row_major:
        with pytest.raises(ValueError, match=f"no kernel for {info.name} in layout 0"):
            _core.gemm(raw, t, rows, cols, x, impl)


@pytest.mark.parametrize("t", ALL_QTYPES, ids=lambda t: fmt.TYPE_NAMES[t])
def test_x8_pack_is_a_byte_permutation(t):
    """x8_pack moves bytes and nothing else, and x8_unpack undoes it (docs/FORMAT.md, layout 1)."""
    info = fmt.TYPES[t]
    rows, nblocks = 16, 3
    idx = np.arange(rows * nblocks * info.block_bytes, dtype=np.int64)
    raw = (idx % 251).astype(np.uint8).reshape(rows, -1)
    p = fmt.x8_pack(raw, t)
    assert sorted(p.reshape(-1).tolist()) == sorted(raw.reshape(-1).tolist())
    np.testing.assert_array_equal(fmt.x8_unpack(p, t, rows), raw)
    # the first 16 bytes of a block group are the 8 rows' first header field (fp16 d)
    h = info.hdr[0]
    assert p[0, :16].tobytes() == b"".join(raw[r, h:h + 2].tobytes() for r in range(8))


# ---------------------------------------------------------------- AMX prefill (avx512amx)
# The activations as two bf16 terms (hi = bf16(x), lo = bf16(x - hi)) and the weights
# dequantized to bf16, products summed in fp32: against float64 sums of exactly those
# rounded operands, AMX_REL of the magnitudes summed (fp32 accumulation order only).

AMX_REL = 1e-6
needs_amx = pytest.mark.skipif("avx512amx" not in _core.available_kernels(),
                               reason="no AMX tiles on this CPU (or no permission from the OS)")


def bf16_round(a):
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32)).view(np.float32)


@needs_amx
@pytest.mark.parametrize("t", ALL_QTYPES, ids=lambda t: fmt.TYPE_NAMES[t])
@SETTINGS
@given(groups=st.integers(1, 9), nblocks=st.integers(1, 3), nt=st.integers(1, 70), seed=st.integers(0, 2**32 - 1),
       split=st.integers(0, 9))
def test_amx_gemm_matches_bf16_reference(t, groups, nblocks, nt, seed, split):
    """Every quantized type on AMX, over odd token counts (partial tiles) and row ranges
    (as threads split rows: r0, r1 multiples of 8; the rows outside stay untouched)."""
    rng = np.random.default_rng(seed)
    info = fmt.TYPES[t]
    rows, cols = 8 * groups, nblocks * info.block_elems
    raw = random_blocks(rng, t, rows, nblocks)
    wd = bf16_round(dequantize_reference(raw, t)).astype(np.float64)
    x = (rng.standard_normal((nt, cols)) * np.exp(rng.uniform(-3, 3, (1, cols)))).astype(np.float32)
    hi = bf16_round(x)
    xd = hi.astype(np.float64) + bf16_round(x - hi)
    r0 = 8 * min(split, groups - 1) if split % 2 else 0
    got = _core.gemm_amx(fmt.x8_pack(raw, t), t, rows, cols, x, r0=r0, r1=rows)
    assert_within_magnitudes(got[:, r0:], (xd @ wd.T)[:, r0:], wd[r0:], xd, AMX_REL)
    assert not got[:, :r0].any()


@needs_amx
def test_amx_activations_are_hi_plus_lo_bf16():
    """The activations reach the tiles as hi + lo, to 16 significant bits: a gemm against
    identity weights (Q8_0, d = 1/64, q = 64: exactly 1.0 in bf16) returns them so rounded."""
    x = (np.random.default_rng(5).standard_normal((20, 64)) * 1e3).astype(np.float32)
    raw = np.zeros((64, 2, 34), np.uint8)
    raw[:, :, 0:2] = np.array([1 / 64], np.float16).view(np.uint8)
    for r in range(64):
        raw[r, r // 32, 2 + r % 32] = 64
    got = _core.gemm_amx(fmt.x8_pack(raw.reshape(64, -1), fmt.Q8_0), fmt.Q8_0, 64, 64, x)
    hi = bf16_round(x)
    np.testing.assert_array_equal(got, (hi.astype(np.float64) + bf16_round(x - hi)).astype(np.float32))
    assert np.all(np.abs(got - x) <= 2.0 ** -16 * np.abs(x))


# ---------------------------------------------------------------- AMX int8 tiles (avx512amx)
# Steps of a few tokens: the activations to 16 bits with one scale per 32 elements (two
# bytes, block_q16a), each block's products summed in int32 by the tiles. Against float64
# NumPy on the reference weights and those activations: only the float scaling rounds.

I8_TYPES = [fmt.Q4_0, fmt.Q4_1, fmt.Q8_0, fmt.Q6_0, fmt.Q4_K, fmt.Q5_K, fmt.IQ4_XS, fmt.Q6_K]


def q16a_numpy(x):
    """The quantizer's model: f32 scale amax/32767 per 32 elements (0 below FLT_MIN), v =
    round half to even of x / d. Returns (d (n/32,), v (n/32, 32) int32)."""
    b = x.astype(np.float32).reshape(-1, 32)
    d = (np.abs(b).max(axis=1) / np.float32(32767)).astype(np.float32)
    d[d < np.finfo(np.float32).tiny] = 0
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    return d, np.clip(np.rint(b * inv[:, None]), -32767, 32767).astype(np.int32)


@needs_amx
@SETTINGS
@given(matrices(max_rows=1))
def test_quantize_act16_matches_numpy(x):
    blocks = _core.quantize_act16(x[0])
    d, v = q16a_numpy(x[0])
    np.testing.assert_array_equal(blocks["d"], d)
    np.testing.assert_array_equal(blocks["hi"].astype(np.int32) * 256 + blocks["lo"], v)
    sums = d.astype(np.float64)[:, None] * v.reshape(-1, 2, 16).sum(axis=2)
    np.testing.assert_allclose(blocks["s16"], sums, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(blocks["s"], sums.sum(axis=1), rtol=1e-6, atol=1e-30)
    # 16 bits: within half a step of x, and the step is amax / 32767
    xd = (v.astype(np.float64) * d[:, None]).reshape(-1)
    assert np.all(np.abs(xd - x[0]) <= 0.5 * np.repeat(d, 32) * (1 + 1e-6) + 1e-30)


@needs_amx
@pytest.mark.parametrize("t", I8_TYPES, ids=lambda t: fmt.TYPE_NAMES[t])
@SETTINGS
@given(groups=st.integers(1, 7), nblocks=st.integers(1, 3), nt=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       split=st.integers(0, 9))
def test_amx_int8_gemm_matches_reference(t, groups, nblocks, nt, seed, split):
    """gemm_amx_i8 over token counts in tiles of 16 and partial ones, odd group counts (a
    group left alone) and row ranges as threads split them."""
    rng = np.random.default_rng(seed)
    info = fmt.TYPES[t]
    rows, cols = 8 * groups, nblocks * info.block_elems
    raw = random_blocks(rng, t, rows, nblocks)
    wd = dequantize_reference(raw, t).astype(np.float64)
    x = (rng.standard_normal((nt, cols)) * np.exp(rng.uniform(-2, 2, (nt, 1)))).astype(np.float32)
    xq = np.stack([_core.quantize_act16(row) for row in x])
    xd = ((xq["hi"].astype(np.float64) * 256 + xq["lo"]) * xq["d"][:, :, None]).reshape(nt, cols)
    r0 = 8 * min(split, groups - 1) if split % 2 else 0
    got = _core.gemm_amx_i8(fmt.x8_pack(raw, t), t, rows, cols, xq, r0=r0)
    assert_within_magnitudes(got[:, r0:], (xd @ wd.T)[:, r0:], wd[r0:], xd, REF_REL)
    assert not got[:, :r0].any()


@needs_amx
def test_amx_int8_gemm_types():
    """Q5_0, Q5_1 and IQ4_NL have no int8 tiles: their steps keep the 512-bit ones."""
    assert set(ALL_QTYPES) - set(I8_TYPES) == {fmt.Q5_0, fmt.Q5_1, fmt.IQ4_NL}
    raw = random_blocks(np.random.default_rng(0), fmt.Q5_0, 16, 2)
    xq = np.stack([_core.quantize_act16(np.ones(64, np.float32))] * 4)
    with pytest.raises(ValueError, match="no int8 tiles for Q5_0"):
        _core.gemm_amx_i8(fmt.x8_pack(raw, fmt.Q5_0), fmt.Q5_0, 16, 64, xq)
