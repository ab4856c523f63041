"""pack_matmul_weights: constant matmul weights re-laid out at compile time into the panels the CPU kernel reads.

The CPU matmul (schedules/cpu.py, CpuMatmul) keeps an MR x P accumulator tile in registers and, per k step, loads P
consecutive floats of row k of the weight W [K, N]. Those rows are N * 4 bytes apart: for MiniLM's N = 1536 that
is 6 KB, which maps every row of the K x P panel to the same two sets of a 32 KB 8-way L1, so the panel that should
stay in L1 while the rows of A stream past is evicted on every step (a standalone [128, 384] x [384, 1536] matmul ran
at a quarter of onnxruntime's speed). Weights are constants: the compiler pays the transpose once and stores W as
P-wide panels, W_packed [N / P, K, P] with W_packed[p, k, j] = W[k, p * P + j], so a panel is K * P * 4 contiguous
bytes (24 KB at K = 384, P = 16) read front to back.

Matches ``R.matmul(x, W)`` with W a 2-D float32 constant, x float32 of rank >= 2 with a last dim K, on CPU targets,
when N is a multiple of the panel width P and larger: P = 16 (one 64-byte line per k step; CpuMatmul's register tile
is then 6 x 16 with AVX2, 8 x 16 with AVX-512; ``CpuModel.matmul_panel_bytes``, fixed so that packed kernels are
the same on every CPU and tuning records carry over). A GEMV (one static row: decode) is left alone: its kernel
streams whole weight rows, already contiguous, and panels of a fixed width measured no faster on the 4096 x 4096
chain. Quantized weights (packed by quantize_weights) are left alone.
Runs in the weights phase, before lift_weights, on the fp32 matmuls quantization left.

Before::

    lv = R.matmul(x, metadata["ir.GenericConst"][0])        # W: [384, 1536]

After::

    lv = R.call_tir(matmul_packed_p16, (x, metadata["ir.GenericConst"][1]), R.Tensor((b, s, 1536), "float32"))
    # W_packed: [96, 384, 16]. The kernel: panels[.., m, p, j] = sum_k x[.., m, k] * W_packed[p, k, j], then
    # out[.., m, n] = panels[.., m, n // 16, n % 16] (same memory; CpuMatmul treats p as a parallel batch axis)
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te

from llmcc.passes import LlmccPass, const_array, op_name, rewrite_relax_functions
from llmcc.schedules.cpu_model import CpuModel

OUT_ELEMWISE_FUSABLE = 4  # TVM's OpPatternKind kOutEWiseFusable: what a legalized R.matmul is annotated with


def panel_width(target, x_ty, n: int) -> int | None:
    """Panel width P for an [.., M, K] x [K, n] float32 matmul on ``target``: the CpuModel's matmul panel (one cache
    line of floats); None for a GEMV (one static row) or when n is not a multiple of P (or is P)."""
    rows = x_ty.shape[-2] if len(x_ty.shape) >= 2 else None
    if isinstance(rows, tvm.tirx.IntImm) and int(rows) == 1:
        return None  # the GEMV kernel streams whole weight rows: already contiguous (packing measured no faster)
    width = CpuModel.get(target).matmul_panel_bytes // 4
    return width if n % width == 0 and width < n else None


def pack_panels(weight: np.ndarray, width: int) -> np.ndarray:
    """W [K, N] as [N / width, K, width]: out[p, k, j] = W[k, p * width + j]."""
    k, n = weight.shape
    return np.ascontiguousarray(weight.reshape(k, n // width, width).transpose(1, 0, 2))


def _packed_matmul(x, packed, n: int, width: int):
    """TE: x [.., M, K] times the panel-packed weight -> [.., M, N], in two stages: the matmul into [.., M, N / P, P],
    where every operand is indexed by plain loop variables (so the schedule can pad M: pad_einsum refuses a
    ``n // P`` index), then the same memory read as [.., M, N] (an index change; the schedule inlines it)."""
    k_axis = te.reduce_axis((0, packed.shape[1]), name="k")
    panels = te.compute(
        (*x.shape[:-1], n // width, width),
        lambda *i: te.sum(x[(*i[:-2], k_axis)] * packed[i[-2], k_axis, i[-1]], axis=k_axis), name="matmul")
    return te.compute((*x.shape[:-1], n), lambda *i: panels[(*i[:-1], i[-1] // width, i[-1] % width)],
                      name="matmul_rows")


@relax.expr_functor.mutator
class _PanelPacker(relax.PyExprMutator):
    def __init__(self, mod, target):
        super().__init__(mod)
        self.target, self.rewrites = target, 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if op_name(call) != "relax.matmul":
            return call
        x, w = call.args
        weight = const_array(w)
        x_ty = x.ty
        out_dtype = str(call.attrs.out_dtype) if call.attrs.out_dtype is not None else ""
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32 or out_dtype not in ("", "float32") \
                or not isinstance(x_ty, relax.TensorType) or x_ty.dtype != "float32" or x_ty.ndim < 2:
            return call
        width = panel_width(self.target.tvm_target(), x_ty, weight.shape[1])
        if width is None:
            return call
        self.rewrites += 1
        packed = relax.const(pack_panels(weight, width))
        # a matmul for FuseOps (op pattern kOutEWiseFusable), so its bias and activation fuse after it as before
        return self.builder_.call_te(_packed_matmul, x, packed, weight.shape[1], width,
                                     primfunc_name_hint=f"matmul_packed_p{width}",
                                     primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})


class PackMatmulWeights(LlmccPass):
    """CPU: constant fp32 matmul weights stored as the kernel's panels (see the module docstring)."""

    name = "pack_matmul_weights"

    def __init__(self, target) -> None:
        super().__init__()
        self.target = target

    def transform(self, mod):
        if self.target.is_gpu:
            return mod, 0
        return rewrite_relax_functions(_PanelPacker(mod, self.target), mod)
