"""select_gemv_kernels: a decode GEMV on an int8 or int4 weight takes an integer GEMV kernel (AVX2, or VNNI for int4).

A quantized weight reaches the graph as ``dequant_matmul`` from three places: ``quantize_weights`` (llmcc's own
quantization), ``fuse_dequantize_matmul`` (QDQ int8 weights) and the MatMulNBits importer (onnxruntime's int4).
Where the activation has one row per batch element (decode) and the target has AVX2, this pass swaps the kernel for
``llmcc.kernels.dequant_gemv``'s (``plan_gemv``: int4 takes ``int4_gemv_vnni`` where the target has AVX512-VNNI),
repacking the weight into its panels (same bytes), with the activation's leading dims flattened into rows. Runs
first in the weights phase, while the weights are still constants.

Matching (``gemv_site``) reads the format off the kernel's ``llmcc.weight_format`` attribute, which every emitter
sets (``dequant_matmul.call_dequant_matmul``): the constants alone do not say an int4 group size (MatMulNBits allows
a K that is not a multiple of it). fp16 and bf16 weights, a sequence of rows, a CPU without AVX2 and CUDA are left
alone; so is an int4 K that is not a multiple of its group (``dequant_gemv.gemv_check``).

Before::

    lv = R.call_tir(dequant_matmul_int4_g32, (x, metadata["ir.GenericConst"][0],      # [K/8, N] uint32
                                              metadata["ir.GenericConst"][1]),      # [K/32, N] scales
                    out_sinfo=R.Tensor((batch, 1, N), "float32"))

After::

    x2 = R.reshape(x, R.shape([batch, K]))
    lv1 = R.call_tir(int4_gemv_avx2, (x2, metadata["ir.GenericConst"][2],             # [N/32, K/2, 2, 16] uint8
                                                                            # (VNNI: [N/32, K/4, 2, 32])
                                      metadata["ir.GenericConst"][1]), out_sinfo=R.Tensor((batch, N), "float32"))
    lv = R.reshape(lv1, R.shape([batch, 1, N]))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from llmcc.kernels import dequant_gemv
from llmcc.kernels.dequant_matmul import WEIGHT_FORMAT_ATTR, WeightFormat
from llmcc.passes import LlmccPass, const_array, rewrite_relax_functions
from llmcc.quant.gate import fingerprint
from llmcc.schedules import is_batch_size

DEQUANT_MATMUL = "dequant_matmul_"  # name hint of every dequant_matmul kernel
GEMV_KERNELS = ("int8_gemv_", "int4_gemv_", "w4a8_gemv_")  # dequant_gemv.GemvPlan.name: this pass's, w4a8's


def is_dequant_matmul(kernel_name: str) -> bool:
    """A kernel that reads a quantized weight and dequantizes it inside the matmul: dequant_matmul_te's, or an
    integer GEMV put in its place (here, or by quantize_weights for w4a8)."""
    return DEQUANT_MATMUL in kernel_name or any(kernel_name.startswith(g) for g in GEMV_KERNELS)


def one_row_per_batch(x_ty) -> bool:
    """Every leading dim of x [..., K] is 1 or a batch size: the matmul is a GEMV per batch element."""
    return all(int(d) == 1 if isinstance(d, tvm.tirx.IntImm) else is_batch_size(d) for d in x_ty.shape.values[:-1])


def call_on_rows(bb, kernel, inputs, x_ty, n, stored):
    """Call a GEMV ``kernel`` on ``inputs`` (each [..., last]) flattened to rows, and give its [rows, N] result back
    the activation's leading dims."""
    lead = x_ty.shape.values[:-1]
    count = 1
    for d in lead:
        count = count * d
    rows = [bb.emit(relax.op.reshape(v, relax.ShapeExpr([count, bb.normalize(v).ty.shape.values[-1]])))
            for v in inputs]
    y = bb.emit(relax.call_tir(kernel, relax.Tuple([*rows, *stored]), relax.TensorType([count, n], "float32")))
    return relax.op.reshape(y, relax.ShapeExpr(list(lead) + [n]))


@dataclass
class GemvSite:
    x: relax.Expr
    fmt: WeightFormat
    arrays: list        # the stored arrays, in dequant_matmul.quantize's layout
    k: int
    n: int


def gemv_site(call, mod) -> GemvSite | None:
    """The site when ``call`` is a call_tir of a dequant_matmul kernel (tagged with its format by
    ``call_dequant_matmul``) on constant int8 / int4 weights, and its activation has one row per batch element."""
    if not (isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get("relax.call_tir"))):
        return None
    callee = call.args[0]
    func = mod[callee] if isinstance(callee, tvm.ir.GlobalVar) and callee in mod else None
    tag = func.attrs.get(WEIGHT_FORMAT_ATTR) if func is not None and func.attrs is not None else None
    if tag is None:
        return None
    fmt = WeightFormat.from_tag(str(tag))
    x, *stored = call.args[1].fields
    arrays = [const_array(c) for c in stored]
    x_ty = x.ty
    if fmt.kind not in ("int8", "int4") or any(a is None for a in arrays) or not isinstance(x_ty, relax.TensorType) \
            or x_ty.ndim < 2 or not isinstance(x_ty.shape.values[-1], tvm.tirx.IntImm) or not one_row_per_batch(x_ty):
        return None
    return GemvSite(x, fmt, arrays, int(x_ty.shape.values[-1]), int(arrays[0].shape[1]))


class SelectGemvKernels(LlmccPass):
    name = "select_gemv_kernels"

    def __init__(self, target=None) -> None:
        super().__init__()
        model = target.model() if target is not None and not target.is_gpu else None
        self.cpu = model if model is not None and model.int16_madd else None

    def transform(self, mod):
        if self.cpu is None:
            return mod, 0
        mod, count = rewrite_relax_functions(_Rewriter(mod, self.cpu), mod)
        return (relax.transform.DeadCodeElimination()(mod), count) if count else (mod, 0)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, cpu):
        super().__init__(mod)
        self.cpu = cpu
        self.rewrites = 0
        self._kernels: dict[tuple, relax.GlobalVar] = {}
        self._stored: dict[tuple, list] = {}  # a weight read by several GEMVs is repacked once

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        site = gemv_site(call, self.builder_.get())
        if site is None:
            return call
        plan = dequant_gemv.plan_gemv(site.fmt, site.k, site.n, self.cpu)
        if plan is None:
            return call
        if plan not in self._kernels:
            self._kernels[plan] = self.builder_.add_func(plan.kernel(), plan.name)
        weights = (fingerprint(site.arrays[0]), plan.chunk, plan.vnni)
        if weights not in self._stored:
            self._stored[weights] = [relax.const(np.ascontiguousarray(a)) for a in plan.weights(site.arrays)]
        self.rewrites += 1
        return call_on_rows(self.builder_, self._kernels[plan], [site.x], site.x.ty, site.n, self._stored[weights])
