"""Flash attention (csrc/attention.c + each kernel table's attn_block) and the KV cache
types, against NumPy: ggml's q8_0/q4_0 reference quantizers ported to NumPy, then exact
softmax attention in float64 over the dequantized cache."""
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import llamacpu
from llamacpu import _core
from llamacpu.cache_types import CACHE_TYPES

from conftest import INVARIANT_KERNELS

TABLES = _core.available_kernels()
TYPES = list(CACHE_TYPES)  # f16, q8_0, q4_0
# f32 blocks and online softmax against float64 exact attention (the SIMD exp is ~2 ulp)
ATT_TOL = 2e-5
# avx512amx's bf16 tiles (units of 16 query rows and more) carry Q, K, the weights and V to
# 16 significant bits (each a bf16 hi + lo, 2^-16 relative per rounding); seen: <= 1e-5
ATT_TOL_AMX = 1e-4


# ----------------------------------------------------------- ggml's row quantizers in NumPy

def quantize_q8_0(x):
    """ggml quantize_row_q8_0_ref: d = amax / 127, q = roundf(x / d) -> (n/32, 34) bytes."""
    b = x.astype(np.float32).reshape(-1, 32)
    d = (np.abs(b).max(axis=1) / np.float32(127)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0).astype(np.float32)
    v = b * inv[:, None]
    q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8)  # roundf: half away from 0
    return np.concatenate([d.astype(np.float16)[:, None].view(np.uint8), q.view(np.uint8)], axis=1)


def quantize_q4_0(x):
    """ggml quantize_row_q4_0_ref: max = the element of largest |x|, d = max / -8,
    q = min(15, (int8)(x / d + 8.5)), two per byte (low nibble: element j, high: j + 16)."""
    b = x.astype(np.float32).reshape(-1, 32)
    mx = b[np.arange(len(b)), np.abs(b).argmax(axis=1)]
    d = (mx / np.float32(-8)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0).astype(np.float32)
    q = np.minimum(15, np.trunc(b * inv[:, None] + np.float32(8.5)).astype(np.int8)).astype(np.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([d.astype(np.float16)[:, None].view(np.uint8), qs], axis=1)


def store(x, name):
    """rows x (rows, hd) as the cache holds them -> (rows, row bytes)"""
    rows, hd = x.shape
    if name == "f16":
        return x.astype(np.float16).view(np.uint8).reshape(rows, -1)
    q = quantize_q8_0(x) if name == "q8_0" else quantize_q4_0(x)
    return q.reshape(rows, -1)


def dequantize(raw, name, hd):
    rows = raw.shape[0]
    if name == "f16":
        return raw.view(np.float16).astype(np.float64).reshape(rows, hd)
    bs = 34 if name == "q8_0" else 18
    blk = raw.reshape(-1, bs)
    d = blk[:, :2].copy().view(np.float16).astype(np.float64)
    if name == "q8_0":
        q = blk[:, 2:].view(np.int8).astype(np.float64)
    else:
        qs = blk[:, 2:]
        q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float64) - 8
    return (q * d).reshape(rows, hd)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("impl", TABLES)
def test_kv_store_writes_ggml_rows(name, impl):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((40, 64)) * rng.uniform(0.01, 30, (40, 1))).astype(np.float32)
    x[3] = 0.0  # an all-zero row: scale 0
    x[5, :32] = 7.0  # ties of the largest |x|
    got = _core.kv_store(x, CACHE_TYPES[name], impl)
    np.testing.assert_array_equal(got, store(x, name))


def reference_attention(q, Kd, Vd, seq, pos, n_kv):
    """q (nt, nh, hd); Kd, Vd (n_seq, n_kv, n_ctx, hd) float64 -> (nt, nh, hd)"""
    nt, nh, hd = q.shape
    group = nh // n_kv
    out = np.zeros((nt, nh, hd))
    for t in range(nt):
        for h in range(nh):
            K = Kd[seq[t], h // group, :pos[t] + 1]
            V = Vd[seq[t], h // group, :pos[t] + 1]
            s = K @ q[t, h].astype(np.float64) / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h] = p @ V / p.sum()
    return out


def run_case(impl, tk, tv, hd, n_kv, group, n_seq, seq, pos, n_threads, seed):
    rng = np.random.default_rng(seed)
    n_ctx = int(max(pos)) + 1
    shape = (n_seq, n_kv, n_ctx, hd)
    K = (rng.standard_normal(shape) * 2).astype(np.float32)
    V = rng.standard_normal(shape).astype(np.float32)
    KC = store(K.reshape(-1, hd), tk).reshape(n_seq, n_kv, n_ctx, -1)
    VC = store(V.reshape(-1, hd), tv).reshape(n_seq, n_kv, n_ctx, -1)
    Kd = dequantize(KC.reshape(-1, KC.shape[-1]), tk, hd).reshape(shape)
    Vd = dequantize(VC.reshape(-1, VC.shape[-1]), tv, hd).reshape(shape)
    q = rng.standard_normal((len(seq), n_kv * group, hd)).astype(np.float32)
    got = _core.attention(q, KC, VC, CACHE_TYPES[tk], CACHE_TYPES[tv], seq, pos, n_kv, n_threads, impl)
    ref = reference_attention(q, Kd, Vd, seq, pos, n_kv)
    err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err < (ATT_TOL_AMX if impl == "avx512amx" else ATT_TOL), (impl, tk, tv, err)


@pytest.mark.parametrize("tv", TYPES)
@pytest.mark.parametrize("tk", TYPES)
@pytest.mark.parametrize("impl", TABLES)
def test_every_table_and_type_pair(impl, tk, tv):
    """A prefill run (rows of several tokens, each its own causal limit), one decoding token
    of a second sequence at depth (split into ranges over 4 threads, then merged), and a
    run of one token."""
    seq = np.array([0, 0, 0, 0, 0, 1, 0], np.int32)
    pos = np.array([60, 61, 62, 63, 64, 700, 3], np.int32)
    run_case(impl, tk, tv, 64, 2, 4, 2, seq, pos, 4, seed=7)


@settings(max_examples=60, deadline=None)
@given(impl=st.sampled_from(TABLES), tk=st.sampled_from(TYPES), tv=st.sampled_from(TYPES),
       hd=st.sampled_from([6, 32, 64, 72, 96, 128]), n_kv=st.integers(1, 3),
       group=st.sampled_from([1, 2, 3, 4, 8, 24, 80]),
       data=st.data(), n_threads=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_random_runs_lengths_and_splits(impl, tk, tv, hd, n_kv, group, data, n_threads, seed):
    """Odd lengths (1 .. a few hundred), GQA groups (a group of 80: runs beyond 64 rows),
    batches mixing sequences, and thread counts that split positions into merged ranges;
    head_dims off the SIMD widths with f16 (q8_0/q4_0 need multiples of 32)."""
    if hd % 32:
        tk = tv = "f16"
    n_seq = data.draw(st.integers(1, 3))
    nt = data.draw(st.integers(1, 12))
    seq = np.array(data.draw(st.lists(st.integers(0, n_seq - 1), min_size=nt, max_size=nt)), np.int32)
    pos = np.array(data.draw(st.lists(st.integers(0, 400), min_size=nt, max_size=nt)), np.int32)
    run_case(impl, tk, tv, hd, n_kv, group, n_seq, seq, pos, n_threads, seed)


def test_head_dim_for_quantized_cache_is_checked():
    with pytest.raises(ValueError, match="head_dim % 32"):
        _core.kv_store(np.zeros((1, 48), np.float32), CACHE_TYPES["q8_0"])
    _core.kv_store(np.zeros((1, 48), np.float32), CACHE_TYPES["f16"])  # f16: any even head_dim


# ----------------------------------------------------------- the engine with each cache type

# Quantized caches against the f16 one on SmolLM2-135M (head_dim 64): 200 random tokens in
# one prefill, then 10 decoded one at a time (random tokens make some positions sensitive:
# the same f16 model, prefill against token-by-token, differs down to cosine 0.92 there).
# Measured (the chunk-invariant table; quantized caches hold K and V Hadamard-rotated),
# prefill / decode cosine min: q8_0/q8_0 0.99996 / 0.99999, q4_0/q4_0 0.99705 / 0.99961
# (0.99396 / 0.99913 before the rotation).
Q8_COS_MIN = 0.9995
Q4_COS_MIN = 0.995
DECODE_COS_MIN = 0.995


def cosines(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def smol_ids(smollm_model):
    rng = np.random.default_rng(3)
    with llamacpu.Model(smollm_model, n_ctx=256) as m:
        return rng.integers(0, m.vocab_size, 210).astype(np.int32)


def prefill_then_decode(model, ids, n_prefill):
    """logits of a prefill of n_prefill tokens, and of the rest decoded one at a time"""
    pre = model.forward(ids[:n_prefill], all_logits=True)
    return pre, np.stack([model.forward([t], pos=n_prefill + i) for i, t in enumerate(ids[n_prefill:])])


@pytest.mark.slow
@pytest.mark.parametrize("ctk,ctv,cos_min", [("q8_0", "q8_0", Q8_COS_MIN), ("q8_0", "f16", Q8_COS_MIN),
                                             ("q4_0", "q4_0", Q4_COS_MIN)])
def test_quantized_cache_logits_close_to_f16(smollm_model, smol_ids, ctk, ctv, cos_min):
    """The same prefill and decode with the f16 cache and a quantized one (one kernel table
    for both: avx512amx's prefill and decode differ by themselves)."""
    with llamacpu.Model(smollm_model, n_ctx=256, kernels=INVARIANT_KERNELS) as m:
        ref = prefill_then_decode(m, smol_ids, 200)
    with llamacpu.Model(smollm_model, n_ctx=256, kernels=INVARIANT_KERNELS, cache_type_k=ctk,
                        cache_type_v=ctv) as m:
        assert (m.cache_type_k, m.cache_type_v) == (ctk, ctv)
        got = prefill_then_decode(m, smol_ids, 200)
    pre, dec = cosines(got[0], ref[0]), cosines(got[1], ref[1])
    print(f"\n{ctk}/{ctv} KV vs f16: prefill cosine mean {pre.mean():.6f} min {pre.min():.6f}, "
          f"decode min {dec.min():.6f}")
    assert pre.min() >= cos_min
    assert dec.min() >= DECODE_COS_MIN


def test_quantized_cache_fork_copies_rows(smollm_model, smol_ids):
    """lc_seq_copy copies rows of any type: a fork continues as the original does."""
    with llamacpu.Model(smollm_model, n_ctx=128, n_seq=2, cache_type_k="q4_0", cache_type_v="q8_0") as m:
        m.forward(smol_ids[:40])
        want = m.forward(smol_ids[40:41], pos=40)
        m.seq_copy(0, 1, 40)
        got = m.forward_batch(smol_ids[40:41], [1], [40])
        np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-5)


def test_model_bytes_follow_the_cache_types(smollm_model):
    from llamacpu.model import engine_bytes
    with llamacpu.Model(smollm_model, n_ctx=16) as m:
        cfg = m.config
    kv = {t: engine_bytes(cfg, 8192, 512, 2, 1, None, t, t) - engine_bytes(cfg, 4096, 512, 2, 1, None, t, t)
          for t in TYPES}  # the cache of 4096 positions: the scratch is the same for both
    assert kv["q8_0"] / kv["f16"] == pytest.approx(34 / 64, rel=0.01)
    assert kv["q4_0"] / kv["f16"] == pytest.approx(18 / 64, rel=0.01)


@pytest.mark.parametrize("kw", [{"cache_type_k": "q5_0"}, {"cache_type_v": "F32"}, {"cache_type_k": None}])
def test_bad_cache_types_are_clear_errors(smollm_model, kw):
    with pytest.raises(ValueError, match=r"cache_type_[kv] must be one of f16, q8_0, q4_0"):
        llamacpu.Model(smollm_model, n_ctx=16, **kw)
    with pytest.raises(ValueError, match=r"cache_type_[kv] must be one of f16, q8_0, q4_0"):
        llamacpu.Llama(smollm_model, n_ctx=16, **kw)


@pytest.mark.parametrize("command", [["run", "-p", "hi"], ["serve"], ["bench"], ["perplexity", "-"]])
@pytest.mark.parametrize("flag", ["-ctk", "--cache-type-v"])
def test_cli_refuses_bad_cache_types(smollm_model, command, flag, capsys):
    from llamacpu.cli import main
    argv = [command[0], str(smollm_model), *command[1:], flag, "q2_k"]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert "must be one of f16, q8_0, q4_0" in err and "--cache-type-" in err, err


def sylvester_hadamard(n):
    """the orthonormal n x n Hadamard matrix in Sylvester's order (llama.cpp's ggml_gen_hadamard)"""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def rotated_roundtrip(x, name, nrot):
    """x [n, heads, hd] rotated in runs of nrot, then stored in `name` and read back"""
    n, heads, hd = x.shape
    rows = (x.reshape(-1, hd // nrot, nrot) @ sylvester_hadamard(nrot).T).reshape(-1, hd)
    return dequantize(store(rows.astype(np.float32), name), name, hd).reshape(n, heads, hd)


# Q4_0's steps are coarse: the engine's K differs from the float reference's by its own
# rounding, which flips some 4-bit roundings, so single positions part (the rotated
# reference is itself at cosine min 0.70 from the f32 one). The mean tells the methods
# apart. Measured (chunk-invariant table, Q4_1 SmolLM2, 96 tokens of text): cosine mean
# 0.9903 against the rotated reference, 0.9645 against the unrotated one.
ROT_COS_MEAN_MIN = 0.985
ROT_MARGIN = 0.01


@pytest.mark.slow
def test_quantized_cache_is_rotated_as_llama_cpp_does(smollm_model, smollm_gguf):
    """Q4_0 K and V against the NumPy reference that quantizes them as llama.cpp does (K and Q
    rotated by the head_dim Hadamard matrix, V by the 64 one and the output rotated back; ggml's
    q4_0 rows): the engine's logits follow it, not the unrotated quantization."""
    import reference as R
    cfg, w, div = R.weights_from_gguf(smollm_gguf)
    ref = R.ReferenceLlama(cfg, w, rope_pairing="adjacent", rope_freq_divisors=div, dtype=np.float32)
    text = (Path(__file__).parent / "data" / "alice_ch1-4.txt").read_text()[:2000]
    with llamacpu.Model(smollm_model, n_ctx=128, kernels=INVARIANT_KERNELS, cache_type_k="q4_0",
                        cache_type_v="q4_0") as m:
        ids = np.asarray(llamacpu.Llama(smollm_model, n_ctx=128).tokenize(text)[:96], np.int32)
        got = m.forward(ids, all_logits=True)
    hd = ref.head_dim
    h64 = sylvester_hadamard(64)

    def rotated(q, k, v):
        kr = rotated_roundtrip(k, "q4_0", hd)
        qr = (q.reshape(-1, hd) @ sylvester_hadamard(hd).T).reshape(q.shape)
        return qr, kr, rotated_roundtrip(v, "q4_0", 64)

    def plain(q, k, v):
        return q, rotated_roundtrip(k, "q4_0", 1), rotated_roundtrip(v, "q4_0", 1)

    ref.kv_hook, ref.out_hook = rotated, lambda att: (att.reshape(*att.shape[:2], -1, 64) @ h64.T).reshape(att.shape)
    want = ref.forward(ids)
    ref.kv_hook, ref.out_hook = plain, None
    unrotated = ref.forward(ids)
    c_rot, c_plain = cosines(got, want), cosines(got, unrotated)
    print(f"\nq4_0 KV vs the rotated reference: cosine min {c_rot.min():.6f} mean {c_rot.mean():.6f}; "
          f"vs the unrotated one: min {c_plain.min():.6f} mean {c_plain.mean():.6f}")
    assert c_rot.mean() >= ROT_COS_MEAN_MIN
    assert c_rot.mean() >= c_plain.mean() + ROT_MARGIN
