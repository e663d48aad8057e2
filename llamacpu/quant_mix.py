"""Which type llama-quantize gives each tensor of a Llama model (the K-quant mixtures).

A port of llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp: the outer wrapper,
`llama_tensor_get_type_impl` and `tensor_type_fallback`, with the defaults of
`llama_ftype_get_default_type`), for the llama architecture with no experts, no
importance matrix and no user overrides (`--pure`, `--tensor-type`,
`--output-tensor-type`, `--token-embedding-type` unset), as of the llama.cpp vendored in
llama-cpp-python 0.3.36. Only the rules that can fire for Q4_K_M, Q4_K_S, Q5_K_M and
Q6_K on such a model are kept; tests/test_quantize_k.py holds what llama-quantize chose
for Llama 3.2 1B and 3B, Llama 3.1 8B and 70B and SmolLM2-135M against this.

The rules, in llama-quantize's order:

- 1-D tensors (the norms) are not quantized: they stay F32, as convert_hf_to_gguf.py
  writes them.
- The output head (`output`, or `token_embd` when there is no `output`: tied
  embeddings) is Q6_K, or Q8_0 when its row length is not a multiple of 256. An untied
  `token_embd` gets the default type.
- attn_v (Q4_K_M, Q5_K_M): Q6_K in the layers `use_more_bits` picks (the first and
  last eighth, and every third in between), Q4_K_S: Q5_K in the first 4 layers.
  llama-quantize counts attn_v tensors in its tensor order (by layer, blk.N sorted
  numerically), so the count is the layer index.
- ffn_down: Q4_K_M and Q5_K_M as attn_v; Q4_K_S: Q5_K in the first eighth.
- A 70B-shaped Llama (80 layers with GQA, llama.cpp's LLM_TYPE_70B) gets Q5_K instead
  of Q4_K for attn_v.
- Everything else gets the ftype's default type. (The rules on GQA, n_gqa >= 4, fire
  only for Q2_K, Q3_K and the IQ types; those on experts, n_expert == 8, only for
  mixture-of-experts models, which llamacpu's config cannot describe.)
- Last, a row length that is not a multiple of the type's block falls back
  (`tensor_type_fallback`): Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 when
  even 32 does not divide it. SmolLM2-135M (hidden size 576) is mostly fallbacks.
"""

from __future__ import annotations

import re

from .format import F16, F32, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, TYPES, ModelConfig, expected_tensors, output_head_name

# ftype name (as `llamacpu convert --type` and llama-quantize's argument spell it,
# lower case) -> the ftype's default type (llama_ftype_get_default_type)
FTYPES = {
    "q4_k_m": Q4_K,
    "q4_k_s": Q4_K,
    "q5_k_m": Q5_K,
    "q6_k": Q6_K,
}

# tensor_type_fallback: a type of 256-element blocks -> the 32-element type it becomes
# when the row length is not a multiple of 256
_FALLBACK = {Q4_K: Q5_0, Q5_K: Q5_1, Q6_K: Q8_0}

_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.weight$")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp's use_more_bits: the layers of attn_v / ffn_down given more bits."""
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def _fallback(type: int, cols: int) -> int:
    """tensor_type_fallback: a type whose block divides a row of `cols` elements."""
    if cols % TYPES[type].block_elems == 0:
        return type
    type = _FALLBACK.get(type, type)
    return type if cols % TYPES[type].block_elems == 0 else F16


def _layer_type(ftype: str, kind: str, i: int, n_layers: int, is_70b: bool) -> int:
    """llama_tensor_get_type_impl for a 2-D tensor of layer i (kind: the internal suffix)."""
    t = FTYPES[ftype]
    if kind == "attention.wv":
        if ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, n_layers):
            t = Q6_K
        elif ftype == "q4_k_s" and i < 4:
            t = Q5_K
        if is_70b and t == Q4_K:  # 8 heads share attn_v there: it is 8x smaller than attn_q
            t = Q5_K
    elif kind == "feed_forward.w2":
        if ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, n_layers):
            t = Q6_K
        elif ftype == "q4_k_s" and i < n_layers // 8:
            t = Q5_K
    return t


def mixture(config: ModelConfig, ftype: str) -> dict:
    """Internal tensor name -> type id that llama-quantize `ftype` gives it (no imatrix).

    `config` is the model's (format.ModelConfig); the names are
    those of format.expected_tensors(config). `ftype` is one of FTYPES. A tensor not
    listed (rope_freqs.weight) is 1-D and keeps its type.
    """
    if ftype not in FTYPES:
        raise ValueError(f"unknown K-quant mixture {ftype!r}; expected one of {', '.join(FTYPES)}")
    n_layers = config.num_hidden_layers
    is_70b = n_layers == 80 and config.num_attention_heads != config.num_key_value_heads
    head = output_head_name(config)
    out = {}
    for name, shape in expected_tensors(config).items():
        cols = shape[-1]
        if len(shape) < 2:
            out[name] = F32
            continue
        if name == head:
            t = Q8_0 if cols % TYPES[FTYPES[ftype]].block_elems else Q6_K
        elif name == "tok_embeddings.weight":
            t = FTYPES[ftype]
        else:
            m = _LAYER_RE.match(name)
            t = _layer_type(ftype, m.group(2), int(m.group(1)), n_layers, is_70b)
        out[name] = _fallback(t, cols)
    return out
