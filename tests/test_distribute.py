"""tf.distribute: two CPU workers (MultiWorkerMirroredStrategy on 127.0.0.1) == one worker on
the same global batch, including a resume mid-run, and the train CLI (FP + QAT) under
--strategy multiworker; bad TF_CONFIG errors are one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

WORKER = textwrap.dedent('''
    import json, os, sys
    import numpy as np
    out, run_dir, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    from tfqat.distribute import make_strategy
    strategy = make_strategy(kind)  # first TF work of the process
    import tensorflow as tf
    from tfqat.config import ModelConfig, TrainConfig
    from tfqat.models import build_model
    from tfqat.distribute import is_chief
    from tfqat.training import lm_loss, seed_everything, train_loop

    mcfg = ModelConfig(vocab_size=64, hidden=16, layers=1, heads=2, kv_heads=1, ffn=32, max_positions=16)
    tcfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=1, log_every=1,
                       strategy=kind)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 64, size=(16, 4, 9)).astype(np.int32)  # (step, B, L+1)

    def dataset(start):
        for s in range(start, 16):
            yield tf.constant(data[s, :, :-1]), tf.constant(data[s, :, 1:])

    def factory():
        seed_everything(0)
        m = build_model(mcfg, name="m")
        return m, lm_loss(m)

    # two runs: steps 0-2, then resume from the chief's checkpoint to step 4
    r1 = train_loop(Path(run_dir), factory, None, dataset, tcfg, 2, 32, progress=False, strategy=strategy)
    r2 = train_loop(Path(run_dir), factory, None, dataset, tcfg, 4, 32, progress=False, strategy=strategy)
    assert r2.resumed_from == 2, r2.resumed_from
    if is_chief(strategy):
        np.savez(out, *[np.asarray(v.numpy()) for v in r2.model.weights], loss=r2.final_loss)
    print("OK", strategy.num_replicas_in_sync, flush=True)
''').replace("from tfqat.models import build_model", "from pathlib import Path\nfrom tfqat.models import build_model")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env(tf_config=None):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2",
               OMP_NUM_THREADS="1", TFQAT_WORKER_WAIT_S="20")
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def test_two_workers_match_one(tmp_path, procs):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    run_dir = tmp_path / "mw"
    for i in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"mw{i}.npz"), str(run_dir), "multiworker"],
            env=_env({"cluster": cluster, "task": {"type": "worker", "index": i}}),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    procs.append(subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "one.npz"), str(tmp_path / "one"), "default"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        outs.append(out)
        assert p.returncode == 0, out[-3000:]
    assert "OK 2" in outs[0] and "OK 2" in outs[1] and "OK 1" in outs[2]
    mw, one = np.load(tmp_path / "mw0.npz"), np.load(tmp_path / "one.npz")
    assert not (tmp_path / "mw1.npz").exists()  # only the chief reports
    assert (run_dir / "metrics.csv").is_file()
    assert not (run_dir / ".workers" / "worker_1").exists()  # non-chief temp checkpoints removed
    keys = [k for k in one.files if k != "loss"]
    assert len(keys) > 5
    for k in keys:
        np.testing.assert_allclose(mw[k], one[k], rtol=1e-4, atol=1e-5)
    assert abs(float(mw["loss"]) - float(one["loss"])) < 1e-4


def test_unreachable_worker_is_one_line(tmp_path):
    ports = _free_ports(2)
    tfc = {"cluster": {"worker": [f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"]},
           "task": {"type": "worker", "index": 0}}
    code = ("import os; from tfqat.distribute import make_strategy, DistributeError\n"
            "try:\n    make_strategy('multiworker', wait_s=1.0)\n"
            "except DistributeError as e:\n    print('ERR', e); raise SystemExit(3)\n")
    p = subprocess.run([sys.executable, "-c", code], env=_env(tfc), capture_output=True, text=True, timeout=60)
    assert p.returncode == 3, p.stdout + p.stderr
    line = p.stdout.strip().splitlines()[-1]
    assert "no reachable worker" in line and f"127.0.0.1:{ports[1]}" in line


@pytest.mark.parametrize("raw, msg", [
    (None, "not set"), ("{bad", "not valid JSON"), ('{"cluster": {}}', "names no worker"),
    ('{"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 3}}', "not in its cluster"),
    ('{"cluster": {"worker": ["nohostport"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
])
def test_bad_tf_config(raw, msg, monkeypatch):
    from tfqat.distribute import DistributeError, parse_tf_config

    monkeypatch.delenv("TF_CONFIG", raising=False)
    if raw is not None:
        monkeypatch.setenv("TF_CONFIG", raw)
    with pytest.raises(DistributeError, match=msg) as e:
        parse_tf_config()
    assert "\n" not in str(e.value)


def test_train_cli_two_workers_qat_match_one(tmp_path, procs):
    """``python -m tfqat.train --strategy multiworker`` on two CPU workers (FP teacher, then QAT
    w4a8 from it) gives the same teacher and student as one worker on the same global batch; only
    the chief writes the report."""
    from test_train_cli import write_micro

    # entropy off: its -log(batch mean) is not a sum over examples, so R replicas each taking
    # -log of their own slice's mean is a (slightly) different loss; every other term is a mean
    config = write_micro(tmp_path, qat={"recipe": "w4a8", "ptq_recipes": ["w8a8"],
                                        "losses": {"entropy": 0.0}})
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    args = [sys.executable, "-m", "tfqat.train", "--config", str(config), "--quiet", "--no-export"]
    for i in range(2):
        procs.append(subprocess.Popen(
            args + ["--name", "mw", "--strategy", "multiworker"], cwd=tmp_path,
            env=_env({"cluster": cluster, "task": {"type": "worker", "index": i}}),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    procs.append(subprocess.Popen(args + ["--name", "one"], cwd=tmp_path, env=_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        outs.append(out)
        assert p.returncode == 0, out[-3000:]
    assert "the chief evaluates" in outs[1] and "report:" in outs[0] and "report:" in outs[2]
    import h5py

    def weights(path):
        with h5py.File(path) as f:
            out = {}
            f.visititems(lambda n, o: out.__setitem__(n, np.asarray(o)) if isinstance(o, h5py.Dataset) else None)
            return out

    runs = tmp_path / "runs"
    for rel in ("fp/teacher.weights.h5", "qat-w4a8/student.weights.h5"):
        mw, one = weights(runs / "mw" / rel), weights(runs / "one" / rel)
        assert mw.keys() == one.keys() and len(mw) > 10, rel
        for k in one:  # summation order differs (all-reduce): within 1% of each tensor's range
            if one[k].dtype == bool:  # quantizers' "initialized" flags
                assert (mw[k] == one[k]).all(), (rel, k)
                continue
            tol = 1e-2 * float(np.abs(one[k]).max()) + 1e-6
            if "quantizer" in k:
                # an activation scale of ~6e-4 moves by up to lr = 2.5e-4 per Adam step whatever its
                # gradient's size, so all-reduce order in a near-zero gradient shows up amplified;
                # the students' perplexities (below) must still agree to 1e-3
                tol = 3 * tol
            assert np.abs(mw[k] - one[k]).max() <= tol, (rel, k, np.abs(mw[k] - one[k]).max(), tol)
    mw_rows = json.loads((runs / "mw" / "report.json").read_text())["rows"]
    one_rows = json.loads((runs / "one" / "report.json").read_text())["rows"]
    assert [r["method"] for r in mw_rows] == ["FP", "RTN", "QAT (full method)"]
    for a, b in zip(mw_rows, one_rows):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-3)
