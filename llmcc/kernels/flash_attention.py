"""Flash attention: ``out = softmax(q @ k^T * scale + bias + mask) @ v`` in one tiled kernel with an online softmax.

Sections: ``AttentionSpec`` (what the fused op carries: kind, layouts, heads, scale, window, bias), the numpy
reference ``attention_reference``, the CPU kernel ``flash_attention_cpu`` with its tile config, and
``flash_attention_kernel`` (the validating wrapper the fuse_attention pass calls: it checks the spec and picks the
target's kernel; the CUDA one is in ``flash_attention_cuda.py``).

The kernel never holds the ``[Sq, Skv]`` score matrix: per (batch, head, tile of TQ query rows) it walks the keys in
tiles of TK, keeps the running row maximum ``m``, the running denominator ``l`` and the unnormalised output ``acc``,
and rescales them by ``exp(m_old - m_new)`` when a tile raises the maximum. Memory beyond q/k/v/out is
O(TQ * (TK + Dv)) per thread, whatever the sequence length.

Positions are bottom-right aligned: query row ``i`` sits at key position ``i + Skv - Sq`` (a decode step's one
query is the newest token). ``causal`` hides keys after that position, ``window`` W hides keys ``W`` or more behind
it (HF's sliding window: key j is visible from position p iff ``p - W < j <= p``). Tiles wholly outside are skipped,
so a causal kernel does about half the work and a windowed one O(Sq * W). A ``band`` w (Longformer's local
attention) shows keys within w of the position on both sides; with ``global_keys`` the ``Skv - Sq`` keys in front of
the first position are Longformer's gathered global tokens, which every row sees: the kernel walks their tiles, then
the band's, O(Sq * (G + w)) work. A key hidden by causality, the window or the band
gets probability exactly 0; a key hidden by an additive bias gets ``exp(bias - max)`` like in the unfused graph, so
with HF's finite ``finfo.min`` masks the two agree except on rows that every key is masked from (padding rows,
whose output nobody reads).

A spec with a ``block_layout`` (block_q, block_k, layout heads) takes the layout's CSR (``layout_rows`` [L * nq + 1],
``layout_cols``, int32; ``kernels.block_layout``) and walks only the key tiles listed for its query tile: the fusion
pass builds it from a constant mask at the kernel's own tiles and still passes the mask, so the skipped tiles are
exactly those the mask hides wholly.

Layouts (strings of the axes in memory order; ``b`` batch, ``n`` head, ``s`` sequence, ``d`` head dim): q and v are
``bnsd`` or ``bsnd``; k is one of those or ``bnds`` (k^T, as the exported graph computes it); out is ``bnsd`` or
``bsnd``. The bias is ``[Bb, Hb, Sqb, Skv]`` with each of the first three dims either full or 1 (broadcast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Q_LAYOUTS = ("bnsd", "bsnd")
K_LAYOUTS = ("bnsd", "bsnd", "bnds")
NEG_LARGE = -3.0e38  # the running maximum's start: finite, so exp(m_old - m_new) never computes inf - inf


@dataclass(frozen=True)
class AttentionSpec:
    """One fused attention site, as the kernel needs it (everything static except B, Sq, Skv)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_dim: int
    scale: float
    dtype: str = "float32"
    causal: bool = False
    window: int | None = None
    bias: tuple[bool, bool, bool] | None = None  # per leading bias dim (B, H, Sq): True when it is broadcast (1)
    q_layout: str = "bnsd"
    k_layout: str = "bnsd"
    v_layout: str = "bnsd"
    out_layout: str = "bnsd"
    q_len: int | None = None  # static query length (a decode step's 1), None when symbolic
    # (block_q, block_k, layout_heads): the kernel walks only the key blocks a CSR layout lists per query block
    # (layout_rows, layout_cols: int32 inputs; kernels.block_layout); layout_heads is 1 or num_heads
    block_layout: tuple[int, int, int] | None = None
    # Longformer's local attention: key j is visible from position p iff |j - p| <= band (both sides, not causal)
    band: int | None = None
    # with a band: the Skv - Sq keys in front of the first query's position are global keys, visible to every row
    # (Longformer's gathered global tokens; the band covers the keys from there on)
    global_keys: bool = False

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def kind(self) -> str:
        parts = (["block_sparse"] if self.block_layout else []) + \
                (["sliding_window"] if self.window or self.band is not None else ["causal"] if self.causal else []) + \
                (["global"] if self.global_keys else []) + \
                (["mask"] if self.bias is not None else []) + (["gqa"] if self.groups > 1 else [])
        return "+".join(parts) or "dense"

    def check(self) -> str | None:
        """Why this spec cannot be built, or None."""
        if self.num_heads % self.num_kv_heads:
            return f"{self.num_heads} query heads are not a multiple of {self.num_kv_heads} kv heads"
        if self.q_layout not in Q_LAYOUTS or self.v_layout not in Q_LAYOUTS or self.out_layout not in Q_LAYOUTS:
            return f"layouts q={self.q_layout} v={self.v_layout} out={self.out_layout}: each must be one of {Q_LAYOUTS}"
        if self.k_layout not in K_LAYOUTS:
            return f"k layout {self.k_layout} is not one of {K_LAYOUTS}"
        if self.window is not None and self.window < 1:
            return f"window {self.window} < 1"
        if self.band is not None and (self.band < 0 or self.causal or self.window):
            return f"band {self.band}: a two-sided band is >= 0 and takes no causal flag or causal window"
        if self.global_keys and self.band is None:
            return "global keys are the keys in front of a band: they need a band"
        if self.dtype not in ("float32", "float16", "bfloat16"):
            return f"dtype {self.dtype} is not a float type the kernel computes in"
        if self.block_layout is not None:
            bq, bk, heads = self.block_layout
            if min(bq, bk) < 1 or heads not in (1, self.num_heads):
                return f"block layout {self.block_layout}: blocks >= 1 and layout heads 1 or {self.num_heads}"
            if self.causal or self.window or self.band is not None or self.q_len is None:
                return "a block layout carries the whole mask of a static query length (no causal flag or window)"
        return None


# ----------------------------------------------------------------------------------------- reference (numpy)


def to_canonical(x: np.ndarray, layout: str) -> np.ndarray:
    """``x`` in ``layout`` as [B, H, S, D]."""
    return np.transpose(x, [layout.index(c) for c in "bnsd"])


def from_canonical(x: np.ndarray, layout: str) -> np.ndarray:
    return np.transpose(x, ["bnsd".index(c) for c in layout])


def visible(spec: AttentionSpec, sq: int, skv: int) -> np.ndarray:
    """[Sq, Skv] bool: which keys causality and the window leave to each query row. Only when Sq <= Skv: with more
    queries than keys the rows have no position to align to the keys (not a self-attention or cache layout), so
    the kernel hides nothing itself and the bias tensor, which the fusion pass always passes, does the masking."""
    pos = np.arange(sq)[:, None] + (skv - sq)
    j = np.arange(skv)[None, :]
    ok = np.ones((sq, skv), bool)
    if (spec.causal or spec.window) and sq <= skv:
        ok &= j <= pos
    if spec.window and sq <= skv:
        ok &= j > pos - spec.window
    if spec.band is not None and sq <= skv:
        in_band = np.abs(j - pos) <= spec.band
        ok &= (j < skv - sq) | (in_band & (j >= skv - sq)) if spec.global_keys else in_band
    return ok


def attention_reference(spec: AttentionSpec, q, k, v, bias=None) -> np.ndarray:
    """The plain computation in float64: the score matrix, a softmax, the value product."""
    qc = to_canonical(np.asarray(q, np.float64), spec.q_layout)
    kc = to_canonical(np.asarray(k, np.float64), "bnsd" if spec.k_layout == "bnds" else spec.k_layout)
    if spec.k_layout == "bnds":
        kc = np.asarray(k, np.float64).transpose(0, 1, 3, 2)
    vc = to_canonical(np.asarray(v, np.float64), spec.v_layout)
    kc, vc = np.repeat(kc, spec.groups, axis=1), np.repeat(vc, spec.groups, axis=1)
    s = qc @ kc.transpose(0, 1, 3, 2) * spec.scale
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    ok = visible(spec, s.shape[2], s.shape[3])
    s = np.where(ok, s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p = np.where(ok, p, 0.0)
    out = (p / p.sum(axis=-1, keepdims=True)) @ vc
    return from_canonical(out, spec.out_layout).astype(spec.dtype if spec.dtype != "bfloat16" else "float32")


# ----------------------------------------------------------------------------------------- CPU kernel (TIR)


@dataclass(frozen=True)
class CpuTiles:
    """Query rows per task (TQ), keys per step (TK, a multiple of the vector width), rows per register block."""

    tq: int
    tk: int
    rows: int


def cpu_tiles(spec: AttentionSpec) -> CpuTiles:
    """Measured on AVX2 (2 cores, causal, seq 1024; ``tools/bench_attention.py --sweep``, bench/attention.md):
    32 x 32 score tiles beat 16 x 16 by 1.3-1.5x (the key tile's copy and the rescale amortise over more rows);
    keys per step must be a multiple of 16 (two vectors) or the score loop stops vectorizing (2-3x slower). The
    value product keeps ``rows`` x Dv accumulators in registers: two rows up to Dv = 32, one row above (16 ymm
    registers). 64-row tiles are a few percent faster at seq 1024 and waste more rows on short prompts."""
    rows = 2 if spec.value_dim <= 32 else 1
    if spec.q_len is not None and spec.q_len < 32:  # a decode step's single row: no padding rows in its tile
        return CpuTiles(tq=spec.q_len, tk=32, rows=1)
    return CpuTiles(tq=32, tk=32, rows=rows)


def axes_index(layout: str, b, n, s, d):
    """(b, n, s, d) in ``layout``'s memory order."""
    where = {"b": b, "n": n, "s": s, "d": d}
    return tuple(where[c] for c in layout)


class KeyWalk:
    """The keys a tile of query rows walks and sees, as PrimExprs (the CPU and CUDA kernels share it): causality
    and the causal window bound one range of key tiles; a band bounds it on both sides; global keys in front of a
    band are walked first, as tiles of their own (``prefix_tiles``), then the band's range. Positions are bottom-right
    aligned (``off = Skv - Sq``); with Sq > Skv nothing is hidden (see ``visible``)."""

    def __init__(self, spec: AttentionSpec):
        self.causal = bool(spec.causal or spec.window)
        self.window = int(spec.window or 0)
        self.band = spec.band
        self.global_keys = bool(spec.global_keys)

    def prefix_tiles(self, off, tk):
        from tvm import tirx

        zero = tirx.IntImm("int64", 0)
        return tirx.Select(off > 0, (off + tk - 1) // tk, zero) if self.global_keys else zero

    def kv_range(self, i0, tq, off, skv):
        """The range of keys rows i0 .. i0+tq-1 may see, global keys aside: [lo, hi)."""
        from tvm import tirx

        zero = tirx.IntImm("int64", 0)
        if self.band is not None:
            first = tirx.max(off, zero) if self.global_keys else zero
            lo = tirx.Select(off >= 0, tirx.max(first, i0 + off - self.band), zero)
            hi = tirx.Select(off >= 0, tirx.min(skv, i0 + tq + off + self.band), skv)
            return lo, hi
        hi = tirx.Select(off >= 0, tirx.min(skv, i0 + tq + off), skv) if self.causal else skv
        lo = tirx.Select(off >= 0, tirx.max(zero, i0 + off - self.window + 1), zero) if self.window else zero
        return lo, hi

    def num_tiles(self, i0, tq, off, skv, tk):
        from tvm import tirx

        lo, hi = self.kv_range(i0, tq, off, skv)
        return self.prefix_tiles(off, tk) + (tirx.max(hi - lo, tirx.IntImm("int64", 0)) + tk - 1) // tk

    def tile_start(self, kt, i0, tq, off, skv, tk):
        from tvm import tirx

        lo, _ = self.kv_range(i0, tq, off, skv)
        if not self.global_keys:
            return lo + kt * tk
        n = self.prefix_tiles(off, tk)
        return tirx.Select(kt < n, kt * tk, lo + (kt - n) * tk)

    def visible(self, j, pos, skv, off, kt, tk):
        """Key ``j`` for the row at position ``pos``, in key tile ``kt`` of the walk."""
        from tvm import tirx

        conds = [j < skv]
        unaligned = tirx.Not(off >= 0)
        if self.causal:
            conds.append(tirx.any(j <= pos, unaligned))
        if self.window:
            conds.append(tirx.any(j > pos - self.window, unaligned))
        if self.band is not None:
            in_band = tirx.all(j >= pos - self.band, j <= pos + self.band)
            if self.global_keys:  # a prefix tile sees global keys only (the band's tiles start at off or later)
                in_band = tirx.Select(kt < self.prefix_tiles(off, tk), j < off, in_band)
            conds.append(tirx.any(in_band, unaligned))
        return tirx.all(*conds)


def attention_prim_func(spec: AttentionSpec, body, *, attrs: dict | None = None):
    """The PrimFunc of every attention kernel for ``spec``, around ``body(Q, K, V, Bias, Rows, Cols, O, B, SQ,
    SKV)`` (a ``T.macro``): parameters ``(q, k, v, [bias], [layout_rows, layout_cols], out)`` with the bias only
    when ``spec.bias`` and the CSR layout only when ``spec.block_layout``; B, Sq and Skv symbolic int64.

    One signature for all kernels (CPU, CUDA, Triton launchers) so a site calls any of them alike. TVMScript fixes
    a function's parameters where it is written, so the function is written with all of them and the ones
    ``spec`` does not use are dropped after parsing (``body`` must not read them)."""
    from tvm import tirx
    from tvm.script import tirx as T

    H, HKV, D, DV, dtype = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.value_dim, spec.dtype
    ql, kl, vl, ol = spec.q_layout, spec.k_layout, spec.v_layout, spec.out_layout

    @T.prim_func(private=True)
    def flash_attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, bias_h: T.handle, rows_h: T.handle,
                        cols_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        B, SQ, SKV = T.int64(), T.int64(), T.int64()
        BB, BH, BQ = T.int64(), T.int64(), T.int64()
        NR, NNZ = T.int64(), T.int64()
        Q = T.match_buffer(q_h, axes_index(ql, B, H, SQ, D), dtype)
        K = T.match_buffer(k_h, axes_index(kl, B, HKV, SKV, D), dtype)
        V = T.match_buffer(v_h, axes_index(vl, B, HKV, SKV, DV), dtype)
        Bias = T.match_buffer(bias_h, (BB, BH, BQ, SKV), dtype)
        Rows = T.match_buffer(rows_h, (NR,), "int32")
        Cols = T.match_buffer(cols_h, (NNZ,), "int32")
        O = T.match_buffer(o_h, axes_index(ol, B, H, SQ, DV), dtype)
        body(Q, K, V, Bias, Rows, Cols, O, B, SQ, SKV)

    f = flash_attention
    keep = [0, 1, 2] + ([3] if spec.bias is not None else []) + ([4, 5] if spec.block_layout else []) + [6]
    params = [f.params[i] for i in keep]
    func = tirx.PrimFunc(params, f.body, f.ret_type, f.attrs)  # TVM 0.27: a param is its buffer
    return func.with_attrs(attrs) if attrs else func


def fast_exp(x):
    """exp(x) for float32 as a TIR expression that vectorizes: 2**n * p(r), x = n ln2 + r, |r| <= ln2 / 2, with
    Cephes' degree-7 polynomial (relative error ~1e-7). LLVM lowers T.exp to one libm call per element. Inputs
    below -88.38 (masked scores, -inf) give exactly 0."""
    from tvm import tirx

    f32 = lambda v: tirx.FloatImm("float32", v)  # noqa: E731
    x = tirx.max(tirx.min(x, f32(88.3762626647950)), f32(-88.3762626647949))
    n = tirx.floor(x * f32(1.44269504088896341) + f32(0.5))
    r = x - n * f32(0.693359375) - n * f32(-2.12194440e-4)  # ln2 in two parts: r stays exact
    y = f32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        y = y * r + f32(c)
    y = y * r * r + r + f32(1.0)
    pow2n = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n) + 127, 23))
    return y * pow2n


def flash_attention_cpu(spec: AttentionSpec, tiles: CpuTiles | None = None):
    """The CPU kernel for ``spec``: parallel over (batch, head, query tile), vectorized over keys and value dims."""
    from tvm import tirx
    from tvm.script import tirx as T

    tiles = tiles or cpu_tiles(spec)
    TQ, TK, RB = tiles.tq, tiles.tk, tiles.rows
    LANES = 8  # float32 lanes of an AVX2 register; TK is a multiple of it
    H, HKV, D, DV, G = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.value_dim, spec.groups
    dtype, acc_t = spec.dtype, "float32"
    scale = float(spec.scale)
    walk = KeyWalk(spec)
    ql, kl, vl, ol = spec.q_layout, spec.k_layout, spec.v_layout, spec.out_layout
    if spec.block_layout and spec.block_layout[:2] != (TQ, TK):
        raise ValueError(f"block layout {spec.block_layout[:2]} is not the CPU kernel's ({TQ}, {TK}) tiles")
    layout_heads = spec.block_layout[2] if spec.block_layout else 0

    def k_load(K, b, n, s, d):
        return K[axes_index(kl, b, n, s, d)]

    def bias_term(Bias, b, h, i, j):
        if spec.bias is None:
            return tirx.FloatImm(acc_t, 0.0)
        bb, bh, bq = spec.bias
        return tirx.Cast(acc_t, Bias[0 if bb else b, 0 if bh else h, 0 if bq else i, j])

    def layout_row(h, i0, n_qt):
        return (h if layout_heads > 1 else 0) * n_qt + i0 // TQ

    def key_tiles(Rows, h, i0, n_qt, off, SKV):
        """How many key tiles the query tile walks: those its layout row lists, else the walk's."""
        if layout_heads:
            r = layout_row(h, i0, n_qt)
            return tirx.Cast("int64", Rows[r + 1] - Rows[r])
        return walk.num_tiles(i0, TQ, off, SKV, TK)

    def key_tile_start(Rows, Cols, h, i0, n_qt, off, SKV, kt):
        if layout_heads:
            return tirx.Cast("int64", Cols[Rows[layout_row(h, i0, n_qt)] + tirx.Cast("int32", kt)]) * TK
        return walk.tile_start(kt, i0, TQ, off, SKV, TK)

    @T.macro
    def body(Q, K, V, Bias, Rows, Cols, O, B, SQ, SKV):
        n_qt = (SQ + TQ - 1) // TQ
        for task in T.parallel(B * H * n_qt):
            b = task // (H * n_qt)
            h = task // n_qt % H
            i0 = task % n_qt * TQ
            off = SKV - SQ
            q_t = T.decl_buffer((TQ, D), acc_t)
            k_t = T.decl_buffer((D, TK), acc_t)
            s_t = T.decl_buffer((TQ, TK), acc_t)
            acc = T.decl_buffer((TQ, DV), acc_t)
            m = T.decl_buffer((TQ,), acc_t)
            l = T.decl_buffer((TQ,), acc_t)
            m_new = T.decl_buffer((1,), acc_t)
            alpha = T.decl_buffer((1,), acc_t)
            row_sum = T.decl_buffer((1,), acc_t)
            lane = T.decl_buffer((LANES,), acc_t)
            for i, d in T.grid(TQ, D):
                q_t[i, d] = T.Cast(acc_t, Q[axes_index(ql, b, h, T.min(i0 + i, SQ - 1), d)]) * T.float32(scale)
            for i in T.serial(TQ):
                m[i] = T.float32(NEG_LARGE)
                l[i] = T.float32(0)
                for e in T.vectorized(DV):
                    acc[i, e] = T.float32(0)
            for kt in T.serial(key_tiles(Rows, h, i0, n_qt, off, SKV)):
                j0 = key_tile_start(Rows, Cols, h, i0, n_qt, off, SKV, kt)
                for d in T.serial(D):
                    for jj in T.vectorized(TK):
                        k_t[d, jj] = T.Cast(acc_t, k_load(K, b, h // G, T.min(j0 + jj, SKV - 1), d))
                for io in T.serial(TQ // RB):
                    for ii in T.unroll(RB):
                        for jj in T.vectorized(TK):
                            s_t[io * RB + ii, jj] = T.float32(0)
                    for d in T.serial(D):
                        for ii in T.unroll(RB):
                            for jj in T.vectorized(TK):
                                s_t[io * RB + ii, jj] = s_t[io * RB + ii, jj] + q_t[io * RB + ii, d] * k_t[d, jj]
                for i in T.serial(TQ):
                    for jj in T.vectorized(TK):
                        s_t[i, jj] = T.Select(
                            walk.visible(j0 + jj, i0 + i + off, SKV, off, kt, TK),
                            s_t[i, jj] + bias_term(Bias, b, h, T.min(i0 + i, SQ - 1), T.min(j0 + jj, SKV - 1)),
                            T.float32(-math.inf))
                    # row max and sum in LANES-wide vectors first: a scalar chain over TK keys costs more than the
                    # row's share of both matmuls (4-cycle latency per step)
                    for ln in T.vectorized(LANES):
                        lane[ln] = s_t[i, ln]
                    for c in T.serial(1, TK // LANES):
                        for ln in T.vectorized(LANES):
                            lane[ln] = T.max(lane[ln], s_t[i, c * LANES + ln])
                    m_new[0] = m[i]
                    for ln in T.serial(LANES):
                        m_new[0] = T.max(m_new[0], lane[ln])
                    alpha[0] = fast_exp(m[i] - m_new[0])
                    m[i] = m_new[0]
                    for ln in T.vectorized(LANES):
                        lane[ln] = T.float32(0)
                    for c in T.serial(TK // LANES):
                        for ln in T.vectorized(LANES):
                            s_t[i, c * LANES + ln] = fast_exp(s_t[i, c * LANES + ln] - m_new[0])
                            lane[ln] = lane[ln] + s_t[i, c * LANES + ln]
                    row_sum[0] = T.float32(0)
                    for ln in T.serial(LANES):
                        row_sum[0] = row_sum[0] + lane[ln]
                    l[i] = l[i] * alpha[0] + row_sum[0]
                    for e in T.vectorized(DV):
                        acc[i, e] = acc[i, e] * alpha[0]
                for io in T.serial(TQ // RB):
                    for jj in T.serial(TK):
                        for ii in T.unroll(RB):
                            for e in T.vectorized(DV):
                                acc[io * RB + ii, e] = acc[io * RB + ii, e] + s_t[io * RB + ii, jj] * T.Cast(
                                    acc_t, V[axes_index(vl, b, h // G, T.min(j0 + jj, SKV - 1), e)])
            for i in T.serial(TQ):
                if i0 + i < SQ:
                    for e in T.serial(DV):
                        O[axes_index(ol, b, h, i0 + i, e)] = T.Cast(
                            dtype, T.Select(l[i] > T.float32(0), acc[i, e] / l[i], T.float32(0)))

    return attention_prim_func(spec, body)


# ----------------------------------------------------------------------------------------- wrapper


def flash_attention_kernel(spec: AttentionSpec, target) -> tuple[str, object]:
    """(kernel name, PrimFunc) of ``spec`` for a TargetSpec; a spec the kernels cannot take raises ValueError."""
    why = spec.check()
    if why:
        raise ValueError(f"attention spec {spec.kind}: {why}")
    if target is not None and target.is_gpu:
        from llmcc.kernels.flash_attention_cuda import flash_attention_cuda

        if spec.block_layout:
            # only the Triton kernel walks a layout: a spec it cannot build is refused (the caller keeps the mask)
            from llmcc.kernels import triton_embed

            if target.arch not in triton_embed.TRITON_ARCHS:
                raise ValueError(f"the Triton kernel that walks block layouts is built for "
                                 f"{', '.join(triton_embed.TRITON_ARCHS)}, not {target.arch}")
            try:
                return "triton", triton_embed.block_sparse_attention_func(spec, target.arch)
            except ValueError:
                raise
            except Exception as exc:  # noqa: BLE001 (no Triton or ptxas here)
                raise ValueError(f"Triton block-sparse kernel unavailable ({type(exc).__name__}: {exc})") from exc
        if spec.window:
            # sliding window without a bias tensor: the Triton kernel, AOT-compiled to a cubin inside the module
            from llmcc.kernels import triton_embed

            if triton_embed.sliding_window_unsupported(spec) is None and target.arch in triton_embed.TRITON_ARCHS:
                try:
                    return "triton", triton_embed.sliding_window_attention_func(spec, target.arch)
                except Exception as exc:  # noqa: BLE001 (no Triton / ptxas here: the TIR kernel computes it too)
                    import logging

                    logging.getLogger(__name__).warning("Triton sliding-window kernel unavailable (%s: %s); using "
                                                        "flash_attention_cuda", type(exc).__name__, exc)

        return "flash_attention_cuda", flash_attention_cuda(spec, target.arch)
    return "flash_attention_cpu", flash_attention_cpu(spec)
