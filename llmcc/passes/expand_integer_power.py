"""expand_integer_power: ``x ** c`` with a small integer constant c becomes multiplications (and a reciprocal).

GPT-2's tanh GELU computes ``0.044715 * x ** 3`` and RMS/Layer norms often ``x ** 2``. Legalized, ``R.power`` is a
``powf`` call per element (libm, scalar: LLVM cannot vectorize it), which made GPT-2's fused GELU kernel 4x slower
than the matmul before it. ``x * x * x`` is exact to within one rounding per product (powf's own result is
correctly rounded; the difference is at most 2 ulp) and vectorizes.

Matches ``R.power(x, c)`` where c is a scalar float constant equal to an integer n with 1 <= |n| <= 4 and x is a
float tensor; n < 0 adds one division. c = 0.5 and other fractional or large exponents stay as they are.

Runs in the graph phase, before fold_constants.

Before::

    lv1 = R.power(x, R.const(3.0))

After::

    lv1 = R.multiply(R.multiply(x, x), x)
"""

from __future__ import annotations

import tvm
from tvm import relax

from llmcc.passes import LlmccPass, const_array, op_name, rewrite_relax_functions

MAX_EXPONENT = 4


def _integer_exponent(call) -> int | None:
    """n when ``call`` is ``power(x, c)`` with c a float scalar equal to an integer, 1 <= |n| <= MAX_EXPONENT."""
    if op_name(call) != "relax.power":
        return None
    c = const_array(call.args[1])
    ty = call.args[0].ty
    if c is None or c.size != 1 or not isinstance(ty, relax.TensorType) or "float" not in str(ty.dtype):
        return None
    value = float(c.reshape(-1)[0])
    n = int(round(value))
    return n if value == n and 1 <= abs(n) <= MAX_EXPONENT else None


@relax.expr_functor.mutator
class _PowerExpander(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.rewrites = 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        n = _integer_exponent(call)
        if n is None:
            return call
        x = call.args[0]
        out = x
        for _ in range(abs(n) - 1):
            out = self.builder_.emit(relax.op.multiply(out, x))
        if n < 0:
            out = relax.op.divide(relax.const(1.0, str(x.ty.dtype)), out)
        self.rewrites += 1
        return out  # x itself for n == 1: the binding becomes an alias


class ExpandIntegerPower(LlmccPass):
    name = "expand_integer_power"

    def transform(self, mod: tvm.IRModule):
        return rewrite_relax_functions(_PowerExpander(mod), mod)
