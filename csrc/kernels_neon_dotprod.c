/* The NEON dotprod table (ARMv8.2 sdot; chosen at run time from hwcaps):
 * kernels_neon.inc with sdot dot products. */
#define LC_NEON_DOTPROD 1
#include "kernels_neon.inc"
