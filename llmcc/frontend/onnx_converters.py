"""llmcc's ONNX op converters, registered over TVM 0.27's.

TVM's importer tracks shape arithmetic symbolically: ``Shape`` gives a ``relax.ShapeExpr``, ``Gather`` of one entry
gives a bare PrimExpr (``sequence``), and ``Add`` keeps it symbolic (``sequence + 1``). Its converters for the
ops that torch's dynamo exporter then applies to such a scalar (``Reshape`` to 1-D, ``Unsqueeze``, ``Range``...)
expect tensors and fail ("Reshape expects the input data to be a Tensor ... given input is ir.PrimType"). The
converters here accept those symbolic values and keep them symbolic, so the result keeps its symbolic dims; anything
they do not special-case falls through to TVM's own converter.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx


def _is_prim(value) -> bool:
    """A symbolic scalar: in TVM 0.27 the importer passes these around as bare PrimExprs."""
    return value is not None and tvm.ir.is_prim_expr(value)


def _const_list(value) -> list | None:
    """The values of a constant 0-D/1-D tensor, else None."""
    if isinstance(value, tvm.ir.GenericConst):
        return np.asarray(value.value.numpy()).reshape(-1).tolist()
    return None


def _prim_to_tensor(bb: relax.BlockBuilder, value, dtype: str = "int64") -> relax.Expr:
    """A symbolic scalar as a 0-D tensor (computed at run time from the shape variables)."""
    vector = bb.normalize(relax.op.shape_to_tensor(relax.ShapeExpr([value])))
    scalar = bb.normalize(relax.op.reshape(vector, []))
    if dtype != "int64":
        scalar = bb.normalize(relax.op.astype(scalar, dtype))
    return scalar


def _as_tensor(bb, value):
    if _is_prim(value):
        return _prim_to_tensor(bb, value)
    if isinstance(value, relax.ShapeExpr):
        return bb.normalize(relax.op.shape_to_tensor(value))
    return value


def _fallback(op_type: str):
    return tvm_onnx._get_convert_map()[op_type]


class _Delegating(tvm_onnx.OnnxOpConverter):
    """Base: ``_special`` handles the symbolic cases and returns None to defer to TVM's converter."""

    op_type = ""

    @classmethod
    def _special(cls, bb, inputs, attr, params):
        return None

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        result = cls._special(bb, inputs, attr, params)
        if result is not None:
            return result
        opset = attr.get("_opset", 23)
        return _TVM_MAP[cls.op_type].get_converter(opset)(bb, inputs, attr, params)


class Reshape(_Delegating):
    """Reshape of a symbolic scalar to 1-D (``[sequence + 1]``) stays a ShapeExpr; a reshape to a shape tensor known
    only at run time (Longformer's [max global tokens, heads, head dim]) binds its dims (see _run_time_shape)."""

    op_type = "Reshape"

    @classmethod
    def _special(cls, bb, inputs, attr, params):
        data, shape = inputs[0], inputs[1]
        if _is_prim(data):
            target = _const_list(tvm_onnx.get_constant(shape, params))
            if target is not None and len(target) == 1 and target[0] in (1, -1):
                return relax.ShapeExpr([data])
            if target == []:
                return data
            return relax.op.reshape(_prim_to_tensor(bb, data), target)
        if _const_list(tvm_onnx.get_constant(shape, params)) is None and not isinstance(shape, relax.ShapeExpr):
            dims = _run_time_shape(bb, shape)
            if dims is not None and not any(isinstance(d, tirx.IntImm) and int(d) == 0 for d in dims):
                return relax.op.reshape(data, dims)  # a -1 entry is inferred by reshape
        return None


class Unsqueeze(_Delegating):
    """Unsqueeze of a symbolic scalar at axis 0 is a 1-D ShapeExpr."""

    op_type = "Unsqueeze"

    @classmethod
    def _special(cls, bb, inputs, attr, params):
        data = inputs[0]
        if _is_prim(data):
            axes = _const_list(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else list(attr.get("axes", []))
            if axes in ([0], [-1]):
                return relax.ShapeExpr([data])
            return None
        return None


class Squeeze(_Delegating):
    """Squeeze of a one-entry ShapeExpr gives its symbolic scalar."""

    op_type = "Squeeze"

    @classmethod
    def _special(cls, bb, inputs, attr, params):
        data = inputs[0]
        if isinstance(data, relax.ShapeExpr) and len(data.values) == 1:
            return relax.prim_value(data.values[0])
        return None


class Expand(_Delegating):
    """Expand to a constant shape of a tensor with symbolic dims (TVM's converter reads every data dim as a
    constant). ONNX broadcasting, right-aligned: a target -1 or 1 keeps the data dim; a data dim 1 takes the target;
    a symbolic data dim against a target > 1 takes the target (broadcast_to checks it at run time)."""

    op_type = "Expand"

    @classmethod
    def _special(cls, bb, inputs, attr, params):
        data, shape = inputs[0], inputs[1]
        target = _const_list(shape)
        ty = getattr(data, "ty", None)
        if target is None or not isinstance(ty, relax.TensorType) or ty.shape is None:
            return None
        dims = list(ty.shape.values)
        if all(isinstance(d, tvm.tirx.IntImm) for d in dims):
            return None  # all static: TVM's converter handles it
        rank = max(len(dims), len(target))
        dims = [tvm.tirx.IntImm("int64", 1)] * (rank - len(dims)) + dims
        target = [1] * (rank - len(target)) + [int(t) for t in target]
        out = []
        for d, t in zip(dims, target):
            if t in (-1, 1):
                out.append(d)
            elif isinstance(d, tvm.tirx.IntImm) and int(d) not in (1, t):
                return None  # not broadcastable: TVM's converter raises its message
            else:
                out.append(tvm.tirx.IntImm("int64", t))
        if all(isinstance(a, tvm.tirx.IntImm) and isinstance(b, tvm.tirx.IntImm) and int(a) == int(b) or a.same_as(b)
               for a, b in zip(out, dims)) and rank == len(ty.shape.values):
            return data
        return relax.op.broadcast_to(data, relax.ShapeExpr(out))


class ConstantOfShape(_Delegating):
    """ConstantOfShape with a constant shape of any rank, the empty shape ``[]`` (a 0-D scalar) included, and the
    fill value read as a scalar. TVM's converter folds only a constant 1-D result; for any other constant shape it
    broadcasts the 1-element ``value`` tensor, which fails when the shape is ``[]`` ("broadcast_to expects the input
    shape to have the number of ndim at least as the input tensor's"): torch's TorchScript exporter writes
    ``ConstantOfShape([])`` for every Python scalar it turns into a tensor (Longformer's masks are full of them).
    A symbolic shape (a ShapeExpr) broadcasts the scalar; a shape tensor known only at run time (Longformer's global
    keys, [1, max global tokens, heads, head dim]) gets symbolic dims (see _run_time_shape), where TVM's converter
    gave a tensor of unknown shape that the next Shape/Slice refused ("Slice requires a statically known input
    rank")."""

    op_type = "ConstantOfShape"

    @classmethod
    def _special(cls, bb, inputs, attr, params):
        proto = attr.get("value")
        value = tvm_onnx.get_numpy(proto) if proto is not None else np.zeros((1,), "float32")
        value = np.asarray(value).reshape(-1)[:1].reshape(())
        shape = inputs[0]
        dims = _const_list(tvm_onnx.get_constant(shape, params))
        if dims is not None:
            return relax.const(np.full([int(d) for d in dims], value, value.dtype), str(value.dtype))
        if isinstance(shape, relax.ShapeExpr):
            return relax.op.broadcast_to(relax.const(value, str(value.dtype)), shape)
        dims = _run_time_shape(bb, shape)
        if dims is None:
            return None
        return relax.op.broadcast_to(relax.const(value, str(value.dtype)), relax.ShapeExpr(dims))


def _run_time_shape(bb: relax.BlockBuilder, shape) -> list | None:
    """The dims of a 1-D int64 shape tensor known only at run time (Longformer's [1, max global tokens, heads, head
    dim], whose middle entry is a ReduceMax of a mask): one PrimExpr per entry, bound by a match_cast of
    tensor_to_shape(shape). An entry of the Concat building the tensor is read by _symbolic_int: a constant stays that
    constant (the result keeps every static dim), a run-time value gets its one symbolic dim; when the tensor is not
    such a Concat every entry is a fresh dim. None when the length is unknown."""
    shape = bb.normalize(shape)
    ty = getattr(shape, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.ndim != 1 or ty.shape is None \
            or not isinstance(ty.shape.values[0], tirx.IntImm) or "int" not in str(ty.dtype):
        return None
    length = int(ty.shape.values[0])
    fields = None
    # TVM's importer hands over an unbound call where the producer is one op, a variable where it emitted it.
    binding = bb.lookup_binding(shape) if isinstance(shape, relax.Var) else shape
    if isinstance(binding, relax.Call) and getattr(binding.op, "name", "") == "relax.concat":
        parts = binding.args[0].fields if isinstance(binding.args[0], relax.Tuple) else None
        if parts is not None and all(_one_entry(p) for p in parts):
            fields = parts
    dims = []
    for i in range(length):
        value = _symbolic_int(bb, fields[i], create=True) if fields is not None else None
        dims.append(value if value is not None else tirx.Var(f"dim{i}", "int64"))
    # The match_cast binds the symbolic dims (checked at run time); the caller's ShapeExpr uses them.
    bb.match_cast(bb.normalize(relax.op.tensor_to_shape(shape)), relax.ShapeType(dims))
    return dims


_ARITHMETIC = {"relax.add": lambda a, b: a + b, "relax.subtract": lambda a, b: a - b,
               "relax.multiply": lambda a, b: a * b}
_PASS_THROUGH = {"relax.expand_dims", "relax.reshape", "relax.astype", "relax.squeeze"}


def _symbolic_int(bb, expr, create: bool = False):
    """A one-entry integer tensor as a PrimExpr: constants, shape_to_tensor of a shape, +, -, * of those, through
    expand_dims / reshape / astype / squeeze. Any other value (a ReduceMax of a mask) is a symbolic dim of its own:
    one per value, so every tensor sized by it gets the same dim and shapes built from it still line up after import
    (concat, matmul, slice); with ``create`` a new value gets its dim, else None. TVM's importer hands over unbound
    calls where it did not emit the producer, variables where it did: both are followed."""
    for _ in range(16):
        if _is_prim(expr):
            return expr if _prim_dtype(expr) == "int64" else tirx.Cast("int64", expr)
        const = _const_list(expr)
        if const is not None:
            return tirx.IntImm("int64", int(const[0])) if len(const) == 1 and float(const[0]).is_integer() else None
        call = bb.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
        name = getattr(getattr(call, "op", None), "name", "") if isinstance(call, relax.Call) else ""
        if name in _PASS_THROUGH:
            expr = call.args[0]
            continue
        if name == "relax.shape_to_tensor" and isinstance(call.args[0], relax.ShapeExpr) \
                and len(call.args[0].values) == 1:
            return call.args[0].values[0]
        if name in _ARITHMETIC:
            a, b = (_symbolic_int(bb, x, create) for x in call.args)
            return None if a is None or b is None else _ARITHMETIC[name](a, b)
        break
    names = bb.__dict__.setdefault("_llmcc_run_time_dims", [])
    for source, var in names:
        if source.same_as(expr):
            return var
    if not create:
        return None
    var = tirx.Var(f"n{len(names)}", "int64")
    names.append((expr, var))
    return var


def _one_entry(expr) -> bool:
    ty = getattr(expr, "ty", None)
    return isinstance(ty, relax.TensorType) and ty.shape is not None and len(ty.shape.values) == 1 \
        and isinstance(ty.shape.values[0], tirx.IntImm) and int(ty.shape.values[0]) == 1


class Concat(_Delegating):
    """Concat of shape pieces where one is a ShapeExpr (a Shape whose dims are symbolic): all pieces constant or
    symbolic gives a ShapeExpr; with a run-time tensor among them, every piece becomes a tensor first. TVM's
    converter concatenates tensors only and fails on a ShapeExpr next to a tensor."""

    op_type = "Concat"

    @classmethod
    def _special(cls, bb, inputs, attr, params):
        if not any(isinstance(x, relax.ShapeExpr) or _is_prim(x) for x in inputs):
            return None
        dims = []
        for x in inputs:
            if isinstance(x, relax.ShapeExpr):
                dims.extend(x.values)
            elif _is_prim(x):
                dims.append(x)
            elif (c := _const_list(tvm_onnx.get_constant(x, params))) is not None and all(
                    isinstance(v, int) for v in c):
                dims.extend(tirx.IntImm("int64", v) for v in c)
            else:
                dims = None
                break
        if dims is not None:
            return relax.ShapeExpr(dims)
        pieces = [bb.normalize(relax.op.reshape(_as_tensor(bb, x), [1])) if _is_prim(x) else _as_tensor(bb, x)
                  for x in inputs]
        pieces = [bb.normalize(relax.op.astype(p, "int64")) if str(p.ty.dtype) != "int64" else p for p in pieces]
        return relax.op.concat(pieces, axis=int(attr.get("axis", 0)))


class Slice(_Delegating):
    """Slice whose starts/ends are run-time values that _symbolic_int can name (Longformer's
    ``probs[..., :max_global]`` and ``probs[..., max_global:]``): a strided_slice with symbolic bounds, so the result
    keeps its shape. TVM's converter makes those a dynamic_strided_slice whose result has no shape at all, which
    FoldConstant and every later shape-reading pass refuse. Axes and steps must be constant, one axis, step 1; a
    symbolic bound is a count or a dim, so it is taken as non-negative (a negative constant counts from the end)."""

    op_type = "Slice"

    @classmethod
    def _special(cls, bb, inputs, attr, params):
        if len(inputs) < 3:
            return None
        data = inputs[0]
        ty = getattr(data, "ty", None)
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            return None
        bounds = [tvm_onnx.get_constant(x, params) for x in inputs[1:3]]
        if all(_const_list(b) is not None for b in bounds) or any(isinstance(b, relax.ShapeExpr) for b in bounds):
            return None  # constant bounds, or shape slicing: TVM's converter keeps those static
        if any(getattr(getattr(b, "ty", None), "ndim", 0) != 1 for b in bounds):
            return None
        axes = _const_list(tvm_onnx.get_constant(inputs[3], params)) if len(inputs) > 3 and inputs[3] is not None \
            else [0]
        steps = _const_list(tvm_onnx.get_constant(inputs[4], params)) if len(inputs) > 4 and inputs[4] is not None \
            else [1] * len(axes or [])
        if axes is None or steps is None or len(axes) != 1 or steps != [1]:
            return None
        starts, ends = (_symbolic_int(bb, b) for b in bounds)
        if starts is None or ends is None:
            return None
        starts, ends = (v + ty.shape.values[int(axes[0]) % ty.ndim] if isinstance(v, tirx.IntImm) and v.value < 0
                        else v for v in (starts, ends))
        axis = int(axes[0]) % ty.ndim
        dim = ty.shape.values[axis]
        clamp = lambda v: tvm.tirx.max(tvm.tirx.min(v, dim), 0)  # ONNX clamps bounds to the dim (INT64_MAX = all)
        return relax.op.strided_slice(data, [axis], [clamp(starts)], [clamp(ends)], [1], assume_inbound=True)


def _prim_dtype(value) -> str:
    try:
        return str(value.dtype)
    except Exception:  # a tirx.Var of a shape exposes its type as .ty only
        return str(value.ty)


def _int_scalar(value):
    """A constant or symbolic integer scalar as a PrimExpr, else None."""
    if _is_prim(value):
        return value if _prim_dtype(value) == "int64" else tirx.Cast("int64", value)
    if isinstance(value, tvm.ir.GenericConst):
        array = np.asarray(value.value.numpy())
        if array.size == 1 and array.dtype.kind in "iu":
            return tirx.IntImm("int64", int(array.reshape(-1)[0]))
    return None


class Range(_Delegating):
    """An integer Range over symbolic bounds keeps its length symbolic (``sequence``, not a fresh variable), so
    tensors built from it still broadcast against the inputs."""

    op_type = "Range"

    @classmethod
    def _special(cls, bb, inputs, attr, params):
        bounds = [_int_scalar(tvm_onnx.get_constant(x, params)) for x in inputs[:3]]
        if any(b is None for b in bounds) or not any(_is_prim(x) for x in inputs[:3]):
            return None
        if not isinstance(bounds[2], tirx.IntImm) or bounds[2].value == 0:
            return None
        dtype = _prim_dtype(inputs[0]) if _is_prim(inputs[0]) else str(inputs[0].ty.dtype)
        return relax.op.arange(*bounds, dtype=dtype)


def _prim_binary(name: str, fn):
    class _Binary(_Delegating):
        op_type = name

        @classmethod
        def _special(cls, bb, inputs, attr, params):
            a, b = inputs[0], inputs[1]
            if not (_is_prim(a) or _is_prim(b)):
                return None
            vals = []
            for x in (a, b):
                if _is_prim(x):
                    vals.append(x)
                    continue
                c = _const_list(x)
                if c is None or len(c) != 1 or np.asarray(x.value.numpy()).ndim != 0:
                    # Mixed with a real tensor: compute on tensors.
                    return getattr(relax.op, _TENSOR_OPS[name])(_as_tensor(bb, a), _as_tensor(bb, b))
                vals.append(tirx.IntImm("int64", int(c[0])))
            return relax.prim_value(fn(*vals))

    _Binary.__name__ = name
    return _Binary


_TENSOR_OPS = {"Add": "add", "Sub": "subtract", "Mul": "multiply", "Div": "floor_divide"}


def _generic_tensorize(op_type: str):
    """Converters for ops with no symbolic meaning: symbolic scalars become 0-D int64 tensors first."""

    class _Tensorize(_Delegating):
        @classmethod
        def _special(cls, bb, inputs, attr, params):
            if any(_is_prim(x) for x in inputs):
                new_inputs = tvm_onnx.onnx_input()
                for x in inputs:
                    new_inputs.append(_prim_to_tensor(bb, x) if _is_prim(x) else x)
                opset = attr.get("_opset", 23)
                return _TVM_MAP[op_type].get_converter(opset)(bb, new_inputs, attr, params)
            return None

    _Tensorize.op_type = op_type
    _Tensorize.__name__ = op_type
    return _Tensorize


_TVM_MAP = tvm_onnx._get_convert_map()

CONVERTERS: dict[str, type] = {
    "ConstantOfShape": ConstantOfShape,
    "Concat": Concat,
    "Slice": Slice,
    "Expand": Expand,
    "Range": Range,
    "Reshape": Reshape,
    "Unsqueeze": Unsqueeze,
    "Squeeze": Squeeze,
    "Add": _prim_binary("Add", lambda a, b: a + b),
    "Sub": _prim_binary("Sub", lambda a, b: a - b),
    "Mul": _prim_binary("Mul", lambda a, b: a * b),
    "Div": _prim_binary("Div", lambda a, b: tvm.tirx.floordiv(a, b)),
}
