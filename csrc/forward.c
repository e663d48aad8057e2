/* The Llama forward pass over a chunk of tokens, with a KV cache of F16, Q8_0 or Q4_0 rows.
 *
 *   x = embed(tokens)                                   (n, dim)
 *   per layer:
 *     h = rmsnorm(x) ; q, k, v = h Wq^T, h Wk^T, h Wv^T  (n, heads*hd) (n, kv*hd) x2
 *     rope(q, k) ; cache[k, v] at positions pos..pos+n-1
 *     a = causal GQA attention(q, cache)                 (n, heads*hd)
 *     x += a Wo^T
 *     h = rmsnorm(x) ; x += (silu(h W1^T) * (h W3^T)) W2^T
 *   logits = rmsnorm(x) Wout^T                           (n or 1, vocab)
 *
 * Matmuls with quantized weights take activations quantized once per row
 * (block_q8a); several tokens share each weight load (kernels' gemm tiles).
 * Threads: the model's pool (threads.c) over chunks of weight rows (matmuls), over the
 * tokens of a prefill (the per-token steps), and over attention's work units (attention.c:
 * runs of tokens x kv heads, and ranges of positions when those are few). */
#define _POSIX_C_SOURCE 200112L /* posix_memalign under -std=c11 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "llamacpu.h"
#include "attention.h"

struct lc_model {
    lc_config c;
    lc_weights w;
    const lc_kernels *k;
    int q_dim, kv_dim;
    uint8_t *kcache, *vcache; /* (n_layers, n_seq, n_kv_heads, n_ctx) rows of row_k / row_v bytes */
    size_t row_k, row_v;      /* one position's head_dim values in type_k / type_v */
    /* scratch for up to n_batch tokens */
    float *x;      /* (B, dim) residual stream */
    float *xb;     /* (B, max(dim, q_dim)) normed input; attention output */
    float *q;      /* (B, q_dim) */
    float *kb, *vb; /* (B, kv_dim) */
    float *hb, *hb2; /* (B, hidden_dim) */
    float *proj;   /* (B, dim) */
    block_q8a *xq; /* (B, max(dim, q_dim, hidden_dim) / 32) */
    float *res;    /* (B, dim) residual of the 8-bit activations, for wv */
    block_q8a *xq2; /* (B, dim / 32) that residual, quantized */
    float *vb2;    /* (B, kv_dim) */
    float *att;    /* (n_scratch_threads, lc_attention_scratch) attention's blocks */
    int n_scratch_threads;
    /* AMX prefill (kernel tables with gemm_amx): a chunk of >= LC_AMX_MIN_TOKENS tokens takes
     * its matmul inputs as bf16 (xbf) instead of q8a, and each thread dequantizes W's panels
     * into its amx scratch */
    int amx;        /* this chunk uses gemm_amx */
    int amx_i8;     /* this chunk (a few tokens) uses gemm_amx_i8 where W's type has it */
    block_q16a *xq16; /* (B, widest / 32) the activations of gemm_amx_i8 */
    uint16_t *xbf;  /* LC_AMX_ACT(B, widest): the activations in AMX tiles */
    uint8_t *amx_scratch; /* (n_scratch_threads, LC_AMX_SCRATCH(widest)) */
    float *zeros;   /* (widest,) zeros: the padding tokens' activations */
    int64_t widest;
    lc_pool *pool;  /* n_threads threads (the caller's and n_threads - 1 workers) */
};

static void *xalloc(size_t n) {
    void *p = NULL;
    if (n == 0) n = 64;
    if (posix_memalign(&p, 64, (n + 63) / 64 * 64) != 0) return NULL;
    return p;
}

void lc_model_free(lc_model *m) {
    if (!m) return;
    lc_pool_free(m->pool);
    free(m->w.layers);
    free((void *)m->w.inv_freq);
    free(m->kcache); free(m->vcache);
    free(m->x); free(m->xb); free(m->q); free(m->kb); free(m->vb);
    free(m->hb); free(m->hb2); free(m->proj); free(m->xq); free(m->att);
    free(m->res); free(m->xq2); free(m->xq16); free(m->vb2); free(m->xbf); free(m->amx_scratch); free(m->zeros);
    free(m);
}

/* the per-thread scratch: attention's blocks, and the AMX panels */
static int alloc_att(lc_model *m, int threads) {
    if (threads <= m->n_scratch_threads) return 0;
    float *a = xalloc((size_t)threads * lc_attention_scratch(m->c.head_dim, m->c.n_heads, m->c.n_kv_heads) * sizeof(float));
    uint8_t *s = m->k->gemm_amx ? xalloc((size_t)threads * LC_AMX_SCRATCH(m->widest)) : NULL;
    if (!a || (m->k->gemm_amx && !s)) {
        free(a);
        free(s);
        return -1;
    }
    free(m->att);
    free(m->amx_scratch);
    m->att = a;
    m->amx_scratch = s;
    m->n_scratch_threads = threads;
    return 0;
}

/* the kernel table has a matmul for the tensor's (type, layout), and its shape suits it */
static int tensor_ok(const lc_kernels *k, const lc_tensor *t) {
    const lc_type_info *ti = lc_type_info_of(t->type);
    const lc_gemm g = lc_gemm_of(k, t->type, t->layout);
    return ti && (g.q || g.f) && t->cols % ti->block_elems == 0 && (t->layout != LC_LAYOUT_X8 || t->rows % 8 == 0);
}

/* The bytes of every buffer lc_model_new allocates: one place for lc_model_new and
 * lc_model_bytes. */
typedef struct {
    size_t cache_k, cache_v;      /* kcache, vcache */
    size_t x, xb, q, kv, hid;     /* x proj res; xb; q; kb vb vb2; hb hb2 */
    size_t xq, xq2, xq16, xbf, zeros;
    size_t att, amx_panel;        /* per thread */
    int64_t widest;
} lc_sizes;

static lc_sizes sizes_of(const lc_config *c, const lc_kernels *k) {
    lc_sizes z;
    const size_t B = (size_t)c->n_batch, qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    const size_t wide = (size_t)c->dim > qd ? (size_t)c->dim : qd;
    const size_t widest = wide > (size_t)c->hidden_dim ? wide : (size_t)c->hidden_dim;
    const size_t rows = (size_t)c->n_layers * c->n_seq * c->n_kv_heads * c->n_ctx;
    z.cache_k = rows * (size_t)lc_row_bytes(c->type_k, c->head_dim);
    z.cache_v = rows * (size_t)lc_row_bytes(c->type_v, c->head_dim);
    z.x = B * c->dim * 4;
    z.xb = B * wide * 4;
    z.q = B * qd * 4;
    z.kv = B * kvd * 4;
    z.hid = B * c->hidden_dim * 4;
    z.xq = B * (widest / QK + 1) * sizeof(block_q8a);
    z.xq2 = B * (c->dim / QK + 1) * sizeof(block_q8a);
    z.xq16 = k->quantize_act16 ? B * (widest / QK + 1) * sizeof(block_q16a) : 0;
    z.xbf = k->gemm_amx ? LC_AMX_ACT(B, widest) * 2 : 0;
    z.zeros = k->gemm_amx ? widest * sizeof(float) : 0;
    z.att = lc_attention_scratch(c->head_dim, c->n_heads, c->n_kv_heads) * sizeof(float);
    z.amx_panel = k->gemm_amx ? LC_AMX_SCRATCH(widest) : 0;
    z.widest = (int64_t)widest;
    return z;
}

static int config_ok(const lc_config *c) {
    return c->dim > 0 && c->hidden_dim > 0 && c->n_layers > 0 && c->n_heads > 0 && c->n_kv_heads > 0 &&
           c->head_dim > 0 && c->head_dim % 2 == 0 && c->head_dim <= 1024 && c->n_heads % c->n_kv_heads == 0 &&
           c->vocab_size > 0 && c->n_ctx > 0 && c->n_seq > 0 && c->n_batch > 0 && c->n_threads > 0 &&
           lc_kv_type_ok(c->type_k, c->head_dim) && lc_kv_type_ok(c->type_v, c->head_dim);
}

int64_t lc_model_bytes(const lc_config *cfg, const lc_kernels *k, int64_t *per_thread) {
    if (!config_ok(cfg)) return -1;
    if (!k) k = lc_kernels_best();
    const lc_sizes z = sizes_of(cfg, k);
    const int64_t thread = (int64_t)(z.att + z.amx_panel);
    if (per_thread) *per_thread = thread;
    return (int64_t)(z.cache_k + z.cache_v + 3 * z.x + z.xb + z.q + 3 * z.kv + 2 * z.hid + z.xq + z.xq2 + z.xq16 + z.xbf + z.zeros) +
           cfg->n_threads * thread;
}

lc_model *lc_model_new(const lc_config *cfg, const lc_weights *w, const lc_kernels *k, char *err, size_t errlen) {
    const lc_config c = *cfg;
    if (!config_ok(&c)) {
        if (!lc_kv_type_ok(c.type_k, c.head_dim) || !lc_kv_type_ok(c.type_v, c.head_dim))
            snprintf(err, errlen, "KV cache types must be F16, Q8_0 or Q4_0, and Q8_0/Q4_0 need a head_dim that is a "
                     "multiple of 32 (head_dim %d)", c.head_dim);
        else snprintf(err, errlen, "invalid engine configuration");
        return NULL;
    }
    if (!k) k = lc_kernels_best();
    int ok = tensor_ok(k, &w->tok_embeddings) && tensor_ok(k, &w->output);
    for (int l = 0; l < c.n_layers && ok; l++) {
        const lc_layer_weights *L = &w->layers[l];
        ok = tensor_ok(k, &L->wq) && tensor_ok(k, &L->wk) && tensor_ok(k, &L->wv) && tensor_ok(k, &L->wo) &&
             tensor_ok(k, &L->w1) && tensor_ok(k, &L->w2) && tensor_ok(k, &L->w3);
    }
    if (!ok) {
        snprintf(err, errlen, "a tensor's type and layout have no kernel in the %s table (or its shape does not "
                 "fit its blocks)", k->name);
        return NULL;
    }
    lc_model *m = calloc(1, sizeof(*m));
    if (!m) { snprintf(err, errlen, "out of memory"); return NULL; }
    m->c = c;
    m->w = *w;
    m->k = k;
    m->q_dim = c.n_heads * c.head_dim;
    m->kv_dim = c.n_kv_heads * c.head_dim;
    m->w.layers = malloc(sizeof(lc_layer_weights) * c.n_layers);
    float *inv = malloc(sizeof(float) * (c.head_dim / 2));
    if (m->w.layers && inv) {
        memcpy(m->w.layers, w->layers, sizeof(lc_layer_weights) * c.n_layers);
        memcpy(inv, w->inv_freq, sizeof(float) * (c.head_dim / 2));
    }
    m->w.inv_freq = inv;

    const lc_sizes z = sizes_of(&c, k);
    /* calloc: large blocks come zeroed from the OS, untouched pages cost no RSS or time
     * (a sequence slot's cache costs memory only as far as its positions are written) */
    m->kcache = calloc(z.cache_k, 1);
    m->vcache = calloc(z.cache_v, 1);
    m->row_k = (size_t)lc_row_bytes(c.type_k, c.head_dim);
    m->row_v = (size_t)lc_row_bytes(c.type_v, c.head_dim);
    m->x = xalloc(z.x);
    m->xb = xalloc(z.xb);
    m->q = xalloc(z.q);
    m->kb = xalloc(z.kv);
    m->vb = xalloc(z.kv);
    m->hb = xalloc(z.hid);
    m->hb2 = xalloc(z.hid);
    m->proj = xalloc(z.x);
    m->xq = xalloc(z.xq);
    m->res = xalloc(z.x);
    m->xq2 = xalloc(z.xq2);
    m->vb2 = xalloc(z.kv);
    m->widest = z.widest;
    if (k->gemm_amx) {
        m->xbf = xalloc(z.xbf);
        m->zeros = calloc(z.zeros, 1);
    }
    if (k->quantize_act16) m->xq16 = xalloc(z.xq16);
    if (!m->w.layers || !inv || !m->kcache || !m->vcache || !m->x || !m->xb || !m->q || !m->kb || !m->vb ||
        !m->hb || !m->hb2 || !m->proj || !m->xq || !m->res || !m->xq2 || !m->vb2 || (k->gemm_amx && (!m->xbf || !m->zeros)) || (k->quantize_act16 && !m->xq16) ||
        alloc_att(m, c.n_threads) != 0 || !(m->pool = lc_pool_new(c.n_threads))) {
        snprintf(err, errlen, "out of memory allocating the KV cache (%.1f MiB) and buffers",
                 (z.cache_k + z.cache_v) / (1024.0 * 1024.0));
        lc_model_free(m);
        return NULL;
    }
    return m;
}

const lc_kernels *lc_model_kernels(const lc_model *m) { return m->k; }

void lc_model_set_threads(lc_model *m, int n_threads) {
    if (n_threads < 1) n_threads = 1;
    if (n_threads == m->c.n_threads || alloc_att(m, n_threads) != 0) return;
    lc_pool *p = lc_pool_new(n_threads);
    if (!p) return;
    lc_pool_free(m->pool);
    m->pool = p;
    m->c.n_threads = n_threads;
}

/* One matmul of a group: Y (nt, W.rows) [row stride ldy] = X W^T, X given as
 * float (xf) and, for quantized W, as q8a blocks (xq). */
typedef struct {
    const lc_tensor *W;
    const float *xf;
    const block_q8a *xq;
    const block_q16a *xq16; /* the same activations for gemm_amx_i8 (int8 AMX chunks), or NULL */
    float *Y;
    int64_t ldy;
    /* AMX chunks: the bf16 terms of the activations used (lc_kernels.gemm_amx): 2 (16
     * significant bits) for q/k/v, whose inputs move SmolLM2's logits most (the attention
     * sink's massive activations), 1 elsewhere. Both terms everywhere cost ~25% of pp512
     * for min logit cosine 0.9997 instead of 0.9990-0.9993 (docs/ARCHITECTURE.md). */
    int amx_terms;
} lc_mm;

/* Up to 4 independent matmuls over the same tokens in one lc_parallel_for: their
 * rows are cut into chunks (multiples of 8 rows, the x8 groups; about 8 a thread)
 * and the threads claim chunks of all of them, so q/k/v and w1/w3 cost one call
 * instead of three and two. Chunks are claimed one at a time: on a shared machine
 * one thread may run slower or not at all (another process on its core), and the
 * others take its share (pp512, 2 threads: 131-141 t/s static, 146-149 dynamic,
 * BENCHMARKS.md).
 * AMX chunks have at least LC_AMX_CHUNK_ROWS rows: gemm_amx_type brings each K-block
 * of the activations into L2 once per chunk and reuses it for every 32-row panel of
 * the chunk, so small chunks (16 threads cut a 2048-row matrix into single panels)
 * read the activations from L3 over and over (pp512 -22 to -24%, BENCHMARKS.md). Where that
 * leaves fewer than LC_AMX_UNITS units a thread, the tokens are cut into slices too
 * (multiples of 32, at least 64): a slice dequantizes its chunk's weights again but
 * reads only its own tokens. The sums are the same, bit for bit, however it is cut. */
#define LC_AMX_CHUNK_ROWS 512
#define LC_AMX_UNITS 4
typedef struct {
    lc_model *m;
    const lc_mm *mm;
    int nt;
    int64_t chunk[4];
    int slices[4]; /* token slices of each chunk (1 except on gemm_amx) */
    int first[5];
} mm_job;

/* W's int8 AMX gemm (x8 layout) in this table, or NULL */
static lc_gemm_q16a amx_i8_gemm(const lc_model *m, const lc_tensor *W) {
    const int i = lc_type_index(W->type);
    return W->layout == LC_LAYOUT_X8 && i >= 0 ? m->k->gemm_amx_i8[i] : NULL;
}

/* The SIMD gemms run each group of 8 rows over every token of the call while the
 * group's weights sit in L1; a chunk of 512 tokens, though, is 2 bytes per activation
 * (block_q8a) times the width: 2 MB for a 2048-wide matrix, 8 MB for ffn_down, read
 * again for every group of 8 rows from L3. The non-AMX matmuls therefore go in token
 * blocks of about LC_X_BLOCK_BYTES of activations, which stay in L2 while the chunk's
 * weights stream past them once per block. Blocks are multiples of 24 tokens, so the
 * tables' token tiles (4, 6 or 8) fall where they fall without blocks: the sums are the
 * same, bit for bit. */
#ifndef LC_X_BLOCK_BYTES
#define LC_X_BLOCK_BYTES (256 * 1024)
#endif
static int token_block(int64_t bytes_per_token) {
    const int64_t n = LC_X_BLOCK_BYTES / bytes_per_token / 24 * 24;
    return n < 24 ? 24 : n > (1 << 20) ? 1 << 20 : (int)n;
}

static void mm_unit(void *ctx, int ci, int thread) {
    const mm_job *j = ctx;
    const lc_model *m = j->m;
    const lc_kernels *k = m->k;
    int i = 0;
    while (ci >= j->first[i + 1]) i++;
    const lc_mm *mm = &j->mm[i];
    const lc_tensor *W = mm->W;
    const int64_t rows = W->rows;
    const int u = ci - j->first[i], ns = j->slices[i];
    const int64_t r0 = (int64_t)(u / ns) * j->chunk[i], r1 = r0 + j->chunk[i] < rows ? r0 + j->chunk[i] : rows;
    const lc_gemm g = lc_gemm_of(k, W->type, W->layout); /* checked in lc_model_new */
    lc_gemm_q16a gi;
    if (g.q && m->amx) { /* x8 layout: every quantized tensor with rows % 8 == 0 */
        const int per = (j->nt + 32 * ns - 1) / (32 * ns) * 32, t0 = (u % ns) * per;
        const int t1 = t0 + per < j->nt ? t0 + per : j->nt;
        if (t1 > t0) /* m->xbf: tiles of 16 tokens, W->cols / 32 pieces of 1024 bf16 each */
            k->gemm_amx(W->type, mm->amx_terms, W->data, W->cols, m->xbf + (int64_t)(t0 / 16) * (W->cols / QK) * 1024,
                        t1 - t0, mm->Y + (int64_t)t0 * mm->ldy, mm->ldy, r0, r1,
                        m->amx_scratch + (size_t)thread * LC_AMX_SCRATCH(m->widest));
    }
    else if (g.q && m->amx_i8 && mm->xq16 && (gi = amx_i8_gemm(m, W)) != NULL)
        gi(W->data, W->cols, mm->xq16, j->nt, mm->Y, mm->ldy, r0, r1);
    else {
        const int64_t xrow = g.q ? W->cols / QK : W->cols; /* X's elements per token */
        const int tb = token_block(g.q ? xrow * (int64_t)sizeof(block_q8a) : xrow * (int64_t)sizeof(float));
        for (int t0 = 0; t0 < j->nt; t0 += tb) {
            const int n = j->nt - t0 < tb ? j->nt - t0 : tb;
            float *Y = mm->Y + (int64_t)t0 * mm->ldy;
            if (g.q) g.q(W->data, W->cols, mm->xq + t0 * xrow, n, Y, mm->ldy, r0, r1);
            else g.f(W->data, W->cols, mm->xf + t0 * xrow, n, Y, mm->ldy, r0, r1);
        }
    }
}

static void matmuls(lc_model *m, const lc_mm *mm, int n, int nt) {
    const int nth = m->c.n_threads;
    mm_job j = {m, mm, nt, {0}, {0}, {0}};
    const int64_t unit = m->amx ? 32 : m->amx_i8 ? 16 : 8; /* AMX panels are 32 rows; int8 tiles 16; x8 groups 8 */
    int64_t chunks = 0;
    for (int i = 0; i < n; i++) {
        const int64_t rows = mm[i].W->rows;
        int64_t c = (rows + (int64_t)nth * 8 - 1) / ((int64_t)nth * 8);
        c = (c + unit - 1) / unit * unit;
        if (m->amx && c < LC_AMX_CHUNK_ROWS) c = LC_AMX_CHUNK_ROWS;
        j.chunk[i] = c < unit ? unit : c;
        chunks += (rows + j.chunk[i] - 1) / j.chunk[i];
    }
    int slices = 1;
    if (m->amx)
        while (chunks * slices < (int64_t)LC_AMX_UNITS * nth && nt >= 128 * slices) slices *= 2;
    for (int i = 0; i < n; i++) {
        j.slices[i] = m->amx && lc_gemm_of(m->k, mm[i].W->type, mm[i].W->layout).q ? slices : 1;
        j.first[i + 1] = j.first[i] + (int)((mm[i].W->rows + j.chunk[i] - 1) / j.chunk[i]) * j.slices[i];
    }
    lc_parallel_for(m->pool, j.first[n], mm_unit, &j);
}

static void matmul(lc_model *m, const lc_tensor *W, const float *xf, const block_q8a *xq, int nt, float *Y, int64_t ldy) {
    const lc_mm mm = {W, xf, xq, m->xq16, Y, ldy, 1};
    matmuls(m, &mm, 1, nt);
}

/* Row `row` of the embedding table -> out (cols floats), in either layout. */
static void embed_row(const lc_model *m, const lc_tensor *E, int64_t row, float *out) {
    if (E->layout != LC_LAYOUT_X8) {
        m->k->dequantize_row(E->type, (const char *)E->data + row * lc_row_bytes(E->type, E->cols), out, E->cols);
        return;
    }
    const lc_type_info *ti = lc_type_info_of(E->type);
    const int64_t nb = E->cols / ti->block_elems, bs = ti->block_bytes;
    const uint8_t *group = (const uint8_t *)E->data + (row / 8) * nb * 8 * bs;
    uint8_t blk[LC_MAX_BLOCK_BYTES];
    for (int64_t b = 0; b < nb; b++) { /* gather the row's blocks, then the usual dequantizer */
        lc_x8_extract(E->type, group + b * 8 * bs, (int)(row % 8), blk);
        m->k->dequantize_row(E->type, blk, out + b * ti->block_elems, ti->block_elems);
    }
}

/* What the per-token steps of a chunk read: each runs as lc_parallel_for units, one per
 * token (a single token runs on the calling thread). */
typedef struct {
    lc_model *m;
    const lc_layer_weights *L;
    const float *x; /* quantize_rows: the rows */
    int cols, nt, l, vres;
    const int32_t *seq, *pos;
} tok_job;

static void amx_unit(void *ctx, int t, int thread) {
    const tok_job *j = ctx;
    const lc_model *m = j->m; /* tokens after nt: zero */
    m->k->act_to_amx(m->xbf, t < j->nt ? j->x + (int64_t)t * j->cols : m->zeros, j->cols, t);
}

static void q8a_unit(void *ctx, int t, int thread) {
    const tok_job *j = ctx;
    const lc_model *m = j->m;
    m->k->quantize_act(j->x + (int64_t)t * j->cols, m->xq + t * (j->cols / QK), j->cols);
    if (m->amx_i8) m->k->quantize_act16(j->x + (int64_t)t * j->cols, m->xq16 + t * (j->cols / QK), j->cols);
}

/* Quantize nt rows of `cols` floats to q8a (when any consumer needs it), and for an int8
 * AMX chunk to q16a too; for a bf16 AMX chunk, to bf16 in xbf, zero rows after them up to
 * a multiple of 32 (gemm_amx's tiles). */
static void quantize_rows(lc_model *m, const float *x, int nt, int cols, int needed) {
    if (!needed) return;
    tok_job j = {.m = m, .x = x, .cols = cols, .nt = nt};
    if (m->amx) lc_parallel_for(m->pool, (nt + 31) / 32 * 32, amx_unit, &j);
    else lc_parallel_for(m->pool, nt, q8a_unit, &j);
}

/* V gets a second pass over the rounding error of its 8-bit input: with it, wv
 * sees x to about 16 bits. Measured on SmolLM2-135M (tests/test_engine.py): the
 * values of the attention-sink token are small and every later position reads
 * them, so an 8-bit V costs more accuracy than all other matmuls together,
 * while wv is under 2% of the weights of Llama 3.2 1B. This quantizes that
 * rounding error (xq2); the second wv pass runs in the q/k/v matmul group. */
static void value_residual_unit(void *ctx, int t, int thread) {
    const lc_model *m = ((const tok_job *)ctx)->m;
    const int dim = m->c.dim;
    const int64_t nb = dim / QK;
    const float *x = m->xb + (int64_t)t * dim;
    float *r = m->res + (int64_t)t * dim;
    for (int64_t b = 0; b < nb; b++) {
        const block_q8a *q = m->xq + t * nb + b;
        for (int j = 0; j < QK; j++) r[b * QK + j] = x[b * QK + j] - q->qs[j] * q->d[lc_q8a_group(j)];
    }
    m->k->quantize_act(r, m->xq2 + t * nb, dim);
}

/* The first cache row of layer l, sequence seq, kv head h (n_ctx rows follow it) */
static size_t cache_row(const lc_model *m, int l, int seq, int h) {
    const lc_config *c = &m->c;
    return (((size_t)l * c->n_seq + seq) * c->n_kv_heads + h) * c->n_ctx;
}

static void attention_norm_unit(void *ctx, int t, int thread) {
    const tok_job *j = ctx;
    const lc_model *m = j->m;
    const int dim = m->c.dim;
    m->k->rmsnorm(m->xb + (int64_t)t * dim, m->x + (int64_t)t * dim, j->L->attention_norm, dim, m->c.norm_eps);
}

/* v += its residual pass; rope q and k; k and v into the cache */
static void rope_cache_unit(void *ctx, int t, int thread) {
    const tok_job *j = ctx;
    const lc_model *m = j->m;
    const lc_config *c = &m->c;
    const int hd = c->head_dim, qd = m->q_dim, kvd = m->kv_dim, pos = j->pos[t];
    if (j->vres)
        for (int64_t i = (int64_t)t * kvd; i < (int64_t)(t + 1) * kvd; i++) m->vb[i] += m->vb2[i];
    m->k->rope(m->q + (int64_t)t * qd, c->n_heads, hd, pos, m->w.inv_freq);
    m->k->rope(m->kb + (int64_t)t * kvd, c->n_kv_heads, hd, pos, m->w.inv_freq);
    const int rk = lc_kv_rot(c->type_k, hd, 0), rv = lc_kv_rot(c->type_v, hd, 1);
    if (rk) { /* quantized caches hold K and V rotated (attention.h) */
        lc_hadamard(m->q + (int64_t)t * qd, qd, rk);
        lc_hadamard(m->kb + (int64_t)t * kvd, kvd, rk);
    }
    if (rv) lc_hadamard(m->vb + (int64_t)t * kvd, kvd, rv);
    for (int h = 0; h < c->n_kv_heads; h++) {
        const size_t row = cache_row(m, j->l, j->seq[t], h) + (size_t)pos;
        lc_kv_store(m->k, c->type_k, m->kcache + row * m->row_k, m->kb + (int64_t)t * kvd + h * hd, hd);
        lc_kv_store(m->k, c->type_v, m->vcache + row * m->row_v, m->vb + (int64_t)t * kvd + h * hd, hd);
    }
}

/* the attention's output rotated back, for a cache that holds V rotated */
static void unrotate_unit(void *ctx, int t, int thread) {
    const lc_model *m = ((const tok_job *)ctx)->m;
    lc_hadamard(m->xb + (int64_t)t * m->q_dim, m->q_dim, lc_kv_rot(m->c.type_v, m->c.head_dim, 1));
}

/* x += the attention's projection; the feed-forward's norm */
static void ffn_norm_unit(void *ctx, int t, int thread) {
    const tok_job *j = ctx;
    const lc_model *m = j->m;
    const int dim = m->c.dim;
    float *x = m->x + (int64_t)t * dim;
    const float *p = m->proj + (int64_t)t * dim;
    for (int i = 0; i < dim; i++) x[i] += p[i];
    m->k->rmsnorm(m->xb + (int64_t)t * dim, x, j->L->ffn_norm, dim, m->c.norm_eps);
}

static void swiglu_unit(void *ctx, int t, int thread) {
    const lc_model *m = ((const tok_job *)ctx)->m;
    const int64_t hid = m->c.hidden_dim;
    m->k->swiglu(m->hb + t * hid, m->hb2 + t * hid, hid);
}

static void residual_unit(void *ctx, int t, int thread) {
    const lc_model *m = ((const tok_job *)ctx)->m;
    const int64_t dim = m->c.dim;
    for (int64_t i = t * dim; i < (t + 1) * dim; i++) m->x[i] += m->proj[i];
}

/* One chunk of a batch: token t of sequence seq[t] at position pos[t]; the logits of
 * the tokens with want[t] go to consecutive rows of `logits`. */
static int forward_chunk(lc_model *m, const int32_t *tokens, const int32_t *seq, const int32_t *pos,
                          const int8_t *want, int nt, float *logits) {
    const lc_config *c = &m->c;
    const lc_kernels *k = m->k;
    const int dim = c->dim, qd = m->q_dim, kvd = m->kv_dim, hid = c->hidden_dim;

    for (int t = 0; t < nt; t++) embed_row(m, &m->w.tok_embeddings, tokens[t], m->x + (int64_t)t * dim);
    m->amx = k->gemm_amx != NULL && nt >= LC_AMX_MIN_TOKENS;
    m->amx_i8 = k->quantize_act16 != NULL && !m->amx && nt >= LC_AMX_I8_MIN_TOKENS;

    for (int l = 0; l < c->n_layers; l++) {
        const lc_layer_weights *L = &m->w.layers[l];

        /* attention block; the per-token steps run in parallel over the tokens of a prefill
         * (one token: on this thread) */
        tok_job tj = {.m = m, .L = L, .nt = nt, .l = l, .seq = seq, .pos = pos};
        lc_parallel_for(m->pool, nt, attention_norm_unit, &tj);
        quantize_rows(m, m->xb, nt, dim, lc_is_quantized(L->wq.type) || lc_is_quantized(L->wk.type) || lc_is_quantized(L->wv.type));
        /* bf16 or 16-bit int8-tile inputs: no 8-bit rounding to undo */
        const int vres = lc_is_quantized(L->wv.type) && !m->amx && !(m->amx_i8 && amx_i8_gemm(m, &L->wv));
        if (vres) lc_parallel_for(m->pool, nt, value_residual_unit, &tj);
        const lc_mm qkv[4] = {{&L->wq, m->xb, m->xq, m->xq16, m->q, qd, 2}, {&L->wk, m->xb, m->xq, m->xq16, m->kb, kvd, 2},
                              {&L->wv, m->xb, m->xq, m->xq16, m->vb, kvd, 2}, {&L->wv, NULL, m->xq2, NULL, m->vb2, kvd, 2}};
        matmuls(m, qkv, vres ? 4 : 3, nt);
        tj.vres = vres;
        lc_parallel_for(m->pool, nt, rope_cache_unit, &tj);
        const size_t layer = cache_row(m, l, 0, 0);
        const lc_attn att = {k, m->pool, c->n_heads, c->n_kv_heads, c->head_dim, c->n_ctx, c->type_k, c->type_v,
                             m->kcache + layer * m->row_k, m->vcache + layer * m->row_v, m->row_k, m->row_v, m->att};
        if (lc_attention(&att, m->q, seq, pos, nt, m->xb) != 0) return LC_E_MEM;
        if (lc_kv_rot(c->type_v, c->head_dim, 1)) lc_parallel_for(m->pool, nt, unrotate_unit, &tj);
        quantize_rows(m, m->xb, nt, qd, lc_is_quantized(L->wo.type));
        matmul(m, &L->wo, m->xb, m->xq, nt, m->proj, dim);

        /* feed-forward block (the residual add fused into the norm's step) */
        lc_parallel_for(m->pool, nt, ffn_norm_unit, &tj);
        quantize_rows(m, m->xb, nt, dim, lc_is_quantized(L->w1.type) || lc_is_quantized(L->w3.type));
        const lc_mm up[2] = {{&L->w1, m->xb, m->xq, m->xq16, m->hb, hid, 1}, {&L->w3, m->xb, m->xq, m->xq16, m->hb2, hid, 1}};
        matmuls(m, up, 2, nt);
        lc_parallel_for(m->pool, nt, swiglu_unit, &tj);
        quantize_rows(m, m->hb, nt, hid, lc_is_quantized(L->w2.type));
        matmul(m, &L->w2, m->hb, m->xq, nt, m->proj, dim);
        lc_parallel_for(m->pool, nt, residual_unit, &tj);
    }

    /* logits of the wanted tokens: their final norms packed into rows 0..nw-1 of xb */
    const lc_tensor *O = &m->w.output;
    int nw = 0;
    for (int t = 0; t < nt; t++)
        if (!want || want[t]) {
            k->rmsnorm(m->xb + (int64_t)nw * dim, m->x + (int64_t)t * dim, m->w.norm, dim, c->norm_eps);
            nw++;
        }
    if (nw == 0) return LC_OK;
    m->amx = k->gemm_amx != NULL && nw >= LC_AMX_MIN_TOKENS;
    m->amx_i8 = k->quantize_act16 != NULL && !m->amx && nw >= LC_AMX_I8_MIN_TOKENS;
    quantize_rows(m, m->xb, nw, dim, lc_is_quantized(O->type));
    matmul(m, O, m->xb, m->xq, nw, logits, c->vocab_size);
    return LC_OK;
}

int lc_forward_batch(lc_model *m, const int32_t *tokens, const int32_t *seq, const int32_t *pos,
                     const int8_t *want, int n, float *logits) {
    if (n < 1) return LC_E_ARG;
    for (int i = 0; i < n; i++) {
        if (pos[i] < 0 || seq[i] < 0 || seq[i] >= m->c.n_seq) return LC_E_ARG;
        if (pos[i] >= m->c.n_ctx) return LC_E_CTX;
        if (tokens[i] < 0 || tokens[i] >= m->c.vocab_size) return LC_E_TOKEN;
    }
    for (int done = 0; done < n;) {
        const int nt = n - done < m->c.n_batch ? n - done : m->c.n_batch;
        const int rc = forward_chunk(m, tokens + done, seq + done, pos + done, want ? want + done : NULL, nt, logits);
        if (rc != LC_OK) return rc;
        for (int t = done; t < done + nt; t++)
            if (!want || want[t]) logits += m->c.vocab_size;
        done += nt;
    }
    return LC_OK;
}

int lc_forward(lc_model *m, const int32_t *tokens, int n, int pos, float *logits, int all_logits) {
    if (n < 1 || pos < 0) return LC_E_ARG;
    if ((int64_t)pos + n > m->c.n_ctx) return LC_E_CTX;
    int32_t *seq = calloc((size_t)n, sizeof(int32_t)), *p = malloc((size_t)n * sizeof(int32_t));
    int8_t *want = calloc((size_t)n, 1);
    int rc = LC_E_ARG;
    if (seq && p && want) {
        for (int i = 0; i < n; i++) p[i] = pos + i;
        want[n - 1] = 1;
        rc = lc_forward_batch(m, tokens, seq, p, all_logits ? NULL : want, n, logits);
    }
    free(seq); free(p); free(want);
    return rc;
}

int lc_seq_copy(lc_model *m, int src, int dst, int n_pos) {
    const lc_config *c = &m->c;
    if (src < 0 || src >= c->n_seq || dst < 0 || dst >= c->n_seq || n_pos < 0 || n_pos > c->n_ctx) return LC_E_ARG;
    if (src == dst || n_pos == 0) return LC_OK;
    for (int l = 0; l < c->n_layers; l++)
        for (int h = 0; h < c->n_kv_heads; h++) {
            const size_t d = cache_row(m, l, dst, h), s = cache_row(m, l, src, h);
            memcpy(m->kcache + d * m->row_k, m->kcache + s * m->row_k, (size_t)n_pos * m->row_k);
            memcpy(m->vcache + d * m->row_v, m->vcache + s * m->row_v, (size_t)n_pos * m->row_v);
        }
    return LC_OK;
}
