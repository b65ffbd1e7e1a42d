// Op 1 tester (quantize_rows, every variant vs a scalar oracle, codes and scales bit for bit)
// and op 2 (token bit selection: crafted ties, rho grid, NaN, vs a brute-force ranking oracle).
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "harness.h"

using namespace tfqat_test;
using tfqat::KernelTable;

namespace {

// The oracle spelled differently from ref: std::round-free, explicit tie handling.
int8_t quant(float x, float s, int qmax) {
  const float v = x / s;
  if (std::isnan(v)) return static_cast<int8_t>(-qmax - 1);
  const double f = std::floor(static_cast<double>(v)), frac = static_cast<double>(v) - f;
  double r = frac > 0.5 ? f + 1 : frac < 0.5 ? f : (std::fmod(f, 2.0) == 0 ? f : f + 1);
  if (r < -qmax - 1) r = -qmax - 1;
  if (r > qmax) r = qmax;
  return static_cast<int8_t>(r);
}

void test_quantize(const std::vector<const KernelTable*>& tables) {
  Rng r(5);
  for (int i = 0; i < 700; ++i) {
    const int T = r.uniform(1, i % 10 == 0 ? 130 : 9), K = r.uniform(1, i % 4 == 0 ? 1100 : 90);
    const bool dynamic = i % 2 == 0;
    std::vector<uint8_t> bits(T);
    std::vector<float> x(static_cast<size_t>(T) * K);
    const float st[2] = {0.0625f, 0.5f};  // powers of two: x = (m + 0.5) * s hits exact ties
    for (int t = 0; t < T; ++t) {
      bits[t] = r.next() & 1 ? 8 : 4;
      const int kind = r.uniform(0, 6);
      for (int k = 0; k < K; ++k) {
        float& e = x[static_cast<size_t>(t) * K + k];
        switch (kind) {
          case 0: e = 0.0f; break;                                            // zero row
          case 1: e = (r.uniform(-140, 140) + 0.5f) * st[bits[t] == 8 ? 0 : 1]; break;  // ties
          case 2: e = r.sym() * 1e4f; break;                                  // far out of range
          case 3: e = k == 0 ? -0.0f : r.sym() * 1e-3f; break;
          case 4: e = (r.uniform(-10, 10) + 0.5f) * 0.125f; break;            // dynamic ties
          default: e = r.sym() * 3.0f;
        }
      }
      if (kind == 5 && K > 2) x[static_cast<size_t>(t) * K + 1] = std::numeric_limits<float>::quiet_NaN();
    }
    std::vector<int8_t> want_c(x.size());
    std::vector<float> want_s(T);
    for (int t = 0; t < T; ++t) {
      const int qmax = bits[t] == 8 ? 127 : 7;
      float s;
      if (!dynamic) {
        s = st[bits[t] == 8 ? 0 : 1];
      } else {
        float m = 0.0f;
        for (int k = 0; k < K; ++k) {
          const float a = std::fabs(x[static_cast<size_t>(t) * K + k]);
          if (!std::isnan(a) && a > m) m = a;
        }
        s = m == 0.0f ? 1.0f : m / static_cast<float>(qmax);
      }
      want_s[t] = s;
      for (int k = 0; k < K; ++k) want_c[static_cast<size_t>(t) * K + k] = quant(x[static_cast<size_t>(t) * K + k], s, qmax);
    }
    for (const KernelTable* kt : tables) {
      std::vector<int8_t> c(x.size() + 1, 99);
      std::vector<float> s(T + 1, -1.0f);
      kt->quantize_rows(x.data(), T, K, bits.data(), dynamic ? nullptr : st, c.data(), s.data());
      CHECK(std::memcmp(c.data(), want_c.data(), want_c.size()) == 0 && c.back() == 99,
            "%s quantize_rows codes case %d T=%d K=%d dyn=%d", tfqat::isa_name(kt->isa), i, T, K, dynamic);
      CHECK(std::memcmp(s.data(), want_s.data(), T * sizeof(float)) == 0 && s.back() == -1.0f,
            "%s quantize_rows scales case %d T=%d K=%d dyn=%d", tfqat::isa_name(kt->isa), i, T, K, dynamic);
    }
  }
}

// Token t ranks ahead of u when its importance is higher, or equal with a lower index; NaN last.
bool ahead(const float* imp, int t, int u) {
  if (std::isnan(imp[t])) return std::isnan(imp[u]) && t < u;
  if (std::isnan(imp[u])) return true;
  return imp[t] > imp[u] || (imp[t] == imp[u] && t < u);
}

void test_select() {
  Rng r(9);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int i = 0; i < 600; ++i) {
    const int T = r.uniform(1, 130);
    std::vector<float> imp(T);
    const int kind = i % 4;
    for (auto& e : imp) {
      e = kind == 0 ? r.unit() : kind == 1 ? static_cast<float>(r.uniform(0, 3))  // many ties
                    : kind == 2 ? 1.0f                                          // all tied
                                : (r.next() % 5 == 0 ? nan : static_cast<float>(r.uniform(-2, 2)));
    }
    if (kind == 1 && T > 1) imp[1] = -0.0f, imp[0] = 0.0f;
    for (float rho : {0.0f, 0.25f, 0.5f, 0.75f, 1.0f, r.unit()}) {
      std::vector<uint8_t> bits(T + 1, 0);
      tfqat::select_bits_topk(imp.data(), T, rho, bits.data());
      const double w = std::floor(static_cast<double>(rho) * T + 0.5);
      const int n8 = w < 0 ? 0 : w > T ? T : static_cast<int>(w);
      int count8 = 0;
      for (int t = 0; t < T; ++t) {
        int rank = 0;
        for (int u = 0; u < T; ++u) rank += u != t && ahead(imp.data(), u, t);
        const uint8_t want = rank < n8 ? 8 : 4;
        CHECK(bits[t] == want, "select_bits_topk case %d T=%d rho=%g t=%d imp=%g got %d want %d", i, T, rho, t, imp[t],
              bits[t], want);
        count8 += bits[t] == 8;
      }
      CHECK(count8 == n8 && bits[T] == 0, "select_bits_topk count %d want %d", count8, n8);
    }
    std::vector<uint8_t> tb(T);
    const float thr = kind == 2 ? 1.0f : 0.5f;
    tfqat::select_bits_threshold(imp.data(), T, thr, tb.data());
    for (int t = 0; t < T; ++t) CHECK(tb[t] == (imp[t] >= thr ? 8 : 4), "select_bits_threshold t=%d", t);
  }
  // Crafted: ties broken by the lower index; NaN never beats a number, even -inf.
  const float a[6] = {1, 3, 3, nan, -INFINITY, 3};
  uint8_t b[6];
  tfqat::select_bits_topk(a, 6, 0.5f, b);  // n8 = 3: indices 1, 2, 5
  CHECK(b[0] == 4 && b[1] == 8 && b[2] == 8 && b[3] == 4 && b[4] == 4 && b[5] == 8, "crafted ties");
  tfqat::select_bits_topk(a, 6, 0.75f, b);  // n8 = floor(4.5 + 0.5) = 5: all but the NaN
  CHECK(b[3] == 4 && b[4] == 8 && b[0] == 8, "crafted NaN ranks lowest");
  tfqat::select_bits_topk(a, 6, nan, b);
  CHECK(b[1] == 4 && b[2] == 4, "NaN rho selects none");
  tfqat::select_bits_threshold(a, 6, 3.0f, b);
  CHECK(b[1] == 8 && b[3] == 4 && b[0] == 4, "threshold ties and NaN");
}

}  // namespace

int main() {
  const auto tables = variants("quantize");
  test_quantize(tables);
  test_select();
  return finish("quantize");
}
