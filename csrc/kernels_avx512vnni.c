/* The AVX-512 VL + VNNI table (Zen 4, Ice Lake and later): kernels_x86.inc with
 * vpdpbusd dot products and 512-bit tiles. dispatch.c picks it when cpuid reports
 * AVX512F/BW/VL/VNNI and the OS saves the AVX-512 state. */
#define LC_X86_VNNI 1
#include "kernels_x86.inc"
