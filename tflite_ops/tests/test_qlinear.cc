// Op 3 tester: qlinear_w4 / qlinear_w8 and their group-wise-scale forms (op 3g) of every variant
// against an int64 oracle, bit for bit (memcmp of the float outputs), over random odd shapes,
// extreme codes and mixed bit masks.
#include <cstring>
#include <vector>

#include "harness.h"

using namespace tfqat_test;
using tfqat::KernelTable;

namespace {

enum class Fill { kRandom, kMin, kMax, kMinMax, kAlternate };

struct Case {
  int T, K, N;
  std::vector<int8_t> x;    // [T][K]
  std::vector<uint8_t> bits;
  std::vector<float> xs, ws, bias;
  std::vector<int8_t> w;    // [N][K] codes
  bool use_bias, bits_null;
};

int8_t code(Rng& r, Fill f, int lo, int hi, int i) {
  switch (f) {
    case Fill::kMin: return static_cast<int8_t>(lo);
    case Fill::kMax: return static_cast<int8_t>(hi);
    case Fill::kMinMax: return static_cast<int8_t>(r.next() & 1 ? lo : hi);
    case Fill::kAlternate: return static_cast<int8_t>(i & 1 ? lo : hi);
    default: return static_cast<int8_t>(r.uniform(lo, hi));
  }
}

Case make(Rng& r, int T, int K, int N, int wbits, Fill xf, Fill wf) {
  Case c;
  c.T = T, c.K = K, c.N = N;
  c.bits_null = r.uniform(0, 5) == 0;
  const int mode = r.uniform(0, 2);  // all 8, all 4, mixed
  for (int t = 0; t < T; ++t) {
    uint8_t b = c.bits_null || mode == 0 ? 8 : mode == 1 ? 4 : (r.next() & 1 ? 8 : 4);
    c.bits.push_back(b);
    c.xs.push_back(0.001f + r.unit() * 0.1f);
    for (int k = 0; k < K; ++k) c.x.push_back(b == 8 ? code(r, xf, -128, 127, k) : code(r, xf, -8, 7, k));
  }
  const int wlo = wbits == 4 ? -8 : -128, whi = wbits == 4 ? 7 : 127;
  for (int n = 0; n < N; ++n) {
    c.ws.push_back(0.001f + r.unit() * 0.05f);
    c.bias.push_back(r.sym());
    for (int k = 0; k < K; ++k) c.w.push_back(code(r, wf, wlo, whi, n * 7 + k));
  }
  c.use_bias = r.uniform(0, 1) == 1;
  return c;
}

std::vector<uint8_t> canonical_w4(const Case& c) {
  const int stride = (c.K + 1) / 2;
  std::vector<uint8_t> out(static_cast<size_t>(c.N) * stride, 0);
  for (int n = 0; n < c.N; ++n) {
    for (int k = 0; k < c.K; ++k) {
      const uint8_t nib = static_cast<uint8_t>(c.w[static_cast<size_t>(n) * c.K + k]) & 0x0F;
      out[static_cast<size_t>(n) * stride + k / 2] |= static_cast<uint8_t>(k & 1 ? nib << 4 : nib);
    }
  }
  return out;
}

std::vector<float> oracle(const Case& c) {
  std::vector<float> y(static_cast<size_t>(c.T) * c.N);
  for (int t = 0; t < c.T; ++t) {
    for (int n = 0; n < c.N; ++n) {
      int64_t acc = 0;
      for (int k = 0; k < c.K; ++k) acc += int64_t{c.x[static_cast<size_t>(t) * c.K + k]} * c.w[static_cast<size_t>(n) * c.K + k];
      CHECK(acc >= INT32_MIN && acc <= INT32_MAX, "int32 overflow K=%d acc=%lld", c.K, static_cast<long long>(acc));
      float v = static_cast<float>(acc) * (c.xs[t] * c.ws[n]);
      if (c.use_bias) v += c.bias[n];
      y[static_cast<size_t>(t) * c.N + n] = v;
    }
  }
  return y;
}

// The variant's packed weights for c (canonical in, the table's layout out).
std::vector<uint8_t> pack(const KernelTable* kt, const Case& c, int wbits) {
  std::vector<uint8_t> canon;
  if (wbits == 4) {
    canon = canonical_w4(c);
  } else {
    canon.assign(reinterpret_cast<const uint8_t*>(c.w.data()), reinterpret_cast<const uint8_t*>(c.w.data()) + c.w.size());
  }
  const size_t psize = wbits == 4 ? kt->w4_packed_size(c.N, c.K) : kt->w8_packed_size(c.N, c.K);
  std::vector<uint8_t> packed(psize + 1, 0xA5);  // guard byte catches an overrunning pack
  (wbits == 4 ? kt->w4_pack : kt->w8_pack)(canon.data(), c.N, c.K, packed.data());
  CHECK(packed[psize] == 0xA5, "%s: w%d_pack wrote past w%d_packed_size", tfqat::isa_name(kt->isa), wbits, wbits);
  return packed;
}

// y (with one guard float at the end) against want, bit for bit.
void compare(const KernelTable* kt, const char* fn, const Case& c, int G, const std::vector<float>& y,
             const std::vector<float>& want, int id) {
  CHECK(y.back() == -7.0f, "%s: %s wrote past y", tfqat::isa_name(kt->isa), fn);
  if (std::memcmp(y.data(), want.data(), want.size() * sizeof(float)) != 0) {
    size_t i = 0;
    while (std::memcmp(&y[i], &want[i], sizeof(float)) == 0) ++i;
    CHECK(false, "%s %s case %d T=%d K=%d N=%d G=%d: y[%zu]=%.9g want %.9g", tfqat::isa_name(kt->isa), fn, id, c.T,
          c.K, c.N, G, i, y[i], want[i]);
  }
}

void run(const KernelTable* kt, const Case& c, int wbits, const std::vector<float>& want, int id) {
  const std::vector<uint8_t> packed = pack(kt, c, wbits);
  std::vector<float> y(want.size() + 1, -7.0f);
  (wbits == 4 ? kt->qlinear_w4 : kt->qlinear_w8)(c.x.data(), c.xs.data(), c.bits_null ? nullptr : c.bits.data(), c.T,
                                                 c.K, packed.data(), c.ws.data(), c.use_bias ? c.bias.data() : nullptr,
                                                 c.N, y.data());
  compare(kt, wbits == 4 ? "qlinear_w4" : "qlinear_w8", c, 0, y, want, id);
}

// ---- op 3g: group-wise weight scales --------------------------------------------------------
// Scales as the op takes them, [N][ng]; the kernels take the transpose, [ng][N].
struct GroupScales {
  int G, ng;
  std::vector<float> nk, kn;
};

// Mostly positive scales as training produces them, sometimes of either sign or zero: a zero or
// negative scale makes signed zeros, which every variant must add in the same order (0.0f + -0.0f
// is +0.0f).
GroupScales make_scales(Rng& r, int N, int K, int G) {
  GroupScales s{G, (K + G - 1) / G, {}, {}};
  const int kind = r.uniform(0, 4);
  for (int i = 0; i < N * s.ng; ++i) {
    float v = 0.001f + r.unit() * 0.05f;
    if (kind == 0) v = r.sym() * 0.05f;
    if (kind == 1 && r.uniform(0, 3) == 0) v = r.uniform(0, 1) ? 0.0f : -v;
    s.nk.push_back(v);
  }
  s.kn.resize(s.nk.size());
  for (int n = 0; n < N; ++n) {
    for (int g = 0; g < s.ng; ++g) s.kn[static_cast<size_t>(g) * N + n] = s.nk[static_cast<size_t>(n) * s.ng + g];
  }
  return s;
}

// kernels.h op 3g written out: int64 sums checked against the int32 range, then the float sum
// over groups in group order, the token scale, the bias.
std::vector<float> oracle_grouped(const Case& c, const GroupScales& gs) {
  std::vector<float> y(static_cast<size_t>(c.T) * c.N);
  for (int t = 0; t < c.T; ++t) {
    for (int n = 0; n < c.N; ++n) {
      float s = 0.0f;
      for (int g = 0; g < gs.ng; ++g) {
        int64_t acc = 0;
        for (int k = g * gs.G; k < c.K && k < (g + 1) * gs.G; ++k) {
          acc += int64_t{c.x[static_cast<size_t>(t) * c.K + k]} * c.w[static_cast<size_t>(n) * c.K + k];
        }
        CHECK(acc >= INT32_MIN && acc <= INT32_MAX, "int32 overflow K=%d G=%d", c.K, gs.G);
        s = s + static_cast<float>(acc) * gs.nk[static_cast<size_t>(n) * gs.ng + g];
      }
      float v = s * c.xs[t];
      if (c.use_bias) v = v + c.bias[n];
      y[static_cast<size_t>(t) * c.N + n] = v;
    }
  }
  return y;
}

void run_grouped(const KernelTable* kt, const Case& c, int wbits, const GroupScales& gs, const std::vector<float>& want,
                 int id) {
  const std::vector<uint8_t> packed = pack(kt, c, wbits);
  std::vector<float> y(want.size() + 1, -7.0f);
  (wbits == 4 ? kt->qlinear_w4_grouped : kt->qlinear_w8_grouped)(
      c.x.data(), c.xs.data(), c.bits_null ? nullptr : c.bits.data(), c.T, c.K, packed.data(), gs.G, gs.kn.data(),
      c.use_bias ? c.bias.data() : nullptr, c.N, y.data());
  compare(kt, wbits == 4 ? "qlinear_w4_grouped" : "qlinear_w8_grouped", c, gs.G, y, want, id);
}

// K around the group edges (K < G, K = G, K = G +- 1, odd, several groups with a partial last
// one), N around the 4-, 8-, 16- and 64-channel tiles, T = 1 (decode), 3 and 17 (tile tails)
// and random, over every fill of the x and w codes.
int grouped_cases(const std::vector<const KernelTable*>& tables, Rng& r) {
  int cases = 0;
  for (int wbits : {4, 8}) {
    for (int G : {32, 64, 128}) {
      const int ks[] = {1, 7, G / 2 + 3, G - 1, G, G + 1, 2 * G - 7, 2 * G, 3 * G + 17, 5 * G - 1};
      const int ns[] = {1, 3, 4, 9, 16, 17, 33, 63, 64, 67, 130};
      for (int i = 0; i < 90; ++i) {
        const int T = i % 4 == 0 ? 1 : i % 4 == 1 ? 3 : i % 4 == 2 ? 17 : r.uniform(2, 40);
        const int K = i < 60 ? ks[i % 10] : r.uniform(1, 6 * G);
        const int N = i % 3 == 0 ? ns[r.uniform(0, 10)] : r.uniform(1, T > 16 ? 70 : 150);
        const Fill xf = static_cast<Fill>(i % 7 < 4 ? 0 : i % 7 - 2);
        const Fill wf = static_cast<Fill>((i / 7) % 5);
        const Case c = make(r, T, K, N, wbits, xf, wf);
        const GroupScales gs = make_scales(r, N, K, G);
        const auto want = oracle_grouped(c, gs);
        for (const KernelTable* kt : tables) run_grouped(kt, c, wbits, gs, want, i);
        ++cases;
      }
    }
    // Every product at its extreme over a long K (the per-group offset corrections of the
    // vpdpbusd layouts at their largest): 67 channels, 5 tokens, a partial last group.
    for (Fill f : {Fill::kMin, Fill::kMax, Fill::kMinMax}) {
      Case c = make(r, 5, 4100, 67, wbits, f, f == Fill::kMax ? Fill::kMax : Fill::kMin);
      for (auto& b : c.bits) b = 8;
      for (auto& v : c.x) v = f == Fill::kMax ? 127 : -128;
      c.bits_null = false;
      const GroupScales gs = make_scales(r, c.N, c.K, 128);
      const auto want = oracle_grouped(c, gs);
      for (const KernelTable* kt : tables) run_grouped(kt, c, wbits, gs, want, -1);
      ++cases;
    }
  }
  return cases;
}

}  // namespace

int main() {
  const auto tables = variants("qlinear");
  Rng r(20240611);
  int cases = 0;
  for (int wbits : {4, 8}) {
    for (int i = 0; i < 600; ++i) {
      const bool gemv = i % 3 == 0;
      const int T = gemv ? 1 : (i % 3 == 1 ? r.uniform(1, 9) : r.uniform(10, 130));
      const int K = r.uniform(1, i % 5 == 0 ? 700 : 160);
      const int N = r.uniform(1, T > 20 ? 40 : 150);
      const Fill xf = static_cast<Fill>(i % 7 < 4 ? 0 : i % 7 - 2);
      const Fill wf = static_cast<Fill>((i / 7) % 5);
      const Case c = make(r, T, K, N, wbits, xf, wf);
      const auto want = oracle(c);
      for (const KernelTable* kt : tables) run(kt, c, wbits, want, i);
      ++cases;
    }
    // Accumulator bound: K = 16384 with every product at its extreme (see README).
    // N = 67: a full 64-row panel plus a partial one; T = 5: a 4-token tile plus a tail.
    for (Fill f : {Fill::kMin, Fill::kMax, Fill::kMinMax}) {
      for (int T : {1, 5}) {
        Case c = make(r, T, 16384, 67, wbits, f, f == Fill::kMax ? Fill::kMax : Fill::kMin);
        for (auto& b : c.bits) b = 8;
        for (auto& v : c.x) v = f == Fill::kMax ? 127 : -128;
        c.bits_null = false;
        const auto want = oracle(c);
        for (const KernelTable* kt : tables) run(kt, c, wbits, want, -1);
        ++cases;
      }
    }
  }
  const int grouped = grouped_cases(tables, r);
  std::printf("[qlinear] %d cases per variant, %d of them with group-wise scales\n", cases + grouped, grouped);
  return finish("qlinear");
}
