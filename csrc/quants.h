/* Block layouts (GGUF-compatible) and fp16 helpers.
 *
 * Weight blocks are exactly GGUF's, so GGUF blocks import bit-exact.
 * Activations are quantized to block_q8a: 8-bit values with f32 scales per group
 * of 8 and the precomputed scaled sum, which Q4_0 (offset 8) and Q4_1 (min m) need.
 */
#ifndef LLAMACPU_QUANTS_H
#define LLAMACPU_QUANTS_H

#include <stdint.h>
#include <string.h>
#include <assert.h>

#define QK 32   /* elements per block of the 32-element types */
#define QK_K 256 /* elements per super-block of the K-quants (and IQ4_XS) */

/* Type ids are GGUF's (ggml_type), plus llamacpu's own Q6_0 outside GGUF's range. */
enum lc_type {
    LC_TYPE_F32 = 0,
    LC_TYPE_F16 = 1,
    LC_TYPE_Q4_0 = 2,
    LC_TYPE_Q4_1 = 3,
    LC_TYPE_Q5_0 = 6,
    LC_TYPE_Q5_1 = 7,
    LC_TYPE_Q8_0 = 8,
    LC_TYPE_Q2_K = 10,
    LC_TYPE_Q3_K = 11,
    LC_TYPE_Q4_K = 12,
    LC_TYPE_Q5_K = 13,
    LC_TYPE_Q6_K = 14,
    LC_TYPE_IQ4_NL = 20,
    LC_TYPE_IQ4_XS = 23,
    LC_TYPE_Q6_0 = 100, /* llamacpu's own (GGUF has no 6-bit type with 32-element blocks); x8 layout only */
};

typedef struct {
    uint16_t d;         /* fp16 scale */
    uint8_t qs[QK / 2]; /* element j: low nibble of qs[j]; element j+16: high nibble */
} block_q4_0;           /* x = (q - 8) * d */
static_assert(sizeof(block_q4_0) == 18, "block_q4_0 size");

typedef struct {
    uint16_t d;         /* fp16 scale */
    uint16_t m;         /* fp16 minimum */
    uint8_t qs[QK / 2]; /* nibbles as block_q4_0 */
} block_q4_1;           /* x = q * d + m */
static_assert(sizeof(block_q4_1) == 20, "block_q4_1 size");

typedef struct {
    uint16_t d;     /* fp16 scale */
    int8_t qs[QK];
} block_q8_0;       /* x = q * d */
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 size");

typedef struct {
    uint16_t d;          /* fp16 scale */
    uint8_t ql[QK / 2];  /* low 4 bits, as block_q4_0's qs: element j in the low nibble of ql[j], j+16 in the high */
    uint8_t qh[QK / 4];  /* high 2 bits: byte 4h+e (h 0..1, e 0..3) holds, from bit 0 up, those of elements
                            8h+e, 8h+16+e, 8h+4+e, 8h+20+e (so that one x8 chunk of qh serves two of ql) */
} block_q6_0;            /* x = (q - 32) * d, q = low | high << 4 in [0, 63] */
static_assert(sizeof(block_q6_0) == 26, "block_q6_0 size");

typedef struct {
    uint16_t d;         /* fp16 scale */
    uint8_t qh[4];      /* bit j of the little-endian u32: the fifth bit of element j */
    uint8_t qs[QK / 2]; /* low 4 bits, nibbles as block_q4_0 */
} block_q5_0;           /* x = (q - 16) * d, q = low | high << 4 in [0, 31] */
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 size");

typedef struct {
    uint16_t d, m;      /* fp16 scale and minimum */
    uint8_t qh[4];      /* as block_q5_0 */
    uint8_t qs[QK / 2];
} block_q5_1;           /* x = q * d + m */
static_assert(sizeof(block_q5_1) == 24, "block_q5_1 size");

typedef struct {
    uint16_t d;         /* fp16 scale */
    uint8_t qs[QK / 2]; /* 4-bit indices into lc_iq4nl_values, nibbles as block_q4_0 */
} block_iq4_nl;         /* x = d * lc_iq4nl_values[q] */
static_assert(sizeof(block_iq4_nl) == 18, "block_iq4_nl size");

/* ggml's non-linear 4-bit grid (IQ4_NL, IQ4_XS) */
static const int8_t lc_iq4nl_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* ---- K-quants: super-blocks of 256 (ggml-common.h) ----
 * Q4_K, Q5_K: 8 sub-blocks of 32; sub-block j has a 6-bit scale sc_j and a 6-bit min
 * m_j packed in scales[12] (lc_k4_scale_min), x = d * sc_j * q - dmin * m_j. The
 * quants of sub-blocks 2i and 2i+1 share qs[32i .. 32i+31]: element l of 2i is the
 * low nibble of qs[32i + l], element l of 2i+1 its high nibble (Q5_K: fifth bits
 * 2i and 2i+1 of qh[l]). */
typedef struct {
    uint16_t d, dmin;    /* fp16 super-block scales of the scales and of the mins */
    uint8_t scales[12];
    uint8_t qs[QK_K / 2];
} block_q4_K;
static_assert(sizeof(block_q4_K) == 144, "block_q4_K size");

typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2];
} block_q5_K;
static_assert(sizeof(block_q5_K) == 176, "block_q5_K size");

/* Q6_K: 16 sub-blocks of 16 with int8 scales, x = d * sc[e / 16] * (q - 32). Half h (0, 1)
 * holds elements 128h..128h+127 in ql[64h..], qh[32h..]: for l < 32, element 128h + 32k + l
 * (k = 0..3) takes the low (k < 2) or high (k >= 2) nibble of ql[64h + 32 (k & 1) + l] and
 * bits 2k, 2k+1 of qh[32h + l]. */
typedef struct {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    uint16_t d;
} block_q6_K;
static_assert(sizeof(block_q6_K) == 210, "block_q6_K size");

/* Q2_K and Q3_K: 16 sub-blocks of 16 (import: refused, see docs/FORMAT.md) */
typedef struct {
    uint8_t scales[QK_K / 16]; /* 4-bit scale, 4-bit min */
    uint8_t qs[QK_K / 4];
    uint16_t d, dmin;
} block_q2_K;
static_assert(sizeof(block_q2_K) == 84, "block_q2_K size");

typedef struct {
    uint8_t hmask[QK_K / 8];
    uint8_t qs[QK_K / 4];
    uint8_t scales[12];
    uint16_t d;
} block_q3_K;
static_assert(sizeof(block_q3_K) == 110, "block_q3_K size");

/* IQ4_XS: 8 sub-blocks of 32, 6-bit scales ls_j (low 4 bits: nibble j & 1 of
 * scales_l[j / 2]; high 2: bits 2j, 2j+1 of scales_h), x = d * (ls_j - 32) *
 * lc_iq4nl_values[q]; sub-block j's quants are qs[16j .. 16j+15], nibbles as Q4_0's */
typedef struct {
    uint16_t d;
    uint16_t scales_h;
    uint8_t scales_l[QK_K / 64];
    uint8_t qs[QK_K / 2];
} block_iq4_xs;
static_assert(sizeof(block_iq4_xs) == 136, "block_iq4_xs size");

/* Sub-block j (0..7) of Q4_K / Q5_K: its 6-bit scale and min (ggml's get_scale_min_k4). */
static inline void lc_k4_scale_min(const uint8_t *q, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* element j (0..31) of a Q6_0 block: byte and shift of its 2 high bits in qh */
static inline int lc_q6_0_qh_byte(int j) { return 4 * ((j & 15) >> 3) + (j & 3); }
static inline int lc_q6_0_qh_shift(int j) { return 4 * ((j >> 2) & 1) + 2 * (j >> 4); }
static inline int lc_q6_0_get(const block_q6_0 *b, int j) {
    const int low = j < 16 ? b->ql[j] & 0x0f : b->ql[j - 16] >> 4;
    return low | ((b->qh[lc_q6_0_qh_byte(j)] >> lc_q6_0_qh_shift(j)) & 3) << 4;
}

/* Activations, internal only: 8-bit values with one f32 scale per group of 8.
 * Group g (0..3) is elements 4g..4g+3 and 16+4g..16+4g+3: the two 4-element
 * halves that one int32 lane of a SIMD dot product sees from a Q4 weight byte's
 * low and high nibbles (AVX2 madd, VNNI vpdpbusd, NEON sdot; the x8 layout's
 * chunk c and c+4 for Q8_0), so the two integer dot products of a group chain
 * into one lane before the one int->float conversion and FMA per group. The fine
 * scales keep a channel with a massive activation from flattening its 31
 * neighbours (docs/ARCHITECTURE.md, docs/QUALITY.md). */
#define QG 8               /* elements per activation scale group */
#define NG (QK / QG)       /* groups per block */
static inline int lc_q8a_group(int j) { return (j & 15) >> 2; } /* element j (0..31) -> its group */
typedef struct {
    int8_t qs[QK];
    float d[NG];    /* x[j] ~= qs[j] * d[lc_q8a_group(j)] */
    float s;        /* sum over groups of d[g] * sum(qs in g): applies Q4_0's offset / Q4_1's minimum once per block */
    float s16[2];   /* the same over elements 0..15 and 16..31 (Q6_K's sub-blocks of 16 have scales of their own) */
    float pad;
} block_q8a;
static_assert(sizeof(block_q8a) == 64, "block_q8a size");

/* Activations for AMX int8 tiles (lc_kernels.gemm_amx_i8): 16 bits per element with one
 * scale per 32, as two bytes the tiles multiply separately: x[j] ~= d * (256 hi[j] + lo[j]). */
typedef struct {
    int8_t hi[QK];
    uint8_t lo[QK];
    float d;
    float s;      /* d * sum(256 hi + lo): the weights' offset / minimum, once per block */
    float s16[2]; /* the same over elements 0..15 and 16..31 (Q6_K's sub-blocks) */
} block_q16a;
static_assert(sizeof(block_q16a) == 80, "block_q16a size");

/* s and s16 from qs and d, in one fixed order, so every quantize_act variant agrees bit for bit */
static inline void lc_q8a_set_sum(block_q8a *b) {
    float s = 0.0f, s0 = 0.0f, s1 = 0.0f;
    for (int g = 0; g < NG; g++) {
        int lo = 0, hi = 0;
        for (int j = 0; j < 4; j++) { lo += b->qs[4 * g + j]; hi += b->qs[16 + 4 * g + j]; }
        s += b->d[g] * (float)(lo + hi);
        s0 += b->d[g] * (float)lo;
        s1 += b->d[g] * (float)hi;
    }
    b->s = s;
    b->s16[0] = s0;
    b->s16[1] = s1;
    b->pad = 0.0f;
}

static inline uint32_t lc_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float lc_f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* IEEE half -> float, exact, including subnormals, inf and nan. */
static inline float lc_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, f;
    if (exp == 0) {
        if (mant == 0) {
            f = sign;
        } else {
            int e = -1;
            do { e++; mant <<= 1; } while (!(mant & 0x400u));
            f = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        f = sign | 0x7f800000u | (mant << 13);
    } else {
        f = sign | ((exp + 112) << 23) | (mant << 13);
    }
    return lc_f32_from_bits(f);
}

/* float -> IEEE half, round to nearest even (the same as F16C and numpy).
 * Branch-light method of the FP16 library (M. Dukhan), as used by ggml. */
static inline uint16_t lc_fp32_to_fp16(float f) {
    const float scale_to_inf = lc_f32_from_bits(0x77800000u);  /* 2^112 */
    const float scale_to_zero = lc_f32_from_bits(0x08800000u); /* 2^-110 */
    float base = (__builtin_fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = lc_f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xff000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = lc_f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = lc_f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007c00u;
    const uint32_t mantissa_bits = bits & 0x00000fffu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}

/* float -> bfloat16 (the top 16 bits), round to nearest even; NaN stays a quiet NaN (as
 * AVX512-BF16's vcvtne2ps2bf16) */
static inline uint16_t lc_fp32_to_bf16(float f) {
    const uint32_t u = lc_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* ---- the type table: the one place that says what each weight type is ----
 * The x8 layout (docs/FORMAT.md, layout 1) groups rows by 8. For each block column
 * b, the 8 rows' blocks are stored as one block group: first the block's fp16 header
 * fields (n_hdr of them, at byte hdr[h] of the block), each as 8 consecutive values
 * (row 0 first); then the block's remaining bytes, in block order, in chunks of 32:
 * chunk c holds the c-th 4 remaining bytes of each of the 8 rows, row after row. A
 * 32-byte load is then the same 4 bytes of all 8 rows (4 elements of Q8_0, 8 of Q4,
 * K-quant scale bytes), so one SIMD lane per row accumulates without horizontal sums.
 * It is a byte permutation of the GGUF blocks: GGUF files import bit-exact.
 * Type kernels are in the x8 layout (kernels_*.c); Q4_0, Q4_1 and Q8_0 also have
 * row-major ones (layout 0) for matrices whose row count is not a multiple of 8. */
#define LC_LAYOUT_ROWS 0
#define LC_LAYOUT_X8 1

typedef struct {
    int type;
    const char *name;
    int block_elems; /* elements per block: 1 (float), QK or QK_K */
    int block_bytes;
    int n_hdr;       /* fp16 header fields of a block (0 for float types) */
    int hdr[2];      /* their byte offsets in the block */
    int row_major;   /* 1: layout 0 (row-major) allowed; 0: x8 only (quantized types) */
} lc_type_info;

/* index of each type in lc_types (and in the kernel tables' gemm arrays) */
enum lc_type_index {
    LC_I_F32, LC_I_F16, LC_I_Q4_0, LC_I_Q4_1, LC_I_Q5_0, LC_I_Q5_1, LC_I_Q8_0, LC_I_Q2_K, LC_I_Q3_K,
    LC_I_Q4_K, LC_I_Q5_K, LC_I_Q6_K, LC_I_IQ4_NL, LC_I_IQ4_XS, LC_I_Q6_0, LC_N_TYPES
};

static const lc_type_info lc_types[LC_N_TYPES] = {
    [LC_I_F32] = {LC_TYPE_F32, "F32", 1, 4, 0, {0, 0}, 1},
    [LC_I_F16] = {LC_TYPE_F16, "F16", 1, 2, 0, {0, 0}, 1},
    [LC_I_Q4_0] = {LC_TYPE_Q4_0, "Q4_0", QK, 18, 1, {0, 0}, 1},
    [LC_I_Q4_1] = {LC_TYPE_Q4_1, "Q4_1", QK, 20, 2, {0, 2}, 1},
    [LC_I_Q5_0] = {LC_TYPE_Q5_0, "Q5_0", QK, 22, 1, {0, 0}, 0},
    [LC_I_Q5_1] = {LC_TYPE_Q5_1, "Q5_1", QK, 24, 2, {0, 2}, 0},
    [LC_I_Q8_0] = {LC_TYPE_Q8_0, "Q8_0", QK, 34, 1, {0, 0}, 1},
    [LC_I_Q2_K] = {LC_TYPE_Q2_K, "Q2_K", QK_K, 84, 2, {80, 82}, 0},
    [LC_I_Q3_K] = {LC_TYPE_Q3_K, "Q3_K", QK_K, 110, 1, {108, 0}, 0},
    [LC_I_Q4_K] = {LC_TYPE_Q4_K, "Q4_K", QK_K, 144, 2, {0, 2}, 0},
    [LC_I_Q5_K] = {LC_TYPE_Q5_K, "Q5_K", QK_K, 176, 2, {0, 2}, 0},
    [LC_I_Q6_K] = {LC_TYPE_Q6_K, "Q6_K", QK_K, 210, 1, {208, 0}, 0},
    [LC_I_IQ4_NL] = {LC_TYPE_IQ4_NL, "IQ4_NL", QK, 18, 1, {0, 0}, 0},
    [LC_I_IQ4_XS] = {LC_TYPE_IQ4_XS, "IQ4_XS", QK_K, 136, 2, {0, 2}, 0},
    [LC_I_Q6_0] = {LC_TYPE_Q6_0, "Q6_0", QK, 26, 1, {0, 0}, 0},
};

/* index of a type id in lc_types, or -1 (a switch, so that a constant type folds) */
static inline int lc_type_index(int type) {
    switch (type) {
    case LC_TYPE_F32: return LC_I_F32;
    case LC_TYPE_F16: return LC_I_F16;
    case LC_TYPE_Q4_0: return LC_I_Q4_0;
    case LC_TYPE_Q4_1: return LC_I_Q4_1;
    case LC_TYPE_Q5_0: return LC_I_Q5_0;
    case LC_TYPE_Q5_1: return LC_I_Q5_1;
    case LC_TYPE_Q8_0: return LC_I_Q8_0;
    case LC_TYPE_Q2_K: return LC_I_Q2_K;
    case LC_TYPE_Q3_K: return LC_I_Q3_K;
    case LC_TYPE_Q4_K: return LC_I_Q4_K;
    case LC_TYPE_Q5_K: return LC_I_Q5_K;
    case LC_TYPE_Q6_K: return LC_I_Q6_K;
    case LC_TYPE_IQ4_NL: return LC_I_IQ4_NL;
    case LC_TYPE_IQ4_XS: return LC_I_IQ4_XS;
    case LC_TYPE_Q6_0: return LC_I_Q6_0;
    default: return -1;
    }
}

/* the table row of a type id, or NULL */
static inline const lc_type_info *lc_type_info_of(int type) {
    const int i = lc_type_index(type);
    return i < 0 ? NULL : &lc_types[i];
}

static inline int lc_is_quantized(int type) {
    const lc_type_info *t = lc_type_info_of(type);
    return t != NULL && t->block_elems > 1;
}

static inline int lc_block_bytes(int type) {
    const lc_type_info *t = lc_type_info_of(type);
    return t ? t->block_bytes : -1;
}

/* bytes of the fp16 headers of an x8 block group (16 per field) */
static inline int lc_x8_header(int type) { return 16 * lc_type_info_of(type)->n_hdr; }

/* Row r (0..7) of the x8 block group g <-> one GGUF block (dir 0: extract, 1: insert). */
static inline void lc_x8_copy(int type, uint8_t *g, int r, uint8_t *blk, int dir) {
    const lc_type_info *t = lc_type_info_of(type);
    for (int h = 0; h < t->n_hdr; h++) {
        if (dir) memcpy(g + 16 * h + 2 * r, blk + t->hdr[h], 2);
        else memcpy(blk + t->hdr[h], g + 16 * h + 2 * r, 2);
    }
    uint8_t *rest = g + 16 * t->n_hdr;
    int c = 0;
    for (int i = 0; i < t->block_bytes;) {
        if ((t->n_hdr > 0 && i == t->hdr[0]) || (t->n_hdr > 1 && i == t->hdr[1])) { i += 2; continue; }
        if (dir) memcpy(rest + 32 * c + 4 * r, blk + i, 4);
        else memcpy(blk + i, rest + 32 * c + 4 * r, 4);
        i += 4;
        c++;
    }
}
static inline void lc_x8_extract(int type, const uint8_t *g, int r, uint8_t *blk) { lc_x8_copy(type, (uint8_t *)g, r, blk, 0); }
static inline void lc_x8_insert(int type, uint8_t *g, int r, const uint8_t *blk) { lc_x8_copy(type, g, r, (uint8_t *)blk, 1); }
#define LC_MAX_BLOCK_BYTES 210

/* Bytes of one row of `cols` elements (a multiple of the block size), or -1 for an
 * unknown type. */
static inline int64_t lc_row_bytes(int type, int64_t cols) {
    const lc_type_info *t = lc_type_info_of(type);
    return t ? cols / t->block_elems * t->block_bytes : -1;
}

#endif
