/* Scalar reference of every kernel. Plain C, no intrinsics: the SIMD variants
 * are validated against these, and the weight quantizers here write files. */
#include <math.h>
#include <float.h>
#include "llamacpu.h"
#include "kernels_tiles.h"

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* ------------------------------------------------ weight quantizers (ggml _ref) */

void lc_quantize_row_q4_0_ref(const float *x, block_q4_0 *y, int64_t n) {
    for (int64_t i = 0; i < n / QK; i++) {
        const float *xb = x + i * QK;
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK; j++) {
            if (amax < fabsf(xb[j])) { amax = fabsf(xb[j]); max = xb[j]; }
        }
        const float d = max / -8;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = lc_fp32_to_fp16(d);
        for (int j = 0; j < QK / 2; j++) {
            const float x0 = xb[j] * id, x1 = xb[QK / 2 + j] * id;
            const uint8_t xi0 = MIN(15, (int8_t)(x0 + 8.5f));
            const uint8_t xi1 = MIN(15, (int8_t)(x1 + 8.5f));
            y[i].qs[j] = xi0 | (uint8_t)(xi1 << 4);
        }
    }
}

void lc_quantize_row_q4_1_ref(const float *x, block_q4_1 *y, int64_t n) {
    for (int64_t i = 0; i < n / QK; i++) {
        const float *xb = x + i * QK;
        float min = FLT_MAX, max = -FLT_MAX;
        for (int j = 0; j < QK; j++) {
            if (xb[j] < min) min = xb[j];
            if (xb[j] > max) max = xb[j];
        }
        const float d = (max - min) / ((1 << 4) - 1);
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = lc_fp32_to_fp16(d);
        y[i].m = lc_fp32_to_fp16(min);
        for (int j = 0; j < QK / 2; j++) {
            const float x0 = (xb[j] - min) * id, x1 = (xb[QK / 2 + j] - min) * id;
            const uint8_t xi0 = MIN(15, (int8_t)(x0 + 0.5f));
            const uint8_t xi1 = MIN(15, (int8_t)(x1 + 0.5f));
            y[i].qs[j] = xi0 | (uint8_t)(xi1 << 4);
        }
    }
}

void lc_quantize_row_q8_0_ref(const float *x, block_q8_0 *y, int64_t n) {
    for (int64_t i = 0; i < n / QK; i++) {
        const float *xb = x + i * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = MAX(amax, fabsf(xb[j]));
        const float d = amax / ((1 << 7) - 1);
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = lc_fp32_to_fp16(d);
        for (int j = 0; j < QK; j++) y[i].qs[j] = (int8_t)roundf(xb[j] * id);
    }
}

/* ggml's Q5_0 method with 6 bits: d = (the value of largest magnitude) / -32, so
 * that value is q = 0 exactly; q = min(63, (int)(x / d + 32.5)). */
void lc_quantize_row_q6_0_ref(const float *x, block_q6_0 *y, int64_t n) {
    for (int64_t i = 0; i < n / QK; i++) {
        const float *xb = x + i * QK;
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK; j++)
            if (fabsf(xb[j]) > amax) { amax = fabsf(xb[j]); max = xb[j]; }
        const float d = max / -32;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = lc_fp32_to_fp16(d);
        memset(y[i].ql, 0, sizeof(y[i].ql));
        memset(y[i].qh, 0, sizeof(y[i].qh));
        for (int j = 0; j < QK; j++) {
            const int q = MIN(63, (int)(xb[j] * id + 32.5f));
            y[i].ql[j & 15] |= (uint8_t)((q & 15) << (j < 16 ? 0 : 4));
            y[i].qh[lc_q6_0_qh_byte(j)] |= (uint8_t)((q >> 4) << lc_q6_0_qh_shift(j));
        }
    }
}

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

/* sum over groups of d[g] * (w . x in g), w given as 32 small ints */
static inline float dot_groups(const int *w, const block_q8a *x) {
    float sum = 0.0f;
    for (int g = 0; g < NG; g++) {
        int isum = 0;
        for (int j = 0; j < 4; j++) isum += w[4 * g + j] * x->qs[4 * g + j] + w[16 + 4 * g + j] * x->qs[16 + 4 * g + j];
        sum += x->d[g] * (float)isum;
    }
    return sum;
}

/* ------------------------------------------------ matmuls */

/* One weight block (GGUF layout) . one activation block. */
static float dot_block(int type, const void *blk, const block_q8a *x) {
    int q[QK];
    if (type == LC_TYPE_Q8_0) {
        const block_q8_0 *w = blk;
        for (int j = 0; j < QK; j++) q[j] = w->qs[j];
        return lc_fp16_to_fp32(w->d) * dot_groups(q, x);
    }
    if (type == LC_TYPE_Q6_0) { /* sum((q - 32) * dw * x) = dw * (sum(q * x) - 32 * s) */
        const block_q6_0 *w = blk;
        for (int j = 0; j < QK; j++) q[j] = lc_q6_0_get(w, j);
        return lc_fp16_to_fp32(w->d) * (dot_groups(q, x) - 32.0f * x->s);
    }
    const uint8_t *qs = type == LC_TYPE_Q4_0 ? ((const block_q4_0 *)blk)->qs : ((const block_q4_1 *)blk)->qs;
    for (int j = 0; j < QK / 2; j++) { q[j] = qs[j] & 0x0f; q[j + QK / 2] = qs[j] >> 4; }
    if (type == LC_TYPE_Q4_0) { /* sum((q - 8) * dw * x) = dw * (sum(q * x) - 8 * s) */
        const block_q4_0 *w = blk;
        return lc_fp16_to_fp32(w->d) * (dot_groups(q, x) - 8.0f * x->s);
    }
    const block_q4_1 *w = blk; /* sum((q * dw + m) * x) = dw * sum(q * x) + m * s */
    return lc_fp16_to_fp32(w->d) * dot_groups(q, x) + lc_fp16_to_fp32(w->m) * x->s;
}

/* W (rows, cols) @ X (nt, cols) q8a -> Y[t*ldy + r], row-major W */
static void gemm_q_rows(int type, const void *W, int64_t cols, const block_q8a *X, int nt, float *Y, int64_t ldy,
                        int64_t r0, int64_t r1) {
    const int64_t nb = cols / QK, bs = lc_block_bytes(type);
    for (int64_t r = r0; r < r1; r++)
        for (int t = 0; t < nt; t++) {
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) sum += dot_block(type, (const char *)W + (r * nb + b) * bs, X + t * nb + b);
            Y[t * ldy + r] = sum;
        }
}

/* the same with W in the x8 layout: each row's block is gathered from its group */
static void gemm_q_x8(int type, const void *W, int64_t cols, const block_q8a *X, int nt, float *Y, int64_t ldy,
                      int64_t r0, int64_t r1) {
    const int64_t nb = cols / QK, gbytes = 8 * (int64_t)lc_block_bytes(type);
    uint8_t blk[34];
    for (int64_t r = r0; r < r1; r++)
        for (int t = 0; t < nt; t++) {
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                lc_x8_extract(type, (const uint8_t *)W + ((r / 8) * nb + b) * gbytes, (int)(r % 8), blk);
                sum += dot_block(type, blk, X + t * nb + b);
            }
            Y[t * ldy + r] = sum;
        }
}

#define SCALAR_GEMM(NAME, IMPL, TYPE)                                                                      \
    static void NAME(const void *W, int64_t cols, const block_q8a *X, int nt, float *Y, int64_t ldy,       \
                     int64_t r0, int64_t r1) { IMPL(TYPE, W, cols, X, nt, Y, ldy, r0, r1); }
SCALAR_GEMM(gemm_q4_0, gemm_q_rows, LC_TYPE_Q4_0)
SCALAR_GEMM(gemm_q4_1, gemm_q_rows, LC_TYPE_Q4_1)
SCALAR_GEMM(gemm_q8_0, gemm_q_rows, LC_TYPE_Q8_0)
SCALAR_GEMM(gemm_q4_0_x8, gemm_q_x8, LC_TYPE_Q4_0)
SCALAR_GEMM(gemm_q4_1_x8, gemm_q_x8, LC_TYPE_Q4_1)
SCALAR_GEMM(gemm_q8_0_x8, gemm_q_x8, LC_TYPE_Q8_0)
SCALAR_GEMM(gemm_q6_0_x8, gemm_q_x8, LC_TYPE_Q6_0)

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
    switch (type) {
    case LC_TYPE_F32:
        memcpy(y, row, (size_t)n * 4);
        break;
    case LC_TYPE_F16:
        for (int64_t i = 0; i < n; i++) y[i] = lc_fp16_to_fp32(((const uint16_t *)row)[i]);
        break;
    case LC_TYPE_Q4_0:
        for (int64_t b = 0; b < n / QK; b++) {
            const block_q4_0 *w = (const block_q4_0 *)row + b;
            const float d = lc_fp16_to_fp32(w->d);
            for (int j = 0; j < QK / 2; j++) {
                y[b * QK + j] = ((w->qs[j] & 0x0f) - 8) * d;
                y[b * QK + j + QK / 2] = ((w->qs[j] >> 4) - 8) * d;
            }
        }
        break;
    case LC_TYPE_Q4_1:
        for (int64_t b = 0; b < n / QK; b++) {
            const block_q4_1 *w = (const block_q4_1 *)row + b;
            const float d = lc_fp16_to_fp32(w->d), m = lc_fp16_to_fp32(w->m);
            for (int j = 0; j < QK / 2; j++) {
                y[b * QK + j] = (w->qs[j] & 0x0f) * d + m;
                y[b * QK + j + QK / 2] = (w->qs[j] >> 4) * d + m;
            }
        }
        break;
    case LC_TYPE_Q8_0:
        for (int64_t b = 0; b < n / QK; b++) {
            const block_q8_0 *w = (const block_q8_0 *)row + b;
            const float d = lc_fp16_to_fp32(w->d);
            for (int j = 0; j < QK; j++) y[b * QK + j] = w->qs[j] * d;
        }
        break;
    case LC_TYPE_Q6_0:
        for (int64_t b = 0; b < n / QK; b++) {
            const block_q6_0 *w = (const block_q6_0 *)row + b;
            const float d = lc_fp16_to_fp32(w->d);
            for (int j = 0; j < QK; j++) y[b * QK + j] = (lc_q6_0_get(w, j) - 32) * d;
        }
        break;
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

static void attention(float *out, const float *q, const uint16_t *K, const uint16_t *V, int n, int head_dim, float scale, float *scores) {
    float max = -INFINITY;
    for (int j = 0; j < n; j++) {
        const uint16_t *k = K + (int64_t)j * head_dim;
        float s = 0.0f;
        for (int i = 0; i < head_dim; i++) s += q[i] * lc_fp16_to_fp32(k[i]);
        scores[j] = s * scale;
        if (scores[j] > max) max = scores[j];
    }
    float sum = 0.0f;
    for (int j = 0; j < n; j++) {
        scores[j] = expf(scores[j] - max);
        sum += scores[j];
    }
    for (int i = 0; i < head_dim; i++) out[i] = 0.0f;
    for (int j = 0; j < n; j++) {
        const uint16_t *v = V + (int64_t)j * head_dim;
        const float p = scores[j] / sum;
        for (int i = 0; i < head_dim; i++) out[i] += p * lc_fp16_to_fp32(v[i]);
    }
}

static void f32_to_f16(uint16_t *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = lc_fp32_to_fp16(x[i]);
}

static void swiglu(float *hb, const float *hb2, int64_t n) {
    for (int64_t i = 0; i < n; i++) hb[i] = hb[i] / (1.0f + expf(-hb[i])) * hb2[i];
}

const lc_kernels lc_kernels_scalar = LC_KERNEL_TABLE("scalar", );
