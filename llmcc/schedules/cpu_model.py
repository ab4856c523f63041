"""CpuModel: the small analytic description of a CPU target that every CPU schedule rule takes its sizes from.

Nothing else in llmcc.schedules hard-codes a tile size: the rules ask ``CpuModel.get(target)`` for the vector lanes
(from the features the target really enables: AVX-512 only when its mattr does not switch ``avx512f`` off, since an
OS can hide AVX-512 from a CPU that LLVM still calls znver4), the core count, and the register tile derived from them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def _target_attrs(target) -> tuple[str, str]:
    """(mcpu, mattr string) of a tvm Target, or of a plain string/None."""
    if target is None:
        return "", ""
    attrs = getattr(target, "attrs", None)
    if attrs is None:
        return "", ""
    mcpu = str(attrs.get("mcpu", "") or "")
    mattr = attrs.get("mattr", None)
    mattr = ",".join(str(a) for a in mattr) if mattr is not None else ""
    return mcpu, mattr


# CPU models LLVM would give AVX-512 by default (unless mattr turns avx512f off).
_AVX512_CPUS = ("znver4", "znver5", "skylake-avx512", "cascadelake", "cooperlake", "icelake", "tigerlake",
                "sapphirerapids", "rocketlake", "alderlake-avx512", "graniterapids", "emeraldrapids")
# ... and AVX512-VNNI (vpdpbusd) among them (Skylake-AVX512 has AVX-512 without it)
_VNNI_CPUS = ("znver4", "znver5", "cascadelake", "cooperlake", "icelake", "icelake-server", "icelake-client",
              "tigerlake", "sapphirerapids", "rocketlake", "graniterapids", "emeraldrapids")
_AVX2_CPUS = ("haswell", "broadwell", "skylake", "znver1", "znver2", "znver3", "alderlake", "raptorlake",
              "meteorlake", "core-avx2", "x86-64-v3")


@dataclass(frozen=True)
class CpuModel:
    """What the CPU rules need to know about a target, all derived here."""

    vector_bits: int        # usable SIMD register width
    cores: int              # threads the runtime will run parallel loops on
    vector_registers: int   # architectural SIMD registers (16 for AVX2, 32 for AVX-512)
    l1_bytes: int = 32 * 1024
    # Below these a kernel stays serial. A parallel launch costs microseconds, and tens when the workers have gone to
    # sleep, as they do in a decode step of mostly serial kernels (llama-decode: 0.26 ms with these, 0.30-0.45 with
    # 16K elements; prefill at seq 128 within noise either way)
    parallel_min_elems: int = 1 << 16  # output elements of an injective kernel (copies, elementwise)
    parallel_min_work: int = 1 << 16   # output elements x reduction length of a matmul or reduction
    max_tile_rows: int = 8             # rows of the matmul register tile at most
    gemv_k_unroll: int = 8             # k steps a GEMV accumulates in registers (= int4 nibbles per packed word)
    gemv_accumulators: int = 4         # independent accumulator vectors per GEMV k step: FMA latency / throughput
    # Packed weight panels (passes/pack_matmul_weights.py): a matmul's k step reads one 64-byte line of its panel.
    # Fixed in bytes, not per vector width, so packed kernels (and tuning records, llmcc.tuning) are the same on
    # every x86 CPU
    matmul_panel_bytes: int = 64
    # 256-bit integer SIMD (AVX2): vpmaddwd, which the w8a8 GEMV kernel is built on (llmcc.kernels.w8a8_matmul)
    int16_madd: bool = False
    # AVX512-VNNI with 256-bit forms: vpdpbusd, u8 x s8 quads summed into int32 (the w8a8 GEMM's VNNI kernel)
    int8_dot: bool = False

    def lanes(self, dtype_bits: int = 32) -> int:
        return max(self.vector_bits // dtype_bits, 1)

    def matmul_tile(self, n_vectors: int | None = None, gemv: bool = False) -> tuple[int, int]:
        """(rows MR, vectors per row NV) of the register-resident MR x NV*lanes accumulator tile of a matmul.

        The MR*NV accumulators, the NV vectors of B loaded per k step and one broadcast of A must fit the register
        file (16 for AVX2: 6 x 2 as in BLIS's Haswell kernel; 32 for AVX-512). NV divides the N extent in vectors
        when it is static (``n_vectors``), so full tiles need no predicate; a GEMV (M = 1) keeps enough N tiles
        to give every core one.
        """
        regs = self.vector_registers
        if n_vectors is not None and n_vectors > 0:
            divisors = [v for v in range(1, min(n_vectors, regs) + 1) if n_vectors % v == 0]
        else:
            divisors = [v for v in (1, 2, 4) if v * 2 + v + 1 <= regs] if n_vectors is None else [1]
        if gemv:
            good = [v for v in divisors if n_vectors is None or n_vectors // v >= self.cores]
            return 1, max(v for v in (good or [1]) if v <= 4)
        best = (0, 0, 0)
        for nv in divisors:
            mr = self.matmul_tile_rows(nv)
            if mr >= 1 and (mr * nv, mr) > best[:2]:
                best = (mr * nv, mr, nv)
        return (best[1], best[2]) if best[0] else (1, 1)

    def matmul_tile_rows(self, n_vectors: int) -> int:
        """Rows MR of a register tile NV vectors wide: MR*NV accumulators + NV loads of B + one broadcast of A fit
        the register file (0: NV is too wide)."""
        return min((self.vector_registers - 1 - n_vectors) // n_vectors, self.max_tile_rows)

    def gemv_chunk(self, n_vectors: int, other_tasks: int = 1) -> int | None:
        """Vectors of N per thread of a GEMV (M = 1) that streams whole weight rows: the largest divisor of N's
        vector count whose accumulator (``chunk`` vectors) fits half of L1 and that, with ``other_tasks`` parallel
        tasks from other axes, still gives every core a chunk. None when N is too narrow to split."""
        cap = self.l1_bytes // 2 // (self.vector_bits // 8)
        best = None
        for v in range(1, min(n_vectors, cap) + 1):
            if n_vectors % v == 0 and n_vectors // v * other_tasks >= self.cores:
                best = v
        return best

    @staticmethod
    def get(target=None) -> "CpuModel":
        mcpu, mattr = _target_attrs(target)
        flags = [f.strip() for f in mattr.split(",") if f.strip()]
        if "+avx512f" in flags:
            bits = 512
        elif "-avx512f" in flags:
            bits = 256
        elif mcpu in _AVX512_CPUS:
            bits = 512
        elif mcpu in _AVX2_CPUS or "+avx2" in flags or "+avx" in flags:
            bits = 256
        else:
            bits = 128  # generic x86-64 / unknown: SSE2
        cores = os.cpu_count() or 1
        try:
            cores = len(os.sched_getaffinity(0)) or cores
        except (AttributeError, OSError):
            pass
        avx2 = bits >= 512 or mcpu in _AVX2_CPUS + _AVX512_CPUS or "+avx2" in flags
        vnni = bits >= 512 and "-avx512vnni" not in flags and ("+avx512vnni" in flags or mcpu in _VNNI_CPUS)
        return CpuModel(vector_bits=bits, cores=max(cores, 1), vector_registers=32 if bits >= 512 else 16,
                        int16_madd=avx2, int8_dot=vnni)
