// tfqat_insn_probe: calls each kernel of the selected table exactly once between two marker
// syscalls, so that a qemu instruction-count plugin (insn_count_plugin.c) can report the exact
// number of guest instructions one call executes. Same shapes and data recipe as tfqat_bench
// (LLaMA-58M layer shapes); the data only has to be deterministic.
//
//   tfqat_insn_probe [--T N] [--filter SUBSTR]
//
// stdout: one line "case <tag> <name> <isa>" per kernel call, in the order of the marks. Each
// case is called once untimed (warm: first-touch page faults, lazy init) and then once between
// marks 2*tag and 2*tag+1. Tag 0 is an empty pair: its delta is the marker overhead.
// On a real CPU (no plugin) the marker syscalls return ENOSYS and change nothing.
#include <unistd.h>
#include <sys/syscall.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "tfqat_ops/kernels.h"
#include "../../tflite_ops/bench/bench_data.h"

namespace {
constexpr long kMarkNr = 0x7e57;  // see insn_count_plugin.c
__attribute__((noinline)) void mark(long tag) { syscall(kMarkNr, tag); }

int tag = 0;
template <typename F>
void run_case(const std::string& name, const tfqat::KernelTable* kt, F&& fn) {
  ++tag;
  fn();  // warm
  std::printf("case %d %s %s\n", tag, name.c_str(), tfqat::isa_name(kt->isa));
  std::fflush(stdout);
  mark(2 * tag);
  fn();
  mark(2 * tag + 1);
}
}  // namespace

int main(int argc, char** argv) {
  int T = 128;
  std::string filter;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--T" && i + 1 < argc) T = std::atoi(argv[++i]);
    else if (a == "--filter" && i + 1 < argc) filter = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--T N] [--filter SUBSTR]\n", argv[0]);
      return 2;
    }
  }
  const char* err = nullptr;
  const tfqat::KernelTable* kt = tfqat::select_kernels(&err);
  if (!kt) {
    std::fprintf(stderr, "%s\n", err ? err : "no kernel table");
    return 2;
  }
  std::printf("isa %s\n", tfqat::isa_name(kt->isa));
  std::printf("case 0 marker-overhead %s\n", tfqat::isa_name(kt->isa));
  mark(0);
  mark(1);
  struct Shape { int K, N; };
  for (const Shape sh : {Shape{512, 512}, Shape{512, 1024}, Shape{1024, 512}}) {
    const int K = sh.K, N = sh.N;
    const std::string prefix = "llama58m/" + std::to_string(K) + "x" + std::to_string(N) + "/T" + std::to_string(T) + "/";
    auto wanted = [&](const char* v) { return filter.empty() || (prefix + v).find(filter) != std::string::npos; };
    tfqat_bench::GemmData d(T, K, N);
    auto &xf = d.xf, &wf = d.wf, &xs = d.xs, &ws = d.ws, &bias = d.bias;
    auto &x8 = d.x8, &x4 = d.x4, &w8 = d.w8;
    auto& w4 = d.w4;
    std::vector<float> y(static_cast<size_t>(T) * N);

    if (wanted("fp32")) {
      std::vector<uint8_t> p(kt->f32_packed_size(N, K));
      kt->f32_pack(wf.data(), N, K, p.data());
      run_case(prefix + "fp32", kt, [&] { kt->gemm_f32(xf.data(), T, K, p.data(), N, y.data()); });
    }
    if (wanted("fp16")) {
      std::vector<uint16_t> xh(xf.size()), wh(wf.size()), yh(y.size());
      for (size_t i = 0; i < xf.size(); ++i) xh[i] = tfqat_bench::to_half(xf[i]);
      for (size_t i = 0; i < wf.size(); ++i) wh[i] = tfqat_bench::to_half(wf[i]);
      std::vector<uint8_t> p(kt->f16_packed_size(N, K));
      kt->f16_pack(wh.data(), N, K, p.data());
      run_case(prefix + "fp16", kt, [&] { kt->gemm_f16(xh.data(), T, K, p.data(), N, yh.data()); });
    }
    if (wanted("w8a8")) {
      std::vector<uint8_t> p(kt->w8_packed_size(N, K));
      kt->w8_pack(w8.data(), N, K, p.data());
      std::vector<uint8_t> bits(T, 8);
      run_case(prefix + "w8a8", kt, [&] {
        kt->qlinear_w8(x8.data(), xs.data(), bits.data(), T, K, p.data(), ws.data(), bias.data(), N, y.data());
      });
    }
    std::vector<uint8_t> p4(kt->w4_packed_size(N, K));
    kt->w4_pack(w4.data(), N, K, p4.data());
    struct Mix { const char* name; double rho; };
    for (const Mix mx : {Mix{"w4a8", 1.0}, Mix{"w4a48_r75", 0.75}, Mix{"w4a48_r50", 0.5}, Mix{"w4a48_r25", 0.25},
                         Mix{"w4a4", 0.0}}) {
      if (!wanted(mx.name)) continue;
      if (T == 1 && mx.rho > 0.0 && mx.rho < 1.0) continue;
      std::vector<uint8_t> bits(T);
      std::vector<int8_t> xm(x8.size());
      for (int t = 0; t < T; ++t) {  // the bench's recipe: scattered 8-bit tokens, exact count
        bits[t] = (t * 7919 % T) < static_cast<int>(mx.rho * T + 0.5) ? 8 : 4;
        std::memcpy(&xm[static_cast<size_t>(t) * K], (bits[t] == 8 ? x8 : x4).data() + static_cast<size_t>(t) * K, K);
      }
      run_case(prefix + mx.name, kt, [&] {
        kt->qlinear_w4(xm.data(), xs.data(), bits.data(), T, K, p4.data(), ws.data(), bias.data(), N, y.data());
      });
    }
  }
  return 0;
}
