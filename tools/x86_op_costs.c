/* What each instruction of an AVX2 int8 tile costs beside its multiplies, on this CPU.
 *
 *     cc -O2 tools/x86_op_costs.c -o /tmp/x86_op_costs && /tmp/x86_op_costs
 *
 * A tile's dot product of a group of 8 activations against 8 rows (64 multiply-adds) is
 * 2 vpmaddubsw + 1 vpmaddwd, plus broadcasts of the activations, a vpaddw, and for q8a's
 * per-group scale a conversion and an FMA (csrc/kernels_x86.inc, tile_k). Each line times
 * a loop of 6 independent vpmaddubsw (on Zen 3 and most x86 cores, 2 per cycle: the
 * floor of every int8 tile) with 6 of another instruction added, as ns per iteration and
 * as the ratio to the multiplies alone: 1.00 when the added instructions run on ports
 * the multiplies leave free. Each loop is the best of 20 timings of 5e6 iterations, the
 * loops alternating (the machines here are shared and noisy); registers only, except
 * the loads and broadcasts (one L1 line). */
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

#define N 5000000L /* iterations per timing */
#define ROUNDS 20
static int mem[16] __attribute__((aligned(64)));
/* 6 independent instances: op SRC, %ymmN (2 operands) or op SRC, %ymmN, %ymmN (3) */
#define OP6(op, src) op " " src ", %%ymm6\n" op " " src ", %%ymm7\n" op " " src ", %%ymm8\n" \
                     op " " src ", %%ymm9\n" op " " src ", %%ymm10\n" op " " src ", %%ymm11\n"
#define OP6_3(op, src) op " " src ", %%ymm6, %%ymm6\n" op " " src ", %%ymm7, %%ymm7\n" op " " src ", %%ymm8, %%ymm8\n" \
                       op " " src ", %%ymm9, %%ymm9\n" op " " src ", %%ymm10, %%ymm10\n" op " " src ", %%ymm11, %%ymm11\n"
#define MUL6 "vpmaddubsw %%ymm15, %%ymm0, %%ymm0\n vpmaddubsw %%ymm15, %%ymm1, %%ymm1\n vpmaddubsw %%ymm15, %%ymm2, %%ymm2\n" \
             "vpmaddubsw %%ymm15, %%ymm3, %%ymm3\n vpmaddubsw %%ymm15, %%ymm4, %%ymm4\n vpmaddubsw %%ymm15, %%ymm5, %%ymm5\n"
#define BCASTD "vpbroadcastd (%0), %%ymm6\n vpbroadcastd 4(%0), %%ymm7\n vpbroadcastd 8(%0), %%ymm8\n" \
               "vpbroadcastd 12(%0), %%ymm9\n vpbroadcastd 16(%0), %%ymm10\n vpbroadcastd 20(%0), %%ymm11\n"
#define BCASTSS "vbroadcastss (%0), %%ymm6\n vbroadcastss 4(%0), %%ymm7\n vbroadcastss 8(%0), %%ymm8\n" \
                "vbroadcastss 12(%0), %%ymm9\n vbroadcastss 16(%0), %%ymm10\n vbroadcastss 20(%0), %%ymm11\n"
#define LOAD "vmovdqa (%0), %%ymm6\n vmovdqa 32(%0), %%ymm7\n vmovdqa (%0), %%ymm8\n" \
             "vmovdqa 32(%0), %%ymm9\n vmovdqa (%0), %%ymm10\n vmovdqa 32(%0), %%ymm11\n"
#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11"
#define TIME(name, body)                                                                     \
    {                                                                                        \
        double t0 = now();                                                                   \
        for (long i = 0; i < N; i++) __asm__ volatile(body ::"r"(mem) : CLOBBER);            \
        const double dt = (now() - t0) / N;                                                  \
        names[n] = name;                                                                     \
        if (round == 0 || dt < t[n]) t[n] = dt;                                              \
        n++;                                                                                 \
    }

int main(void) {
    const char *names[16];
    double t[16];
    int n = 0;
    for (int round = 0; round < ROUNDS; round++) { /* the loops alternate; the best of ROUNDS each */
        n = 0;
        TIME("6 vpmaddubsw", MUL6)
        TIME("+ 6 vpaddw", MUL6 OP6_3("vpaddw", "%%ymm15"))
        TIME("+ 6 vmovdqa loads", MUL6 LOAD)
        TIME("+ 6 vpbroadcastd (m32)", MUL6 BCASTD)
        TIME("+ 6 vbroadcastss (m32)", MUL6 BCASTSS)
        TIME("+ 6 vcvtdq2ps", MUL6 OP6("vcvtdq2ps", "%%ymm15"))
        TIME("+ 6 vfmadd231ps", MUL6 OP6("vfmadd231ps %%ymm15,", "%%ymm14"))
        TIME("+ 6 vcvtdq2ps + 6 vfmadd231ps", MUL6 OP6("vcvtdq2ps", "%%ymm15") OP6("vfmadd231ps %%ymm15,", "%%ymm14"))
        TIME("+ 6 vpmaddwd (3 multiplies per group)", MUL6 OP6_3("vpmaddwd", "%%ymm15"))
    }
    printf("%-40s %9s  %5s\n", "loop body", "per iter", "ratio");
    for (int i = 0; i < n; i++) printf("%-40s %6.3f ns  %5.2f\n", names[i], t[i] * 1e9, t[i] / t[0]);
    return 0;
}
