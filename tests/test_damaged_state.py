"""Damaged run state (tfqat.checkpoints, tfqat.training): corrupt checkpoints fall back to the previous
kept one, a garbled ``checkpoint`` index is rebuilt, no readable checkpoint is refused, a full disk
while saving is one line with no temporary left, and damaged ``.weights.h5`` / JSON files are one line.

A micro LLaMA (hidden 16, one layer) trains 8 steps on random tokens that are a pure function of the
step, checkpointing at 4 and 8: what a resumed run computes can be compared with the uninterrupted
run exactly.
"""

from __future__ import annotations

import csv
import errno
import os
import shutil
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

STEPS, BATCH, SEQ = 8, 2, 16
MODEL = dict(vocab_size=64, hidden=16, layers=1, heads=2, kv_heads=1, ffn=32, max_positions=32)


def _cfg():
    from tfqat.config import TrainConfig

    return TrainConfig(steps=STEPS, batch_size=BATCH, warmup_steps=1, checkpoint_every=4, log_every=1)


def _dataset(start):
    for step in range(start, STEPS):
        x = np.random.default_rng(step).integers(0, MODEL["vocab_size"], (BATCH, SEQ + 1)).astype(np.int32)
        yield x[:, :-1], x[:, 1:]


def _train(run_dir: Path):
    import keras

    from tfqat.config import ModelConfig
    from tfqat.models import build_model
    from tfqat.training import lm_loss, train_loop

    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(**MODEL))
    res = train_loop(run_dir, model, lm_loss(model), _dataset, _cfg(), STEPS, BATCH * SEQ, progress=False)
    return res, model


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One uninterrupted run (checkpoints ckpt-4 and ckpt-8), its losses and final weights."""
    run = tmp_path_factory.mktemp("pristine") / "run"
    res, model = _train(run)
    assert sorted(p.name for p in (run / "ckpt").glob("*.index")) == ["ckpt-4.index", "ckpt-8.index"]
    return {"dir": run, "losses": _losses(run), "weights": [w.numpy() for w in model.weights], "res": res}


def _copy(pristine, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(pristine["dir"], run)
    return run


def _warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("warning:")]


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "data cut in half": lambda ck: _cut_in_half(next(ck.glob("ckpt-8.data-*"))),
    "index cut in half": lambda ck: _cut_in_half(ck / "ckpt-8.index"),
    "a flipped bit in the data": lambda ck: _flip_a_byte(next(ck.glob("ckpt-8.data-*"))),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(pristine, tmp_path, capsys, damage):
    run = _copy(pristine, tmp_path)
    DAMAGE[damage](run / "ckpt")
    res, model = _train(run)
    warnings = _warnings(capsys.readouterr().err)
    assert len(warnings) == 1, warnings
    assert "ckpt-8 is corrupt" in warnings[0] and "resuming from the previous checkpoint ckpt-4" in warnings[0]
    assert res.resumed_from == 4 and res.steps == STEPS
    # steps 5..8 retrained on the same batches: the uninterrupted run's losses and weights
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in range(1, 9)], [pristine["losses"][s] for s in range(1, 9)],
                               rtol=1e-5)
    for got, want in zip(model.weights, pristine["weights"]):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # the damaged files are kept aside, the new ckpt-8 is whole, and the next run resumes quietly
    assert {p.name.split(".")[0] for p in (run / "ckpt" / "corrupt").iterdir()} == {"ckpt-8"}
    from tfqat.checkpoints import checkpoint_problem

    assert checkpoint_problem(run / "ckpt" / "ckpt-8") is None
    again, _ = _train(run)
    assert again.resumed_from == STEPS and _warnings(capsys.readouterr().err) == []


def test_garbled_index_is_recovered_from_the_checkpoint_files(pristine, tmp_path, capsys):
    run = _copy(pristine, tmp_path)
    index = run / "ckpt" / "checkpoint"
    index.write_bytes(b'model_checkpoint_path: "ckpt-8\nall_model###\x00\xff garbage')
    stale = run / "ckpt" / "ckpt-12_temp"  # what a save killed half-way leaves
    stale.mkdir()
    (stale / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"half")
    res, _ = _train(run)
    err = capsys.readouterr().err
    warnings = _warnings(err)
    assert len(warnings) == 1 and "checkpoint is unreadable" in warnings[0] and "ckpt-8" in warnings[0], err
    assert "ParseError" not in err  # TF's own multi-line complaint is not shown
    assert res.resumed_from == STEPS  # no silent restart from step 0
    assert not stale.exists()
    import tensorflow as tf

    assert Path(tf.train.latest_checkpoint(str(run / "ckpt"))).name == "ckpt-8"  # the index is whole again


def test_no_readable_checkpoint_is_refused_in_one_line(pristine, tmp_path):
    from tfqat.cli import UserError

    run = _copy(pristine, tmp_path)
    for n in (4, 8):
        _cut_in_half(next((run / "ckpt").glob(f"ckpt-{n}.data-*")))
    (run / "ckpt" / "checkpoint").write_text("garbage")
    before = sorted(p.name for p in (run / "ckpt").iterdir())
    with pytest.raises(UserError) as e:
        _train(run)
    msg = str(e.value)
    assert "\n" not in msg and "no readable checkpoint" in msg and "ckpt-8: IndexError" in msg
    assert f"delete {run / 'ckpt'}" in msg
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == before  # nothing moved or deleted
    # an index whose checkpoints are gone is refused as well
    for p in (run / "ckpt").glob("ckpt-*"):
        p.unlink()
    (run / "ckpt" / "checkpoint").write_text('model_checkpoint_path: "ckpt-8"\n')
    with pytest.raises(UserError, match="holds no ckpt-\\* files"):
        _train(run)


def test_disk_full_while_saving_is_one_line_and_leaves_no_temp(pristine, tmp_path, monkeypatch, capsys):
    """TF writes ckpt-N_temp/ and then merges it into place; the merge fails as on a full disk."""
    from tensorflow.python.checkpoint import functional_saver

    from tfqat.cli import die

    merge = functional_saver.gen_io_ops.merge_v2_checkpoints
    calls = []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # ckpt-4 is written, ckpt-8 hits the full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return merge(*args, **kwargs)

    monkeypatch.setattr(functional_saver.gen_io_ops, "merge_v2_checkpoints", full_disk)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        with die():
            _train(run)
    assert e.value.code == 2 and len(calls) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: disk full while writing") and "ckpt-8" in err[0], err
    assert "rerun the same command" in err[0]
    ck = run / "ckpt"
    assert not list(ck.glob("*_temp*")) and not list(run.rglob("*.tmp"))
    assert sorted(p.name for p in ck.glob("*.index")) == ["ckpt-4.index"]
    monkeypatch.undo()  # space freed: the rerun resumes from ckpt-4 and matches the uninterrupted run
    res, _ = _train(run)
    assert res.resumed_from == 4
    losses = _losses(run)
    np.testing.assert_allclose([losses[s] for s in range(1, 9)], [pristine["losses"][s] for s in range(1, 9)],
                               rtol=1e-5)


def _small_model(hidden=16):
    import keras

    from tfqat.config import ModelConfig
    from tfqat.models import build_model

    keras.utils.set_random_seed(1)
    m = build_model(ModelConfig(**{**MODEL, "hidden": hidden}))
    m(np.zeros((1, 2), np.int32))
    return m


def test_weights_files_damaged_missing_or_foreign_are_one_line(tmp_path):
    from tfqat.cli import UserError
    from tfqat.checkpoints import load_weights_checked, save_weights_atomic

    src = _small_model()
    path = tmp_path / "fp" / "teacher.weights.h5"
    save_weights_atomic(src, path)
    dst = _small_model()
    dst.set_weights([np.zeros_like(w) for w in dst.get_weights()])
    load_weights_checked(dst, path)
    for a, b in zip(dst.get_weights(), src.get_weights()):
        np.testing.assert_array_equal(a, b)

    _cut_in_half(path)
    fix = "delete it and rerun python -m tfqat.train: the teacher is rebuilt from its last checkpoint"
    with pytest.raises(UserError) as e:
        load_weights_checked(_small_model(), path, fix=fix)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: damaged weights file") and msg.endswith(fix)
    with pytest.raises(UserError, match="no such weights file"):
        load_weights_checked(_small_model(), tmp_path / "missing.weights.h5")
    save_weights_atomic(_small_model(hidden=32), path)  # another config's weights
    with pytest.raises(UserError) as e:
        load_weights_checked(_small_model(), path)
    assert "\n" not in str(e.value) and "cannot load into this model" in str(e.value)


def test_disk_full_while_saving_weights_leaves_no_temp(tmp_path, monkeypatch):
    from tfqat.cli import UserError
    from tfqat.checkpoints import save_weights_atomic

    model = _small_model()
    path = tmp_path / "student.weights.h5"

    def full_disk(filepath, *a, **k):
        Path(filepath).write_bytes(b"\x89HDF\r\n\x1a\n partial")  # what h5py had written so far
        raise OSError("Can't synchronously write data (file write failed: errno = 28, error message = "
                      "'No space left on device')")

    monkeypatch.setattr(model, "save_weights", full_disk)
    with pytest.raises(UserError) as e:
        save_weights_atomic(model, path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"disk full while writing {path}")
    assert list(tmp_path.iterdir()) == []


def test_damaged_json_is_one_line(tmp_path):
    from tfqat.cli import UserError
    from tfqat.checkpoints import read_json_checked

    path = tmp_path / "eval_fp.json"
    path.write_text('{"perplexity": 12.5, "blimp": {"overall"')
    with pytest.raises(UserError) as e:
        read_json_checked(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: damaged JSON")
    path.write_text('{"perplexity": 12.5}')
    assert read_json_checked(path) == {"perplexity": 12.5}
