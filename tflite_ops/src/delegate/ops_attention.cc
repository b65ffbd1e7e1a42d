// TFQAT_ATTN_QK and TFQAT_ATTN_PV over an int8 / packed-int4 KV cache (contract:
// tflite_ops/OPS.md). Scratch is sized in Prepare so Invoke never allocates.
#include <algorithm>
#include <cstring>
#include <limits>

#include "op_util.h"

namespace tfqat {
namespace delegate {

using abi::TfLiteStatus;
using abi::TfLiteTensor;
using abi::TfLiteType;
using abi::kTfLiteError;
using abi::kTfLiteOk;

namespace {

// ---- attention: shared cache validation ----------------------------------------------------
// Cache: i8 [Hkv, S_cap, D] (kv_bits=8) or u8 [Hkv, S_cap, ceil(D/2)] packed int4 (kv_bits=4).
struct CacheShape {
  int hkv = 0, s_cap = 0;
};

bool expect_cache(const TfLiteTensor* t, const char* what, int kv_bits, int D, CacheShape* out,
                  std::string* e) {
  const int row = kv_bits == 4 ? (D + 1) / 2 : D;
  const std::string want = kv_bits == 4 ? format("[Hkv, S_cap, ceil(D/2)=%d] for kv_bits=4", row)
                                        : format("[Hkv, S_cap, D=%d] for kv_bits=8", row);
  if (!expect(t, what, kv_bits == 4 ? abi::kTfLiteUInt8 : abi::kTfLiteInt8, {-1, -1, row}, want,
              e)) {
    return false;
  }
  out->hkv = dim(t, 0);
  out->s_cap = dim(t, 1);
  return true;
}

// The number of valid cache positions S, read at Invoke: T <= S <= S_cap.
bool read_length(NodeCtx& n, size_t input, int T, int s_cap, int* S) {
  const int32_t len = *static_cast<const int32_t*>(n.input(input)->data);
  if (len < T || len > s_cap) {
    n.fail(format("input %zu (length) = %d must be in [T=%d, S_cap=%d]", input, len, T, s_cap));
    return false;
  }
  *S = len;
  return true;
}

// Prefill (T > 1) runs per query head and block of kBlock queries, each only up to its causal
// horizon: the kernels compute every (t, s) they are given, and half of a square T x S block is
// masked. Every entry is computed by the same formula either way (bit-identical results).
constexpr int kBlock = 16;

size_t cache_row_bytes(int kv_bits, int D) {
  return kv_bits == 4 ? static_cast<size_t>(D + 1) / 2 : static_cast<size_t>(D);
}

bool configure_attn(const flex::Map& a, int* kv_bits, int* d, std::string* e) {
  return attr_choice(a, "kv_bits", true, 0, {4, 8}, "4 or 8", kv_bits, e) &&
         attr_dim(a, "d", d, e);
}

// ---- TFQAT_ATTN_QK -------------------------------------------------------------------------
// in: q_codes i8 [H,T,D], q_scales f32 [T], k_cache, k_scales f32 [S_cap], length i32 [1]
// out: scores f32 [H,T,S_cap]; query t sits at absolute position S-T+t and sees s <= S-T+t,
// every other entry is -inf.
class AttnQKOp : public OpKernel {
 public:
  bool configure(const flex::Map& a, std::string* e) override {
    return configure_attn(a, &kv_bits_, &d_attr_, e) &&
           attr_choice(a, "q_layout", false, 0, {0, 1}, "0 ([H, T, D]) or 1 ([T, H, D])", &q_layout_, e);
  }

  TfLiteStatus prepare(NodeCtx& n) override {
    if (expect_count(n, 5, 5, 1) != kTfLiteOk) return kTfLiteError;
    std::string e;
    const TfLiteTensor* q = n.input(0);
    if (!expect(q, "input 0 (q_codes)", abi::kTfLiteInt8, {-1, -1, -1},
                q_layout_ ? "[T, H, D] (q_layout=1)" : "[H, T, D]", &e)) {
      return n.fail(e);
    }
    H_ = dim(q, q_layout_ ? 1 : 0);
    T_ = dim(q, q_layout_ ? 0 : 1);
    D_ = dim(q, 2);
    if (D_ != d_attr_) {
      return n.fail(format("input 0 (q_codes) has D=%d but attr d=%d", D_, d_attr_));
    }
    CacheShape c;
    if (!expect(n.input(1), "input 1 (q_scales)", abi::kTfLiteFloat32, {T_}, format("[T=%d]", T_),
                &e) ||
        !expect_cache(n.input(2), "input 2 (k_cache)", kv_bits_, D_, &c, &e) ||
        !expect(n.input(3), "input 3 (k_scales)", abi::kTfLiteFloat32, {c.s_cap},
                format("[S_cap=%d]", c.s_cap), &e) ||
        !expect(n.input(4), "input 4 (length)", abi::kTfLiteInt32, {1}, "[1]", &e)) {
      return n.fail(e);
    }
    if (H_ % c.hkv != 0) {
      return n.fail(format("H=%d query heads is not a multiple of Hkv=%d kv heads", H_, c.hkv));
    }
    if (T_ > c.s_cap) {
      return n.fail(format("T=%d exceeds the cache capacity S_cap=%d", T_, c.s_cap));
    }
    hkv_ = c.hkv;
    s_cap_ = c.s_cap;
    if (shape_output(n, 0, "scores", abi::kTfLiteFloat32, {H_, T_, s_cap_},
                     format("[H=%d, T=%d, S_cap=%d]", H_, T_, s_cap_)) != kTfLiteOk) {
      return kTfLiteError;
    }
    if (T_ > 1) block_.resize(static_cast<size_t>(kBlock) * s_cap_);
    if (q_layout_) q_hd_.resize(static_cast<size_t>(H_) * T_ * D_);
    return kTfLiteOk;
  }

  // q_layout=1: q [T, H, D] (the quantize op's rows, no TRANSPOSE in the graph) -> [H, T, D].
  const int8_t* q_heads(NodeCtx& n) {
    const int8_t* q = static_cast<const int8_t*>(n.input(0)->data);
    if (!q_layout_) return q;
    for (int t = 0; t < T_; ++t) {
      for (int h = 0; h < H_; ++h) {
        std::memcpy(q_hd_.data() + (static_cast<size_t>(h) * T_ + t) * D_,
                    q + (static_cast<size_t>(t) * H_ + h) * D_, D_);
      }
    }
    return q_hd_.data();
  }

  TfLiteStatus invoke(NodeCtx& n) override {
    int S;
    if (!read_length(n, 4, T_, s_cap_, &S)) return kTfLiteError;
    float* out = static_cast<float*>(n.output(0)->data);
    if (T_ > 1) return invoke_causal_blocks(n, S, out);
    n.kt->attn_qk(q_heads(n),
                  static_cast<const float*>(n.input(1)->data), H_, T_, D_, n.input(2)->data,
                  kv_bits_, static_cast<const float*>(n.input(3)->data), hkv_, S, s_cap_, out);
    // The kernel wrote dense rows of S; spread them to the S_cap stride in place, last row
    // first (row r moves to r*S_cap >= r*S, past every source row still to be moved).
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int r = H_ * T_ - 1; r >= 0; --r) {
      const int visible = S - T_ + (r % T_) + 1;  // query t sees positions 0 .. S-T+t
      float* o = out + static_cast<size_t>(r) * s_cap_;
      if (S != s_cap_) std::memmove(o, out + static_cast<size_t>(r) * S, sizeof(float) * visible);
      for (int s = visible; s < s_cap_; ++s) o[s] = neg_inf;
    }
    return kTfLiteOk;
  }

 private:
  // Query t of block [t0, t0+tn) sees s < S-T+t+1; the block is computed up to its last query's
  // horizon S-T+t0+tn into block_ ([tn][horizon]), then copied out with the -inf tail.
  TfLiteStatus invoke_causal_blocks(NodeCtx& n, int S, float* out) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    const int group = H_ / hkv_;
    const int8_t* q = q_heads(n);
    const float* qs = static_cast<const float*>(n.input(1)->data);
    const uint8_t* k = static_cast<const uint8_t*>(n.input(2)->data);
    const float* ks = static_cast<const float*>(n.input(3)->data);
    const size_t kv_head = static_cast<size_t>(s_cap_) * cache_row_bytes(kv_bits_, D_);
    for (int h = 0; h < H_; ++h) {
      const uint8_t* kg = k + static_cast<size_t>(h / group) * kv_head;
      for (int t0 = 0; t0 < T_; t0 += kBlock) {
        const int tn = std::min(kBlock, T_ - t0);
        const int horizon = S - T_ + t0 + tn;
        n.kt->attn_qk(q + (static_cast<size_t>(h) * T_ + t0) * D_, qs + t0, 1, tn, D_, kg,
                      kv_bits_, ks, 1, horizon, s_cap_, block_.data());
        for (int i = 0; i < tn; ++i) {
          const int visible = horizon - tn + i + 1;
          float* o = out + (static_cast<size_t>(h) * T_ + t0 + i) * s_cap_;
          std::memcpy(o, block_.data() + static_cast<size_t>(i) * horizon, sizeof(float) * visible);
          for (int s = visible; s < s_cap_; ++s) o[s] = neg_inf;
        }
      }
    }
    return kTfLiteOk;
  }

  int kv_bits_ = 0, d_attr_ = 0, q_layout_ = 0, H_ = 0, T_ = 0, D_ = 0, hkv_ = 0, s_cap_ = 0;
  std::vector<float> block_;
  std::vector<int8_t> q_hd_;
};

// ---- TFQAT_ATTN_PV -------------------------------------------------------------------------
// in: p_codes u8 [H,T,S_cap], p_scale f32 [1], v_cache, v_rowbits i32 [S_cap] (4/8),
//     v_scales f32 [2], length i32 [1]; out: f32 [H,T,D], only s < S contribute.
class AttnPVOp : public OpKernel {
 public:
  bool configure(const flex::Map& a, std::string* e) override {
    int64_t pm;
    if (!configure_attn(a, &kv_bits_, &D_, e) || !attr_int(a, "p_max", false, 0, &pm, e)) return false;
    if (pm < 0 || pm > 255) {
      *e = format("attr p_max must be in [0, 255] (0: uint8 codes in), got %lld", static_cast<long long>(pm));
      return false;
    }
    p_max_ = static_cast<int>(pm);
    return true;
  }

  TfLiteStatus prepare(NodeCtx& n) override {
    if (expect_count(n, 6, 6, 1) != kTfLiteOk) return kTfLiteError;
    std::string e;
    CacheShape c;
    if (!expect_cache(n.input(2), "input 2 (v_cache)", kv_bits_, D_, &c, &e)) return n.fail(e);
    hkv_ = c.hkv;
    s_cap_ = c.s_cap;
    const TfLiteTensor* p = n.input(0);
    if (!expect(p, p_max_ ? "input 0 (probabilities)" : "input 0 (p_codes)",
                p_max_ ? abi::kTfLiteFloat32 : abi::kTfLiteUInt8, {-1, -1, s_cap_},
                format("[H, T, S_cap=%d]%s", s_cap_, p_max_ ? " for p_max > 0" : ""), &e)) {
      return n.fail(e);
    }
    H_ = dim(p, 0);
    T_ = dim(p, 1);
    if (!expect(n.input(1), "input 1 (p_scale)", abi::kTfLiteFloat32, {1}, "[1]", &e) ||
        !expect(n.input(3), "input 3 (v_rowbits)", abi::kTfLiteInt32, {s_cap_},
                format("[S_cap=%d]", s_cap_), &e) ||
        !expect(n.input(4), "input 4 (v_scales)", abi::kTfLiteFloat32, {2}, "[2]", &e) ||
        !expect(n.input(5), "input 5 (length)", abi::kTfLiteInt32, {1}, "[1]", &e)) {
      return n.fail(e);
    }
    if (H_ % hkv_ != 0) {
      return n.fail(format("H=%d query heads is not a multiple of Hkv=%d kv heads", H_, hkv_));
    }
    if (T_ > s_cap_) return n.fail(format("T=%d exceeds the cache capacity S_cap=%d", T_, s_cap_));
    if (shape_output(n, 0, "out", abi::kTfLiteFloat32, {H_, T_, D_},
                     format("[H=%d, T=%d, D=%d]", H_, T_, D_)) != kTfLiteOk) {
      return kTfLiteError;
    }
    dense_.resize(static_cast<size_t>(H_) * T_ * s_cap_);
    if (p_max_) codes_.resize(static_cast<size_t>(H_) * T_ * s_cap_);
    rowbits_.resize(s_cap_);
    return kTfLiteOk;
  }

  TfLiteStatus invoke(NodeCtx& n) override {
    int S, bad;
    if (!read_length(n, 5, T_, s_cap_, &S)) return kTfLiteError;
    const int32_t* rowbits = static_cast<const int32_t*>(n.input(3)->data);
    if (!bits_to_u8(rowbits, S, rowbits_.data(), &bad)) {
      return n.fail(format("v_rowbits[%d] = %d; must be 4 or 8", bad, rowbits[bad]));
    }
    // The kernel reads rows of S probabilities; compact the [.., S_cap] rows when S < S_cap.
    const uint8_t* p = p_max_ ? quantize_p(n, S) : static_cast<const uint8_t*>(n.input(0)->data);
    if (T_ > 1) return invoke_blocks(n, S, p);
    if (S != s_cap_) {
      for (int r = 0; r < H_ * T_; ++r) {
        std::memcpy(dense_.data() + static_cast<size_t>(r) * S, p + static_cast<size_t>(r) * s_cap_,
                    S);
      }
      p = dense_.data();
    }
    n.kt->attn_pv(p, *static_cast<const float*>(n.input(1)->data), H_, T_, S, n.input(2)->data,
                  kv_bits_, rowbits_.data(), static_cast<const float*>(n.input(4)->data), hkv_,
                  s_cap_, D_, static_cast<float*>(n.output(0)->data));
    return kTfLiteOk;
  }

 private:
  // p_max > 0: codes = clamp(round_half_even(p / p_scale), 0, p_max) for s < S (the rest of each
  // row is never read). Clamping first is the same (integer bounds); NaN -> 0. The rounding adds
  // and subtracts 1.5 * 2^23, exact round-half-even for 0 <= v <= 255 (no libm call per value).
  const uint8_t* quantize_p(NodeCtx& n, int S) {
    const float* p = static_cast<const float*>(n.input(0)->data);
    const float ps = *static_cast<const float*>(n.input(1)->data);
    const float hi = static_cast<float>(p_max_), magic = 12582912.0f;
    for (int r = 0; r < H_ * T_; ++r) {
      const float* src = p + static_cast<size_t>(r) * s_cap_;
      uint8_t* dst = codes_.data() + static_cast<size_t>(r) * s_cap_;
      int e = S;  // a zero probability is code 0 (0 / ps is 0 or NaN): skip the causal tail
      while (e > 0 && src[e - 1] == 0.0f) --e;
      std::memset(dst + e, 0, S - e);
      for (int s = 0; s < e; ++s) {
        float v = src[s] / ps;
        v = v > 0.0f ? v : 0.0f;  // NaN -> 0
        v = v < hi ? v : hi;
        dst[s] = static_cast<uint8_t>(static_cast<int>((v + magic) - magic));  // not folded: no -ffast-math
      }
    }
    return codes_.data();
  }

  // Per query head and block of kBlock queries, over positions up to the block's last nonzero
  // probability code (a zero code adds nothing to either accumulator: exact for any P; after a
  // causal softmax that is the block's causal horizon).
  TfLiteStatus invoke_blocks(NodeCtx& n, int S, const uint8_t* p) {
    const int group = H_ / hkv_;
    const float ps = *static_cast<const float*>(n.input(1)->data);
    const uint8_t* v = static_cast<const uint8_t*>(n.input(2)->data);
    const float* vs = static_cast<const float*>(n.input(4)->data);
    float* out = static_cast<float*>(n.output(0)->data);
    const size_t kv_head = static_cast<size_t>(s_cap_) * cache_row_bytes(kv_bits_, D_);
    for (int h = 0; h < H_; ++h) {
      const uint8_t* vg = v + static_cast<size_t>(h / group) * kv_head;
      for (int t0 = 0; t0 < T_; t0 += kBlock) {
        const int tn = std::min(kBlock, T_ - t0);
        const uint8_t* rows = p + (static_cast<size_t>(h) * T_ + t0) * s_cap_;
        int horizon = 1;
        for (int i = 0; i < tn; ++i) {
          const uint8_t* r = rows + static_cast<size_t>(i) * s_cap_;
          int s = S;
          for (uint64_t w; s - 8 >= horizon; s -= 8) {  // trailing zero codes, 8 at a time
            std::memcpy(&w, r + s - 8, 8);
            if (w) break;
          }
          for (; s > horizon; --s) {
            if (r[s - 1]) {
              horizon = s;
              break;
            }
          }
        }
        for (int i = 0; i < tn; ++i) {
          std::memcpy(dense_.data() + static_cast<size_t>(i) * horizon,
                      rows + static_cast<size_t>(i) * s_cap_, horizon);
        }
        n.kt->attn_pv(dense_.data(), ps, 1, tn, horizon, vg, kv_bits_, rowbits_.data(), vs, 1,
                      s_cap_, D_, out + (static_cast<size_t>(h) * T_ + t0) * D_);
      }
    }
    return kTfLiteOk;
  }

  int kv_bits_ = 0, p_max_ = 0, H_ = 0, T_ = 0, D_ = 0, hkv_ = 0, s_cap_ = 0;
  std::vector<uint8_t> dense_, codes_, rowbits_;
};

}  // namespace

std::unique_ptr<OpKernel> make_attn_qk() { return std::make_unique<AttnQKOp>(); }
std::unique_ptr<OpKernel> make_attn_pv() { return std::make_unique<AttnPVOp>(); }

}  // namespace delegate
}  // namespace tfqat
