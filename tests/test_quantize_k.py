"""K-quant and Q5 quantizers (csrc/quants_ref.c) and llama-quantize's mixtures
(llamacpu/quant_mix.py), held to llama.cpp byte for byte.

llama.cpp cannot be built in CI, so tests/data keeps what llama-quantize (llama.cpp
vendored in llama-cpp-python 0.3.36, no importance matrix) wrote, made by
tools/make_kquant_fixtures.py: its output bytes for fixture_rows() and the type it
gave every tensor of six model configs. Both are compared for equality: no tolerance.

Independently of llama.cpp: Q5_0 and Q5_1 against the `gguf` package's quantizers
(property-tested), and every type's bytes read back by gguf's dequantizers within
ROUNDTRIP_TOL of the input (a sanity bound on the packing, not a spec of the search).
"""
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from llamacpu import _core
from llamacpu import format as fmt
from llamacpu.quant_mix import FTYPES, mixture, use_more_bits

import make_kquant_fixtures as fixtures  # tools/, on sys.path by conftest

gguf = pytest.importorskip("gguf")  # test-only dependency, installed by .ci/run
from gguf import GGMLQuantizationType as GT, quants  # noqa: E402

DATA = Path(__file__).parent / "data"
TYPES = {fmt.Q4_K: GT.Q4_K, fmt.Q5_K: GT.Q5_K, fmt.Q6_K: GT.Q6_K, fmt.Q5_0: GT.Q5_0, fmt.Q5_1: GT.Q5_1}
# max |dequantized - x| over a block (32 elements; 256 for the K-quants), as a fraction of the
# block's max |x|. Q5_0: d = max / -16 puts the largest value of one sign at level 16 of -16..15,
# so the other sign's largest rounds to 15/16 of it: 1/16, plus the fp16 rounding of d.
# Q5_1: half of (max - min) / 31 plus fp16 rounding of d and m. The K-quants fit scales and
# mins by weighted least squares, so their bounds are measured (worst over normal,
# heavy-tailed, sparse and sub-block-scaled rows: Q4_K 0.092, Q5_K 0.054, Q6_K 0.016) with
# headroom; a packing error (a nibble, a scale bit or a sub-block out of place) is far larger.
ROUNDTRIP_TOL = {fmt.Q5_0: 1 / 16 + 2 ** -9, fmt.Q5_1: 1 / 31 + 2 ** -9,
                 fmt.Q4_K: 0.15, fmt.Q5_K: 0.09, fmt.Q6_K: 0.03}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def rows_fixture():
    with np.load(DATA / "llama_quantize_rows.npz") as z:
        return {k: z[k] for k in z.files}


def test_fixture_rows_are_the_frozen_input(rows_fixture):
    assert fixtures.rows_sha256(fixtures.fixture_rows()) == str(rows_fixture["input_sha256"])


@pytest.mark.parametrize("t", sorted(TYPES), ids=lambda t: fmt.TYPE_NAMES[t])
def test_quantizer_matches_llama_quantize(rows_fixture, t):
    """Ordinary rows and the edge cases (zeros, a constant, fp16's whole range in one row, an
    outlier, negative only, subnormals, ties on a half-step grid, half zero): every byte."""
    x = fixtures.fixture_rows().astype(np.float32)
    want = rows_fixture[fmt.TYPE_NAMES[t]]
    got = _core.quantize(x, t)
    assert got.shape == want.shape
    differ = [i for i in range(len(x)) if not np.array_equal(got[i], want[i])]
    assert not differ, f"rows {differ} differ from llama-quantize's"


FROZEN_MIXTURES = json.loads((DATA / "llama_quantize_mixtures.json").read_text())


def _mixture_cases():
    return [pytest.param(entry["config"], ftype, entry[ftype], id=f"{model}-{ftype}")
            for model, entry in FROZEN_MIXTURES.items() for ftype in FTYPES]


@pytest.mark.parametrize("config, ftype, frozen", _mixture_cases())
def test_mixture_matches_llama_quantize(config, ftype, frozen):
    want = fixtures.expand_types(frozen)
    got = {name: fmt.TYPES[t].name for name, t in mixture(fixtures.model_config(config), ftype).items()}
    assert got.keys() == want.keys()
    assert {n: (got[n], want[n]) for n in got if got[n] != want[n]} == {}


def test_mixture_of_smollm2_is_mostly_fallbacks():
    """Row length 576: the Q4_K/Q5_K/Q6_K tensors fall back to Q5_0/Q5_1/Q8_0, and so
    does the tied head (Q8_0); only ffn_down (row length 1536) keeps K-quants."""
    m = mixture(fixtures.model_config(FROZEN_MIXTURES["SmolLM2-135M"]["config"]), "q4_k_m")
    assert m["tok_embeddings.weight"] == fmt.Q8_0
    assert {m[f"layers.{i}.attention.wq.weight"] for i in range(30)} == {fmt.Q5_0}
    assert {m[f"layers.{i}.feed_forward.w2.weight"] for i in range(30)} == {fmt.Q4_K, fmt.Q6_K}


def test_use_more_bits_layers():
    # Llama 3.2 1B's attn_v / ffn_down in Q4_K_M files: Q6_K in these 8 of 16 layers
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]


def test_mixture_refuses_unknown_ftypes():
    config = fixtures.CONFIGS["Llama-3.2-1B"]
    with pytest.raises(ValueError, match="q4_k_m"):
        mixture(config, "q3_k_m")


@st.composite
def f16_rows(draw):
    """F16 values (all finite ones, subnormals included) in odd mixtures, as float32."""
    rows = draw(st.integers(1, 4))
    cols = 32 * draw(st.integers(1, 9))
    kind = draw(st.sampled_from(["any", "small", "constant", "sparse"]))
    if kind == "any":
        x = draw(hnp.arrays(np.float16, (rows, cols), elements=st.floats(width=16, allow_nan=False,
                                                                             allow_infinity=False)))
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        x = rng.standard_normal((rows, cols)) * 10.0 ** draw(st.integers(-7, 4))
        if kind == "constant":
            x[:] = x[0, 0]
        elif kind == "sparse":
            x[rng.random(x.shape) < 0.8] = 0
        x = x.astype(np.float16)
    return x.astype(np.float32)


@SETTINGS
@given(f16_rows(), st.sampled_from([fmt.Q5_0, fmt.Q5_1]))
def test_q5_matches_gguf_quantizer(x, t):
    """gguf's Q5_0 takes d's sign from a block's -0 (ggml's C starts from +0 and keeps it: the
    llama-quantize fixture has a -0 block), so -0 becomes +0 here (x + 0)."""
    x = x + np.float32(0)
    assert _core.quantize(x, t).tobytes() == quants.quantize(x, TYPES[t]).tobytes()


def _roundtrip_inputs():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((32, 512))
    # but row 7, whose scales fall below fp16's normal range (2^-14) and keep few bits
    yield "fixture rows", np.delete(fixtures.fixture_rows(), 7, axis=0).astype(np.float32)
    yield "normal", x
    yield "sub-blocks scaled 2^-6..2^6", x * 2.0 ** rng.integers(-6, 7, (32, 32, 1)).repeat(16, 2).reshape(32, 512)
    yield "heavy tails", rng.standard_t(1.5, (32, 512))
    yield "sparse", np.where(rng.random((32, 512)) < 0.8, 0, x)
    yield "positive", np.abs(x) + 3


@pytest.mark.parametrize("t", sorted(TYPES), ids=lambda t: fmt.TYPE_NAMES[t])
def test_roundtrip_through_gguf_dequantizer(t):
    """Our bytes as GGUF reads them (gguf's NumPy dequantizer, sharing no code with ours)
    come back within ROUNDTRIP_TOL of each block's max |x|; our dequantizer agrees exactly."""
    block = fmt.TYPES[t].block_elems
    for label, x in _roundtrip_inputs():
        x = np.asarray(x).astype(np.float16).astype(np.float32)
        q = _core.quantize(x, t)
        y = quants.dequantize(q, TYPES[t]).reshape(x.shape)
        np.testing.assert_array_equal(_core.dequantize(q, t, x.shape[1]), y)
        err = np.abs(y - x).reshape(-1, block).max(axis=1)
        amax = np.abs(x).reshape(-1, block).max(axis=1)
        assert np.all(err <= ROUNDTRIP_TOL[t] * amax), f"{label}: {np.max(err / np.maximum(amax, 1e-30)):.4f}"
