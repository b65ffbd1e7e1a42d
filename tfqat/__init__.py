"""tfqat: EdgeQAT quantization-aware training of small LLaMA / GPT-2 LMs in Keras 3.

``tfqat.quantize_model(model, recipe)`` is the entry point (see :mod:`tfqat.quant.qat`);
it is imported lazily so ``import tfqat`` stays cheap (no TensorFlow until it is used).
"""

from __future__ import annotations

__all__ = ["quantize_model"]


def __getattr__(name: str):
    if name == "quantize_model":
        from tfqat.quant.qat import quantize_model

        return quantize_model
    raise AttributeError(f"module 'tfqat' has no attribute {name!r}")
