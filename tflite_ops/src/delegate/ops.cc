// The registry of TFQAT_* ops this library implements.
#include "ops.h"

#include "op_util.h"

namespace tfqat {
namespace delegate {
namespace {

struct OpEntry {
  const char* name;
  std::unique_ptr<OpKernel> (*make)();
};

constexpr OpEntry kOps[] = {
    {"TFQAT_QUANTIZE", make_quantize}, {"TFQAT_SELECT_BITS", make_select_bits},
    {"TFQAT_QLINEAR", make_qlinear},   {"TFQAT_ATTN_QK", make_attn_qk},
    {"TFQAT_ATTN_PV", make_attn_pv},
};

}  // namespace

std::unique_ptr<OpKernel> make_op(const std::string& name) {
  for (const OpEntry& op : kOps) {
    if (name == op.name) return op.make();
  }
  return nullptr;
}

const char* known_ops() {
  return "TFQAT_QUANTIZE, TFQAT_SELECT_BITS, TFQAT_QLINEAR, TFQAT_ATTN_QK, TFQAT_ATTN_PV";
}

const char* static_op_name(const std::string& name) {
  for (const OpEntry& op : kOps) {
    if (name == op.name) return op.name;
  }
  return "TFQAT_DELEGATE";
}

}  // namespace delegate
}  // namespace tfqat
