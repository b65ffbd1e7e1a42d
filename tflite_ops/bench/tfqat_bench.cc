// tfqat_bench: single-thread microbenchmark of the kernel tables at LLaMA-58M and GPT2-97M
// layer shapes. No TFLite dependency.
//
//   tfqat_bench [--isa NAME|all] [--filter SUBSTR] [--reps N] [--json out.json]
//
// Each case: one warm-up batch, then --reps timed calls; reports the median, p10 and p90 in
// microseconds. Case names: <model>/<K>x<N>/T<T>/<variant>, where variant is one of
//   fp32, fp16           float baselines (gemm_f32 / gemm_f16)
//   w8a8                 qlinear_w8, 8-bit codes in
//   w4a8, w4a4           qlinear_w4 with all tokens 8-bit / 4-bit
//   w4a48_r25/_r50/_r75  qlinear_w4, the top rho of tokens 8-bit, the rest 4-bit
//   w4a8_dyn             quantize_rows (dynamic scales) + qlinear_w4: float in, float out
// and at SmolLM2-135M layer shapes (smollm2/...), per-channel beside group-wise weight scales:
//   w4a8, w8a8           qlinear_w4 / qlinear_w8 (one scale per output channel)
//   w4a8_g<G>, w8a8_g<G> qlinear_w4_grouped / qlinear_w8_grouped, G = 32, 64, 128
// With --isa all, every non-reference table runs, plus two W4A4 GEMV candidate multipliers
// (cand_mkmp_vpmulld_w4a4, cand_widen_vpmaddwd_w4a4; checked exact before timing).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <new>
#include <string>
#include <vector>

#include "tfqat_ops/kernels.h"
#include "bench_data.h"

namespace {

using tfqat::Isa;
using tfqat::KernelTable;
using tfqat::QLinearFn;

struct Shape {
  const char* model;
  int K, N;
};
const Shape kShapes[] = {
    {"llama58m", 512, 512}, {"llama58m", 512, 1024}, {"llama58m", 1024, 512},
    {"gpt2-97m", 768, 768}, {"gpt2-97m", 768, 3072}, {"gpt2-97m", 3072, 768},
};

struct Result {
  std::string name, isa;
  int T, K, N;
  double median, p10, p90;
};

// Packed weights live in 64-byte aligned storage, as a deployment should keep them: a
// misaligned 64-byte load spans two cache lines.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
using Packed = std::vector<uint8_t, Aligned64<uint8_t>>;

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const size_t i = static_cast<size_t>(q * (v.size() - 1) + 0.5);
  return v[i];
}

Result time_it(const std::string& name, const KernelTable* kt, int T, int K, int N, int reps,
               const std::function<void()>& fn) {
  using clk = std::chrono::steady_clock;
  const auto w0 = clk::now();
  int warm = 0;
  while (warm < 3 || (clk::now() - w0 < std::chrono::milliseconds(20) && warm < 1000)) {
    fn();
    ++warm;
  }
  std::vector<double> us;
  us.reserve(static_cast<size_t>(reps));
  for (int r = 0; r < reps; ++r) {
    const auto a = clk::now();
    fn();
    const auto b = clk::now();
    us.push_back(std::chrono::duration<double, std::micro>(b - a).count());
  }
  return {name, tfqat::isa_name(kt->isa), T, K, N, percentile(us, 0.5), percentile(us, 0.1), percentile(us, 0.9)};
}

void bench_table(const KernelTable* kt, const std::string& filter, int reps, std::vector<Result>& out) {
  for (const Shape& sh : kShapes) {
    for (int T : {1, 128}) {
      const int K = sh.K, N = sh.N;
      const std::string prefix = std::string(sh.model) + "/" + std::to_string(K) + "x" + std::to_string(N) + "/T" +
                                 std::to_string(T) + "/";
      auto wanted = [&](const char* v) { return filter.empty() || (prefix + v).find(filter) != std::string::npos; };
      tfqat_bench::GemmData d(T, K, N);
      auto &xf = d.xf, &wf = d.wf, &xs = d.xs, &ws = d.ws, &bias = d.bias;
      auto &x8 = d.x8, &x4 = d.x4, &w8 = d.w8;
      auto& w4 = d.w4;
      std::vector<float> y(static_cast<size_t>(T) * N), scales(T);

      if (wanted("fp32")) {
        Packed p(kt->f32_packed_size(N, K));
        kt->f32_pack(wf.data(), N, K, p.data());
        out.push_back(time_it(prefix + "fp32", kt, T, K, N, reps, [&] { kt->gemm_f32(xf.data(), T, K, p.data(), N, y.data()); }));
      }
      if (wanted("fp16")) {
        std::vector<uint16_t> xh(xf.size()), wh(wf.size()), yh(y.size());
        for (size_t i = 0; i < xf.size(); ++i) xh[i] = tfqat_bench::to_half(xf[i]);
        for (size_t i = 0; i < wf.size(); ++i) wh[i] = tfqat_bench::to_half(wf[i]);
        Packed p(kt->f16_packed_size(N, K));
        kt->f16_pack(wh.data(), N, K, p.data());
        out.push_back(time_it(prefix + "fp16", kt, T, K, N, reps, [&] { kt->gemm_f16(xh.data(), T, K, p.data(), N, yh.data()); }));
      }
      if (wanted("w8a8")) {
        Packed p(kt->w8_packed_size(N, K));
        kt->w8_pack(w8.data(), N, K, p.data());
        std::vector<uint8_t> bits(T, 8);
        out.push_back(time_it(prefix + "w8a8", kt, T, K, N, reps, [&] {
          kt->qlinear_w8(x8.data(), xs.data(), bits.data(), T, K, p.data(), ws.data(), bias.data(), N, y.data());
        }));
      }
      Packed p4(kt->w4_packed_size(N, K));
      kt->w4_pack(w4.data(), N, K, p4.data());
      struct Mix {
        const char* name;
        double rho;
      };
      for (const Mix& mx : {Mix{"w4a8", 1.0}, Mix{"w4a4", 0.0}, Mix{"w4a48_r25", 0.25}, Mix{"w4a48_r50", 0.5},
                            Mix{"w4a48_r75", 0.75}}) {
        if (!wanted(mx.name)) continue;
        if (T == 1 && mx.rho > 0.0 && mx.rho < 1.0) continue;  // a single token is all one width
        std::vector<uint8_t> bits(T);
        std::vector<int8_t> xm(x8.size());
        for (int t = 0; t < T; ++t) {
          bits[t] = (t * 7919 % T) < static_cast<int>(mx.rho * T + 0.5) ? 8 : 4;  // scattered, exact count
          std::memcpy(&xm[static_cast<size_t>(t) * K], (bits[t] == 8 ? x8 : x4).data() + static_cast<size_t>(t) * K, K);
        }
        out.push_back(time_it(prefix + mx.name, kt, T, K, N, reps, [&] {
          kt->qlinear_w4(xm.data(), xs.data(), bits.data(), T, K, p4.data(), ws.data(), bias.data(), N, y.data());
        }));
      }
      if (wanted("w4a8_dyn")) {
        std::vector<uint8_t> bits(T, 8);
        std::vector<int8_t> codes(x8.size());
        out.push_back(time_it(prefix + "w4a8_dyn", kt, T, K, N, reps, [&] {
          kt->quantize_rows(xf.data(), T, K, bits.data(), nullptr, codes.data(), scales.data());
          kt->qlinear_w4(codes.data(), scales.data(), bits.data(), T, K, p4.data(), ws.data(), bias.data(), N, y.data());
        }));
      }
    }
  }
}

// Per-channel against group-wise scales (op 3g) on the same packed weights and codes.
void bench_grouped(const KernelTable* kt, const std::string& filter, int reps, std::vector<Result>& out) {
  const Shape shapes[] = {{"smollm2", 576, 576}, {"smollm2", 576, 192}, {"smollm2", 576, 1536}, {"smollm2", 1536, 576}};
  for (const Shape& sh : shapes) {
    for (int T : {1, 128}) {
      const int K = sh.K, N = sh.N;
      const std::string prefix = std::string(sh.model) + "/" + std::to_string(K) + "x" + std::to_string(N) + "/T" +
                                 std::to_string(T) + "/";
      auto wanted = [&](const std::string& v) { return filter.empty() || (prefix + v).find(filter) != std::string::npos; };
      tfqat_bench::GemmData d(T, K, N);
      std::vector<float> y(static_cast<size_t>(T) * N);
      std::vector<uint8_t> bits(T, 8);
      for (int wbits : {4, 8}) {
        const std::string base = wbits == 4 ? "w4a8" : "w8a8";
        Packed p(wbits == 4 ? kt->w4_packed_size(N, K) : kt->w8_packed_size(N, K));
        const void* canonical = wbits == 4 ? static_cast<const void*>(d.w4.data()) : d.w8.data();
        (wbits == 4 ? kt->w4_pack : kt->w8_pack)(canonical, N, K, p.data());
        if (wanted(base)) {
          const QLinearFn fn = wbits == 4 ? kt->qlinear_w4 : kt->qlinear_w8;
          out.push_back(time_it(prefix + base, kt, T, K, N, reps, [&] {
            fn(d.x8.data(), d.xs.data(), bits.data(), T, K, p.data(), d.ws.data(), d.bias.data(), N, y.data());
          }));
        }
        for (int G : {32, 64, 128}) {
          const std::string name = base + "_g" + std::to_string(G);
          if (!wanted(name)) continue;
          const std::vector<float> ws(static_cast<size_t>((K + G - 1) / G) * N, 0.02f);  // [ng][N]
          const tfqat::QLinearGroupedFn fn = wbits == 4 ? kt->qlinear_w4_grouped : kt->qlinear_w8_grouped;
          out.push_back(time_it(prefix + name, kt, T, K, N, reps, [&] {
            fn(d.x8.data(), d.xs.data(), bits.data(), T, K, p.data(), G, ws.data(), d.bias.data(), N, y.data());
          }));
        }
      }
    }
  }
}

// ---- candidate multipliers for W4 x A4 (GEMV), measured beside the table kernels ---------
// Not used by any table: they exist to record why the x86 tables use vpdpbusd (README).
#if defined(__x86_64__)
#include <immintrin.h>

// MKMP / Agile-Quant packed lane: rows n, n+1 share an int32 lane as w_n + 65536 * w_n1; one
// vpmulld by x[k] yields both products, 16 guard bits apart. With |x w| <= 64 (A4) the low half
// stays exact for 511 accumulations, then the halves are split with shifts.
struct Mkmp {
  int N, K, Np;
  std::vector<int32_t> lanes;  // [N/16][K][8 pairs]
};
Mkmp mkmp_pack(const std::vector<int8_t>& w, int N, int K) {
  Mkmp m{N, K, (N + 15) / 16 * 16, {}};
  m.lanes.assign(static_cast<size_t>(m.Np / 16) * K * 8, 0);
  for (int n = 0; n < N; ++n) {
    for (int k = 0; k < K; ++k) {
      const int b = n / 16, pair = (n % 16) / 2;
      int32_t& lane = m.lanes[(static_cast<size_t>(b) * K + k) * 8 + pair];
      lane += (n % 2 ? 65536 : 1) * w[static_cast<size_t>(n) * K + k];
    }
  }
  return m;
}
// Four blocks in flight so that neither candidate is bound by one accumulator's latency.
__attribute__((target("avx2"))) void mkmp_gemv(const Mkmp& m, const int8_t* x, int32_t* acc_out) {
  constexpr int kB = 4;
  for (int b0 = 0; b0 < m.Np / 16; b0 += kB) {  // shapes used here have Np / 16 % 4 == 0
    __m256i lo_tot[kB], hi_tot[kB];
    for (int i = 0; i < kB; ++i) lo_tot[i] = hi_tot[i] = _mm256_setzero_si256();
    for (int k0 = 0; k0 < m.K; k0 += 511) {
      __m256i acc[kB];
      for (int i = 0; i < kB; ++i) acc[i] = _mm256_setzero_si256();
      const int k1 = std::min(m.K, k0 + 511);
      for (int k = k0; k < k1; ++k) {
        const __m256i xv = _mm256_set1_epi32(x[k]);
        for (int i = 0; i < kB; ++i) {
          const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&m.lanes[(static_cast<size_t>(b0 + i) * m.K + k) * 8]));
          acc[i] = _mm256_add_epi32(acc[i], _mm256_mullo_epi32(p, xv));
        }
      }
      for (int i = 0; i < kB; ++i) {
        const __m256i lo = _mm256_srai_epi32(_mm256_slli_epi32(acc[i], 16), 16);
        lo_tot[i] = _mm256_add_epi32(lo_tot[i], lo);
        hi_tot[i] = _mm256_add_epi32(hi_tot[i], _mm256_srai_epi32(_mm256_sub_epi32(acc[i], lo), 16));
      }
    }
    for (int i = 0; i < kB; ++i) {
      alignas(32) int32_t l[8], h[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(l), lo_tot[i]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(h), hi_tot[i]);
      for (int j = 0; j < 8; ++j) {
        acc_out[(b0 + i) * 16 + 2 * j] = l[j];
        acc_out[(b0 + i) * 16 + 2 * j + 1] = h[j];
      }
    }
  }
}

// Widen: int8 weights sign-extended to int16 pairs (k, k+1), vpmaddwd with a broadcast
// (x[k], x[k+1]) pair. Layout [N/8][K/2][8 rows][2].
struct Widen {
  int N, K, Np, Kp;
  std::vector<int8_t> w;
};
Widen widen_pack(const std::vector<int8_t>& w, int N, int K) {
  Widen o{N, K, (N + 7) / 8 * 8, (K + 1) / 2 * 2, {}};
  o.w.assign(static_cast<size_t>(o.Np) * o.Kp, 0);
  for (int n = 0; n < N; ++n) {
    for (int k = 0; k < K; ++k) {
      o.w[((static_cast<size_t>(n / 8) * (o.Kp / 2) + k / 2) * 8 + n % 8) * 2 + k % 2] = w[static_cast<size_t>(n) * K + k];
    }
  }
  return o;
}
__attribute__((target("avx2"))) void widen_gemv(const Widen& o, const int8_t* x, int32_t* acc_out) {
  constexpr int kB = 4;
  for (int b0 = 0; b0 < o.Np / 8; b0 += kB) {  // shapes used here have Np / 8 % 4 == 0
    __m256i acc[kB];
    for (int i = 0; i < kB; ++i) acc[i] = _mm256_setzero_si256();
    for (int kk = 0; kk < o.Kp / 2; ++kk) {
      const int x0 = x[2 * kk], x1 = 2 * kk + 1 < o.K ? x[2 * kk + 1] : 0;
      const __m256i xv = _mm256_set1_epi32((x0 & 0xFFFF) | (x1 << 16));
      for (int i = 0; i < kB; ++i) {
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(
            reinterpret_cast<const __m128i*>(&o.w[(static_cast<size_t>(b0 + i) * (o.Kp / 2) + kk) * 16])));
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(wv, xv));
      }
    }
    for (int i = 0; i < kB; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc_out + (b0 + i) * 8), acc[i]);
  }
}

void bench_candidates(const std::string& filter, int reps, std::vector<Result>& out) {
  const KernelTable* avx2 = tfqat::kernels_for(Isa::kAvx2);
  if (!avx2) return;
  for (const Shape& sh : {Shape{"llama58m", 512, 1024}, Shape{"gpt2-97m", 768, 3072}}) {
    const int K = sh.K, N = sh.N;
    const std::string prefix = std::string(sh.model) + "/" + std::to_string(K) + "x" + std::to_string(N) + "/T1/";
    std::vector<int8_t> w(static_cast<size_t>(N) * K), x(K);
    for (auto& v : w) v = static_cast<int8_t>(static_cast<int>(tfqat_bench::rnd() % 16) - 8);
    for (auto& v : x) v = static_cast<int8_t>(static_cast<int>(tfqat_bench::rnd() % 16) - 8);
    std::vector<int32_t> want(N, 0), got(static_cast<size_t>(N) + 16);
    for (int n = 0; n < N; ++n) {
      for (int k = 0; k < K; ++k) want[n] += x[k] * w[static_cast<size_t>(n) * K + k];
    }
    const Mkmp mk = mkmp_pack(w, N, K);
    const Widen wd = widen_pack(w, N, K);
    struct C {
      const char* name;
      std::function<void()> fn;
    };
    for (const C& c : {C{"cand_mkmp_vpmulld_w4a4", [&] { mkmp_gemv(mk, x.data(), got.data()); }},
                       C{"cand_widen_vpmaddwd_w4a4", [&] { widen_gemv(wd, x.data(), got.data()); }}}) {
      if (!filter.empty() && (prefix + c.name).find(filter) == std::string::npos) continue;
      std::fill(got.begin(), got.end(), 0);
      c.fn();
      if (!std::equal(want.begin(), want.end(), got.begin())) {
        std::fprintf(stderr, "%s: not exact\n", c.name);
        std::exit(1);
      }
      out.push_back(time_it(prefix + c.name, avx2, 1, K, N, reps, c.fn));
    }
  }
}
#else
void bench_candidates(const std::string&, int, std::vector<Result>&) {}
#endif

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t c = line.find(':');
      return c == std::string::npos ? line : line.substr(c + 2);
    }
  }
  return "unknown";
}

}  // namespace

int main(int argc, char** argv) {
  std::string isa_arg, filter, json;
  int reps = 200;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--isa") isa_arg = next();
    else if (a == "--filter") filter = next();
    else if (a == "--reps") reps = std::max(1, std::atoi(next().c_str()));
    else if (a == "--json") json = next();
    else {
      std::fprintf(stderr, "usage: %s [--isa NAME|all] [--filter SUBSTR] [--reps N] [--json out.json]\n", argv[0]);
      return 2;
    }
  }
  const Isa all[] = {Isa::kRef, Isa::kAvx2, Isa::kAvxVnni, Isa::kAvx512Vnni, Isa::kNeon, Isa::kNeonDot, Isa::kNeonI8mm};
  std::vector<const KernelTable*> tables;
  std::string available;
  for (Isa isa : all) {
    if (tfqat::kernels_for(isa)) available += std::string(available.empty() ? "" : ",") + tfqat::isa_name(isa);
  }
  if (isa_arg == "all") {
    for (Isa isa : all) {
      if (isa != Isa::kRef && tfqat::kernels_for(isa)) tables.push_back(tfqat::kernels_for(isa));
    }
  } else if (!isa_arg.empty()) {
    for (Isa isa : all) {
      if (isa_arg == tfqat::isa_name(isa)) tables.push_back(tfqat::kernels_for(isa));
    }
    if (tables.empty() || !tables[0]) {
      std::fprintf(stderr, "--isa %s: not available here; choose one of: %s\n", isa_arg.c_str(), available.c_str());
      return 2;
    }
  } else {
    const char* err = nullptr;
    const KernelTable* t = tfqat::select_kernels(&err);
    if (!t) {
      std::fprintf(stderr, "%s\n", err);
      return 2;
    }
    tables.push_back(t);
  }
  std::vector<Result> results;
  for (const KernelTable* kt : tables) {
    bench_table(kt, filter, reps, results);
    bench_grouped(kt, filter, reps, results);
  }
  if (isa_arg == "all") bench_candidates(filter, reps, results);

  std::printf("%-40s %-11s %10s %10s %10s %9s\n", "case", "isa", "median_us", "p10_us", "p90_us", "GMAC/s");
  for (const Result& r : results) {
    std::printf("%-40s %-11s %10.2f %10.2f %10.2f %9.1f\n", r.name.c_str(), r.isa.c_str(), r.median, r.p10, r.p90,
                static_cast<double>(r.T) * r.K * r.N / r.median / 1e3);
  }
  if (!json.empty()) {
    FILE* f = std::fopen(json.c_str(), "w");
    if (!f) {
      std::perror(json.c_str());
      return 1;
    }
    const KernelTable* best = tfqat::select_kernels();
    std::fprintf(f, "{\n  \"machine\": {\"cpu\": \"%s\", \"isa_selected\": \"%s\", \"isa_available\": \"%s\", \"threads\": 1},\n",
                 cpu_model().c_str(), best ? tfqat::isa_name(best->isa) : "none", available.c_str());
    std::fprintf(f, "  \"reps\": %d,\n  \"results\": [\n", reps);
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      std::fprintf(f,
                   "    {\"name\": \"%s\", \"isa\": \"%s\", \"T\": %d, \"K\": %d, \"N\": %d, \"median_us\": %.3f, "
                   "\"p10_us\": %.3f, \"p90_us\": %.3f}%s\n",
                   r.name.c_str(), r.isa.c_str(), r.T, r.K, r.N, r.median, r.p10, r.p90, i + 1 < results.size() ? "," : "");
    }
    std::fprintf(f, "  ]\n}\n");
    std::fclose(f);
  }
  return 0;
}
