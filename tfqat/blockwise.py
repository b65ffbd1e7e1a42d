"""Block-wise reconstruction (BRECQ / OmniQuant / EfficientQAT's Block-AP): train one decoder block
of a quantized student at a time to reproduce the FP teacher's block output, on cached inputs.

Why: end-to-end QAT of a 135M model costs a teacher and a student forward plus a backward through
30 blocks per step, tens of seconds per step on a 2-core CPU. A block step costs 1/30 of that with
no teacher in the loop, so every block sees several epochs of its cached inputs within the budget
of a few hundred end-to-end steps.

Per block ``i`` (in order): the student block takes the *quantized* path's hidden state ``X_q``
(blocks ``< i`` already reconstructed and quantized, so later blocks learn to absorb earlier
errors) and the target is the teacher block's output on the *float* path ``X_fp``; the block's
latent float weights, norms and every quantizer scale train with AdamW on the squared error,
weights and scales at their own learning rates; then both paths advance one block.

``loss="mse"`` is the plain squared error of the residual stream. A pretrained LM's stream has a
few massive channels (values in the hundreds on a few tokens) that dominate it although the next
RMSNorm all but erases them, so ``loss="next"`` measures the error as the next layer sees it: both
outputs through the teacher's next norms (the next block's attention and MLP norms; the final norm
after the last block). Token bits
(adaptive recipes) flow exactly as in the full model.

Resumable at block granularity: after each block the student's weights and ``progress.json``
(``{"done": i + 1}``) are written atomically; a rerun recomputes the two cached paths through the
finished blocks (forward only) and continues with the next block.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from .atomic import write_json_atomic


def _block_vars(block) -> tuple[list, list]:
    """``(weights, scales)``: latent kernels, biases, norm parameters; every quantizer's scales."""
    quant_ids = set()
    for lin in block.linears().values():
        if lin.weight_quantizer is not None:
            quant_ids.update(id(v) for v in lin.weight_quantizer.trainable_variables)
    for p in block.quant_points().values():
        if p.quantizer is not None:
            quant_ids.update(id(v) for v in p.quantizer.trainable_variables)
    allv = block.trainable_variables
    return [v for v in allv if id(v) not in quant_ids], [v for v in allv if id(v) in quant_ids]


def _advance(block, xs: list, bits: list, token_bits) -> tuple[list, list]:
    out = [block(x, bits=b, token_bits=token_bits, training=False) for x, b in zip(xs, bits)]
    return [o[0] for o in out], [o[2] if token_bits is not None else None for o in out]


def _distance(teacher, bi: int, loss: str):
    """``fn(a, b)``: the block output error the objective ``loss`` measures (see module doc)."""
    if loss == "mse":
        return lambda a, b: tf.reduce_mean(tf.square(a - b))
    if loss != "next":
        raise ValueError(f"block-wise loss {loss!r}: use 'mse' or 'next'")
    if bi + 1 < len(teacher.blocks):
        views = [teacher.blocks[bi + 1].attn_norm, teacher.blocks[bi + 1].mlp_norm]
    else:
        views = [teacher.final_norm]
    return lambda a, b: tf.add_n([tf.reduce_mean(tf.square(v(a) - v(b))) for v in views])


def reconstruct(student, teacher, tokens: np.ndarray, out_dir: Path, steps_per_block: int = 60,
                batch_size: int = 4, lr: float = 1e-4, scale_lr: float = 1e-5, seed: int = 0,
                chunk: int = 8, progress: bool = True, save=None, loss: str = "mse") -> dict:
    """Reconstruct every block of ``student`` (see module doc); returns a summary dict.

    Args:
        student: a calibrated :func:`~tfqat.quant.qat.quantize_model` student (trained in place).
        teacher: its FP teacher (frozen).
        tokens: int ``[N, T]`` calibration sequences (training text).
        out_dir: where ``progress.json`` and the per-block losses go.
        steps_per_block: optimizer steps per block (batches of ``batch_size`` sequences).
        save: ``fn(student)`` that stores the student atomically after each block (resume point).
        loss: ``"mse"`` (the residual stream) or ``"next"`` (through the next norms).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prog_path = out_dir / "progress.json"
    state = json.loads(prog_path.read_text()) if prog_path.is_file() else {"done": 0, "blocks": []}
    n = len(tokens)
    chunks = [tf.constant(tokens[i:i + chunk], tf.int32) for i in range(0, n, chunk)]
    xq = [student.embed(c) for c in chunks]
    xf = [teacher.embed(c) for c in chunks]
    adaptive = student.token_bits is not None
    bq = [tf.fill(tf.shape(c), 8) if adaptive else None for c in chunks]
    nones = [None] * len(chunks)
    t_start = time.perf_counter()
    for bi in range(state["done"]):  # resume: replay the finished blocks, forward only
        xq, bq = _advance(student.blocks[bi], xq, bq, student.token_bits)
        xf, _ = _advance(teacher.blocks[bi], xf, nones, None)
    rng = np.random.default_rng(seed)
    total_blocks = len(student.blocks)
    bar = tqdm(total=total_blocks * steps_per_block, initial=state["done"] * steps_per_block,
               desc="block-wise reconstruction", unit="step", disable=not progress)
    for bi in range(state["done"], total_blocks):
        sb, tb = student.blocks[bi], teacher.blocks[bi]
        target, _ = _advance(tb, xf, nones, None)
        x_in = tf.concat(xq, 0)  # (N, T, C)
        y_fp = tf.concat(target, 0)
        b_in = tf.concat(bq, 0) if adaptive else None
        weights, scales = _block_vars(sb)
        opt_w = keras.optimizers.AdamW(learning_rate=lr, weight_decay=0.0)
        opt_s = keras.optimizers.Adam(learning_rate=scale_lr)
        opt_w.build(weights)
        opt_s.build(scales)
        dist = _distance(teacher, bi, loss)
        norm = dist(y_fp, x_in) + 1e-12  # the block's own contribution

        @tf.function(reduce_retracing=True)
        def step(x, y, b):
            with tf.GradientTape() as tape:
                out, _, _ = sb(x, bits=b, token_bits=student.token_bits, training=True)
                value = dist(out, y) / norm
            gw, gs = tape.gradient(value, [weights, scales])
            opt_w.apply_gradients(zip(gw, weights))
            if scales:
                opt_s.apply_gradients(zip(gs, scales))
            return value

        def block_loss():
            out = [sb(x, bits=b, token_bits=student.token_bits, training=False)[0] for x, b in zip(xq, bq)]
            return float(dist(tf.concat(out, 0), y_fp) / norm)

        before = block_loss()
        losses = []
        for s in range(steps_per_block):
            idx = rng.choice(n, size=min(batch_size, n), replace=False)
            b = None if b_in is None else tf.gather(b_in, idx)
            losses.append(float(step(tf.gather(x_in, idx), tf.gather(y_fp, idx), b)))
            bar.update(1)
            bar.set_postfix(block=bi, loss=f"{losses[-1]:.4f}")
        after = block_loss()
        if not math.isfinite(after):
            raise FloatingPointError(f"block-wise reconstruction diverged at block {bi} (loss {after}); "
                                     "lower qat.blockwise.lr / scale_lr")
        xq, bq = _advance(sb, xq, bq, student.token_bits)
        xf = target
        state["blocks"].append({"block": bi, "loss_before": before, "loss_after": after,
                                "first_step_loss": losses[0] if losses else None,
                                "last_step_loss": losses[-1] if losses else None})
        state["done"] = bi + 1
        if save is not None:
            save(student)
        write_json_atomic(prog_path, state)
    bar.close()
    state["wall_s"] = state.get("wall_s", 0.0) + time.perf_counter() - t_start
    write_json_atomic(prog_path, state)
    return state
