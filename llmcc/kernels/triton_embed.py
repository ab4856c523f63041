"""Triton kernels inside compiled TVM modules: compiled ahead of time to a cubin, launched from a TIR PrimFunc.

How it works (TVM 0.27, no GPU needed to build):
  1. ``aot_compile`` runs ``triton.compiler.compile`` with ``GPUTarget("cuda", cc, 32)`` (sm_80 .. sm_90), under a
     kernel name unique to the specialisation (dtype, head dim, tiles), so two specialisations never collide in one
     module's function table.
  2. ``launch`` is the TIR call of the kernel: ``T.call_packed(name, *args, null, null, threads, grid..., smem)`` -
     TVM's own calling convention for CUDA kernels (what ``T.call_kernel`` emits): the kernel's arguments, Triton's
     two hidden scratch pointers (null: we refuse kernels that need scratch), then the launch parameters.
  3. ``mark`` puts the cubin and its function-table entry on the PrimFunc's attributes (``llmcc.triton_kernel``,
     base64 cubin, argument types, launch tags); the PrimFunc is ``tirx.is_scheduled`` with ``op_pattern`` 8 (opaque).
  4. ``attach_external_modules`` (called by ``llmcc.cuda.build`` just before ``tvm.compile``) turns each marked
     PrimFunc's cubin into a CUDA runtime module (``ffi.Module.create.cuda``, format "cubin") in the IRModule's
     ``external_mods``, which Relax's build links into the library. The exported ``.so`` then carries the cubin next
     to TVM's own fatbin; loading it needs no Triton.

``T.call_kernel(jit_fn, ...)`` itself is not used: it compiles for the *current* GPU (no target argument), keeps
PTX only, and attaches the module to the IRModule being parsed, which the fuse_attention pass never sees.

``sliding_window_attention_func(spec, arch)`` builds the PrimFunc for an ``AttentionSpec`` with a window: the same
parameters as ``flash_attention_cuda`` for that spec (q, k, v, out; any of the spec's layouts, passed to the kernel
as strides; symbolic int64 B, Sq, Skv), for specs without a bias tensor. ``block_sparse_attention_func(spec, arch)``
does the same for a spec with a block layout: (q, k, v, layout_rows, layout_cols, out), the CSR layout at the
kernel's block size (``kernels.block_layout``), the mask dropped. Both PrimFuncs come from
``flash_attention.attention_prim_func``, the signature every attention kernel shares.
"""

from __future__ import annotations

import base64
import json
import types

TRITON_ARCHS = ("sm_80", "sm_86", "sm_87", "sm_89", "sm_90")
ATTR_NAME = "llmcc.triton_kernel"
ATTR_CUBIN = "llmcc.triton_cubin"
ATTR_ARG_TYPES = "llmcc.triton_arg_types"
ATTR_LAUNCH_TAGS = "llmcc.triton_launch_tags"
_LOG2E = 1.4426950408889634
_TIR_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_ARG_TYPE = {"fp32": "float32", "i32": "int32", "i64": "int64"}

_CACHE: dict = {}


def _cc(arch: str) -> int:
    if arch not in TRITON_ARCHS:
        raise ValueError(f"Triton embedding supports {', '.join(TRITON_ARCHS)}, not {arch!r}")
    return int(arch[3:])


def _renamed(kernel, name: str):
    """A compiled-flavour JITFunction of ``kernel``'s Python function under ``name`` (the cubin's symbol)."""
    from triton.runtime.jit import JITFunction

    from llmcc.kernels import _common

    fn = _common.python_fn(kernel)
    copy = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__qualname__, copy.__module__ = name, fn.__module__
    return JITFunction(copy)


def aot_compile(kernel, signature: dict, constexprs: dict, arch: str, *, name: str, num_warps: int = 4,
                num_stages: int = 2):
    """Triton's CompiledKernel of ``kernel`` for ``arch`` under the symbol ``name`` (cached per process).

    ``signature``: every runtime argument's Triton type ("*fp16", "i32", "fp32"); ``constexprs``: the rest."""
    from llmcc.kernels import _common

    key = (name, arch, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())), num_warps, num_stages)
    if key not in _CACHE:
        compiled = _common.aot_compile(_renamed(kernel, name), signature, constexprs, _cc(arch), num_warps,
                                       num_stages)
        md = compiled.metadata
        if md.num_ctas != 1 or md.global_scratch_size or md.profile_scratch_size or md.launch_cooperative_grid \
                or md.launch_pdl:
            raise ValueError(f"Triton kernel {name} needs launch features TVM's CUDA module lacks (clusters, "
                             f"global scratch, cooperative or PDL launch)")
        if compiled.name != name:
            raise ValueError(f"Triton named the kernel {compiled.name!r}, expected {name!r}")
        _CACHE[key] = (compiled, [signature[n] for n in _runtime_args(kernel, signature)])
    return _CACHE[key]


def _runtime_args(kernel, signature: dict) -> list[str]:
    from llmcc.kernels import _common

    return [n for n in _common.jit_function(kernel).arg_names if n in signature]


def arg_types(compiled_and_sig) -> list[str]:
    """TVM function-table argument types: the kernel's runtime arguments plus Triton's two scratch pointers."""
    _, sig = compiled_and_sig
    return ["handle" if t.startswith("*") else _ARG_TYPE[t] for t in sig] + ["handle", "handle"]


def launch_tags(compiled) -> list[str]:
    tags = ["threadIdx.x", "blockIdx.x", "blockIdx.y", "blockIdx.z"]
    return tags + (["tirx.use_dyn_shared_memory"] if compiled.metadata.shared > 0 else [])


def launch(compiled_and_sig, grid, args):
    """The TIR expression that launches the kernel on ``grid`` (three extents) with ``args`` (TIR expressions)."""
    from tvm import tirx

    compiled, sig = compiled_and_sig
    if len(args) != len(sig):
        raise ValueError(f"{compiled.name} takes {len(sig)} runtime arguments, got {len(args)}")
    null = tirx.reinterpret("handle", tirx.const(0, "uint64"))
    extra = [tirx.const(compiled.metadata.num_warps * 32, "int64"), *grid]
    if compiled.metadata.shared > 0:
        extra.append(tirx.const(compiled.metadata.shared, "int64"))
    return tirx.call_packed(compiled.name, *args, null, null, *extra)


def mark(func, compiled_and_sig):
    """``func`` with the attributes that carry the kernel's cubin to ``attach_external_modules``."""
    compiled, _ = compiled_and_sig
    return func.with_attrs({
        "tirx.is_scheduled": True, "op_pattern": 8, ATTR_NAME: compiled.name,
        ATTR_CUBIN: base64.b64encode(bytes(compiled.asm["cubin"])).decode("ascii"),
        ATTR_ARG_TYPES: json.dumps(arg_types(compiled_and_sig)),
        ATTR_LAUNCH_TAGS: json.dumps(launch_tags(compiled)),
    })


def embedded_kernels(mod) -> dict:
    """{kernel name: (cubin bytes, arg types, launch tags)} of the marked PrimFuncs in ``mod``."""
    from tvm import tirx

    out = {}
    for _, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None and ATTR_NAME in func.attrs:
            out[str(func.attrs[ATTR_NAME])] = (base64.b64decode(str(func.attrs[ATTR_CUBIN])),
                                               json.loads(str(func.attrs[ATTR_ARG_TYPES])),
                                               json.loads(str(func.attrs[ATTR_LAUNCH_TAGS])))
    return out


def cuda_module(name: str, cubin: bytes, types_: list[str], tags: list[str]):
    """A CUDA runtime module holding ``cubin`` with one function-table entry (needs TVM's CUDA runtime loaded)."""
    import tvm
    import tvm_ffi

    meta = json.dumps({"tvm_version": tvm.__version__,
                       "func_info": {name: {"name": name, "arg_types": types_, "launch_param_tags": tags}}})
    fmap = tvm_ffi.get_global_func("runtime.LoadMetaDataFromJSON")(meta)
    return tvm_ffi.get_global_func("ffi.Module.create.cuda")(cubin, "cubin", fmap, {})


def attach_external_modules(mod):
    """``mod`` with a CUDA module per embedded Triton kernel added to its ``external_mods`` attribute."""
    kernels = embedded_kernels(mod)
    if not kernels:
        return mod
    attrs = dict(mod.attrs) if mod.attrs is not None else {}
    ext = list(attrs.get("external_mods", []))
    have = {n for m in ext for n in kernels if m.implements_function(n)}
    ext += [cuda_module(n, *kernels[n]) for n in kernels if n not in have]
    return mod.with_attr("external_mods", ext)


# ----------------------------------------------------------------------------------- sliding-window attention


def _kernel_unsupported(spec) -> str | None:
    """What both Triton attention kernels need of ``spec``: one head dim for q/k and v (one BLOCK_D), a dtype Triton
    computes, a head dim it tiles; then the spec's own check."""
    if spec.value_dim != spec.head_dim:
        return f"value dim {spec.value_dim} != head dim {spec.head_dim}"
    if spec.dtype not in _TIR_DTYPE:
        return f"dtype {spec.dtype}"
    if not 1 <= spec.head_dim <= 256:
        return f"head dim {spec.head_dim} outside [1, 256]"
    return spec.check()


def sliding_window_unsupported(spec) -> str | None:
    """Why the Triton sliding-window kernel cannot run ``spec`` (an AttentionSpec), or None."""
    if not spec.window:
        return "no sliding window"
    if not spec.causal:
        return "a window without causality (the Triton kernel is always causal)"
    if spec.bias is not None:
        return "an additive bias tensor (the Triton kernel computes only the causal window mask)"
    return _kernel_unsupported(spec)


def _strides(layout: str, b, n, s, d) -> dict:
    """Element strides per axis letter of a contiguous tensor whose axes sit in ``layout``'s order."""
    dims = {"b": b, "n": n, "s": s, "d": d}
    out, acc = {}, 1
    for c in reversed(layout):
        out[c] = acc
        acc = acc * dims[c]
    return out


def _operand_strides(spec, B, SQ, SKV) -> list:
    """The 16 int32 strides (b, n, s, d of q, k, v, out, in that order) both Triton kernels take, for the spec's
    layouts of contiguous tensors."""
    from tvm import tirx

    H, HKV, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    strides = []
    for layout, heads, seq in ((spec.q_layout, H, SQ), (spec.k_layout, HKV, SKV), (spec.v_layout, HKV, SKV),
                               (spec.out_layout, H, SQ)):
        st = _strides(layout, B, heads, seq, D)
        strides += [tirx.Cast("int32", st[c]) for c in "bnsd"]
    return strides


def sliding_window_attention_func(spec, arch: str = "sm_80"):
    """PrimFunc (q, k, v, out) launching the Triton sliding-window kernel for ``spec`` on ``arch``.

    Same parameters as ``flash_attention_cuda(spec)``; raises ValueError when ``sliding_window_unsupported``."""
    why = sliding_window_unsupported(spec)
    if why:
        raise ValueError(f"Triton sliding-window kernel cannot take {spec.kind}: {why}")
    import torch
    from tvm import tirx
    from tvm.script import tirx as T

    from llmcc.kernels import _common
    from llmcc.kernels import sliding_window_attention as swa
    from llmcc.kernels.flash_attention import attention_prim_func

    tdt = _TIR_DTYPE[spec.dtype]
    config = swa.SlidingWindowAttentionConfig.get_default(seq_q=spec.q_len, head_dim=spec.head_dim)
    ptr = "*" + tdt
    fn = _common.jit_function(swa._sliding_window_attention_kernel)
    consts = {"BLOCK_M": config.BLOCK_M, "BLOCK_N": config.BLOCK_N,
              "BLOCK_D": _common.head_dim_block(spec.head_dim),
              "INPUT_PRECISION": _common.input_precision(getattr(torch, spec.dtype), False)}
    sig = {n: "i32" for n in fn.arg_names if n not in consts}
    sig.update({"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "qk_scale": "fp32"})
    name = (f"llmcc_triton_swa_{tdt}_d{spec.head_dim}_m{config.BLOCK_M}n{config.BLOCK_N}"
            f"w{config.num_warps}s{config.num_stages}")
    kern = aot_compile(swa._sliding_window_attention_kernel, sig, consts, arch, name=name,
                       num_warps=config.num_warps, num_stages=config.num_stages)

    H, HKV, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    window, qk_scale, block_m = int(spec.window), float(spec.scale) * _LOG2E, config.BLOCK_M

    def i32(x):
        return tirx.Cast("int32", x)

    def call(Q, K, V, O, B, SQ, SKV):
        strides = _operand_strides(spec, B, SQ, SKV)
        args = [Q.data, K.data, V.data, O.data, *strides, tirx.const(H, "int32"), tirx.const(H // HKV, "int32"),
                i32(SQ), i32(SKV), tirx.const(D, "int32"), tirx.const(window, "int32"),
                tirx.FloatImm("float32", qk_scale)]
        grid = [tirx.Cast("int64", (SQ + block_m - 1) // block_m), B * H, tirx.const(1, "int64")]
        return launch(kern, grid, args)

    @T.macro
    def body(Q, K, V, Bias, Rows, Cols, O, B, SQ, SKV):
        if B * SQ > T.int64(0):
            T.evaluate(call(Q, K, V, O, B, SQ, SKV))

    return mark(attention_prim_func(spec, body), kern)


# ----------------------------------------------------------------------------------- block-sparse attention


def block_sparse_unsupported(spec) -> str | None:
    """Why the Triton block-sparse kernel cannot run ``spec`` (an AttentionSpec with a block layout), or None."""
    if not spec.block_layout:
        return "no block layout"
    bq, bk, _ = spec.block_layout
    if bq != bk or bq not in (16, 32, 64, 128):
        return f"layout blocks {bq} x {bk}: the kernel takes square blocks of 16, 32, 64 or 128"
    if spec.bias is not None:
        return "an additive bias tensor (the kernel reads only the layout)"
    return _kernel_unsupported(spec)


def block_sparse_attention_func(spec, arch: str = "sm_80"):
    """PrimFunc (q, k, v, layout_rows, layout_cols, out) launching the Triton block-sparse kernel for ``spec``
    (``spec.block_layout`` = (block, block, layout heads); the CSR rows cover layout heads x query blocks) on
    ``arch``; raises ValueError when ``block_sparse_unsupported``."""
    why = block_sparse_unsupported(spec)
    if why:
        raise ValueError(f"Triton block-sparse kernel cannot take {spec.kind}: {why}")
    import torch
    from tvm import tirx
    from tvm.script import tirx as T

    from llmcc.kernels import _common
    from llmcc.kernels import block_sparse_attention as bsa
    from llmcc.kernels.flash_attention import attention_prim_func

    block, _, layout_heads = spec.block_layout
    tdt = _TIR_DTYPE[spec.dtype]
    config = bsa.BlockSparseAttentionConfig.get_default(block_size=block, head_dim=spec.head_dim)
    block_m, block_n = config.tiles(block)
    consts = {"BLOCK_M": block_m, "BLOCK_N": block_n, "LAYOUT_BLOCK": block,
              "BLOCK_D": _common.head_dim_block(spec.head_dim), "CAUSAL": False, "HAS_KV_LENS": False,
              "INPUT_PRECISION": _common.input_precision(getattr(torch, spec.dtype), False)}
    fn = _common.jit_function(bsa._block_sparse_attention_kernel)
    ptr = "*" + tdt
    sig = {n: "i32" for n in fn.arg_names if n not in consts}
    sig.update({"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "RowPtr": "*i32", "ColIdx": "*i32", "KvLens": "*i32",
                "qk_scale": "fp32"})
    name = (f"llmcc_triton_bsa_{tdt}_d{spec.head_dim}_b{block}m{block_m}n{block_n}"
            f"w{config.num_warps}s{config.num_stages}")
    kern = aot_compile(bsa._block_sparse_attention_kernel, sig, consts, arch, name=name,
                       num_warps=config.num_warps, num_stages=config.num_stages)

    H, HKV, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    qk_scale = float(spec.scale) * _LOG2E

    def i32(x):
        return tirx.Cast("int32", x)

    def call(Q, K, V, Rows, Cols, O, B, SQ, SKV):
        strides = _operand_strides(spec, B, SQ, SKV)
        num_q_blocks = i32((SQ + block - 1) // block)
        args = [Q.data, K.data, V.data, O.data, Rows.data, Cols.data, Rows.data, *strides,
                tirx.const(H, "int32"), tirx.const(H // HKV, "int32"), i32(SQ), i32(SKV), tirx.const(D, "int32"),
                num_q_blocks, tirx.const(int(layout_heads > 1), "int32"), tirx.FloatImm("float32", qk_scale)]
        grid = [tirx.Cast("int64", (SQ + block_m - 1) // block_m), B * H, tirx.const(1, "int64")]
        return launch(kern, grid, args)

    @T.macro
    def body(Q, K, V, Bias, Rows, Cols, O, B, SQ, SKV):
        if B * SQ > T.int64(0):
            T.evaluate(call(Q, K, V, Rows, Cols, O, B, SQ, SKV))

    return mark(attention_prim_func(spec, body), kern)
