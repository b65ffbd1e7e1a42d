"""LLaMA: RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases, optional tied embeddings."""

from __future__ import annotations

import keras

from tfqat.config import ModelConfig
from tfqat.models.decoder import CausalLM
from tfqat.models.mlp import SwiGLU
from tfqat.models.norms import RMSNorm


@keras.saving.register_keras_serializable(package="tfqat")
class LlamaModel(CausalLM):
    """LLaMA-style causal LM; see :class:`~tfqat.models.decoder.CausalLM` for ``call``."""

    norm_cls = RMSNorm
    mlp_cls = SwiGLU
    rotary = True
    learned_positions = False
    use_bias = False

    @staticmethod
    def param_count(cfg: ModelConfig) -> int:
        c, f, v = cfg.hidden, cfg.ffn, cfg.vocab_size
        kv = cfg.num_kv_heads * cfg.head_dim
        attn = 2 * c * c + 2 * c * kv  # q, o; k, v
        block = attn + 3 * c * f + 2 * c  # + gate, up, down; two RMSNorm scales
        head = 0 if cfg.tie_embeddings else v * c
        return v * c + cfg.layers * block + c + head  # embedding, blocks, final norm, lm_head
