"""Causal sliding-window attention (Mistral / HF convention) as a flash-style Triton kernel.

Shapes: q [batch, heads_q, seq_q, head_dim]; k, v [batch, heads_kv, seq_kv, head_dim], heads_q a multiple of
heads_kv (grouped-query attention: query head h reads kv head h // (heads_q // heads_kv), as HF's repeat_kv).
The queries are the LAST seq_q positions of the key sequence: query i sits at absolute position
p = seq_kv - seq_q + i (seq_q == seq_kv: prefill; seq_q == 1 against a KV cache: decode). Query p sees key j iff
p - window < j <= p. ``window=None`` is plain causal attention.

Each program handles BLOCK_M queries of one (batch, head) and walks only the key blocks that intersect the union
of its queries' windows, so the work per query block is O(BLOCK_M + window), independent of seq_kv. Softmax is
online in fp32 (exp2 with the scale folded in), accumulation is fp32, and there is no seq x seq intermediate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _common
from ._common import MAX_COMBINE, SUM_COMBINE

__all__ = [
    "SlidingWindowAttentionConfig",
    "sliding_window_attention",
    "sliding_window_attention_reference",
    "sliding_window_key_range",
    "sliding_window_op_count",
    "sliding_window_mask",
    "compile_for_cuda",
]

_LOG2E = 1.4426950408889634


@triton.jit
def _sliding_window_attention_kernel(
    Q, K, V, Out,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    heads_q, group, seq_q, seq_kv, head_dim, window, qk_scale,  # qk_scale = scale * log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads_q).to(tl.int64)
    h = pid_bh % heads_q
    h_kv = (h // group).to(tl.int64)
    h = h.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    past = seq_kv - seq_q
    pos_m = past + offs_m  # absolute positions of this block's queries
    m_valid = offs_m < seq_q
    d_valid = offs_d < head_dim

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh

    # Key blocks that intersect some window of this query block: [lo, hi), lo aligned down to BLOCK_N.
    first_pos = past + pid_m * BLOCK_M
    last_pos = tl.minimum(first_pos + BLOCK_M - 1, seq_kv - 1)
    lo = tl.maximum(first_pos - window + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = last_pos + 1

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_valid = offs_n < seq_kv
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        qk = tl.dot(q, kt, input_precision=INPUT_PRECISION)
        keep = (offs_n[None, :] <= pos_m[:, None]) & (offs_n[None, :] > pos_m[:, None] - window)
        keep = keep & n_valid[None, :] & m_valid[:, None]
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
class SlidingWindowAttentionConfig:
    """Tile configuration: BLOCK_M queries x BLOCK_N keys per step (powers of two, >= 16)."""

    BLOCK_M: int = 64
    BLOCK_N: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("BLOCK_M", "BLOCK_N"):
            if not _common.is_pow2_at_least_16(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a power of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps!r} must be 1, 2, 4, 8 or 16")
        if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
            raise ValueError(f"num_stages={self.num_stages!r} must be a positive int")

    @classmethod
    def get_default(cls, seq_q: int | None = None, head_dim: int | None = None) -> "SlidingWindowAttentionConfig":
        """A reasonable untuned default: small query tiles for decode, narrower key tiles for wide heads."""
        block_m = 16 if (seq_q is not None and seq_q <= 16) else 64
        block_n = 32 if (head_dim is not None and head_dim > 128) else 64
        num_warps = 8 if (head_dim is not None and head_dim > 64 and block_m == 64) else 4
        return cls(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=2)


def _check_window(window, seq_kv: int) -> int:
    if window is None:
        return max(seq_kv, 1)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{window=} must be an int >= 1 (or None for plain causal attention)")
    return min(window, max(seq_kv, 1))  # a window longer than the sequence is plain causal; keeps int32 safe


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                             scale: float | None = None, *, config: SlidingWindowAttentionConfig | None = None,
                             allow_tf32: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal sliding-window attention; returns [batch, heads_q, seq_q, head_dim] in q's dtype.

    ``scale`` defaults to 1/sqrt(head_dim). ``allow_tf32`` lets fp32 inputs use TF32 tensor cores (faster, ~1e-3
    error). ``out`` (optional) is a preallocated contiguous output of q's shape, dtype and device.
    """
    batch, heads_q, heads_kv, seq_q, seq_kv, head_dim = _common.check_attention_tensors(q, k, v)
    if seq_q > seq_kv:
        raise ValueError(f"{seq_q=} > {seq_kv=}: the queries are the last seq_q positions of the key sequence")
    win = _check_window(window, seq_kv)
    scale = _common.check_scale(scale, head_dim)
    if config is None:
        config = SlidingWindowAttentionConfig.get_default(seq_q=seq_q, head_dim=head_dim)
    elif not isinstance(config, SlidingWindowAttentionConfig):
        raise ValueError(f"config must be a SlidingWindowAttentionConfig, got {type(config).__name__}")
    if out is None:
        out = torch.empty_like(q)
    elif (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
          or out.device != q.device or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous tensor like q ({tuple(q.shape)}, {q.dtype}, {q.device})")
    if out.numel() == 0 or seq_kv == 0:
        return out.zero_()
    grid = (triton.cdiv(seq_q, config.BLOCK_M), batch * heads_q)
    kernel = _common.launchable(_sliding_window_attention_kernel)
    kernel[grid](
        q, k, v, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads_q, heads_q // heads_kv, seq_q, seq_kv, head_dim, win, scale * _LOG2E,
        BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_D=_common.head_dim_block(head_dim),
        INPUT_PRECISION=_common.input_precision(q.dtype, allow_tf32),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def sliding_window_mask(seq_q: int, seq_kv: int, window: int | None, device=None) -> torch.Tensor:
    """Boolean [seq_q, seq_kv] mask, True where query i (at position seq_kv - seq_q + i) sees key j."""
    pos = torch.arange(seq_kv - seq_q, seq_kv, device=device)[:, None]
    j = torch.arange(seq_kv, device=device)[None, :]
    keep = j <= pos
    if window is not None:
        keep &= j > pos - window
    return keep


def sliding_window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                                       scale: float | None = None) -> torch.Tensor:
    """Plain torch reference (fp32 math, dense seq_q x seq_kv scores); returns q's dtype."""
    heads_q, heads_kv = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    if heads_q != heads_kv:
        kf = kf.repeat_interleave(heads_q // heads_kv, dim=1)
        vf = vf.repeat_interleave(heads_q // heads_kv, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    keep = sliding_window_mask(q.shape[2], k.shape[2], window, device=q.device)
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows (none for valid inputs) -> 0
    return (probs @ vf).to(q.dtype)


def sliding_window_key_range(query_block: int, seq_q: int, seq_kv: int, window: int | None,
                             BLOCK_M: int, BLOCK_N: int) -> tuple[int, int]:
    """The key range [lo, hi) the kernel walks for one query block (the same arithmetic as the kernel)."""
    win = _check_window(window, seq_kv)
    first = seq_kv - seq_q + query_block * BLOCK_M
    last = min(first + BLOCK_M - 1, seq_kv - 1)
    lo = max(first - win + 1, 0) // BLOCK_N * BLOCK_N
    return lo, last + 1


def sliding_window_op_count(seq_q: int, seq_kv: int, window: int | None, head_dim: int,
                            config: SlidingWindowAttentionConfig | None = None) -> dict:
    """Matmul flops per (batch, head) the kernel issues (visited BLOCK_M x BLOCK_N tiles x 4*BM*BN*D) vs dense."""
    config = config or SlidingWindowAttentionConfig.get_default(seq_q=seq_q, head_dim=head_dim)
    bm, bn = config.BLOCK_M, config.BLOCK_N
    tiles = 0
    for qb in range(triton.cdiv(seq_q, bm)):
        lo, hi = sliding_window_key_range(qb, seq_q, seq_kv, window, bm, bn)
        tiles += max(0, triton.cdiv(hi - lo, bn))
    dense_tiles = triton.cdiv(seq_q, bm) * triton.cdiv(seq_kv, bn)
    tile_flops = 4 * bm * bn * head_dim
    return {"tiles": tiles, "dense_tiles": dense_tiles, "flops": tiles * tile_flops,
            "dense_flops": dense_tiles * tile_flops, "ratio": tiles / dense_tiles if dense_tiles else 0.0}


def compile_for_cuda(dtype: torch.dtype, head_dim: int, cc: int = 80,
                     config: SlidingWindowAttentionConfig | None = None, allow_tf32: bool = False):
    """Ahead-of-time compile the kernel for CUDA sm_<cc> (no GPU needed); returns triton's CompiledKernel.

    Arguments at launch: (q, k, v, out, 16 strides, heads_q, group, seq_q, seq_kv, head_dim, window, qk_scale)
    with qk_scale = scale * log2(e); grid (cdiv(seq_q, BLOCK_M), batch * heads_q).
    """
    config = config or SlidingWindowAttentionConfig.get_default(head_dim=head_dim)
    ptr = "*" + _common.triton_dtype(dtype)
    fn = _common.jit_function(_sliding_window_attention_kernel)
    sig = {n: "i32" for n in fn.arg_names}
    sig.update({"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "qk_scale": "fp32"})
    consts = {"BLOCK_M": config.BLOCK_M, "BLOCK_N": config.BLOCK_N, "BLOCK_D": _common.head_dim_block(head_dim),
              "INPUT_PRECISION": _common.input_precision(dtype, allow_tf32)}
    for c in consts:
        sig.pop(c)
    return _common.aot_compile(fn, sig, consts, cc, config.num_warps, config.num_stages)
