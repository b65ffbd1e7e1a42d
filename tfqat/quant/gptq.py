"""4-bit weights: RTN and GPTQ (Frantar et al.), group-wise symmetric scales, numpy float64.

Kernel layout is tfqat's ``[in, out]``; GPTQ's rows are output channels, its columns the input
features, so the algorithm runs on ``W = kernel.T`` ``(out, in)``. Hessian ``H = 2 X^T X / N`` from
the calibration inputs ``X (N, in)`` of that Linear; damping ``percdamp * mean(diag H)``; dead
inputs (``H_ii == 0``) get ``H_ii = 1`` and zero weights; act-order permutes columns by
decreasing ``diag H``; the upper Cholesky factor of ``H^-1`` drives the column-by-column error
compensation, in lazy blocks of 128 columns. Groups of ``group_size`` consecutive columns *in
the processing order* share a scale per output row (the reference's act-order grouping; a kernel
then needs the permutation / group index, returned as ``g_idx``). A group's scale is chosen when
its first column is reached, by the least-squares clip over ratios 0.5..1 of its (already
error-updated) weights.
"""

from __future__ import annotations

import numpy as np

from tfqat.quant.quantizers import qrange


def group_scale(w: np.ndarray, bits: int, grid: int = 20) -> np.ndarray:
    """Per-row symmetric scale of ``w (rows, cols)`` minimising the rounding error."""
    qmin, qmax = qrange(bits, True)
    peak = np.maximum(np.abs(w).max(axis=1), 1e-8)
    best_s, best_e = None, None
    for r in np.linspace(0.5, 1.0, grid):
        s = peak * r / qmax
        e = ((np.clip(np.round(w / s[:, None]), qmin, qmax) * s[:, None] - w) ** 2).sum(1)
        if best_s is None:
            best_s, best_e = s, e
        else:
            better = e < best_e
            best_s, best_e = np.where(better, s, best_s), np.where(better, e, best_e)
    return best_s


def _q(w, s, bits):
    qmin, qmax = qrange(bits, True)
    return np.clip(np.round(w / s), qmin, qmax) * s


def rtn(kernel: np.ndarray, bits: int = 4, group_size: int = 128) -> np.ndarray:
    """Round-to-nearest, group-wise along the input axis; returns the dequantized kernel [in, out]."""
    w = np.asarray(kernel, np.float64).T.copy()  # (out, in)
    out = np.empty_like(w)
    g = group_size or w.shape[1]
    for j in range(0, w.shape[1], g):
        s = group_scale(w[:, j:j + g], bits)
        out[:, j:j + g] = _q(w[:, j:j + g], s[:, None], bits)
    return out.T.astype(np.float32)


def hessian(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    return 2.0 * x.T @ x / max(len(x), 1)


def gptq(kernel: np.ndarray, h: np.ndarray, bits: int = 4, group_size: int = 128, act_order: bool = True,
         percdamp: float = 0.01, block: int = 128, return_scales: bool = False, static_groups: bool = False):
    """GPTQ of ``kernel [in, out]`` with Hessian ``h (in, in)``.

    Returns ``(dequantized kernel [in, out] float32, g_idx (in,))`` where ``g_idx[i]`` is the
    group of input feature i; with ``return_scales`` also the float64 scales ``(out, groups)``
    (``group_size`` 0 / None: one group spanning all inputs, i.e. one scale per output channel,
    codes in the original column order even with act-order).

    ``static_groups``: groups are ``group_size`` consecutive inputs in the *original* order (what
    a grouped kernel reads: ``g_idx[i] = i // group_size``), their scales fixed up front from the
    unquantized weights; act-order then only orders the error compensation.
    """
    w = np.asarray(kernel, np.float64).T.copy()  # (out, in)
    h = np.asarray(h, np.float64).copy()
    n = w.shape[1]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    g = group_size or n
    fixed = None
    if static_groups:
        fixed = np.stack([group_scale(w[:, j:j + g], bits) for j in range(0, n, g)], axis=1)  # (out, ng)
    w, h = w[:, perm], h[perm][:, perm]
    h[np.diag_indices(n)] += percdamp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    q = np.zeros_like(w)
    scale = None
    g_idx_perm = np.arange(n) // g
    scales = np.zeros((w.shape[0], -(-n // g)))
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if fixed is not None:
                scale = fixed[:, perm[col] // g]
            elif col % g == 0:
                # the group's scale from its current (error-updated) weights; later columns of
                # the group in this lazy block are read from w1, further ones from w
                grp = np.concatenate([w1[:, i:], w[:, i2:]], axis=1)[:, : min(g, n - col)]
                scale = group_scale(grp, bits)
                scales[:, col // g] = scale
            wc = w1[:, i]
            qc = _q(wc, scale, bits)
            q[:, col] = qc
            e = (wc - qc) / hinv1[i, i]
            w1[:, i:] -= np.outer(e, hinv1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = np.argsort(perm)
    if fixed is not None:
        q = q[:, inv]
        return (q.T.astype(np.float32), np.arange(n) // g, fixed) if return_scales else (q.T.astype(np.float32), np.arange(n) // g)
    g_idx = g_idx_perm[inv]
    if return_scales:
        return q[:, inv].T.astype(np.float32), g_idx, scales
    return q[:, inv].T.astype(np.float32), g_idx


def output_error(x: np.ndarray, kernel: np.ndarray, kernel_hat: np.ndarray) -> float:
    """``||X W - X W_hat||_F^2 / N``: what GPTQ minimises."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    return float(((x @ (np.asarray(kernel, np.float64) - kernel_hat)) ** 2).sum() / len(x))


# ---- GPTQ as the weight initialisation of a QAT student ------------------------------------------

def _stages(block) -> list:
    """Projections in the order their inputs become final: q/k/v, o, gate/up (fc_in), down."""
    lin = block.linears()
    mlp = list(type(block.mlp).LINEARS)
    return [["q_proj", "k_proj", "v_proj"], ["o_proj"], mlp[:-1], mlp[-1:]] if lin else []


def gptq_student(student, batches, act_order: bool = True, chunk: int = 8, progress: bool = False) -> dict:
    """GPTQ every projection of a :func:`~tfqat.quant.qat.quantize_model` student in place, block
    by block, projection group by group ("true sequential"): each group's Hessian comes from its
    inputs with every earlier projection already quantized and the activations quantized as the
    student's quantizers do. Sets each weight quantizer's scale to the GPTQ scale (grouped
    quantizers: static groups in the original input order, what the kernel reads) and the kernel
    to ``codes * scale``, so the quantizer reproduces GPTQ's codes exactly; marks them initialised.

    Returns ``{"<block>/<linear>": relative output error}`` (``||X (W - W_hat)||^2 / ||X W||^2``).
    """
    import tensorflow as tf

    xs = np.concatenate([np.asarray(b[0] if isinstance(b, (tuple, list)) else b) for b in batches])
    chunks = [tf.constant(xs[i:i + chunk], tf.int32) for i in range(0, len(xs), chunk)]
    hidden = [student.embed(c) for c in chunks]
    bits = [None if student.token_bits is None else tf.fill(tf.shape(c), 8) for c in chunks]
    errors = {}
    for bi, block in enumerate(student.blocks):
        lin = block.linears()
        for names in _stages(block):
            hs = {n: np.zeros((int(lin[n].kernel.shape[0]),) * 2) for n in names}
            count = [0]

            def run_hooked():
                originals = {}
                for n in names:
                    orig = lin[n].call
                    originals[n] = orig

                    def hook(inp, orig=orig, n=n):
                        a = np.asarray(inp, np.float64).reshape(-1, inp.shape[-1])
                        hs[n] += a.T @ a
                        if n == names[0]:
                            count[0] += len(a)
                        return orig(inp)

                    object.__setattr__(lin[n], "call", hook)
                try:
                    for hc, bc in zip(hidden, bits):
                        block(hc, bits=bc, token_bits=student.token_bits, training=False)
                finally:
                    for n in names:
                        lin[n].__dict__.pop("call", None)

            run_hooked()
            for n in names:
                layer, wq = lin[n], lin[n].weight_quantizer
                if wq is None:
                    continue
                h = 2.0 * hs[n] / max(count[0], 1)
                k = layer.kernel.numpy()
                grouped = wq.spec.granularity == "group"
                k_hat, _, s = gptq(k, h, wq.spec.bits, wq.spec.group_size if grouped else None, act_order,
                                   return_scales=True, static_groups=grouped)
                s_full = np.repeat(s, wq.spec.group_size or k.shape[0], axis=1)[:, :k.shape[0]]  # (out, in)
                codes = np.clip(np.round(k_hat.astype(np.float64).T / s_full), wq.qmin, wq.qmax)
                layer.kernel.assign((codes.astype(np.float32) * s_full.astype(np.float32)).T)
                s32 = s.astype(np.float32)
                wq.scale.assign(s32.T if grouped else s32[:, 0])
                wq.initialized.assign(True)
                k64 = k.astype(np.float64)
                d = k64 - layer.kernel.numpy().astype(np.float64)
                errors[f"{block.name}/{n}"] = float((d * (h @ d)).sum() / max((k64 * (h @ k64)).sum(), 1e-30))
        out = [block(hc, bits=bc, token_bits=student.token_bits, training=False) for hc, bc in zip(hidden, bits)]
        hidden = [o[0] for o in out]
        bits = [o[2] if student.token_bits is not None else None for o in out]
        if progress:
            worst = max(v for key, v in errors.items() if key.startswith(block.name + "/"))
            print(f"  GPTQ block {bi}: worst relative output error {worst:.2e}", flush=True)
    return errors
