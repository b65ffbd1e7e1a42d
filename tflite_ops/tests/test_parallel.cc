// Threads tester: the thread pool, and op 3 / 3g through the shared tiling loop (parallel.h).
//
// For every variant, random odd shapes: qlinear_run over forced tilings (single tokens, odd
// token blocks, one channel unit, the whole op) and over the tiling the delegate picks for 1-8
// threads, on pools of 1-4 threads, must give the bytes of the whole-op entry (which
// test_qlinear checks against the int64 oracle). A single tile must write exactly its
// rectangle, and qlinear_prepare / qlinear_tile must stay inside qlinear_work_size.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "harness.h"
#include "tfqat_ops/parallel.h"

using namespace tfqat_test;
using tfqat::KernelTable;
using tfqat::QLinearArgs;
using tfqat::QLinearTiling;
using tfqat::ThreadPool;

namespace {

// ---- the pool ------------------------------------------------------------------------------

struct Count {
  std::vector<std::atomic<int>>* hits;
  int threads;
  std::atomic<int>* bad_worker;
};

void count_task(void* ctx, int task, int worker) {
  Count& c = *static_cast<Count*>(ctx);
  (*c.hits)[task].fetch_add(1);
  if (worker < 0 || worker >= c.threads) c.bad_worker->fetch_add(1);
}

void pool_checks() {
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    CHECK(pool.threads() == threads, "pool of %d reports %d", threads, pool.threads());
    for (int tasks : {0, 1, 2, 7, 64, 1000}) {
      for (int limit : {1, 2, threads}) {
        std::vector<std::atomic<int>> hits(tasks);
        std::atomic<int> bad{0};
        Count c{&hits, threads, &bad};
        pool.run(tasks, limit, count_task, &c);
        int wrong = 0;
        for (auto& h : hits) wrong += h.load() != 1;
        CHECK(wrong == 0 && bad.load() == 0, "pool %d, %d tasks, limit %d: %d tasks not run once, %d bad workers",
              threads, tasks, limit, wrong, bad.load());
      }
    }
    // Runs entered from two threads at once: one gets the workers, the other runs inline.
    std::vector<std::atomic<int>> h1(500), h2(500);
    std::atomic<int> bad{0};
    Count c1{&h1, threads, &bad}, c2{&h2, threads, &bad};
    std::thread other([&] {
      for (int i = 0; i < 20; ++i) pool.run(500, threads, count_task, &c2);
    });
    for (int i = 0; i < 20; ++i) pool.run(500, threads, count_task, &c1);
    other.join();
    int wrong = 0;
    for (auto& h : h1) wrong += h.load() != 20;
    for (auto& h : h2) wrong += h.load() != 20;
    CHECK(wrong == 0 && bad.load() == 0, "pool %d: concurrent runs lost or repeated %d tasks", threads, wrong);
  }
  ThreadPool pool(1);
  pool.reserve(4);
  CHECK(pool.threads() == 4, "reserve(4) gave %d threads", pool.threads());
  std::vector<std::atomic<int>> hits(100);
  std::atomic<int> bad{0};
  Count c{&hits, 4, &bad};
  pool.run(100, 4, count_task, &c);
  int wrong = 0;
  for (auto& h : hits) wrong += h.load() != 1;
  CHECK(wrong == 0 && bad.load() == 0, "grown pool: %d tasks not run once", wrong);
}

// ---- op 3 / 3g through the tiling loop -----------------------------------------------------

struct Case {
  int T, K, N, w_bits, G;
  std::vector<int8_t> x;
  std::vector<uint8_t> bits, canon;
  std::vector<float> xs, ws, ws_gn, bias;
  bool use_bias, bits_null;
};

Case make(Rng& r, int T, int K, int N, int w_bits, int G) {
  Case c{T, K, N, w_bits, G, {}, {}, {}, {}, {}, {}, {}, r.uniform(0, 1) == 1, r.uniform(0, 4) == 0};
  for (int t = 0; t < T; ++t) {
    const uint8_t b = r.next() & 1 ? 8 : 4;
    c.bits.push_back(b);
    c.xs.push_back(0.001f + r.unit() * 0.1f);
    for (int k = 0; k < K; ++k) c.x.push_back(static_cast<int8_t>(b == 8 ? r.uniform(-128, 127) : r.uniform(-8, 7)));
  }
  if (c.bits_null) {
    for (int t = 0; t < T; ++t) {
      for (int k = 0; k < K; ++k) c.x[static_cast<size_t>(t) * K + k] = static_cast<int8_t>(r.uniform(-128, 127));
    }
  }
  const int stride = w_bits == 4 ? (K + 1) / 2 : K;
  c.canon.assign(static_cast<size_t>(N) * stride, 0);
  for (int n = 0; n < N; ++n) {
    c.ws.push_back(0.001f + r.unit() * 0.05f);
    c.bias.push_back(r.sym());
    for (int k = 0; k < K; ++k) {
      if (w_bits == 8) {
        c.canon[static_cast<size_t>(n) * K + k] = static_cast<uint8_t>(r.uniform(-128, 127));
      } else {
        const uint8_t nib = static_cast<uint8_t>(r.uniform(-8, 7)) & 0x0F;
        c.canon[static_cast<size_t>(n) * stride + k / 2] |= static_cast<uint8_t>(k & 1 ? nib << 4 : nib);
      }
    }
  }
  const int ng = G ? (K + G - 1) / G : 0;
  for (int i = 0; i < ng * N; ++i) c.ws_gn.push_back(r.sym() * 0.05f);
  return c;
}

// A 64-byte aligned buffer with guard bytes after `bytes`.
struct Aligned {
  explicit Aligned(size_t bytes) : size(bytes), raw(bytes + 128, 0x5A) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(raw.data());
    data = raw.data() + (64 - p % 64) % 64;
  }
  bool guard_intact() const {
    for (size_t i = 0; i < 64; ++i) {
      if (data[size + i] != 0x5A) return false;
    }
    return true;
  }
  size_t size;
  std::vector<uint8_t> raw;
  uint8_t* data;
};

QLinearArgs args_for(const Case& c, const void* packed, float* y, void* work) {
  QLinearArgs a;
  a.w_bits = c.w_bits;
  a.group_size = c.G;
  a.x = c.x.data();
  a.xs = c.xs.data();
  a.bits = c.bits_null ? nullptr : c.bits.data();
  a.T = c.T;
  a.K = c.K;
  a.N = c.N;
  a.w_packed = packed;
  a.ws = c.G ? nullptr : c.ws.data();
  a.ws_gn = c.G ? c.ws_gn.data() : nullptr;
  a.bias = c.use_bias ? c.bias.data() : nullptr;
  a.y = y;
  a.work = work;
  return a;
}

void check_case(const KernelTable* kt, const Case& c, ThreadPool* const* pools, int id) {
  const char* isa = tfqat::isa_name(kt->isa);
  const size_t psize = c.w_bits == 4 ? kt->w4_packed_size(c.N, c.K) : kt->w8_packed_size(c.N, c.K);
  std::vector<uint8_t> packed(psize);
  (c.w_bits == 4 ? kt->w4_pack : kt->w8_pack)(c.canon.data(), c.N, c.K, packed.data());
  const size_t ny = static_cast<size_t>(c.T) * c.N;
  std::vector<float> want(ny, -7.0f);
  if (c.G) {
    (c.w_bits == 4 ? kt->qlinear_w4_grouped : kt->qlinear_w8_grouped)(
        c.x.data(), c.xs.data(), c.bits_null ? nullptr : c.bits.data(), c.T, c.K, packed.data(), c.G,
        c.ws_gn.data(), c.use_bias ? c.bias.data() : nullptr, c.N, want.data());
  } else {
    (c.w_bits == 4 ? kt->qlinear_w4 : kt->qlinear_w8)(c.x.data(), c.xs.data(), c.bits_null ? nullptr : c.bits.data(),
                                                      c.T, c.K, packed.data(), c.ws.data(),
                                                      c.use_bias ? c.bias.data() : nullptr, c.N, want.data());
  }
  Aligned work(kt->qlinear_work_size(c.T, c.K, c.w_bits, c.G));
  const int nr = kt->qlinear_nr;
  CHECK(nr >= 1, "%s: qlinear_nr %d", isa, nr);
  std::vector<QLinearTiling> tilings = {{c.T, c.N}, {1, nr}, {3, 2 * nr}, {c.T, nr}, {7, c.N}, {c.T > 2 ? c.T - 2 : 1, 3 * nr}};
  for (int threads = 1; threads <= 8; ++threads) tilings.push_back(tfqat::qlinear_tiling(*kt, c.T, c.K, c.N, threads));
  for (size_t i = 0; i < tilings.size(); ++i) {
    const QLinearTiling& tl = tilings[i];
    CHECK(tl.tm >= 1 && tl.nc >= 1 && (tl.nc % nr == 0 || tl.nc >= c.N), "%s: bad tiling %d x %d", isa, tl.tm, tl.nc);
    ThreadPool* pool = pools[i % 4];
    std::vector<float> y(ny, -7.0f);
    const QLinearArgs a = args_for(c, packed.data(), y.data(), work.data);
    tfqat::qlinear_run(*kt, a, tl, pool, pool->threads());
    CHECK(work.guard_intact(), "%s case %d: wrote past qlinear_work_size", isa, id);
    if (std::memcmp(y.data(), want.data(), ny * sizeof(float)) != 0) {
      size_t j = 0;
      while (std::memcmp(&y[j], &want[j], sizeof(float)) == 0) ++j;
      CHECK(false, "%s case %d (T=%d K=%d N=%d w%d G=%d) tiling %d x %d on %d threads: y[%zu]=%.9g want %.9g", isa,
            id, c.T, c.K, c.N, c.w_bits, c.G, tl.tm, tl.nc, pool->threads(), j, y[j], want[j]);
    }
  }
  // One tile writes exactly its rectangle.
  Rng r(static_cast<uint64_t>(id) + 17);
  const int units = (c.N + nr - 1) / nr;
  const int t0 = r.uniform(0, c.T - 1), t1 = r.uniform(t0 + 1, c.T);
  const int u0 = r.uniform(0, units - 1), u1 = r.uniform(u0 + 1, units);
  const int n0 = u0 * nr, n1 = std::min(c.N, u1 * nr);
  std::vector<float> y(ny, -7.0f);
  const QLinearArgs a = args_for(c, packed.data(), y.data(), work.data);
  kt->qlinear_prepare(a, t0, t1);
  kt->qlinear_tile(a, t0, t1, n0, n1);
  int outside = 0, inside = 0;
  for (int t = 0; t < c.T; ++t) {
    for (int n = 0; n < c.N; ++n) {
      const size_t i = static_cast<size_t>(t) * c.N + n;
      if (t >= t0 && t < t1 && n >= n0 && n < n1) {
        inside += std::memcmp(&y[i], &want[i], sizeof(float)) != 0;
      } else {
        outside += y[i] != -7.0f;
      }
    }
  }
  CHECK(inside == 0 && outside == 0, "%s case %d: tile [%d,%d) x [%d,%d): %d wrong inside, %d written outside", isa,
        id, t0, t1, n0, n1, inside, outside);
}

}  // namespace

int main() {
  const auto tables = variants("parallel");
  pool_checks();
  std::unique_ptr<ThreadPool> p1(new ThreadPool(1)), p2(new ThreadPool(2)), p3(new ThreadPool(3)),
      p4(new ThreadPool(4));
  ThreadPool* pools[4] = {p1.get(), p2.get(), p3.get(), p4.get()};
  Rng r(20250101);
  int cases = 0;
  const int ns[] = {1, 3, 7, 8, 15, 17, 33, 63, 64, 65, 127, 129, 200};
  for (int i = 0; i < 160; ++i) {
    const int w_bits = i % 2 ? 4 : 8;
    const int G = i % 4 >= 2 ? 32 * r.uniform(1, 4) : 0;
    const int T = i % 5 == 0 ? 1 : i % 5 == 1 ? r.uniform(2, 9) : r.uniform(10, 70);
    const int K = r.uniform(1, i % 3 == 0 ? 600 : 150);
    const int N = i % 2 ? ns[r.uniform(0, 12)] : r.uniform(1, 260);
    const Case c = make(r, T, K, N, w_bits, G);
    for (const KernelTable* kt : tables) check_case(kt, c, pools, i);
    ++cases;
  }
  std::printf("[parallel] %d cases per variant, tilings on 1-4 threads\n", cases);
  return finish("parallel");
}
