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

// Threads: prefill splits into (query head, block of kBlock queries) tiles, each with its own
// scratch per worker; decode splits QK into (kv head, range of positions) tiles and PV into
// query heads. Below kMinParallelMacs an op stays on the calling thread (the hand-off costs
// about a microsecond). Every output is computed by the same kernel formula either way.
constexpr int64_t kMinParallelMacs = int64_t{1} << 15;
constexpr int kMinPositions = 64;  // per decode QK tile

inline bool use_threads(const NodeCtx& n, int64_t macs) { return n.threads > 1 && macs >= kMinParallelMacs; }

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
    // Per worker: a block of kBlock rows (prefill) or one kv head's rows of scores (decode).
    block_stride_ = static_cast<size_t>(T_ > 1 ? kBlock : H_ / hkv_) * s_cap_;
    block_.resize(block_stride_ * (T_ > 1 ? n.threads : n.threads > 1 ? n.threads : 0));
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
    if (use_threads(n, int64_t{H_} * S * D_)) return invoke_decode_tiles(n, S, out);
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
  // One invoke's inputs, as the tile tasks read them.
  struct Job {
    AttnQKOp* op;
    const KernelTable* kt;
    const int8_t* q;
    const float *qs, *ks;
    const uint8_t* k;
    float* out;
    int S, blocks, chunk, chunks;
  };

  size_t kv_head_bytes() const { return static_cast<size_t>(s_cap_) * cache_row_bytes(kv_bits_, D_); }

  // Query t of block [t0, t0+tn) sees s < S-T+t+1; the block is computed up to its last query's
  // horizon S-T+t0+tn into the worker's block ([tn][horizon]), then copied out with the -inf
  // tail. Task = (head, block).
  static void causal_block_task(void* ctx, int task, int worker) {
    const Job& j = *static_cast<const Job*>(ctx);
    AttnQKOp& o = *j.op;
    const float neg_inf = -std::numeric_limits<float>::infinity();
    const int h = task / j.blocks, t0 = (task % j.blocks) * kBlock;
    const int tn = std::min(kBlock, o.T_ - t0);
    const int horizon = j.S - o.T_ + t0 + tn;
    float* block = o.block_.data() + static_cast<size_t>(worker) * o.block_stride_;
    const uint8_t* kg = j.k + static_cast<size_t>(h / (o.H_ / o.hkv_)) * o.kv_head_bytes();
    j.kt->attn_qk(j.q + (static_cast<size_t>(h) * o.T_ + t0) * o.D_, j.qs + t0, 1, tn, o.D_, kg, o.kv_bits_, j.ks, 1,
                  horizon, o.s_cap_, block);
    for (int i = 0; i < tn; ++i) {
      const int visible = horizon - tn + i + 1;
      float* row = j.out + (static_cast<size_t>(h) * o.T_ + t0 + i) * o.s_cap_;
      std::memcpy(row, block + static_cast<size_t>(i) * horizon, sizeof(float) * visible);
      for (int s = visible; s < o.s_cap_; ++s) row[s] = neg_inf;
    }
  }

  TfLiteStatus invoke_causal_blocks(NodeCtx& n, int S, float* out) {
    Job j{this, n.kt, q_heads(n), static_cast<const float*>(n.input(1)->data),
          static_cast<const float*>(n.input(3)->data), static_cast<const uint8_t*>(n.input(2)->data), out, S,
          (T_ + kBlock - 1) / kBlock, 0, 0};
    const int64_t macs = int64_t{H_} * T_ * S * D_ / 2;
    parallel_run(n.pool, use_threads(n, macs) ? n.threads : 1, H_ * j.blocks, causal_block_task, &j);
    return kTfLiteOk;
  }

  // Decode (T = 1) on several threads: task = (kv head g, positions [s0, s1)), the group's query
  // heads at once (their rows are contiguous in q), scores into the worker's block, then copied
  // to their place; the tile that ends at S also writes the -inf tail.
  static void decode_task(void* ctx, int task, int worker) {
    const Job& j = *static_cast<const Job*>(ctx);
    AttnQKOp& o = *j.op;
    const int group = o.H_ / o.hkv_, g = task / j.chunks;
    const int s0 = (task % j.chunks) * j.chunk, s1 = std::min(j.S, s0 + j.chunk), sn = s1 - s0;
    float* block = o.block_.data() + static_cast<size_t>(worker) * o.block_stride_;
    const uint8_t* kg = j.k + static_cast<size_t>(g) * o.kv_head_bytes() + static_cast<size_t>(s0) *
                                                                           cache_row_bytes(o.kv_bits_, o.D_);
    j.kt->attn_qk(j.q + static_cast<size_t>(g) * group * o.D_, j.qs, group, 1, o.D_, kg, o.kv_bits_, j.ks + s0, 1, sn,
                  o.s_cap_, block);
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int i = 0; i < group; ++i) {
      float* row = j.out + static_cast<size_t>(g * group + i) * o.s_cap_;
      std::memcpy(row + s0, block + static_cast<size_t>(i) * sn, sizeof(float) * sn);
      if (s1 == j.S) {
        for (int s = j.S; s < o.s_cap_; ++s) row[s] = neg_inf;
      }
    }
  }

  TfLiteStatus invoke_decode_tiles(NodeCtx& n, int S, float* out) {
    const int want = (4 * n.threads + hkv_ - 1) / hkv_;  // ~4 tiles per thread
    const int chunk = std::max(kMinPositions, (S + want - 1) / want);
    Job j{this, n.kt, q_heads(n), static_cast<const float*>(n.input(1)->data),
          static_cast<const float*>(n.input(3)->data), static_cast<const uint8_t*>(n.input(2)->data), out, S, 0,
          chunk, (S + chunk - 1) / chunk};
    parallel_run(n.pool, n.threads, hkv_ * j.chunks, decode_task, &j);
    return kTfLiteOk;
  }

  int kv_bits_ = 0, d_attr_ = 0, q_layout_ = 0, H_ = 0, T_ = 0, D_ = 0, hkv_ = 0, s_cap_ = 0;
  size_t block_stride_ = 0;
  std::vector<float> block_;  // per worker, block_stride_ floats each
  std::vector<int8_t> q_hd_;
};

// ---- TFQAT_ATTN_PV -------------------------------------------------------------------------
// in: p_codes u8 [H,T,S_cap] (or f32 probabilities with p_max > 0), p_scale f32 [1] (ignored
//     with p_mode=1), v_cache, v_rowbits i32 [S_cap] (4/8), v_scales f32 [2], length i32 [1]
// out: f32 [H,T,D], only s < S contribute; optional output 1: p_scales f32 [H,T], the scale
//     each probability row used.
class AttnPVOp : public OpKernel {
 public:
  bool configure(const flex::Map& a, std::string* e) override {
    int64_t pm;
    if (!configure_attn(a, &kv_bits_, &D_, e) || !attr_int(a, "p_max", false, 0, &pm, e) ||
        !attr_choice(a, "p_mode", false, 0, {0, 1},
                     "0 (one static p_scale) or 1 (a dynamic scale per probability row)", &p_mode_,
                     e)) {
      return false;
    }
    if (pm < 0 || pm > 255) {
      *e = format("attr p_max must be in [0, 255] (0: uint8 codes in), got %lld", static_cast<long long>(pm));
      return false;
    }
    p_max_ = static_cast<int>(pm);
    if (p_mode_ == 1 && p_max_ == 0) {
      *e = "attr p_mode=1 (a dynamic scale per probability row) needs float probabilities in: "
           "set p_max in [1, 255], got p_max=0";
      return false;
    }
    return true;
  }

  TfLiteStatus prepare(NodeCtx& n) override {
    if (expect_count(n, 6, 6, 1, 2) != kTfLiteOk) return kTfLiteError;
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
    // p_mode=1 never reads p_scale: it may be absent (-1) or anything.
    if ((p_mode_ == 0 &&
         !expect(n.input(1), "input 1 (p_scale)", abi::kTfLiteFloat32, {1}, "[1]", &e)) ||
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
    if (n.outputs.size() == 2 &&
        shape_output(n, 1, "p_scales", abi::kTfLiteFloat32, {H_, T_},
                     format("[H=%d, T=%d]", H_, T_)) != kTfLiteOk) {
      return kTfLiteError;
    }
    // Decode: the H rows of S codes the kernel reads. Prefill: one block of kBlock rows (the
    // codes of float probabilities are made a block at a time, so no [H, T, S_cap] copy).
    // (Prefill: one block per worker.)
    dense_stride_ = static_cast<size_t>(T_ > 1 ? std::min(kBlock, T_) : H_) * s_cap_;
    dense_.resize(dense_stride_ * (T_ > 1 ? n.threads : 1));
    // p_mode=1 writes the row scales straight into output 1 when it has memory (the runtime
    // gives an output nothing consumes none) and here otherwise.
    if (p_mode_) ps_rows_.resize(static_cast<size_t>(H_) * T_);
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
    const TfLiteTensor* out1 = n.output(1);
    float* ps_out = out1 ? static_cast<float*>(out1->data) : nullptr;
    Rows rows;
    rows.ps = p_mode_ ? 0.0f : *static_cast<const float*>(n.input(1)->data);  // unread with p_mode=1
    if (p_mode_) {
      rows.ps_rows = ps_out ? ps_out : ps_rows_.data();
    } else if (ps_out) {
      std::fill(ps_out, ps_out + static_cast<size_t>(H_) * T_, rows.ps);
    }
    if (T_ > 1) return invoke_blocks(n, S, rows);
    if (use_threads(n, int64_t{H_} * S * D_)) return invoke_decode_heads(n, S, rows);
    // The kernel reads rows of S codes; make them (float in) or compact the [.., S_cap] rows.
    const uint8_t* p = static_cast<const uint8_t*>(n.input(0)->data);
    if (p_max_) {
      quantize(n, 0, H_, S, rows, dense_.data());
      p = dense_.data();
    } else if (S != s_cap_) {
      for (int r = 0; r < H_; ++r) {
        std::memcpy(dense_.data() + static_cast<size_t>(r) * S, p + static_cast<size_t>(r) * s_cap_, S);
      }
      p = dense_.data();
    }
    n.kt->attn_pv(p, rows.ps, rows.ps_rows, H_, T_, S, n.input(2)->data, kv_bits_, rowbits_.data(),
                  static_cast<const float*>(n.input(4)->data), hkv_, s_cap_, D_,
                  static_cast<float*>(n.output(0)->data));
    return kTfLiteOk;
  }

 private:
  // The probability scale(s) of a call: ps for every row, or ps_rows[h * T + t] (p_mode=1).
  struct Rows {
    float ps = 0.0f;
    float* ps_rows = nullptr;
  };

  // p_max > 0: codes of float probability rows [r0, r0 + count) (op 4p: clamp(round_half_even(
  // p / scale), 0, p_max), the scale p_scale or, with p_mode=1, the row's max / p_max, written
  // to rows.ps_rows), S per row into `codes`; positions s >= S are not read.
  void quantize(const NodeCtx& n, int r0, int count, int S, const Rows& rows, uint8_t* codes) const {
    const float* p = static_cast<const float*>(n.input(0)->data) + static_cast<size_t>(r0) * s_cap_;
    n.kt->quantize_probs(p, count, S, s_cap_, p_max_, p_mode_ ? nullptr : &rows.ps, codes, S,
                         p_mode_ ? rows.ps_rows + r0 : nullptr);
  }

  size_t kv_head_bytes() const { return static_cast<size_t>(s_cap_) * cache_row_bytes(kv_bits_, D_); }

  // One invoke's inputs, as the tile tasks read them.
  struct Job {
    AttnPVOp* op;
    const NodeCtx* n;
    int S, blocks;
    Rows rows;
    const uint8_t* v;
    const float* vs;
    float* out;
  };

  // Per query head and block of kBlock queries (task = (head, block)), over positions up to the
  // block's last nonzero probability code (a zero code adds nothing to either accumulator:
  // exact for any P; after a causal softmax that is the block's causal horizon), in the
  // worker's scratch block.
  static void block_task(void* ctx, int task, int worker) {
    const Job& j = *static_cast<const Job*>(ctx);
    AttnPVOp& o = *j.op;
    const NodeCtx& n = *j.n;
    const int S = j.S, h = task / j.blocks, t0 = (task % j.blocks) * kBlock;
    const int tn = std::min(kBlock, o.T_ - t0), r0 = h * o.T_ + t0;
    uint8_t* block = o.dense_.data() + static_cast<size_t>(worker) * o.dense_stride_;
    // The block's code rows: float probabilities are quantized into `block` (stride S), uint8
    // codes are read where they are (stride S_cap).
    const uint8_t* src;
    size_t ld;
    if (o.p_max_) {
      o.quantize(n, r0, tn, S, j.rows, block);
      src = block;
      ld = S;
    } else {
      src = static_cast<const uint8_t*>(n.input(0)->data) + static_cast<size_t>(r0) * o.s_cap_;
      ld = o.s_cap_;
    }
    int horizon = 1;
    for (int i = 0; i < tn; ++i) {
      const uint8_t* r = src + i * ld;
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
    // Rows of `horizon` codes. In place when src is `block`: row i moves down from i * S to
    // i * horizon, below every row still to be moved.
    for (int i = 0; i < tn; ++i) {
      std::memmove(block + static_cast<size_t>(i) * horizon, src + i * ld, horizon);
    }
    const uint8_t* vg = j.v + static_cast<size_t>(h / (o.H_ / o.hkv_)) * o.kv_head_bytes();
    n.kt->attn_pv(block, j.rows.ps, j.rows.ps_rows ? j.rows.ps_rows + r0 : nullptr, 1, tn, horizon, vg, o.kv_bits_,
                  o.rowbits_.data(), j.vs, 1, o.s_cap_, o.D_, j.out + static_cast<size_t>(r0) * o.D_);
  }

  TfLiteStatus invoke_blocks(NodeCtx& n, int S, const Rows& rows) {
    Job j{this, &n, S, (T_ + kBlock - 1) / kBlock, rows, static_cast<const uint8_t*>(n.input(2)->data),
          static_cast<const float*>(n.input(4)->data), static_cast<float*>(n.output(0)->data)};
    const int64_t macs = int64_t{H_} * T_ * S * D_ / 2;
    parallel_run(n.pool, use_threads(n, macs) ? n.threads : 1, H_ * j.blocks, block_task, &j);
    return kTfLiteOk;
  }

  // Decode (T = 1) on several threads: one task per query head, its row of S codes made in its
  // own part of dense_ ([H][S]).
  static void decode_task(void* ctx, int h, int) {
    const Job& j = *static_cast<const Job*>(ctx);
    AttnPVOp& o = *j.op;
    const NodeCtx& n = *j.n;
    uint8_t* row = o.dense_.data() + static_cast<size_t>(h) * j.S;
    if (o.p_max_) {
      o.quantize(n, h, 1, j.S, j.rows, row);
    } else {
      std::memcpy(row, static_cast<const uint8_t*>(n.input(0)->data) + static_cast<size_t>(h) * o.s_cap_, j.S);
    }
    const uint8_t* vg = j.v + static_cast<size_t>(h / (o.H_ / o.hkv_)) * o.kv_head_bytes();
    n.kt->attn_pv(row, j.rows.ps, j.rows.ps_rows ? j.rows.ps_rows + h : nullptr, 1, 1, j.S, vg, o.kv_bits_,
                  o.rowbits_.data(), j.vs, 1, o.s_cap_, o.D_, j.out + static_cast<size_t>(h) * o.D_);
  }

  TfLiteStatus invoke_decode_heads(NodeCtx& n, int S, const Rows& rows) {
    Job j{this, &n, S, 0, rows, static_cast<const uint8_t*>(n.input(2)->data),
          static_cast<const float*>(n.input(4)->data), static_cast<float*>(n.output(0)->data)};
    parallel_run(n.pool, n.threads, H_, decode_task, &j);
    return kTfLiteOk;
  }

  int kv_bits_ = 0, p_max_ = 0, p_mode_ = 0, H_ = 0, T_ = 0, D_ = 0, hkv_ = 0, s_cap_ = 0;
  size_t dense_stride_ = 0;
  std::vector<uint8_t> dense_, rowbits_;  // dense_: [H][S] codes (decode), a block per worker (prefill)
  std::vector<float> ps_rows_;
};

}  // namespace

std::unique_ptr<OpKernel> make_attn_qk() { return std::make_unique<AttnQKOp>(); }
std::unique_ptr<OpKernel> make_attn_pv() { return std::make_unique<AttnPVOp>(); }

}  // namespace delegate
}  // namespace tfqat
