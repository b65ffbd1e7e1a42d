// Our own declarations of the few TFLite C ABI types the delegate touches.
//
// No wheel ships TFLite's headers, so these are written from the documented C ABI of the pinned
// runtime (ai-edge-litert 2.3.0, 64-bit Linux / Android). Only layout matters: field order,
// types and therefore offsets must match the runtime's, and structs passed by value
// (TfLiteRegistration) or allocated by us (TfLiteDelegate) must match in size too. The runtime
// only ever appends fields, so a prefix is enough for structs it owns and we only read
// (TfLiteContext). tests/test_delegate.py checks what we read (dump_abi) against the real
// interpreter; re-run it on every runtime upgrade.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tfqat {
namespace abi {

enum TfLiteStatus : int {
  kTfLiteOk = 0,
  kTfLiteError = 1,
  kTfLiteDelegateError = 2,
};

// Tensor element types (TfLiteType). Values are fixed by the ABI; we name the ones we report.
enum TfLiteType : int {
  kTfLiteNoType = 0,
  kTfLiteFloat32 = 1,
  kTfLiteInt32 = 2,
  kTfLiteUInt8 = 3,
  kTfLiteInt64 = 4,
  kTfLiteString = 5,
  kTfLiteBool = 6,
  kTfLiteInt16 = 7,
  kTfLiteComplex64 = 8,
  kTfLiteInt8 = 9,
  kTfLiteFloat16 = 10,
  kTfLiteFloat64 = 11,
  kTfLiteComplex128 = 12,
  kTfLiteUInt64 = 13,
  kTfLiteResource = 14,
  kTfLiteVariant = 15,
  kTfLiteUInt32 = 16,
  kTfLiteUInt16 = 17,
  kTfLiteInt4 = 18,
  kTfLiteBFloat16 = 19,
};

enum TfLiteAllocationType : int {
  kTfLiteMemNone = 0,
  kTfLiteMmapRo = 1,            // constant from the model buffer
  kTfLiteArenaRw = 2,
  kTfLiteArenaRwPersistent = 3,
  kTfLiteDynamic = 4,
  kTfLitePersistentRo = 5,      // computed in Prepare, then constant
  kTfLiteCustom = 6,
  kTfLiteVariantObject = 7,
  kTfLiteNonCpu = 8,
};

enum : int64_t {
  kTfLiteDelegateFlagsNone = 0,
  // Without it the interpreter rejects the graph's unresolved TFQAT_* custom ops (they have no
  // kernel in the stock resolver) before our Prepare can claim them.
  kTfLiteDelegateFlagsAllowDynamicTensors = 1,
};

enum : int {
  kTfLiteOptionalTensor = -1,    // an absent optional input in TfLiteNode::inputs
  kTfLiteBuiltinCustom = 32,     // BuiltinOperator_CUSTOM in the schema
};

struct TfLiteIntArray {
  int size;
  int data[];
};

struct TfLiteQuantizationParams {
  float scale;
  int32_t zero_point;
};

struct TfLiteQuantization {
  int type;
  void* params;
};

struct TfLiteDelegate;

struct TfLiteTensor {
  TfLiteType type;
  void* data;                         // a union of typed pointers in the C header
  TfLiteIntArray* dims;
  TfLiteQuantizationParams params;
  TfLiteAllocationType allocation_type;
  size_t bytes;
  const void* allocation;
  const char* name;
  TfLiteDelegate* delegate;
  int buffer_handle;
  bool data_is_stale;
  bool is_variable;
  TfLiteQuantization quantization;
  void* sparsity;
  const TfLiteIntArray* dims_signature;
};

struct TfLiteNode {
  TfLiteIntArray* inputs;
  TfLiteIntArray* outputs;
  TfLiteIntArray* intermediates;
  TfLiteIntArray* temporaries;
  void* user_data;
  void* builtin_data;
  const void* custom_initial_data;    // the op's custom_options bytes
  int custom_initial_data_size;
  TfLiteDelegate* delegate;
  bool might_have_side_effect;
};

struct TfLiteContext;

struct TfLiteRegistration {
  void* (*init)(TfLiteContext* context, const char* buffer, size_t length);
  void (*free)(TfLiteContext* context, void* buffer);
  TfLiteStatus (*prepare)(TfLiteContext* context, TfLiteNode* node);
  TfLiteStatus (*invoke)(TfLiteContext* context, TfLiteNode* node);
  const char* (*profiling_string)(const TfLiteContext* context, const TfLiteNode* node);
  int32_t builtin_code;
  const char* custom_name;
  int version;
  void* registration_external;
  void* async_kernel;
  uint64_t inplace_operator;
};

// Handed to a delegate kernel's init() as `buffer` (length 0).
struct TfLiteDelegateParams {
  TfLiteDelegate* delegate;
  TfLiteIntArray* nodes_to_replace;
  TfLiteIntArray* input_tensors;
  TfLiteIntArray* output_tensors;
};

// Prefix of the runtime's context, up to the last member we call (the runtime owns it; members
// we never call are typed as opaque pointers).
struct TfLiteContext {
  size_t tensors_size;
  TfLiteStatus (*GetExecutionPlan)(TfLiteContext* context, TfLiteIntArray** execution_plan);
  TfLiteTensor* tensors;
  void* impl_;
  // Takes ownership of new_size and releases it with free(). (The later ResizeTensorExplicit,
  // which copies, is not usable: the interpreter of the pinned runtime does not provide it.)
  TfLiteStatus (*ResizeTensor)(TfLiteContext* context, TfLiteTensor* tensor,
                               TfLiteIntArray* new_size);
  void (*ReportError)(TfLiteContext* context, const char* format, ...);
  void* AddTensors;
  TfLiteStatus (*GetNodeAndRegistration)(TfLiteContext* context, int node_index,
                                         TfLiteNode** node, TfLiteRegistration** registration);
  TfLiteStatus (*ReplaceNodeSubsetsWithDelegateKernels)(TfLiteContext* context,
                                                        TfLiteRegistration registration,
                                                        const TfLiteIntArray* nodes_to_replace,
                                                        TfLiteDelegate* delegate);
  // The interpreter's thread count (Interpreter(num_threads=...), benchmark_model
  // --num_threads, Interpreter.Options.setNumThreads); -1 when the application left it unset.
  int recommended_num_threads;
};

struct TfLiteDelegate {
  void* data_;
  TfLiteStatus (*Prepare)(TfLiteContext* context, TfLiteDelegate* delegate);
  void* CopyFromBufferHandle;
  void* CopyToBufferHandle;
  void* FreeBufferHandle;
  int64_t flags;
  void* opaque_delegate_builder;      // must stay null: the runtime prefers it over Prepare
};

// The 64-bit layout of the pinned runtime. A failure here means a 32-bit target or an edit that
// broke the ABI, never something to "fix" by adjusting the numbers.
static_assert(sizeof(void*) == 8, "declarations are checked for 64-bit targets only");
static_assert(sizeof(TfLiteIntArray) == 4, "TfLiteIntArray");
static_assert(offsetof(TfLiteTensor, data) == 8, "TfLiteTensor::data");
static_assert(offsetof(TfLiteTensor, dims) == 16, "TfLiteTensor::dims");
static_assert(offsetof(TfLiteTensor, allocation_type) == 32, "TfLiteTensor::allocation_type");
static_assert(offsetof(TfLiteTensor, bytes) == 40, "TfLiteTensor::bytes");
static_assert(offsetof(TfLiteTensor, name) == 56, "TfLiteTensor::name");
static_assert(offsetof(TfLiteTensor, is_variable) == 77, "TfLiteTensor::is_variable");
static_assert(offsetof(TfLiteTensor, quantization) == 80, "TfLiteTensor::quantization");
static_assert(sizeof(TfLiteTensor) == 112, "TfLiteTensor (context->tensors is an array of it)");
static_assert(offsetof(TfLiteNode, user_data) == 32, "TfLiteNode::user_data");
static_assert(offsetof(TfLiteNode, custom_initial_data) == 48, "TfLiteNode::custom_initial_data");
static_assert(offsetof(TfLiteNode, custom_initial_data_size) == 56, "TfLiteNode::custom_..._size");
static_assert(sizeof(TfLiteNode) == 80, "TfLiteNode");
static_assert(offsetof(TfLiteRegistration, builtin_code) == 40, "TfLiteRegistration::builtin_code");
static_assert(offsetof(TfLiteRegistration, custom_name) == 48, "TfLiteRegistration::custom_name");
static_assert(sizeof(TfLiteRegistration) == 88, "TfLiteRegistration is passed by value");
static_assert(sizeof(TfLiteDelegateParams) == 32, "TfLiteDelegateParams");
static_assert(offsetof(TfLiteContext, tensors) == 16, "TfLiteContext::tensors");
static_assert(offsetof(TfLiteContext, ReportError) == 40, "TfLiteContext::ReportError");
static_assert(offsetof(TfLiteContext, GetNodeAndRegistration) == 56, "TfLiteContext::GetNode...");
static_assert(offsetof(TfLiteContext, ReplaceNodeSubsetsWithDelegateKernels) == 64,
              "TfLiteContext::ReplaceNodeSubsetsWithDelegateKernels");
static_assert(offsetof(TfLiteContext, ResizeTensor) == 32, "TfLiteContext::ResizeTensor");
static_assert(offsetof(TfLiteContext, recommended_num_threads) == 72,
              "TfLiteContext::recommended_num_threads");
static_assert(offsetof(TfLiteDelegate, flags) == 40, "TfLiteDelegate::flags");
static_assert(sizeof(TfLiteDelegate) == 56, "TfLiteDelegate is allocated by us");

}  // namespace abi
}  // namespace tfqat
