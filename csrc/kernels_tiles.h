/* The row x token-tile loop shared by the SIMD kernel files.
 *
 * LC_TILED_GEMM(NAME, XT, ROW_BYTES, X_STRIDE, TILE) defines
 *   static void NAME(const void *W, int64_t cols, const XT *X, int nt, float *Y,
 *                    int64_t ldy, int64_t r0, int64_t r1)
 * (the lc_kernels gemm signature): tokens go in tiles of up to 4, and for each
 * tile every row [r0, r1) calls TILE(w_row, x_tile, cols, TN, out, ldy) with TN
 * a literal, so that the tile function's loops over TN unroll and its TN
 * accumulators stay in registers. ROW_BYTES: bytes of one weight row;
 * X_STRIDE: elements of XT per token. */
#ifndef LLAMACPU_KERNELS_TILES_H
#define LLAMACPU_KERNELS_TILES_H

#define LC_TILED_GEMM(NAME, XT, ROW_BYTES, X_STRIDE, TILE)                                        \
    static void NAME(const void *W, int64_t cols, const XT *X, int nt, float *Y, int64_t ldy,     \
                     int64_t r0, int64_t r1) {                                                    \
        const int64_t row_bytes = (ROW_BYTES), x_stride = (X_STRIDE);                             \
        for (int t0 = 0; t0 < nt; t0 += 4) {                                                      \
            const int tn = nt - t0 < 4 ? nt - t0 : 4;                                             \
            const XT *x = X + (int64_t)t0 * x_stride;                                             \
            for (int64_t r = r0; r < r1; r++) {                                                   \
                const void *w = (const char *)W + r * row_bytes;                                  \
                float *out = Y + (int64_t)t0 * ldy + r;                                           \
                switch (tn) {                                                                     \
                case 4: TILE(w, x, cols, 4, out, ldy); break;                                     \
                case 3: TILE(w, x, cols, 3, out, ldy); break;                                     \
                case 2: TILE(w, x, cols, 2, out, ldy); break;                                     \
                default: TILE(w, x, cols, 1, out, ldy); break;                                    \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

/* the five gemms of a kernel file, given its tile_q(TYPE, ...) and tile_f(w, is_f16, ...) */
#define LC_TILE_Q4_0(w, x, cols, TN, out, ldo) tile_q(LC_TYPE_Q4_0, w, x, (cols) / QK, TN, out, ldo)
#define LC_TILE_Q4_1(w, x, cols, TN, out, ldo) tile_q(LC_TYPE_Q4_1, w, x, (cols) / QK, TN, out, ldo)
#define LC_TILE_Q8_0(w, x, cols, TN, out, ldo) tile_q(LC_TYPE_Q8_0, w, x, (cols) / QK, TN, out, ldo)
#define LC_TILE_F16(w, x, cols, TN, out, ldo) tile_f(w, 1, x, cols, TN, out, ldo)
#define LC_TILE_F32(w, x, cols, TN, out, ldo) tile_f(w, 0, x, cols, TN, out, ldo)
#define LC_DEFINE_GEMMS                                                                          \
    LC_TILED_GEMM(gemm_q4_0, block_q8a, lc_row_bytes(LC_TYPE_Q4_0, cols), cols / QK, LC_TILE_Q4_0) \
    LC_TILED_GEMM(gemm_q4_1, block_q8a, lc_row_bytes(LC_TYPE_Q4_1, cols), cols / QK, LC_TILE_Q4_1) \
    LC_TILED_GEMM(gemm_q8_0, block_q8a, lc_row_bytes(LC_TYPE_Q8_0, cols), cols / QK, LC_TILE_Q8_0) \
    LC_TILED_GEMM(gemm_f16, float, cols * 2, cols, LC_TILE_F16)                                  \
    LC_TILED_GEMM(gemm_f32, float, cols * 4, cols, LC_TILE_F32)

/* TILE(TYPE, w, x, nb, TN, out, ldy) with TN the literal value of tn (1..4) */
#define LC_X8_DISPATCH(TILE, TYPE, w, x, nb, tn, out, ldy)                                       \
    switch (tn) {                                                                                 \
    case 4: TILE(TYPE, w, x, nb, 4, out, ldy); break;                                             \
    case 3: TILE(TYPE, w, x, nb, 3, out, ldy); break;                                             \
    case 2: TILE(TYPE, w, x, nb, 2, out, ldy); break;                                             \
    default: TILE(TYPE, w, x, nb, 1, out, ldy); break;                                            \
    }

/* x8 layout: the loop over groups of 8 rows, each group (or pair) read for every token
 * tile while it is in L1 (weights stream once however many tokens); TILE(TYPE, group,
 * x_tile, nb, TN, out, ldy) writes 8 consecutive outputs per token. r0, r1: multiples of 8.
 * With PAIRS 1: pairs of groups first, for 2-4 tokens (PAIRS 2: for any number of
 * tokens), with TILE2(TYPE, group, x_tile, nb, TN, out, ldy) writing 16 outputs per
 * token (the second group is group_bytes further), then the groups left over one by one.
 * Pairs (512-bit tables, whose 32 registers hold 8 tokens' sums) take tiles of LC_X16_TN
 * tokens while that many are left, so that the weights' unpacking is shared by twice as
 * many tokens; each token's sums are the same either way. */
#define LC_X16_TN 8
#define LC_X8_PAIR_TOKENS(TILE, TILE2, TYPE, PAIRS, w, group_bytes, X, nb, nt, Y, ldy)       \
    for (int t0 = 0; t0 < nt;) {                                                                  \
        const block_q8a *x = X + (int64_t)t0 * nb;                                                \
        float *out = Y + (int64_t)t0 * ldy;                                                       \
        if (nt - t0 >= LC_X16_TN) {                                                               \
            TILE2(TYPE, w, x, nb, LC_X16_TN, out, ldy);                                           \
            t0 += LC_X16_TN;                                                                      \
            continue;                                                                             \
        }                                                                                         \
        const int tn = nt - t0 < 4 ? nt - t0 : 4;                                                 \
        if (tn > 1 || PAIRS == 2) {                                                               \
            LC_X8_DISPATCH(TILE2, TYPE, w, x, nb, tn, out, ldy)                                   \
        } else {                                                                                  \
            TILE(TYPE, w, x, nb, 1, out, ldy);                                                    \
            TILE(TYPE, w + group_bytes, x, nb, 1, out + 8, ldy);                                  \
        }                                                                                         \
        t0 += tn;                                                                                 \
    }
#define LC_TILED_GEMM_X8_PAIRS(NAME, TYPE, TILE, TILE2, PAIRS)                                    \
    static void NAME(const void *W, int64_t cols, const block_q8a *X, int nt, float *Y, int64_t ldy, \
                     int64_t r0, int64_t r1) {                                                    \
        const int64_t nb = cols / QK, group_bytes = 8 * lc_row_bytes(TYPE, cols);                  \
        int64_t g = r0 / 8;                                                                       \
        if (PAIRS && (nt > 1 || PAIRS == 2))                                                      \
            for (; g + 2 <= r1 / 8; g += 2) {                                                     \
                const char *w = (const char *)W + g * group_bytes;                                \
                LC_X8_PAIR_TOKENS(TILE, TILE2, TYPE, PAIRS, w, group_bytes, X, nb, nt,            \
                                  Y + 8 * g, ldy)                                                 \
            }                                                                                     \
        for (; g < r1 / 8; g++)                                                                   \
            for (int t0 = 0; t0 < nt; t0 += 4) {                                                  \
                const int tn = nt - t0 < 4 ? nt - t0 : 4;                                         \
                LC_X8_DISPATCH(TILE, TYPE, (const char *)W + g * group_bytes, X + (int64_t)t0 * nb, \
                               nb, tn, Y + (int64_t)t0 * ldy + 8 * g, ldy)                        \
            }                                                                                     \
    }
#define LC_TILED_GEMM_X8(NAME, TYPE, TILE) LC_TILED_GEMM_X8_PAIRS(NAME, TYPE, TILE, TILE, 0)

/* A kernel table from a file's static kernels: every file defines the row-major
 * gemms of Q4_0, Q4_1, Q8_0, the x8 gemms of every quantized type with kernels,
 * and the float ones (the one list of which (type, layout) pairs have kernels). */
#define LC_KERNEL_FIELDS(NAME)                                                                     \
    .name = NAME, .quantize_act = quantize_act,                                                    \
    .gemm_rows = {[LC_I_Q4_0] = gemm_q4_0, [LC_I_Q4_1] = gemm_q4_1, [LC_I_Q8_0] = gemm_q8_0},       \
    .gemm_x8 = {[LC_I_Q4_0] = gemm_q4_0_x8, [LC_I_Q4_1] = gemm_q4_1_x8, [LC_I_Q5_0] = gemm_q5_0_x8,  \
                [LC_I_Q5_1] = gemm_q5_1_x8, [LC_I_Q8_0] = gemm_q8_0_x8, [LC_I_Q6_0] = gemm_q6_0_x8,  \
                [LC_I_Q4_K] = gemm_q4_k_x8, [LC_I_Q5_K] = gemm_q5_k_x8, [LC_I_Q6_K] = gemm_q6_k_x8,  \
                [LC_I_IQ4_NL] = gemm_iq4_nl_x8, [LC_I_IQ4_XS] = gemm_iq4_xs_x8},                    \
    .gemm_f16 = gemm_f16, .gemm_f32 = gemm_f32, .dequantize_row = dequantize_row,                   \
    .rmsnorm = rmsnorm, .rope = rope, .attn_block = attn_block, .f32_to_f16 = f32_to_f16,              \
    .swiglu = swiglu
#define LC_KERNEL_TABLE(NAME) {LC_KERNEL_FIELDS(NAME)}

#endif
