// A tiny test harness for the kernel testers: fixed-seed RNG, CHECK that reports and counts,
// and the list of variants to run (every table kernels_for() returns on this CPU).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "tfqat_ops/kernels.h"

namespace tfqat_test {

inline int& failures() {
  static int n = 0;
  return n;
}
inline long& checks() {
  static long n = 0;
  return n;
}

// Stops after a few failures so one bug does not flood the log.
#define CHECK(cond, ...)                                                     \
  do {                                                                       \
    ++::tfqat_test::checks();                                                \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                     \
      std::fprintf(stderr, "\n");                                            \
      if (++::tfqat_test::failures() >= 10) std::exit(1);                    \
    }                                                                        \
  } while (0)

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint32_t next() {  // xorshift64*
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return static_cast<uint32_t>((s * 0x2545F4914F6CDD1Dull) >> 32);
  }
  int uniform(int lo, int hi) { return lo + static_cast<int>(next() % static_cast<uint32_t>(hi - lo + 1)); }
  float unit() { return static_cast<float>(next() >> 8) * (1.0f / 16777216.0f); }  // [0, 1)
  float sym() { return 2.0f * unit() - 1.0f; }
};

// The variants under test (ref included: it is also checked against an int64 / brute oracle).
inline std::vector<const tfqat::KernelTable*> variants(const char* family) {
  using tfqat::Isa;
  std::vector<const tfqat::KernelTable*> out;
  std::printf("[%s] tested:", family);
  std::vector<const char*> skipped;
  for (Isa isa : {Isa::kRef, Isa::kAvx2, Isa::kAvxVnni, Isa::kAvx512Vnni, Isa::kNeon, Isa::kNeonDot,
                  Isa::kNeonI8mm}) {
    if (const tfqat::KernelTable* t = tfqat::kernels_for(isa)) {
      out.push_back(t);
      std::printf(" %s", tfqat::isa_name(isa));
    } else {
      skipped.push_back(tfqat::isa_name(isa));
    }
  }
  std::printf("; skipped (not on this CPU/build):");
  for (const char* s : skipped) std::printf(" %s", s);
  std::printf("\n");
  return out;
}

inline int finish(const char* family) {
  std::printf("[%s] %ld checks, %d failures\n", family, checks(), failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace tfqat_test
