// Op 3 (quantized linear) and op 4 (quantized attention matmuls): plain loops with int32
// accumulators and the float epilogue of kernels.h, in exactly that order.
#include <cmath>
#include <cstring>

#include "../variants.h"

namespace tfqat {
namespace ref {

size_t w4_packed_size(int N, int K) { return static_cast<size_t>(N) * ((K + 1) / 2); }
void w4_pack(const void* canonical, int N, int K, void* packed) {
  std::memcpy(packed, canonical, w4_packed_size(N, K));
}
size_t w8_packed_size(int N, int K) { return static_cast<size_t>(N) * K; }
void w8_pack(const void* canonical, int N, int K, void* packed) {
  std::memcpy(packed, canonical, w8_packed_size(N, K));
}

namespace {
inline float epilogue(int32_t acc, float xs, float ws, const float* bias, int n) {
  const float y = static_cast<float>(acc) * (xs * ws);
  return bias ? y + bias[n] : y;
}

// Weight k of output channel n, in either canonical layout.
inline int weight_at(const QLinearArgs& a, int n, int k) {
  if (a.w_bits == 4) {
    return int4_at(static_cast<const uint8_t*>(a.w_packed) + static_cast<size_t>(n) * ((a.K + 1) / 2), k);
  }
  return static_cast<const int8_t*>(a.w_packed)[static_cast<size_t>(n) * a.K + k];
}
}  // namespace

// The reference works on the caller's codes and canonical weights directly.
size_t qlinear_work_size(int, int, int, int) { return 0; }
void qlinear_prepare(const QLinearArgs&, int, int) {}

// Op 3: one int32 sum, then (float)acc * (xs * ws) [+ bias]. Op 3g: one int32 sum per group,
// then the float sum over groups in group order, * xs, [+ bias] (kernels.h).
void qlinear_tile(const QLinearArgs& a, int t0, int t1, int n0, int n1) {
  const int K = a.K, N = a.N, G = a.group_size;
  const int ng = G ? (K + G - 1) / G : 0;
  for (int t = t0; t < t1; ++t) {
    const int8_t* xr = a.x + static_cast<size_t>(t) * K;
    for (int n = n0; n < n1; ++n) {
      float* out = a.y + static_cast<size_t>(t) * N + n;
      if (!G) {
        int32_t acc = 0;
        for (int k = 0; k < K; ++k) acc += xr[k] * weight_at(a, n, k);
        *out = epilogue(acc, a.xs[t], a.ws[n], a.bias, n);
        continue;
      }
      float s = 0.0f;
      for (int g = 0; g < ng; ++g) {
        const int k1 = (g + 1) * G < K ? (g + 1) * G : K;
        int32_t acc = 0;
        for (int k = g * G; k < k1; ++k) acc += xr[k] * weight_at(a, n, k);
        s = s + static_cast<float>(acc) * a.ws_gn[static_cast<size_t>(g) * N + n];
      }
      const float v = s * a.xs[t];
      *out = a.bias ? v + a.bias[n] : v;
    }
  }
}

namespace {
const QLinearTiles kTiles = {qlinear_work_size, qlinear_prepare, qlinear_tile};
}  // namespace

void qlinear_w4(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K,
                const void* w_packed, const float* ws, const float* bias, int N, float* y) {
  qlinear_whole(kTiles, 4, 0, x, xs, bits, T, K, w_packed, ws, nullptr, bias, N, y);
}

void qlinear_w8(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K,
                const void* w_packed, const float* ws, const float* bias, int N, float* y) {
  qlinear_whole(kTiles, 8, 0, x, xs, bits, T, K, w_packed, ws, nullptr, bias, N, y);
}

void qlinear_w4_grouped(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K,
                        const void* w_packed, int group_size, const float* ws_gn,
                        const float* bias, int N, float* y) {
  qlinear_whole(kTiles, 4, group_size, x, xs, bits, T, K, w_packed, nullptr, ws_gn, bias, N, y);
}

void qlinear_w8_grouped(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K,
                        const void* w_packed, int group_size, const float* ws_gn,
                        const float* bias, int N, float* y) {
  qlinear_whole(kTiles, 8, group_size, x, xs, bits, T, K, w_packed, nullptr, ws_gn, bias, N, y);
}

namespace {
// Element d of cached row s of kv head g, for either cache layout.
inline int kv_at(const void* cache, int kv_bits, int g, int s, int s_cap, int D, int d) {
  const size_t row = static_cast<size_t>(g) * s_cap + s;
  if (kv_bits == 4) {
    return int4_at(static_cast<const uint8_t*>(cache) + row * ((D + 1) / 2), d);
  }
  return static_cast<const int8_t*>(cache)[row * D + d];
}
}  // namespace

void attn_qk(const int8_t* q, const float* qs, int H, int T, int D, const void* k, int kv_bits,
             const float* ks, int Hkv, int S, int s_cap, float* scores) {
  const int group = H / Hkv;
  for (int h = 0; h < H; ++h) {
    const int g = h / group;
    for (int t = 0; t < T; ++t) {
      const int8_t* qr = q + (static_cast<size_t>(h) * T + t) * D;
      float* out = scores + (static_cast<size_t>(h) * T + t) * S;
      for (int s = 0; s < S; ++s) {
        int32_t acc = 0;
        for (int d = 0; d < D; ++d) acc += qr[d] * kv_at(k, kv_bits, g, s, s_cap, D, d);
        out[s] = static_cast<float>(acc) * (qs[t] * ks[s]);
      }
    }
  }
}

// With v_rowbits == nullptr every row is group 0 and out = (float)acc8 * (p_r * vs[0]) alone
// (vs[1] is not read). p_r is the row's scale: ps_rows[h * T + t], or ps for every row.
void attn_pv(const uint8_t* p, float ps, const float* ps_rows, int H, int T, int S, const void* v,
             int kv_bits, const uint8_t* v_rowbits, const float* vs, int Hkv, int s_cap, int D,
             float* out) {
  const int group = H / Hkv;
  for (int h = 0; h < H; ++h) {
    const int g = h / group;
    for (int t = 0; t < T; ++t) {
      const size_t row = static_cast<size_t>(h) * T + t;
      const float pr_scale = ps_rows ? ps_rows[row] : ps;
      const uint8_t* pr = p + row * S;
      float* o = out + row * D;
      for (int d = 0; d < D; ++d) {
        int32_t acc8 = 0, acc4 = 0;
        for (int s = 0; s < S; ++s) {
          const int32_t prod = pr[s] * kv_at(v, kv_bits, g, s, s_cap, D, d);
          if (v_rowbits && v_rowbits[s] == 4) {
            acc4 += prod;
          } else {
            acc8 += prod;
          }
        }
        o[d] = v_rowbits ? static_cast<float>(acc8) * (pr_scale * vs[0]) +
                               static_cast<float>(acc4) * (pr_scale * vs[1])
                         : static_cast<float>(acc8) * (pr_scale * vs[0]);
      }
    }
  }
}

// Op 4p. The dynamic max ignores NaN and negatives (`a > m` is false for both when m starts at
// 0); clamping the quotient before rounding is the same as after (the bounds are integers), and
// `!(q > 0)` sends a NaN quotient to 0.
void quantize_probs(const float* p, int R, int S, size_t ld, int p_max, const float* ps_static,
                    uint8_t* codes, size_t ldc, float* ps_out) {
  const float hi = static_cast<float>(p_max);
  for (int r = 0; r < R; ++r) {
    const float* pr = p + static_cast<size_t>(r) * ld;
    float s;
    if (ps_static) {
      s = *ps_static;
    } else {
      float m = 0.0f;
      for (int i = 0; i < S; ++i) m = pr[i] > m ? pr[i] : m;
      s = m == 0.0f ? 1.0f : m / hi;
      ps_out[r] = s;
    }
    uint8_t* cr = codes + static_cast<size_t>(r) * ldc;
    for (int i = 0; i < S; ++i) {
      float q = pr[i] / s;
      if (!(q > 0.0f)) q = 0.0f;
      if (q > hi) q = hi;
      cr[i] = static_cast<uint8_t>(static_cast<int>(std::nearbyint(q)));
    }
  }
}

}  // namespace ref
}  // namespace tfqat
