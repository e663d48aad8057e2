"""Self-checks of the NumPy reference (tests/reference.py) and of tools/make_checkpoint.py.

Nothing here touches llamacpu: these tests make sure the yardstick itself is right.
"""
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "tools", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import make_checkpoint as mc  # noqa: E402
from reference import (ReferenceLlama, apply_rope, llama3_inv_freq, load_hf_checkpoint,  # noqa: E402
                       rms_norm, silu, softmax, weights_from_gguf)

LLAMA3_SCALING = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"}


# ----------------------------------------------------------------------------- helpers

def small_config(**over):
    cfg = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=500000.0,
               rope_scaling=dict(LLAMA3_SCALING, original_max_position_embeddings=64),
               vocab_size=300, tie_word_embeddings=True)
    cfg.update(over)
    return cfg


def small_weights(cfg, seed=0):
    rng = np.random.default_rng(seed)
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, KV, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def mat(o, i, s=1.0):
        return rng.standard_normal((o, i)) * s / math.sqrt(i)

    w = {"model.embed_tokens.weight": rng.standard_normal((V, D)) / math.sqrt(D),
         "model.norm.weight": 1 + 0.1 * rng.standard_normal(D)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(D)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(D)
        w[p + "self_attn.q_proj.weight"] = mat(H * hd, D, 2)
        w[p + "self_attn.k_proj.weight"] = mat(KV * hd, D, 2)
        w[p + "self_attn.v_proj.weight"] = mat(KV * hd, D)
        w[p + "self_attn.o_proj.weight"] = mat(D, H * hd, 2)
        w[p + "mlp.gate_proj.weight"] = mat(F, D)
        w[p + "mlp.up_proj.weight"] = mat(F, D)
        w[p + "mlp.down_proj.weight"] = mat(D, F, 2)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = mat(V, D)
    return w


def to_adjacent(w, n_heads, head_dim):
    """HF (rotate_half) row order -> Meta/GGUF adjacent-pair row order."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, head_dim // 2, inp).swapaxes(1, 2).reshape(out, inp)


def permute_qk(cfg, w):
    w = dict(w)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}.self_attn."
        w[p + "q_proj.weight"] = to_adjacent(w[p + "q_proj.weight"], cfg["num_attention_heads"], cfg["head_dim"])
        w[p + "k_proj.weight"] = to_adjacent(w[p + "k_proj.weight"], cfg["num_key_value_heads"], cfg["head_dim"])
    return w


def naive_forward(cfg, w, tokens):
    """Loop-by-loop Llama forward (HF rotate_half pairing as complex rotation), float64."""
    D, H, KV, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    inv = llama3_inv_freq(hd, cfg["rope_theta"], cfg["rope_scaling"])

    def norm(x, g):
        return x / math.sqrt(sum(v * v for v in x) / len(x) + eps) * g

    def rot(vec, pos):
        half = hd // 2
        z = (vec[:half] + 1j * vec[half:]) * np.exp(1j * pos * inv)
        return np.concatenate([z.real, z.imag])

    E = w["model.embed_tokens.weight"]
    head = E if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    xs = [np.array(E[t], dtype=np.float64) for t in tokens]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        g = lambda k: w[p + k]  # noqa: E731
        keys, vals, new = [], [], []
        for pos, x in enumerate(xs):
            h = norm(x, g("input_layernorm.weight"))
            q = g("self_attn.q_proj.weight") @ h
            k = g("self_attn.k_proj.weight") @ h
            v = g("self_attn.v_proj.weight") @ h
            keys.append([rot(k[j * hd:(j + 1) * hd], pos) for j in range(KV)])
            vals.append([v[j * hd:(j + 1) * hd] for j in range(KV)])
            att = []
            for hh in range(H):
                j = hh // (H // KV)
                qh = rot(q[hh * hd:(hh + 1) * hd], pos)
                s = [float(qh @ keys[t][j]) / math.sqrt(hd) for t in range(pos + 1)]
                m = max(s)
                e = [math.exp(v_ - m) for v_ in s]
                att.append(sum(e[t] / sum(e) * vals[t][j] for t in range(pos + 1)))
            x = x + g("self_attn.o_proj.weight") @ np.concatenate(att)
            h = norm(x, g("post_attention_layernorm.weight"))
            gate = g("mlp.gate_proj.weight") @ h
            x = x + g("mlp.down_proj.weight") @ (gate / (1 + np.exp(-gate)) * (g("mlp.up_proj.weight") @ h))
            new.append(x)
        xs = new
    return np.stack([head @ norm(x, w["model.norm.weight"]) for x in xs])


# ----------------------------------------------------------------------------- basics

def test_rms_norm_softmax_silu_basics():
    x = np.array([[3.0, 4.0]])
    np.testing.assert_allclose(rms_norm(x, np.array([1.0, 2.0]), 0.0), [[3 / math.sqrt(12.5), 8 / math.sqrt(12.5)]])
    np.testing.assert_allclose(rms_norm(x, np.ones(2), 12.5), [[3 / 5, 4 / 5]])      # eps inside the sqrt
    s = softmax(np.array([[1.0, 2.0, 3.0, -np.inf], [1000.0, 1000.0, -np.inf, -np.inf]]))
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(s[0], list(e / e.sum()) + [0.0])
    np.testing.assert_allclose(s[1], [0.5, 0.5, 0, 0])
    with np.errstate(all="raise"):
        v = silu(np.array([0.0, 1.0, -1000.0, 1000.0]))
    np.testing.assert_allclose(v, [0.0, 1 / (1 + math.exp(-1)), 0.0, 1000.0], atol=1e-300)


@pytest.mark.parametrize("d, i, expected", [
    (64, 0, 1.0),                                  # unchanged (wavelen 6.3 < 2048)
    (64, 10, 0.016560440080994446),                # unchanged: 500000 ** (-20 / 64)
    (64, 16, 0.00042955679655936815),              # smoothed: wavelen 4442.9, smooth 0.28128
    (64, 31, 9.41830672543491e-08),                # scaled: 500000 ** (-62 / 64) / 32
    (128, 30, 0.001290547928209264),               # smoothed: wavelen 2948.3, smooth 0.59285
    (128, 63, 7.672314972286278e-08),              # scaled
])
def test_llama3_inv_freq_hand_values(d, i, expected):
    inv = llama3_inv_freq(d, 500000.0, LLAMA3_SCALING)
    assert inv.shape == (d // 2,)
    assert inv[i] == pytest.approx(expected, rel=1e-12)


def test_llama3_inv_freq_smooth_by_hand():
    # d = 64, i = 16: f = 500000 ** -0.5, wavelen = 2 pi / f, smooth = (8192 / wavelen - 1) / (4 - 1)
    f = 1 / math.sqrt(500000.0)
    smooth = (8192 / (2 * math.pi / f) - 1) / 3
    assert 0 < smooth < 1
    assert llama3_inv_freq(64, 500000.0, LLAMA3_SCALING)[16] == pytest.approx(
        (1 - smooth) * f / 32 + smooth * f, rel=1e-13)


@pytest.mark.parametrize("d, branches", [(64, (range(0, 15), range(15, 18), range(18, 32))),
                                         (128, (range(0, 29), range(29, 35), range(35, 64)))])
def test_llama3_branches_for_real_theta(d, branches):
    base = llama3_inv_freq(d, 500000.0, None)
    ratio = llama3_inv_freq(d, 500000.0, LLAMA3_SCALING) / base
    unchanged, smooth, scaled = branches
    np.testing.assert_array_equal(ratio[list(unchanged)], 1.0)
    assert np.all((ratio[list(smooth)] > 1 / 32) & (ratio[list(smooth)] < 1))
    np.testing.assert_allclose(ratio[list(scaled)], 1 / 32, rtol=1e-15)
    # make_checkpoint's report agrees, and every tiny preset's config exercises all three
    br = mc.rope_branches(d, 500000.0, LLAMA3_SCALING)
    assert (br["unchanged"], br["smooth"], br["scaled"]) == tuple(list(r) for r in branches)
    for name, p in mc.PRESETS.items():
        cfg = mc.make_config(name)
        assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"] == LLAMA3_SCALING
        assert all(mc.rope_branches(p["head_dim"], cfg["rope_theta"], cfg["rope_scaling"]).values())


def test_llama3_inv_freq_without_scaling():
    np.testing.assert_allclose(llama3_inv_freq(8, 10000.0, None), [1, 10000 ** -0.25, 10000 ** -0.5, 10000 ** -0.75])
    with pytest.raises(NotImplementedError):
        llama3_inv_freq(8, 10000.0, {"rope_type": "yarn", "factor": 4.0})


def test_rope_rotation_preserves_pair_norms_and_pairing():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 2, 8))
    pos = np.arange(5)
    inv = llama3_inv_freq(8, 10000.0, None)
    half = apply_rope(x, pos, inv, "half")
    adj = apply_rope(x, pos, inv, "adjacent")
    np.testing.assert_allclose(half[0], x[0])                     # position 0: identity
    np.testing.assert_allclose(np.hypot(half[..., :4], half[..., 4:]), np.hypot(x[..., :4], x[..., 4:]))
    np.testing.assert_allclose(np.hypot(adj[..., 0::2], adj[..., 1::2]), np.hypot(x[..., 0::2], x[..., 1::2]))
    # pair 0 at position 1 rotated by exactly 1 radian (inv_freq[0] = 1)
    c, s = math.cos(1), math.sin(1)
    np.testing.assert_allclose(half[1, :, 0], x[1, :, 0] * c - x[1, :, 4] * s)
    np.testing.assert_allclose(adj[1, :, 1], x[1, :, 0] * s + x[1, :, 1] * c)


# ----------------------------------------------------------------------------- the model

@pytest.mark.parametrize("tied", [True, False])
def test_matches_naive_loop_implementation(tied):
    cfg = small_config(tie_word_embeddings=tied)
    w = small_weights(cfg, seed=1)
    toks = [5, 17, 299, 0, 42, 42, 7, 100]
    np.testing.assert_allclose(ReferenceLlama(cfg, w).forward(toks), naive_forward(cfg, w, toks),
                               rtol=1e-10, atol=1e-10)


def test_half_pairing_equals_adjacent_pairing_on_permuted_weights():
    cfg = small_config()
    w = small_weights(cfg, seed=2)
    toks = np.random.default_rng(0).integers(0, cfg["vocab_size"], 40)
    a = ReferenceLlama(cfg, w, rope_pairing="half").forward(toks)
    b = ReferenceLlama(cfg, permute_qk(cfg, w), rope_pairing="adjacent").forward(toks)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    # ... while the wrong pairing on the same weights gives different logits
    c = ReferenceLlama(cfg, w, rope_pairing="adjacent").forward(toks)
    assert np.abs(a - c).max() > 0.1 * np.abs(a).max()


def test_rope_freq_divisors_equal_llama3_scaling():
    cfg = small_config()
    w = small_weights(cfg, seed=4)
    hd = cfg["head_dim"]
    div = llama3_inv_freq(hd, cfg["rope_theta"], None) / llama3_inv_freq(hd, cfg["rope_theta"], cfg["rope_scaling"])
    assert len(set(np.round(div, 6))) > 2                # several branches are in play
    toks = list(range(0, 300, 7))
    a = ReferenceLlama(cfg, w).forward(toks)
    b = ReferenceLlama(dict(cfg, rope_scaling=None), w, rope_freq_divisors=div.astype(np.float32)).forward(toks)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    unscaled = ReferenceLlama(dict(cfg, rope_scaling=None), w).forward(toks)
    assert np.abs(a - unscaled).max() > 1e-3


def test_gqa_equals_mha_with_repeated_kv_heads():
    cfg = small_config(num_attention_heads=6, num_key_value_heads=2, hidden_size=40, head_dim=8)
    w = small_weights(cfg, seed=5)
    mha_cfg = dict(cfg, num_key_value_heads=6)
    mw = dict(w)
    for n in range(cfg["num_hidden_layers"]):
        for k in ("k_proj", "v_proj"):
            name = f"model.layers.{n}.self_attn.{k}.weight"
            mw[name] = np.repeat(w[name].reshape(2, 8, 40), 3, axis=0).reshape(48, 40)   # kv head j -> q heads 3j..3j+2
    toks = [1, 2, 3, 250, 4, 5]
    np.testing.assert_allclose(ReferenceLlama(cfg, w).forward(toks), ReferenceLlama(mha_cfg, mw).forward(toks),
                               rtol=1e-11, atol=1e-11)


def test_head_dim_defaults_to_hidden_over_heads():
    cfg = small_config(hidden_size=64, head_dim=None)
    w = small_weights(dict(cfg, head_dim=16))
    assert ReferenceLlama(cfg, w).head_dim == 16
    cfg.pop("head_dim")
    assert ReferenceLlama(cfg, w).head_dim == 16


def test_rejects_bad_weights():
    cfg = small_config()
    w = small_weights(cfg)
    bad = dict(w)
    bad["model.layers.1.mlp.up_proj.weight"] = bad["model.layers.1.mlp.up_proj.weight"].T
    with pytest.raises(ValueError):
        ReferenceLlama(cfg, bad)
    missing = dict(w)
    del missing["model.norm.weight"]
    with pytest.raises(KeyError):
        ReferenceLlama(cfg, missing)
    with pytest.raises(KeyError):
        ReferenceLlama(dict(cfg, tie_word_embeddings=False), w)
    with pytest.raises(ValueError):
        ReferenceLlama(cfg, w).forward([cfg["vocab_size"]])


def test_causality():
    cfg = small_config()
    m = ReferenceLlama(cfg, small_weights(cfg, seed=6))
    rng = np.random.default_rng(1)
    toks = rng.integers(0, cfg["vocab_size"], 24)
    base = m.forward(toks)
    for k in (1, 7, 23):
        changed = toks.copy()
        changed[k:] = rng.integers(0, cfg["vocab_size"], 24 - k)
        assert changed[k] != toks[k]
        out = m.forward(changed)
        np.testing.assert_array_equal(out[:k], base[:k])
        assert np.abs(out[k] - base[k]).max() > 1e-3


def test_incremental_equals_full_recompute():
    cfg = small_config()
    m = ReferenceLlama(cfg, small_weights(cfg, seed=7))
    toks = np.random.default_rng(2).integers(0, cfg["vocab_size"], 30)
    full = m.forward(toks)
    cache = m.new_cache()
    parts, i = [], 0
    for size in (5, 1, 1, 9, 14):
        parts.append(m.forward_chunk(toks[i:i + size], cache))
        i += size
    assert cache.length == 30
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=1e-10, atol=1e-10)
    g1 = m.greedy(toks[:6], 12, use_cache=True)
    g2 = m.greedy(toks[:6], 12, use_cache=False)
    assert g1 == g2 and len(g1) == 12
    assert g1[0] == int(np.argmax(full[5]))


def test_float32_close_to_float64():
    cfg = small_config()
    w = small_weights(cfg, seed=8)
    toks = list(range(1, 200, 9))
    a = ReferenceLlama(cfg, w).forward(toks)
    b = ReferenceLlama(cfg, w, dtype=np.float32).forward(toks)
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 1e-4 * np.abs(a).max()


# ----------------------------------------------------------------------------- GGUF path

def test_weights_from_gguf_round_trip(tmp_path):
    """A tiny model written with gguf.GGUFWriter in GGUF conventions (adjacent rows, rope_freqs)."""
    import gguf

    cfg = small_config(tie_word_embeddings=False)
    w = small_weights(cfg, seed=9)
    aw = permute_qk(cfg, w)
    hd = cfg["head_dim"]
    div = (llama3_inv_freq(hd, cfg["rope_theta"], None)
           / llama3_inv_freq(hd, cfg["rope_theta"], cfg["rope_scaling"])).astype(np.float32)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    path = tmp_path / "tiny.gguf"
    wr = gguf.GGUFWriter(str(path), "llama")
    wr.add_block_count(cfg["num_hidden_layers"])
    wr.add_context_length(128)
    wr.add_embedding_length(cfg["hidden_size"])
    wr.add_feed_forward_length(cfg["intermediate_size"])
    wr.add_head_count(cfg["num_attention_heads"])
    wr.add_head_count_kv(cfg["num_key_value_heads"])
    wr.add_rope_dimension_count(hd)
    wr.add_key_length(hd)
    wr.add_value_length(hd)
    wr.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    wr.add_rope_freq_base(cfg["rope_theta"])
    wr.add_tensor("token_embd.weight", aw["model.embed_tokens.weight"].astype(np.float32))
    for n in range(cfg["num_hidden_layers"]):
        for hf, gg in names.items():
            arr = aw[f"model.layers.{n}.{hf}.weight"]
            # F16 for the matrices exercises dequantization; norms stay F32 as in real files
            wr.add_tensor(f"blk.{n}.{gg}.weight", arr.astype(np.float16 if arr.ndim == 2 else np.float32))
    wr.add_tensor("output_norm.weight", aw["model.norm.weight"].astype(np.float32))
    wr.add_tensor("output.weight", aw["lm_head.weight"].astype(np.float32))
    wr.add_tensor("rope_freqs.weight", div)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()

    gcfg, gw, gdiv = weights_from_gguf(path)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rope_theta"):
        assert gcfg[key] == cfg[key], key
    assert gcfg["rms_norm_eps"] == pytest.approx(1e-5)
    assert gcfg["rope_scaling"] is None and gcfg["tie_word_embeddings"] is False
    assert set(gw) == set(w)
    np.testing.assert_array_equal(gdiv, div)
    toks = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    want = ReferenceLlama(cfg, w, rope_pairing="half").forward(toks)
    got = ReferenceLlama(gcfg, gw, rope_pairing="adjacent", rope_freq_divisors=gdiv).forward(toks)
    assert np.abs(want - got).max() < 2e-2 * np.abs(want).max()      # F16 weights


@pytest.mark.slow
def test_smollm2_gguf_says_paris(smollm_gguf):
    import gguf

    cfg, w, div = weights_from_gguf(smollm_gguf)
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and cfg["tie_word_embeddings"]
    vocab = gguf.GGUFReader(str(smollm_gguf)).fields["tokenizer.ggml.tokens"].contents()
    ids = {t: i for i, t in enumerate(vocab)}
    prompt = [ids[t] for t in ("The", "Ġcapital", "Ġof", "ĠFrance", "Ġis")]
    m = ReferenceLlama(cfg, w, rope_pairing="adjacent", rope_freq_divisors=div, dtype=np.float32)
    assert vocab[m.greedy(prompt, 1)[0]] == "ĠParis"


# ----------------------------------------------------------------------------- make_checkpoint

def test_bf16_rounding_is_nearest_even():
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20, -2.5, 3.0e38], np.float32)
    bits = mc.f32_to_bf16_bits(x)
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    # halfway cases go to the even mantissa; anything above halfway rounds up
    np.testing.assert_array_equal(back[:5], [1.0, 1.0, 1.0 + 4 * 2 ** -8, 1.0 + 2 ** -7, -2.5])
    assert abs(back[5] / 3.0e38 - 1) < 2 ** -8


def test_split_shards():
    assert mc.split_shards([100, 1, 1, 1], 3) == [0, 1, 2, 2]
    assert mc.split_shards([1, 1, 1, 1, 1, 1], 3) == [0, 0, 1, 1, 2, 2]
    assert mc.split_shards([5, 5], 2) == [0, 1]
    with pytest.raises(ValueError):
        mc.split_shards([1], 2)


def _st_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    return n, raw, json.loads(raw)


def _expected_tensor(name, shape, kind, dtype="bf16"):
    raw = b"".join(mc.tensor_chunks(name, shape, kind, 0, dtype))
    if dtype == "bf16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(raw, "<f4").reshape(shape)


@pytest.mark.slow
def test_checkpoint_layout_and_round_trip(checkpoint):
    from safetensors import safe_open

    one, three = checkpoint("tiny64", 1), checkpoint("tiny64", 3)
    for folder in (one, three):
        names = sorted(p.name for p in folder.iterdir())
        base = ["config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json",
                "tokenizer_config.json"]
        if folder == one:
            assert names == sorted(base + ["model.safetensors"])
        else:
            assert names == sorted(base + ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                           "model-00003-of-00003.safetensors", "model.safetensors.index.json"])
    cfg = json.loads((one / "config.json").read_text())
    assert cfg == mc.make_config("tiny64")
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    assert cfg["rope_scaling"] == LLAMA3_SCALING and cfg["tie_word_embeddings"] is True
    gen = json.loads((one / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [128001, 128008, 128009] and gen["temperature"] == 0.6 and gen["top_p"] == 0.9
    stm = json.loads((one / "special_tokens_map.json").read_text())
    assert stm["bos_token"]["content"] == "<|begin_of_text|>"

    c1, w1 = load_hf_checkpoint(one)
    c3, w3 = load_hf_checkpoint(three)
    assert c1 == c3 == cfg
    specs = mc.tensor_specs(cfg)
    assert sorted(w1) == sorted(w3) == sorted(n for n, _, _ in specs)
    assert "lm_head.weight" not in w1
    for name, shape, kind in specs:
        assert w1[name].shape == shape and w1[name].dtype == np.float32
        np.testing.assert_array_equal(w1[name], w3[name])
        if kind != "embed":                                    # (the big one is checked below on rows)
            np.testing.assert_array_equal(w1[name], _expected_tensor(name, shape, kind))
    emb = w1["model.embed_tokens.weight"]
    assert abs(emb.std() * math.sqrt(256) - 1) < 0.01
    assert abs(w1["model.layers.0.input_layernorm.weight"].mean() - 1) < 0.02
    assert 0.07 < w1["model.layers.0.input_layernorm.weight"].std() < 0.13

    # the index file
    index = json.loads((three / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"]["total_size"] == sum(a.nbytes // 2 for a in w1.values())
    assert sorted(index["weight_map"]) == list(index["weight_map"]) == sorted(w1)

    # headers: our bytes are what the library expects; safe_open agrees on names, shapes, dtypes
    for f in [one / "model.safetensors"] + sorted(three.glob("model-*.safetensors")):
        n, raw, hdr = _st_header(f)
        assert n % 8 == 0 and raw.rstrip(b" ").endswith(b"}") and len(raw) - len(raw.rstrip(b" ")) < 8
        assert list(hdr)[0] == "__metadata__" and hdr["__metadata__"] == {"format": "pt"}
        tensors = [k for k in hdr if k != "__metadata__"]
        assert tensors == sorted(tensors)
        end = 0
        for k in tensors:
            assert hdr[k]["dtype"] == "BF16" and hdr[k]["data_offsets"][0] == end
            end = hdr[k]["data_offsets"][1]
        assert f.stat().st_size == 8 + n + end
        with safe_open(str(f), framework="numpy") as sf:
            assert sf.metadata() == {"format": "pt"}
            assert sorted(sf.keys()) == tensors
            for k in tensors:
                sl = sf.get_slice(k)
                assert sl.get_dtype() == "BF16" and list(sl.get_shape()) == hdr[k]["shape"]
                if f.parent == three:
                    assert index["weight_map"][k] == f.name


@pytest.mark.slow
def test_checkpoint_f32_matches_safetensors_library(tmp_path, assets):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    folder = mc.write_checkpoint(tmp_path / "f32", "tiny128", dtype="f32",
                                 tokenizer_json=assets["llama3.2-tokenizer.json"],
                                 tokenizer_config=assets["llama3.2-tokenizer_config.json"])
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float32"
    _, w = load_hf_checkpoint(folder)
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as sf:
        assert sorted(sf.keys()) == sorted(w)
        lib = {k: sf.get_tensor(k) for k in sf.keys()}
    for k in w:
        assert lib[k].dtype == np.float32
        np.testing.assert_array_equal(lib[k], w[k])
    # the library writes exactly the same bytes
    save_file(lib, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "lib.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    # and our loader decodes F16 files written by the library
    f16 = {"a.weight": np.linspace(-3, 3, 60, dtype=np.float16).reshape(6, 10), "b": np.ones(3, np.float32)}
    save_file(f16, str(tmp_path / "f16.safetensors"))
    from reference import _read_safetensors
    got = _read_safetensors(tmp_path / "f16.safetensors")
    np.testing.assert_array_equal(got["a.weight"], f16["a.weight"].astype(np.float32))
    np.testing.assert_array_equal(got["b"], f16["b"])


@pytest.mark.slow
def test_checkpoint_is_deterministic_and_layers_override(tmp_path, assets):
    kw = dict(tokenizer_json=assets["llama3.2-tokenizer.json"],
              tokenizer_config=assets["llama3.2-tokenizer_config.json"])
    a = mc.write_checkpoint(tmp_path / "a", "tiny128", seed=5, layers=1, **kw)
    b = mc.write_checkpoint(tmp_path / "b", "tiny128", seed=5, layers=1, **kw)
    c = mc.write_checkpoint(tmp_path / "c", "tiny128", seed=6, layers=3, **kw)
    d = mc.write_checkpoint(tmp_path / "d", "tiny128", seed=5, layers=3, **kw)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 3
    _, wa = load_hf_checkpoint(a)
    _, wd = load_hf_checkpoint(d)
    assert len(wd) == len(wa) + 2 * 9
    for k in wa:                                   # layer 0, embedding and final norm are shared
        np.testing.assert_array_equal(wa[k], wd[k])


def test_chat_template_renders_official_format(checkpoint):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tok_cfg = json.loads((checkpoint("tiny64") / "tokenizer_config.json").read_text())
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)

    def raise_exception(msg):
        raise jinja2.TemplateError(msg)

    tmpl = env.from_string(tok_cfg["chat_template"])
    render = lambda msgs, **kw: tmpl.render(messages=msgs, bos_token="<|begin_of_text|>",  # noqa: E731
                                            raise_exception=raise_exception, **kw)
    head = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" \
           "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    out = render([{"role": "system", "content": " S "}, {"role": "user", "content": "U"}],
                 add_generation_prompt=True)
    assert out == head + "S<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>" \
                         "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert render([{"role": "user", "content": "U"}]) == \
        head + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
    assert "Today Date: 01 Feb 2025" in render([{"role": "user", "content": "U"}],
                                               strftime_now=lambda fmt: "01 Feb 2025")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    out = render([{"role": "user", "content": "U"},
                  {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
                  {"role": "ipython", "content": "42"}], tools=tools)
    assert "Environment: ipython\n" in out and '{"name": function name, "parameters"' in out
    assert '"name": "f"' in out and out.count("<|start_header_id|>user<|end_header_id|>") == 1
    assert '{"name": "f", "parameters": {"a": 1}}<|eot_id|>' in out
    # the official template JSON-encodes tool results (a string is "iterable" to Jinja)
    assert out.endswith('<|start_header_id|>ipython<|end_header_id|>\n\n"42"<|eot_id|>')


def test_checkpoint_logits_have_a_healthy_spread(checkpoint):
    cfg, w = load_hf_checkpoint(checkpoint("tiny64"))
    m = ReferenceLlama(cfg, w)
    toks = np.random.default_rng(0).integers(0, 128000, 64)
    logits = m.forward(toks)
    std = logits.std(axis=1)
    assert np.all((std > 3) & (std < 12)), std
    top = np.sort(logits, axis=1)[:, -2:]
    assert np.median(top[:, 1] - top[:, 0]) > 0.3                    # argmax is not a coin toss
    am = logits.argmax(axis=1)
    assert len(set(am.tolist())) > 48 and np.mean(am == toks) < 0.1  # varied, not "repeat the input"
    g = m.greedy(toks[:8], 16)
    assert len(set(g)) > 8
