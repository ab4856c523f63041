"""Length buckets: tuning kernels with symbolic sizes, and running the tuned ones at any size.

MetaSchedule measures concrete shapes only, and a tuned trace does not replay onto a symbolic loop (its split
factors must cover the extent). So a kernel with symbolic sizes (batch, sequence) is tuned at static bindings, the
buckets: ``tune --buckets 32,128 --dims batch=1`` measures ``specialize(func, {"batch": 1, "sequence": 128})``
and the same at 32. At compile time llmcc.passes.dispatch_length_buckets calls a bucket's static kernel for every
shape that fits in it and is large enough to be worth padding: the inputs are padded with zeros up to the bucket's
sizes, the outputs' leading rows kept. Other shapes run the rule-scheduled symbolic kernel.

Padding is only sound for a kernel whose rows are independent along every symbolic size (``row_independent``):
each block iterates the size at most once, as a spatial axis, and reads and writes row ``v`` of every dimension of
that size at its own row ``v``; the size appears nowhere else. A matmul over tokens, a norm per token, a GELU
qualify; a softmax over keys (a reduction along the length), a transpose of two lengths, a causal mask (the length
in an index) do not.

A shape equal to the bucket's runs its static kernel on the tensors as they are, where the tuned record plus the
cost of dispatching (DISPATCH_US) beats the rule's by PADDING_MARGIN. Padding costs: a bucket of E elements (the
product of its sizes) runs E rows' worth for a shape of e, plus the copies (``padding_overhead_us``). It is worth
it where that is under the rule's time at e (taken as linear in the elements): ``lowest_elements`` is the bound,
from the two records the database holds for the bucket (the tuned one and the rule's own, which ``tune`` measures
first).
"""

from __future__ import annotations

import math

from tvm import tirx

#: ``llmcc tune`` without ``--buckets`` / ``--dims``: the lengths a prefill kernel is tuned at, and its other sizes
DEFAULT_BUCKETS = (128,)
DEFAULT_DIMS = {"batch": 1}
#: a bucket must beat the rule by this fraction at the true sizes
PADDING_MARGIN = 0.05
#: choosing a bucket at run time: the VM calls the dispatcher function, matches shapes and tests the sizes (a dozen
#: VM instructions); a kernel whose tuned schedule saves less than this is not worth dispatching (the zoo benchmark
#: without it: llama-decode 0.95x, its tuned bucket kernels saving fractions of a microsecond each)
DISPATCH_US = 3.0
#: the padded path's cost beyond its kernel: a VM function call, two more kernel calls and two allocations, and
#: the copies at 10 GB/s (the pad and take kernels copied 15-55 GB/s on this 2-core VM, by size; conservative)
PADDED_CALL_US = 5.0
COPY_BYTES_PER_US = 10000.0


def _uses(expr, var) -> bool:
    from tvm.tirx.analysis import undefined_vars

    if isinstance(expr, int):
        return False
    return any(v.same_as(var) for v in undefined_vars(expr))


def _is_var(expr, var) -> bool:
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def symbolic_vars(func) -> list | None:
    """The symbolic variables of ``func``'s parameter shapes, in order, when every dimension is a constant or one
    of them; None when a dimension is an expression of them (``sequence + 1``: no row to pad)."""
    found: list = []
    for param in func.params:
        for dim in getattr(param, "shape", None) or ():
            if isinstance(dim, (int, tirx.IntImm)):
                continue
            if not isinstance(dim, tirx.Var):
                return None
            if not any(dim.same_as(v) for v in found):
                found.append(dim)
    return found


def _blocks(sch, block=None) -> list:
    block = block if block is not None else sch.get_sblock("root")
    out = []
    for child in sch.get_child_blocks(block):
        out.append(child)
        out += _blocks(sch, child)
    return out


def row_independent(func, var) -> str | None:
    """Why padding ``func``'s dimension ``var`` with extra rows could change its first rows, or None when it cannot
    (module docstring)."""
    from tvm import s_tir

    try:
        sch = s_tir.Schedule(func)
        blocks = _blocks(sch)
    except Exception:  # noqa: BLE001 - not a kernel of blocks (a hand-written one): nothing to reason about
        return "not a kernel of blocks"
    for rv in blocks:
        block = sch.get(rv)
        name = block.name_hint
        for loop in sch.get_loops(rv):
            extent = sch.get(loop).extent
            if _uses(extent, var) and not _is_var(extent, var):
                return f"block {name}: a loop over {extent}"
        rows = []
        for iv in block.iter_vars:
            if not _uses(iv.dom.extent, var):
                continue
            if not _is_var(iv.dom.extent, var) or iv.iter_type != 0:  # 0: a spatial (data-parallel) axis
                return f"block {name}: {'reduces along' if iv.iter_type != 0 else 'iterates over'} {iv.dom.extent}"
            rows.append(iv.var)
        if len(rows) > 1:
            return f"block {name}: iterates {var} twice (a {var} x {var} result)"
        row = rows[0] if rows else None
        for region in list(block.reads) + list(block.writes):
            for dim, rng in zip(region.source.shape, region.region):
                if _is_var(dim, var):
                    if row is None or not _is_var(rng.min, row) or not (isinstance(rng.extent, (int, tirx.IntImm))
                                                                        and int(rng.extent) == 1):
                        return f"block {name}: {region.source.name} is not read or written at its own {var} row"
                elif _uses(dim, var) or _uses(rng.min, var) or (row is not None and _uses(rng.min, row)):
                    return f"block {name}: the {var} index reaches {region.source.name} outside its {var} dimension"
        for alloc in block.alloc_buffers:
            if any(_uses(d, var) and not _is_var(d, var) for d in alloc.shape):
                return f"block {name}: a buffer of shape {list(alloc.shape)}"
        if _uses(block.body, var) or (block.init is not None and _uses(block.init, var)):
            return f"block {name}: uses {var} in its computation"
    return None


def bucket_reason(func) -> tuple[list, str | None]:
    """``(symbolic vars, None)`` for a kernel that can be tuned per bucket, else ``(vars or [], why not)``."""
    if any(getattr(p, "shape", None) is None for p in func.params):
        return [], "a scalar parameter (a size passed by value)"
    variables = symbolic_vars(func)
    if variables is None:
        return [], "a dimension is an expression of the symbolic sizes"
    if not variables:
        return [], "no symbolic size in its tensors"
    for var in variables:
        reason = row_independent(func, var)
        if reason is not None:
            return variables, reason
    return variables, None


def specialize(func, binding: dict):
    """``func`` with its symbolic variables bound (``{name: value}``, every one of them): the static kernel a bucket
    is tuned and run as."""
    for var in symbolic_vars(func) or ():
        if var.name not in binding:
            raise ValueError(f"no value for the symbolic size {var.name}")
    values = {var.name: tirx.const(int(binding[var.name]), var.ty.dtype) for var in symbolic_vars(func)}
    for i in range(len(func.params)):
        param = func.params[i]
        shape = getattr(param, "shape", None)
        if shape and any(isinstance(d, tirx.Var) for d in shape):
            static = tirx.decl_buffer([values[d.name] if isinstance(d, tirx.Var) else d for d in shape], param.dtype,
                                      param.name, elem_offset=param.elem_offset, strides=param.strides,
                                      data_alignment=param.data_alignment, offset_factor=param.offset_factor)
            func = func.specialize({param: static})
    return func


def tuning_bindings(func, lengths, dims: dict) -> tuple[list[dict], str | None]:
    """The bindings ``tune`` measures ``func`` at: ``dims`` ({name: value}) for the symbolic sizes it names, and each
    of ``lengths`` for the one size it does not (the sequence length); or ([], why not)."""
    variables, reason = bucket_reason(func)
    if reason is not None:
        return [], reason
    free = [v.name for v in variables if v.name not in dims]
    if len(free) > 1:
        return [], f"symbolic sizes {', '.join(free)}: bind all but the length with --dims NAME=VALUE"
    if free and not lengths:
        return [], f"symbolic length {free[0]}: tune it with --buckets"
    fixed = {v.name: int(dims[v.name]) for v in variables if v.name in dims}
    return ([{**fixed, free[0]: int(b)} for b in lengths] if free else [fixed]), None


def binding_name(binding: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in binding.items())


def candidate_bindings(db, func) -> list[dict]:
    """The bindings of ``func``'s symbolic sizes that ``db`` has records for (any target), fewest elements first:
    read off the records' argument shapes, which must equal ``func``'s with one value per symbolic size (the
    specialized kernel's hash then decides)."""
    variables = symbolic_vars(func)
    if not variables:
        return []
    pattern = []
    for param in func.params:
        shape = getattr(param, "shape", None)
        if shape is None:
            return []
        pattern.append((str(param.dtype), [d.name if isinstance(d, tirx.Var) else int(d) for d in shape]))
    found = {}
    for args in db.argument_shapes():
        if len(args) != len(pattern):
            continue
        binding: dict = {}
        ok = True
        for (dtype, dims), (arg_dtype, arg_dims) in zip(pattern, args):
            if arg_dtype != dtype or len(arg_dims) != len(dims):
                ok = False
                break
            for d, a in zip(dims, arg_dims):
                if isinstance(d, str):
                    if binding.setdefault(d, a) != a:
                        ok = False
                elif d != a:
                    ok = False
            if not ok:
                break
        if ok and len(binding) == len(variables):
            found[tuple(sorted(binding.items()))] = {v.name: binding[v.name] for v in variables}
    return sorted(found.values(), key=lambda b: (math.prod(b.values()), tuple(b.values())))


def padding_overhead_us(func, binding: dict) -> float:
    """What running a bucket on padded rows costs on top of its kernel: a call of the padding function and, for
    every tensor with a symbolic size, a copy of it at the bucket's size (written, then read)."""
    import tvm

    total = 0
    for param in func.params:
        shape = getattr(param, "shape", None)
        if shape and any(isinstance(d, tirx.Var) for d in shape):
            dtype = tvm.DataType(str(param.dtype))
            total += math.prod(int(binding[d.name]) if isinstance(d, tirx.Var) else int(d) for d in shape) * \
                dtype.bits * dtype.lanes // 8
    return PADDED_CALL_US + 2 * total / COPY_BYTES_PER_US


def lowest_elements(elements: int, tuned_us: float | None, rule_us: float | None) -> int:
    """The fewest elements (product of the symbolic sizes) for which padding to a bucket of ``elements`` (tuned time
    ``tuned_us``) beats the rule on the true sizes (``rule_us`` at the bucket's sizes, scaled by elements), with
    PADDING_MARGIN for the copies in and out. Without the rule's time: the bucket's own sizes only. Returns more
    than ``elements`` when the tuned kernel is not faster than the rule by the margin even there (the best record
    is the rule's own, say)."""
    if tuned_us is None or rule_us is None or rule_us <= 0:
        return elements
    return max(1, math.floor(elements * tuned_us * (1 + PADDING_MARGIN) / rule_us) + 1)
