// ARMv8.0 NEON variant (every AArch64 CPU, e.g. Cortex-A53/A55 phones, Raspberry Pi 3/4).
// Built with -march=armv8-a. The int8 products come from smull/smlal into int16 lanes, widened
// into int32 with sadalp; how many products share an int16 lane before sadalp is set by the
// operand ranges (int8 x int8 = 2^14: one; int8 x int4 = 2^10: four; int4 x int4 = 2^6: many).
#include <cmath>

#include "common.h"

namespace tfqat {
namespace arm_neon {
namespace {

using arm::PaddedRows;

// int8 x int8: a pair of 2^14 products already fills int16 (-128 * -128 * 2 = 2^15), so every
// smull result goes straight into sadalp.
// Weights: tiles of 4 channels, [N/4][K/16][4][16] int8, zero-padded in N and K.
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
      int8x16_t xv[M];
      for (int m = 0; m < M; ++m) xv[m] = vld1q_s8(x[m] + k);
      for (int r = 0; r < kNr; ++r) {
        const int8x16_t wv = vld1q_s8(wp + r * kKb);
        for (int m = 0; m < M; ++m) {
          acc[m][r] = vpadalq_s16(acc[m][r], vmull_s8(vget_low_s8(xv[m]), vget_low_s8(wv)));
          acc[m][r] = vpadalq_s16(acc[m][r], vmull_high_s8(xv[m], wv));
        }
      }
    }
    for (int m = 0; m < M; ++m) vst1q_s32(out[m], arm::hsum4(acc[m]));
  }
};

// Weights int4: tiles of 4 channels, [N/4][K/32][4][16] bytes; byte j of a 32-element block
// holds element j in its low nibble and element j + 16 in its high nibble, so two shifts give
// 16 contiguous int8 lanes each and the activations are read unshuffled.
constexpr int kW4Nr = 4, kW4Kb = 32;

// 8-bit tokens x int4 weights: |product| <= 2^10, so four smull/smlal share an int16 lane
// (<= 2^12) before one sadalp.
struct W4x8Kernel {
  template <int M>
  void run(const int8_t* const* x, const uint8_t* w, int kp, int32_t (*out)[kW4Nr]) const {
    int32x4_t acc[M][kW4Nr];
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < kW4Nr; ++r) acc[m][r] = vdupq_n_s32(0);
    }
    const int8_t* wp = reinterpret_cast<const int8_t*>(w);
    for (int k = 0; k < kp; k += kW4Kb, wp += kW4Nr * 16) {
      int8x16_t xa[M], xb[M];
      for (int m = 0; m < M; ++m) {
        xa[m] = vld1q_s8(x[m] + k);
        xb[m] = vld1q_s8(x[m] + k + 16);
      }
      for (int r = 0; r < kW4Nr; ++r) {
        const int8x16_t b = vld1q_s8(wp + r * 16);
        const int8x16_t wl = arm::low_nibbles(b), wh = arm::high_nibbles(b);
        for (int m = 0; m < M; ++m) {
          int16x8_t p = vmull_s8(vget_low_s8(xa[m]), vget_low_s8(wl));
          p = vmlal_high_s8(p, xa[m], wl);
          p = vmlal_s8(p, vget_low_s8(xb[m]), vget_low_s8(wh));
          p = vmlal_high_s8(p, xb[m], wh);
          acc[m][r] = vpadalq_s16(acc[m][r], p);
        }
      }
    }
    for (int m = 0; m < M; ++m) vst1q_s32(out[m], arm::hsum4(acc[m]));
  }
};

// 4-bit tokens x int4 weights (the MKMP case): |product| <= 2^6, so int16 lanes accumulate
// whole runs of blocks (4 products per block per lane, <= 2^8) and are widened once per run:
// 4 multiply instructions per 32 MACs instead of 5.
struct W4x4Kernel {
  static constexpr int kRunBlocks = 64;  // 64 * 2^8 = 2^14 < 2^15
  template <int M>
  void run(const int8_t* const* x, const uint8_t* w, int kp, int32_t (*out)[kW4Nr]) const {
    int32x4_t acc[M][kW4Nr];
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < kW4Nr; ++r) acc[m][r] = vdupq_n_s32(0);
    }
    const int8_t* wp = reinterpret_cast<const int8_t*>(w);
    for (int k0 = 0; k0 < kp; k0 += kRunBlocks * kW4Kb) {
      const int k1 = arm::min_int(kp, k0 + kRunBlocks * kW4Kb);
      int16x8_t a16[M][kW4Nr];
      for (int m = 0; m < M; ++m) {
        for (int r = 0; r < kW4Nr; ++r) a16[m][r] = vdupq_n_s16(0);
      }
      for (int k = k0; k < k1; k += kW4Kb, wp += kW4Nr * 16) {
        int8x16_t xa[M], xb[M];
        for (int m = 0; m < M; ++m) {
          xa[m] = vld1q_s8(x[m] + k);
          xb[m] = vld1q_s8(x[m] + k + 16);
        }
        for (int r = 0; r < kW4Nr; ++r) {
          const int8x16_t b = vld1q_s8(wp + r * 16);
          const int8x16_t wl = arm::low_nibbles(b), wh = arm::high_nibbles(b);
          for (int m = 0; m < M; ++m) {
            a16[m][r] = vmlal_s8(a16[m][r], vget_low_s8(xa[m]), vget_low_s8(wl));
            a16[m][r] = vmlal_high_s8(a16[m][r], xa[m], wl);
            a16[m][r] = vmlal_s8(a16[m][r], vget_low_s8(xb[m]), vget_low_s8(wh));
            a16[m][r] = vmlal_high_s8(a16[m][r], xb[m], wh);
          }
        }
      }
      for (int m = 0; m < M; ++m) {
        for (int r = 0; r < kW4Nr; ++r) acc[m][r] = vpadalq_s16(acc[m][r], a16[m][r]);
      }
    }
    for (int m = 0; m < M; ++m) vst1q_s32(out[m], arm::hsum4(acc[m]));
  }
};

struct QkOps {
  static int32x4_t dot8(int32x4_t acc, int8x16_t q, int8x16_t k) {
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(q), vget_low_s8(k)));
    return vpadalq_s16(acc, vmull_high_s8(q, k));
  }
  static int32x4_t dot4(int32x4_t acc, int8x16_t qe, int8x16_t qo, int8x16_t klo, int8x16_t khi) {
    int16x8_t p = vmull_s8(vget_low_s8(qe), vget_low_s8(klo));
    p = vmlal_high_s8(p, qe, klo);
    p = vmlal_s8(p, vget_low_s8(qo), vget_low_s8(khi));
    p = vmlal_high_s8(p, qo, khi);
    return vpadalq_s16(acc, p);
  }
};

// attn_pv accumulation for M probability rows over the cached positions `list`:
// acc[m][d] = sum_s p[m][s] * v[s][d]. u8 x s8 products reach 255 * 128, so both sides widen to
// int16 and smlal accumulates in int32. Each widened v block serves all M rows. An int4 block of
// 16 elements is 8 bytes: low nibbles are the even elements, high nibbles the odd ones, and a
// zip at the end restores d order.
template <int M>
void pv_rows(const uint8_t* const* pr, const arm::IndexList& list, const uint8_t* vg,
             size_t row_bytes, int kv_bits, int D, int32_t* const* acc) {
  int d0 = 0;
  for (; d0 + 16 <= D; d0 += 16) {
    int32x4_t a[M][4];
    for (int m = 0; m < M; ++m) {
      for (int i = 0; i < 4; ++i) a[m][i] = vdupq_n_s32(0);
    }
    for (int j = 0; j < list.size; ++j) {
      const int s = list.idx.data()[j];
      const int8_t* row = reinterpret_cast<const int8_t*>(vg + s * row_bytes);
      int16x8_t v0, v1;
      if (kv_bits == 4) {
        const int8x8_t b = vld1_s8(row + d0 / 2);
        v0 = vmovl_s8(vshr_n_s8(vshl_n_s8(b, 4), 4));
        v1 = vmovl_s8(vshr_n_s8(b, 4));
      } else {
        const int8x16_t v = vld1q_s8(row + d0);
        v0 = vmovl_s8(vget_low_s8(v));
        v1 = vmovl_high_s8(v);
      }
      for (int m = 0; m < M; ++m) {
        const int16_t pp = pr[m][s];
        a[m][0] = vmlal_n_s16(a[m][0], vget_low_s16(v0), pp);
        a[m][1] = vmlal_high_n_s16(a[m][1], v0, pp);
        a[m][2] = vmlal_n_s16(a[m][2], vget_low_s16(v1), pp);
        a[m][3] = vmlal_high_n_s16(a[m][3], v1, pp);
      }
    }
    for (int m = 0; m < M; ++m) {
      int32_t* o = acc[m] + d0;
      if (kv_bits == 4) {
        vst1q_s32(o, vzip1q_s32(a[m][0], a[m][2]));
        vst1q_s32(o + 4, vzip2q_s32(a[m][0], a[m][2]));
        vst1q_s32(o + 8, vzip1q_s32(a[m][1], a[m][3]));
        vst1q_s32(o + 12, vzip2q_s32(a[m][1], a[m][3]));
      } else {
        for (int i = 0; i < 4; ++i) vst1q_s32(o + 4 * i, a[m][i]);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int d = d0; d < D; ++d) {
      int32_t sum = 0;
      for (int j = 0; j < list.size; ++j) {
        const int s = list.idx.data()[j];
        const uint8_t* row = vg + s * row_bytes;
        sum += pr[m][s] * (kv_bits == 4 ? arm::int4_at(row, d) : static_cast<int8_t>(row[d]));
      }
      acc[m][d] = sum;
    }
  }
}

// The reference epilogue of one attn_pv output row.
void pv_store(const int32_t* acc8, const int32_t* acc4, bool two_groups, float s8, float s4,
              int D, float* o) {
  int d = 0;
  if (two_groups) {
    for (; d + 4 <= D; d += 4) {
      const float32x4_t a = vmulq_f32(vcvtq_f32_s32(vld1q_s32(acc8 + d)), vdupq_n_f32(s8));
      const float32x4_t b = vmulq_f32(vcvtq_f32_s32(vld1q_s32(acc4 + d)), vdupq_n_f32(s4));
      vst1q_f32(o + d, vaddq_f32(a, b));
    }
    for (; d < D; ++d) o[d] = static_cast<float>(acc8[d]) * s8 + static_cast<float>(acc4[d]) * s4;
  } else {
    for (; d + 4 <= D; d += 4) {
      vst1q_f32(o + d, vmulq_f32(vcvtq_f32_s32(vld1q_s32(acc8 + d)), vdupq_n_f32(s8)));
    }
    for (; d < D; ++d) o[d] = static_cast<float>(acc8[d]) * s8;
  }
}

// Float weights: tiles of 8 channels, [N/8][K][8], zero-padded in N.
constexpr int kF32Nr = 8;

template <int M>
void gemm_f32_tile(const float* x, int K, const float* w, int mr, int nr, int N, float* y) {
  const float* xr[M];
  for (int m = 0; m < M; ++m) xr[m] = x + static_cast<size_t>(arm::min_int(m, mr - 1)) * K;
  float32x4_t acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = vdupq_n_f32(0.0f);
  int k = 0;
  for (; k + 4 <= K; k += 4, w += 4 * kF32Nr) {
    float32x4_t xv[M];
    for (int m = 0; m < M; ++m) xv[m] = vld1q_f32(xr[m] + k);
    const float32x4_t w00 = vld1q_f32(w), w01 = vld1q_f32(w + 4);
    const float32x4_t w10 = vld1q_f32(w + 8), w11 = vld1q_f32(w + 12);
    const float32x4_t w20 = vld1q_f32(w + 16), w21 = vld1q_f32(w + 20);
    const float32x4_t w30 = vld1q_f32(w + 24), w31 = vld1q_f32(w + 28);
    for (int m = 0; m < M; ++m) {
      acc[m][0] = vfmaq_laneq_f32(acc[m][0], w00, xv[m], 0);
      acc[m][1] = vfmaq_laneq_f32(acc[m][1], w01, xv[m], 0);
      acc[m][0] = vfmaq_laneq_f32(acc[m][0], w10, xv[m], 1);
      acc[m][1] = vfmaq_laneq_f32(acc[m][1], w11, xv[m], 1);
      acc[m][0] = vfmaq_laneq_f32(acc[m][0], w20, xv[m], 2);
      acc[m][1] = vfmaq_laneq_f32(acc[m][1], w21, xv[m], 2);
      acc[m][0] = vfmaq_laneq_f32(acc[m][0], w30, xv[m], 3);
      acc[m][1] = vfmaq_laneq_f32(acc[m][1], w31, xv[m], 3);
    }
  }
  for (; k < K; ++k, w += kF32Nr) {
    const float32x4_t w0 = vld1q_f32(w), w1 = vld1q_f32(w + 4);
    for (int m = 0; m < M; ++m) {
      acc[m][0] = vfmaq_n_f32(acc[m][0], w0, xr[m][k]);
      acc[m][1] = vfmaq_n_f32(acc[m][1], w1, xr[m][k]);
    }
  }
  for (int m = 0; m < mr; ++m) {
    float tmp[kF32Nr];
    vst1q_f32(tmp, acc[m][0]);
    vst1q_f32(tmp + 4, acc[m][1]);
    std::memcpy(y + static_cast<size_t>(m) * N, tmp, sizeof(float) * nr);
  }
}

}  // namespace

void quantize_rows(const float* x, int T, int K, const uint8_t* bits, const float* static_scales,
                   int8_t* codes, float* scales_out) {
  for (int t = 0; t < T; ++t) {
    const float* xr = x + static_cast<size_t>(t) * K;
    const bool b8 = bits[t] == 8;
    const float qmax = b8 ? 127.0f : 7.0f;
    const int32_t lo = b8 ? -128 : -8, hi = b8 ? 127 : 7;
    float s;
    if (static_scales) {
      s = b8 ? static_scales[0] : static_scales[1];
    } else {
      // fmaxnm keeps the running max when |x| is NaN, as the reference's `a > m ? a : m` does.
      float32x4_t vm = vdupq_n_f32(0.0f);
      int k = 0;
      for (; k + 4 <= K; k += 4) vm = vmaxnmq_f32(vm, vabsq_f32(vld1q_f32(xr + k)));
      float m = vmaxnmvq_f32(vm);
      for (; k < K; ++k) {
        const float a = std::fabs(xr[k]);
        m = a > m ? a : m;
      }
      s = m == 0.0f ? 1.0f : m / qmax;
    }
    scales_out[t] = s;
    int8_t* cr = codes + static_cast<size_t>(t) * K;
    // True division and round-half-even (fcvtns), as the reference; a NaN quotient goes to the
    // low bound like the reference's `!(r >= lo)`.
    const float32x4_t vs = vdupq_n_f32(s);
    const int32x4_t vlo = vdupq_n_s32(lo), vhi = vdupq_n_s32(hi);
    auto quant4 = [&](const float* p) {
      const float32x4_t r = vdivq_f32(vld1q_f32(p), vs);
      const int32x4_t c = vminq_s32(vmaxq_s32(vcvtnq_s32_f32(r), vlo), vhi);
      return vbslq_s32(vceqq_f32(r, r), c, vlo);
    };
    int k = 0;
    for (; k + 16 <= K; k += 16) {
      const int16x8_t c0 = vcombine_s16(vmovn_s32(quant4(xr + k)), vmovn_s32(quant4(xr + k + 4)));
      const int16x8_t c1 =
          vcombine_s16(vmovn_s32(quant4(xr + k + 8)), vmovn_s32(quant4(xr + k + 12)));
      vst1q_s8(cr + k, vcombine_s8(vmovn_s16(c0), vmovn_s16(c1)));
    }
    for (; k < K; ++k) {
      float r = std::nearbyint(xr[k] / s);
      if (!(r >= static_cast<float>(lo))) r = static_cast<float>(lo);
      if (r > qmax) r = qmax;
      cr[k] = static_cast<int8_t>(static_cast<int>(r));
    }
  }
}

size_t w8_packed_size(int N, int K) {
  return static_cast<size_t>(arm::round_up(N, W8Kernel::kNr)) * arm::round_up(K, W8Kernel::kKb);
}

void w8_pack(const void* canonical, int N, int K, void* packed) {
  const int8_t* src = static_cast<const int8_t*>(canonical);
  int8_t* dst = static_cast<int8_t*>(packed);
  const int kp = arm::round_up(K, W8Kernel::kKb);
  for (int n0 = 0; n0 < N; n0 += W8Kernel::kNr) {
    for (int k0 = 0; k0 < kp; k0 += W8Kernel::kKb) {
      for (int r = 0; r < W8Kernel::kNr; ++r) {
        for (int j = 0; j < W8Kernel::kKb; ++j, ++dst) {
          const int n = n0 + r, k = k0 + j;
          *dst = n < N && k < K ? src[static_cast<size_t>(n) * K + k] : 0;
        }
      }
    }
  }
}

size_t w4_packed_size(int N, int K) {
  return static_cast<size_t>(arm::round_up(N, kW4Nr)) * (arm::round_up(K, kW4Kb) / 2);
}

void w4_pack(const void* canonical, int N, int K, void* packed) {
  const uint8_t* src = static_cast<const uint8_t*>(canonical);
  uint8_t* dst = static_cast<uint8_t*>(packed);
  const size_t stride = static_cast<size_t>((K + 1) / 2);
  const int kp = arm::round_up(K, kW4Kb);
  auto nib = [&](int n, int k) {
    return n < N && k < K ? static_cast<uint8_t>(arm::int4_at(src + n * stride, k) & 0x0F) : 0;
  };
  for (int n0 = 0; n0 < N; n0 += kW4Nr) {
    for (int k0 = 0; k0 < kp; k0 += kW4Kb) {
      for (int r = 0; r < kW4Nr; ++r) {
        for (int j = 0; j < 16; ++j) {
          *dst++ = static_cast<uint8_t>(nib(n0 + r, k0 + j) | nib(n0 + r, k0 + 16 + j) << 4);
        }
      }
    }
  }
}

// Token tile sizes (2 here, 4 and 3 in qlinear_w4) are the ones with the fewest guest
// instructions under GCC 12 (tflite_ops/ARM.md): larger tiles run out of the 32 vector registers
// and the allocator starts shuffling accumulators.
size_t qlinear_work_size(int T, int K, int, int) { return arm::padded_rows_bytes(T, K); }

void qlinear_prepare(const QLinearArgs& a, int t0, int t1) {
  arm::pad_rows(a, a.w_bits == 8 ? W8Kernel::kKb : kW4Kb, t0, t1);
}

// W4: 8-bit and 4-bit tokens are gathered into two groups (the paper's token control module)
// and each group runs the kernel its operand range allows. Op 3g runs the same kernels and
// token split one group of k blocks at a time (common.h).
void qlinear_tile(const QLinearArgs& a, int t0, int t1, int n0, int n1) {
  const arm::GroupScales gs{a.group_size, a.group_size ? (a.K + a.group_size - 1) / a.group_size : 0, a.N,
                            a.ws_gn};
  if (a.w_bits == 8) {
    const PaddedRows xr(a, W8Kernel::kKb);
    const size_t tile_bytes = static_cast<size_t>(xr.kp()) * W8Kernel::kNr;
    arm::token_lists(a.bits, t0, t1, false, [&](const int* order, int count, bool) {
      if (a.group_size) {
        arm::qlinear_run_grouped<2, 1, W8Kernel::kNr>(W8Kernel{}, xr, order, count, a.xs, a.w_packed, tile_bytes,
                                                      W8Kernel::kKb, gs, a.bias, a.y, n0, n1);
      } else {
        arm::qlinear_run<2, 1, W8Kernel::kNr>(W8Kernel{}, xr, order, count, a.xs, a.w_packed, tile_bytes, a.ws,
                                              a.bias, a.N, a.y, n0, n1);
      }
    });
    return;
  }
  const PaddedRows xr(a, kW4Kb);
  const size_t tile_bytes = static_cast<size_t>(xr.kp()) / 2 * kW4Nr;
  arm::token_lists(a.bits, t0, t1, true, [&](const int* order, int count, bool four) {
    if (a.group_size && four) {
      arm::qlinear_run_grouped<3, 1, kW4Nr>(W4x4Kernel{}, xr, order, count, a.xs, a.w_packed, tile_bytes, kW4Kb,
                                            gs, a.bias, a.y, n0, n1);
    } else if (a.group_size) {
      arm::qlinear_run_grouped<4, 1, kW4Nr>(W4x8Kernel{}, xr, order, count, a.xs, a.w_packed, tile_bytes, kW4Kb,
                                            gs, a.bias, a.y, n0, n1);
    } else if (four) {
      arm::qlinear_run<3, 1, kW4Nr>(W4x4Kernel{}, xr, order, count, a.xs, a.w_packed, tile_bytes, a.ws, a.bias,
                                    a.N, a.y, n0, n1);
    } else {
      arm::qlinear_run<4, 1, kW4Nr>(W4x8Kernel{}, xr, order, count, a.xs, a.w_packed, tile_bytes, a.ws, a.bias,
                                    a.N, a.y, n0, n1);
    }
  });
}

const QLinearTiles kTiles = {qlinear_work_size, qlinear_prepare, qlinear_tile};

// Token tile sizes (2 for W8, 4 and 3 for W4) are the ones with the fewest guest instructions
// under GCC 12 (tflite_ops/ARM.md): larger tiles run out of the 32 vector registers and the
// allocator starts shuffling accumulators.
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

// Positions are split by group once (v_rowbits[s] == 4 -> group 1), then each group
// accumulates over its own list, so no lane is spent on a zeroed probability. Query rows of one
// head go four at a time.
void attn_pv(const uint8_t* p, float ps, const float* ps_rows, int H, int T, int S, const void* v,
             int kv_bits, const uint8_t* v_rowbits, const float* vs, int Hkv, int s_cap, int D,
             float* out) {
  constexpr int kM = 4;
  const int group = H / Hkv;
  const size_t row_bytes = kv_bits == 4 ? static_cast<size_t>((D + 1) / 2) : static_cast<size_t>(D);
  arm::IndexList lists[2] = {arm::IndexList(S), arm::IndexList(S)};
  for (int s = 0; s < S; ++s) lists[v_rowbits && v_rowbits[s] == 4 ? 1 : 0].push(s);
  const bool two_groups = v_rowbits != nullptr;
  arm::Scratch<int32_t> buf(2 * kM * static_cast<size_t>(D));
  int32_t* acc8[kM];
  int32_t* acc4[kM];
  for (int m = 0; m < kM; ++m) {
    acc8[m] = buf.data() + static_cast<size_t>(m) * D;
    acc4[m] = buf.data() + static_cast<size_t>(kM + m) * D;
  }
  for (int h = 0; h < H; ++h) {
    const uint8_t* vg =
        static_cast<const uint8_t*>(v) + static_cast<size_t>(h / group) * s_cap * row_bytes;
    for (int t0 = 0; t0 < T; t0 += kM) {
      const int mt = arm::min_int(kM, T - t0);
      const uint8_t* pr[kM];
      for (int m = 0; m < mt; ++m) pr[m] = p + (static_cast<size_t>(h) * T + t0 + m) * S;
      for (int g = 0; g < (two_groups ? 2 : 1); ++g) {
        int32_t* const* acc = g == 0 ? acc8 : acc4;
        if (mt == kM) {
          pv_rows<kM>(pr, lists[g], vg, row_bytes, kv_bits, D, acc);
        } else {
          for (int m = 0; m < mt; ++m) {
            pv_rows<1>(pr + m, lists[g], vg, row_bytes, kv_bits, D, acc + m);
          }
        }
      }
      for (int m = 0; m < mt; ++m) {
        const size_t row = static_cast<size_t>(h) * T + t0 + m;
        const float pr_scale = ps_rows ? ps_rows[row] : ps;
        pv_store(acc8[m], acc4[m], two_groups, pr_scale * vs[0],
                 two_groups ? pr_scale * vs[1] : 0.0f, D, out + row * D);
      }
    }
  }
}

// Op 4p, the reference's float operations lane by lane. The max and the clamp at 0 use a
// compare and a select (`x > m ? x : m`), not fmaxnm, which would return a signaling NaN's quiet
// copy instead of ignoring it; fcvtns rounds half to even.
void quantize_probs(const float* p, int R, int S, size_t ld, int p_max, const float* ps_static,
                    uint8_t* codes, size_t ldc, float* ps_out) {
  const float hi = static_cast<float>(p_max);
  const float32x4_t vhi = vdupq_n_f32(hi), zero = vdupq_n_f32(0.0f);
  for (int r = 0; r < R; ++r) {
    const float* pr = p + static_cast<size_t>(r) * ld;
    float s;
    if (ps_static) {
      s = *ps_static;
    } else {
      float32x4_t vm = zero;
      int i = 0;
      for (; i + 4 <= S; i += 4) {
        const float32x4_t x = vld1q_f32(pr + i);
        vm = vbslq_f32(vcgtq_f32(x, vm), x, vm);
      }
      float m = vmaxvq_f32(vm);  // lanes are +0 or positive, never NaN
      for (; i < S; ++i) m = pr[i] > m ? pr[i] : m;
      s = m == 0.0f ? 1.0f : m / hi;
      ps_out[r] = s;
    }
    const float32x4_t vs = vdupq_n_f32(s);
    auto quant4 = [&](const float* x) {
      const float32x4_t q = vdivq_f32(vld1q_f32(x), vs);
      return vcvtnq_u32_f32(vminq_f32(vbslq_f32(vcgtq_f32(q, zero), q, zero), vhi));
    };
    uint8_t* cr = codes + static_cast<size_t>(r) * ldc;
    int i = 0;
    for (; i + 16 <= S; i += 16) {
      const uint16x8_t c0 = vcombine_u16(vmovn_u32(quant4(pr + i)), vmovn_u32(quant4(pr + i + 4)));
      const uint16x8_t c1 =
          vcombine_u16(vmovn_u32(quant4(pr + i + 8)), vmovn_u32(quant4(pr + i + 12)));
      vst1q_u8(cr + i, vcombine_u8(vmovn_u16(c0), vmovn_u16(c1)));
    }
    for (; i < S; ++i) {
      float q = pr[i] / s;
      if (!(q > 0.0f)) q = 0.0f;
      if (q > hi) q = hi;
      cr[i] = static_cast<uint8_t>(static_cast<int>(std::nearbyint(q)));
    }
  }
}

size_t f32_packed_size(int N, int K) {
  return static_cast<size_t>(arm::round_up(N, kF32Nr)) * K * sizeof(float);
}

void f32_pack(const void* canonical, int N, int K, void* packed) {
  const float* src = static_cast<const float*>(canonical);
  float* dst = static_cast<float*>(packed);
  for (int n0 = 0; n0 < N; n0 += kF32Nr) {
    for (int k = 0; k < K; ++k) {
      for (int r = 0; r < kF32Nr; ++r) {
        *dst++ = n0 + r < N ? src[static_cast<size_t>(n0 + r) * K + k] : 0.0f;
      }
    }
  }
}

// The float baseline is checked to a tolerance, so it may use fused multiply-add.
void gemm_f32(const float* x, int T, int K, const void* w_packed, int N, float* y) {
  const float* w = static_cast<const float*>(w_packed);
  for (int n0 = 0; n0 < N; n0 += kF32Nr) {
    const int nr = arm::min_int(kF32Nr, N - n0);
    const float* wt = w + static_cast<size_t>(n0 / kF32Nr) * K * kF32Nr;
    int t = 0;
    for (; t + 4 <= T; t += 4) {
      gemm_f32_tile<4>(x + static_cast<size_t>(t) * K, K, wt, 4, nr, N,
                       y + static_cast<size_t>(t) * N + n0);
    }
    for (; t < T; ++t) {
      gemm_f32_tile<1>(x + static_cast<size_t>(t) * K, K, wt, 1, nr, N,
                       y + static_cast<size_t>(t) * N + n0);
    }
  }
}

}  // namespace arm_neon

const KernelTable* arm_neon_table() {
  static const KernelTable table = {
      Isa::kNeon,
      arm_neon::quantize_rows,
      arm_neon::w4_packed_size,
      arm_neon::w4_pack,
      arm_neon::qlinear_w4,
      arm_neon::w8_packed_size,
      arm_neon::w8_pack,
      arm_neon::qlinear_w8,
      arm_neon::qlinear_w4_grouped,
      arm_neon::qlinear_w8_grouped,
      arm_neon::attn_qk,
      arm_neon::attn_pv,
      arm_neon::quantize_probs,
      arm_neon::f32_packed_size,
      arm_neon::f32_pack,
      arm_neon::gemm_f32,
      ref::f16_packed_size,
      ref::f16_pack,
      ref::gemm_f16,
      4,
      arm_neon::qlinear_work_size,
      arm_neon::qlinear_prepare,
      arm_neon::qlinear_tile,
      false,
  };
  return &table;
}

}  // namespace tfqat
