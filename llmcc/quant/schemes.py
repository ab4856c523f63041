"""The quantization registry: every ``--quant`` choice is a frozen ``QuantScheme`` keyed by its name.

A scheme says how matmul weights are stored (``llmcc.kernels.dequant_matmul.WeightFormat``), the error budget the
accuracy gate holds it to when the user gives none, and the scheme a layer falls back to when the gate has to keep
it at higher precision.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcc.errors import LlmccError
from llmcc.kernels.dequant_matmul import WeightFormat


@dataclass(frozen=True)
class QuantScheme:
    name: str
    description: str
    weight: WeightFormat | None      # None: weights stay float32
    max_error: float = 0.0           # default budget: relative error of the outputs vs float32
    fallback: str | None = None      # next-higher precision for a layer the gate keeps

    def __post_init__(self):
        if (self.weight is None) != (self.fallback is None):
            raise ValueError(f"scheme {self.name}: a quantized scheme needs a fallback, 'none' has none")


def _int4(name, group, symmetric):
    kind = "symmetric" if symmetric else "asymmetric (zero point)"
    return QuantScheme(name, f"int4 weights, groups of {group} along K, {kind}; dequantized in the matmul",
                       WeightFormat("int4", group, symmetric), max_error=0.1, fallback="int8")


SCHEMES: dict[str, QuantScheme] = {s.name: s for s in (
    QuantScheme("none", "float32 weights", None),
    QuantScheme("fp16", "float16 weights, float32 math", WeightFormat("fp16"), max_error=1e-3, fallback="none"),
    QuantScheme("bf16", "bfloat16 weights, float32 math", WeightFormat("bf16"), max_error=1e-2, fallback="none"),
    QuantScheme("int8", "int8 weights, one symmetric scale per output channel; dequantized in the matmul",
                WeightFormat("int8"), max_error=0.02, fallback="fp16"),
    QuantScheme("w8a8", "int8 weights per output channel and int8 activations per token (dynamic), int32 sums",
                WeightFormat("w8a8"), max_error=0.05, fallback="int8"),
    QuantScheme("w4a8", "int4 weights in groups of 32 along K, symmetric, and int8 activations per token (dynamic), "
                        "int32 sums", WeightFormat("w4a8", 32, True), max_error=0.1, fallback="int4"),
    _int4("int4", 32, True),
    _int4("int4-g128", 128, True),
    _int4("int4-asym", 32, False),
    _int4("int4-g128-asym", 128, False),
)}


def get(name: str) -> QuantScheme:
    if name not in SCHEMES:
        raise LlmccError(f"unknown quantization '{name}'; choose one of: {', '.join(SCHEMES)}")
    return SCHEMES[name]
