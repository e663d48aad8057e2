/* The AVX2 kernels compiled again for AVX-512 VL + VNNI (Zen 4, Ice Lake and
 * later): see the top of kernels_avx2.c. dispatch.c picks this table when cpuid
 * reports AVX512F/BW/VL/VNNI and the OS saves the AVX-512 state. */
#define LC_X86_VNNI 1
#include "kernels_avx2.c"
