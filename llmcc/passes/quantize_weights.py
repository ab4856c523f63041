"""quantize_weights: matmuls with a planned constant weight become one fused dequantize-matmul kernel.

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
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from llmcc.kernels.dequant_matmul import dequant_matmul_te, quantize, stored_bytes
from llmcc.passes import LlmccPass
from llmcc.quant.gate import fingerprint

_MATMUL = "relax.matmul"


def _planned_weight(call, formats: dict):
    """(fingerprint, layer name, format, weight) when ``call`` is x @ W with W a planned float32 constant."""
    if not (isinstance(call.op, tvm.ir.Op) and call.op.name == _MATMUL):
        return None
    w = call.args[1]
    if not isinstance(w, tvm.ir.GenericConst) or len(w.ty.shape.values) != 2 or str(w.ty.dtype) != "float32":
        return None
    x_ty = call.args[0].ty
    if not isinstance(x_ty, relax.TensorType) or str(x_ty.dtype) != "float32" or x_ty.ndim < 2:
        return None
    value = w.value.numpy()
    key = fingerprint(value)
    if key not in formats:
        return None
    name, fmt = formats[key]
    return key, name, fmt, value


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
        key, name, fmt, weight = found
        if key not in self._stored:
            arrays = quantize(weight, fmt)
            self._stored[key] = [relax.const(np.ascontiguousarray(a)) for a in arrays]
            self.quantized[key] = stored_bytes(arrays)
        self.count += 1
        return self.builder_.call_te(dequant_matmul_te(fmt), call.args[0], *self._stored[key],
                                     primfunc_name_hint=f"dequant_matmul_{fmt.tag}")
