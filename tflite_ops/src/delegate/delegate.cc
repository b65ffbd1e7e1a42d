// libtfqat_ops.so: a TFLite external delegate that runs the graph's TFQAT_* custom ops.
//
// The stock runtime cannot register custom ops from outside (its wheels export no
// MutableOpResolver), but it loads external delegates through a plain C ABI. So the delegate's
// Prepare claims every CUSTOM node named TFQAT_*, one delegate kernel per node (op granularity
// costs ~0.17 us per op, see DESIGN.md), and XNNPACK / the builtin kernels keep everything else.
//
// Options (load_delegate(path, {...})):
//   isa       force a kernel table (ref, avx2, avxvnni, avx512vnni, neon, neondot, i8mm);
//             refused with a message when this CPU or build lacks it. Default: the best one,
//             or TFQAT_ISA from the environment.
//   num_threads  threads for the TFQAT ops (an integer from 1 to kMaxThreads). Default: the
//             interpreter's thread count (Interpreter(num_threads=...), benchmark_model
//             --num_threads, Interpreter.Options.setNumThreads), 1 when that is unset. One
//             thread pool per delegate instance serves every node of every subgraph; results
//             are bit-identical for any thread count (tfqat_ops/parallel.h).
//   dump_abi  path of a JSON file describing what the delegate read for every tensor of every
//             claimed node (rewritten at each node Prepare); the ABI test compares it with the
//             interpreter's own view.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ops.h"

namespace tfqat {
namespace delegate {
namespace {

using namespace abi;

constexpr int kMaxThreads = 1024;

struct DelegateState {
  TfLiteDelegate base{};
  const KernelTable* kernels = nullptr;
  PackCache packs;
  int num_threads = 0;  // the option; 0: the interpreter's thread count
  std::mutex pool_mutex;
  std::unique_ptr<ThreadPool> pool;  // created at the first Prepare that wants threads
  std::string dump_abi_path;
  std::mutex dump_mutex;
  // Node indices restart in every subgraph (one per signature), so entries are keyed by the
  // subgraph's context too, numbered in the order the delegate was applied to them.
  std::vector<const TfLiteContext*> contexts;
  std::map<std::pair<int, int>, std::string> dump_nodes;  // (subgraph ordinal, node) -> JSON
};

// Per claimed node: the original op's view plus its kernel.
struct NodeKernel {
  DelegateState* delegate = nullptr;
  NodeCtx node;
  int subgraph = 0;
  std::unique_ptr<OpKernel> op;
  int custom_options_size = 0;
  std::string init_error;  // reported at Prepare, where errors reach the user with context
};

std::string json_escape(const char* s) {
  std::string out;
  for (; s && *s; ++s) {
    const unsigned char c = static_cast<unsigned char>(*s);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

std::string tensor_json(const TfLiteContext* ctx, int index) {
  if (index < 0) return "null";
  if (static_cast<size_t>(index) >= ctx->tensors_size) {
    return "{\"index\": " + std::to_string(index) + ", \"error\": \"out of range\"}";
  }
  const TfLiteTensor& t = ctx->tensors[index];
  std::string dims;
  for (int i = 0; t.dims && i < t.dims->size; ++i) {
    dims += (i ? ", " : "") + std::to_string(t.dims->data[i]);
  }
  std::string s = "{\"index\": " + std::to_string(index) + ", \"name\": \"" +
                  json_escape(t.name) + "\", \"type\": \"" + type_name(t.type) +
                  "\", \"type_code\": " + std::to_string(t.type) + ", \"dims\": [" + dims +
                  "], \"bytes\": " + std::to_string(t.bytes) + ", \"allocation_type\": \"" +
                  allocation_type_name(t.allocation_type) + "\", \"is_variable\": " +
                  (t.is_variable ? "true" : "false");
  // A checksum of constant data proves that the data pointer is read at the right offset.
  if (t.allocation_type == kTfLiteMmapRo && t.data) {
    uint64_t sum = 0;
    const uint8_t* p = static_cast<const uint8_t*>(t.data);
    for (size_t i = 0; i < t.bytes; ++i) sum += p[i];
    s += ", \"byte_sum\": " + std::to_string(sum);
  }
  return s + "}";
}

void dump_abi(NodeKernel* k) {
  DelegateState* d = k->delegate;
  if (d->dump_abi_path.empty()) return;
  const NodeCtx& n = k->node;
  std::string node = "{\"subgraph_ordinal\": " + std::to_string(k->subgraph) +
                     ", \"node_index\": " + std::to_string(n.node_index) + ", \"op\": \"" +
                     json_escape(n.op.c_str()) + "\", \"custom_options_size\": " +
                     std::to_string(k->custom_options_size) + ", \"inputs\": [";
  for (size_t i = 0; i < n.inputs.size(); ++i) {
    node += (i ? ", " : "") + tensor_json(n.ctx, n.inputs[i]);
  }
  node += "], \"outputs\": [";
  for (size_t i = 0; i < n.outputs.size(); ++i) {
    node += (i ? ", " : "") + tensor_json(n.ctx, n.outputs[i]);
  }
  node += "]}";
  std::lock_guard<std::mutex> lock(d->dump_mutex);
  d->dump_nodes[{k->subgraph, n.node_index}] = node;
  std::string all = "{\"tensors_size\": " + std::to_string(n.ctx->tensors_size) +
                    ", \"isa\": \"" + isa_name(d->kernels->isa) +
                    "\", \"recommended_num_threads\": " + std::to_string(n.ctx->recommended_num_threads) +
                    ", \"threads\": " + std::to_string(n.threads) + ", \"nodes\": [";
  bool first = true;
  for (const auto& entry : d->dump_nodes) {
    all += (first ? "" : ", ") + entry.second;
    first = false;
  }
  all += "]}\n";
  if (FILE* f = std::fopen(d->dump_abi_path.c_str(), "wb")) {
    std::fwrite(all.data(), 1, all.size(), f);
    std::fclose(f);
  }
}

std::vector<int> to_vector(const TfLiteIntArray* a) {
  return a ? std::vector<int>(a->data, a->data + a->size) : std::vector<int>();
}

// ---- the delegate kernel (one per claimed node) --------------------------------------------

void init_node(TfLiteContext* ctx, const TfLiteDelegateParams* params, NodeKernel* k) {
  k->delegate = static_cast<DelegateState*>(params->delegate->data_);
  k->node.ctx = ctx;
  k->node.kt = k->delegate->kernels;
  k->node.packs = &k->delegate->packs;
  {
    std::lock_guard<std::mutex> lock(k->delegate->dump_mutex);
    auto& seen = k->delegate->contexts;
    auto it = std::find(seen.begin(), seen.end(), ctx);
    k->subgraph = static_cast<int>(it - seen.begin());
    if (it == seen.end()) seen.push_back(ctx);
  }
  TfLiteNode* node = nullptr;
  TfLiteRegistration* reg = nullptr;
  if (params->nodes_to_replace->size != 1 ||
      ctx->GetNodeAndRegistration(ctx, params->nodes_to_replace->data[0], &node, &reg) !=
          kTfLiteOk) {
    k->node.op = "TFQAT_DELEGATE";
    k->init_error = "cannot read the claimed node from the runtime";
    return;
  }
  // Use the original op's tensor lists: the delegate node's own lists are the partition's
  // inputs/outputs, which the runtime deduplicates and need not keep in op order.
  k->node.node_index = params->nodes_to_replace->data[0];
  k->node.op = reg->custom_name ? reg->custom_name : "";
  k->node.inputs = to_vector(node->inputs);
  k->node.outputs = to_vector(node->outputs);
  k->custom_options_size = node->custom_initial_data_size;
  k->op = make_op(k->node.op);
  if (!k->op) {
    k->init_error = std::string("unknown TFQAT op; this library implements ") + known_ops();
    return;
  }
  flex::Map attrs;
  std::string error;
  if (node->custom_initial_data_size < 0 ||
      !flex::parse_map(static_cast<const uint8_t*>(node->custom_initial_data),
                       static_cast<size_t>(node->custom_initial_data_size), &attrs, &error) ||
      !k->op->configure(attrs, &error)) {
    k->init_error = error.empty() ? "invalid custom options" : error;
  }
}

void* kernel_init(TfLiteContext* ctx, const char* buffer, size_t) {
  auto* k = new (std::nothrow) NodeKernel;
  if (!k) return nullptr;
  try {
    init_node(ctx, reinterpret_cast<const TfLiteDelegateParams*>(buffer), k);
  } catch (const std::exception& e) {
    k->init_error = std::string("Init failed: ") + e.what();
  }
  return k;
}

void kernel_free(TfLiteContext*, void* buffer) { delete static_cast<NodeKernel*>(buffer); }

// The node's threads: the delegate option, else the interpreter's count (unset: 1); the pool
// grows to it. Runs at Prepare, so Invoke never starts a thread.
void attach_threads(NodeKernel* k) {
  DelegateState* d = k->delegate;
  const int wanted = d->num_threads > 0 ? d->num_threads : k->node.ctx->recommended_num_threads;
  k->node.threads = std::min(std::max(wanted, 1), kMaxThreads);
  k->node.pool = nullptr;
  if (k->node.threads == 1) return;
  std::lock_guard<std::mutex> lock(d->pool_mutex);
  if (!d->pool) {
    d->pool = std::make_unique<ThreadPool>(k->node.threads);
  } else {
    d->pool->reserve(k->node.threads);
  }
  k->node.pool = d->pool.get();
}

// No C++ exception may unwind into the C runtime: allocation failures, and a thread that cannot
// start (std::system_error).
TfLiteStatus kernel_prepare(TfLiteContext* ctx, TfLiteNode* node) {
  auto* k = static_cast<NodeKernel*>(node->user_data);
  if (!k) {
    ctx->ReportError(ctx, "%s", "libtfqat_ops: out of memory creating a node kernel");
    return kTfLiteError;
  }
  k->node.ctx = ctx;
  try {
    attach_threads(k);
    dump_abi(k);
    if (!k->init_error.empty()) return k->node.fail(k->init_error);
    return k->op->prepare(k->node);
  } catch (const std::exception& e) {
    return k->node.fail(std::string("Prepare failed: ") + e.what());
  }
}

TfLiteStatus kernel_invoke(TfLiteContext* ctx, TfLiteNode* node) {
  auto* k = static_cast<NodeKernel*>(node->user_data);
  k->node.ctx = ctx;
  return k->op->invoke(k->node);  // allocation-free by construction
}

const char* kernel_profiling_string(const TfLiteContext*, const TfLiteNode* node) {
  const auto* k = static_cast<const NodeKernel*>(node->user_data);
  return k ? k->node.op.c_str() : "TFQAT_DELEGATE";
}

// ---- the delegate --------------------------------------------------------------------------

bool is_tfqat(const TfLiteRegistration* reg) {
  return reg->builtin_code == kTfLiteBuiltinCustom && reg->custom_name &&
         std::strncmp(reg->custom_name, "TFQAT_", 6) == 0;
}

TfLiteStatus claim_nodes(TfLiteContext* ctx, TfLiteDelegate* delegate) {
  TfLiteIntArray* plan = nullptr;
  if (ctx->GetExecutionPlan(ctx, &plan) != kTfLiteOk) return kTfLiteError;
  // Copy first: the runtime rewrites the plan on every replacement below.
  std::vector<std::pair<int, const char*>> claimed;
  for (int i = 0; i < plan->size; ++i) {
    TfLiteNode* node = nullptr;
    TfLiteRegistration* reg = nullptr;
    if (ctx->GetNodeAndRegistration(ctx, plan->data[i], &node, &reg) != kTfLiteOk) {
      return kTfLiteError;
    }
    if (is_tfqat(reg)) claimed.emplace_back(plan->data[i], static_op_name(reg->custom_name));
  }
  // One replacement call per node gives one delegate kernel per op: handing the runtime all
  // nodes at once would merge adjacent TFQAT ops into one partition whose inner tensors the
  // arena then never allocates.
  for (const auto& c : claimed) {
    TfLiteRegistration reg{};
    reg.init = kernel_init;
    reg.free = kernel_free;
    reg.prepare = kernel_prepare;
    reg.invoke = kernel_invoke;
    reg.profiling_string = kernel_profiling_string;
    reg.custom_name = c.second;
    reg.version = 1;
    struct {
      int size;
      int data[1];
    } one = {1, {c.first}};
    if (ctx->ReplaceNodeSubsetsWithDelegateKernels(
            ctx, reg, reinterpret_cast<const TfLiteIntArray*>(&one), delegate) != kTfLiteOk) {
      return kTfLiteError;
    }
  }
  return kTfLiteOk;
}

TfLiteStatus delegate_prepare(TfLiteContext* ctx, TfLiteDelegate* delegate) {
  try {
    return claim_nodes(ctx, delegate);
  } catch (const std::exception& e) {
    ctx->ReportError(ctx, "libtfqat_ops: %s", e.what());
    return kTfLiteError;
  }
}

const KernelTable* table_by_name(const char* name, std::string* error) {
  std::string known;
  for (int i = 0; i <= static_cast<int>(Isa::kNeonI8mm); ++i) {
    const Isa isa = static_cast<Isa>(i);
    if (std::strcmp(name, isa_name(isa)) == 0) {
      if (const KernelTable* t = kernels_for(isa)) return t;
      *error = std::string("option isa=") + name + " is not available on this CPU or build";
      break;
    }
    known += (known.empty() ? "" : ", ") + std::string(isa_name(isa));
  }
  std::string available;
  for (int i = 0; i <= static_cast<int>(Isa::kNeonI8mm); ++i) {
    if (kernels_for(static_cast<Isa>(i))) {
      available += (available.empty() ? "" : ", ") + std::string(isa_name(static_cast<Isa>(i)));
    }
  }
  if (error->empty()) *error = std::string("option isa=") + name + " is unknown";
  *error += "; available here: " + available;
  return nullptr;
}

DelegateState* create(char** keys, char** values, size_t count, std::string* error) {
  auto d = std::make_unique<DelegateState>();
  const char* isa = nullptr;
  for (size_t i = 0; i < count; ++i) {
    const char* key = keys && keys[i] ? keys[i] : "";
    const char* value = values && values[i] ? values[i] : "";
    if (std::strcmp(key, "isa") == 0) {
      isa = value;
    } else if (std::strcmp(key, "dump_abi") == 0) {
      d->dump_abi_path = value;
    } else if (std::strcmp(key, "num_threads") == 0) {
      char* end = nullptr;
      const long n = std::strtol(value, &end, 10);
      if (!*value || *end || n < 1 || n > kMaxThreads) {
        *error = std::string("option num_threads=") + value + " must be an integer from 1 to " +
                 std::to_string(kMaxThreads);
        return nullptr;
      }
      d->num_threads = static_cast<int>(n);
    } else {
      *error = std::string("unknown option '") + key + "'; options are: isa, num_threads, dump_abi";
      return nullptr;
    }
  }
  if (isa) {
    d->kernels = table_by_name(isa, error);
  } else {
    const char* why = nullptr;
    d->kernels = select_kernels(&why);
    if (!d->kernels) *error = why ? why : "no kernel table";
  }
  if (!d->kernels) return nullptr;
  d->base.data_ = d.get();
  d->base.Prepare = delegate_prepare;
  d->base.flags = kTfLiteDelegateFlagsAllowDynamicTensors;
  return d.release();
}

}  // namespace
}  // namespace delegate
}  // namespace tfqat

// ---- the external-delegate plugin ABI ------------------------------------------------------

extern "C" __attribute__((visibility("default"))) tfqat::abi::TfLiteDelegate*
tflite_plugin_create_delegate(char** keys, char** values, size_t count,
                              void (*report_error)(const char*)) {
  // Python's load_delegate declares `count` as a C int: only the low 32 bits are meaningful.
  const size_t n = static_cast<uint32_t>(count);
  std::string error;
  tfqat::delegate::DelegateState* d = nullptr;
  try {
    d = tfqat::delegate::create(keys, values, n, &error);
  } catch (const std::exception& e) {
    error = e.what();
  }
  if (!d) {
    const std::string message = "libtfqat_ops: " + error;
    if (report_error) report_error(message.c_str());
    return nullptr;
  }
  return &d->base;
}

extern "C" __attribute__((visibility("default"))) void tflite_plugin_destroy_delegate(
    tfqat::abi::TfLiteDelegate* delegate) {
  if (delegate) delete static_cast<tfqat::delegate::DelegateState*>(delegate->data_);
}
