// Run-time selection of the kernel table: CPU feature detection plus the TFQAT_ISA override.
// A table is only handed out when the CPU (and, on x86, the OS register state) supports it, so
// forcing a missing path fails with a message instead of SIGILL.
#include <cstdlib>
#include <cstring>
#include <string>

#include "variants.h"

#if defined(__x86_64__) || defined(_M_X64)
#define TFQAT_X86 1
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace tfqat {
namespace {

struct Features {
  bool avx2 = false, f16c = false, avxvnni = false, avx512vnni = false;
  bool asimddp = false, asimdhp = false, i8mm = false;
};

#if defined(TFQAT_X86)
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}
#endif

Features detect() {
  Features f;
#if defined(TFQAT_X86)
  unsigned a, b, c, d;
  if (!__get_cpuid_count(1, 0, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28);
  f.f16c = c & (1u << 29);
  const bool fma = c & (1u << 12);
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;         // XMM + YMM state
  const bool os_avx512 = (xcr0 & 0xE6) == 0xE6;    // + opmask, ZMM_Hi256, Hi16_ZMM
  if (!os_avx) return Features{};
  unsigned a7 = 0, b7 = 0, c7 = 0, d7 = 0, a71 = 0, b71 = 0, c71 = 0, d71 = 0;
  __get_cpuid_count(7, 0, &a7, &b7, &c7, &d7);
  if (a7 >= 1) __get_cpuid_count(7, 1, &a71, &b71, &c71, &d71);
  f.avx2 = (b7 & (1u << 5)) && f.f16c && fma;
  f.avxvnni = f.avx2 && (a71 & (1u << 4));
  const bool avx512fbwvl = (b7 & (1u << 16)) && (b7 & (1u << 30)) && (b7 & (1u << 31));
  f.avx512vnni = f.avx2 && os_avx512 && avx512fbwvl && (c7 & (1u << 11));
#elif defined(__aarch64__) && defined(__linux__)
  // Bit positions from the Linux arm64 uapi hwcap.h, spelled out for libcs that lack them.
  constexpr unsigned long kHwcapFphp = 1ul << 9, kHwcapAsimdhp = 1ul << 10;
  constexpr unsigned long kHwcapAsimddp = 1ul << 20, kHwcap2I8mm = 1ul << 13;
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  f.asimdhp = (hw & kHwcapAsimdhp) && (hw & kHwcapFphp);
  f.asimddp = hw & kHwcapAsimddp;
  f.i8mm = hw2 & kHwcap2I8mm;
#endif
  return f;
}

const Features& features() {
  static const Features f = detect();
  return f;
}

constexpr Isa kAllIsas[] = {Isa::kRef,  Isa::kAvx2,    Isa::kAvxVnni,  Isa::kAvx512Vnni,
                            Isa::kNeon, Isa::kNeonDot, Isa::kNeonI8mm};

const char* missing_what(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "AVX2 + FMA + F16C";
    case Isa::kAvxVnni: return "AVX-VNNI";
    case Isa::kAvx512Vnni: return "AVX-512 VNNI";
    case Isa::kNeon: return "AArch64 NEON";
    case Isa::kNeonDot: return "ARMv8.2 dotprod + fp16";
    case Isa::kNeonI8mm: return "ARMv8.6 i8mm";
    default: return "it";
  }
}

}  // namespace

const KernelTable* kernels_for(Isa isa) {
  const Features& f = features();
  (void)f;
  switch (isa) {
    case Isa::kRef: return ref::table();
#if defined(TFQAT_X86)
    case Isa::kAvx2: return f.avx2 ? x86_avx2_table() : nullptr;
    case Isa::kAvxVnni: return f.avxvnni ? x86_avxvnni_table() : nullptr;
    case Isa::kAvx512Vnni: return f.avx512vnni ? x86_avx512vnni_table() : nullptr;
#endif
#if defined(__aarch64__) && defined(TFQAT_HAVE_ARM_VARIANTS)
    case Isa::kNeon: return arm_neon_table();
    case Isa::kNeonDot: return f.asimddp && f.asimdhp ? arm_neondot_table() : nullptr;
    case Isa::kNeonI8mm: return f.i8mm && f.asimddp && f.asimdhp ? arm_i8mm_table() : nullptr;
#endif
    default: return nullptr;
  }
}

const KernelTable* select_kernels(const char** error) {
  static thread_local std::string message;
  const char* forced = std::getenv("TFQAT_ISA");
  if (!forced || !*forced) {
    const Isa best[] = {Isa::kAvx512Vnni, Isa::kAvxVnni, Isa::kAvx2,
                        Isa::kNeonI8mm,   Isa::kNeonDot, Isa::kNeon};
    for (Isa isa : best) {
      if (const KernelTable* t = kernels_for(isa)) return t;
    }
    return ref::table();
  }
  std::string available;
  for (Isa isa : kAllIsas) {
    if (kernels_for(isa)) available += std::string(available.empty() ? "" : ", ") + isa_name(isa);
  }
  for (Isa isa : kAllIsas) {
    if (std::strcmp(forced, isa_name(isa)) != 0) continue;
    if (const KernelTable* t = kernels_for(isa)) return t;
    message = std::string("TFQAT_ISA=") + forced + ": this CPU (or this build) lacks " +
              missing_what(isa) + "; unset TFQAT_ISA or choose one of: " + available;
    if (error) *error = message.c_str();
    return nullptr;
  }
  message = std::string("TFQAT_ISA=") + forced + ": unknown ISA name; unset TFQAT_ISA or choose one of: " + available;
  if (error) *error = message.c_str();
  return nullptr;
}

}  // namespace tfqat
