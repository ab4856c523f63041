"""Shared helpers for the Triton attention kernels in this package (not a public API).

Triton decides at *decoration* time whether ``@triton.jit`` yields a compiled ``JITFunction`` or, under
``TRITON_INTERPRET=1``, an ``InterpretedFunction`` that runs on the CPU with numpy. The kernel modules here
may be imported before or after that variable is set (another test, another import path), so the wrappers call
:func:`launchable` to pick the flavour that matches the environment *at launch time*.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

_FLAVOURS: dict[tuple[int, bool], Any] = {}


# Reduction combine functions for tl.reduce. The kernels use these instead of tl.max / tl.sum / tl.zeros, which are
# @jit functions of triton's standard library whose flavour (compiled or interpreted) was fixed when triton was
# first imported: an interpreted kernel cannot call a compiled-flavour tl.max ("Cannot call @triton.jit'd outside
# of the scope of a kernel"). Built as JITFunction explicitly: the code generator needs that type, and the
# interpreter's tl.reduce calls combine_fn.fn, which works for either.
def _max_combine_fn(a, b):
    return tl.maximum(a, b)


def _sum_combine_fn(a, b):
    return a + b


MAX_COMBINE = JITFunction(_max_combine_fn)
SUM_COMBINE = JITFunction(_sum_combine_fn)


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1), read now, not at import."""
    return bool(triton.knobs.runtime.interpret)


def python_fn(kernel) -> Any:
    """The undecorated Python function behind a JITFunction or an InterpretedFunction."""
    return kernel.fn


def jit_function(kernel) -> JITFunction:
    """A compiled-flavour JITFunction of ``kernel`` (for ahead-of-time compilation), whatever mode it was made in."""
    if isinstance(kernel, JITFunction):
        return kernel
    key = (id(kernel.fn), False)
    if key not in _FLAVOURS:
        _FLAVOURS[key] = JITFunction(kernel.fn)
    return _FLAVOURS[key]


def launchable(kernel):
    """``kernel`` in the flavour the current TRITON_INTERPRET setting asks for."""
    want_interp = interpret_mode()
    if want_interp == isinstance(kernel, InterpretedFunction):
        return kernel
    key = (id(kernel.fn), want_interp)
    if key not in _FLAVOURS:
        _FLAVOURS[key] = InterpretedFunction(kernel.fn) if want_interp else JITFunction(kernel.fn)
    return _FLAVOURS[key]


def check_attention_tensors(q, k, v) -> tuple[int, int, int, int, int, int]:
    """Validate q [batch, heads_q, seq_q, head_dim], k/v [batch, heads_kv, seq_kv, head_dim].

    Returns (batch, heads_q, heads_kv, seq_q, seq_kv, head_dim); raises ValueError naming the bad argument.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got {name}.dim()={t.dim()} "
                             f"(shape {tuple(t.shape)})")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype={t.dtype} is not supported (float16, bfloat16, float32)")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
                             f"call .contiguous() first")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device=}, {k.device=}, {v.device=}")
    if q.device.type != "cuda" and not interpret_mode():
        raise ValueError(f"{q.device=}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                         f"interpreter)")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)=} vs {tuple(v.shape)=}")
    batch, heads_q, seq_q, head_dim = q.shape
    batch_kv, heads_kv, seq_kv, head_dim_kv = k.shape
    if batch_kv != batch:
        raise ValueError(f"batch mismatch: q has {batch=}, k/v have batch={batch_kv}")
    if head_dim_kv != head_dim:
        raise ValueError(f"head_dim mismatch: q has {head_dim=}, k/v have head_dim={head_dim_kv}")
    if head_dim < 1 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"{head_dim=} must be in [1, {MAX_HEAD_DIM}]")
    if heads_kv < 1 or heads_q % heads_kv != 0:
        raise ValueError(f"{heads_q=} must be a positive multiple of {heads_kv=} (grouped-query attention)")
    return batch, heads_q, heads_kv, seq_q, seq_kv, head_dim


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{scale=} must be a finite float (or None for 1/sqrt(head_dim))")
    return float(scale)


def head_dim_block(head_dim: int) -> int:
    """Power-of-two tile width covering head_dim, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def input_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """tl.dot precision: fp32 inputs use IEEE fp32 products unless TF32 is allowed; fp16/bf16 ignore this."""
    return "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"


def is_pow2_at_least_16(x: int) -> bool:
    return isinstance(x, int) and x >= 16 and (x & (x - 1)) == 0


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def triton_dtype(dtype: torch.dtype) -> str:
    if dtype not in _TRITON_DTYPE:
        raise ValueError(f"{dtype=} is not supported (float16, bfloat16, float32)")
    return _TRITON_DTYPE[dtype]


def aot_compile(kernel, signature: dict, constexprs: dict, cc: int, num_warps: int, num_stages: int):
    """Compile ``kernel`` for CUDA compute capability ``cc`` (80, 90, ...) without a GPU or driver.

    ``signature`` maps every runtime argument name to a Triton type ("*fp16", "i32", "fp32"); constexprs are
    added as "constexpr". Returns triton's CompiledKernel: ``.asm["ptx"]``, ``.asm["cubin"]``, ``.name``,
    ``.metadata`` (shared memory, num_warps). Integer arguments are not specialised (no divisibility hints).
    """
    from triton.backends.compiler import GPUTarget

    fn = jit_function(kernel)
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    missing = [n for n in fn.arg_names if n not in sig]
    if missing:
        raise ValueError(f"signature lacks arguments {missing}")
    src = triton.compiler.ASTSource(fn=fn, signature={n: sig[n] for n in fn.arg_names}, constexprs=constexprs)
    return triton.compiler.compile(src, target=GPUTarget("cuda", cc, 32),
                                   options={"num_warps": num_warps, "num_stages": num_stages})
