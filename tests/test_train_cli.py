"""``python -m tfqat.train``: --help, a micro end-to-end default job, and resume after interruption."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
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


def test_micro_default_job_end_to_end(tmp_path):
    from tfqat.train import main

    config = write_micro(tmp_path)
    assert main(["--config", str(config), "--quiet", "--no-export"]) == 0
    run = tmp_path / "runs" / "micro"
    for name in ("report.md", "report.json", "loss_curves.png", "perplexity.png",
                 "qat-w4a4-8/student.weights.h5", "qat-w4a4-8/recipe.json", "fp/teacher.weights.h5"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    report = json.loads((run / "report.json").read_text())
    methods = [(r["method"], r["recipe"]) for r in report["rows"]]
    assert methods == [("FP", "fp32"), ("RTN", "w4a8"), ("QAT (full method)", "w4a4-8")]
    assert all(np.isfinite(r["perplexity"]) and 0 <= r["blimp"] <= 1 for r in report["rows"])
    assert report["rows"][2]["size_mb"] < report["rows"][0]["size_mb"]
    assert {"fp_train", "qat_train", "total"} <= set(report["stage_wall_s"])
    md = (run / "report.md").read_text()
    assert "| QAT (full method) | w4a4-8 |" in md and "## Wall time per stage" in md
    # rerun: every stage is reused, the same report comes out
    assert main(["--config", str(config), "--quiet", "--no-export"]) == 0
    again = json.loads((run / "report.json").read_text())
    assert again["fp"]["reused"] and again["qat"]["reused"]
    assert [r["perplexity"] for r in again["rows"]] == [r["perplexity"] for r in report["rows"]]


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
