"""quantize_weights: planned constant weights become dequantize-matmul kernels; everything else stays."""

import numpy as np
import tvm
from tvm import relax

from helpers import matmul_module
from llmcc.kernels.dequant_matmul import WeightFormat, dequant_matmul_reference, dequantize, quantize
from llmcc.passes.quantize_weights import QuantizeWeights
from llmcc.quant.gate import fingerprint


def _module(w_planned, w_other, reuse=False):
    """y = x @ Wp (twice when ``reuse``) + x @ Wo + x @ x^T-ish (a matmul of two activations)."""
    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, w_planned.shape[0]), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.matmul(x, relax.const(w_planned)))
            b = bb.emit(relax.op.matmul(x, relax.const(w_other)))
            out = relax.op.add(a, b)
            if reuse:
                out = relax.op.add(out, relax.op.matmul(x, relax.const(w_planned)))
            act = bb.emit(relax.op.matmul(x, relax.op.permute_dims(x)))  # no constant weight: never quantized
            out = bb.emit_output(relax.op.add(relax.op.sum(act), out))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, x):
    ex = tvm.compile(mod, target="llvm")
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def _calls(mod, name_part):
    return sum(1 for gv in mod.functions if name_part in gv.name_hint)


def test_only_planned_weight_is_rewritten_and_numerics_follow_the_plan():
    rng = np.random.default_rng()
    wp, wo = rng.standard_normal((64, 16)).astype("float32"), rng.standard_normal((64, 16)).astype("float32")
    fmt = WeightFormat("int4", 32)
    p = QuantizeWeights({fingerprint(wp): ("proj", fmt)})
    after = p(_module(wp, wo))
    assert p.rewrites == 1
    assert _calls(after, "dequant_matmul_int4_g32") == 1
    assert list(p.quantized) == [fingerprint(wp)]
    x = rng.standard_normal((5, 64)).astype("float32")
    want = dequant_matmul_reference(x, quantize(wp, fmt), fmt) + x @ wo + np.sum(x @ x.T)
    np.testing.assert_allclose(_run(after, x), want, rtol=1e-4, atol=1e-3)


def test_shared_weight_is_stored_once():
    rng = np.random.default_rng()
    wp, wo = rng.standard_normal((64, 16)).astype("float32"), rng.standard_normal((64, 16)).astype("float32")
    p = QuantizeWeights({fingerprint(wp): ("proj", WeightFormat("int8"))})
    after = p(_module(wp, wo, reuse=True))
    assert p.rewrites == 2
    consts = set()
    relax.analysis.post_order_visit(after["main"].body, lambda e: consts.add(e) if isinstance(
        e, tvm.ir.GenericConst) and str(e.ty.dtype) == "int8" else None)
    assert len(consts) == 1


def test_must_not_fire_without_a_plan_or_on_other_weights():
    rng = np.random.default_rng()
    wp, wo = rng.standard_normal((64, 16)).astype("float32"), rng.standard_normal((64, 16)).astype("float32")
    mod = _module(wp, wo)
    assert QuantizeWeights({})(mod).same_as(mod)
    unrelated = rng.standard_normal((64, 16)).astype("float32")
    p = QuantizeWeights({fingerprint(unrelated): ("elsewhere", WeightFormat("int8"))})
    after = p(mod)
    assert p.rewrites == 0 and _calls(after, "dequant_matmul") == 0


def test_w8a8_takes_the_packed_kernels_only_where_they_apply():
    """On an AVX2 CPU: one row per batch element takes the vpmaddwd GEMV, a sequence of rows the vpmaddwd GEMM, both
    on the same [N/chunk, K/2, chunk, 2] panels; with AVX512-VNNI the sequence takes the vpdpbusd GEMM on
    [N/chunk, K/4, chunk, 4] panels (plus an int32 column sum), decode still the GEMV. A CPU without AVX2, CUDA, an N
    that is not a multiple of the GEMM's 16-output tile keep the int8 matmul; a K that is not a multiple of 4 the
    pair GEMM. (Structure only: the targets are named, not this machine's.)"""
    from llmcc.kernels.w8a8_matmul import gemv_pairs_chunk
    from llmcc.targets import TargetSpec, resolve

    rng = np.random.default_rng()
    batch, seq = tvm.tirx.Var("batch", "int64"), tvm.tirx.Var("sequence", "int64")
    sse = TargetSpec("cpu", "llvm", mcpu="x86-64")
    avx2 = TargetSpec("cpu", "llvm", mcpu="znver3")
    vnni = TargetSpec("cpu", "llvm", mcpu="znver4")
    assert vnni.model().int8_dot and not avx2.model().int8_dot and avx2.model().int16_madd
    kernels = ("w8a8_gemv_avx2", "w8a8_gemm_avx2", "w8a8_gemm_vnni", "int8_matmul")
    cases = [(64, 32, [batch, 1], avx2, "w8a8_gemv_avx2"), (64, 32, [1, 1], avx2, "w8a8_gemv_avx2"),
             (64, 32, [batch, seq], avx2, "w8a8_gemm_avx2"), (64, 32, [seq], avx2, "w8a8_gemm_avx2"),
             (64, 24, [batch, seq], avx2, "int8_matmul"), (64, 24, [batch, 1], avx2, "w8a8_gemv_avx2"),
             (64, 32, [batch, seq], vnni, "w8a8_gemm_vnni"), (64, 32, [seq], vnni, "w8a8_gemm_vnni"),
             (64, 32, [batch, 1], vnni, "w8a8_gemv_avx2"), (66, 32, [batch, seq], vnni, "w8a8_gemm_avx2"),
             (64, 24, [batch, seq], vnni, "int8_matmul"),
             (64, 32, [batch, 1], sse, "int8_matmul"), (64, 32, [batch, seq], sse, "int8_matmul"),
             (64, 32, [batch, seq], resolve("cuda:sm_80"), "int8_matmul")]
    for k, n, dims, target, kernel in cases:
        w = rng.standard_normal((k, n)).astype("float32")
        p = QuantizeWeights({fingerprint(w): ("proj", WeightFormat("w8a8"))}, target)
        after = p(matmul_module(w, dims))
        where = f"K {k}, N {n}, {dims} on {target.mcpu}"
        assert [_calls(after, name) for name in kernels] == [int(name == kernel) for name in kernels], where
        packed = [tuple(int(d) for d in c.ty.shape.values) for c in _consts(after) if str(c.ty.dtype) == "int8"]
        if kernel == "int8_matmul":
            assert packed == [(k, n)], where
        else:
            chunk = max(gemv_pairs_chunk(n, target.model().cores), 16 if "gemm" in kernel else 0)
            width = 4 if kernel == "w8a8_gemm_vnni" else 2
            assert packed == [(n // chunk, k // width, chunk, width)], where
        # one byte per weight and a scale per column; the VNNI GEMM's int32 column sums on top
        assert p.quantized[fingerprint(w)] == k * n + n * 4 + (n * 4 if kernel == "w8a8_gemm_vnni" else 0), where


def test_w8a8_gemm_module_matches_the_reference(seed):
    """A prefill-shaped w8a8 matmul through the pass, the pipeline and the VM equals w8a8_matmul_reference."""
    from llmcc import pipeline
    from llmcc.kernels.w8a8_matmul import w8a8_matmul_reference
    from llmcc.targets import host_cpu

    target = host_cpu()
    if not target.model().int16_madd:
        return
    rng = np.random.default_rng(seed)
    k, n = 2 * int(rng.integers(8, 100)), 16 * int(rng.integers(1, 8))
    w = rng.standard_normal((k, n)).astype("float32")
    seq = tvm.tirx.Var("sequence", "int64")
    mod = QuantizeWeights({fingerprint(w): ("proj", WeightFormat("w8a8"))}, target)(matmul_module(w, [2, seq]))
    result = pipeline.run(mod, target)
    vm = relax.VirtualMachine(tvm.compile(result.mod, target=target.tvm_target(), relax_pipeline=None), tvm.cpu())
    x = (rng.standard_normal((2, int(rng.integers(1, 40)), k)) * rng.uniform(0.1, 10)).astype("float32")
    got = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for _, a in result.weights]).numpy()
    want = w8a8_matmul_reference(x, *quantize(w, WeightFormat("w8a8")))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=f"seed {seed}")


def _consts(mod):
    found = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: found.append(e) if isinstance(
        e, tvm.ir.GenericConst) else None)
    return found



def test_w4a8_takes_its_gemv_on_avx2_and_rounds_rows_elsewhere():
    """A w4a8 GEMV on an AVX2 CPU: w4a8_gemv_avx2 (w4a8_gemv_vnni with VNNI) on nibble panels, quantizing its rows
    itself. A sequence of rows or CUDA: quantize_rows, the rows multiplied back, and the int4 dequant_matmul. Either
    computes the per-token int8 rows times the dequantized int4 weight."""
    from llmcc.kernels.w8a8_matmul import quantize_rows_reference
    from llmcc.targets import host_cpu, resolve

    rng = np.random.default_rng()
    w = rng.standard_normal((64, 32)).astype("float32")
    fmt = WeightFormat("w4a8", 32)
    batch, seq = tvm.tirx.Var("batch", "int64"), tvm.tirx.Var("sequence", "int64")
    for dims, target, gemv in (([batch, 1], host_cpu(), host_cpu().model().int16_madd),
                               ([batch, seq], host_cpu(), False), ([batch, 1], resolve("cuda:sm_80"), False)):
        after = QuantizeWeights({fingerprint(w): ("proj", fmt)}, target)(matmul_module(w, dims))
        where = f"{dims} on {target.name}"
        assert (_calls(after, "w4a8_gemv_"), _calls(after, "quantize_rows"),
                _calls(after, "dequant_matmul_int4_g32")) == ((1, 0, 0) if gemv else (0, 1, 1)), where
        if target.is_gpu:
            continue
        x = rng.standard_normal((2, 3, 64)).astype("float32")
        x = x[:, :1] if dims[1] == 1 else x
        q_x, s_x = quantize_rows_reference(x)
        want = (q_x.astype(np.float64) * s_x) @ dequantize(quantize(w, fmt), fmt).astype(np.float64)
        got = relax.VirtualMachine(tvm.compile(after, target=target.tvm_target()), tvm.cpu())["main"](
            tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=where)
