// Dispatch tester: kernels_for() tables carry their own ISA and full entries; TFQAT_ISA forcing
// works, and an unavailable or unknown name gives nullptr plus a one-line message.
#include <cstdlib>
#include <cstring>
#include <string>

#include "harness.h"

using namespace tfqat_test;
using tfqat::Isa;

namespace {

bool complete(const tfqat::KernelTable* t) {
  return t->quantize_rows && t->w4_packed_size && t->w4_pack && t->qlinear_w4 && t->w8_packed_size && t->w8_pack &&
         t->qlinear_w8 && t->qlinear_w4_grouped && t->qlinear_w8_grouped && t->attn_qk && t->attn_pv && t->f32_packed_size && t->f32_pack && t->gemm_f32 &&
         t->f16_packed_size && t->f16_pack && t->gemm_f16;
}

}  // namespace

int main() {
  const auto tables = variants("dispatch");
  for (const tfqat::KernelTable* t : tables) CHECK(complete(t), "%s table has a null entry", tfqat::isa_name(t->isa));
  CHECK(tfqat::kernels_for(Isa::kRef) != nullptr, "ref is always available");

  unsetenv("TFQAT_ISA");
  const char* err = nullptr;
  const tfqat::KernelTable* best = tfqat::select_kernels(&err);
  CHECK(best != nullptr && err == nullptr, "default selection");
  if (best) std::printf("[dispatch] default: %s\n", tfqat::isa_name(best->isa));

  for (const tfqat::KernelTable* t : tables) {
    setenv("TFQAT_ISA", tfqat::isa_name(t->isa), 1);
    err = nullptr;
    CHECK(tfqat::select_kernels(&err) == t && err == nullptr, "forcing %s", tfqat::isa_name(t->isa));
  }
  int unavailable = 0;
  for (Isa isa : {Isa::kAvx2, Isa::kAvxVnni, Isa::kAvx512Vnni, Isa::kNeon, Isa::kNeonDot, Isa::kNeonI8mm}) {
    if (tfqat::kernels_for(isa)) continue;
    ++unavailable;
    setenv("TFQAT_ISA", tfqat::isa_name(isa), 1);
    err = nullptr;
    const tfqat::KernelTable* t = tfqat::select_kernels(&err);
    CHECK(t == nullptr && err != nullptr, "forcing unavailable %s must fail", tfqat::isa_name(isa));
    if (err) {
      std::printf("[dispatch] message: %s\n", err);
      CHECK(std::strncmp(err, "TFQAT_ISA=", 10) == 0 && std::strstr(err, "choose one of: ref") && !std::strchr(err, '\n'),
            "message format: %s", err);
    }
  }
  CHECK(unavailable > 0, "some ISA is always foreign to this architecture");
  setenv("TFQAT_ISA", "bogus", 1);
  err = nullptr;
  CHECK(tfqat::select_kernels(&err) == nullptr && err && std::strstr(err, "unknown"), "unknown name");
  if (err) std::printf("[dispatch] message: %s\n", err);
  CHECK(tfqat::select_kernels() == nullptr, "error pointer is optional");
  unsetenv("TFQAT_ISA");
  return finish("dispatch");
}
