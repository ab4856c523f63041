"""Already-quantized ONNX: onnxruntime's MatMulNBits and QDQ int8 weights run on llmcc's fused kernels, and match
onnxruntime on the same graph (float32 tolerance 1e-5: the dequantized values are exact, only the sum order
differs)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import llmcc
from llmcc.targets import host_cpu
from llmcc.errors import ImportFailure


def _two_matmuls(rng, k, n):
    w1 = rng.standard_normal((k, n)).astype(np.float32)
    w2 = rng.standard_normal((n, k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", k])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _nbits(model, block, symmetric):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(block_size=block,
                                                                                     is_symmetric=symmetric))
    quantizer.process()
    return quantizer.model.model


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_matmul_nbits_runs_on_llmcc_int4_kernels(symmetric):
    rng = np.random.default_rng()
    block = int(rng.choice([32, 64]))
    k, n = 2 * block * int(rng.integers(1, 3)), 8 * int(rng.integers(2, 9))
    model = _nbits(_two_matmuls(rng, k, n), block, symmetric)
    assert [node.op_type for node in model.graph.node].count("MatMulNBits") == 2
    module = llmcc.compile(model)  # verified against onnxruntime running MatMulNBits itself
    assert module.report["verify"]["passed"] and module.report["verify"]["rel_err"] <= 1e-5
    tag = f"int4_g{block}" + ("" if symmetric else "_asym")
    assert sum(tag in kn["name"] for kn in module.report["kernels"]) == 2
    assert module.report["quant"]["dequantize_matmul_kernels"] == 2


def test_matmul_nbits_that_llmcc_cannot_map_is_named():
    rng = np.random.default_rng()
    model = _nbits(_two_matmuls(rng, 64, 16), 32, True)
    node = next(nd for nd in model.graph.node if nd.op_type == "MatMulNBits")
    for attr in node.attribute:
        if attr.name == "bits":
            attr.i = 8
    with pytest.raises(ImportFailure, match=rf"MatMulNBits \(node '{node.name}'.*4-bit MatMulNBits only"):
        llmcc.compile(model)


def _qdq_model(rng, k, n, zero_point=0):
    """x -> QDQ (activation) -> MatMul(int8 [K, N] per-column) -> MatMul(Transpose(int8 Linear weight [K, N] per
    row)): the shapes QAT exports use."""
    w = rng.standard_normal((k, n)).astype(np.float32)
    s = (np.abs(w).max(0) / 127).astype(np.float32)
    q = np.round(w / s).astype(np.int8)
    lin = rng.standard_normal((k, n)).astype(np.float32)  # Linear(n -> k).weight: [out, in]
    ls = (np.abs(lin).max(1) / 127).astype(np.float32)
    lq = np.round(lin / ls[:, None]).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=1, name="dq_w"),
        helper.make_node("MatMul", ["xd", "w"], ["h"], name="mm1"),
        helper.make_node("DequantizeLinear", ["lq", "ls", "lz"], ["lw"], axis=0, name="dq_linear"),
        helper.make_node("Transpose", ["lw"], ["lwt"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "lwt"], ["y"], name="mm2")]
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(s, "s"),
             numpy_helper.from_array(np.full(n, zero_point, np.int8), "z"),
             numpy_helper.from_array(lq, "lq"), numpy_helper.from_array(ls, "ls"),
             numpy_helper.from_array(np.zeros(k, np.int8), "lz"),
             numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.int8), "xz")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", k])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _rewrites(module, name):
    return next(p["rewrites"] for p in module.report["passes"] if p["name"] == name)


def test_qdq_int8_weights_stay_int8():
    rng = np.random.default_rng()
    module = llmcc.compile(_qdq_model(rng, 8 * int(rng.integers(2, 9)), 8 * int(rng.integers(2, 9))))
    assert _rewrites(module, "fuse_dequantize_matmul") == 2
    assert module.report["verify"]["passed"]
    int8_weights = [w for w in module._weights_host if w.dtype == np.int8]
    assert len(int8_weights) == 2


def test_qdq_with_a_zero_point_is_not_fused_but_still_correct():
    rng = np.random.default_rng()
    module = llmcc.compile(_qdq_model(rng, 32, 24, zero_point=3))
    assert _rewrites(module, "fuse_dequantize_matmul") == 1  # only the symmetric Linear weight
    assert module.report["verify"]["passed"]


def _decode_shaped(model):
    """The same graph with x as [batch, 1, K]: one row per batch element, as a decode step has."""
    x = model.graph.input[0]
    x.type.tensor_type.shape.dim[1].ClearField("dim_param")
    x.type.tensor_type.shape.dim[1].dim_value = 1
    return model


@pytest.mark.skipif(not host_cpu().model().int16_madd, reason="needs AVX2")
@pytest.mark.parametrize("partial_block", [False, True], ids=["whole_blocks", "partial_block"])
def test_matmul_nbits_decode_runs_on_the_integer_gemv(partial_block):
    """Imported int4 weights in a decode-shaped graph take the AVX2 GEMV (select_gemv_kernels), and the module still
    matches onnxruntime running MatMulNBits. The second matmul's K is n: with n = 48 its last block of 32 is partial,
    which the GEMV does not take, so that one keeps dequant_matmul (the group size comes from the kernel's format
    attribute: the stored scales alone would say 24)."""
    rng = np.random.default_rng()
    k, n = 64 * int(rng.integers(1, 3)), 48 if partial_block else 32 * int(rng.integers(1, 3))
    model = _decode_shaped(_nbits(_two_matmuls(rng, k, n), 32, bool(rng.integers(0, 2))))
    module = llmcc.compile(model)
    assert module.report["verify"]["passed"] and module.report["verify"]["rel_err"] <= 1e-5
    assert _rewrites(module, "select_gemv_kernels") == (1 if partial_block else 2)
    names = [kn["name"] for kn in module.report["kernels"]]
    # with k == n both matmuls share one GEMV kernel: count kernels of each kind, not calls
    assert any("int4_gemv_" in name for name in names)
    assert sum("dequant_matmul" in name for name in names) == (1 if partial_block else 0), names
    assert module.report["quant"]["dequantize_matmul_kernels"] >= 1
