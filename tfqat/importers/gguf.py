"""GGUF (llama.cpp) -> our LLaMA model and a ``tokenizers`` BPE tokenizer.

Reads with the ``gguf`` package (numpy only; ``pip install gguf``), but dequantizes with our own
numpy code from the block layouts (``ggml-common.h``), for the types we claim:

=======  =====  ======================================================================
type     block  bytes per block and value
=======  =====  ======================================================================
F32      1      4: float32
F16      1      2: float16
Q8_0     32     34: ``d`` f16, 32 x int8 ``q``;               ``x = d * q``
Q4_0     32     18: ``d`` f16, 16 bytes ``qs``;                 ``x = d * (nibble - 8)``
Q4_1     32     20: ``d`` f16, ``m`` f16, 16 bytes ``qs``;      ``x = d * nibble + m``
=======  =====  ======================================================================

In the 4-bit types, element ``j < 16`` of a block is the low nibble of ``qs[j]`` and element
``j + 16`` its high nibble.

GGUF stores a matrix as ``ne = [in, out]`` (``ne[0]`` contiguous), i.e. rows are output features
like a PyTorch ``Linear.weight``; our kernels are ``[in, out]``, so we transpose.

llama.cpp's ``convert_hf_to_gguf.py`` permutes the rows of ``attn_q`` and ``attn_k`` from HF's
rotate-half RoPE order (pairs ``(i, i + D/2)``) into the interleaved order of ggml's RoPE (pairs
``(2i, 2i + 1)``); :func:`unpermute_qk` undoes it, so that our rotate-half RoPE is right.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ggml type ids (gguf.GGMLQuantizationType); kept here so dequantization needs no gguf import.
F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8
TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0"}
# (values per block, bytes per block); tests check these against gguf.GGML_QUANT_SIZES.
BLOCK = {F32: (1, 4), F16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34)}
SUPPORTED_ARCHS = ("llama",)


class GGUFImportError(ValueError):
    """A GGUF this importer cannot map onto our model, reported as one line."""


def _type_name(qtype: int) -> str:
    try:
        import gguf

        return gguf.GGMLQuantizationType(qtype).name
    except Exception:  # noqa: BLE001 - name only used in messages
        return TYPE_NAMES.get(qtype, str(qtype))


def dequantize(raw, qtype: int, shape) -> np.ndarray:
    """Raw GGUF tensor bytes of ggml type ``qtype`` -> float32 array of numpy ``shape``.

    ``shape`` is numpy order (``reversed(ne)``); its last axis is the contiguous one and must be
    a multiple of the block size.

    Raises:
        GGUFImportError: an unsupported type or a byte count that does not match the shape.
    """
    if qtype not in BLOCK:
        raise GGUFImportError(
            f"unsupported GGUF tensor type {_type_name(qtype)}; supported: "
            + ", ".join(TYPE_NAMES[t] for t in sorted(TYPE_NAMES))
        )
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape)) if shape else 1
    per_block, nbytes = BLOCK[qtype]
    if n % per_block:
        raise GGUFImportError(f"{n} values are not a whole number of {TYPE_NAMES[qtype]} blocks")
    raw = np.ascontiguousarray(np.asarray(raw)).view(np.uint8).reshape(-1)
    if raw.size != n // per_block * nbytes:
        raise GGUFImportError(
            f"{TYPE_NAMES[qtype]} tensor of shape {shape} needs {n // per_block * nbytes} bytes, "
            f"got {raw.size}"
        )
    if qtype == F32:
        return raw.view("<f4").astype(np.float32).reshape(shape)
    if qtype == F16:
        return raw.view("<f2").astype(np.float32).reshape(shape)
    blocks = raw.reshape(-1, nbytes)  # (nb, bytes)
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)  # (nb, 1)
    if qtype == Q8_0:
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)  # (nb, 32)
        out = d * q
    else:
        qs = blocks[:, 4:] if qtype == Q4_1 else blocks[:, 2:]  # (nb, 16)
        nib = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # (nb, 32)
        if qtype == Q4_0:
            out = d * (nib - 8.0)
        else:
            m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)  # (nb, 1)
            out = d * nib + m
    return out.astype(np.float32).reshape(shape)


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF row permutation of a q/k weight ``(heads * D, in)``."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`: GGUF (interleaved RoPE) rows -> HF rotate-half rows."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def open_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` with one-line errors for a missing package / file / bad file."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFImportError("reading GGUF needs the gguf package: pip install gguf") from None
    path = Path(path)
    if not path.is_file():
        raise GGUFImportError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is one line
        raise GGUFImportError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def model_config_from_gguf(reader, max_positions: int | None = None):
    """Our :class:`~tfqat.config.ModelConfig` from the GGUF's ``llama.*`` metadata."""
    from tfqat.config import ModelConfig

    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFImportError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    p = f"{arch}."
    hidden = int(_field(reader, p + "embedding_length"))
    heads = int(_field(reader, p + "attention.head_count"))
    kv = int(_field(reader, p + "attention.head_count_kv", heads))
    rope_dim = _field(reader, p + "rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != hidden // heads:
        raise GGUFImportError(f"partial RoPE (rope.dimension_count {rope_dim}) is not supported")
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, p + "vocab_size", len(tokens) if tokens is not None else 0))
    if not vocab:
        vocab = int(_tensor(reader, "token_embd.weight").shape[1])
    ctx = int(_field(reader, p + "context_length", 2048))
    return ModelConfig(
        arch="llama",
        vocab_size=vocab,
        hidden=hidden,
        layers=int(_field(reader, p + "block_count")),
        heads=heads,
        kv_heads=kv,
        ffn=int(_field(reader, p + "feed_forward_length")),
        max_positions=int(max_positions or ctx),
        tie_embeddings="output.weight" not in names,
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
    )


def _tensor(reader, name):
    for t in reader.tensors:
        if t.name == name:
            return t
    raise GGUFImportError(f"GGUF has no tensor {name!r}")


def read_tensor(reader, name: str) -> np.ndarray:
    """Tensor ``name`` dequantized to float32, numpy shape ``reversed(ne)`` (rows = out)."""
    t = _tensor(reader, name)
    shape = tuple(int(s) for s in reversed([int(x) for x in t.shape]))
    return dequantize(t.data, int(t.tensor_type), shape)


def load_gguf_weights(reader, cfg) -> dict[str, np.ndarray]:
    """Our weight names -> float32 arrays in our layouts (kernels ``[in, out]``, HF q/k order)."""
    for t in reader.tensors:  # fail on an unsupported type before dequantizing anything
        if int(t.tensor_type) not in BLOCK:
            raise GGUFImportError(
                f"tensor {t.name}: unsupported GGUF tensor type {_type_name(int(t.tensor_type))}; "
                "supported: " + ", ".join(TYPE_NAMES[k] for k in sorted(TYPE_NAMES))
            )
    w = {"embed_tokens": read_tensor(reader, "token_embd.weight"),  # (V, C)
         "final_norm": read_tensor(reader, "output_norm.weight")}
    if not cfg.tie_embeddings:
        w["lm_head"] = read_tensor(reader, "output.weight").T  # (C, V)
    for i in range(cfg.layers):
        b = f"blk.{i}."
        q = unpermute_qk(read_tensor(reader, b + "attn_q.weight"), cfg.heads)
        k = unpermute_qk(read_tensor(reader, b + "attn_k.weight"), cfg.num_kv_heads)
        w[f"{i}.q_proj"] = q.T
        w[f"{i}.k_proj"] = k.T
        w[f"{i}.v_proj"] = read_tensor(reader, b + "attn_v.weight").T
        w[f"{i}.o_proj"] = read_tensor(reader, b + "attn_output.weight").T
        w[f"{i}.gate_proj"] = read_tensor(reader, b + "ffn_gate.weight").T
        w[f"{i}.up_proj"] = read_tensor(reader, b + "ffn_up.weight").T
        w[f"{i}.down_proj"] = read_tensor(reader, b + "ffn_down.weight").T
        w[f"{i}.attn_norm"] = read_tensor(reader, b + "attn_norm.weight")
        w[f"{i}.mlp_norm"] = read_tensor(reader, b + "ffn_norm.weight")
    return w


def assign_llama_weights(model, w: dict[str, np.ndarray]) -> None:
    """Copy :func:`load_gguf_weights`-style arrays into a built :class:`LlamaModel`."""

    def put(var, value, what):
        value = np.asarray(value, np.float32)
        if tuple(var.shape) != value.shape:
            raise GGUFImportError(f"{what}: shape {value.shape} does not fit the model's {tuple(var.shape)}")
        var.assign(value)

    put(model.embed_tokens.embeddings, w["embed_tokens"], "embed_tokens")
    put(model.final_norm.scale, w["final_norm"], "final_norm")
    if model.lm_head is not None:
        put(model.lm_head.kernel, w["lm_head"], "lm_head")
    for i, block in enumerate(model.blocks):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            put(getattr(block.attn, name).kernel, w[f"{i}.{name}"], f"block_{i}.{name}")
        for name in ("gate_proj", "up_proj", "down_proj"):
            put(getattr(block.mlp, name).kernel, w[f"{i}.{name}"], f"block_{i}.{name}")
        put(block.attn_norm.scale, w[f"{i}.attn_norm"], f"block_{i}.attn_norm")
        put(block.mlp_norm.scale, w[f"{i}.mlp_norm"], f"block_{i}.mlp_norm")


def tokenizer_from_gguf(reader):
    """The GGUF's ``gpt2``-style byte-level BPE as a :class:`~tfqat.data.TextTokenizer`.

    Tokens and merges come from ``tokenizer.ggml.tokens`` / ``merges``; CONTROL tokens
    (token_type 3) become special tokens. ``tokenizer.ggml.pre`` picks the pre-tokenizer: byte
    level GPT-2 splitting, preceded by single-digit splitting for ``smollm`` / ``starcoder``-like
    vocabularies (as llama.cpp does for them).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from tfqat.data import TextTokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(f"unsupported GGUF tokenizer model {kind!r}; supported: gpt2 (byte-level BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types = _field(reader, "tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "smaug-bpe", "falcon"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    if types is not None:
        special = [tokens[i] for i, t in enumerate(types) if int(t) == 3]
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    return TextTokenizer(tok)


@dataclass
class GGUFModel:
    model: object  # keras.Model (LlamaModel)
    tokenizer: object  # TextTokenizer
    config: object  # ModelConfig
    metadata: dict


def load_gguf(path: str | os.PathLike, max_positions: int | None = None, name: str = "teacher",
              with_tokenizer: bool = True) -> GGUFModel:
    """Build our LLaMA from a GGUF file (weights dequantized to float32) and its tokenizer.

    Args:
        max_positions: the model's RoPE table length; default the GGUF's context length.

    Raises:
        GGUFImportError: one line: unsupported architecture or tensor type, missing tensors.
    """
    from tfqat.models import build_model

    reader = open_gguf(path)
    cfg = model_config_from_gguf(reader, max_positions)
    weights = load_gguf_weights(reader, cfg)
    model = build_model(cfg, name=name)
    assign_llama_weights(model, weights)
    tokenizer = tokenizer_from_gguf(reader) if with_tokenizer else None
    meta = {k: _field(reader, k) for k in ("general.architecture", "general.name", "general.file_type")}
    return GGUFModel(model, tokenizer, cfg, meta)
