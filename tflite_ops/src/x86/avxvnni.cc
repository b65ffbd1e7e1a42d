// x86-64 AVX2 + AVX-VNNI variant: the 256-bit kernels of avx256_impl.h on VEX vpdpbusd, which
// adds four u8 x s8 products into int32 without saturation.
#include <immintrin.h>

#define TFQAT_DP_SMALL(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#define TFQAT_DP_FULL(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#define TFQAT_DP_NATIVE true
#include "avx256_impl.h"

namespace tfqat {
const KernelTable* x86_avxvnni_table() {
  static const KernelTable kTable = make_table(Isa::kAvxVnni);
  return &kTable;
}
}  // namespace tfqat
