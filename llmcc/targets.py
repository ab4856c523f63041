"""Target registry: the names users pass (``cpu``, ``cuda``, ``cuda:sm_90``...) and what they compile for.

A ``TargetSpec`` is a frozen description keyed by name; ``resolve`` turns a user's string into one, detecting the
host CPU's usable features or the local GPU's arch where the name leaves them open.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from llmcc.errors import LlmccError

CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
DEFAULT_CUDA_ARCH = "sm_80"

# AVX-512 subfeatures LLVM would enable for a CPU model; dropped when the OS does not expose them (a VM can hide
# AVX-512 from a Zen 4: LLVM still reports "znver4" and its code then dies with SIGILL).
_AVX512_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512vnni", "avx512bf16",
                 "avx512ifma", "avx512vbmi", "avx512vbmi2", "avx512bitalg", "avx512vpopcntdq", "avx512fp16")


@dataclass(frozen=True)
class TargetSpec:
    """What one registry name compiles for."""

    name: str
    kind: str                               # "llvm" or "cuda"
    arch: str | None = None                 # "sm_90" for CUDA
    mcpu: str | None = None                 # LLVM CPU model for "llvm"
    mattr: tuple[str, ...] = ()             # LLVM feature switches, "+avx2" / "-avx512f"
    features: tuple[str, ...] = field(default=(), compare=False)  # host SIMD features, for the report
    description: str = ""

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    def tvm_target(self):
        import tvm

        if self.kind == "cuda":
            return tvm.target.Target({"kind": "cuda", "arch": self.arch})
        config = {"kind": "llvm"}
        if self.mcpu:
            config["mcpu"] = self.mcpu
        if self.mattr:
            config["mattr"] = list(self.mattr)
        return tvm.target.Target(config)

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "arch": self.arch, "mcpu": self.mcpu,
                "mattr": list(self.mattr), "features": list(self.features)}


TARGETS: dict[str, str] = {
    "cpu": "LLVM for this machine's CPU, with the SIMD features its OS enables",
    "cuda": f"NVIDIA GPU: the local GPU's arch if one is present, else {DEFAULT_CUDA_ARCH}",
    **{f"cuda:{arch}": f"NVIDIA GPU, compute capability {arch[3]}.{arch[4]}" for arch in CUDA_ARCHS},
}


def resolve(name: str) -> TargetSpec:
    """The TargetSpec for a registry name; unknown names list the valid ones."""
    if name not in TARGETS:
        raise LlmccError(f"unknown target '{name}'; choose one of: {', '.join(TARGETS)}")
    if name == "cpu":
        return host_cpu()
    if name == "cuda":
        from llmcc import cuda

        arch = cuda.gpu_arch() or DEFAULT_CUDA_ARCH
        if arch not in CUDA_ARCHS:
            raise LlmccError(f"the local GPU is {arch}; llmcc targets {', '.join(CUDA_ARCHS)}: pass --target cuda:ARCH")
        return TargetSpec(f"cuda:{arch}", "cuda", arch=arch, description=TARGETS["cuda"])
    arch = name.split(":", 1)[1]
    return TargetSpec(name, "cuda", arch=arch, description=TARGETS[name])


def _os_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def host_cpu() -> TargetSpec:
    """The host CPU: LLVM's CPU model, minus the features the OS does not enable."""
    from tvm.target import codegen

    mcpu = str(codegen.llvm_get_system_cpu())
    flags = _os_cpu_flags()
    mattr: tuple[str, ...] = ()
    if flags and "avx512f" not in flags:
        mattr = ("-avx512f",)  # LLVM drops every AVX-512 subfeature with it
    elif flags:
        mattr = tuple(f"-{f}" for f in _AVX512_FLAGS if f not in flags)
    features = tuple(f for f in ("sse4_2", "avx", "avx2", "fma") + _AVX512_FLAGS if f in flags)
    return TargetSpec("cpu", "llvm", mcpu=mcpu, mattr=mattr, features=features, description=TARGETS["cpu"])


def from_json(d: dict) -> TargetSpec:
    return TargetSpec(d["name"], d["kind"], arch=d.get("arch"), mcpu=d.get("mcpu"),
                      mattr=tuple(d.get("mattr", ())), features=tuple(d.get("features", ())))
