"""The int8 / int4 / w4a8 GEMVs for AVX2 CPUs, and the int4 / w4a8 ones for AVX512-VNNI (llmcc.kernels.dequant_gemv)
vs x @ dequantize(W) in float64 (w4a8: x quantized per row first)."""

import numpy as np
import pytest
import tvm

from llmcc.kernels import dequant_gemv as dg
from llmcc.kernels.dequant_matmul import WeightFormat, dequantize, quantize
from llmcc.kernels.w8a8_matmul import quantize_rows_reference
from llmcc.targets import resolve

AVX2 = resolve("cpu").model().int16_madd
VNNI = resolve("cpu").model().int8_dot
FORMATS = [WeightFormat("int8"), WeightFormat("int4", 32, True), WeightFormat("int4", 32, False),
           WeightFormat("int4", 128, True), WeightFormat("int4", 128, False), WeightFormat("w4a8", 32, True)]
# The kernels' activations hold x to max|x| * 4.7e-10 (AVX2: two int16 parts) or to 6.1e-8 of each quantization
# group's max|x| (VNNI: three int8 digits) and their sums are exact in int32: what is left is float32 rounding of
# the block sums and of x / s, under 1e-6 relative on outputs of these sizes (the same digits scaled per row miss it
# on some draws: _random_x's outlier channel sets every group's step)
REL_TOL = 1e-6
KERNELS = [pytest.param(False, id="avx2", marks=pytest.mark.skipif(not AVX2, reason="needs AVX2")),
           pytest.param(True, id="vnni", marks=pytest.mark.skipif(not VNNI, reason="needs AVX512-VNNI"))]


def _random_x(rng, rows, k):
    x = rng.standard_normal((rows, k)) * rng.uniform(0.1, 10)
    x[:, rng.integers(0, k)] *= 50.0  # an outlier channel: the split's scale follows the row maximum
    x = x.astype(np.float32)
    if rows > 1:
        x[1] = 0.0  # an all-zero row gives zeros, not NaN
    return x


def _build(fmt, k, n, chunk, tasks, vnni=False):
    plan = dg.GemvPlan(fmt, k, n, chunk, tasks, vnni)
    return tvm.tirx.build(plan.kernel().with_attr("global_symbol", "main"), target=resolve("cpu").tvm_target())


@pytest.mark.parametrize("vnni", KERNELS)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.tag)
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_matches_float64_reference(fmt, rows, vnni, seed):
    if vnni and fmt.kind == "int8":
        pytest.skip("int8 has no VNNI GEMV")
    rng = np.random.default_rng(seed)
    group = fmt.group_size or 2
    # K past one int8 block (256 k pairs) in some draws, so block sums are moved to float32 more than once
    int4 = fmt.kind in ("int4", "w4a8")
    k = group * int(rng.integers(1, 1200 // group + 1)) if int4 else 2 * int(rng.integers(1, 700))
    n = 16 * int(rng.integers(1, 20)) if int4 else 8 * int(rng.integers(1, 40))
    cores = int(rng.integers(1, 9))
    chunk, tasks = dg.gemv_tiles(fmt, n, cores)
    arrays = quantize(rng.standard_normal((k, n)).astype(np.float32), fmt)
    stored = dg.gemv_weights(arrays, fmt, chunk, vnni)
    x = _random_x(rng, rows, k)
    y = tvm.runtime.tensor(np.zeros((rows, n), np.float32))
    _build(fmt, k, n, chunk, tasks, vnni)["main"](*[tvm.runtime.tensor(a) for a in [x, *stored]], y)
    if fmt.kind == "w4a8":  # its rows quantized to int8 as quantize_rows does, then exact int32 sums
        q_x, s_x = quantize_rows_reference(x)
        x = q_x.astype(np.float64) * s_x
    want = x.astype(np.float64) @ dequantize(arrays, fmt).astype(np.float64)
    got = y.numpy()
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    where = f"seed {seed}: {fmt.tag} k {k} n {n} chunk {chunk} tasks {tasks} vnni {vnni}"
    assert rel <= REL_TOL, f"{where}: rel err {rel:.2e}"
    if rows > 1:
        assert np.all(got[1] == 0), where


@pytest.mark.parametrize("fmt, vnni", [(FORMATS[0], False), (FORMATS[1], False), (FORMATS[2], False),
                                       (FORMATS[1], True)], ids=["int8", "int4_pairs", "int4_asym_pairs", "int4_quads"])
def test_layouts_round_trip(fmt, vnni, seed):
    rng = np.random.default_rng(seed)
    k, n = 64 * int(rng.integers(1, 4)), 32 * int(rng.integers(1, 4))
    arrays = quantize(rng.standard_normal((k, n)).astype(np.float32), fmt)
    chunk = int(rng.choice([16, 32]))
    panels = dg.gemv_weights(arrays, fmt, chunk, vnni)[0]
    if vnni:
        assert panels.shape == (n // chunk, k // 4, chunk // 16, 32)
    if fmt.kind == "int8":
        want = arrays[0]
    else:  # dequant_matmul's nibbles, unpacked from its uint32 words
        want = np.stack([(arrays[0] >> np.uint32(4 * i)) & np.uint32(15) for i in range(8)], axis=1).reshape(k, n)
    assert np.array_equal(dg.gemv_weight_matrix(panels, fmt).astype(np.int64), want.astype(np.int64))
    assert panels.nbytes == (k * n if fmt.kind == "int8" else k * n // 2)  # packing adds no byte


def test_split_rows_holds_float32_precision(seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((4, 300)) * np.exp(rng.uniform(-8, 8, (4, 1)))).astype(np.float32)
    hi, lo, s = dg.split_rows_reference(x)
    assert np.abs(hi).max() <= 32767 and np.abs(lo).max() <= 16384
    back = s.astype(np.float64) * (hi + lo / 32768.0)
    # x / s rounds in float32 (2^-24 of max|x|); hi + lo / 32768 then holds it to s * 2^-16 (2^-31 of max|x|)
    assert np.all(np.abs(back - x) <= np.abs(x).max(axis=1, keepdims=True) * 2.0 ** -23), f"seed {seed}"


def test_digit_rows_hold_float32_precision(seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((4, 300)) * np.exp(rng.uniform(-8, 8, (4, 1)))).astype(np.float32)
    x[0, int(rng.integers(0, 300))] *= 100.0  # an outlier sets the row's scale
    d, s = dg.digit_rows_reference(x, 3, group=30)
    assert np.abs(d.astype(np.int64)).max() <= 127 and s.shape == (4, 10)
    back = np.repeat(s.astype(np.float64), 30, axis=1) * (d[0] + d[1] / 254.0 + d[2] / 254.0 ** 2)
    # x / s rounds in float32 (2^-24 of each |x|); three digits then hold it to half a step of the last, s / 2 / 254^2
    # (6.1e-8 of the group's max|x|); two would leave s / 2 / 254
    group_max = np.repeat(np.abs(x).reshape(4, 10, 30).max(axis=-1), 30, axis=1)
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0 ** -23 + group_max * 2.0 ** -23), f"seed {seed}"
    two = np.repeat(s.astype(np.float64), 30, axis=1) * (d[0] + d[1] / 254.0)
    assert not np.all(np.abs(two - x) <= np.abs(x) * 2.0 ** -23 + group_max * 2.0 ** -23), f"seed {seed}"
    q, s_w4a8 = quantize_rows_reference(x)  # w4a8's one digit is quantize_rows
    one, s_one = dg.digit_rows_reference(x, 1)
    assert np.array_equal(one[0], q) and np.array_equal(s_one, s_w4a8)


def test_plan_picks_vnni_for_int4_only_where_the_cpu_has_it():
    from llmcc.targets import TargetSpec

    sse, avx2, vnni = (TargetSpec("cpu", "llvm", mcpu=m).model() for m in ("x86-64", "znver3", "znver4"))
    int4, int8, w4a8 = WeightFormat("int4", 32), WeightFormat("int8"), WeightFormat("w4a8", 32)
    assert dg.plan_gemv(int4, 4096, 4096, vnni).name == "int4_gemv_vnni"
    assert dg.plan_gemv(w4a8, 4096, 4096, vnni).name == "w4a8_gemv_vnni"
    assert dg.plan_gemv(int8, 4096, 4096, vnni).name == "int8_gemv_avx2"  # int8 has no VNNI GEMV
    assert dg.plan_gemv(int4, 4096, 4096, avx2).name == "int4_gemv_avx2"
    assert dg.plan_gemv(WeightFormat("int4", 4), 36, 32, vnni).name == "int4_gemv_avx2"  # group not a multiple of 8
    assert dg.plan_gemv(int4, 4096, 4096, sse) is None and dg.plan_gemv(int4, 4096, 4096, None) is None
    assert dg.plan_gemv(int4, 4096, 40, vnni) is None  # N not a multiple of 16


def test_refuses_what_it_cannot_tile():
    int4 = WeightFormat("int4", 32)
    assert dg.gemv_check(WeightFormat("int8"), 63, 64, 32) == "K=63 is odd"
    assert "multiple of the 32-output chunk" in dg.gemv_check(WeightFormat("int8"), 64, 72, 32)
    assert "a multiple of 16" in dg.gemv_check(int4, 64, 72, 8)
    assert "group size 32" in dg.gemv_check(int4, 48, 64, 32)
    assert "no integer GEMV" in dg.gemv_check(WeightFormat("fp16"), 64, 64, 32)
    assert "a multiple of 16" in dg.gemv_check(WeightFormat("w4a8", 32), 64, 72, 8)
    assert dg.gemv_tiles(int4, 40, 2) is None  # N not a multiple of 16: the int4 kernel does not apply
    assert dg.gemv_tiles(WeightFormat("int8"), 40, 2) == (8, 5)
    assert dg.gemv_tiles(WeightFormat("int8"), 4096, 2) == (32, 2)
    assert dg.gemv_tiles(WeightFormat("int8"), 96, 2) == (32, 3)  # 3 panels: one task each
    with pytest.raises(ValueError, match="dequant GEMV: K=63 is odd"):
        dg.dequant_gemv_avx2(WeightFormat("int8"), 63, 64, 32, 2)
    with pytest.raises(ValueError, match="do not split into 3 tasks"):
        dg.dequant_gemv_avx2(WeightFormat("int8"), 64, 64, 32, 3)
    assert "no integer GEMV for VNNI" in dg.gemv_check(WeightFormat("int8"), 64, 64, 32, vnni=True)
    assert "group size 4 is not a multiple of 8" in dg.gemv_check(WeightFormat("int4", 4), 36, 64, 32, vnni=True)
    with pytest.raises(ValueError, match=r"dequant GEMV \(VNNI\): 2 panels do not split into 3 tasks"):
        dg.dequant_gemv_vnni(int4, 64, 64, 32, 3)
