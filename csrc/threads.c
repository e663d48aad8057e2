/* The forward pass's thread pool: persistent workers and lc_parallel_for.
 *
 * Why not OpenMP's parallel for: on a machine where another process wants a core,
 * one of our threads loses it for a time slice, and every barrier waits for that
 * thread (SmolLM2 decode, 2 threads beside one busy loop: 49-73 t/s, 1 thread 182).
 * Here a call returns when all its units are *done*, not when every thread has
 * arrived: units are claimed from one atomic counter, the calling thread claims
 * them too, and a worker that is not running claims none, so the threads that have
 * a core do the work. Workers spin for a short time after a call (decode issues
 * hundreds of calls per token, microseconds apart), then sleep on a condition
 * variable; the caller sleeps too while a descheduled worker finishes a unit.
 *
 * The job is published in `slot`: (job id << 32) | units not yet claimed. A
 * worker claims with a compare-and-swap on that word, so a late worker whose job
 * is over can never claim a unit of the next one; it reads fn/ctx/n before the
 * swap, and a successful swap proves they were still its job's (a job's
 * descriptor is rewritten only after all its units are done).
 *
 * A child process after fork() has none of the workers: pools created before the
 * fork run their calls serially there. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include "llamacpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ volatile("yield")
#else
#define cpu_relax() ((void)0)
#endif

/* how long a waiting thread spins before it sleeps */
#define SPIN_NS 100000

struct lc_pool {
    int n_workers;
    pthread_t *tid;
    struct worker_arg { lc_pool *p; int index; uint32_t job; } *args;
    pthread_mutex_t mu;
    pthread_cond_t job_cv, done_cv;
    /* the current job, written by the caller only when every unit of the last one is done */
    _Atomic(lc_task_fn) fn;
    _Atomic(void *) ctx;
    _Atomic int n;
    _Atomic uint64_t slot;      /* (job << 32) | units left to claim */
    _Atomic int done;           /* units of the current job finished */
    _Atomic uint32_t job;       /* the id workers wait to change */
    _Atomic int sleepers;       /* workers on job_cv */
    _Atomic int caller_waiting; /* the caller on done_cv */
    _Atomic int stop;
    unsigned fork_gen;
};

static _Atomic unsigned fork_gen;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void on_fork_child(void) { atomic_fetch_add(&fork_gen, 1); }
static void register_atfork(void) { pthread_atfork(NULL, NULL, on_fork_child); }

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* spin until cond() or SPIN_NS pass; returns cond() */
#define SPIN_UNTIL(cond)                                                          \
    do {                                                                          \
        int64_t t0_ = 0;                                                          \
        for (int i_ = 1; !(cond); i_++) {                                         \
            cpu_relax();                                                          \
            if ((i_ & 63) == 0) {                                                 \
                const int64_t t_ = now_ns();                                      \
                if (t0_ == 0) t0_ = t_;                                           \
                else if (t_ - t0_ > SPIN_NS) break;                               \
            }                                                                     \
        }                                                                         \
    } while (0)

/* claim and run units of `job` until none is left */
static void run_units(lc_pool *p, uint32_t job, int thread) {
    uint64_t s = atomic_load_explicit(&p->slot, memory_order_acquire);
    while ((uint32_t)(s >> 32) == job && (uint32_t)s != 0) {
        const lc_task_fn fn = atomic_load_explicit(&p->fn, memory_order_relaxed);
        void *ctx = atomic_load_explicit(&p->ctx, memory_order_relaxed);
        const int n = atomic_load_explicit(&p->n, memory_order_relaxed);
        if (!atomic_compare_exchange_weak_explicit(&p->slot, &s, s - 1, memory_order_acq_rel, memory_order_acquire))
            continue; /* s reloaded */
        fn(ctx, n - (int)(uint32_t)s, thread);
        if (atomic_fetch_add(&p->done, 1) + 1 == n && atomic_load(&p->caller_waiting)) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_broadcast(&p->done_cv);
            pthread_mutex_unlock(&p->mu);
        }
        s = atomic_load_explicit(&p->slot, memory_order_acquire);
    }
}

static void *worker(void *arg) {
    struct worker_arg *a = arg;
    lc_pool *p = a->p;
    uint32_t seen = a->job;
#ifdef __linux__
    pthread_setname_np(pthread_self(), "llamacpu-work"); /* its name in top -H and /proc/PID/task/TID/comm */
#endif
    for (;;) {
        SPIN_UNTIL(atomic_load(&p->job) != seen || atomic_load(&p->stop));
        if (atomic_load(&p->job) == seen && !atomic_load(&p->stop)) {
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->sleepers, 1);
            while (atomic_load(&p->job) == seen && !atomic_load(&p->stop)) pthread_cond_wait(&p->job_cv, &p->mu);
            atomic_fetch_sub(&p->sleepers, 1);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop)) return NULL;
        seen = atomic_load(&p->job);
        run_units(p, seen, a->index);
    }
}

lc_pool *lc_pool_new(int n_threads) {
    pthread_once(&atfork_once, register_atfork);
    lc_pool *p = calloc(1, sizeof(*p));
    if (!p) return NULL;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->job_cv, NULL);
    pthread_cond_init(&p->done_cv, NULL);
    p->fork_gen = atomic_load(&fork_gen);
    const int want = n_threads > 1 ? n_threads - 1 : 0;
    p->tid = calloc(want ? want : 1, sizeof(pthread_t));
    p->args = calloc(want ? want : 1, sizeof(*p->args));
    if (!p->tid || !p->args) {
        lc_pool_free(p);
        return NULL;
    }
    for (int i = 0; i < want; i++) {
        p->args[i] = (struct worker_arg){p, i + 1, 0};
        if (pthread_create(&p->tid[i], NULL, worker, &p->args[i]) != 0) break; /* fewer workers: still correct */
        p->n_workers++;
    }
    return p;
}

void lc_pool_free(lc_pool *p) {
    if (!p) return;
    if (p->fork_gen == atomic_load(&fork_gen)) { /* in a forked child the workers do not exist */
        pthread_mutex_lock(&p->mu);
        atomic_store(&p->stop, 1);
        pthread_cond_broadcast(&p->job_cv);
        pthread_mutex_unlock(&p->mu);
        for (int i = 0; i < p->n_workers; i++) pthread_join(p->tid[i], NULL);
        pthread_mutex_destroy(&p->mu);
        pthread_cond_destroy(&p->job_cv);
        pthread_cond_destroy(&p->done_cv);
    }
    free(p->tid);
    free(p->args);
    free(p);
}

int lc_pool_threads(const lc_pool *p) { return p ? p->n_workers + 1 : 1; }

void lc_parallel_for(lc_pool *p, int n, lc_task_fn fn, void *ctx) {
    if (n <= 0) return;
    if (!p || p->n_workers == 0 || n == 1 || p->fork_gen != atomic_load_explicit(&fork_gen, memory_order_relaxed)) {
        for (int i = 0; i < n; i++) fn(ctx, i, 0);
        return;
    }
    const uint32_t job = atomic_load_explicit(&p->job, memory_order_relaxed) + 1; /* the caller is its only writer */
    atomic_store_explicit(&p->fn, fn, memory_order_relaxed);
    atomic_store_explicit(&p->ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&p->n, n, memory_order_relaxed);
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    atomic_store_explicit(&p->slot, ((uint64_t)job << 32) | (uint32_t)n, memory_order_release);
    atomic_store(&p->job, job);
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->job_cv);
        pthread_mutex_unlock(&p->mu);
    }
    run_units(p, job, 0);
    SPIN_UNTIL(atomic_load(&p->done) == n);
    if (atomic_load(&p->done) != n) { /* a worker still runs a unit (or lost its core): sleep */
        pthread_mutex_lock(&p->mu);
        atomic_store(&p->caller_waiting, 1);
        while (atomic_load(&p->done) != n) pthread_cond_wait(&p->done_cv, &p->mu);
        atomic_store(&p->caller_waiting, 0);
        pthread_mutex_unlock(&p->mu);
    }
}
