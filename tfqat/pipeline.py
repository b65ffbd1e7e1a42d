"""The stages of a run, in data-flow order: data -> FP teacher -> (quantized students:
:mod:`tfqat.qat_stage`) -> evaluation -> report, and what every stage shares.

Each stage writes into ``runs/<name>/<stage>/`` and is skipped when its final artefact exists
for the same inputs (a fingerprint of the config sections it depends on, logging and checkpoint
intervals left out), so the default job is resumable stage by stage and a cached teacher is
reused. A stage folder refuses another config's inputs, naming the keys that differ, except its
own step count growing: the stage then trains further. Evaluations are cached the same way
(:func:`cached_eval`). Claiming the teacher's folder records the run (``config.yaml``,
``provenance.json``: :mod:`tfqat.provenance`).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from .atomic import write_json_atomic
from .cli import UserError
from .config import RunConfig, config_to_dict


# Settings that change how a stage runs, or what else the run reports (qat.ptq_recipes: which RTN
# rows), but not what a stage computes: left out of fingerprints, so adding or changing one never
# invalidates a cached teacher, student or evaluation.
RUNTIME_KEYS = frozenset({"strategy", "log_every", "checkpoint_every", "ptq_recipes"})
# What fingerprints left out before logging and checkpoint intervals joined RUNTIME_KEYS: stages and
# evaluations cached under those fingerprints stay valid (see :class:`Fingerprint`).
_LEGACY_RUNTIME_KEYS = frozenset({"strategy"})


# Keys added after runs existed: left out of fingerprints while at these values (what every earlier
# run did), so upgrading never invalidates a cached stage. NEUTRAL_SUBKEYS: the same for keys added
# inside a section (by the section's key), dropped before the section itself is compared.
NEUTRAL_DEFAULTS = {"act_calibration": "lsq",
                    "blockwise": {"steps_per_block": 0, "sequences": 64, "batch_size": 4, "lr": 1e-4,
                                  "scale_lr": 1e-5}}
NEUTRAL_SUBKEYS = {"blockwise": {"loss": "mse"}}


class Fingerprint(str):
    """A stage's input hash (a ``str``: written and compared as before) that also keeps its inputs,
    so a mismatch can name the keys that differ, and its pre-upgrade value (``legacy``), so a stage
    cached before :data:`RUNTIME_KEYS` grew is still recognised."""

    legacy: str
    inputs: dict


def _semantic(obj, ignore=RUNTIME_KEYS, section: str | None = None):
    if isinstance(obj, Fingerprint):
        return str(obj) if ignore is RUNTIME_KEYS else obj.legacy
    if isinstance(obj, dict):
        neutral = NEUTRAL_SUBKEYS.get(section, {})
        out = {}
        for k, v in obj.items():
            v = _semantic(v, ignore, k)
            dropped = k in ignore or v == neutral.get(k, ...) or v == NEUTRAL_DEFAULTS.get(k, ...)
            if not dropped:
                out[k] = v
        return out
    if isinstance(obj, (list, tuple)):
        return [_semantic(v, ignore) for v in obj]
    return obj


def _hash(parts: list, ignore) -> str:
    blob = json.dumps(_semantic(parts, ignore), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint(*parts, **named) -> Fingerprint:
    """Hash of the inputs a stage depends on (config dicts minus :data:`RUNTIME_KEYS`).

    Named parts (``fingerprint(model=..., train=...)``) hash like the same values passed in order;
    their names label the keys a changed config differs in (``train.lr: 0.001 -> 0.002``).
    """
    values = [*parts, *named.values()]
    fp = Fingerprint(_hash(values, RUNTIME_KEYS))
    fp.legacy = _hash(values, _LEGACY_RUNTIME_KEYS)
    labels = [f"part {i + 1}" for i in range(len(parts))] + list(named)
    fp.inputs = {label: json.loads(json.dumps(_semantic(v), default=str)) for label, v in zip(labels, values)}
    return fp


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict) and obj:
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def config_diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """``[(dotted key, old value, new value)]`` where two (nested) dicts differ; a missing key is
    ``"(unset)"``."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k, "(unset)"), b.get(k, "(unset)")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def describe_diff(diff: list, limit: int = 4) -> str:
    """``"train.lr: 0.001 -> 0.002, model.hidden: 256 -> 128"`` (the first ``limit`` keys)."""
    text = ", ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in diff[:limit])
    return text + (f" and {len(diff) - limit} more" if len(diff) > limit else "")


def _claim_stage_dir(stage_dir: Path, fp: str, what: str, grow: str | None = None,
                     grow_blocked_by: list | None = None) -> tuple | None:
    """Refuse to mix two different configs' state in one folder (resume must mean same inputs).

    ``fingerprint.json`` holds the hash (its content is part of later fingerprints: kept as it was);
    ``inputs.json`` the inputs behind it, so a refusal names the keys that differ. ``grow`` (a
    dotted key such as ``train.steps``) may increase: the stage then trains further from its last
    checkpoint, unless ``grow_blocked_by`` lists folders made from the current state.

    Returns:
        ``(old steps, new steps)`` when the folder is claimed to train further, else None.

    Raises:
        UserError: the folder holds another config's state (naming the keys that differ).
    """
    from .checkpoints import read_json_checked

    marker, inputs_path = stage_dir / "fingerprint.json", stage_dir / "inputs.json"
    inputs = getattr(fp, "inputs", None)
    if not marker.is_file():
        write_json_atomic(marker, {"fingerprint": str(fp)})
        if inputs is not None:
            write_json_atomic(inputs_path, inputs)
        return None
    fix = f"delete {stage_dir} to redo this stage"
    old = read_json_checked(marker, fix).get("fingerprint")
    if old in (str(fp), getattr(fp, "legacy", None)):
        if inputs is not None and not inputs_path.is_file():  # stages cached before inputs.json
            write_json_atomic(inputs_path, inputs)
        return None
    old_inputs = read_json_checked(inputs_path, fix) if inputs_path.is_file() else None
    if old_inputs is None or inputs is None:
        raise UserError(f"{stage_dir} holds a {what} made with a different config (the folder predates "
                        f"recorded inputs, so the keys cannot be named); use --name for a new run or delete "
                        f"that folder")
    diff = config_diff(old_inputs, inputs)
    if grow and [k for k, *_ in diff] == [grow]:
        _, before, after = diff[0]
        if isinstance(before, int) and isinstance(after, int) and after > before:
            blocked = [Path(p).name for p in (grow_blocked_by or [])]
            if blocked:
                raise UserError(f"{grow}: {before} -> {after} would train the {what} in {stage_dir} further, but "
                                f"{', '.join(blocked)} in {stage_dir.parent} were made from it as it is; delete "
                                f"them first, or use --name for a new run")
            write_json_atomic(marker, {"fingerprint": str(fp)})
            write_json_atomic(inputs_path, inputs)
            return before, after
        raise UserError(f"{stage_dir} holds a {what} trained for {before} steps; {grow} {after} cannot undo "
                        f"steps: raise it to train further, or use --name for a new run")
    raise UserError(f"{stage_dir} holds a {what} made with a different config ({describe_diff(diff)}); use "
                    f"--name for a new run, --run {stage_dir.parent} to reuse its config, or delete that folder")


def _finished_steps(stage_dir: Path, what: str, key: str, steps: int) -> int | None:
    """The steps of a finished stage now asked to train further (announced), else None.

    Raises:
        UserError: its checkpoints are gone, so it cannot continue.
    """
    from .checkpoints import read_json_checked

    result_path = stage_dir / "result.json"
    if not result_path.is_file():
        return None
    before = int(read_json_checked(result_path, f"delete {stage_dir} to redo this stage").get("steps") or 0)
    if before >= steps:  # weights file lost: the last checkpoint gives it back
        return None
    if not any((stage_dir / "ckpt").glob("ckpt-*.index")):
        raise UserError(f"{key} {before} -> {steps}: {stage_dir / 'ckpt'} holds no checkpoint to train the {what} "
                        f"further from; use --name for a new run")
    print(f"{what}: training further from step {before} to {key} {steps} (from its last checkpoint)", flush=True)
    return before


def stage_done(stage_dir: Path, weights_name: str, steps: int) -> dict | None:
    """The stage's ``result.json`` when ``weights_name`` and it are there for at least ``steps``
    training steps; None when the stage must (still, or further) train."""
    from .checkpoints import read_json_checked

    result_path = stage_dir / "result.json"
    if not ((stage_dir / weights_name).is_file() and result_path.is_file()):
        return None
    result = read_json_checked(result_path, f"delete {stage_dir} to redo this stage")
    return result if int(result.get("steps") or 0) >= steps else None


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


def teacher_inputs(cfg: RunConfig, data) -> dict:
    """What a trained teacher depends on, named for :func:`fingerprint` (and, in this order, the
    first parts of every quantized stage's fingerprint)."""
    return {"model": config_to_dict(cfg.model), "train": config_to_dict(cfg.train),
            "data.seq_len": cfg.data.seq_len, "data (corpus and tokenizer hash)": data.key}


def _import_stamp(cfg: RunConfig) -> dict:
    """What an imported teacher is read from (its file or folder, by path and size)."""
    from .importers import resolve_path

    src = resolve_path(cfg.teacher.path)
    if not src.exists():
        raise UserError(f"teacher.path {cfg.teacher.path}: {src} does not exist")
    return {"source": cfg.teacher.source, "path": str(src.resolve()),
            "bytes": sum(f.stat().st_size for f in ([src] if src.is_file() else src.rglob("*")) if f.is_file())}


def claim_teacher(cfg: RunConfig, data, record: bool = True) -> Path:
    """Claim ``runs/<name>/fp`` for this config's teacher (:func:`_claim_stage_dir`) and, on the
    chief with ``record``, write the run's ``config.yaml`` and ``provenance.json``
    (:func:`tfqat.provenance.record_run`): only once the folder accepted this config, so the
    recorded config is always the one its teacher was made with. Returns the stage folder.

    A trained teacher may train further (``train.steps`` grows) as long as no quantized stage
    (``qat-*``, ``init-*``, ``calib-*``) was made from it yet.
    """
    stage = cfg.run_dir / "fp"
    if cfg.teacher.source != "train":
        fp = fingerprint(config_to_dict(cfg.model), _import_stamp(cfg), cfg.data.seq_len, data.key)
        _claim_stage_dir(stage, fp, "teacher")
    else:
        derived = sorted(p for pattern in ("qat-*", "init-*", "calib-*") for p in cfg.run_dir.glob(pattern))
        _claim_stage_dir(stage, fingerprint(**teacher_inputs(cfg, data)), "teacher", grow="train.steps",
                         grow_blocked_by=derived)
    if record and is_chief(cfg):
        from .provenance import record_run

        record_run(cfg, sys.argv)
    return stage


def fp_stage(cfg: RunConfig, data, progress: bool = True) -> tuple[object, dict]:
    """Train (or reuse) the full-precision teacher. Returns (model, stage result dict).

    A finished teacher trains further, from its last checkpoint, when ``train.steps`` grows
    (see :func:`claim_teacher`).
    """
    from .data import train_dataset
    from .checkpoints import save_weights_atomic
    from .progress import bar_desc
    from .training import lm_loss, seed_everything, train_loop

    stage = claim_teacher(cfg, data)
    if cfg.teacher.source != "train":
        return _imported_fp_stage(cfg, data)
    result_path = stage / "result.json"
    seed_everything(cfg.train.seed)
    if stage_done(stage, teacher_path(cfg).name, cfg.train.steps):
        return _reuse_teacher(cfg, result_path)
    before = _finished_steps(stage, "FP teacher", "train.steps", cfg.train.steps)

    def build():  # under the strategy's scope (train_loop calls it there)
        seed_everything(cfg.train.seed)
        m = build_fp_model(cfg)
        return m, lm_loss(m)

    t = cfg.train
    res = train_loop(
        stage, build, None,
        lambda start: train_dataset(data.ids["train"], cfg.data.seq_len, t.batch_size, t.seed, start, t.steps),
        t, t.steps, t.batch_size * cfg.data.seq_len, desc=bar_desc("FP teacher"), progress=progress,
    )
    model = res.model
    if not is_chief(cfg):
        return model, {"steps": res.steps, "reused": False, "chief": False}
    save_weights_atomic(model, teacher_path(cfg))
    result = {"steps": res.steps, "final_loss": res.final_loss, "tokens_per_s": res.tokens_per_s,
              "wall_s": res.wall_s, "resumed_from": res.resumed_from, "extended_from": before,
              "params": int(sum(int(v.numpy().size) for v in model.weights)),
              "tokens_seen": res.steps * t.batch_size * cfg.data.seq_len}
    write_json_atomic(result_path, result)
    return model, {**result, "reused": False}


def _reuse_teacher(cfg: RunConfig, result_path: Path) -> tuple[object, dict]:
    """The FP stage's saved teacher (trained or imported) and its stage result."""
    from .checkpoints import load_weights_checked, read_json_checked

    fix = f"delete {result_path.parent} to redo the FP stage"
    model = build_fp_model(cfg)
    load_weights_checked(model, teacher_path(cfg), fix)
    return model, {**read_json_checked(result_path, fix), "reused": True}


def _imported_fp_stage(cfg: RunConfig, data) -> tuple[object, dict]:
    """The imported teacher, saved as ``fp/teacher.weights.h5`` like a trained one, so QAT, export
    and evaluation read it the same way (and a rerun skips the import's dequantization)."""
    from .checkpoints import save_weights_atomic

    stage = cfg.run_dir / "fp"  # claimed by fp_stage
    stamp = _import_stamp(cfg)
    result_path = stage / "result.json"
    if stage_done(stage, teacher_path(cfg).name, 0):
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
    """``evaluate()`` unless ``path`` holds a result for the same fingerprint (resumable rows).

    A damaged cache file is evaluated again (with a one-line warning): it holds nothing that
    cannot be recomputed.
    """
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            print(f"warning: {path}: damaged evaluation cache ({str(e).splitlines()[0][:120]}); evaluating again",
                  file=sys.stderr)
            old = {}
        if isinstance(old, dict) and old.get("fingerprint") in (str(fp), getattr(fp, "legacy", None)):
            return old
    result = {**evaluate(), "fingerprint": str(fp)}
    write_json_atomic(path, result)
    return result


def eval_fingerprint(cfg: RunConfig, data, *parts) -> str:
    return fingerprint(config_to_dict(cfg.model), config_to_dict(cfg.train), config_to_dict(cfg.eval),
                       cfg.data.seq_len, data.key, *parts)


def result_row(method: str, recipe: str, ev: dict, size_bytes: int, **extra) -> dict:
    """A report row. ``size_mb`` is the parameter-count estimate (``size_bytes``); ``file_mb`` the
    size of the row's exported file, filled in when there is one."""
    return {"method": method, "recipe": recipe, "perplexity": ev["perplexity"],
            "blimp": ev["blimp"]["overall"], "blimp_pairs": ev["blimp"]["pairs"], "size_mb": size_bytes / 1e6,
            "file_mb": None, **extra}
