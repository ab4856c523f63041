"""Import of already-quantized ONNX weights onto llmcc's fused dequantize-matmul kernels.

``com.microsoft.MatMulNBits`` (onnxruntime's 4-bit weight format, as its MatMulNBitsQuantizer and model builders
write it): B is ``uint8[N, K/block, block/2]``, two k-consecutive nibbles per byte (low nibble first), one scale per
(n, block), optional zero points (packed nibbles, default 8); the last block is padded when K is not a
multiple of the block. Repacked at import into llmcc's int4 layout
(``llmcc.kernels.dequant_matmul``): bit-exact, the same values onnxruntime computes with.

QDQ weights (``DequantizeLinear(int8 constant) -> MatMul``, as QAT exports produce) are matched after import by the
``fuse_dequantize_matmul`` pass, not here.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from llmcc.kernels.dequant_matmul import INT4_PER_WORD, WeightFormat, call_dequant_matmul


class QuantizedImportError(ValueError):
    """An already-quantized node llmcc cannot map onto its kernels (the importer names the node)."""


def _const(value, what: str) -> np.ndarray:
    if not isinstance(value, tvm.ir.GenericConst):
        raise QuantizedImportError(f"{what} must be an initializer (a constant)")
    return value.value.numpy()


def _unpack_nibbles(data: np.ndarray, count: int) -> np.ndarray:
    """uint8[..., m] -> uint8[..., count]: low nibble first."""
    lo, hi = data & 0x0F, data >> 4
    return np.stack([lo, hi], axis=-1).reshape(*data.shape[:-1], -1)[..., :count]


def _pack_words(q: np.ndarray) -> np.ndarray:
    """int nibbles [K, N] -> uint32 [K/8, N], nibble i of a word = row 8*w + i (llmcc's int4 layout)."""
    k, n = q.shape
    nibbles = q.reshape(k // INT4_PER_WORD, INT4_PER_WORD, n).astype(np.uint32)
    packed = np.zeros((k // INT4_PER_WORD, n), dtype=np.uint32)
    for i in range(INT4_PER_WORD):
        packed |= nibbles[:, i, :] << np.uint32(4 * i)
    return packed


def matmul_nbits_weight(b, scales, zero_points, k: int, n: int, bits: int, block: int):
    """(WeightFormat, stored arrays) in llmcc's int4 layout for MatMulNBits' B / scales / zero_points."""
    if bits != 4:
        raise QuantizedImportError(f"bits={bits}: llmcc imports 4-bit MatMulNBits only")
    if k % INT4_PER_WORD:
        raise QuantizedImportError(f"K={k} is not a multiple of {INT4_PER_WORD}")
    blocks = -(-k // block)  # the last block is zero-padded when block does not divide K; the kernel reads k // block
    q = _unpack_nibbles(b.reshape(n, blocks * block // 2), k)               # [N, K]
    scale = scales.reshape(n, blocks).astype(np.float32)
    if zero_points is None:
        zero = None
    elif zero_points.dtype == np.uint8:
        zero = _unpack_nibbles(zero_points.reshape(n, -1), blocks).astype(np.float32)
    else:
        zero = zero_points.reshape(n, blocks).astype(np.float32)
    if zero is not None and np.all(zero == 8):
        zero = None  # the default: symmetric
    fmt = WeightFormat("int4", block, symmetric=zero is None)
    stored = [_pack_words(np.ascontiguousarray(q.T)), np.ascontiguousarray(scale.T)]
    if zero is not None:
        stored.append(np.ascontiguousarray(zero.T))
    return fmt, stored


class MatMulNBits(tvm_onnx.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        from tvm import relax

        for name in ("K", "N", "block_size"):
            if name not in attr:
                raise QuantizedImportError(f"missing attribute {name}")
        if len(inputs) < 3 or inputs[1] is None or inputs[2] is None:
            raise QuantizedImportError("needs inputs A, B and scales")
        if len(inputs) > 4 and inputs[4] is not None:
            raise QuantizedImportError("g_idx (act-order) is not supported")
        k, n = int(attr["K"]), int(attr["N"])
        bits, block = int(attr.get("bits", 4)), int(attr["block_size"])
        zero = _const(inputs[3], "zero_points") if len(inputs) > 3 and inputs[3] is not None else None
        fmt, stored = matmul_nbits_weight(_const(inputs[1], "B"), _const(inputs[2], "scales"), zero, k, n, bits,
                                          block)
        y = bb.normalize(call_dequant_matmul(bb, fmt, inputs[0], *[relax.const(a) for a in stored]))
        if len(inputs) > 5 and inputs[5] is not None:
            y = relax.op.add(y, inputs[5])
        return y


# op type -> converter, for ops of the com.microsoft domain
CONTRIB_CONVERTERS: dict[str, type] = {"MatMulNBits": MatMulNBits}
