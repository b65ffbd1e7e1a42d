// x86-64 AVX-512 F/BW/VL + VNNI variant (compiled with those flags; reached only through
// dispatch.cc after a CPU check).
//
// vpdpbusd multiplies unsigned by signed bytes, so each packed weight layout moves the sign
// where it is exact and cheap (README "Packing"):
// - W4: nibbles stored offset-binary (w + 8, in [0, 15]) as the unsigned operand, activations
//   signed; the kernel subtracts 8 * sum_k x[t][k] once per token.
// - W8: activations offset by 128 (x ^ 0x80) as the unsigned operand, weights signed; the
//   packer stores 128 * sum_k w[n][k] per row for the kernel to subtract.
// Both accumulate exactly in int32 and then run the reference epilogue.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../variants.h"

namespace tfqat {
namespace {

constexpr int kNr = 16;  // output rows per block: one int32 lane each
constexpr int kPb = 4;   // blocks per panel of the integer layouts

// Blocks [p * kPb, p * kPb + pb) form panel p; its group g starts at base + g * 64 * pb.
struct Panel {
  size_t base;
  size_t gstride;
  int pb;
};
inline Panel panel_of(int p, int Nb, size_t block_bytes) {
  const int pb = Nb - p * kPb < kPb ? Nb - p * kPb : kPb;
  return {static_cast<size_t>(p) * kPb * block_bytes, static_cast<size_t>(64) * pb, pb};
}

inline int round_up(int v, int m) { return (v + m - 1) / m * m; }
inline __mmask16 tail16(int rem) { return rem >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1); }
inline __mmask64 tail64(int rem) { return rem >= 64 ? ~__mmask64(0) : (__mmask64(1) << rem) - 1; }
inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// y[n0 .. n0+15] = (float)acc * (xs * ws[n]) (+ bias[n]), masked to N.
inline void epilogue_store(float* y, int n0, int N, __m512i acc, float xs, const float* ws,
                           const float* bias) {
  const __mmask16 m = tail16(N - n0);
  const __m512 s = _mm512_mul_ps(_mm512_set1_ps(xs), _mm512_maskz_loadu_ps(m, ws + n0));
  __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), s);
  if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + n0));
  _mm512_mask_storeu_ps(y + n0, m, v);
}

// The integer layouts start with a one-byte header: the offset (1..64) from the buffer to the
// 64-byte aligned payload, chosen at pack time. 64-byte weight loads then never straddle two
// cache lines (worth ~20% on a memory-bound GEMV), whatever the caller's allocator returns; a
// buffer copied elsewhere stays correct, only possibly misaligned.
constexpr size_t kHeader = 64;
inline uint8_t* payload_for_pack(void* packed) {
  uint8_t* p = static_cast<uint8_t*>(packed);
  const size_t off = kHeader - reinterpret_cast<uintptr_t>(p) % kHeader;
  p[0] = static_cast<uint8_t>(off);
  return p + off;
}
inline const uint8_t* payload(const void* packed) {
  const uint8_t* p = static_cast<const uint8_t*>(packed);
  return p + p[0];
}

// Per-call scratch, reused across calls on the same thread.
template <typename T>
T* scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// ---- op 1 ------------------------------------------------------------------------------
void quantize_rows(const float* x, int T, int K, const uint8_t* bits, const float* static_scales,
                   int8_t* codes, float* scales_out) {
  for (int t = 0; t < T; ++t) {
    const float* xr = x + static_cast<size_t>(t) * K;
    const bool b8 = bits[t] == 8;
    const float qmax = b8 ? 127.0f : 7.0f;
    float s;
    if (static_scales) {
      s = b8 ? static_scales[0] : static_scales[1];
    } else {
      __m512 m = _mm512_setzero_ps();
      for (int k = 0; k < K; k += 16) {
        const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(tail16(K - k), xr + k));
        m = _mm512_max_ps(a, m);  // NaN in a yields m: NaN is ignored like the reference
      }
      const float mx = _mm512_reduce_max_ps(m);
      s = mx == 0.0f ? 1.0f : mx / qmax;
    }
    scales_out[t] = s;
    const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-qmax - 1.0f), hi = _mm512_set1_ps(qmax);
    int8_t* cr = codes + static_cast<size_t>(t) * K;
    for (int k = 0; k < K; k += 16) {
      const __mmask16 mk = tail16(K - k);
      __m512 q = _mm512_div_ps(_mm512_maskz_loadu_ps(mk, xr + k), vs);
      q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);  // max(NaN, lo) = lo, as in the reference
      _mm512_mask_cvtepi32_storeu_epi8(cr + k, mk, _mm512_cvtps_epi32(q));
    }
  }
}

// ---- op 3: W4 ---------------------------------------------------------------------------
// Packed W4 (after the alignment header): panels of up to 4 blocks of 16 rows (the last panel
// may hold fewer). Per panel, per group g of 8 k, per block: 64 bytes, row j's dword holds
// k = 8g + i (i = 0..3) in the low nibbles of bytes 0..3 and k = 8g + 4 + i in the high
// nibbles, all as w + 8. Rows >= N and k >= K are w = 0. A GEMV pass over a panel reads one
// sequential stream.
size_t w4_packed_size(int N, int K) {
  return kHeader + static_cast<size_t>(round_up(N, kNr)) * round_up(K, 8) / 2;
}

void w4_pack(const void* canonical, int N, int K, void* packed) {
  const uint8_t* c = static_cast<const uint8_t*>(canonical);
  uint8_t* p = payload_for_pack(packed);
  const int G = round_up(K, 8) / 8, stride = (K + 1) / 2, Nb = round_up(N, kNr) / kNr;
  for (int pi = 0; pi * kPb < Nb; ++pi) {
    const int pb = panel_of(pi, Nb, 0).pb;
    for (int g = 0; g < G; ++g) {
      for (int jj = 0; jj < pb * kNr; ++jj) {
        const int n = pi * kPb * kNr + jj;
        for (int i = 0; i < 4; ++i) {
          const int k0 = 8 * g + i, k1 = k0 + 4;
          const int lo = n < N && k0 < K ? ref::int4_at(c + static_cast<size_t>(n) * stride, k0) : 0;
          const int hi = n < N && k1 < K ? ref::int4_at(c + static_cast<size_t>(n) * stride, k1) : 0;
          *p++ = static_cast<uint8_t>((lo + 8) | ((hi + 8) << 4));
        }
      }
    }
  }
}

// MR tokens x NB blocks over `nc` 8-k chunks (all of Kp / 8 for op 3, one group for op 3g),
// token m's accumulators starting from init[m] (op 3g starts from the negated offset correction,
// which saves a subtraction per accumulator and group).
// Low and high nibbles accumulate separately: the high one is masked in place (16 * (w + 8)),
// which saves a shift per vector; it is divided out exactly at the end.
template <int MR, int NB>
inline void w4_tile(const int8_t* xp, int Kp, const uint8_t* wb, size_t gstride, int nc, const __m512i (&init)[MR],
                    __m512i (&acc)[MR][NB]) {
  __m512i al[MR][NB], ah[MR][NB];
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NB; ++j) {
      al[m][j] = init[m];
      ah[m][j] = _mm512_setzero_si512();
    }
  }
  const __m512i m0f = _mm512_set1_epi8(0x0F), mf0 = _mm512_set1_epi8(static_cast<char>(0xF0));
  for (int g = 0; g < nc; ++g) {
    __m512i wl[NB], wh[NB];
    for (int j = 0; j < NB; ++j) {
      const __m512i v = _mm512_loadu_si512(wb + g * gstride + j * 64);
      wl[j] = _mm512_and_si512(v, m0f);
      wh[j] = _mm512_and_si512(v, mf0);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512i xl = _mm512_set1_epi32(load_i32(xp + static_cast<size_t>(m) * Kp + 8 * g));
      const __m512i xh = _mm512_set1_epi32(load_i32(xp + static_cast<size_t>(m) * Kp + 8 * g + 4));
      for (int j = 0; j < NB; ++j) {
        al[m][j] = _mm512_dpbusd_epi32(al[m][j], wl[j], xl);
        ah[m][j] = _mm512_dpbusd_epi32(ah[m][j], wh[j], xh);
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_add_epi32(al[m][j], _mm512_srai_epi32(ah[m][j], 4));
  }
}

// GEMM tile: one accumulator per (token, block); the high nibbles are shifted down so both
// halves add into it directly. Broadcasts are hoisted and shared by all NB blocks.
template <int MR, int NB>
inline void w4_tile_gemm(const int8_t* xp, int Kp, const uint8_t* wb, size_t gstride, int nc,
                         const __m512i (&init)[MR], __m512i (&acc)[MR][NB]) {
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NB; ++j) acc[m][j] = init[m];
  }
  const __m512i m0f = _mm512_set1_epi8(0x0F);
  for (int g = 0; g < nc; ++g) {
    __m512i xl[MR], xh[MR];
    for (int m = 0; m < MR; ++m) {
      xl[m] = _mm512_set1_epi32(load_i32(xp + static_cast<size_t>(m) * Kp + 8 * g));
      xh[m] = _mm512_set1_epi32(load_i32(xp + static_cast<size_t>(m) * Kp + 8 * g + 4));
    }
    for (int j = 0; j < NB; ++j) {
      const __m512i v = _mm512_loadu_si512(wb + g * gstride + j * 64);
      const __m512i wl = _mm512_and_si512(v, m0f), wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
      for (int m = 0; m < MR; ++m) {
        acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], wl, xl[m]);
        acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], wh, xh[m]);
      }
    }
  }
}

template <int MR, int NB>
inline void w4_acc(const int8_t* xb, int Kp, const uint8_t* wb, size_t gstride, int nc, const __m512i (&init)[MR],
                   __m512i (&acc)[MR][NB]) {
  if (MR == 1) {
    w4_tile<MR, NB>(xb, Kp, wb, gstride, nc, init, acc);
  } else {
    w4_tile_gemm<MR, NB>(xb, Kp, wb, gstride, nc, init, acc);
  }
}

// Group-wise scales (op 3g). A group of G k (a multiple of 32) is G / 8 packed W4 chunks or
// G / 4 W8 quads, so it never splits one: op 3's integer tiles run once per group, and each
// group's int32 tile becomes float and is added to a float tile in group order. The scales of 16
// consecutive channels at one group are one load from ws ([ng][N]).
struct Groups {
  int G, ng;
  const float* ws;      // [ng][N]
  const int32_t* corr;  // [T][ng]: the offset correction, -factor * sum_{k in g} x[t][k]
};

// The accumulator start of tokens t0 .. t0 + MR - 1 in group g: the (negated) correction.
template <int MR>
inline void group_init(const Groups& gr, int g, int t0, __m512i (&init)[MR]) {
  for (int m = 0; m < MR; ++m) init[m] = _mm512_set1_epi32(gr.corr[static_cast<size_t>(t0 + m) * gr.ng + g]);
}

// s[m][j] = s[m][j] + (float)acc[m][j] * ws[g][n0 + 16 j .. +15].
template <int MR, int NB>
inline void group_fold(const __m512i (&acc)[MR][NB], const Groups& gr, int g, int n0, int N, __m512 (&s)[MR][NB]) {
  const float* wsg = gr.ws + static_cast<size_t>(g) * N + n0;
  for (int j = 0; j < NB; ++j) {
    const __m512 wv = _mm512_maskz_loadu_ps(tail16(N - n0 - 16 * j), wsg + 16 * j);
    for (int m = 0; m < MR; ++m) s[m][j] = _mm512_add_ps(s[m][j], _mm512_mul_ps(_mm512_cvtepi32_ps(acc[m][j]), wv));
  }
}

// y = s * xs[t] (+ bias), masked to N.
template <int MR, int NB>
inline void group_store(const __m512 (&s)[MR][NB], int t0, int n0, const float* xs, const float* bias, int N,
                        float* y) {
  for (int m = 0; m < MR; ++m) {
    float* yr = y + static_cast<size_t>(t0 + m) * N;
    for (int j = 0; j < NB; ++j) {
      const int n = n0 + 16 * j;
      const __mmask16 mk = tail16(N - n);
      __m512 v = _mm512_mul_ps(s[m][j], _mm512_set1_ps(xs[t0 + m]));
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, bias + n));
      _mm512_mask_storeu_ps(yr + n, mk, v);
    }
  }
}

// Runs an MR x NB tile over tokens [t0, t0 + MR) and blocks [b0, b0 + NB) = panel blocks
// [jb, jb + NB); gr == nullptr: op 3's per-channel epilogue, else op 3g's.
template <int MR, int NB>
inline void w4_run(const int8_t* xp, const int32_t* corr, int Kp, const uint8_t* w, const Panel& pn, int jb,
                   int t0, int b0, const Groups* gr, const float* xs, const float* ws, const float* bias, int N,
                   float* y) {
  const int8_t* xb = xp + static_cast<size_t>(t0) * Kp;
  const uint8_t* wb = w + pn.base + jb * 64;
  __m512i acc[MR][NB], init[MR];
  if (!gr) {
    for (int m = 0; m < MR; ++m) init[m] = _mm512_setzero_si512();
    w4_acc<MR, NB>(xb, Kp, wb, pn.gstride, Kp / 8, init, acc);
    for (int m = 0; m < MR; ++m) {
      const __m512i c = _mm512_set1_epi32(corr[t0 + m]);
      for (int j = 0; j < NB; ++j) {
        epilogue_store(y + static_cast<size_t>(t0 + m) * N, (b0 + j) * kNr, N, _mm512_sub_epi32(acc[m][j], c),
                       xs[t0 + m], ws, bias);
      }
    }
    return;
  }
  __m512 s[MR][NB];
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NB; ++j) s[m][j] = _mm512_setzero_ps();
  }
  const int gc = gr->G / 8, nc = Kp / 8;
  for (int g = 0; g < gr->ng; ++g) {
    const int c0 = g * gc;
    group_init<MR>(*gr, g, t0, init);
    w4_acc<MR, NB>(xb + 8 * c0, Kp, wb + c0 * pn.gstride, pn.gstride, std::min(gc, nc - c0), init, acc);
    group_fold<MR, NB>(acc, *gr, g, b0 * kNr, N, s);
  }
  group_store<MR, NB>(s, t0, b0 * kNr, xs, bias, N, y);
}

// Op 3 / 3g work buffer (QLinearArgs::work): the zero-padded copy of x, [T][Kp] (optionally
// xored), then int32 per token: factor * sum_k x (op 3) or -factor * sum_{k in g} x per group
// (op 3g, [T][ng]: the accumulators' start).
struct Work {
  int8_t* xp;
  int32_t* corr;
};
inline size_t x_bytes(int T, int Kp) { return (static_cast<size_t>(T) * Kp + 63) / 64 * 64; }
inline Work work_of(const QLinearArgs& a) {
  uint8_t* w = static_cast<uint8_t*>(a.work);
  return {reinterpret_cast<int8_t*>(w), reinterpret_cast<int32_t*>(w + x_bytes(a.T, round_up(a.K, 8)))};
}

// One row of x into its padded copy d ([Kp], xored with xor_mask); returns sum_k x.
inline int32_t pad_row(const int8_t* xr, int K, int Kp, uint8_t xor_mask, int8_t* d) {
  __m512i sum = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(xor_mask));
  for (int k = 0; k < Kp; k += 64) {
    const __mmask64 mk = tail64(K - k), mp = tail64(Kp - k);
    const __m512i v = _mm512_maskz_loadu_epi8(mk, xr + k);
    sum = _mm512_add_epi32(sum, _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), v));
    _mm512_mask_storeu_epi8(d + k, mp, _mm512_xor_si512(v, flip));
  }
  return _mm512_reduce_add_epi32(sum);
}

// Rows [t0, t1): the padded copy of x (xored with xor_mask) and factor * sum_k x per token.
void prepare_x(const int8_t* x, int t0, int t1, int K, int Kp, uint8_t xor_mask, int factor, int8_t* xp,
               int32_t* corr) {
  for (int t = t0; t < t1; ++t) {
    corr[t] = pad_row(x + static_cast<size_t>(t) * K, K, Kp, xor_mask, xp + static_cast<size_t>(t) * Kp) * factor;
  }
}

// Op 3g, rows [t0, t1): the padded copy of x (signed: both layouts put the weights on the
// unsigned side) and -factor * sum_{k in g} x[t][k] per token and group.
void prepare_x_groups(const int8_t* x, int t0, int t1, int K, int Kp, int G, int factor, int8_t* xp,
                      int32_t* corr) {
  const int ng = (K + G - 1) / G;
  const __m512i ones = _mm512_set1_epi8(1);
  for (int t = t0; t < t1; ++t) {
    pad_row(x + static_cast<size_t>(t) * K, K, Kp, 0, xp + static_cast<size_t>(t) * Kp);
    const int8_t* r = xp + static_cast<size_t>(t) * Kp;
    for (int g = 0; g < ng; ++g) {
      const int k1 = std::min((g + 1) * G, Kp);
      __m512i sum = _mm512_setzero_si512();
      for (int k = g * G; k < k1; k += 64) {
        sum = _mm512_dpbusd_epi32(sum, ones, _mm512_maskz_loadu_epi8(tail64(k1 - k), r + k));
      }
      corr[static_cast<size_t>(t) * ng + g] = -_mm512_reduce_add_epi32(sum) * factor;
    }
  }
}

constexpr int kGemmMr = 4, kGemmNb = 4;
constexpr bool kPrefetchPanels = true;  // GEMM: prefetch the next panel (see w4_cols)
constexpr int kW8Mr = 4, kW8Nb = 4;  // W8 panels are twice the bytes: 2 blocks keep a column in L1
// Op 3g GEMM tiles: the float tile doubles the live registers, so 4 x 64 spills; 5 tokens x 32
// rows measured best for both (README "Group-wise scales").
constexpr int kGGemmMr = 5, kGGemmNb = 2, kGW8Mr = 5, kGW8Nb = 2;

// The rectangle one tile covers: tokens [t0, t1) x panels [p0, p1).
struct Range {
  int t0, t1, p0, p1;
};

// Tokens [t0, t1) against panel blocks [jb, jb + NB), MR tokens at a time.
// pf / pf_bytes: the next panel, prefetched into L2 a slice per token tile while this panel
// runs from L1 (cold weights cost ~5-7% at T = 128 otherwise: each layer's weights come from L3
// or DRAM once per call).
template <int MR, int NB>
inline void w4_cols(const int8_t* xp, const int32_t* corr, int Kp, const uint8_t* w, const Panel& pn, int jb, int b0,
                    int t0, int t1, const Groups* gr, const float* xs, const float* ws, const float* bias, int N,
                    float* y, const uint8_t* pf = nullptr, size_t pf_bytes = 0) {
  const size_t slice = pf ? (pf_bytes / ((t1 - t0) / MR + 1) + 64) & ~size_t(63) : 0;
  size_t done = 0;
  int t = t0;
  for (; t + MR <= t1; t += MR) {
    for (size_t e = std::min(done + slice, pf_bytes); done < e; done += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + done), _MM_HINT_T1);
    }
    w4_run<MR, NB>(xp, corr, Kp, w, pn, jb, t, b0, gr, xs, ws, bias, N, y);
  }
  for (; t < t1; ++t) w4_run<1, NB>(xp, corr, Kp, w, pn, jb, t, b0, gr, xs, ws, bias, N, y);
}

// One token against a whole panel. Out of line so that its code does not depend on which GEMM
// tile the caller instantiates (inlined, the op 3g GEMV timed 6.5 or 8 us at 576 x 1536 by the
// caller's tile).
__attribute__((noinline)) void w4_gemv(const int8_t* xp, const int32_t* corr, int Kp, const uint8_t* w,
                                       const Panel& pn, int t, int b0, const Groups* gr, const float* xs,
                                       const float* ws, const float* bias, int N, float* y) {
  w4_run<1, kPb>(xp, corr, Kp, w, pn, 0, t, b0, gr, xs, ws, bias, N, y);
}

// The tile's panels in order; one token takes a whole panel per pass, more go in MR x NB tiles
// over columns of NB blocks (the first column also prefetches the tile's next panel).
template <int MR, int NB>
void w4_panels(const int8_t* xp, const int32_t* corr, const Range& r, int Kp, int Nb, const uint8_t* w,
               const Groups* gr, const float* xs, const float* ws, const float* bias, int N, float* y) {
  for (int p = r.p0; p < r.p1; ++p) {
    const Panel pn = panel_of(p, Nb, static_cast<size_t>(Kp) * kNr / 2);
    const int b0 = p * kPb;
    if (r.t1 - r.t0 == 1 && pn.pb == kPb) {
      w4_gemv(xp, corr, Kp, w, pn, r.t0, b0, gr, xs, ws, bias, N, y);
      continue;
    }
    int jb = 0;
    const bool next = p + 1 < r.p1 && pn.pb == kPb && kPrefetchPanels;
    const Panel nx = panel_of(p + 1, Nb, static_cast<size_t>(Kp) * kNr / 2);
    const size_t nx_bytes = next ? static_cast<size_t>(Kp / 8) * nx.gstride : 0;
    for (; jb + NB <= pn.pb; jb += NB) {
      w4_cols<MR, NB>(xp, corr, Kp, w, pn, jb, b0 + jb, r.t0, r.t1, gr, xs, ws, bias, N, y,
                      next && jb == 0 ? w + nx.base : nullptr, nx_bytes);
    }
    for (; jb < pn.pb; ++jb) w4_cols<MR, 1>(xp, corr, Kp, w, pn, jb, b0 + jb, r.t0, r.t1, gr, xs, ws, bias, N, y);
  }
}

// ---- op 3: W8 ---------------------------------------------------------------------------
// Packed W8 (after the alignment header): panels of up to 4 blocks of 16 rows as for W4; per
// panel, per group g of 4 k, per block: 64 bytes, row j's dword holds w[n][4g .. 4g+3];
// padding is 0. Then int32 [round_up(N, 16)]: 128 * sum_k w[n][k].
size_t w8_packed_size(int N, int K) {
  return kHeader + static_cast<size_t>(round_up(N, kNr)) * (round_up(K, 8) + sizeof(int32_t));
}

void w8_pack(const void* canonical, int N, int K, void* packed) {
  const int8_t* c = static_cast<const int8_t*>(canonical);
  int8_t* p = reinterpret_cast<int8_t*>(payload_for_pack(packed));
  const int Kp = round_up(K, 8), Np = round_up(N, kNr), Nb = Np / kNr;
  for (int pi = 0; pi * kPb < Nb; ++pi) {
    const int pb = panel_of(pi, Nb, 0).pb;
    for (int g = 0; g < Kp / 4; ++g) {
      for (int jj = 0; jj < pb * kNr; ++jj) {
        const int n = pi * kPb * kNr + jj;
        for (int i = 0; i < 4; ++i) {
          const int k = 4 * g + i;
          *p++ = n < N && k < K ? c[static_cast<size_t>(n) * K + k] : 0;
        }
      }
    }
  }
  for (int n = 0; n < Np; ++n) {
    int32_t s = 0;
    for (int k = 0; n < N && k < K; ++k) s += c[static_cast<size_t>(n) * K + k];
    s *= 128;
    std::memcpy(p + static_cast<size_t>(n) * 4, &s, 4);
  }
}

// MR tokens x NB blocks over the 4-k quads [q0, q0 + nq) (nq even: Kp and G are multiples of 8).
// Op 3 (kWeightsUnsigned false): x ^ 0x80 = x + 128 is the unsigned operand, the weights signed.
// Op 3g (true): x signed and w ^ 0x80 = w + 128 unsigned (one xor per loaded vector, shared by
// the MR tokens), so the offset to take back is 128 * sum_{k in g} x[t][k], per token and group,
// from the activations; op 3's 128 * sum_k w (stored per row by w8_pack) would be needed per row
// *and* group.
template <int MR, int NB, bool kWeightsUnsigned>
inline void w8_tile(const int8_t* xb, int Kp, const int8_t* wb, size_t gstride, int q0, int nq,
                    const __m512i (&init)[MR], __m512i (&acc)[MR][NB]) {
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NB; ++j) acc[m][j] = init[m];
  }
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int g = q0; g < q0 + nq; g += 2) {
    for (int u = 0; u < 2; ++u) {
      __m512i wv[NB];
      for (int j = 0; j < NB; ++j) {
        wv[j] = _mm512_loadu_si512(wb + (g + u) * gstride + j * 64);
        if (kWeightsUnsigned) wv[j] = _mm512_xor_si512(wv[j], flip);
      }
      for (int m = 0; m < MR; ++m) {
        const __m512i xv = _mm512_set1_epi32(load_i32(xb + static_cast<size_t>(m) * Kp + 4 * (g + u)));
        for (int j = 0; j < NB; ++j) {
          acc[m][j] = kWeightsUnsigned ? _mm512_dpbusd_epi32(acc[m][j], wv[j], xv)
                                       : _mm512_dpbusd_epi32(acc[m][j], xv, wv[j]);
        }
      }
    }
  }
}

template <int MR, int NB>
inline void w8_run(const int8_t* xp, int Kp, const int8_t* w, const Panel& pn, int jb, const int32_t* wcorr, int t0,
                   int b0, const Groups* gr, const float* xs, const float* ws, const float* bias, int N, float* y) {
  const int8_t* wb = w + pn.base + jb * 64;
  const int8_t* xb = xp + static_cast<size_t>(t0) * Kp;
  __m512i acc[MR][NB], init[MR];
  if (!gr) {
    for (int m = 0; m < MR; ++m) init[m] = _mm512_setzero_si512();
    w8_tile<MR, NB, false>(xb, Kp, wb, pn.gstride, 0, Kp / 4, init, acc);
    for (int j = 0; j < NB; ++j) {
      const __m512i c = _mm512_loadu_si512(wcorr + (b0 + j) * kNr);
      for (int m = 0; m < MR; ++m) {
        epilogue_store(y + static_cast<size_t>(t0 + m) * N, (b0 + j) * kNr, N, _mm512_sub_epi32(acc[m][j], c),
                       xs[t0 + m], ws, bias);
      }
    }
    return;
  }
  __m512 s[MR][NB];
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NB; ++j) s[m][j] = _mm512_setzero_ps();
  }
  const int gq = gr->G / 4, nq = Kp / 4;
  for (int g = 0; g < gr->ng; ++g) {
    group_init<MR>(*gr, g, t0, init);
    w8_tile<MR, NB, true>(xb, Kp, wb, pn.gstride, g * gq, std::min(gq, nq - g * gq), init, acc);
    group_fold<MR, NB>(acc, *gr, g, b0 * kNr, N, s);
  }
  group_store<MR, NB>(s, t0, b0 * kNr, xs, bias, N, y);
}

template <int MR, int NB>
inline void w8_cols(const int8_t* xp, int Kp, const int8_t* w, const Panel& pn, int jb, const int32_t* wcorr, int b0,
                    int t0, int t1, const Groups* gr, const float* xs, const float* ws, const float* bias, int N,
                    float* y, const int8_t* pf = nullptr, size_t pf_bytes = 0) {  // pf: as in w4_cols
  const size_t slice = pf ? (pf_bytes / ((t1 - t0) / MR + 1) + 64) & ~size_t(63) : 0;
  size_t done = 0;
  int t = t0;
  for (; t + MR <= t1; t += MR) {
    for (size_t e = std::min(done + slice, pf_bytes); done < e; done += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + done), _MM_HINT_T1);
    }
    w8_run<MR, NB>(xp, Kp, w, pn, jb, wcorr, t, b0, gr, xs, ws, bias, N, y);
  }
  for (; t < t1; ++t) w8_run<1, NB>(xp, Kp, w, pn, jb, wcorr, t, b0, gr, xs, ws, bias, N, y);
}

template <int MR, int NB>
void w8_panels(const int8_t* xp, const Range& r, int Kp, int Nb, const int8_t* w, const int32_t* wcorr,
               const Groups* gr, const float* xs, const float* ws, const float* bias, int N, float* y) {
  for (int p = r.p0; p < r.p1; ++p) {
    const Panel pn = panel_of(p, Nb, static_cast<size_t>(Kp) * kNr);
    const int b0 = p * kPb;
    if (r.t1 - r.t0 == 1 && pn.pb == kPb) {
      w8_run<1, kPb>(xp, Kp, w, pn, 0, wcorr, r.t0, b0, gr, xs, ws, bias, N, y);
      continue;
    }
    int jb = 0;
    const bool next = p + 1 < r.p1 && pn.pb == kPb && kPrefetchPanels;
    const Panel nx = panel_of(p + 1, Nb, static_cast<size_t>(Kp) * kNr);
    const size_t nx_bytes = next ? static_cast<size_t>(Kp / 4) * nx.gstride : 0;
    for (; jb + NB <= pn.pb; jb += NB) {
      w8_cols<MR, NB>(xp, Kp, w, pn, jb, wcorr, b0 + jb, r.t0, r.t1, gr, xs, ws, bias, N, y,
                      next && jb == 0 ? w + nx.base : nullptr, nx_bytes);
    }
    for (; jb < pn.pb; ++jb) w8_cols<MR, 1>(xp, Kp, w, pn, jb, wcorr, b0 + jb, r.t0, r.t1, gr, xs, ws, bias, N, y);
  }
}

// ---- op 3 / 3g: the tile functions -----------------------------------------------------
size_t qlinear_work_size(int T, int K, int /*w_bits*/, int group_size) {
  const int ng = group_size ? (K + group_size - 1) / group_size : 1;
  return x_bytes(T, round_up(K, 8)) + sizeof(int32_t) * static_cast<size_t>(T) * ng;
}

// W4 weights are w + 8 on the unsigned side: the offset is 8 * sum x (per group for op 3g). W8
// (op 3) offsets x by 128 instead and takes back the packed 128 * sum_k w; op 3g W8 offsets the
// weights, so its correction is 128 * sum_{k in g} x.
void qlinear_prepare(const QLinearArgs& a, int t0, int t1) {
  const Work wk = work_of(a);
  const int Kp = round_up(a.K, 8);
  if (a.group_size) {
    prepare_x_groups(a.x, t0, t1, a.K, Kp, a.group_size, a.w_bits == 4 ? 8 : 128, wk.xp, wk.corr);
  } else if (a.w_bits == 4) {
    prepare_x(a.x, t0, t1, a.K, Kp, 0, 8, wk.xp, wk.corr);
  } else {
    prepare_x(a.x, t0, t1, a.K, Kp, 0x80, 0, wk.xp, wk.corr);
  }
}

// Channels [n0, n1) are whole panels of kPb * kNr rows (qlinear_nr), the last one maybe partial.
void qlinear_tile(const QLinearArgs& a, int t0, int t1, int n0, int n1) {
  const Work wk = work_of(a);
  const int Kp = round_up(a.K, 8), Np = round_up(a.N, kNr), Nb = Np / kNr, P = kPb * kNr;
  const Range r{t0, t1, n0 / P, (n1 + P - 1) / P};
  const uint8_t* w = payload(a.w_packed);
  if (a.group_size) {
    const Groups gr{a.group_size, (a.K + a.group_size - 1) / a.group_size, a.ws_gn, wk.corr};
    if (a.w_bits == 4) {
      w4_panels<kGGemmMr, kGGemmNb>(wk.xp, nullptr, r, Kp, Nb, w, &gr, a.xs, nullptr, a.bias, a.N, a.y);
    } else {
      w8_panels<kGW8Mr, kGW8Nb>(wk.xp, r, Kp, Nb, reinterpret_cast<const int8_t*>(w), nullptr, &gr, a.xs, nullptr,
                                a.bias, a.N, a.y);
    }
  } else if (a.w_bits == 4) {
    w4_panels<kGemmMr, kGemmNb>(wk.xp, wk.corr, r, Kp, Nb, w, nullptr, a.xs, a.ws, a.bias, a.N, a.y);
  } else {
    const int8_t* w8 = reinterpret_cast<const int8_t*>(w);
    const int32_t* wcorr = reinterpret_cast<const int32_t*>(w8 + static_cast<size_t>(Np) * Kp);
    w8_panels<kW8Mr, kW8Nb>(wk.xp, r, Kp, Nb, w8, wcorr, nullptr, a.xs, a.ws, a.bias, a.N, a.y);
  }
}

const QLinearTiles kTiles = {qlinear_work_size, qlinear_prepare, qlinear_tile};

void qlinear_w4(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K, const void* w_packed,
                const float* ws, const float* bias, int N, float* y) {
  qlinear_whole(kTiles, 4, 0, x, xs, bits, T, K, w_packed, ws, nullptr, bias, N, y);
}
void qlinear_w8(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K, const void* w_packed,
                const float* ws, const float* bias, int N, float* y) {
  qlinear_whole(kTiles, 8, 0, x, xs, bits, T, K, w_packed, ws, nullptr, bias, N, y);
}
void qlinear_w4_grouped(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K, const void* w_packed,
                        int group_size, const float* ws_gn, const float* bias, int N, float* y) {
  qlinear_whole(kTiles, 4, group_size, x, xs, bits, T, K, w_packed, nullptr, ws_gn, bias, N, y);
}
void qlinear_w8_grouped(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K, const void* w_packed,
                        int group_size, const float* ws_gn, const float* bias, int N, float* y) {
  qlinear_whole(kTiles, 8, group_size, x, xs, bits, T, K, w_packed, nullptr, ws_gn, bias, N, y);
}

// ---- op 4 -------------------------------------------------------------------------------
thread_local std::vector<int8_t> tl_kv;

// Rows [0, S) of kv head g as int8 with row stride D: the cache itself for int8, else the
// int4 rows sign-extended into scratch.
const int8_t* kv_rows(const void* cache, int kv_bits, int g, int S, int s_cap, int D) {
  if (kv_bits != 4) return static_cast<const int8_t*>(cache) + static_cast<size_t>(g) * s_cap * D;
  const int stride = (D + 1) / 2;
  const uint8_t* src = static_cast<const uint8_t*>(cache) + static_cast<size_t>(g) * s_cap * stride;
  int8_t* out = scratch(tl_kv, static_cast<size_t>(S) * D + 64);
  const __m128i m0f = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
  for (int s = 0; s < S; ++s) {
    const uint8_t* r = src + static_cast<size_t>(s) * stride;
    int8_t* o = out + static_cast<size_t>(s) * D;
    int j = 0;
    for (; j + 16 <= stride && 2 * j + 32 <= D; j += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + j));
      const __m128i lo = _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(b, m0f), eight), eight);
      const __m128i hi = _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(_mm_srli_epi16(b, 4), m0f), eight), eight);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * j), _mm_unpacklo_epi8(lo, hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * j + 16), _mm_unpackhi_epi8(lo, hi));
    }
    for (int d = 2 * j; d < D; ++d) o[d] = static_cast<int8_t>(ref::int4_at(r, d));
  }
  return out;
}

thread_local std::vector<int32_t> tl_ksum;

void attn_qk_rows(const int8_t* q, const float* qs, int H, int T, int D, const void* k, int kv_bits, const float* ks,
                  int Hkv, int S, int s_cap, float* scores) {
  const int group = H / Hkv;
  const __m512i ones = _mm512_set1_epi8(1), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  int32_t* ksum = scratch(tl_ksum, static_cast<size_t>(S));
  for (int g = 0; g < Hkv; ++g) {
    const int8_t* kr = kv_rows(k, kv_bits, g, S, s_cap, D);
    // q is offset to unsigned (q + 128); 128 * sum_d k[s][d] is taken back per position.
    for (int s = 0; s < S; ++s) {
      __m512i a = _mm512_setzero_si512();
      for (int d = 0; d < D; d += 64) {
        a = _mm512_dpbusd_epi32(a, ones, _mm512_maskz_loadu_epi8(tail64(D - d), kr + static_cast<size_t>(s) * D + d));
      }
      ksum[s] = 128 * _mm512_reduce_add_epi32(a);
    }
    for (int h = g * group; h < (g + 1) * group; ++h) {
      for (int t = 0; t < T; ++t) {
        const int8_t* qr = q + (static_cast<size_t>(h) * T + t) * D;
        float* out = scores + (static_cast<size_t>(h) * T + t) * S;
        for (int s = 0; s < S; ++s) {
          __m512i a = _mm512_setzero_si512();
          for (int d = 0; d < D; d += 64) {
            const __mmask64 m = tail64(D - d);
            const __m512i qu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, qr + d), flip);
            a = _mm512_dpbusd_epi32(a, qu, _mm512_maskz_loadu_epi8(m, kr + static_cast<size_t>(s) * D + d));
          }
          const int32_t acc = _mm512_reduce_add_epi32(a) - ksum[s];
          out[s] = static_cast<float>(acc) * (qs[t] * ks[s]);
        }
      }
    }
  }
}

// PV: rows s, s+1 are interleaved as int16 pairs so one vpmaddwd adds p_s v_s + p_s1 v_s1 for
// 16 d at once; each row's p goes to the accumulator of its group (the other gets 0).
// unpack{lo,hi}_epi16 work per 128-bit lane, so the d order is restored at the end.
void attn_pv_rows(const uint8_t* p, float ps, const float* ps_rows, int H, int T, int S, const void* v, int kv_bits,
                  const uint8_t* v_rowbits, const float* vs, int Hkv, int s_cap, int D, float* out) {
  const int group = H / Hkv;
  const __m512i idx0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i idx1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int g = 0; g < Hkv; ++g) {
    const int8_t* vr = kv_rows(v, kv_bits, g, S, s_cap, D);
    for (int h = g * group; h < (g + 1) * group; ++h) {
      for (int t = 0; t < T; ++t) {
        const size_t row = static_cast<size_t>(h) * T + t;
        const float pr_scale = ps_rows ? ps_rows[row] : ps;
        const __m512 sc8 = _mm512_set1_ps(pr_scale * vs[0]);
        const __m512 sc4 = _mm512_set1_ps(v_rowbits ? pr_scale * vs[1] : 0.0f);
        const uint8_t* pr = p + row * S;
        float* o = out + row * D;
        for (int d = 0; d < D; d += 32) {
          const __mmask32 m = D - d >= 32 ? ~__mmask32(0) : (__mmask32(1) << (D - d)) - 1;
          __m512i a8l = _mm512_setzero_si512(), a8h = a8l, a4l = a8l, a4h = a8l;
          for (int s = 0; s < S; s += 2) {
            const bool has1 = s + 1 < S;
            const __m512i v0 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, vr + static_cast<size_t>(s) * D + d));
            const __m512i v1 = has1 ? _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, vr + static_cast<size_t>(s + 1) * D + d))
                                    : _mm512_setzero_si512();
            const __m512i lo = _mm512_unpacklo_epi16(v0, v1), hi = _mm512_unpackhi_epi16(v0, v1);
            const int p0 = pr[s], p1 = has1 ? pr[s + 1] : 0;
            const bool g4_0 = v_rowbits && v_rowbits[s] == 4, g4_1 = has1 && v_rowbits && v_rowbits[s + 1] == 4;
            const int pp8 = (g4_0 ? 0 : p0) | ((g4_1 ? 0 : p1) << 16);
            const int pp4 = (g4_0 ? p0 : 0) | ((g4_1 ? p1 : 0) << 16);
            if (pp8) {
              const __m512i b = _mm512_set1_epi32(pp8);
              a8l = _mm512_add_epi32(a8l, _mm512_madd_epi16(lo, b));
              a8h = _mm512_add_epi32(a8h, _mm512_madd_epi16(hi, b));
            }
            if (pp4) {
              const __m512i b = _mm512_set1_epi32(pp4);
              a4l = _mm512_add_epi32(a4l, _mm512_madd_epi16(lo, b));
              a4h = _mm512_add_epi32(a4h, _mm512_madd_epi16(hi, b));
            }
          }
          const __m512i r8[2] = {_mm512_permutex2var_epi32(a8l, idx0, a8h), _mm512_permutex2var_epi32(a8l, idx1, a8h)};
          const __m512i r4[2] = {_mm512_permutex2var_epi32(a4l, idx0, a4h), _mm512_permutex2var_epi32(a4l, idx1, a4h)};
          for (int half = 0; half < 2; ++half) {
            const __mmask16 mh = static_cast<__mmask16>(m >> (16 * half));
            __m512 r = _mm512_mul_ps(_mm512_cvtepi32_ps(r8[half]), sc8);
            if (v_rowbits) r = _mm512_add_ps(r, _mm512_mul_ps(_mm512_cvtepi32_ps(r4[half]), sc4));
            _mm512_mask_storeu_ps(o + d + 16 * half, mh, r);
          }
        }
      }
    }
  }
}

// ---- op 4, tiled (T >= kAttnTileMinT: prefill blocks) --------------------------------------
// Both matmuls run as small GEMMs over a per-call packed copy of the kv head, so each cached
// row is loaded once per tile of query rows and no horizontal reduction is left in the loop:
// - QK: K rows packed as blocks of 16 positions x groups of 4 d (one dword per position per
//   group, the W8 weight layout); q + 128 is the broadcast (unsigned) operand of vpdpbusd, K the
//   signed one; 128 * sum_d k is taken back per position (as in the row kernel).
// - PV: V packed as groups of 4 positions x 64 d (dword = v[s..s+3][d], byte-interleaved rows,
//   d in the in-lane order of unpack{lo,hi}, restored at the store); p is the unsigned
//   broadcast operand, split per call into the 8-bit group's and the 4-bit group's codes.
// Same int32 sums and float epilogue as the row kernels (exact).
constexpr int kAttnTileMinT = 4;
thread_local std::vector<uint8_t> tl_kpack, tl_qx;
thread_local std::vector<int32_t> tl_kcorr;

// kr [S][D] int8 -> packed [S/16 blocks][DG][16][4] bytes (zero padded) and kcorr[s] =
// 128 * sum_d kr[s][d] (padded to a multiple of 16 with 0). Per block of 16 rows and chunk of
// 64 d: a 16 x 16 dword transpose in registers (dword gathers are ~4x slower on Zen 5).
void pack_k_blocks(const int8_t* kr, int S, int D, int8_t* kp, int32_t* kcorr) {
  const int DG = (D + 3) / 4, SB = (S + 15) / 16;
  const __m512i ones = _mm512_set1_epi8(1);
  for (int sb = 0; sb < SB; ++sb) {
    int8_t* dst = kp + static_cast<size_t>(sb) * DG * 64;
    __m512i sum = _mm512_setzero_si512();
    for (int c = 0; 16 * c < DG; ++c) {
      const __mmask64 md = tail64(D - 64 * c);
      __m512i r[16], a[16], b[16];
      for (int j = 0; j < 16; ++j) {
        const int s = 16 * sb + j;
        r[j] = s < S ? _mm512_maskz_loadu_epi8(md, kr + static_cast<size_t>(s) * D + 64 * c) : _mm512_setzero_si512();
      }
      for (int j = 0; j < 8; ++j) {
        a[2 * j] = _mm512_unpacklo_epi32(r[2 * j], r[2 * j + 1]);
        a[2 * j + 1] = _mm512_unpackhi_epi32(r[2 * j], r[2 * j + 1]);
      }
      for (int j = 0; j < 4; ++j) {  // b[4j + cc], lane L: rows 4j..4j+3 at dword 4L + cc
        b[4 * j] = _mm512_unpacklo_epi64(a[4 * j], a[4 * j + 2]);
        b[4 * j + 1] = _mm512_unpackhi_epi64(a[4 * j], a[4 * j + 2]);
        b[4 * j + 2] = _mm512_unpacklo_epi64(a[4 * j + 1], a[4 * j + 3]);
        b[4 * j + 3] = _mm512_unpackhi_epi64(a[4 * j + 1], a[4 * j + 3]);
      }
      for (int cc = 0; cc < 4; ++cc) {  // 4 x 4 transpose of 128-bit lanes: dword 4L + cc
        const __m512i t0l = _mm512_shuffle_i32x4(b[cc], b[4 + cc], 0x44), t0h = _mm512_shuffle_i32x4(b[cc], b[4 + cc], 0xEE);
        const __m512i t1l = _mm512_shuffle_i32x4(b[8 + cc], b[12 + cc], 0x44);
        const __m512i t1h = _mm512_shuffle_i32x4(b[8 + cc], b[12 + cc], 0xEE);
        const __m512i o[4] = {_mm512_shuffle_i32x4(t0l, t1l, 0x88), _mm512_shuffle_i32x4(t0l, t1l, 0xDD),
                              _mm512_shuffle_i32x4(t0h, t1h, 0x88), _mm512_shuffle_i32x4(t0h, t1h, 0xDD)};
        for (int L = 0; L < 4; ++L) {
          const int dg = 16 * c + 4 * L + cc;
          if (dg >= DG) continue;
          _mm512_storeu_si512(dst + dg * 64, o[L]);
          sum = _mm512_dpbusd_epi32(sum, ones, o[L]);
        }
      }
    }
    _mm512_storeu_si512(kcorr + 16 * sb, _mm512_slli_epi32(sum, 7));  // 128 * sum_d k (0 past S)
  }
}

template <int MR, int NB>
inline void qk_tile(const uint8_t* qx, int DG, const int8_t* kp, const int32_t* kcorr, const float* qs,
                    const float* ks, int t0, int sb0, int S, float* out) {
  __m512i acc[MR][NB];
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_si512();
  }
  const int8_t* kb = kp + static_cast<size_t>(sb0) * DG * 64;
  for (int dg = 0; dg < DG; ++dg) {
    __m512i kv[NB];
    for (int j = 0; j < NB; ++j) kv[j] = _mm512_loadu_si512(kb + (static_cast<size_t>(j) * DG + dg) * 64);
    for (int m = 0; m < MR; ++m) {
      const __m512i qv = _mm512_set1_epi32(load_i32(reinterpret_cast<const int8_t*>(qx) + (static_cast<size_t>(t0 + m) * DG + dg) * 4));
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], qv, kv[j]);
    }
  }
  for (int j = 0; j < NB; ++j) {
    const int s0 = (sb0 + j) * 16;
    const __mmask16 mk = tail16(S - s0);
    const __m512i c = _mm512_loadu_si512(kcorr + s0);
    const __m512 ksv = _mm512_maskz_loadu_ps(mk, ks + s0);
    for (int m = 0; m < MR; ++m) {
      const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(qs[t0 + m]), ksv);
      const __m512 r = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][j], c)), sc);
      _mm512_mask_storeu_ps(out + static_cast<size_t>(t0 + m) * S + s0, mk, r);
    }
  }
}

template <int MR>
inline void qk_rows(const uint8_t* qx, int DG, const int8_t* kp, const int32_t* kcorr, const float* qs,
                    const float* ks, int t0, int S, float* out) {
  const int SB = (S + 15) / 16;
  int sb = 0;
  for (; sb + 4 <= SB; sb += 4) qk_tile<MR, 4>(qx, DG, kp, kcorr, qs, ks, t0, sb, S, out);
  for (; sb < SB; ++sb) qk_tile<MR, 1>(qx, DG, kp, kcorr, qs, ks, t0, sb, S, out);
}

void attn_qk_tiled(const int8_t* q, const float* qs, int H, int T, int D, const void* k, int kv_bits,
                   const float* ks, int Hkv, int S, int s_cap, float* scores) {
  const int group = H / Hkv, DG = (D + 3) / 4, SB = (S + 15) / 16;
  int8_t* kp = reinterpret_cast<int8_t*>(scratch(tl_kpack, static_cast<size_t>(SB) * DG * 64));
  int32_t* kcorr = scratch(tl_kcorr, static_cast<size_t>(SB) * 16);
  uint8_t* qx = scratch(tl_qx, static_cast<size_t>(T) * DG * 4);
  for (int g = 0; g < Hkv; ++g) {
    pack_k_blocks(kv_rows(k, kv_bits, g, S, s_cap, D), S, D, kp, kcorr);
    for (int h = g * group; h < (g + 1) * group; ++h) {
      // q + 128 (unsigned), rows padded to DG dwords (the padded K entries are 0).
      for (int t = 0; t < T; ++t) {
        const int8_t* qr = q + (static_cast<size_t>(h) * T + t) * D;
        uint8_t* d = qx + static_cast<size_t>(t) * DG * 4;
        for (int i = 0; i < DG * 4; i += 64) {
          const __m512i v = _mm512_maskz_loadu_epi8(tail64(D - i), qr + i);
          _mm512_mask_storeu_epi8(d + i, tail64(DG * 4 - i), _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80))));
        }
      }
      float* out = scores + static_cast<size_t>(h) * T * S;
      int t = 0;
      for (; t + 4 <= T; t += 4) qk_rows<4>(qx, DG, kp, kcorr, qs, ks, t, S, out);
      for (; t < T; ++t) qk_rows<1>(qx, DG, kp, kcorr, qs, ks, t, S, out);
    }
  }
}

void attn_qk(const int8_t* q, const float* qs, int H, int T, int D, const void* k, int kv_bits, const float* ks,
             int Hkv, int S, int s_cap, float* scores) {
  if (T >= kAttnTileMinT) {
    attn_qk_tiled(q, qs, H, T, D, k, kv_bits, ks, Hkv, S, s_cap, scores);
  } else {
    attn_qk_rows(q, qs, H, T, D, k, kv_bits, ks, Hkv, S, s_cap, scores);
  }
}

thread_local std::vector<uint8_t> tl_vpack, tl_p8, tl_p4;
thread_local std::vector<float> tl_sc;

// vr [S][D] int8 -> packed [DC chunks of 64 d][S4 groups of 4 s][4 vectors][64 bytes]; vector i
// of a group holds, in 128-bit lane L, dwords v[s..s+3][16 L + 4 i + c] (c = 0..3).
void pack_v_groups(const int8_t* vr, int S, int D, int8_t* vp) {
  const int DC = (D + 63) / 64, S4 = (S + 3) / 4;
  for (int c = 0; c < DC; ++c) {
    const __mmask64 md = tail64(D - 64 * c);
    for (int g = 0; g < S4; ++g) {
      __m512i r[4];
      for (int i = 0; i < 4; ++i) {
        const int s = 4 * g + i;
        r[i] = s < S ? _mm512_maskz_loadu_epi8(md, vr + static_cast<size_t>(s) * D + 64 * c) : _mm512_setzero_si512();
      }
      const __m512i a = _mm512_unpacklo_epi8(r[0], r[1]), b = _mm512_unpackhi_epi8(r[0], r[1]);
      const __m512i e = _mm512_unpacklo_epi8(r[2], r[3]), f = _mm512_unpackhi_epi8(r[2], r[3]);
      int8_t* dst = vp + (static_cast<size_t>(c) * S4 + g) * 256;
      _mm512_storeu_si512(dst, _mm512_unpacklo_epi16(a, e));
      _mm512_storeu_si512(dst + 64, _mm512_unpackhi_epi16(a, e));
      _mm512_storeu_si512(dst + 128, _mm512_unpacklo_epi16(b, f));
      _mm512_storeu_si512(dst + 192, _mm512_unpackhi_epi16(b, f));
    }
  }
}

// MR query rows x one 64-d chunk; acc4 only when the call has 4-bit rows (SPLIT). sc8[t] and
// sc4[t] are query row t's scale products (p_r * vs[0], p_r * vs[1]).
template <int MR, bool SPLIT>
inline void pv_tile(const uint8_t* p8, const uint8_t* p4, int S4, const int8_t* vc, int t0, int d0, int D,
                    bool rowbits, const float* sc8, const float* sc4, float* out) {
  __m512i a8[MR][4], a4[MR][4];
  for (int m = 0; m < MR; ++m) {
    for (int i = 0; i < 4; ++i) a8[m][i] = a4[m][i] = _mm512_setzero_si512();
  }
  const size_t prow = static_cast<size_t>(S4) * 4;
  for (int g = 0; g < S4; ++g) {
    __m512i vv[4];
    for (int i = 0; i < 4; ++i) vv[i] = _mm512_loadu_si512(vc + static_cast<size_t>(g) * 256 + 64 * i);
    for (int m = 0; m < MR; ++m) {
      const __m512i b8 = _mm512_set1_epi32(load_i32(reinterpret_cast<const int8_t*>(p8) + (t0 + m) * prow + 4 * g));
      for (int i = 0; i < 4; ++i) a8[m][i] = _mm512_dpbusd_epi32(a8[m][i], b8, vv[i]);
      if (SPLIT) {
        const __m512i b4 = _mm512_set1_epi32(load_i32(reinterpret_cast<const int8_t*>(p4) + (t0 + m) * prow + 4 * g));
        for (int i = 0; i < 4; ++i) a4[m][i] = _mm512_dpbusd_epi32(a4[m][i], b4, vv[i]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    const __m512 s8 = _mm512_set1_ps(sc8[t0 + m]), s4 = _mm512_set1_ps(sc4[t0 + m]);
    __m512 r[4];
    for (int i = 0; i < 4; ++i) {
      r[i] = _mm512_mul_ps(_mm512_cvtepi32_ps(a8[m][i]), s8);
      if (rowbits) r[i] = _mm512_add_ps(r[i], _mm512_mul_ps(_mm512_cvtepi32_ps(a4[m][i]), s4));
    }
    // r[i] lane L holds d = 16 L + 4 i + c: a 4 x 4 transpose of 128-bit lanes restores d order.
    const __m512 t0l = _mm512_shuffle_f32x4(r[0], r[1], 0x44), t0h = _mm512_shuffle_f32x4(r[0], r[1], 0xEE);
    const __m512 t1l = _mm512_shuffle_f32x4(r[2], r[3], 0x44), t1h = _mm512_shuffle_f32x4(r[2], r[3], 0xEE);
    const __m512 o[4] = {_mm512_shuffle_f32x4(t0l, t1l, 0x88), _mm512_shuffle_f32x4(t0l, t1l, 0xDD),
                         _mm512_shuffle_f32x4(t0h, t1h, 0x88), _mm512_shuffle_f32x4(t0h, t1h, 0xDD)};
    float* orow = out + static_cast<size_t>(t0 + m) * D + d0;
    for (int i = 0; i < 4 && d0 + 16 * i < D; ++i) _mm512_mask_storeu_ps(orow + 16 * i, tail16(D - d0 - 16 * i), o[i]);
  }
}

template <bool SPLIT>
void pv_head(const uint8_t* p8, const uint8_t* p4, int T, int S4, const int8_t* vp, int D, bool rowbits,
             const float* sc8, const float* sc4, float* out) {
  constexpr int kMr = SPLIT ? 2 : 4;
  for (int c = 0; c < (D + 63) / 64; ++c) {
    const int8_t* vc = vp + static_cast<size_t>(c) * S4 * 256;
    int t = 0;
    for (; t + kMr <= T; t += kMr) pv_tile<kMr, SPLIT>(p8, p4, S4, vc, t, 64 * c, D, rowbits, sc8, sc4, out);
    for (; t < T; ++t) pv_tile<1, SPLIT>(p8, p4, S4, vc, t, 64 * c, D, rowbits, sc8, sc4, out);
  }
}

void attn_pv_tiled(const uint8_t* p, float ps, const float* ps_rows, int H, int T, int S, const void* v, int kv_bits,
                   const uint8_t* v_rowbits, const float* vs, int Hkv, int s_cap, int D, float* out) {
  const int group = H / Hkv, S4 = (S + 3) / 4, Sp = 4 * S4;
  bool split = false;
  for (int s = 0; v_rowbits && s < S; ++s) split |= v_rowbits[s] == 4;
  int8_t* vp = reinterpret_cast<int8_t*>(scratch(tl_vpack, static_cast<size_t>((D + 63) / 64) * S4 * 256));
  uint8_t* p8 = scratch(tl_p8, static_cast<size_t>(T) * Sp);
  uint8_t* p4 = scratch(tl_p4, static_cast<size_t>(T) * Sp);
  float* sc8 = scratch(tl_sc, 2 * static_cast<size_t>(T));
  float* sc4 = sc8 + T;
  for (int g = 0; g < Hkv; ++g) {
    pack_v_groups(kv_rows(v, kv_bits, g, S, s_cap, D), S, D, vp);
    for (int h = g * group; h < (g + 1) * group; ++h) {
      // The head's scale products per query row, as the reference forms them (scalar float).
      for (int t = 0; t < T; ++t) {
        const float pr_scale = ps_rows ? ps_rows[static_cast<size_t>(h) * T + t] : ps;
        sc8[t] = pr_scale * vs[0];
        sc4[t] = v_rowbits ? pr_scale * vs[1] : 0.0f;
      }
      // The head's probability rows, padded to Sp with 0 and split by row group.
      for (int t = 0; t < T; ++t) {
        const uint8_t* pr = p + (static_cast<size_t>(h) * T + t) * S;
        uint8_t* d8 = p8 + static_cast<size_t>(t) * Sp;
        uint8_t* d4 = p4 + static_cast<size_t>(t) * Sp;
        for (int s = 0; s < Sp; s += 64) {
          const __mmask64 m = tail64(S - s), mp = tail64(Sp - s);
          const __m512i pv = _mm512_maskz_loadu_epi8(m, pr + s);
          if (split) {
            const __m512i rb = _mm512_maskz_loadu_epi8(m, v_rowbits + s);
            const __mmask64 is4 = _mm512_cmpeq_epi8_mask(rb, _mm512_set1_epi8(4));
            _mm512_mask_storeu_epi8(d8 + s, mp, _mm512_maskz_mov_epi8(~is4, pv));
            _mm512_mask_storeu_epi8(d4 + s, mp, _mm512_maskz_mov_epi8(is4, pv));
          } else {
            _mm512_mask_storeu_epi8(d8 + s, mp, pv);
          }
        }
      }
      float* o = out + static_cast<size_t>(h) * T * D;
      if (split) {
        pv_head<true>(p8, p4, T, S4, vp, D, v_rowbits != nullptr, sc8, sc4, o);
      } else {
        pv_head<false>(p8, p4, T, S4, vp, D, v_rowbits != nullptr, sc8, sc4, o);
      }
    }
  }
}

void attn_pv(const uint8_t* p, float ps, const float* ps_rows, int H, int T, int S, const void* v, int kv_bits,
             const uint8_t* v_rowbits, const float* vs, int Hkv, int s_cap, int D, float* out) {
  if (T >= kAttnTileMinT) {
    attn_pv_tiled(p, ps, ps_rows, H, T, S, v, kv_bits, v_rowbits, vs, Hkv, s_cap, D, out);
  } else {
    attn_pv_rows(p, ps, ps_rows, H, T, S, v, kv_bits, v_rowbits, vs, Hkv, s_cap, D, out);
  }
}

// ---- op 4p ------------------------------------------------------------------------------
// The reference's float operations lane by lane: vmaxps(x, m) is `x > m ? x : m` (NaN in x
// keeps m), and the 16 lanes, all +0 or positive, reduce to the same max in any order;
// vmaxps(q, 0) sends a NaN quotient to 0. The masked tail loads 0, which changes no max.
void quantize_probs(const float* p, int R, int S, size_t ld, int p_max, const float* ps_static, uint8_t* codes,
                    size_t ldc, float* ps_out) {
  const float hi = static_cast<float>(p_max);
  const __m512 vhi = _mm512_set1_ps(hi), zero = _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    const float* pr = p + static_cast<size_t>(r) * ld;
    float s;
    if (ps_static) {
      s = *ps_static;
    } else {
      __m512 m = zero;
      for (int i = 0; i < S; i += 16) m = _mm512_max_ps(_mm512_maskz_loadu_ps(tail16(S - i), pr + i), m);
      const float mx = _mm512_reduce_max_ps(m);
      s = mx == 0.0f ? 1.0f : mx / hi;
      ps_out[r] = s;
    }
    const __m512 vs = _mm512_set1_ps(s);
    uint8_t* cr = codes + static_cast<size_t>(r) * ldc;
    for (int i = 0; i < S; i += 16) {
      const __mmask16 mk = tail16(S - i);
      const __m512 q = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(mk, pr + i), vs), zero), vhi);
      _mm512_mask_cvtepi32_storeu_epi8(cr + i, mk, _mm512_cvtps_epi32(q));  // round half even
    }
  }
}

// ---- op 5 -------------------------------------------------------------------------------
// Packed f32 / f16: blocks of 16 rows, k-major inside a block ([b][k][16]), zero padded.
size_t f32_packed_size(int N, int K) { return static_cast<size_t>(round_up(N, kNr)) * K * sizeof(float); }
size_t f16_packed_size(int N, int K) { return static_cast<size_t>(round_up(N, kNr)) * K * sizeof(uint16_t); }

template <typename T>
void pack_kmajor(const T* c, int N, int K, T* p) {
  for (int b = 0; b < round_up(N, kNr) / kNr; ++b) {
    for (int k = 0; k < K; ++k) {
      for (int j = 0; j < kNr; ++j) {
        const int n = b * kNr + j;
        *p++ = n < N ? c[static_cast<size_t>(n) * K + k] : T(0);
      }
    }
  }
}
void f32_pack(const void* c, int N, int K, void* p) {
  pack_kmajor(static_cast<const float*>(c), N, K, static_cast<float*>(p));
}
void f16_pack(const void* c, int N, int K, void* p) {
  pack_kmajor(static_cast<const uint16_t*>(c), N, K, static_cast<uint16_t*>(p));
}

inline __m512 load_w(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load_w(const uint16_t* w) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}

// x is fp32 [T][K] here (f16 inputs are widened first); explicit FMAs, no contraction needed.
template <int MR, int NB, typename W>
inline void fgemm_tile(const float* x, int K, const W* w, size_t bstride, __m512 (&acc)[MR][NB]) {
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  }
  for (int k = 0; k < K; ++k) {
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load_w(w + j * bstride + static_cast<size_t>(k) * kNr);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_set1_ps(x[static_cast<size_t>(m) * K + k]);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
}

inline void store_out(float* y, const __m512& v, __mmask16 m) { _mm512_mask_storeu_ps(y, m, v); }
inline void store_out(uint16_t* y, const __m512& v, __mmask16 m) {
  _mm256_mask_storeu_epi16(y, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <int MR, int NB, typename W, typename Y>
inline void fgemm_run(const float* x, int K, const W* w, size_t bstride, int t0, int b0, int N, Y* y) {
  __m512 acc[MR][NB];
  fgemm_tile<MR, NB>(x + static_cast<size_t>(t0) * K, K, w + b0 * bstride, bstride, acc);
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NB; ++j) {
      const int n0 = (b0 + j) * kNr;
      store_out(y + static_cast<size_t>(t0 + m) * N + n0, acc[m][j], tail16(N - n0));
    }
  }
}

template <typename W, typename Y>
void fgemm(const float* x, int T, int K, const W* w, int N, Y* y) {
  const int Nb = round_up(N, kNr) / kNr;
  const size_t bstride = static_cast<size_t>(K) * kNr;
  constexpr int kMr = 6, kNb = 2;
  int b = 0;
  if (T == 1) {
    for (; b + 4 <= Nb; b += 4) fgemm_run<1, 4>(x, K, w, bstride, 0, b, N, y);
  } else {
    for (; b + kNb <= Nb; b += kNb) {
      int t = 0;
      for (; t + kMr <= T; t += kMr) fgemm_run<kMr, kNb>(x, K, w, bstride, t, b, N, y);
      for (; t < T; ++t) fgemm_run<1, kNb>(x, K, w, bstride, t, b, N, y);
    }
  }
  for (; b < Nb; ++b) {
    for (int t = 0; t < T; ++t) fgemm_run<1, 1>(x, K, w, bstride, t, b, N, y);
  }
}

void gemm_f32(const float* x, int T, int K, const void* w_packed, int N, float* y) {
  fgemm(x, T, K, static_cast<const float*>(w_packed), N, y);
}

thread_local std::vector<float> tl_xf;

void gemm_f16(const uint16_t* x, int T, int K, const void* w_packed, int N, uint16_t* y) {
  const size_t n = static_cast<size_t>(T) * K;
  float* xf = scratch(tl_xf, n);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(xf + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))));
  }
  for (; i < n; ++i) xf[i] = _cvtsh_ss(x[i]);
  fgemm(xf, T, K, static_cast<const uint16_t*>(w_packed), N, y);
}

}  // namespace

const KernelTable* x86_avx512vnni_table() {
  static const KernelTable kTable = {
      Isa::kAvx512Vnni,   quantize_rows,   w4_packed_size, w4_pack,         qlinear_w4,
      w8_packed_size,     w8_pack,         qlinear_w8,     qlinear_w4_grouped,
      qlinear_w8_grouped, attn_qk,         attn_pv,        quantize_probs,  f32_packed_size,
      f32_pack,           gemm_f32,        f16_packed_size, f16_pack,        gemm_f16,
      kPb * kNr,          qlinear_work_size, qlinear_prepare, qlinear_tile,  false,
  };
  return &kTable;
}

}  // namespace tfqat
