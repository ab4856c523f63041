"""Pre-import clean-up of ONNX graphs, before TVM sees them.

Kept small on purpose: the graph stays as the exporter wrote it, except where TVM's importer needs help.

- Shapes are inferred, so the importer sees ranks of intermediate values.
- Constant Shapes and small constant subgraphs become Constant nodes: Shape of a value whose inferred shape is fully
  static, and any node whose inputs are all constants. torch's TorchScript exporter computes what is an attribute
  in spirit, such as Pad's pads, as a chain of Shape / Concat / Reshape / Slice / Transpose / Cast over constants
  (HF Longformer's sliding-window chunking); TVM's importer folds none of it, then refuses the op whose input must
  be constant ("Dynamic pads are not supported yet"). Only outputs up to ``_FOLD_MAX_ELEMENTS`` elements are
  folded, so weights and anything derived from them stay as the exporter wrote them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

# Folded values are shape arithmetic and small masks, not weights.
_FOLD_MAX_ELEMENTS = 4096
# Never folded: random or with a subgraph (their value is not a function of the inputs alone, or not one node's).
_NOT_FOLDABLE = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
                 "Dropout", "If", "Loop", "Scan", "SequenceMap"}
# Folding a Shape lets inference fix the next op's output shape, whose Shape folds in the next sweep.
_MAX_SWEEPS = 4


def clean_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with shapes inferred and small constant subgraphs (static Shape ops included) folded."""
    for _ in range(_MAX_SWEEPS):
        model = _infer_shapes(model)
        folded = fold_small_constants(model)
        if folded is model:
            break
        model = folded
    else:
        model = _infer_shapes(model)
    return model


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return model


def _static_shapes(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Value name -> shape, for every value whose inferred shape has only fixed dims."""
    out = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            out[vi.name] = [d.dim_value for d in tt.shape.dim]
    for init in graph.initializer:
        out[init.name] = list(init.dims)
    return out


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node (its ``value`` or a ``value_*`` scalar/list attribute), else None."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_int"):
            return np.asarray(onnx.helper.get_attribute_value(attr),
                              "float32" if attr.name == "value_float" else "int64")
        if attr.name in ("value_floats", "value_ints"):
            return np.asarray(list(onnx.helper.get_attribute_value(attr)),
                              "float32" if attr.name == "value_floats" else "int64")
    return None


def fold_small_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where every default-domain node whose inputs are all constants and whose outputs are all
    small (at most _FOLD_MAX_ELEMENTS elements each) is replaced by Constant nodes holding its outputs, computed by
    onnx's reference evaluator; ``model`` itself when nothing folds. Nodes are visited in graph (topological) order,
    so a chain of such nodes folds in one sweep."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    known: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        if np.prod(init.dims, dtype=np.int64) <= _FOLD_MAX_ELEMENTS:
            known[init.name] = numpy_helper.to_array(init)
    large_inits = {i.name for i in graph.initializer} - set(known)
    opset = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    static = _static_shapes(graph)
    new_nodes, folded = [], 0
    for node in graph.node:
        if node.op_type == "Shape" and node.domain in ("", "ai.onnx") and node.input[0] in static:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            dims = static[node.input[0]]
            value = np.asarray(dims[attrs.get("start", 0):attrs.get("end", len(dims))], "int64")
            known[node.output[0]] = value
            new_nodes.append(onnx.helper.make_node("Constant", [], [node.output[0]], name=f"{node.name}_folded",
                                                   value=numpy_helper.from_array(value, node.output[0])))
            folded += 1
            continue
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            value = _constant_value(node)
            if value is not None and value.size <= _FOLD_MAX_ELEMENTS:
                known[node.output[0]] = value
            new_nodes.append(node)
            continue
        inputs = [i for i in node.input if i]
        if (node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDABLE or not inputs
                or any(i not in known or i in large_inits for i in inputs)):
            new_nodes.append(node)
            continue
        try:
            values = _evaluate(ReferenceEvaluator, node, known, opset)
        except Exception:  # the reference evaluator lacks the op or refuses it: leave the node to TVM
            new_nodes.append(node)
            continue
        if any(not isinstance(v, np.ndarray) or v.size > _FOLD_MAX_ELEMENTS or v.dtype == object for v in values):
            new_nodes.append(node)
            continue
        for name, value in zip(node.output, values):
            if not name:
                continue
            known[name] = value
            new_nodes.append(onnx.helper.make_node("Constant", [], [name], name=f"{node.name or name}_folded",
                                                   value=numpy_helper.from_array(value, name)))
        folded += 1
    if not folded:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    return out


def _evaluate(evaluator_cls, node: onnx.NodeProto, known: dict, opset) -> list:
    """Run one node on constant inputs with onnx's reference evaluator."""
    inputs = [i for i in node.input if i]
    graph = onnx.helper.make_graph(
        [node], "fold",
        [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(known[i].dtype), known[i].shape)
         for i in dict.fromkeys(inputs)],
        [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o])
    model = onnx.helper.make_model(graph, opset_imports=opset)
    return evaluator_cls(model).run(None, {i: known[i] for i in dict.fromkeys(inputs)})
