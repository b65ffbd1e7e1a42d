"""Quantization recipes: *what* to quantize at which bit width, kept apart from the quantizers.

A :class:`Recipe` is plain data (no TensorFlow import): weight bits, activation bits, KV-cache
bits, softmax-probability bits, and whether activations are token-adaptive (EdgeQAT Eq. 14:
the top ``rho * N`` tokens at ``a_bits``, the rest at ``low_bits``). ``None`` bits mean "stays
float". :func:`tfqat.quant.qat.quantize_model` executes a recipe.

Named recipes (:data:`RECIPES`)::

    name     weights  activations         KV cache          probs
    w8a8     8        8                   8                 8 (unsigned)
    w4a8     4        8                   8                 8
    w4a4     4        4                   4                 8
    w4a4-8   4        8/4 token-adaptive  8/4 token-adaptive 8     (rho = 0.5, configurable)
    w6a6     6        6                   6                 8     (uniform 6-bit, ablation)
    w4a6     4        6                   6                 8     (uniform 6-bit activations: the
                                                                   same-weights rival of w4a4-8)
    w4a16    4        float               float             float (weights only)

Custom recipes come from a dict or a YAML file with the same keys as :class:`Recipe`.

Example:
    >>> get_recipe("w4a4-8").kv_bits
    8
    >>> get_recipe({"name": "w3a8", "w_bits": 3, "a_bits": 8, "kv_bits": 8}).w_bits
    3
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)  # what the quantizers accept (16 = float check)


class RecipeError(ValueError):
    """A bad recipe name, key or bit width: one line naming the problem and the fix."""


def _check_bits(recipe: str, key: str, bits: Any, allow_none: bool = True) -> None:
    if bits is None and allow_none:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise RecipeError(
            f"recipe {recipe!r}: {key}={bits!r} is not a supported bit width; use an int in 2..8, "
            f"16 (float-precision check){' or null (stay float)' if allow_none else ''}"
        )


@dataclass(frozen=True)
class Recipe:
    """Bit widths of one quantization scheme; validated on construction.

    Args:
        name: recipe name (stage folders are ``qat-<name>``).
        w_bits: projection weights (per output channel unless ``weight_granularity='tensor'``);
            ``None`` = float.
        a_bits: activations at attn_in, q, mlp_in, mlp_act; ``None`` = float. With
            ``adaptive``, the high bit width of important tokens.
        kv_bits: the K and V points (what the KV cache stores); ``None`` = float.
        probs_bits: softmax probabilities (unsigned, min-max init); ``None`` = float.
        adaptive: token importance-aware bits (METHOD.md sec. 3) on every activation point
            but probs; ``kv_bits`` must then equal ``a_bits``.
        low_bits: bit width of unimportant tokens when adaptive.
        rho: fraction of tokens kept at the high bit width when adaptive.
        weight_granularity: ``'channel'`` or ``'tensor'``.
        act_asymmetric: LSQ+ zero point on static activation quantizers (not with adaptive).
    """

    name: str
    w_bits: Optional[int] = 4
    a_bits: Optional[int] = 8
    kv_bits: Optional[int] = 8
    probs_bits: Optional[int] = 8
    adaptive: bool = False
    low_bits: int = 4
    rho: float = 0.5
    weight_granularity: str = "channel"
    act_asymmetric: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise RecipeError(f"recipe name {self.name!r} must be a non-empty string without '/'")
        for key in ("w_bits", "a_bits", "kv_bits", "probs_bits"):
            _check_bits(self.name, key, getattr(self, key))
        if self.weight_granularity not in ("channel", "tensor"):
            raise RecipeError(f"recipe {self.name!r}: weight_granularity={self.weight_granularity!r}"
                              " is unknown; use 'channel' or 'tensor'")
        if self.adaptive:
            _check_bits(self.name, "low_bits", self.low_bits, allow_none=False)
            if self.a_bits is None or not self.low_bits < self.a_bits <= 8:
                raise RecipeError(f"recipe {self.name!r}: adaptive needs low_bits < a_bits <= 8, got "
                                  f"a_bits={self.a_bits} low_bits={self.low_bits}; use a_bits=8 low_bits=4")
            if self.kv_bits != self.a_bits:
                raise RecipeError(f"recipe {self.name!r}: adaptive needs kv_bits == a_bits "
                                  f"({self.kv_bits} != {self.a_bits}); the KV rows follow the token's bits")
            if self.act_asymmetric:
                raise RecipeError(f"recipe {self.name!r}: adaptive with act_asymmetric is not supported; "
                                  "set act_asymmetric: false")
            if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not 0 <= self.rho <= 1:
                raise RecipeError(f"recipe {self.name!r}: rho={self.rho!r} must be a fraction in [0, 1]")

    def with_rho(self, rho: float) -> "Recipe":
        """The same recipe with another 8-bit token fraction (named ``<name>-rho<rho>``)."""
        if not self.adaptive:
            raise RecipeError(f"recipe {self.name!r} is not token-adaptive; rho applies to w4a4-8-style recipes")
        name = self.name if rho == self.rho else f"{self.name}-rho{rho:g}"
        return dataclasses.replace(self, name=name, rho=float(rho))

    @property
    def act_bits_mean(self) -> Optional[float]:
        """Average activation bit width (``rho * a + (1 - rho) * low`` when adaptive)."""
        if self.a_bits is None:
            return None
        return self.rho * self.a_bits + (1 - self.rho) * self.low_bits if self.adaptive else float(self.a_bits)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        def b(v):
            return "float" if v is None else f"{v}-bit"

        acts = (f"{self.a_bits}/{self.low_bits}-bit token-adaptive (rho {self.rho:g})" if self.adaptive
                else b(self.a_bits))
        return (f"weights {b(self.w_bits)} ({self.weight_granularity}), activations {acts}, "
                f"KV cache {b(self.kv_bits)}{' adaptive' if self.adaptive else ''}, probs {b(self.probs_bits)}")


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("w8a8", w_bits=8, a_bits=8, kv_bits=8),
        Recipe("w4a8", w_bits=4, a_bits=8, kv_bits=8),
        Recipe("w4a4", w_bits=4, a_bits=4, kv_bits=4),
        Recipe("w4a4-8", w_bits=4, a_bits=8, kv_bits=8, adaptive=True, low_bits=4, rho=0.5),
        Recipe("w6a6", w_bits=6, a_bits=6, kv_bits=6),
        Recipe("w4a6", w_bits=4, a_bits=6, kv_bits=6),
        Recipe("w4a16", w_bits=4, a_bits=None, kv_bits=None, probs_bits=None),
    )
}

_FIELDS = {f.name for f in dataclasses.fields(Recipe)}


def recipe_from_dict(d: dict, source: str = "recipe") -> Recipe:
    """A :class:`Recipe` from a mapping (``base: <named recipe>`` fills unspecified keys)."""
    if not isinstance(d, dict):
        raise RecipeError(f"{source}: expected a mapping of recipe keys, got {type(d).__name__}")
    d = dict(d)
    base = d.pop("base", None)
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        raise RecipeError(f"{source}: unknown key {unknown[0]!r}; use keys from: base, "
                          + ", ".join(sorted(_FIELDS)))
    if base is not None:
        d = {**get_recipe(base).to_dict(), **d}
    d.setdefault("name", Path(source).stem if source != "recipe" else "custom")
    return Recipe(**d)


def get_recipe(spec: Union[str, os.PathLike, dict, Recipe]) -> Recipe:
    """Resolve a recipe: a :class:`Recipe`, a registered name, a YAML path, or a dict.

    Raises:
        RecipeError: unknown name, missing file, unknown key, or a bit width the kernels lack.
    """
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, dict):
        return recipe_from_dict(spec)
    text = os.fspath(spec)
    if text in RECIPES:
        return RECIPES[text]
    if text.endswith((".yaml", ".yml")):
        path = Path(text)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist; pass a YAML path or a name: "
                              + ", ".join(RECIPES))
        import yaml

        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe file {path} is not valid YAML ({getattr(e, 'problem', e)})") from None
        return recipe_from_dict(raw, str(path))
    raise RecipeError(f"unknown recipe {text!r}; use one of {', '.join(RECIPES)} or a .yaml recipe file")


def register_recipe(recipe: Recipe) -> Recipe:
    """Add a recipe to the registry under its name (refuses to overwrite a different one)."""
    old = RECIPES.get(recipe.name)
    if old is not None and old != recipe:
        raise RecipeError(f"recipe {recipe.name!r} is already registered differently; pick another name")
    RECIPES[recipe.name] = recipe
    return recipe
