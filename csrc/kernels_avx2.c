/* AVX2 + FMA + F16C kernels. Compiled with in-file target options so that the
 * package builds for baseline x86-64; dispatch.c only hands this table out when
 * cpuid says the CPU has all three. Same signatures as kernels_scalar.c.
 *
 * kernels_avx512vnni.c includes this file again with LC_X86_VNNI defined: the
 * same kernels, compiled for AVX-512 VL + VNNI, with each 8-bit dot product one
 * vpdpbusd instead of maddubs + madd, and x8 tiles of 2-4 tokens on two row groups
 * at once in 512-bit registers (tile_x16). The integer dot products are identical
 * (no saturation can occur in either; see dot_u8s8 and dot_group_x8), and so are
 * the float sums per row, in the same order, except for x8 Q8_0, whose weights
 * VNNI offsets by 128 (dot_group_x8). So the two tables agree bit for bit except
 * on x8 Q8_0, where they agree within rounding; both are tested against scalar. */
#if defined(__x86_64__) || defined(_M_X64)

#if defined(LC_X86_VNNI)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#endif
#else
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#endif

#include <immintrin.h>
#include <float.h>
#include <math.h>
#include "llamacpu.h"
#include "kernels_tiles.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

static ALWAYS_INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(s);
    s = _mm_add_ps(s, sh);
    sh = _mm_movehl_ps(sh, s);
    s = _mm_add_ss(s, sh);
    return _mm_cvtss_f32(s);
}

static ALWAYS_INLINE float hmax_ps(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static ALWAYS_INLINE int hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* 16 bytes of nibbles -> 32 bytes in [0, 15]: elements 0..15 are the low
 * nibbles, 16..31 the high nibbles (GGUF order). */
static ALWAYS_INLINE __m256i unpack_nibbles(const uint8_t *qs) {
    const __m128i t = _mm_loadu_si128((const __m128i *)qs);
    const __m256i v = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0f));
}

static ALWAYS_INLINE float fp16_1(uint16_t h) { return _cvtsh_ss(h); }

/* 8 x s32: lane i = sum of the 4 products u[4i+j] * s[4i+j], u unsigned, s signed.
 * maddubs' s16 pair sums cannot saturate here: |u| <= 128 (Q8_0's sign trick
 * gives |w| <= 128; nibbles are <= 15) and |s| <= 127, so a pair is <= 32512. */
#if defined(LC_X86_VNNI)
#define LC_X86_Q8_OFFSET 1 /* x8 Q8_0 weights offset by 128 (dot_group_x8) */
#else
#define LC_X86_Q8_OFFSET 0
#endif

static ALWAYS_INLINE __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(LC_X86_VNNI)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* exp(x) for a vector, Cephes-style range reduction and polynomial (~2 ulp). */
static ALWAYS_INLINE __m256 exp_ps(__m256 x) {
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
    fx = _mm256_floor_ps(fx);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
    return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
}

/* ------------------------------------------------ activations */

/* |v| maximum of each group of 4 lanes, broadcast over the group's lanes */
static ALWAYS_INLINE __m256 group4_max(__m256 v) {
    v = _mm256_max_ps(v, _mm256_permute_ps(v, 0xb1)); /* swap neighbours */
    return _mm256_max_ps(v, _mm256_permute_ps(v, 0x4e)); /* swap pairs */
}

static void quantize_act(const float *x, block_q8a *y, int64_t n) {
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), c127 = _mm256_set1_ps(127.0f);
    const __m256 nz = _mm256_set1_ps(-0.0f), fmin = _mm256_set1_ps(FLT_MIN);
    const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (int64_t i = 0; i < n / QK; i++) {
        const float *xb = x + i * QK;
        __m256 v[4], d[4];
        __m256i q[4];
        for (int k = 0; k < 4; k++) v[k] = _mm256_loadu_ps(xb + 8 * k);
        /* groups 0, 1 are the lanes 0-3, 4-7 of v[0] and v[2]; groups 2, 3 those of v[1] and v[3] */
        __m256 d02 = _mm256_div_ps(group4_max(_mm256_max_ps(_mm256_andnot_ps(nz, v[0]), _mm256_andnot_ps(nz, v[2]))), c127);
        __m256 d13 = _mm256_div_ps(group4_max(_mm256_max_ps(_mm256_andnot_ps(nz, v[1]), _mm256_andnot_ps(nz, v[3]))), c127);
        d02 = _mm256_and_ps(d02, _mm256_cmp_ps(d02, fmin, _CMP_GE_OQ));
        d13 = _mm256_and_ps(d13, _mm256_cmp_ps(d13, fmin, _CMP_GE_OQ));
        d[0] = d[2] = d02; d[1] = d[3] = d13; /* amax / 127, 0 below FLT_MIN, as the scalar code */
        for (int k = 0; k < 4; k++) {
            const __m256 id = _mm256_andnot_ps(_mm256_cmp_ps(d[k], zero, _CMP_EQ_OQ), _mm256_div_ps(one, d[k]));
            q[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], id), rnd));
        }
        __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)y[i].qs, _mm256_permutevar8x32_epi32(b, perm));
        /* d = {lane 0 of d02, lane 4 of d02, lane 0 of d13, lane 4 of d13} */
        const __m256 t = _mm256_shuffle_ps(d02, d13, 0); /* d02[0] d02[0] d13[0] d13[0] | d02[4] .. */
        const __m128 lo = _mm256_castps256_ps128(t), hi = _mm256_extractf128_ps(t, 1);
        _mm_storeu_ps(y[i].d, _mm_movelh_ps(_mm_unpacklo_ps(lo, hi), _mm_unpackhi_ps(lo, hi)));
        lc_q8a_set_sum(&y[i]);
    }
}

/* ------------------------------------------------ quantized matmuls
 * One weight row against a tile of TN <= 4 tokens: the row's blocks are unpacked
 * once and shared by TN accumulators. Per block and token the integer dot product
 * is maddubs (u8 x s8 -> s16 pairs) + madd (-> 8 x s32, lane l = elements
 * 4l..4l+3, activation group l & 3), then one FMA with the weight scale times the
 * group scales. */

/* TYPE and TN are compile-time constants at every call, so the branches fold
 * away and the TN accumulators stay in registers. */
static ALWAYS_INLINE void tile_q(const int TYPE, const void *wrow, const block_q8a *x, int64_t nb, const int TN,
                                 float *out, int64_t ldo) {
    __m256 acc[4];
    float corr[4];
    for (int k = 0; k < TN; k++) { acc[k] = _mm256_setzero_ps(); corr[k] = 0.0f; }
    for (int64_t b = 0; b < nb; b++) {
        __m256i q;
        float dw, mw = 0.0f;
        if (TYPE == LC_TYPE_Q4_0) {
            const block_q4_0 *w = (const block_q4_0 *)wrow + b;
            q = unpack_nibbles(w->qs); dw = fp16_1(w->d);
        } else if (TYPE == LC_TYPE_Q4_1) {
            const block_q4_1 *w = (const block_q4_1 *)wrow + b;
            q = unpack_nibbles(w->qs); dw = fp16_1(w->d); mw = fp16_1(w->m);
        } else {
            const block_q8_0 *w = (const block_q8_0 *)wrow + b;
            q = _mm256_loadu_si256((const __m256i *)w->qs); dw = fp16_1(w->d);
        }
        const __m256 vdw = _mm256_set1_ps(dw);
        for (int k = 0; k < TN; k++) {
            const block_q8a *xb = x + k * nb + b;
            const __m256i y = _mm256_loadu_si256((const __m256i *)xb->qs);
            __m256i p;
            if (TYPE == LC_TYPE_Q8_0) /* sign trick: |w| (unsigned) times y carrying w's sign */
                p = dot_u8s8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
            else /* nibbles are already unsigned */
                p = dot_u8s8(q, y);
            /* lane l of p belongs to group l & 3: scale it by dw * d[l & 3] */
            acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(vdw, _mm256_broadcast_ps((const __m128 *)xb->d)), acc[k]);
            if (TYPE == LC_TYPE_Q4_0) corr[k] += dw * xb->s;      /* the -8 offset, once per block */
            else if (TYPE == LC_TYPE_Q4_1) corr[k] += mw * xb->s; /* the minimum, once per block */
        }
    }
    for (int k = 0; k < TN; k++) {
        const float s = hsum_ps(acc[k]);
        out[k * ldo] = TYPE == LC_TYPE_Q4_0 ? s - 8.0f * corr[k] : TYPE == LC_TYPE_Q4_1 ? s + corr[k] : s;
    }
}

/* ------------------------------------------------ float matmuls */

static ALWAYS_INLINE __m256 load8_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

static ALWAYS_INLINE void tile_f(const void *wrow, int is_f16, const float *x, int64_t cols, const int TN, float *out, int64_t ldo) {
    __m256 acc[4];
    for (int k = 0; k < TN; k++) acc[k] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
        const __m256 w = is_f16 ? load8_f16((const uint16_t *)wrow + c) : _mm256_loadu_ps((const float *)wrow + c);
        for (int k = 0; k < TN; k++) acc[k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + k * cols + c), acc[k]);
    }
    for (int k = 0; k < TN; k++) {
        float s = hsum_ps(acc[k]);
        for (int64_t cc = c; cc < cols; cc++) {
            const float w = is_f16 ? lc_fp16_to_fp32(((const uint16_t *)wrow)[cc]) : ((const float *)wrow)[cc];
            s += w * x[k * cols + cc];
        }
        out[k * ldo] = s;
    }
}

LC_DEFINE_GEMMS

/* ------------------------------------------------ quantized matmuls, x8 layout
 * One group of 8 rows against TN <= 4 tokens. Each 32-byte load is a 4-element
 * group of all 8 rows (two for Q4: low and high nibbles, elements 4c.. and
 * 16+4c.., which together are activation group c); the activation's 4 bytes are
 * broadcast, so lane r of the integer dot product is row r's: no horizontal sums,
 * and the 8 weight scales are one vector. The two halves of an activation group
 * (Q4: low and high nibbles of chunk c; Q8_0: chunks c and c+4) add up as
 * integers, then take one conversion and one FMA with the group's scale. */
static ALWAYS_INLINE int32_t load_i32(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* lane r: row r's dot product over activation group c (both halves) */
static ALWAYS_INLINE __m256i dot_group_x8(const int TYPE, const uint8_t *q, const block_q8a *xb, int c) {
    const __m256i xa = _mm256_set1_epi32(load_i32(xb->qs + 4 * c)), xh = _mm256_set1_epi32(load_i32(xb->qs + 16 + 4 * c));
    if (TYPE == LC_TYPE_Q8_0) {
        const __m256i va = _mm256_loadu_si256((const __m256i *)(q + 32 * c)), vh = _mm256_loadu_si256((const __m256i *)(q + 32 * (c + 4)));
#if defined(LC_X86_VNNI)
        /* w + 128 is unsigned: the 128 * sum(x) it adds is taken off per block with xb->s.
         * (AVX2's maddubs would saturate on 255 * 127 pairs: it keeps the sign trick.) */
        const __m256i k80 = _mm256_set1_epi8((char)0x80);
        return _mm256_dpbusd_epi32(dot_u8s8(_mm256_xor_si256(va, k80), xa), _mm256_xor_si256(vh, k80), xh);
#else
        return _mm256_add_epi32(dot_u8s8(_mm256_sign_epi8(va, va), _mm256_sign_epi8(xa, va)),
                                dot_u8s8(_mm256_sign_epi8(vh, vh), _mm256_sign_epi8(xh, vh)));
#endif
    } else {
        const __m256i m4 = _mm256_set1_epi8(0x0f);
        const __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * c));
        __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        if (TYPE == LC_TYPE_Q6_0) { /* the high 2 bits, to bits 4-5 of each byte (quants.h: block_q6_0.qh) */
            const __m256i h = _mm256_loadu_si256((const __m256i *)(q + 32 * (4 + c / 2))), m30 = _mm256_set1_epi8(0x30);
            lo = _mm256_or_si256(lo, _mm256_and_si256(c & 1 ? h : _mm256_slli_epi16(h, 4), m30));
            hi = _mm256_or_si256(hi, _mm256_and_si256(c & 1 ? _mm256_srli_epi16(h, 2) : _mm256_slli_epi16(h, 2), m30));
        }
#if defined(LC_X86_VNNI)
        return _mm256_dpbusd_epi32(dot_u8s8(lo, xa), hi, xh);
#else
        /* s16 pair sums of q <= 15 (Q4) or 63 (Q6_0) times |x| <= 127: the sum of both
         * halves stays under 4 * 63 * 127 = 32004, so they add before the one madd */
        return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_maddubs_epi16(hi, xh)),
                                 _mm256_set1_epi16(1));
#endif
    }
}

/* the weight offset an x8 tile takes off per block as offset * s: Q4_0 8, Q6_0 32,
 * Q8_0 128 where VNNI stores it offset (dot_group_x8); 0 for none (Q4_1: its minimum) */
static ALWAYS_INLINE float x8_offset(const int TYPE) {
    return TYPE == LC_TYPE_Q4_0 ? 8.0f : TYPE == LC_TYPE_Q6_0 ? 32.0f : TYPE == LC_TYPE_Q8_0 && LC_X86_Q8_OFFSET ? 128.0f : 0.0f;
}

static ALWAYS_INLINE void tile_x8(const int TYPE, const void *wgrp, const block_q8a *x, int64_t nb, const int TN,
                                  float *out, int64_t ldo) {
    const int64_t gbytes = 8 * (int64_t)lc_block_bytes(TYPE);
    const int hdr = lc_x8_header(TYPE);
    __m256 acc[4];
    for (int k = 0; k < TN; k++) acc[k] = _mm256_setzero_ps();
    const uint8_t *g = wgrp;
    for (int64_t b = 0; b < nb; b++, g += gbytes) {
        /* Two accumulators per token (even / odd groups) make two independent FMA
         * chains, so that one token (decode) does not wait on FMA latency. */
        __m256 accb[4], accb2[4];
        for (int k = 0; k < TN; k++) {
            const block_q8a *xb = x + k * nb + b;
            accb[k] = _mm256_mul_ps(_mm256_cvtepi32_ps(dot_group_x8(TYPE, g + hdr, xb, 0)), _mm256_broadcast_ss(&xb->d[0]));
            accb2[k] = _mm256_mul_ps(_mm256_cvtepi32_ps(dot_group_x8(TYPE, g + hdr, xb, 1)), _mm256_broadcast_ss(&xb->d[1]));
            accb[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_group_x8(TYPE, g + hdr, xb, 2)), _mm256_broadcast_ss(&xb->d[2]), accb[k]);
            accb2[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_group_x8(TYPE, g + hdr, xb, 3)), _mm256_broadcast_ss(&xb->d[3]), accb2[k]);
            accb[k] = _mm256_add_ps(accb[k], accb2[k]);
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g));
        for (int k = 0; k < TN; k++) {
            const block_q8a *xb = x + k * nb + b;
            if (TYPE == LC_TYPE_Q4_1) { /* dw * sum(q x) + m * s */
                const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g + 16)));
                acc[k] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xb->s), _mm256_fmadd_ps(accb[k], dw, acc[k]));
            } else if (x8_offset(TYPE) != 0.0f) { /* dw * (sum(q x) - offset s) */
                acc[k] = _mm256_fmadd_ps(_mm256_sub_ps(accb[k], _mm256_set1_ps(x8_offset(TYPE) * xb->s)), dw, acc[k]);
            } else {
                acc[k] = _mm256_fmadd_ps(accb[k], dw, acc[k]);
            }
        }
    }
    for (int k = 0; k < TN; k++) _mm256_storeu_ps(out + k * ldo, acc[k]);
}

#if defined(LC_X86_VNNI)
/* AVX-512, 2-4 tokens (prefill): two x8 row groups at once in 512-bit registers,
 * lanes 0-7 the first group's 8 rows and lanes 8-15 the second's. The activation
 * bytes and scales are then plain broadcasts ({1to16} memory operands), so each
 * instruction does twice tile_x8's work, with the same integer dot products and
 * the same float sums per row in the same order. (One token keeps tile_x8: from
 * two weight streams at once, decode measured half the read bandwidth.) */
static ALWAYS_INLINE __m512i load_2x256(const uint8_t *a, const uint8_t *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}
static ALWAYS_INLINE __m512 load_2x8_f16(const uint8_t *a, const uint8_t *b) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)),
                                                   _mm_loadu_si128((const __m128i *)b), 1));
}

static ALWAYS_INLINE __m512i dot_group_x16(const int TYPE, const uint8_t *q, int64_t second, const block_q8a *xb, int c) {
    const __m512i xa = _mm512_set1_epi32(load_i32(xb->qs + 4 * c)), xh = _mm512_set1_epi32(load_i32(xb->qs + 16 + 4 * c));
    if (TYPE == LC_TYPE_Q8_0) {
        const __m512i k80 = _mm512_set1_epi8((char)0x80);
        const __m512i va = _mm512_xor_si512(load_2x256(q + 32 * c, q + second + 32 * c), k80);
        const __m512i vh = _mm512_xor_si512(load_2x256(q + 32 * (c + 4), q + second + 32 * (c + 4)), k80);
        return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), va, xa), vh, xh);
    } else {
        const __m512i m4 = _mm512_set1_epi8(0x0f);
        const __m512i v = load_2x256(q + 32 * c, q + second + 32 * c);
        __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        if (TYPE == LC_TYPE_Q6_0) { /* as dot_group_x8 */
            const int64_t o = 32 * (4 + c / 2);
            const __m512i h = load_2x256(q + o, q + second + o), m30 = _mm512_set1_epi8(0x30);
            lo = _mm512_or_si512(lo, _mm512_and_si512(c & 1 ? h : _mm512_slli_epi16(h, 4), m30));
            hi = _mm512_or_si512(hi, _mm512_and_si512(c & 1 ? _mm512_srli_epi16(h, 2) : _mm512_slli_epi16(h, 2), m30));
        }
        return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xa), hi, xh);
    }
}

static ALWAYS_INLINE void tile_x16(const int TYPE, const void *wgrp, int64_t second, const block_q8a *x, int64_t nb,
                                   const int TN, float *out, int64_t ldo) {
    const int64_t gbytes = 8 * (int64_t)lc_block_bytes(TYPE);
    const int hdr = lc_x8_header(TYPE);
    __m512 acc[4];
    for (int k = 0; k < TN; k++) acc[k] = _mm512_setzero_ps();
    const uint8_t *g = wgrp;
    for (int64_t b = 0; b < nb; b++, g += gbytes) {
        __m512 accb[4], accb2[4];
        /* chunk-major: each weight chunk is loaded once for the TN tokens */
        for (int c = 0; c < 4; c++)
            for (int k = 0; k < TN; k++) {
                const block_q8a *xb = x + k * nb + b;
                const __m512 p = _mm512_cvtepi32_ps(dot_group_x16(TYPE, g + hdr, second, xb, c));
                const __m512 dx = _mm512_set1_ps(xb->d[c]);
                if (c == 0) accb[k] = _mm512_mul_ps(p, dx);
                else if (c == 1) accb2[k] = _mm512_mul_ps(p, dx);
                else if (c == 2) accb[k] = _mm512_fmadd_ps(p, dx, accb[k]);
                else accb2[k] = _mm512_fmadd_ps(p, dx, accb2[k]);
            }
        for (int k = 0; k < TN; k++) accb[k] = _mm512_add_ps(accb[k], accb2[k]);
        const __m512 dw = load_2x8_f16(g, g + second);
        for (int k = 0; k < TN; k++) {
            const block_q8a *xb = x + k * nb + b;
            if (TYPE == LC_TYPE_Q4_1) {
                const __m512 mw = load_2x8_f16(g + 16, g + second + 16);
                acc[k] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xb->s), _mm512_fmadd_ps(accb[k], dw, acc[k]));
            } else { /* every type has an offset here (Q8_0: VNNI's 128) */
                acc[k] = _mm512_fmadd_ps(_mm512_sub_ps(accb[k], _mm512_set1_ps(x8_offset(TYPE) * xb->s)), dw, acc[k]);
            }
        }
    }
    for (int k = 0; k < TN; k++) _mm512_storeu_ps(out + k * ldo, acc[k]);
}

/* the x8 gemm loop (kernels_tiles.h) with pairs of row groups for 2-4 tokens */
#define TILE_X16_PAIR(TYPE, w, x, nb, TN, out, ldy) tile_x16(TYPE, w, group_bytes, x, nb, TN, out, ldy)
LC_TILED_GEMM_X8_PAIRS(gemm_q4_0_x8, LC_TYPE_Q4_0, tile_x8, TILE_X16_PAIR, 1)
LC_TILED_GEMM_X8_PAIRS(gemm_q4_1_x8, LC_TYPE_Q4_1, tile_x8, TILE_X16_PAIR, 1)
LC_TILED_GEMM_X8_PAIRS(gemm_q8_0_x8, LC_TYPE_Q8_0, tile_x8, TILE_X16_PAIR, 1)
LC_TILED_GEMM_X8_PAIRS(gemm_q6_0_x8, LC_TYPE_Q6_0, tile_x8, TILE_X16_PAIR, 1)
#else
LC_DEFINE_GEMMS_X8
#endif

/* ------------------------------------------------ element-wise */

static void dequantize_row(int type, const void *row, float *y, int64_t n) {
    switch (type) {
    case LC_TYPE_F16: {
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, load8_f16((const uint16_t *)row + i));
        for (; i < n; i++) y[i] = lc_fp16_to_fp32(((const uint16_t *)row)[i]);
        break;
    }
    case LC_TYPE_Q4_0:
    case LC_TYPE_Q4_1:
        for (int64_t b = 0; b < n / QK; b++) {
            const uint8_t *qs;
            float d, m;
            if (type == LC_TYPE_Q4_0) {
                const block_q4_0 *w = (const block_q4_0 *)row + b;
                qs = w->qs; d = fp16_1(w->d); m = -8.0f * d;
            } else {
                const block_q4_1 *w = (const block_q4_1 *)row + b;
                qs = w->qs; d = fp16_1(w->d); m = fp16_1(w->m);
            }
            /* same operation order as the scalar reference, so results are identical */
            const __m256i q = unpack_nibbles(qs);
            const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
            for (int h = 0; h < 4; h++) {
                const __m128i q8 = h < 2 ? _mm256_castsi256_si128(q) : _mm256_extracti128_si256(q, 1);
                const __m128i part = (h & 1) ? _mm_srli_si128(q8, 8) : q8;
                __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
                if (type == LC_TYPE_Q4_0)
                    f = _mm256_mul_ps(_mm256_sub_ps(f, _mm256_set1_ps(8.0f)), vd);
                else
                    f = _mm256_add_ps(_mm256_mul_ps(f, vd), vm);
                _mm256_storeu_ps(y + b * QK + h * 8, f);
            }
        }
        break;
    case LC_TYPE_Q8_0:
        for (int64_t b = 0; b < n / QK; b++) {
            const block_q8_0 *w = (const block_q8_0 *)row + b;
            const __m256 vd = _mm256_set1_ps(fp16_1(w->d));
            for (int h = 0; h < 4; h++) {
                const __m128i q = _mm_loadl_epi64((const __m128i *)(w->qs + h * 8));
                _mm256_storeu_ps(y + b * QK + h * 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), vd));
            }
        }
        break;
    default:
        lc_kernels_scalar.dequantize_row(type, row, y, n);
    }
}

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum_ps(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    const float scale = 1.0f / sqrtf(ss / n + eps);
    const __m256 vs = _mm256_set1_ps(scale);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs), _mm256_loadu_ps(w + i)));
    for (; i < n; i++) out[i] = x[i] * scale * w[i];
}

static void rope(float *x, int n_heads, int head_dim, int pos, const float *inv_freq) {
    float c[512], s[512], cd[1024], sd[1024];
    const int half = head_dim / 2;
    lc_rope_angles(c, s, half, pos, inv_freq);
    for (int i = 0; i < half; i++) {
        cd[2 * i] = c[i]; cd[2 * i + 1] = c[i];
        sd[2 * i] = -s[i]; sd[2 * i + 1] = s[i];
    }
    for (int h = 0; h < n_heads; h++) {
        float *v = x + h * head_dim;
        int i = 0;
        for (; i + 8 <= head_dim; i += 8) {
            const __m256 xv = _mm256_loadu_ps(v + i);
            const __m256 xs = _mm256_permute_ps(xv, 0xb1); /* swap each pair */
            _mm256_storeu_ps(v + i, _mm256_add_ps(_mm256_mul_ps(xv, _mm256_loadu_ps(cd + i)),
                                                  _mm256_mul_ps(xs, _mm256_loadu_ps(sd + i))));
        }
        for (; i < head_dim; i += 2) {
            const float x0 = v[i], x1 = v[i + 1];
            v[i] = x0 * cd[i] + x1 * sd[i];
            v[i + 1] = x1 * cd[i + 1] + x0 * sd[i + 1];
        }
    }
}

/* sums of a, b, c, d in lanes 0..3 */
static ALWAYS_INLINE __m128 hsum4_ps(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

static void attention(float *out, const float *q, const uint16_t *K, const uint16_t *V, int n, int head_dim, float scale, float *scores) {
    float max = -INFINITY;
    int j0 = 0;
    if (head_dim % 8 == 0) { /* 4 keys at a time: one reduction for the four dot products */
        const __m128 vscale = _mm_set1_ps(scale);
        __m128 vmax4 = _mm_set1_ps(-INFINITY);
        for (; j0 + 4 <= n; j0 += 4) {
            const uint16_t *k = K + (int64_t)j0 * head_dim;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int i = 0; i < head_dim; i += 8) {
                const __m256 qv = _mm256_loadu_ps(q + i);
                a0 = _mm256_fmadd_ps(qv, load8_f16(k + i), a0);
                a1 = _mm256_fmadd_ps(qv, load8_f16(k + head_dim + i), a1);
                a2 = _mm256_fmadd_ps(qv, load8_f16(k + 2 * head_dim + i), a2);
                a3 = _mm256_fmadd_ps(qv, load8_f16(k + 3 * head_dim + i), a3);
            }
            const __m128 sc = _mm_mul_ps(hsum4_ps(a0, a1, a2, a3), vscale);
            _mm_storeu_ps(scores + j0, sc);
            vmax4 = _mm_max_ps(vmax4, sc);
        }
        vmax4 = _mm_max_ps(vmax4, _mm_movehl_ps(vmax4, vmax4));
        vmax4 = _mm_max_ss(vmax4, _mm_movehdup_ps(vmax4));
        max = _mm_cvtss_f32(vmax4);
    }
    for (int j = j0; j < n; j++) {
        const uint16_t *k = K + (int64_t)j * head_dim;
        __m256 acc = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= head_dim; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8_f16(k + i), acc);
        float s = hsum_ps(acc);
        for (; i < head_dim; i++) s += q[i] * lc_fp16_to_fp32(k[i]);
        scores[j] = s * scale;
        if (scores[j] > max) max = scores[j];
    }
    __m256 vsum = _mm256_setzero_ps();
    const __m256 vmax = _mm256_set1_ps(max);
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + j), vmax));
        _mm256_storeu_ps(scores + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum_ps(vsum);
    for (; j < n; j++) {
        scores[j] = expf(scores[j] - max);
        sum += scores[j];
    }
    const float inv = 1.0f / sum;
    int i = 0;
    /* 64 dimensions at a time: the 8 accumulators stay in registers and each row of V
     * is read once, in order */
    for (; i + 64 <= head_dim; i += 64) {
        __m256 acc[8];
        for (int u = 0; u < 8; u++) acc[u] = _mm256_setzero_ps();
        for (j = 0; j < n; j++) {
            const __m256 sj = _mm256_set1_ps(scores[j]);
            const uint16_t *v = V + (int64_t)j * head_dim + i;
            for (int u = 0; u < 8; u++) acc[u] = _mm256_fmadd_ps(sj, load8_f16(v + 8 * u), acc[u]);
        }
        for (int u = 0; u < 8; u++) _mm256_storeu_ps(out + i + 8 * u, _mm256_mul_ps(acc[u], _mm256_set1_ps(inv)));
    }
    for (; i + 8 <= head_dim; i += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (j = 0; j < n; j++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[j]), load8_f16(V + (int64_t)j * head_dim + i), acc);
        _mm256_storeu_ps(out + i, _mm256_mul_ps(acc, _mm256_set1_ps(inv)));
    }
    for (; i < head_dim; i++) {
        float acc = 0.0f;
        for (j = 0; j < n; j++) acc += scores[j] * lc_fp16_to_fp32(V[(int64_t)j * head_dim + i]);
        out[i] = acc * inv;
    }
}

static void f32_to_f16(uint16_t *y, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = lc_fp32_to_fp16(x[i]);
}

static void swiglu(float *hb, const float *hb2, int64_t n) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 a = _mm256_loadu_ps(hb + i);
        const __m256 e = exp_ps(_mm256_xor_ps(a, sign));
        _mm256_storeu_ps(hb + i, _mm256_mul_ps(_mm256_div_ps(a, _mm256_add_ps(one, e)), _mm256_loadu_ps(hb2 + i)));
    }
    for (; i < n; i++) hb[i] = hb[i] / (1.0f + expf(-hb[i])) * hb2[i];
}

#if defined(LC_X86_VNNI)
const lc_kernels lc_kernels_avx512vnni = LC_KERNEL_TABLE("avx512vnni", );
#else
const lc_kernels lc_kernels_avx2 = LC_KERNEL_TABLE("avx2", );
#endif

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif /* x86-64 */
