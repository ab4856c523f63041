"""llmcc's onnxruntime reference (verify.ort_session): models onnxruntime cannot take as they are still load, and one
it cannot load at all is one line naming onnxruntime, not a traceback from inside it."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from llmcc import verify
from llmcc.errors import VerificationFailure


def _relu_model(ir_version: int, output: str = "y") -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["y"], ["z"])], "relu_neg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [3, 5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ir_version)


def test_newer_ir_version_than_onnxruntime_reads_still_loads(seed):
    # onnx 1.23.1 wrote IR versions that a GPU machine's onnxruntime 1.30 refused (tools/gpu_check.py's GEMV chain)
    model = _relu_model(ir_version=99)
    x = np.random.default_rng(seed).standard_normal((3, 5)).astype(np.float32)
    (y,) = verify.ort_session(model).run(None, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    assert model.ir_version == 99  # the caller's model is not changed


def test_graph_the_optimizer_fails_on_loads_unoptimized(monkeypatch, seed):
    real = verify._ort_session
    tried = []

    def optimizer_fails(model, optimize):
        tried.append(optimize)
        if optimize:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Exception during initialization: "
                               "/onnxruntime_src/core/graph/graph_utils.cc:30 int f(const Node&, bool) name not found")
        return real(model, optimize)

    monkeypatch.setattr(verify, "_ort_session", optimizer_fails)
    x = np.random.default_rng(seed).standard_normal((3, 5)).astype(np.float32)
    (y,) = verify.ort_session(_relu_model(ir_version=10)).run(None, {"x": x})
    assert tried == [True, False]
    np.testing.assert_array_equal(y, np.maximum(x, 0))


def test_model_onnxruntime_cannot_load_is_one_line_naming_it():
    with pytest.raises(VerificationFailure) as info:
        verify.ort_session(_relu_model(ir_version=10, output="missing"))
    message = str(info.value)
    assert message.startswith("onnxruntime ") and "cannot load the model" in message and "missing" in message
    assert "\n" not in message and ".cc:" not in message


def test_valid_model_loads_optimized_first(monkeypatch):
    real = verify._ort_session
    tried = []
    monkeypatch.setattr(verify, "_ort_session", lambda model, optimize: tried.append(optimize) or real(model, optimize))
    verify.ort_session(_relu_model(ir_version=10))
    assert tried == [True]
