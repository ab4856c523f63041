"""ONNX -> Relax import: file checks, a pre-import clean-up, llmcc's converters over TVM's, one-line errors."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx

from llmcc.errors import ImportFailure, LlmccError

ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool",
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, dtype and shape (ints, or strings for symbolic dims)."""

    name: str
    dtype: str
    shape: tuple

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


def load_model(source) -> onnx.ModelProto:
    """An ONNX ModelProto from a path or a ModelProto, with errors naming the file."""
    if isinstance(source, onnx.ModelProto):
        model = source
        where = "the given ModelProto"
    else:
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise LlmccError(f"{path}: no such file")
        if path.is_dir():
            raise LlmccError(f"{path}: is a directory, not an ONNX file")
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # protobuf raises DecodeError, but also others for garbage
            raise ImportFailure(f"{path}: not a readable ONNX model ({type(exc).__name__}: "
                                f"{_first_line(exc)}); is the file truncated?") from None
    if not model.graph.node:
        raise ImportFailure(f"{where}: not an ONNX model (the graph has no nodes)")
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:
        raise ImportFailure(f"{where}: invalid ONNX model: {_first_line(exc)}") from None
    return _with_node_names(model)


def _with_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or where some nodes have no name (ONNX allows it) a copy naming each ``{op_type}_{index}``: the
    quantization plan, the report and error messages know layers by node name (two unnamed MatMuls were one layer
    to the gate, and its w8a8 simulation gave onnxruntime two nodes of the same name)."""
    if all(node.name for node in model.graph.node):
        return model
    named = onnx.ModelProto()
    named.CopyFrom(model)
    taken = {node.name for node in named.graph.node}
    for index, node in enumerate(named.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return named


def model_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def graph_signature(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (initializers excluded) and outputs with their symbolic shapes."""
    inits = {i.name for i in model.graph.initializer}

    def spec(vi) -> TensorSpec:
        tt = vi.type.tensor_type
        shape = tuple(d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
                      for d in tt.shape.dim)
        return TensorSpec(vi.name, ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)), shape)

    inputs = [spec(vi) for vi in model.graph.input if vi.name not in inits]
    outputs = [spec(vi) for vi in model.graph.output]
    return inputs, outputs


def import_model(model: onnx.ModelProto):
    """Relax IRModule of ``model`` with symbolic dims kept; weights become constants.

    Raises ImportFailure naming op type, node and opset of the first node that cannot be converted.
    """
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

    from llmcc.frontend.onnx_attention_ops import ATTENTION_CONVERTERS
    from llmcc.frontend.onnx_cleanup import clean_model
    from llmcc.frontend.onnx_converters import CONVERTERS
    from llmcc.frontend.onnx_quantized import CONTRIB_CONVERTERS

    model = clean_model(model)
    opset = model_opset(model)
    supported = (set(tvm_onnx._get_convert_map()) | set(CONVERTERS) | set(ATTENTION_CONVERTERS)
                 | {"If", "Constant"})
    for node in model.graph.node:
        if node.domain == "com.microsoft" and node.op_type in CONTRIB_CONVERTERS:
            continue
        if node.op_type not in supported or node.domain not in ("", "ai.onnx"):
            raise ImportFailure(f"unsupported ONNX op {node.domain + '.' if node.domain else ''}{node.op_type} "
                                f"(node '{node.name}', opset {opset})")

    failed_node: list = []
    original_map = tvm_onnx._get_convert_map
    original_convert = tvm_onnx.ONNXGraphImporter._convert_operator

    def convert_map():
        table = original_map()
        table.update(CONVERTERS)
        table.update(ATTENTION_CONVERTERS)  # over TVM's "Attention", which is com.microsoft's
        table.update(CONTRIB_CONVERTERS)
        return table

    def convert_operator(self, op_name, inputs, attrs, opset_):
        attrs["_opset"] = opset_
        try:
            return original_convert(self, op_name, inputs, attrs, opset_)
        except Exception:
            failed_node.append((op_name, attrs.get("tvm_custom", {}).get("name", "?")))
            raise

    tvm_onnx._get_convert_map = convert_map
    tvm_onnx.ONNXGraphImporter._convert_operator = convert_operator
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return from_onnx(model, keep_params_in_input=False, sanitize_input_names=False)
    except Exception as exc:
        if failed_node:
            op, name = failed_node[-1]
            raise ImportFailure(f"cannot import ONNX op {op} (node '{name}', opset {opset}): "
                                f"{_first_line(exc)}") from None
        raise ImportFailure(f"cannot import the ONNX graph: {_first_line(exc)}") from None
    finally:
        tvm_onnx._get_convert_map = original_map
        tvm_onnx.ONNXGraphImporter._convert_operator = original_convert


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    # TVM puts the meaningful sentence last, after a C++ backtrace.
    text = lines[-1] if lines else type(exc).__name__
    return text[:300]
