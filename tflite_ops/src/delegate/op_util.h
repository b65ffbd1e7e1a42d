// Shared by the op kernels: tensor checks that produce the contract's one-line messages, output
// sizing, and attr readers. Internal to libtfqat_ops.so.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "flexbuffer.h"
#include "ops.h"
#include "tflite_abi.h"

namespace tfqat {
namespace delegate {

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

inline int rank(const abi::TfLiteTensor* t) { return t->dims ? t->dims->size : 0; }
inline int dim(const abi::TfLiteTensor* t, int i) { return t->dims->data[i]; }

// "int8 [64, 33]", or "absent".
std::string describe(const abi::TfLiteTensor* t);
// Checks type and exact dims (-1 = any size >= 1). `what` reads like "input 3 (weights)",
// `want` like "[N, ceil(K/2)=33] for w_bits=4"; the message states both sides.
bool expect(const abi::TfLiteTensor* t, const char* what, abi::TfLiteType type,
            const std::vector<int>& dims, const std::string& want, std::string* error);
// Constant from the model file or computed once in Prepare.
bool is_constant(const abi::TfLiteTensor* t);
// Gives output i the shape the op produces (resizing it if the model declared another) after
// checking that the model gave it the op's type.
abi::TfLiteStatus shape_output(NodeCtx& n, size_t i, const char* what, abi::TfLiteType type,
                               const std::vector<int>& dims, const std::string& want);
abi::TfLiteStatus expect_count(NodeCtx& n, size_t lo, size_t hi, size_t outputs);
// The same, allowing out_lo to out_hi outputs (an op with optional outputs).
abi::TfLiteStatus expect_count(NodeCtx& n, size_t lo, size_t hi, size_t out_lo, size_t out_hi);
// Per-token / per-row bit widths travel as int32 in the graph and uint8 in the kernels; false
// with *bad set at the first value that is not 4 or 8.
bool bits_to_u8(const int32_t* in, int count, uint8_t* out, int* bad);

// Attr readers: false with *error set when a required attr is missing or a value is invalid;
// an absent optional attr yields `def`.
bool attr_int(const flex::Map& m, const char* key, bool required, int64_t def, int64_t* out,
              std::string* error);
bool attr_float(const flex::Map& m, const char* key, bool required, double def, double* out,
                std::string* error);
bool attr_choice(const flex::Map& m, const char* key, bool required, int64_t def,
                 std::initializer_list<int64_t> allowed, const char* allowed_text, int* out,
                 std::string* error);
bool attr_dim(const flex::Map& m, const char* key, int* out, std::string* error);

// The op kernels, by family.
std::unique_ptr<OpKernel> make_quantize();
std::unique_ptr<OpKernel> make_select_bits();
std::unique_ptr<OpKernel> make_qlinear();
std::unique_ptr<OpKernel> make_attn_qk();
std::unique_ptr<OpKernel> make_attn_pv();

}  // namespace delegate
}  // namespace tfqat
