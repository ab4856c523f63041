"""Every zoo model compiles for the CPU and matches onnxruntime at its sequence lengths; every zoo model
cross-compiles for sm_80 (llama and mistral for sm_90 too) with the CUDA binary inside the artifact."""

import numpy as np
import onnxruntime as ort
import pytest

import llmcc
from llmcc import cuda, zoo
from llmcc.errors import DeviceUnavailable
from llmcc.verify import relative_error

FP32_RTOL = 1e-5  # relative (Frobenius) error vs onnxruntime


@pytest.fixture(scope="module", params=list(zoo.ZOO))
def compiled(request):
    name = request.param
    return name, llmcc.compile(zoo.onnx_path(name), target="cpu")


def test_compile_verifies_at_three_sizes(compiled):
    name, module = compiled
    v = module.report["verify"]
    assert v["passed"] and v["rel_err"] <= FP32_RTOL
    if zoo.get(name).dynamic_dims:
        assert len({tuple(sorted(c.items())) for c in v["cases"]}) == 3


def test_matches_onnxruntime_at_zoo_lengths(compiled):
    name, module = compiled
    entry = zoo.get(name)
    session = ort.InferenceSession(str(zoo.onnx_path(name)), providers=["CPUExecutionProvider"])
    batches = (1, 2) if "batch" in entry.dynamic_dims else (1,)
    assert len(entry.seq_lens) >= (3 if entry.dynamic_dims else 1)
    seed = int(np.random.default_rng().integers(1 << 31))
    for seq in entry.seq_lens:
        for batch in batches:
            feed = zoo.sample_inputs(name, seq_len=seq, batch=batch, seed=seed)
            ref = session.run(None, feed)
            got = module.run(**feed)
            for spec, r in zip(module.outputs, ref):
                assert got[spec.name].shape == r.shape
                err = relative_error(got[spec.name], r)
                assert err <= FP32_RTOL, f"{name} {spec.name} seq={seq} batch={batch}: rel err {err:.2e}"


def test_symbolic_dims_survive_import(compiled):
    name, module = compiled
    entry = zoo.get(name)
    symbolic = {d for spec in module.inputs for d in spec.shape if isinstance(d, str)}
    assert symbolic == set(entry.dynamic_dims)


# every model for sm_80; for sm_90 the two that cover its kernels (tensor-core matmuls, flash and Triton attention):
# one cross-compile is 10-35 s of CI time
CUDA_BUILDS = [(name, "sm_80") for name in zoo.ZOO] + [("llama", "sm_90"), ("mistral", "sm_90")]


@pytest.mark.parametrize("name,arch", CUDA_BUILDS, ids=[f"{n}-{a}" for n, a in CUDA_BUILDS])
def test_cuda_cross_compile_carries_the_binary(name, arch, tmp_path):
    module = llmcc.compile(zoo.onnx_path(name), target=f"cuda:{arch}")
    art = module.save(tmp_path / "m.llmcc")
    info = cuda.cuda_binary_info(art / "model.so")
    assert info["has_fatbin"] and not info["source_only"]
    assert info["sass_archs"] == [arch] and info["ptx_archs"] == [arch.replace("sm_", "compute_")]
    assert info["kernels"] >= 5
    assert module.report["verify"]["passed"] is None or module.report["verify"]["passed"] is True
    fused = [s for s in module.report["attention"] if s["fused"]]
    # causal sliding-window sites run the embedded Triton kernel (tests/kernels/test_triton_embed.py), the rest
    # llmcc's TIR one; Longformer's two-sided band with global keys says why not Triton
    band = "sliding_window+global"
    assert all(s["kernel"] == ("triton" if s["kind"].startswith("sliding_window") and s["kind"] != band
                               else "flash_attention_cuda") for s in fused)
    assert all("not triton" in s["reason"] for s in fused if s["kind"] == band)
    # every zoo model's attention is one flash kernel per spec, in the binary
    assert fused and any(k.startswith(("flash_attention", "llmcc_triton_")) for k in info["kernel_names"]), \
        info["kernel_names"]
    if cuda.gpu_arch() is None:
        with pytest.raises(DeviceUnavailable, match=f"compiled for cuda:{arch}, and this machine has no usable"):
            llmcc.load(art)
