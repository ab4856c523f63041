"""The target registry."""

import pytest

from llmcc import targets
from llmcc.errors import LlmccError


def test_registry_names():
    assert list(targets.TARGETS) == ["cpu", "cuda", "cuda:sm_80", "cuda:sm_86", "cuda:sm_89", "cuda:sm_90"]


@pytest.mark.parametrize("name,arch", [("cuda:sm_80", "sm_80"), ("cuda:sm_90", "sm_90"), ("cuda:sm_86", "sm_86")])
def test_cuda_names_pin_the_arch(name, arch):
    spec = targets.resolve(name)
    assert spec.kind == "cuda" and spec.arch == arch and spec.tvm_target().attrs["arch"] == arch


def test_plain_cuda_defaults_to_sm_80_without_a_gpu():
    from llmcc import cuda

    if cuda.gpu_arch() is not None:
        pytest.skip("a GPU is present")
    assert targets.resolve("cuda").arch == "sm_80"


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(LlmccError, match=r"unknown target 'cuda:sm_75'; choose one of: cpu, cuda, cuda:sm_80"):
        targets.resolve("cuda:sm_75")


def test_cpu_drops_features_the_os_does_not_enable(monkeypatch):
    targets.host_cpu.cache_clear()
    monkeypatch.setattr(targets, "_os_cpu_flags", lambda: {"sse4_2", "avx", "avx2", "fma"})
    try:
        spec = targets.resolve("cpu")
        assert spec.mattr == ("-avx512f",) and "avx2" in spec.features
        monkeypatch.setattr(targets, "_os_cpu_flags", lambda: {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                                                               "avx512cd", "avx512vnni"})
        targets.host_cpu.cache_clear()
        spec = targets.resolve("cpu")
        assert "-avx512f" not in spec.mattr and "-avx512bf16" in spec.mattr and "avx512vnni" in spec.features
    finally:
        targets.host_cpu.cache_clear()
