// Op 1 (per-token activation quantization) and op 2 (token bit selection).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../variants.h"

namespace tfqat {
namespace ref {

// Dynamic max ignores NaN (`a > m` is false for NaN), the same as a vmaxps(|x|, m) reduction.
// Rounding then clamping in float maps NaN to the low bound, as clamping vcvtps2dq's input does.
void quantize_rows(const float* x, int T, int K, const uint8_t* bits, const float* static_scales,
                   int8_t* codes, float* scales_out) {
  for (int t = 0; t < T; ++t) {
    const float* xr = x + static_cast<size_t>(t) * K;
    const bool b8 = bits[t] == 8;
    const float qmax = b8 ? 127.0f : 7.0f;
    const float lo = -qmax - 1.0f;
    float s;
    if (static_scales) {
      s = b8 ? static_scales[0] : static_scales[1];
    } else {
      float m = 0.0f;
      for (int k = 0; k < K; ++k) {
        const float a = std::fabs(xr[k]);
        m = a > m ? a : m;
      }
      s = m == 0.0f ? 1.0f : m / qmax;
    }
    scales_out[t] = s;
    int8_t* cr = codes + static_cast<size_t>(t) * K;
    for (int k = 0; k < K; ++k) {
      float r = std::nearbyint(xr[k] / s);
      if (!(r >= lo)) r = lo;
      if (r > qmax) r = qmax;
      cr[k] = static_cast<int8_t>(static_cast<int>(r));
    }
  }
}

}  // namespace ref

void select_bits_topk(const float* importance, int T, float rho, uint8_t* bits) {
  if (T <= 0) return;
  const double want = std::floor(static_cast<double>(rho) * T + 0.5);
  const int n8 = want >= T ? T : (want >= 0.0 ? static_cast<int>(want) : 0);  // NaN rho -> 0
  std::vector<int> order(static_cast<size_t>(T));
  std::iota(order.begin(), order.end(), 0);
  // Strict weak order: higher importance first, NaN after everything, equal keys keep index order.
  std::stable_sort(order.begin(), order.end(), [importance](int a, int b) {
    const float ia = importance[a], ib = importance[b];
    if (std::isnan(ia)) return false;
    if (std::isnan(ib)) return true;
    return ia > ib;
  });
  for (int t = 0; t < T; ++t) bits[t] = 4;
  for (int i = 0; i < n8; ++i) bits[order[static_cast<size_t>(i)]] = 8;
}

void select_bits_threshold(const float* importance, int T, float threshold, uint8_t* bits) {
  for (int t = 0; t < T; ++t) bits[t] = importance[t] >= threshold ? 8 : 4;
}

}  // namespace tfqat
