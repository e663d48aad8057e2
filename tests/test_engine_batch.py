"""Several sequences in one forward (Model.forward_batch, lc_forward_batch) against each
sequence run alone.

Named tolerances:
- PREFILL_REL (test_engine.py): a chunk-invariant table (every table but avx512amx)
  gives each sequence of a mixed batch the logits of running it alone, to rounding.
- AMX_COS_MIN: with avx512amx, a batch of 32+ tokens takes the bf16 AMX path, one of
  4-31 the int8 AMX path and one of fewer the q8a path (docs/ARCHITECTURE.md), so a decode token inside a big batch
  differs from the same token alone in the last bits: cosine of the logits rows.
"""
import numpy as np
import pytest

import llamacpu
from conftest import INVARIANT_KERNELS
from llamacpu import _core
from test_engine import PREFILL_REL, max_rel, prompt

AMX_COS_MIN = 0.999
TABLES = list(dict.fromkeys([_core.best_kernels(), INVARIANT_KERNELS]))


def alone(path, toks, kernels, n_ctx=64):
    """All logits of `toks` run as the only sequence of a fresh model."""
    with llamacpu.Model(path, n_ctx=n_ctx, kernels=kernels) as m:
        return m.forward(toks, all_logits=True)


def close(a, b, kernels):
    if kernels == "avx512amx":
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        cos = (a64 * b64).sum(-1) / np.linalg.norm(a64, axis=-1) / np.linalg.norm(b64, axis=-1)
        return cos.min() >= AMX_COS_MIN
    return max_rel(a, b) < PREFILL_REL


@pytest.mark.parametrize("kernels", TABLES)
@pytest.mark.parametrize("type", ["f32", "q4_0", pytest.param("q4_k_m", marks=pytest.mark.slow)])
def test_mixed_batch_equals_each_sequence_alone(converted, type, kernels):
    """Three sequences: prefill chunks of some and decode tokens of others in one call,
    over several steps, with logits asked of some tokens only."""
    path = converted("tiny64", type)
    seqs = [prompt(128256, n, seed=10 + i) for i, n in enumerate((9, 14, 5))]
    ref = [alone(path, s, kernels) for s in seqs]
    # steps: (seq, first position, count) runs
    plan = [[(0, 0, 6), (1, 0, 4)],
            [(0, 6, 1), (1, 4, 7), (2, 0, 5)],
            [(1, 11, 3), (0, 7, 1)],
            [(0, 8, 1)]]
    got = [[None] * len(s) for s in seqs]
    with llamacpu.Model(path, n_ctx=64, n_seq=3, kernels=kernels) as m:
        for step in plan:
            toks, sq, ps, want = [], [], [], []
            for s, p0, k in step:
                toks += list(seqs[s][p0:p0 + k])
                sq += [s] * k
                ps += list(range(p0, p0 + k))
                want += [(p0 + j) % 2 == 0 or j == k - 1 for j in range(k)]
            out = m.forward_batch(toks, sq, ps, want)
            assert out.shape == (sum(want), 128256)
            rows = iter(out)
            for s, p, w in zip(sq, ps, want):
                if w:
                    got[s][p] = next(rows)
        assert [m.seq_len(s) for s in range(3)] == [9, 14, 5]
    for s in range(3):
        idx = [p for p in range(len(seqs[s])) if got[s][p] is not None]
        assert close(np.stack([got[s][p] for p in idx]), ref[s][idx], kernels), f"sequence {s}"


def test_many_decoding_sequences_in_one_step(converted):
    """Sixteen sequences decoding together (the serving case), each at its own position;
    chunks of n_batch tokens split the step."""
    path = converted("tiny64", "q4_0")
    k = INVARIANT_KERNELS
    seqs = [prompt(128256, 3 + i, seed=40 + i) for i in range(16)]
    ref = [alone(path, s, k)[-1] for s in seqs]
    with llamacpu.Model(path, n_ctx=32, n_seq=16, n_batch=5, kernels=k) as m:
        for i, s in enumerate(seqs):
            m.forward_batch(s[:-1], [i] * (len(s) - 1), range(len(s) - 1), np.zeros(len(s) - 1, bool))
        out = m.forward_batch([s[-1] for s in seqs], range(16), [len(s) - 1 for s in seqs])
    assert max_rel(out, np.stack(ref)) < PREFILL_REL


def test_fork_copies_a_prefix(converted):
    """seq_copy: a second conversation starts from the first one's cached prefix."""
    path = converted("tiny64", "q8_0")
    k = INVARIANT_KERNELS
    common = prompt(128256, 10, seed=7)
    a = np.concatenate([common, prompt(128256, 4, seed=8)])
    b = np.concatenate([common[:7], prompt(128256, 5, seed=9)])
    with llamacpu.Model(path, n_ctx=32, n_seq=2, kernels=k) as m:
        m.forward_batch(common, [0] * 10, range(10))
        m.seq_copy(0, 1, 7)
        assert m.seq_len(1) == 7
        out = m.forward_batch(np.concatenate([a[10:], b[7:]]), [0] * 4 + [1] * 5, list(range(10, 14)) + list(range(7, 12)))
    assert max_rel(out[:4], alone(path, a, k)[10:]) < PREFILL_REL
    assert max_rel(out[4:], alone(path, b, k)[7:]) < PREFILL_REL


def test_sequence_zero_is_forward(converted):
    """Model.forward is sequence 0 of the batch API: they continue each other."""
    path = converted("tiny64", "q4_0")
    toks = prompt(128256, 12, seed=11)
    with llamacpu.Model(path, n_ctx=32, n_seq=2, kernels=INVARIANT_KERNELS) as m:
        m.forward(toks[:8])
        out = m.forward_batch(toks[8:], [0] * 4, range(8, 12))
        assert m.n_past == 12
    assert max_rel(out, alone(path, toks, INVARIANT_KERNELS)[8:]) < PREFILL_REL


def test_bad_batches_raise_clear_errors(converted):
    path = converted("tiny64", "q4_0")
    with llamacpu.Model(path, n_ctx=16, n_seq=2) as m:
        m.forward_batch([1, 2, 3], [0, 0, 1], [0, 1, 0])
        with pytest.raises(ValueError, match=r"sequence ids must be in \[0, 2\)"):
            m.forward_batch([1], [2], [0])
        with pytest.raises(ValueError, match="skips positions"):
            m.forward_batch([1], [1], [2])
        with pytest.raises(ValueError, match="consecutive"):
            m.forward_batch([1, 2], [0, 0], [2, 4])
        with pytest.raises(ValueError, match="consecutive"):
            m.forward_batch([1, 2], [0, 0], [2, 1])
        with pytest.raises(llamacpu.ContextOverflowError):
            m.forward_batch(list(range(16)), [1] * 16, range(1, 17))
        with pytest.raises(ValueError, match="same length"):
            m.forward_batch([1, 2], [0], [2, 3])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            m.forward_batch([128256], [0], [2])
        with pytest.raises(ValueError, match="n_pos"):
            m.seq_copy(0, 1, 3)
        with pytest.raises(ValueError, match="seq must be"):
            m.seq_copy(0, 2)
        assert (m.seq_len(0), m.seq_len(1)) == (2, 1)  # failed calls changed nothing
        m.seq_clear(0)
        assert m.seq_len(0) == 0
    for bad in (0, -1, 2.5, True, 10**6):
        with pytest.raises(ValueError, match="n_seq"):
            llamacpu.Model(path, n_ctx=16, n_seq=bad)


def test_memory_check_counts_every_sequence(converted):
    """engine_bytes is lc_model_bytes: the KV cache grows with the sequences."""
    from llamacpu.model import engine_bytes
    cfg = llamacpu.Model(converted("tiny64", "q4_0"), n_ctx=16).config
    one = engine_bytes(cfg, 64, 16, 1, n_seq=1)
    four = engine_bytes(cfg, 64, 16, 1, n_seq=4)
    kv_per_seq = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 64 * 2
    assert four - one == 3 * kv_per_seq
