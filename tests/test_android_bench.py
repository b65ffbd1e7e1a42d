"""android_bench: transports' error paths (a scripted fake adb), the report layout, an emulated run
that counts aarch64 instructions under qemu, the host path end to end on a real exported model
(our benchmark_model runner on the LiteRT Python runtime, our delegate), and the adb path end to
end: Debian's real adb client against a real adbd (Debian trixie's, with its own loader and
libraries) that runs in a private network namespace with a chroot as the device's file system.
No phone, no traffic off loopback.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import shlex
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_export import exported, ops_lib  # noqa: F401 (fixtures: the micro export, the delegate)

from android_bench import BenchError, report
from android_bench.transports import (Adb, aggregate_bench, big_cores, cpu_mask, parse_benchmark_model,
                                      parse_counts, parse_cpuinfo, parse_max_freqs)

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TESTENV = REPO / "android_bench" / "testenv"


def run_cli(args, env=None, timeout=600):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([PY, "-m", "android_bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=e, stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------------------------------------
# parsing and the report layout

CPUINFO_ARM = textwrap.dedent("""\
    processor\t: 0
    BogoMIPS\t: 38.40
    Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
    CPU implementer\t: 0x41
    CPU part\t: 0xd05

    processor\t: 1
    Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
    """)


def test_device_fact_parsers():
    ci = parse_cpuinfo(CPUINFO_ARM)
    assert ci["processors"] == 2
    assert ci["kernel_features"] == ["dotprod", "fp16", "fp16 arith", "neon"]
    assert "i8mm" not in ci["features"]
    freqs = parse_max_freqs("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq 1800000\n"
                            "/sys/devices/system/cpu/cpu6/cpufreq/cpuinfo_max_freq 2400000\n"
                            "/sys/devices/system/cpu/cpu7/cpufreq/cpuinfo_max_freq 3000000\n"
                            "/sys/devices/system/cpu/cpu4/cpufreq/cpuinfo_max_freq 2400000\n")
    assert big_cores(freqs, 8) == [7]
    assert big_cores({4: 2400000, 5: 2400000, 0: 1800000}, 6) == [4, 5]
    assert big_cores({}, 4) == [0, 1, 2, 3]  # no cpufreq: every core
    assert cpu_mask([4, 5, 6, 7]) == "f0" and cpu_mask([7]) == "80"
    bm = parse_benchmark_model("INFO: Inference timings in us: Init: 51234, First inference: 8123, "
                               "Warmup (avg): 7001.5, Inference (avg): 6890.25\n")
    assert bm == {"init_us": 51234.0, "first_us": 8123.0, "warmup_avg_us": 7001.5, "avg_us": 6890.25}


def test_parse_counts_subtracts_marker_overhead():
    out = "isa i8mm\ncase 0 marker-overhead i8mm\ncase 1 llama58m/512x512/T128/fp16 i8mm\n"
    marks = "mark 0 1000\nmark 1 1026\nmark 2 5000\nmark 3 105026\ntotal 200000\n"
    c = parse_counts(out, marks, "max")
    assert c["marker_overhead_insns"] == 26
    assert c["cases"] == [{"name": "llama58m/512x512/T128/fp16", "isa": "i8mm", "insns": 100000, "model": "llama58m",
                           "K": 512, "N": 512, "T": 128, "variant": "fp16"}]


def _agg_result(us: dict) -> dict:
    """A result with T=128 medians: us[(K, N, variant)]."""
    runs = [{"results": [{"name": f"llama58m/{K}x{N}/T128/{v}", "isa": "neondot", "T": 128, "K": K, "N": N,
                          "median_us": m, "p10_us": m * 0.9, "p90_us": m * 1.1} for (K, N, v), m in us.items()]}]
    return {"schema": "tfqat.android_bench.result/1", "status": "ok", "transport": "adb",
            "device": {"transport": "adb", "model": "Pixel Test", "abi": "arm64-v8a", "big_cores": [6, 7]},
            "build": {"toolchain": "android-ndk", "compiler": "clang 17", "artifacts": {}},
            "microbench": {"runs": runs, "aggregate": aggregate_bench(runs)}, "benchmark_model": [],
            "insn_counts": [], "cleanup": "removed /data/local/tmp/tfqat"}


def test_report_table_iv_layout_and_derivation(tmp_path):
    variants = ["fp16", "w8a8", "w4a8", "w4a48_r75", "w4a48_r50", "w4a48_r25", "w4a4"]
    base = {(512, 512): 1000.0, (512, 1024): 2000.0, (1024, 512): 2100.0}
    factor = {"fp16": 1.0, "w8a8": 0.5, "w4a8": 0.4, "w4a48_r75": 0.35, "w4a48_r50": 0.3, "w4a48_r25": 0.25,
              "w4a4": 0.2}
    us = {(K, N, v): t * factor[v] for (K, N), t in base.items() for v in variants}
    res = _agg_result(us)
    rep = report.write_report(res, tmp_path)
    t = rep["tables"][0]
    assert t["unit"] == "ms/token"
    assert [r["config"] for r in t["rows"]] == ["FP16", "W8A8", "W4A8", "W4A4:8 (1:3)", "W4A4:8 (1:1)",
                                                 "W4A4:8 (3:1)", "W4A4"]
    # 16 layers x (4 x 512x512 + 2 x 512x1024 + 1 x 1024x512) / 128 tokens, us -> ms
    fp16 = 16 * (4 * 1000 + 2 * 2000 + 2100) / 128 / 1000
    assert t["rows"][0]["value"] == pytest.approx(fp16)
    for r in t["rows"]:
        assert r["value"] == pytest.approx(fp16 * factor[r["variant"]])
        assert r["speedup_vs_fp16"] == pytest.approx(1 / factor[r["variant"]])
    md = (tmp_path / "report.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("| W4A4:8 (1:3) |")]
    assert lines[0].startswith(f"| W4A4:8 (1:3) | {fp16 * 0.35:.3f} | 2.86x |")
    assert "ms/token = 16 layers x sum" in md and "1:3 = 25% 4-bit" in md
    assert "- model: Pixel Test" in md and "- toolchain: android-ndk" in md
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text())["tables"][0]["rows"][6]["variant"] == "w4a4"
    # an incomplete run: missing shapes are n/a, never a wrong number
    del us[(1024, 512, "w8a8")]
    rep2 = report.write_report(_agg_result(us), tmp_path / "partial")
    assert rep2["tables"][0]["rows"][1]["value"] is None
    assert "| W8A8 | n/a | n/a |" in (tmp_path / "partial" / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# transports' error paths, with a scripted adb

FAKE_ADB = r'''#!PYTHON
"""A scripted stand-in for adb: FAKE_ADB_MODE = ok | nodevice | unauthorized | hang | disconnect."""
import json, os, re, shutil, sys, time
mode = os.environ.get("FAKE_ADB_MODE", "ok")
root = os.environ["FAKE_ADB_ROOT"]
log = open(os.path.join(root, "calls.log"), "a")
a = sys.argv[1:]
log.write(json.dumps(a) + "\n"); log.flush()
if a[:1] == ["-s"]:
    a = a[2:]
def dev(p):  # device path -> host path under root
    return os.path.join(root, "dev", p.lstrip("/"))
def err(msg, rc=1):
    sys.stderr.write(msg + "\n"); os._exit(rc)
if a[0] == "devices":
    print("List of devices attached")
    if mode != "nodevice":
        print("FAKE123\tdevice")
    sys.exit(0)
if mode == "nodevice":
    err("error: device 'FAKE123' not found")
if mode == "unauthorized":
    err("error: device unauthorized.\nThis adb server's $ADB_VENDOR_KEYS is not set\n"
        "Try 'adb kill-server' if that seems wrong.\nOtherwise check for a confirmation dialog on your device.")
if a[0] == "get-state":
    print("device"); sys.exit(0)
gone = os.path.exists(os.path.join(root, "gone"))
if gone:
    err("error: device 'FAKE123' not found")
if a[0] == "push":
    os.makedirs(os.path.dirname(dev(a[2])), exist_ok=True); shutil.copy(a[1], dev(a[2]))
    print(f"{a[1]}: 1 file pushed"); sys.exit(0)
if a[0] == "pull":
    if not os.path.exists(dev(a[1])):
        err(f"adb: error: failed to stat remote object '{a[1]}': No such file or directory")
    shutil.copy(dev(a[1]), a[2]); sys.exit(0)
if a[0] == "shell":
    m = re.match(r"\( (.*) \); echo __TFQAT_RC=\$\?$", a[1], re.S)
    assert m, a[1]
    cmd = m.group(1)
    _exit = sys.exit
    def _done(rc=0):
        if isinstance(rc, int):
            sys.stdout.write(f"__TFQAT_RC={rc}\n")
        _exit(rc)
    sys.exit = _done
    if cmd.startswith("getprop"):
        print({"ro.product.cpu.abi": "arm64-v8a", "ro.product.model": "Fake Phone"}.get(cmd.split()[1], "")); sys.exit(0)
    if cmd.startswith("cat /proc/cpuinfo"):
        print(os.environ["FAKE_CPUINFO"]); sys.exit(0)
    if "cpuinfo_max_freq" in cmd:
        for i in range(8):
            print(f"/sys/devices/system/cpu/cpu{i}/cpufreq/cpuinfo_max_freq {1800000 if i < 6 else 2850000}")
        sys.exit(0)
    if cmd.startswith("command -v"):
        print("/system/bin/taskset\n/system/bin/timeout"); sys.exit(0)
    if cmd.startswith("rm -rf"):
        shutil.rmtree(dev(cmd.split()[-1].strip("'")), ignore_errors=True); sys.exit(0)
    if cmd.startswith(("mkdir", "chmod")):
        sys.exit(0)
    if "tfqat_bench" in cmd:
        assert "taskset c0" in cmd and "timeout" in cmd, cmd
        if mode == "hang":
            time.sleep(120); sys.exit(0)
        m = re.search(r"--json (\S+)", cmd)
        if m:
            n = sum(1 for _ in open(os.path.join(root, "calls.log")))
            if mode == "disconnect" and os.path.exists(os.path.join(root, "ran_once")):
                open(os.path.join(root, "gone"), "w").close()
                err("error: closed")
            open(os.path.join(root, "ran_once"), "w").close()
            res = {"machine": {"cpu": "fake", "isa_selected": "neondot", "isa_available": "ref,neon,neondot",
                               "threads": 1}, "reps": 3,
                   "results": [{"name": "llama58m/512x512/T128/fp16", "isa": "neondot", "T": 128, "K": 512,
                                "N": 512, "median_us": 900.0, "p10_us": 880.0, "p90_us": 950.0}]}
            os.makedirs(dev("/data/local/tmp/tfqat"), exist_ok=True)
            json.dump(res, open(dev("/data/local/tmp/tfqat/" + m.group(1)), "w"))
        print("case ..."); sys.exit(0)
    sys.exit(0)
err("fake adb: unsupported " + " ".join(a), 2)
'''


@pytest.fixture
def fake_env(tmp_path):
    adb = tmp_path / "adb"
    adb.write_text(FAKE_ADB.replace("#!PYTHON", f"#!{PY}"))
    adb.chmod(adb.stat().st_mode | stat.S_IXUSR)
    build = tmp_path / "build"
    build.mkdir()
    (build / "tfqat_bench").write_bytes(b"\x7fELF fake")
    (build / "manifest.json").write_text(json.dumps({
        "toolchain": "aarch64-linux-gnu", "compiler": "fake", "artifacts": {
            "tfqat_bench": {"path": "tfqat_bench", "bytes": 9, "sha256": "0" * 64}}}))
    root = tmp_path / "fake"
    root.mkdir()
    env = {"FAKE_ADB_ROOT": str(root), "FAKE_CPUINFO": CPUINFO_ARM}
    return {"adb": str(adb), "build": build, "root": root, "env": env, "out": tmp_path / "out"}


def _fake_run(f, mode, *extra, timeout=120):
    env = dict(f["env"], FAKE_ADB_MODE=mode)
    return run_cli(["run", "--transport", "adb", "--serial", "FAKE123", "--adb", f["adb"], "--build-dir",
                    str(f["build"]), "--out", str(f["out"]), "--bench-warmup", "0", "--bench-runs", "2", *extra],
                   env=env, timeout=timeout)


def _one_line_error(r) -> str:
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("android_bench: error:")]
    assert len(errs) == 1, r.stderr
    return errs[0]


def test_fake_adb_ok_run_pins_to_big_cores(fake_env):
    r = _fake_run(fake_env, "ok")
    assert r.returncode == 0, r.stderr
    res = json.loads((fake_env["out"] / "result.json").read_text())
    assert res["status"] == "ok" and res["device"]["big_cores"] == [6, 7] and res["device"]["pin_mask"] == "c0"
    assert res["device"]["kernel_features"] == ["dotprod", "fp16", "fp16 arith", "neon"]
    assert len(res["microbench"]["runs"]) == 2 and res["microbench"]["aggregate"][0]["runs"] == 2
    assert res["cleanup"] == "removed /data/local/tmp/tfqat"
    assert not (fake_env["root"] / "dev" / "data" / "local" / "tmp" / "tfqat").exists()


def test_no_device_is_one_line(fake_env):
    r = _fake_run(fake_env, "nodevice")
    assert r.returncode == 1
    assert "no adb device FAKE123" in _one_line_error(r)
    assert json.loads((fake_env["out"] / "result.json").read_text())["status"] == "failed"
    # and without --serial: nothing listed
    env = dict(fake_env["env"], FAKE_ADB_MODE="nodevice")
    r = run_cli(["run", "--adb", fake_env["adb"], "--build-dir", str(fake_env["build"]), "--out",
                 str(fake_env["out"])], env=env, timeout=60)
    assert r.returncode == 1 and "no adb device" in _one_line_error(r)


def test_unauthorized_is_one_line(fake_env):
    r = _fake_run(fake_env, "unauthorized")
    assert r.returncode == 1
    line = _one_line_error(r)
    assert "unauthorized" in line and "Allow USB debugging" in line


def test_timeout_stops_and_cleans(fake_env):
    t0 = time.monotonic()
    r = _fake_run(fake_env, "hang", "--timeout", "1")  # host-side limit: device timeout + min(30, 5 + timeout) s
    assert time.monotonic() - t0 < 40
    assert r.returncode == 1
    assert "timed out" in _one_line_error(r)
    res = json.loads((fake_env["out"] / "result.json").read_text())
    assert res["error_kind"] == "timeout" and res["cleanup"].startswith("removed")
    calls = (fake_env["root"] / "calls.log").read_text()
    assert "rm -rf /data/local/tmp/tfqat" in calls


def test_disconnect_mid_run_keeps_partial_results(fake_env):
    r = _fake_run(fake_env, "disconnect")
    assert r.returncode == 1
    line = _one_line_error(r)
    assert "disconnected during microbenchmark run 2" in line and "results so far" in line
    out = fake_env["out"]
    res = json.loads((out / "result.json").read_text())
    assert res["status"] == "partial" and res["error_kind"] == "disconnected"
    assert len(res["microbench"]["runs"]) == 1 and (out / "raw" / "bench_run1_1.json").exists()
    assert res["cleanup"] == "device unreachable: nothing removed"
    md = (out / "report.md").read_text()
    assert "**Status: partial**" in md and "| FP16 | 900.0 | n/a | n/a |" in md


def test_adb_transport_classifies_errors_in_process(fake_env, monkeypatch):
    for k, v in fake_env["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FAKE_ADB_MODE", "unauthorized")
    with pytest.raises(BenchError) as e:
        Adb(serial="FAKE123", adb=fake_env["adb"]).check()
    assert e.value.kind == "unauthorized" and "\n" not in str(e.value)
    monkeypatch.setenv("FAKE_ADB_MODE", "ok")
    t = Adb(serial="FAKE123", adb=fake_env["adb"])
    assert t.check()["abi"] == "arm64-v8a"
    (fake_env["root"] / "gone").write_text("")
    with pytest.raises(BenchError) as e:
        t.push(fake_env["build"] / "tfqat_bench")
    assert e.value.kind == "disconnected"


# ---------------------------------------------------------------------------------------------
# builds shared by the emulated and adbd tests (cached in build/android-bench-aarch64-linux-gnu)

def _plugin_qemu() -> bool:
    if not shutil.which("qemu-aarch64"):
        return False
    r = subprocess.run(["qemu-aarch64", "-plugin", "/nonexistent.so", "/bin/true"], capture_output=True, text=True,
                       timeout=30)
    return "unknown option" not in (r.stderr + r.stdout)


@pytest.fixture(scope="module")
def aarch64_build():
    if not shutil.which("aarch64-linux-gnu-g++"):
        pytest.skip("g++-aarch64-linux-gnu is not installed")
    r = run_cli(["build", "--toolchain", "aarch64-linux-gnu"], timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    d = REPO / "build" / "android-bench-aarch64-linux-gnu"
    return d, json.loads((d / "manifest.json").read_text())


def test_emulated_instruction_counts_are_exact_and_labelled(aarch64_build, tmp_path):
    if not _plugin_qemu():
        pytest.skip("no plugin-capable qemu-aarch64 (apt-get install qemu-user)")
    outs = []
    for i in range(2):
        out = tmp_path / f"emu{i}"
        r = run_cli(["run", "--transport", "emulated", "--qemu-cpu", "cortex-a76", "--count-filter",
                     "llama58m/512x512/T128", "--out", str(out)], timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        outs.append(json.loads((out / "result.json").read_text()))
    counts = [o["insn_counts"][0] for o in outs]
    assert counts[0]["isa"] == "neondot" and counts[0]["qemu_cpu"] == "cortex-a76"
    by = {c["variant"]: c["insns"] for c in counts[0]["cases"]}
    assert set(by) >= {"fp16", "w8a8", "w4a8", "w4a48_r75", "w4a48_r50", "w4a48_r25", "w4a4"}
    assert all(v > 100_000 for v in by.values())
    assert by["w8a8"] < by["fp16"]
    assert counts[0]["cases"] == counts[1]["cases"]  # exact: the same count twice
    md = (tmp_path / "emu0" / "report.md").read_text()
    assert "counts, not time" in md and "ms/token" not in md.split("## Device")[0].replace(
        "Minsn/token", "").replace("ms/token = 16", "")
    assert outs[0]["device"]["measure"].startswith("guest instructions")


# ---------------------------------------------------------------------------------------------
# the real adb client against a real adbd in a private network namespace

ADBD_PORT = 6555        # outside 5555-5585, which adb servers scan for emulators
ADB_SERVER_PORT = 15037  # the adb server of this test, inside the namespace


def _hexaddr_ok(hexaddr: str) -> bool:
    """Local address column of /proc/net/tcp{,6}: loopback only (127.0.0.1, ::1, ::ffff:127.0.0.1)."""
    addr = hexaddr.split(":")[0]
    return addr in ("0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F")


class Device:
    def __init__(self, root: Path, home: Path):
        self.root, self.home = root, home
        self.log = open(root.parent / "adbd.log", "wb")
        self.proc = subprocess.Popen([str(TESTENV / "adbd_device.sh"), str(root), str(ADBD_PORT)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.init_pid = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.init_pid is None:
            try:
                kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
                if kids and Path(f"/proc/{kids[0]}/exe").resolve().name == "adbd":
                    self.init_pid = int(kids[0])
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        if self.init_pid is None:
            self.stop()
            raise RuntimeError("adbd did not start: " + (root.parent / "adbd.log").read_text()[-500:])
        self.adb = ["nsenter", "-t", str(self.init_pid), "-n", "-p", "--", "adb", "-P", str(ADB_SERVER_PORT)]

    def ns(self, *cmd, timeout=30) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.init_pid), "-n", "--", *cmd], capture_output=True, text=True,
                              timeout=timeout)

    def adb_run(self, *args, timeout=60) -> subprocess.CompletedProcess:
        return subprocess.run(self.adb + list(args), capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, HOME=str(self.home)), stdin=subprocess.DEVNULL)

    def stop(self):
        try:
            if self.init_pid:
                self.adb_run("kill-server", timeout=15)
        except subprocess.TimeoutExpired:
            pass
        if self.init_pid and self.proc.poll() is None:
            try:  # the namespace's init: every process of the device dies with it; unshare reaps it
                os.kill(self.init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # unshare --kill-child: adbd gets SIGKILL too
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        if self.init_pid:
            for _ in range(100):
                try:
                    st = Path(f"/proc/{self.init_pid}/stat").read_text().split()[2]
                except FileNotFoundError:
                    break
                if st == "Z":
                    break
                time.sleep(0.05)
        self.log.close()


@pytest.fixture(scope="module")
def adbd_device(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespace, chroot, mounts)")
    for tool in ("adb", "unshare", "nsenter", "ip", "chroot", "dpkg-deb", "apt-get", "gcc"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")
    if not shutil.which("qemu-aarch64-static"):
        pytest.skip("qemu-user-static is not installed")
    cache = REPO / "build" / "adbd"
    r = subprocess.run(["bash", str(TESTENV / "setup_adbd.sh"), str(cache)], capture_output=True, text=True,
                       timeout=900)
    if r.returncode == 3:
        pytest.skip("Debian trixie's adbd .debs could not be fetched: " + r.stderr.strip()[-300:])
    assert r.returncode == 0, r.stdout + r.stderr
    base = tmp_path_factory.mktemp("adbd")
    root = base / "device"
    subprocess.run(["cp", "-a", str(cache / "root"), str(root)], check=True, timeout=300)
    home = base / "home"
    home.mkdir()
    dev = Device(root, home)
    try:
        for _ in range(50):
            c = dev.adb_run("connect", f"127.0.0.1:{ADBD_PORT}", timeout=30)
            if "connected to" in c.stdout and "failed" not in c.stdout:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"adb connect failed: {c.stdout} {c.stderr}")
        for _ in range(50):
            if dev.adb_run("-s", f"127.0.0.1:{ADBD_PORT}", "get-state").stdout.strip() == "device":
                break
            time.sleep(0.2)
        yield dev
    finally:
        dev.stop()


def test_adbd_listens_on_namespace_loopback_only(adbd_device):
    dev = adbd_device
    ifaces = [ln.split(":")[0].strip() for ln in dev.ns("cat", "/proc/net/dev").stdout.splitlines()[2:]]
    assert ifaces == ["lo"]
    tables = {}
    for t in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6", "unix", "netlink"):
        r = dev.ns("cat", f"/proc/net/{t}")
        tables[t] = [ln.split() for ln in r.stdout.splitlines()[1:] if ln.strip()]
    listening = [(t, row[1]) for t in ("tcp", "tcp6") for row in tables[t] if row[3] == "0A"]
    ports = sorted(int(a.split(":")[1], 16) for _, a in listening)
    assert ADBD_PORT in ports and ADB_SERVER_PORT in ports, listening
    assert all(_hexaddr_ok(a) for _, a in listening), listening
    for t in ("tcp", "tcp6"):  # connections too: loopback to loopback
        for row in tables[t]:
            assert _hexaddr_ok(row[1]) and (row[3] == "0A" or _hexaddr_ok(row[2])), row
    assert tables["udp"] == tables["udp6"] == tables["raw"] == tables["raw6"] == []
    # every socket adbd holds is one of this namespace's tcp/unix/netlink sockets: no vsock listener
    known = {row[9] for t in ("tcp", "tcp6") for row in tables[t]} | {row[6] for row in tables["unix"]} | {
        row[8] for row in tables["netlink"] if len(row) > 8}
    fds = list(Path(f"/proc/{dev.init_pid}/fd").iterdir())
    inodes = [re.match(r"socket:\[(\d+)\]", os.readlink(fd)) for fd in fds]
    inodes = [m.group(1) for m in inodes if m]
    assert inodes, "adbd holds no sockets?"
    assert set(inodes) <= known, f"sockets outside this namespace's tables (vsock?): {set(inodes) - known}"


def test_adb_push_shell_pull_and_device_checks(adbd_device, tmp_path):
    dev = adbd_device
    serial = f"127.0.0.1:{ADBD_PORT}"
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(300_000) + b"tfqat")
    t = Adb(serial=serial, adb=" ".join(dev.adb), device_dir="/data/local/tmp/tfqat-t", timeout=60)
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(dev.home)
    try:
        facts = t.check(expect_abi="arm64-v8a")
        n = os.cpu_count() or 1
        assert facts["abi"] == "arm64-v8a" and facts["model"] == "loopback-adbd" and facts["android"] == "14"
        assert "i8mm" in facts["kernel_features"] and "dotprod" in facts["kernel_features"]
        assert facts["big_cores"] == (list(range(n // 2, n)) if n > 1 else [0]) and facts["pinned"]
        t.prepare()
        remote = t.push(payload)
        rc, out, _ = t.shell(f"sha256sum {remote}; wc -c < {remote}")
        assert rc == 0
        import hashlib

        assert hashlib.sha256(payload.read_bytes()).hexdigest() in out and "300005" in out
        rc, _, _ = t.shell("exit 7")
        assert rc == 7  # shell protocol v2 carries the exit status
        back = t.pull(remote, tmp_path / "back.bin")
        assert back.read_bytes() == payload.read_bytes()
        assert t.cleanup()
        assert not (dev.root / "data/local/tmp/tfqat-t").exists()
    finally:
        if old_home is not None:
            os.environ["HOME"] = old_home


# The loopback "device" is aarch64 under qemu with no Python, so neither LiteRT's benchmark_model
# (no offline aarch64 build) nor our LiteRT-Python runner can run there: this C stand-in checks the
# flags it gets, like the stock tool refuses a multi-signature model without --signature_to_run_for
# (our exports have prefill and decode), and prints the stock timing line. The real runtime path is
# test_local_run_benchmarks_a_real_export_end_to_end (the host, LiteRT, our delegate).
FAKE_BENCHMARK_MODEL_C = r'''
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char** argv) {
  const char* graph = 0; int threads = 0, runs = 0, warm = 0, deleg = 0, sig = 0;
  for (int i = 1; i < argc; ++i) {
    if (!strncmp(argv[i], "--graph=", 8)) graph = argv[i] + 8;
    else if (!strncmp(argv[i], "--num_threads=", 14)) threads = 1;
    else if (!strncmp(argv[i], "--num_runs=", 11)) runs = 1;
    else if (!strncmp(argv[i], "--warmup_runs=", 14)) warm = 1;
    else if (!strcmp(argv[i], "--signature_to_run_for=prefill")) sig = 1;
    else if (!strncmp(argv[i], "--external_delegate_path=", 25)) deleg = access(argv[i] + 25, R_OK) == 0 ? 1 : -1;
    else { fprintf(stderr, "unknown flag %s\n", argv[i]); return 1; }
  }
  if (!sig) {
    fprintf(stderr, "ERROR: the model has several signatures; pick one with --signature_to_run_for\n");
    return 1;
  }
  if (!graph || access(graph, R_OK) != 0 || !threads || !runs || !warm || deleg < 0) return 3;
  printf("INFO: Inference timings in us: Init: 2100, First inference: 900, Warmup (avg): 850.5, Inference (avg): %s\n",
         deleg ? "640.25" : "812.75");
  return 0;
}
'''


def test_adb_whole_run_produces_report(adbd_device, aarch64_build, exported, tmp_path):  # noqa: F811
    dev = adbd_device
    if not shutil.which("aarch64-linux-gnu-gcc"):
        pytest.skip("aarch64-linux-gnu-gcc is not installed")
    src = tmp_path / "bm.c"
    src.write_text(FAKE_BENCHMARK_MODEL_C)
    bm = tmp_path / "benchmark_model"
    subprocess.run(["aarch64-linux-gnu-gcc", "-O1", "-static", "-o", str(bm), str(src)], check=True, timeout=120)
    model = exported["dir"] / "model_float.tflite"  # builtin ops; the TFQAT one needs an NDK-built delegate
    quantized = exported["dir"] / "model.tflite"
    out = tmp_path / "run"
    args = ["run", "--transport", "adb", "--serial", f"127.0.0.1:{ADBD_PORT}", "--adb", " ".join(dev.adb),
            "--build-dir", str(aarch64_build[0]), "--device-exec-prefix", "/usr/bin/qemu-aarch64-static -cpu max",
            "--bench-runs", "1", "--bench-warmup", "0", "--reps", "1",
            "--bench-filter", "llama58m/512x512/T128", "--bench-filter", "llama58m/512x1024/T128",
            "--bench-filter", "llama58m/1024x512/T128",
            "--model", str(model), "--model", str(quantized), "--benchmark-model", str(bm), "--num-runs", "3",
            "--warmup-runs", "1", "--out", str(out)]
    r = run_cli(args, env={"HOME": str(dev.home)}, timeout=600)
    print(r.stdout)
    print(r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["status"] == "ok" and res["schema"] == "tfqat.android_bench.result/1"
    assert res["device"]["abi"] == "arm64-v8a" and res["device"]["bench_machine"]["isa_selected"] == "i8mm"
    rep = json.loads((out / "report.json").read_text())
    rows = rep["tables"][0]["rows"]
    assert [r["config"] for r in rows][:3] == ["FP16", "W8A8", "W4A8"]
    assert all(r["value"] and r["value"] > 0 for r in rows), rows
    assert res["benchmark_model"] == [
        {"model": model.name, "signature": "prefill", "delegate": "none", "runner": "benchmark_model",
         "num_threads": 1, "num_runs": 3, "warmup_runs": 1,
         "init_us": 2100.0, "first_us": 900.0, "warmup_avg_us": 850.5, "avg_us": 812.75}]
    skip = [s for s in res["steps"] if s.startswith("benchmark_model model.tflite will be skipped")]
    assert len(skip) == 1 and "its TFQAT_* ops need our delegate" in skip[0]
    assert res["steps"].index(skip[0]) < min(i for i, s in enumerate(res["steps"]) if s.startswith("pushed"))
    md = (out / "report.md").read_text()
    print(md.split("## All microbenchmark cases")[0])
    assert "Table IV: ms/token, 128 input tokens (i8mm kernels)" in md and "| 812.8 |" in md
    assert (out / "report.png").exists()
    assert res["cleanup"] == "removed /data/local/tmp/tfqat"
    assert not (dev.root / "data/local/tmp/tfqat").exists()  # nothing left on the device


def test_adb_device_side_timeout_cleans_device(adbd_device, aarch64_build, tmp_path):
    dev = adbd_device
    out = tmp_path / "run"
    r = run_cli(["run", "--serial", f"127.0.0.1:{ADBD_PORT}", "--adb", " ".join(dev.adb), "--build-dir",
                 str(aarch64_build[0]), "--device-exec-prefix", "/usr/bin/qemu-aarch64-static -cpu max",
                 "--bench-runs", "1", "--bench-warmup", "0", "--reps", "2000", "--bench-filter", "llama58m/1024x512",
                 "--timeout", "2", "--out", str(out)], env={"HOME": str(dev.home)}, timeout=120)
    assert r.returncode == 1
    assert "timed out after 2 s (stopped on the device)" in _one_line_error(r)
    res = json.loads((out / "result.json").read_text())
    assert res["error_kind"] == "timeout" and res["cleanup"] == "removed /data/local/tmp/tfqat"
    assert not (dev.root / "data/local/tmp/tfqat").exists()
    # no benchmark process left running in the device's pid namespace
    ns = os.readlink(f"/proc/{dev.init_pid}/ns/pid")
    leftovers = []
    for pid in Path("/proc").iterdir():
        if pid.name.isdigit():
            try:
                if os.readlink(pid / "ns/pid") == ns and "tfqat_bench" in (pid / "cmdline").read_text():
                    leftovers.append(pid.name)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
    assert not leftovers, leftovers


# ---------------------------------------------------------------------------------------------
# ssh: the same run through ssh/scp stand-ins that execute on this host (no network at all)

FAKE_SSH = r'''#!/bin/sh
# ssh stand-in: skips options, checks the host, runs the command here
while [ $# -gt 0 ]; do case "$1" in -o|-p) shift 2;; -*) shift;; *) break;; esac; done
host=$1; shift
[ "$host" = "pi@board" ] || { echo "ssh: Could not resolve hostname $host" >&2; exit 255; }
[ -e "$FAKE_SSH_DOWN" ] && { echo "ssh: connect to host board port 22: Connection refused" >&2; exit 255; }
exec sh -c "$*"
'''
FAKE_SCP = r'''#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in -o|-P) shift 2;; -*) shift;; *) break;; esac; done
exec cp "${1#pi@board:}" "${2#pi@board:}"
'''


def test_ssh_transport_run_and_unreachable_board(fake_env, tmp_path):
    for name, text in (("ssh", FAKE_SSH), ("scp", FAKE_SCP)):
        p = tmp_path / name
        p.write_text(text)
        p.chmod(0o755)
    bench = fake_env["build"] / "tfqat_bench"  # a "binary" that writes the JSON tfqat_bench would
    bench.write_text(textwrap.dedent("""\
        #!/bin/sh
        while [ $# -gt 0 ]; do [ "$1" = --json ] && out=$2; shift; done
        [ -n "$out" ] && echo '{"machine": {"cpu": "pi", "isa_selected": "neondot"}, "results": [{"name": "llama58m/512x512/T128/w8a8", "isa": "neondot", "T": 128, "K": 512, "N": 512, "median_us": 321.0, "p10_us": 300.0, "p90_us": 350.0}]}' > "$out"
        exit 0
        """))
    m = json.loads((fake_env["build"] / "manifest.json").read_text())
    m["toolchain"] = "host"  # the "board" is this host, whatever its ABI
    (fake_env["build"] / "manifest.json").write_text(json.dumps(m))
    devdir = tmp_path / "board-dir"
    env = {"TFQAT_SSH": str(tmp_path / "ssh"), "TFQAT_SCP": str(tmp_path / "scp"),
           "FAKE_SSH_DOWN": str(tmp_path / "down")}
    args = ["run", "--transport", "ssh", "--host", "pi@board", "--build-dir", str(fake_env["build"]), "--out",
            str(fake_env["out"]), "--bench-warmup", "0", "--bench-runs", "1", "--device-dir", str(devdir)]
    r = run_cli(args, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads((fake_env["out"] / "result.json").read_text())
    assert res["transport"] == "ssh" and res["microbench"]["aggregate"][0]["median_us"] == 321.0
    assert not devdir.exists()


def test_ssh_unreachable_and_abi_mismatch_are_one_line(fake_env, tmp_path):
    for name, text in (("ssh", FAKE_SSH), ("scp", FAKE_SCP)):
        p = tmp_path / name
        p.write_text(text)
        p.chmod(0o755)
    env = {"TFQAT_SSH": str(tmp_path / "ssh"), "TFQAT_SCP": str(tmp_path / "scp"),
           "FAKE_SSH_DOWN": str(tmp_path / "down")}
    base = ["run", "--transport", "ssh", "--build-dir", str(fake_env["build"]), "--out", str(fake_env["out"])]
    (tmp_path / "down").write_text("")
    r = run_cli(base + ["--host", "pi@board"], env=env, timeout=60)
    assert r.returncode == 1 and "cannot reach the board" in _one_line_error(r)
    (tmp_path / "down").unlink()
    r = run_cli(base + ["--host", "pi@board"], env=env, timeout=60)
    import platform

    if platform.machine() != "aarch64":  # the "board" is this x86 host: the arm64 build must be refused
        assert r.returncode == 1 and "ABI is x86_64, but the build is for arm64-v8a" in _one_line_error(r)


def test_adb_disconnect_mid_run_real_adbd(adbd_device, aarch64_build, tmp_path):
    """The device goes away (adb disconnect) while the microbenchmark runs on it: one-line error,
    what was gathered kept on disk, and the device cleaned once it is back."""
    dev = adbd_device
    serial = f"127.0.0.1:{ADBD_PORT}"
    out = tmp_path / "run"
    env = dict(os.environ, HOME=str(dev.home))
    p = subprocess.Popen([PY, "-m", "android_bench", "run", "--serial", serial, "--adb", " ".join(dev.adb),
                          "--build-dir", str(aarch64_build[0]), "--device-exec-prefix",
                          "/usr/bin/qemu-aarch64-static -cpu max", "--bench-runs", "1", "--bench-warmup", "0",
                          "--reps", "5000", "--bench-filter", "llama58m/1024x512", "--timeout", "60", "--out", str(out)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if any("pushed tfqat_bench" in s for s in json.loads((out / "result.json").read_text())["steps"]):
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.2)
        time.sleep(1.0)  # the benchmark is running on the device now
        dev.adb_run("disconnect", serial, timeout=30)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
        for _ in range(50):  # reconnect for whatever runs next
            if "connected to" in dev.adb_run("connect", serial, timeout=30).stdout:
                break
            time.sleep(0.2)
    assert p.returncode == 1, stdout + stderr
    line = [ln for ln in stderr.splitlines() if ln.startswith("android_bench: error:")]
    assert len(line) == 1 and f"adb device {serial} disconnected during microbenchmark run 1" in line[0], stderr
    res = json.loads((out / "result.json").read_text())
    assert res["error_kind"] == "disconnected" and res["status"] == "failed"
    assert res["device"]["abi"] == "arm64-v8a"  # the checks made before the loss are kept
    assert res["cleanup"] == "device unreachable: nothing removed"
    assert (out / "report.md").read_text().startswith("# tfqat on-device benchmark: adb\n\n**Status: failed**")
    # the device is back: the pushed directory is still there; a cleanup removes it
    assert (dev.root / "data/local/tmp/tfqat/tfqat_bench").exists()
    t = Adb(serial=serial, adb=" ".join(dev.adb))
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(dev.home)
    try:
        t.check()
        assert t.cleanup()
    finally:
        if old_home is not None:
            os.environ["HOME"] = old_home
    assert not (dev.root / "data/local/tmp/tfqat").exists()


# ---------------------------------------------------------------------------------------------
# inputs and the device before any build; cleanup and report lines that say what happened

def test_bad_model_is_refused_before_the_device_and_any_build(fake_env, tmp_path):
    """No device and no build either: the missing model is what is reported, in seconds."""
    root = tmp_path / "build-root"
    root.mkdir()
    cases = [
        (tmp_path / "absent.tflite", "no such file"),
        (tmp_path / "weights.h5", "not a .tflite file"),
        (tmp_path / "junk.tflite", "not a TFLite model (file identifier TFL3 missing)"),
        (tmp_path, "not a file"),
    ]
    (tmp_path / "weights.h5").write_bytes(b"\x89HDF")
    (tmp_path / "junk.tflite").write_bytes(b"hello, not a flatbuffer")
    for model, why in cases:
        t0 = time.monotonic()
        r = run_cli(["run", "--transport", "adb", "--serial", "NOPE", "--adb", str(tmp_path / "no-adb"),
                     "--build-root", str(root), "--out", str(tmp_path / "out"), "--model", str(model)], timeout=120)
        assert r.returncode == 2, r.stderr
        line = _one_line_error(r)
        assert f"--model {model}: {why}" in line, line
        assert time.monotonic() - t0 < 60
        assert list(root.iterdir()) == []  # nothing built
        assert not (tmp_path / "out" / "result.json").exists()  # nothing ran


def test_device_is_checked_before_any_build(fake_env, tmp_path):
    root = tmp_path / "build-root"
    root.mkdir()
    env = dict(fake_env["env"], FAKE_ADB_MODE="nodevice")
    r = run_cli(["run", "--transport", "adb", "--serial", "FAKE123", "--adb", fake_env["adb"], "--build-root",
                 str(root), "--out", str(fake_env["out"])], env=env, timeout=120)
    assert r.returncode == 1 and "no adb device FAKE123" in _one_line_error(r)
    assert list(root.iterdir()) == []  # no cross build was started
    res = json.loads((fake_env["out"] / "result.json").read_text())
    assert res["status"] == "failed" and res["error_kind"] == "no-device"
    assert res["cleanup"] == "nothing was pushed; nothing to remove"
    assert "Cleanup: removed" not in (fake_env["out"] / "report.md").read_text()
    calls = (fake_env["root"] / "calls.log").read_text()
    assert "rm -rf" not in calls and "push" not in calls


def test_bad_numbers_are_one_line(fake_env):
    for flag, value in (("--num-runs", "0"), ("--warmup-runs", "-1"), ("--num-threads", "0"), ("--timeout", "0")):
        r = _fake_run(fake_env, "ok", flag, value)
        assert r.returncode == 2 and f"{flag} {value}: must be" in _one_line_error(r)


def test_report_on_a_missing_or_foreign_folder_is_one_line(tmp_path):
    r = run_cli(["report", str(tmp_path / "nope")], timeout=60)
    assert r.returncode == 2 and "no such folder" in _one_line_error(r) and "Traceback" not in r.stderr
    r = run_cli(["report", str(tmp_path)], timeout=60)
    assert r.returncode == 2 and "holds no result.json" in _one_line_error(r)
    (tmp_path / "result.json").write_text('{"schema": "tfqat.android_bench.res')
    r = run_cli(["report", str(tmp_path)], timeout=60)
    assert r.returncode == 2 and "damaged JSON" in _one_line_error(r)


# ---------------------------------------------------------------------------------------------
# the host path end to end: the pip-built tfqat_bench and delegate, a real export, our
# benchmark_model runner on the LiteRT Python runtime

@pytest.fixture
def host_build(tmp_path, ops_lib):  # noqa: F811 (the fixture imported from test_export)
    import hashlib

    bench = REPO / "tfqat" / "_lib" / "tfqat_bench"
    if not bench.is_file():
        pytest.skip("tfqat/_lib/tfqat_bench is missing: pip install -e . builds it")
    d = tmp_path / "host-build"
    d.mkdir()
    arts = {}
    for name, src in (("tfqat_bench", bench), ("libtfqat_ops.so", Path(ops_lib))):
        shutil.copy2(src, d / name)
        arts[name] = {"path": name, "bytes": (d / name).stat().st_size,
                      "sha256": hashlib.sha256((d / name).read_bytes()).hexdigest()}
    (d / "manifest.json").write_text(json.dumps({"toolchain": "host", "compiler": "pip install", "artifacts": arts,
                                                 "delegate_loads_in": "host processes"}))
    return d


def test_litert_python_runner_flags_and_output(exported):  # noqa: F811
    model = exported["dir"] / "model.tflite"
    runner = [PY, "-m", "android_bench.litert_benchmark", f"--graph={model}", "--num_runs=3", "--warmup_runs=1",
              "--num_threads=1", f"--external_delegate_path={exported['lib']}"]
    r = subprocess.run(runner, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 1 and "--signature_to_run_for" in r.stderr  # two signatures: as the stock tool
    r = subprocess.run(runner + ["--signature_to_run_for=prefill", "--input_layer=tokens", "--input_layer_shape=32",
                                 "--external_delegate_options=isa:ref"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    t = parse_benchmark_model(r.stdout)
    assert set(t) == {"init_us", "first_us", "warmup_avg_us", "avg_us"} and all(v > 0 for v in t.values())
    assert "count=3 " in r.stdout and "Memory footprint delta" in r.stdout
    r = subprocess.run(runner[:4] + ["--signature_to_run_for=prefill"], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 1 and "unresolved custom op: TFQAT_" in r.stderr  # no delegate: LiteRT cannot run it
    r = subprocess.run(runner + ["--signature_to_run_for=generate"], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 1 and "'generate' is not in the model (it has decode, prefill, prefill_last)" in r.stderr
    r = subprocess.run(runner + ["--num-runs=3"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 1 and "unknown flags --num-runs=3" in r.stderr


def test_local_run_benchmarks_a_real_export_end_to_end(exported, host_build, tmp_path):  # noqa: F811
    d = exported["dir"]
    out = tmp_path / "run"
    r = run_cli(["run", "--transport", "local", "--build-dir", str(host_build), "--bench-filter",
                 "llama58m/512x512/T128", "--reps", "1", "--bench-runs", "1", "--bench-warmup", "0",
                 "--model", str(d / "model.tflite"), "--model", str(d / "model_float.tflite"),
                 "--num-runs", "3", "--warmup-runs", "1", "--out", str(out)], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["status"] == "ok"
    bm = {row["model"]: row for row in res["benchmark_model"]}
    assert set(bm) == {"model.tflite", "model_float.tflite"}
    q, f = bm["model.tflite"], bm["model_float.tflite"]
    assert (q["signature"], q["delegate"], q["runner"]) == ("prefill", "tfqat", "litert-python")
    assert (f["signature"], f["delegate"], f["runner"]) == ("prefill", "none", "litert-python")
    for row in (q, f):
        assert row["num_runs"] == 3 and row["warmup_runs"] == 1 and row["avg_us"] > 0 and row["init_us"] > 0
    raw = (out / "raw" / "benchmark_model-model-tfqat.txt").read_text()
    assert "--signature_to_run_for" not in raw and "Signature to run: [prefill]" in raw
    assert f"External delegate path: [{res['device']['device_dir']}/libtfqat_ops.so]" in raw
    md = (out / "report.md").read_text()
    assert "| model.tflite | prefill | tfqat | litert-python | 1 | 3 |" in md
    board = res["device"]["device_dir"]
    assert res["cleanup"] == f"removed {board}" and not Path(board).exists()
    # the report re-renders from result.json alone
    (out / "report.md").unlink()
    r = run_cli(["report", str(out)], timeout=60)
    assert r.returncode == 0 and (out / "report.md").read_text() == md


def test_local_run_in_a_user_directory_removes_only_what_it_pushed(host_build, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("the user's file")
    out = tmp_path / "run"
    r = run_cli(["run", "--transport", "local", "--device-dir", str(mine), "--build-dir", str(host_build),
                 "--bench-filter", "llama58m/512x512/T128", "--reps", "1", "--bench-runs", "1", "--bench-warmup",
                 "0", "--out", str(out)], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "result.json").read_text())
    assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"]
    assert res["cleanup"] == f"removed 2 pushed files from {mine} (the directory was there before)"


# ---------------------------------------------------------------------------------------------
# the ssh transport against a real OpenSSH sshd (Debian's openssh-server, fetched, never
# installed) that listens on the loopback of a private network namespace: the "board" is this
# host, so our LiteRT-Python benchmark_model runs on it end to end

SSHD_PORT = 2222


class Board:
    def __init__(self, base: Path, sshd: str, libs: str):
        self.base = base
        for name in ("host_key", "client_key", "other_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / name)], check=True,
                           timeout=60)
        (base / "authorized_keys").write_text((base / "client_key.pub").read_text())
        (base / "sshd_config").write_text(textwrap.dedent(f"""\
            Port {SSHD_PORT}
            ListenAddress 127.0.0.1
            HostKey {base / 'host_key'}
            PidFile none
            AuthorizedKeysFile {base / 'authorized_keys'}
            PermitRootLogin prohibit-password
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            StrictModes no
            UseDNS no
            Subsystem sftp internal-sftp
            """))
        self.log = open(base / "sshd.log", "wb")
        self.proc = subprocess.Popen([str(TESTENV / "sshd_board.sh"), sshd, str(base / "sshd_config"), libs],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.init_pid = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
                if kids and Path(f"/proc/{kids[0]}/exe").resolve().name == "sshd":
                    self.init_pid = int(kids[0])
                    if self.run_ssh("true").returncode == 0:
                        return
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("sshd did not start: " + (base / "sshd.log").read_text()[-800:])

    def client(self, tool: str, key: str = "client_key") -> str:
        """The command line TFQAT_SSH / TFQAT_SCP take: the client runs inside the namespace."""
        return " ".join(["nsenter", "-t", str(self.init_pid), "-n", "--", tool, "-F", "/dev/null", "-i",
                         str(self.base / key), "-o", "IdentitiesOnly=yes", "-o",
                         f"UserKnownHostsFile={self.base / 'known_hosts'}", "-o", "StrictHostKeyChecking=accept-new",
                         "-o", "LogLevel=ERROR"])

    def env(self, key: str = "client_key") -> dict:
        return {"TFQAT_SSH": self.client("ssh", key), "TFQAT_SCP": self.client("scp", key)}

    def run_ssh(self, cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(shlex.split(self.client("ssh")) + ["-o", "BatchMode=yes", "-p", str(SSHD_PORT),
                                                                "root@127.0.0.1", cmd],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    def ns(self, *cmd) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.init_pid), "-n", "--", *cmd], capture_output=True,
                              text=True, timeout=30)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # unshare --kill-child: sshd and its sessions die too
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()


@pytest.fixture(scope="module")
def sshd_board(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root (network and mount namespaces)")
    for tool in ("unshare", "nsenter", "ip", "ssh", "scp", "ssh-keygen", "dpkg-deb", "apt-get"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")
    r = subprocess.run(["bash", str(TESTENV / "setup_sshd.sh"), str(REPO / "build" / "sshd")], capture_output=True,
                       text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip("openssh-server could not be fetched: " + r.stderr.strip()[-300:])
    assert r.returncode == 0, r.stdout + r.stderr
    sshd = r.stdout.strip().splitlines()[-1]
    lib_path = REPO / "build" / "sshd" / "root" / "lib-path"
    libs = lib_path.read_text().strip() if sshd.startswith(str(REPO)) and lib_path.exists() else ""
    board = Board(tmp_path_factory.mktemp("sshd"), sshd, libs)
    try:
        yield board
    finally:
        board.stop()


def test_sshd_listens_on_namespace_loopback_only(sshd_board):
    b = sshd_board
    ifaces = [ln.split(":")[0].strip() for ln in b.ns("cat", "/proc/net/dev").stdout.splitlines()[2:]]
    assert ifaces == ["lo"]
    rows = [row.split() for t in ("tcp", "tcp6") for row in b.ns("cat", f"/proc/net/{t}").stdout.splitlines()[1:]]
    listening = [row[1] for row in rows if row[3] == "0A"]
    assert listening == [f"0100007F:{SSHD_PORT:04X}"], listening  # 127.0.0.1:2222 and nothing else
    assert b.run_ssh("echo $((6 * 7))").stdout.strip() == "42"


def test_ssh_run_on_a_real_sshd_benchmarks_a_real_export(sshd_board, exported, host_build, tmp_path):  # noqa: F811
    board_dir = tmp_path / "board"
    out = tmp_path / "run"
    r = run_cli(["run", "--transport", "ssh", "--host", "root@127.0.0.1", "--port", str(SSHD_PORT),
                 "--device-dir", str(board_dir), "--build-dir", str(host_build), "--bench-filter",
                 "llama58m/512x512/T128", "--reps", "1", "--bench-runs", "1", "--bench-warmup", "0",
                 "--model", str(exported["dir"] / "model.tflite"), "--benchmark-model", "litert-python",
                 "--num-runs", "3", "--warmup-runs", "1", "--out", str(out)], env=sshd_board.env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["status"] == "ok" and res["transport"] == "ssh" and res["device"]["device_dir"] == str(board_dir)
    assert res["microbench"]["aggregate"] and all(a["median_us"] > 0 for a in res["microbench"]["aggregate"])
    (row,) = res["benchmark_model"]
    assert (row["model"], row["signature"], row["delegate"], row["runner"]) == (
        "model.tflite", "prefill", "tfqat", "litert-python")
    assert row["avg_us"] > 0
    assert res["cleanup"] == f"removed {board_dir}" and not board_dir.exists()


def test_ssh_real_refusals_are_one_line(sshd_board, host_build, tmp_path):
    base = ["run", "--transport", "ssh", "--host", "root@127.0.0.1", "--build-dir", str(host_build),
            "--device-dir", str(tmp_path / "board"), "--out", str(tmp_path / "out")]
    r = run_cli(base + ["--port", str(SSHD_PORT)], env=sshd_board.env("other_key"), timeout=120)
    assert r.returncode == 1 and "ssh root@127.0.0.1: not authorized" in _one_line_error(r)
    r = run_cli(base + ["--port", str(SSHD_PORT + 1)], env=sshd_board.env(), timeout=120)
    assert r.returncode == 1 and "cannot reach the board" in _one_line_error(r)
    assert not (tmp_path / "board").exists()
