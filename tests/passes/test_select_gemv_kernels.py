"""select_gemv_kernels: decode GEMVs on int8 / int4 dequant_matmul kernels take the integer GEMV (AVX2; int4 the VNNI
one where the CPU has it); nothing else does."""

import numpy as np
import pytest
import tvm
from tvm import relax

from helpers import matmul_module
from llmcc.kernels import dequant_gemv
from llmcc.kernels.dequant_matmul import WeightFormat, dequant_matmul_reference, quantize
from llmcc.passes.quantize_weights import QuantizeWeights
from llmcc.passes.select_gemv_kernels import SelectGemvKernels
from llmcc.quant.gate import fingerprint
from llmcc.targets import TargetSpec, host_cpu, resolve

AVX2 = host_cpu().model().int16_madd


def _calls(mod, name_part):
    return sum(1 for gv in mod.functions if name_part in gv.name_hint)


def _const_shapes(mod):
    consts = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: consts.append(e) if isinstance(
        e, tvm.ir.GenericConst) else None)
    return [c.value.numpy().shape for c in consts]


def _quantized(w, fmt, dims, target):
    return QuantizeWeights({fingerprint(w): ("proj", fmt)}, target)(matmul_module(w, dims))


@pytest.mark.skipif(not AVX2, reason="needs AVX2")
@pytest.mark.parametrize("fmt", [WeightFormat("int8"), WeightFormat("int4", 32, True), WeightFormat("int4", 32, False)],
                         ids=lambda f: f.tag)
def test_decode_gemv_takes_the_integer_kernel_and_computes_the_same(fmt):
    rng = np.random.default_rng()
    w = rng.standard_normal((64, 32)).astype("float32")
    batch = tvm.tirx.Var("batch", "int64")
    p = SelectGemvKernels(host_cpu())
    after = p(_quantized(w, fmt, [batch, 1], host_cpu()))
    assert p.rewrites == 1
    plan = dequant_gemv.plan_gemv(fmt, 64, 32, host_cpu().model())
    assert plan.vnni == (fmt.kind == "int4" and host_cpu().model().int8_dot)
    assert (_calls(after, plan.name), _calls(after, "dequant_matmul")) == (1, 0)
    panels = plan.weights(quantize(w, fmt))[0]
    assert [shape for shape in _const_shapes(after) if shape == panels.shape] == [panels.shape]
    x = rng.standard_normal((3, 1, 64)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(after, target=host_cpu().tvm_target()), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, dequant_matmul_reference(x, quantize(w, fmt), fmt), rtol=1e-5, atol=1e-5)


def test_int4_takes_the_vnni_gemv_only_on_a_vnni_cpu():
    """Structure only (the targets are named, not this machine's): int4 on Zen 4 takes int4_gemv_vnni on nibble
    quads [N/32, K/4, 2, 32]; on Zen 3 int4_gemv_avx2 on pairs; int8 the AVX2 GEMV on both."""
    w = np.random.default_rng().standard_normal((64, 32)).astype("float32")
    batch = tvm.tirx.Var("batch", "int64")
    cases = [("znver4", WeightFormat("int4", 32), "int4_gemv_vnni", (1, 16, 2, 32)),
             ("znver3", WeightFormat("int4", 32), "int4_gemv_avx2", (1, 32, 2, 16)),
             ("znver4", WeightFormat("int8"), "int8_gemv_avx2", (1, 32, 32, 2))]
    for mcpu, fmt, kernel, panels in cases:
        target = TargetSpec("cpu", "llvm", mcpu=mcpu)
        after = SelectGemvKernels(target)(_quantized(w, fmt, [batch, 1], target))
        names = [gv.name_hint for gv in after.functions if "_gemv_" in gv.name_hint]
        assert names == [kernel], f"{fmt.tag} on {mcpu}: {names}"
        assert panels in _const_shapes(after), f"{fmt.tag} on {mcpu}"


def test_must_not_fire_off_the_decode_shape_or_off_avx2():
    """A sequence of rows, a CPU without AVX2, CUDA, fp16 weights and an int4 weight whose N is not a multiple of 16
    keep dequant_matmul."""
    rng = np.random.default_rng()
    batch, seq = tvm.tirx.Var("batch", "int64"), tvm.tirx.Var("sequence", "int64")
    w, narrow = rng.standard_normal((64, 32)).astype("float32"), rng.standard_normal((64, 40)).astype("float32")
    int8, int4 = WeightFormat("int8"), WeightFormat("int4", 32)
    cases = [(w, int8, [batch, seq], host_cpu()), (w, int4, [2, 5], host_cpu()),
             (w, int8, [batch, 1], TargetSpec("cpu", "llvm", mcpu="x86-64")),
             (w, int4, [batch, 1], resolve("cuda:sm_80")), (w, WeightFormat("fp16"), [batch, 1], host_cpu()),
             (narrow, int4, [batch, 1], host_cpu())]
    for weight, fmt, dims, target in cases:
        mod = _quantized(weight, fmt, dims, target)
        p = SelectGemvKernels(target)
        after = p(mod)
        assert p.rewrites == 0 and after.same_as(mod), f"{fmt.tag} {weight.shape} {dims} on {target.name}"



def test_format_tags_round_trip():
    for fmt in (WeightFormat("int8"), WeightFormat("int4", 32), WeightFormat("int4", 128, False), WeightFormat("fp16")):
        assert WeightFormat.from_tag(fmt.tag) == fmt
