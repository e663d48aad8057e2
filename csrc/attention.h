/* One layer's causal GQA attention over the KV cache, as flash attention (attention.c),
 * and the KV cache's row types. Internal to the C core: forward.c is its one user. */
#ifndef LLAMACPU_ATTENTION_H
#define LLAMACPU_ATTENTION_H

#include <stddef.h>
#include <stdint.h>
#include "llamacpu.h"

/* a KV cache type: F16, Q8_0 or Q4_0 (the latter two need head_dim % 32 == 0) */
int lc_kv_type_ok(int type, int head_dim);
/* x (n,) f32 -> one cache row of `type` at dst (f16 rounded to nearest even; Q8_0 and
 * Q4_0 with ggml's reference quantizers, so the cache matches llama.cpp's) */
void lc_kv_store(const lc_kernels *k, int type, void *dst, const float *x, int n);

/* Quantized caches hold K and V rotated, as llama.cpp's do (its PR 21038): a Walsh-Hadamard
 * rotation spreads a head's outlier channels over the quantization block, so Q4_0's 4 bits
 * lose far less. Q and K are rotated alike (Q K^T is unchanged); V is rotated before it is
 * stored and the attention's output rotated back (the rotation is its own inverse).
 * lc_kv_rot: the rotation's size for a cache of `type` (0: none; F16, or head_dim not a
 * multiple of 64): for K the largest power of two that divides head_dim, for V 64.
 * lc_hadamard: each run of nrot floats of x (n of them, a multiple of nrot) times the
 * orthonormal Sylvester-Hadamard matrix (llama.cpp's ggml_gen_hadamard), in place. */
int lc_kv_rot(int type, int head_dim, int is_v);
void lc_hadamard(float *x, int64_t n, int nrot);

typedef struct {
    const lc_kernels *k;
    lc_pool *pool;  /* the threads that share out the work units */
    int n_heads, n_kv_heads, head_dim, n_ctx;
    int type_k, type_v;
    /* this layer's caches: (n_seq, n_kv_heads, n_ctx) rows of row_k / row_v bytes */
    const uint8_t *kcache, *vcache;
    size_t row_k, row_v;
    float *scratch; /* lc_pool_threads(pool) * lc_attention_scratch(...) floats */
} lc_attn;

/* floats of one thread's scratch */
size_t lc_attention_scratch(int head_dim, int n_heads, int n_kv_heads);

/* out (nt, n_heads * hd) = attention of q (nt, n_heads * hd) for tokens t of sequence
 * seq[t] at position pos[t], each seeing positions [0, pos[t]] of its sequence's cache
 * (already written). Returns 0, or -1 when out of memory (out is then unwritten). */
int lc_attention(const lc_attn *a, const float *q, const int32_t *seq, const int32_t *pos, int nt, float *out);

#endif
