"""The CUDA flash-attention kernel (llmcc/kernels/flash_attention_cuda.py) without a GPU.

- every spec builds for sm_80 and sm_90 into a library holding that arch's SASS (llmcc.cuda.cuda_binary_info);
- its signature is the CPU kernel's, its shared memory fits 48 KB (32 KB on sm_86 / sm_89) and no buffer depends on
  Sq or Skv (all allocations have constant shapes);
- numerics: TVM's CUDA source for the kernel runs in the CPU emulator of cuda_emu.py (one fiber per CUDA thread,
  barriers and warp shuffles emulated) and is compared with attention_reference, including Sq > Skv (rows with no
  visible key give 0) and the three thread orders the emulator offers (a missing barrier shows as a difference).

Tolerances are the GPU check's (tools/gpu_check_attention.py): 2e-5 for float32, 2e-2 for float16, 3e-2 for bfloat16.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import llmcc.cuda as lc

lc.prepare_driver()

import tvm
import tvm_ffi

from llmcc.kernels import flash_attention_cuda as fac
from llmcc.kernels.flash_attention import AttentionSpec as S
from llmcc.kernels.flash_attention import flash_attention_cpu

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check_attention as gca

pytestmark = pytest.mark.cuda_build

HAS_NVCC = bool(shutil.which("nvcc") or os.access("/usr/local/cuda/bin/nvcc", os.X_OK) or os.environ.get("CUDA_HOME"))
HAS_CXX = bool(os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++"))
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="needs nvcc (CUDA toolkit)")
needs_emulator = pytest.mark.skipif(not (HAS_NVCC and HAS_CXX), reason="the CUDA emulator needs nvcc and g++")

SPECS = {
    "dense_f32": S(8, 8, 64, 64, 0.125),
    "causal_bias_bnds": S(8, 8, 64, 64, 0.125, causal=True, bias=(False, True, False), k_layout="bnds",
                          out_layout="bsnd"),
    "gqa_8_2": S(8, 2, 64, 64, 0.125),
    "window_16": S(8, 8, 64, 64, 0.125, causal=True, window=16),
    "decode": S(8, 2, 64, 64, 0.125, causal=True, q_len=1),
    "fp16_causal": S(8, 8, 64, 64, 0.125, causal=True, dtype="float16"),
    "d32": S(4, 4, 32, 32, 0.177),
    "d128": S(4, 4, 128, 128, 0.0884, causal=True),
}
ARCHS = ("sm_80", "sm_90")
BUILDS = [(name, arch) for name in SPECS for arch in ARCHS]
TOL = {"float32": 2e-5, "float16": 2e-2, "bfloat16": 3e-2}

# Small specs for the emulator (the kernel's code paths, not the sizes): (spec, (Sq, Skv) cases)
PREFILL_SIZES = ((1, 1), (37, 37), (1, 70), (20, 45), (45, 20), (70, 70))
EMULATED = {
    "dense_f32": (SPECS["dense_f32"], PREFILL_SIZES),
    "causal_bias_bnds": (SPECS["causal_bias_bnds"], PREFILL_SIZES),
    "gqa_window_bsnd": (S(6, 2, 32, 16, 0.2, causal=True, window=16, q_layout="bsnd", k_layout="bsnd",
                          v_layout="bsnd", out_layout="bsnd"), PREFILL_SIZES),
    "fp16_d128_causal": (S(2, 2, 128, 128, 0.0884, causal=True, dtype="float16"), PREFILL_SIZES),
    "bf16_bias_b1h_q1": (S(4, 2, 64, 64, 0.125, dtype="bfloat16", bias=(True, False, True)), PREFILL_SIZES),
    "fp32_d128_odd_dv": (S(2, 1, 128, 24, 0.0884, causal=True, k_layout="bnds"), ((37, 37), (45, 20))),
    "decode": (SPECS["decode"], ((1, 1), (1, 70), (1, 300))),
    "decode_f16_d128_bnds": (S(8, 2, 128, 128, 0.0884, causal=True, q_len=1, dtype="float16", k_layout="bnds"),
                             ((1, 1), (1, 70))),
    "decode4_window_bias": (S(4, 2, 64, 64, 0.125, causal=True, window=7, q_len=4, bias=(False, False, False)),
                            ((4, 4), (4, 37), (4, 70))),
    # Longformer: a band of 5 keys each side, Skv - Sq global keys in front (0, 3, 40), a per-key bias
    "band_global_keys_bsnd": (S(4, 4, 32, 32, 0.177, band=5, global_keys=True, bias=(False, True, True),
                                q_layout="bsnd", k_layout="bsnd", v_layout="bsnd", out_layout="bsnd"),
                              ((1, 1), (37, 40), (70, 70), (20, 60))),
    "band_bnds": (S(2, 2, 64, 64, 0.125, band=12, k_layout="bnds"), ((37, 37), (70, 70))),
}


def build_module(spec, arch):
    return lc.build(tvm.IRModule({"main": fac.flash_attention_cuda(spec, arch).with_attr("global_symbol", "main")}),
                    arch)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build each (spec, arch) once: {"path", "executable"}."""
    out = tmp_path_factory.mktemp("fa-cuda")
    cache: dict = {}

    def get(name: str, arch: str) -> dict:
        if (name, arch) not in cache:
            executable = build_module(SPECS[name], arch)
            path = out / f"{name}_{arch}.so"
            executable.export_library(str(path))
            cache[name, arch] = {"path": path, "executable": executable}
        return cache[name, arch]

    return get


def allocations(func) -> list:
    found = []

    def visit(node):
        found.append(node.buffer)

    tvm_ffi.structural_walk(func.body, (tvm.tirx.AllocBuffer, visit))  # 0.27 has no tirx.stmt_functor
    return found


def nbytes(buf) -> int:
    return int(np.prod([int(d) for d in buf.shape])) * tvm.DataType(buf.dtype).bits // 8


# ------------------------------------------------------------------------------------------------------------------
# Builds


@needs_nvcc
@pytest.mark.parametrize("name,arch", BUILDS, ids=[f"{n}-{a}" for n, a in BUILDS])
def test_build_holds_sass(built, name, arch):
    info = lc.cuda_binary_info(built(name, arch)["path"])
    assert info["has_fatbin"] and not info["source_only"] and info["format"] == "fatbin"
    assert info["sass_archs"] == [arch] and info["ptx_archs"] == [f"compute_{arch[3:]}"]
    assert info["kernels"] == 1
    assert info["sass_kernels"] == {arch: sorted(info["kernel_names"])}


@pytest.mark.parametrize("name", SPECS)
def test_signature_and_attrs_match_the_cpu_kernel(name):
    spec = SPECS[name]
    cpu, gpu = flash_attention_cpu(spec), fac.flash_attention_cuda(spec, "sm_80")

    def header(f):
        return next(line for line in f.script().splitlines() if line.startswith("def "))

    assert header(gpu) == header(cpu)
    assert [p.name for p in gpu.params] == [p.name for p in cpu.params]
    assert bool(gpu.attrs["tirx.is_scheduled"]) and bool(gpu.attrs["tirx.noalias"])
    threads = gpu.script().count('thread="')
    assert threads == 3  # blockIdx.x, threadIdx.y, threadIdx.x: nothing is left for a scheduler


ALL_ARCHS = fac.ARCHS


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_shared_memory_fits_and_no_buffer_grows_with_sequence(name, arch):
    spec = SPECS[name]
    func = fac.flash_attention_cuda(spec, arch)
    bufs = allocations(func)
    assert bufs
    for buf in bufs:
        # every allocation has a constant shape: nothing depends on Sq, Skv (let alone Sq * Skv) or the batch
        assert all(isinstance(d, tvm.tirx.IntImm) for d in buf.shape), (buf.name, buf.shape)
        assert buf.scope() in ("shared", "local"), (buf.name, buf.scope())
    shared = sum(nbytes(b) for b in bufs if b.scope() == "shared")
    limit = fac.smem_budget(arch)
    assert shared <= limit <= 48 * 1024
    assert shared == fac.shared_memory_bytes(spec, fac.cuda_tiles(spec, arch))
    assert tvm.s_tir.analysis.calculate_allocated_bytes(func)["main"]["shared"] == shared
    # registers: the largest per-thread array is a few dozen floats
    assert max(nbytes(b) for b in bufs if b.scope() == "local") <= 64 * 4


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_tile_configs_fit_for_every_head_dim(dtype, arch):
    limit = fac.smem_budget(arch)
    for d, dv in [(16, 16), (32, 32), (40, 40), (64, 64), (80, 80), (96, 96), (128, 128), (128, 64), (160, 160),
                  (192, 128), (256, 256)]:
        for q_len in (None, 1, 4, 8, 9):
            spec = S(8, 2, d, dv, 0.1, dtype=dtype, q_len=q_len)
            t = fac.cuda_tiles(spec, arch)
            assert fac.shared_memory_bytes(spec, t) <= limit, (spec, t)
            assert t.threads % 32 == 0 and 32 <= t.threads <= 1024, t
            if q_len is not None and q_len <= fac.DECODE_MAX_ROWS:
                assert t.mode == "decode" and t.tq == q_len and t.warps * t.rk == t.tk and 32 % t.rk == 0
            else:
                assert t.mode == "prefill" and t.ny * t.rq == t.tq and t.tx * t.rk == t.tk and 32 % t.tx == 0
            assert t.why


def test_rejects_bad_specs_and_tiles():
    with pytest.raises(ValueError, match="not a multiple"):
        fac.flash_attention_cuda(S(6, 4, 64, 64, 0.1), "sm_80")
    with pytest.raises(ValueError, match="unsupported CUDA architecture"):
        fac.cuda_tiles(S(8, 8, 64, 64, 0.1), "sm_75")
    spec = S(8, 8, 128, 128, 0.1)
    with pytest.raises(ValueError, match="shared memory"):
        fac.flash_attention_cuda(spec, "sm_80", fac.CudaTiles("prefill", 128, 64, 256, 4, 2))


# ------------------------------------------------------------------------------------------------------------------
# Numerics in the CPU emulator


def check_emulated(kernel, spec, sq, skv, order="forward", seed=0, msg=""):
    data = gca.make_inputs(spec, sq, skv, batch=2, seed=seed)
    out = kernel(data["arrays"], data["sizes"], order=order, seed=seed)["O"]
    assert out.shape == data["arrays"]["O"].shape
    err = gca.max_error(spec, out, data["arrays"])
    assert err <= TOL[spec.dtype], f"{msg} {spec} Sq={sq} Skv={skv} order={order}: max abs error {err:.3g}"
    return err


@pytest.fixture(scope="module")
def emulated(built):
    from cuda_emu import Emulated

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            spec = EMULATED[name][0]
            executable = built(name, "sm_80")["executable"] if name in SPECS else None
            cache[name] = Emulated(fac.flash_attention_cuda(spec, "sm_80"), "sm_80", executable=executable)
        return cache[name]

    return get


@needs_emulator
@pytest.mark.parametrize("name", EMULATED)
def test_emulated_matches_reference(emulated, name):
    spec, sizes = EMULATED[name]
    kernel = emulated(name)
    for sq, skv in sizes:
        check_emulated(kernel, spec, sq, skv, msg=name)


@needs_emulator
@pytest.mark.parametrize("name", ["causal_bias_bnds", "decode4_window_bias"])
def test_emulated_result_does_not_depend_on_thread_order(emulated, name):
    spec, sizes = EMULATED[name]
    kernel = emulated(name)
    sq, skv = sizes[-1]
    data = gca.make_inputs(spec, sq, skv)
    outs = [kernel(data["arrays"], data["sizes"], order=o, seed=3)["O"] for o in ("forward", "reverse", "random")]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


@needs_emulator
def test_emulated_fully_masked_rows_are_zero(emulated):
    """Rows whose bias hides every key are exactly 0 (not NaN); with more queries than keys (Sq > Skv) causality
    hides nothing itself (no positions to align), so the other rows match the reference."""
    spec = EMULATED["causal_bias_bnds"][0]
    data = gca.make_inputs(spec, 45, 20)
    data["arrays"]["Bias"][:, :, :5, :] = -np.inf  # query rows 0-4 see no key
    out = emulated("causal_bias_bnds")(data["arrays"], data["sizes"])["O"]  # out layout bsnd
    assert np.all(out[:, :5] == 0) and np.isfinite(out).all()
    np.testing.assert_allclose(out, gca.reference(spec, data["arrays"]), rtol=2e-5, atol=2e-5)


@needs_emulator
@pytest.mark.parametrize("name", ["causal_bias_bnds", "decode"])
def test_emulated_empty_sequences(emulated, name):
    """Sq = 0 launches one idle block (CUDA refuses an empty grid); Skv = 0 leaves every row without keys: 0."""
    spec = EMULATED[name][0]
    kernel = emulated(name)
    if spec.q_len is None:
        data = gca.make_inputs(spec, 0, 5)
        assert kernel(data["arrays"], data["sizes"])["O"].size == 0
    data = gca.make_inputs(spec, spec.q_len or 3, 0)
    out = kernel(data["arrays"], data["sizes"])["O"]
    assert out.size and np.all(out == 0)


@needs_emulator
@pytest.mark.parametrize("trial", range(2))
def test_emulated_random_spec(trial, seed):
    from cuda_emu import Emulated

    rng = random.Random(seed * 7 + trial)
    kv = rng.choice([1, 2, 4])
    d = rng.choice([16, 32, 48, 64])
    causal = rng.random() < 0.6
    spec = S(kv * rng.choice([1, 2, 3]), kv, d, rng.choice([d, 16, 40]), rng.uniform(0.05, 0.3),
             dtype=rng.choice(["float32", "float16", "bfloat16"]), causal=causal,
             window=rng.choice([None, 1, 5, 33]) if causal else None,
             bias=tuple(rng.random() < 0.5 for _ in range(3)) if rng.random() < 0.5 else None,
             q_layout=rng.choice(["bnsd", "bsnd"]), k_layout=rng.choice(["bnsd", "bsnd", "bnds"]),
             v_layout=rng.choice(["bnsd", "bsnd"]), out_layout=rng.choice(["bnsd", "bsnd"]),
             q_len=rng.choice([None, None, 1, 3]))
    arch = rng.choice(["sm_80", "sm_86", "sm_90"])
    kernel = Emulated(fac.flash_attention_cuda(spec, arch), arch)
    sq = spec.q_len or rng.randint(1, 90)
    for skv in (rng.randint(1, 90), sq):
        check_emulated(kernel, spec, sq, skv, order=rng.choice(["forward", "reverse", "random"]), seed=seed,
                       msg=f"seed {seed} trial {trial} (LLMCC_TEST_SEED={seed} replays) arch {arch}:")


@needs_emulator
def test_gpu_check_attention_tool_runs_emulated(tmp_path, capsys):
    rc = gca.main(["--emulate", "--specs", "decode", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().out[-2000:]
    table = (tmp_path / "gpu_check_attention.md").read_text()
    assert "| decode | causal | float32 |" in table and "True" in table
