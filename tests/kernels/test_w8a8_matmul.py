"""w8a8: the per-token activation quantizer and the int8 x int8 -> int32 matmul, scheduled for the CPU, vs numpy."""

import numpy as np
import pytest
import tvm
from tvm import relax

from llmcc import pipeline
from llmcc.kernels.dequant_matmul import WeightFormat, quantize
from llmcc.kernels.w8a8_matmul import (int8_matmul_te, quantize_rows_reference, quantize_rows_te,
                                       w8a8_matmul_reference)
from llmcc.targets import resolve


def _build(k, arrays):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((tvm.tirx.Var("batch", "int64"), tvm.tirx.Var("sequence", "int64"), k),
                                        "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            rows = bb.emit(bb.call_te(quantize_rows_te, x, primfunc_name_hint="quantize_rows"))
            y = bb.emit(bb.call_te(int8_matmul_te, relax.TupleGetItem(rows, 0), relax.TupleGetItem(rows, 1),
                                   *[relax.const(a) for a in arrays], primfunc_name_hint="int8_matmul"))
            out = bb.emit_output(relax.Tuple([relax.TupleGetItem(rows, 0), y]))
        bb.emit_func_output(out)
    spec = resolve("cpu")
    result = pipeline.run(bb.get(), spec)
    vm = relax.VirtualMachine(tvm.compile(result.mod, target=spec.tvm_target(), relax_pipeline=None), tvm.cpu())
    return vm, result


@pytest.mark.parametrize("seq", [1, 9, 40])
def test_w8a8_matches_reference(seq, seed):
    rng = np.random.default_rng(seed)
    k, n = 64 * int(rng.integers(1, 5)), 8 * int(rng.integers(1, 9))
    arrays = quantize(rng.standard_normal((k, n)).astype(np.float32), WeightFormat("w8a8"))
    vm, result = _build(k, arrays)
    assert {kn["name"]: kn["rule"] for kn in result.kernels}["int8_matmul"] == "CpuMatmul"
    x = (rng.standard_normal((2, seq, k)) * rng.uniform(0.1, 10)).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero row must quantize to zeros, not NaN
    q, y = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(w) for _, w in result.weights])
    np.testing.assert_array_equal(q.numpy(), quantize_rows_reference(x)[0], err_msg=f"seed {seed}")
    want = w8a8_matmul_reference(x, *arrays)
    rel = np.linalg.norm(y.numpy() - want) / np.linalg.norm(want)
    assert rel <= 1e-6 and np.all(y.numpy()[0, 0] == 0), f"seed {seed}: {rel:.2e}"


# ---------------------------------------------------------------------------------------------- the AVX2 GEMV

def _gemv_lib(k, n, chunk):
    from llmcc.kernels.w8a8_matmul import gemv_pairs_avx2

    func = gemv_pairs_avx2(k, n, chunk).with_attr("global_symbol", "main")
    return tvm.tirx.build(func, target=resolve("cpu").tvm_target())


@pytest.mark.skipif(not resolve("cpu").model().int16_madd, reason="needs AVX2")
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_pairs_is_exact(rows, seed):
    """The vpmaddwd kernel on pair-packed weights gives the w8a8 reference bit for bit (int32 sums, then the same
    float32 rescale), at random sizes and every chunk width."""
    from llmcc.kernels.w8a8_matmul import gemv_pairs_chunk, gemv_pairs_reference, pack_pairs

    rng = np.random.default_rng(seed)
    k, n = 2 * int(rng.integers(1, 200)), 8 * int(rng.integers(1, 40))
    chunk = gemv_pairs_chunk(n, cores=int(rng.integers(1, 5)))
    x = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 10)).astype(np.float32)
    q_w, s_w = quantize(rng.standard_normal((k, n)).astype(np.float32), WeightFormat("w8a8"))
    q_x, s_x = quantize_rows_reference(x)
    pairs = pack_pairs(q_w, chunk)
    assert np.array_equal(gemv_pairs_reference(q_x, s_x, pairs, s_w), w8a8_matmul_reference(x, q_w, s_w))
    y = tvm.runtime.tensor(np.zeros((rows, n), np.float32))
    _gemv_lib(k, n, chunk)["main"](*[tvm.runtime.tensor(a) for a in (q_x, s_x, pairs, s_w)], y)
    np.testing.assert_array_equal(y.numpy(), w8a8_matmul_reference(x, q_w, s_w),
                                  err_msg=f"seed {seed}: k {k} n {n} chunk {chunk}")


def test_gemv_pairs_refuses_what_it_cannot_tile():
    from llmcc.kernels.w8a8_matmul import gemv_pairs_avx2, gemv_pairs_check, gemv_pairs_chunk

    assert gemv_pairs_check(63, 64, 64) == "K=63 is odd"
    assert "not a multiple" in gemv_pairs_check(64, 72, 64)
    assert gemv_pairs_chunk(4096, 2) == 64 and gemv_pairs_chunk(64, 4) == 16 and gemv_pairs_chunk(20, 1) is None
    with pytest.raises(ValueError, match="w8a8 GEMV: K=63 is odd"):
        gemv_pairs_avx2(63, 64, 64)


# ---------------------------------------------------------------------------------------------- the AVX2 GEMM

def _gemm_lib(k, n, chunk):
    from llmcc.kernels.w8a8_matmul import gemm_pairs_avx2

    func = gemm_pairs_avx2(k, n, chunk).with_attr("global_symbol", "main")
    return tvm.tirx.build(func, target=resolve("cpu").tvm_target())


def test_gemm_pairs_refuses_what_it_cannot_tile():
    from llmcc.kernels.w8a8_matmul import GEMM_MAX_K, gemm_pairs_avx2, gemm_pairs_check

    assert gemm_pairs_check(64, 64, 64) is None and gemm_pairs_check(64, 64, 16) is None
    assert gemm_pairs_check(63, 64, 64) == "K=63 is odd"
    assert "register tile" in gemm_pairs_check(64, 24, 8)
    assert "overflow" in gemm_pairs_check(GEMM_MAX_K + 2, 64, 64) and gemm_pairs_check(GEMM_MAX_K, 64, 64) is None
    with pytest.raises(ValueError, match="w8a8 GEMM: the 8-output panels"):
        gemm_pairs_avx2(64, 24, 8)


# ---------------------------------------------------------------------------------------------- the VNNI GEMM

def test_quad_panels_round_trip_and_column_sums():
    """The quad panels hold q_w's bytes, four consecutive k of one output per int32 lane; w_sums is 128 times each
    column's sum (what the +128 offset of the activations adds to vpdpbusd's sums)."""
    from llmcc.kernels.w8a8_matmul import pack_quads, quad_weights, unpack_quads

    rng = np.random.default_rng()
    k, n, chunk = 4 * int(rng.integers(1, 40)), 32, 16
    q_w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    quads = pack_quads(q_w, chunk)
    assert quads.shape == (n // chunk, k // 4, chunk, 4)
    np.testing.assert_array_equal(unpack_quads(quads), q_w)
    np.testing.assert_array_equal(quads[1, 2, 3], q_w[8:12, chunk + 3])
    panels, s_w, w_sums = quad_weights(q_w, np.ones(n, np.float32), chunk)
    np.testing.assert_array_equal(w_sums, 128 * q_w.astype(np.int64).sum(0))
    assert w_sums.dtype == np.int32 and panels.dtype == np.int8


def _vnni_lib(k, n, chunk):
    from llmcc.kernels.w8a8_matmul import gemm_quads_vnni

    func = gemm_quads_vnni(k, n, chunk).with_attr("global_symbol", "main")
    return tvm.tirx.build(func, target=resolve("cpu").tvm_target())


def _gemm_case(layout, rows, seed):
    """x, the int8 weight, the kernel's constants and its built library for the pair or quad GEMM at random K, N and
    panel width."""
    from llmcc.kernels import w8a8_matmul as w8

    rng = np.random.default_rng(seed)
    width = 2 if layout == "pairs" else 4
    k, n = width * int(rng.integers(1, 600 // width)), 16 * int(rng.integers(1, 20))
    check = w8.gemm_pairs_check if layout == "pairs" else w8.gemm_quads_check
    chunk = w8.gemv_pairs_chunk(n, cores=int(rng.integers(1, 5)))
    if check(k, n, chunk):
        chunk = 16
    x = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 10)).astype(np.float32)
    x[rows // 2] = 0.0
    x[0, -1] = 5 * np.abs(x[0]).max() + 1  # the row's maximum in the tail
    if rows > 1 and k > 8:  # scale 1 and x / scale on .5: round half to even, as numpy does
        x[-1, 8] = 127
        x[-1, :8] = np.arange(8, dtype=np.float32) + 0.5
    q_w, s_w = quantize(rng.standard_normal((k, n)).astype(np.float32), WeightFormat("w8a8"))
    q_w[:, 0], q_w[:, -1] = 127, -127  # the largest sums (the quads' +128 offset makes them larger still)
    if layout == "pairs":
        lib, constants = _gemm_lib(k, n, chunk), [w8.pack_pairs(q_w, chunk), s_w]
    else:
        lib, constants = _vnni_lib(k, n, chunk), w8.quad_weights(q_w, s_w, chunk)
    return x, q_w, s_w, constants, lib, f"seed {seed}: k {k} n {n} chunk {chunk} rows {rows}"


@pytest.mark.parametrize("layout", [
    pytest.param("pairs", marks=pytest.mark.skipif(not resolve("cpu").model().int16_madd, reason="needs AVX2")),
    pytest.param("quads", marks=pytest.mark.skipif(not resolve("cpu").model().int8_dot, reason="needs AVX512-VNNI"))])
@pytest.mark.parametrize("rows", [1, 4, 7, 9, 130])
def test_gemm_is_exact(layout, rows, seed):
    """The register-tiled GEMMs, quantizing their own rows, give the w8a8 reference bit for bit: the vpmaddwd GEMM
    on the GEMV's pair panels and the vpdpbusd GEMM on quad panels (rows offset to unsigned bytes, the offset's
    column sums taken off in int32). Row counts that fill a tile (4 or 8 rows), leave a partial one, or are one row;
    K with and without a tail past the last 8-lane vector (the row maximum placed there); an all-zero row; values on
    a rounding tie; weights at +-127; random panel widths."""
    x, q_w, s_w, constants, lib, where = _gemm_case(layout, rows, seed)
    y = tvm.runtime.tensor(np.full((rows, q_w.shape[1]), np.nan, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, *constants)], y)
    np.testing.assert_array_equal(y.numpy(), w8a8_matmul_reference(x, q_w, s_w), err_msg=where)


def test_gemm_quads_refuses_what_it_cannot_tile():
    from llmcc.kernels.w8a8_matmul import GEMM_QUADS_MAX_K, gemm_quads_check, gemm_quads_vnni

    assert gemm_quads_check(64, 64, 64) is None and gemm_quads_check(64, 64, 16) is None
    assert gemm_quads_check(66, 64, 64) == "K=66 is not a multiple of 4"
    assert "16" in gemm_quads_check(64, 24, 8)
    assert "overflow" in gemm_quads_check(GEMM_QUADS_MAX_K + 4, 64, 64)
    assert gemm_quads_check(GEMM_QUADS_MAX_K, 64, 64) is None
    with pytest.raises(ValueError, match="w8a8 VNNI GEMM: K=66"):
        gemm_quads_vnni(66, 64, 64)
