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

GEMVs on an AVX2 CPU (one row per batch element: decode) take hand-scheduled vpmaddwd kernels instead, with the
weight packed in per-thread panels; their rows are the activation's leading dims flattened:

- int8 and int4 (weight-only): ``int8_gemv_avx2`` / ``int4_gemv_avx2`` (``llmcc.kernels.dequant_gemv``), which
  split each row of x into two int16 parts that hold it to float32 precision::

    x2 = R.reshape(x, (batch, K))
    y = R.reshape(R.call_tir(int8_gemv_avx2, (x2, q_pairs, s_w), R.Tensor((batch, N))), (batch, 1, N))

- w8a8: ``w8a8_gemv_avx2`` (``llmcc.kernels.w8a8_matmul``) on the quantized rows::

    lv = R.call_te(quantize_rows, x)                                   # (q_x [batch, 1, K] int8, s_x [batch, 1, 1])
    q = R.reshape(lv[0], (batch, K)); s = R.reshape(lv[1], (batch, 1))
    y = R.reshape(R.call_tir(w8a8_gemv_avx2, (q, s, q_pairs, s_w), R.Tensor((batch, N))), (batch, 1, N))
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from llmcc.kernels.dequant_matmul import dequant_matmul_te, dequant_take_te, quantize, stored_bytes
from llmcc.kernels import dequant_gemv, w8a8_matmul
from llmcc.kernels.w8a8_matmul import int8_matmul_te, quantize_rows_te
from llmcc.passes import LlmccPass
from llmcc.quant.gate import fingerprint
from llmcc.schedules import is_batch_size

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
        (a TargetSpec) decides whether a CPU's GEMVs take the AVX2 kernels."""
        super().__init__()
        self.formats = formats
        self.target = target
        self.quantized: dict[str, int] = {}  # fingerprint -> bytes stored

    def transform(self, mod):
        if not self.formats:
            return mod, 0
        rewriter = _Rewriter(mod, self.formats, _gemv_chunk_cores(self.target))
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        self.quantized = rewriter.quantized
        out = relax.transform.DeadCodeElimination()(rewriter.builder_.get())
        return out, rewriter.count


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, formats, gemv_cores: int | None):
        super().__init__(mod)
        self.formats = formats
        self.gemv_cores = gemv_cores  # the CPU's cores when it has AVX2 (the GEMV kernels), else None
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
        gemv = self._gemv(fmt, call.args[0].ty, weight.shape)
        if fmt.kind == "w8a8":
            rows = self.builder_.emit(self.builder_.call_te(quantize_rows_te, call.args[0],
                                                            primfunc_name_hint="quantize_rows"))
            if gemv is not None:
                kernel, layout = gemv
                return self._call_gemv(kernel, [relax.TupleGetItem(rows, 0), relax.TupleGetItem(rows, 1)],
                                       call.args[0].ty, weight.shape[1], self._store(key, weight, fmt, layout))
            return self.builder_.call_te(int8_matmul_te, relax.TupleGetItem(rows, 0), relax.TupleGetItem(rows, 1),
                                         *self._store(key, weight, fmt), primfunc_name_hint="int8_matmul")
        if gemv is not None:
            kernel, layout = gemv
            return self._call_gemv(kernel, [call.args[0]], call.args[0].ty, weight.shape[1],
                                   self._store(key, weight, fmt, layout))
        return self.builder_.call_te(dequant_matmul_te(fmt), call.args[0], *self._store(key, weight, fmt),
                                     primfunc_name_hint=f"dequant_matmul_{fmt.tag}")

    def _store(self, key, weight, fmt, gemv_chunk: int = 0) -> list:
        """The weight's packed constants (a tied embedding and output head share one set; a GEMV kernel's panels
        are a set of their own, counted in the weight's stored bytes too)."""
        if (key, gemv_chunk) not in self._stored:
            arrays = quantize(weight, fmt)
            if gemv_chunk and fmt.kind == "w8a8":
                arrays = [w8a8_matmul.pack_pairs(arrays[0], gemv_chunk)] + list(arrays[1:])
            elif gemv_chunk:
                arrays = dequant_gemv.gemv_weights(arrays, fmt, gemv_chunk)
            self._stored[key, gemv_chunk] = [relax.const(np.ascontiguousarray(a)) for a in arrays]
            self.quantized[key] = self.quantized.get(key, 0) + stored_bytes(arrays)
        return self._stored[key, gemv_chunk]

    def _gemv(self, fmt, x_ty, weight_shape):
        """(the GEMV kernel's GlobalVar, its panel width) for x [..., K] @ W [K, N] in ``fmt``, when the target has
        AVX2, every leading dim of x is 1 or a batch size and the kernel tiles [K, N]; else None."""
        if self.gemv_cores is None or not all(_one_row_per_batch(d) for d in x_ty.shape.values[:-1]):
            return None
        k, n = weight_shape
        if fmt.kind == "w8a8":
            chunk = w8a8_matmul.gemv_pairs_chunk(n, self.gemv_cores)
            if chunk is None or w8a8_matmul.gemv_pairs_check(k, n, chunk):
                return None
            build, name, tiles = (lambda: w8a8_matmul.gemv_pairs_avx2(k, n, chunk)), "w8a8_gemv_avx2", (chunk,)
        elif fmt.kind in ("int8", "int4"):
            tiles = dequant_gemv.gemv_tiles(fmt, n, self.gemv_cores)
            if tiles is None or dequant_gemv.gemv_check(fmt, k, n, tiles[0]):
                return None
            build = lambda: dequant_gemv.dequant_gemv_avx2(fmt, k, n, *tiles)  # noqa: E731
            name = f"{fmt.kind}_gemv_avx2"
        else:
            return None
        if (fmt, k, n, tiles) not in self._gemv_kernels:
            self._gemv_kernels[fmt, k, n, tiles] = self.builder_.add_func(build(), name)
        return self._gemv_kernels[fmt, k, n, tiles], tiles[0]

    def _call_gemv(self, gemv, inputs, x_ty, n, stored):
        """Call ``gemv`` on ``inputs`` (each [..., last]) flattened to rows, and give its [rows, N] result back the
        activation's leading dims."""
        lead = x_ty.shape.values[:-1]
        count = 1
        for d in lead:
            count = count * d
        b = self.builder_
        rows = [b.emit(relax.op.reshape(v, relax.ShapeExpr([count, b.normalize(v).ty.shape.values[-1]])))
                for v in inputs]
        y = b.emit(relax.call_tir(gemv, relax.Tuple([*rows, *stored]), relax.TensorType([count, n], "float32")))
        return relax.op.reshape(y, relax.ShapeExpr(list(lead) + [n]))


def _one_row_per_batch(dim) -> bool:
    return int(dim) == 1 if isinstance(dim, tvm.tirx.IntImm) else is_batch_size(dim)


def _gemv_chunk_cores(target) -> int | None:
    """The CPU's core count when the GEMV kernels run on it (AVX2), else None."""
    if target is None or target.is_gpu:
        return None
    model = target.model()
    return model.cores if model.int16_madd else None
