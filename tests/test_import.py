"""ONNX import of what torch's default (dynamo) exporter writes for transformers models, symbolic dims kept.

Stock TVM 0.27 fails on these graphs ("Reshape expects the input data to be a Tensor ... ir.PrimType"); llmcc's
converters make them import. The first test shows the failure is real, so the others test llmcc's fix.
"""

import contextlib
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import llmcc
from llmcc.errors import ImportFailure
from llmcc.frontend import onnx_import
from llmcc.verify import relative_error


def _export_qwen2(path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(cfg).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = hf

        def forward(self, input_ids):
            return self.hf(input_ids=input_ids, use_cache=False).logits

    ids = torch.randint(0, 300, (2, 17))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Logits(), (ids,), dynamo=True, input_names=["input_ids"],
                                    dynamic_shapes=({0: "batch", 1: "sequence"},), verbose=False)
    program.save(str(path))
    return path


@pytest.fixture(scope="module")
def qwen2_onnx(tmp_path_factory):
    return _export_qwen2(tmp_path_factory.mktemp("qwen2") / "qwen2.onnx")


def test_stock_tvm_importer_fails_on_dynamo_export(qwen2_onnx):
    from tvm.relax.frontend.onnx import from_onnx

    with pytest.raises(Exception, match="Reshape expects the input data to be a Tensor"), \
            contextlib.redirect_stdout(io.StringIO()):
        from_onnx(onnx.load(str(qwen2_onnx)), keep_params_in_input=False)


def test_llmcc_imports_it_with_symbolic_dims(qwen2_onnx):
    model = onnx_import.load_model(qwen2_onnx)
    assert model_opset(model) >= 18
    mod = onnx_import.import_model(model)
    (param,) = mod["main"].params
    assert [str(d) for d in param.ty.shape.values] == ["batch", "sequence"]


def model_opset(model):
    return onnx_import.model_opset(model)


def test_qwen2_compiles_and_matches_onnxruntime(qwen2_onnx):
    m = llmcc.compile(qwen2_onnx, target="cpu")
    assert m.report["verify"]["passed"]
    session = ort.InferenceSession(str(qwen2_onnx), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng()
    for batch, seq in [(1, 3), (2, 24), (1, 50)]:
        ids = rng.integers(0, 300, (batch, seq)).astype(np.int64)
        assert relative_error(m(ids), session.run(None, {"input_ids": ids})[0]) <= 1e-5


def test_unconvertible_node_names_op_node_and_opset():
    from onnx import TensorProto, helper, numpy_helper

    # Valid ONNX that TVM's converter refuses: a convolution with four spatial dims.
    w = numpy_helper.from_array(np.ones((1, 1, 1, 1, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu_0"),
         helper.make_node("Conv", ["r", "w"], ["y"], name="conv4d_7")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2, 2, 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ImportFailure) as info:
        llmcc.compile(model, target="cpu")
    text = str(info.value)
    assert text.startswith("cannot import ONNX op Conv (node 'conv4d_7', opset 17)") and "\n" not in text


def _contrib_model(op_type: str, inputs: list, **attrs):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node(op_type, inputs, ["y"], name="node_3", domain="com.microsoft", **attrs)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def test_custom_domain_op_is_refused_before_import():
    model = _contrib_model("FusedMatMul", ["x", "x"])
    message = r"unsupported ONNX op com.microsoft.FusedMatMul \(node 'node_3', opset 17\)"
    with pytest.raises(ImportFailure, match=message):
        llmcc.compile(model, target="cpu")


def test_malformed_matmul_nbits_is_named():
    """MatMulNBits is imported (tests/test_quantized_import.py); one without its attributes and weights says so."""
    with pytest.raises(ImportFailure, match=r"cannot import ONNX op MatMulNBits \(node 'node_3', opset 17\): "
                                            r"missing attribute K"):
        llmcc.compile(_contrib_model("MatMulNBits", ["x"]), target="cpu")


@pytest.mark.parametrize("in_shape, target, out_shape, sizes", [
    (["s", 1], [2, 1, 4], [2, "s", 4], {"s": 5}),   # rank grows, a symbolic dim kept, a 1 broadcast
    (["s"], [1, 1], [1, "s"], {"s": 7}),            # torch's position-ids expand: [1, s]
    (["b", "s"], [1, 1], ["b", "s"], {"b": 2, "s": 3}),
])
def test_expand_of_symbolic_dims_to_a_constant_shape(in_shape, target, out_shape, sizes):
    """Expand with a constant shape of a tensor with symbolic dims (TVM's converter reads every dim as a constant)."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    shape = numpy_helper.from_array(np.array(target, np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Expand", ["x", "shape"], ["y"], name="expand")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    module = llmcc.compile(model, verify=False)
    x = np.random.default_rng().standard_normal([sizes.get(d, d) for d in in_shape]).astype(np.float32)
    ref = ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = module(x)
    assert got.shape == ref.shape and np.array_equal(got, ref)


def _run_both(model, feeds):
    """llmcc's compiled module and onnx's reference evaluator on the same feeds."""
    from onnx.reference import ReferenceEvaluator

    module = llmcc.compile(model, verify=False)
    got = module(**feeds)
    got = list(got) if isinstance(got, tuple) else [got]
    return got, ReferenceEvaluator(model).run(None, feeds)


def test_constant_of_shape_of_the_empty_shape_is_a_scalar():
    """TorchScript writes ConstantOfShape([]) for every Python scalar it makes a tensor (HF Longformer's masks);
    TVM's converter broadcast the 1-element value to rank 0 and failed."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Constant", [], ["empty"], value=numpy_helper.from_array(np.zeros(0, np.int64))),
        helper.make_node("ConstantOfShape", ["empty"], ["flag"], name="cos",
                         value=numpy_helper.from_array(np.array([True]))),
        helper.make_node("Cast", ["flag"], ["one"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "one"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng().standard_normal(3).astype(np.float32)
    (got,), (ref,) = _run_both(model, {"x": x})
    assert np.array_equal(got, ref)


def _global_token_graph():
    """Longformer's global-token shape arithmetic, small: G = max over rows of the mask's count (a ReduceMax known
    only at run time) sizes a ConstantOfShape, a Concat with x, Slices up to and from G (the second one's end is
    G + (dim - G), as HF's narrow writes it), a Reshape to a run-time shape, and a Pad whose pads are a Concat of
    constants (folded before import)."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.int64)))

    nodes = [
        const("one", [1]), const("four", [4]), const("zero1", [0]), const("axis1", [1]), const("axis0", [0]),
        const("big", [np.iinfo(np.int64).max]), const("two", [2]), const("zero", 0), const("pads_a", [0, 0, 0]),
        const("pads_b", [0, 1, 0]),
        helper.make_node("ReduceSum", ["mask", "axis1"], ["count"], keepdims=0),
        helper.make_node("ReduceMax", ["count"], ["g"], keepdims=0),
        helper.make_node("Unsqueeze", ["g", "axis0"], ["g1"]),
        helper.make_node("Concat", ["one", "g1", "four"], ["shape"], axis=0),
        helper.make_node("ConstantOfShape", ["shape"], ["fill"], value=numpy_helper.from_array(np.array([0.5],
                                                                                                    np.float32))),
        helper.make_node("Concat", ["fill", "x"], ["both"], axis=1),
        helper.make_node("Slice", ["both", "zero1", "g1", "axis1"], ["head"]),
        helper.make_node("Shape", ["both"], ["both_shape"]),
        helper.make_node("Slice", ["both_shape", "axis1", "two"], ["len1"]),
        helper.make_node("Squeeze", ["len1"], ["len"]),
        helper.make_node("Sub", ["len", "g"], ["rest"]),
        helper.make_node("Add", ["g", "rest"], ["end"]),
        helper.make_node("Unsqueeze", ["end", "axis0"], ["end1"]),
        helper.make_node("Slice", ["both", "g1", "end1", "axis1"], ["tail"]),
        helper.make_node("Concat", ["g1", "four"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["head", "flat_shape"], ["head_2d"]),
        helper.make_node("Concat", ["pads_a", "pads_b"], ["pads"], axis=0),
        helper.make_node("Pad", ["tail", "pads"], ["padded"]),
        helper.make_node("Slice", ["both", "zero1", "big", "axis1"], ["all_"]),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", f, [1, 8, 4]), helper.make_tensor_value_info("mask", TensorProto.INT64,
                                                                                         [1, 8])],
        [helper.make_tensor_value_info("head_2d", f, ["g", 4]), helper.make_tensor_value_info("tail", f, [1, 8, 4]),
         helper.make_tensor_value_info("padded", f, [1, 9, 4]),
         helper.make_tensor_value_info("all_", f, [1, "g_plus_8", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("count", [1, 3, 8])
def test_run_time_dims_from_a_mask_count(count):
    """The global-token graph imports with its shapes kept (no dynamic_strided_slice, which FoldConstant refuses),
    compiles and matches onnx's reference evaluator for fresh random inputs and several counts."""
    model = _global_token_graph()
    rng = np.random.default_rng()
    mask = np.zeros((1, 8), np.int64)
    mask[0, rng.choice(8, count, replace=False)] = 1
    feeds = {"x": rng.standard_normal((1, 8, 4)).astype(np.float32), "mask": mask}
    got, ref = _run_both(model, feeds)
    assert [g.shape for g in got] == [r.shape for r in ref]
    assert all(np.array_equal(g, r) for g, r in zip(got, ref))
    mod = onnx_import.import_model(model)
    assert "dynamic_strided_slice" not in mod.script()
    from tvm import relax

    tensors = [b.var.ty for block in mod["main"].body.blocks for b in block.bindings
               if isinstance(b.var.ty, relax.TensorType)]
    assert tensors and all(ty.shape is not None for ty in tensors)


def test_small_constant_subgraphs_fold_before_import():
    """Shape of a static value and small computations on constants become Constant nodes; a computation on a large
    initializer (a weight) stays as written."""
    from onnx import TensorProto, helper, numpy_helper

    from llmcc.frontend.onnx_cleanup import clean_model

    weight = numpy_helper.from_array(np.ones((128, 64), np.float32), "w")
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array([2], np.int64))),
        helper.make_node("Concat", ["x_shape", "c"], ["target"], axis=0, name="concat"),
        helper.make_node("Transpose", ["w"], ["w_t"], name="weight_transpose"),
        helper.make_node("MatMul", ["x", "w_t"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                              [helper.make_tensor_value_info("target", TensorProto.INT64, [3]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 128])], [weight])
    cleaned = clean_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    by_output = {n.output[0]: n for n in cleaned.graph.node}
    assert by_output["x_shape"].op_type == by_output["target"].op_type == "Constant"
    assert numpy_helper.to_array(by_output["target"].attribute[0].t).tolist() == [3, 64, 2]
    assert by_output["w_t"].op_type == "Transpose" and by_output["y"].op_type == "MatMul"


def test_stock_tvm_importer_fails_on_the_global_token_graph():
    """Without llmcc's converters the graph above does not import: the run-time dims are lost on the way."""
    from tvm.relax.frontend.onnx import from_onnx

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), pytest.raises(Exception):
        warnings.simplefilter("ignore")
        from_onnx(_global_token_graph(), keep_params_in_input=False)
