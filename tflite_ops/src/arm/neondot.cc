// ARMv8.2 dotprod + fp16 variant (Cortex-A55/A76 and later: most phones since 2018).
// Built with -march=armv8.2-a+dotprod+fp16. sdot adds four int8 products straight into an int32
// lane, so int8 x int8 needs no int16 stage and 16 MACs cost one instruction. It reuses the
// armv8.0 weight layouts (4-channel tiles), so only the inner products change.
#include "common.h"

namespace tfqat {
namespace arm_dot {
namespace {

using arm::PaddedRows;

// W8 layout of arm_neon::w8_pack: [N/4][K/16][4][16] int8.
struct W8Kernel {
  static constexpr int kNr = 4, kKb = 16;
  template <int M>
  void run(const int8_t* const* x, const uint8_t* w, int kp, int32_t (*out)[kNr]) const {
    int32x4_t acc[M][kNr];
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < kNr; ++r) acc[m][r] = vdupq_n_s32(0);
    }
    const int8_t* wp = reinterpret_cast<const int8_t*>(w);
    for (int k = 0; k < kp; k += kKb, wp += kNr * kKb) {
      int8x16_t wv[kNr];
      for (int r = 0; r < kNr; ++r) wv[r] = vld1q_s8(wp + r * kKb);
      for (int m = 0; m < M; ++m) {
        const int8x16_t xv = vld1q_s8(x[m] + k);
        for (int r = 0; r < kNr; ++r) acc[m][r] = vdotq_s32(acc[m][r], xv, wv[r]);
      }
    }
    for (int m = 0; m < M; ++m) vst1q_s32(out[m], arm::hsum4(acc[m]));
  }
};

// W4 layout of arm_neon::w4_pack: [N/4][K/32][4][16] bytes, element j in the low nibble and
// j + 16 in the high nibble. The nibbles are sign-extended to int8 once per tile and shared by
// every token of the tile; 8-bit and 4-bit tokens take the same path (sdot has no narrower
// form, and two signed nibbles cannot share one int8 lane without guard bits).
struct W4Kernel {
  static constexpr int kNr = 4, kKb = 32;
  template <int M>
  void run(const int8_t* const* x, const uint8_t* w, int kp, int32_t (*out)[kNr]) const {
    int32x4_t acc[M][kNr];
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < kNr; ++r) acc[m][r] = vdupq_n_s32(0);
    }
    const int8_t* wp = reinterpret_cast<const int8_t*>(w);
    for (int k = 0; k < kp; k += kKb, wp += kNr * 16) {
      int8x16_t wl[kNr], wh[kNr];
      for (int r = 0; r < kNr; ++r) {
        const int8x16_t b = vld1q_s8(wp + r * 16);
        wl[r] = arm::low_nibbles(b);
        wh[r] = arm::high_nibbles(b);
      }
      for (int m = 0; m < M; ++m) {
        const int8x16_t xa = vld1q_s8(x[m] + k), xb = vld1q_s8(x[m] + k + 16);
        for (int r = 0; r < kNr; ++r) {
          acc[m][r] = vdotq_s32(acc[m][r], xa, wl[r]);
          acc[m][r] = vdotq_s32(acc[m][r], xb, wh[r]);
        }
      }
    }
    for (int m = 0; m < M; ++m) vst1q_s32(out[m], arm::hsum4(acc[m]));
  }
};

struct QkOps {
  static int32x4_t dot8(int32x4_t acc, int8x16_t q, int8x16_t k) { return vdotq_s32(acc, q, k); }
  static int32x4_t dot4(int32x4_t acc, int8x16_t qe, int8x16_t qo, int8x16_t klo, int8x16_t khi) {
    return vdotq_s32(vdotq_s32(acc, qe, klo), qo, khi);
  }
};

// FP16 weights: tiles of 16 channels (two vectors of 8 lanes), [N/16][K][16] binary16,
// zero-padded in N.
constexpr int kF16Nr = 16;

inline float16x8_t load_h8(const uint16_t* p) { return vreinterpretq_f16_u16(vld1q_u16(p)); }

template <int M>
void gemm_f16_tile(const uint16_t* x, int K, const uint16_t* w, int mr, int nr, int N,
                   uint16_t* y) {
  const uint16_t* xr[M];
  for (int m = 0; m < M; ++m) xr[m] = x + static_cast<size_t>(arm::min_int(m, mr - 1)) * K;
  float16x8_t acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = vreinterpretq_f16_u16(vdupq_n_u16(0));
  int k = 0;
  for (; k + 4 <= K; k += 4, w += 4 * kF16Nr) {
    const float16x8_t w00 = load_h8(w), w01 = load_h8(w + 8);
    const float16x8_t w10 = load_h8(w + 16), w11 = load_h8(w + 24);
    const float16x8_t w20 = load_h8(w + 32), w21 = load_h8(w + 40);
    const float16x8_t w30 = load_h8(w + 48), w31 = load_h8(w + 56);
    for (int m = 0; m < M; ++m) {
      const float16x4_t xv = vreinterpret_f16_u16(vld1_u16(xr[m] + k));
      acc[m][0] = vfmaq_lane_f16(acc[m][0], w00, xv, 0);
      acc[m][1] = vfmaq_lane_f16(acc[m][1], w01, xv, 0);
      acc[m][0] = vfmaq_lane_f16(acc[m][0], w10, xv, 1);
      acc[m][1] = vfmaq_lane_f16(acc[m][1], w11, xv, 1);
      acc[m][0] = vfmaq_lane_f16(acc[m][0], w20, xv, 2);
      acc[m][1] = vfmaq_lane_f16(acc[m][1], w21, xv, 2);
      acc[m][0] = vfmaq_lane_f16(acc[m][0], w30, xv, 3);
      acc[m][1] = vfmaq_lane_f16(acc[m][1], w31, xv, 3);
    }
  }
  for (; k < K; ++k, w += kF16Nr) {
    const float16x8_t w0 = load_h8(w), w1 = load_h8(w + 8);
    for (int m = 0; m < M; ++m) {
      const float16x4_t xv = vreinterpret_f16_u16(vdup_n_u16(xr[m][k]));
      acc[m][0] = vfmaq_lane_f16(acc[m][0], w0, xv, 0);
      acc[m][1] = vfmaq_lane_f16(acc[m][1], w1, xv, 0);
    }
  }
  for (int m = 0; m < mr; ++m) {
    uint16_t tmp[kF16Nr];
    vst1q_u16(tmp, vreinterpretq_u16_f16(acc[m][0]));
    vst1q_u16(tmp + 8, vreinterpretq_u16_f16(acc[m][1]));
    std::memcpy(y + static_cast<size_t>(m) * N, tmp, sizeof(uint16_t) * nr);
  }
}

}  // namespace

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
      arm::qlinear_run_grouped<4, 1, Kernel::kNr>(kernel, xr, order, count, a.xs, a.w_packed, tile_bytes, Kernel::kKb,
                                                  gs, a.bias, a.y, n0, n1);
    } else {
      arm::qlinear_run<4, 1, Kernel::kNr>(kernel, xr, order, count, a.xs, a.w_packed, tile_bytes, a.ws, a.bias, a.N,
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

void attn_qk(const int8_t* q, const float* qs, int H, int T, int D, const void* k, int kv_bits,
             const float* ks, int Hkv, int S, int s_cap, float* scores) {
  arm::attn_qk_rows<QkOps>(q, qs, H, T, D, k, kv_bits, ks, Hkv, S, s_cap, scores);
}

size_t f16_packed_size(int N, int K) {
  return static_cast<size_t>(arm::round_up(N, kF16Nr)) * K * sizeof(uint16_t);
}

void f16_pack(const void* canonical, int N, int K, void* packed) {
  const uint16_t* src = static_cast<const uint16_t*>(canonical);
  uint16_t* dst = static_cast<uint16_t*>(packed);
  for (int n0 = 0; n0 < N; n0 += kF16Nr) {
    for (int k = 0; k < K; ++k) {
      for (int r = 0; r < kF16Nr; ++r) {
        *dst++ = n0 + r < N ? src[static_cast<size_t>(n0 + r) * K + k] : 0;
      }
    }
  }
}

// FP16 baseline with fp16 accumulation (the phone FP16 path the paper compares against).
void gemm_f16(const uint16_t* x, int T, int K, const void* w_packed, int N, uint16_t* y) {
  const uint16_t* w = static_cast<const uint16_t*>(w_packed);
  for (int n0 = 0; n0 < N; n0 += kF16Nr) {
    const int nr = arm::min_int(kF16Nr, N - n0);
    const uint16_t* wt = w + static_cast<size_t>(n0 / kF16Nr) * K * kF16Nr;
    int t = 0;
    for (; t + 4 <= T; t += 4) {
      gemm_f16_tile<4>(x + static_cast<size_t>(t) * K, K, wt, 4, nr, N,
                       y + static_cast<size_t>(t) * N + n0);
    }
    for (; t < T; ++t) {
      gemm_f16_tile<1>(x + static_cast<size_t>(t) * K, K, wt, 1, nr, N,
                       y + static_cast<size_t>(t) * N + n0);
    }
  }
}

}  // namespace arm_dot

const KernelTable* arm_neondot_table() {
  static const KernelTable table = {
      Isa::kNeonDot,
      arm_neon::quantize_rows,
      arm_neon::w4_packed_size,
      arm_neon::w4_pack,
      arm_dot::qlinear_w4,
      arm_neon::w8_packed_size,
      arm_neon::w8_pack,
      arm_dot::qlinear_w8,
      arm_dot::qlinear_w4_grouped,
      arm_dot::qlinear_w8_grouped,
      arm_dot::attn_qk,
      arm_neon::attn_pv,
      arm_neon::quantize_probs,
      arm_neon::f32_packed_size,
      arm_neon::f32_pack,
      arm_neon::gemm_f32,
      arm_dot::f16_packed_size,
      arm_dot::f16_pack,
      arm_dot::gemm_f16,
      4,
      arm_dot::qlinear_work_size,
      arm_dot::qlinear_prepare,
      arm_dot::qlinear_tile,
      false,
  };
  return &table;
}

}  // namespace tfqat
