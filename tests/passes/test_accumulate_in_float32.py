"""accumulate_in_float32: half-precision matmuls accumulate in float32 (closer to float64 than an fp16 sum);
float32 matmuls and ones that already ask for a float32 output stay as they are."""

import numpy as np
import pytest
import tvm
from tvm import relax

from llmcc.passes.accumulate_in_float32 import AccumulateInFloat32

M, K, N = 8, 2048, 16


def _matmul_module(dtype, out_dtype=None):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((M, K), dtype))
    w = relax.Var("w", relax.TensorType((K, N), dtype))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, w, out_dtype=out_dtype))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, x, w):
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()


def test_fp16_matmul_accumulates_in_float32(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (M, K)).astype(np.float16)  # positive: the fp16 running sum grows to ~500, 0.25 per ulp
    w = rng.uniform(0, 1, (K, N)).astype(np.float16)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    before = _matmul_module("float16")
    p = AccumulateInFloat32()
    after = p(before)
    assert p.rewrites == 1
    wide, narrow = _run(after, x, w), _run(before, x, w)
    assert wide.dtype == np.float16
    err_wide = np.abs(wide - ref).max() / np.abs(ref).max()
    err_narrow = np.abs(narrow - ref).max() / np.abs(ref).max()
    assert err_wide <= 2 ** -11, f"seed {seed}: {err_wide}"  # one rounding of the result
    assert err_narrow > 2 * err_wide, f"seed {seed}: fp16 sum {err_narrow}, fp32 sum {err_wide}"


@pytest.mark.parametrize("dtype, out_dtype", [("float32", None), ("float16", "float32")])
def test_float32_sums_stay(dtype, out_dtype):
    before = _matmul_module(dtype, out_dtype)
    p = AccumulateInFloat32()
    after = p(before)
    assert p.rewrites == 0
    tvm.ir.assert_structural_equal(after, before)
