"""The lower phase's CPU legalizations: GELU through the vectorizable erf polynomial, numerics vs math.erf."""

import math

import numpy as np
import pytest
import tvm
from tvm import relax

from llmcc import pipeline
from llmcc.targets import resolve


def _gelu_module(dtype):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, 1000), dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.gelu(x))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("dtype, tol", [("float32", 2e-6), ("float16", 2e-3)])
def test_cpu_gelu_uses_fast_erf_and_matches_math_erf(dtype, tol, seed):
    spec = resolve("cpu")
    result = pipeline.run(_gelu_module(dtype), spec)
    tir = "\n".join(f.script() for gv, f in result.mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))
    assert ("T.erf" in tir) == (dtype != "float32"), "float32 GELU must not call libm's erff per element"
    vm = relax.VirtualMachine(tvm.compile(result.mod, target=spec.tvm_target(), relax_pipeline=None), tvm.cpu())
    x = (np.random.default_rng(seed).standard_normal((3, 1000)) * 4).astype(dtype)
    got = vm["main"](tvm.runtime.tensor(x)).numpy().astype(np.float64)
    erf = np.vectorize(math.erf)
    xd = x.astype(np.float64)
    np.testing.assert_allclose(got, 0.5 * xd * (1 + erf(xd / math.sqrt(2))), rtol=tol, atol=tol,
                               err_msg=f"seed {seed}")
