// ARMv8.6 i8mm variant (Cortex-A510/A710/X2 and later, Snapdragon 8 Gen 1+).
// Built with -march=armv8.6-a+i8mm+dotprod+fp16. smmla multiplies a 2x8 int8 block of two
// tokens by a 2x8 block of two channels into a 2x2 int32 tile: 32 MACs per instruction, twice
// sdot. Ops without a matrix shape (attention over a cache, quantize, float baselines) reuse
// the dotprod / armv8.0 kernels, which this CPU also runs.
#include "common.h"

namespace tfqat {
namespace arm_i8mm {
namespace {

using arm::PaddedRows;

// Two tokens' 8-byte k-slices side by side: the A operand of smmla.
inline int8x16_t zip_lo(int8x16_t a, int8x16_t b) {
  return vreinterpretq_s8_s64(vzip1q_s64(vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b)));
}
inline int8x16_t zip_hi(int8x16_t a, int8x16_t b) {
  return vreinterpretq_s8_s64(vzip2q_s64(vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b)));
}

// Scatters the 2x2 tiles (token pair tp, channel pair p: lanes t0c0 t0c1 t1c0 t1c1) to rows.
template <int M, int NR>
inline void store_tiles(const int32x4_t (&acc)[M / 2][NR / 2], int32_t (*out)[NR]) {
  for (int tp = 0; tp < M / 2; ++tp) {
    for (int p = 0; p < NR / 2; ++p) {
      vst1_s32(out[2 * tp] + 2 * p, vget_low_s32(acc[tp][p]));
      vst1_s32(out[2 * tp + 1] + 2 * p, vget_high_s32(acc[tp][p]));
    }
  }
}

// W8: tiles of 8 channels (4 pairs), [N/8][K/16][4 pairs][2 halves][2 channels][8] int8: each
// 16 bytes is one smmla B operand (channel 2p then 2p+1, 8 consecutive k each).
struct W8Kernel {
  static constexpr int kNr = 8, kKb = 16;
  template <int M>
  void run(const int8_t* const* x, const uint8_t* w, int kp, int32_t (*out)[kNr]) const {
    int32x4_t acc[M / 2][kNr / 2];
    for (int tp = 0; tp < M / 2; ++tp) {
      for (int p = 0; p < kNr / 2; ++p) acc[tp][p] = vdupq_n_s32(0);
    }
    const int8_t* wp = reinterpret_cast<const int8_t*>(w);
    for (int k = 0; k < kp; k += kKb, wp += kNr * kKb) {
      int8x16_t wv[kNr / 2][2];
      for (int p = 0; p < kNr / 2; ++p) {
        wv[p][0] = vld1q_s8(wp + 32 * p);
        wv[p][1] = vld1q_s8(wp + 32 * p + 16);
      }
      for (int tp = 0; tp < M / 2; ++tp) {
        const int8x16_t a = vld1q_s8(x[2 * tp] + k), b = vld1q_s8(x[2 * tp + 1] + k);
        const int8x16_t x0 = zip_lo(a, b), x1 = zip_hi(a, b);
        for (int p = 0; p < kNr / 2; ++p) {
          acc[tp][p] = vmmlaq_s32(acc[tp][p], x0, wv[p][0]);
          acc[tp][p] = vmmlaq_s32(acc[tp][p], x1, wv[p][1]);
        }
      }
    }
    store_tiles<M, kNr>(acc, out);
  }
};

// W4: tiles of 8 channels, [N/8][K/32][4 pairs][2][16] bytes. Within a 32-k block, vector j
// (0, 1) of pair p holds the B operand for k 8j..8j+7 in its low nibbles and for k 16+8j..
// 16+8j+7 in its high nibbles, so two shifts per vector give two ready smmla operands.
struct W4Kernel {
  static constexpr int kNr = 8, kKb = 32;
  template <int M>
  void run(const int8_t* const* x, const uint8_t* w, int kp, int32_t (*out)[kNr]) const {
    int32x4_t acc[M / 2][kNr / 2];
    for (int tp = 0; tp < M / 2; ++tp) {
      for (int p = 0; p < kNr / 2; ++p) acc[tp][p] = vdupq_n_s32(0);
    }
    const int8_t* wp = reinterpret_cast<const int8_t*>(w);
    for (int k = 0; k < kp; k += kKb, wp += kNr * 16) {
      int8x16_t wv[kNr / 2][4];
      for (int p = 0; p < kNr / 2; ++p) {
        const int8x16_t b0 = vld1q_s8(wp + 32 * p), b1 = vld1q_s8(wp + 32 * p + 16);
        wv[p][0] = arm::low_nibbles(b0);
        wv[p][1] = arm::low_nibbles(b1);
        wv[p][2] = arm::high_nibbles(b0);
        wv[p][3] = arm::high_nibbles(b1);
      }
      for (int tp = 0; tp < M / 2; ++tp) {
        const int8x16_t a0 = vld1q_s8(x[2 * tp] + k), a1 = vld1q_s8(x[2 * tp] + k + 16);
        const int8x16_t c0 = vld1q_s8(x[2 * tp + 1] + k), c1 = vld1q_s8(x[2 * tp + 1] + k + 16);
        const int8x16_t xv[4] = {zip_lo(a0, c0), zip_hi(a0, c0), zip_lo(a1, c1), zip_hi(a1, c1)};
        for (int p = 0; p < kNr / 2; ++p) {
          for (int j = 0; j < 4; ++j) acc[tp][p] = vmmlaq_s32(acc[tp][p], xv[j], wv[p][j]);
        }
      }
    }
    store_tiles<M, kNr>(acc, out);
  }
};

}  // namespace

size_t w8_packed_size(int N, int K) {
  return static_cast<size_t>(arm::round_up(N, W8Kernel::kNr)) * arm::round_up(K, W8Kernel::kKb);
}

void w8_pack(const void* canonical, int N, int K, void* packed) {
  const int8_t* src = static_cast<const int8_t*>(canonical);
  int8_t* dst = static_cast<int8_t*>(packed);
  const int kp = arm::round_up(K, W8Kernel::kKb);
  for (int n0 = 0; n0 < N; n0 += W8Kernel::kNr) {
    for (int k0 = 0; k0 < kp; k0 += W8Kernel::kKb) {
      for (int p = 0; p < W8Kernel::kNr / 2; ++p) {
        for (int h = 0; h < 2; ++h) {
          for (int i = 0; i < 16; ++i, ++dst) {
            const int n = n0 + 2 * p + i / 8, k = k0 + 8 * h + i % 8;
            *dst = n < N && k < K ? src[static_cast<size_t>(n) * K + k] : 0;
          }
        }
      }
    }
  }
}

size_t w4_packed_size(int N, int K) {
  return static_cast<size_t>(arm::round_up(N, W4Kernel::kNr)) *
         (arm::round_up(K, W4Kernel::kKb) / 2);
}

void w4_pack(const void* canonical, int N, int K, void* packed) {
  const uint8_t* src = static_cast<const uint8_t*>(canonical);
  uint8_t* dst = static_cast<uint8_t*>(packed);
  const size_t stride = static_cast<size_t>((K + 1) / 2);
  const int kp = arm::round_up(K, W4Kernel::kKb);
  auto nib = [&](int n, int k) {
    return n < N && k < K ? static_cast<uint8_t>(arm::int4_at(src + n * stride, k) & 0x0F) : 0;
  };
  for (int n0 = 0; n0 < N; n0 += W4Kernel::kNr) {
    for (int k0 = 0; k0 < kp; k0 += W4Kernel::kKb) {
      for (int p = 0; p < W4Kernel::kNr / 2; ++p) {
        for (int j = 0; j < 2; ++j) {
          for (int i = 0; i < 16; ++i) {
            const int n = n0 + 2 * p + i / 8, k = k0 + 8 * j + i % 8;
            *dst++ = static_cast<uint8_t>(nib(n, k) | nib(n, k + 16) << 4);
          }
        }
      }
    }
  }
}

// Tokens go in tiles of 4 (two smmla rows); an odd last token is paired with itself.
size_t qlinear_work_size(int T, int K, int, int) { return arm::padded_rows_bytes(T, K); }

void qlinear_prepare(const QLinearArgs& a, int t0, int t1) {
  arm::pad_rows(a, a.w_bits == 8 ? W8Kernel::kKb : W4Kernel::kKb, t0, t1);
}

namespace {
template <typename Kernel>
void tile_with(const Kernel& kernel, size_t tile_bytes, const QLinearArgs& a, int t0, int t1, int n0, int n1) {
  const PaddedRows xr(a, Kernel::kKb);
  tile_bytes *= static_cast<size_t>(xr.kp());
  const arm::GroupScales gs{a.group_size, a.group_size ? (a.K + a.group_size - 1) / a.group_size : 0, a.N,
                            a.ws_gn};
  arm::token_lists(a.bits, t0, t1, false, [&](const int* order, int count, bool) {
    if (a.group_size) {
      arm::qlinear_run_grouped<4, 2, Kernel::kNr>(kernel, xr, order, count, a.xs, a.w_packed, tile_bytes, Kernel::kKb,
                                                  gs, a.bias, a.y, n0, n1);
    } else {
      arm::qlinear_run<4, 2, Kernel::kNr>(kernel, xr, order, count, a.xs, a.w_packed, tile_bytes, a.ws, a.bias, a.N,
                                          a.y, n0, n1);
    }
  });
}
}  // namespace

// Op 3g runs the same kernels one group of k blocks at a time (common.h). The weight tile of
// kNr channels takes kp * kNr bytes (W8) or kp / 2 * kNr (W4).
void qlinear_tile(const QLinearArgs& a, int t0, int t1, int n0, int n1) {
  if (a.w_bits == 8) {
    tile_with(W8Kernel{}, W8Kernel::kNr, a, t0, t1, n0, n1);
  } else {
    tile_with(W4Kernel{}, W4Kernel::kNr / 2, a, t0, t1, n0, n1);
  }
}

namespace {
const QLinearTiles kTiles = {qlinear_work_size, qlinear_prepare, qlinear_tile};
}  // namespace

void qlinear_w8(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K, const void* w_packed,
                const float* ws, const float* bias, int N, float* y) {
  qlinear_whole(kTiles, 8, 0, x, xs, bits, T, K, w_packed, ws, nullptr, bias, N, y);
}
void qlinear_w4(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K, const void* w_packed,
                const float* ws, const float* bias, int N, float* y) {
  qlinear_whole(kTiles, 4, 0, x, xs, bits, T, K, w_packed, ws, nullptr, bias, N, y);
}
void qlinear_w8_grouped(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K, const void* w_packed,
                        int group_size, const float* ws_gn, const float* bias, int N, float* y) {
  qlinear_whole(kTiles, 8, group_size, x, xs, bits, T, K, w_packed, nullptr, ws_gn, bias, N, y);
}
void qlinear_w4_grouped(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K, const void* w_packed,
                        int group_size, const float* ws_gn, const float* bias, int N, float* y) {
  qlinear_whole(kTiles, 4, group_size, x, xs, bits, T, K, w_packed, nullptr, ws_gn, bias, N, y);
}

}  // namespace arm_i8mm

const KernelTable* arm_i8mm_table() {
  static const KernelTable table = {
      Isa::kNeonI8mm,
      arm_neon::quantize_rows,
      arm_i8mm::w4_packed_size,
      arm_i8mm::w4_pack,
      arm_i8mm::qlinear_w4,
      arm_i8mm::w8_packed_size,
      arm_i8mm::w8_pack,
      arm_i8mm::qlinear_w8,
      arm_i8mm::qlinear_w4_grouped,
      arm_i8mm::qlinear_w8_grouped,
      arm_dot::attn_qk,
      arm_neon::attn_pv,
      arm_neon::quantize_probs,
      arm_neon::f32_packed_size,
      arm_neon::f32_pack,
      arm_neon::gemm_f32,
      arm_dot::f16_packed_size,
      arm_dot::f16_pack,
      arm_dot::gemm_f16,
      8,
      arm_i8mm::qlinear_work_size,
      arm_i8mm::qlinear_prepare,
      arm_i8mm::qlinear_tile,
      false,
  };
  return &table;
}

}  // namespace tfqat
