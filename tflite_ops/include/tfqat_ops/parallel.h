// Threads for the kernels, written once for every ISA: a thread pool and the tiling loops that
// split an op into tiles and hand them to the table's tile functions (kernels.h QLinearTileFn).
//
// XNNPACK's split: the variants compute one tile and know nothing of threads; the loop over
// tiles and the threads live here. Every output of a tile is computed by the op's formula for
// that output alone (the integer sums are exact, the float epilogue is per output), so any
// tiling and any number of threads give bit-identical results.
#pragma once

#include <cstddef>
#include <cstdint>

#include "tfqat_ops/kernels.h"

namespace tfqat {

// A task of ThreadPool::run: task in [0, tasks), worker in [0, threads) (0 = the calling
// thread), so a task can use per-worker scratch.
using TaskFn = void (*)(void* ctx, int task, int worker);

// The calling thread plus threads - 1 workers. Tasks are claimed one at a time from a shared
// counter (dynamic balance). Between runs the workers spin briefly (pause, then yield) and then
// sleep on a condition variable, so back-to-back ops of a decode step do not pay a wake-up
// each. run() never allocates.
class ThreadPool {
 public:
  // threads >= 1. Throws std::system_error when a worker thread cannot start.
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int threads() const;
  // Adds workers up to `threads` in all (never removes any); waits for a run in progress.
  // Throws std::system_error when a worker thread cannot start.
  void reserve(int threads);
  // Runs fn(ctx, task, worker) for every task in [0, tasks) on up to max_threads threads (the
  // caller included) and returns when all have finished. A run() entered while another thread's
  // run() is in progress runs its tasks on the calling thread alone (same results).
  void run(int tasks, int max_threads, TaskFn fn, void* ctx);

 struct Impl;  // parallel.cc

 private:
  Impl* impl_;
};

// Runs fn over [0, tasks) on `pool` with up to `threads` threads, or on the calling thread
// when pool is null, threads <= 1 or tasks <= 1.
void parallel_run(ThreadPool* pool, int threads, int tasks, TaskFn fn, void* ctx);

// ---- op 3 / 3g ----------------------------------------------------------------------------

// Tiles of tm tokens x nc channels (nc a multiple of the table's qlinear_nr, or >= N).
struct QLinearTiling {
  int tm, nc;
};

// The tiling for `threads` threads. One thread: one tile (each variant's own loop order: a
// panel of weights stays in L1 while every token passes over it). More: channel ranges (whole
// panels of the packed layout), and token blocks too when the channels alone give fewer than
// 4 tiles per thread (dynamic balance needs a few more tiles than threads); tiny ops stay one
// tile (the hand-off costs more than they do).
QLinearTiling qlinear_tiling(const KernelTable& kt, int T, int K, int N, int threads);

// Optional first step per block of tokens, before the table's qlinear_prepare of that block
// (the delegate quantizes the block's float rows into a.x here).
using TokenBlockFn = void (*)(void* ctx, int t0, int t1);

// One op 3 / 3g call: per token block pre (if any) then kt.qlinear_prepare, then every tile of
// `tiling`, each phase split over the pool's threads. a.work must hold kt.qlinear_work_size(...)
// bytes, 64-byte aligned.
void qlinear_run(const KernelTable& kt, const QLinearArgs& a, const QLinearTiling& tiling, ThreadPool* pool,
                 int threads, TokenBlockFn pre = nullptr, void* pre_ctx = nullptr);

}  // namespace tfqat
