/* Stress driver for csrc/threads.c: every unit of every lc_parallel_for runs exactly
 * once, before the call returns, with a thread index below the pool's thread count;
 * calls of different sizes follow each other with no gap (late workers must not
 * claim a unit of the next call), pools are resized and freed (workers joined).
 * Prints "N passed, M failed". Argument: calls per pool (default 20000). */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include "llamacpu.h"

typedef struct {
    _Atomic int *hits;
    int n_threads;
    _Atomic int bad_thread;
    int call; /* the call's id, written into every unit's slot */
    int *owner;
} job;

static void unit(void *ctx, int u, int thread) {
    job *j = ctx;
    atomic_fetch_add(&j->hits[u], 1);
    j->owner[u] = j->call;
    if (thread < 0 || thread >= j->n_threads) atomic_store(&j->bad_thread, 1);
}

int main(int argc, char **argv) {
    const int calls = argc > 1 ? atoi(argv[1]) : 20000;
    int passed = 0, failed = 0;
    enum { MAXU = 4096 };
    _Atomic int *hits = calloc(MAXU, sizeof(*hits));
    int *owner = calloc(MAXU, sizeof(int));
    unsigned seed = 12345;
    const int threads[] = {1, 2, 3, 8};
    for (size_t ti = 0; ti < sizeof(threads) / sizeof(threads[0]); ti++) {
        lc_pool *p = lc_pool_new(threads[ti]);
        if (!p || lc_pool_threads(p) != threads[ti]) {
            printf("FAIL pool of %d threads: %d\n", threads[ti], p ? lc_pool_threads(p) : -1);
            failed++;
            lc_pool_free(p);
            continue;
        }
        int ok = 1;
        for (int call = 1; call <= calls && ok; call++) {
            seed = seed * 1103515245u + 12345u;
            const int n = (call % 7 == 0) ? (int)(seed >> 8) % MAXU : (int)(seed >> 8) % 40; /* mostly small */
            job j = {hits, threads[ti], 0, call, owner};
            for (int u = 0; u < n; u++) atomic_store(&hits[u], 0);
            lc_parallel_for(p, n, unit, &j);
            for (int u = 0; u < n && ok; u++)
                if (atomic_load(&hits[u]) != 1 || owner[u] != call) {
                    printf("FAIL %d threads, call %d (n=%d): unit %d ran %d times\n", threads[ti], call, n, u,
                           atomic_load(&hits[u]));
                    ok = 0;
                }
            if (atomic_load(&j.bad_thread)) {
                printf("FAIL %d threads, call %d: thread index out of range\n", threads[ti], call);
                ok = 0;
            }
        }
        lc_pool_free(p);
        ok ? passed++ : failed++;
    }
    lc_parallel_for(NULL, 3, unit, &(job){hits, 1, 0, -1, owner}); /* NULL pool: serial */
    (owner[0] == -1 && owner[2] == -1) ? passed++ : failed++;
    free(hits);
    free(owner);
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
