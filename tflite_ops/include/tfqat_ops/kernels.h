// tfqat mixed-precision kernels: the one C++ interface every ISA variant implements.
//
// The integer semantics are defined by the portable reference (src/ref/); every other path must
// be bit-exact with it (same int32 accumulators, same float epilogue in the same order, no FMA
// contraction: all kernel sources are built with -ffp-contract=off).
//
// Conventions shared by every op (also written down in tflite_ops/README.md):
// - Rounding of float -> int is round-half-to-even (nearbyint in the default FP environment,
//   _mm*_cvtps_epi32 / vcvtnq_s32_f32), identical to tf.round and np.round.
// - Quantize: q = clamp(round_half_even(x / s), -2^(b-1), 2^(b-1) - 1) with a true division.
// - int4 storage ("packed int4"): two's-complement nibbles, two per byte along the innermost
//   axis; element 2j in the low nibble, element 2j+1 in the high nibble of byte j; an odd tail
//   leaves the last high nibble 0. Row stride = (len + 1) / 2 bytes.
// - int4 activations travel as int8 codes in [-8, 7] (one per byte) with bits[t] == 4; a kernel
//   may rely on that range (the quantize op guarantees it).
// - Float epilogue of every integer matmul: y = (float)acc * (sa * sb) [+ bias], the scale
//   product computed first, bias added last. (Group-wise weight scales, op 3g, have their own
//   epilogue, below.)
#pragma once

#include <cstddef>
#include <cstdint>

namespace tfqat {

// Which implementation family a table belongs to.
enum class Isa : int {
  kRef = 0,        // portable C++, always compiled; the test oracle
  kAvx2 = 1,       // x86-64 AVX2 (+F16C for the FP16 baseline)
  kAvxVnni = 2,    // x86-64 AVX2 + AVX-VNNI (VEX vpdpbusd)
  kAvx512Vnni = 3, // x86-64 AVX-512 F/BW/VL + VNNI
  kNeon = 4,       // armv8.0 NEON (smlal / sadalp)
  kNeonDot = 5,    // armv8.2 dotprod (sdot) + fp16
  kNeonI8mm = 6,   // armv8.6 i8mm (smmla) + dotprod + fp16
};

const char* isa_name(Isa isa);

// ---- op 1: per-token activation quantization -------------------------------------------
// x: [T][K] floats. bits[t] in {4, 8}.
// Static mode (static_scales != nullptr): static_scales[0] is the 8-bit scale, [1] the 4-bit one;
//   scales_out[t] = bits[t] == 8 ? static_scales[0] : static_scales[1].
// Dynamic mode (static_scales == nullptr): scales_out[t] = max_k |x[t][k]| / qmax(bits[t])
//   (qmax = 127 or 7), or 1.0f when that max is 0.
// codes[t][k] = clamp(round_half_even(x[t][k] / scales_out[t]), -qmax - 1, qmax).
using QuantizeRowsFn = void (*)(const float* x, int T, int K, const uint8_t* bits,
                                const float* static_scales, int8_t* codes, float* scales_out);

// ---- op 2: token bit selection (not ISA-specific; defined in ref only) -------------------
// Top-n8 tokens by importance get 8 bits, the rest 4, with n8 = clamp(floor(rho * T + 0.5), 0, T)
// computed in double. Ties: the lower index wins. NaN importance ranks lowest.
void select_bits_topk(const float* importance, int T, float rho, uint8_t* bits);
// Decode rule: bits[t] = importance[t] >= threshold ? 8 : 4.
void select_bits_threshold(const float* importance, int T, float threshold, uint8_t* bits);

// ---- op 3: quantized linear (MKMP) -----------------------------------------------------
// Weights are given in the canonical layout and converted once by the table's pack function
// into whatever layout the variant wants (XNNPACK-style prepacking; ref = plain copy).
//   canonical W4: uint8 [N][(K + 1) / 2] packed int4, row n = output channel n.
//   canonical W8: int8 [N][K].
// x: int8 codes [T][K]; xs: float [T] per-token scales; bits: [T] in {4, 8}, or nullptr = all 8.
// ws: float [N] per-output-channel scales; bias: float [N] or nullptr.
// y[t][n] = (float)(sum_k x[t][k] * W[n][k]) * (xs[t] * ws[n]) (+ bias[n]).
using PackedSizeFn = size_t (*)(int N, int K);
using PackFn = void (*)(const void* canonical, int N, int K, void* packed);
using QLinearFn = void (*)(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K,
                           const void* w_packed, const float* ws, const float* bias, int N,
                           float* y);

// ---- op 3g: quantized linear with group-wise weight scales along K ----------------------
// Same x, xs, bits, bias and the same packed weights (w4_pack / w8_pack) as op 3; the weight
// scales have one entry per output channel and group of G consecutive k:
//   G = group_size, a positive multiple of 32 (so a group never splits a packed k block of any
//   variant); ng = ceil(K / G); group g covers k in [g * G, min((g + 1) * G, K)) (the last
//   group may be partial).
//   ws_gn: float [ng][N], *group-major*: ws_gn[g * N + n] is the scale of channel n in group g.
//   (The op's w_scales are [N][ng]; the delegate transposes them once, so that the scales of
//   consecutive channels at one group are one vector load in every variant.)
// Epilogue, in exactly this order (float32, no FMA):
//   acc_g = sum_{k in group g} x[t][k] * W[n][k]                         (int32)
//   s = 0.0f; for g = 0 .. ng - 1: s = s + (float)acc_g * ws_gn[g * N + n];
//   y[t][n] = s * xs[t], then + bias[n].
// This differs from op 3 even for ng = 1 ((float)acc * (xs * ws) there); keep the two apart.
using QLinearGroupedFn = void (*)(const int8_t* x, const float* xs, const uint8_t* bits, int T,
                                  int K, const void* w_packed, int group_size,
                                  const float* ws_gn, const float* bias, int N, float* y);

// ---- op 4: quantized attention matmuls -------------------------------------------------
// Cache layout: [Hkv][s_cap][D] (int8) or [Hkv][s_cap][(D + 1) / 2] (packed int4, kv_bits == 4);
// positions 0..S-1 are valid. Query head h reads kv head h / (H / Hkv) (grouped-query).
// QK: q int8 [H][T][D], qs [T]; ks [S] per cached position.
//   scores[h][t][s] = (float)(sum_d q[h][t][d] * k[g][s][d]) * (qs[t] * ks[s]).
using AttnQKFn = void (*)(const int8_t* q, const float* qs, int H, int T, int D, const void* k,
                          int kv_bits, const float* ks, int Hkv, int S, int s_cap,
                          float* scores);
// PV: p uint8 [H][T][S] probability codes; row (h, t) has the probability scale
//   ps_rows[h * T + t] when ps_rows != nullptr (per-row dynamic scales, from quantize_probs),
//   else ps (one scale for every row). V rows are grouped by v_rowbits[s] (8 -> group 0 with
//   scale vs[0], 4 -> group 1 with scale vs[1]; nullptr = all group 0). With p_r that row's scale:
//   out[h][t][d] = (float)acc8 * (p_r * vs[0]) + (float)acc4 * (p_r * vs[1])
//   (v_rowbits == nullptr: (float)acc8 * (p_r * vs[0]) alone, vs[1] is not read),
//   accN = sum over s in group N of p[h][t][s] * v[g][s][d].
// One signature for both modes: the scale enters only the epilogue, so every variant keeps its
// integer loop and takes the row's scale product where it stores the row.
using AttnPVFn = void (*)(const uint8_t* p, float ps, const float* ps_rows, int H, int T, int S,
                          const void* v, int kv_bits, const uint8_t* v_rowbits, const float* vs,
                          int Hkv, int s_cap, int D, float* out);

// ---- op 4p: float probabilities -> PV's uint8 codes ----------------------------------------
// p: float rows [R][ld] (R = H * T rows of probabilities); only p[r][0 .. S-1] is read.
// codes: uint8 [R][ldc], the first S of each row written. p_max in 1..255.
// Static (ps_static != nullptr): every row's scale is *ps_static (ps_out is not written).
// Dynamic (ps_static == nullptr): m = max over s of p[r][s] as `m = p > m ? p : m` from m = 0
//   (NaN and negatives count as 0, as quantize_rows' dynamic max ignores NaN), and
//   ps_out[r] = m == 0 ? 1.0f : m / (float)p_max (a true division).
// codes[r][s] = clamp(round_half_even(p[r][s] / scale), 0, p_max) with a true division; a NaN
//   quotient gives 0.
using QuantizeProbsFn = void (*)(const float* p, int R, int S, size_t ld, int p_max,
                                 const float* ps_static, uint8_t* codes, size_t ldc,
                                 float* ps_out);

// ---- op 5: float baselines (benchmark only; checked against ref to a tolerance) ---------
// y[t][n] = sum_k x[t][k] * w[n][k]; w canonical [N][K], packed by pack_f32 / pack_f16.
using GemmF32Fn = void (*)(const float* x, int T, int K, const void* w_packed, int N, float* y);
// FP16: x, w and y are IEEE binary16 bit patterns (uint16_t). Accumulation precision is the
// variant's own (fp16 on ARM fp16 paths, fp32 elsewhere).
using GemmF16Fn = void (*)(const uint16_t* x, int T, int K, const void* w_packed, int N,
                           uint16_t* y);

// ---- op 3 / 3g as tiles: what the threaded loop (tfqat_ops/parallel.h) calls ------------
// XNNPACK's split: a variant supplies a tile function that computes one rectangle of outputs
// and knows nothing of threads; the loop over tiles, and the threads, live in parallel.h and are
// written once for every ISA. One QLinearArgs describes a whole op 3 / 3g call.
struct QLinearArgs {
  int w_bits = 8;            // 4 (weights from w4_pack) or 8 (w8_pack)
  int group_size = 0;        // 0: op 3 with ws [N]; G (a multiple of 32): op 3g with ws_gn [ng][N]
  const int8_t* x = nullptr; // [T][K] codes
  const float* xs = nullptr; // [T]
  const uint8_t* bits = nullptr;  // [T] in {4, 8}, or nullptr = all 8
  int T = 0, K = 0, N = 0;
  const void* w_packed = nullptr;
  const float* ws = nullptr;     // op 3
  const float* ws_gn = nullptr;  // op 3g
  const float* bias = nullptr;   // [N] or nullptr
  float* y = nullptr;            // [T][N]
  // Caller-owned scratch of qlinear_work_size(T, K, w_bits, group_size) bytes, 64-byte aligned,
  // filled by qlinear_prepare for the tokens a tile reads (the variant's padded / offset copy of
  // x and its per-token corrections), so tiles never allocate.
  void* work = nullptr;
};
// Bytes of QLinearArgs::work a call with these sizes needs (0 when the variant needs none).
using QLinearWorkSizeFn = size_t (*)(int T, int K, int w_bits, int group_size);
// Fills the work rows of tokens [t0, t1) (token ranges may run on different threads).
using QLinearPrepareFn = void (*)(const QLinearArgs& a, int t0, int t1);
// y[t][n] for t in [t0, t1), n in [n0, n1), after qlinear_prepare covered [t0, t1). n0 is a
// multiple of the table's qlinear_nr, n1 one too or N. Each output is the op's formula for that
// (t, n) alone, so every tiling (and every thread count) gives the same bits.
using QLinearTileFn = void (*)(const QLinearArgs& a, int t0, int t1, int n0, int n1);

struct KernelTable {
  Isa isa;
  QuantizeRowsFn quantize_rows;
  PackedSizeFn w4_packed_size;
  PackFn w4_pack;
  QLinearFn qlinear_w4;
  PackedSizeFn w8_packed_size;
  PackFn w8_pack;
  QLinearFn qlinear_w8;
  QLinearGroupedFn qlinear_w4_grouped;  // weights from w4_pack
  QLinearGroupedFn qlinear_w8_grouped;  // weights from w8_pack
  AttnQKFn attn_qk;
  AttnPVFn attn_pv;
  QuantizeProbsFn quantize_probs;  // op 4p, for attn_pv's float-probability modes
  PackedSizeFn f32_packed_size;
  PackFn f32_pack;
  GemmF32Fn gemm_f32;
  PackedSizeFn f16_packed_size;
  PackFn f16_pack;
  GemmF16Fn gemm_f16;
  // Op 3 / 3g as tiles (the whole-op entries above are these run as one tile). qlinear_nr is the
  // channel granularity of the packed layouts: a tile's channel range starts at a multiple of it.
  int qlinear_nr;
  QLinearWorkSizeFn qlinear_work_size;
  QLinearPrepareFn qlinear_prepare;
  QLinearTileFn qlinear_tile;
  // True when w4_pack / w8_pack copy the canonical layout unchanged (ref): the delegate then
  // runs on the model file's weights in place instead of keeping a packed copy.
  bool packs_canonical;
};

// The table for one ISA, or nullptr when it is not compiled in or this CPU lacks the features
// (checked at run time: forcing a missing path must never SIGILL). Entries a variant does not
// specialise point at the reference functions.
const KernelTable* kernels_for(Isa isa);

// The best table for this CPU, unless TFQAT_ISA names one (ref, avx2, avxvnni, avx512vnni,
// neon, neondot, i8mm). An unknown or unsupported TFQAT_ISA sets *error (if given) to a
// one-line message and returns nullptr.
const KernelTable* select_kernels(const char** error = nullptr);

}  // namespace tfqat
