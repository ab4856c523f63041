"""quantize_weights: planned constant weights become dequantize-matmul kernels; everything else stays."""

import numpy as np
import tvm
from tvm import relax

from llmcc.kernels.dequant_matmul import WeightFormat, dequant_matmul_reference, quantize
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
