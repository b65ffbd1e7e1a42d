"""``quantize_model(model, recipe)``: the Keras 3 QAT entry point, plus RTN, size and loss.

Two steps, torchao style: :func:`quantize_model` *prepares* a student (a new model of the same
config, the teacher's weights copied, a quantizer in every slot the recipe names), then either
:func:`calibrate` alone (RTN post-training quantization: every scale set from a few batches, no
training) or calibrate and then train with :func:`qat_loss` (a run's QAT stage,
:func:`tfqat.qat_stage.qat_stage`).

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

import math
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
    if recipe.rotate and not getattr(model, "rotated", False):
        from tfqat.quant.rotate import rotate_model

        model = rotate_model(model)
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
