#include "../variants.h"

namespace tfqat {
const KernelTable* x86_avxvnni_table() {
  static const KernelTable kTable = {
      Isa::kAvxVnni, ref::quantize_rows, ref::w4_packed_size, ref::w4_pack, ref::qlinear_w4,
      ref::w8_packed_size, ref::w8_pack, ref::qlinear_w8, ref::attn_qk, ref::attn_pv,
      ref::f32_packed_size, ref::f32_pack, ref::gemm_f32, ref::f16_packed_size, ref::f16_pack,
      ref::gemm_f16,
  };
  return &kTable;
}
}  // namespace tfqat
