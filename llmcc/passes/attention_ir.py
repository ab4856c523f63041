"""Small helpers for reading Relax dataflow graphs, shared by the attention matchers (fuse_attention and
longformer_attention): a binding's op, its tensor type's shape and dtype, its producer through variables, and
walks upstream."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.sym.analyzer import Analyzer

Const = tvm.ir.GenericConst  # TVM 0.27: relax constants are tvm.ir.GenericConst(.value, .ty)


class NoMatch(Exception):
    """A matcher's step found something other than the pattern's op; the message says what."""



def op_name(expr) -> str | None:
    return expr.op.name if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) else None


def tensor_ty(expr):
    ty = getattr(expr, "ty", None)
    return ty if isinstance(ty, relax.TensorType) else None


def shape(expr):
    ty = tensor_ty(expr)
    return list(ty.shape.values) if ty is not None and ty.shape is not None else None


def dtype(expr) -> str:
    ty = tensor_ty(expr)
    return str(ty.dtype) if ty is not None else ""


def ndim(expr) -> int:
    ty = tensor_ty(expr)
    return ty.ndim if ty is not None else -1


def scalar(const) -> float | None:
    """The value of a constant with one element, else None."""
    arr = const.value.numpy()
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


def same_dim(a, b) -> bool:
    return Analyzer().can_prove_equal(a, b)


def is_one(d) -> bool:
    return isinstance(d, (int, tvm.tirx.IntImm)) and int(d) == 1


def producer(expr, var2val):
    """The call that computes ``expr`` (looking through variable bindings), or None."""
    seen = 0
    while isinstance(expr, relax.Var) and expr in var2val and seen < 8:
        expr, seen = var2val[expr], seen + 1
    return expr if isinstance(expr, relax.Call) else None


def operand_vars(expr) -> list:
    """The variables ``expr`` uses directly: a call's arguments, a tuple's fields (nested), a tuple item's tuple."""
    if isinstance(expr, relax.Var):
        return [expr]
    if isinstance(expr, relax.Call):
        return [v for a in expr.args for v in operand_vars(a)]
    if isinstance(expr, relax.Tuple):
        return [v for f in expr.fields for v in operand_vars(f)]
    if isinstance(expr, relax.TupleGetItem):
        return operand_vars(expr.tuple_value)
    return []


def axes(call) -> list[int]:
    return [int(a) for a in call.attrs.axes]


def upstream(expr, var2val, *, through=None, limit=400):
    """Calls reachable from ``expr`` through its arguments (only through ops in ``through`` when given)."""
    out, stack, seen = [], [expr], set()
    while stack and len(out) < limit:
        e = stack.pop()
        call = producer(e, var2val)
        if call is None or call in seen:
            continue
        seen.add(call)
        out.append(call)
        if through is not None and op_name(call) not in through:
            continue
        for a in call.args:
            if isinstance(a, relax.Tuple):
                stack.extend(a.fields)
            else:
                stack.append(a)
    return out


def callee(call) -> str:
    """The PrimFunc name of a call_tir (the importer legalizes einsum and pad into call_tir), else ''."""
    if op_name(call) == "relax.call_tir" and isinstance(call.args[0], tvm.ir.GlobalVar):
        return call.args[0].name_hint
    return ""


def product_operands(call):
    """(left, right) of a matmul or of an einsum's call_tir, else None."""
    if op_name(call) == "relax.matmul":
        return call.args[0], call.args[1]
    if callee(call).startswith("einsum") and len(call.args[1].fields) == 2:
        return tuple(call.args[1].fields)
    return None
