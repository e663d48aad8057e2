/* The AVX2 + FMA + F16C table: kernels_x86.inc with maddubs/madd dot products. */
#define LC_X86_VNNI 0
#include "kernels_x86.inc"
