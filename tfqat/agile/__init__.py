"""Agile-Quant (METHOD.md section 5): post-training W4A8 with TRIP activation factors, a 4-bit
log2 softmax quantizer, GPTQ 4-bit weights, and activation-aware token pruning.

Modules: :mod:`.trip` (TRIP quantizer, factor search, fold), :mod:`.log2` (log2 probs
quantizer), :mod:`.pruning` (token pruning in
evaluation), :mod:`.prune_export` (token pruning in the exported prefill), :mod:`.build` (assemble an
Agile-Quant student), :mod:`.exportable` (fold and export the per-channel variant). CLI: ``python -m tfqat.ptq``.
"""
