// Deterministic kernel operands shared by tfqat_bench (timed) and android_bench's tfqat_insn_probe
// (emulated instruction counts), so both measure the same calls on the same data. The values only
// have to be deterministic and in range: floats in [-1, 1], codes over their full range.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace tfqat_bench {

inline uint32_t rnd() {
  static uint32_t state = 12345;
  state = state * 1664525u + 1013904223u;
  return state >> 8;
}

inline uint16_t to_half(float f) {  // test data only: values in [-1, 1] need no rounding care
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, e = (x >> 23) & 0xFF;
  if (e < 113) return static_cast<uint16_t>(sign);
  return static_cast<uint16_t>(sign | ((e - 112) << 10) | ((x & 0x7FFFFF) >> 13));
}

// The operands of one T x K @ K x N case: float activations and weights, int8 and int4 activation
// codes with per-token scales, int8 and packed int4 weight codes with per-channel scales, a bias.
struct GemmData {
  std::vector<float> xf, wf, xs, ws, bias;
  std::vector<int8_t> x8, x4, w8;
  std::vector<uint8_t> w4;

  GemmData(int T, int K, int N)
      : xf(static_cast<size_t>(T) * K), wf(static_cast<size_t>(N) * K), xs(T, 0.01f), ws(N, 0.02f),
        bias(N, 0.5f), x8(static_cast<size_t>(T) * K), x4(x8.size()), w8(static_cast<size_t>(N) * K),
        w4(static_cast<size_t>(N) * ((K + 1) / 2)) {
    for (auto& v : xf) v = static_cast<float>(static_cast<int>(rnd() % 2001) - 1000) / 1000.0f;
    for (auto& v : wf) v = static_cast<float>(static_cast<int>(rnd() % 2001) - 1000) / 1000.0f;
    for (auto& v : x8) v = static_cast<int8_t>(static_cast<int>(rnd() % 256) - 128);
    for (auto& v : x4) v = static_cast<int8_t>(static_cast<int>(rnd() % 16) - 8);
    for (auto& v : w8) v = static_cast<int8_t>(static_cast<int>(rnd() % 256) - 128);
    for (auto& v : w4) v = static_cast<uint8_t>(rnd());
  }
};

}  // namespace tfqat_bench
