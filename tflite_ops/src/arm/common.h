// Internal to the ARM variants: the kernels one variant borrows from another, and small helpers
// every variant needs (padded activation rows, the reference epilogue).
//
// The helpers live in an anonymous namespace on purpose: each variant file is compiled with its
// own -march, and an inline function with external linkage could be merged across files by the
// linker, handing armv8.6 code to an armv8.0 CPU. Internal linkage keeps one copy per file.
#pragma once

#include <arm_neon.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "../variants.h"

namespace tfqat {

// Kernels of one ARM level that a higher level reuses as they are (an i8mm CPU has dotprod and
// fp16, a dotprod CPU has armv8.0 NEON), so each op is written once per instruction it needs.
namespace arm_neon {
void quantize_rows(const float* x, int T, int K, const uint8_t* bits, const float* static_scales,
                   int8_t* codes, float* scales_out);
size_t w8_packed_size(int N, int K);
void w8_pack(const void* canonical, int N, int K, void* packed);
size_t w4_packed_size(int N, int K);
void w4_pack(const void* canonical, int N, int K, void* packed);
void attn_pv(const uint8_t* p, float ps, int H, int T, int S, const void* v, int kv_bits,
             const uint8_t* v_rowbits, const float* vs, int Hkv, int s_cap, int D, float* out);
size_t f32_packed_size(int N, int K);
void f32_pack(const void* canonical, int N, int K, void* packed);
void gemm_f32(const float* x, int T, int K, const void* w_packed, int N, float* y);
}  // namespace arm_neon

namespace arm_dot {
void attn_qk(const int8_t* q, const float* qs, int H, int T, int D, const void* k, int kv_bits,
             const float* ks, int Hkv, int S, int s_cap, float* scores);
size_t f16_packed_size(int N, int K);
void f16_pack(const void* canonical, int N, int K, void* packed);
void gemm_f16(const uint16_t* x, int T, int K, const void* w_packed, int N, uint16_t* y);
}  // namespace arm_dot

namespace arm {
namespace {

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }
inline int min_int(int a, int b) { return a < b ? a : b; }

// Activation rows [T][K] seen with K rounded up to a multiple of `kb`: the caller's buffer when
// K already is one, else a zero-padded copy, so block loops never read past a row.
class PaddedRows {
 public:
  PaddedRows(const int8_t* x, int T, int K, int kb) : kp_(round_up(K, kb)) {
    if (kp_ == K) {
      base_ = x;
      return;
    }
    buf_.assign(static_cast<size_t>(T) * kp_, 0);
    for (int t = 0; t < T; ++t) {
      std::memcpy(&buf_[static_cast<size_t>(t) * kp_], x + static_cast<size_t>(t) * K, K);
    }
    base_ = buf_.data();
  }
  const int8_t* row(int t) const { return base_ + static_cast<size_t>(t) * kp_; }
  int kp() const { return kp_; }

 private:
  int kp_;
  const int8_t* base_ = nullptr;
  std::vector<int8_t> buf_;
};

// The reference epilogue for `nr` consecutive channels of one token:
// y = (float)acc * (xs * ws[n]) [+ bias[n]], the scale product first, bias last, never fused.
inline void store_row(const int32_t* acc, int nr, float xs, const float* ws, const float* bias,
                      float* y) {
  const float32x4_t vxs = vdupq_n_f32(xs);
  int i = 0;
  for (; i + 4 <= nr; i += 4) {
    float32x4_t v = vmulq_f32(vcvtq_f32_s32(vld1q_s32(acc + i)), vmulq_f32(vxs, vld1q_f32(ws + i)));
    if (bias) v = vaddq_f32(v, vld1q_f32(bias + i));
    vst1q_f32(y + i, v);
  }
  for (; i < nr; ++i) {
    const float v = static_cast<float>(acc[i]) * (xs * ws[i]);
    y[i] = bias ? v + bias[i] : v;
  }
}

// Sign-extends the low / high nibbles of 16 bytes to int8 lanes.
inline int8x16_t low_nibbles(int8x16_t b) { return vshrq_n_s8(vshlq_n_s8(b, 4), 4); }
inline int8x16_t high_nibbles(int8x16_t b) { return vshrq_n_s8(b, 4); }

// Token tiles: rows t0 .. t0+mr-1, padded to `MR` pointers by repeating the last row (its result
// is computed and dropped), so one unrolled kernel serves every tail.
template <int MR>
inline void tile_rows(const PaddedRows& x, int t0, int mr, const int8_t* (&rows)[MR]) {
  for (int i = 0; i < MR; ++i) rows[i] = x.row(t0 + min_int(i, mr - 1));
}

}  // namespace
}  // namespace arm
}  // namespace tfqat
