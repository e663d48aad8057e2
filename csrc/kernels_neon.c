/* The NEON table (any aarch64): kernels_neon.inc with vmull/vpadal dot products. */
#define LC_NEON_DOTPROD 0
#include "kernels_neon.inc"
