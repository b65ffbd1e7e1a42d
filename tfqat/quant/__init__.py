"""EdgeQAT quantization: fake-quant layers, token bit selection and the QAT losses."""

from tfqat.quant.losses import distillation_loss, distribution_loss, entropy_loss
from tfqat.quant.quantizers import (
    ActQuantizer,
    ActQuantSpec,
    WeightQuantizer,
    WeightQuantSpec,
    fake_quant,
    qrange,
)
from tfqat.quant.token_bits import (
    decode_rule_token_bits,
    prefill_threshold,
    select_token_bits,
    threshold_token_bits,
)

__all__ = [
    "ActQuantSpec",
    "ActQuantizer",
    "WeightQuantSpec",
    "WeightQuantizer",
    "decode_rule_token_bits",
    "distillation_loss",
    "distribution_loss",
    "entropy_loss",
    "fake_quant",
    "prefill_threshold",
    "qrange",
    "select_token_bits",
    "threshold_token_bits",
]
