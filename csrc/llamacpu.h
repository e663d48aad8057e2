/* llamacpu C core: kernel table and the forward pass.
 *
 * Python validates the model file and hands this core pointers into the mmap;
 * the core never copies weights and never reads a file itself.
 */
#ifndef LLAMACPU_H
#define LLAMACPU_H

#include <stddef.h>
#include <stdint.h>
#include "quants.h"

/* ---------------------------------------------------------------- kernels */

/* Every kernel has a scalar reference (kernels_scalar.c); SIMD variants share
 * its signature and are validated against it (tests/test_kernels.py). */

/* Y[t*ldy + r] = W[r,:] . X[t,:] for rows r in [r0, r1), tokens t in [0, nt). W
 * (rows, cols) in its type and layout; X (nt, cols) quantized (q8a) for quantized W
 * (lc_gemm_q8a), float for F16/F32 W (lc_gemm_f). cols: a multiple of the type's
 * block; x8 layout: r0, r1 multiples of 8. */
typedef void (*lc_gemm_q8a)(const void *W, int64_t cols, const block_q8a *X, int nt, float *Y, int64_t ldy,
                            int64_t r0, int64_t r1);
typedef void (*lc_gemm_f)(const void *W, int64_t cols, const float *X, int nt, float *Y, int64_t ldy,
                          int64_t r0, int64_t r1);
typedef void (*lc_gemm_q16a)(const void *W, int64_t cols, const block_q16a *X, int nt, float *Y, int64_t ldy,
                             int64_t r0, int64_t r1);

typedef struct lc_kernels {
    const char *name; /* "scalar", "avx2", "avx512vnni", "neon", "neon-dotprod" */

    /* x (n,) -> y (n/32 blocks); n % 32 == 0 */
    void (*quantize_act)(const float *x, block_q8a *y, int64_t n);

    /* quantized matmuls by type index (lc_type_index), per layout; NULL: none.
     * Look them up with lc_gemm_of, never directly. */
    lc_gemm_q8a gemm_rows[LC_N_TYPES];
    lc_gemm_q8a gemm_x8[LC_N_TYPES];
    lc_gemm_f gemm_f16, gemm_f32;

    /* row (n elements, a multiple of the type's block) of `type`, row-major -> float */
    void (*dequantize_row)(int type, const void *row, float *y, int64_t n);

    /* out (n,) = x / sqrt(mean(x^2) + eps) * w */
    void (*rmsnorm)(float *out, const float *x, const float *w, int n, float eps);

    /* in place, n_heads heads of head_dim, adjacent pairs (2i, 2i+1) rotated by
     * pos * inv_freq[i] */
    void (*rope)(float *x, int n_heads, int head_dim, int pos, const float *inv_freq);

    /* Flash attention's step (csrc/attention.c): nq query rows Q (nq, hd), already
     * scaled by 1/sqrt(hd), against one block of nk <= LC_ATT_BLOCK cached positions, as
     * f32 rows: K (nk, hd) the keys, V (nk, hd) the values. Row
     * r sees the block's first vis[r] positions (0 <= vis[r] <= nk; 0 leaves it as it is).
     * Each row's running state: m[r] the largest score so far, l[r] the sum of
     * exp(score - m[r]), O (nq, hd) the sum of exp(score - m[r]) v; start from -inf, 0, 0;
     * the attention is O / l. S: scratch, LC_ATT_S(hd) floats. A unit's blocks (one Q,
     * nq and S, first = 1 on the first) may keep what the kernel derives from Q in S. */
    void (*attn_block)(int nq, int hd, const float *Q, const int *vis, const float *K, const float *V, int nk,
                       float *m, float *l, float *O, float *S, int first);

    /* x (n,) float -> y (n,) f16, round to nearest even */
    void (*f32_to_f16)(uint16_t *y, const float *x, int64_t n);

    /* hb (n,) = silu(hb) * hb2 */
    void (*swiglu)(float *hb, const float *hb2, int64_t n);

    /* Prefill on Intel AMX (the avx512amx table; NULL in the others). Y[t*ldy + r] =
     * W[r,:] . X[t,:] for W of a quantized type in the x8 layout, rows [r0, r1) (multiples
     * of 8). X: the nt tokens' activations as act_to_amx writes them (LC_AMX_ACT(nt, cols)
     * elements, tokens after nt zero), of which `terms` are used: 2 (hi + lo, 16
     * significant bits) or 1 (hi, bf16's 8, half the tile products). scratch:
     * LC_AMX_SCRATCH(cols) bytes, for the dequantized weights. cols % 32 == 0. */
    void (*gemm_amx)(int type, int terms, const void *W, int64_t cols, const uint16_t *X, int nt, float *Y,
                     int64_t ldy, int64_t r0, int64_t r1, void *scratch);
    /* token t's activations x (cols,) -> X, as two bf16 terms (x = hi + lo to 16
     * significant bits) in AMX tiles of 16 tokens x 32 elements */
    void (*act_to_amx)(uint16_t *X, const float *x, int64_t cols, int t);

    /* Steps of LC_AMX_I8_MIN_TOKENS to LC_AMX_MIN_TOKENS - 1 tokens on AMX int8 tiles
     * (the avx512amx table; NULL in the others). quantize_act16: x (n,) -> y (n/32 blocks).
     * gemm_amx_i8: by type index, as gemm_x8 (x8 layout) with X in block_q16a; NULL for
     * a type without int8 tiles (its step uses gemm_x8 on q8a activations). */
    void (*quantize_act16)(const float *x, block_q16a *y, int64_t n);
    lc_gemm_q16a gemm_amx_i8[LC_N_TYPES];
} lc_kernels;

/* positions of a flash-attention block (lc_kernels.attn_block), and its S scratch (floats) */
#define LC_ATT_BLOCK 64
/* query rows of an attention unit at most (attention.c: the GQA group's heads of
 * consecutive tokens, so one pass over the cache serves 64 tokens of a group of 4) */
#define LC_ATT_ROWS 256
/* S scratch: the 512-bit tables' 4 score rows and the block's keys transposed, (4 + hd) x
 * LC_ATT_BLOCK; the AMX table's bf16 tiles (LC_ATT_ROWS query rows, the keys, values and 64
 * rows' weights as hi and lo; their scores and P V: 4 (LC_ATT_ROWS + 192) hd + 32768 bytes)
 * from a 64-byte boundary */
#define LC_ATT_S(hd) ((LC_ATT_ROWS + 192) * (hd) + 8192 + 16)

/* bytes of gemm_amx's scratch for `cols` columns: a 32-row panel of bf16 */
#define LC_AMX_SCRATCH(cols) ((size_t)(cols) * 64)
/* elements (uint16) of gemm_amx's X for nt tokens: two bf16 terms, tokens padded to 32 */
#define LC_AMX_ACT(nt, cols) ((size_t)(((nt) + 31) / 32 * 32) * (size_t)(cols) * 2)
/* tokens from which a forward uses gemm_amx when the table has it (below: gemm_amx_i8 and
 * the q8a gemms, which need no per-matmul dequantization; 1B decode steps of 16 / 24
 * tokens, 2 threads: Q4_0 ~100 / ~145 ms on int8 tiles against ~155 / ~170 on bf16) */
#define LC_AMX_MIN_TOKENS 32
/* tokens from which a forward's step below LC_AMX_MIN_TOKENS uses gemm_amx_i8 (2-3 tokens:
 * faster on the 512-bit tiles) */
#define LC_AMX_I8_MIN_TOKENS 4

/* The one mapping from a weight's (type, layout) to its matmul: exactly one of q
 * (quantized types) and f (F16, F32) is set, or neither when the table has no
 * kernel for that pair (an unknown type, or a layout the type does not have). */
typedef struct {
    lc_gemm_q8a q;
    lc_gemm_f f;
} lc_gemm;
lc_gemm lc_gemm_of(const lc_kernels *k, int type, int layout);

/* Weight-type quantizers (scalar, deterministic, identical to ggml's
 * quantize_row_*_ref; Q6_0 in the manner of ggml's Q5_0, docs/FORMAT.md): these
 * write model files. x (n,) -> y (n / block elements blocks of `type`), n a multiple
 * of the type's block. Returns 0, or -1 when there is no quantizer for `type`. */
int lc_quantize_row_ref(int type, const float *x, void *y, int64_t n);

/* cos/sin of the float32 angles pos * inv_freq[i], i < half (shared by all RoPE variants) */
void lc_rope_angles(float *cos_out, float *sin_out, int half, int pos, const float *inv_freq);

extern const lc_kernels lc_kernels_scalar;
#if defined(__x86_64__) || defined(_M_X64)
extern const lc_kernels lc_kernels_avx2;
extern const lc_kernels lc_kernels_avx512vnni;
/* AMX intrinsics need GCC 11 or clang 12; with older compilers there is no avx512amx table */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define LC_HAVE_AMX 1
extern const lc_kernels lc_kernels_avx512amx;
#else
#define LC_HAVE_AMX 0
#endif
#endif
#if defined(__aarch64__)
extern const lc_kernels lc_kernels_neon;
extern const lc_kernels lc_kernels_neon_dotprod;
#endif

/* Best kernel table for this CPU; LLAMACPU_KERNELS=scalar|avx2|avx512vnni|avx512amx|neon|neon-dotprod
 * overrides (an unsupported request falls back to scalar). */
const lc_kernels *lc_kernels_best(void);
/* Table by name, or NULL when it is not compiled in or the CPU lacks it. */
const lc_kernels *lc_kernels_by_name(const char *name);

/* ---------------------------------------------------------------- threads */

/* The forward pass's thread pool (threads.c): n_threads - 1 persistent workers beside
 * the calling thread. lc_parallel_for runs fn(ctx, unit, thread) for every unit in
 * [0, n_units) and returns when all are done; units are claimed one at a time from a
 * shared counter by the caller (thread 0) and the workers (1 .. n_threads - 1), so a
 * thread that lost its core to another process leaves its share to the others.
 * `thread` indexes per-thread scratch. Units must not depend on each other or on
 * which thread runs them; fn must not call lc_parallel_for on the same pool. One
 * caller at a time per pool. NULL pool, or a child process after fork(): serial. */
typedef struct lc_pool lc_pool;
typedef void (*lc_task_fn)(void *ctx, int unit, int thread);
lc_pool *lc_pool_new(int n_threads); /* NULL when out of memory */
void lc_pool_free(lc_pool *p);       /* joins the workers */
int lc_pool_threads(const lc_pool *p);
void lc_parallel_for(lc_pool *p, int n_units, lc_task_fn fn, void *ctx);

/* ---------------------------------------------------------------- model */

typedef struct {
    const void *data; /* into the mmap */
    int type;
    int64_t rows, cols;
    int layout;       /* LC_LAYOUT_ROWS or LC_LAYOUT_X8 (quantized, rows % 8 == 0); lc_gemm_of must have
                         a kernel for (type, layout) */
} lc_tensor;

typedef struct {
    const float *attention_norm, *ffn_norm; /* (dim,) */
    lc_tensor wq, wk, wv, wo;               /* (n_heads*hd, dim) (n_kv*hd, dim) x2, (dim, n_heads*hd) */
    lc_tensor w1, w2, w3;                   /* gate (ffn, dim), down (dim, ffn), up (ffn, dim) */
} lc_layer_weights;

typedef struct {
    int vocab_size, dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim;
    float norm_eps;
    int n_ctx;   /* KV cache positions of each sequence */
    int n_seq;   /* sequence slots (each with its own n_ctx positions of KV cache) */
    int n_batch; /* most tokens per internal chunk (scratch size) */
    int n_threads;
    int type_k, type_v; /* KV cache types: LC_TYPE_F16, Q8_0 or Q4_0 (head_dim % 32 == 0) */
} lc_config;

typedef struct {
    lc_tensor tok_embeddings; /* (vocab, dim) */
    lc_tensor output;         /* (vocab, dim): tok_embeddings when tied */
    const float *norm;        /* (dim,) */
    lc_layer_weights *layers; /* n_layers, copied at lc_model_new */
    const float *inv_freq;    /* (head_dim/2,), copied at lc_model_new */
} lc_weights;

typedef struct lc_model lc_model;

/* Returns NULL with a message in err on failure (bad config, out of memory). */
lc_model *lc_model_new(const lc_config *cfg, const lc_weights *w, const lc_kernels *k, char *err, size_t errlen);
void lc_model_free(lc_model *m);
const lc_kernels *lc_model_kernels(const lc_model *m);
void lc_model_set_threads(lc_model *m, int n_threads);
/* Bytes lc_model_new allocates for cfg with table k (NULL: the best one), and per extra
 * thread (lc_model_set_threads) in *per_thread: the KV cache, one chunk's scratch, and a
 * thread's attention blocks and AMX panel. The KV cache is calloc'ed: pages never written
 * cost no memory. */
int64_t lc_model_bytes(const lc_config *cfg, const lc_kernels *k, int64_t *per_thread);

/* One step of several sequences (llama.cpp's unified batch): token i of sequence seq[i]
 * (< n_seq) at position pos[i] (< n_ctx). Each token's K/V go to its sequence's cache at
 * its position, and it attends to positions [0, pos[i]] of its own sequence: those
 * before it must be in the cache already or earlier in this batch (the caller's
 * contract; no two tokens of a batch may share a (seq, pos)). The matmuls see all
 * tokens at once (chunks of n_batch). logits: (number of want[i] != 0, vocab), rows in
 * token order; want NULL = every token. Returns 0, or a negative LC_E* code (nothing
 * is written to the cache then). */
int lc_forward_batch(lc_model *m, const int32_t *tokens, const int32_t *seq, const int32_t *pos,
                     const int8_t *want, int n, float *logits);

/* Runs tokens[0..n) of sequence 0 at positions [pos, pos+n). logits: (vocab,) for the
 * last token, or (n, vocab) when all_logits. As lc_forward_batch otherwise. */
int lc_forward(lc_model *m, const int32_t *tokens, int n, int pos, float *logits, int all_logits);

/* Sequence dst's positions [0, n_pos) of K/V become a copy of src's (a fork: two
 * conversations that share a prompt prefix). Returns 0 or LC_E_ARG. */
int lc_seq_copy(lc_model *m, int src, int dst, int n_pos);

#define LC_OK 0
#define LC_E_CTX (-1)   /* pos + n > n_ctx */
#define LC_E_TOKEN (-2) /* token id outside [0, vocab) */
#define LC_E_ARG (-3)   /* n < 1, pos < 0 or seq outside [0, n_seq) */
#define LC_E_MEM (-4)   /* out of memory for attention's work list (the batch's cache rows are then undefined) */

#endif
