"""lift_weights: large constants become trailing parameters; small ones and constant-free modules are untouched."""

import numpy as np
import tvm
from tvm import relax
from tvm.script import relax as R

from llmcc.passes.lift_weights import LiftWeights


def _module(weight: np.ndarray, small: np.ndarray):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((tvm.tirx.Var("n", "int64"), weight.shape[0]), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(weight)))
            z = bb.emit_output(relax.op.add(y, relax.const(small)))
        bb.emit_func_output(z)
    return bb.get()


def test_large_constants_become_parameters_and_numerics_hold():
    rng = np.random.default_rng()
    w, b = rng.standard_normal((16, 8)).astype("float32"), rng.standard_normal(8).astype("float32")
    p = LiftWeights(min_elements=64)
    after = p(_module(w, b))
    assert p.rewrites == 1
    params = after["main"].params
    assert [str(v.ty.shape) for v in params[1:]] == ["R.shape([16, 8])"]
    assert int(after["main"].attrs["num_input"]) == 1
    np.testing.assert_array_equal(p.weights[0][1], w)
    ex = tvm.compile(after, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = rng.standard_normal((3, 16)).astype("float32")
    out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    np.testing.assert_allclose(out, x @ w + b, rtol=1e-5, atol=1e-5)


def test_no_constants_no_rewrite():
    @tvm.script.ir_module
    class Plain:
        @R.function
        def main(x: R.Tensor((4, 4), "float32")):
            with R.dataflow():
                y = R.add(x, x)
                R.output(y)
            return y

    p = LiftWeights()
    after = p(Plain)
    assert p.rewrites == 0 and p.weights == []
    tvm.ir.assert_structural_equal(after, Plain)


def test_small_constants_stay():
    p = LiftWeights(min_elements=1000)
    p(_module(np.ones((16, 8), "float32"), np.ones(8, "float32")))
    assert p.rewrites == 0
