/* Weight quantizers: ggml's quantize_row_*_ref, ported line for line so that files
 * come out byte-identical to llama-quantize's (no importance matrix), and llamacpu's
 * Q6_0. Scalar and deterministic: these write model files. Compiled with
 * -ffp-contract=off (setup.py), as every float operation here must round as written. */
#include <math.h>
#include <float.h>
#include "llamacpu.h"

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

static void quantize_row_q4_0_ref(const float *x, block_q4_0 *y, int64_t n) {
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

static void quantize_row_q4_1_ref(const float *x, block_q4_1 *y, int64_t n) {
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

static void quantize_row_q8_0_ref(const float *x, block_q8_0 *y, int64_t n) {
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
static void quantize_row_q6_0_ref(const float *x, block_q6_0 *y, int64_t n) {
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

int lc_quantize_row_ref(int type, const float *x, void *y, int64_t n) {
    switch (type) {
    case LC_TYPE_Q4_0: quantize_row_q4_0_ref(x, y, n); return 0;
    case LC_TYPE_Q4_1: quantize_row_q4_1_ref(x, y, n); return 0;
    case LC_TYPE_Q8_0: quantize_row_q8_0_ref(x, y, n); return 0;
    case LC_TYPE_Q6_0: quantize_row_q6_0_ref(x, y, n); return 0;
    default: return -1;
    }
}
