"""dequant_matmul: the numpy quantizers' round trip, and the TE kernels (scheduled by the CPU rules) vs the numpy
reference, for every weight format, at a symbolic M (prefill) and a static M = 1 (decode GEMV)."""

import numpy as np
import pytest
import tvm
from tvm import relax

from llmcc import pipeline
from llmcc.kernels.dequant_matmul import (WeightFormat, dequant_matmul_reference, dequant_matmul_te, dequant_take_te,
                                          dequantize,
                                          quantize, stored_bytes)
from llmcc.targets import resolve

FORMATS = [WeightFormat("fp16"), WeightFormat("bf16"), WeightFormat("int8"), WeightFormat("int4", 32, True),
           WeightFormat("int4", 128, True), WeightFormat("int4", 32, False), WeightFormat("int4", 128, False)]
IDS = [f.tag for f in FORMATS]


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_round_trip_error_is_within_half_a_step(fmt, seed):
    rng = np.random.default_rng(seed)
    k, n = 256, int(rng.integers(3, 40))
    w = (rng.standard_normal((k, n)) * rng.uniform(0.01, 2)).astype(np.float32)
    arrays = quantize(w, fmt)
    back = dequantize(arrays, fmt)
    assert back.shape == w.shape and back.dtype == np.float32
    err = np.abs(back - w)
    if fmt.kind in ("fp16", "bf16"):
        bits = 11 if fmt.kind == "fp16" else 8  # mantissa bits incl. the implicit one
        # below 2**-14 fp16 is subnormal: a fixed spacing of 2**-24, so half a step is 2**-25 absolute
        subnormal_half_step = 2.0 ** -25 if fmt.kind == "fp16" else 0.0
        assert np.all(err <= np.maximum(np.abs(w) * 2.0 ** -bits, subnormal_half_step)), f"seed {seed}"
        return
    if fmt.kind == "int8":
        step = np.abs(w).max(axis=0) / 127
        # 1e-4: w / scale and q * scale each round in float32, so a value on a half step can land a few ulp past it
        assert np.all(err <= step[None, :] / 2 * (1 + 1e-4)), f"seed {seed}"
        return
    g = w.reshape(k // fmt.group_size, fmt.group_size, n)
    if fmt.symmetric:
        step = np.abs(g).max(axis=1) / 7
        # -8 is unused by symmetric rounding, +7 caps the positive side: the largest |w| maps exactly
    else:
        step = (np.maximum(g.max(axis=1), 0) - np.minimum(g.min(axis=1), 0)) / 15
    bound = np.repeat(step, fmt.group_size, axis=0) / 2 * (1 + 1e-4) + 1e-7
    assert np.all(err <= bound), f"seed {seed}: worst {np.max(err - bound)}"


def test_stored_sizes():
    w = np.ones((256, 64), np.float32)
    assert stored_bytes(quantize(w, WeightFormat("int8"))) == 256 * 64 + 64 * 4
    assert stored_bytes(quantize(w, WeightFormat("int4", 32))) == 256 * 64 // 2 + 256 // 32 * 64 * 4
    assert stored_bytes(quantize(w, WeightFormat("fp16"))) == 256 * 64 * 2


def test_exact_grid_values_survive_int4_packing():
    """Every nibble position in the packed word: values already on the grid come back bit-exact."""
    rng = np.random.default_rng()
    fmt = WeightFormat("int4", 32, True)
    q = rng.integers(-7, 8, size=(64, 5)).astype(np.float32)
    q[0, :] = 7  # pins each group's scale to 1
    q[32, :] = 7
    np.testing.assert_array_equal(dequantize(quantize(q, fmt), fmt), q)


def test_group_size_must_divide_k():
    assert WeightFormat("int4", 128).check(96, 8) == "K=96 is not a multiple of the group size 128"
    assert WeightFormat("int4", 32).check(96, 8) is None
    with pytest.raises(ValueError, match="group size"):
        quantize(np.zeros((96, 8), np.float32), WeightFormat("int4", 128))


def _compiled(fmt, arrays, k, static_m):
    m = static_m if static_m else tvm.tirx.Var("sequence", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, m, k), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(bb.call_te(dequant_matmul_te(fmt), x, *[relax.const(a) for a in arrays],
                                   primfunc_name_hint="dequant_matmul"))
            out = bb.emit_output(relax.op.add(y, relax.const(np.float32(0.5))))  # an epilogue, as after FuseOps
        bb.emit_func_output(out)
    spec = resolve("cpu")
    result = pipeline.run(bb.get(), spec)
    ex = tvm.compile(result.mod, target=spec.tvm_target(), relax_pipeline=None)
    return relax.VirtualMachine(ex, tvm.cpu()), result


@pytest.mark.parametrize("static_m", [0, 1], ids=["symbolic_m", "gemv"])
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_kernel_matches_reference(fmt, static_m, seed):
    rng = np.random.default_rng(seed)
    k, n = 256, 8 * int(rng.integers(1, 9))
    arrays = quantize(rng.standard_normal((k, n)).astype(np.float32), fmt)
    vm, result = _compiled(fmt, arrays, k, static_m)
    assert [kn["rule"] for kn in result.kernels] == ["CpuMatmul"], result.kernels
    weights = [tvm.runtime.tensor(w) for _, w in result.weights]
    for m in ([static_m] if static_m else [1, 5, 33]):
        x = rng.standard_normal((2, m, k)).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(x), *weights).numpy()
        want = dequant_matmul_reference(x, arrays, fmt) + 0.5
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel <= 1e-5, f"seed {seed}, m {m}: relative error {rel:.2e}"


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_embedding_gather_matches_reference(fmt, seed):
    """An embedding table [V, H] quantized as its transpose (int8: one scale per vocabulary row); the gather
    dequantizes only the rows it reads."""
    rng = np.random.default_rng(seed)
    vocab, hidden = int(rng.integers(10, 60)), 128
    arrays = quantize(np.ascontiguousarray(rng.standard_normal((vocab, hidden)).astype(np.float32).T), fmt)
    bb = relax.BlockBuilder()
    ids = relax.Var("ids", relax.TensorType((tvm.tirx.Var("batch", "int64"), tvm.tirx.Var("sequence", "int64")),
                                            "int64"))
    with bb.function("main", [ids]):
        with bb.dataflow():
            out = bb.emit_output(bb.call_te(dequant_take_te(fmt), ids, *[relax.const(a) for a in arrays]))
        bb.emit_func_output(out)
    spec = resolve("cpu")
    result = pipeline.run(bb.get(), spec)
    vm = relax.VirtualMachine(tvm.compile(result.mod, target=spec.tvm_target(), relax_pipeline=None), tvm.cpu())
    x = rng.integers(0, vocab, (2, 7)).astype(np.int64)
    got = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(w) for _, w in result.weights]).numpy()
    np.testing.assert_array_equal(got, dequantize(arrays, fmt).T[x], err_msg=f"seed {seed}")
