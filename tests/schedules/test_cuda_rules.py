"""llmcc's CUDA schedule rules (llmcc/schedules/cuda.py) and the tile model they take every size from (cuda_tiles.py).

No GPU here. The SIMT kernels (GEMV, CUDA-core matmul) run as TVM generated them, in the CPU emulator of
tests/kernels/cuda_emu.py (one fiber per CUDA thread, barriers and shuffles emulated), against numpy in float64 (rel
1e-5, fresh random inputs). The tensor-core matmul is built with nvcc for each arch and inspected: wmma's mma_sync in
the source, threads and dynamic shared memory as its tiles say, within the arch's limits. The tile model is checked
against each arch's registers, shared memory and thread limits, and shown to follow the arch (an A10 and an H100
get different tiles for one kernel; less shared memory gives a smaller tile).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import llmcc.cuda as lc

lc.prepare_driver()  # before tvm, as llmcc/__init__.py does

import tvm  # noqa: E402
from tvm import relax, tirx  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from llmcc.schedules import rules_for  # noqa: E402
from llmcc.schedules.cuda import CudaGemv, CudaMatmul, CudaTensorCoreMatmul  # noqa: E402
from llmcc.schedules.cuda_tiles import (  # noqa: E402
    RESIDENT_BLOCKS, WARP, gemv_tiles, register_budget, simt_matmul_tiles, tensor_core_tiles)
from llmcc.targets import CUDA_ARCH_MODELS, CUDA_ARCHS, resolve  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

HAS_NVCC = bool(shutil.which("nvcc") or os.access("/usr/local/cuda/bin/nvcc", os.X_OK) or os.environ.get("CUDA_HOME"))
HAS_CXX = bool(os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++"))
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="needs nvcc (CUDA toolkit)")
needs_emulator = pytest.mark.skipif(not (HAS_NVCC and HAS_CXX), reason="the CUDA emulator needs nvcc and g++")
pytestmark = pytest.mark.cuda_build


# ---------------------------------------------------------------------------------------------------------------
# Kernels, as llmcc's pipeline lowers them (legalize, fuse)

@tvm.script.ir_module
class GemvBias:  # decode: one row per batch element, [K, N] weight, bias epilogue
    @R.function
    def main(x: R.Tensor(("batch", 1, 96), "float32"), w: R.Tensor((96, "n"), "float32"),
             b: R.Tensor(("n",), "float32")):
        with R.dataflow():
            y = R.add(R.matmul(x, w), b)
            R.output(y)
        return y


@tvm.script.ir_module
class GemvStatic:
    @R.function
    def main(x: R.Tensor((1, 128), "float32"), w: R.Tensor((128, 256), "float32")):
        with R.dataflow():
            y = R.matmul(x, w)
            R.output(y)
        return y


@tvm.script.ir_module
class MatmulBias:  # prefill: a symbolic sequence of rows
    @R.function
    def main(x: R.Tensor(("seq", 64), "float32"), w: R.Tensor((64, 96), "float32"), b: R.Tensor((96,), "float32")):
        with R.dataflow():
            y = R.add(R.matmul(x, w), b)
            R.output(y)
        return y


@tvm.script.ir_module
class MatmulFp16:
    @R.function
    def main(x: R.Tensor(("seq", 512), "float16"), w: R.Tensor((512, 256), "float16")):
        with R.dataflow():
            y = R.astype(R.matmul(x, w, out_dtype="float32"), "float16")
            R.output(y)
        return y


@tvm.script.ir_module
class MatmulFp16SmallK:
    @R.function
    def main(x: R.Tensor(("seq", 64), "float16"), w: R.Tensor((64, 256), "float16")):
        with R.dataflow():
            y = R.matmul(x, w, out_dtype="float32")
            R.output(y)
        return y


def kernel(mod) -> tirx.PrimFunc:
    """The one PrimFunc the module lowers to (a main that calls it)."""
    mod = relax.transform.LegalizeOps()(mod)
    mod = relax.transform.AnnotateTIROpPattern()(mod)
    mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(mod))
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    return func


def gemv_transposed_weight() -> tirx.PrimFunc:
    """x @ W^T with W [N, K]: the weight is read along K, which CudaGemv leaves to dlight's GEMV."""
    from tvm import te

    x = te.placeholder((1, 128), name="x")
    w = te.placeholder((256, 128), name="w")
    k = te.reduce_axis((0, 128), name="k")
    y = te.compute((1, 256), lambda i, j: te.sum(x[i, k] * w[j, k], axis=k), name="y")
    return te.create_prim_func([x, w, y])


def schedule(rule, func, arch="sm_80"):
    target = resolve(f"cuda:{arch}").tvm_target()
    with target:
        sch = rule.apply(func, target, False)
    return None if sch is None else sch.mod["main"].with_attr("tirx.is_scheduled", True)


def rand(*shape, rng):
    return rng.standard_normal(shape).astype(np.float32)


def assert_close(got, want, what):
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err <= 1e-5, f"{what}: relative error {err:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# The tile model

SHAPES = [(1, 4096), (128, 512), (128, 4096), (4096, 4096), (512, 11008)]


@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_tiles_fit_every_arch(arch):
    a = CUDA_ARCH_MODELS[arch]
    for m, n in SHAPES:
        simt = simt_matmul_tiles(a, m, n, 1, 4)
        assert a.warp_schedulers_per_sm * WARP <= simt.threads <= a.max_threads_per_block
        assert simt.registers() <= register_budget(a, simt.threads)
        assert simt.smem_bytes(4) <= a.smem_budget(RESIDENT_BLOCKS) <= a.static_smem_per_block
        tc = tensor_core_tiles(a, m, n, 1)
        assert a.warp_schedulers_per_sm * WARP <= tc.threads <= a.max_threads_per_block
        assert tc.registers() <= register_budget(a, tc.threads)
        assert tc.staging_bytes() <= a.static_smem_per_block
        assert tc.smem_bytes() <= min(a.smem_per_block_optin, a.smem_per_sm // RESIDENT_BLOCKS)
        g = gemv_tiles(a, n, 1, 4)
        assert g.threads <= a.max_threads_per_block and n % g.block_n == 0 and g.vector * 4 <= 16


def test_tiles_follow_the_arch():
    """One kernel, three GPUs: the A10's 100 KB per SM holds two 64 x 64 tensor-core blocks, the A100's 164 KB two
    128 x 64 blocks, the H100's 228 KB two 128 x 64 blocks with a k step twice as deep."""
    tiles = {arch: tensor_core_tiles(CUDA_ARCH_MODELS[arch], 4096, 4096, 1) for arch in ("sm_80", "sm_86", "sm_90")}
    assert (tiles["sm_86"].block_m, tiles["sm_86"].block_n) == (64, 64)
    assert (tiles["sm_80"].block_m, tiles["sm_80"].block_n) == (128, 64)
    assert tiles["sm_90"].block_k == 2 * tiles["sm_80"].block_k
    # the figures are live inputs: less shared memory, a smaller tile; fewer SMs, fuller blocks for a small kernel
    a100 = CUDA_ARCH_MODELS["sm_80"]
    small_smem = dataclasses.replace(a100, smem_per_sm=64 * 1024, smem_per_block_optin=64 * 1024)
    assert tensor_core_tiles(small_smem, 4096, 4096, 1).smem_bytes() < tiles["sm_80"].smem_bytes()
    few_sms = dataclasses.replace(a100, sms=8)
    assert gemv_tiles(few_sms, 4096, 1, 4).block_n > gemv_tiles(a100, 4096, 1, 4).block_n


def test_cuda_rules_come_first_for_cuda_targets():
    names = [type(r).__name__ for r in rules_for(resolve("cuda:sm_90"))]
    assert names[:3] == ["CudaGemv", "CudaTensorCoreMatmul", "CudaMatmul"] and names[-1] == "Fallback"


# ---------------------------------------------------------------------------------------------------------------
# What each rule takes, and what it must leave

def test_rules_decline_what_is_not_theirs():
    gemv, matmul, tc = CudaGemv(), CudaMatmul(), CudaTensorCoreMatmul()
    assert schedule(gemv, kernel(MatmulBias)) is None, "a symbolic sequence of rows is no GEMV"
    assert schedule(gemv, gemv_transposed_weight()) is None, "a weight read along K is dlight's GEMV's"
    assert schedule(tc, kernel(MatmulBias)) is None, "float32 has no wmma path"
    assert schedule(tc, kernel(MatmulFp16SmallK)) is None, "K = 64 fills too little of a tile"
    assert schedule(tc, kernel(MatmulFp16)) is not None
    cpu = resolve("cpu").tvm_target()
    for rule in (gemv, matmul, tc):
        with cpu:
            assert rule.apply(kernel(GemvStatic), cpu, False) is None, f"{type(rule).__name__} fired on a CPU"


# ---------------------------------------------------------------------------------------------------------------
# Numerics of the SIMT kernels in the emulator

@needs_emulator
@pytest.mark.parametrize("n", [256, 200])  # 200: not a multiple of the block's 32 outputs (the tail predicate)
def test_gemv_matches_numpy(n):
    from cuda_emu import Emulated

    rule = CudaGemv()
    func = schedule(rule, kernel(GemvBias))
    assert rule.tiles.threads_k > 1, "the k split across threads (and its reduction) is what is under test"
    emulated = Emulated(func, "sm_80")
    rng = np.random.default_rng()
    for batch in (1, 3):
        x, w, b = rand(batch, 1, 96, rng=rng), rand(96, n, rng=rng), rand(n, rng=rng)
        out = np.zeros((batch, 1, n), np.float32)
        names = {p.name: p for p in func.params}
        arrays = dict(zip(names, (x, w, b, out)))
        got = emulated(arrays, {"batch": batch, "n": n}, order="random", seed=int(rng.integers(1 << 30)))
        want = (x.astype(np.float64) @ w + b).astype(np.float32)
        assert_close(got[list(names)[-1]], want, f"GEMV batch {batch}, n {n}")


@needs_emulator
def test_simt_matmul_matches_numpy():
    from cuda_emu import Emulated

    rule = CudaMatmul()
    func = schedule(rule, kernel(MatmulBias))
    emulated = Emulated(func, "sm_80")
    rng = np.random.default_rng()
    for seq in (1, 37):  # 37: not a multiple of the tile's rows
        x, w, b = rand(seq, 64, rng=rng), rand(64, 96, rng=rng), rand(96, rng=rng)
        names = [p.name for p in func.params]
        arrays = dict(zip(names, (x, w, b, np.zeros((seq, 96), np.float32))))
        got = emulated(arrays, {"seq": seq}, order="reverse")
        assert_close(got[names[-1]], x.astype(np.float64) @ w + b, f"matmul seq {seq}")


# ---------------------------------------------------------------------------------------------------------------
# The tensor-core matmul, built

@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_90"])
def test_tensor_core_matmul_builds_as_its_tiles_say(arch):
    from cuda_emu import lower_launch

    rule = CudaTensorCoreMatmul()
    func = schedule(rule, kernel(MatmulFp16), arch)
    tiles = rule.tiles
    executable = lc.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), arch)
    source = next(m for m in lc._walk(executable.mod) if m.kind == "cuda").inspect_source("")
    assert "nvcuda::wmma::mma_sync" in source
    assert f"__launch_bounds__({tiles.threads})" in source
    _, _, tags, values, _ = lower_launch(func, arch)
    launch = dict(zip(tags, values))
    assert int(launch["threadIdx.x"]) * int(launch["threadIdx.y"]) == tiles.threads
    dyn = int(launch["tirx.use_dyn_shared_memory"])
    a = CUDA_ARCH_MODELS[arch]
    assert 0 < dyn <= tiles.operand_bytes() and dyn + tiles.staging_bytes() <= a.smem_per_block_optin


@needs_nvcc
def test_fp16_llama_compiles_for_cuda_on_tensor_cores(tmp_path):
    """The zoo Llama exported in float16, through llmcc's pipeline for sm_80: every matmul on the tensor-core rule,
    with the tiles it chose in the report, and the whole module built."""
    import llmcc
    from helpers import export_fp16_llama

    compiled = llmcc.compile(export_fp16_llama(tmp_path / "llama16.onnx"), target="cuda:sm_80")
    matmuls = [k for k in compiled.report["kernels"] if "matmul" in k["name"]]
    assert matmuls and all(k["rule"] == "CudaTensorCoreMatmul" for k in matmuls)
    assert all(k["tiles"]["warps_m"] * k["tiles"]["warps_n"] >= 4 for k in matmuls)
    assert compiled.report["cuda_binary"]["sass_archs"] == ["sm_80"]
