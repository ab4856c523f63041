"""llmcc's CUDA schedule rules (dlight style), every tile sized from the target's CudaArch (schedules/cuda_tiles.py).

CudaTensorCoreMatmul, fp16 operands (float32 or fp16 sums) with no static M, N or K under ``MIN_TENSOR_CORE_EXTENT``::

    C[b, m, n] = sum_k A[b, m, k] * B[b, n, k]       (any matmul, normalized to this by TVM's index maps; padded to
                                                      whole block tiles, so a symbolic M needs no predicate)
    for block in blockIdx.x, blockIdx.y:              # block_m x block_n tile of C
      for warp in threadIdx.y (warps_m * warps_n):    # frags_m x frags_n wmma accumulators per warp
        for k0 in range(K / block_k):                 # A and B tiles -> shared.dyn, double-buffered (pipelined)
          for k1 in range(k_frags):                   # shared -> wmma.matrix_a / matrix_b fragments
            mma_sync(acc[i, j], a[i], b[j])           # m16n16k16 HMMA
      acc -> shared.dyn -> C (+ the fused epilogue), 16-byte stores

CudaMatmul: the rest of the matmuls (float32, small fp16), on CUDA cores: TVM's dlight matmul schedule (threads x
register micro-tile, k staged through shared memory) with its Config filled from ``simt_matmul_tiles``.

CudaGemv, a matmul with one row per batch (decode) over a [K, N] weight read along N::

    for bx in blockIdx.x:                             # threads_n * vector outputs
      for ty in threadIdx.y, tx in threadIdx.x:       # threads_k x threads_n threads
        for ko in range(K / threads_k):               # rows ty, ty + threads_k, ...: each warp reads whole
          partial[v] += x[k] * W[k, n + v]            # 32 * vector contiguous elements of a row
      out[n] = sum over threadIdx.y of partial        # cross-thread reduction (shared memory)

A GEMV whose weight is read along K (TVM's dlight GEMV) and every other reduction (dlight's Reduction,
GeneralReduction) and injective kernel (dlight's Fallback) follow; those size their blocks from the target's
``max_num_threads`` only.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from llmcc.schedules import is_batch_size
from llmcc.schedules.cuda_tiles import LOAD_BYTES, NOMINAL_ROWS, TC_COPY_VECTOR, gemv_tiles, simt_matmul_tiles, tensor_core_tiles
from llmcc.targets import cuda_arch

# Below this a static M, N or K fills too little of a 4-fragment tile for tensor cores to pay (as dlight decides)
MIN_TENSOR_CORE_EXTENT = 64
# A rule's private marker (dlight's): the SIMT rule must not take dlight's own, unsized tensor-core path
NO_TENSORIZE = "dlight.do_not_tensorize"


def _arch(target):
    if target is None or target.kind.name != "cuda":
        return None
    return cuda_arch(str(target.attrs.get("arch", "")))


def _static(e) -> int | None:
    return int(e.value) if isinstance(e, tirx.IntImm) else None


def _normalized_matmul(sch: s_tir.Schedule):
    """Normalize the one reduction block of a matmul-like kernel to C[S, I, J] += A[S, I, K] * B[S, J, K] (TVM's
    index-map analysis): (block, (batch, m, n, k) extents, input dtype, output dtype), or None."""
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import get_index_map, get_in_out_dtypes, get_reduction_blocks

    reduction = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
    if reduction is None or get_index_map(sch.get(reduction[0])) is None:
        return None
    block = reduction[0]
    reindex_a = sch.reindex(block, ("read", 0))
    reindex_b = sch.reindex(block, ("read", 1))
    reindex_c = sch.reindex(block, ("write", 0))
    matmul_map, a_map, b_map, c_map = get_index_map(sch.get(block))
    sch.transform_layout(reindex_a, ("write", 0), a_map)
    sch.transform_layout(reindex_b, ("write", 0), b_map)
    sch.transform_layout(reindex_c, ("read", 0), c_map)
    sch.transform_block_layout(block, matmul_map)
    extents = tuple(iv.dom.extent for iv in sch.get(block).iter_vars)
    in_dtype, out_dtype = get_in_out_dtypes(sch.get(block))
    return block, extents, str(in_dtype), str(out_dtype)


def _nominal(extent, symbolic: int) -> int:
    """A static extent's value; else 1 for a batch size (every var named "batch"), else ``symbolic``."""
    value = _static(extent)
    if value is not None:
        return value
    return 1 if is_batch_size(extent) else symbolic


class CudaTensorCoreMatmul:
    """fp16 matmul on tensor cores (wmma m16n16k16), tiles from ``tensor_core_tiles``."""

    tiles = None  # of the last kernel scheduled

    def apply(self, func, target, _tunable=False):
        from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain, auto_inline_producers

        arch = _arch(target)
        if arch is None or not isinstance(func, tirx.PrimFunc) or NO_TENSORIZE in (func.attrs or {}):
            return None
        sch = s_tir.Schedule(func)
        found = _normalized_matmul(sch)
        if found is None:
            return None
        block, (batch, m, n, k), in_dtype, out_dtype = found
        if in_dtype != "float16" or out_dtype not in ("float16", "float32"):
            return None
        if any(v is not None and v <= MIN_TENSOR_CORE_EXTENT for v in map(_static, (m, n, k))):
            return None
        # only now: importing TVM's tensor intrinsics registers every one of them, about 40 s on this machine
        from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

        tiles = self.tiles = tensor_core_tiles(arch, _nominal(m, NOMINAL_ROWS), _nominal(n, NOMINAL_ROWS),
                                               _nominal(batch, 1))
        frag = 16
        sch.pad_einsum(block, [1, tiles.block_m, tiles.block_n, tiles.block_k])

        b_loop, i, j, kk = sch.get_loops(block)
        i, i_frag = sch.split(i, [None, frag])
        j, j_frag = sch.split(j, [None, frag])
        kk, k_frag = sch.split(kk, [None, frag])
        sch.reorder(i, j, kk, i_frag, j_frag, k_frag)
        inner = block
        outer = sch.blockize(i_frag)

        i0, i1, i2, i3 = sch.split(i, [None, 1, tiles.warps_m, tiles.frags_m])
        j0, j1, j2, j3 = sch.split(j, [1, None, tiles.warps_n, tiles.frags_n])
        k0, k1 = sch.split(kk, [None, tiles.k_frags])
        # stage the next k0 step's global->shared copies while this step's fragments run (cp.async on sm_80+)
        sch.annotate(k0, "software_pipeline_order", [0, 3, 1, 4, 5, 2, 6])
        sch.annotate(k0, "software_pipeline_stage", [0, 0, 0, 0, 0, 1, 1])
        sch.annotate(k1, "software_pipeline_order", [0, 1, 2])
        sch.annotate(k1, "software_pipeline_stage", [0, 0, 1])
        sch.reorder(i0, j0, i1, j1, j2, i2, k0, k1, i3, j3)
        sch.bind(b_loop, "blockIdx.z")
        sch.bind(sch.fuse(i0, j0), "blockIdx.x")
        sch.bind(sch.fuse(i1, j1), "blockIdx.y")
        warp = sch.fuse(j2, i2)
        sch.bind(warp, "threadIdx.y")
        warps = tiles.warps_m * tiles.warps_n

        def stage_in_shared(index):
            copy = sch.cache_read(outer, index, "shared.dyn")
            sch.compute_at(copy, k0)
            rows_cols = sch.fuse(*sch.get_loops(copy)[-2:])
            _, ty, tx, vec = sch.split(rows_cols, [None, warps, 32, TC_COPY_VECTOR])
            sch.bind(ty, "threadIdx.y")
            sch.bind(tx, "threadIdx.x")
            sch.vectorize(vec)
            sch.storage_align(copy, 0, axis=-2, factor=16, offset=8)
            sch.annotate(copy, "tirx.manifest_shared_memory_local_stage", 1)
            sch.annotate(copy, "double_buffer_scope", 0)
            auto_inline_producers(sch, copy)

        stage_in_shared(0)
        stage_in_shared(1)
        frag_a = sch.cache_read(outer, 0, "wmma.matrix_a")
        frag_b = sch.cache_read(outer, 1, "wmma.matrix_b")
        sch.compute_at(frag_a, k1)
        sch.compute_at(frag_b, k1)
        # static shared memory: in shared.dyn, TVM's storage rewrite can hand the float32 staging buffer the
        # storage of a dead fp16 operand buffer, and the build then fails (tvm_access_ptr element type)
        staged_out = sch.cache_write(outer, 0, "shared")
        sch.storage_align(staged_out, 0, -2, 16, 4)
        accumulate = sch.cache_write(outer, 0, "wmma.accumulator")
        sch.reverse_compute_at(accumulate, warp)
        sch.reverse_compute_at(staged_out, warp)
        init = sch.decompose_reduction(outer, k0)

        def fragment_loops(blk):
            r, c = sch.get_loops(blk)[-2:]
            r0, r1 = sch.split(r, [None, frag])
            c0, c1 = sch.split(c, [None, frag])
            sch.reorder(r0, c0, r1, c1)
            return r0, c0, r1

        intrins = get_wmma_intrin_group(load_scope="shared.dyn", store_scope="shared", in_dtype="float16",
                                        out_dtype=out_dtype, trans_b=True)
        try:
            for blk, name in ((frag_a, "load_a"), (frag_b, "load_b")):
                r0, c0, r1 = fragment_loops(blk)
                sch.unroll(r0)
                sch.unroll(c0)
                sch.tensorize(r1, intrins[name])
            fragment_loops(accumulate)
            sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], intrins["init"])
            sch.tensorize(sch.get_loops(accumulate)[-2], intrins["store"])
            sch.tensorize(sch.get_loops(inner)[-3], intrins["compute"])
        except tvm.error.TVMError:  # the kernel's body is not the intrinsic's multiply-add (a quantized or odd matmul)
            return None
        auto_inline_consumer_chain(sch, staged_out)
        _, tx, vec = sch.split(sch.fuse(*sch.get_loops(staged_out)[-2:]), [None, 32, 4])
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vec)
        return sch


class CudaMatmul(dl.gpu.Matmul):
    """Matmuls on CUDA cores: dlight's matmul schedule with its Config from ``simt_matmul_tiles``."""

    tiles = None  # of the last kernel scheduled

    def apply(self, func, target, tunable=False):
        arch = _arch(target)
        if arch is None or not isinstance(func, tirx.PrimFunc):
            return None
        found = _normalized_matmul(s_tir.Schedule(func))
        if found is None:
            return None
        _, (batch, m, n, _k), in_dtype, _ = found
        tiles = simt_matmul_tiles(arch, _nominal(m, NOMINAL_ROWS), _nominal(n, NOMINAL_ROWS), _nominal(batch, 1),
                                  _dtype_bytes(in_dtype))
        self.tiles = tiles
        self._config = dl.gpu.Matmul.Config(
            block_size_x=tiles.threads_m, block_size_y=tiles.threads_n, micro_size_x=tiles.rows,
            micro_size_y=tiles.cols, micro_size_k=tiles.k_tile, vector_size=tiles.vector, unroll=256,
            use_shared=True, storage_align=True, inner_x=False)
        return super().apply(func.with_attr(NO_TENSORIZE, True), target, tunable)

    def get_configs(self, target):
        return self._config


def _dtype_bytes(dtype: str) -> int:
    digits = "".join(ch for ch in dtype if ch.isdigit())
    return max(int(digits or 32) // 8, 1)


class CudaGemv:
    """A matmul with one row per batch (decode: M is 1 or the batch size) over a weight read along N (a [K, N]
    weight, ONNX's MatMul layout, possibly dequantized in the kernel), tiles from ``gemv_tiles``."""

    tiles = None  # of the last kernel scheduled

    def apply(self, func, target, _tunable=False):
        from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain, auto_inline_producers

        arch = _arch(target)
        if arch is None or not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        weight = _weight_read_along_n(sch)
        if weight is None:
            return None
        found = _normalized_matmul(sch)
        if found is None:
            return None
        block, (batch, m, n, _k), _, _ = found
        if _nominal(m, NOMINAL_ROWS) != 1:
            return None
        # a weight dequantized in the kernel is unpacked element by element: one output per thread
        load_bytes = _dtype_bytes(str(weight.dtype)) if any(weight.same_as(p) for p in func.params) else LOAD_BYTES
        n_static = _static(n)
        tiles = self.tiles = gemv_tiles(arch, n_static if n_static is not None else NOMINAL_ROWS,
                                        _nominal(batch, 1), load_bytes)
        # the layout copies, a dequantization and the epilogue fold into the reduction and one output block
        auto_inline_producers(sch, block)
        (out,) = sch.get_consumers(block)
        auto_inline_consumer_chain(sch, out)

        b_loop, i, j, kk = sch.get_loops(block)
        bx, tx, vec = sch.split(j, [None, tiles.threads_n, tiles.vector])
        ko, ty = sch.split(kk, [None, tiles.threads_k])
        sch.reorder(b_loop, i, bx, ty, tx, ko, vec)
        partial = sch.rfactor(ty, factor_axis=0)  # partial[ty, ..]: every threads_k-th row of K per thread
        b_loop, i, bx, ty, tx, ko, vec = sch.get_loops(partial)
        sch.bind(sch.fuse(b_loop, i), "blockIdx.y")
        sch.bind(bx, "blockIdx.x")
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vec)  # before the init is split off: a vectorized loop needs a complete block under it
        sch.annotate(ko, "pragma_auto_unroll_max_step", 256)
        sch.annotate(ko, "pragma_unroll_explicit", 1)
        sch.decompose_reduction(partial, ko)
        sch.set_scope(partial, 0, "local")

        sch.reverse_compute_at(block, bx)  # the threads_k partial sums of each output, added across threads
        j_loop, r_loop = sorted(sch.get_loops(block)[-2:],
                                key=lambda lp: _static(sch.get(lp).extent) == tiles.threads_k)
        o_tx, o_vec = sch.split(j_loop, [tiles.threads_n, tiles.vector])
        sch.reorder(o_tx, o_vec, r_loop)  # a cross-thread reduction's loop must be the innermost
        sch.bind(r_loop, "threadIdx.y")
        sch.bind(o_tx, "threadIdx.x")
        sch.set_scope(block, 0, "local")
        sch.reverse_compute_at(out, bx)
        e_tx, _ = sch.split(sch.get_loops(out)[-1], [tiles.threads_n, tiles.vector])
        sch.bind(e_tx, "threadIdx.x")
        return sch


def _weight_read_along_n(sch: s_tir.Schedule):
    """The weight buffer of a matmul's reduction block (the operand that uses the output's last axis n) when its own
    last index is n, so a warp reads 32 adjacent elements of one row; None when it is read along K (dlight's GEMV
    reads whole rows) or the kernel is no single-reduction matmul."""
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import get_reduction_blocks

    reduction = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
    if reduction is None:
        return None
    stmt = sch.get(reduction[0])
    if len(stmt.writes) != 1:
        return None
    out_vars = tirx.analysis.undefined_vars(stmt.writes[0].region[-1].min)
    if len(out_vars) != 1:
        return None
    n_var = out_vars[0]
    operands = [rd for rd in stmt.reads if not rd.source.same_as(stmt.writes[0].source)]
    weights = [rd for rd in operands if any(v.same_as(n_var) for rd_range in rd.region
                                            for v in tirx.analysis.undefined_vars(rd_range.min))]
    if len(operands) != 2 or len(weights) != 1:
        return None
    last = tirx.analysis.undefined_vars(weights[0].region[-1].min)
    return weights[0].source if len(last) == 1 and last[0].same_as(n_var) else None
