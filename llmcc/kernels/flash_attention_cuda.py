"""Flash attention for NVIDIA GPUs: the CUDA twin of ``flash_attention_cpu``, a hand-scheduled TIR kernel.

``flash_attention_cuda(spec, arch)`` returns a PrimFunc with exactly the CPU kernel's parameters, buffer shapes,
layouts and semantics (see ``flash_attention.py``: bottom-right aligned positions, causal and window keys get
probability exactly 0, the bias is added to the scaled scores, rows with a zero denominator give 0, B / Sq / Skv are
symbolic int64). It is marked ``tirx.is_scheduled`` and every loop that is not bound to ``blockIdx.x`` /
``threadIdx.{x,y}`` runs inside one thread, so TVM's CUDA codegen takes it as it is. Nothing of size ``Sq * Skv``
exists: per block, shared memory holds one tile of queries, keys, values and probabilities, and each thread keeps its
running maximum ``m``, denominator ``l`` and output accumulator ``acc`` in registers (fp32, whatever the input
dtype). Loads are clamped to the tensors' bounds; rows past Sq are computed and never stored; keys past Skv, after
the row's position (causal) or ``window`` or more behind it get a score of -inf, hence ``exp`` gives exactly 0.

Two thread mappings (``CudaTiles.mode``):

``prefill`` (Sq symbolic or more than 8 rows). One block per (batch, query head, tile of TQ query rows), the block
index ordered so that the query tiles of one head are adjacent (their K/V stay in L2) and, when causal, the longest
tile (the last one) starts first. The block's ``NY x TX`` threads (``threadIdx.y`` x ``threadIdx.x``, TX lanes of
one warp per row group) own a register tile: thread (ty, tx) owns query rows ``ty*RQ .. ty*RQ+RQ-1`` and, of each
key tile of TK keys, keys ``tx + TX*c`` (c < RK) for the scores and value columns ``tx + TX*c`` for the output.
Only the key tiles that causality / the window leave visible to some row of the block are visited; per tile:

  1. all threads copy K[TK, D] and V[TK, DV] to shared memory (coalesced: along d, or along keys for a ``bnds`` k;
     16-byte vector loads along d when D / DV allow, which assumes 16-byte aligned tensors, as TVM allocates them),
     Q[TQ, D] having been copied once before the loop;
  2. each thread computes its RQ x RK scores from shared memory (fp32 FMAs), scales, adds the bias, masks, reduces
     the tile's row maximum over its TX lanes with warp shuffles (xor butterfly), updates ``m``, rescales its
     ``acc`` and its partial ``l`` by ``exp(m_old - m_new)`` and writes ``p = exp(s - m_new)`` to shared memory;
  3. each thread adds ``P[rows, TK] @ V[TK, its columns]`` to ``acc``.

Three ``__syncthreads`` per tile; ``l`` is summed over the TX lanes once, at the end (every lane rescales its own
partial sum by the same factor, so the sum commutes with the rescaling).

``decode`` (``spec.q_len`` static and at most 8: a decode step or a short speculative chunk). A prefill-shaped block
would leave all but q_len of its rows idle, so the key range is split instead: one block per (batch, query head,
q_len rows) with NW warps. The block copies tiles of TK = NW * RK keys to shared memory as above; warp w scores keys
``w*RK .. w*RK+RK-1`` of each tile, KG = 32 / RK lanes per key each summing D / KG products (shuffle sum over the
KG lanes), takes the warp's maximum over its RK keys (shuffles across key groups) and accumulates ``p @ V`` with its
32 lanes over the value columns (each ``p`` broadcast from its key group by a shuffle). Each warp thus keeps its own
(m, l, acc) over a quarter, an eighth, ... of the keys; at the end the warps write them to shared memory and the
block combines them, ``out = sum_w acc_w e^(m_w - M) / sum_w l_w e^(m_w - M)`` with ``M = max_w m_w``, one output
element per thread. The split stays inside a block: the kernel has no workspace parameter for a cross-block
(flash-decoding) split, so when ``B * H`` is well below the GPU's SM count a long Skv is read by few SMs.

GQA: a block handles one query head and reads its kv head's K/V (the group's other heads are launched close by and
hit L2). No tensor cores: the products run on CUDA cores in fp32 (``mma.sync`` tiles are the next step). The grid
has at least one block: with Sq = 0 or B = 0 that block does nothing (CUDA refuses an empty launch).

Tile configs (``cuda_tiles``) depend on max(head_dim, value_dim), the element size and the arch: a base config per
(head dim bucket, 4- or 2-byte elements), shrunk (fewer keys, then fewer rows per tile) until its shared memory fits
the arch's budget: 48 KB static per block, 32 KB on sm_86 / sm_89 (100 KB per SM there: three blocks still fit);
sm_80, sm_87 and sm_90 take the same tiles. All shared tiles and register arrays have static sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from llmcc.kernels.flash_attention import NEG_LARGE, AttentionSpec, KeyWalk, attention_prim_func, axes_index

__all__ = ["ARCHS", "SMEM_LIMIT", "CudaTiles", "cuda_tiles", "flash_attention_cuda", "shared_memory_bytes",
           "smem_budget"]

ARCHS = ("sm_80", "sm_86", "sm_87", "sm_89", "sm_90")
SMEM_LIMIT = 48 * 1024  # static __shared__ per block: the most a kernel may declare without opting in at launch
RESIDENT_BLOCKS = 3  # blocks per SM the tiles leave room for (latency hiding across blocks' barriers)
WARP = 32
FULL_MASK = 0xFFFFFFFF
DECODE_MAX_ROWS = 8  # static q_len up to this uses the split-key decode mapping


@dataclass(frozen=True)
class CudaTiles:
    """One kernel's thread mapping.

    ``prefill``: TQ query rows and TK keys per tile; ``threads = (TQ / RQ) * TX`` with ``TX = TK / RK`` lanes per
    row group; each thread owns RQ rows x RK keys of the score tile.
    ``decode``: TQ (= q_len) rows, ``threads = 32 * NW``, each warp scoring RK keys of each TK = NW * RK key tile.
    """

    mode: str  # "prefill" or "decode"
    tq: int
    tk: int
    threads: int
    rq: int
    rk: int
    why: str = field(default="", compare=False)

    @property
    def tx(self) -> int:
        """prefill: lanes sharing one row group (a power of two dividing 32)."""
        return self.tk // self.rk

    @property
    def ny(self) -> int:
        """prefill: row groups (threadIdx.y)."""
        return self.threads // self.tx

    @property
    def warps(self) -> int:
        return self.threads // WARP

    @property
    def kg(self) -> int:
        """decode: lanes per key in the score phase."""
        return WARP // self.rk


def _esize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _decode_pad(spec: AttentionSpec, kg: int) -> int:
    # Key rows of the K tile are read by KG-lane groups at the same offset: a row stride of KG (mod the 128-byte bank
    # period) puts the RK rows one warp reads side by side in the 32 banks.
    return (kg - spec.head_dim) % (128 // _esize(spec.dtype))


def shared_memory_bytes(spec: AttentionSpec, tiles: CudaTiles) -> int:
    """Static shared memory the kernel for ``spec`` declares with ``tiles``."""
    es, d, dv = _esize(spec.dtype), spec.head_dim, spec.value_dim
    if tiles.mode == "prefill":
        dp = d + 4 // es  # one 4-byte word of padding per row: rows at an odd word stride, no bank conflicts
        return tiles.tq * dp * es + tiles.tk * dp * es + tiles.tk * dv * es + tiles.tq * (tiles.tk + 1) * 4
    dpk = d + _decode_pad(spec, tiles.kg)
    nw = tiles.warps
    return (tiles.tq * d * 4 + tiles.tk * dpk * es + tiles.tk * dv * es
            + nw * tiles.tq * dv * 4 + 2 * nw * tiles.tq * 4)


def smem_budget(arch: str) -> int:
    """Shared memory one block may declare on ``arch`` (the target registry's CudaArch): 48 KB, or less where the SM
    holds too little for RESIDENT_BLOCKS blocks of it (32 KB on sm_86 / sm_89, 100 KB per SM)."""
    from llmcc.targets import cuda_arch

    return cuda_arch(arch).smem_budget(RESIDENT_BLOCKS)


def cuda_tiles(spec: AttentionSpec, arch: str = "sm_80") -> CudaTiles:
    """The tile config for ``spec`` on ``arch``: a base by head dim and dtype, shrunk until it fits shared memory."""
    if arch not in ARCHS:
        raise ValueError(f"unsupported CUDA architecture {arch!r}: expected one of {', '.join(ARCHS)}")
    budget = smem_budget(arch)
    dmax, wide = max(spec.head_dim, spec.value_dim), spec.dtype == "float32"
    if spec.q_len is not None and spec.q_len <= DECODE_MAX_ROWS:
        base = CudaTiles("decode", tq=spec.q_len, tk=64, threads=256, rq=1, rk=8,
                         why="decode: 8 warps split the keys, 8 keys per warp per tile amortise its 2 barriers")
    elif dmax <= 64:
        base = (CudaTiles("prefill", 64, 32, 128, 4, 4, why="fp32 d<=64: 4x4 score tiles, 64 rows share each K/V tile")
                if wide else
                CudaTiles("prefill", 64, 64, 256, 4, 4, why="16-bit d<=64: half-size tiles allow 64 keys per tile"))
    elif dmax <= 128:
        base = (CudaTiles("prefill", 32, 16, 128, 2, 2, why="fp32 d<=128: Q+K+V tiles of 128 floats fill 48 KB")
                if wide else
                CudaTiles("prefill", 64, 32, 128, 4, 4, why="16-bit d<=128: 4x4 score, 4x16 output tiles per thread"))
    else:
        base = (CudaTiles("prefill", 16, 8, 128, 1, 1, why="fp32 d>128: one row per thread, 8 keys per tile")
                if wide else
                CudaTiles("prefill", 32, 16, 128, 2, 2, why="16-bit d>128: 2x2 score tiles keep shared memory < 48 KB"))
    t = base
    while shared_memory_bytes(spec, t) > budget:
        if t.rk > 1:  # fewer keys per tile (per thread, or per warp when decoding)
            t = replace(t, tk=t.tk // 2, rk=t.rk // 2)
        elif t.mode == "prefill" and t.rq > 1:  # fewer rows per thread
            t = replace(t, tq=t.tq // 2, rq=t.rq // 2)
        elif t.mode == "prefill" and t.threads > t.tx:  # fewer row groups
            t = replace(t, tq=t.tq // 2, threads=t.threads // 2)
        elif t.mode == "decode" and t.threads > WARP:  # fewer warps
            t = replace(t, tk=t.tk // 2, threads=t.threads // 2)
        else:
            raise ValueError(f"no tile config of attention {spec} fits {budget} bytes of shared memory")
    if t != base:
        t = replace(t, why=f"{base.why}; shrunk to fit {budget // 1024} KB of shared memory")
    return t


def _ceil_div(a, b):
    """``ceil(a / b)`` as an expression (a script-level variable outside the thread bindings would be a host
    variable the kernel cannot see)."""
    return (a + b - 1) // b


def _vec_width(n: int, dtype: str) -> int:
    """Elements per 16-byte vector load along a contiguous axis of length ``n`` (1 when ``n`` is odd)."""
    v = 16 // _esize(dtype)
    while n % v:
        v //= 2
    return v


def flash_attention_cuda(spec: AttentionSpec, arch: str = "sm_80", tiles: CudaTiles | None = None):
    """The CUDA kernel for ``spec`` on ``arch`` (``"sm_80"`` .. ``"sm_90"``), same signature as the CPU kernel."""
    problem = spec.check() or ("a block layout: this kernel walks every key tile (block-sparse sites run the "
                                "Triton kernel, or this one with the mask as a bias)" if spec.block_layout else None)
    if problem:
        raise ValueError(f"cannot build attention {spec}: {problem}")
    tiles = tiles or cuda_tiles(spec, arch)
    if shared_memory_bytes(spec, tiles) > SMEM_LIMIT:
        raise ValueError(f"tiles {tiles} need {shared_memory_bytes(spec, tiles)} bytes of shared memory")
    if tiles.mode == "decode":
        return _decode_kernel(spec, tiles)
    return _prefill_kernel(spec, tiles)


# ------------------------------------------------------------------------------------------------------------------
# Shared pieces


class _Ctx:
    """Constants and PrimExpr helpers both kernels use."""

    def __init__(self, spec: AttentionSpec):
        from tvm import tirx

        self.tirx = tirx
        self.spec = spec
        self.H, self.HKV, self.D, self.DV, self.G = (spec.num_heads, spec.num_kv_heads, spec.head_dim,
                                                     spec.value_dim, spec.groups)
        self.dtype = spec.dtype
        self.scale = float(spec.scale)
        self.causal = bool(spec.causal or spec.window)
        self.walk = KeyWalk(spec)
        self.kl = spec.k_layout

    def bias_term(self, Bias, b, h, i, j):
        tirx = self.tirx
        if self.spec.bias is None:
            return tirx.FloatImm("float32", 0.0)
        bb, bh, bq = self.spec.bias
        zero = tirx.IntImm("int64", 0)
        return tirx.Cast("float32", Bias[zero if bb else b, zero if bh else h, zero if bq else i, j])

    @staticmethod
    def shfl_xor(value, lane_mask):
        from tvm import tirx
        from tvm.tirx import op

        return op.tvm_warp_shuffle_xor(tirx.const(FULL_MASK, "uint32"), value, lane_mask, WARP, WARP)

    @staticmethod
    def shfl(value, src_lane):
        from tvm import tirx
        from tvm.tirx import op

        return op.tvm_warp_shuffle(tirx.const(FULL_MASK, "uint32"), value, src_lane, WARP, WARP)


def _loaders(c: _Ctx, nt: int):
    """T.macro tile copies global -> shared for ``nt`` threads (``tid`` their linear index).

    The shared tiles are flat buffers with an explicit row stride (the padding a 2-D buffer would have is removed by
    TVM's buffer compaction, which shrinks a buffer to the region the code touches). Index arithmetic stays inline,
    not in script variables, so that TVM's codegen can prove the 16-byte alignment of the vector loads.
    """
    from tvm.script import tirx as T

    D, DV, dtype = c.D, c.DV, c.dtype
    ql, vl = c.spec.q_layout, c.spec.v_layout
    vq, vv = _vec_width(D, dtype), _vec_width(DV, dtype)
    nq, nv = D // vq, DV // vv  # vectors per row

    def iters(n):
        return (n + nt - 1) // nt

    @T.macro
    def load_q(Qs, stride, Q, tmp, tid, b, h, i0, SQ, TQ):
        # Qs[r * stride + d] = Q[b, h, i0 + r, d] (rows past Sq: the last row, never stored)
        for it in T.unroll(iters(TQ * nq)):
            if it * nt + tid < TQ * nq:
                for v in T.vectorized(vq):
                    tmp[v] = Q[axes_index(ql, b, h, T.min(i0 + (it * nt + tid) // nq, SQ - 1),
                                           (it * nt + tid) % nq * vq + v)]
                for v in T.unroll(vq):
                    Qs[(it * nt + tid) // nq * stride + (it * nt + tid) % nq * vq + v] = tmp[v]

    @T.macro
    def load_k_rows(Ks, stride, K, tmp, tid, b, hk, j0, SKV, TK):
        # k in bnsd / bsnd: d is contiguous
        for it in T.unroll(iters(TK * nq)):
            if it * nt + tid < TK * nq:
                for v in T.vectorized(vq):
                    tmp[v] = K[axes_index(c.kl, b, hk, T.min(j0 + (it * nt + tid) // nq, SKV - 1),
                                           (it * nt + tid) % nq * vq + v)]
                for v in T.unroll(vq):
                    Ks[(it * nt + tid) // nq * stride + (it * nt + tid) % nq * vq + v] = tmp[v]

    @T.macro
    def load_k_cols(Ks, stride, K, tmp, tid, b, hk, j0, SKV, TK):
        # k given transposed ([B, Hkv, D, Skv], keys contiguous): consecutive threads take consecutive keys
        for it in T.unroll(iters(TK * D)):
            if it * nt + tid < TK * D:
                Ks[(it * nt + tid) % TK * stride + (it * nt + tid) // TK] = K[
                    b, hk, (it * nt + tid) // TK, T.min(j0 + (it * nt + tid) % TK, SKV - 1)]

    @T.macro
    def load_v(Vs, V, tmp, tid, b, hk, j0, SKV, TK):
        for it in T.unroll(iters(TK * nv)):
            if it * nt + tid < TK * nv:
                for v in T.vectorized(vv):
                    Vs[(it * nt + tid) // nv, (it * nt + tid) % nv * vv + v] = V[axes_index(
                        vl, b, hk, T.min(j0 + (it * nt + tid) // nv, SKV - 1), (it * nt + tid) % nv * vv + v)]

    load_k = load_k_cols if c.kl == "bnds" else load_k_rows
    return load_q, load_k, load_v, vq


def _wrap(c: _Ctx, body):
    """The PrimFunc around ``body``: the CPU kernel's exact signature (flash_attention.attention_prim_func)."""
    return attention_prim_func(c.spec, body)


# ------------------------------------------------------------------------------------------------------------------
# Prefill: register-tiled rows x keys per thread


def _prefill_kernel(spec: AttentionSpec, t: CudaTiles):
    from tvm.script import tirx as T

    c = _Ctx(spec)
    H, G, D, DV, dtype, scale = c.H, c.G, c.D, c.DV, c.dtype, c.scale
    ol = spec.out_layout
    TQ, TK, TX, NY, RQ, RK = t.tq, t.tk, t.tx, t.ny, t.rq, t.rk
    assert TX & (TX - 1) == 0 and WARP % TX == 0 and NY * RQ == TQ and TX * RK == TK, t
    NT = NY * TX
    NC = (DV + TX - 1) // TX  # output columns per thread
    LOG_TX = TX.bit_length() - 1
    DP = D + 4 // _esize(dtype)  # Q / K row stride: an odd number of 4-byte words
    PP = TK + 1
    load_q, load_k, load_v, VEC = _loaders(c, NT)
    reverse = c.causal  # longest causal tiles first

    @T.macro
    def body(Q, K, V, Bias, Rows, Cols, O, B, SQ, SKV):
        for bx in T.thread_binding(T.max(B * H * _ceil_div(SQ, TQ), T.int64(1)), thread="blockIdx.x"):
            for ty in T.thread_binding(NY, thread="threadIdx.y"):
                for tx in T.thread_binding(TX, thread="threadIdx.x"):
                    if bx < B * H * _ceil_div(SQ, TQ):  # an empty launch (Sq or B = 0) is refused by CUDA
                        Qs = T.decl_buffer((TQ * DP,), dtype, scope="shared")  # row stride DP
                        Ks = T.decl_buffer((TK * DP,), dtype, scope="shared")
                        Vs = T.decl_buffer((TK, DV), dtype, scope="shared")
                        Ps = T.decl_buffer((TQ * PP,), "float32", scope="shared")  # row stride PP
                        tmp = T.decl_buffer((VEC,), dtype, scope="local")
                        s = T.decl_buffer((RQ * RK,), "float32", scope="local")
                        acc = T.decl_buffer((RQ * NC,), "float32", scope="local")
                        m = T.decl_buffer((RQ,), "float32", scope="local")
                        l = T.decl_buffer((RQ,), "float32", scope="local")
                        qv = T.decl_buffer((RQ,), "float32", scope="local")
                        kv = T.decl_buffer((RK,), "float32", scope="local")
                        vv = T.decl_buffer((NC,), "float32", scope="local")
                        red = T.decl_buffer((1,), "float32", scope="local")
                        bh = bx // _ceil_div(SQ, TQ)
                        b = bh // H
                        h = bh % H
                        hk = h // G
                        qt = (_ceil_div(SQ, TQ) - 1 - bx % _ceil_div(SQ, TQ)) if reverse else bx % _ceil_div(SQ, TQ)
                        i0 = qt * TQ
                        off = SKV - SQ
                        tid = ty * TX + tx
                        load_q(Qs, DP, Q, tmp, tid, b, h, i0, SQ, TQ)
                        for a in T.unroll(RQ):
                            m[a] = T.float32(NEG_LARGE)
                            l[a] = T.float32(0)
                            for e in T.unroll(NC):
                                acc[a * NC + e] = T.float32(0)
                        for kt in T.serial(c.walk.num_tiles(i0, TQ, off, SKV, TK)):
                            j0 = c.walk.tile_start(kt, i0, TQ, off, SKV, TK)
                            load_k(Ks, DP, K, tmp, tid, b, hk, j0, SKV, TK)
                            load_v(Vs, V, tmp, tid, b, hk, j0, SKV, TK)
                            T.tvm_storage_sync("shared")
                            # scores: RQ rows x RK keys per thread
                            for u in T.unroll(RQ * RK):
                                s[u] = T.float32(0)
                            for d in T.serial(D):
                                for a in T.unroll(RQ):
                                    qv[a] = T.Cast("float32", Qs[(ty * RQ + a) * DP + d])
                                for k in T.unroll(RK):
                                    kv[k] = T.Cast("float32", Ks[(tx + TX * k) * DP + d])
                                for a in T.unroll(RQ):
                                    for k in T.unroll(RK):
                                        s[a * RK + k] = s[a * RK + k] + qv[a] * kv[k]
                            # online softmax over the tile
                            for a in T.unroll(RQ):
                                i = i0 + ty * RQ + a
                                red[0] = T.float32(NEG_LARGE)
                                for k in T.unroll(RK):
                                    j = j0 + tx + TX * k
                                    s[a * RK + k] = T.Select(
                                        c.walk.visible(j, i + off, SKV, off, kt, TK),
                                        s[a * RK + k] * T.float32(scale)
                                        + c.bias_term(Bias, b, h, T.min(i, SQ - 1), T.min(j, SKV - 1)),
                                        T.float32(-math.inf))
                                    red[0] = T.max(red[0], s[a * RK + k])
                                for o in T.unroll(LOG_TX):
                                    red[0] = T.max(red[0], c.shfl_xor(red[0], 1 << o))
                                red[0] = T.max(red[0], m[a])  # the new running maximum
                                alpha = T.exp(m[a] - red[0])
                                m[a] = red[0]
                                l[a] = l[a] * alpha
                                for e in T.unroll(NC):
                                    acc[a * NC + e] = acc[a * NC + e] * alpha
                                for k in T.unroll(RK):
                                    s[a * RK + k] = T.exp(s[a * RK + k] - m[a])
                                    l[a] = l[a] + s[a * RK + k]
                                    Ps[(ty * RQ + a) * PP + tx + TX * k] = s[a * RK + k]
                            T.tvm_storage_sync("shared")
                            # acc += P @ V
                            for jj in T.serial(TK):
                                for e in T.unroll(NC):
                                    vv[e] = T.Cast("float32", Vs[jj, T.min(tx + TX * e, DV - 1)])
                                for a in T.unroll(RQ):
                                    for e in T.unroll(NC):
                                        acc[a * NC + e] = acc[a * NC + e] + Ps[(ty * RQ + a) * PP + jj] * vv[e]
                            T.tvm_storage_sync("shared")
                        for a in T.unroll(RQ):
                            red[0] = l[a]
                            for o in T.unroll(LOG_TX):
                                red[0] = red[0] + c.shfl_xor(red[0], 1 << o)
                            if i0 + ty * RQ + a < SQ:
                                for e in T.unroll(NC):
                                    if tx + TX * e < DV:
                                        O[axes_index(ol, b, h, i0 + ty * RQ + a, tx + TX * e)] = T.Cast(
                                            dtype,
                                            T.Select(red[0] > T.float32(0), acc[a * NC + e] / red[0], T.float32(0)))

    return _wrap(c, body)


# ------------------------------------------------------------------------------------------------------------------
# Decode: keys split over warps, partial states combined in shared memory


def _decode_kernel(spec: AttentionSpec, t: CudaTiles):
    from tvm.script import tirx as T

    c = _Ctx(spec)
    H, G, D, DV, dtype, scale = c.H, c.G, c.D, c.DV, c.dtype, c.scale
    ql, ol = spec.q_layout, spec.out_layout
    TQ, TK, RK, KG, NW = t.tq, t.tk, t.rk, t.kg, t.warps
    assert NW * RK == TK and RK * KG == WARP, t
    NT = NW * WARP
    NCD = (DV + WARP - 1) // WARP  # value columns per lane
    NTD = (D + KG - 1) // KG  # head-dim products per lane per key
    LOG_KG = KG.bit_length() - 1
    DPK = D + _decode_pad(spec, KG)
    _, load_k, load_v, VEC = _loaders(c, NT)

    def q_scaled(Q, b, h, i, d, SQ):
        """q[b, h, i, d] * scale in float32 (rows past Sq: the last row)."""
        return c.tirx.Cast("float32", Q[axes_index(ql, b, h, c.tirx.min(i, SQ - 1), d)]) * c.tirx.FloatImm(
            "float32", scale)

    @T.macro
    def body(Q, K, V, Bias, Rows, Cols, O, B, SQ, SKV):
        for bx in T.thread_binding(T.max(B * H * _ceil_div(SQ, TQ), T.int64(1)), thread="blockIdx.x"):
            for w in T.thread_binding(NW, thread="threadIdx.y"):
                for lane in T.thread_binding(WARP, thread="threadIdx.x"):
                    if bx < B * H * _ceil_div(SQ, TQ):  # an empty launch (Sq or B = 0) is refused by CUDA
                        Qs = T.decl_buffer((TQ, D), "float32", scope="shared")
                        Ks = T.decl_buffer((TK * DPK,), dtype, scope="shared")  # row stride DPK
                        Vs = T.decl_buffer((TK, DV), dtype, scope="shared")
                        Ms = T.decl_buffer((NW, TQ), "float32", scope="shared")
                        Ls = T.decl_buffer((NW, TQ), "float32", scope="shared")
                        Os = T.decl_buffer((NW, TQ, DV), "float32", scope="shared")
                        tmp = T.decl_buffer((VEC,), dtype, scope="local")
                        s = T.decl_buffer((TQ,), "float32", scope="local")
                        pk = T.decl_buffer((TQ,), "float32", scope="local")
                        m = T.decl_buffer((TQ,), "float32", scope="local")
                        l = T.decl_buffer((TQ,), "float32", scope="local")
                        acc = T.decl_buffer((TQ * NCD,), "float32", scope="local")
                        red = T.decl_buffer((1,), "float32", scope="local")
                        bh = bx // _ceil_div(SQ, TQ)
                        b = bh // H
                        h = bh % H
                        hk = h // G
                        i0 = bx % _ceil_div(SQ, TQ) * TQ
                        off = SKV - SQ
                        tid = w * WARP + lane
                        kk = lane // KG  # this lane's key within the warp's RK keys
                        kg = lane % KG
                        jj = w * RK + kk
                        for it in T.serial(_ceil_div(TQ * D, NT)):
                            if it * NT + tid < TQ * D:
                                Qs[(it * NT + tid) // D, (it * NT + tid) % D] = q_scaled(
                                    Q, b, h, i0 + (it * NT + tid) // D, (it * NT + tid) % D, SQ)
                        for r in T.unroll(TQ):
                            m[r] = T.float32(NEG_LARGE)
                            l[r] = T.float32(0)
                            for e in T.unroll(NCD):
                                acc[r * NCD + e] = T.float32(0)
                        for kt in T.serial(c.walk.num_tiles(i0, TQ, off, SKV, TK)):
                            j0 = c.walk.tile_start(kt, i0, TQ, off, SKV, TK)
                            load_k(Ks, DPK, K, tmp, tid, b, hk, j0, SKV, TK)
                            load_v(Vs, V, tmp, tid, b, hk, j0, SKV, TK)
                            T.tvm_storage_sync("shared")
                            for r in T.unroll(TQ):
                                s[r] = T.float32(0)
                            for u in T.serial(NTD):
                                for r in T.unroll(TQ):
                                    s[r] = s[r] + T.Select(
                                        kg + KG * u < D,
                                        Qs[r, T.min(kg + KG * u, D - 1)]
                                        * T.Cast("float32", Ks[jj * DPK + T.min(kg + KG * u, D - 1)]),
                                        T.float32(0))
                            for r in T.unroll(TQ):
                                for o in T.unroll(LOG_KG):  # the dot product over the key's KG lanes
                                    s[r] = s[r] + c.shfl_xor(s[r], 1 << o)
                                s[r] = T.Select(
                                    c.walk.visible(j0 + jj, i0 + r + off, SKV, off, kt, TK),
                                    s[r] + c.bias_term(Bias, b, h, T.min(i0 + r, SQ - 1), T.min(j0 + jj, SKV - 1)),
                                    T.float32(-math.inf))
                                red[0] = s[r]
                                for o in T.unroll(LOG_KG, 5):  # the maximum over the warp's RK keys
                                    red[0] = T.max(red[0], c.shfl_xor(red[0], 1 << o))
                                red[0] = T.max(red[0], m[r])
                                alpha = T.exp(m[r] - red[0])
                                m[r] = red[0]
                                s[r] = T.exp(s[r] - red[0])  # p, the same on the key's KG lanes
                                l[r] = l[r] * alpha + T.Select(kg == 0, s[r], T.float32(0))
                                for e in T.unroll(NCD):
                                    acc[r * NCD + e] = acc[r * NCD + e] * alpha
                            for k in T.unroll(RK):
                                for r in T.unroll(TQ):
                                    pk[r] = c.shfl(s[r], k * KG)
                                for e in T.unroll(NCD):
                                    for r in T.unroll(TQ):
                                        acc[r * NCD + e] = acc[r * NCD + e] + pk[r] * T.Cast(
                                            "float32", Vs[w * RK + k, T.min(lane + WARP * e, DV - 1)])
                            T.tvm_storage_sync("shared")
                        # each warp's (m, l, acc) to shared memory, then one output element per thread
                        for r in T.unroll(TQ):
                            red[0] = l[r]
                            for o in T.unroll(5):
                                red[0] = red[0] + c.shfl_xor(red[0], 1 << o)
                            if lane == 0:
                                Ms[w, r] = m[r]
                                Ls[w, r] = red[0]
                            for e in T.unroll(NCD):
                                if lane + WARP * e < DV:
                                    Os[w, r, lane + WARP * e] = acc[r * NCD + e]
                        T.tvm_storage_sync("shared")
                        for it in T.serial(_ceil_div(TQ * DV, NT)):
                            if it * NT + tid < TQ * DV:  # noqa: SIM102 (TVMScript has no `and` of PrimExprs)
                                if i0 + (it * NT + tid) // DV < SQ:
                                    red[0] = T.float32(NEG_LARGE)
                                    for ww in T.serial(NW):
                                        red[0] = T.max(red[0], Ms[ww, (it * NT + tid) // DV])
                                    s[0] = T.float32(0)
                                    pk[0] = T.float32(0)
                                    for ww in T.serial(NW):
                                        s[0] = s[0] + Ls[ww, (it * NT + tid) // DV] * T.exp(
                                            Ms[ww, (it * NT + tid) // DV] - red[0])
                                        pk[0] = pk[0] + Os[ww, (it * NT + tid) // DV, (it * NT + tid) % DV] * T.exp(
                                            Ms[ww, (it * NT + tid) // DV] - red[0])
                                    O[axes_index(ol, b, h, i0 + (it * NT + tid) // DV, (it * NT + tid) % DV)] = T.Cast(
                                        dtype, T.Select(s[0] > T.float32(0), pk[0] / s[0], T.float32(0)))

    return _wrap(c, body)
