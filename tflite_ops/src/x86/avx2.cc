// x86-64 AVX2 + FMA + F16C variant: the 256-bit kernels of avx256_impl.h with the byte dot
// product emulated exactly by vpmaddubsw, whose int16 pair sums saturate: the unsigned operand
// is kept below 16 per step (u * s pair sums stay within +-3840), and a full-range unsigned
// byte is split into its two nibbles.
#include <immintrin.h>

namespace {
inline __m256i dp_small(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
inline __m256i dp_full(__m256i acc, __m256i u, __m256i s) {
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(u, m0f), s);
  const __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(u, 4), m0f), s);
  return _mm256_add_epi32(_mm256_add_epi32(acc, _mm256_madd_epi16(lo, _mm256_set1_epi16(1))),
                          _mm256_madd_epi16(hi, _mm256_set1_epi16(16)));
}
}  // namespace

#define TFQAT_DP_SMALL(acc, u, s) dp_small(acc, u, s)
#define TFQAT_DP_FULL(acc, u, s) dp_full(acc, u, s)
#define TFQAT_DP_NATIVE false
#include "avx256_impl.h"

namespace tfqat {
const KernelTable* x86_avx2_table() {
  static const KernelTable kTable = make_table(Isa::kAvx2);
  return &kTable;
}
}  // namespace tfqat
