"""The converter: HF folders and GGUF files -> llamacpu model files.

Source values are read here independently of llamacpu (a few lines of
safetensors parsing, the `gguf` package's reader and quantizers), never with the
code under test.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llamacpu.convert as conv
from conftest import slow_unless
from llamacpu.convert import convert
from llamacpu.errors import ModelFormatError
from llamacpu.format import F16, F32, Q4_0, Q4_1, Q6_0, Q8_0, TYPE_NAMES, read_model

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GQ  # noqa: E402
from gguf import quants as gquants  # noqa: E402
from llamacpu.format import tokenizer_dict  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Fixtures from conftest.py: `assets` (fetched by tools/fetch_assets.py) and
# `checkpoint(preset, shards)` (tools/make_checkpoint.py, helper-2's HF writer).


# ----------------------------------------------------------------------------- helpers

def read_safetensors(folder: Path) -> dict:
    """name -> float32 array, parsed by hand (BF16/F16/F32)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        raw = f.read_bytes()
        n = struct.unpack_from("<Q", raw)[0]
        header = json.loads(raw[8:8 + n])
        for name, e in header.items():
            if name == "__metadata__":
                continue
            b, end = e["data_offsets"]
            buf = raw[8 + n + b:8 + n + end]
            if e["dtype"] == "BF16":
                a = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
            elif e["dtype"] == "F16":
                a = np.frombuffer(buf, "<f2").astype(np.float32)
            else:
                a = np.frombuffer(buf, "<f4").astype(np.float32)
            out[name] = a.reshape(e["shape"])
    return out


def permute_loop(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF half-split rows -> adjacent pairs, written as plain loops."""
    out = np.empty_like(w)
    hd = w.shape[0] // n_heads
    for h in range(n_heads):
        for i in range(hd // 2):
            out[h * hd + 2 * i] = w[h * hd + i]
            out[h * hd + 2 * i + 1] = w[h * hd + hd // 2 + i]
    return out


HF_TO_OURS = {
    "model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = {"input_layernorm": "attention_norm", "self_attn.q_proj": "attention.wq",
         "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
         "self_attn.o_proj": "attention.wo", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
         "mlp.up_proj": "feed_forward.w3"}


def ours(hf_name: str) -> str:
    if hf_name in HF_TO_OURS:
        return HF_TO_OURS[hf_name]
    _, _, n, rest = hf_name.split(".", 3)
    return f"layers.{n}.{LAYER[rest[:-len('.weight')]]}.weight"


def expected_f32(src: dict, config: dict) -> dict:
    """Our-name -> float32 the file should hold (q/k rows permuted)."""
    out = {}
    for k, v in src.items():
        if k == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if k.endswith("q_proj.weight"):
            v = permute_loop(v, config["num_attention_heads"])
        elif k.endswith("k_proj.weight"):
            v = permute_loop(v, config["num_key_value_heads"])
        out[ours(k)] = v
    return out


def encode(x: np.ndarray, t: int) -> bytes:
    if t == F32:
        return x.astype("<f4").tobytes()
    if t == F16:
        return x.astype("<f2").tobytes()
    if t == Q6_0:  # llamacpu's own type: tests/reference.py, from docs/FORMAT.md
        from reference import quantize_q6_0
        return quantize_q6_0(x).tobytes()
    return gquants.quantize(np.ascontiguousarray(x, np.float32), GQ(t)).tobytes()


def data_section(path: Path) -> bytes:
    raw = path.read_bytes()
    data_offset = struct.unpack_from("<Q", raw, 48)[0]
    dir_offset, n = struct.unpack_from("<QQ", raw, 32)
    return raw[dir_offset:dir_offset + 128 * n] + raw[data_offset:]


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return checkpoint("tiny64")  # conftest: cached per session, shared with other tests


@pytest.fixture(scope="module")
def tiny_src(tiny):
    return read_safetensors(tiny), json.loads((tiny / "config.json").read_text())


# ----------------------------------------------------------------------------- HF

POLICY = {  # type -> (2-D weights, output head)
    None: (Q4_0, Q6_0), "f32": (F32, F32), "f16": (F16, F16), "q8_0": (Q8_0, Q8_0),
    "q4_0": (Q4_0, Q6_0), "q4_1": (Q4_1, Q6_0),
}


@pytest.mark.parametrize("type", [slow_unless(t, None, "f32") for t in POLICY])   # fast: the default, f32
def test_hf_every_type(tiny, tiny_src, tmp_path, type):
    src, config = tiny_src
    out = convert(tiny, tmp_path / "m.lcpu", type=type, progress=False, quiet=True)
    want = expected_f32(src, config)
    weight_t, head_t = POLICY[type]
    with read_model(out) as m:
        assert set(m.tensors) == set(want)
        assert m.meta["provenance"]["type"] == (type or "q4_0")
        assert m.meta["provenance"]["tensor_types"] == {
            n: TYPE_NAMES[t.type] for n, t in m.tensors.items()}
        for name, x in want.items():
            info = m.tensors[name]
            if x.ndim == 1:
                t = F32
            elif name == "tok_embeddings.weight":  # tied: this is the output head
                t = head_t
            else:
                t = weight_t
            assert info.type == t, name
            assert info.shape == x.shape
            assert m.rows_array(name).tobytes() == encode(x, t), name


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["q4_k_m", "q4_k_s", "q5_k_m", "q6_k"])
def test_hf_kquant_mixtures(tiny, tiny_src, tmp_path, ftype):
    """--type q4_k_m etc.: each tensor gets llama-quantize's type (quant_mix, pinned against
    llama-quantize's choices in tests/test_quantize_k.py) and the bytes of the reference
    quantizer (pinned against llama-quantize's bytes there) of the bf16 values."""
    from llamacpu import _core
    from llamacpu.quant_mix import mixture
    src, config = tiny_src
    out = convert(tiny, tmp_path / "m.lcpu", type=ftype, progress=False, quiet=True)
    want = expected_f32(src, config)
    with read_model(out) as m:
        mix = mixture(m.config, ftype)
        assert m.meta["provenance"]["type"] == ftype
        assert {TYPE_NAMES[t.type] for t in m.tensors.values()} >= {"Q6_K"}  # the head, at least
        for name, x in want.items():
            t = m.tensors[name].type
            assert t == mix[name], name
            if x.ndim == 2:
                assert m.rows_array(name).tobytes() == _core.quantize(x, t).tobytes(), name


@pytest.mark.slow
@pytest.mark.parametrize("head_type,want", [("q8_0", Q8_0), ("q6_0", Q6_0), ("f16", F16)])
def test_head_type_option(tiny, tiny_src, tmp_path, head_type, want):
    """--head-type sets the output head's type (tied: the embedding table), nothing else."""
    src, config = tiny_src
    exp = expected_f32(src, config)
    out = tmp_path / "m.lcpu"
    r = subprocess.run([sys.executable, "-m", "llamacpu", "convert", str(tiny), str(out), "--type", "q8_0",
                        "--head-type", head_type, "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with read_model(out) as m:
        assert m.tensors["tok_embeddings.weight"].type == want
        assert m.rows_array("tok_embeddings.weight").tobytes() == encode(exp["tok_embeddings.weight"], want)
        assert m.tensors["layers.0.attention.wq.weight"].type == Q8_0
    with pytest.raises(ValueError, match="head type"):
        convert(tiny, tmp_path / "x.lcpu", head_type="q5_0", quiet=True)


def test_q6_0_head_needs_rows_multiple_of_8():
    """Q6_0 exists in the x8 layout only: a vocabulary that is not a multiple of 8 keeps Q8_0."""
    from conftest import llama_1b_config
    from llamacpu.convert import tensor_type
    cfg = llama_1b_config()  # tied: the head is tok_embeddings
    assert tensor_type("tok_embeddings.weight", F32, "q4_0", cfg, "hf", cols=64, rows=128) == Q6_0
    assert tensor_type("tok_embeddings.weight", F32, "q4_0", cfg, "hf", cols=64, rows=130) == Q8_0
    assert tensor_type("tok_embeddings.weight", F32, None, cfg, "gguf", cols=64, rows=128, head_type="q6_0") == Q6_0
    assert tensor_type("layers.0.attention.wq.weight", F32, "q4_0", cfg, "hf", cols=64, rows=64,
                       head_type="q8_0") == Q4_0


@pytest.mark.slow
def test_hf_metadata(tiny, tmp_path):
    out = convert(tiny, tmp_path / "m.lcpu", type="f16", progress=False, quiet=True)
    hf_cfg = json.loads((tiny / "config.json").read_text())
    tok_cfg = json.loads((tiny / "tokenizer_config.json").read_text())
    gen = json.loads((tiny / "generation_config.json").read_text())
    with read_model(out) as m:
        c = m.config.to_dict()
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                  "rope_theta", "max_position_embeddings", "tie_word_embeddings"):
            assert c[k] == hf_cfg[k], k
        assert c["rope_scaling"] == hf_cfg["rope_scaling"]
        assert c["rope_pairing"] == "adjacent" and c["architecture"] == "llama"
        assert m.meta["chat_template"] == tok_cfg["chat_template"]
        assert m.meta["generation"]["temperature"] == gen["temperature"]
        st = m.meta["special_tokens"]
        assert st["bos_token_id"] == 128000
        assert {128001, 128008, 128009} <= set(st["eog_token_ids"])
        assert isinstance(st["add_bos_token"], bool)
        # <|image|> (128256) has no embedding row: dropped
        assert all(t["id"] < 128256 for t in tokenizer_dict(m.meta)["added_tokens"])
        assert len(tokenizer_dict(m.meta)["added_tokens"]) == 256
        prov = m.meta["provenance"]
        assert prov["source_format"] == "hf" and prov["source"] == tiny.resolve().name
        assert prov["converter"].startswith("llamacpu ")
        names = {f["name"] for f in prov["files"]}
        assert {"config.json", "tokenizer.json", "model.safetensors"} <= names
        import hashlib
        st_sha = hashlib.sha256((tiny / "model.safetensors").read_bytes()).hexdigest()
        assert {"name": "model.safetensors", "size": (tiny / "model.safetensors").stat().st_size,
                "sha256": st_sha} in prov["files"]
        manifest = "".join(f"{f['sha256']}  {f['name']}\n"
                           for f in sorted(prov["files"], key=lambda f: f["name"]))
        assert prov["source_sha256"] == hashlib.sha256(manifest.encode()).hexdigest()
    # the rebuilt tokenizer loads and agrees with the source tokenizer.json
    from tokenizers import Tokenizer
    with read_model(out) as m:
        tok = Tokenizer.from_str(json.dumps(tokenizer_dict(m.meta)))
    ref = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    text = "Hello, llamacpu! <|eot_id|> 12345"
    assert tok.encode(text).ids == ref.encode(text).ids


@pytest.mark.slow
def test_hf_shards_give_identical_output(tiny, checkpoint, tmp_path):
    sharded = checkpoint("tiny64", shards=3)
    assert (sharded / "model.safetensors.index.json").exists()
    a = convert(tiny, tmp_path / "a.lcpu", type="q4_0", progress=False, quiet=True)
    b = convert(sharded, tmp_path / "b.lcpu", type="q4_0", progress=False, quiet=True)
    assert data_section(a) == data_section(b)
    with read_model(a) as ma, read_model(b) as mb:
        pa, pb = ma.meta.pop("provenance"), mb.meta.pop("provenance")
        assert ma.meta == mb.meta
        assert pa["tensor_types"] == pb["tensor_types"]
        assert len(pb["files"]) == len(pa["files"]) + 3  # 3 shards + index - 1 file


@pytest.mark.slow
def test_hf_untied_head_and_f32_source(tiny, tiny_src, tmp_path):
    """lm_head present and untied (and stored as F32 in a second shard)."""
    from safetensors.numpy import save_file

    src, _ = tiny_src
    d = tmp_path / "untied"
    shutil.copytree(tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    head = (src["model.embed_tokens.weight"][::-1] * 0.5).copy()
    save_file({"lm_head.weight": head}, str(d / "model-00002-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" for k in src}
    wm["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    out = convert(d, tmp_path / "u.lcpu", type="q4_1", progress=False, quiet=True)
    with read_model(out) as m:
        assert m.tensors["tok_embeddings.weight"].type == Q4_1
        assert m.tensors["output.weight"].type == Q6_0
        assert m.rows_array("output.weight").tobytes() == encode(head, Q6_0)
    # tied + lm_head present: the head is ignored
    cfg["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    with read_model(convert(d, tmp_path / "t.lcpu", type="f16", quiet=True)) as m:
        assert "output.weight" not in m.tensors


def _broken(tiny, tmp_path, edit):
    d = tmp_path / "broken"
    shutil.copytree(tiny, d)
    edit(d)
    return d


def _edit_config(**changes):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


@pytest.mark.parametrize("edit,match", [
    (_edit_config(model_type="mistral"), "model_type"),
    (_edit_config(architectures=["MistralForCausalLM"]), "architectures"),
    (_edit_config(intermediate_size=512), "shape"),
    (_edit_config(num_hidden_layers=3), "missing"),
    (_edit_config(num_hidden_layers=1), "unexpected tensor"),
    (_edit_config(vocab_size=None), "vocab_size"),
    (_edit_config(num_key_value_heads=3), "num_key_value_heads"),
    (_edit_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (_edit_config(attention_bias=True), "bias"),
    (_edit_config(tie_word_embeddings=False), "output.weight"),
    (lambda d: (d / "config.json").unlink(), "config.json"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    (lambda d: (d / "config.json").write_text("{not json"), "JSON"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 16), "safetensors"),
    (lambda d: os.truncate(d / "model.safetensors",
                           (d / "model.safetensors").stat().st_size - 1), "past the end"),
])
def test_hf_refusals(tiny, tmp_path, edit, match):
    d = _broken(tiny, tmp_path, edit)
    with pytest.raises(ModelFormatError, match=match):
        convert(d, tmp_path / "x.lcpu", type="f16", quiet=True)
    assert not (tmp_path / "x.lcpu").exists()


# ----------------------------------------------------------------------------- GGUF

@pytest.fixture(scope="module")
def smol(assets):
    return assets[SMOL]


@pytest.fixture(scope="module")
def smol_reader(smol):
    return gguf.GGUFReader(str(smol))


def test_gguf_blocks_bit_exact(smol, smol_reader, tmp_path):
    out = convert(smol, tmp_path / "smol.lcpu", progress=False, quiet=True)
    r = smol_reader
    src = {t.name: t for t in r.tensors}
    names = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight", "rope_freqs.weight": "rope_freqs.weight"}
    per_layer = {"attn_norm": "attention_norm", "attn_q": "attention.wq",
                 "attn_k": "attention.wk", "attn_v": "attention.wv",
                 "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
                 "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
                 "ffn_up": "feed_forward.w3"}
    seen_types = set()
    with read_model(out) as m:
        assert len(m.tensors) == len(src)
        for gname, t in src.items():
            if gname in names:
                name = names[gname]
            else:
                _, n, key, _ = gname.split(".")
                name = f"layers.{n}.{per_layer[key]}.weight"
            info = m.tensors[name]
            gtype = int(t.tensor_type)
            seen_types.add(gtype)
            assert info.type == gtype, name  # default: every type kept
            assert info.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
            assert m.rows_array(name).tobytes() == np.asarray(t.data).tobytes(), name
        c = m.config.to_dict()
        kv = {f.name: f for f in r.fields.values()}

        def val(key):
            f = kv[key]
            return f.parts[f.data[0]].tolist()[0]
        assert c["num_hidden_layers"] == val("llama.block_count")
        assert c["hidden_size"] == val("llama.embedding_length")
        assert c["intermediate_size"] == val("llama.feed_forward_length")
        assert c["num_attention_heads"] == val("llama.attention.head_count")
        assert c["num_key_value_heads"] == val("llama.attention.head_count_kv")
        assert np.float32(c["rms_norm_eps"]) == np.float32(
            val("llama.attention.layer_norm_rms_epsilon"))
        assert c["tie_word_embeddings"] == ("output.weight" not in src)
        assert m.meta["chat_template"]
        assert m.meta["provenance"]["source_format"] == "gguf"
        assert m.meta["provenance"]["type"] == "source"
    assert {int(GQ.Q4_1), int(GQ.Q8_0)} <= seen_types


@pytest.mark.slow
def test_gguf_to_f16_dequantizes_exactly(smol, smol_reader, tmp_path):
    out = convert(smol, tmp_path / "s16.lcpu", type="f16", progress=False, quiet=True)
    src = {t.name: t for t in smol_reader.tensors}
    checks = [("token_embd.weight", "tok_embeddings.weight", 512),  # first 512 rows
              ("blk.0.attn_q.weight", "layers.0.attention.wq.weight", None),
              ("blk.29.ffn_down.weight", "layers.29.feed_forward.w2.weight", None)]
    with read_model(out) as m:
        for gname, name, rows in checks:
            t = src[gname]
            raw = np.asarray(t.data)[:rows]
            x = gquants.dequantize(raw, t.tensor_type).astype(np.float32)
            assert m.tensors[name].type == F16
            assert m.rows_array(name)[:rows].tobytes() == x.astype("<f2").tobytes(), name


@pytest.mark.slow
def test_gguf_requantize_only_when_type_differs(smol, smol_reader, tmp_path):
    """type q8_0: Q8_0 source blocks copied as they are, Q4_1 ones requantized."""
    out = convert(smol, tmp_path / "s8.lcpu", type="q8_0", progress=False, quiet=True)
    r = smol_reader
    src = {t.name: t for t in r.tensors}
    emb = src["token_embd.weight"]
    q = src["blk.3.ffn_down.weight"]
    with read_model(out) as m:
        if emb.tensor_type == GQ.Q8_0:
            assert m.rows_array("tok_embeddings.weight").tobytes() == np.asarray(emb.data).tobytes()
        x = gquants.dequantize(np.asarray(q.data), q.tensor_type).astype(np.float32)
        assert m.rows_array("layers.3.feed_forward.w2.weight").tobytes() == encode(x, Q8_0)


def write_gguf(path, tensor_type=GQ.Q4_K, arch="llama"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(256)
    w.add_feed_forward_length(256)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(512)
    blk, size = gguf.GGML_QUANT_SIZES[tensor_type]
    raw = np.zeros((8, 256 // blk * size), np.uint8)
    w.add_tensor("token_embd.weight", raw, raw_dtype=tensor_type)  # shape from the bytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", [GQ.Q2_K, GQ.Q3_K, GQ.IQ2_XS, GQ.TQ1_0])
def test_gguf_refuses_types_without_kernels(tmp_path, qtype):
    """A tensor type llamacpu cannot run: one message naming it and the types it runs."""
    p = write_gguf(tmp_path / "k.gguf", qtype)
    with pytest.raises(ModelFormatError, match=f"tensor 'token_embd.weight' has type {qtype.name}, which "
                                               "llamacpu cannot run; it runs GGUF files whose tensors are "
                                               "F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, "
                                               "IQ4_NL, IQ4_XS, BF16"):
        convert(p, tmp_path / "k.lcpu", quiet=True)
    assert not (tmp_path / "k.lcpu").exists()


def test_gguf_refuses_other_architectures(tmp_path):
    p = write_gguf(tmp_path / "g.gguf", GQ.Q8_0, arch="gemma")
    with pytest.raises(ModelFormatError, match="gemma"):
        convert(p, tmp_path / "g.lcpu", quiet=True)


def test_gguf_sampling_defaults_of_smollm2(smollm_model):
    """SmolLM2's GGUF has no general.sampling.* keys: its model card's recommendation applies."""
    with read_model(smollm_model) as m:
        assert m.meta["generation"] == {"temperature": 0.2, "top_p": 0.9}


def test_gguf_sampling_keys():
    from llamacpu.convert_gguf import _sampling_defaults

    kv = {"general.sampling.temp": np.float32(0.7), "general.sampling.top_k": np.int32(40),
          "general.sampling.penalty_repeat": 1.1, "general.basename": "smollm2"}
    gen = _sampling_defaults(kv, "f.gguf")  # the file's own keys win over the family's
    assert gen == {"temperature": pytest.approx(0.7), "top_k": 40, "repetition_penalty": pytest.approx(1.1)}
    assert type(gen["top_k"]) is int and type(gen["temperature"]) is float
    assert _sampling_defaults({"general.basename": "Llama-3.2"}, "f.gguf") == {}
    assert _sampling_defaults({}, "f.gguf") == {}
    with pytest.raises(ModelFormatError, match=r"f.gguf: general.sampling.\*: .*top_p"):
        _sampling_defaults({"general.sampling.top_p": 1.5}, "f.gguf")
    with pytest.raises(ModelFormatError, match="general.sampling.temp must be a number"):
        _sampling_defaults({"general.sampling.temp": "hot"}, "f.gguf")


# ----------------------------------------------------------------------------- safety

@pytest.mark.slow
def test_refuses_to_overwrite_source(smol, tiny, tmp_path):
    g = tmp_path / "s.gguf"
    os.link(smol, g) if os.stat(smol).st_dev == os.stat(tmp_path).st_dev else \
        shutil.copy(smol, g)
    before = g.stat().st_size
    with pytest.raises(ValueError, match="source"):
        convert(g, g, overwrite=True, quiet=True)
    with pytest.raises(ValueError, match="source"):
        convert(g, tmp_path / "." / "s.gguf", overwrite=True, quiet=True)
    d = tmp_path / "hf"
    shutil.copytree(tiny, d)
    for victim in ("model.safetensors", "config.json"):
        with pytest.raises(ValueError, match="source"):
            convert(d, d / victim, type="f16", overwrite=True, quiet=True)
    assert g.stat().st_size == before
    assert read_safetensors(d).keys() == read_safetensors(tiny).keys()
    # writing into the source folder under a new name is fine
    convert(d, d / "model.lcpu", type="f16", quiet=True)
    assert (d / "model.lcpu").exists()


def test_refuses_existing_out_unless_overwrite(smol, tmp_path):
    out = tmp_path / "o.lcpu"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        convert(smol, out, quiet=True)
    assert out.read_bytes() == b"keep me"  # (--force is exercised by the CLI test)
    with pytest.raises(ValueError, match="type"):
        convert(smol, tmp_path / "z.lcpu", type="q4_k", quiet=True)


@pytest.mark.parametrize("phase,at", [("hashing", 1), ("converting", 0), ("converting", 5)])
def test_interrupted_conversion_leaves_nothing(tiny, tmp_path, phase, at):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    old = out_dir / "m.lcpu"
    old.write_bytes(b"previous model")
    calls = []

    def progress(ph, done_n, total_n, done_b, total_b):
        calls.append(ph)
        if ph == phase and calls.count(ph) > at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny, old, type="q4_0", progress=progress, overwrite=True)
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.lcpu"]
    assert old.read_bytes() == b"previous model"


def test_failure_inside_quantizer_leaves_nothing(tiny, tmp_path, monkeypatch):
    def boom(x, t):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(conv, "_quantize", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(tiny, tmp_path / "m.lcpu", type="q8_0", quiet=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_progress_callback_and_summary(tiny, tmp_path, capsys):
    seen = []
    convert(tiny, tmp_path / "m.lcpu", type="f16",
            progress=lambda *a: seen.append(a))
    phases = [a[0] for a in seen]
    assert phases[0] == "hashing" and phases[-1] == "converting"
    last = seen[-1]
    assert last[1] == last[2] == 20 and last[3] == last[4]  # all tensors, all bytes
    err = capsys.readouterr().err
    assert "converted" in err and "20 tensors" in err and "\r" not in err  # not a TTY: no bar
    convert(tiny, tmp_path / "m2.lcpu", type="f16", progress=False, quiet=True)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- CLI

def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "llamacpu", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO)


@pytest.mark.slow
def test_cli_convert_and_info(smol, tmp_path):
    out = tmp_path / "smol.lcpu"
    r = run_cli("convert", smol, out)
    assert r.returncode == 0, r.stderr
    assert "converted" in r.stderr and r.stdout == ""
    r = run_cli("convert", smol, out)
    assert r.returncode == 1 and "exists" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("convert", smol, out, "--force", "--quiet")
    assert r.returncode == 0 and r.stderr == ""
    r = run_cli("info", out, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["config"]["num_hidden_layers"] == 30
    assert info["types"]["Q4_1"]["tensors"] == 210
    assert info["chat_template"] is True
    assert info["special_tokens"]["eog_token_ids"]
    assert info["provenance"]["source"] == SMOL
    r = run_cli("info", out)
    assert r.returncode == 0
    for s in ("hidden_size", "Q8_0", "tok_embeddings.weight", "chat template: yes",
              "eog_token_ids", "source_sha256"):
        assert s in r.stdout, s


@pytest.mark.slow
def test_cli_errors_are_friendly(tmp_path):
    bad = tmp_path / "bad.lcpu"
    bad.write_bytes(b"LLAMACPU" + bytes(100))
    r = run_cli("info", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "bad.lcpu" in r.stderr
    r = run_cli("convert", tmp_path / "nope.gguf", tmp_path / "x.lcpu")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    k = write_gguf(tmp_path / "k.gguf", GQ.Q3_K)
    r = run_cli("convert", k, tmp_path / "x.lcpu")
    assert r.returncode == 2 and "Q3_K, which llamacpu cannot run" in r.stderr and "Traceback" not in r.stderr
    r = run_cli()
    assert r.returncode == 2  # argparse: a subcommand is required
