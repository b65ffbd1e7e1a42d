"""Export of the Agile-Quant per-channel student (``agile_student(..., group_size=None,
log2_probs=False)``) through the ordinary :func:`tfqat.export.export_models`.

The export reads, per Linear, a weight quantizer's ``export(kernel) -> (codes, per-output-channel
scales)`` and, per quant point, a per-tensor ActQuantizer. :func:`fold_for_export` turns the
Agile student into exactly that: TRIP factors folded (:func:`~tfqat.agile.trip.fold_student`:
per-tensor activation scales, kernel rows times ``2^k``), then every Linear gets a 4-bit per-channel
:class:`~tfqat.quant.quantizers.WeightQuantizer` holding the GPTQ scales. Since the folded kernels
are already ``float32(codes) * scale`` (the build quantized them in the folded domain), the
quantizer is the identity on them (``round(w / s) * s == w`` bit for bit; checked), so the Keras
logits do not change. up_proj's scales are divided by the mlp_act factors: folding divides its
output columns by ``2^k`` (exact), which keeps its codes and rescales each column.
"""

from __future__ import annotations

import numpy as np

from tfqat.agile.log2 import Log2Quantizer
from tfqat.agile.trip import TripQuantizer, fold_student
from tfqat.quant.quantizers import WeightQuantizer


def fold_for_export(student) -> dict:
    """Fold TRIP and attach per-channel 4-bit weight quantizers (in place; idempotent).

    Returns ``{"points_folded": n, "linears": m}``. Raises ValueError for a student the TFQAT
    kernels cannot run as is (group-wise weights, log2 probabilities).
    """
    if getattr(student, "agile_exportable", False):
        return student.agile_exportable
    scales = getattr(student, "agile_channel_scales", None)
    if scales is None:
        raise ValueError("fold_for_export: not a per-channel Agile student; build it with "
                         "agile_student(..., group_size=None) (GPTQ g128 has one scale per (row, group))")
    log2 = [bi for bi, b in enumerate(student.blocks) if isinstance(b.quant_points()["probs"].quantizer, Log2Quantizer)]
    if log2:
        raise ValueError(f"fold_for_export: block {log2[0]} probs are log2-quantized; TFQAT_ATTN_PV takes "
                         "linear uint8 probabilities (build with log2_probs=False)")
    act_f = []  # mlp_act factors (fold_student divides up_proj's columns by them)
    for block in student.blocks:
        q = block.quant_points()["mlp_act"].quantizer
        act_f.append(2.0 ** q.k.numpy() if isinstance(q, TripQuantizer) else None)
    n = fold_student(student)
    m = 0
    for bi, block in enumerate(student.blocks):
        for name, lin in block.linears().items():
            s = np.asarray(scales[(bi, name)], np.float32)
            if name == "up_proj" and act_f[bi] is not None:
                s = s / act_f[bi].astype(np.float32)
            wq = WeightQuantizer(4, "channel", name=f"agile_w_{bi}_{name}")
            wq.build(tuple(lin.kernel.shape))
            wq.scale.assign(s)
            wq.initialized.assign(True)
            kernel = lin.kernel.numpy()
            codes, sc = wq.export(kernel)
            if not np.array_equal(codes.T.astype(np.float32) * sc[None, :], kernel):
                raise ValueError(f"fold_for_export: block {bi} {name}: the folded kernel is not on its "
                                 "4-bit per-channel grid")
            lin.set_weight_quantizer(wq)
            m += 1
    student.agile_exportable = {"points_folded": n, "linears": m}
    return student.agile_exportable


def export_agile(student, teacher=None, out_dir=".", **kw) -> dict:
    """:func:`fold_for_export` then :func:`tfqat.export.export_models` (its checks included)."""
    from tfqat.export import export_models

    info = fold_for_export(student)
    extra = {**kw.pop("extra", {}), "agile": {**getattr(student, "agile", {}), **info}}
    return export_models(student, teacher, out_dir, extra=extra, **kw)
