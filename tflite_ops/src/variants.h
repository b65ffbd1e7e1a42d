// Internal: the reference functions every variant may fall back to, and the per-ISA tables that
// dispatch.cc selects from. Not installed; the public interface is tfqat_ops/kernels.h.
#pragma once

#include <cstddef>
#include <cstdint>

#include "tfqat_ops/kernels.h"

namespace tfqat {

namespace ref {
// Portable IEEE binary16 <-> binary32 (round-to-nearest-even, NaN kept quiet, subnormals exact).
uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);

void quantize_rows(const float* x, int T, int K, const uint8_t* bits, const float* static_scales,
                   int8_t* codes, float* scales_out);
size_t w4_packed_size(int N, int K);
void w4_pack(const void* canonical, int N, int K, void* packed);
void qlinear_w4(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K,
                const void* w_packed, const float* ws, const float* bias, int N, float* y);
size_t w8_packed_size(int N, int K);
void w8_pack(const void* canonical, int N, int K, void* packed);
void qlinear_w8(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K,
                const void* w_packed, const float* ws, const float* bias, int N, float* y);
void qlinear_w4_grouped(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K,
                        const void* w_packed, int group_size, const float* ws_gn,
                        const float* bias, int N, float* y);
void qlinear_w8_grouped(const int8_t* x, const float* xs, const uint8_t* bits, int T, int K,
                        const void* w_packed, int group_size, const float* ws_gn,
                        const float* bias, int N, float* y);
void attn_qk(const int8_t* q, const float* qs, int H, int T, int D, const void* k, int kv_bits,
             const float* ks, int Hkv, int S, int s_cap, float* scores);
void attn_pv(const uint8_t* p, float ps, const float* ps_rows, int H, int T, int S, const void* v,
             int kv_bits, const uint8_t* v_rowbits, const float* vs, int Hkv, int s_cap, int D,
             float* out);
void quantize_probs(const float* p, int R, int S, size_t ld, int p_max, const float* ps_static,
                    uint8_t* codes, size_t ldc, float* ps_out);
size_t f32_packed_size(int N, int K);
void f32_pack(const void* canonical, int N, int K, void* packed);
void gemm_f32(const float* x, int T, int K, const void* w_packed, int N, float* y);
size_t f16_packed_size(int N, int K);
void f16_pack(const void* canonical, int N, int K, void* packed);
void gemm_f16(const uint16_t* x, int T, int K, const void* w_packed, int N, uint16_t* y);

size_t qlinear_work_size(int T, int K, int w_bits, int group_size);
void qlinear_prepare(const QLinearArgs& a, int t0, int t1);
void qlinear_tile(const QLinearArgs& a, int t0, int t1, int n0, int n1);

// Sign-extends nibble `i` of a packed int4 row.
inline int int4_at(const uint8_t* row, int i) {
  const int b = row[i >> 1];
  const int nib = (i & 1) ? (b >> 4) : (b & 0x0F);
  return nib >= 8 ? nib - 16 : nib;
}

const KernelTable* table();
}  // namespace ref

// The whole-op entries (qlinear_w4, ..._grouped) of a table, built from its tile functions:
// one prepare over every token and one tile over the whole output, with the work buffer kept
// per thread (src/tiling.cc). The delegate does not use these: it runs the tiles through
// parallel.h with scratch sized at Prepare.
struct QLinearTiles {
  QLinearWorkSizeFn work_size;
  QLinearPrepareFn prepare;
  QLinearTileFn tile;
};
void qlinear_whole(const QLinearTiles& tiles, int w_bits, int group_size, const int8_t* x, const float* xs,
                   const uint8_t* bits, int T, int K, const void* w_packed, const float* ws,
                   const float* ws_gn, const float* bias, int N, float* y);

// Variant tables. Each is compiled only for its architecture and never called unless
// dispatch.cc has checked the CPU features first.
const KernelTable* x86_avx2_table();
const KernelTable* x86_avxvnni_table();
const KernelTable* x86_avx512vnni_table();
const KernelTable* arm_neon_table();
const KernelTable* arm_neondot_table();
const KernelTable* arm_i8mm_table();

}  // namespace tfqat
