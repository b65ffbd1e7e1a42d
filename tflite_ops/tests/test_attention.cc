// Op 4 tester: attn_qk / attn_pv of every variant against an int64 oracle, bit for bit, over
// grouped-query shapes, odd head dims, partial caches (S < s_cap), int8 and int4 caches, mixed
// V row groups and extreme codes (q -128, k/v at their minimum, p 255); attn_pv with one scale
// and with a scale per row. Op 4p (quantize_probs, static and per-row dynamic scales) against a
// scalar oracle, alone and chained into attn_pv as ATTN_PV p_mode=1 runs them.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "harness.h"

using namespace tfqat_test;
using tfqat::KernelTable;

namespace {

struct Cache {
  std::vector<int8_t> codes;   // [Hkv][s_cap][D]
  std::vector<uint8_t> store;  // in the kernel layout for kv_bits
};

Cache make_cache(Rng& r, int Hkv, int s_cap, int D, int kv_bits, bool extreme) {
  Cache c;
  const int lo = kv_bits == 4 ? -8 : -128, hi = kv_bits == 4 ? 7 : 127;
  for (int i = 0; i < Hkv * s_cap * D; ++i) c.codes.push_back(static_cast<int8_t>(extreme ? lo : r.uniform(lo, hi)));
  if (kv_bits == 8) {
    c.store.assign(reinterpret_cast<uint8_t*>(c.codes.data()), reinterpret_cast<uint8_t*>(c.codes.data()) + c.codes.size());
  } else {
    const int stride = (D + 1) / 2;
    c.store.assign(static_cast<size_t>(Hkv) * s_cap * stride, 0);
    for (int row = 0; row < Hkv * s_cap; ++row) {
      for (int d = 0; d < D; ++d) {
        const uint8_t nib = static_cast<uint8_t>(c.codes[static_cast<size_t>(row) * D + d]) & 0x0F;
        c.store[static_cast<size_t>(row) * stride + d / 2] |= static_cast<uint8_t>(d & 1 ? nib << 4 : nib);
      }
    }
  }
  return c;
}

bool same(const std::vector<float>& a, const std::vector<float>& b) {
  return std::memcmp(a.data(), b.data(), b.size() * sizeof(float)) == 0 && a.size() == b.size() + 1;
}

// out[h][t][d] as OPS.md writes it, in int64, for row scales psr[h * T + t]; p codes [H][T][S].
std::vector<float> pv_oracle(const std::vector<uint8_t>& p, const std::vector<float>& psr, const Cache& v,
                             const uint8_t* rowbits, const float* vs, int H, int Hkv, int T, int S, int s_cap,
                             int D) {
  std::vector<float> want(static_cast<size_t>(H) * T * D);
  for (int h = 0; h < H; ++h) {
    const int g = h / (H / Hkv);
    for (int t = 0; t < T; ++t) {
      const size_t row = static_cast<size_t>(h) * T + t;
      for (int d = 0; d < D; ++d) {
        int64_t a8 = 0, a4 = 0;
        for (int s = 0; s < S; ++s) {
          const int64_t prod = int64_t{p[row * S + s]} * v.codes[(static_cast<size_t>(g) * s_cap + s) * D + d];
          (rowbits && rowbits[s] == 4 ? a4 : a8) += prod;
        }
        want[row * D + d] = rowbits ? static_cast<float>(a8) * (psr[row] * vs[0]) +
                                          static_cast<float>(a4) * (psr[row] * vs[1])
                                    : static_cast<float>(a8) * (psr[row] * vs[0]);
      }
    }
  }
  return want;
}

// Op 4p as OPS.md states it, written out independently of src/ref: the row max skips NaN and
// values <= 0, a NaN quotient is code 0, else round half even of the clamped quotient.
void probs_oracle(const std::vector<float>& p, int R, int S, int ld, int p_max, const float* ps_static,
                  std::vector<uint8_t>* codes, std::vector<float>* ps) {
  codes->assign(static_cast<size_t>(R) * S, 0);
  ps->assign(static_cast<size_t>(R), 0.0f);
  const float hi = static_cast<float>(p_max);
  for (int r = 0; r < R; ++r) {
    const float* pr = p.data() + static_cast<size_t>(r) * ld;
    float m = 0.0f;
    for (int s = 0; s < S; ++s) {
      if (!std::isnan(pr[s]) && pr[s] > m) m = pr[s];
    }
    const float scale = ps_static ? *ps_static : (m == 0.0f ? 1.0f : m / hi);
    (*ps)[r] = scale;
    for (int s = 0; s < S; ++s) {
      const float q = pr[s] / scale;
      if (std::isnan(q)) continue;
      const float clamped = std::fmin(std::fmax(q, 0.0f), hi);
      (*codes)[static_cast<size_t>(r) * S + s] = static_cast<uint8_t>(std::lrint(clamped));
    }
  }
}

// ATTN_PV p_mode=1 end to end at kernel level: float probability rows [H][T][s_cap] of which S
// are valid (the rest hold values that would change every row's max if read), with all-zero
// rows, NaN, negative and past-p_max entries; quantize_probs (dynamic and static) and attn_pv
// with the row scales, every variant against the oracles. Returns the number of cases.
int test_dynamic_probs(const std::vector<const KernelTable*>& tables, Rng& r) {
  struct Shape {
    int T, S, s_cap, D;
  };
  // T 1 / 3 (row kernels) and >= 4 (AVX-512 tiles); S across 4 / 8 / 16-lane tails; odd D.
  const Shape shapes[] = {{1, 1, 1, 1},    {1, 37, 40, 13},  {3, 9, 12, 64},    {3, 100, 101, 65},
                          {17, 17, 20, 63}, {17, 33, 64, 97}, {5, 130, 131, 128}, {1, 512, 520, 64},
                          {17, 250, 255, 3}, {4, 16, 16, 32}};
  const float nan = std::numeric_limits<float>::quiet_NaN();
  int cases = 0;
  for (const Shape& sh : shapes) {
    for (int variant = 0; variant < 6; ++variant) {
      const int T = sh.T, S = sh.S, s_cap = sh.s_cap, D = sh.D;
      const int kv_bits = variant % 2 ? 4 : 8;
      const int rowbits_mode = variant / 2;  // 0 mixed, 1 all 8, 2 nullptr
      const int Hkv = r.uniform(1, 3), H = Hkv * r.uniform(1, 3);
      const int p_max = variant == 3 ? 15 : 255;
      const int R = H * T;
      std::vector<float> p(static_cast<size_t>(R) * s_cap);
      for (int row = 0; row < R; ++row) {
        float* pr = p.data() + static_cast<size_t>(row) * s_cap;
        const int kind = (row + variant) % 5;  // 0 zero row, 1 NaN + negatives, 2 diffuse, 3 peaked, 4 ties
        for (int s = 0; s < S; ++s) {
          switch (kind) {
            case 0: pr[s] = 0.0f; break;
            case 1: pr[s] = s % 3 == 0 ? nan : (s % 3 == 1 ? -r.unit() : r.unit() * 0.01f); break;
            case 2: pr[s] = r.unit() / static_cast<float>(S); break;
            case 3: pr[s] = s == row % S ? 0.9f : r.unit() * 1e-4f; break;
            // the max p_max * 2^-10 makes the row scale 2^-10 exactly: (k + 0.5) * 2^-10 are ties
            default:
              pr[s] = s == S / 2 ? static_cast<float>(p_max) * 0x1p-10f : (static_cast<float>(s % 7) + 0.5f) * 0x1p-10f;
              break;
          }
        }
        if (kind == 1 && S > 1) pr[S - 1] = -0.0f;
        for (int s = S; s < s_cap; ++s) pr[s] = 1e30f;  // past S: never read
      }
      const Cache v = make_cache(r, Hkv, s_cap, D, kv_bits, false);
      std::vector<uint8_t> rowbits(static_cast<size_t>(S));
      for (auto& e : rowbits) e = rowbits_mode == 1 ? 8 : (r.next() & 1 ? 8 : 4);
      const uint8_t* rb = rowbits_mode == 2 ? nullptr : rowbits.data();
      const float vs[2] = {0.02f + r.unit() * 0.01f, 0.3f + r.unit()};
      const float ps_static = 1.0f / 255.0f + r.unit() * 1e-3f;

      std::vector<uint8_t> want_codes, want_codes_static;
      std::vector<float> want_ps, unused;
      probs_oracle(p, R, S, s_cap, p_max, nullptr, &want_codes, &want_ps);
      probs_oracle(p, R, S, s_cap, p_max, &ps_static, &want_codes_static, &unused);
      const std::vector<float> want_o = pv_oracle(want_codes, want_ps, v, rb, vs, H, Hkv, T, S, s_cap, D);
      for (const KernelTable* kt : tables) {
        const char* isa = tfqat::isa_name(kt->isa);
        // Codes with a row stride of S + 3 and a sentinel after the last row: nothing past S.
        const int ldc = S + 3;
        std::vector<uint8_t> codes(static_cast<size_t>(R) * ldc + 1, 0xAB);
        std::vector<float> ps(static_cast<size_t>(R) + 1, -7.0f);
        kt->quantize_probs(p.data(), R, S, s_cap, p_max, nullptr, codes.data(), ldc, ps.data());
        bool codes_ok = codes.back() == 0xAB, pad_ok = true;
        for (int row = 0; row < R; ++row) {
          codes_ok &= std::memcmp(codes.data() + static_cast<size_t>(row) * ldc,
                                  want_codes.data() + static_cast<size_t>(row) * S, S) == 0;
          for (int i = S; i < ldc; ++i) pad_ok &= codes[static_cast<size_t>(row) * ldc + i] == 0xAB;
        }
        CHECK(codes_ok && pad_ok && same(ps, want_ps) && ps.back() == -7.0f,
              "%s quantize_probs dynamic T=%d S=%d cap=%d H=%d p_max=%d", isa, T, S, s_cap, H, p_max);
        std::vector<float> ps_untouched(static_cast<size_t>(R), -7.0f);
        kt->quantize_probs(p.data(), R, S, s_cap, p_max, &ps_static, codes.data(), ldc, ps_untouched.data());
        codes_ok = true;
        for (int row = 0; row < R; ++row) {
          codes_ok &= std::memcmp(codes.data() + static_cast<size_t>(row) * ldc,
                                  want_codes_static.data() + static_cast<size_t>(row) * S, S) == 0;
        }
        bool untouched = true;
        for (float e : ps_untouched) untouched &= e == -7.0f;
        CHECK(codes_ok && untouched, "%s quantize_probs static T=%d S=%d cap=%d H=%d p_max=%d", isa, T, S, s_cap, H,
              p_max);
        // attn_pv on the oracle's dense codes with the row scales (p_mode=1).
        std::vector<float> o(want_o.size() + 1, -3.0f);
        kt->attn_pv(want_codes.data(), 123.0f, want_ps.data(), H, T, S, v.store.data(), kv_bits, rb, vs, Hkv, s_cap,
                    D, o.data());
        CHECK(same(o, want_o) && o.back() == -3.0f, "%s attn_pv p_mode=1 H=%d Hkv=%d T=%d D=%d S=%d cap=%d kv%d rb=%d",
              isa, H, Hkv, T, D, S, s_cap, kv_bits, rowbits_mode);
      }
      ++cases;
    }
  }
  return cases;
}

}  // namespace

int main() {
  const auto tables = variants("attention");
  Rng r(77);
  int cases = 0;
  // Tiled prefill paths (x86 AVX-512: T >= 4 queries; 4-query / 16-position / 64-d tiles):
  // T and S around the tile edges (T = 1, 4, 5, 7, 16, 17, 63, 65, 130), odd D across a 64-d
  // chunk, all-8 / all-4 / mixed v rows. Cases >= 600 take their shape from this list.
  struct Fixed {
    int T, S, D;
  };
  const Fixed fixed[] = {{1, 1, 1},    {4, 4, 64},    {5, 9, 3},     {7, 7, 65},   {16, 16, 64},
                         {17, 33, 63}, {63, 63, 127}, {65, 66, 128}, {130, 130, 64}, {130, 257, 97},
                         {128, 128, 64}, {6, 250, 1},  {9, 17, 66}};
  const int n_fixed = static_cast<int>(sizeof(fixed) / sizeof(fixed[0]));
  for (int i = 0; i < 600 + 4 * n_fixed; ++i) {
    const int Hkv = r.uniform(1, 3), H = Hkv * r.uniform(1, 3);
    int T = i % 2 ? 1 : r.uniform(1, i % 11 == 0 ? 130 : 12);
    int D = i % 4 == 0 ? r.uniform(1, 97) : (r.next() & 1 ? 64 : 32);
    int s_cap = r.uniform(1, i % 13 == 0 ? 300 : 70), S = r.uniform(1, s_cap);
    int kv_bits = r.next() & 1 ? 4 : 8;
    int rowbits_mode = 0;  // 0 random, 1 all 8, 2 all 4
    if (i >= 600) {
      const Fixed& f = fixed[(i - 600) / 4];
      T = f.T, S = f.S, D = f.D, s_cap = f.S + (i % 2) * 5;
      kv_bits = (i / 2) % 2 ? 4 : 8;
      rowbits_mode = i % 3;
    }
    const bool extreme = i % 9 == 0;
    const Cache k = make_cache(r, Hkv, s_cap, D, kv_bits, extreme), v = make_cache(r, Hkv, s_cap, D, kv_bits, extreme);
    std::vector<int8_t> q(static_cast<size_t>(H) * T * D);
    for (auto& e : q) e = static_cast<int8_t>(extreme ? -128 : r.uniform(-128, 127));
    std::vector<uint8_t> p(static_cast<size_t>(H) * T * S), rowbits(static_cast<size_t>(S));
    for (auto& e : p) e = static_cast<uint8_t>(extreme ? 255 : r.uniform(0, 255));
    for (auto& e : rowbits) e = rowbits_mode == 1 ? 8 : rowbits_mode == 2 ? 4 : (r.next() & 1 ? 8 : 4);
    const bool rowbits_null = i % 3 == 0 && i < 600 ? true : (i >= 600 && i % 4 == 3);
    std::vector<float> qs(T), ks(S);
    for (auto& e : qs) e = 0.01f + r.unit();
    for (auto& e : ks) e = 0.01f + r.unit();
    const float ps = 1.0f / 255.0f, vs[2] = {0.02f + r.unit() * 0.01f, 0.3f + r.unit()};
    std::vector<float> psr(static_cast<size_t>(H) * T);  // per-row scales (ATTN_PV p_mode=1)
    for (auto& e : psr) e = (0.05f + r.unit()) / 255.0f;
    const int group = H / Hkv;

    std::vector<float> want_s(static_cast<size_t>(H) * T * S), want_o(static_cast<size_t>(H) * T * D);
    for (int h = 0; h < H; ++h) {
      const int g = h / group;
      for (int t = 0; t < T; ++t) {
        for (int s = 0; s < S; ++s) {
          int64_t acc = 0;
          for (int d = 0; d < D; ++d) {
            acc += int64_t{q[(static_cast<size_t>(h) * T + t) * D + d]} * k.codes[(static_cast<size_t>(g) * s_cap + s) * D + d];
          }
          want_s[(static_cast<size_t>(h) * T + t) * S + s] = static_cast<float>(acc) * (qs[t] * ks[s]);
        }
        for (int d = 0; d < D; ++d) {
          int64_t a8 = 0, a4 = 0;
          for (int s = 0; s < S; ++s) {
            const int64_t prod = int64_t{p[(static_cast<size_t>(h) * T + t) * S + s]} *
                                 v.codes[(static_cast<size_t>(g) * s_cap + s) * D + d];
            (!rowbits_null && rowbits[s] == 4 ? a4 : a8) += prod;
          }
          want_o[(static_cast<size_t>(h) * T + t) * D + d] =
              rowbits_null ? static_cast<float>(a8) * (ps * vs[0])
                           : static_cast<float>(a8) * (ps * vs[0]) + static_cast<float>(a4) * (ps * vs[1]);
        }
      }
    }
    const std::vector<float> want_o_rows =
        pv_oracle(p, psr, v, rowbits_null ? nullptr : rowbits.data(), vs, H, Hkv, T, S, s_cap, D);
    for (const KernelTable* kt : tables) {
      std::vector<float> sc(want_s.size() + 1, -3.0f), o(want_o.size() + 1, -3.0f);
      kt->attn_qk(q.data(), qs.data(), H, T, D, k.store.data(), kv_bits, ks.data(), Hkv, S, s_cap, sc.data());
      CHECK(same(sc, want_s) && sc.back() == -3.0f, "%s attn_qk case %d H=%d Hkv=%d T=%d D=%d S=%d cap=%d kv%d",
            tfqat::isa_name(kt->isa), i, H, Hkv, T, D, S, s_cap, kv_bits);
      kt->attn_pv(p.data(), ps, nullptr, H, T, S, v.store.data(), kv_bits, rowbits_null ? nullptr : rowbits.data(),
                  vs, Hkv, s_cap, D, o.data());
      CHECK(same(o, want_o) && o.back() == -3.0f, "%s attn_pv case %d H=%d Hkv=%d T=%d D=%d S=%d cap=%d kv%d rb=%d",
            tfqat::isa_name(kt->isa), i, H, Hkv, T, D, S, s_cap, kv_bits, !rowbits_null);
      std::fill(o.begin(), o.end(), -3.0f);
      kt->attn_pv(p.data(), ps, psr.data(), H, T, S, v.store.data(), kv_bits, rowbits_null ? nullptr : rowbits.data(),
                  vs, Hkv, s_cap, D, o.data());
      CHECK(same(o, want_o_rows) && o.back() == -3.0f,
            "%s attn_pv row scales case %d H=%d Hkv=%d T=%d D=%d S=%d cap=%d kv%d rb=%d",
            tfqat::isa_name(kt->isa), i, H, Hkv, T, D, S, s_cap, kv_bits, !rowbits_null);
    }
    ++cases;
  }
  const int prob_cases = test_dynamic_probs(tables, r);
  std::printf("[attention] %d cases per variant, %d with float probabilities (op 4p + per-row scales)\n", cases,
              prob_cases);
  return finish("attention");
}
