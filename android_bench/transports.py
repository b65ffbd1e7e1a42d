"""Transports (adb, ssh, local, emulated) behind one interface, and the run itself.

Every transport has ``check()`` (device state and facts: ABI, CPU features, big cores),
``push(local, name)`` into its device directory, ``shell(cmd)``, ``pull(remote, local)``,
``run_binary(...)`` (pinned to the big cores with taskset, under a device-side ``timeout``) and
``cleanup()`` (removes what was pushed). :func:`run_session` drives one run and writes one JSON
result (schema ``tfqat.android_bench.result/1``) whatever the transport.

Failures raise :class:`android_bench.BenchError` with a one-line message; :func:`run_session`
keeps what was gathered so far on disk (``result.json``, ``raw/``, the report), cleans the device
where it can still be reached, and re-raises.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import DEVICE_DIR, SCHEMA, BenchError, atomic_write_json

DEFAULT_TIMEOUT_S = 600.0  # one step (one benchmark process); transfers and probes use less
SHORT_TIMEOUT_S = 60.0

# CPU features that pick a kernel path (tflite_ops dispatch), as /proc/cpuinfo spells them
ARM_FEATURES = {"asimd": "neon", "asimddp": "dotprod", "asimdhp": "fp16 arith", "fphp": "fp16",
                "i8mm": "i8mm", "sve": "sve", "sve2": "sve2", "bf16": "bf16"}
X86_FEATURES = {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f",
                "avx512_vnni": "avx512vnni", "avx_vnni": "avxvnni"}
QEMU_CPU_FEATURES = {  # what qemu-aarch64 -cpu X exposes (tflite_ops/README: dispatch per phone class)
    "max": ["asimd", "asimddp", "asimdhp", "fphp", "i8mm", "sve", "sve2", "bf16"],
    "cortex-a76": ["asimd", "asimddp", "asimdhp", "fphp"],
    "cortex-a53": ["asimd"],
}
MACHINE_TO_ABI = {"aarch64": "arm64-v8a", "arm64": "arm64-v8a", "armv8l": "armeabi-v7a",
                  "armv7l": "armeabi-v7a", "x86_64": "x86_64", "amd64": "x86_64", "i686": "x86"}


def _text(b) -> str:
    if b is None:
        return ""
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else b


def parse_cpuinfo(text: str) -> dict:
    """Features (ARM 'Features' / x86 'flags'), processor count and model name from /proc/cpuinfo."""
    feats: list[str] = []
    n = 0
    model = ""
    implementer = part = ""
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip().lower()
        val = val.strip()
        if key == "processor":
            n += 1
        elif key in ("features", "flags") and not feats:
            feats = val.split()
        elif key in ("model name", "hardware") and not model:
            model = val
        elif key == "cpu implementer" and not implementer:
            implementer = val
        elif key == "cpu part" and not part:
            part = val
    known = {**ARM_FEATURES, **X86_FEATURES}
    return {
        "features": feats,
        "kernel_features": sorted({known[f] for f in feats if f in known}),
        "processors": n,
        "model": model or (f"implementer {implementer} part {part}" if implementer else ""),
    }


def parse_max_freqs(text: str) -> dict[int, int]:
    """Lines '<path>/cpuN/cpufreq/cpuinfo_max_freq <kHz>' -> {N: kHz}."""
    out = {}
    for line in text.splitlines():
        m = re.search(r"cpu(\d+)/cpufreq/cpuinfo_max_freq\s+(\d+)", line)
        if m:
            out[int(m.group(1))] = int(m.group(2))
    return out


def big_cores(freqs: dict[int, int], n_cpus: int) -> list[int]:
    """The cores with the highest cpuinfo_max_freq (all cores when the kernel does not say)."""
    if freqs:
        top = max(freqs.values())
        return sorted(c for c, f in freqs.items() if f == top)
    return list(range(max(n_cpus, 1)))


def cpu_mask(cores: list[int]) -> str:
    """Hex affinity mask: the form every taskset takes (util-linux, toybox, busybox)."""
    return format(sum(1 << c for c in cores), "x")


FREQ_CMD = ("for f in /sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq; do "
            "[ -r \"$f\" ] && echo \"$f $(cat \"$f\")\"; done; true")


class Transport:
    """push / pull / shell / cleanup, plus the device checks built on them."""

    kind = "base"

    def __init__(self, device_dir: str = DEVICE_DIR, timeout: float = DEFAULT_TIMEOUT_S, exec_prefix: str = ""):
        self.device_dir = device_dir.rstrip("/") or "/"
        self.timeout = float(timeout)
        self.exec_prefix = exec_prefix  # e.g. "qemu-aarch64-static -cpu max" on an emulated device
        self.pushed: list[str] = []   # files pushed or written on the device (what cleanup removes)
        self.facts: dict = {}
        # android_bench's own directory (the default one, or one this run created) is removed whole;
        # from a directory the user named that was there before, only what this run put there
        self.default_dir = False
        self.created_dir = False
        self._checked = False
        self._has_taskset = False
        self._has_timeout = False

    # -- the four primitives (subclasses) ---------------------------------------------------
    def shell(self, cmd: str, timeout: float | None = None, what: str = "shell") -> tuple[int, str, str]:
        raise NotImplementedError

    def push(self, local: str | Path, name: str | None = None) -> str:
        raise NotImplementedError

    def pull(self, remote: str, local: str | Path) -> Path:
        raise NotImplementedError

    @property
    def own_dir(self) -> bool:
        return self.default_dir or self.created_dir

    def cleanup(self) -> bool:
        """Remove android_bench's files from the device: its own directory whole (the default one,
        which a run cut short may have left, or one this run created), else only the files this
        run pushed or wrote (a directory the user named, such as ``--device-dir /tmp``, is never
        removed whole). True if done or there was nothing to remove."""
        if not self._checked or not (self.pushed or self.own_dir):
            return True
        if self.own_dir:
            cmd = f"rm -rf {shlex.quote(self.device_dir)}"
        else:
            cmd = "rm -f " + " ".join(shlex.quote(p) for p in dict.fromkeys(self.pushed))
        try:
            rc, _, err = self.shell(cmd, timeout=SHORT_TIMEOUT_S, what="cleanup")
        except BenchError:
            return False
        return rc == 0

    def cleanup_report(self, done: bool) -> str:
        """The report's "Cleanup:" line: what was removed, only when something was put there."""
        if not self.pushed:
            return "nothing was pushed; nothing to remove" if not self.created_dir or not done else (
                f"nothing was pushed; removed the empty {self.device_dir} this run had created")
        if not done:
            return "device unreachable: nothing removed"
        if self.own_dir:
            return "removed " + self.device_dir
        return f"removed {len(set(self.pushed))} pushed files from {self.device_dir} (the directory was there before)"

    # -- device checks ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.kind

    def state(self) -> str:
        return "device"

    def abi(self) -> str:
        rc, out, _ = self.shell("uname -m", timeout=SHORT_TIMEOUT_S, what="uname")
        m = out.strip()
        return MACHINE_TO_ABI.get(m, m or "unknown")

    def extra_facts(self) -> dict:
        rc, out, _ = self.shell("uname -srm; cat /proc/device-tree/model 2>/dev/null; echo; hostname 2>/dev/null",
                                timeout=SHORT_TIMEOUT_S, what="facts")
        lines = [ln.strip("\x00 ") for ln in out.splitlines() if ln.strip("\x00 ")]
        facts = {"os": lines[0] if lines else "unknown"}
        if len(lines) > 2:
            facts["board"] = lines[1]
        return facts

    def require_abi(self, expect_abi: str | None) -> None:
        """Refuse a build for another ABI than the checked device's (one line)."""
        abi = self.facts.get("abi")
        if expect_abi and abi != expect_abi:
            raise BenchError(f"{self.name}: ABI is {abi}, but the build is for {expect_abi}", "abi")

    def check(self, expect_abi: str | None = None) -> dict:
        st = self.state()
        if st != "device":
            raise BenchError(f"{self.name}: device state is {st!r}, not 'device'", "offline")
        self._checked = True
        abi = self.abi()
        self.facts = {"abi": abi}
        self.require_abi(expect_abi)
        _, cpuinfo, _ = self.shell("cat /proc/cpuinfo", timeout=SHORT_TIMEOUT_S, what="cpuinfo")
        ci = parse_cpuinfo(cpuinfo)
        _, freq_txt, _ = self.shell(FREQ_CMD, timeout=SHORT_TIMEOUT_S, what="cpufreq")
        freqs = parse_max_freqs(freq_txt)
        n = ci["processors"] or (max(freqs) + 1 if freqs else 1)
        big = big_cores(freqs, n)
        _, tools, _ = self.shell("command -v taskset; command -v timeout; true", timeout=SHORT_TIMEOUT_S,
                                 what="tools")
        self._has_taskset = "taskset" in tools
        self._has_timeout = "timeout" in tools
        self.facts = {
            "transport": self.kind,
            "state": st,
            "abi": abi,
            "cpu_model": ci["model"],
            "cpus": n,
            "cpu_features": ci["features"],
            "kernel_features": ci["kernel_features"],
            "max_freq_khz": {str(k): v for k, v in sorted(freqs.items())},
            "big_cores": big,
            "pinned": self._has_taskset,
            "pin_mask": cpu_mask(big) if self._has_taskset else None,
            "device_dir": self.device_dir,
        }
        self.facts.update(self.extra_facts())
        return self.facts

    def prepare(self) -> None:
        d = shlex.quote(self.device_dir)
        rc, out, err = self.shell(f"if [ -e {d} ]; then echo __TFQAT_EXISTED; fi; mkdir -p {d}",
                                  timeout=SHORT_TIMEOUT_S, what="mkdir")
        if rc != 0:
            raise BenchError(f"{self.name}: cannot create {self.device_dir}: {err.strip()[:160]}")
        self.created_dir = self.created_dir or "__TFQAT_EXISTED" not in out

    def remote(self, name: str) -> str:
        return f"{self.device_dir}/{name}"

    def command_line(self, argv: list[str], timeout: float) -> str:
        """The device-side command: cd, taskset to the big cores, timeout, exec prefix."""
        parts = []
        if self._has_timeout:
            parts += ["timeout", str(int(max(timeout, 1)))]
        if self._has_taskset and self.facts.get("pin_mask"):
            parts += ["taskset", self.facts["pin_mask"]]
        prefix = shlex.split(self.exec_prefix) if self.exec_prefix else []
        return f"cd {shlex.quote(self.device_dir)} && " + " ".join(shlex.quote(p) for p in parts + prefix + argv)

    def run_binary(self, argv: list[str], timeout: float | None = None, what: str = "benchmark") -> tuple[int, str, str]:
        t = timeout or self.timeout
        # the device-side timeout fires first, so the device is never left running our binary
        rc, out, err = self.shell(self.command_line(argv, t), timeout=t + min(30.0, 5.0 + t), what=what)
        if self._has_timeout and rc in (124, 137, 143):  # timeout(1): 124 (coreutils) or the signal (busybox)
            raise BenchError(f"{what} on {self.name} timed out after {t:.0f} s (stopped on the device)", "timeout")
        return rc, out, err


# ---------------------------------------------------------------------------------------------
class Adb(Transport):
    """Android over adb (USB or adb-over-TCP). ``adb`` may be a command line: ADB='adb -P 5038'."""

    kind = "adb"

    def __init__(self, serial: str | None = None, adb: str | None = None, **kw):
        super().__init__(**kw)
        self.default_dir = kw.get("device_dir") in (None, DEVICE_DIR)
        self.adb = shlex.split(adb or os.environ.get("ADB") or "adb")
        self.serial = serial or os.environ.get("ANDROID_SERIAL") or None

    @property
    def name(self) -> str:
        return f"adb device {self.serial}" if self.serial else "adb"

    def _classify(self, text: str, what: str) -> BenchError | None:
        t = text.lower()
        s = self.serial or "(default)"
        if "unauthorized" in t:
            return BenchError(f"adb device {s} is unauthorized: unlock the phone and accept the 'Allow USB "
                              "debugging' prompt, then retry", "unauthorized")
        if "offline" in t:
            return BenchError(f"adb device {s} is offline ({what}): reconnect it (adb reconnect) and retry",
                              "offline" if not self._checked else "disconnected")
        if "no devices/emulators found" in t or re.search(r"device '.*' not found", t) or "not found" in t and "device" in t:
            if self._checked:
                return BenchError(f"adb device {s} disconnected during {what}", "disconnected")
            return BenchError(f"no adb device {s}: connect a phone with USB debugging on (adb devices)", "no-device")
        if "more than one device" in t:
            return BenchError("more than one adb device: choose one with --serial", "usage")
        if any(k in t for k in ("error: closed", "protocol fault", "connection reset", "broken pipe",
                                "failed to connect", "cannot connect to daemon", "connection refused")):
            if self._checked:
                return BenchError(f"adb device {s} disconnected during {what} ({text.strip().splitlines()[-1][:120]})",
                                  "disconnected")
            return BenchError(f"adb: cannot reach device {s}: {text.strip().splitlines()[-1][:160]}", "no-device")
        return None

    def _adb(self, args: list[str], timeout: float, what: str, serial: bool = True) -> subprocess.CompletedProcess:
        cmd = list(self.adb) + (["-s", self.serial] if serial and self.serial else []) + args
        try:
            r = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what} on adb device {self.serial or '(default)'} timed out after {timeout:.0f} s",
                             "timeout")
        except FileNotFoundError:
            raise BenchError(f"adb not found ({self.adb[0]}): apt-get install adb, or put platform-tools on PATH",
                             "no-device")
        return r

    def _adb_checked(self, args: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
        r = self._adb(args, timeout, what)
        if r.returncode != 0:
            err = _text(r.stderr) + _text(r.stdout)
            raise self._classify(err, what) or BenchError(f"adb {args[0]} failed ({what}): {err.strip()[:200]}")
        return r

    def state(self) -> str:
        if not self.serial:
            r = self._adb(["devices"], SHORT_TIMEOUT_S, "adb devices", serial=False)
            rows = [ln.split() for ln in _text(r.stdout).splitlines()[1:] if ln.strip() and not ln.startswith("*")]
            if not rows:
                raise BenchError("no adb device: connect a phone with USB debugging on (adb devices)", "no-device")
            if len(rows) > 1:
                raise BenchError(f"more than one adb device ({', '.join(r[0] for r in rows)}): choose one with --serial",
                                 "usage")
            self.serial = rows[0][0]
        r = self._adb(["get-state"], SHORT_TIMEOUT_S, "get-state")
        out = _text(r.stdout).strip()
        if r.returncode != 0 or out != "device":
            err = _text(r.stderr) + " " + out
            e = self._classify(err, "get-state")
            if e:
                raise e
            raise BenchError(f"adb device {self.serial}: state {out or err.strip()[:80]!r}", "offline")
        return "device"

    RC_MARK = "__TFQAT_RC="

    def shell(self, cmd: str, timeout: float | None = None, what: str = "shell") -> tuple[int, str, str]:
        # The exit status travels as a last stdout line: adb clients exit 0 when the transport
        # drops mid-command (and adbd without shell protocol v2 never reports a status), so a
        # missing marker is how a lost device shows.
        r = self._adb(["shell", f"( {cmd} ); echo {self.RC_MARK}$?"], timeout or self.timeout, what)
        out, err = _text(r.stdout), _text(r.stderr)
        m = re.search(re.escape(self.RC_MARK) + r"(\d+)\s*$", out)
        if m:
            return int(m.group(1)), out[:m.start()], err
        e = self._classify(err + "\n" + out[-300:], what)
        if e:
            raise e
        if self._checked:
            raise BenchError(f"adb device {self.serial} disconnected during {what} (the command never finished: "
                             f"adb exit {r.returncode})", "disconnected")
        raise BenchError(f"adb shell failed ({what}): {(err or out).strip()[-200:] or f'exit {r.returncode}'}")

    def abi(self) -> str:
        _, out, _ = self.shell("getprop ro.product.cpu.abi", timeout=SHORT_TIMEOUT_S, what="getprop")
        return out.strip() or "unknown"

    def extra_facts(self) -> dict:
        props = {}
        for key, prop in (("manufacturer", "ro.product.manufacturer"), ("model", "ro.product.model"),
                          ("soc", "ro.soc.model"), ("android", "ro.build.version.release"),
                          ("sdk", "ro.build.version.sdk")):
            _, out, _ = self.shell(f"getprop {prop}", timeout=SHORT_TIMEOUT_S, what="getprop")
            props[key] = out.strip()
        props["serial"] = self.serial
        return props

    def push(self, local, name=None) -> str:
        dst = self.remote(name or Path(local).name)
        self._adb_checked(["push", str(local), dst], max(self.timeout, 120), f"push {Path(local).name}")
        self.pushed.append(dst)
        return dst

    def pull(self, remote, local) -> Path:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self._adb_checked(["pull", remote, str(local)], max(self.timeout, 120), f"pull {Path(remote).name}")
        return Path(local)


# ---------------------------------------------------------------------------------------------
SSH_DEVICE_DIR = "/tmp/tfqat-bench"


class Ssh(Transport):
    """A Linux board (Raspberry Pi 5 and the like) over ssh/scp, key-based (BatchMode)."""

    kind = "ssh"

    def __init__(self, host: str, ssh: str | None = None, scp: str | None = None, port: int | None = None, **kw):
        kw["device_dir"] = kw.get("device_dir") or SSH_DEVICE_DIR
        super().__init__(**kw)
        self.default_dir = kw["device_dir"] == SSH_DEVICE_DIR
        if not host:
            raise BenchError("--transport ssh needs --host user@board", "usage")
        self.host = host
        opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
                "-o", "ServerAliveCountMax=3"]
        self.ssh = shlex.split(ssh or os.environ.get("TFQAT_SSH") or "ssh") + opts + (["-p", str(port)] if port else [])
        self.scp = shlex.split(scp or os.environ.get("TFQAT_SCP") or "scp") + opts + (["-P", str(port)] if port else [])

    @property
    def name(self) -> str:
        return f"ssh {self.host}"

    def _classify(self, err: str, what: str) -> BenchError:
        t = err.lower()
        last = (err.strip().splitlines() or [""])[-1][:160]
        if "permission denied" in t or "host key verification failed" in t:
            return BenchError(f"ssh {self.host}: not authorized ({last}); set up key login (ssh-copy-id)",
                              "unauthorized")
        if self._checked:
            return BenchError(f"ssh {self.host} disconnected during {what} ({last})", "disconnected")
        return BenchError(f"ssh {self.host}: cannot reach the board ({last})", "no-device")

    def _run(self, cmd: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what} on {self.host} timed out after {timeout:.0f} s", "timeout")
        except FileNotFoundError:
            raise BenchError(f"{cmd[0]} not found: apt-get install openssh-client", "no-device")

    def state(self) -> str:
        r = self._run(self.ssh + [self.host, "true"], SHORT_TIMEOUT_S, "connect")
        if r.returncode != 0:
            raise self._classify(_text(r.stderr), "connect")
        return "device"

    def shell(self, cmd, timeout=None, what="shell"):
        r = self._run(self.ssh + [self.host, cmd], timeout or self.timeout, what)
        if r.returncode == 255:  # ssh's own failure, not the command's
            raise self._classify(_text(r.stderr), what)
        return r.returncode, _text(r.stdout), _text(r.stderr)

    def push(self, local, name=None):
        dst = self.remote(name or Path(local).name)
        r = self._run(self.scp + ["-q", str(local), f"{self.host}:{dst}"], max(self.timeout, 120), "push")
        if r.returncode != 0:
            raise self._classify(_text(r.stderr), f"push {Path(local).name}")
        self.pushed.append(dst)
        return dst

    def pull(self, remote, local):
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        r = self._run(self.scp + ["-q", f"{self.host}:{remote}", str(local)], max(self.timeout, 120), "pull")
        if r.returncode != 0:
            raise self._classify(_text(r.stderr), f"pull {Path(remote).name}")
        return Path(local)


# ---------------------------------------------------------------------------------------------
class Local(Transport):
    """The host itself: the 'device directory' is a fresh temporary directory."""

    kind = "local"

    def __init__(self, **kw):
        fresh = kw.get("device_dir") is None
        if fresh:
            kw["device_dir"] = tempfile.mkdtemp(prefix="tfqat-bench-")
        super().__init__(**kw)
        self.default_dir = self.created_dir = fresh

    def shell(self, cmd, timeout=None, what="shell"):
        t = timeout or self.timeout
        try:
            r = subprocess.run(["sh", "-c", cmd], capture_output=True, timeout=t, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what} on the host timed out after {t:.0f} s", "timeout")
        return r.returncode, _text(r.stdout), _text(r.stderr)

    def push(self, local, name=None):
        dst = self.remote(name or Path(local).name)
        Path(self.device_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy2(local, dst)
        self.pushed.append(dst)
        return dst

    def pull(self, remote, local):
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        if not Path(remote).exists():
            raise BenchError(f"local: {remote} was not written")
        shutil.copy2(remote, local)
        return Path(local)

    def extra_facts(self):
        f = super().extra_facts()
        f["hostname"] = platform.node()
        return f


def find_qemu(need_plugins: bool) -> str | None:
    """qemu-aarch64 (Debian's qemu-user: plugin support) before qemu-aarch64-static (none)."""
    names = ["qemu-aarch64"] if need_plugins else ["qemu-aarch64", "qemu-aarch64-static"]
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    return None


class Emulated(Local):
    """An aarch64 CPU under qemu-user: exact guest instruction counts per kernel, never time.

    Counts come from a TCG plugin (android_bench/native/insn_count_plugin.c) that adds each
    executed translation block's instruction count to a counter, and marker syscalls around
    each kernel call in tfqat_insn_probe: count(after) - count(before) - (the same for an empty
    marker pair) is the exact number of aarch64 instructions one call executes. Deterministic
    for a given binary, qemu -cpu model and input (the probe's data are fixed).
    """

    kind = "emulated"

    def __init__(self, qemu_cpu: str = "max", qemu: str | None = None, plugin: str | Path | None = None, **kw):
        super().__init__(**kw)
        self.qemu = qemu or find_qemu(need_plugins=True)
        if not self.qemu:
            raise BenchError("emulated: no plugin-capable qemu-aarch64 (qemu-aarch64-static has no TCG plugin "
                             "support): apt-get install qemu-user", "no-device")
        self.qemu_cpu = qemu_cpu
        self.plugin = Path(plugin) if plugin else None
        self.exec_prefix = f"{shlex.quote(self.qemu)} -cpu {shlex.quote(qemu_cpu)}"

    @property
    def name(self):
        return f"emulated aarch64 (qemu -cpu {self.qemu_cpu})"

    def abi(self):
        return "arm64-v8a"

    def check(self, expect_abi=None):
        self._checked = True
        r = subprocess.run([self.qemu, "--version"], capture_output=True, text=True, timeout=SHORT_TIMEOUT_S)
        feats = QEMU_CPU_FEATURES.get(self.qemu_cpu, [])
        known = ARM_FEATURES
        self.facts = {
            "transport": "emulated", "state": "device", "abi": "arm64-v8a",
            "cpu_model": f"qemu-aarch64 -cpu {self.qemu_cpu}",
            "qemu": (r.stdout.strip().splitlines() or ["unknown"])[0],
            "cpus": 1, "cpu_features": feats, "kernel_features": sorted({known[f] for f in feats if f in known}),
            "max_freq_khz": {}, "big_cores": [], "pinned": False, "pin_mask": None,
            "device_dir": self.device_dir, "os": "qemu-user (linux-user emulation)",
            "measure": "guest instructions (exact counts; not time)",
        }
        if expect_abi and expect_abi != "arm64-v8a":
            raise BenchError(f"emulated: the build is for {expect_abi}, not arm64-v8a", "abi")
        return self.facts

    def count_instructions(self, probe_remote: str, T: int = 128, filter_: str = "",
                           timeout: float | None = None) -> dict:
        if not self.plugin:
            raise BenchError("emulated: no instruction-count plugin given", "build")
        marks = Path(self.device_dir) / f"marks-{self.qemu_cpu}.txt"
        cmd = [self.qemu, "-cpu", self.qemu_cpu, "-plugin", f"{self.plugin},out={marks}", probe_remote,
               "--T", str(T)] + (["--filter", filter_] if filter_ else [])
        t = timeout or self.timeout
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=t, cwd=self.device_dir,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BenchError(f"instruction count under qemu -cpu {self.qemu_cpu} timed out after {t:.0f} s", "timeout")
        if r.returncode != 0 or not marks.exists():
            msg = (r.stderr or r.stdout).strip().splitlines()
            raise BenchError(f"instruction count under qemu -cpu {self.qemu_cpu} failed (rc {r.returncode}): "
                             f"{msg[-1][:200] if msg else 'no output'}")
        return parse_counts(r.stdout, marks.read_text(), self.qemu_cpu)


def parse_counts(probe_stdout: str, marks_text: str, qemu_cpu: str) -> dict:
    """Pair the probe's 'case <tag> <name> <isa>' lines with the plugin's 'mark <n> <count>'."""
    marks: dict[int, int] = {}
    total = None
    for line in marks_text.splitlines():
        p = line.split()
        if len(p) == 3 and p[0] == "mark":
            marks[int(p[1])] = int(p[2])
        elif len(p) == 2 and p[0] == "total":
            total = int(p[1])
    if 0 not in marks or 1 not in marks:
        raise BenchError("instruction count: the plugin saw no marker syscalls (wrong plugin or qemu?)")
    overhead = marks[1] - marks[0]
    isa = ""
    cases = []
    for line in probe_stdout.splitlines():
        p = line.split()
        if len(p) == 2 and p[0] == "isa":
            isa = p[1]
        if len(p) == 4 and p[0] == "case" and p[1] != "0":
            tag = int(p[1])
            a, b = marks.get(2 * tag), marks.get(2 * tag + 1)
            if a is None or b is None:
                continue
            name = p[2]
            m = re.match(r"([^/]+)/(\d+)x(\d+)/T(\d+)/(.+)$", name)
            case = {"name": name, "isa": p[3], "insns": b - a - overhead}
            if m:
                case.update(model=m.group(1), K=int(m.group(2)), N=int(m.group(3)), T=int(m.group(4)),
                            variant=m.group(5))
            cases.append(case)
    return {"qemu_cpu": qemu_cpu, "isa": isa, "marker_overhead_insns": overhead, "process_total_insns": total,
            "cases": cases}


# ---------------------------------------------------------------------------------------------
def make_transport(kind: str, **kw) -> Transport:
    common = {k: kw[k] for k in ("timeout", "exec_prefix", "device_dir") if kw.get(k) is not None}
    if kind == "adb":
        return Adb(serial=kw.get("serial"), adb=kw.get("adb"), **common)
    if kind == "ssh":
        return Ssh(host=kw.get("host"), port=kw.get("port"), **common)
    if kind == "local":
        return Local(**common)
    if kind == "emulated":
        common.pop("exec_prefix", None)
        return Emulated(qemu_cpu=kw.get("qemu_cpu") or "max", plugin=kw.get("plugin"), **common)
    raise BenchError(f"unknown transport {kind!r}; choose adb, ssh, local or emulated", "usage")


def aggregate_bench(runs: list[dict]) -> list[dict]:
    """Per case over repeated process runs: the median of the runs' medians, min p10, max p90."""
    by: dict[str, list[dict]] = {}
    for run in runs:
        for r in run.get("results", []):
            by.setdefault(r["name"], []).append(r)
    out = []
    for name, rs in by.items():
        meds = sorted(r["median_us"] for r in rs)
        mid = len(meds) // 2
        med = meds[mid] if len(meds) % 2 else 0.5 * (meds[mid - 1] + meds[mid])
        r0 = rs[0]
        out.append({"name": name, "isa": r0.get("isa"), "T": r0["T"], "K": r0["K"], "N": r0["N"],
                    "median_us": med, "p10_us": min(r["p10_us"] for r in rs), "p90_us": max(r["p90_us"] for r in rs),
                    "runs": len(rs)})
    return out


BM_TIMING = re.compile(r"Inference timings in us:\s*(.*)")


def parse_benchmark_model(text: str) -> dict:
    """benchmark_model's 'Inference timings in us: Init: a, First inference: b, Warmup (avg): c,
    Inference (avg): d' line -> {'init_us': a, 'first_us': b, 'warmup_avg_us': c, 'avg_us': d}."""
    out = {}
    m = None
    for m in BM_TIMING.finditer(text):
        pass
    if m:
        for part in m.group(1).split(","):
            k, _, v = part.partition(":")
            key = {"init": "init_us", "first inference": "first_us", "warmup (avg)": "warmup_avg_us",
                   "inference (avg)": "avg_us"}.get(k.strip().lower())
            try:
                if key:
                    out[key] = float(v.strip())
            except ValueError:
                pass
    return out


def default_benchmark_model(abi: str) -> Path | None:
    """litert-cli's cache: ~/.cache/litert-cli/binaries/<abi>/benchmark_model."""
    p = Path.home() / ".cache" / "litert-cli" / "binaries" / abi / "benchmark_model"
    return p if p.exists() else None


#: ``--benchmark-model litert-python``: our runner on the LiteRT Python runtime
#: (android_bench/litert_benchmark.py) instead of a stock binary; it runs where this host's Python
#: runs (``--transport local``, or ssh to this host).
PYTHON_RUNNER = "litert-python"


def python_runner_launcher(directory: Path) -> Path:
    """An executable ``benchmark_model`` that starts :mod:`android_bench.litert_benchmark` with this
    Python (pushed to the device directory like the stock binary)."""
    from . import REPO_ROOT

    path = Path(directory) / "benchmark_model"
    path.write_text(f"#!{os.path.realpath(sys.executable)}\n"
                    "import sys\n"
                    f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
                    "from android_bench.litert_benchmark import main\n"
                    "sys.exit(main())\n")
    path.chmod(0o755)
    return path


def check_models(models: list[str | Path]) -> list[dict]:
    """Every ``--model`` before anything runs: an existing ``.tflite`` file that reads as a TFLite
    flatbuffer. Returns per model its path, signatures and whether it holds TFQAT_* ops (those run
    only with our delegate). One-line :class:`BenchError` (kind usage) naming the file otherwise."""
    from tfqat.runtime import TfqatRuntimeError, model_ops, model_signatures

    out = []
    for m in models:
        path = Path(m)
        if not path.exists():
            raise BenchError(f"--model {path}: no such file; give the path of a .tflite (python -m tfqat.export "
                             "writes model.tflite and model_float.tflite)", "usage")
        if not path.is_file():
            raise BenchError(f"--model {path}: not a file; give the path of a .tflite", "usage")
        if path.suffix != ".tflite":
            raise BenchError(f"--model {path}: not a .tflite file; give an exported model.tflite", "usage")
        data = path.read_bytes()
        try:
            ops = model_ops(data)
            sigs = model_signatures(data)
        except TfqatRuntimeError as e:
            raise BenchError(f"--model {path}: {e}; export it again (python -m tfqat.export)", "usage") from None
        out.append({"path": path, "signatures": sigs, "quantized": any(o.startswith("TFQAT_") for o in ops)})
    names = [m["path"].name for m in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BenchError(f"--model: two models named {dup[0]} (they would overwrite each other on the device); "
                         "rename one", "usage")
    return out


def pick_signature(signatures: list[str], wanted: str | None = None) -> str | None:
    """The signature benchmark_model should run: ``wanted``, else ``prefill`` (Table IV's prompt
    pass), else the first; None for a model with at most one signature (no flag needed)."""
    if wanted:
        if signatures and wanted not in signatures:
            raise BenchError(f"--signature {wanted}: the model has {', '.join(signatures)}", "usage")
        return wanted if signatures else None
    if len(signatures) <= 1:
        return None
    return "prefill" if "prefill" in signatures else signatures[0]


# ---------------------------------------------------------------------------------------------
def run_session(transport: Transport, build_dir: Path | None, manifest: dict | None, out_dir: Path, *,
                filters: list[str] | None = None, reps: int = 30, bench_runs: int = 3, bench_warmup: int = 1,
                models: list[str] | None = None, benchmark_model: str | None = None, num_threads: int = 1,
                num_runs: int = 50, warmup_runs: int = 5, qemu_cpus: list[str] | None = None,
                count_T: int = 128, count_filter: str = "", signature: str | None = None,
                builder=None, log=print) -> dict:
    """One run on one device. Writes out_dir/result.json after every step, out_dir/raw/* as pulled,
    and the report (report.md, report.json, report.png) at the end, also after a failure.

    Order: the inputs (``models``, ``benchmark_model``) are checked first, then the device; only
    then ``builder()`` (``-> (build_dir, manifest)``, e.g. a cross build of minutes) runs, when
    ``build_dir`` is None. Nothing is pushed before all of that has passed.
    """
    from . import report as report_mod

    model_info = check_models(models or [])
    if benchmark_model and benchmark_model != PYTHON_RUNNER and not Path(benchmark_model).is_file():
        raise BenchError(f"--benchmark-model {benchmark_model}: no such file; give LiteRT's benchmark_model "
                         f"for the device, or {PYTHON_RUNNER} on this host", "usage")
    if model_info and isinstance(transport, Emulated):
        raise BenchError("--model: the emulated transport counts kernel instructions only; run models over "
                         "--transport adb, ssh or local", "usage")
    for m in model_info:
        m["signature"] = pick_signature(m["signatures"], signature)
    if build_dir is None and builder is None:
        raise BenchError("run_session needs a build_dir and manifest, or a builder", "usage")
    manifest = manifest or {}
    out_dir = Path(out_dir)
    (out_dir / "raw").mkdir(parents=True, exist_ok=True)
    result: dict = {
        "schema": SCHEMA, "status": "running", "error": None, "transport": transport.kind,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": {}, "build": manifest,
        "settings": {"filters": filters or ["llama58m"], "reps": reps, "bench_runs": bench_runs,
                     "bench_warmup_runs": bench_warmup, "num_threads": num_threads, "num_runs": num_runs,
                     "warmup_runs": warmup_runs},
        "microbench": {"runs": [], "aggregate": []}, "benchmark_model": [], "insn_counts": [], "steps": [],
        "cleanup": None,
    }

    def save():
        atomic_write_json(out_dir / "result.json", result)

    def step(msg):
        result["steps"].append(msg)
        log(f"[android_bench] {msg}")
        save()

    error: BenchError | None = None
    try:
        result["device"] = transport.check()
        step(f"checked {transport.name}: abi {result['device']['abi']}, big cores {result['device']['big_cores']}, "
             f"features {' '.join(result['device']['kernel_features']) or '-'}")
        if build_dir is None:
            build_dir, manifest = builder()
            result["build"] = manifest
            step(f"build: {manifest.get('toolchain')} in {build_dir}")
        build_dir = Path(build_dir)
        artifacts = manifest.get("artifacts", {})
        transport.require_abi("arm64-v8a" if manifest.get("toolchain") != "host" else None)
        bm = benchmark_model or (str(default_benchmark_model(result["device"]["abi"]) or "") or None)
        if model_info and not bm and transport.kind == "local":
            bm = PYTHON_RUNNER
        if model_info and not bm:
            raise BenchError(f"--model needs benchmark_model: none given and none in ~/.cache/litert-cli/binaries/"
                             f"{result['device']['abi']}/; pass --benchmark-model PATH (LiteRT's, for this device)",
                             "usage")
        for m in model_info:  # said now, not after the microbenchmarks
            m["skip"] = _delegate_problem(transport, manifest) if m["quantized"] else None
            if m["skip"]:
                step(f"benchmark_model {m['path'].name} will be skipped: its TFQAT_* ops need our delegate, "
                     f"and {m['skip']}")
        transport.prepare()
        if isinstance(transport, Emulated):
            probe = build_dir / artifacts["tfqat_insn_probe"]["path"]
            remote_probe = transport.push(probe)
            cpus = qemu_cpus or [transport.qemu_cpu]
            result["device"]["cpu_model"] = ", ".join(f"qemu-aarch64 -cpu {c}" for c in cpus)
            for cpu in cpus:
                transport.qemu_cpu = cpu
                counts = transport.count_instructions(remote_probe, T=count_T, filter_=count_filter)
                atomic_write_json(out_dir / "raw" / f"insn_counts-{cpu}.json", counts)
                result["insn_counts"].append(counts)
                step(f"counted instructions under qemu -cpu {cpu} ({counts['isa']}): {len(counts['cases'])} kernels")
        else:
            bench = transport.push(build_dir / artifacts["tfqat_bench"]["path"])
            transport.shell(f"chmod 755 {shlex.quote(bench)}", timeout=SHORT_TIMEOUT_S, what="chmod")
            step(f"pushed tfqat_bench to {transport.device_dir}")
            flist = filters or ["llama58m"]
            for w in range(bench_warmup):
                for f in flist:
                    rc, out, err = transport.run_binary(["./tfqat_bench", "--filter", f, "--reps", "3"],
                                                        what="microbenchmark warm-up")
                    if rc != 0:
                        raise BenchError(f"tfqat_bench warm-up failed (rc {rc}): {(err or out).strip()[-200:]}")
                step(f"warm-up run {w + 1}/{bench_warmup} done")
            for i in range(bench_runs):
                for j, f in enumerate(flist):
                    name = f"bench_run{i + 1}_{j + 1}.json"
                    transport.pushed.append(transport.remote(name))  # written there: cleanup removes it
                    rc, out, err = transport.run_binary(["./tfqat_bench", "--filter", f, "--reps", str(reps),
                                                         "--json", name], what=f"microbenchmark run {i + 1}")
                    if rc != 0:
                        raise BenchError(f"tfqat_bench run {i + 1} failed (rc {rc}): {(err or out).strip()[-200:]}")
                    local = transport.pull(transport.remote(name), out_dir / "raw" / name)
                    data = json.loads(local.read_text())
                    data["run"], data["filter"] = i + 1, f
                    result["microbench"]["runs"].append(data)
                    if "machine" in data:
                        result["device"].setdefault("bench_machine", data["machine"])
                result["microbench"]["aggregate"] = aggregate_bench(result["microbench"]["runs"])
                step(f"microbenchmark run {i + 1}/{bench_runs} pulled")
            if model_info:
                _run_benchmark_model(transport, bm, model_info, build_dir, manifest, result,
                                     out_dir, num_threads, num_runs, warmup_runs, step)
        result["status"] = "ok"
    except BenchError as e:
        error = e
        result["status"] = "partial" if (result["microbench"]["runs"] or result["insn_counts"]
                                         or result["benchmark_model"]) else "failed"
        result["error"] = str(e)
        result["error_kind"] = e.kind
    finally:  # nothing of this run on the device: leave it alone (and say so)
        done = transport.cleanup() if (transport.pushed or transport.created_dir) else True
        result["cleanup"] = transport.cleanup_report(done)
        result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        save()
        try:
            report_mod.write_report(result, out_dir)
        except Exception as e:  # a report failure must not hide the run's own error
            if error is None:
                raise
            log(f"[android_bench] report not written: {e}")
    if error:
        raise error
    return result


def _delegate_problem(transport, manifest: dict) -> str | None:
    """Why this build's libtfqat_ops.so cannot serve benchmark_model on this device, or None."""
    so = manifest.get("artifacts", {}).get("libtfqat_ops.so")
    if not so:
        return "this build has no libtfqat_ops.so"
    if transport.kind == "adb" and manifest.get("toolchain") != "android-ndk":
        return (f"libtfqat_ops.so of this build loads in {manifest.get('delegate_loads_in', 'glibc processes')}, "
                "not Android's (build with ANDROID_NDK_HOME)")
    return None


def _run_benchmark_model(transport, bm: str, models: list[dict], build_dir: Path, manifest: dict, result: dict,
                         out_dir: Path, num_threads: int, num_runs: int, warmup_runs: int, step) -> None:
    """Each model (from :func:`check_models`) under benchmark_model: a float model as is, a model
    with TFQAT_* ops with our delegate (without it LiteRT cannot resolve them); the signature named
    by ``--signature_to_run_for`` when the model has several (the stock tool refuses to guess)."""
    if bm == PYTHON_RUNNER:
        runner = PYTHON_RUNNER
        with tempfile.TemporaryDirectory(prefix="tfqat-runner-") as tmp:
            remote_bm = transport.push(python_runner_launcher(Path(tmp)), "benchmark_model")
    else:
        runner = "benchmark_model"
        remote_bm = transport.push(Path(bm), "benchmark_model")
    transport.shell(f"chmod 755 {shlex.quote(remote_bm)}", timeout=SHORT_TIMEOUT_S, what="chmod")
    delegate = None
    so = manifest.get("artifacts", {}).get("libtfqat_ops.so")
    for m in models:
        model = m["path"]
        if m.get("skip"):  # announced before the microbenchmarks
            continue
        if m["quantized"] and delegate is None:
            delegate = transport.push(build_dir / so["path"])
        remote_model = transport.push(model)
        argv = ["./benchmark_model", f"--graph={remote_model}", f"--num_threads={num_threads}",
                f"--num_runs={num_runs}", f"--warmup_runs={warmup_runs}"]
        if m["signature"]:
            argv.append(f"--signature_to_run_for={m['signature']}")
        if m["quantized"]:
            argv.append(f"--external_delegate_path={delegate}")
        rc, out, err = transport.run_binary(argv, what=f"benchmark_model {model.name}")
        tag = f"{model.stem}{'-tfqat' if m['quantized'] else ''}"
        (out_dir / "raw").mkdir(parents=True, exist_ok=True)
        (out_dir / "raw" / f"benchmark_model-{tag}.txt").write_text(out + err)
        if rc != 0:
            raise BenchError(f"benchmark_model on {model.name} failed (rc {rc}): {(err or out).strip()[-200:]}")
        timing = parse_benchmark_model(out + "\n" + err)
        if "avg_us" not in timing:
            raise BenchError(f"benchmark_model on {model.name} printed no 'Inference timings in us' line; see "
                             f"{out_dir / 'raw' / f'benchmark_model-{tag}.txt'}")
        result["benchmark_model"].append({"model": model.name, "signature": m["signature"],
                                          "delegate": "tfqat" if m["quantized"] else "none", "runner": runner,
                                          "num_threads": num_threads, "num_runs": num_runs,
                                          "warmup_runs": warmup_runs, **timing})
        step(f"benchmark_model {model.name}{' ' + m['signature'] if m['signature'] else ''} "
             f"({'tfqat delegate' if m['quantized'] else 'stock ops'}, {runner}): avg {timing['avg_us']:.1f} us")
