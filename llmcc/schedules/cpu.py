"""llmcc's CPU schedule rules (dlight style): matmul/GEMV, row reductions, injective fallback.

Each rule is ``apply(func, target, tunable) -> s_tir.Schedule | None`` (None: declined). Sizes come from
``CpuModel.get(target)`` only. One schedule serves every value of the symbolic extents (batch, sequence).

CpuMatmul, for ``C[..., m, n] += A[..., m, k] * B[..., k, n]`` (B's last axis is C's last axis; A does not use n)
with at most one injective epilogue (bias, residual add, SiLU gate...) after FuseTIR::

    A_pad = A with M padded to a multiple of MR (B_pad: N to NR) when M (N) is symbolic or not a multiple
    for batch_n_tile in T.parallel(B * ceil(N / NR)):                     # an NR-wide panel of B stays in L1
        for m_tile in range(ceil(M / MR)):                                # MR x NR accumulator tile
            for mi, nv in T.unroll(MR), T.unroll(NV): for lane in T.vectorized(L): acc[mi, nv*L + lane] = 0
            for k in range(K):
                for mi in T.unroll(MR):
                    for nv in T.unroll(NV):
                        for lane in T.vectorized(L): acc[mi, nv*L+lane] += A_pad[m, k] * B[k, n]   # FMA
            for mi, n in ...: if m < M: for lane in T.vectorized(L): C[m, n] = epilogue(acc[mi, n])

The padding (``pad_einsum``) is what keeps the k loop free of tail predicates: with a predicate there, TVM cannot
bound the accumulator's region, so it stays an M x N buffer in memory (a load and a store per FMA) instead of MR x NR
registers. Only the write-back is predicated. A GEMV (static M = 1, decode) reads its weight once, so it is bound by
memory, not FMAs: each thread takes a chunk of N whose accumulator fits in L1 and streams whole weight rows
(contiguous, prefetched), k unrolled by 8 inside groups of 4 vectors of n (independent FMA chains; an int4 word's
8 nibbles are shifted by constants).

CpuReduction: softmax, layer/RMS norm, mean: parallel over the rows (the reduction's leading spatial axes), every
block of the kernel computed per row, injective stages vectorized when the row length is static (a symbolic one,
attention rows, stays a plain loop: LLVM vectorizes it with a scalar tail, where a TIR split would check every lane).

CpuFallback: injective kernels (elementwise, transpose, broadcast, concat...): innermost axis vectorized, outer loops
fused into one parallel loop (batch-like loops stay outside it, and no symbolic loop is fused under another: see
``_parallel_group``); other kernels get their leading spatial loops parallel.
"""

from __future__ import annotations

import tvm
from tvm.sym.analyzer import Analyzer
from tvm import s_tir, tirx

from llmcc.schedules import is_batch_size
from llmcc.schedules.cpu_model import CpuModel


# The accumulator tile is a small buffer inside the tile loop. TVM gives a small constant-size *global* allocation a
# stack slot (LLVM then keeps it in registers); a "local" one becomes a TVMBackendAllocWorkspace call per tile, and
# LLVM, unable to prove it does not alias the inputs, stores it back after every FMA and reloads A's broadcasts.
ACCUMULATOR_SCOPE = "global"


def _analysis():
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline_contiguous_spatial

    return normalize_prim_func, try_inline_contiguous_spatial


def _is_cpu(target) -> bool:
    return target is not None and target.kind.name == "llvm"


def _static(e) -> int | None:
    if isinstance(e, int):
        return e
    if isinstance(e, tirx.IntImm):
        return int(e.value)
    return None


def _loop_extent(sch: s_tir.Schedule, loop) -> int | None:
    return _static(sch.get(loop).extent)


def _nominal(e) -> int | None:
    """A typical value of a symbolic extent: batch dims count 1, other dims (sequence, past) count 128, so a decode
    kernel over [batch, 1, hidden] stays single-threaded while a prefill kernel over [batch, sequence, hidden] does
    not."""
    analyzer = Analyzer()
    for var in tirx.analysis.undefined_vars(e):
        analyzer.bind(var, tirx.IntImm(str(var.ty), 1 if is_batch_size(var) else 128))
    return _static(analyzer.simplify(e))


def _work_is_large(model: CpuModel, extents, injective: bool = False) -> bool:
    """Worth a parallel loop: enough work at typical sizes of the symbolic dims (``extents``: every loop of the
    block, reduction ones included)."""
    total = 1
    for e in extents:
        v = _static(e)
        if v is None:
            v = _nominal(e)
            if v is None:
                return True
        total *= v
    return total >= (model.parallel_min_elems if injective else model.parallel_min_work)


def _static_product(extents) -> int:
    """The product of the static extents (symbolic ones count 1)."""
    total = 1
    for e in extents:
        total *= _static(e) or 1
    return total


def _dtype_bits(sch: s_tir.Schedule, block) -> int:
    writes = sch.get(block).writes
    return writes[0].source.dtype.bits if writes else 32


def _vectorize_innermost(sch: s_tir.Schedule, block, lanes: int) -> bool:
    """Split the block's innermost loop by the vector lanes and vectorize the inner part."""
    loops = sch.get_loops(block)
    if not loops:
        return False
    inner = loops[-1]
    ext = _loop_extent(sch, inner)
    if ext is not None and ext <= 1:
        return False
    if ext is not None and ext <= lanes:
        sch.vectorize(inner)
        return True
    _, vec = sch.split(inner, factors=[None, lanes])
    sch.vectorize(vec)
    return True


def _schedule_injective(sch: s_tir.Schedule, block, model: CpuModel, lanes: int, parallel: bool) -> None:
    """An injective helper block (a padding copy): innermost axis vectorized, a parallel loop over the outer loops
    that ``_parallel_group`` picks (fusing symbolic extents would divide every index by the sequence length)."""
    _vectorize_innermost(sch, block, lanes)
    group = _parallel_group(sch, sch.get_loops(block)[:-1])
    if group and parallel:
        sch.parallel(sch.fuse(*group) if len(group) > 1 else group[0])


def _accumulate_in_tiles(sch: s_tir.Schedule, block, write_back, at_loop, lanes: int) -> None:
    """The matmul block accumulates into a tile-sized buffer (ACCUMULATOR_SCOPE) inside ``at_loop``, and
    ``write_back`` (the epilogue block, or None for a plain copy to C) stores each tile, vectorized."""
    if write_back is None:
        write_back = sch.cache_write(block, 0, ACCUMULATOR_SCOPE)
    else:
        sch.set_scope(block, 0, ACCUMULATOR_SCOPE)
    sch.reverse_compute_at(write_back, at_loop, preserve_unit_loops=True)
    _vectorize_innermost(sch, write_back, lanes)


def _parallel_group(sch: s_tir.Schedule, loops: list) -> list:
    """The consecutive loops to fuse into one parallel loop: from the first one that is not a batch-like loop
    (nominal extent 1; those stay serial outside), on through loops with static extents only. Fusing a loop with a
    symbolic extent under another one makes every index a div/mod by a symbolic value, which the simplifier and
    LLVM then chew on for seconds per kernel (llama-decode's KV-cache reshapes: 6-8 s each) for no speed-up."""
    start = 0
    while start < len(loops) - 1 and _nominal(sch.get(loops[start]).extent) == 1:
        start += 1
    group = loops[start:start + 1]
    for loop in loops[start + 1:]:
        if _loop_extent(sch, loop) is None:
            break
        group.append(loop)
    return group


def _vars_in(expr) -> set:
    from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

    return set(collect_vars_used_in_prim_expr(expr))


def _is_load_of(e, buf=None) -> bool:
    """e is a buffer load (of ``buf`` when given)."""
    if not isinstance(e, tvm.ir.TensorLoad):
        return False
    return buf is None or e.source.same_as(buf)


def _loads_in(e) -> list:
    """Every buffer load in the expression ``e``."""
    loads = []

    def walk(x):
        if not isinstance(x, tvm.ir.Expr):
            return
        if isinstance(x, tvm.ir.TensorLoad):
            loads.append(x)
            return
        for attr in ("a", "b", "value", "condition", "true_value", "false_value"):
            walk(getattr(x, attr, None))
        for arg in getattr(x, "args", None) or ():
            walk(arg)

    walk(e)
    return loads


def _is_weight_expr(e, n_var) -> bool:
    """A load, or a dequantization of loads (casts, shifts, masks, scales) that all read along ``n`` last: the B
    operand of a weight-quantized matmul, which vectorizes over n like a plain load."""
    loads = _loads_in(e)
    return bool(loads) and all(isinstance(ld.indices[-1], tirx.Var) and ld.indices[-1].same_as(n_var)
                               for ld in loads)


def _strip_cast(e):
    while isinstance(e, tirx.Cast):
        e = e.value
    return e


class _CpuRule:
    """What every CPU rule starts with: decline non-CPU targets, size from CpuModel, normalize the blocks."""

    def __init__(self, model: CpuModel | None = None) -> None:
        self.model = model

    def _start(self, func, target):
        """(model, schedule, block infos), or None when the rule cannot look at ``func`` (not a CPU target, or
        blocks dlight's normalization cannot describe)."""
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        normalize_prim_func, _ = _analysis()
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        return self.model or CpuModel.get(target), sch, infos


class CpuMatmul(_CpuRule):
    """Register-tiled, vectorized, parallel matmul / batch matmul / GEMV with an optional injective epilogue."""

    def _match(self, sch, info):
        """(batch iters, m iter or None, n iter, k iter) if the block is C[.., m, n] += A[.., m, k] * B[.., k, n]
        (batch iters may index B only: a panel-packed weight's panels, passes/pack_matmul_weights.py)."""
        block = sch.get(info.block_rv)
        store = block.body
        if not isinstance(store, tvm.tirx.stmt.BufferStore) or len(block.writes) != 1:
            return None
        red = [it for it in info.iters if it.kind == "R"]
        spatial = [it for it in info.iters if it.kind == "S"]
        if len(red) != 1 or len(spatial) + 1 != len(info.iters) or not spatial:
            return None
        value = store.value
        if not isinstance(value, tirx.Add):
            return None
        acc, prod = value.a, value.b
        if not _is_load_of(acc, store.buffer):
            acc, prod = value.b, value.a
        if not _is_load_of(acc, store.buffer):
            return None
        prod = _strip_cast(prod)
        if not isinstance(prod, tirx.Mul):
            return None
        x, y = _strip_cast(prod.a), _strip_cast(prod.b)
        if not _is_load_of(x):
            x, y = y, x
        if not _is_load_of(x):
            return None
        # unit axes normalize away: their indices are constants
        if not all(isinstance(i, (tirx.Var, tirx.IntImm)) for i in store.indices):
            return None
        if not isinstance(store.indices[-1], tirx.Var):
            return None
        out_vars = [i for i in store.indices if isinstance(i, tirx.Var)]
        by_var = {it.var: it for it in info.iters}
        if len(set(out_vars)) != len(out_vars) or any(v not in by_var for v in out_vars):
            return None
        if len(out_vars) != len(spatial):
            return None
        k = red[0]
        n = by_var[out_vars[-1]]
        x_vars, y_vars = _vars_in(x), _vars_in(y)
        # B: n is its last index, A does not use n
        if n.var in x_vars and n.var not in y_vars and _is_load_of(y):
            x, y = y, x
            x_vars, y_vars = y_vars, x_vars
        if n.var in x_vars or not _is_weight_expr(y, n.var):
            return None
        if k.var not in x_vars or k.var not in y_vars:
            return None
        # m: the innermost output axis A reads and B does not (a panel-packed weight's panel axis sits between)
        m = None
        for idx in reversed(store.indices[:-1]):
            if isinstance(idx, tirx.Var) and idx in x_vars and idx not in y_vars:
                m = by_var[idx]
                break
        batch = [it for it in spatial if it is not n and it is not m]
        return batch, m, n, k

    def apply(self, func: tirx.PrimFunc, target, tunable: bool = False):
        start = self._start(func, target)
        if start is None:
            return None
        model, sch, infos = start
        _, try_inline_contiguous_spatial = _analysis()
        infos = try_inline_contiguous_spatial(sch, infos)
        if not infos or len(infos) > 2:
            return None
        main, epi = infos[0], (infos[1] if len(infos) == 2 else None)
        if main.is_injective() or (epi is not None and not epi.is_injective()):
            return None
        matched = self._match(sch, main)
        if matched is None:
            return None
        batch, m, n, k = matched
        block = main.block_rv
        bits = _dtype_bits(sch, block)
        lanes = model.lanes(bits)
        m_ext = _static(m.dom) if m is not None else 1
        n_ext = _static(n.dom)
        gemv = m is None or m_ext == 1
        n_vectors = None if n_ext is None or n_ext % lanes else n_ext // lanes
        mr, nv = model.matmul_tile(n_vectors, gemv=gemv)
        nr = nv * lanes

        # Tails: a symbolic (or non-multiple) M or N would need a predicate inside the k loop, which keeps the
        # accumulator out of registers (CompactBufferAllocation cannot bound its region) and scalarizes the FMAs.
        # pad_einsum copies A (and B) into tile-multiple buffers instead: the k loop runs over full MR x NR tiles,
        # and only the write-back to C is predicated.
        pad_m = m is not None and mr > 1 and (m_ext is None or m_ext % mr)
        pad_n = n_ext is None or n_ext % nr
        padded = False
        if pad_m or pad_n:
            order = {id(it): i for i, it in enumerate(main.iters)}
            padding = [1] * len(main.iters)
            if pad_m:
                padding[order[id(m)]] = mr
            if pad_n:
                padding[order[id(n)]] = nr
            try:
                sch.pad_einsum(block, padding)
                padded = True
            except Exception:  # noqa: BLE001 - not an einsum TVM can pad: keep the predicated tiles
                padded = False
        loops = sch.get_loops(block)
        pos = {id(it): i for i, it in enumerate(main.iters)}
        m_loop = loops[pos[id(m)]] if m is not None else None
        n_loop, k_loop = loops[pos[id(n)]], loops[pos[id(k)]]
        batch_loops = [loops[pos[id(it)]] for it in batch]

        # static batch axes (a panel-packed weight's panels) are parallel tasks already: N needs fewer chunks
        chunk = model.gemv_chunk(n_vectors, _static_product([it.dom for it in batch])) \
            if gemv and n_vectors and not padded else None
        if chunk is not None:
            return self._stream_rows(sch, block, epi, batch_loops, m_loop, n_loop, k_loop, chunk * lanes, lanes,
                                     _work_is_large(model, [it.dom for it in main.iters]), model)

        n_o, n_i = sch.split(n_loop, factors=[None, nr])
        # n tiles outside m tiles: a K x NR panel of B stays in L1 while every row tile of A streams past it. The m
        # tile loop is not fused into the parallel loop, so the accumulator's row offset stays affine (m_o * MR).
        if m_loop is not None and mr > 1:
            m_o, m_i = sch.split(m_loop, factors=[None, mr])
            par = batch_loops + [n_o]
            sch.reorder(*par, m_o, k_loop, m_i, n_i)
            tile = m_o
        else:
            m_i = None
            par = batch_loops + ([m_loop] if m_loop is not None else []) + [n_o]
            sch.reorder(*par, k_loop, n_i)
            tile = None
        fused = sch.fuse(*par) if len(par) > 1 else par[0]
        if tile is None:
            tile = fused
        big = _work_is_large(model, [it.dom for it in main.iters])
        if big:
            sch.parallel(fused)

        epi_block = epi.block_rv if epi is not None else None
        if padded:
            for producer in sch.get_producers(block):
                _schedule_injective(sch, producer, model, lanes, big)
            copy = sch.get_consumers(block)[0]  # padded tile -> C, which the epilogue (if any) absorbs
            if epi is None:
                epi_block = copy
            else:
                sch.compute_inline(copy)
        _accumulate_in_tiles(sch, block, epi_block, tile, lanes)

        n_v, n_l = sch.split(n_i, factors=[nv, lanes])
        sch.vectorize(n_l)
        if nv > 1:
            sch.unroll(n_v)
        if m_i is not None:
            sch.unroll(m_i)
        # the accumulator tile is zeroed before the k loop (its loops keep the unroll/vectorize kinds)
        sch.decompose_reduction(block, k_loop)
        return sch

    @staticmethod
    def _stream_rows(sch, block, epi, batch_loops, m_loop, n_loop, k_loop, chunk, lanes, big, model):
        """GEMV (M = 1) is bound by reading the weight: each thread takes ``chunk`` columns and streams the weight
        row by row (contiguous, prefetcher-friendly) into an L1-resident accumulator, instead of register tiles
        that stride through K rows N*4 bytes apart."""
        n_o, n_i = sch.split(n_loop, factors=[None, chunk])
        par = batch_loops + ([m_loop] if m_loop is not None else []) + [n_o]
        sch.reorder(*par, k_loop, n_i)
        fused = sch.fuse(*par) if len(par) > 1 else par[0]
        if big:
            sch.parallel(fused)
        _accumulate_in_tiles(sch, block, epi.block_rv if epi is not None else None, fused, lanes)
        n_v, n_l = sch.split(n_i, factors=[None, lanes])
        sch.vectorize(n_l)
        k_ext = _loop_extent(sch, k_loop)
        n_vectors = chunk // lanes
        unroll, accumulators = model.gemv_k_unroll, model.gemv_accumulators
        if k_ext is not None and k_ext % unroll == 0:
            # k steps unrolled inside each group of ``accumulators`` vectors of n: the accumulators stay in registers
            # for ``unroll`` FMAs (as independent chains: one chain would wait on FMA latency), and a packed int4
            # word (8 k-consecutive nibbles) is loaded once and shifted by constants
            k_o, k_i = sch.split(k_loop, factors=[None, unroll])
            group = accumulators if n_vectors % accumulators == 0 else 1
            n_vo, n_vi = sch.split(n_v, factors=[None, group])
            sch.reorder(k_o, n_vo, k_i, n_vi, n_l)
            sch.unroll(k_i)
            if group > 1:
                sch.unroll(n_vi)
            k_loop = k_o
        sch.decompose_reduction(block, k_loop)
        return sch


def _same_extent(analyzer, a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return _static(a) == _static(b)
    return bool(analyzer.can_prove(a == b))


def _leading_rows(info) -> list:
    """The reduction block's leading spatial iters, without trailing unit ones (the kept dim of a mean)."""
    rows = []
    for it in info.iters:
        if it.kind != "S":
            break
        rows.append(it)
    while rows and _static(rows[-1].dom) == 1:
        rows.pop()
    return rows


class CpuReduction(_CpuRule):
    """Row-parallel softmax / norms / means: every block computed per row, injective stages vectorized."""

    def apply(self, func: tirx.PrimFunc, target, tunable: bool = False):
        start = self._start(func, target)
        if start is None:
            return None
        model, sch, infos = start
        reductions = [bi for bi in infos if not bi.is_injective()]
        if not reductions:
            return None
        if any(it.kind not in ("S", "R") for bi in infos for it in bi.iters):
            return None
        rows = _leading_rows(reductions[0])
        if not rows:
            return None
        analyzer = Analyzer()
        for bi in infos:
            if len(bi.iters) < len(rows):
                return None
            for it, row in zip(bi.iters, rows):
                if it.kind != "S" or not _same_extent(analyzer, it.dom, row.dom):
                    return None
        last = infos[-1]
        bits = _dtype_bits(sch, last.block_rv)
        lanes = model.lanes(bits)
        loops = sch.get_loops(last.block_rv)
        row_loop = sch.fuse(*loops[: len(rows)]) if len(rows) > 1 else loops[0]
        if _work_is_large(model, [it.dom for it in reductions[0].iters]):
            sch.parallel(row_loop)
        for bi in reversed(infos[:-1]):
            sch.compute_at(bi.block_rv, row_loop, preserve_unit_loops=True)
        row_stmt = sch.get(row_loop)
        for bi in infos:
            loops = sch.get_loops(bi.block_rv)
            # only the loops inside a row: the row loop itself is the parallel one
            if bi.is_injective() and loops and not sch.get(loops[-1]).same_as(row_stmt):
                if _loop_extent(sch, loops[-1]) is None:
                    # a symbolic row length (attention rows: N = sequence): a TIR-vectorized split would carry a
                    # per-lane bounds check, which scalarizes; a plain loop gets LLVM's full vectors + scalar tail
                    continue
                _vectorize_innermost(sch, bi.block_rv, lanes)
        return sch


def _selects_per_lane(sch, block) -> bool:
    """Whether the block picks its value with if_then_else (a concat, a pad). Vectorized across rows (loops fused
    so that a vector spans rows), each lane's condition and indices differ: TVM emits predicated gathers, and LLVM
    for AVX-512 (znver4) computed garbage from them (a RoPE concat with head size 8 at 16 lanes); along the innermost
    axis alone the loads stay contiguous."""
    return "if_then_else" in str(sch.get(block).body)


class CpuFallback(_CpuRule):
    """Injective kernels: outer loops fused and parallel, innermost axis vectorized. Reductions the other rules
    left get their leading spatial loops parallel."""

    def apply(self, func: tirx.PrimFunc, target, tunable: bool = False):
        start = self._start(func, target)
        if start is None:
            return None
        model, sch, infos = start
        _, try_inline_contiguous_spatial = _analysis()
        infos = try_inline_contiguous_spatial(sch, infos) or infos
        changed = False
        for bi in infos:
            block = bi.block_rv
            loops = sch.get_loops(block)
            if not loops:
                continue
            lanes = model.lanes(_dtype_bits(sch, block))
            big = _work_is_large(model, [it.dom for it in bi.iters], injective=bi.is_injective())
            if bi.is_injective():
                if (len(loops) > 1 and (_loop_extent(sch, loops[-1]) or lanes) < lanes
                        and not _selects_per_lane(sch, block)):
                    loops = [sch.fuse(*loops)]
                inner = loops[-1]
                ext = _loop_extent(sch, inner)
                if ext is None or ext > lanes:
                    outer_inner, vec = sch.split(inner, factors=[None, lanes])
                    loops = loops[:-1] + [outer_inner, vec]
                elif ext > 1:
                    vec = inner
                    loops = loops[:-1] + [vec]
                else:
                    vec = None
                if vec is not None:
                    sch.vectorize(vec)
                    changed = True
                outer = loops[:-1] if vec is not None else loops
                group = _parallel_group(sch, outer)
                if group and big:
                    sch.parallel(sch.fuse(*group) if len(group) > 1 else group[0])
                    changed = True
            else:
                lead = []
                for it, loop in zip(bi.iters, loops):
                    if it.kind != "S":
                        break
                    lead.append(loop)
                if lead and big:
                    sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
                    changed = True
        return sch if changed else None
