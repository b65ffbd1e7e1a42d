"""The quantized-student stages of a run: the calibrated (and block-wise reconstructed) initial
student, QAT, RTN / PTQ rows, their report rows, and loading a trained student back.

Each stage writes into ``runs/<name>/`` (``init-<recipe>-<hash>/``, ``qat-<tag or recipe>/``,
``rtn/``) and is resumable and reused like the stages of :mod:`tfqat.pipeline`; the quantization
itself (``quantize_model``, ``calibrate``, ``qat_loss``) is :mod:`tfqat.quant`.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import keras

from tfqat.atomic import write_json_atomic
from tfqat.blockwise import reconstruct
from tfqat.checkpoints import load_weights_checked, read_json_checked, save_weights_atomic
from tfqat.config import RunConfig, config_to_dict
from tfqat.data import train_dataset
from tfqat.evaluate import evaluate_model
from tfqat.models import build_model
from tfqat.pipeline import (
    _claim_stage_dir, _finished_steps, cached_eval, eval_fingerprint, fingerprint, is_chief, result_row, stage_done,
    teacher_inputs, teacher_path,
)
from tfqat.progress import bar_desc
from tfqat.quant.qat import RecipeLike, calibrate, logprob_fn, model_size_bytes, qat_loss, quantize_model
from tfqat.quant.recipes import Recipe, get_recipe
from tfqat.quant.rotate import rotate_model
from tfqat.training import seed_everything, train_loop


def stage_dir(cfg, recipe: Recipe, tag: Optional[str] = None) -> Path:
    return cfg.run_dir / f"qat-{tag or recipe.name}"


def calibration_batches(cfg, data, n: Optional[int] = None) -> list:
    """``n`` training batches at steps past the FP run's, so calibration sees fresh windows."""
    n = n or cfg.qat.calib_batches
    q = cfg.qat.train
    ds = train_dataset(data.ids["train"], cfg.data.seq_len, q.batch_size, q.seed + 7919, 0, n)
    return [x for x, _ in ds]


def resolve_recipe(cfg, recipe: Optional[RecipeLike] = None) -> Recipe:
    r = get_recipe(recipe if recipe is not None else cfg.qat.recipe)
    if recipe is None and cfg.qat.rho is not None and cfg.qat.rho != r.rho:
        r = r.with_rho(cfg.qat.rho)
    return r


def qat_stage(cfg, data, teacher: keras.Model, recipe: Optional[RecipeLike] = None, qat=None,
              tag: Optional[str] = None, progress: bool = True) -> tuple[keras.Model, dict]:
    """Calibrate and quantization-aware train a student; resumable, reused when done.

    Writes ``runs/<name>/qat-<tag or recipe>/``: ``ckpt/``, ``metrics.csv``, ``tensorboard/``,
    ``student.weights.h5``, ``recipe.json`` and ``result.json``.

    Args:
        recipe: default ``cfg.qat.recipe`` (with ``cfg.qat.rho``).
        qat: a :class:`~tfqat.config.QATConfig` overriding ``cfg.qat`` (ablation rows).
    """
    qat = qat or cfg.qat
    recipe = resolve_recipe(cfg.model_copy(update={"qat": qat}), recipe)
    stage = stage_dir(cfg, recipe, tag)
    fp = fingerprint(**teacher_inputs(cfg, data), qat=config_to_dict(qat), recipe=recipe.to_dict())
    _claim_stage_dir(stage, fp, "QAT student", grow="qat.train.steps")
    result_path, weights = stage / "result.json", stage / "student.weights.h5"
    seed_everything(qat.train.seed)
    if (done := stage_done(stage, weights.name, qat.train.steps)) is not None:
        student = quantize_model(teacher, recipe)
        load_weights_checked(student, weights, f"delete {stage} to redo this stage")
        return student, {**done, "reused": True}
    _finished_steps(stage, f"QAT {recipe.name}", "qat.train.steps", qat.train.steps)
    init_path, init_info = _initial_student(cfg, data, teacher, recipe, qat, progress)
    t = qat.train
    if t.steps == 0:  # post-training only: the calibrated (and block-wise reconstructed) student
        student = quantize_model(teacher, recipe)
        load_weights_checked(student, init_path, f"delete {init_path.parent} to redo the calibration")
        save_weights_atomic(student, weights)
        write_json_atomic(stage / "recipe.json", recipe.to_dict())
        result = {"recipe": recipe.name, "steps": 0, "final_loss": None, "tokens_per_s": 0.0,
                  "wall_s": init_info["wall_s"], "resumed_from": None, "tokens_seen": 0,
                  "teacher": str(teacher_path(cfg)), **init_info}
        write_json_atomic(result_path, result)
        return student, {**result, "reused": False}
    teachers = [teacher]
    for path in qat.losses.extra_teachers:
        extra = build_model(cfg.model, name=f"teacher_{len(teachers)}")
        load_weights_checked(extra, path, "fix qat.losses.extra_teachers (FP weights of this config's model)")
        teachers.append(extra)

    def build():  # under the strategy's scope (train_loop calls it there); teachers stay outside, frozen
        seed_everything(qat.train.seed)
        student = quantize_model(teacher, recipe)
        load_weights_checked(student, init_path, f"delete {init_path.parent} to redo the calibration")
        return student, qat_loss(student, teachers, qat.losses)

    res = train_loop(
        stage, build, None,
        lambda start: train_dataset(data.ids["train"], cfg.data.seq_len, t.batch_size, t.seed, start, t.steps),
        t, t.steps, t.batch_size * cfg.data.seq_len, desc=bar_desc(f"QAT {recipe.name}"), progress=progress,
    )
    student = res.model
    if not is_chief(cfg.model_copy(update={"qat": qat})):
        return student, {"recipe": recipe.name, "steps": res.steps, "reused": False, "chief": False}
    save_weights_atomic(student, weights)
    write_json_atomic(stage / "recipe.json", recipe.to_dict())
    result = {"recipe": recipe.name, "steps": res.steps, "final_loss": res.final_loss,
              "tokens_per_s": res.tokens_per_s, **init_info, "qat_s": res.wall_s,
              "wall_s": res.wall_s + init_info["wall_s"],  # after init_info: the stage's whole time
              "resumed_from": res.resumed_from, "tokens_seen": res.steps * t.batch_size * cfg.data.seq_len,
              "teacher": str(teacher_path(cfg))}
    write_json_atomic(result_path, result)
    return student, {**result, "reused": False}


def _initial_student(cfg, data, teacher: keras.Model, recipe: Recipe, qat, progress: bool) -> tuple[Path, dict]:
    """The student QAT starts from, written once to ``runs/<name>/init-<recipe>-<hash>/init.weights.h5``:
    calibrated (SmoothQuant, GPTQ / MSE weights, activation scales) and, with
    ``qat.blockwise.steps_per_block``, block-wise reconstructed. Shared by every QAT stage with the
    same recipe and initialisation settings (an ablation's rows start from one init). Each part is a
    resume point (``calib-<recipe>-<hash>/calibrated.weights.h5``, shared by block-wise and
    post-training inits; ``blockwise.weights.h5`` + ``blockwise/progress.json``),
    so a kill costs at most one block. Returns the path and
    ``{"calib_s", "blockwise_s", "wall_s", "blockwise"}``."""
    # calibration batches and block-wise sequences come from cfg (not the row's qat): rows that
    # differ only in their end-to-end training share this init
    fp = fingerprint(config_to_dict(cfg.model), cfg.data.seq_len, data.key, recipe.to_dict(), qat.calib_batches,
                     qat.act_calibration, config_to_dict(qat.blockwise), cfg.qat.train.seed,
                     cfg.qat.train.batch_size)
    stage = cfg.run_dir / f"init-{recipe.name}-{fp[:8]}"
    _claim_stage_dir(stage, fp, "calibrated student")
    init, info_path = stage / "init.weights.h5", stage / "init.json"
    if init.is_file() and info_path.is_file():
        return init, read_json_checked(info_path, f"delete {stage} to redo the calibration")
    stage.mkdir(parents=True, exist_ok=True)
    if recipe.rotate:  # the float model in the student's basis: block-wise targets live there
        teacher = rotate_model(teacher)
    student = quantize_model(teacher, recipe)
    # the calibration (GPTQ: minutes) is shared by every init of the recipe, block-wise or not
    cfp = fingerprint(config_to_dict(cfg.model), cfg.data.seq_len, data.key, recipe.to_dict(), qat.calib_batches,
                      qat.act_calibration, cfg.qat.train.seed, cfg.qat.train.batch_size)
    calib_dir = cfg.run_dir / f"calib-{recipe.name}-{cfp[:8]}"
    _claim_stage_dir(calib_dir, cfp, "calibration")
    calibrated, calib_info = calib_dir / "calibrated.weights.h5", calib_dir / "calibrated.json"
    if calibrated.is_file() and calib_info.is_file():
        load_weights_checked(student, calibrated, f"delete {calib_dir} to redo the calibration")
        calib_s = read_json_checked(calib_info, f"delete {calib_dir} to redo the calibration")["calib_s"]
    else:
        t0 = time.perf_counter()
        calibrate(student, calibration_batches(cfg, data, qat.calib_batches), act_init=qat.act_calibration,
                  progress=progress)
        calib_s = time.perf_counter() - t0
        save_weights_atomic(student, calibrated)
        write_json_atomic(calib_info, {"calib_s": calib_s})
    info = {"calib_s": calib_s, "blockwise_s": 0.0, "blockwise": None}
    bw = qat.blockwise
    if bw.steps_per_block:
        bw_weights = stage / "blockwise.weights.h5"
        if bw_weights.is_file():
            load_weights_checked(student, bw_weights, f"delete {stage} to redo the block-wise reconstruction")
        tokens = next(iter(train_dataset(data.ids["train"], cfg.data.seq_len, bw.sequences,
                                         cfg.qat.train.seed + 104729, 0, 1)))[0].numpy()
        state = reconstruct(student, teacher, tokens, stage / "blockwise", bw.steps_per_block, bw.batch_size,
                            bw.lr, bw.scale_lr, cfg.qat.train.seed, progress=progress,
                            save=lambda m: save_weights_atomic(m, bw_weights), loss=bw.loss)
        info["blockwise_s"] = state["wall_s"]
        info["blockwise"] = {"blocks": state["blocks"], "sequences": bw.sequences,
                             "steps_per_block": bw.steps_per_block}
    info["wall_s"] = info["calib_s"] + info["blockwise_s"]
    save_weights_atomic(student, init)
    write_json_atomic(info_path, info)
    return init, info


def rtn_student(cfg, data, teacher: keras.Model, recipe: RecipeLike) -> keras.Model:
    """Post-training quantization: quantize and calibrate (SmoothQuant / GPTQ when the recipe
    says so), no training. Expensive calibrations (GPTQ) are cached in the shared init stage."""
    recipe = get_recipe(recipe)
    if recipe.weight_init == "gptq" or recipe.smooth is not None:
        qat = cfg.qat.model_copy(update={"blockwise": cfg.qat.blockwise.model_copy(update={"steps_per_block": 0})})
        path, _ = _initial_student(cfg, data, teacher, recipe, qat, progress=False)
        student = quantize_model(teacher, recipe, name="rtn")
        load_weights_checked(student, path, f"delete {path.parent} to redo the calibration")
        return student
    student = quantize_model(teacher, recipe, name="rtn")
    calibrate(student, calibration_batches(cfg, data), act_init=cfg.qat.act_calibration)
    return student


def load_student(cfg, path: Union[str, Path]) -> keras.Model:
    """Rebuild a trained student from its stage folder (or a run folder: ``qat-<cfg recipe>``).

    Returns a model with ``.recipe`` and ``.token_bits``, weights and scales loaded.

    Raises:
        FileNotFoundError: no ``student.weights.h5`` / ``recipe.json`` there.
    """
    path = Path(path)
    if not (path / "recipe.json").is_file() and (path / f"qat-{resolve_recipe(cfg).name}").is_dir():
        path = path / f"qat-{resolve_recipe(cfg).name}"
    rfile, wfile = path / "recipe.json", path / "student.weights.h5"
    if not rfile.is_file() or not wfile.is_file():
        raise FileNotFoundError(f"{path}: no trained student (recipe.json + student.weights.h5); "
                                "run python -m tfqat.train first")
    recipe = get_recipe(read_json_checked(rfile, f"delete {path} and rerun python -m tfqat.train"))
    student = quantize_model(build_model(cfg.model, name="teacher"), recipe)
    load_weights_checked(student, wfile, f"delete {path} and rerun python -m tfqat.train")
    return student


# -- report rows -----------------------------------------------------------------------------


def _recipe_dict(name) -> dict:
    """A recipe's content (a YAML recipe can change under the same name)."""
    recipe = get_recipe(name)
    return recipe.to_dict() if hasattr(recipe, "to_dict") else asdict(recipe)


def ptq_stage(cfg: RunConfig, data, teacher, progress: bool = True) -> list[dict]:
    """RTN post-training quantization rows (``cfg.qat.ptq_recipes``): calibrate, evaluate."""
    rows = []
    for name in cfg.qat.ptq_recipes:
        def run(name=name):
            student = rtn_student(cfg, data, teacher, name)
            return evaluate_model(logprob_fn(student), data, cfg, progress)

        fp = eval_fingerprint(cfg, data, "rtn", name, _recipe_dict(name), cfg.qat.calib_batches,
                              cfg.qat.train.batch_size, cfg.qat.train.seed,
                              *([] if cfg.qat.act_calibration == "lsq" else [cfg.qat.act_calibration]))
        ev = cached_eval(cfg.run_dir / "rtn" / f"eval_{name}.json", fp, run)
        r = get_recipe(name)
        method = "RTN" if r.weight_init == "rtn" and r.smooth is None else "PTQ"
        rows.append(result_row(method, name, ev, model_size_bytes(cfg.model, name)["total"]))
    return rows


def qat_eval_row(cfg: RunConfig, data, student, stage_result: dict, method: str, stage_dir: Path,
                 progress: bool = True) -> dict:
    """Evaluate a QAT student (cached in its stage folder) and return its report row."""
    fp = eval_fingerprint(cfg, data, "qat", read_json_checked(stage_dir / "fingerprint.json",
                                                              f"delete {stage_dir} to redo this stage"))
    ev = cached_eval(stage_dir / "eval.json", fp, lambda: evaluate_model(logprob_fn(student), data, cfg, progress))
    return result_row(method, student.recipe.name, ev, model_size_bytes(cfg.model, student.recipe)["total"],
                      steps=stage_result["steps"], tokens_seen=stage_result["tokens_seen"])
