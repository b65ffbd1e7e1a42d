"""Feed-forward blocks: SwiGLU (LLaMA) and GELU MLP (GPT-2), with their QAT points."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from tfqat.config import ModelConfig
from tfqat.models.linear import INIT_STD, Linear
from tfqat.models.quant_point import QuantPoint


class SwiGLU(keras.layers.Layer):
    """``down(mlp_act(silu(gate(x)) * up(x)))`` with ``x = mlp_in(x)``; no biases."""

    LINEARS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, cfg: ModelConfig, **kwargs):
        super().__init__(**kwargs)
        self.gate_proj = Linear(cfg.ffn, name="gate_proj")
        self.up_proj = Linear(cfg.ffn, name="up_proj")
        out_std = INIT_STD / math.sqrt(2 * cfg.layers)  # residual-branch output, GPT-2 style
        self.down_proj = Linear(cfg.hidden, stddev=out_std, name="down_proj")
        self.mlp_in = QuantPoint(token_axis=1, name="mlp_in")  # (B, T, C)
        self.mlp_act = QuantPoint(token_axis=1, name="mlp_act")  # (B, T, F)

    def call(self, x, bits=None):
        x = self.mlp_in(x, bits=bits)  # (B, T, C)
        h = tf.nn.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, F)
        return self.down_proj(self.mlp_act(h, bits=bits))  # (B, T, C)


class GeluMLP(keras.layers.Layer):
    """``fc_out(mlp_act(gelu_tanh(fc_in(x))))`` with ``x = mlp_in(x)``; with biases (GPT-2)."""

    LINEARS = ("fc_in", "fc_out")

    def __init__(self, cfg: ModelConfig, **kwargs):
        super().__init__(**kwargs)
        self.fc_in = Linear(cfg.ffn, use_bias=True, name="fc_in")
        out_std = INIT_STD / math.sqrt(2 * cfg.layers)  # residual-branch output, GPT-2 style
        self.fc_out = Linear(cfg.hidden, use_bias=True, stddev=out_std, name="fc_out")
        self.mlp_in = QuantPoint(token_axis=1, name="mlp_in")  # (B, T, C)
        self.mlp_act = QuantPoint(token_axis=1, name="mlp_act")  # (B, T, F)

    def call(self, x, bits=None):
        x = self.mlp_in(x, bits=bits)  # (B, T, C)
        h = tf.nn.gelu(self.fc_in(x), approximate=True)  # (B, T, F); GPT-2's tanh GELU
        return self.fc_out(self.mlp_act(h, bits=bits))  # (B, T, C)
