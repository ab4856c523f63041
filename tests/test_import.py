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
