"""accumulate_in_float32: half-precision matmuls sum their products in float32, then round the result once.

``R.matmul`` on float16/bfloat16 operands legalizes to a TE sum in the operands' dtype: every partial sum is
rounded to 11 (or 8) significant bits, so the error grows with K: an fp16 Llama exported from torch came out several
times further from torch than onnxruntime's run of it, which accumulates in float32. This pass asks for a float32
output and casts it back: the same memory traffic, one rounding per output.

Matches ``R.matmul(a, b)`` where a and b are float16 or bfloat16 and no out_dtype (or the operands' dtype) is set.

Runs in the graph phase, after the passes that rewrite matmuls into other kernels (attention, LoRA, quantized).

Before::

    lv1 = R.matmul(x, w)                            # x, w: float16

After::

    lv1 = R.astype(R.matmul(x, w, out_dtype="float32"), "float16")
"""

from __future__ import annotations

import tvm
from tvm import relax

from llmcc.passes import LlmccPass, op_name, rewrite_relax_functions

HALF_DTYPES = ("float16", "bfloat16")


def _half_matmul(call) -> str | None:
    """The operands' dtype when ``call`` is a half-precision matmul that accumulates in it, else None."""
    if op_name(call) != "relax.matmul":
        return None
    dtypes = {str(a.ty.dtype) for a in call.args if isinstance(a.ty, relax.TensorType)}
    out = str(call.attrs.out_dtype) if call.attrs.out_dtype is not None else ""
    if len(dtypes) != 1 or next(iter(dtypes)) not in HALF_DTYPES or out not in ("", "void", next(iter(dtypes))):
        return None
    return next(iter(dtypes))


@relax.expr_functor.mutator
class _Widener(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.rewrites = 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        dtype = _half_matmul(call)
        if dtype is None:
            return call
        self.rewrites += 1
        wide = self.builder_.emit(relax.op.matmul(call.args[0], call.args[1], out_dtype="float32"))
        return relax.op.astype(wide, dtype)


class AccumulateInFloat32(LlmccPass):
    name = "accumulate_in_float32"

    def transform(self, mod: tvm.IRModule):
        return rewrite_relax_functions(_Widener(mod), mod)
