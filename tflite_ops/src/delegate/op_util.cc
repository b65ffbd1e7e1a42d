// Helpers shared by the op kernels, the node view, the shared weight packs and type names.
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "op_util.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21  // Linux 5.4; older kernels answer EINVAL, which is ignored
#endif
#endif

namespace tfqat {
namespace delegate {

using abi::TfLiteStatus;
using abi::TfLiteTensor;
using abi::TfLiteType;
using abi::kTfLiteError;
using abi::kTfLiteOk;

std::string format(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  return buf;
}

std::string describe(const TfLiteTensor* t) {
  if (!t) return "absent";
  std::string s = std::string(type_name(t->type)) + " [";
  for (int i = 0; i < rank(t); ++i) s += (i ? ", " : "") + std::to_string(dim(t, i));
  return s + "]";
}

bool expect(const TfLiteTensor* t, const char* what, TfLiteType type, const std::vector<int>& dims,
            const std::string& want, std::string* error) {
  bool ok = t && t->type == type && rank(t) == static_cast<int>(dims.size());
  for (size_t i = 0; ok && i < dims.size(); ++i) {
    const int d = dim(t, static_cast<int>(i));
    ok = dims[i] < 0 ? d >= 1 : d == dims[i];
  }
  if (!ok) {
    *error = format("%s must be %s %s, got %s", what, type_name(type), want.c_str(),
                    describe(t).c_str());
  }
  return ok;
}

bool is_constant(const TfLiteTensor* t) {
  return t->allocation_type == abi::kTfLiteMmapRo || t->allocation_type == abi::kTfLitePersistentRo;
}

TfLiteStatus shape_output(NodeCtx& n, size_t i, const char* what, TfLiteType type,
                          const std::vector<int>& dims, const std::string& want) {
  TfLiteTensor* t = n.output(i);
  if (!t || t->type != type) {
    return n.fail(format("output %zu (%s) must be %s %s, got %s", i, what, type_name(type),
                         want.c_str(), describe(t).c_str()));
  }
  bool same = rank(t) == static_cast<int>(dims.size());
  for (size_t k = 0; same && k < dims.size(); ++k) same = dim(t, static_cast<int>(k)) == dims[k];
  if (same) return kTfLiteOk;
  // ResizeTensor takes ownership and releases the array with free(): allocate it with malloc.
  auto* shape = static_cast<abi::TfLiteIntArray*>(
      std::malloc(sizeof(abi::TfLiteIntArray) + sizeof(int) * dims.size()));
  if (shape) {
    shape->size = static_cast<int>(dims.size());
    std::memcpy(shape->data, dims.data(), sizeof(int) * dims.size());
  }
  if (!shape || n.ctx->ResizeTensor(n.ctx, t, shape) != kTfLiteOk) {
    return n.fail(format("cannot resize output %zu (%s) from %s to %s", i, what,
                         describe(t).c_str(), want.c_str()));
  }
  return kTfLiteOk;
}

TfLiteStatus expect_count(NodeCtx& n, size_t lo, size_t hi, size_t outputs) {
  return expect_count(n, lo, hi, outputs, outputs);
}

TfLiteStatus expect_count(NodeCtx& n, size_t lo, size_t hi, size_t out_lo, size_t out_hi) {
  auto range = [](size_t a, size_t b) {
    return a == b ? std::to_string(a) : std::to_string(a) + " or " + std::to_string(b);
  };
  if (n.inputs.size() < lo || n.inputs.size() > hi) {
    return n.fail(format("expects %s inputs, got %zu", range(lo, hi).c_str(), n.inputs.size()));
  }
  if (n.outputs.size() < out_lo || n.outputs.size() > out_hi) {
    return n.fail(format("expects %s outputs, got %zu", range(out_lo, out_hi).c_str(),
                         n.outputs.size()));
  }
  return kTfLiteOk;
}

bool bits_to_u8(const int32_t* in, int count, uint8_t* out, int* bad) {
  for (int i = 0; i < count; ++i) {
    if (in[i] != 4 && in[i] != 8) {
      *bad = i;
      return false;
    }
    out[i] = static_cast<uint8_t>(in[i]);
  }
  return true;
}

// ---- attrs ---------------------------------------------------------------------------------

bool attr_int(const flex::Map& m, const char* key, bool required, int64_t def, int64_t* out,
              std::string* error) {
  auto it = m.find(key);
  if (it == m.end()) {
    if (required) *error = format("missing required attr %s", key);
    *out = def;
    return !required;
  }
  const flex::Value& v = it->second;
  switch (v.kind) {
    case flex::Value::Kind::kInt: *out = v.i; return true;
    case flex::Value::Kind::kUInt:
      if (v.u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        *out = static_cast<int64_t>(v.u);
        return true;
      }
      break;
    case flex::Value::Kind::kBool: *out = v.b ? 1 : 0; return true;
    default: break;
  }
  *error = format("attr %s must be an int, got %s", key, v.kind_name());
  return false;
}

bool attr_float(const flex::Map& m, const char* key, bool required, double def, double* out,
                std::string* error) {
  auto it = m.find(key);
  if (it == m.end()) {
    if (required) *error = format("missing required attr %s", key);
    *out = def;
    return !required;
  }
  const flex::Value& v = it->second;
  switch (v.kind) {
    case flex::Value::Kind::kFloat: *out = v.f; return true;
    case flex::Value::Kind::kInt: *out = static_cast<double>(v.i); return true;
    case flex::Value::Kind::kUInt: *out = static_cast<double>(v.u); return true;
    default: break;
  }
  *error = format("attr %s must be a float, got %s", key, v.kind_name());
  return false;
}

bool attr_choice(const flex::Map& m, const char* key, bool required, int64_t def,
                 std::initializer_list<int64_t> allowed, const char* allowed_text, int* out,
                 std::string* error) {
  int64_t v;
  if (!attr_int(m, key, required, def, &v, error)) return false;
  for (int64_t a : allowed) {
    if (v == a) {
      *out = static_cast<int>(v);
      return true;
    }
  }
  *error = format("attr %s must be %s, got %lld", key, allowed_text, static_cast<long long>(v));
  return false;
}

bool attr_dim(const flex::Map& m, const char* key, int* out, std::string* error) {
  int64_t v;
  if (!attr_int(m, key, true, 0, &v, error)) return false;
  if (v < 1 || v > std::numeric_limits<int>::max()) {
    *error = format("attr %s must be >= 1, got %lld", key, static_cast<long long>(v));
    return false;
  }
  *out = static_cast<int>(v);
  return true;
}

// ---- PackCache -----------------------------------------------------------------------------

PackCache::Packed PackCache::get(const KernelTable* kt, const void* data, int bits, int N,
                                 int K) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto& slot = entries_[std::make_tuple(kt, data, bits, N, K)];
  if (Packed p = slot.lock()) return p;
  auto p = std::make_shared<std::vector<uint8_t>>(bits == 4 ? kt->w4_packed_size(N, K)
                                                            : kt->w8_packed_size(N, K));
  (bits == 4 ? kt->w4_pack : kt->w8_pack)(data, N, K, p->data());
  slot = p;
  release_pages(data, static_cast<size_t>(N) * (bits == 4 ? (K + 1) / 2 : K));
  return p;
}

// The kernels read only the packed copy from now on. When the model is mmapped (LiteRT's
// Interpreter(model_path=...)), the canonical weights are clean file pages that stay resident
// (and count in RSS) until the kernel reclaims them: MADV_PAGEOUT reclaims the pages wholly
// inside them now, so the process holds one copy of each weight matrix, not two. It is advice
// that never changes contents: dropped file pages are read again from the file, anonymous ones
// (a model given as bytes) go to swap or stay. Another reader (an op sharing the tensor) just
// faults them back in.
void PackCache::release_pages(const void* data, size_t bytes) {
#if defined(__linux__)
  const long page = sysconf(_SC_PAGESIZE);
  if (page <= 0) return;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(data) + page - 1) / page * page;
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(data) + bytes) / page * page;
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_PAGEOUT);
#else
  (void)data;
  (void)bytes;
#endif
}

// ---- NodeCtx -------------------------------------------------------------------------------

TfLiteTensor* NodeCtx::input(size_t i) const {
  if (i >= inputs.size() || inputs[i] < 0) return nullptr;
  return &ctx->tensors[inputs[i]];
}

TfLiteTensor* NodeCtx::output(size_t i) const {
  if (i >= outputs.size() || outputs[i] < 0) return nullptr;
  return &ctx->tensors[outputs[i]];
}

TfLiteStatus NodeCtx::fail(const std::string& message) const {
  ctx->ReportError(ctx, "%s node %d: %s", op.c_str(), node_index, message.c_str());
  return kTfLiteError;
}

// ---- names ---------------------------------------------------------------------------------

const char* type_name(int type) {
  switch (type) {
    case abi::kTfLiteNoType: return "notype";
    case abi::kTfLiteFloat32: return "float32";
    case abi::kTfLiteInt32: return "int32";
    case abi::kTfLiteUInt8: return "uint8";
    case abi::kTfLiteInt64: return "int64";
    case abi::kTfLiteString: return "string";
    case abi::kTfLiteBool: return "bool";
    case abi::kTfLiteInt16: return "int16";
    case abi::kTfLiteComplex64: return "complex64";
    case abi::kTfLiteInt8: return "int8";
    case abi::kTfLiteFloat16: return "float16";
    case abi::kTfLiteFloat64: return "float64";
    case abi::kTfLiteComplex128: return "complex128";
    case abi::kTfLiteUInt64: return "uint64";
    case abi::kTfLiteResource: return "resource";
    case abi::kTfLiteVariant: return "variant";
    case abi::kTfLiteUInt32: return "uint32";
    case abi::kTfLiteUInt16: return "uint16";
    case abi::kTfLiteInt4: return "int4";
    case abi::kTfLiteBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

const char* allocation_type_name(int allocation_type) {
  switch (allocation_type) {
    case abi::kTfLiteMemNone: return "kTfLiteMemNone";
    case abi::kTfLiteMmapRo: return "kTfLiteMmapRo";
    case abi::kTfLiteArenaRw: return "kTfLiteArenaRw";
    case abi::kTfLiteArenaRwPersistent: return "kTfLiteArenaRwPersistent";
    case abi::kTfLiteDynamic: return "kTfLiteDynamic";
    case abi::kTfLitePersistentRo: return "kTfLitePersistentRo";
    case abi::kTfLiteCustom: return "kTfLiteCustom";
    case abi::kTfLiteVariantObject: return "kTfLiteVariantObject";
    case abi::kTfLiteNonCpu: return "kTfLiteNonCpu";
    default: return "unknown";
  }
}

}  // namespace delegate
}  // namespace tfqat
