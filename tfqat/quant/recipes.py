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

Recipes for pretrained models (the ``-dyn`` family, README "Real models"): activations at
attn_in, q, k, o_proj's input, mlp_in and mlp_act take per-token dynamic scales (``max|row| /
qmax`` at run time; V keeps a static scale, the KV cache's V groups have one scale each), and
SmoothQuant factors are folded into the norms / v_proj / up_proj before calibration::

    name         weights                      activations              init
    w8a8-dyn     8 per channel                8 dynamic                RTN (MSE clip)
    w4a8-dyn     4, groups of 32 along K      8 dynamic                GPTQ
    w4a4-8-dyn   4, groups of 32 along K      8/4 token-adaptive dyn.  GPTQ

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
        weight_group_size: > 0: one weight scale per output channel and this many inputs (a
            multiple of 32; the kernels' grouped QLINEAR), instead of ``weight_granularity``.
        dynamic: activation points with per-token dynamic scales (``max|row| / qmax`` at run
            time), from :data:`DYNAMIC_POINTS`; naming ``o_in`` also quantizes o_proj's input
            (8-bit at most, never token-adaptive), which is float otherwise.
        smooth: SmoothQuant migration strength alpha in (0, 1], folded into the float model
            before calibration (:mod:`tfqat.quant.smooth`); ``None`` = off.
        weight_init: ``"rtn"`` (least-squares clip per scale) or ``"gptq"`` (second-order
            rounding on calibration data, :mod:`tfqat.quant.gptq`) for the initial weights.
        rotate: fold an orthogonal rotation of the residual stream and a per-head Hadamard of V
            into the float weights first (:mod:`tfqat.quant.rotate`; LLaMA only; the head
            becomes untied).
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
    weight_group_size: int = 0
    dynamic: tuple = ()
    smooth: Optional[float] = None
    weight_init: str = "rtn"
    rotate: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dynamic", tuple(self.dynamic or ()))
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise RecipeError(f"recipe name {self.name!r} must be a non-empty string without '/'")
        for key in ("w_bits", "a_bits", "kv_bits", "probs_bits"):
            _check_bits(self.name, key, getattr(self, key))
        if self.weight_granularity not in ("channel", "tensor"):
            raise RecipeError(f"recipe {self.name!r}: weight_granularity={self.weight_granularity!r}"
                              " is unknown; use 'channel' or 'tensor'")
        g = self.weight_group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 0 or g % 32:
            raise RecipeError(f"recipe {self.name!r}: weight_group_size={g!r} must be 0 (per channel) or a "
                              "positive multiple of 32 (the grouped kernels' unit), e.g. 32, 64, 128")
        bad = [p for p in self.dynamic if p not in DYNAMIC_POINTS]
        if bad:
            why = (" (the attention kernels take one V scale per bit group, so V cannot be dynamic)"
                   if bad[0] == "v" else "")
            raise RecipeError(f"recipe {self.name!r}: dynamic point {bad[0]!r} is not supported{why}; "
                              f"use any of {', '.join(DYNAMIC_POINTS)}")
        if self.dynamic and self.act_asymmetric:
            raise RecipeError(f"recipe {self.name!r}: dynamic per-token scales are symmetric; set "
                              "act_asymmetric: false")
        if self.dynamic and self.a_bits is None:
            raise RecipeError(f"recipe {self.name!r}: dynamic points need quantized activations (a_bits)")
        if not isinstance(self.rotate, bool):
            raise RecipeError(f"recipe {self.name!r}: rotate={self.rotate!r} must be true or false")
        if self.smooth is not None and (isinstance(self.smooth, bool) or not isinstance(self.smooth, (int, float))
                                        or not 0 < self.smooth <= 1):
            raise RecipeError(f"recipe {self.name!r}: smooth={self.smooth!r} must be a SmoothQuant alpha "
                              "in (0, 1] (0.5 is the paper's) or null")
        if self.weight_init not in ("rtn", "gptq"):
            raise RecipeError(f"recipe {self.name!r}: weight_init={self.weight_init!r} is unknown; "
                              "use 'rtn' or 'gptq'")
        if self.weight_init == "gptq" and self.w_bits is None:
            raise RecipeError(f"recipe {self.name!r}: weight_init gptq needs quantized weights (w_bits)")
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
        d = dataclasses.asdict(self)
        d["dynamic"] = list(self.dynamic)
        if not self.rotate:  # unrotated stages keep their fingerprints
            del d["rotate"]
        return d

    def describe(self) -> str:
        def b(v):
            return "float" if v is None else f"{v}-bit"

        acts = (f"{self.a_bits}/{self.low_bits}-bit token-adaptive (rho {self.rho:g})" if self.adaptive
                else b(self.a_bits))
        wg = f"groups of {self.weight_group_size}" if self.weight_group_size else self.weight_granularity
        extra = "".join([f", dynamic per-token at {'/'.join(self.dynamic)}" if self.dynamic else "",
                         f", SmoothQuant alpha {self.smooth:g}" if self.smooth is not None else "",
                         ", GPTQ init" if self.weight_init == "gptq" else "",
                         ", rotated" if self.rotate else ""])
        return (f"weights {b(self.w_bits)} ({wg}), activations {acts}, "
                f"KV cache {b(self.kv_bits)}{' adaptive' if self.adaptive else ''}, probs {b(self.probs_bits)}"
                + extra)


# Points that may take dynamic scales: every one the kernels quantize per row (V's cache rows
# share one scale per bit group). "probs" means one scale per (head, query) row, max_s p / 255:
# with long contexts a single static scale rounds a diffuse head's probabilities to zero.
DYNAMIC_POINTS = ("attn_in", "q", "k", "o_in", "mlp_in", "mlp_act", "probs")
_DYN = DYNAMIC_POINTS

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
        Recipe("w8a8-dyn", w_bits=8, a_bits=8, kv_bits=8, dynamic=_DYN, smooth=0.5),
        Recipe("w4a8-dyn", w_bits=4, a_bits=8, kv_bits=8, dynamic=_DYN, smooth=0.5,
               weight_group_size=32, weight_init="gptq"),
        Recipe("w4a4-8-dyn", w_bits=4, a_bits=8, kv_bits=8, adaptive=True, low_bits=4, rho=0.5,
               dynamic=_DYN, smooth=0.5, weight_group_size=32, weight_init="gptq"),
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
