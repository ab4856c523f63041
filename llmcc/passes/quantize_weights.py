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

w8a8 quantizes the activations first (``quantize_rows``) and sums int8 products in int32 (``int8_matmul``).

On an AVX2 CPU w8a8 instead reads its weight pair-packed in panels, [N/chunk, K/2, chunk, 2] int8, in a
hand-scheduled vpmaddwd kernel: ``w8a8_gemv_avx2`` for one row per batch element (decode), ``w8a8_gemm_avx2``
(4 rows x 16 outputs per register tile; it quantizes its rows itself) for anything else (prefill); on a CPU with
AVX512-VNNI the prefill GEMM is ``w8a8_gemm_vnni`` instead, on quad panels [N/chunk, K/4, chunk, 4] (vpdpbusd,
twice the multiply-adds per op). Each takes the activation's leading dims flattened into rows (int8 and int4 GEMVs
get theirs from ``select_gemv_kernels``, later)::

    lv = R.call_te(quantize_rows, x)                                   # (q_x [batch, 1, K] int8, s_x [batch, 1, 1])
    q = R.reshape(lv[0], (batch, K)); s = R.reshape(lv[1], (batch, 1))
    y = R.reshape(R.call_tir(w8a8_gemv_avx2, (q, s, q_pairs, s_w), R.Tensor((batch, N))), (batch, 1, N))

w4a8 (int4 weights, activations quantized per token): a GEMV on AVX2 takes ``w4a8_gemv_avx2`` (``w4a8_gemv_vnni``
with VNNI; ``llmcc.kernels.dequant_gemv``), which quantizes its rows itself and sums int8 x int4 products in int32;
anything else quantizes the rows, multiplies them back (q * s) and runs the int4 ``dequant_matmul`` on that::

    y = R.reshape(R.call_tir(w4a8_gemv_avx2, (R.reshape(x, (batch, K)), q_nibbles, s_w), ...), (batch, 1, N))
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from llmcc.kernels.dequant_matmul import WeightFormat, call_dequant_matmul, dequant_take_te, quantize, stored_bytes
from llmcc.kernels import dequant_gemv, w8a8_matmul
from llmcc.kernels.w8a8_matmul import int8_matmul_te, quantize_rows_te
from llmcc.passes import LlmccPass
from llmcc.passes.select_gemv_kernels import call_on_rows, one_row_per_batch
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

    def __init__(self, formats: dict, target=None) -> None:
        """``formats``: fingerprint -> (layer name, WeightFormat), as ``QuantPlan.formats()`` gives it; ``target``
        (a TargetSpec) decides which w8a8 GEMV kernel a CPU gets."""
        super().__init__()
        self.formats = formats
        self.target = target
        self.quantized: dict[str, int] = {}  # fingerprint -> bytes stored

    def transform(self, mod):
        if not self.formats:
            return mod, 0
        rewriter = _Rewriter(mod, self.formats, _integer_simd_cpu(self.target))
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        self.quantized = rewriter.quantized
        out = relax.transform.DeadCodeElimination()(rewriter.builder_.get())
        return out, rewriter.count


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, formats, cpu):
        super().__init__(mod)
        self.formats = formats
        self.cpu = cpu  # the CpuModel when the hand-scheduled integer kernels run on it (AVX2), else None
        self.count = 0
        self.quantized: dict[str, int] = {}
        self._stored: dict[tuple, list] = {}  # (fingerprint, layout): the packed constants, however often used
        self._gemv_kernels: dict[tuple, relax.GlobalVar] = {}

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        found = _planned_weight(call, self.formats)
        if found is None:
            return call
        kind, key, fmt, weight = found
        self.count += 1
        if kind == "take":
            return self.builder_.call_te(dequant_take_te(fmt), call.args[1], *self._store(key, weight, fmt),
                                         primfunc_name_hint=f"dequant_take_{fmt.tag}")
        if fmt.kind == "w8a8":
            return self._w8a8_matmul(call.args[0], key, weight, fmt)
        if fmt.kind == "w4a8":
            return self._w4a8_matmul(call.args[0], key, weight, fmt)
        return call_dequant_matmul(self.builder_, fmt, call.args[0], *self._store(key, weight, fmt))

    def _w8a8_matmul(self, x, key, weight, fmt):
        """On AVX2 the hand-scheduled kernels: the pair GEMV for one row per batch element (on ``quantize_rows``),
        else a GEMM that quantizes its rows itself (on quad panels with VNNI). Otherwise quantize_rows and the TE
        int8_matmul."""
        func, chunk, kind = self._w8a8_kernel(x.ty, weight.shape) or (None, 0, None)
        if kind == "gemm_vnni":
            return call_on_rows(self.builder_, func, [x], x.ty, weight.shape[1],
                                self._store(key, weight, fmt, gemv_chunk=chunk, layout="quads"))
        if kind == "gemm":
            rows = [x]
        else:
            quantized = self.builder_.emit(self.builder_.call_te(quantize_rows_te, x,
                                                                 primfunc_name_hint="quantize_rows"))
            rows = [relax.TupleGetItem(quantized, 0), relax.TupleGetItem(quantized, 1)]
        if func is None:
            return self.builder_.call_te(int8_matmul_te, *rows, *self._store(key, weight, fmt),
                                         primfunc_name_hint="int8_matmul")
        return call_on_rows(self.builder_, func, rows, x.ty, weight.shape[1],
                            self._store(key, weight, fmt, gemv_chunk=chunk))

    def _w4a8_matmul(self, x, key, weight, fmt):
        """A GEMV on AVX2: ``w4a8_gemv_avx2`` (``w4a8_gemv_vnni`` with VNNI), which quantizes its rows itself.
        Otherwise the rows quantized and dequantized in float (q * s, exactly what the gate simulates) into the int4
        dequant_matmul."""
        k, n = weight.shape
        plan = dequant_gemv.plan_gemv(fmt, k, n, self.cpu) if one_row_per_batch(x.ty) else None
        if plan is not None:
            if plan not in self._gemv_kernels:
                self._gemv_kernels[plan] = self.builder_.add_func(plan.kernel(), plan.name)
            return call_on_rows(self.builder_, self._gemv_kernels[plan], [x], x.ty, n,
                                self._store(key, weight, fmt, gemv_chunk=plan.chunk,
                                            layout="nibble_quads" if plan.vnni else "pairs"))
        rows = self.builder_.emit(self.builder_.call_te(quantize_rows_te, x, primfunc_name_hint="quantize_rows"))
        rounded = self.builder_.emit(relax.op.multiply(relax.op.astype(relax.TupleGetItem(rows, 0), "float32"),
                                                       relax.TupleGetItem(rows, 1)))
        return call_dequant_matmul(self.builder_, WeightFormat("int4", fmt.group_size, fmt.symmetric), rounded,
                                   *self._store(key, weight, fmt))

    def _store(self, key, weight, fmt, gemv_chunk: int = 0, layout: str = "pairs") -> list:
        """The weight's packed constants (a tied embedding and output head share one set; the panels of a GEMV
        or GEMM kernel, pair or quad, are a set of their own, counted in the weight's stored bytes too)."""
        if (key, gemv_chunk, layout) not in self._stored:
            arrays = quantize(weight, fmt)
            if gemv_chunk and layout == "quads":
                arrays = w8a8_matmul.quad_weights(*arrays, gemv_chunk)
            elif gemv_chunk:
                arrays = dequant_gemv.gemv_weights(arrays, fmt, gemv_chunk, vnni=layout == "nibble_quads")
            self._stored[key, gemv_chunk, layout] = [relax.const(np.ascontiguousarray(a)) for a in arrays]
            self.quantized[key] = self.quantized.get(key, 0) + stored_bytes(arrays)
        return self._stored[key, gemv_chunk, layout]

    def _w8a8_kernel(self, x_ty, weight_shape):
        """(the kernel's GlobalVar, its panel width, "gemv", "gemm" or "gemm_vnni") for x [..., K] @ W [K, N] on
        an AVX2 target: the GEMV when every leading dim of x is 1 or a batch size, else the first GEMM that takes the
        shapes (on quad panels with AVX512-VNNI, then on pair panels); None when none does."""
        if self.cpu is None:
            return None
        k, n = weight_shape
        chunk = w8a8_matmul.gemv_pairs_chunk(n, self.cpu.cores)
        if chunk is None:
            return None
        if one_row_per_batch(x_ty):
            kernels = [("gemv", w8a8_matmul.gemv_pairs_check, w8a8_matmul.gemv_pairs_avx2)]
        else:
            chunk = max(chunk, w8a8_matmul.GEMM_STRIP)  # the GEMV's narrow panels: one register tile each
            kernels = ([("gemm_vnni", w8a8_matmul.gemm_quads_check, w8a8_matmul.gemm_quads_vnni)] if self.cpu.int8_dot
                       else []) + [("gemm", w8a8_matmul.gemm_pairs_check, w8a8_matmul.gemm_pairs_avx2)]
        for kind, check, make in kernels:
            if check(k, n, chunk):
                continue
            if (kind, k, n, chunk) not in self._gemv_kernels:
                name = "w8a8_gemm_vnni" if kind == "gemm_vnni" else f"w8a8_{kind}_avx2"
                self._gemv_kernels[kind, k, n, chunk] = self.builder_.add_func(make(k, n, chunk), name)
            return self._gemv_kernels[kind, k, n, chunk], chunk, kind
        return None


def _integer_simd_cpu(target):
    """The target's CpuModel when the hand-scheduled integer kernels (w8a8 / w4a8 GEMVs and GEMMs) run on it: an
    x86 CPU with AVX2. Else None."""
    if target is None or target.is_gpu:
        return None
    model = target.model()
    return model if model.int16_madd else None
