# cython: language_level=3
# Declarations of csrc/llamacpu.h (and the parts of csrc/quants.h it exposes), one to
# one: keep them in step with the header. _core.pyx cimports these automatically.
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t


cdef extern from "llamacpu.h" nogil:
    int QK, QK_K
    int LC_TYPE_F32, LC_TYPE_F16, LC_TYPE_Q4_0, LC_TYPE_Q4_1, LC_TYPE_Q5_0, LC_TYPE_Q5_1, LC_TYPE_Q8_0
    int LC_TYPE_Q2_K, LC_TYPE_Q3_K, LC_TYPE_Q4_K, LC_TYPE_Q5_K, LC_TYPE_Q6_K, LC_TYPE_IQ4_NL, LC_TYPE_IQ4_XS
    int LC_TYPE_Q6_0
    int LC_LAYOUT_ROWS, LC_LAYOUT_X8
    int LC_N_TYPES
    int LC_OK, LC_E_CTX, LC_E_TOKEN, LC_E_ARG, LC_E_MEM
    int LC_ATT_BLOCK

    ctypedef struct block_q8a:
        int8_t qs[32]
        float d[4]
        float s
        float s16[2]
        float pad

    ctypedef struct block_q16a:
        int8_t hi[32]
        uint8_t lo[32]
        float d
        float s
        float s16[2]

    ctypedef struct lc_type_info:
        int type
        const char *name
        int block_elems
        int block_bytes
        int n_hdr
        int hdr[2]
        int row_major

    const lc_type_info lc_types[]
    const lc_type_info *lc_type_info_of(int type)
    int lc_type_index(int type)
    int64_t lc_row_bytes(int type, int64_t cols)

    ctypedef void (*lc_gemm_q8a)(const void *W, int64_t cols, const block_q8a *X, int nt, float *Y, int64_t ldy,
                                 int64_t r0, int64_t r1) noexcept nogil
    ctypedef void (*lc_gemm_f)(const void *W, int64_t cols, const float *X, int nt, float *Y, int64_t ldy,
                               int64_t r0, int64_t r1) noexcept nogil
    ctypedef void (*lc_gemm_q16a)(const void *W, int64_t cols, const block_q16a *X, int nt, float *Y, int64_t ldy,
                                  int64_t r0, int64_t r1) noexcept nogil

    ctypedef struct lc_kernels:
        const char *name
        void (*quantize_act)(const float *x, block_q8a *y, int64_t n) noexcept nogil
        lc_gemm_q8a gemm_rows[15]
        lc_gemm_q8a gemm_x8[15]
        lc_gemm_f gemm_f16
        lc_gemm_f gemm_f32
        void (*dequantize_row)(int type, const void *row, float *y, int64_t n) noexcept nogil
        void (*rmsnorm)(float *out, const float *x, const float *w, int n, float eps) noexcept nogil
        void (*rope)(float *x, int n_heads, int head_dim, int pos, const float *inv_freq) noexcept nogil
        void (*attn_block)(int nq, int hd, const float *Q, const int *vis, const float *K, const float *V, int nk,
                           float *m, float *l, float *O, float *S, int first) noexcept nogil
        void (*f32_to_f16)(uint16_t *y, const float *x, int64_t n) noexcept nogil
        void (*swiglu)(float *hb, const float *hb2, int64_t n) noexcept nogil
        void (*gemm_amx)(int type, int terms, const void *W, int64_t cols, const uint16_t *X, int nt, float *Y,
                         int64_t ldy, int64_t r0, int64_t r1, void *scratch) noexcept nogil
        void (*act_to_amx)(uint16_t *X, const float *x, int64_t cols, int t) noexcept nogil
        void (*quantize_act16)(const float *x, block_q16a *y, int64_t n) noexcept nogil
        lc_gemm_q16a gemm_amx_i8[15]

    size_t LC_AMX_SCRATCH(int64_t cols)
    size_t LC_AMX_ACT(int nt, int64_t cols)
    int LC_AMX_MIN_TOKENS
    int LC_AMX_I8_MIN_TOKENS

    ctypedef struct lc_gemm:
        lc_gemm_q8a q
        lc_gemm_f f

    lc_gemm lc_gemm_of(const lc_kernels *k, int type, int layout)
    int lc_quantize_row_ref(int type, const float *x, void *y, int64_t n)

    const lc_kernels *lc_kernels_best()
    const lc_kernels *lc_kernels_by_name(const char *name)

    ctypedef struct lc_tensor:
        const void *data
        int type
        int64_t rows, cols
        int layout

    ctypedef struct lc_layer_weights:
        const float *attention_norm
        const float *ffn_norm
        lc_tensor wq, wk, wv, wo, w1, w2, w3

    ctypedef struct lc_config:
        int vocab_size, dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim
        float norm_eps
        int n_ctx, n_seq, n_batch, n_threads
        int type_k, type_v

    ctypedef struct lc_weights:
        lc_tensor tok_embeddings
        lc_tensor output
        const float *norm
        lc_layer_weights *layers
        const float *inv_freq

    ctypedef struct lc_model:
        pass

    lc_model *lc_model_new(const lc_config *cfg, const lc_weights *w, const lc_kernels *k, char *err, size_t errlen)
    void lc_model_free(lc_model *m)
    const lc_kernels *lc_model_kernels(const lc_model *m)
    void lc_model_set_threads(lc_model *m, int n_threads)
    int64_t lc_model_bytes(const lc_config *cfg, const lc_kernels *k, int64_t *per_thread)
    int lc_forward_batch(lc_model *m, const int32_t *tokens, const int32_t *seq, const int32_t *pos,
                         const int8_t *want, int n, float *logits)
    int lc_forward(lc_model *m, const int32_t *tokens, int n, int pos, float *logits, int all_logits)
    int lc_seq_copy(lc_model *m, int src, int dst, int n_pos)


cdef extern from "attention.h" nogil:
    ctypedef struct lc_pool:
        pass
    lc_pool *lc_pool_new(int n_threads)
    void lc_pool_free(lc_pool *p)
    ctypedef struct lc_attn:
        const lc_kernels *k
        lc_pool *pool
        int n_heads, n_kv_heads, head_dim, n_ctx
        int type_k, type_v
        const unsigned char *kcache
        const unsigned char *vcache
        size_t row_k, row_v
        float *scratch
    int lc_kv_type_ok(int type, int head_dim)
    void lc_kv_store(const lc_kernels *k, int type, void *dst, const float *x, int n)
    size_t lc_attention_scratch(int head_dim, int n_heads, int n_kv_heads)
    int lc_attention(const lc_attn *a, const float *q, const int32_t *seq, const int32_t *pos, int nt, float *out)
