/* C test driver: every SIMD kernel table against the scalar reference, over odd
 * sizes. Runs natively and under qemu-aarch64 (NEON and dotprod paths).
 *   cc -O2 -Icsrc tests/c/test_kernels.c csrc/kernels_*.c csrc/dispatch.c -lm
 * Prints "N passed, M failed"; exit status 1 on any failure. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "llamacpu.h"

/* Named tolerance: SIMD and scalar sums differ in order only; max |diff| / max |ref|
 * over a matmul output stays below this (a wrong element or block gives O(1)). */
#define TOL 1e-4

static int passed, failed;
static unsigned long long rng = 88172645463325252ull;
static float frand(void) { /* xorshift, uniform in [-1, 1) */
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (float)((rng >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}
static void fill(float *x, int64_t n, float scale) { for (int64_t i = 0; i < n; i++) x[i] = frand() * scale; }

static void check(int ok, const char *impl, const char *what, int a, int b, double err) {
    if (ok) { passed++; return; }
    failed++;
    printf("FAIL %s %s (%d, %d): error %g\n", impl, what, a, b, err);
}

static double max_rel(const float *a, const float *b, int64_t n) {
    double m = 0, s = 1e-30;
    for (int64_t i = 0; i < n; i++) { m = fmax(m, fabs((double)a[i] - b[i])); s = fmax(s, fabs((double)b[i])); }
    return m / s;
}

/* Q6_0 (x8 layout only, so no row-major gemm to compare with): wq holds the rows'
 * blocks as lc_quantize_row_q6_0_ref wrote them from w, ya the scalar x8 gemm of
 * them with xa. Checks the scalar dequantize_row against quants.h's definition
 * x = (q - 32) * d, k's against the scalar one, the quantizer's round trip and the
 * scalar x8 gemm against the dot products of the dequantized operands. */
static void q6_0_checks(const lc_kernels *r, const lc_kernels *k, const float *w, const uint8_t *wq,
                        const block_q8a *xa, const float *ya, int rows, int cols, int nt) {
    const int nb = cols / QK;
    float *da = malloc(sizeof(float) * rows * cols), *db = malloc(sizeof(float) * cols);
    int def_ok = 1, same = 1, trip_ok = 1;
    double trip = 0; /* the worst round-trip error over its bound */
    for (int i = 0; i < rows; i++) {
        const block_q6_0 *blk = (const block_q6_0 *)wq + (int64_t)i * nb;
        float *d = da + (int64_t)i * cols;
        r->dequantize_row(LC_TYPE_Q6_0, blk, d, cols);
        k->dequantize_row(LC_TYPE_Q6_0, blk, db, cols);
        same &= memcmp(d, db, sizeof(float) * cols) == 0;
        for (int b = 0; b < nb; b++) {
            const float s = lc_fp16_to_fp32(blk[b].d);
            for (int j = 0; j < QK; j++) {
                const int q = lc_q6_0_get(blk + b, j);
                const float v = d[b * QK + j];
                def_ok &= v == (float)(q - 32) * s;
                /* |x - v| <= |d| / 2, where x / d rounds to q - 32, plus 33 times the
                 * fp16 rounding of d (2^-11 relative, 2^-25 where subnormal); d is
                 * chosen so that the largest |x| is q = 0, and a value of the other
                 * sign as large rounds to 32, clamped to 31: q = 63 is within |d| */
                const double bound = fabs(s) * (q == 63 ? 1.0 : 0.5) + 33 * fmax(fabs(s) / 2048, 0x1p-25) +
                                     1e-6 * fabs(w[(int64_t)i * cols + b * QK + j]);
                const double err = fabs((double)w[(int64_t)i * cols + b * QK + j] - v);
                trip = fmax(trip, err / bound);
                trip_ok &= err <= bound;
            }
        }
    }
    check(def_ok, "scalar", "dequantize_row Q6_0 == (q - 32) * d", rows, cols, 0);
    check(same, k->name, "dequantize_row Q6_0", rows, cols, 0);
    check(trip_ok, "scalar", "quantize_row_q6_0 round trip", rows, cols, trip);
    /* the scalar x8 gemm against double sums of the dequantized operands */
    float *yd = malloc(sizeof(float) * nt * rows);
    for (int t = 0; t < nt; t++)
        for (int i = 0; i < rows; i++) {
            double sum = 0;
            for (int j = 0; j < cols; j++) {
                const block_q8a *xb = xa + (int64_t)t * nb + j / QK;
                sum += (double)da[(int64_t)i * cols + j] * xb->qs[j % QK] * xb->d[lc_q8a_group(j % QK)];
            }
            yd[t * rows + i] = (float)sum;
        }
    const double e = max_rel(ya, yd, (int64_t)nt * rows);
    check(e < TOL, "scalar", "gemm_q6_0_x8 vs dequantized", cols, nt, e);
    free(da); free(db); free(yd);
}

static void test_table(const lc_kernels *k) {
    const lc_kernels *r = &lc_kernels_scalar;
    const int cols_list[] = {32, 64, 96, 160, 256, 544};
    for (unsigned ci = 0; ci < sizeof cols_list / sizeof *cols_list; ci++) {
        const int cols = cols_list[ci], nb = cols / QK;
        for (int rows = 1; rows <= 9; rows += 4) for (int nt = 1; nt <= 7; nt += 3) {
            float *w = malloc(sizeof(float) * rows * cols), *x = malloc(sizeof(float) * nt * cols);
            fill(w, (int64_t)rows * cols, 1.0f); fill(x, (int64_t)nt * cols, 3.0f);
            block_q8a *xa = malloc(sizeof(block_q8a) * nt * nb), *xb = malloc(sizeof(block_q8a) * nt * nb);
            for (int t = 0; t < nt; t++) {
                r->quantize_act(x + t * cols, xa + t * nb, cols);
                k->quantize_act(x + t * cols, xb + t * nb, cols);
            }
            check(memcmp(xa, xb, sizeof(block_q8a) * nt * nb) == 0, k->name, "quantize_act bit-exact", cols, nt, 0);
            float *ya = malloc(sizeof(float) * nt * rows), *yb = malloc(sizeof(float) * nt * rows);
            void *wq = malloc((size_t)rows * nb * 34);
            const int types[] = {LC_TYPE_Q4_0, LC_TYPE_Q4_1, LC_TYPE_Q8_0};
            for (int ti = 0; ti < 3; ti++) {
                const int64_t rb = lc_row_bytes(types[ti], cols);
                for (int i = 0; i < rows; i++) {
                    if (types[ti] == LC_TYPE_Q4_0) lc_quantize_row_q4_0_ref(w + i * cols, (block_q4_0 *)((char *)wq + i * rb), cols);
                    if (types[ti] == LC_TYPE_Q4_1) lc_quantize_row_q4_1_ref(w + i * cols, (block_q4_1 *)((char *)wq + i * rb), cols);
                    if (types[ti] == LC_TYPE_Q8_0) lc_quantize_row_q8_0_ref(w + i * cols, (block_q8_0 *)((char *)wq + i * rb), cols);
                }
                void (*ga)(const void *, int64_t, const block_q8a *, int, float *, int64_t, int64_t, int64_t) =
                    ti == 0 ? r->gemm_q4_0 : ti == 1 ? r->gemm_q4_1 : r->gemm_q8_0;
                void (*gb)(const void *, int64_t, const block_q8a *, int, float *, int64_t, int64_t, int64_t) =
                    ti == 0 ? k->gemm_q4_0 : ti == 1 ? k->gemm_q4_1 : k->gemm_q8_0;
                ga(wq, cols, xa, nt, ya, rows, 0, rows);
                gb(wq, cols, xa, nt, yb, rows, 0, rows);
                double e = max_rel(yb, ya, (int64_t)nt * rows);
                check(e < TOL, k->name, types[ti] == 2 ? "gemm_q4_0" : types[ti] == 3 ? "gemm_q4_1" : "gemm_q8_0", cols, nt, e);
                float *da = malloc(sizeof(float) * cols), *db = malloc(sizeof(float) * cols);
                r->dequantize_row(types[ti], wq, da, cols);
                k->dequantize_row(types[ti], wq, db, cols);
                check(memcmp(da, db, sizeof(float) * cols) == 0, k->name, "dequantize_row", types[ti], cols, 0);
                free(da); free(db);
            }
            /* float weights */
            uint16_t *wh = malloc(sizeof(uint16_t) * rows * cols);
            r->f32_to_f16(wh, w, (int64_t)rows * cols);
            r->gemm_f16(wh, cols, x, nt, ya, rows, 0, rows);
            k->gemm_f16(wh, cols, x, nt, yb, rows, 0, rows);
            check(max_rel(yb, ya, (int64_t)nt * rows) < TOL, k->name, "gemm_f16", cols, nt, max_rel(yb, ya, (int64_t)nt * rows));
            r->gemm_f32(w, cols, x, nt, ya, rows, 0, rows);
            k->gemm_f32(w, cols, x, nt, yb, rows, 0, rows);
            check(max_rel(yb, ya, (int64_t)nt * rows) < TOL, k->name, "gemm_f32", cols, nt, max_rel(yb, ya, (int64_t)nt * rows));
            free(w); free(x); free(xa); free(xb); free(ya); free(yb); free(wq); free(wh);
        }
    }
    /* x8 layout: scalar and SIMD x8 gemms against the scalar row-major one (Q6_0,
     * which has no row-major gemm: the scalar x8 one against the dequantized
     * weights and activations, the SIMD one against the scalar x8 one). */
    for (unsigned ci = 0; ci < sizeof cols_list / sizeof *cols_list; ci++) {
        const int cols = cols_list[ci], nb = cols / QK;
        for (int rows = 8; rows <= 24; rows += 16) for (int nt = 1; nt <= 6; nt += 5) {
            float *w = malloc(sizeof(float) * rows * cols), *x = malloc(sizeof(float) * nt * cols);
            fill(w, (int64_t)rows * cols, 1.0f); fill(x, (int64_t)nt * cols, 3.0f);
            block_q8a *xa = malloc(sizeof(block_q8a) * nt * nb);
            for (int t = 0; t < nt; t++) r->quantize_act(x + t * cols, xa + t * nb, cols);
            float *ya = malloc(sizeof(float) * nt * rows), *yb = malloc(sizeof(float) * nt * rows);
            float *yc = malloc(sizeof(float) * nt * rows);
            uint8_t *wq = malloc((size_t)rows * nb * 34), *wx = malloc((size_t)rows * nb * 34);
            const int types[] = {LC_TYPE_Q4_0, LC_TYPE_Q4_1, LC_TYPE_Q8_0, LC_TYPE_Q6_0};
            const char *names[] = {"gemm_q4_0_x8", "gemm_q4_1_x8", "gemm_q8_0_x8", "gemm_q6_0_x8"};
            for (int ti = 0; ti < 4; ti++) {
                const int type = types[ti], bs = lc_block_bytes(type);
                const int64_t rb = lc_row_bytes(type, cols);
                for (int i = 0; i < rows; i++) {
                    if (type == LC_TYPE_Q4_0) lc_quantize_row_q4_0_ref(w + i * cols, (block_q4_0 *)(wq + i * rb), cols);
                    if (type == LC_TYPE_Q4_1) lc_quantize_row_q4_1_ref(w + i * cols, (block_q4_1 *)(wq + i * rb), cols);
                    if (type == LC_TYPE_Q8_0) lc_quantize_row_q8_0_ref(w + i * cols, (block_q8_0 *)(wq + i * rb), cols);
                    if (type == LC_TYPE_Q6_0) lc_quantize_row_q6_0_ref(w + i * cols, (block_q6_0 *)(wq + i * rb), cols);
                }
                for (int i = 0; i < rows; i++)
                    for (int b = 0; b < nb; b++) {
                        uint8_t *g = wx + ((int64_t)(i / 8) * nb + b) * 8 * bs;
                        lc_x8_insert(type, g, i % 8, wq + i * rb + b * bs);
                        uint8_t back[34];
                        lc_x8_extract(type, g, i % 8, back);
                        if (memcmp(back, wq + i * rb + b * bs, bs) != 0) { failed++; printf("FAIL x8 round trip\n"); }
                    }
                typedef void (*gemm_fn)(const void *, int64_t, const block_q8a *, int, float *, int64_t, int64_t, int64_t);
                const gemm_fn x8_ref = ti == 0 ? r->gemm_q4_0_x8 : ti == 1 ? r->gemm_q4_1_x8 : ti == 2 ? r->gemm_q8_0_x8 : r->gemm_q6_0_x8;
                const gemm_fn x8 = ti == 0 ? k->gemm_q4_0_x8 : ti == 1 ? k->gemm_q4_1_x8 : ti == 2 ? k->gemm_q8_0_x8 : k->gemm_q6_0_x8;
                if (type != LC_TYPE_Q6_0) {
                    const gemm_fn rows_ref = ti == 0 ? r->gemm_q4_0 : ti == 1 ? r->gemm_q4_1 : r->gemm_q8_0;
                    rows_ref(wq, cols, xa, nt, ya, rows, 0, rows);
                    x8_ref(wx, cols, xa, nt, yb, rows, 0, rows);
                    check(memcmp(ya, yb, sizeof(float) * nt * rows) == 0, k->name, "scalar gemm x8 == rows", cols, nt, 0);
                } else {
                    x8_ref(wx, cols, xa, nt, ya, rows, 0, rows);
                    q6_0_checks(r, k, w, wq, xa, ya, rows, cols, nt);
                }
                for (int i = 0; i < nt * rows; i++) yc[i] = -1.0f;
                x8(wx, cols, xa, nt, yc, rows, 8, rows); /* a row range, as threads split it */
                x8(wx, cols, xa, nt, yc, rows, 0, 8);
                double e = max_rel(yc, ya, (int64_t)nt * rows);
                check(e < TOL, k->name, names[ti], cols, nt, e);
                if (nt > 3) { /* the first 3 tokens alone: a tile of 3 (nt 1 and 6 give 1, 4 and 2) */
                    for (int i = 0; i < nt * rows; i++) yc[i] = -1.0f;
                    x8(wx, cols, xa, 3, yc, rows, 0, rows);
                    e = max_rel(yc, ya, (int64_t)3 * rows);
                    check(e < TOL, k->name, names[ti], cols, 3, e);
                }
            }
            free(w); free(x); free(xa); free(ya); free(yb); free(yc); free(wq); free(wx);
        }
    }
    /* element-wise kernels over odd sizes */
    for (int n = 2; n <= 300; n += 37) {
        float *x = malloc(sizeof(float) * n), *w = malloc(sizeof(float) * n);
        float *a = malloc(sizeof(float) * n), *b = malloc(sizeof(float) * n);
        fill(x, n, 4.0f); fill(w, n, 1.0f);
        r->rmsnorm(a, x, w, n, 1e-5f); k->rmsnorm(b, x, w, n, 1e-5f);
        check(max_rel(b, a, n) < 1e-5, k->name, "rmsnorm", n, 0, max_rel(b, a, n));
        uint16_t *ha = malloc(2 * n), *hb = malloc(2 * n);
        r->f32_to_f16(ha, x, n); k->f32_to_f16(hb, x, n);
        check(memcmp(ha, hb, 2 * n) == 0, k->name, "f32_to_f16 bit-exact", n, 0, 0);
        memcpy(a, x, sizeof(float) * n); memcpy(b, x, sizeof(float) * n);
        r->swiglu(a, w, n); k->swiglu(b, w, n);
        check(max_rel(b, a, n) < 1e-5, k->name, "swiglu", n, 0, max_rel(b, a, n));
        free(x); free(w); free(a); free(b); free(ha); free(hb);
    }
    const int hds[] = {2, 6, 64, 128, 130};
    for (unsigned hi = 0; hi < sizeof hds / sizeof *hds; hi++) {
        const int hd = hds[hi], nh = 3;
        float inv[512], *a = malloc(sizeof(float) * nh * hd), *b = malloc(sizeof(float) * nh * hd);
        for (int i = 0; i < hd / 2; i++) inv[i] = powf(10000.0f, -2.0f * i / hd);
        fill(a, nh * hd, 2.0f); memcpy(b, a, sizeof(float) * nh * hd);
        r->rope(a, nh, hd, 12345, inv); k->rope(b, nh, hd, 12345, inv);
        check(memcmp(a, b, sizeof(float) * nh * hd) == 0, k->name, "rope bit-exact", hd, 0, max_rel(b, a, nh * hd));
        for (int n = 1; n <= 70; n += 23) {
            float *q = malloc(sizeof(float) * hd), *kv = malloc(sizeof(float) * n * hd), *sc = malloc(sizeof(float) * n);
            uint16_t *K = malloc(2 * n * hd), *V = malloc(2 * n * hd);
            fill(q, hd, 2.0f);
            fill(kv, (int64_t)n * hd, 2.0f); r->f32_to_f16(K, kv, (int64_t)n * hd);
            fill(kv, (int64_t)n * hd, 2.0f); r->f32_to_f16(V, kv, (int64_t)n * hd);
            r->attention(a, q, K, V, n, hd, 0.125f, sc); k->attention(b, q, K, V, n, hd, 0.125f, sc);
            check(max_rel(b, a, hd) < 1e-5, k->name, "attention", hd, n, max_rel(b, a, hd));
            free(q); free(kv); free(sc); free(K); free(V);
        }
        free(a); free(b);
    }
}

int main(void) {
    const char *names[] = {"scalar", "avx2", "avx512vnni", "neon", "neon-dotprod"};
    for (int i = 0; i < (int)(sizeof names / sizeof names[0]); i++) {
        const lc_kernels *k = lc_kernels_by_name(names[i]);
        if (!k) { printf("kernels %s: not available here\n", names[i]); continue; }
        printf("kernels %s\n", k->name);
        test_table(k);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
