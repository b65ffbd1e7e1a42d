// Op 5: float baselines. Sequential k order, fp32 accumulation (fp16 inputs widened exactly).
#include <cstring>

#include "../variants.h"

namespace tfqat {
namespace ref {

size_t f32_packed_size(int N, int K) { return static_cast<size_t>(N) * K * sizeof(float); }
void f32_pack(const void* canonical, int N, int K, void* packed) {
  std::memcpy(packed, canonical, f32_packed_size(N, K));
}
size_t f16_packed_size(int N, int K) { return static_cast<size_t>(N) * K * sizeof(uint16_t); }
void f16_pack(const void* canonical, int N, int K, void* packed) {
  std::memcpy(packed, canonical, f16_packed_size(N, K));
}

void gemm_f32(const float* x, int T, int K, const void* w_packed, int N, float* y) {
  const float* w = static_cast<const float*>(w_packed);
  for (int t = 0; t < T; ++t) {
    for (int n = 0; n < N; ++n) {
      float acc = 0.0f;
      for (int k = 0; k < K; ++k) acc += x[static_cast<size_t>(t) * K + k] * w[static_cast<size_t>(n) * K + k];
      y[static_cast<size_t>(t) * N + n] = acc;
    }
  }
}

void gemm_f16(const uint16_t* x, int T, int K, const void* w_packed, int N, uint16_t* y) {
  const uint16_t* w = static_cast<const uint16_t*>(w_packed);
  for (int t = 0; t < T; ++t) {
    for (int n = 0; n < N; ++n) {
      float acc = 0.0f;
      for (int k = 0; k < K; ++k) {
        acc += f16_to_f32(x[static_cast<size_t>(t) * K + k]) * f16_to_f32(w[static_cast<size_t>(n) * K + k]);
      }
      y[static_cast<size_t>(t) * N + n] = f32_to_f16(acc);
    }
  }
}

}  // namespace ref
}  // namespace tfqat
