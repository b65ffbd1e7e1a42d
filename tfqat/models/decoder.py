"""The pre-norm decoder shared by LLaMA and GPT-2: the block, and the causal LM around the blocks.

``CausalLM.call`` is where token-adaptive bit widths are threaded (METHOD.md section 3): layer 0
quantizes attn_in, q, k at 8 bits for every token; layer l derives bits from its own attention to
token 0 and uses them for its v and MLP points and for layer l+1's attn_in, q, k.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfqat.config import ModelConfig, config_to_dict
from tfqat.models.attention import Attention
from tfqat.models.linear import INIT_STD, Linear
from tfqat.models.quant_point import QuantPoint

INTERNALS = ("q", "k", "scores", "probs", "importance")


def _delegate(owner: str, attr: str):
    """A read-only property forwarding ``block.<attr>`` to ``block.<owner>.<attr>``."""
    return property(lambda self: getattr(getattr(self, owner), attr), doc=f"``{owner}.{attr}``")


class DecoderBlock(keras.layers.Layer):
    """``x + attn(attn_norm(x))``, then ``x + mlp(mlp_norm(x))``.

    Dropout (``cfg.dropout``, training only) acts on both residual branches and, in the model, on
    the embeddings; not on the attention probabilities, which are a quantization point.

    Args:
        cfg: model config.
        norm_cls: norm layer class, called as ``norm_cls(eps, name=...)``.
        mlp_cls: MLP layer class, called as ``mlp_cls(cfg, name="mlp")``.
        rotary, use_bias: passed to :class:`Attention`.
    """

    POINTS = ("attn_in", "q", "k", "v", "probs", "o_in", "mlp_in", "mlp_act")
    attn_in = _delegate("attn", "attn_in")  # (B, T, C) after attn_norm
    q = _delegate("attn", "q")  # (B, H, T, D) after RoPE
    k = _delegate("attn", "k")  # (B, K, T, D) after RoPE; the KV cache's K
    v = _delegate("attn", "v")  # (B, K, T, D)
    probs = _delegate("attn", "probs")  # (B, H, T, S) softmax, unsigned
    o_in = _delegate("attn", "o_in")  # (B, T, H*D) before o_proj (quantized by -dyn recipes)
    mlp_in = _delegate("mlp", "mlp_in")  # (B, T, C) after mlp_norm
    mlp_act = _delegate("mlp", "mlp_act")  # (B, T, F) before down_proj / fc_out

    def __init__(self, cfg: ModelConfig, norm_cls, mlp_cls, rotary: bool, use_bias: bool, **kwargs):
        super().__init__(**kwargs)
        self.attn_norm = norm_cls(cfg.norm_eps, name="attn_norm")
        self.attn = Attention(cfg, rotary=rotary, use_bias=use_bias, name="attn")
        self.mlp_norm = norm_cls(cfg.norm_eps, name="mlp_norm")
        self.mlp = mlp_cls(cfg, name="mlp")
        self.dropout = keras.layers.Dropout(cfg.dropout)

    def quant_points(self) -> dict[str, QuantPoint]:
        """Activation quantization points by name, in data-flow order."""
        return {name: getattr(self, name) for name in self.POINTS}

    def linears(self) -> dict[str, Linear]:
        """Projection layers by name (q_proj ... o_proj, then the MLP's), in data-flow order."""
        layers = [self.attn.q_proj, self.attn.k_proj, self.attn.v_proj, self.attn.o_proj]
        layers += [getattr(self.mlp, n) for n in type(self.mlp).LINEARS]
        return {layer.name: layer for layer in layers}

    def call(self, x, bits=None, token_bits=None, training=None):
        """``x (B, T, C)`` -> ``(x (B, T, C), internals dict, own_bits (B, T) or None)``."""
        h, internals, own_bits = self.attn(self.attn_norm(x), bits=bits, token_bits=token_bits)
        x = x + self.dropout(h, training=training)  # (B, T, C)
        h = self.mlp(self.mlp_norm(x), bits=own_bits)  # (B, T, C)
        x = x + self.dropout(h, training=training)  # (B, T, C)
        return x, internals, own_bits


class CausalLM(keras.Model):
    """Token embedding -> blocks -> final norm -> lm head; subclasses choose the parts.

    Subclasses set ``norm_cls``, ``mlp_cls``, ``rotary`` (RoPE in attention),
    ``learned_positions`` (GPT-2's position table), ``use_bias`` and implement
    :meth:`param_count`.

    Args:
        config: the :class:`~tfqat.config.ModelConfig` (also ``model.config``); ``get_config``
            is derived from it alone.
        name: Keras name of the model.

    The model is built (all weights created) on construction.
    """

    norm_cls: type
    mlp_cls: type
    rotary: bool
    learned_positions: bool
    use_bias: bool

    def __init__(self, config: ModelConfig, name: str | None = None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.config = config
        init = keras.initializers.RandomNormal(stddev=INIT_STD)
        self.embed_tokens = keras.layers.Embedding(
            config.vocab_size, config.hidden, embeddings_initializer=init, name="embed_tokens"
        )
        self.embed_positions = (
            keras.layers.Embedding(
                config.max_positions, config.hidden, embeddings_initializer=init,
                name="embed_positions",
            )
            if self.learned_positions
            else None
        )
        parts = dict(
            norm_cls=self.norm_cls, mlp_cls=self.mlp_cls, rotary=self.rotary, use_bias=self.use_bias
        )
        self.blocks = [
            DecoderBlock(config, **parts, name=f"block_{i}") for i in range(config.layers)
        ]
        self.final_norm = self.norm_cls(config.norm_eps, name="final_norm")
        self.lm_head = None if config.tie_embeddings else Linear(config.vocab_size, name="lm_head")
        self.dropout = keras.layers.Dropout(config.dropout)
        self(tf.zeros((1, 1), tf.int32))  # create every weight now: importers and QAT need them

    # -- length check: one line, before Keras wraps errors raised inside call() ------------------
    def check_length(self, tokens) -> None:
        """Raise a one-line ValueError when the static sequence length exceeds max_positions."""
        try:
            t = tokens.shape[1]
        except (AttributeError, IndexError, TypeError, ValueError):  # no / unknown-rank shape
            t = None
        if t is not None and t > self.config.max_positions:
            raise ValueError(
                f"sequence length {t} exceeds model.max_positions {self.config.max_positions}; "
                "shorten the input or raise max_positions"
            )

    def __call__(self, tokens, *args, **kwargs):
        self.check_length(tokens)
        return super().__call__(tokens, *args, **kwargs)

    # -- forward ----------------------------------------------------------------------------
    def embed(self, tokens):
        """``tokens (B, T)`` -> ``(B, T, C)``, plus learned positions ``0..T-1`` (GPT-2)."""
        x = self.embed_tokens(tokens)  # (B, T, C)
        if self.embed_positions is not None:
            x = x + self.embed_positions(tf.range(tf.shape(tokens)[1]))  # + (T, C) over B
        return x

    def logits(self, h):
        """``h (B, T, C)`` -> ``(B, T, V)``; tied: ``h @ embedding^T``."""
        if self.lm_head is None:
            return tf.einsum("btc,vc->btv", h, self.embed_tokens.embeddings)  # (B, T, V)
        return self.lm_head(h)  # (B, T, V)

    def call(self, tokens, training=False, return_internals=False, token_bits=None):
        """Args:
            tokens: int ``(B, T)``, ``T <= max_positions``.
            training: enables dropout.
            return_internals: also return ``internals``: a dict of per-layer lists, ``q``
                ``(B, H, T, D)`` and ``k`` ``(B, K, T, D)`` (after RoPE and their quant points),
                ``scores`` ``(B, H, T, T)`` (pre-softmax, future keys set to ``MASK_VALUE``),
                ``probs`` ``(B, H, T, T)`` (after the probs point), ``importance`` ``(B, T)``;
                plus ``bits`` (each layer's own ``(B, T)`` bits) when ``token_bits`` is given.
            token_bits: None, or a callable ``importance (B, T) -> bits (B, T)`` int32 (4 or 8).

        Returns:
            logits float32 ``(B, T, V)``, or ``(logits, internals)``.

        Raises:
            ValueError: ``T > max_positions`` (static shapes; asserted at run time otherwise).
        """
        self.check_length(tokens)
        tokens = tf.convert_to_tensor(tokens)
        if tokens.shape[1] is None:
            tf.debugging.assert_less_equal(
                tf.shape(tokens)[1], self.config.max_positions,
                message="sequence length exceeds model.max_positions; "
                "shorten the input or raise max_positions",
            )
        x = self.dropout(self.embed(tokens), training=training)  # (B, T, C)
        bits = None if token_bits is None else tf.fill(tf.shape(tokens)[:2], 8)  # layer 0: 8-bit
        internals = {key: [] for key in INTERNALS + (("bits",) if token_bits is not None else ())}
        for block in self.blocks:
            x, inner, bits = block(x, bits=bits, token_bits=token_bits, training=training)
            for key in INTERNALS:
                internals[key].append(inner[key])
            if token_bits is not None:
                internals["bits"].append(bits)
        logits = self.logits(self.final_norm(x))  # (B, T, V)
        return (logits, internals) if return_internals else logits

    # -- config -----------------------------------------------------------------------------
    def get_config(self) -> dict:
        return {"name": self.name, "config": config_to_dict(self.config)}

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        return cls(ModelConfig.model_validate(config.pop("config")), **config)

    @staticmethod
    def param_count(cfg: ModelConfig) -> int:
        raise NotImplementedError
