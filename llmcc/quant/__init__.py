"""Weight quantization: the scheme registry (``schemes``) and the accuracy gate that plans it (``gate``)."""

from llmcc.quant.schemes import SCHEMES, QuantScheme, get

__all__ = ["SCHEMES", "QuantScheme", "get"]
