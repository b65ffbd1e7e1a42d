// The 256-bit x86 kernels, shared by avx2.cc and avxvnni.cc: each includes this file once, in
// its own translation unit compiled with its own flags, after defining
//   TFQAT_DP_SMALL(acc, u, s)  acc + 4-byte dot of u (u8, every byte < 128) and s (s8)
//   TFQAT_DP_FULL(acc, u, s)   the same for any u8 bytes
//   TFQAT_DP_NATIVE            true when both are one vpdpbusd
// (vpdpbusd for both on AVX-VNNI; exact vpmaddubsw emulations on plain AVX2).
// Everything is in an anonymous namespace, so the two copies never meet at link time.
//
// Layouts: as the AVX-512 variant (see avx512vnni.cc and README "Packing") with 8-row blocks
// (one int32 lane per row in a ymm) and 32-byte groups; panels of 4 blocks; the same alignment
// header.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "../variants.h"

namespace tfqat {
namespace {

constexpr int kNr = 8;
constexpr int kPb = 4;
constexpr bool kNativeDot = TFQAT_DP_NATIVE;
// W8 GEMM tile for 16 ymm registers: kMr8 x kNb8 accumulators + kNb8 weights + a broadcast.
constexpr int kMr8 = 4, kNb8 = 2;

inline int round_up(int v, int m) { return (v + m - 1) / m * m; }
inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
template <typename T>
T* scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}
inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// One-byte alignment header in front of the integer layouts, as in avx512vnni.cc: byte 0 is
// the offset (1..64) to the 64-byte aligned payload.
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

struct Panel {
  size_t base;
  size_t gstride;
  int pb;
};
inline Panel panel_of(int p, int Nb, size_t block_bytes) {
  const int pb = Nb - p * kPb < kPb ? Nb - p * kPb : kPb;
  return {static_cast<size_t>(p) * kPb * block_bytes, static_cast<size_t>(32) * pb, pb};
}

// y[n0 .. n0+7] = (float)acc * (xs * ws[n]) (+ bias[n]); a partial block goes through a buffer.
inline void epilogue_store(float* y, int n0, int N, __m256i acc, float xs, const float* ws, const float* bias) {
  const int n = N - n0 < kNr ? N - n0 : kNr;
  if (n == kNr) {
    const __m256 s = _mm256_mul_ps(_mm256_set1_ps(xs), _mm256_loadu_ps(ws + n0));
    __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), s);
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n0));
    _mm256_storeu_ps(y + n0, v);
    return;
  }
  alignas(32) int32_t a[kNr];
  _mm256_store_si256(reinterpret_cast<__m256i*>(a), acc);
  for (int j = 0; j < n; ++j) {
    const float v = static_cast<float>(a[j]) * (xs * ws[n0 + j]);
    y[n0 + j] = bias ? v + bias[n0 + j] : v;
  }
}

// ---- op 1 ------------------------------------------------------------------------------
// Same float operations as the reference, lane by lane; the k tail runs the scalar form.
void quantize_rows(const float* x, int T, int K, const uint8_t* bits, const float* static_scales, int8_t* codes,
                   float* scales_out) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int t = 0; t < T; ++t) {
    const float* xr = x + static_cast<size_t>(t) * K;
    const bool b8 = bits[t] == 8;
    const float qmax = b8 ? 127.0f : 7.0f, qlo = -qmax - 1.0f;
    float s;
    if (static_scales) {
      s = b8 ? static_scales[0] : static_scales[1];
    } else {
      __m256 m = _mm256_setzero_ps();
      int k = 0;
      for (; k + 8 <= K; k += 8) m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(xr + k), absmask), m);
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, m);
      float mx = 0.0f;
      for (float l : lanes) mx = l > mx ? l : mx;
      for (; k < K; ++k) {
        const float a = std::fabs(xr[k]);
        mx = a > mx ? a : mx;
      }
      s = mx == 0.0f ? 1.0f : mx / qmax;
    }
    scales_out[t] = s;
    const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(qlo), hi = _mm256_set1_ps(qmax);
    int8_t* cr = codes + static_cast<size_t>(t) * K;
    int k = 0;
    for (; k + 8 <= K; k += 8) {
      __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xr + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);  // max(NaN, lo) = lo
      const __m256i i32 = _mm256_cvtps_epi32(q);
      const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(cr + k), _mm_packs_epi16(i16, i16));
    }
    for (; k < K; ++k) {
      float r = std::nearbyint(xr[k] / s);
      if (!(r >= qlo)) r = qlo;
      if (r > qmax) r = qmax;
      cr[k] = static_cast<int8_t>(static_cast<int>(r));
    }
  }
}

// ---- op 3 -------------------------------------------------------------------------------
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

// One row of x into its zero-padded copy d ([Kp], xored with xor_mask); returns sum_k x.
inline int32_t pad_row(const int8_t* xr, int K, int Kp, uint8_t xor_mask, int8_t* d) {
  int32_t sum = 0;
  for (int k = 0; k < K; ++k) {
    sum += xr[k];
    d[k] = static_cast<int8_t>(xr[k] ^ static_cast<int8_t>(xor_mask));
  }
  for (int k = K; k < Kp; ++k) d[k] = static_cast<int8_t>(xor_mask);
  return sum;
}

// Rows [t0, t1): the padded copy of x and factor * sum_k x per token.
void prepare_x(const int8_t* x, int t0, int t1, int K, int Kp, uint8_t xor_mask, int factor, int8_t* xp,
               int32_t* corr) {
  for (int t = t0; t < t1; ++t) {
    corr[t] = pad_row(x + static_cast<size_t>(t) * K, K, Kp, xor_mask, xp + static_cast<size_t>(t) * Kp) * factor;
  }
}

// Group-wise scales (op 3g). A group of G k (a multiple of 32) is G / 8 packed W4 chunks or
// G / 4 W8 quads, so it never splits one: op 3's integer tiles run once per group, and each
// group's int32 tile becomes float and is added to a float tile in group order. The scales of 8
// consecutive channels at one group are one load from ws ([ng][N]).
struct Groups {
  int G, ng;
  const float* ws;      // [ng][N]
  const int32_t* corr;  // [T][ng]: the offset correction, -factor * sum_{k in g} x[t][k]
};

// Op 3g, rows [t0, t1): the zero-padded copy of x (signed: both layouts put the weights on the
// unsigned side) and -factor * sum_{k in g} x[t][k] per token and group.
void prepare_x_groups(const int8_t* x, int t0, int t1, int K, int Kp, int G, int factor, int8_t* xp,
                      int32_t* corr) {
  const int ng = (K + G - 1) / G;
  const __m256i ones = _mm256_set1_epi8(1);
  for (int t = t0; t < t1; ++t) {
    int8_t* r = xp + static_cast<size_t>(t) * Kp;
    pad_row(x + static_cast<size_t>(t) * K, K, Kp, 0, r);
    for (int g = 0; g < ng; ++g) {
      const int k1 = (g + 1) * G < K ? (g + 1) * G : K;
      int k = g * G;
      __m256i sum = _mm256_setzero_si256();
      for (; k + 32 <= k1; k += 32) {
        sum = TFQAT_DP_SMALL(sum, ones, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + k)));
      }
      int32_t s = hsum(sum);
      for (; k < k1; ++k) s += r[k];
      corr[static_cast<size_t>(t) * ng + g] = -s * factor;
    }
  }
}

// ws (or bias) for the channels [n, n + 8) of which `rem` (>= 1) exist; the rest read as 0.
inline __m256 load_channels(const float* p, int rem) {
  if (rem >= kNr) return _mm256_loadu_ps(p);
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(p, m);
}

// The accumulator start of tokens t0 .. t0 + MR - 1 in group g: the (negated) correction, which
// saves a subtraction per accumulator and group.
template <int MR>
inline void group_init(const Groups& gr, int g, int t0, __m256i (&init)[MR]) {
  for (int m = 0; m < MR; ++m) init[m] = _mm256_set1_epi32(gr.corr[static_cast<size_t>(t0 + m) * gr.ng + g]);
}

// s[m][j] = s[m][j] + (float)acc[m][j] * ws[g][n0 + 8 j .. +7].
template <int MR, int NB>
inline void group_fold(const __m256i (&acc)[MR][NB], const Groups& gr, int g, int n0, int N, __m256 (&s)[MR][NB]) {
  const float* wsg = gr.ws + static_cast<size_t>(g) * N + n0;
  for (int j = 0; j < NB; ++j) {
    const __m256 wv = load_channels(wsg + kNr * j, N - n0 - kNr * j);
    for (int m = 0; m < MR; ++m) s[m][j] = _mm256_add_ps(s[m][j], _mm256_mul_ps(_mm256_cvtepi32_ps(acc[m][j]), wv));
  }
}

// y = s * xs[t] (+ bias); a partial block goes through a buffer.
template <int MR, int NB>
inline void group_store(const __m256 (&s)[MR][NB], int t0, int n0, const float* xs, const float* bias, int N,
                        float* y) {
  for (int m = 0; m < MR; ++m) {
    float* yr = y + static_cast<size_t>(t0 + m) * N;
    for (int j = 0; j < NB; ++j) {
      const int n = n0 + kNr * j, rem = N - n;
      __m256 v = _mm256_mul_ps(s[m][j], _mm256_set1_ps(xs[t0 + m]));
      if (bias) v = _mm256_add_ps(v, load_channels(bias + n, rem));
      if (rem >= kNr) {
        _mm256_storeu_ps(yr + n, v);
      } else {
        alignas(32) float b[kNr];
        _mm256_store_ps(b, v);
        std::memcpy(yr + n, b, sizeof(float) * rem);
      }
    }
  }
}

size_t w4_packed_size(int N, int K) { return kHeader + static_cast<size_t>(round_up(N, kNr)) * round_up(K, 8) / 2; }

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
// token m's accumulators starting from init[m].
// Weights (w + 8 in [0, 15]) are the unsigned operand: the small-range dot is exact.
template <int MR, int NB>
inline void w4_tile(const int8_t* xb, int Kp, const uint8_t* wb, size_t gstride, int nc, const __m256i (&init)[MR],
                    __m256i (&acc)[MR][NB]) {
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NB; ++j) acc[m][j] = init[m];
  }
  // A GEMV with a native vpdpbusd saves the shift: the high nibble stays in place and gets its
  // own accumulator (a full-range unsigned operand would cost the emulated dot more, not less).
  constexpr bool kHiSplit = MR == 1 && kNativeDot;
  __m256i acc_hi[NB];
  for (int j = 0; j < NB; ++j) acc_hi[j] = _mm256_setzero_si256();
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  for (int g = 0; g < nc; ++g) {
    __m256i xl[MR], xh[MR];
    for (int m = 0; m < MR; ++m) {
      xl[m] = _mm256_set1_epi32(load_i32(xb + static_cast<size_t>(m) * Kp + 8 * g));
      xh[m] = _mm256_set1_epi32(load_i32(xb + static_cast<size_t>(m) * Kp + 8 * g + 4));
    }
    for (int j = 0; j < NB; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + g * gstride + j * 32));
      if (kHiSplit) {  // high nibbles masked in place (16 * (w + 8)), divided out at the end
        acc[0][j] = TFQAT_DP_FULL(acc[0][j], _mm256_and_si256(v, m0f), xl[0]);
        acc_hi[j] = TFQAT_DP_FULL(acc_hi[j], _mm256_andnot_si256(m0f, v), xh[0]);
        continue;
      }
      const __m256i wl = _mm256_and_si256(v, m0f), wh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
      for (int m = 0; m < MR; ++m) {
        acc[m][j] = TFQAT_DP_SMALL(acc[m][j], wl, xl[m]);
        acc[m][j] = TFQAT_DP_SMALL(acc[m][j], wh, xh[m]);
      }
    }
  }
  if (kHiSplit) {
    for (int j = 0; j < NB; ++j) acc[0][j] = _mm256_add_epi32(acc[0][j], _mm256_srai_epi32(acc_hi[j], 4));
  }
}

// Tokens [t0, t0 + MR) x panel blocks [jb, jb + NB) (= blocks [b0, b0 + NB)); gr == nullptr:
// op 3's per-channel epilogue, else op 3g's.
template <int MR, int NB>
inline void w4_run(const int8_t* xp, const int32_t* corr, int Kp, const uint8_t* w, const Panel& pn, int jb, int t0,
                   int b0, const Groups* gr, const float* xs, const float* ws, const float* bias, int N, float* y) {
  const uint8_t* wb = w + pn.base + jb * 32;
  const int8_t* xb = xp + static_cast<size_t>(t0) * Kp;
  __m256i acc[MR][NB], init[MR];
  if (!gr) {
    for (int m = 0; m < MR; ++m) init[m] = _mm256_setzero_si256();
    w4_tile<MR, NB>(xb, Kp, wb, pn.gstride, Kp / 8, init, acc);
    for (int m = 0; m < MR; ++m) {
      const __m256i c = _mm256_set1_epi32(corr[t0 + m]);
      for (int j = 0; j < NB; ++j) {
        epilogue_store(y + static_cast<size_t>(t0 + m) * N, (b0 + j) * kNr, N, _mm256_sub_epi32(acc[m][j], c),
                       xs[t0 + m], ws, bias);
      }
    }
    return;
  }
  __m256 s[MR][NB];
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NB; ++j) s[m][j] = _mm256_setzero_ps();
  }
  const int gc = gr->G / 8, nc = Kp / 8;
  for (int g = 0; g < gr->ng; ++g) {
    const int c0 = g * gc;
    group_init<MR>(*gr, g, t0, init);
    w4_tile<MR, NB>(xb + 8 * c0, Kp, wb + c0 * pn.gstride, pn.gstride, nc - c0 < gc ? nc - c0 : gc, init, acc);
    group_fold<MR, NB>(acc, *gr, g, b0 * kNr, N, s);
  }
  group_store<MR, NB>(s, t0, b0 * kNr, xs, bias, N, y);
}

// The rectangle one tile covers: tokens [t0, t1) x panels [p0, p1).
struct Range {
  int t0, t1, p0, p1;
};

// The tile's panels: one token takes the whole panel per pass, more go in MR x NB tiles over
// columns of NB blocks (kPb % NB == 0); a partial panel goes block by block.
template <int MR, int NB>
void w4_panels(const int8_t* xp, const int32_t* corr, const Range& r, int Kp, int Nb, const uint8_t* w,
               const Groups* gr, const float* xs, const float* ws, const float* bias, int N, float* y) {
  static_assert(kPb % NB == 0, "columns of NB blocks tile a panel");
  for (int p = r.p0; p < r.p1; ++p) {
    const Panel pn = panel_of(p, Nb, static_cast<size_t>(Kp) * kNr / 2);
    const int b0 = p * kPb;
    if (pn.pb == kPb && r.t1 - r.t0 == 1) {
      w4_run<1, kPb>(xp, corr, Kp, w, pn, 0, r.t0, b0, gr, xs, ws, bias, N, y);
    } else if (pn.pb == kPb) {
      for (int jb = 0; jb < kPb; jb += NB) {
        int t = r.t0;
        for (; t + MR <= r.t1; t += MR) w4_run<MR, NB>(xp, corr, Kp, w, pn, jb, t, b0 + jb, gr, xs, ws, bias, N, y);
        for (; t < r.t1; ++t) w4_run<1, NB>(xp, corr, Kp, w, pn, jb, t, b0 + jb, gr, xs, ws, bias, N, y);
      }
    } else {
      for (int jb = 0; jb < pn.pb; ++jb) {
        for (int t = r.t0; t < r.t1; ++t) w4_run<1, 1>(xp, corr, Kp, w, pn, jb, t, b0 + jb, gr, xs, ws, bias, N, y);
      }
    }
  }
}

// Op 3g GEMM tiles: the float tile doubles the live registers (16 ymm in all). On AVX2 (emulated
// dot) 4 x 16 / 4 x 8 and the other tiles tried (2 x 32, 3 x 16, 2 x 16) time the same within
// noise at SmolLM2 shapes; AVX-VNNI was not at hand to tune on.
constexpr int kGMr4 = 4, kGNb4 = 2, kGMr8 = 4, kGNb8 = 1;

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

// MR tokens x NB blocks over the 4-k quads [q0, q0 + nq).
// Op 3 (kWeightsUnsigned false): activations offset to x + 128 are the unsigned operand (full
// range), weights signed. Op 3g (true): x signed and w ^ 0x80 = w + 128 unsigned (one xor per
// loaded vector, shared by the MR tokens), so the offset to take back is 128 * sum_{k in g} x,
// per token and group, from the activations (op 3's per-row weight sums would be needed per row
// *and* group).
template <int MR, int NB, bool kWeightsUnsigned>
inline void w8_tile(const int8_t* xb, int Kp, const int8_t* wb, size_t gstride, int q0, int nq,
                    const __m256i (&init)[MR], __m256i (&acc)[MR][NB]) {
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NB; ++j) acc[m][j] = init[m];
  }
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int g = q0; g < q0 + nq; ++g) {
    __m256i wv[NB];
    for (int j = 0; j < NB; ++j) {
      wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + g * gstride + j * 32));
      if (kWeightsUnsigned) wv[j] = _mm256_xor_si256(wv[j], flip);
    }
    for (int m = 0; m < MR; ++m) {
      const __m256i xv = _mm256_set1_epi32(load_i32(xb + static_cast<size_t>(m) * Kp + 4 * g));
      for (int j = 0; j < NB; ++j) {
        acc[m][j] = kWeightsUnsigned ? TFQAT_DP_FULL(acc[m][j], wv[j], xv) : TFQAT_DP_FULL(acc[m][j], xv, wv[j]);
      }
    }
  }
}

template <int MR, int NB>
inline void w8_run(const int8_t* xp, int Kp, const int8_t* w, const Panel& pn, int jb, const int32_t* wcorr, int t0,
                   int b0, const Groups* gr, const float* xs, const float* ws, const float* bias, int N, float* y) {
  const int8_t* wb = w + pn.base + jb * 32;
  const int8_t* xb = xp + static_cast<size_t>(t0) * Kp;
  __m256i acc[MR][NB], init[MR];
  if (!gr) {
    for (int m = 0; m < MR; ++m) init[m] = _mm256_setzero_si256();
    w8_tile<MR, NB, false>(xb, Kp, wb, pn.gstride, 0, Kp / 4, init, acc);
    for (int j = 0; j < NB; ++j) {
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wcorr + (b0 + j) * kNr));
      for (int m = 0; m < MR; ++m) {
        epilogue_store(y + static_cast<size_t>(t0 + m) * N, (b0 + j) * kNr, N, _mm256_sub_epi32(acc[m][j], c),
                       xs[t0 + m], ws, bias);
      }
    }
    return;
  }
  __m256 s[MR][NB];
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NB; ++j) s[m][j] = _mm256_setzero_ps();
  }
  const int gq = gr->G / 4, nq = Kp / 4;
  for (int g = 0; g < gr->ng; ++g) {
    group_init<MR>(*gr, g, t0, init);
    w8_tile<MR, NB, true>(xb, Kp, wb, pn.gstride, g * gq, nq - g * gq < gq ? nq - g * gq : gq, init, acc);
    group_fold<MR, NB>(acc, *gr, g, b0 * kNr, N, s);
  }
  group_store<MR, NB>(s, t0, b0 * kNr, xs, bias, N, y);
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
    for (; jb + NB <= pn.pb; jb += NB) {
      int t = r.t0;
      for (; t + MR <= r.t1; t += MR) w8_run<MR, NB>(xp, Kp, w, pn, jb, wcorr, t, b0 + jb, gr, xs, ws, bias, N, y);
      for (; t < r.t1; ++t) w8_run<1, NB>(xp, Kp, w, pn, jb, wcorr, t, b0 + jb, gr, xs, ws, bias, N, y);
    }
    for (; jb < pn.pb; ++jb) {
      for (int t = r.t0; t < r.t1; ++t) w8_run<1, 1>(xp, Kp, w, pn, jb, wcorr, t, b0 + jb, gr, xs, ws, bias, N, y);
    }
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
      w4_panels<kGMr4, kGNb4>(wk.xp, nullptr, r, Kp, Nb, w, &gr, a.xs, nullptr, a.bias, a.N, a.y);
    } else {
      w8_panels<kGMr8, kGNb8>(wk.xp, r, Kp, Nb, reinterpret_cast<const int8_t*>(w), nullptr, &gr, a.xs, nullptr,
                              a.bias, a.N, a.y);
    }
  } else if (a.w_bits == 4) {
    w4_panels<4, kPb>(wk.xp, wk.corr, r, Kp, Nb, w, nullptr, a.xs, a.ws, a.bias, a.N, a.y);
  } else {
    const int8_t* w8 = reinterpret_cast<const int8_t*>(w);
    const int32_t* wcorr = reinterpret_cast<const int32_t*>(w8 + static_cast<size_t>(Np) * Kp);
    w8_panels<kMr8, kNb8>(wk.xp, r, Kp, Nb, w8, wcorr, nullptr, a.xs, a.ws, a.bias, a.N, a.y);
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

// Rows [0, S) of kv head g as int8 with row stride Dp = round_up(D, 32), zero padded.
const int8_t* kv_rows(const void* cache, int kv_bits, int g, int S, int s_cap, int D, int Dp) {
  int8_t* out = scratch(tl_kv, static_cast<size_t>(S) * Dp);
  const size_t stride = kv_bits == 4 ? static_cast<size_t>((D + 1) / 2) : static_cast<size_t>(D);
  const uint8_t* src = static_cast<const uint8_t*>(cache) + static_cast<size_t>(g) * s_cap * stride;
  for (int s = 0; s < S; ++s) {
    const uint8_t* r = src + static_cast<size_t>(s) * stride;
    int8_t* o = out + static_cast<size_t>(s) * Dp;
    if (kv_bits == 4) {
      for (int d = 0; d < D; ++d) o[d] = static_cast<int8_t>(ref::int4_at(r, d));
    } else {
      std::memcpy(o, r, static_cast<size_t>(D));
    }
    std::memset(o + D, 0, static_cast<size_t>(Dp - D));
  }
  return out;
}

thread_local std::vector<int8_t> tl_q;

void attn_qk(const int8_t* q, const float* qs, int H, int T, int D, const void* k, int kv_bits, const float* ks,
             int Hkv, int S, int s_cap, float* scores) {
  const int group = H / Hkv, Dp = round_up(D, 32);
  int8_t* qu = scratch(tl_q, static_cast<size_t>(Dp));
  const __m256i ones = _mm256_set1_epi8(1);
  for (int g = 0; g < Hkv; ++g) {
    const int8_t* kr = kv_rows(k, kv_bits, g, S, s_cap, D, Dp);
    for (int h = g * group; h < (g + 1) * group; ++h) {
      for (int t = 0; t < T; ++t) {
        const int8_t* qr = q + (static_cast<size_t>(h) * T + t) * D;
        // q + 128 as the unsigned operand; sum_d k is taken back as 128 * ksum (pad: q = 0).
        for (int d = 0; d < Dp; ++d) qu[d] = static_cast<int8_t>((d < D ? qr[d] : 0) ^ 0x80);
        float* out = scores + (static_cast<size_t>(h) * T + t) * S;
        for (int s = 0; s < S; ++s) {
          __m256i a = _mm256_setzero_si256(), ksum = _mm256_setzero_si256();
          for (int d = 0; d < Dp; d += 32) {
            const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kr + static_cast<size_t>(s) * Dp + d));
            a = TFQAT_DP_FULL(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qu + d)), kv);
            ksum = TFQAT_DP_SMALL(ksum, ones, kv);
          }
          const int32_t acc = hsum(a) - 128 * hsum(ksum);
          out[s] = static_cast<float>(acc) * (qs[t] * ks[s]);
        }
      }
    }
  }
}

// PV as in the AVX-512 variant: rows s, s+1 interleaved into int16 pairs for vpmaddwd.
void attn_pv(const uint8_t* p, float ps, const float* ps_rows, int H, int T, int S, const void* v, int kv_bits,
             const uint8_t* v_rowbits, const float* vs, int Hkv, int s_cap, int D, float* out) {
  const int group = H / Hkv, Dp = round_up(D, 32);
  for (int g = 0; g < Hkv; ++g) {
    const int8_t* vr = kv_rows(v, kv_bits, g, S, s_cap, D, Dp);
    for (int h = g * group; h < (g + 1) * group; ++h) {
      for (int t = 0; t < T; ++t) {
        const size_t row = static_cast<size_t>(h) * T + t;
        const float pr_scale = ps_rows ? ps_rows[row] : ps;
        const float sc8 = pr_scale * vs[0], sc4 = v_rowbits ? pr_scale * vs[1] : 0.0f;
        const uint8_t* pr = p + row * S;
        float* o = out + row * D;
        for (int d = 0; d < Dp; d += 16) {
          __m256i a8l = _mm256_setzero_si256(), a8h = a8l, a4l = a8l, a4h = a8l;
          for (int s = 0; s < S; s += 2) {
            const bool has1 = s + 1 < S;
            const __m256i v0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vr + static_cast<size_t>(s) * Dp + d)));
            const __m256i v1 = has1 ? _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vr + static_cast<size_t>(s + 1) * Dp + d)))
                                    : _mm256_setzero_si256();
            const __m256i lo = _mm256_unpacklo_epi16(v0, v1), hi = _mm256_unpackhi_epi16(v0, v1);
            const int p0 = pr[s], p1 = has1 ? pr[s + 1] : 0;
            const bool g4_0 = v_rowbits && v_rowbits[s] == 4, g4_1 = has1 && v_rowbits && v_rowbits[s + 1] == 4;
            const int pp8 = (g4_0 ? 0 : p0) | ((g4_1 ? 0 : p1) << 16), pp4 = (g4_0 ? p0 : 0) | ((g4_1 ? p1 : 0) << 16);
            if (pp8) {
              const __m256i b = _mm256_set1_epi32(pp8);
              a8l = _mm256_add_epi32(a8l, _mm256_madd_epi16(lo, b));
              a8h = _mm256_add_epi32(a8h, _mm256_madd_epi16(hi, b));
            }
            if (pp4) {
              const __m256i b = _mm256_set1_epi32(pp4);
              a4l = _mm256_add_epi32(a4l, _mm256_madd_epi16(lo, b));
              a4h = _mm256_add_epi32(a4h, _mm256_madd_epi16(hi, b));
            }
          }
          // lo holds d = 0-3 | 8-11, hi d = 4-7 | 12-15 (per 128-bit lane).
          alignas(32) int32_t r8[16], r4[16];
          _mm256_store_si256(reinterpret_cast<__m256i*>(r8), _mm256_permute2x128_si256(a8l, a8h, 0x20));
          _mm256_store_si256(reinterpret_cast<__m256i*>(r8 + 8), _mm256_permute2x128_si256(a8l, a8h, 0x31));
          _mm256_store_si256(reinterpret_cast<__m256i*>(r4), _mm256_permute2x128_si256(a4l, a4h, 0x20));
          _mm256_store_si256(reinterpret_cast<__m256i*>(r4 + 8), _mm256_permute2x128_si256(a4l, a4h, 0x31));
          for (int i = 0; i < 16 && d + i < D; ++i) {
            o[d + i] = v_rowbits ? static_cast<float>(r8[i]) * sc8 + static_cast<float>(r4[i]) * sc4
                                 : static_cast<float>(r8[i]) * sc8;
          }
        }
      }
    }
  }
}

// ---- op 4p ------------------------------------------------------------------------------
// As the reference, lane by lane: maxps(x, m) is `x > m ? x : m` (NaN in x keeps m); the lanes
// hold +0 or positive values, so their max is the same in any order; maxps(q, 0) sends a NaN
// quotient to 0. The s tail runs the scalar form.
void quantize_probs(const float* p, int R, int S, size_t ld, int p_max, const float* ps_static, uint8_t* codes,
                    size_t ldc, float* ps_out) {
  const float hi = static_cast<float>(p_max);
  const __m256 vhi = _mm256_set1_ps(hi), zero = _mm256_setzero_ps();
  for (int r = 0; r < R; ++r) {
    const float* pr = p + static_cast<size_t>(r) * ld;
    float s;
    if (ps_static) {
      s = *ps_static;
    } else {
      __m256 m = zero;
      int i = 0;
      for (; i + 8 <= S; i += 8) m = _mm256_max_ps(_mm256_loadu_ps(pr + i), m);
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, m);
      float mx = 0.0f;
      for (float l : lanes) mx = l > mx ? l : mx;
      for (; i < S; ++i) mx = pr[i] > mx ? pr[i] : mx;
      s = mx == 0.0f ? 1.0f : mx / hi;
      ps_out[r] = s;
    }
    const __m256 vs = _mm256_set1_ps(s);
    uint8_t* cr = codes + static_cast<size_t>(r) * ldc;
    int i = 0;
    for (; i + 8 <= S; i += 8) {
      const __m256 q = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(_mm256_loadu_ps(pr + i), vs), zero), vhi);
      const __m256i i32 = _mm256_cvtps_epi32(q);  // round half even; 0 .. 255, so the packs are exact
      const __m128i u16 = _mm_packus_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(cr + i), _mm_packus_epi16(u16, u16));
    }
    for (; i < S; ++i) {
      float q = pr[i] / s;
      if (!(q > 0.0f)) q = 0.0f;
      if (q > hi) q = hi;
      cr[i] = static_cast<uint8_t>(static_cast<int>(std::nearbyint(q)));
    }
  }
}

// ---- op 5 -------------------------------------------------------------------------------
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
void f32_pack(const void* c, int N, int K, void* p) { pack_kmajor(static_cast<const float*>(c), N, K, static_cast<float*>(p)); }
void f16_pack(const void* c, int N, int K, void* p) {
  pack_kmajor(static_cast<const uint16_t*>(c), N, K, static_cast<uint16_t*>(p));
}

inline __m256 load_w(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load_w(const uint16_t* w) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))); }
inline void store_out(float* y, __m256 v, int n) {
  if (n == kNr) {
    _mm256_storeu_ps(y, v);
    return;
  }
  alignas(32) float b[kNr];
  _mm256_store_ps(b, v);
  std::memcpy(y, b, sizeof(float) * n);
}
inline void store_out(uint16_t* y, __m256 v, int n) {
  alignas(16) uint16_t b[kNr];
  _mm_store_si128(reinterpret_cast<__m128i*>(b), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  std::memcpy(y, b, sizeof(uint16_t) * n);
}

template <int MR, int NB, typename W, typename Y>
inline void fgemm_run(const float* x, int K, const W* w, size_t bstride, int t0, int b0, int N, Y* y) {
  __m256 acc[MR][NB];
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
  }
  const float* xb = x + static_cast<size_t>(t0) * K;
  const W* wb = w + b0 * bstride;
  for (int k = 0; k < K; ++k) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load_w(wb + j * bstride + static_cast<size_t>(k) * kNr);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_set1_ps(xb[static_cast<size_t>(m) * K + k]);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NB; ++j) {
      const int n0 = (b0 + j) * kNr;
      store_out(y + static_cast<size_t>(t0 + m) * N + n0, acc[m][j], N - n0 < kNr ? N - n0 : kNr);
    }
  }
}

template <typename W, typename Y>
void fgemm(const float* x, int T, int K, const W* w, int N, Y* y) {
  const int Nb = round_up(N, kNr) / kNr;
  const size_t bstride = static_cast<size_t>(K) * kNr;
  constexpr int kFMr = 4, kFNb = 3;
  int b = 0;
  for (; b + kFNb <= Nb; b += kFNb) {
    int t = 0;
    for (; t + kFMr <= T; t += kFMr) fgemm_run<kFMr, kFNb>(x, K, w, bstride, t, b, N, y);
    for (; t < T; ++t) fgemm_run<1, kFNb>(x, K, w, bstride, t, b, N, y);
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
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(xf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  for (; i < n; ++i) xf[i] = _cvtsh_ss(x[i]);
  fgemm(xf, T, K, static_cast<const uint16_t*>(w_packed), N, y);
}

KernelTable make_table(Isa isa) {
  return {isa,
          quantize_rows,
          w4_packed_size,
          w4_pack,
          qlinear_w4,
          w8_packed_size,
          w8_pack,
          qlinear_w8,
          qlinear_w4_grouped,
          qlinear_w8_grouped,
          attn_qk,
          attn_pv,
          quantize_probs,
          f32_packed_size,
          f32_pack,
          gemm_f32,
          f16_packed_size,
          f16_pack,
          gemm_f16,
          kPb * kNr,
          qlinear_work_size,
          qlinear_prepare,
          qlinear_tile,
          false};
}

}  // namespace
}  // namespace tfqat
