"""run_nonzero_on_device: ``R.nonzero`` calls llmcc's runtime function, which returns the indices on the input's device.

TVM 0.27 lowers ``R.nonzero`` (ONNX NonZero: Longformer's global-token indices) to ``relax.run.nonzero``, a Python
function that leaves its result on the CPU. On a GPU the next kernel then fails its argument check ("expected
cuda"): tools/gpu_check.py saw Longformer fail so on an H200. ``llmcc.run.nonzero`` (llmcc/runtime_ops.py) copies
the input to the host, takes numpy's nonzero, and puts the indices back on the input's device. Every target takes
the same call, so CPU tests cover it. LegalizeOps lowers ops with a packed implementation before it looks at
custom legalizations, hence a pass of its own, in the lower phase before legalize_ops.

Before::

    lv = R.nonzero(mask)

After::

    lv = R.call_pure_packed("llmcc.run.nonzero", mask, ty_args=(R.Tensor(dtype="int64", ndim=2),))
"""

from __future__ import annotations

import tvm
from tvm import relax

from llmcc import runtime_ops
from llmcc.passes import LlmccPass, op_name, rewrite_relax_functions


@relax.expr_functor.mutator
class _NonzeroRouter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.rewrites = 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if op_name(call) != "relax.nonzero":
            return call
        self.rewrites += 1
        return relax.call_pure_packed(runtime_ops.NONZERO, call.args[0], ty_args=call.ty)


class RunNonzeroOnDevice(LlmccPass):
    name = "run_nonzero_on_device"

    def transform(self, mod: tvm.IRModule):
        runtime_ops.register()  # fold_lowered_constants may evaluate the call when its input is a constant
        return rewrite_relax_functions(_NonzeroRouter(mod), mod)
