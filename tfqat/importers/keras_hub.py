"""A local keras-hub LLaMA-family preset directory -> our LLaMA model, without keras-hub.

A preset saved by ``backbone.save_to_preset(dir)`` (keras-hub 0.32, checked) holds
``config.json`` (``{"class_name": "LlamaBackbone", "config": {vocabulary_size, num_layers,
num_query_heads, num_key_value_heads, hidden_dim, intermediate_dim, rope_max_wavelength,
rope_position_scaling_factor, layer_norm_epsilon, ...}}``) and ``model.weights.h5`` in Keras 3's
weights layout, read here with h5py::

    layers/reversible_embedding/vars/0                      (V, C)  token embedding
    layers/reversible_embedding/vars/1                      (C, V)  untied output (if any)
    layers/llama_transformer_decoder[_i]/                           block i (no suffix for 0)
        _self_attention_layernorm/vars/0                    (C,)
        _self_attention_layer/_query_dense/vars/0           (C, H, D)
        _self_attention_layer/_key_dense/vars/0             (C, K, D)
        _self_attention_layer/_value_dense/vars/0           (C, K, D)
        _self_attention_layer/_output_dense/vars/0          (H, D, C)
        _feedforward_layernorm/vars/0                       (C,)
        _feedforward_gate_dense/vars/0                      (C, F)
        _feedforward_intermediate_dense/vars/0              (C, F)  "up"
        _feedforward_output_dense/vars/0                    (F, C)  "down"
    layers/llama_layer_norm/vars/0                          (C,)    final norm

keras-hub's LLaMA RoPE is rotate-half (HF order), like ours: no permutation. keras-hub itself
(and the tensorflow-text it drags in) is not needed; it stays out of the default install.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

LLAMA_CLASSES = ("LlamaBackbone", "Llama3Backbone")
WEIGHTS_FILE = "model.weights.h5"
DECODER = "llama_transformer_decoder"


class PresetImportError(ValueError):
    """A preset this importer cannot map onto our model, reported as one line."""


def read_preset_config(preset: str | os.PathLike) -> dict:
    """``config.json``'s backbone config, checked to be a supported LLaMA-family backbone."""
    preset = Path(preset)
    path = preset / "config.json"
    if not path.is_file():
        raise PresetImportError(f"{preset}: not a keras-hub preset directory (no config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PresetImportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    cls = raw.get("class_name") if isinstance(raw, dict) else None
    if cls not in LLAMA_CLASSES:
        raise PresetImportError(
            f"{preset}: preset backbone is {cls!r}, not LLaMA-like; supported: {', '.join(LLAMA_CLASSES)}"
        )
    c = raw.get("config", {})
    if float(c.get("rope_position_scaling_factor") or 1.0) != 1.0 or c.get("rope_frequency_adjustment_factor"):
        raise PresetImportError(f"{preset}: RoPE scaling is not supported (rope_position_scaling_factor / "
                                "rope_frequency_adjustment_factor)")
    return c


def model_config_from_preset(c: dict, tied: bool, max_positions: int | None = None):
    from tfqat.config import ModelConfig

    heads = int(c["num_query_heads"])
    return ModelConfig(
        arch="llama",
        vocab_size=int(c["vocabulary_size"]),
        hidden=int(c["hidden_dim"]),
        layers=int(c["num_layers"]),
        heads=heads,
        kv_heads=int(c.get("num_key_value_heads") or heads),
        ffn=int(c["intermediate_dim"]),
        max_positions=int(max_positions or c.get("max_sequence_length") or 2048),
        tie_embeddings=tied,
        rope_theta=float(c.get("rope_max_wavelength", 10000.0)),
        norm_eps=float(c.get("layer_norm_epsilon", 1e-6)),
    )


def _decoder_groups(layers) -> list[str]:
    found = {}
    for name in layers:
        m = re.fullmatch(DECODER + r"(?:_(\d+))?", name)
        if m:
            found[int(m.group(1) or 0)] = name
    return [found[i] for i in sorted(found)]


def read_preset_weights(preset: str | os.PathLike, c: dict) -> tuple[dict[str, np.ndarray], bool]:
    """Our weight names -> float32 arrays (kernels ``[in, out]``), and whether embeddings are tied."""
    import h5py

    path = Path(preset) / WEIGHTS_FILE
    if not path.is_file():
        raise PresetImportError(f"{preset}: no {WEIGHTS_FILE} in the preset directory")
    n_layers = int(c["num_layers"])

    def var(group, what, idx=0):
        try:
            return np.asarray(group[f"vars/{idx}"], np.float32)
        except KeyError:
            raise PresetImportError(f"{path}: missing weight {group.name}/vars/{idx} ({what})") from None

    with h5py.File(path, "r") as f:
        if "layers" not in f:
            raise PresetImportError(f"{path}: not a Keras 3 weights file (no 'layers' group)")
        layers = f["layers"]
        if "reversible_embedding" not in layers:
            raise PresetImportError(f"{path}: no reversible_embedding layer; not a keras-hub LLaMA preset")
        emb = layers["reversible_embedding"]
        w = {"embed_tokens": var(emb, "token embedding")}
        tied = "1" not in emb.get("vars", {})
        if not tied:
            w["lm_head"] = var(emb, "reverse embedding", 1)
        norm_name = "llama_layer_norm" if "llama_layer_norm" in layers else None
        if norm_name is None:
            raise PresetImportError(f"{path}: no final llama_layer_norm")
        w["final_norm"] = var(layers[norm_name], "final norm")
        decs = _decoder_groups(layers)
        if len(decs) != n_layers:
            raise PresetImportError(f"{path}: {len(decs)} decoder layers but config says num_layers {n_layers}")
        for i, name in enumerate(decs):
            g = layers[name]
            a = g["_self_attention_layer"]
            q, k, v = (var(a[n], n) for n in ("_query_dense", "_key_dense", "_value_dense"))
            o = var(a["_output_dense"], "_output_dense")
            w[f"{i}.q_proj"] = q.reshape(q.shape[0], -1)  # (C, H*D)
            w[f"{i}.k_proj"] = k.reshape(k.shape[0], -1)  # (C, K*D)
            w[f"{i}.v_proj"] = v.reshape(v.shape[0], -1)  # (C, K*D)
            w[f"{i}.o_proj"] = o.reshape(-1, o.shape[-1])  # (H*D, C)
            w[f"{i}.gate_proj"] = var(g["_feedforward_gate_dense"], "gate")
            w[f"{i}.up_proj"] = var(g["_feedforward_intermediate_dense"], "up")
            w[f"{i}.down_proj"] = var(g["_feedforward_output_dense"], "down")
            w[f"{i}.attn_norm"] = var(g["_self_attention_layernorm"], "attention norm")
            w[f"{i}.mlp_norm"] = var(g["_feedforward_layernorm"], "feed-forward norm")
    return w, tied


def load_preset(preset: str | os.PathLike, max_positions: int | None = None, name: str = "teacher"):
    """``(model, ModelConfig, tokenizer or None)`` from a local keras-hub LLaMA preset directory.

    The tokenizer is returned only when the preset has a ``tokenizer.json`` (HF ``tokenizers``
    format); keras-hub's own LLaMA tokenizer is SentencePiece, which we do not read.

    Raises:
        PresetImportError: one line: not a preset, not LLaMA-like, missing or misshapen weights.
    """
    from tfqat.importers.gguf import GGUFImportError, assign_llama_weights
    from tfqat.models import build_model

    c = read_preset_config(preset)
    weights, tied = read_preset_weights(preset, c)
    cfg = model_config_from_preset(c, tied, max_positions)
    model = build_model(cfg, name=name)
    try:
        assign_llama_weights(model, weights)
    except GGUFImportError as e:
        raise PresetImportError(f"{preset}: {e}") from None
    tokenizer = None
    tok_json = Path(preset) / "tokenizer.json"
    if tok_json.is_file():
        from tfqat.data import TextTokenizer

        try:
            tokenizer = TextTokenizer.from_file(tok_json)
        except Exception:  # noqa: BLE001 - keras-hub's own tokenizer config, not HF's
            tokenizer = None
    return model, cfg, tokenizer
