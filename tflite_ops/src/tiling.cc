// The op 3 / 3g tiling loop shared by every ISA (tfqat_ops/parallel.h), and the whole-op table
// entries built on it (variants.h qlinear_whole). Compiled with the base flags of the
// architecture: it only calls into the variants through their tables.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "tfqat_ops/parallel.h"
#include "variants.h"

namespace tfqat {
namespace {

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Below this many multiply-adds an op stays on the calling thread: handing tiles to a worker
// costs about a microsecond (cache lines moving between cores), which is what ~100k MACs take.
constexpr int64_t kMinParallelMacs = int64_t{1} << 17;
// Tiles per thread to aim for: dynamic claiming evens out a late or slow thread to within about
// one tile. A decode GEMV has few channel ranges to give (whole panels), a prefill GEMM can also
// cut its tokens, so it aims finer.
constexpr int kGemvTilesPerThread = 4, kGemmTilesPerThread = 8;
// Up to this many tokens a call is split by channels alone (every token block re-reads the
// weights, which is what a GEMV is bound by).
constexpr int kGemvTokens = 4;
// Token blocks of a GEMM tile: at least this many tokens (the variants' token tiles are 2-6).
constexpr int kMinTileTokens = 8;
// Token blocks of the prepare phase: at least this many tokens each.
constexpr int kMinPrepareTokens = 16;

struct QLinearJob {
  const KernelTable* kt;
  const QLinearArgs* a;
  QLinearTiling tiling;
  int t_tiles, n_tiles, prep_block;
  TokenBlockFn pre;
  void* pre_ctx;
};

void prepare_task(void* ctx, int task, int) {
  const QLinearJob& j = *static_cast<const QLinearJob*>(ctx);
  const int t0 = task * j.prep_block, t1 = std::min(j.a->T, t0 + j.prep_block);
  if (j.pre) j.pre(j.pre_ctx, t0, t1);
  j.kt->qlinear_prepare(*j.a, t0, t1);
}

// Channel-major task order: tasks that run at the same time mostly share a weight panel.
void tile_task(void* ctx, int task, int) {
  const QLinearJob& j = *static_cast<const QLinearJob*>(ctx);
  const int ti = task % j.t_tiles, ni = task / j.t_tiles;
  const int t0 = ti * j.tiling.tm, n0 = ni * j.tiling.nc;
  j.kt->qlinear_tile(*j.a, t0, std::min(j.a->T, t0 + j.tiling.tm), n0, std::min(j.a->N, n0 + j.tiling.nc));
}

}  // namespace

QLinearTiling qlinear_tiling(const KernelTable& kt, int T, int K, int N, int threads) {
  const QLinearTiling whole{std::max(T, 1), std::max(N, 1)};
  if (threads <= 1 || int64_t{T} * K * N < kMinParallelMacs) return whole;
  const int nr = std::max(kt.qlinear_nr, 1);
  const int units = ceil_div(N, nr);  // channel ranges a tile can start at
  const bool gemv = T <= kGemvTokens;
  const int target = (gemv ? kGemvTilesPerThread : kGemmTilesPerThread) * threads;
  const int per_tile = std::max(1, units / target);  // channel units per tile
  const int n_tiles = ceil_div(units, per_tile);
  if (gemv || n_tiles >= target) return {whole.tm, per_tile * nr};
  const int t_tiles = std::max(1, std::min(ceil_div(target, n_tiles), T / kMinTileTokens));
  return {ceil_div(T, t_tiles), per_tile * nr};
}

void qlinear_run(const KernelTable& kt, const QLinearArgs& a, const QLinearTiling& tiling, ThreadPool* pool,
                 int threads, TokenBlockFn pre, void* pre_ctx) {
  if (a.T <= 0 || a.N <= 0) return;
  QLinearJob j{&kt, &a, tiling, ceil_div(a.T, tiling.tm), ceil_div(a.N, tiling.nc), a.T, pre, pre_ctx};
  int prep_tasks = 1;
  if (pool && threads > 1 && a.T >= 2 * kMinPrepareTokens) {
    prep_tasks = std::min(threads, a.T / kMinPrepareTokens);
    j.prep_block = ceil_div(a.T, prep_tasks);
    prep_tasks = ceil_div(a.T, j.prep_block);
  }
  parallel_run(pool, threads, prep_tasks, prepare_task, &j);
  parallel_run(pool, threads, j.t_tiles * j.n_tiles, tile_task, &j);
}

namespace {
// The whole-op entries' work buffer, per thread; 64-byte aligned inside.
thread_local std::vector<uint8_t> tl_work;
}  // namespace

void qlinear_whole(const QLinearTiles& tiles, int w_bits, int group_size, const int8_t* x, const float* xs,
                   const uint8_t* bits, int T, int K, const void* w_packed, const float* ws, const float* ws_gn,
                   const float* bias, int N, float* y) {
  if (T <= 0 || N <= 0) return;
  QLinearArgs a;
  a.w_bits = w_bits;
  a.group_size = group_size;
  a.x = x;
  a.xs = xs;
  a.bits = bits;
  a.T = T;
  a.K = K;
  a.N = N;
  a.w_packed = w_packed;
  a.ws = ws;
  a.ws_gn = ws_gn;
  a.bias = bias;
  a.y = y;
  const size_t bytes = tiles.work_size(T, K, w_bits, group_size);
  if (bytes) {
    if (tl_work.size() < bytes + 64) tl_work.resize(bytes + 64);
    const uintptr_t p = reinterpret_cast<uintptr_t>(tl_work.data());
    a.work = tl_work.data() + ((64 - p % 64) % 64);
  }
  tiles.prepare(a, 0, T);
  tiles.tile(a, 0, T, 0, N);
}

}  // namespace tfqat
