/* Runtime choice of the kernel table: cpuid on x86-64, hwcaps on aarch64.
 * LLAMACPU_KERNELS=scalar (or avx2, avx512vnni, avx512amx, neon, neon-dotprod) overrides. */
#define _GNU_SOURCE /* syscall() under -std=c11 */
#include <stdlib.h>
#include <string.h>
#include "llamacpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

static int cpu_has_avx2_fma_f16c(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!(fma && osxsave && avx && f16c)) return 0;
    unsigned xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0)); /* OS saves YMM state? */
    if ((xlo & 6) != 6) return 0;
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b >> 5) & 1;
}

/* AVX-512 F, BW, VL and VNNI, with the OS saving the opmask and ZMM state (XCR0 bits 5-7) */
static int cpu_has_avx512vnni(void) {
    if (!cpu_has_avx2_fma_f16c()) return 0;
    unsigned a, b, c, d, xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    if ((xlo & 0xe6) != 0xe6) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    const int f = (b >> 16) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1, vnni = (c >> 11) & 1;
    return f && bw && vl && vnni;
}

/* AMX tiles with bf16 (Sapphire Rapids and later) and AVX512-BF16, the XTILECFG/XTILEDATA
 * state enabled (XCR0 bits 17-18), and Linux's permission for this process to use it
 * (arch_prctl ARCH_REQ_XCOMP_PERM: the tile data is 8 KB of state per thread that the
 * kernel only allocates for processes that ask; once granted it covers every thread). */
static int cpu_has_amx(void) {
    if (!LC_HAVE_AMX || !cpu_has_avx512vnni()) return 0;
    unsigned a, b, c, d, xlo, xhi;
    __cpuid_count(7, 0, a, b, c, d);
    const int tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;
    __cpuid_count(7, 1, a, b, c, d);
    const int avx512bf16 = (a >> 5) & 1;
    if (!(tile && bf16 && avx512bf16)) return 0;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    if ((xlo & 0x60000) != 0x60000) return 0;
#if defined(__linux__)
    static int granted = -1;
    if (granted < 0) granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return granted;
#else
    return 0;
#endif
}
#endif

#if defined(__aarch64__)
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
static int cpu_has_dotprod(void) { return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0; }
#elif defined(__APPLE__)
#include <sys/sysctl.h>
static int cpu_has_dotprod(void) {
    int v = 0;
    size_t len = sizeof(v);
    if (sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &len, NULL, 0) != 0) return 0;
    return v != 0;
}
#else
static int cpu_has_dotprod(void) { return 0; }
#endif
#endif

const lc_kernels *lc_kernels_by_name(const char *name) {
    if (!name) return NULL;
    if (strcmp(name, "scalar") == 0) return &lc_kernels_scalar;
#if defined(__x86_64__) || defined(_M_X64)
    if (strcmp(name, "avx2") == 0) return cpu_has_avx2_fma_f16c() ? &lc_kernels_avx2 : NULL;
    if (strcmp(name, "avx512vnni") == 0) return cpu_has_avx512vnni() ? &lc_kernels_avx512vnni : NULL;
#if LC_HAVE_AMX
    if (strcmp(name, "avx512amx") == 0) return cpu_has_amx() ? &lc_kernels_avx512amx : NULL;
#endif
#endif
#if defined(__aarch64__)
    if (strcmp(name, "neon") == 0) return &lc_kernels_neon;
    if (strcmp(name, "neon-dotprod") == 0) return cpu_has_dotprod() ? &lc_kernels_neon_dotprod : NULL;
#endif
    return NULL;
}

const lc_kernels *lc_kernels_best(void) {
    const char *env = getenv("LLAMACPU_KERNELS");
    if (env && *env) {
        const lc_kernels *k = lc_kernels_by_name(env);
        return k ? k : &lc_kernels_scalar;
    }
#if defined(__x86_64__) || defined(_M_X64)
#if LC_HAVE_AMX
    if (cpu_has_amx()) return &lc_kernels_avx512amx;
#endif
    if (cpu_has_avx512vnni()) return &lc_kernels_avx512vnni;
    if (cpu_has_avx2_fma_f16c()) return &lc_kernels_avx2;
#endif
#if defined(__aarch64__)
    return cpu_has_dotprod() ? &lc_kernels_neon_dotprod : &lc_kernels_neon;
#endif
    return &lc_kernels_scalar;
}

lc_gemm lc_gemm_of(const lc_kernels *k, int type, int layout) {
    lc_gemm g = {NULL, NULL};
    const int i = lc_type_index(type);
    if (type == LC_TYPE_F16) g.f = k->gemm_f16;
    else if (type == LC_TYPE_F32) g.f = k->gemm_f32;
    else if (i >= 0 && layout == LC_LAYOUT_ROWS) g.q = k->gemm_rows[i];
    else if (i >= 0 && layout == LC_LAYOUT_X8) g.q = k->gemm_x8[i];
    return g;
}
