// The thread pool (tfqat_ops/parallel.h).
//
// One 64-bit atomic holds (generation << 32) | next task. run() publishes a job by storing its
// fields and then a new generation with task 0; every thread (the caller too) claims tasks by a
// compare-exchange that only succeeds while the generation is still its own, so a worker that
// wakes late can never run a task of a later job, and the caller only waits for the tasks that
// were claimed, not for sleeping workers to wake up. All atomics are sequentially consistent:
// a successful claim proves the job fields read before it belong to that job (the caller writes
// the next job's fields only after every task of this one was claimed and finished).
#include "tfqat_ops/parallel.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace tfqat {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

// How long an idle worker keeps polling before it sleeps. A decode step runs hundreds of small
// ops back to back with other (XNNPACK) ops between them, a few microseconds each: a sleeping
// worker costs a futex wake-up per op, which is as long as the op. After kPauseSpin of pause
// loops the worker yields between polls, so a runnable thread (XNNPACK's own pool, another
// process) gets the core.
constexpr auto kPauseSpin = std::chrono::microseconds(20);
constexpr auto kYieldSpin = std::chrono::microseconds(300);

inline uint32_t generation(uint64_t s) { return static_cast<uint32_t>(s >> 32); }

}  // namespace

struct ThreadPool::Impl {
  std::vector<std::thread> workers;
  alignas(64) std::atomic<uint64_t> state{0};  // claimed by every thread: a cache line of its own
  std::atomic<TaskFn> fn{nullptr};
  std::atomic<void*> ctx{nullptr};
  std::atomic<int> tasks{0};
  std::atomic<int> limit{1};
  alignas(64) std::atomic<int> done{0};
  alignas(64) std::atomic<int> sleepers{0};
  std::atomic<bool> stop{false};
  std::atomic<bool> busy{false};
  std::mutex mutex;
  std::condition_variable wake;

  // Claims and runs tasks of generation `gen` until none is left or the job moved on.
  void work(uint32_t gen, int worker) {
    for (;;) {
      uint64_t s = state.load();
      if (generation(s) != gen) return;
      const TaskFn f = fn.load();
      void* c = ctx.load();
      const int n = tasks.load();
      const int idx = static_cast<int>(static_cast<uint32_t>(s));
      if (idx >= n) return;
      if (!state.compare_exchange_weak(s, s + 1)) continue;
      f(c, idx, worker);
      done.fetch_add(1);
    }
  }

  // The state once its generation differs from `seen` (or stop is set).
  uint64_t wait_for_job(uint32_t seen) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 1;; ++i) {
      const uint64_t s = state.load();
      if (generation(s) != seen || stop.load()) return s;
      if (i % 256 != 0) {
        cpu_relax();
        continue;
      }
      const auto idle = std::chrono::steady_clock::now() - start;
      if (idle > kYieldSpin) break;
      if (idle > kPauseSpin) std::this_thread::yield();
    }
    std::unique_lock<std::mutex> lock(mutex);
    sleepers.fetch_add(1);
    uint64_t s = state.load();
    while (generation(s) == seen && !stop.load()) {
      wake.wait(lock);
      s = state.load();
    }
    sleepers.fetch_sub(1);
    return s;
  }

  void worker_main(int index, uint32_t seen) {
    for (;;) {
      const uint64_t s = wait_for_job(seen);
      if (stop.load()) return;
      seen = generation(s);
      if (index < limit.load()) work(seen, index);
    }
  }

  void lock_exclusive() {
    bool expected = false;
    while (!busy.compare_exchange_weak(expected, true)) {
      expected = false;
      std::this_thread::yield();
    }
  }

  void start_workers(int threads) {
    const uint32_t gen = generation(state.load());
    while (static_cast<int>(workers.size()) + 1 < threads) {
      const int index = static_cast<int>(workers.size()) + 1;
      workers.emplace_back([this, index, gen] { worker_main(index, gen); });
    }
  }
};

namespace {
// Stops and joins the workers, then frees the state.
void shut_down(ThreadPool::Impl* p) {
  {
    std::lock_guard<std::mutex> lock(p->mutex);
    p->stop.store(true);
  }
  p->wake.notify_all();
  for (std::thread& t : p->workers) t.join();
  delete p;
}
}  // namespace

ThreadPool::ThreadPool(int threads) : impl_(new Impl) {
  try {
    impl_->start_workers(threads);
  } catch (...) {
    shut_down(impl_);
    throw;
  }
}

ThreadPool::~ThreadPool() { shut_down(impl_); }

int ThreadPool::threads() const { return static_cast<int>(impl_->workers.size()) + 1; }

void ThreadPool::reserve(int threads) {
  if (threads <= this->threads()) return;
  impl_->lock_exclusive();
  try {
    impl_->start_workers(threads);
  } catch (...) {
    impl_->busy.store(false);
    throw;
  }
  impl_->busy.store(false);
}

void ThreadPool::run(int tasks, int max_threads, TaskFn fn, void* ctx) {
  Impl& p = *impl_;
  bool expected = false;
  if (tasks <= 1 || max_threads <= 1 || p.workers.empty() || !p.busy.compare_exchange_strong(expected, true)) {
    for (int i = 0; i < tasks; ++i) fn(ctx, i, 0);
    return;
  }
  p.done.store(0);
  p.fn.store(fn);
  p.ctx.store(ctx);
  p.tasks.store(tasks);
  p.limit.store(max_threads);
  const uint32_t gen = generation(p.state.load()) + 1;
  p.state.store(static_cast<uint64_t>(gen) << 32);
  if (p.sleepers.load() > 0) {
    { std::lock_guard<std::mutex> lock(p.mutex); }
    p.wake.notify_all();
  }
  p.work(gen, 0);
  for (int i = 1; p.done.load() < tasks; ++i) {
    cpu_relax();
    if (i % 4096 == 0) std::this_thread::yield();
  }
  p.busy.store(false);
}

void parallel_run(ThreadPool* pool, int threads, int tasks, TaskFn fn, void* ctx) {
  if (!pool || threads <= 1 || tasks <= 1) {
    for (int i = 0; i < tasks; ++i) fn(ctx, i, 0);
    return;
  }
  pool->run(tasks, threads, fn, ctx);
}

}  // namespace tfqat
