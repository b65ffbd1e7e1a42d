// TFQAT_QUANTIZE, TFQAT_SELECT_BITS and TFQAT_QLINEAR (contract: tflite_ops/OPS.md). Scratch is
// sized in Prepare so Invoke never allocates.
#include <algorithm>
#include <cstdint>

#include "op_util.h"

namespace tfqat {
namespace delegate {

using abi::TfLiteStatus;
using abi::TfLiteTensor;
using abi::TfLiteType;
using abi::kTfLiteError;
using abi::kTfLiteOk;

namespace {

// quantize_rows over row blocks of at least kRowBlock rows, split over the node's threads (each
// row has its own scale, so any split gives the same codes).
constexpr int kRowBlock = 32;

struct QuantizeJob {
  const KernelTable* kt;
  const float* x;
  int T, K, block;
  const uint8_t* bits;
  const float* static_scales;
  int8_t* codes;
  float* scales;
};

void quantize_block(const QuantizeJob& j, int t0, int t1) {
  const size_t off = static_cast<size_t>(t0) * j.K;
  j.kt->quantize_rows(j.x + off, t1 - t0, j.K, j.bits + t0, j.static_scales, j.codes + off, j.scales + t0);
}

void quantize_task(void* ctx, int task, int) {
  const QuantizeJob& j = *static_cast<const QuantizeJob*>(ctx);
  const int t0 = task * j.block;
  quantize_block(j, t0, std::min(j.T, t0 + j.block));
}

void quantize_parallel(const NodeCtx& n, QuantizeJob j) {
  const int blocks = std::min(n.threads, std::max(1, j.T / kRowBlock));
  j.block = (j.T + blocks - 1) / blocks;
  parallel_run(n.pool, n.threads, blocks, quantize_task, &j);
}

// ---- TFQAT_QUANTIZE ------------------------------------------------------------------------
// in: x f32 [T,K], bits i32 [T], scales f32 [2] (static; ignored/absent when dynamic)
// out: codes i8 [T,K], scales f32 [T]
class QuantizeOp : public OpKernel {
 public:
  bool configure(const flex::Map& a, std::string* e) override {
    return attr_choice(a, "mode", false, 0, {0, 1}, "0 (static) or 1 (dynamic)", &mode_, e);
  }

  TfLiteStatus prepare(NodeCtx& n) override {
    if (expect_count(n, mode_ == 0 ? 3 : 2, 3, 2) != kTfLiteOk) return kTfLiteError;
    std::string e;
    const TfLiteTensor* x = n.input(0);
    if (!expect(x, "input 0 (x)", abi::kTfLiteFloat32, {-1, -1}, "[T, K]", &e)) return n.fail(e);
    T_ = dim(x, 0);
    K_ = dim(x, 1);
    if (!expect(n.input(1), "input 1 (bits)", abi::kTfLiteInt32, {T_}, format("[T=%d]", T_), &e) ||
        (mode_ == 0 &&
         !expect(n.input(2), "input 2 (scales)", abi::kTfLiteFloat32, {2}, "[2] for mode=0", &e))) {
      return n.fail(e);
    }
    if (shape_output(n, 0, "codes", abi::kTfLiteInt8, {T_, K_},
                     format("[T=%d, K=%d]", T_, K_)) != kTfLiteOk ||
        shape_output(n, 1, "scales", abi::kTfLiteFloat32, {T_},
                     format("[T=%d]", T_)) != kTfLiteOk) {
      return kTfLiteError;
    }
    bits_.resize(T_);
    return kTfLiteOk;
  }

  TfLiteStatus invoke(NodeCtx& n) override {
    int bad;
    const int32_t* bits = static_cast<const int32_t*>(n.input(1)->data);
    if (!bits_to_u8(bits, T_, bits_.data(), &bad)) {
      return n.fail(format("bits[%d] = %d; must be 4 or 8", bad, bits[bad]));
    }
    const float* scales = mode_ == 0 ? static_cast<const float*>(n.input(2)->data) : nullptr;
    // The runtime gives an output that nothing consumes no memory: write it to scratch (sized on
    // first use; this is the only allocation an Invoke can make).
    int8_t* codes = static_cast<int8_t*>(n.output(0)->data);
    float* scales_out = static_cast<float*>(n.output(1)->data);
    if (!codes) {
      codes_scratch_.resize(static_cast<size_t>(T_) * K_);
      codes = codes_scratch_.data();
    }
    if (!scales_out) {
      scales_scratch_.resize(static_cast<size_t>(T_));
      scales_out = scales_scratch_.data();
    }
    quantize_parallel(n, {n.kt, static_cast<const float*>(n.input(0)->data), T_, K_, 0, bits_.data(), scales,
                          codes, scales_out});
    return kTfLiteOk;
  }

 private:
  int mode_ = 0, T_ = 0, K_ = 0;
  std::vector<uint8_t> bits_;
  std::vector<int8_t> codes_scratch_;
  std::vector<float> scales_scratch_;
};

// ---- TFQAT_SELECT_BITS ---------------------------------------------------------------------
// in: importance f32 [T] (+ threshold f32 [1] when mode=1); out: bits i32 [T]
class SelectBitsOp : public OpKernel {
 public:
  bool configure(const flex::Map& a, std::string* e) override {
    if (!attr_choice(a, "mode", false, 0, {0, 1}, "0 (top-k) or 1 (threshold)", &mode_, e)) {
      return false;
    }
    if (mode_ == 1) return true;
    double rho;
    if (!attr_float(a, "rho", true, 0.0, &rho, e)) return false;
    if (!(rho >= 0.0 && rho <= 1.0)) {
      *e = format("attr rho must be in [0, 1], got %g", rho);
      return false;
    }
    rho_ = static_cast<float>(rho);
    return true;
  }

  TfLiteStatus prepare(NodeCtx& n) override {
    const size_t inputs = mode_ == 0 ? 1 : 2;
    if (expect_count(n, inputs, inputs, 1) != kTfLiteOk) return kTfLiteError;
    std::string e;
    const TfLiteTensor* imp = n.input(0);
    if (!expect(imp, "input 0 (importance)", abi::kTfLiteFloat32, {-1}, "[T]", &e)) {
      return n.fail(e);
    }
    T_ = dim(imp, 0);
    if (mode_ == 1 && !expect(n.input(1), "input 1 (threshold)", abi::kTfLiteFloat32, {1},
                              "[1] for mode=1", &e)) {
      return n.fail(e);
    }
    if (shape_output(n, 0, "bits", abi::kTfLiteInt32, {T_}, format("[T=%d]", T_)) != kTfLiteOk) {
      return kTfLiteError;
    }
    bits_.resize(T_);
    return kTfLiteOk;
  }

  TfLiteStatus invoke(NodeCtx& n) override {
    const float* imp = static_cast<const float*>(n.input(0)->data);
    if (mode_ == 0) {
      select_bits_topk(imp, T_, rho_, bits_.data());
    } else {
      select_bits_threshold(imp, T_, *static_cast<const float*>(n.input(1)->data), bits_.data());
    }
    int32_t* out = static_cast<int32_t*>(n.output(0)->data);
    for (int t = 0; t < T_; ++t) out[t] = bits_[t];
    return kTfLiteOk;
  }

 private:
  int mode_ = 0, T_ = 0;
  float rho_ = 0.0f;
  std::vector<uint8_t> bits_;
};

// ---- TFQAT_QLINEAR -------------------------------------------------------------------------
// in: x f32 [T,K], bits i32 [T], act_scales f32 [2], w (u8 [N,ceil(K/2)] | i8 [N,K]),
//     w_scales f32 [N] (group_size 0) or [N, ceil(K/G)] (group_size G), optional bias f32 [N];
// out: y f32 [T,N]
class QLinearOp : public OpKernel {
 public:
  bool configure(const flex::Map& a, std::string* e) override {
    if (!attr_choice(a, "w_bits", true, 0, {4, 8}, "4 or 8", &w_bits_, e) ||
        !attr_dim(a, "k", &k_attr_, e) ||
        !attr_choice(a, "act_mode", false, 0, {0, 1}, "0 (static) or 1 (dynamic)", &act_mode_, e)) {
      return false;
    }
    // Groups are whole multiples of 32 so that no kernel layout's k block straddles two of them.
    int64_t g;
    if (!attr_int(a, "group_size", false, 0, &g, e)) return false;
    if (g < 0 || g % 32 != 0 || g > (int64_t{1} << 30)) {
      *e = format("attr group_size must be 0 (one scale per output channel) or a positive multiple "
                  "of 32, got %lld", static_cast<long long>(g));
      return false;
    }
    group_size_ = static_cast<int>(g);
    return true;
  }

  TfLiteStatus prepare(NodeCtx& n) override {
    if (expect_count(n, 5, 6, 1) != kTfLiteOk) return kTfLiteError;
    std::string e;
    const TfLiteTensor* x = n.input(0);
    if (!expect(x, "input 0 (x)", abi::kTfLiteFloat32, {-1, -1}, "[T, K]", &e)) return n.fail(e);
    T_ = dim(x, 0);
    K_ = dim(x, 1);
    if (K_ != k_attr_) return n.fail(format("input 0 (x) has K=%d but attr k=%d", K_, k_attr_));
    if (!expect(n.input(1), "input 1 (bits)", abi::kTfLiteInt32, {T_}, format("[T=%d]", T_), &e) ||
        (act_mode_ == 0 && !expect(n.input(2), "input 2 (act_scales)", abi::kTfLiteFloat32, {2},
                                   "[2] for act_mode=0", &e))) {
      return n.fail(e);
    }
    const TfLiteTensor* w = n.input(3);
    const int row = w_bits_ == 4 ? (K_ + 1) / 2 : K_;
    const std::string want = w_bits_ == 4 ? format("[N, ceil(K/2)=%d] for w_bits=4", row)
                                          : format("[N, K=%d] for w_bits=8", row);
    if (!expect(w, "input 3 (weights)", w_bits_ == 4 ? abi::kTfLiteUInt8 : abi::kTfLiteInt8,
                {-1, row}, want, &e)) {
      return n.fail(e);
    }
    N_ = dim(w, 0);
    const int ng = group_size_ ? (K_ - 1) / group_size_ + 1 : 0;
    const bool scales_ok =
        group_size_ == 0
            ? expect(n.input(4), "input 4 (w_scales)", abi::kTfLiteFloat32, {N_},
                     format("[N=%d]", N_), &e)
            : expect(n.input(4), "input 4 (w_scales)", abi::kTfLiteFloat32, {N_, ng},
                     format("[N=%d, ceil(K/G)=%d] for group_size=%d", N_, ng, group_size_), &e);
    if (!scales_ok || (n.input(5) && !expect(n.input(5), "input 5 (bias)", abi::kTfLiteFloat32,
                                             {N_}, format("[N=%d]", N_), &e))) {
      return n.fail(e);
    }
    if (shape_output(n, 0, "y", abi::kTfLiteFloat32, {T_, N_},
                     format("[T=%d, N=%d]", T_, N_)) != kTfLiteOk) {
      return kTfLiteError;
    }
    codes_.resize(static_cast<size_t>(T_) * K_);
    xs_.resize(T_);
    bits_.resize(T_);
    // Group-wise scales go to the kernels group-major ([ng][N]): constant ones once here.
    ws_gn_.resize(static_cast<size_t>(ng) * N_);
    constant_ws_ = is_constant(n.input(4));
    if (group_size_ && constant_ws_) transpose_scales(n);
    // The tiles for the node's threads and their scratch (QLinearArgs::work, 64-byte aligned).
    tiling_ = qlinear_tiling(*n.kt, T_, K_, N_, n.threads);
    work_.resize(n.kt->qlinear_work_size(T_, K_, w_bits_, group_size_) + 64);
    // Weights from the model file: used in place when the table's layout is the canonical one
    // (ref), else packed once and shared across nodes (PackCache, which also releases the
    // file's pages once they are packed); weights computed in Prepare (persistent read-only)
    // are packed here; graph inputs at every Invoke.
    shared_.reset();
    own_.clear();
    w_ = nullptr;
    constant_w_ = is_constant(w);
    if (w->allocation_type == abi::kTfLiteMmapRo) {
      if (n.kt->packs_canonical) {
        w_ = w->data;
      } else {
        shared_ = n.packs->get(n.kt, w->data, w_bits_, N_, K_);
        w_ = shared_->data();
      }
      return kTfLiteOk;
    }
    own_.resize(w_bits_ == 4 ? n.kt->w4_packed_size(N_, K_) : n.kt->w8_packed_size(N_, K_));
    w_ = own_.data();
    if (constant_w_) pack_own(n);
    return kTfLiteOk;
  }

  TfLiteStatus invoke(NodeCtx& n) override {
    int bad;
    const int32_t* bits = static_cast<const int32_t*>(n.input(1)->data);
    if (!bits_to_u8(bits, T_, bits_.data(), &bad)) {
      return n.fail(format("bits[%d] = %d; must be 4 or 8", bad, bits[bad]));
    }
    if (!constant_w_) pack_own(n);
    if (group_size_ && !constant_ws_) transpose_scales(n);
    const TfLiteTensor* bias = n.input(5);
    QLinearArgs a;
    a.w_bits = w_bits_;
    a.group_size = group_size_;
    a.x = codes_.data();
    a.xs = xs_.data();
    a.bits = bits_.data();
    a.T = T_;
    a.K = K_;
    a.N = N_;
    a.w_packed = w_;
    a.ws = group_size_ ? nullptr : static_cast<const float*>(n.input(4)->data);
    a.ws_gn = group_size_ ? ws_gn_.data() : nullptr;
    a.bias = bias ? static_cast<const float*>(bias->data) : nullptr;
    a.y = static_cast<float*>(n.output(0)->data);
    const uintptr_t p = reinterpret_cast<uintptr_t>(work_.data());
    a.work = work_.data() + (64 - p % 64) % 64;
    // Each token block is quantized and then prepared for the tiles by the same thread.
    QuantizeJob q{n.kt, static_cast<const float*>(n.input(0)->data), T_, K_, 0, bits_.data(),
                  act_mode_ == 0 ? static_cast<const float*>(n.input(2)->data) : nullptr, codes_.data(),
                  xs_.data()};
    qlinear_run(*n.kt, a, tiling_, n.pool, n.threads,
                [](void* ctx, int t0, int t1) { quantize_block(*static_cast<const QuantizeJob*>(ctx), t0, t1); },
                &q);
    return kTfLiteOk;
  }

 private:
  void pack_own(const NodeCtx& n) {
    (w_bits_ == 4 ? n.kt->w4_pack : n.kt->w8_pack)(n.input(3)->data, N_, K_, own_.data());
  }
  // w_scales [N][ng] -> ws_gn_ [ng][N].
  void transpose_scales(const NodeCtx& n) {
    const float* ws = static_cast<const float*>(n.input(4)->data);
    const size_t ng = ws_gn_.size() / static_cast<size_t>(N_);
    for (size_t i = 0; i < static_cast<size_t>(N_); ++i) {
      for (size_t g = 0; g < ng; ++g) ws_gn_[g * N_ + i] = ws[i * ng + g];
    }
  }

  int w_bits_ = 0, k_attr_ = 0, act_mode_ = 0, group_size_ = 0, T_ = 0, K_ = 0, N_ = 0;
  bool constant_w_ = false, constant_ws_ = false;
  std::vector<float> ws_gn_;  // group-wise scales, group-major (kernels.h op 3g)
  const void* w_ = nullptr;    // the weights the kernels read: one of the three below
  PackCache::Packed shared_;   // packed weights from the model file
  std::vector<uint8_t> own_;   // any other weights
  QLinearTiling tiling_{1, 1};
  std::vector<uint8_t> work_;  // QLinearArgs::work (+ room to align it)
  std::vector<int8_t> codes_;
  std::vector<float> xs_;
  std::vector<uint8_t> bits_;
};

}  // namespace

std::unique_ptr<OpKernel> make_quantize() { return std::make_unique<QuantizeOp>(); }
std::unique_ptr<OpKernel> make_select_bits() { return std::make_unique<SelectBitsOp>(); }
std::unique_ptr<OpKernel> make_qlinear() { return std::make_unique<QLinearOp>(); }

}  // namespace delegate
}  // namespace tfqat
