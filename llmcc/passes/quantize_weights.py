"""quantize_weights: matmuls (and embedding gathers) with a planned constant weight become fused dequantizing
kernels.

Runs in the quantize phase, after constant folding (so a weight the exporter transposed is one constant) and before
lift_weights (which then stores the packed arrays instead of the float weight). Which weights, and in which format,
comes from the accuracy gate's plan (``llmcc.quant.gate``): fingerprint of the ``[K, N]`` weight -> (layer, format).
Weights not in the plan are left alone.

Before::

    lv3 = R.matmul(lv2, metadata["relax.Constant"][4])           # [K, N] float32

After (int4, group 32)::

    lv3 = R.call_tir(dequant_matmul_int4_g32, (lv2, metadata["relax.Constant"][9],    # [K/8, N] uint32
                                               metadata["relax.Constant"][10]),   # [K/32, N] float32 scales
                     out_sinfo=R.Tensor((batch, sequence, N), "float32"))

The kernel (``llmcc.kernels.dequant_matmul``) dequantizes in registers; the schedule rules tile it like a matmul.
An embedding ``R.take(table, ids, axis=0)`` becomes ``dequant_take``: only the gathered rows are dequantized.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from llmcc.kernels.dequant_matmul import dequant_matmul_te, dequant_take_te, quantize, stored_bytes
from llmcc.kernels.w8a8_matmul import int8_matmul_te, quantize_rows_te
from llmcc.passes import LlmccPass
from llmcc.quant.gate import fingerprint

def _float_matrix(expr) -> np.ndarray | None:
    if not isinstance(expr, tvm.ir.GenericConst) or len(expr.ty.shape.values) != 2 or str(expr.ty.dtype) != "float32":
        return None
    return expr.value.numpy()


def _planned_weight(call, formats: dict):
    """(kind, fingerprint, format, [K, N] weight) when ``call`` is x @ W or take(E, ids, axis=0) with W (E) a planned
    float32 constant. An embedding table is planned as its transpose [H, V], one scale per vocabulary row."""
    if not isinstance(call.op, tvm.ir.Op):
        return None
    if call.op.name == "relax.matmul":
        weight = _float_matrix(call.args[1])
        x_ty = call.args[0].ty
        if weight is None or not isinstance(x_ty, relax.TensorType) or str(x_ty.dtype) != "float32" or x_ty.ndim < 2:
            return None
        kind = "matmul"
    elif call.op.name == "relax.take" and int(call.attrs.axis) == 0:
        table = _float_matrix(call.args[0])
        if table is None:
            return None
        kind, weight = "take", np.ascontiguousarray(table.T)
    else:
        return None
    key = fingerprint(weight)
    if key not in formats:
        return None
    return kind, key, formats[key][1], weight


class QuantizeWeights(LlmccPass):
    name = "quantize_weights"

    def __init__(self, formats: dict) -> None:
        """``formats``: fingerprint -> (layer name, WeightFormat), as ``QuantPlan.formats()`` gives it."""
        super().__init__()
        self.formats = formats
        self.quantized: dict[str, int] = {}  # fingerprint -> bytes stored

    def transform(self, mod):
        if not self.formats:
            return mod, 0
        rewriter = _Rewriter(mod, self.formats)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        self.quantized = rewriter.quantized
        out = relax.transform.DeadCodeElimination()(rewriter.builder_.get())
        return out, rewriter.count


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, formats):
        super().__init__(mod)
        self.formats = formats
        self.count = 0
        self.quantized: dict[str, int] = {}
        self._stored: dict[str, list] = {}  # one set of packed constants per weight, however often it is used

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        found = _planned_weight(call, self.formats)
        if found is None:
            return call
        kind, key, fmt, weight = found
        if key not in self._stored:  # a tied embedding and output head share one set of stored arrays
            arrays = quantize(weight, fmt)
            self._stored[key] = [relax.const(np.ascontiguousarray(a)) for a in arrays]
            self.quantized[key] = stored_bytes(arrays)
        self.count += 1
        if kind == "take":
            return self.builder_.call_te(dequant_take_te(fmt), call.args[1], *self._stored[key],
                                         primfunc_name_hint=f"dequant_take_{fmt.tag}")
        if fmt.kind == "w8a8":
            rows = self.builder_.emit(self.builder_.call_te(quantize_rows_te, call.args[0],
                                                            primfunc_name_hint="quantize_rows"))
            return self.builder_.call_te(int8_matmul_te, relax.TupleGetItem(rows, 0), relax.TupleGetItem(rows, 1),
                                         *self._stored[key], primfunc_name_hint="int8_matmul")
        return self.builder_.call_te(dequant_matmul_te(fmt), call.args[0], *self._stored[key],
                                     primfunc_name_hint=f"dequant_matmul_{fmt.tag}")
