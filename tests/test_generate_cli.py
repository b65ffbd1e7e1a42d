"""``python -m tfqat.generate``: bad arguments and a damaged tokenizer are one line (exit 2) before
any model is loaded; Ctrl-C while streaming ends the line, keeps what was printed, exits 130
without a traceback. The model is the micro w4a4-8 export of tests/test_export.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from test_export import exported, ops_lib  # noqa: F401 (fixtures: the micro export, the delegate)

from tfqat.generate import main

PY = sys.executable


def _gen_args(exported, *extra):
    return ["--model", str(exported["dir"] / "model.tflite"), "--prompt", "It is a truth", *extra]


@pytest.fixture
def lib_env(exported, monkeypatch):
    monkeypatch.setenv("TFQAT_OPS_LIB", exported["lib"])


@pytest.mark.parametrize("extra, expect", [
    (["--max-new-tokens", "-5"], "--max-new-tokens -5: must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["--top-k", "-3", "--temperature", "0.8"], "--top-k -3: must be 0 (all tokens) or a positive count"),
    (["--temperature", "-1"], "--temperature -1: must be 0 (greedy) or a positive number"),
    (["--temperature", "nan"], "--temperature nan: must be 0 (greedy) or a positive number"),
    (["--top-k", "40"], "--top-k 40 samples, but --temperature is 0 (greedy); add --temperature"),
    (["--threads", "0"], "--threads 0: must be at least 1"),
    (["--seed", "-1", "--temperature", "0.5"], "--seed -1: must be 0 or more"),
    (["--system", "Be brief."], "--system is the chat's system message; add --chat"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, extra, expect):
    """Checked before the model or tokenizer is touched: the paths here do not even exist."""
    rc = main(["--model", str(tmp_path / "absent.tflite"), "--prompt", "Hi", *extra])
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == ""
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expect}"), lines


def test_threads_zero_is_not_blamed_on_the_model(exported, lib_env, capsys):
    assert main(_gen_args(exported, "--threads", "0")) == 2
    err = capsys.readouterr().err
    assert "--threads 0" in err and "model" not in err


@pytest.mark.parametrize("content", [b'{"version": "1.0", "model": {"type": "BPE", "vocab": {"a"',
                                     b"", b"\x89PNG\r\n\x1a\n\x00\x00binary"])
def test_damaged_tokenizer_is_one_line(exported, lib_env, tmp_path, capsys, content):
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(content)
    assert main(_gen_args(exported, "--tokenizer", str(bad))) == 2
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith(f"error: {bad}: not a readable tokenizer (") and "pass --tokenizer" in lines[0]
    assert cap.out == ""


def test_ctrl_c_in_process_keeps_the_stream(exported, lib_env, monkeypatch, capsys):
    """KeyboardInterrupt raised after three tokens: those stay printed, the line ends, exit 130."""
    from tfqat.runtime import LiteModel

    def interrupted(self, prompt, *a, **k):
        # fixed ordinary tokens (the prompt's own), not the micro model's sampled ones: a model built
        # after other tests drew from TF's RNG may emit <|endoftext|> first and end before Ctrl-C
        for i, t in enumerate(list(prompt)[:3] + [prompt[0]]):
            if i == 3:
                raise KeyboardInterrupt
            yield t

    monkeypatch.setattr(LiteModel, "generate", interrupted)
    rc = main(_gen_args(exported, "--max-new-tokens", "20"))
    cap = capsys.readouterr()
    assert rc == 130
    assert cap.out.startswith("It is a truth") and cap.out.endswith("\n") and cap.out.count("\n") == 1
    assert len(cap.out) > len("It is a truth\n")  # the three tokens generated before Ctrl-C
    assert cap.err.splitlines() == ["interrupted after 3 new tokens"]


# The real signal: generation slowed to 0.2 s per decoded token in the child (the micro model would
# finish all 90 tokens before the signal arrives), SIGINT sent once streaming has begun.
SLOW_CHILD = """
import sys, time
from tfqat import runtime
decode = runtime.LiteModel.decode
def slow(self, token):
    time.sleep(0.2)
    return decode(self, token)
runtime.LiteModel.decode = slow
from tfqat.generate import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigint_while_streaming_exits_130_without_traceback(exported):
    env = {**os.environ, "TFQAT_OPS_LIB": exported["lib"], "PYTHONUNBUFFERED": "1"}
    # A non-interactive CI shell starts background jobs with SIGINT ignored, which the child would
    # inherit (Python then installs no KeyboardInterrupt handler): give the child the default back.
    p = subprocess.Popen([PY, "-c", SLOW_CHILD, *_gen_args(exported, "--max-new-tokens", "90")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        got = b""
        deadline = time.monotonic() + 120
        while len(got) <= len(b"It is a truth") + 1 and time.monotonic() < deadline:  # a token or two out
            got += os.read(p.stdout.fileno(), 1)
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    out, err = (got + rest).decode(), err.decode()
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    ours = [ln for ln in err.splitlines() if not ln.startswith("INFO: ")]  # LiteRT's XNNPACK notice
    assert len(ours) == 1 and ours[0].startswith("interrupted after "), err
    assert out.startswith("It is a truth") and out.endswith("\n") and out.count("\n") == 1
    n = int(ours[0].split()[2])
    assert 1 <= n < 90  # stopped mid-stream, with what it had generated
