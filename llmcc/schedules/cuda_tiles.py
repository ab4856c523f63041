"""Tile sizes of llmcc's CUDA rules, derived from the target's CudaArch (llmcc.targets) and the kernel's sizes.

Nothing in llmcc.schedules.cuda hard-codes a tile: every size comes from here, and every choice here from a figure
the arch states or from the kernel's own extents:
- threads: a block has at least one warp per warp scheduler of an SM, at most the block limit;
- registers: a thread's accumulators and operands fit ``registers_per_sm / (threads per block * RESIDENT_BLOCKS)``
  (and the ISA's 255 per thread), so that many blocks stay resident on an SM;
- shared memory: a block's staged tiles fit the budget that keeps ``RESIDENT_BLOCKS`` blocks on one SM, within the
  static limit for plain ``__shared__`` buffers (the SIMT matmul's tiles, the tensor-core matmul's output staging)
  and the opt-in limit for ``shared.dyn`` (the tensor-core matmul's operand tiles);
- SM count: among the tiles that fit, the one with the least time on the busiest SM: waves of blocks
  (ceil(blocks / SMs)) times a block's loads (block_m + block_n per k step), at the kernel's size (a symbolic extent
  counts ``NOMINAL_ROWS`` rows, a symbolic batch 1).
So one kernel gets different tiles on an A10 (72 SMs, 100 KB per SM) and an H100 (132 SMs, 228 KB).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcc.targets import CudaArch

RESIDENT_BLOCKS = 2            # blocks per SM: one block's loads overlap another's math
MAX_REGISTERS_PER_THREAD = 255  # the ISA's limit
REGISTER_OVERHEAD = 40         # addresses, loop counters, predicates beyond the tiles (ptxas -v on the built kernels)
NOMINAL_ROWS = 128             # rows a symbolic M counts (a prompt's length)
SMEM_ROW_PAD = 8               # elements each staged row is padded by (storage_align), against bank conflicts
FRAGMENT = 16                  # wmma's m16n16k16 fragment
LOAD_BYTES = 16                # widest per-thread global load (float4 / 8 halves)
TC_COPY_VECTOR = 4             # halves per thread per global->shared copy: TVM's CUDA codegen has no 8-lane half type
WARP = 32


def _blocks(m: int, n: int, batch: int, bm: int, bn: int) -> int:
    return -(-m // bm) * -(-n // bn) * batch


def _threads_fit(arch: CudaArch, threads: int) -> bool:
    """At least one warp per warp scheduler (fewer leave schedulers idle), at most the block limit."""
    return arch.warp_schedulers_per_sm * WARP <= threads <= arch.max_threads_per_block


def register_budget(arch: CudaArch, threads: int) -> int:
    """Registers one thread may use with ``RESIDENT_BLOCKS`` blocks of ``threads`` resident on an SM."""
    return min(MAX_REGISTERS_PER_THREAD, arch.registers_per_sm // (threads * RESIDENT_BLOCKS))


@dataclass(frozen=True)
class SimtMatmulTiles:
    """A block of threads_m x threads_n threads; each thread a rows x cols accumulator tile; k staged k_tile at a
    time through shared memory; global loads ``vector`` elements wide."""

    threads_m: int
    threads_n: int
    rows: int
    cols: int
    k_tile: int
    vector: int

    @property
    def threads(self) -> int:
        return self.threads_m * self.threads_n

    @property
    def block_k(self) -> int:
        return self.k_tile

    @property
    def block_m(self) -> int:
        return self.threads_m * self.rows

    @property
    def block_n(self) -> int:
        return self.threads_n * self.cols

    def registers(self) -> int:
        return self.rows * self.cols + self.rows + self.cols + REGISTER_OVERHEAD

    def smem_bytes(self, dtype_bytes: int) -> int:
        return (self.block_m + self.block_n) * (self.k_tile + SMEM_ROW_PAD) * dtype_bytes


_SIMT_THREADS = ((8, 8), (8, 16), (16, 16))
_SIMT_MICRO = ((2, 2), (4, 4), (8, 4), (8, 8))
_K_TILES = (8, 16, 32, 64)


def simt_matmul_tiles(arch: CudaArch, m: int, n: int, batch: int, dtype_bytes: int) -> SimtMatmulTiles:
    """The SIMT matmul's tiles for C[batch, m, n] (static sizes; pass NOMINAL_ROWS for a symbolic m)."""
    smem = arch.smem_budget(RESIDENT_BLOCKS)
    vector = max(1, LOAD_BYTES // dtype_bytes)
    fitting = []
    for tm, tn in _SIMT_THREADS:
        for rows, cols in _SIMT_MICRO:
            base = SimtMatmulTiles(tm, tn, rows, cols, _K_TILES[0], min(vector, cols))
            if not _threads_fit(arch, base.threads) or base.registers() > register_budget(arch, base.threads):
                continue
            k_tiles = [k for k in _K_TILES if SimtMatmulTiles(tm, tn, rows, cols, k, 1).smem_bytes(dtype_bytes) <= smem]
            if k_tiles:
                fitting.append(SimtMatmulTiles(tm, tn, rows, cols, max(k_tiles), min(vector, cols)))
    return _pick(fitting, arch, m, n, batch)


def _pick(fitting: list, arch: CudaArch, m: int, n: int, batch: int):
    """The tile with the least time on the busiest SM. Each SM runs ceil(blocks / SMs) blocks one after another, and a
    block's time is its loads, (block_m + block_n) * K elements: big tiles reuse more, small ones leave fewer SMs
    idle in the last wave. Ties go to the bigger tile, then the deeper k step, then more threads."""
    def cost(t):
        waves = -(-_blocks(m, n, batch, t.block_m, t.block_n) // arch.sms)
        return (waves * (t.block_m + t.block_n), -t.block_m * t.block_n, -t.block_k, -t.threads)

    return min(fitting, key=cost)


@dataclass(frozen=True)
class TensorCoreTiles:
    """A block of warps_m x warps_n warps; each warp frags_m x frags_n 16x16 accumulator fragments; k staged
    k_frags * 16 at a time, double-buffered in dynamic shared memory."""

    warps_m: int
    warps_n: int
    frags_m: int
    frags_n: int
    k_frags: int
    stages: int = 2

    @property
    def threads(self) -> int:
        return self.warps_m * self.warps_n * WARP

    @property
    def block_m(self) -> int:
        return self.warps_m * self.frags_m * FRAGMENT

    @property
    def block_n(self) -> int:
        return self.warps_n * self.frags_n * FRAGMENT

    @property
    def block_k(self) -> int:
        return self.k_frags * FRAGMENT

    def registers(self) -> int:
        # a float32 16x16 accumulator is 8 registers per thread; an fp16 16x16 operand fragment 4
        return 8 * self.frags_m * self.frags_n + 4 * (self.frags_m + self.frags_n) + REGISTER_OVERHEAD

    def operand_bytes(self) -> int:
        """Dynamic shared memory: the fp16 A and B tiles of every stage."""
        return self.stages * (self.block_m + self.block_n) * (self.block_k + SMEM_ROW_PAD) * 2

    def staging_bytes(self) -> int:
        """Static shared memory: the float32 accumulators on their way to global memory (rows padded by 4)."""
        return self.block_m * (self.block_n + 4) * 4

    def smem_bytes(self) -> int:
        return self.operand_bytes() + self.staging_bytes()


_TC_WARPS = ((1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4))
_TC_FRAGS = ((1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4), (4, 4))
_TC_K_FRAGS = (1, 2, 4)


def tensor_core_tiles(arch: CudaArch, m: int, n: int, batch: int) -> TensorCoreTiles:
    """The tensor-core matmul's tiles for fp16 C[batch, m, n] (pass NOMINAL_ROWS for a symbolic m)."""
    smem = min(arch.smem_per_block_optin, arch.smem_per_sm // RESIDENT_BLOCKS)
    fitting = []
    for wm, wn in _TC_WARPS:
        for fm, fn in _TC_FRAGS:
            tiles = TensorCoreTiles(wm, wn, fm, fn, _TC_K_FRAGS[0])
            if not _threads_fit(arch, tiles.threads) or tiles.registers() > register_budget(arch, tiles.threads) \
                    or tiles.staging_bytes() > arch.static_smem_per_block:
                continue
            ks = [k for k in _TC_K_FRAGS if TensorCoreTiles(wm, wn, fm, fn, k).smem_bytes() <= smem]
            if ks:
                fitting.append(TensorCoreTiles(wm, wn, fm, fn, max(ks)))
    return _pick(fitting, arch, m, n, batch)


@dataclass(frozen=True)
class GemvTiles:
    """GEMV over a [K, N] weight (N contiguous): a block of threads_n x threads_k threads covers threads_n * vector
    outputs; each thread sums every threads_k-th row of K for its ``vector`` adjacent outputs, and the block adds the
    threads_k partial sums up."""

    threads_n: int
    threads_k: int
    vector: int

    @property
    def threads(self) -> int:
        return self.threads_n * self.threads_k

    @property
    def block_n(self) -> int:
        return self.threads_n * self.vector


GEMV_THREADS = 256  # 8 warps: enough loads in flight per block to cover DRAM latency with two blocks per SM


def gemv_tiles(arch: CudaArch, n: int, batch: int, load_bytes: int) -> GemvTiles:
    """Tiles of a GEMV with ``n`` outputs per batch row whose weight elements are ``load_bytes`` wide: the widest
    vector (up to 16-byte loads) and the most threads along N (longer coalesced rows) that still give every SM a
    block; N's static size must be a multiple of the block's outputs (no predicate on the loads)."""
    threads = min(GEMV_THREADS, arch.max_threads_per_block)
    options = []
    for vector in (4, 2, 1):
        if vector * load_bytes > LOAD_BYTES:
            continue
        for threads_n in (128, 64, 32):
            if n % (threads_n * vector) == 0:
                options.append(GemvTiles(threads_n, threads // threads_n, vector))
    if not options:
        return GemvTiles(WARP, threads // WARP, 1)
    filling = [t for t in options if -(-n // t.block_n) * batch >= arch.sms]
    if filling:
        return max(filling, key=lambda t: (t.vector, t.threads_n))
    return min(options, key=lambda t: (t.block_n, -t.threads_n))
