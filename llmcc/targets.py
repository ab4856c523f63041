"""Target registry: the names users pass (``cpu``, ``cuda``, ``cuda:sm_90``...) and what they compile for.

A ``TargetSpec`` is a frozen description keyed by name; ``resolve`` turns a user's string into one, detecting the
host CPU's usable features or the local GPU's arch where the name leaves them open. ``TargetSpec.model()`` gives the
figures kernels take their tile sizes from: ``CudaArch`` (SM count, shared memory per SM and per block, L2; in
``CUDA_ARCH_MODELS`` here) or the CPU's ``CpuModel`` (vector width, cores, registers, L1; llmcc.schedules).
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
class CudaArch:
    """What CUDA kernels size their tiles from, per compute capability (NVIDIA's tuning guides; the SM count of
    the data-center part named in ``example``). Shared memory figures are bytes."""

    arch: str
    example: str
    sms: int
    smem_per_sm: int             # shared memory an SM holds for resident blocks
    smem_per_block_optin: int    # the most one block may use, opting in at launch
    l2_bytes: int
    registers_per_sm: int = 65536
    max_threads_per_block: int = 1024
    warp: int = 32
    static_smem_per_block: int = 48 * 1024  # __shared__ a kernel may declare without opting in
    warp_schedulers_per_sm: int = 4  # each issues one warp's instruction per cycle (sm_70 and later)

    def smem_budget(self, resident_blocks: int) -> int:
        """Static shared memory per block that keeps ``resident_blocks`` blocks on one SM (4 KB steps), at most
        the static limit."""
        return min(self.static_smem_per_block, self.smem_per_sm // resident_blocks // 4096 * 4096)


CUDA_ARCH_MODELS: dict[str, CudaArch] = {a.arch: a for a in (
    # sm_70 / sm_75: not compile targets, known so tuning records from them can be checked (llmcc.tuning)
    CudaArch("sm_70", "V100", sms=80, smem_per_sm=96 * 1024, smem_per_block_optin=96 * 1024, l2_bytes=6 << 20),
    CudaArch("sm_75", "T4", sms=40, smem_per_sm=64 * 1024, smem_per_block_optin=64 * 1024, l2_bytes=4 << 20),
    CudaArch("sm_80", "A100", sms=108, smem_per_sm=164 * 1024, smem_per_block_optin=163 * 1024, l2_bytes=40 << 20),
    CudaArch("sm_86", "A10", sms=72, smem_per_sm=100 * 1024, smem_per_block_optin=99 * 1024, l2_bytes=6 << 20),
    CudaArch("sm_87", "Jetson AGX Orin", sms=16, smem_per_sm=164 * 1024, smem_per_block_optin=163 * 1024,
             l2_bytes=4 << 20),
    CudaArch("sm_89", "L4", sms=58, smem_per_sm=100 * 1024, smem_per_block_optin=99 * 1024, l2_bytes=48 << 20),
    CudaArch("sm_90", "H100 SXM", sms=132, smem_per_sm=228 * 1024, smem_per_block_optin=227 * 1024,
             l2_bytes=50 << 20),
)}


def cuda_arch(arch: str) -> CudaArch:
    """The CudaArch of ``arch`` ("sm_80"); an unknown arch lists the known ones."""
    if arch not in CUDA_ARCH_MODELS:
        raise LlmccError(f"unknown CUDA arch '{arch}'; llmcc knows {', '.join(CUDA_ARCH_MODELS)}")
    return CUDA_ARCH_MODELS[arch]


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

    def model(self):
        """The figures kernels size their tiles from: a CudaArch, or the CPU's CpuModel (llmcc.schedules)."""
        if self.is_gpu:
            return cuda_arch(self.arch)
        from llmcc.schedules.cpu_model import CpuModel

        return CpuModel.get(self.tvm_target())

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
    """/proc/cpuinfo's flags, spelled as LLVM's features: the kernel writes avx512_vnni, avx512_bf16, avx512_vbmi2...
    where LLVM (and _AVX512_FLAGS) have avx512vnni; read as they are, a CPU that has them got them switched off."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return {flag.replace("avx512_", "avx512") for flag in line.split(":", 1)[1].split()}
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
