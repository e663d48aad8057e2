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

#define QK 32 /* elements per block, every quantized type */

enum lc_type {
    LC_TYPE_F32 = 0,
    LC_TYPE_F16 = 1,
    LC_TYPE_Q4_0 = 2,
    LC_TYPE_Q4_1 = 3,
    LC_TYPE_Q8_0 = 8,
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
    float pad[3];
} block_q8a;
static_assert(sizeof(block_q8a) == 64, "block_q8a size");

/* s from qs and d, in one fixed order, so every quantize_act variant agrees bit for bit */
static inline void lc_q8a_set_sum(block_q8a *b) {
    float s = 0.0f;
    for (int g = 0; g < NG; g++) {
        int sum = 0;
        for (int j = 0; j < 4; j++) sum += b->qs[4 * g + j] + b->qs[16 + 4 * g + j];
        s += b->d[g] * (float)sum;
    }
    b->s = s;
    b->pad[0] = b->pad[1] = b->pad[2] = 0.0f;
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

/* ---- the x8 layout of quantized tensors (docs/FORMAT.md, layout 1) ----
 * Rows go in groups of 8. For each block column b, the 8 rows' blocks are stored
 * as one block group: the 8 fp16 scales d (Q4_1: then the 8 fp16 minimums m),
 * then the quant bytes in chunks of 32: chunk c holds bytes 4c..4c+3 of each of
 * the 8 rows' qs, row after row. A 32-byte load is then 4 elements of each of the
 * 8 rows (Q8_0: half of activation group c & 3) or 8 of them (Q4: low nibbles
 * elements 4c.., high nibbles 16+4c.., together activation group c), so one SIMD
 * lane per row accumulates without horizontal sums. It is a byte
 * permutation of the GGUF blocks: GGUF files import bit-exact. */
#define LC_LAYOUT_ROWS 0
#define LC_LAYOUT_X8 1

static inline int lc_block_bytes(int type) {
    return type == LC_TYPE_Q4_0 ? 18 : type == LC_TYPE_Q4_1 ? 20 : type == LC_TYPE_Q8_0 ? 34 : type == LC_TYPE_Q6_0 ? 26 : -1;
}
static inline int lc_x8_header(int type) { return type == LC_TYPE_Q4_1 ? 32 : 16; }
/* quant bytes per block (Q6_0: ql then qh, so x8 chunks 0-3 are ql and 4-5 qh) */
static inline int lc_qs_bytes(int type) { return type == LC_TYPE_Q8_0 ? 32 : type == LC_TYPE_Q6_0 ? 24 : 16; }

/* row r (0..7) of the x8 block group g -> one GGUF block */
static inline void lc_x8_extract(int type, const uint8_t *g, int r, uint8_t *blk) {
    const int hdr = lc_x8_header(type), qb = lc_qs_bytes(type);
    int off = 2;
    memcpy(blk, g + 2 * r, 2);
    if (type == LC_TYPE_Q4_1) { memcpy(blk + 2, g + 16 + 2 * r, 2); off = 4; }
    for (int c = 0; c < qb / 4; c++) memcpy(blk + off + 4 * c, g + hdr + 32 * c + 4 * r, 4);
}

/* one GGUF block of row r (0..7) -> its place in the x8 block group g */
static inline void lc_x8_insert(int type, uint8_t *g, int r, const uint8_t *blk) {
    const int hdr = lc_x8_header(type), qb = lc_qs_bytes(type);
    int off = 2;
    memcpy(g + 2 * r, blk, 2);
    if (type == LC_TYPE_Q4_1) { memcpy(g + 16 + 2 * r, blk + 2, 2); off = 4; }
    for (int c = 0; c < qb / 4; c++) memcpy(g + hdr + 32 * c + 4 * r, blk + off + 4 * c, 4);
}

/* Bytes of one row of `cols` elements (cols % 32 == 0 for quantized types). */
static inline int64_t lc_row_bytes(int type, int64_t cols) {
    switch (type) {
    case LC_TYPE_F32: return cols * 4;
    case LC_TYPE_F16: return cols * 2;
    case LC_TYPE_Q4_0: return cols / QK * (int64_t)sizeof(block_q4_0);
    case LC_TYPE_Q4_1: return cols / QK * (int64_t)sizeof(block_q4_1);
    case LC_TYPE_Q8_0: return cols / QK * (int64_t)sizeof(block_q8_0);
    case LC_TYPE_Q6_0: return cols / QK * (int64_t)sizeof(block_q6_0);
    default: return -1;
    }
}

#endif
