"""``python -m tfqat.train``: --help, a micro end-to-end default job, and resume after interruption."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def write_micro(tmp_path: Path, **sections) -> Path:
    """A user corpus of a few KB and a micro config (hidden 32, 2 layers, a few steps).

    The corpus is BLiMP's own good sentences (2 per paradigm), so the micro BPE knows BLiMP's
    words and its sentences stay short: few padded widths, few traces, a fast test.
    """
    from tfqat.evaluate import load_blimp

    sentences = [p["sentence_good"] for p in load_blimp(2)]
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text("\n".join(sentences[i::4]))
    cfg = {
        "model": {"arch": "llama", "vocab_size": 512, "hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2,
                  "ffn": 64, "max_positions": 128},
        "data": {"corpus": [str(corpus)], "valid": ["doc2"], "test": ["doc3"], "seq_len": 32,
                 "cache_dir": str(tmp_path / "runs" / "cache")},
        "train": {"steps": 8, "batch_size": 4, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 2},
        "eval": {"max_tokens": 200, "blimp_pairs_per_paradigm": 1, "batch_size": 8},
        "qat": {"train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 2},
                "calib_batches": 1, "ptq_recipes": ["w4a8"]},
        "runs_dir": str(tmp_path / "runs"),
    }
    for key, value in sections.items():
        cfg[key].update(value)
    path = tmp_path / "micro.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_help_works():
    out = subprocess.run([sys.executable, "-m", "tfqat.train", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "--config" in out.stdout and "--stage" in out.stdout


def test_bad_recipe_is_a_one_line_cli_error(tmp_path, capsys):
    from tfqat.train import main

    with pytest.raises(SystemExit) as e:
        main(["--config", str(write_micro(tmp_path)), "--set", "qat.recipe=w4a3", "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "qat.recipe" in err and "unknown recipe" in err, err


# The micro job's command line (the README's ``--set ... --name short`` example): 20 FP and 16 QAT
# steps, a checkpoint every 4, so a kill after the first checkpoint lands inside the stage (~40 ms a
# step here) and the SIGKILL test can compare with this run.
MICRO_SET = ["--set", "train.steps=20"]
MICRO_ARGS = [*MICRO_SET, "--name", "short", "--quiet"]


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """The README's second command on the micro config, export included: ``(config path, run
    folder, report.json)``."""
    from tfqat.train import main

    tmp = tmp_path_factory.mktemp("micro")
    config = write_micro(tmp, train={"checkpoint_every": 4},
                         qat={"train": {"steps": 16, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 4,
                                        "log_every": 2}})
    assert main(["--config", str(config), *MICRO_ARGS]) == 0
    run = tmp / "runs" / "short"
    return config, run, json.loads((run / "report.json").read_text())


def test_micro_default_job_end_to_end(micro_run):
    from tfqat.train import main

    config, run, report = micro_run
    for name in ("report.md", "report.json", "loss_curves.png", "perplexity.png", "config.yaml", "provenance.json",
                 "qat-w4a4-8/student.weights.h5", "qat-w4a4-8/recipe.json", "fp/teacher.weights.h5",
                 "export-w4a4-8/model.tflite", "export-w4a4-8/model_float.tflite", "export-w4a4-8/manifest.json",
                 "export-w4a4-8/tokenizer.json"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    methods = [(r["method"], r["recipe"]) for r in report["rows"]]
    assert methods == [("FP", "fp32"), ("RTN", "w4a8"), ("QAT (full method)", "w4a4-8")]
    assert all(np.isfinite(r["perplexity"]) and 0 <= r["blimp"] <= 1 for r in report["rows"])
    assert report["rows"][2]["size_mb"] < report["rows"][0]["size_mb"]
    assert {"fp_train", "qat_train", "export", "total"} <= set(report["stage_wall_s"])
    assert report["fp"]["steps"] == 20  # the --set reached the run
    # sizes: the exported files' own, the parameter estimate beside them
    fp_row, rtn_row, qat_row = report["rows"]
    exp = run / "export-w4a4-8"
    assert fp_row["file_mb"] == (exp / "model_float.tflite").stat().st_size / 1e6
    assert qat_row["file_mb"] == (exp / "model.tflite").stat().st_size / 1e6
    assert rtn_row["file_mb"] is None
    # the export section: paths, sizes, LiteRT perplexity of each file beside the Keras one
    files = report["export"]["files"]
    assert files["model"]["perplexity"] == pytest.approx(qat_row["perplexity"], rel=5e-3)
    assert files["model_float"]["perplexity"] == pytest.approx(fp_row["perplexity"], rel=1e-3)
    md = (run / "report.md").read_text()
    assert "| QAT (full method) | w4a4-8 |" in md and "## Wall time per stage" in md
    assert "| file (MB) | estimate (MB) |" in md and "perplexity, LiteRT | perplexity, Keras" in md
    assert f"`{exp / 'model.tflite'}` | QAT w4a4-8 (TFQAT ops) | {qat_row['file_mb']:.2f} |" in md
    # rerun: every stage is reused, the export too, and the same report comes out
    mtime = (exp / "model.tflite").stat().st_mtime_ns
    assert main(["--config", str(config), *MICRO_ARGS]) == 0
    again = json.loads((run / "report.json").read_text())
    assert again["fp"]["reused"] and again["qat"]["reused"] and again["export"]["reused"]
    assert (exp / "model.tflite").stat().st_mtime_ns == mtime
    assert [r["perplexity"] for r in again["rows"]] == [r["perplexity"] for r in report["rows"]]


def test_later_commands_read_the_run_folder(micro_run, capsys):
    """export / evaluate with --run use the run's own config (no --set retyped); a finished export
    is reused; evaluating another checkpoint never touches the run's cached evaluation."""
    from tfqat.evaluate import main as evaluate
    from tfqat.export.cli import main as export

    _, run, report = micro_run
    capsys.readouterr()
    assert export(["--run", str(run)]) == 0
    assert "up to date" in capsys.readouterr().out
    cached = (run / "eval_fp.json").read_bytes()
    assert evaluate(["--run", str(run), "--quiet"]) == 0
    assert f"perplexity {report['rows'][0]['perplexity']:.3f}" in capsys.readouterr().out
    other = run.parent / "other.weights.h5"
    shutil.copy(run / "fp" / "teacher.weights.h5", other)
    assert evaluate(["--run", str(run), "--checkpoint", str(other), "--quiet"]) == 0
    assert (run / "eval_fp.json").read_bytes() == cached
    assert [p.name.split("-")[0] for p in (run / "eval_checkpoints").iterdir()] == ["other"]
    other.write_bytes(other.read_bytes()[:1000])
    with pytest.raises(SystemExit) as e:
        evaluate(["--run", str(run), "--checkpoint", str(other), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "other.weights.h5: damaged weights file" in err, err


def _one_line_exit(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("error:")]
    assert e.value.code == 2 and len(errors) == 1, err
    return errors[0]


def test_config_changes_keep_or_refuse_stages_by_name(micro_run, tmp_path, capsys):
    """On a copy of the micro run: logging keys reuse every stage; a larger qat.train.steps trains
    the student further (and the export is redone); the teacher cannot grow under its students; a
    changed key is named; a damaged weights file is one line naming it and the fix."""
    from tfqat.train import main

    _, src, _ = micro_run
    run = tmp_path / "short"
    shutil.copytree(src, run)
    args = ["--run", str(run), "--quiet"]
    assert main(args + ["--set", "train.log_every=1", "--set", "qat.train.checkpoint_every=1"]) == 0
    r = json.loads((run / "report.json").read_text())
    assert r["fp"]["reused"] and r["qat"]["reused"] and r["export"]["reused"]
    assert main(args + ["--set", "qat.train.steps=18"]) == 0
    r = json.loads((run / "report.json").read_text())
    assert r["fp"]["reused"] and not r["qat"]["reused"] and not r["export"]["reused"]
    assert (r["qat"]["resumed_from"], r["qat"]["steps"]) == (16, 18)
    with open(run / "qat-w4a4-8" / "metrics.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == list(range(2, 19, 2))
    assert "training further from step 16 to qat.train.steps 18" in capsys.readouterr().out
    err = _one_line_exit(main, args + ["--set", "train.steps=24"], capsys)
    assert "train.steps: 20 -> 24 would train the teacher" in err and "qat-w4a4-8" in err, err
    err = _one_line_exit(main, args + ["--set", "train.lr=0.002"], capsys)
    assert "train.lr: 0.001 -> 0.002" in err, err
    weights = run / "qat-w4a4-8" / "student.weights.h5"
    weights.write_bytes(weights.read_bytes()[:2000])
    err = _one_line_exit(main, args, capsys)
    assert f"{weights}: damaged weights file" in err and f"delete {run / 'qat-w4a4-8'}" in err, err


class Interrupted(Exception):
    pass


def test_fp_training_resumes_from_checkpoint(tmp_path):
    """Interrupt after step 5 (checkpoint at 4); the rerun restarts at 4, ends at 8 on the very
    batches and losses of an uninterrupted run."""
    import keras

    from tfqat.config import load_config
    from tfqat.data import train_dataset
    from tfqat.models import build_model
    from tfqat.pipeline import load_data
    from tfqat.training import lm_loss, train_loop

    cfg = load_config(write_micro(tmp_path, train={"log_every": 1}))
    data = load_data(cfg, progress=False)
    t = cfg.train

    def dataset(limit=None):
        def fn(start):
            for i, batch in enumerate(train_dataset(data.ids["train"], cfg.data.seq_len, t.batch_size, t.seed,
                                                    start, t.steps)):
                if limit is not None and start + i >= limit:
                    raise Interrupted
                yield batch
        return fn

    def fresh():
        keras.utils.set_random_seed(0)
        return build_model(cfg.model)

    def run(folder, ds):
        model = fresh()
        return train_loop(tmp_path / folder, model, lm_loss(model), ds, t, t.steps,
                          t.batch_size * cfg.data.seq_len, progress=False)

    ref = run("ref", dataset())
    with pytest.raises(Interrupted):
        run("cut", dataset(limit=5))
    assert sorted(p.name for p in (tmp_path / "cut" / "ckpt").glob("*.index")) == ["ckpt-4.index"]
    res = run("cut", dataset())
    assert res.resumed_from == 4 and res.steps == 8

    def losses(folder):
        with open(tmp_path / folder / "metrics.csv") as f:
            return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}

    cut, full = losses("cut"), losses("ref")
    assert sorted(cut) == list(range(1, 9))  # one row per step, none repeated
    np.testing.assert_allclose([cut[s] for s in range(1, 9)], [full[s] for s in range(1, 9)], rtol=1e-4)
    assert res.final_loss == pytest.approx(ref.final_loss, rel=1e-4)


def _kill_when(cmd: list[str], appears: Path, absent: Path, log: Path) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``appears`` exists, and check it died inside the stage
    (``absent``, the stage's final weights, not yet written)."""
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 300
        while not appears.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                p.kill()
                pytest.fail(f"{' '.join(cmd)} ended before {appears} appeared: {log.read_text()[-2000:]}")
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not absent.exists(), f"killed too late: {absent} was written"


@pytest.mark.slow  # two fresh processes (TensorFlow start-up and tracing in each): about a minute
def test_sigkill_during_fp_and_during_qat_resumes_to_the_same_result(micro_run):
    """``kill -9`` in the FP stage, then (after a rerun) in the QAT stage, each after its first
    checkpoint and metrics flush; the last rerun finishes with the losses, perplexities and BLiMP
    of the micro job, which was never interrupted."""
    from tfqat.train import main

    config, ref_run, ref = micro_run
    # no RTN row (it plays no part in resuming, and leaving it out is no change of the QAT stage's inputs)
    args = ["--config", str(config), *MICRO_SET, "--set", "qat.ptq_recipes=[]", "--name", "killed", "--quiet",
            "--no-export"]
    run = ref_run.parent / "killed"
    cmd = [sys.executable, "-m", "tfqat.train", *args]
    _kill_when(cmd, run / "fp" / "metrics.csv", run / "fp" / "teacher.weights.h5", run.parent / "fp.log")
    _kill_when(cmd, run / "qat-w4a4-8" / "metrics.csv", run / "qat-w4a4-8" / "student.weights.h5",
               run.parent / "qat.log")
    assert main(args) == 0
    assert json.loads((run / "fp" / "result.json").read_text())["resumed_from"] >= 4
    assert json.loads((run / "qat-w4a4-8" / "result.json").read_text())["resumed_from"] >= 4
    got = json.loads((run / "report.json").read_text())
    want_rows = [r for r in ref["rows"] if r["method"] != "RTN"]
    assert [r["method"] for r in got["rows"]] == [r["method"] for r in want_rows] == ["FP", "QAT (full method)"]
    for a, b in zip(want_rows, got["rows"]):
        assert (b["perplexity"], b["blimp"]) == pytest.approx((a["perplexity"], a["blimp"]), rel=1e-6), b["method"]
    for stage in ("fp", "qat-w4a4-8"):
        def losses(folder):
            with open(folder / stage / "metrics.csv") as f:
                return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}
        want, have = losses(ref_run), losses(run)
        assert sorted(have) == sorted(want), stage  # one row per logged step, none repeated after the kills
        np.testing.assert_allclose([have[k] for k in sorted(want)], [want[k] for k in sorted(want)], rtol=1e-5)


def test_ablation_grid_rows(tmp_path, capsys):
    from tfqat.ablate import grid, main, row_qat_config
    from tfqat.config import load_config
    from tfqat.qat_stage import resolve_recipe

    rows = grid()
    keys = [r.key for r in rows]
    assert len(keys) == len(set(keys)) == 16
    cfg = load_config("tiny")
    by_key = {r.key: row_qat_config(cfg, r) for r in rows}
    assert by_key["kd-w4a4"].losses.entropy == 0 and by_key["kd-w4a4"].losses.distribution == 0
    assert by_key["entropy-w4a4-8"].losses.entropy > 0 and by_key["entropy-w4a4-8"].losses.distribution == 0
    assert by_key["paper-sign-w4a4-8"].losses.distribution_form == "paper"
    assert resolve_recipe(cfg.model_copy(update={"qat": by_key["rho0.25-w4a4-8"]})).rho == 0.25
    assert resolve_recipe(cfg.model_copy(update={"qat": by_key["full-w4a6"]})).a_bits == 6
    assert by_key["entropy0.05-w4a4"].losses.entropy == 0.05
    assert by_key["entropy-ref-w4a4"].losses.entropy_form == "reference"
    assert len({q.train.model_dump_json() for q in by_key.values()}) == 1  # same token budget per row
    with pytest.raises(SystemExit) as e:
        main(["--config", str(write_micro(tmp_path)), "--rows", "nope", "--quiet"])
    assert e.value.code == 2 and "unknown row 'nope'" in capsys.readouterr().err
