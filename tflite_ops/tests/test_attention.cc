// Op 4 tester: attn_qk / attn_pv of every variant against an int64 oracle, bit for bit, over
// grouped-query shapes, odd head dims, partial caches (S < s_cap), int8 and int4 caches, mixed
// V row groups and extreme codes (q -128, k/v at their minimum, p 255).
#include <cstring>
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
    for (const KernelTable* kt : tables) {
      std::vector<float> sc(want_s.size() + 1, -3.0f), o(want_o.size() + 1, -3.0f);
      kt->attn_qk(q.data(), qs.data(), H, T, D, k.store.data(), kv_bits, ks.data(), Hkv, S, s_cap, sc.data());
      CHECK(same(sc, want_s) && sc.back() == -3.0f, "%s attn_qk case %d H=%d Hkv=%d T=%d D=%d S=%d cap=%d kv%d",
            tfqat::isa_name(kt->isa), i, H, Hkv, T, D, S, s_cap, kv_bits);
      kt->attn_pv(p.data(), ps, H, T, S, v.store.data(), kv_bits, rowbits_null ? nullptr : rowbits.data(), vs, Hkv,
                  s_cap, D, o.data());
      CHECK(same(o, want_o) && o.back() == -3.0f, "%s attn_pv case %d H=%d Hkv=%d T=%d D=%d S=%d cap=%d kv%d rb=%d",
            tfqat::isa_name(kt->isa), i, H, Hkv, T, D, S, s_cap, kv_bits, !rowbits_null);
    }
    ++cases;
  }
  std::printf("[attention] %d cases per variant\n", cases);
  return finish("attention");
}
