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
         percdamp: float = 0.01, block: int = 128, return_scales: bool = False):
    """GPTQ of ``kernel [in, out]`` with Hessian ``h (in, in)``.

    Returns ``(dequantized kernel [in, out] float32, g_idx (in,))`` where ``g_idx[i]`` is the
    group of input feature i; with ``return_scales`` also the float64 scales ``(out, groups)``
    (``group_size`` 0 / None: one group spanning all inputs, i.e. one scale per output channel,
    codes in the original column order even with act-order).
    """
    w = np.asarray(kernel, np.float64).T.copy()  # (out, in)
    h = np.asarray(h, np.float64).copy()
    n = w.shape[1]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h[np.diag_indices(n)] += percdamp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    q = np.zeros_like(w)
    g = group_size or n
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
            if col % g == 0:
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
    g_idx = g_idx_perm[inv]
    if return_scales:
        return q[:, inv].T.astype(np.float32), g_idx, scales
    return q[:, inv].T.astype(np.float32), g_idx


def output_error(x: np.ndarray, kernel: np.ndarray, kernel_hat: np.ndarray) -> float:
    """``||X W - X W_hat||_F^2 / N``: what GPTQ minimises."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    return float(((x @ (np.asarray(kernel, np.float64) - kernel_hat)) ** 2).sum() / len(x))
