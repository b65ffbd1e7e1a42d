"""Model families: LLaMA and GPT-2 decoders with every QAT slot reachable.

``build_model(cfg)`` picks the family from ``cfg.arch`` through :data:`MODELS`; each block exposes
``quant_points()`` (activation :class:`QuantPoint` s) and ``linears()`` (:class:`Linear` s with a
``weight_quantizer`` slot), so QAT attaches quantizers without patching.

Example:
    >>> from tfqat.config import ModelConfig
    >>> model = build_model(ModelConfig(vocab_size=64, hidden=16, layers=1, heads=2, ffn=32))
    >>> model.count_params() == param_count(model.config)
    True
"""

from __future__ import annotations

import keras

from tfqat.config import ModelConfig
from tfqat.models.attention import MASK_VALUE, Attention
from tfqat.models.decoder import CausalLM, DecoderBlock
from tfqat.models.gpt2 import GPT2Model
from tfqat.models.linear import Linear
from tfqat.models.llama import LlamaModel
from tfqat.models.quant_point import QuantPoint

MODELS: dict[str, type[CausalLM]] = {"llama": LlamaModel, "gpt2": GPT2Model}


def build_model(cfg: ModelConfig, name: str | None = None) -> keras.Model:
    """A built model of family ``cfg.arch`` (``model(tokens int32 (B, T)) -> logits (B, T, V)``)."""
    return MODELS[cfg.arch](cfg, name=name)


def param_count(cfg: ModelConfig) -> int:
    """Number of weights of ``build_model(cfg)``, computed from the config alone."""
    return MODELS[cfg.arch].param_count(cfg)


__all__ = [
    "MASK_VALUE", "MODELS", "Attention", "CausalLM", "DecoderBlock", "GPT2Model", "Linear",
    "LlamaModel", "QuantPoint", "build_model", "param_count",
]
