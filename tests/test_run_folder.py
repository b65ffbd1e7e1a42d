"""What a run folder records and how later commands read it back: ``config.yaml`` and
``provenance.json`` (tfqat.provenance), ``--run`` (tfqat.cli), stage fingerprints that ignore
logging keys, accept pre-upgrade caches, name the keys a changed config differs in and let a
finished stage train further (tfqat.pipeline), stage-labelled progress bars and the report's two
size columns. No training here: the micro end-to-end runs are in test_train_cli.py.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest

from tfqat.cli import UserError, add_common_args, load_cli_config, run_config
from tfqat.config import config_to_dict, load_config


def _cfg(tmp_path: Path, **overrides):
    return load_config("tiny", {"name": "short", "runs_dir": str(tmp_path / "runs"), **overrides})


def _args(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    add_common_args(ap)
    return ap.parse_args(list(argv))


def test_config_yaml_reads_back_equal_and_provenance_is_complete(tmp_path):
    from tfqat.provenance import ROOT, record_run
    from tfqat.runtime import TfqatRuntimeError, find_library

    cfg = _cfg(tmp_path, **{"train.steps": 300, "qat.rho": 0.25, "eval.max_tokens": 1000})
    rec = record_run(cfg, ["python", "-m", "tfqat.train", "--name", "short"])
    run = tmp_path / "runs" / "short"
    assert run_config(run) == cfg
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(run, moved)
    back = run_config(moved, {"train.steps": 400})
    assert (back.name, back.runs_dir, back.train.steps) == ("renamed", str(moved.parent), 400)
    assert config_to_dict(back.qat) == config_to_dict(cfg.qat)

    prov = json.loads((run / "provenance.json").read_text())
    assert prov == json.loads(json.dumps(rec))
    assert all(prov["versions"][k] for k in ("tfqat", "tensorflow", "keras", "litert", "numpy", "python"))
    assert prov["seeds"] == {"train.seed": 0, "qat.train.seed": 0}
    assert prov["host"]["hostname"] and prov["command"][:3] == ["python", "-m", "tfqat.train"]
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", prov["git"]["commit"]) and isinstance(prov["git"]["dirty"], bool)
    else:
        assert prov["git"] is None
    try:
        lib = Path(find_library())
    except TfqatRuntimeError:
        pytest.skip("no delegate library built: its compiler and ISA cannot be read")
    d = prov["delegate"]
    assert d["path"] == str(lib) and re.search(r"GCC: |clang version", d["compiler"]), d
    if (lib.parent / "tfqat_bench").is_file():  # pip install puts it beside the library
        assert d["isa_selected"] in d["isa_available"].split(","), d
    record_run(cfg, ["python", "-m", "tfqat.train"])  # a second command keeps the first in history
    assert json.loads((run / "provenance.json").read_text())["history"][0]["started"] == prov["started"]


def test_run_flag_reads_the_run_and_refuses_what_it_cannot(tmp_path, capsys):
    from tfqat.provenance import record_run

    cfg = _cfg(tmp_path, **{"train.steps": 300})
    record_run(cfg, ["python"])
    run = str(tmp_path / "runs" / "short")
    assert load_cli_config(_args("--run", run, "--set", "eval.max_tokens=500")) == cfg.model_copy(
        update={"eval": cfg.eval.model_copy(update={"max_tokens": 500})})
    with pytest.raises(UserError, match="has its own config .*drop --config"):
        load_cli_config(_args("--run", run, "--config", "tiny"))
    with pytest.raises(UserError, match="--name other with --run .*pick one"):
        load_cli_config(_args("--run", run, "--name", "other"))
    with pytest.raises(UserError, match="no such run folder"):
        load_cli_config(_args("--run", str(tmp_path / "nope")))
    (tmp_path / "runs" / "mystery").mkdir()
    with pytest.raises(UserError, match="no config.yaml .*pass --config"):
        load_cli_config(_args("--run", str(tmp_path / "runs" / "mystery")))
    assert load_cli_config(_args("--run", str(tmp_path / "runs" / "mystery"), "--config", "tiny")).name == "mystery"
    (tmp_path / "runs" / "tiny").mkdir()  # an old run: its config is guessed from the name, with a warning
    assert load_cli_config(_args("--run", str(tmp_path / "runs" / "tiny"))).train.steps == load_config("tiny").train.steps
    assert "has no config.yaml" in capsys.readouterr().err


def test_fingerprints_ignore_logging_keys_and_keep_their_pre_upgrade_value():
    from tfqat.pipeline import fingerprint

    cfg = load_config("tiny")
    train = config_to_dict(cfg.train)
    a = fingerprint(train=train)
    b = fingerprint(train={**train, "log_every": 1, "checkpoint_every": 7, "strategy": "mirrored"})
    assert a == b
    assert a != fingerprint(train={**train, "lr": 2e-3})
    qat = config_to_dict(cfg.qat)  # which RTN rows a run reports is no input of its QAT student
    assert fingerprint(qat=qat) == fingerprint(qat={**qat, "ptq_recipes": ["w8a8"]})
    # the hash tfqat wrote before log_every / checkpoint_every were runtime keys (pinned: runs made
    # then must stay valid), and named parts hash like the same values passed in order
    old = fingerprint({"a": 1, "log_every": 3}, 2)
    assert old.legacy == "15dc853e1d77aaf9"
    assert fingerprint(x={"a": 1, "log_every": 3}, y=2).legacy == old.legacy
    assert old != old.legacy and old == fingerprint({"a": 1, "log_every": 9}, 2)
    # a key added to a section later (qat.blockwise.loss) leaves earlier stages' fingerprints alone
    # at its default, and only there
    qat = config_to_dict(load_config("tiny", {"qat.blockwise.steps_per_block": 40}).qat)
    assert qat["blockwise"]["loss"] == "mse"
    before = {**qat, "blockwise": {k: v for k, v in qat["blockwise"].items() if k != "loss"}}
    assert fingerprint(qat=qat) == fingerprint(qat=before)
    assert fingerprint(qat={**qat, "blockwise": {**qat["blockwise"], "loss": "next"}}) != fingerprint(qat=before)


def test_a_changed_config_names_the_keys_and_steps_may_only_grow(tmp_path):
    from tfqat.pipeline import _claim_stage_dir, fingerprint

    cfg = load_config("tiny")

    def fp(**train):
        return fingerprint(model=config_to_dict(cfg.model), train={**config_to_dict(cfg.train), **train})

    stage = tmp_path / "fp"
    assert _claim_stage_dir(stage, fp(steps=8), "teacher", grow="train.steps") is None
    assert _claim_stage_dir(stage, fp(steps=8, log_every=1), "teacher", grow="train.steps") is None
    with pytest.raises(UserError) as e:
        _claim_stage_dir(stage, fp(steps=8, lr=0.002, beta2=0.99), "teacher", grow="train.steps")
    msg = str(e.value)
    assert "train.beta2: 0.95 -> 0.99, train.lr: 0.001 -> 0.002" in msg and "\n" not in msg
    with pytest.raises(UserError, match="train.steps 6 cannot undo steps"):
        _claim_stage_dir(stage, fp(steps=6), "teacher", grow="train.steps")
    with pytest.raises(UserError, match="train.steps: 8 -> 12 would train .* but qat-w4a8 .*delete them first"):
        _claim_stage_dir(stage, fp(steps=12), "teacher", grow="train.steps", grow_blocked_by=[tmp_path / "qat-w4a8"])
    with pytest.raises(UserError, match="train.steps: 8 -> 12"):  # growth is the stage's own key only
        _claim_stage_dir(stage, fp(steps=12), "teacher")
    assert _claim_stage_dir(stage, fp(steps=12), "teacher", grow="train.steps") == (8, 12)
    assert json.loads((stage / "fingerprint.json").read_text()) == {"fingerprint": str(fp(steps=12))}
    assert json.loads((stage / "inputs.json").read_text())["train"]["steps"] == 12
    # a stage cached before inputs.json: accepted by its pre-upgrade fingerprint, left as it was
    old = tmp_path / "old"
    old.mkdir()
    (old / "fingerprint.json").write_text(json.dumps({"fingerprint": fp(steps=8).legacy}))
    assert _claim_stage_dir(old, fp(steps=8), "teacher") is None
    assert json.loads((old / "fingerprint.json").read_text()) == {"fingerprint": fp(steps=8).legacy}
    (old / "inputs.json").unlink()
    with pytest.raises(UserError, match="predates recorded inputs"):
        _claim_stage_dir(old, fp(steps=8, lr=0.5), "teacher")


def test_cached_eval_accepts_old_caches_and_redoes_damaged_ones(tmp_path, capsys):
    from tfqat.pipeline import cached_eval, fingerprint

    fp = fingerprint({"log_every": 5, "x": 1})
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"perplexity": 3.0, "fingerprint": fp.legacy}))
    assert cached_eval(path, fp, lambda: pytest.fail("a valid cache is evaluated again"))["perplexity"] == 3.0
    path.write_text('{"perplexity": 3.')
    assert cached_eval(path, fp, lambda: {"perplexity": 4.0})["perplexity"] == 4.0
    assert "damaged evaluation cache" in capsys.readouterr().err
    assert json.loads(path.read_text()) == {"perplexity": 4.0, "fingerprint": str(fp)}


def test_progress_bars_name_the_stage_and_row(capsys):
    from tfqat.progress import StagePlan, bar_desc

    plan = StagePlan(["data", "RTN w4a8", "QAT w4a4-8"])
    assert bar_desc("perplexity") == "perplexity"
    with plan("RTN w4a8"):
        assert bar_desc("perplexity") == "stage 2 of 3, RTN w4a8: perplexity"
    with plan("QAT w4a4-8"):
        assert bar_desc("QAT w4a4-8") == "stage 3 of 3, QAT w4a4-8"
    assert bar_desc("BLiMP") == "BLiMP"
    assert capsys.readouterr().err.splitlines() == ["stage 2 of 3, RTN w4a8", "stage 3 of 3, QAT w4a4-8"]
    with pytest.raises(ValueError, match="not in the plan"):
        with plan("export"):
            pass


def test_results_table_shows_file_size_beside_the_labelled_estimate():
    from tfqat.report import results_table

    rows = [{"method": "FP", "recipe": "fp32", "perplexity": 10.0, "blimp": 0.6, "blimp_pairs": 100,
             "size_mb": 16.0, "file_mb": 20.4},
            {"method": "RTN", "recipe": "w4a8", "perplexity": 11.0, "blimp": 0.55, "blimp_pairs": 100,
             "size_mb": 5.72, "file_mb": None}]
    md = results_table(rows)
    assert "| file (MB) | estimate (MB) |" in md
    assert "| 20.40 | 16.00 |" in md and "| — | 5.72 |" in md
    assert "Estimate: parameters" in md
