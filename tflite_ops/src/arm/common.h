// Internal to the ARM variants: the kernels one variant borrows from another, and small helpers
// every variant needs (padded activation rows, the reference epilogue).
//
// The helpers live in an anonymous namespace on purpose: each variant file is compiled with its
// own -march, and an inline function with external linkage could be merged across files by the
// linker, handing armv8.6 code to an armv8.0 CPU. Internal linkage keeps one copy per file.
#pragma once

#include <arm_neon.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

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
void attn_pv(const uint8_t* p, float ps, const float* ps_rows, int H, int T, int S, const void* v,
             int kv_bits, const uint8_t* v_rowbits, const float* vs, int Hkv, int s_cap, int D,
             float* out);
void quantize_probs(const float* p, int R, int S, size_t ld, int p_max, const float* ps_static,
                    uint8_t* codes, size_t ldc, float* ps_out);
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

// Element i of a canonical packed int4 row (ref::int4_at, repeated here with internal linkage
// for the reason above).
inline int int4_at(const uint8_t* row, int i) {
  const int b = row[i >> 1];
  const int nib = (i & 1) ? (b >> 4) : (b & 0x0F);
  return nib >= 8 ? nib - 16 : nib;
}
inline int min_int(int a, int b) { return a < b ? a : b; }

// Zeroed scratch memory. Not std::vector on purpose: its out-of-line members are weak symbols
// that every file instantiating them emits with its own -march, and the linker keeps any one
// copy, so an armv8.6 build of std::vector<int>::push_back could run on an armv8.0 CPU.
template <typename T>
class Scratch {
 public:
  explicit Scratch(size_t n) : p_(static_cast<T*>(std::calloc(n ? n : 1, sizeof(T)))) {
    if (!p_) throw std::bad_alloc();
  }
  ~Scratch() { std::free(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() { return p_; }
  const T* data() const { return p_; }
  T& operator[](size_t i) { return p_[i]; }

 private:
  T* p_;
};

// An index list of `size` entries (token or cached-position numbers).
struct IndexList {
  explicit IndexList(int capacity) : idx(static_cast<size_t>(capacity)) {}
  void push(int i) { idx[static_cast<size_t>(size++)] = i; }
  void push_range(int n) {
    for (int i = 0; i < n; ++i) push(i);
  }
  Scratch<int> idx;
  int size = 0;
};

// Activation rows [T][K] seen with K rounded up to a multiple of `kb` (the kernel's k block):
// the caller's codes when K already is one, else the zero-padded copy qlinear_prepare made in
// QLinearArgs::work, so block loops never read past a row.
class PaddedRows {
 public:
  PaddedRows(const QLinearArgs& a, int kb)
      : kp_(round_up(a.K, kb)), base_(kp_ == a.K ? a.x : static_cast<const int8_t*>(a.work)) {}
  const int8_t* row(int t) const { return base_ + static_cast<size_t>(t) * kp_; }
  int kp() const { return kp_; }

 private:
  int kp_;
  const int8_t* base_;
};

// Op 3 / 3g work: room for padded rows at the largest k block of the ARM kernels (32).
inline size_t padded_rows_bytes(int T, int K) { return static_cast<size_t>(T) * round_up(K, 32); }

// qlinear_prepare of the ARM variants: the padded copy of rows [t0, t1), when K needs one.
inline void pad_rows(const QLinearArgs& a, int kb, int t0, int t1) {
  const int kp = round_up(a.K, kb);
  if (kp == a.K) return;
  int8_t* out = static_cast<int8_t*>(a.work);
  for (int t = t0; t < t1; ++t) {
    int8_t* d = out + static_cast<size_t>(t) * kp;
    std::memcpy(d, a.x + static_cast<size_t>(t) * a.K, a.K);
    std::memset(d + a.K, 0, kp - a.K);
  }
}

// The tokens [t0, t1) as index lists for the tile loops, at most kChunk at a time (stack
// arrays: a tile never allocates): run(order, count, four_bit) gets all of them (split false)
// or the 8-bit and the 4-bit tokens as two lists (split true: neon's token control module).
template <typename Run>
inline void token_lists(const uint8_t* bits, int t0, int t1, bool split, Run&& run) {
  constexpr int kChunk = 64;
  int o8[kChunk], o4[kChunk];
  for (int c0 = t0; c0 < t1; c0 += kChunk) {
    const int c1 = min_int(t1, c0 + kChunk);
    int n8 = 0, n4 = 0;
    for (int t = c0; t < c1; ++t) {
      if (split && bits && bits[t] == 4) {
        o4[n4++] = t;
      } else {
        o8[n8++] = t;
      }
    }
    if (n8) run(o8, n8, false);
    if (n4) run(o4, n4, true);
  }
}

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

// Horizontal sums of four accumulators: lane r = sum of a[r].
inline int32x4_t hsum4(const int32x4_t (&a)[4]) {
  return vpaddq_s32(vpaddq_s32(a[0], a[1]), vpaddq_s32(a[2], a[3]));
}

// One tile of M tokens (rows order[0 .. mr-1], padded to M by repeating the last) x NR channels
// of a prepacked weight tile: Kernel::run<M> fills acc, then the reference epilogue stores it.
template <int M, int NR, typename Kernel>
inline void qlinear_tile(const Kernel& kernel, const PaddedRows& x, const int* order, int mr,
                         const float* xs, const uint8_t* wt, const float* ws, const float* bias,
                         int N, int nr, float* y) {
  const int8_t* rows[M];
  for (int i = 0; i < M; ++i) rows[i] = x.row(order[min_int(i, mr - 1)]);
  int32_t acc[M][NR];
  kernel.template run<M>(rows, wt, x.kp(), acc);
  for (int i = 0; i < mr; ++i) {
    const int t = order[i];
    store_row(acc[i], nr, xs[t], ws, bias, y + static_cast<size_t>(t) * N);
  }
}

// The loop every qlinear variant shares over one tile's channels [c0, c1) (c0 a multiple of
// NR): channel tiles outside (a weight tile stays in L1 while every token passes over it),
// token tiles of MR inside, the last tokens in tiles of MT. `order` lists the tokens to compute
// (a tile's, or one bit-width group of them).
template <int MR, int MT, int NR, typename Kernel>
inline void qlinear_run(const Kernel& kernel, const PaddedRows& x, const int* order, int count,
                        const float* xs, const void* w_packed, size_t w_tile_bytes,
                        const float* ws, const float* bias, int N, float* y, int c0, int c1) {
  const uint8_t* w = static_cast<const uint8_t*>(w_packed);
  for (int n0 = c0; n0 < c1; n0 += NR) {
    const int nr = min_int(NR, N - n0);
    const uint8_t* wt = w + static_cast<size_t>(n0 / NR) * w_tile_bytes;
    const float* b = bias ? bias + n0 : nullptr;
    int i = 0;
    for (; i + MR <= count; i += MR) {
      qlinear_tile<MR, NR>(kernel, x, order + i, MR, xs, wt, ws + n0, b, N, nr, y + n0);
    }
    for (; i < count; i += MT) {
      qlinear_tile<MT, NR>(kernel, x, order + i, min_int(MT, count - i), xs, wt, ws + n0, b, N,
                           nr, y + n0);
    }
  }
}

// Group-wise scales (op 3g). G is a multiple of 32, so a group is whole k blocks of every ARM
// layout (16 or 32 k); the int32 tile of one group comes from the same Kernel::run<M> over the
// group's blocks (rows and weight tile advanced to the group start), and its float products are
// added in group order. ws_gn is [ng][N]: the scales of a tile's channels at one group are
// contiguous.
struct GroupScales {
  int G, ng, N;
  const float* ws_gn;
};

// s[m][r] = s[m][r] + (float)acc[m][r] * ws[g][n0 + r] for the mr (<= M) real tokens of the
// tile (the rest repeat the last one) and the nr (<= NR) valid channels.
template <int M, int NR>
inline void group_fold(const int32_t (*acc)[NR], const float* wsg, int mr, int nr,
                       float32x4_t (*s)[NR / 4]) {
  static_assert(NR % 4 == 0, "channel tiles are whole vectors");
  float wpad[NR];
  const float* w = wsg;
  if (nr < NR) {  // never read past the last channel's scale
    for (int i = 0; i < NR; ++i) wpad[i] = i < nr ? wsg[i] : 0.0f;
    w = wpad;
  }
  for (int v = 0; v < NR / 4; ++v) {
    const float32x4_t wv = vld1q_f32(w + 4 * v);
    for (int m = 0; m < M; ++m) {
      if (m < mr) s[m][v] = vaddq_f32(s[m][v], vmulq_f32(vcvtq_f32_s32(vld1q_s32(acc[m] + 4 * v)), wv));
    }
  }
}

// The op 3g epilogue of nr channels of one token: y = s * xs (+ bias), separate fmul / fadd.
template <int NR>
inline void group_store(const float32x4_t (&s)[NR / 4], int nr, float xs, const float* bias, float* y) {
  float tmp[NR];
  for (int v = 0; v < NR / 4; ++v) vst1q_f32(tmp + 4 * v, vmulq_f32(s[v], vdupq_n_f32(xs)));
  for (int i = 0; i < nr; ++i) y[i] = bias ? tmp[i] + bias[i] : tmp[i];
}

// qlinear_tile for op 3g: Kernel::run<M> once per group (kKb and block_bytes: the kernel's k
// block and the bytes one k block of a weight tile takes).
template <int M, int NR, typename Kernel>
inline void qlinear_tile_grouped(const Kernel& kernel, const PaddedRows& x, const int* order, int mr,
                                 const float* xs, const uint8_t* wt, size_t block_bytes, int kb,
                                 const GroupScales& gs, int n0, const float* bias, int nr, float* y) {
  const int8_t* rows[M];
  for (int i = 0; i < M; ++i) rows[i] = x.row(order[min_int(i, mr - 1)]);
  float32x4_t s[M][NR / 4];
  for (int m = 0; m < M; ++m) {
    for (int v = 0; v < NR / 4; ++v) s[m][v] = vdupq_n_f32(0.0f);
  }
  for (int g = 0; g < gs.ng; ++g) {
    const int k0 = g * gs.G;
    const int8_t* grows[M];
    for (int i = 0; i < M; ++i) grows[i] = rows[i] + k0;
    int32_t acc[M][NR];
    kernel.template run<M>(grows, wt + static_cast<size_t>(k0 / kb) * block_bytes, min_int(gs.G, x.kp() - k0),
                           acc);
    group_fold<M, NR>(acc, gs.ws_gn + static_cast<size_t>(g) * gs.N + n0, mr, nr, s);
  }
  for (int i = 0; i < mr; ++i) {
    const int t = order[i];
    group_store<NR>(s[i], nr, xs[t], bias, y + static_cast<size_t>(t) * gs.N);
  }
}

// qlinear_run for op 3g: the same loop order (channel tiles outside, token tiles inside).
template <int MR, int MT, int NR, typename Kernel>
inline void qlinear_run_grouped(const Kernel& kernel, const PaddedRows& x, const int* order, int count,
                                const float* xs, const void* w_packed, size_t w_tile_bytes, int kb,
                                const GroupScales& gs, const float* bias, float* y, int c0, int c1) {
  const uint8_t* w = static_cast<const uint8_t*>(w_packed);
  const size_t block_bytes = w_tile_bytes / static_cast<size_t>(x.kp() / kb);
  for (int n0 = c0; n0 < c1; n0 += NR) {
    const int nr = min_int(NR, gs.N - n0);
    const uint8_t* wt = w + static_cast<size_t>(n0 / NR) * w_tile_bytes;
    const float* b = bias ? bias + n0 : nullptr;
    int i = 0;
    for (; i + MR <= count; i += MR) {
      qlinear_tile_grouped<MR, NR>(kernel, x, order + i, MR, xs, wt, block_bytes, kb, gs, n0, b, nr, y + n0);
    }
    for (; i < count; i += MT) {
      qlinear_tile_grouped<MT, NR>(kernel, x, order + i, min_int(MT, count - i), xs, wt, block_bytes, kb, gs, n0,
                                   b, nr, y + n0);
    }
  }
}

// The d elements past the last full vector block, for every row pair of a tile. Kept out of
// line: inlined, its loop setup ran for every row pair even when there was no tail.
__attribute__((noinline)) inline void qk_tail(const int8_t* const* qr, const uint8_t* const* kr,
                                              int mt, int sr, int d0, int D, int kv_bits,
                                              int32_t (*acc)[4]) {
  for (int m = 0; m < mt; ++m) {
    for (int i = 0; i < sr; ++i) {
      for (int d = d0; d < D; ++d) {
        const int kv = kv_bits == 4 ? int4_at(kr[i], d) : static_cast<int8_t>(kr[i][d]);
        acc[m][i] += qr[m][d] * kv;
      }
    }
  }
}

// One attn_qk tile: M query rows x 4 cached rows of one head, accumulated with Ops (see
// attn_qk_rows), then the scalar d tail and the reference epilogue.
template <typename Ops, int M>
inline void qk_tile(const int8_t* const* qr, const uint8_t* const* kr, int mt, int sr, int D,
                    int kv_bits, const float* qs, const float* ks, int S, float* out) {
  int32x4_t a[M][4];
  for (int m = 0; m < M; ++m) {
    for (int i = 0; i < 4; ++i) a[m][i] = vdupq_n_s32(0);
  }
  int d_vec;
  if (kv_bits == 4) {
    d_vec = D / 32 * 32;
    for (int d = 0; d < d_vec; d += 32) {
      int8x16x2_t qv[M];
      for (int m = 0; m < M; ++m) qv[m] = vld2q_s8(qr[m] + d);
      for (int i = 0; i < 4; ++i) {
        const int8x16_t b = vld1q_s8(reinterpret_cast<const int8_t*>(kr[i]) + d / 2);
        const int8x16_t lo = low_nibbles(b), hi = high_nibbles(b);
        for (int m = 0; m < M; ++m) {
          a[m][i] = Ops::dot4(a[m][i], qv[m].val[0], qv[m].val[1], lo, hi);
        }
      }
    }
  } else {
    d_vec = D / 16 * 16;
    for (int d = 0; d < d_vec; d += 16) {
      int8x16_t qv[M];
      for (int m = 0; m < M; ++m) qv[m] = vld1q_s8(qr[m] + d);
      for (int i = 0; i < 4; ++i) {
        const int8x16_t kv = vld1q_s8(reinterpret_cast<const int8_t*>(kr[i]) + d);
        for (int m = 0; m < M; ++m) a[m][i] = Ops::dot8(a[m][i], qv[m], kv);
      }
    }
  }
  int32_t acc[M][4];
  for (int m = 0; m < M; ++m) vst1q_s32(acc[m], hsum4(a[m]));
  if (d_vec < D) qk_tail(qr, kr, mt, sr, d_vec, D, kv_bits, acc);
  for (int m = 0; m < mt; ++m) {
    float* o = out + static_cast<size_t>(m) * S;
    if (sr == 4) {
      const float32x4_t scale = vmulq_f32(vdupq_n_f32(qs[m]), vld1q_f32(ks));
      vst1q_f32(o, vmulq_f32(vcvtq_f32_s32(vld1q_s32(acc[m])), scale));
    } else {
      for (int i = 0; i < sr; ++i) o[i] = static_cast<float>(acc[m][i]) * (qs[m] * ks[i]);
    }
  }
}

// attn_qk for any 16-lane int8 dot-product step: Ops::dot8(acc, q, k) adds 16 products of int8
// q and k lanes into acc; Ops::dot4(acc, q_even, q_odd, k_lo, k_hi) does the same for 32 lanes
// of an int4 cache row (low nibbles hold the even elements, high nibbles the odd ones, which is
// what vld2 gives for q). Tiles of 4 query rows x 4 cached rows share every load; single rows
// finish the tail so decode (T = 1) does no redundant work.
template <typename Ops>
inline void attn_qk_rows(const int8_t* q, const float* qs, int H, int T, int D, const void* k,
                         int kv_bits, const float* ks, int Hkv, int S, int s_cap,
                         float* scores) {
  const int group = H / Hkv;
  const size_t row_bytes = kv_bits == 4 ? static_cast<size_t>((D + 1) / 2) : static_cast<size_t>(D);
  for (int h = 0; h < H; ++h) {
    const uint8_t* kg =
        static_cast<const uint8_t*>(k) + static_cast<size_t>(h / group) * s_cap * row_bytes;
    for (int t0 = 0; t0 < T; t0 += 4) {
      const int mt = min_int(4, T - t0);
      const int8_t* qr[4];
      for (int m = 0; m < 4; ++m) {
        qr[m] = q + (static_cast<size_t>(h) * T + t0 + min_int(m, mt - 1)) * D;
      }
      float* out = scores + (static_cast<size_t>(h) * T + t0) * S;
      for (int s0 = 0; s0 < S; s0 += 4) {
        const int sr = min_int(4, S - s0);
        const uint8_t* kr[4];
        for (int i = 0; i < 4; ++i) kr[i] = kg + (s0 + min_int(i, sr - 1)) * row_bytes;
        if (mt == 4) {
          qk_tile<Ops, 4>(qr, kr, 4, sr, D, kv_bits, qs + t0, ks + s0, S, out + s0);
        } else {
          for (int m = 0; m < mt; ++m) {
            qk_tile<Ops, 1>(qr + m, kr, 1, sr, D, kv_bits, qs + t0 + m, ks + s0, S,
                            out + static_cast<size_t>(m) * S + s0);
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace arm
}  // namespace tfqat
