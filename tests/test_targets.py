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
        assert "-avx512vnni" not in spec.mattr
    finally:
        targets.host_cpu.cache_clear()


def test_cpu_flags_are_read_in_llvm_spelling(monkeypatch, tmp_path):
    """The kernel's /proc/cpuinfo writes avx512_vnni (Zen 4, Ice Lake): read as avx512vnni, so it stays enabled."""
    import builtins

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni "
                       "avx512_bf16 avx512vl\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path,
                                                                          *a, **k))
    flags = targets._os_cpu_flags()
    assert {"avx512vnni", "avx512bf16", "avx512f", "avx2"} <= flags and "avx512_vnni" not in flags
    targets.host_cpu.cache_clear()
    try:
        monkeypatch.setattr(targets, "_os_cpu_flags", lambda: flags)
        spec = targets.resolve("cpu")
        assert "-avx512vnni" not in spec.mattr and "-avx512bf16" not in spec.mattr and "-avx512dq" in spec.mattr
    finally:
        targets.host_cpu.cache_clear()


def test_every_cuda_arch_has_its_figures():
    from llmcc.kernels.flash_attention_cuda import ARCHS

    for arch in set(targets.CUDA_ARCHS) | set(ARCHS):
        m = targets.cuda_arch(arch)
        assert m.sms > 0 and m.smem_per_block_optin <= m.smem_per_sm and m.static_smem_per_block == 48 * 1024
    for arch in targets.CUDA_ARCHS:
        assert targets.resolve(f"cuda:{arch}").model() == targets.cuda_arch(arch)
    # three resident blocks: 48 KB where an SM holds 164 KB or more, 32 KB on the 100 KB parts
    assert targets.cuda_arch("sm_80").smem_budget(3) == 48 * 1024
    assert targets.cuda_arch("sm_90").smem_budget(3) == 48 * 1024
    assert targets.cuda_arch("sm_86").smem_budget(3) == targets.cuda_arch("sm_89").smem_budget(3) == 32 * 1024
    with pytest.raises(LlmccError, match="unknown CUDA arch 'sm_61'"):
        targets.cuda_arch("sm_61")


def test_cpu_target_model_is_the_schedules_cpu_model():
    from llmcc.schedules.cpu_model import CpuModel

    cpu = targets.resolve("cpu")
    assert cpu.model() == CpuModel.get(cpu.tvm_target())
