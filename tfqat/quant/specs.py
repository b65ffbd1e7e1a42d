"""What a quantizer does, as validated, frozen dataclasses (the quantizer layers of
:mod:`tfqat.quant.quantizers` execute them; ``get_config`` serialises them).

Construction fails with a one-line ``ValueError`` naming the setting and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


def _check_bits(owner: str, key: str, bits: Any) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in _BITS:
        raise ValueError(
            f"{owner}: {key}={bits!r} is not supported; use an int in 2..8 (codes fit int8) "
            f"or 16 (a float-precision check)"
        )


@dataclass(frozen=True)
class WeightQuantSpec:
    """What a weight quantizer does; validated on construction, serialised as ``get_config``."""

    bits: int = 4
    granularity: str = "channel"
    group_size: int = 0  # > 0 with granularity "group": one scale per output channel and G inputs

    def __post_init__(self) -> None:
        _check_bits("WeightQuantizer", "bits", self.bits)
        if self.granularity not in ("channel", "tensor", "group"):
            raise ValueError(
                f"WeightQuantizer: granularity={self.granularity!r} is unknown; "
                f"use 'channel' (per output channel), 'group' (with group_size) or 'tensor'"
            )
        if (self.granularity == "group") != (self.group_size > 0):
            raise ValueError(
                f"WeightQuantizer: group_size={self.group_size} needs granularity='group' and a "
                "positive multiple of 32 (the kernels' group unit), e.g. 32, 64 or 128"
            )
        if self.group_size % 32:
            raise ValueError(f"WeightQuantizer: group_size={self.group_size} must be a multiple of 32 "
                             "(the kernels' group unit); use 32, 64 or 128")


@dataclass(frozen=True)
class ActQuantSpec:
    """What an activation quantizer does; validated on construction.

    ``init`` picks the data-dependent init: ``"lsq"`` (``2 mean|x| / sqrt(Qp)``) or ``"minmax"``
    (the range of the first batch fits exactly; the sensible choice for softmax probabilities,
    where LSQ's init clips the large ones). ``None`` means ``"minmax"`` when asymmetric (a zero
    point needs the range) and ``"lsq"`` otherwise.
    """

    bits: int = 8
    granularity: str = "tensor"
    signed: bool = True
    asymmetric: bool = False
    adaptive: bool = False
    low_bits: int = 4
    init: Optional[str] = None

    def __post_init__(self) -> None:
        _check_bits("ActQuantizer", "bits", self.bits)
        if self.granularity not in ("tensor", "token", "row"):
            raise ValueError(
                f"ActQuantizer: granularity={self.granularity!r} is unknown; use 'tensor' "
                f"(static learnable scale), 'token' (dynamic max|x| per token) or 'row' (dynamic "
                f"max|x| over the last axis only, e.g. per head and query for probabilities)"
            )
        if self.init not in (None, "lsq", "minmax"):
            raise ValueError(f"ActQuantizer: init={self.init!r} is unknown; use 'lsq' or 'minmax'")
        if self.asymmetric and self.granularity != "tensor":
            raise ValueError(
                "ActQuantizer: asymmetric=True needs granularity='tensor'; the kernels' dynamic "
                "per-token mode is symmetric"
            )
        if self.adaptive:
            _check_bits("ActQuantizer", "low_bits", self.low_bits)
            if not self.low_bits < self.bits <= 8:
                raise ValueError(
                    f"ActQuantizer: adaptive needs low_bits < bits <= 8, got bits={self.bits} "
                    f"low_bits={self.low_bits}; the kernels use bits=8, low_bits=4"
                )
            if self.asymmetric:
                raise ValueError(
                    "ActQuantizer: adaptive=True with asymmetric=True is not supported; the "
                    "kernels' per-token static mode is symmetric"
                )

    @property
    def init_method(self) -> str:
        return self.init or ("minmax" if self.asymmetric else "lsq")
