"""Schedule rules: dlight-style rules that turn each lowered PrimFunc into a scheduled one.

A rule gets a PrimFunc and a target and returns a schedule or None; rules are tried in order, a fallback last.
``rules_for`` is the one place the pipeline asks which rules apply to a target.

CUDA: llmcc's GEMV, tensor-core and SIMT matmul rules in ``llmcc.schedules.cuda``, sized by
``llmcc.schedules.cuda_tiles`` from the target's ``CudaArch``; then TVM's dlight rules for a GEMV read along K,
reductions and the injective fallback. CPU (llvm): llmcc's own rules in ``llmcc.schedules.cpu`` (register-tiled
matmul/GEMV, row-parallel reductions, parallel+vectorized fallback), sized by ``llmcc.schedules.cpu_model.CpuModel``.
A rule that sized a kernel says how in its ``tiles`` attribute (the report's "kernels" entries carry it).
"""

from __future__ import annotations

from llmcc.targets import TargetSpec


def is_batch_size(expr) -> bool:
    """Whether a symbolic extent is a batch size (every var in it named "batch..."): the rules size such a dim for
    one row, and a w8a8 GEMV (passes/quantize_weights.py) runs one row per batch element."""
    from tvm import tirx

    names = [v.name.lower() for v in tirx.analysis.undefined_vars(expr)]
    return bool(names) and all("batch" in name for name in names)


def rules_for(target: TargetSpec) -> list:
    from tvm.s_tir import dlight as dl

    if target.is_gpu:
        from llmcc.schedules.cuda import CudaGemv, CudaMatmul, CudaTensorCoreMatmul

        return [CudaGemv(), CudaTensorCoreMatmul(), CudaMatmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    from llmcc.schedules.cpu import CpuFallback, CpuMatmul, CpuReduction

    return [CpuMatmul(), CpuReduction(), CpuFallback()]
