"""``quantize_model(model, recipe)``: the Keras 3 QAT entry point, plus RTN, size, loss and stage.

Two steps, torchao style: :func:`quantize_model` *prepares* a student (a new model of the same
config, the teacher's weights copied, a quantizer in every slot the recipe names), then either
:func:`calibrate` alone (RTN post-training quantization: every scale set from a few batches, no
training) or :func:`qat_stage` (calibrate, then train with :func:`qat_loss`).

Slots are filled by name through :data:`ACT_SLOTS` / :func:`weight_quantizer_for`, never by
``isinstance``: a block's ``linears()`` all take a weight quantizer, and each of its
``quant_points()`` names a rule ("act", "kv", "probs") that maps a recipe to an
:class:`ActQuantizer` (or ``None`` = stays float). A point whose name has no rule is an error,
so a model family that adds a point cannot silently stay float.

Example:
    >>> from tfqat.config import ModelConfig
    >>> from tfqat.models import build_model
    >>> teacher = build_model(ModelConfig(vocab_size=64, hidden=16, layers=1, heads=2, ffn=32))
    >>> student = quantize_model(teacher, "w4a4-8")
    >>> logits = student(tf.zeros((1, 8), tf.int32), token_bits=student.token_bits)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import keras
import tensorflow as tf

from tfqat.quant.losses import distillation_loss, distribution_loss, entropy_loss
from tfqat.quant.quantizers import ActQuantizer, WeightQuantizer, clip_search_scale, qrange
from tfqat.quant.recipes import Recipe, get_recipe
from tfqat.quant.token_bits import select_token_bits

RecipeLike = Union[str, dict, Recipe]

# -- slot registry ---------------------------------------------------------------------------

# Which bit width of the recipe each activation point takes.
ACT_SLOTS: dict[str, str] = {
    "attn_in": "act", "q": "act", "mlp_in": "act", "mlp_act": "act",  # activations
    "o_in": "o_in",  # o_proj's input: quantized only when the recipe names it dynamic
    "k": "kv", "v": "kv",  # what the KV cache stores
    "probs": "probs",  # softmax probabilities: unsigned, min-max init, never token-adaptive
}


def _act_rule(recipe: Recipe, bits: Optional[int], point: str = "") -> Optional[ActQuantizer]:
    if bits is None:
        return None
    gran = "token" if point in recipe.dynamic else "tensor"
    if recipe.adaptive:
        return ActQuantizer(bits, granularity=gran, adaptive=True, low_bits=recipe.low_bits)
    if gran == "token":
        return ActQuantizer(bits, granularity="token")
    # At 16 bits clipping buys nothing: fit the range (the float-precision check).
    return ActQuantizer(bits, asymmetric=recipe.act_asymmetric, init="minmax" if bits >= 16 else None)


SLOT_RULES: dict[str, Callable[[Recipe, str], Optional[keras.layers.Layer]]] = {
    "act": lambda r, p: _act_rule(r, r.a_bits, p),
    "kv": lambda r, p: _act_rule(r, r.kv_bits, p),
    "probs": lambda r, p: None if r.probs_bits is None else ActQuantizer(
        r.probs_bits, granularity="row" if "probs" in r.dynamic else "tensor", signed=False, init="minmax"),
    # o_proj's input: 8-bit at most and one width for every token (the kernels' dynamic8 o_proj)
    "o_in": lambda r, p: (ActQuantizer(min(8, r.a_bits), granularity="token") if "o_in" in r.dynamic
                          else None),
}


def weight_quantizer_for(recipe: Recipe) -> Optional[WeightQuantizer]:
    if recipe.w_bits is None:
        return None
    if recipe.weight_group_size:
        return WeightQuantizer(recipe.w_bits, "group", recipe.weight_group_size)
    return WeightQuantizer(recipe.w_bits, recipe.weight_granularity)


def act_quantizer_for(point_name: str, recipe: Recipe) -> Optional[keras.layers.Layer]:
    """The quantizer a recipe puts at an activation point (by the point's name)."""
    try:
        rule = ACT_SLOTS[point_name]
    except KeyError:
        raise ValueError(f"quantize_model: activation point {point_name!r} has no rule; add it to "
                         f"tfqat.quant.qat.ACT_SLOTS") from None
    return SLOT_RULES[rule](recipe, point_name)


def make_token_bits(recipe: Recipe) -> Optional[Callable[[tf.Tensor], tf.Tensor]]:
    """``importance (B, T) -> bits (B, T)`` for an adaptive recipe (top ``rho*T`` at 8), else None."""
    if not recipe.adaptive:
        return None
    rho = float(recipe.rho)
    return lambda importance: select_token_bits(importance, rho)


# -- prepare ---------------------------------------------------------------------------------


def quantize_model(model: keras.Model, recipe: RecipeLike, name: str = "student") -> keras.Model:
    """A new model of ``model``'s config with its weights and fake-quantizers in every slot.

    The teacher is left untouched. The student carries ``student.recipe`` and
    ``student.token_bits`` (the callable to pass as ``student(x, token_bits=...)``; ``None``
    for non-adaptive recipes). Quantizer variables are created by a forward pass here; their
    scales stay uninitialised until :func:`calibrate` or the first training step.

    Raises:
        RecipeError: bad recipe name or bit width (one line).
    """
    from tfqat.models import build_model

    recipe = get_recipe(recipe)
    student = build_model(model.config, name=name)
    student.set_weights(model.get_weights())
    for block in student.blocks:
        for linear in block.linears().values():
            linear.set_weight_quantizer(weight_quantizer_for(recipe))
        for point_name, point in block.quant_points().items():
            point.set_quantizer(act_quantizer_for(point_name, recipe))
    student.recipe = recipe
    student.token_bits = make_token_bits(recipe)
    student(tf.zeros((1, 2), tf.int32), token_bits=student.token_bits)  # build the quantizers
    return student


def quantizers(student: keras.Model) -> dict[str, keras.layers.Layer]:
    """Every attached quantizer by path ``block_i/<slot>``."""
    out = {}
    for block in student.blocks:
        for name, linear in block.linears().items():
            if linear.weight_quantizer is not None:
                out[f"{block.name}/{name}"] = linear.weight_quantizer
        for name, point in block.quant_points().items():
            if point.quantizer is not None:
                out[f"{block.name}/{name}"] = point.quantizer
    return out


# -- RTN calibration -------------------------------------------------------------------------


def mse_weight_scale(wq: WeightQuantizer, w: tf.Tensor, grid: int = 40) -> tf.Tensor:
    """The scale of ``wq``'s shape (per channel, per group or per tensor) minimising
    ``||w - fq(w)||^2`` over clip ratios 0.3..1."""
    gran = wq.spec.granularity
    shape = None
    if gran == "group":  # (ng, G, N) -> (G, ng * N): one column per (group, output channel)
        g = wq._grouped(tf.convert_to_tensor(w, tf.float32))
        shape = (g.shape[0], g.shape[2])
        w = tf.reshape(tf.transpose(g, (1, 0, 2)), (g.shape[1], -1))
    axes = None if gran == "tensor" else [0]
    peak = tf.maximum(tf.reduce_max(tf.abs(w), axis=axes), 1e-8)
    s = clip_search_scale(w, peak, qrange(wq.spec.bits, True)[1], tf.linspace(0.3, 1.0, grid), axes=axes)
    return s if shape is None else tf.reshape(s, shape)


def calibrate(student: keras.Model, batches: Iterable, weight_mse: bool = True, act_init: str = "lsq",
              progress: bool = False) -> None:
    """Post-training quantization: prepare the float weights, then initialise every scale from
    data; trains nothing.

    In order: (1) the recipe's SmoothQuant factors are folded into the float weights (once per
    student, :mod:`tfqat.quant.smooth`); (2) weights: GPTQ when the recipe says
    ``weight_init: gptq`` (:func:`~tfqat.quant.gptq.gptq_student`), else each scale takes the clip
    that minimises the squared rounding error (``weight_mse=False``: the LSQ init); (3)
    activation scales take their quantizer's own data init (``act_init="lsq"``: LSQ
    ``2 mean|x| / sqrt(Qp)``, min-max for probs; ``"mse"``: signed scales take the clip with the
    least squared error, see :func:`~tfqat.quant.quantizers.mse_scale` — what a pretrained model
    with activation outliers needs) over all ``batches`` at once (one forward on their
    concatenation, with the recipe's token bits and the weights already quantized; layer by
    layer, so each layer calibrates on inputs already quantized upstream). Re-calibrating
    overwrites earlier scales.

    Args:
        batches: iterable of ``inputs`` or ``(inputs, targets)`` int ``(B, T)``.
    """
    if act_init not in ("lsq", "mse"):
        raise ValueError(f"calibrate: act_init={act_init!r} is unknown; use 'lsq' or 'mse'")
    xs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not xs:
        raise ValueError("calibrate: no batches; pass at least one (inputs, targets) batch")
    x = tf.concat([tf.convert_to_tensor(b, tf.int32) for b in xs], axis=0)
    recipe = getattr(student, "recipe", None)
    if recipe is not None and recipe.smooth is not None and not getattr(student, "smoothed", False):
        from tfqat.quant.smooth import smooth_student

        smooth_student(student, [x], recipe.smooth)
        student.smoothed = True
    all_q = quantizers(student)
    act_qs = [q for q in all_q.values() if isinstance(q, ActQuantizer)]
    if recipe is not None and recipe.weight_init == "gptq":
        from tfqat.quant.gptq import gptq_student

        gptq_student(student, [x], progress=progress)
    else:
        for block in student.blocks:
            for linear in block.linears().values():
                wq = linear.weight_quantizer
                if wq is None:
                    continue
                kernel = tf.convert_to_tensor(linear.kernel)
                s = (mse_weight_scale(wq, kernel) if weight_mse
                     else tf.reshape(wq._init_values(tf.cast(kernel, tf.float32))[0], wq.scale.shape))
                wq.scale.assign(tf.reshape(s, wq.scale.shape))
                wq.initialized.assign(True)
    for q in act_qs:
        q.initialized.assign(False)
        q.calib_override = act_init
    try:
        student(x, training=True, token_bits=student.token_bits)  # stores every activation init
    finally:
        for q in act_qs:
            q.calib_override = None


# -- size ------------------------------------------------------------------------------------


def projection_shapes(cfg) -> list[tuple[int, int, bool]]:
    """``(in, out, bias)`` of every quantizable projection of a model config."""
    hd = cfg.head_dim
    attn = [(cfg.hidden, cfg.heads * hd), (cfg.hidden, cfg.num_kv_heads * hd),
            (cfg.hidden, cfg.num_kv_heads * hd), (cfg.heads * hd, cfg.hidden)]
    if cfg.arch == "llama":
        mlp = [(cfg.hidden, cfg.ffn), (cfg.hidden, cfg.ffn), (cfg.ffn, cfg.hidden)]
    else:
        mlp = [(cfg.hidden, cfg.ffn), (cfg.ffn, cfg.hidden)]
    bias = cfg.arch == "gpt2"
    return [(i, o, bias) for i, o in attn + mlp] * cfg.layers


def model_size_bytes(cfg, recipe: Optional[RecipeLike] = None) -> dict:
    """Stored model size at the recipe's bit widths (``recipe=None``: all float32).

    Counts: projection weights at ``w_bits`` (int4 packed two per byte) plus one float32 scale
    per output channel (or per matrix); projection biases float32; embeddings, lm_head and
    norms float32; activation quantizers 4 bytes per scale (8-bit and 4-bit scale when
    adaptive, plus a zero point when asymmetric). Not counted: the KV cache (runtime memory).

    Returns:
        ``{"total", "projections", "scales", "float"}`` in bytes.
    """
    from tfqat.models import param_count

    recipe = None if recipe is None else get_recipe(recipe)
    projs = projection_shapes(cfg)
    proj_params = sum(i * o for i, o, _ in projs)
    bias_params = sum(o for _, o, b in projs if b)
    float_params = param_count(cfg) - proj_params  # embeddings, norms, lm_head, biases
    if recipe is None or recipe.w_bits is None:
        proj_bytes, scale_bytes = 4 * proj_params, 0
    else:
        proj_bytes = sum(math.ceil(i * o * recipe.w_bits / 8) for i, o, _ in projs)
        g = recipe.weight_group_size
        if g:
            scale_bytes = 4 * sum(o * -(-i // g) for i, o, _ in projs)
        else:
            scale_bytes = 4 * (sum(o for _, o, _ in projs) if recipe.weight_granularity == "channel" else len(projs))
        per_point = 0
        for point, rule in ACT_SLOTS.items():
            q = SLOT_RULES[rule](recipe, point)
            if q is not None and q.spec.granularity != "token":
                per_point += 4 * (1 + q.spec.adaptive + q.spec.asymmetric)
        scale_bytes += per_point * cfg.layers
    assert bias_params <= float_params
    total = proj_bytes + scale_bytes + 4 * float_params
    return {"total": total, "projections": proj_bytes, "scales": scale_bytes, "float": 4 * float_params}


# -- loss ------------------------------------------------------------------------------------


def qat_loss(student: keras.Model, teachers: Union[keras.Model, list], losses) -> Callable:
    """``(x, y, training) -> (loss, metrics)``: distill + r_E * entropy + r_D * distribution.

    Args:
        teachers: the FP teacher (or several; their logits are averaged; the first one's
            attention maps are the distribution loss's target). Run inside the same step,
            frozen.
        losses: a :class:`~tfqat.config.QATLossConfig` (weights and forms).
    """
    teachers = list(teachers) if isinstance(teachers, (list, tuple)) else [teachers]
    for t in teachers:
        t.trainable = False  # the tape never watches the teacher's variables
    need_maps = losses.distribution > 0

    def fn(x, y, training):
        t_logits, t_int = [], None
        for i, t in enumerate(teachers):
            if i == 0 and need_maps:
                logits, t_int = t(x, training=False, return_internals=True)
            else:
                logits = t(x, training=False)
            t_logits.append(tf.stop_gradient(logits))
        s_logits, s_int = student(x, training=training, return_internals=True, token_bits=student.token_bits)
        l_kd = distillation_loss(s_logits, t_logits, y, losses.gamma, losses.temperature)
        total = l_kd
        metrics = {"distill": l_kd}
        if losses.entropy > 0:
            l_e = entropy_loss(s_int["q"], s_int["k"], losses.entropy_form)
            total += losses.entropy * l_e
            metrics["entropy"] = l_e
        if need_maps:
            l_d = distribution_loss(s_int["scores"], [tf.stop_gradient(s) for s in t_int["scores"]],
                                    losses.distribution_form)
            total += losses.distribution * l_d
            metrics["distribution"] = l_d
        metrics["ce"] = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=tf.cast(s_logits, tf.float32)))
        return total, metrics

    return fn


def logprob_fn(student: keras.Model):
    """A :data:`tfqat.evaluate.LogprobFn` for a student, with its recipe's token bits."""

    @tf.function(reduce_retracing=True)
    def fn(x, y):
        logits = tf.cast(student(x, training=False, token_bits=student.token_bits), tf.float32)
        return -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)

    return lambda x, y: fn(tf.constant(x, tf.int32), tf.constant(y, tf.int32)).numpy()


# -- stages ----------------------------------------------------------------------------------


def stage_dir(cfg, recipe: Recipe, tag: Optional[str] = None) -> Path:
    return cfg.run_dir / f"qat-{tag or recipe.name}"


def calibration_batches(cfg, data, n: Optional[int] = None) -> list:
    """``n`` training batches at steps past the FP run's, so calibration sees fresh windows."""
    from tfqat.data import train_dataset

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
    from tfqat.config import config_to_dict
    from tfqat.data import train_dataset
    from tfqat.pipeline import (
        _claim_stage_dir, fingerprint, teacher_path, write_json_atomic,
    )
    from tfqat.training import save_weights_atomic, seed_everything, train_loop

    qat = qat or cfg.qat
    recipe = resolve_recipe(cfg.model_copy(update={"qat": qat}), recipe)
    stage = stage_dir(cfg, recipe, tag)
    fp = fingerprint(config_to_dict(cfg.model), config_to_dict(cfg.train), cfg.data.seq_len, data.key,
                     config_to_dict(qat), recipe.to_dict())
    _claim_stage_dir(stage, fp, "QAT student")
    result_path, weights = stage / "result.json", stage / "student.weights.h5"
    seed_everything(qat.train.seed)
    if weights.is_file() and result_path.is_file():
        student = quantize_model(teacher, recipe)
        student.load_weights(str(weights))
        return student, {**json.loads(result_path.read_text()), "reused": True}
    init_path, init_info = _initial_student(cfg, data, teacher, recipe, qat, progress)
    t = qat.train
    if t.steps == 0:  # post-training only: the calibrated (and block-wise reconstructed) student
        student = quantize_model(teacher, recipe)
        student.load_weights(str(init_path))
        save_weights_atomic(student, weights)
        write_json_atomic(stage / "recipe.json", recipe.to_dict())
        result = {"recipe": recipe.name, "steps": 0, "final_loss": None, "tokens_per_s": 0.0,
                  "wall_s": init_info["wall_s"], "resumed_from": None, "tokens_seen": 0,
                  "teacher": str(teacher_path(cfg)), **init_info}
        write_json_atomic(result_path, result)
        return student, {**result, "reused": False}
    teachers = [teacher]
    for path in qat.losses.extra_teachers:
        from tfqat.models import build_model

        extra = build_model(cfg.model, name=f"teacher_{len(teachers)}")
        extra.load_weights(path)
        teachers.append(extra)

    def build():  # under the strategy's scope (train_loop calls it there); teachers stay outside, frozen
        seed_everything(qat.train.seed)
        student = quantize_model(teacher, recipe)
        student.load_weights(str(init_path))
        return student, qat_loss(student, teachers, qat.losses)

    res = train_loop(
        stage, build, None,
        lambda start: train_dataset(data.ids["train"], cfg.data.seq_len, t.batch_size, t.seed, start, t.steps),
        t, t.steps, t.batch_size * cfg.data.seq_len, desc=f"QAT {recipe.name}", progress=progress,
    )
    student = res.model
    from tfqat.pipeline import is_chief

    if not is_chief(cfg.model_copy(update={"qat": qat})):
        return student, {"recipe": recipe.name, "steps": res.steps, "reused": False, "chief": False}
    save_weights_atomic(student, weights)
    write_json_atomic(stage / "recipe.json", recipe.to_dict())
    result = {"recipe": recipe.name, "steps": res.steps, "final_loss": res.final_loss,
              "tokens_per_s": res.tokens_per_s, "wall_s": res.wall_s + init_info["wall_s"], **init_info,
              "resumed_from": res.resumed_from, "tokens_seen": res.steps * t.batch_size * cfg.data.seq_len,
              "teacher": str(teacher_path(cfg))}
    write_json_atomic(result_path, result)
    return student, {**result, "reused": False}


def _initial_student(cfg, data, teacher: keras.Model, recipe: Recipe, qat, progress: bool) -> tuple[Path, dict]:
    """The student QAT starts from, written once to ``runs/<name>/init-<recipe>-<hash>/init.weights.h5``:
    calibrated (SmoothQuant, GPTQ / MSE weights, activation scales) and, with
    ``qat.blockwise.steps_per_block``, block-wise reconstructed. Shared by every QAT stage with the
    same recipe and initialisation settings (an ablation's rows start from one init). Each part is a
    resume point (``calibrated.weights.h5``, ``blockwise.weights.h5`` + ``blockwise/progress.json``),
    so a kill costs at most one block. Returns the path and
    ``{"calib_s", "blockwise_s", "wall_s", "blockwise"}``."""
    from tfqat.config import config_to_dict
    from tfqat.data import train_dataset
    from tfqat.pipeline import _claim_stage_dir, fingerprint, write_json_atomic
    from tfqat.training import save_weights_atomic

    # calibration batches and block-wise sequences come from cfg (not the row's qat): rows that
    # differ only in their end-to-end training share this init
    fp = fingerprint(config_to_dict(cfg.model), cfg.data.seq_len, data.key, recipe.to_dict(), qat.calib_batches,
                     qat.act_calibration, config_to_dict(qat.blockwise), cfg.qat.train.seed,
                     cfg.qat.train.batch_size)
    stage = cfg.run_dir / f"init-{recipe.name}-{fp[:8]}"
    _claim_stage_dir(stage, fp, "calibrated student")
    init, info_path = stage / "init.weights.h5", stage / "init.json"
    if init.is_file() and info_path.is_file():
        return init, json.loads(info_path.read_text())
    stage.mkdir(parents=True, exist_ok=True)
    student = quantize_model(teacher, recipe)
    calibrated, calib_info = stage / "calibrated.weights.h5", stage / "calibrated.json"
    if calibrated.is_file() and calib_info.is_file():
        student.load_weights(str(calibrated))
        calib_s = json.loads(calib_info.read_text())["calib_s"]
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
        from tfqat.blockwise import reconstruct

        bw_weights = stage / "blockwise.weights.h5"
        if bw_weights.is_file():
            student.load_weights(str(bw_weights))
        tokens = next(iter(train_dataset(data.ids["train"], cfg.data.seq_len, bw.sequences,
                                         cfg.qat.train.seed + 104729, 0, 1)))[0].numpy()
        state = reconstruct(student, teacher, tokens, stage / "blockwise", bw.steps_per_block, bw.batch_size,
                            bw.lr, bw.scale_lr, cfg.qat.train.seed, progress=progress,
                            save=lambda m: save_weights_atomic(m, bw_weights))
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
        student.load_weights(str(path))
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
    from tfqat.models import build_model

    path = Path(path)
    if not (path / "recipe.json").is_file() and (path / f"qat-{resolve_recipe(cfg).name}").is_dir():
        path = path / f"qat-{resolve_recipe(cfg).name}"
    rfile, wfile = path / "recipe.json", path / "student.weights.h5"
    if not rfile.is_file() or not wfile.is_file():
        raise FileNotFoundError(f"{path}: no trained student (recipe.json + student.weights.h5); "
                                "run python -m tfqat.train first")
    recipe = get_recipe(json.loads(rfile.read_text()))
    student = quantize_model(build_model(cfg.model, name="teacher"), recipe)
    student.load_weights(str(wfile))
    return student
