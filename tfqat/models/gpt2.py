"""GPT-2: LayerNorm, learned positions, tanh-GELU MLP, biases everywhere, tied embeddings per cfg.

Q, K and V are three projections (not GPT-2's fused ``c_attn``) so QAT sees the same slots as in
LLaMA; importers split ``c_attn`` into them.
"""

from __future__ import annotations

import keras

from tfqat.config import ModelConfig
from tfqat.models.decoder import CausalLM
from tfqat.models.mlp import GeluMLP
from tfqat.models.norms import LayerNorm


@keras.saving.register_keras_serializable(package="tfqat")
class GPT2Model(CausalLM):
    """GPT-2-style causal LM; see :class:`~tfqat.models.decoder.CausalLM` for ``call``."""

    norm_cls = LayerNorm
    mlp_cls = GeluMLP
    rotary = False
    learned_positions = True
    use_bias = True

    @staticmethod
    def param_count(cfg: ModelConfig) -> int:
        c, f, v = cfg.hidden, cfg.ffn, cfg.vocab_size
        attn = 4 * (c * c + c)  # q, k, v, o with biases
        mlp = (c * f + f) + (f * c + c)  # fc_in, fc_out with biases
        block = attn + mlp + 2 * 2 * c  # two LayerNorms (gamma, beta)
        head = 0 if cfg.tie_embeddings else v * c
        return v * c + cfg.max_positions * c + cfg.layers * block + 2 * c + head
