"""EdgeQAT quantization: fake-quant layers, recipes, token bit selection, QAT losses and the
``quantize_model`` entry point.

Names are resolved lazily (PEP 562), so ``import tfqat.quant.recipes`` (what config validation
needs) does not import TensorFlow.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "tfqat.quant.losses": ("distillation_loss", "distribution_loss", "entropy_loss"),
    "tfqat.quant.quantizers": ("ActQuantizer", "WeightQuantizer", "fake_quant", "qrange"),
    "tfqat.quant.specs": ("ActQuantSpec", "WeightQuantSpec"),
    "tfqat.quant.token_bits": (
        "decode_rule_token_bits", "prefill_threshold", "select_token_bits", "threshold_token_bits",
    ),
    "tfqat.quant.recipes": ("RECIPES", "Recipe", "RecipeError", "get_recipe", "register_recipe"),
    "tfqat.quant.qat": (
        "calibrate", "logprob_fn", "make_token_bits", "model_size_bytes", "qat_loss", "quantize_model",
        "quantizers",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'tfqat.quant' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
