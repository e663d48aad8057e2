/* One layer's causal GQA attention over the KV cache, as flash attention.
 *
 * A work unit is a run of query rows that share one kv head (the GQA group's heads of up
 * to LC_ATT_ROWS / group consecutive tokens of one sequence, each row with its own causal
 * limit pos + 1) against a range of cache positions. It walks the range in blocks of
 * LC_ATT_BLOCK positions: each block's K and V are converted to f32 rows once and the
 * kernel table's attn_block updates every row's online softmax (running max m,
 * sum l, unnormalized output O). So K/V are read once per group and run, not once per
 * query head and token, and no row of n_ctx scores is ever formed.
 *
 * The model's thread pool (threads.c) shares out the units, longest first. When the runs x kv heads
 * are fewer than twice the threads (decoding one token at depth), each unit's range is
 * also cut into pieces (flash-decoding) whose partial (m, l, O) are merged at the end:
 * softmax over the union = sum_s exp(m_s - M) O_s / sum_s exp(m_s - M) l_s, M = max m_s. */
#define _POSIX_C_SOURCE 200112L
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "attention.h"

int lc_kv_type_ok(int type, int head_dim) {
    if (type == LC_TYPE_F16) return 1;
    return (type == LC_TYPE_Q8_0 || type == LC_TYPE_Q4_0) && head_dim % QK == 0;
}

int lc_kv_rot(int type, int head_dim, int is_v) {
    if (type == LC_TYPE_F16 || head_dim % 64) return 0;
    if (is_v) return 64;
    int n = 64;
    while (head_dim % (2 * n) == 0) n *= 2;
    return n;
}

void lc_hadamard(float *x, int64_t n, int nrot) {
    const float scale = 1.0f / sqrtf((float)nrot);
    for (int64_t c = 0; c + nrot <= n; c += nrot) {
        float *v = x + c;
        for (int h = 1; h < nrot; h *= 2)
            for (int i = 0; i < nrot; i += 2 * h)
                for (int j = i; j < i + h; j++) {
                    const float a = v[j], b = v[j + h];
                    v[j] = a + b;
                    v[j + h] = a - b;
                }
        for (int i = 0; i < nrot; i++) v[i] *= scale;
    }
}

void lc_kv_store(const lc_kernels *k, int type, void *dst, const float *x, int n) {
    if (type == LC_TYPE_F16) k->f32_to_f16(dst, x, n);
    else lc_quantize_row_ref(type, x, dst, n);
}

static void prefetch(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i += 64) __builtin_prefetch(p + i);
}

static int group_rows(int n_heads, int n_kv_heads) {
    const int group = n_heads / n_kv_heads;
    return group >= LC_ATT_ROWS ? group : LC_ATT_ROWS / group * group;
}

/* one thread's scratch: Q rows, O rows, K block, V block, m, l, S, vis */
size_t lc_attention_scratch(int head_dim, int n_heads, int n_kv_heads) {
    const size_t rows = (size_t)group_rows(n_heads, n_kv_heads), hd = (size_t)head_dim;
    return 2 * rows * hd + 2 * (size_t)LC_ATT_BLOCK * hd + 3 * rows + LC_ATT_S(hd) + 16;
}

typedef struct {
    int t0, nt;     /* tokens [t0, t0 + nt) of one sequence */
    int h;          /* kv head */
    int kv0, kv1;   /* cache positions [kv0, kv1) */
    float *partial; /* NULL: write the normalized rows to out; else (m, l, O) of the rows */
} unit;


static void run_unit(const lc_attn *a, const unit *u, const float *q, const int32_t *seq, const int32_t *pos,
                     float *out, float *scratch) {
    const lc_kernels *k = a->k;
    const int hd = a->head_dim, group = a->n_heads / a->n_kv_heads, qd = a->n_heads * hd;
    const int nq = u->nt * group;
    float *Q = scratch, *O = Q + (size_t)nq * hd, *K = O + (size_t)nq * hd, *V = K + (size_t)LC_ATT_BLOCK * hd;
    float *m = V + (size_t)LC_ATT_BLOCK * hd, *l = m + nq, *S = l + nq;
    int *vis = (int *)(S + LC_ATT_S(hd));
    const float scale = 1.0f / sqrtf((float)hd);
    for (int t = 0; t < u->nt; t++)
        for (int g = 0; g < group; g++) {
            const float *src = q + (int64_t)(u->t0 + t) * qd + (int64_t)(u->h * group + g) * hd;
            float *dst = Q + (int64_t)(t * group + g) * hd;
            for (int i = 0; i < hd; i++) dst[i] = src[i] * scale;
        }
    for (int r = 0; r < nq; r++) m[r] = -INFINITY, l[r] = 0.0f;
    memset(O, 0, sizeof(float) * (size_t)nq * hd);
    const size_t head = ((size_t)seq[u->t0] * a->n_kv_heads + u->h) * a->n_ctx;
    const uint8_t *kc = a->kcache + head * a->row_k, *vc = a->vcache + head * a->row_v;
    int first = 1; /* the unit's first attn_block call */
    for (int b0 = u->kv0; b0 < u->kv1; b0 += LC_ATT_BLOCK) {
        const int nk = u->kv1 - b0 < LC_ATT_BLOCK ? u->kv1 - b0 : LC_ATT_BLOCK;
        int any = 0;
        for (int t = 0; t < u->nt; t++) {
            int v = pos[u->t0 + t] + 1 - b0;
            v = v < 0 ? 0 : v > nk ? nk : v;
            any |= v;
            for (int g = 0; g < group; g++) vis[t * group + g] = v;
        }
        if (!any) continue;
        /* the block's rows are contiguous in the cache: one conversion each for K and V */
        k->dequantize_row(a->type_k, kc + (size_t)b0 * a->row_k, K, (int64_t)nk * hd);
        k->dequantize_row(a->type_v, vc + (size_t)b0 * a->row_v, V, (int64_t)nk * hd);
        if (b0 + LC_ATT_BLOCK < u->kv1) { /* the next block's rows, while this one computes */
            const int nn = u->kv1 - b0 - LC_ATT_BLOCK < LC_ATT_BLOCK ? u->kv1 - b0 - LC_ATT_BLOCK : LC_ATT_BLOCK;
            prefetch(kc + (size_t)(b0 + LC_ATT_BLOCK) * a->row_k, (size_t)nn * a->row_k);
            prefetch(vc + (size_t)(b0 + LC_ATT_BLOCK) * a->row_v, (size_t)nn * a->row_v);
        }
        k->attn_block(nq, hd, Q, vis, K, V, nk, m, l, O, S, first);
        first = 0;
    }
    if (u->partial) {
        memcpy(u->partial, m, sizeof(float) * nq);
        memcpy(u->partial + nq, l, sizeof(float) * nq);
        memcpy(u->partial + 2 * nq, O, sizeof(float) * (size_t)nq * hd);
        return;
    }
    for (int t = 0; t < u->nt; t++)
        for (int g = 0; g < group; g++) {
            const int r = t * group + g;
            float *dst = out + (int64_t)(u->t0 + t) * qd + (int64_t)(u->h * group + g) * hd;
            const float inv = 1.0f / l[r]; /* l >= 1: every row sees position 0 */
            for (int i = 0; i < hd; i++) dst[i] = O[(int64_t)r * hd + i] * inv;
        }
}

/* the pieces u[0..n) of one run and head -> out (the softmax over all their positions) */
static void merge(const lc_attn *a, const unit *u, int n, float *out) {
    const int hd = a->head_dim, group = a->n_heads / a->n_kv_heads, qd = a->n_heads * hd, nq = u[0].nt * group;
    for (int r = 0; r < nq; r++) {
        float M = -INFINITY, L = 0.0f;
        for (int s = 0; s < n; s++) M = u[s].partial[r] > M ? u[s].partial[r] : M;
        float *dst = out + (int64_t)(u[0].t0 + r / group) * qd + (int64_t)(u[0].h * group + r % group) * hd;
        for (int i = 0; i < hd; i++) dst[i] = 0.0f;
        for (int s = 0; s < n; s++) {
            const float *p = u[s].partial;
            if (p[r] == -INFINITY) continue; /* a piece past this row's causal limit */
            const float w = expf(p[r] - M);
            L += w * p[nq + r];
            for (int i = 0; i < hd; i++) dst[i] += w * p[2 * nq + (int64_t)r * hd + i];
        }
        for (int i = 0; i < hd; i++) dst[i] /= L;
    }
}

/* one lc_attention call, for the pool's tasks */
typedef struct {
    const lc_attn *a;
    const unit *units;
    int split;
    const float *q;
    const int32_t *seq, *pos;
    float *out;
    size_t per_thread; /* floats of a thread's scratch */
} job;

static void unit_task(void *ctx, int i, int thread) {
    const job *j = ctx;
    run_unit(j->a, &j->units[i], j->q, j->seq, j->pos, j->out, j->a->scratch + (size_t)thread * j->per_thread);
}

/* the pieces of (run, head) b into out */
static void merge_task(void *ctx, int b, int thread) {
    const job *j = ctx;
    (void)thread;
    merge(j->a, &j->units[(size_t)b * j->split], j->split, j->out);
}

int lc_attention(const lc_attn *a, const float *q, const int32_t *seq, const int32_t *pos, int nt, float *out) {
    const int group = a->n_heads / a->n_kv_heads, run_max = group_rows(a->n_heads, a->n_kv_heads) / group;
    const int nkv = a->n_kv_heads, nth = lc_pool_threads(a->pool), hd = a->head_dim;
    /* runs of consecutive tokens of one sequence, latest first (the longest ranges first) */
    int n_runs = 0, longest = 0;
    int *runs = malloc(sizeof(int) * 2 * (size_t)nt);
    if (!runs) return -1;
    for (int t1 = nt; t1 > 0;) {
        int t0 = t1 - 1, kv1 = pos[t0] + 1;
        while (t0 > 0 && t1 - t0 < run_max && seq[t0 - 1] == seq[t1 - 1]) {
            t0--;
            kv1 = pos[t0] + 1 > kv1 ? pos[t0] + 1 : kv1;
        }
        runs[2 * n_runs] = t0;
        runs[2 * n_runs + 1] = t1 - t0;
        n_runs++;
        longest = kv1 > longest ? kv1 : longest;
        t1 = t0;
    }
    /* pieces per (run, head): enough units for every thread, each at least 4 blocks */
    const int base = n_runs * nkv;
    int split = 1;
    if (base < 2 * nth) {
        split = (4 * nth + base - 1) / base;
        const int most = (longest + 4 * LC_ATT_BLOCK - 1) / (4 * LC_ATT_BLOCK);
        split = split < most ? split : most;
        split = split < 1 ? 1 : split;
    }
    unit *units = malloc(sizeof(unit) * (size_t)base * split);
    float *partials = NULL;
    /* the runs partition the nt tokens: each piece of a run holds its rn rows' outputs, m and l */
    if (split > 1) partials = malloc(sizeof(float) * (size_t)nt * nkv * split * group * (hd + 2));
    if (!units || (split > 1 && !partials)) {
        free(runs); free(units); free(partials);
        return -1;
    }
    int n = 0;
    float *p = partials;
    for (int r = 0; r < n_runs; r++) {
        const int t0 = runs[2 * r], rn = runs[2 * r + 1];
        int kv1 = 0;
        for (int t = t0; t < t0 + rn; t++) kv1 = pos[t] + 1 > kv1 ? pos[t] + 1 : kv1;
        /* pieces of whole blocks */
        const int blocks = (kv1 + LC_ATT_BLOCK - 1) / LC_ATT_BLOCK;
        for (int h = 0; h < nkv; h++)
            for (int s = 0; s < split; s++) {
                unit *u = &units[n++];
                u->t0 = t0; u->nt = rn; u->h = h;
                u->kv0 = (int)((int64_t)blocks * s / split) * LC_ATT_BLOCK;
                u->kv1 = (int)((int64_t)blocks * (s + 1) / split) * LC_ATT_BLOCK;
                u->kv1 = u->kv1 < kv1 ? u->kv1 : kv1;
                u->partial = NULL;
                if (split > 1) {
                    u->partial = p;
                    p += (size_t)rn * group * (hd + 2);
                }
            }
    }
    job j = {a, units, split, q, seq, pos, out, lc_attention_scratch(hd, a->n_heads, nkv)};
    lc_parallel_for(a->pool, n, unit_task, &j);
    if (split > 1) lc_parallel_for(a->pool, base, merge_task, &j);
    free(runs); free(units); free(partials);
    return 0;
}
