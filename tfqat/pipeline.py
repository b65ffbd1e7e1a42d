"""The stages of a run, in data-flow order: data -> FP teacher -> (quantized students:
:mod:`tfqat.qat_stage`) -> evaluation -> report, and what every stage shares.

Each stage writes into ``runs/<name>/<stage>/`` and is skipped when its final artefact exists
for the same inputs (a fingerprint of the config sections it depends on), so the default job is
resumable stage by stage and a cached teacher is reused. Evaluations are cached the same way
(:func:`cached_eval`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .atomic import write_json_atomic
from .cli import UserError
from .config import RunConfig, config_to_dict


# Settings that change how a stage runs but not what it computes: left out of fingerprints, so
# adding or changing one never invalidates a cached teacher or student.
RUNTIME_KEYS = frozenset({"strategy"})


# Keys added after runs existed: left out of fingerprints while at these values (what every earlier
# run did), so upgrading never invalidates a cached stage.
NEUTRAL_DEFAULTS = {"act_calibration": "lsq",
                    "blockwise": {"steps_per_block": 0, "sequences": 64, "batch_size": 4, "lr": 1e-4,
                                  "scale_lr": 1e-5}}


def _semantic(obj):
    if isinstance(obj, dict):
        return {k: _semantic(v) for k, v in obj.items()
                if k not in RUNTIME_KEYS and not (k in NEUTRAL_DEFAULTS and v == NEUTRAL_DEFAULTS[k])}
    if isinstance(obj, (list, tuple)):
        return [_semantic(v) for v in obj]
    return obj


def fingerprint(*parts) -> str:
    """Hash of the inputs a stage depends on (config dicts minus :data:`RUNTIME_KEYS`)."""
    blob = json.dumps(_semantic(list(parts)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _claim_stage_dir(stage_dir: Path, fp: str, what: str) -> None:
    """Refuse to mix two different configs' state in one folder (resume must mean same inputs)."""
    marker = stage_dir / "fingerprint.json"
    if marker.is_file():
        old = json.loads(marker.read_text()).get("fingerprint")
        if old != fp:
            raise UserError(f"{stage_dir} holds a {what} trained with a different config; "
                            f"use --name for a new run or delete that folder")
    else:
        write_json_atomic(marker, {"fingerprint": fp})


_IMPORTED: dict = {}


def imported_teacher(cfg: RunConfig):
    """``(model, tokenizer)`` of an imported teacher (``teacher.source`` gguf / keras_hub), read once
    per process: the data stage needs its tokenizer and the FP stage its weights."""
    from .importers import load_teacher_and_tokenizer

    key = (cfg.teacher.source, cfg.teacher.path, cfg.teacher.tokenizer, repr(config_to_dict(cfg.model)))
    if key not in _IMPORTED:
        try:
            _IMPORTED[key] = load_teacher_and_tokenizer(cfg)
        except ValueError as e:  # the importers' one-line errors (unsupported type, mismatched config)
            raise UserError(f"teacher ({cfg.teacher.source}): {e}") from None
    return _IMPORTED[key]


def load_data(cfg: RunConfig, progress: bool = True):
    """The tokenized corpus; with an imported teacher (and ``teacher.tokenizer``), in its own tokenizer."""
    from .data import prepare_data

    tokenizer = None
    if cfg.teacher.source != "train" and cfg.teacher.tokenizer:
        tokenizer = imported_teacher(cfg)[1]
        if tokenizer is None:
            raise UserError(f"teacher {cfg.teacher.path} carries no tokenizer; set teacher.tokenizer: false "
                            "to train a BPE (its vocabulary must then match the checkpoint's ids)")
    return prepare_data(cfg.data, cfg.model.vocab_size, progress, tokenizer=tokenizer)


def teacher_path(cfg: RunConfig) -> Path:
    return cfg.run_dir / "fp" / "teacher.weights.h5"


def build_fp_model(cfg: RunConfig):
    from .models import build_model

    model = build_model(cfg.model, name="teacher")
    import numpy as np

    model(np.zeros((1, 2), np.int32))  # create variables
    return model


def is_chief(cfg: RunConfig) -> bool:
    """True unless this process is a non-chief worker of a multi-worker run: those train, and leave
    checkpoints, results, evaluations and reports to the chief."""
    from .distribute import is_chief as _is_chief, make_strategy

    kinds = {cfg.train.strategy, cfg.qat.train.strategy} - {"default"}
    return all(_is_chief(make_strategy(k)) for k in kinds)


def fp_stage(cfg: RunConfig, data, progress: bool = True) -> tuple[object, dict]:
    """Train (or reuse) the full-precision teacher. Returns (model, stage result dict)."""
    from .data import train_dataset
    from .checkpoints import save_weights_atomic
    from .training import lm_loss, seed_everything, train_loop

    if cfg.teacher.source != "train":
        return _imported_fp_stage(cfg, data)
    stage = cfg.run_dir / "fp"
    fp = fingerprint(config_to_dict(cfg.model), config_to_dict(cfg.train), cfg.data.seq_len, data.key)
    _claim_stage_dir(stage, fp, "teacher")
    result_path = stage / "result.json"
    seed_everything(cfg.train.seed)
    if teacher_path(cfg).is_file() and result_path.is_file():
        return _reuse_teacher(cfg, result_path)

    def build():  # under the strategy's scope (train_loop calls it there)
        seed_everything(cfg.train.seed)
        m = build_fp_model(cfg)
        return m, lm_loss(m)

    t = cfg.train
    res = train_loop(
        stage, build, None,
        lambda start: train_dataset(data.ids["train"], cfg.data.seq_len, t.batch_size, t.seed, start, t.steps),
        t, t.steps, t.batch_size * cfg.data.seq_len, desc="FP teacher", progress=progress,
    )
    model = res.model
    if not is_chief(cfg):
        return model, {"steps": res.steps, "reused": False, "chief": False}
    save_weights_atomic(model, teacher_path(cfg))
    result = {"steps": res.steps, "final_loss": res.final_loss, "tokens_per_s": res.tokens_per_s,
              "wall_s": res.wall_s, "resumed_from": res.resumed_from,
              "params": int(sum(int(v.numpy().size) for v in model.weights)),
              "tokens_seen": res.steps * t.batch_size * cfg.data.seq_len}
    write_json_atomic(result_path, result)
    return model, {**result, "reused": False}


def _reuse_teacher(cfg: RunConfig, result_path: Path) -> tuple[object, dict]:
    """The FP stage's saved teacher (trained or imported) and its stage result."""
    model = build_fp_model(cfg)
    model.load_weights(str(teacher_path(cfg)))
    return model, {**json.loads(result_path.read_text()), "reused": True}


def _imported_fp_stage(cfg: RunConfig, data) -> tuple[object, dict]:
    """The imported teacher, saved as ``fp/teacher.weights.h5`` like a trained one, so QAT, export
    and evaluation read it the same way (and a rerun skips the import's dequantization)."""
    from .importers import resolve_path
    from .checkpoints import save_weights_atomic

    stage = cfg.run_dir / "fp"
    src = resolve_path(cfg.teacher.path)
    if not src.exists():
        raise UserError(f"teacher.path {cfg.teacher.path}: {src} does not exist")
    stamp = {"source": cfg.teacher.source, "path": str(src.resolve()),
             "bytes": sum(f.stat().st_size for f in ([src] if src.is_file() else src.rglob("*")) if f.is_file())}
    fp = fingerprint(config_to_dict(cfg.model), stamp, cfg.data.seq_len, data.key)
    _claim_stage_dir(stage, fp, "teacher")
    result_path = stage / "result.json"
    if teacher_path(cfg).is_file() and result_path.is_file():
        return _reuse_teacher(cfg, result_path)
    t0 = time.perf_counter()
    model = imported_teacher(cfg)[0]
    save_weights_atomic(model, teacher_path(cfg))
    result = {"steps": 0, "final_loss": None, "tokens_per_s": 0.0, "wall_s": time.perf_counter() - t0,
              "resumed_from": None, "imported": stamp, "tokens_seen": 0,
              "params": int(sum(int(v.numpy().size) for v in model.weights))}
    write_json_atomic(result_path, result)
    return model, {**result, "reused": False}


def cached_eval(path: Path, fp: str, evaluate) -> dict:
    """``evaluate()`` unless ``path`` holds a result for the same fingerprint (resumable rows)."""
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("fingerprint") == fp:
            return old
    result = {**evaluate(), "fingerprint": fp}
    write_json_atomic(path, result)
    return result


def eval_fingerprint(cfg: RunConfig, data, *parts) -> str:
    return fingerprint(config_to_dict(cfg.model), config_to_dict(cfg.train), config_to_dict(cfg.eval),
                       cfg.data.seq_len, data.key, *parts)


def result_row(method: str, recipe: str, ev: dict, size_bytes: int, **extra) -> dict:
    return {"method": method, "recipe": recipe, "perplexity": ev["perplexity"],
            "blimp": ev["blimp"]["overall"], "blimp_pairs": ev["blimp"]["pairs"], "size_mb": size_bytes / 1e6,
            **extra}
