"""fuse_dequantize_matmul: a QDQ weight (int8 constant -> DequantizeLinear -> MatMul) becomes llmcc's int8 kernel.

QAT and onnxruntime's static quantization export weights as int8 initializers behind DequantizeLinear. TVM imports
that as ``R.dequantize`` of constants, which constant folding would turn back into a float32 weight (four times
the bytes, and the int8 lost). This pass runs first in the graph phase and keeps the int8 weight: the matmul reads it
through the fused dequantize-matmul kernel (``llmcc.kernels.dequant_matmul``, format int8).

Matches symmetric weights (zero point 0) with one scale per output channel or per tensor, optionally transposed
(a Linear weight ``[N, K]`` quantized along axis 0, then ``Transpose``). Anything else is left to TVM (still correct,
in float32). Activation QDQ pairs are not touched: they compute the same fake quantization in float.

Before::

    w = R.dequantize(metadata["relax.Constant"][0], metadata["relax.Constant"][1],   # int8 [K, N], scale [N]
                     metadata["relax.Constant"][2], axis=1)                          # zero point 0
    y = R.matmul(x, w)

After::

    y = R.call_tir(dequant_matmul_int8, (x, metadata["relax.Constant"][3], metadata["relax.Constant"][1]), ...)
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from llmcc.kernels.dequant_matmul import WeightFormat, call_dequant_matmul
from llmcc.passes import LlmccPass, bound_value, rewrite_relax_functions
from llmcc.passes import const_array as _const
from llmcc.passes import op_name as _op_name

INT8 = WeightFormat("int8")


def match_int8_weight(w_expr, lookup) -> tuple[np.ndarray, np.ndarray] | None:
    """(q[K, N] int8, scale[N] float32) if ``w_expr`` is a symmetric int8 weight behind dequantize (and perhaps a
    2-D transpose); ``lookup`` resolves a Var to the expression bound to it."""
    transposed = False
    expr = lookup(w_expr)
    if _op_name(expr) == "relax.permute_dims":
        axes = expr.attrs.axes
        if axes is not None and [int(a) for a in axes] != [1, 0]:
            return None
        transposed = True
        expr = lookup(expr.args[0])
    if _op_name(expr) != "relax.dequantize":
        return None
    q, scale, zero = (_const(a) for a in expr.args[:3])
    if q is None or scale is None or zero is None or q.dtype != np.int8 or q.ndim != 2 or np.any(zero != 0):
        return None
    if str(expr.attrs.out_dtype) != "float32":
        return None
    axis = int(expr.attrs.axis) % 2
    n_axis = 0 if transposed else 1
    n = q.shape[n_axis]
    scale = scale.astype(np.float32).reshape(-1)
    if scale.size == 1:
        scale = np.full(n, scale[0], np.float32)
    elif scale.size != n or axis != n_axis:
        return None  # scales along K: not one per output channel
    return np.ascontiguousarray(q.T if transposed else q), scale


class FuseDequantizeMatmul(LlmccPass):
    name = "fuse_dequantize_matmul"

    def transform(self, mod):
        mod, count = rewrite_relax_functions(_Rewriter(mod), mod)
        return (relax.transform.DeadCodeElimination()(mod), count) if count else (mod, 0)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.rewrites = 0

    def _lookup(self, expr):
        return bound_value(self, expr)

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if _op_name(call) != "relax.matmul":
            return call
        x_ty = call.args[0].ty
        if not isinstance(x_ty, relax.TensorType) or str(x_ty.dtype) != "float32":
            return call
        matched = match_int8_weight(call.args[1], self._lookup)
        if matched is None:
            return call
        self.rewrites += 1
        q, scale = matched
        return call_dequant_matmul(self.builder_, INT8, call.args[0], relax.const(q), relax.const(scale))
