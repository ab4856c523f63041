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
    """Reshape of a symbolic scalar to 1-D (``[sequence + 1]``) stays a ShapeExpr."""

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
