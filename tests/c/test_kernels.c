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

/* Random valid blocks of a quantized type: random bytes (every bit pattern of the
 * quants and scales), the fp16 header fields set to finite scales of either sign. */
static void random_blocks(int type, uint8_t *w, int64_t nblocks) {
    const lc_type_info *t = lc_type_info_of(type);
    for (int64_t b = 0; b < nblocks; b++) {
        uint8_t *blk = w + b * t->block_bytes;
        for (int i = 0; i < t->block_bytes; i++) blk[i] = (uint8_t)((frand() + 1.0f) * 128.0f);
        for (int h = 0; h < t->n_hdr; h++) {
            const uint16_t d = lc_fp32_to_fp16(frand() * 0.05f + (frand() > 0 ? 1e-3f : -1e-3f));
            memcpy(blk + t->hdr[h], &d, 2);
        }
    }
}

/* Named tolerance for quantized matmuls: |simd - scalar| over the magnitudes the output
 * sums (sum |w| |x|, from the dequantized operands): summation order only gives ~1e-7,
 * a wrong element or block O(1e-2) or more. */
#define QTOL 2e-5

static double max_err_over_magnitude(const float *y, const float *ref, const float *wd, const float *xd,
                                     int rows, int64_t cols, int nt) {
    double worst = 0;
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < rows; r++) {
            double mag = 1e-30;
            for (int64_t c = 0; c < cols; c++) mag += fabs((double)wd[(int64_t)r * cols + c] * xd[(int64_t)t * cols + c]);
            worst = fmax(worst, fabs((double)y[t * rows + r] - ref[t * rows + r]) / mag);
        }
    return worst;
}

/* Every quantized type with kernels: the table's gemms (x8, and row-major where the type
 * has it) against the scalar ones, dequantize_row bit-exact, the x8 packing round trip,
 * row ranges (as threads split them) and a tile of 3 tokens. */
static void test_quantized(const lc_kernels *k) {
    const lc_kernels *r = &lc_kernels_scalar;
    for (int ti = 0; ti < LC_N_TYPES; ti++) {
        const lc_type_info *t = &lc_types[ti];
        if (!r->gemm_x8[ti]) continue;
        char what[64];
        for (int m = 1; m <= 3; m++) {
            const int64_t cols = t->block_elems == QK ? (int64_t)(2 * m - 1) * 5 * QK : (int64_t)m * t->block_elems;
            const int64_t nb = cols / t->block_elems, rb = lc_row_bytes(t->type, cols);
            for (int rows = 8; rows <= 16; rows += 8) for (int nt = 1; nt <= 7; nt += 3) {
                uint8_t *wq = malloc((size_t)rows * rb), *wx = malloc((size_t)rows * rb), back[LC_MAX_BLOCK_BYTES];
                float *x = malloc(sizeof(float) * nt * cols), *wd = malloc(sizeof(float) * rows * cols);
                float *xd = malloc(sizeof(float) * nt * cols), *wd2 = malloc(sizeof(float) * cols);
                float *ya = malloc(sizeof(float) * nt * rows), *yb = malloc(sizeof(float) * nt * rows);
                block_q8a *xa = malloc(sizeof(block_q8a) * nt * (cols / QK));
                random_blocks(t->type, wq, rows * nb);
                fill(x, nt * cols, 3.0f);
                for (int i = 0; i < nt; i++) r->quantize_act(x + i * cols, xa + i * (cols / QK), cols);
                for (int64_t j = 0; j < nt * cols; j++) {
                    const block_q8a *q = xa + j / QK;
                    xd[j] = q->qs[j % QK] * q->d[lc_q8a_group((int)(j % QK))];
                }
                int trip = 1, same = 1;
                for (int i = 0; i < rows; i++) {
                    r->dequantize_row(t->type, wq + i * rb, wd + i * cols, cols);
                    k->dequantize_row(t->type, wq + i * rb, wd2, cols);
                    same &= memcmp(wd + i * cols, wd2, sizeof(float) * cols) == 0;
                    for (int64_t b = 0; b < nb; b++) {
                        uint8_t *g = wx + ((int64_t)(i / 8) * nb + b) * 8 * t->block_bytes;
                        lc_x8_insert(t->type, g, i % 8, wq + i * rb + b * t->block_bytes);
                    }
                }
                for (int i = 0; i < rows; i++)
                    for (int64_t b = 0; b < nb; b++) {
                        lc_x8_extract(t->type, wx + ((int64_t)(i / 8) * nb + b) * 8 * t->block_bytes, i % 8, back);
                        trip &= memcmp(back, wq + i * rb + b * t->block_bytes, t->block_bytes) == 0;
                    }
                snprintf(what, sizeof what, "dequantize_row %s", t->name);
                check(same, k->name, what, (int)cols, 0, 0);
                snprintf(what, sizeof what, "x8 round trip %s", t->name);
                check(trip, "layout", what, rows, (int)cols, 0);
                r->gemm_x8[ti](wx, cols, xa, nt, ya, rows, 0, rows);
                if (t->row_major) {
                    r->gemm_rows[ti](wq, cols, xa, nt, yb, rows, 0, rows);
                    snprintf(what, sizeof what, "scalar gemm %s x8 == rows", t->name);
                    check(memcmp(ya, yb, sizeof(float) * nt * rows) == 0, "scalar", what, (int)cols, nt, 0);
                    k->gemm_rows[ti](wq, cols, xa, nt, yb, rows, 0, rows);
                    const double e = max_err_over_magnitude(yb, ya, wd, xd, rows, cols, nt);
                    snprintf(what, sizeof what, "gemm %s rows", t->name);
                    check(e < QTOL, k->name, what, (int)cols, nt, e);
                }
                for (int i = 0; i < nt * rows; i++) yb[i] = -1.0f;
                k->gemm_x8[ti](wx, cols, xa, nt, yb, rows, 8, rows); /* a row range, as threads split it */
                k->gemm_x8[ti](wx, cols, xa, nt, yb, rows, 0, 8);
                double e = max_err_over_magnitude(yb, ya, wd, xd, rows, cols, nt);
                snprintf(what, sizeof what, "gemm %s x8", t->name);
                check(e < QTOL, k->name, what, (int)cols, nt, e);
                if (nt > 3) { /* the first 3 tokens alone: a tile of 3 (nt 1 and 7 give 1, 4 and 3) */
                    for (int i = 0; i < nt * rows; i++) yb[i] = -1.0f;
                    k->gemm_x8[ti](wx, cols, xa, 3, yb, rows, 0, rows);
                    e = max_err_over_magnitude(yb, ya, wd, xd, rows, cols, 3);
                    check(e < QTOL, k->name, what, (int)cols, 3, e);
                }
                free(wq); free(wx); free(x); free(wd); free(xd); free(wd2); free(ya); free(yb); free(xa);
            }
        }
    }
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
            uint16_t *wh = malloc(2 * (size_t)rows * cols);
            r->f32_to_f16(wh, w, (int64_t)rows * cols);
            r->gemm_f16(wh, cols, x, nt, ya, rows, 0, rows);
            k->gemm_f16(wh, cols, x, nt, yb, rows, 0, rows);
            check(max_rel(yb, ya, (int64_t)nt * rows) < TOL, k->name, "gemm_f16", cols, nt, max_rel(yb, ya, (int64_t)nt * rows));
            r->gemm_f32(w, cols, x, nt, ya, rows, 0, rows);
            k->gemm_f32(w, cols, x, nt, yb, rows, 0, rows);
            check(max_rel(yb, ya, (int64_t)nt * rows) < TOL, k->name, "gemm_f32", cols, nt, max_rel(yb, ya, (int64_t)nt * rows));
            free(w); free(x); free(xa); free(xb); free(ya); free(yb); free(wh);
        }
    }
    test_quantized(k);
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
        /* attn_block: 1..300 rows with their own visible counts, two blocks in a row (the
         * online softmax's rescale), against the scalar twin; avx512amx's tiles (16 rows
         * and more) carry 16 significant bits (tests/test_attention.py) */
        const int nqs[] = {1, 5, 9, 16, 37, 80, 300}; /* 300 > LC_ATT_ROWS: query tiles made per block */
        const double att_tol = strcmp(k->name, "avx512amx") == 0 ? 1e-4 : 1e-5;
        for (unsigned qi = 0; qi < sizeof nqs / sizeof *nqs; qi++)
            for (int nk = 1; nk <= LC_ATT_BLOCK; nk += 21) {
                const int nq = nqs[qi];
                float *Q = malloc(sizeof(float) * nq * hd), *K = malloc(sizeof(float) * nk * hd);
                float *V = malloc(sizeof(float) * nk * hd), *S = malloc(sizeof(float) * LC_ATT_S(hd));
                float *O[2], m[2][300], l[2][300];
                int vis[300];
                for (int i = 0; i < nq; i++) vis[i] = (i * 7 + 3) % (nk + 1);
                vis[0] = nk;
                fill(Q, (int64_t)nq * hd, 0.3f);
                fill(K, (int64_t)nk * hd, 2.0f);
                fill(V, (int64_t)nk * hd, 2.0f);
                for (int t = 0; t < 2; t++) {
                    O[t] = calloc((size_t)nq * hd, sizeof(float));
                    for (int i = 0; i < nq; i++) m[t][i] = -INFINITY, l[t][i] = 0.0f;
                    const lc_kernels *kk = t ? k : r;
                    kk->attn_block(nq, hd, Q, vis, K, V, nk, m[t], l[t], O[t], S, 1);
                    for (int i = 0; i < nk * hd; i++) K[i] *= 2.0f; /* a second block, larger scores */
                    kk->attn_block(nq, hd, Q, vis, K, V, nk, m[t], l[t], O[t], S, 0);
                    for (int i = 0; i < nk * hd; i++) K[i] *= 0.5f;
                }
                double err = max_rel(l[1], l[0], nq);
                for (int i = 0; i < nq; i++) /* the running maxima: -inf for rows that saw nothing */
                    if (m[0][i] != m[1][i]) err = fmax(err, fabs((double)m[1][i] - m[0][i]) / fmax(fabs((double)m[0][i]), 1.0));
                for (int i = 0; i < nq; i++)
                    for (int d = 0; d < hd; d++) O[1][i * hd + d] /= l[1][i] > 0 ? l[1][i] : 1, O[0][i * hd + d] /= l[0][i] > 0 ? l[0][i] : 1;
                const double eo = max_rel(O[1], O[0], (int64_t)nq * hd);
                err = eo > err ? eo : err;
                check(err < att_tol, k->name, "attn_block", hd, nq * 100 + nk, err);
                free(Q); free(K); free(V); free(S); free(O[0]); free(O[1]);
            }
        free(a); free(b);
    }
}

int main(void) {
    const char *names[] = {"scalar", "avx2", "avx512vnni", "avx512amx", "neon", "neon-dotprod"};
    for (int i = 0; i < (int)(sizeof names / sizeof names[0]); i++) {
        const lc_kernels *k = lc_kernels_by_name(names[i]);
        if (!k) { printf("kernels %s: not available here\n", names[i]); continue; }
        printf("kernels %s\n", k->name);
        test_table(k);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
