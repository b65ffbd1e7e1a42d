/* insn_count_plugin: a qemu TCG plugin that counts executed guest instructions exactly.
 *
 * Built against the plugin ABI of qemu 7.2 (QEMU_PLUGIN_VERSION 1: Debian bookworm's qemu-user),
 * declared here by hand (the handful of entry points used) because Debian ships no
 * qemu-plugin.h. Every translated block adds its instruction count to one 64-bit counter when it
 * runs (an inline add, so the count is exact and costs no helper call).
 *
 * Marker syscalls: a guest that calls syscall(TFQAT_MARK_NR, tag) (an unassigned aarch64 syscall
 * number; the kernel answers ENOSYS) gets one line "mark <tag> <count>" written to the output
 * file, where <count> is the counter at that point. The difference between two marks is the
 * exact number of guest instructions executed between them (a fixed, measurable overhead of the
 * marker call itself is subtracted by the caller). At exit: "total <count>".
 *
 * Options: out=<path> (default: qemu's plugin output, usually stderr).
 * The guest runs single-threaded (the microbenchmark is one thread), so one counter suffices.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 = 0 };
typedef void (*tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*udata_cb_t)(qemu_plugin_id_t id, void *userdata);
typedef void (*syscall_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num, uint64_t a1,
                             uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6,
                             uint64_t a7, uint64_t a8);

extern void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb_t cb);
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
extern void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op,
                                                     void *ptr, uint64_t imm);
extern void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, syscall_cb_t cb);
extern void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, udata_cb_t cb, void *userdata);
extern void qemu_plugin_outs(const char *string);

#define TFQAT_MARK_NR 0x7e57 /* no aarch64 syscall has this number */

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

static uint64_t insn_count;
static FILE *out;

static void emit(const char *line) {
  if (out) {
    fputs(line, out);
    fflush(out);
  } else {
    qemu_plugin_outs(line);
  }
}

static void on_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  (void)id;
  qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insn_count,
                                           qemu_plugin_tb_n_insns(tb));
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8) {
  (void)id; (void)vcpu; (void)a2; (void)a3; (void)a4; (void)a5; (void)a6; (void)a7; (void)a8;
  if (num != TFQAT_MARK_NR) return;
  char line[96];
  snprintf(line, sizeof line, "mark %" PRIu64 " %" PRIu64 "\n", a1, insn_count);
  emit(line);
}

static void on_exit_cb(qemu_plugin_id_t id, void *p) {
  (void)id; (void)p;
  char line[64];
  snprintf(line, sizeof line, "total %" PRIu64 "\n", insn_count);
  emit(line);
  if (out) fclose(out);
  out = NULL;
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const void *info,
                                                               int argc, char **argv) {
  (void)info;
  for (int i = 0; i < argc; ++i) {
    if (strncmp(argv[i], "out=", 4) == 0) {
      out = fopen(argv[i] + 4, "w");
      if (!out) {
        perror(argv[i] + 4);
        return -1;
      }
    }
  }
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_trans);
  qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
  qemu_plugin_register_atexit_cb(id, on_exit_cb, NULL);
  return 0;
}
