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
 * the multiplies leave free. The last three lines are whole groups of a tile (all but
 * the unpacking of the weights), as tile_k does them and as two alternatives would: the
 * most a tile can do on this core (divide by the number of groups). Each loop is the
 * best of 20 timings of 5e6 iterations, the loops alternating (the machines here are
 * shared and noisy); registers only, except the loads and broadcasts (one L1 line). */
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

#define N 5000000L /* iterations per timing */
#define ROUNDS 20
static int mem[32] __attribute__((aligned(64)));
/* 6 instances writing ymm6..ymm11 from the constants ymm14, ymm15 (no instance waits on
 * another, nor on the previous iteration: throughput, not latency) */
#define OP6(op) op " %%ymm15, %%ymm14, %%ymm6\n" op " %%ymm15, %%ymm14, %%ymm7\n" op " %%ymm15, %%ymm14, %%ymm8\n" \
                op " %%ymm15, %%ymm14, %%ymm9\n" op " %%ymm15, %%ymm14, %%ymm10\n" op " %%ymm15, %%ymm14, %%ymm11\n"
#define CVT6 "vcvtdq2ps %%ymm15, %%ymm6\n vcvtdq2ps %%ymm15, %%ymm7\n vcvtdq2ps %%ymm15, %%ymm8\n" \
             "vcvtdq2ps %%ymm15, %%ymm9\n vcvtdq2ps %%ymm15, %%ymm10\n vcvtdq2ps %%ymm15, %%ymm11\n"
/* an FMA reads its destination: each starts from a copy of ymm13 (a register move, renamed
 * away), so it does not wait on the previous iteration's */
#define FMA1(r) "vmovaps %%ymm13, %%ymm" #r "\n vfmadd231ps %%ymm15, %%ymm14, %%ymm" #r "\n"
#define FMA6 FMA1(6) FMA1(7) FMA1(8) FMA1(9) FMA1(10) FMA1(11)
/* the multiplies: ymm0..ymm5 */
#define MUL6 "vpmaddubsw %%ymm15, %%ymm14, %%ymm0\n vpmaddubsw %%ymm15, %%ymm14, %%ymm1\n vpmaddubsw %%ymm15, %%ymm14, %%ymm2\n" \
             "vpmaddubsw %%ymm15, %%ymm14, %%ymm3\n vpmaddubsw %%ymm15, %%ymm14, %%ymm4\n vpmaddubsw %%ymm15, %%ymm14, %%ymm5\n"
#define BCASTD "vpbroadcastd (%0), %%ymm6\n vpbroadcastd 4(%0), %%ymm7\n vpbroadcastd 8(%0), %%ymm8\n" \
               "vpbroadcastd 12(%0), %%ymm9\n vpbroadcastd 16(%0), %%ymm10\n vpbroadcastd 20(%0), %%ymm11\n"
#define BCASTSS "vbroadcastss (%0), %%ymm6\n vbroadcastss 4(%0), %%ymm7\n vbroadcastss 8(%0), %%ymm8\n" \
                "vbroadcastss 12(%0), %%ymm9\n vbroadcastss 16(%0), %%ymm10\n vbroadcastss 20(%0), %%ymm11\n"
#define LOAD "vmovdqa (%0), %%ymm6\n vmovdqa 32(%0), %%ymm7\n vmovdqa (%0), %%ymm8\n" \
             "vmovdqa 32(%0), %%ymm9\n vmovdqa (%0), %%ymm10\n vmovdqa 32(%0), %%ymm11\n"
/* one q8a group of a tile (tile_k, one token): the activation's two 4-byte broadcasts and
 * its scale, 2 vpmaddubsw, vpaddw, vpmaddwd by the weights' scales, conversion, FMA; three
 * of them (integer registers a, b: 0-5; scale c and sum d: 6-11) */
#define BCAST3(a, b, c, m) \
    "vpbroadcastd " m "(%0), %%ymm" a "\n vpbroadcastd " m "+4(%0), %%ymm" b "\n vbroadcastss " m "+8(%0), %%ymm" c "\n"
/* a group's arithmetic: activations a, b against weights wa, wb into x (y: scratch), then
 * vpmaddwd, conversion, and the FMA by the scale c into s (a copy of ymm13) */
#define DOT(a, b, x, y, wa, wb, c, s)                                                              \
    "vpmaddubsw %%ymm" a ", %%ymm" wa ", %%ymm" x "\n vpmaddubsw %%ymm" b ", %%ymm" wb ", %%ymm" y "\n" \
    "vpaddw %%ymm" x ", %%ymm" y ", %%ymm" x "\n vpmaddwd %%ymm12, %%ymm" x ", %%ymm" x "\n"            \
    "vcvtdq2ps %%ymm" x ", %%ymm" x "\n vmovaps %%ymm13, %%ymm" s "\n vfmadd231ps %%ymm" x ", %%ymm" c ", %%ymm" s "\n"
#define GROUP(a, b, c, d, m) BCAST3(a, b, c, m) DOT(a, b, a, b, "14", "15", c, d)
#define GROUPS3 GROUP("0", "1", "6", "7", "0") GROUP("2", "3", "8", "9", "16") GROUP("4", "5", "10", "11", "32")
/* the same groups in pairs of row groups (one activation broadcast for 16 rows): 4 groups */
#define PAIR(a, b, c, d, e, f, m) BCAST3(a, b, c, m) DOT(a, b, d, e, "14", "15", c, f) DOT(a, b, a, b, "15", "14", c, e)
#define PAIRS3 PAIR("0","1","2","3","4","5","0") PAIR("6","7","8","9","10","11","16")
/* with one activation scale per 32 (not q8a): a group's 2 vpmaddubsw summed in 16 bits
 * (vpaddw) over the 4 groups of a block, then one vpmaddwd, conversion and FMA per block;
 * in pairs of row groups: 8 groups */
#define P32(a, b, d, e, m) \
    "vpbroadcastd " m "(%0), %%ymm" a "\n vpbroadcastd " m "+4(%0), %%ymm" b "\n" \
    "vpmaddubsw %%ymm" a ", %%ymm14, %%ymm" d "\n vpmaddubsw %%ymm" b ", %%ymm15, %%ymm" e "\n vpaddw %%ymm" d ", %%ymm" e ", %%ymm" d "\n vpaddw %%ymm" d ", %%ymm11, %%ymm11\n" \
    "vpmaddubsw %%ymm" a ", %%ymm15, %%ymm" a "\n vpmaddubsw %%ymm" b ", %%ymm14, %%ymm" b "\n vpaddw %%ymm" a ", %%ymm" b ", %%ymm" a "\n vpaddw %%ymm" a ", %%ymm10, %%ymm10\n"
#define P32_4 P32("0","1","2","3","0") P32("4","5","6","7","8") P32("0","1","2","3","16") P32("4","5","6","7","24") \
    "vpmaddwd %%ymm12, %%ymm11, %%ymm8\n vcvtdq2ps %%ymm8, %%ymm8\n vbroadcastss 40(%0), %%ymm9\n vmovaps %%ymm13, %%ymm2\n vfmadd231ps %%ymm8, %%ymm9, %%ymm2\n" \
    "vpmaddwd %%ymm12, %%ymm10, %%ymm8\n vcvtdq2ps %%ymm8, %%ymm8\n vmovaps %%ymm13, %%ymm3\n vfmadd231ps %%ymm8, %%ymm9, %%ymm3\n"
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
    const char *names[24];
    double t[24];
    int n = 0;
    for (int round = 0; round < ROUNDS; round++) { /* the loops alternate; the best of ROUNDS each */
        n = 0;
        TIME("6 vpmaddubsw", MUL6)
        TIME("+ 6 vpaddw", MUL6 OP6("vpaddw"))
        TIME("+ 6 vmovdqa loads", MUL6 LOAD)
        TIME("+ 6 vpbroadcastd (m32)", MUL6 BCASTD)
        TIME("+ 6 vbroadcastss (m32)", MUL6 BCASTSS)
        TIME("+ 6 vcvtdq2ps", MUL6 CVT6)
        TIME("+ 6 vfmadd231ps", MUL6 FMA6)
        TIME("+ 6 vcvtdq2ps + 6 vfmadd231ps", MUL6 CVT6 FMA6)
        TIME("+ 6 vpmaddwd (3 multiplies per group)", MUL6 OP6("vpmaddwd"))
        TIME("+ 12 vpbroadcastd (m32)", MUL6 BCASTD BCASTD)
        TIME("3 q8a groups (6 vpmaddubsw, 3 vpmaddwd, ...)", GROUPS3)
        TIME("4 q8a groups in 2 pairs of row groups", PAIRS3)
        TIME("8 groups, 1 scale per 32, pairs", P32_4)
    }
    printf("%-40s %9s  %5s\n", "loop body", "per iter", "ratio");
    for (int i = 0; i < n; i++) printf("%-40s %6.3f ns  %5.2f\n", names[i], t[i] * 1e9, t[i] / t[0]);
    return 0;
}
