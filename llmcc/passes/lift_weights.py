"""lift_weights: move the model's weights out of the code and into function parameters.

Weights arrive as Relax constants (the ONNX initializers); graph passes (LoRA merge, quantization) rewrite them as
constants. Afterwards this pass turns every constant with more than ``min_elements`` elements into a trailing
parameter of ``main``, so the artifact stores them in its weight file, loads them once, and the compiled library
stays small. ``main`` gets the attribute ``num_input`` = number of user inputs.

Before::

    def main(input_ids: R.Tensor((batch, sequence), "int64")):
        lv = R.take(metadata["relax.Constant"][0], input_ids, axis=0)

After::

    def main(input_ids: R.Tensor((batch, sequence), "int64"), w0: R.Tensor((1000, 64), "float32")):
        R.func_attr({"num_input": 1})
        lv = R.take(w0, input_ids, axis=0)
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from llmcc.passes import LlmccPass


def _constant_array(const) -> np.ndarray:
    return const.value.numpy()


class LiftWeights(LlmccPass):
    name = "lift_weights"

    def __init__(self, min_elements: int = 64) -> None:
        super().__init__()
        self.min_elements = min_elements
        self.weights: list[tuple[str, np.ndarray]] = []

    def transform(self, mod):
        func = mod["main"]
        found: dict = {}

        def visit(expr):
            if isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.ty, relax.TensorType):
                shape = expr.ty.shape
                if shape is not None and int(np.prod([int(s) for s in shape.values])) >= self.min_elements:
                    found.setdefault(expr, None)

        relax.analysis.post_order_visit(func.body, visit)
        if not found:
            self.weights = []
            return mod, 0
        params = list(func.params)
        replacements = {}
        self.weights = []
        for i, const in enumerate(found):
            var = relax.Var(f"w{i}", const.ty)
            replacements[const] = var
            self.weights.append((f"w{i}", _constant_array(const)))
        body = _ConstReplacer(replacements).visit_expr(func.body)
        new_func = relax.Function(params + list(replacements.values()), body, func.ret_ty, func.is_pure,
                                  func.attrs)
        new_func = new_func.with_attr("num_input", len(params))
        mod = mod.copy() if hasattr(mod, "copy") else mod
        mod["main"] = new_func
        return mod, len(replacements)


@relax.expr_functor.mutator
class _ConstReplacer(relax.PyExprMutator):
    def __init__(self, replacements):
        super().__init__()
        self.replacements = replacements

    def visit_generic_const_(self, op):
        return self.replacements.get(op, op)
