// Op 5 tester: the FP32 / FP16 baselines of every variant against the reference within an
// error bound (accumulation order is each variant's own), plus the portable fp16 conversion.
#include <cmath>
#include <cstring>
#include <vector>

#include "../src/variants.h"
#include "harness.h"

using namespace tfqat_test;
using tfqat::KernelTable;
namespace ref = tfqat::ref;

namespace {

void test_fp16_conversion() {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = ref::f16_to_f32(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      CHECK((ref::f32_to_f16(f) & 0x7E00) == 0x7E00, "NaN stays NaN (quiet) h=%04x", h);
      continue;
    }
    CHECK(ref::f32_to_f16(f) == h, "round trip h=%04x", h);
    const uint32_t mag = h & 0x7FFF;
    if (mag >= 0x7BFF) continue;  // no finite successor to take a midpoint with
    // The exact midpoint to the next half rounds to the even one of the two.
    const double mid = (static_cast<double>(std::fabs(f)) +
                        ref::f16_to_f32(static_cast<uint16_t>(mag + 1))) / 2.0;
    const float fm = std::copysign(static_cast<float>(mid), f);
    const uint16_t even = static_cast<uint16_t>((h & 0x8000) | ((mag & 1) ? mag + 1 : mag));
    CHECK(ref::f32_to_f16(fm) == even, "midpoint tie h=%04x got %04x", h, ref::f32_to_f16(fm));
    const float above = std::nextafter(fm, std::copysign(INFINITY, f));
    CHECK((ref::f32_to_f16(above) & 0x7FFF) == mag + 1, "above midpoint h=%04x", h);
  }
  CHECK(ref::f32_to_f16(65519.0f) == 0x7BFF && ref::f32_to_f16(65520.0f) == 0x7C00, "overflow edge");
  CHECK(ref::f32_to_f16(std::ldexp(1.0f, -25)) == 0 && ref::f32_to_f16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 1,
        "smallest subnormal edge");
}

void test_gemm(const std::vector<const KernelTable*>& tables) {
  Rng r(31);
  for (int i = 0; i < 500; ++i) {
    const int T = i % 3 == 0 ? 1 : r.uniform(1, i % 7 == 0 ? 130 : 9);
    const int K = r.uniform(1, i % 5 == 0 ? 900 : 150), N = r.uniform(1, T > 20 ? 40 : 130);
    std::vector<float> x(static_cast<size_t>(T) * K), w(static_cast<size_t>(N) * K);
    std::vector<uint16_t> xh(x.size()), wh(w.size());
    for (size_t j = 0; j < x.size(); ++j) xh[j] = ref::f32_to_f16(x[j] = r.sym());
    for (size_t j = 0; j < w.size(); ++j) wh[j] = ref::f32_to_f16(w[j] = r.sym());
    const KernelTable* rt = tables[0];
    std::vector<float> want(static_cast<size_t>(T) * N);
    std::vector<uint16_t> want_h(want.size());
    rt->gemm_f32(x.data(), T, K, w.data(), N, want.data());
    rt->gemm_f16(xh.data(), T, K, wh.data(), N, want_h.data());
    std::vector<float> absdot(want.size()), absdot_h(want.size());
    for (int t = 0; t < T; ++t) {
      for (int n = 0; n < N; ++n) {
        double a = 0, ah = 0;
        for (int k = 0; k < K; ++k) {
          a += std::fabs(x[static_cast<size_t>(t) * K + k] * w[static_cast<size_t>(n) * K + k]);
          ah += std::fabs(ref::f16_to_f32(xh[static_cast<size_t>(t) * K + k]) * ref::f16_to_f32(wh[static_cast<size_t>(n) * K + k]));
        }
        absdot[static_cast<size_t>(t) * N + n] = static_cast<float>(a);
        absdot_h[static_cast<size_t>(t) * N + n] = static_cast<float>(ah);
      }
    }
    for (const KernelTable* kt : tables) {
      std::vector<float> pf(kt->f32_packed_size(N, K) / sizeof(float) + 1);
      kt->f32_pack(w.data(), N, K, pf.data());
      std::vector<float> y(want.size());
      kt->gemm_f32(x.data(), T, K, pf.data(), N, y.data());
      std::vector<uint8_t> ph(kt->f16_packed_size(N, K) + 2);
      kt->f16_pack(wh.data(), N, K, ph.data());
      std::vector<uint16_t> yh(want.size());
      kt->gemm_f16(xh.data(), T, K, ph.data(), N, yh.data());
      for (size_t j = 0; j < want.size(); ++j) {
        // Two fp32 summation orders differ by at most ~2 K eps sum|x w|.
        const float tol = 2.0f * (K + 2) * 1.2e-7f * absdot[j] + 1e-30f;
        CHECK(std::fabs(y[j] - want[j]) <= tol, "%s gemm_f32 case %d T=%d K=%d N=%d j=%zu %g vs %g",
              tfqat::isa_name(kt->isa), i, T, K, N, j, y[j], want[j]);
        // fp16 accumulation (ARM fp16 paths) allows K half-ulps of sum|x w| plus the output rounding.
        const float a = ref::f16_to_f32(yh[j]), b = ref::f16_to_f32(want_h[j]);
        const float tol_h = (K + 2) * 9.8e-4f * absdot_h[j] + 2.0f * 9.8e-4f * std::fabs(b) + 6e-8f;
        CHECK(std::fabs(a - b) <= tol_h, "%s gemm_f16 case %d T=%d K=%d N=%d j=%zu %g vs %g",
              tfqat::isa_name(kt->isa), i, T, K, N, j, a, b);
      }
    }
  }
}

}  // namespace

int main() {
  const auto tables = variants("gemm_float");
  test_fp16_conversion();
  test_gemm(tables);
  return finish("gemm_float");
}
