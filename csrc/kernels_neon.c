/* NEON kernels for aarch64 (NEON is the aarch64 baseline). The quantized
 * matmuls come twice, from kernels_neon_gemm.inc: with vmull/vpadal (any
 * aarch64) and with the sdot instruction (ARMv8.2 dotprod, compiled with a
 * target pragma and chosen at run time from hwcaps). Same signatures as
 * kernels_scalar.c. */
#if defined(__aarch64__)

#include <arm_neon.h>
#include <float.h>
#include <math.h>
#include "llamacpu.h"
#include "kernels_tiles.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

static ALWAYS_INLINE float fp16_1(uint16_t h) { return lc_fp16_to_fp32(h); }

static ALWAYS_INLINE float32x4_t load4_f16(const uint16_t *p) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
}

/* 16 nibble bytes -> elements 0..15 (low nibbles) and 16..31 (high nibbles) */
static ALWAYS_INLINE void unpack_nibbles(const uint8_t *qs, int8x16_t *lo, int8x16_t *hi) {
    const uint8x16_t v = vld1q_u8(qs);
    *lo = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f)));
    *hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
}

/* exp(x), Cephes-style, as the AVX2 version */
static ALWAYS_INLINE float32x4_t exp_f32x4(float32x4_t x) {
    x = vminq_f32(x, vdupq_n_f32(88.3762626647949f));
    x = vmaxq_f32(x, vdupq_n_f32(-87.0f));
    float32x4_t fx = vrndmq_f32(vfmaq_f32(vdupq_n_f32(0.5f), x, vdupq_n_f32(1.44269504088896341f)));
    x = vfmsq_f32(x, fx, vdupq_n_f32(0.693359375f));
    x = vfmsq_f32(x, fx, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t y = vdupq_n_f32(1.9875691500E-4f);
    y = vfmaq_f32(vdupq_n_f32(1.3981999507E-3f), y, x);
    y = vfmaq_f32(vdupq_n_f32(8.3334519073E-3f), y, x);
    y = vfmaq_f32(vdupq_n_f32(4.1665795894E-2f), y, x);
    y = vfmaq_f32(vdupq_n_f32(1.6666665459E-1f), y, x);
    y = vfmaq_f32(vdupq_n_f32(5.0000001201E-1f), y, x);
    y = vfmaq_f32(vaddq_f32(x, vdupq_n_f32(1.0f)), y, vmulq_f32(x, x));
    const int32x4_t n = vaddq_s32(vcvtq_s32_f32(fx), vdupq_n_s32(127));
    return vmulq_f32(y, vreinterpretq_f32_s32(vshlq_n_s32(n, 23)));
}

/* ------------------------------------------------ activations */

/* Group g (quants.h) is the two float32x4 of elements 4g..4g+3 and 16+4g..16+4g+3;
 * the four groups' scales are computed as one vector. d = amax / 127 and
 * id = d ? 1 / d : 0 as the scalar code (IEEE division, no reciprocal estimate),
 * vcvtnq rounds half to even as nearbyintf: blocks are bit-identical to it. */
static void quantize_act(const float *x, block_q8a *y, int64_t n) {
    for (int64_t i = 0; i < n / QK; i++) {
        const float *xb = x + i * QK;
        float32x4_t v[8], m[4];
        for (int k = 0; k < 8; k++) v[k] = vld1q_f32(xb + 4 * k);
        for (int g = 0; g < 4; g++) m[g] = vmaxq_f32(vabsq_f32(v[g]), vabsq_f32(v[g + 4]));
        /* lane g: the maximum of m[g]'s lanes */
        const float32x4_t amax = vpmaxq_f32(vpmaxq_f32(m[0], m[1]), vpmaxq_f32(m[2], m[3]));
        float32x4_t d = vdivq_f32(amax, vdupq_n_f32(127.0f));
        d = vbslq_f32(vcgeq_f32(d, vdupq_n_f32(FLT_MIN)), d, vdupq_n_f32(0.0f)); /* as scalar: 0 below FLT_MIN */
        const float32x4_t id = vbslq_f32(vceqzq_f32(d), vdupq_n_f32(0.0f), vdivq_f32(vdupq_n_f32(1.0f), d));
        float idg[4];
        vst1q_f32(idg, id);
        vst1q_f32(y[i].d, d);
        int32x4_t q[8];
        for (int k = 0; k < 8; k++) q[k] = vcvtnq_s32_f32(vmulq_n_f32(v[k], idg[k & 3])); /* round half to even */
        for (int h = 0; h < 2; h++) {
            const int16x8_t a = vcombine_s16(vqmovn_s32(q[4 * h]), vqmovn_s32(q[4 * h + 1]));
            const int16x8_t b = vcombine_s16(vqmovn_s32(q[4 * h + 2]), vqmovn_s32(q[4 * h + 3]));
            vst1q_s8(y[i].qs + 16 * h, vcombine_s8(vqmovn_s16(a), vqmovn_s16(b)));
        }
        lc_q8a_set_sum(&y[i]);
    }
}

/* ------------------------------------------------ quantized matmuls */

/* DOT32(a0, a1, b0, b1): int32 lane l = a0.b0 + a1.b1 over bytes 4l..4l+3 of
 * each: both halves of one activation group (quants.h) summed as integers. Here
 * with vmull: s16 products, pairwise widened to s32 (vpaddl) and the second
 * half's accumulated onto them (vpadal), then pairs of lanes added (vpaddq). */
static ALWAYS_INLINE int32x4_t dot32_base(int8x16_t a0, int8x16_t a1, int8x16_t b0, int8x16_t b1) {
    const int32x4_t lo = vpadalq_s16(vpaddlq_s16(vmull_s8(vget_low_s8(a0), vget_low_s8(b0))),
                                     vmull_s8(vget_low_s8(a1), vget_low_s8(b1)));
    const int32x4_t hi = vpadalq_s16(vpaddlq_s16(vmull_high_s8(a0, b0)), vmull_high_s8(a1, b1));
    return vpaddq_s32(lo, hi);
}

#define DOT32 dot32_base
#define NEON_SUFFIX(name) name##_base
#include "kernels_neon_gemm.inc"
#undef DOT32
#undef NEON_SUFFIX

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("dotprod"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#endif

/* the same with sdot: the second half chained onto the first's accumulator */
static ALWAYS_INLINE int32x4_t dot32_sdot(int8x16_t a0, int8x16_t a1, int8x16_t b0, int8x16_t b1) {
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), a0, b0), a1, b1);
}

#define DOT32 dot32_sdot
#define NEON_SUFFIX(name) name##_sdot
#include "kernels_neon_gemm.inc"
#undef DOT32
#undef NEON_SUFFIX

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

/* ------------------------------------------------ float matmuls */

static ALWAYS_INLINE void tile_f(const void *wrow, int is_f16, const float *x, int64_t cols, const int TN, float *out, int64_t ldo) {
    float32x4_t acc[4];
    for (int k = 0; k < TN; k++) acc[k] = vdupq_n_f32(0.0f);
    int64_t c = 0;
    for (; c + 4 <= cols; c += 4) {
        const float32x4_t w = is_f16 ? load4_f16((const uint16_t *)wrow + c) : vld1q_f32((const float *)wrow + c);
        for (int k = 0; k < TN; k++) acc[k] = vfmaq_f32(acc[k], w, vld1q_f32(x + k * cols + c));
    }
    for (int k = 0; k < TN; k++) {
        float s = vaddvq_f32(acc[k]);
        for (int64_t cc = c; cc < cols; cc++) {
            const float w = is_f16 ? lc_fp16_to_fp32(((const uint16_t *)wrow)[cc]) : ((const float *)wrow)[cc];
            s += w * x[k * cols + cc];
        }
        out[k * ldo] = s;
    }
}

LC_TILED_GEMM(gemm_f16, float, cols * 2, cols, LC_TILE_F16)
LC_TILED_GEMM(gemm_f32, float, cols * 4, cols, LC_TILE_F32)

/* ------------------------------------------------ element-wise */

static void dequantize_row(int type, const void *row, float *y, int64_t n) {
    if (type == LC_TYPE_Q8_0) {
        for (int64_t b = 0; b < n / QK; b++) {
            const block_q8_0 *w = (const block_q8_0 *)row + b;
            const float d = fp16_1(w->d);
            for (int h = 0; h < 2; h++) {
                const int16x8_t lo = vmovl_s8(vld1_s8(w->qs + 16 * h));
                const int16x8_t hi = vmovl_s8(vld1_s8(w->qs + 16 * h + 8));
                float *o = y + b * QK + 16 * h;
                vst1q_f32(o, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), d));
                vst1q_f32(o + 4, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo))), d));
                vst1q_f32(o + 8, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), d));
                vst1q_f32(o + 12, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi))), d));
            }
        }
        return;
    }
    if (type == LC_TYPE_F16) {
        int64_t i = 0;
        for (; i + 4 <= n; i += 4) vst1q_f32(y + i, load4_f16((const uint16_t *)row + i));
        for (; i < n; i++) y[i] = lc_fp16_to_fp32(((const uint16_t *)row)[i]);
        return;
    }
    /* F32, Q4_0, Q4_1, Q6_0: the scalar code is already memory-bound here (embedding rows) */
    lc_kernels_scalar.dequantize_row(type, row, y, n);
}

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t v = vld1q_f32(x + i);
        acc = vfmaq_f32(acc, v, v);
    }
    float ss = vaddvq_f32(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    const float scale = 1.0f / sqrtf(ss / n + eps);
    for (i = 0; i + 4 <= n; i += 4)
        vst1q_f32(out + i, vmulq_f32(vmulq_n_f32(vld1q_f32(x + i), scale), vld1q_f32(w + i)));
    for (; i < n; i++) out[i] = x[i] * scale * w[i];
}

static void rope(float *x, int n_heads, int head_dim, int pos, const float *inv_freq) {
    float c[512], s[512];
    const int half = head_dim / 2;
    lc_rope_angles(c, s, half, pos, inv_freq);
    for (int h = 0; h < n_heads; h++) {
        float *v = x + h * head_dim;
        int i = 0;
        for (; i + 4 <= half; i += 4) {
            float32x4x2_t p = vld2q_f32(v + 2 * i); /* de-interleave pairs */
            const float32x4_t cv = vld1q_f32(c + i), sv = vld1q_f32(s + i);
            float32x4x2_t r;
            r.val[0] = vsubq_f32(vmulq_f32(p.val[0], cv), vmulq_f32(p.val[1], sv));
            r.val[1] = vaddq_f32(vmulq_f32(p.val[0], sv), vmulq_f32(p.val[1], cv));
            vst2q_f32(v + 2 * i, r);
        }
        for (; i < half; i++) {
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
        float32x4_t acc = vdupq_n_f32(0.0f);
        int i = 0;
        for (; i + 4 <= head_dim; i += 4) acc = vfmaq_f32(acc, vld1q_f32(q + i), load4_f16(k + i));
        float s = vaddvq_f32(acc);
        for (; i < head_dim; i++) s += q[i] * lc_fp16_to_fp32(k[i]);
        scores[j] = s * scale;
        if (scores[j] > max) max = scores[j];
    }
    float32x4_t vsum = vdupq_n_f32(0.0f);
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        const float32x4_t e = exp_f32x4(vsubq_f32(vld1q_f32(scores + j), vdupq_n_f32(max)));
        vst1q_f32(scores + j, e);
        vsum = vaddq_f32(vsum, e);
    }
    float sum = vaddvq_f32(vsum);
    for (; j < n; j++) {
        scores[j] = expf(scores[j] - max);
        sum += scores[j];
    }
    const float inv = 1.0f / sum;
    int i = 0;
    for (; i + 4 <= head_dim; i += 4) {
        float32x4_t acc = vdupq_n_f32(0.0f);
        for (j = 0; j < n; j++) acc = vfmaq_n_f32(acc, load4_f16(V + (int64_t)j * head_dim + i), scores[j]);
        vst1q_f32(out + i, vmulq_n_f32(acc, inv));
    }
    for (; i < head_dim; i++) {
        float acc = 0.0f;
        for (j = 0; j < n; j++) acc += scores[j] * lc_fp16_to_fp32(V[(int64_t)j * head_dim + i]);
        out[i] = acc * inv;
    }
}

static void f32_to_f16(uint16_t *y, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1_u16(y + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
    for (; i < n; i++) y[i] = lc_fp32_to_fp16(x[i]);
}

static void swiglu(float *hb, const float *hb2, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t a = vld1q_f32(hb + i);
        const float32x4_t e = exp_f32x4(vnegq_f32(a));
        vst1q_f32(hb + i, vmulq_f32(vdivq_f32(a, vaddq_f32(vdupq_n_f32(1.0f), e)), vld1q_f32(hb2 + i)));
    }
    for (; i < n; i++) hb[i] = hb[i] / (1.0f + expf(-hb[i])) * hb2[i];
}

const lc_kernels lc_kernels_neon = LC_KERNEL_TABLE("neon", _base);
const lc_kernels lc_kernels_neon_dotprod = LC_KERNEL_TABLE("neon-dotprod", _sdot);

#endif /* __aarch64__ */
