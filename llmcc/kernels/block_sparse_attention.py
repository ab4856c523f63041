"""Block-sparse attention (BigBird / Longformer style block layouts) as a flash-style Triton kernel.

Shapes: q [batch, heads_q, seq_q, head_dim]; k, v [batch, heads_kv, seq_kv, head_dim], heads_q a multiple of
heads_kv (query head h reads kv head h // (heads_q // heads_kv)). A layout [L, num_q_blocks, num_k_blocks]
(bool or int, nonzero = computed; L = 1 shared by all heads, or L = heads_q) says which (query block, key block)
pairs of ``block_size`` x ``block_size`` tokens are attended; num_q_blocks = cdiv(seq_q, block_size),
num_k_blocks = cdiv(seq_kv, block_size). Everything outside the layout is masked (probability 0).

The wrapper turns the layout into CSR (row_ptr over the L * num_q_blocks rows, col_idx = key-block ids) and each
program (BLOCK_M queries of one (batch, head)) walks only the key blocks listed in its row, in BLOCK_N sub-tiles,
so work is proportional to the number of nonzero layout blocks, not seq^2. Online softmax in fp32, fp32
accumulation. Options: ``causal`` (token-level, queries are the last seq_q positions) and ``kv_lengths``
(per-batch number of valid keys: key padding). A query row that sees no key yields zeros.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from . import _common
from ._common import MAX_COMBINE, SUM_COMBINE

__all__ = [
    "BlockSparseAttentionConfig",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "layout_to_csr",
    "bigbird_layout",
    "longformer_layout",
    "block_sparse_op_count",
    "layout_token_mask",
    "compile_for_cuda",
]

_LOG2E = 1.4426950408889634


@triton.jit
def _block_sparse_attention_kernel(
    Q, K, V, Out, RowPtr, ColIdx, KvLens,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    heads_q, group, seq_q, seq_kv, head_dim, num_q_blocks, layout_per_head, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b32 = pid_bh // heads_q
    h32 = pid_bh % heads_q
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    h_kv = (h32 // group).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < seq_q
    d_valid = offs_d < head_dim
    pos_m = seq_kv - seq_q + offs_m
    kv_len = seq_kv
    if HAS_KV_LENS:
        kv_len = tl.minimum(tl.load(KvLens + b32), seq_kv)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh

    row = h32 * layout_per_head * num_q_blocks + (pid_m * BLOCK_M) // LAYOUT_BLOCK
    start = tl.load(RowPtr + row)
    end = tl.load(RowPtr + row + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for idx in range(start, end):
        kb = tl.load(ColIdx + idx)
        for sub in tl.static_range(0, LAYOUT_BLOCK, BLOCK_N):
            offs_n = kb * LAYOUT_BLOCK + sub + offs_n0
            n_valid = offs_n < kv_len
            kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
            qk = tl.dot(q, kt, input_precision=INPUT_PRECISION)
            keep = n_valid[None, :] & m_valid[:, None]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= pos_m[:, None])
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(qk, 1, MAX_COMBINE))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: no NaN
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(qk - m_safe[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, SUM_COMBINE)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=n_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
            m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


@dataclass(frozen=True)
class BlockSparseAttentionConfig:
    """Tile configuration. BLOCK_M / BLOCK_N must divide the layout's block_size (powers of two >= 16); None means
    "the layout block size, capped at 64"."""

    BLOCK_M: int | None = None
    BLOCK_N: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("BLOCK_M", "BLOCK_N"):
            val = getattr(self, name)
            if val is not None and not _common.is_pow2_at_least_16(val):
                raise ValueError(f"{name}={val!r} must be a power of two >= 16 (or None)")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps!r} must be 1, 2, 4, 8 or 16")
        if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
            raise ValueError(f"num_stages={self.num_stages!r} must be a positive int")

    @classmethod
    def get_default(cls, block_size: int | None = None, head_dim: int | None = None) -> "BlockSparseAttentionConfig":
        tile = 64 if block_size is None else min(64, block_size)
        num_warps = 8 if (head_dim is not None and head_dim > 64 and tile == 64) else 4
        return cls(BLOCK_M=tile, BLOCK_N=tile, num_warps=num_warps, num_stages=2)

    def tiles(self, block_size: int) -> tuple[int, int]:
        """(BLOCK_M, BLOCK_N) for a layout of ``block_size``; raises ValueError if they do not divide it."""
        bm = self.BLOCK_M if self.BLOCK_M is not None else min(64, block_size)
        bn = self.BLOCK_N if self.BLOCK_N is not None else min(64, block_size)
        for name, val in (("BLOCK_M", bm), ("BLOCK_N", bn)):
            if val > block_size or block_size % val:
                raise ValueError(f"{name}={val} must divide {block_size=}")
        return bm, bn


def _check_layout(layout, heads_q: int, num_q_blocks: int, num_k_blocks: int) -> torch.Tensor:
    if not isinstance(layout, torch.Tensor):
        raise ValueError(f"layout must be a torch.Tensor, got {type(layout).__name__}")
    if layout.dim() != 3:
        raise ValueError(f"layout must be 3-D [heads or 1, num_q_blocks, num_k_blocks], got {layout.dim()=}")
    if layout.dtype.is_floating_point or layout.dtype.is_complex:
        raise ValueError(f"{layout.dtype=} must be bool or an integer type")
    lh, lq, lk = layout.shape
    if lh not in (1, heads_q):
        raise ValueError(f"layout has {lh} heads; expected 1 or {heads_q=}")
    if (lq, lk) != (num_q_blocks, num_k_blocks):
        raise ValueError(f"layout blocks {(lq, lk)} != (cdiv(seq_q, block_size), cdiv(seq_kv, block_size)) = "
                         f"{(num_q_blocks, num_k_blocks)}")
    return layout


def layout_to_csr(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of a [L, nq, nk] layout: row_ptr int32 [L*nq + 1], col_idx int32 [nnz] (ascending within a row)."""
    flat = layout.reshape(-1, layout.shape[-1]).to("cpu") != 0
    counts = flat.sum(dim=1)
    row_ptr = torch.zeros(flat.shape[0] + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(counts, 0)
    col_idx = flat.nonzero(as_tuple=False)[:, 1]  # row-major order: sorted by row, then column
    return row_ptr.to(torch.int32), col_idx.to(torch.int32).contiguous()


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor,
                           block_size: int, scale: float | None = None, *, causal: bool = False,
                           kv_lengths: torch.Tensor | None = None,
                           config: BlockSparseAttentionConfig | None = None, allow_tf32: bool = False,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Block-sparse attention; returns [batch, heads_q, seq_q, head_dim] in q's dtype.

    ``layout`` [1 or heads_q, cdiv(seq_q, block_size), cdiv(seq_kv, block_size)], nonzero = computed block.
    ``kv_lengths`` (int tensor [batch]) masks keys >= kv_lengths[b]. ``causal`` masks key j > query position
    (queries are the last seq_q positions). Building the CSR syncs with the host once per call.
    """
    batch, heads_q, heads_kv, seq_q, seq_kv, head_dim = _common.check_attention_tensors(q, k, v)
    if not _common.is_pow2_at_least_16(block_size):
        raise ValueError(f"{block_size=} must be a power of two >= 16")
    if causal and seq_q > seq_kv:
        raise ValueError(f"{seq_q=} > {seq_kv=} with causal=True: queries are the last seq_q key positions")
    num_q_blocks, num_k_blocks = triton.cdiv(seq_q, block_size), triton.cdiv(seq_kv, block_size)
    layout = _check_layout(layout, heads_q, num_q_blocks, num_k_blocks)
    scale = _common.check_scale(scale, head_dim)
    if config is None:
        config = BlockSparseAttentionConfig.get_default(block_size=block_size, head_dim=head_dim)
    elif not isinstance(config, BlockSparseAttentionConfig):
        raise ValueError(f"config must be a BlockSparseAttentionConfig, got {type(config).__name__}")
    block_m, block_n = config.tiles(block_size)
    if kv_lengths is not None:
        if (not isinstance(kv_lengths, torch.Tensor) or kv_lengths.shape != (batch,)
                or kv_lengths.dtype.is_floating_point or kv_lengths.dtype == torch.bool):
            raise ValueError(f"kv_lengths must be an integer tensor of shape ({batch},), got "
                             f"{getattr(kv_lengths, 'shape', type(kv_lengths).__name__)}")
        kv_lengths = kv_lengths.to(device=q.device, dtype=torch.int32).contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
          or out.device != q.device or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous tensor like q ({tuple(q.shape)}, {q.dtype}, {q.device})")
    if out.numel() == 0 or seq_kv == 0:
        return out.zero_()
    row_ptr, col_idx = layout_to_csr(layout)
    row_ptr, col_idx = row_ptr.to(q.device), col_idx.to(q.device)
    if col_idx.numel() == 0:
        col_idx = torch.zeros(1, dtype=torch.int32, device=q.device)  # never read; avoids a null pointer
    grid = (triton.cdiv(seq_q, block_m), batch * heads_q)
    kernel = _common.launchable(_block_sparse_attention_kernel)
    kernel[grid](
        q, k, v, out, row_ptr, col_idx, kv_lengths if kv_lengths is not None else row_ptr,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads_q, heads_q // heads_kv, seq_q, seq_kv, head_dim, num_q_blocks, int(layout.shape[0] != 1),
        scale * _LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, LAYOUT_BLOCK=block_size, BLOCK_D=_common.head_dim_block(head_dim),
        CAUSAL=bool(causal), HAS_KV_LENS=kv_lengths is not None,
        INPUT_PRECISION=_common.input_precision(q.dtype, allow_tf32),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def layout_token_mask(layout: torch.Tensor, block_size: int, seq_q: int, seq_kv: int) -> torch.Tensor:
    """Token-level boolean mask [L, seq_q, seq_kv] of a block layout."""
    m = (layout != 0).repeat_interleave(block_size, dim=1).repeat_interleave(block_size, dim=2)
    return m[:, :seq_q, :seq_kv]


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor,
                                     block_size: int, scale: float | None = None, *, causal: bool = False,
                                     kv_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch reference (fp32, dense scores with the expanded layout as a mask); rows with no key -> 0."""
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    if heads_q != heads_kv:
        kf = kf.repeat_interleave(heads_q // heads_kv, dim=1)
        vf = vf.repeat_interleave(heads_q // heads_kv, dim=1)
    keep = layout_token_mask(layout.to(q.device), block_size, seq_q, seq_kv)[None]  # [1, L, sq, sk]
    if causal:
        pos = torch.arange(seq_kv - seq_q, seq_kv, device=q.device)[:, None]
        keep = keep & (torch.arange(seq_kv, device=q.device)[None, :] <= pos)
    if kv_lengths is not None:
        valid = torch.arange(seq_kv, device=q.device)[None, :] < kv_lengths.to(q.device)[:, None]  # [b, sk]
        keep = keep & valid[:, None, None, :]
    scores = ((qf @ kf.transpose(-1, -2)) * scale).masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ vf).to(q.dtype)


def _global_ids(num_blocks: int, global_blocks: int) -> list[int]:
    first = global_blocks - global_blocks // 2
    last = global_blocks // 2
    ids = set(range(min(first, num_blocks))) | set(range(max(num_blocks - last, 0), num_blocks))
    return sorted(ids)


def _band(num_blocks: int, window_blocks: int) -> torch.Tensor:
    if isinstance(window_blocks, bool) or not isinstance(window_blocks, int) or window_blocks < 1 \
            or window_blocks % 2 == 0:
        raise ValueError(f"{window_blocks=} must be an odd int >= 1 (block i sees i-w//2 .. i+w//2)")
    i = torch.arange(num_blocks)
    return (i[:, None] - i[None, :]).abs() <= window_blocks // 2


def _check_num_blocks(num_blocks, num_heads):
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"{num_blocks=} must be an int >= 1")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"{num_heads=} must be an int >= 1")


def bigbird_layout(num_blocks: int, window_blocks: int = 3, global_blocks: int = 2, random_blocks: int = 3,
                   seed: int = 0, num_heads: int = 1) -> torch.Tensor:
    """BigBird (ITC) block layout, bool [num_heads, num_blocks, num_blocks].

    Sliding window of ``window_blocks`` (odd) blocks around the diagonal; ``global_blocks`` global blocks, the
    first ceil(g/2) and last floor(g/2) (g=2: first and last), whose rows and columns are full; and for every
    non-global row ``random_blocks`` extra key blocks drawn (per head, seeded) from those not already set.
    """
    _check_num_blocks(num_blocks, num_heads)
    if isinstance(global_blocks, bool) or not isinstance(global_blocks, int) or global_blocks < 0:
        raise ValueError(f"{global_blocks=} must be an int >= 0")
    if isinstance(random_blocks, bool) or not isinstance(random_blocks, int) or random_blocks < 0:
        raise ValueError(f"{random_blocks=} must be an int >= 0")
    base = _band(num_blocks, window_blocks)
    gids = _global_ids(num_blocks, global_blocks)
    base[gids, :] = True
    base[:, gids] = True
    layout = base[None].repeat(num_heads, 1, 1)
    rng = np.random.default_rng(seed)
    gset = set(gids)
    for h in range(num_heads):
        for i in range(num_blocks):
            if i in gset:
                continue
            free = (~layout[h, i]).nonzero().flatten().numpy()
            if free.size:
                pick = rng.choice(free, size=min(random_blocks, free.size), replace=False)
                layout[h, i, torch.from_numpy(pick)] = True
    return layout


def longformer_layout(num_blocks: int, window_blocks: int, global_block_ids: Sequence[int] = (0,),
                      num_heads: int = 1) -> torch.Tensor:
    """Longformer block layout, bool [num_heads, num_blocks, num_blocks]: a band of ``window_blocks`` (odd) blocks
    plus global blocks (attend to everything, attended by everything). Negative ids count from the end."""
    _check_num_blocks(num_blocks, num_heads)
    layout = _band(num_blocks, window_blocks)
    ids = []
    for g in global_block_ids:
        if isinstance(g, bool) or not isinstance(g, int) or not -num_blocks <= g < num_blocks:
            raise ValueError(f"global block id {g!r} out of range for {num_blocks=}")
        ids.append(g % num_blocks)
    layout[ids, :] = True
    layout[:, ids] = True
    return layout[None].repeat(num_heads, 1, 1)


def block_sparse_op_count(layout: torch.Tensor, block_size: int, head_dim: int) -> dict:
    """Matmul work of a layout vs dense attention, per (batch, layout head) summed over layout heads.

    One computed block pair costs 4 * block_size^2 * head_dim flops (QK^T and PV, multiply-add = 2 flops).
    Returns {"block_pairs", "dense_block_pairs", "flops", "dense_flops", "density"}.
    """
    if layout.dim() != 3:
        raise ValueError(f"layout must be 3-D, got {layout.dim()=}")
    pairs = int((layout != 0).sum())
    dense = int(layout.shape[0] * layout.shape[1] * layout.shape[2])
    per_pair = 4 * block_size * block_size * head_dim
    return {"block_pairs": pairs, "dense_block_pairs": dense, "flops": pairs * per_pair,
            "dense_flops": dense * per_pair, "density": pairs / dense if dense else 0.0}


def compile_for_cuda(dtype: torch.dtype, head_dim: int, block_size: int = 64, cc: int = 80, *, causal: bool = False,
                     has_kv_lengths: bool = False, config: BlockSparseAttentionConfig | None = None,
                     allow_tf32: bool = False):
    """Ahead-of-time compile the kernel for CUDA sm_<cc> (no GPU needed); returns triton's CompiledKernel.

    Arguments at launch: (q, k, v, out, row_ptr, col_idx, kv_lengths (any int32 pointer if unused), 16 strides,
    heads_q, group, seq_q, seq_kv, head_dim, num_q_blocks, layout_per_head (0/1), qk_scale = scale * log2(e));
    grid (cdiv(seq_q, BLOCK_M), batch * heads_q).
    """
    if not _common.is_pow2_at_least_16(block_size):
        raise ValueError(f"{block_size=} must be a power of two >= 16")
    config = config or BlockSparseAttentionConfig.get_default(block_size=block_size, head_dim=head_dim)
    block_m, block_n = config.tiles(block_size)
    ptr = "*" + _common.triton_dtype(dtype)
    fn = _common.jit_function(_block_sparse_attention_kernel)
    sig = {n: "i32" for n in fn.arg_names}
    sig.update({"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "RowPtr": "*i32", "ColIdx": "*i32", "KvLens": "*i32",
                "qk_scale": "fp32"})
    consts = {"BLOCK_M": block_m, "BLOCK_N": block_n, "LAYOUT_BLOCK": block_size,
              "BLOCK_D": _common.head_dim_block(head_dim), "CAUSAL": bool(causal),
              "HAS_KV_LENS": bool(has_kv_lengths), "INPUT_PRECISION": _common.input_precision(dtype, allow_tf32)}
    for c in consts:
        sig.pop(c)
    return _common.aot_compile(fn, sig, consts, cc, config.num_warps, config.num_stages)
