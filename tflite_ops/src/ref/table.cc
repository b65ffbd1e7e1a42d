// The reference table and isa_name.
#include "../variants.h"

namespace tfqat {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kRef: return "ref";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvxVnni: return "avxvnni";
    case Isa::kAvx512Vnni: return "avx512vnni";
    case Isa::kNeon: return "neon";
    case Isa::kNeonDot: return "neondot";
    case Isa::kNeonI8mm: return "i8mm";
  }
  return "unknown";
}

namespace ref {

const KernelTable* table() {
  static const KernelTable kTable = {
      Isa::kRef,          quantize_rows,   w4_packed_size,  w4_pack,         qlinear_w4,
      w8_packed_size,     w8_pack,         qlinear_w8,      qlinear_w4_grouped,
      qlinear_w8_grouped, attn_qk,         attn_pv,         quantize_probs,  f32_packed_size,
      f32_pack,           gemm_f32,        f16_packed_size, f16_pack,        gemm_f16,
      1,                  qlinear_work_size, qlinear_prepare, qlinear_tile,  true,
  };
  return &kTable;
}

}  // namespace ref
}  // namespace tfqat
