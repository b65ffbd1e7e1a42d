// The TFQAT_* op kernels behind the delegate: attr parsing, Prepare-time validation (types,
// ranks, shapes, options) and Invoke. The contract they enforce is tflite_ops/OPS.md.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "flexbuffer.h"
#include "tflite_abi.h"
#include "tfqat_ops/kernels.h"
#include "tfqat_ops/parallel.h"

namespace tfqat {
namespace delegate {

// Packed weights shared by every node that reads the same constant tensor data with the same
// layout: a model's signatures (prefill, decode) are separate subgraphs whose ops may point at
// one constant buffer, and each packed copy costs as much memory as the weights themselves.
class PackCache {
 public:
  using Packed = std::shared_ptr<const std::vector<uint8_t>>;
  // The packed form of constant canonical weights `data` ([N, K] at `bits` = 4 or 8).
  Packed get(const KernelTable* kt, const void* data, int bits, int N, int K);
  // Advises the OS that the pages wholly inside [data, data + bytes) are no longer needed.
  static void release_pages(const void* data, size_t bytes);

 private:
  std::mutex mutex_;
  std::map<std::tuple<const KernelTable*, const void*, int, int, int>,
           std::weak_ptr<const std::vector<uint8_t>>>
      entries_;
};

// One claimed node as its kernel sees it: the original op's tensor indices (not the delegate
// node's, which the runtime may reorder or deduplicate), the context and the kernel table.
struct NodeCtx {
  abi::TfLiteContext* ctx = nullptr;
  const KernelTable* kt = nullptr;
  PackCache* packs = nullptr;
  // The delegate's thread pool and the threads this node may use (fixed at Prepare: the
  // delegate option num_threads, else the interpreter's thread count; scratch is sized for it).
  ThreadPool* pool = nullptr;
  int threads = 1;
  int node_index = -1;
  std::string op;
  std::vector<int> inputs, outputs;

  // The tensor behind input/output i, or nullptr when it is absent or optional (-1).
  abi::TfLiteTensor* input(size_t i) const;
  abi::TfLiteTensor* output(size_t i) const;
  // Reports "<op> node <n>: <message>" through context->ReportError; returns kTfLiteError.
  abi::TfLiteStatus fail(const std::string& message) const;
};

class OpKernel {
 public:
  virtual ~OpKernel() = default;
  // Reads the custom options; false with *error set when an attr is missing or invalid.
  virtual bool configure(const flex::Map& attrs, std::string* error) = 0;
  // Validates the node's tensors, sizes the outputs and scratch, prepacks constant weights.
  virtual abi::TfLiteStatus prepare(NodeCtx& n) = 0;
  virtual abi::TfLiteStatus invoke(NodeCtx& n) = 0;
};

// The kernel for op `name`, or nullptr when this library does not implement it.
std::unique_ptr<OpKernel> make_op(const std::string& name);
// "TFQAT_QUANTIZE, TFQAT_SELECT_BITS, ...": for messages.
const char* known_ops();
// `name` with static storage duration when it is a known op (the runtime keeps the pointer as
// the delegate kernel's custom_name, which profilers print), else "TFQAT_DELEGATE".
const char* static_op_name(const std::string& name);

// "float32", "uint8", ...; "unknown" past the types we know.
const char* type_name(int type);
const char* allocation_type_name(int allocation_type);

}  // namespace delegate
}  // namespace tfqat
