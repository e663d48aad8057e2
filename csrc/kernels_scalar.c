/* Scalar reference of every kernel. Plain C, no intrinsics: the SIMD variants
 * are validated against these (the weight quantizers are in quants_ref.c). */
#include <math.h>
#include <float.h>
#include "llamacpu.h"
#include "kernels_tiles.h"

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* ------------------------------------------------ activations */

/* Per group of 8 (quants.h: elements 4g..4g+3 and 16+4g..16+4g+3): d = amax / 127,
 * q = round-half-to-even(x / d) (nearbyintf in the default mode), so that SIMD
 * _mm256_round_ps / vcvtnq give identical blocks. A d below FLT_MIN (a group under
 * about 1.5e-36) becomes 0, and its q 0: 1/d would overflow to inf. */
static void quantize_act(const float *x, block_q8a *y, int64_t n) {
    for (int64_t i = 0; i < n / QK; i++) {
        const float *xb = x + i * QK;
        float amax[NG] = {0};
        for (int j = 0; j < QK; j++) amax[lc_q8a_group(j)] = MAX(amax[lc_q8a_group(j)], fabsf(xb[j]));
        for (int g = 0; g < NG; g++) {
            const float d = amax[g] / 127.0f;
            y[i].d[g] = d >= FLT_MIN ? d : 0.0f;
        }
        for (int j = 0; j < QK; j++) {
            const float d = y[i].d[lc_q8a_group(j)];
            const float id = d ? 1.0f / d : 0.0f;
            y[i].qs[j] = (int8_t)nearbyintf(xb[j] * id);
        }
        lc_q8a_set_sum(&y[i]);
    }
}

/* ------------------------------------------------ matmuls */

/* A 32-element piece of a weight block, as the SIMD kernels see it: element j is
 * d * isc[j / 16] * (q[j] - off) + m. isc are Q6_K's integer scales of its two
 * sub-blocks of 16 (1 for every other type); off is the offset of the unsigned
 * types (Q4_0 8, Q5_0 16, Q6_0 and Q6_K 32); m the minimum (Q4_1, Q5_1, Q4_K, Q5_K). */
typedef struct {
    int q[QK];
    int isc[2], off;
    float d, m;
    int has_m; /* the type has a minimum (m may still be 0) */
} piece32;

/* the fifth bit of Q5 element j (bit j of the little-endian u32 qh), as 0 or 16 */
static int q5_high(const uint8_t *qh, int j) { return ((qh[j / 8] >> (j % 8)) & 1) << 4; }

/* piece p (0 .. block elements / 32 - 1) of one block of `type` (GGUF layout) */
static void decode_piece(int type, const uint8_t *blk, int p, piece32 *w) {
    w->isc[0] = w->isc[1] = 1;
    w->off = 0;
    w->m = 0.0f;
    w->has_m = type == LC_TYPE_Q4_1 || type == LC_TYPE_Q5_1 || type == LC_TYPE_Q4_K || type == LC_TYPE_Q5_K;
    switch (type) {
    case LC_TYPE_Q4_0:
    case LC_TYPE_Q4_1:
    case LC_TYPE_IQ4_NL: {
        const uint8_t *qs = blk + (type == LC_TYPE_Q4_1 ? 4 : 2);
        for (int j = 0; j < 16; j++) { w->q[j] = qs[j] & 0x0f; w->q[j + 16] = qs[j] >> 4; }
        w->d = lc_fp16_to_fp32(((const block_q4_0 *)blk)->d);
        if (type == LC_TYPE_Q4_0) w->off = 8;
        if (type == LC_TYPE_Q4_1) w->m = lc_fp16_to_fp32(((const block_q4_1 *)blk)->m);
        if (type == LC_TYPE_IQ4_NL)
            for (int j = 0; j < QK; j++) w->q[j] = lc_iq4nl_values[w->q[j]];
        break;
    }
    case LC_TYPE_Q5_0:
    case LC_TYPE_Q5_1: {
        const uint8_t *qh = type == LC_TYPE_Q5_0 ? ((const block_q5_0 *)blk)->qh : ((const block_q5_1 *)blk)->qh;
        const uint8_t *qs = qh + 4;
        for (int j = 0; j < 16; j++) {
            w->q[j] = (qs[j] & 0x0f) | q5_high(qh, j);
            w->q[j + 16] = (qs[j] >> 4) | q5_high(qh, j + 16);
        }
        w->d = lc_fp16_to_fp32(((const block_q5_0 *)blk)->d);
        if (type == LC_TYPE_Q5_0) w->off = 16;
        else w->m = lc_fp16_to_fp32(((const block_q5_1 *)blk)->m);
        break;
    }
    case LC_TYPE_Q8_0: {
        const block_q8_0 *b = (const block_q8_0 *)blk;
        for (int j = 0; j < QK; j++) w->q[j] = b->qs[j];
        w->d = lc_fp16_to_fp32(b->d);
        break;
    }
    case LC_TYPE_Q6_0: {
        const block_q6_0 *b = (const block_q6_0 *)blk;
        for (int j = 0; j < QK; j++) w->q[j] = lc_q6_0_get(b, j);
        w->d = lc_fp16_to_fp32(b->d);
        w->off = 32;
        break;
    }
    case LC_TYPE_Q4_K:
    case LC_TYPE_Q5_K: { /* sub-block p: nibble p & 1 of qs[32 (p / 2) ..] (Q5_K: fifth bit p of qh[l]) */
        const block_q4_K *b4 = (const block_q4_K *)blk;
        const block_q5_K *b5 = (const block_q5_K *)blk;
        const uint8_t *qs = (type == LC_TYPE_Q4_K ? b4->qs : b5->qs) + 32 * (p / 2);
        int sc, mn;
        lc_k4_scale_min(b4->scales, p, &sc, &mn);
        for (int l = 0; l < QK; l++) {
            w->q[l] = (p & 1) ? qs[l] >> 4 : qs[l] & 0x0f;
            if (type == LC_TYPE_Q5_K) w->q[l] |= ((b5->qh[l] >> p) & 1) << 4;
        }
        w->d = lc_fp16_to_fp32(b4->d) * (float)sc; /* as ggml: d1 = d * sc, m1 = dmin * m, x = d1 q - m1 */
        w->m = -(lc_fp16_to_fp32(b4->dmin) * (float)mn);
        break;
    }
    case LC_TYPE_Q6_K: { /* piece p = 4h + k (quants.h) */
        const block_q6_K *b = (const block_q6_K *)blk;
        const int h = p / 4, k = p % 4;
        for (int l = 0; l < QK; l++) {
            const uint8_t ql = b->ql[64 * h + 32 * (k & 1) + l];
            w->q[l] = (k < 2 ? ql & 0x0f : ql >> 4) | ((b->qh[32 * h + l] >> (2 * k)) & 3) << 4;
        }
        w->isc[0] = b->scales[2 * p];
        w->isc[1] = b->scales[2 * p + 1];
        w->d = lc_fp16_to_fp32(b->d);
        w->off = 32;
        break;
    }
    case LC_TYPE_IQ4_XS: {
        const block_iq4_xs *b = (const block_iq4_xs *)blk;
        const int ls = ((b->scales_l[p / 2] >> 4 * (p % 2)) & 0x0f) | (((b->scales_h >> 2 * p) & 3) << 4);
        for (int j = 0; j < 16; j++) {
            w->q[j] = lc_iq4nl_values[b->qs[16 * p + j] & 0x0f];
            w->q[j + 16] = lc_iq4nl_values[b->qs[16 * p + j] >> 4];
        }
        w->d = lc_fp16_to_fp32(b->d) * (float)(ls - 32);
        break;
    }
    }
}

/* one piece . one activation block:
 * sum(d isc (q - off) x + m x) = d (sum_g d_g sum_g(isc q x) - off sum(isc x)) + m s,
 * with sum(x) = s (or s16[0], s16[1] per half when the halves' scales differ) */
static float dot_piece(const piece32 *w, const block_q8a *x) {
    float sum = 0.0f;
    for (int g = 0; g < NG; g++) {
        int isum = 0;
        for (int j = 0; j < 4; j++)
            isum += w->isc[0] * w->q[4 * g + j] * x->qs[4 * g + j] + w->isc[1] * w->q[16 + 4 * g + j] * x->qs[16 + 4 * g + j];
        sum += x->d[g] * (float)isum;
    }
    const float o = w->isc[0] == 1 && w->isc[1] == 1 ? (float)w->off * x->s
                                                     : (float)w->off * ((float)w->isc[0] * x->s16[0] + (float)w->isc[1] * x->s16[1]);
    return w->d * (sum - o) + w->m * x->s;
}

/* W (rows, cols) @ X (nt, cols) q8a -> Y[t*ldy + r]; x8: W in the x8 layout, each row's
 * block gathered from its group */
static void gemm_q(int type, int x8, const void *W, int64_t cols, const block_q8a *X, int nt, float *Y,
                   int64_t ldy, int64_t r0, int64_t r1) {
    const lc_type_info *ti = lc_type_info_of(type);
    const int64_t nb = cols / ti->block_elems, bs = ti->block_bytes, pieces = ti->block_elems / QK;
    uint8_t blk[LC_MAX_BLOCK_BYTES];
    piece32 w;
    for (int64_t r = r0; r < r1; r++)
        for (int t = 0; t < nt; t++) {
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *src = (const uint8_t *)W + (r * nb + b) * bs;
                if (x8) {
                    lc_x8_extract(type, (const uint8_t *)W + ((r / 8) * nb + b) * 8 * bs, (int)(r % 8), blk);
                    src = blk;
                }
                for (int p = 0; p < pieces; p++) {
                    decode_piece(type, src, p, &w);
                    sum += dot_piece(&w, X + (int64_t)t * (cols / QK) + b * pieces + p);
                }
            }
            Y[t * ldy + r] = sum;
        }
}

#define SCALAR_GEMM(NAME, TYPE, X8)                                                                        \
    static void NAME(const void *W, int64_t cols, const block_q8a *X, int nt, float *Y, int64_t ldy,       \
                     int64_t r0, int64_t r1) { gemm_q(TYPE, X8, W, cols, X, nt, Y, ldy, r0, r1); }
SCALAR_GEMM(gemm_q4_0, LC_TYPE_Q4_0, 0)
SCALAR_GEMM(gemm_q4_1, LC_TYPE_Q4_1, 0)
SCALAR_GEMM(gemm_q8_0, LC_TYPE_Q8_0, 0)
SCALAR_GEMM(gemm_q4_0_x8, LC_TYPE_Q4_0, 1)
SCALAR_GEMM(gemm_q4_1_x8, LC_TYPE_Q4_1, 1)
SCALAR_GEMM(gemm_q5_0_x8, LC_TYPE_Q5_0, 1)
SCALAR_GEMM(gemm_q5_1_x8, LC_TYPE_Q5_1, 1)
SCALAR_GEMM(gemm_q8_0_x8, LC_TYPE_Q8_0, 1)
SCALAR_GEMM(gemm_q6_0_x8, LC_TYPE_Q6_0, 1)
SCALAR_GEMM(gemm_q4_k_x8, LC_TYPE_Q4_K, 1)
SCALAR_GEMM(gemm_q5_k_x8, LC_TYPE_Q5_K, 1)
SCALAR_GEMM(gemm_q6_k_x8, LC_TYPE_Q6_K, 1)
SCALAR_GEMM(gemm_iq4_nl_x8, LC_TYPE_IQ4_NL, 1)
SCALAR_GEMM(gemm_iq4_xs_x8, LC_TYPE_IQ4_XS, 1)

static void gemm_f16(const void *W, int64_t cols, const float *X, int nt, float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *w = (const uint16_t *)W + r * cols;
        for (int t = 0; t < nt; t++) {
            const float *x = X + t * cols;
            float sum = 0.0f;
            for (int64_t c = 0; c < cols; c++) sum += lc_fp16_to_fp32(w[c]) * x[c];
            Y[t * ldy + r] = sum;
        }
    }
}

static void gemm_f32(const void *W, int64_t cols, const float *X, int nt, float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const float *w = (const float *)W + r * cols;
        for (int t = 0; t < nt; t++) {
            const float *x = X + t * cols;
            float sum = 0.0f;
            for (int64_t c = 0; c < cols; c++) sum += w[c] * x[c];
            Y[t * ldy + r] = sum;
        }
    }
}

/* ------------------------------------------------ element-wise */

static void dequantize_row(int type, const void *row, float *y, int64_t n) {
    if (type == LC_TYPE_F32) {
        memcpy(y, row, (size_t)n * 4);
        return;
    }
    if (type == LC_TYPE_F16) {
        for (int64_t i = 0; i < n; i++) y[i] = lc_fp16_to_fp32(((const uint16_t *)row)[i]);
        return;
    }
    const lc_type_info *ti = lc_type_info_of(type);
    if (!ti || ti->block_elems == 1) return;
    piece32 w;
    for (int64_t b = 0; b < n / ti->block_elems; b++)
        for (int p = 0; p < ti->block_elems / QK; p++) {
            decode_piece(type, (const uint8_t *)row + b * ti->block_bytes, p, &w);
            /* in ggml's order: (d * sc) * q, then - m1 for the types with a minimum (not
             * + 0.0f for the others, which would turn their -0.0 into +0.0) */
            float *o = y + b * ti->block_elems + p * QK;
            for (int j = 0; j < QK; j++) o[j] = w.d * (float)w.isc[j / 16] * (float)(w.q[j] - w.off);
            if (w.has_m)
                for (int j = 0; j < QK; j++) o[j] += w.m;
        }
}

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float scale = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

/* The angle is float32 pos * inv_freq, as Hugging Face computes it. */
void lc_rope_angles(float *cos_out, float *sin_out, int half, int pos, const float *inv_freq) {
    for (int i = 0; i < half; i++) {
        const float a = (float)pos * inv_freq[i];
        cos_out[i] = (float)cos((double)a);
        sin_out[i] = (float)sin((double)a);
    }
}

static void rope(float *x, int n_heads, int head_dim, int pos, const float *inv_freq) {
    float c[512], s[512]; /* head_dim <= 1024 (checked at load) */
    const int half = head_dim / 2;
    lc_rope_angles(c, s, half, pos, inv_freq);
    for (int h = 0; h < n_heads; h++) {
        float *v = x + h * head_dim;
        for (int i = 0; i < half; i++) {
            const float x0 = v[2 * i], x1 = v[2 * i + 1];
            v[2 * i] = x0 * c[i] - x1 * s[i];
            v[2 * i + 1] = x0 * s[i] + x1 * c[i];
        }
    }
}

/* One row's online-softmax update from its scores S[0..n) (n > 0): the new maximum,
 * l and O rescaled by exp(m_old - m_new), S turned into the weights exp(s - m_new).
 * Returns the rescale factor of O. */
static float online_softmax(float *S, int n, float *m, float *l) {
    float mx = *m;
    for (int j = 0; j < n; j++) mx = S[j] > mx ? S[j] : mx;
    const float alpha = *m == -INFINITY ? 0.0f : expf(*m - mx);
    float sum = 0.0f;
    for (int j = 0; j < n; j++) {
        S[j] = expf(S[j] - mx);
        sum += S[j];
    }
    *m = mx;
    *l = *l * alpha + sum;
    return alpha;
}

static void attn_block(int nq, int hd, const float *Q, const int *vis, const float *K, const float *V, int nk,
                       float *m, float *l, float *O, float *S, int first) {
    (void)nk, (void)first;
    for (int r = 0; r < nq; r++) {
        const int n = vis[r];
        if (n <= 0) continue;
        const float *q = Q + (int64_t)r * hd;
        for (int j = 0; j < n; j++) {
            float s = 0.0f;
            for (int d = 0; d < hd; d++) s += q[d] * K[(int64_t)j * hd + d];
            S[j] = s;
        }
        const float alpha = online_softmax(S, n, &m[r], &l[r]);
        float *o = O + (int64_t)r * hd;
        for (int d = 0; d < hd; d++) {
            float acc = o[d] * alpha;
            for (int j = 0; j < n; j++) acc += S[j] * V[(int64_t)j * hd + d];
            o[d] = acc;
        }
    }
}

static void f32_to_f16(uint16_t *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = lc_fp32_to_fp16(x[i]);
}

static void swiglu(float *hb, const float *hb2, int64_t n) {
    for (int64_t i = 0; i < n; i++) hb[i] = hb[i] / (1.0f + expf(-hb[i])) * hb2[i];
}

const lc_kernels lc_kernels_scalar = LC_KERNEL_TABLE("scalar");
