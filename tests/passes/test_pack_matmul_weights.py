"""pack_matmul_weights: fp32 matmul weights stored as the CPU kernel's panels; the compiled model is unchanged.

Numerics: fp32 against numpy (float64), relative error <= 1e-5, fresh random inputs at several symbolic lengths,
including lengths that are not a multiple of the kernel's row tile. Must-not-fire: GEMV rows (static M = 1), a weight
whose N is not a multiple of the panel, an activation times an activation, an fp16 weight, a CUDA target."""

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

import llmcc
from llmcc.passes.pack_matmul_weights import PackMatmulWeights, pack_panels, panel_width
from llmcc.targets import resolve
from llmcc.verify import relative_error

CPU = resolve("cpu")


def test_pack_panels_layout(seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((5, 48)).astype(np.float32)
    p = pack_panels(w, 16)
    assert p.shape == (3, 5, 16) and p.flags.c_contiguous
    k, n = rng.integers(0, 5), rng.integers(0, 48)
    assert p[n // 16, k, n % 16] == w[k, n]


def _one_matmul(x_shape, w, x_dtype="float32"):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, x_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(w)))
        bb.emit_func_output(out)
    return bb.get()


def _fires(mod, target=CPU) -> int:
    p = PackMatmulWeights(target)
    p(mod)
    return p.rewrites


def test_fires_on_a_constant_weight_and_not_on_look_alikes(seed):
    rng = np.random.default_rng(seed)
    seq = tvm.tirx.Var("seq", "int64")
    w = rng.standard_normal((64, 256)).astype(np.float32)
    assert panel_width(CPU.tvm_target(), relax.TensorType((1, seq, 64), "float32"), 256) is not None
    assert _fires(_one_matmul((1, seq, 64), w)) == 1
    assert _fires(_one_matmul((1, 1, 64), w)) == 0  # decode GEMV: streams whole rows already
    assert _fires(_one_matmul((1, seq, 64), w[:, :100])) == 0  # N not a multiple of the panel
    assert _fires(_one_matmul((1, seq, 64), w.astype(np.float16), "float16")) == 0
    assert _fires(_one_matmul((1, seq, 64), w), resolve("cuda:sm_80")) == 0
    bb = relax.BlockBuilder()  # activation x activation: no constant to pack
    a = relax.Var("a", relax.TensorType((1, seq, 64), "float32"))
    b = relax.Var("b", relax.TensorType((64, 256), "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(a, b))
        bb.emit_func_output(out)
    assert _fires(bb.get()) == 0


def _mlp_onnx(path, rng, hidden=96, inner=384, dims=("batch", "seq")):
    """x [batch, seq, hidden] -> Gelu(x @ W1 + b1) @ W2 + b2: an up and a down projection with fused epilogues."""
    f = np.float32
    inits = [numpy_helper.from_array((rng.standard_normal((hidden, inner)) * 0.1).astype(f), "w1"),
             numpy_helper.from_array(rng.standard_normal(inner).astype(f), "b1"),
             numpy_helper.from_array((rng.standard_normal((inner, hidden)) * 0.1).astype(f), "w2"),
             numpy_helper.from_array(rng.standard_normal(hidden).astype(f), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Gelu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["y0"]),
             helper.make_node("Add", ["y0", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*dims, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.save(model, path)
    return {t.name: numpy_helper.to_array(t) for t in inits}


def _reference(w, x):
    from math import erf

    x = x.astype(np.float64)
    h = x @ w["w1"] + w["b1"]
    h = 0.5 * h * (1 + np.vectorize(erf)(h / np.sqrt(2)))
    return h @ w["w2"] + w["b2"]


def test_compiled_model_matches_numpy(seed, tmp_path):
    rng = np.random.default_rng(seed)
    weights = _mlp_onnx(tmp_path / "mlp.onnx", rng)
    module = llmcc.compile(tmp_path / "mlp.onnx", target="cpu")
    packed = next(p for p in module.report["passes"] if p["name"] == "pack_matmul_weights")
    assert packed["rewrites"] == 2
    assert all(k["rule"] == "CpuMatmul" for k in module.report["kernels"] if "matmul" in k["name"])
    for batch, seq in ((1, 1), (1, 37), (2, 128), (1, 5)):
        x = rng.standard_normal((batch, seq, 96)).astype(np.float32)
        assert relative_error(module(x), _reference(weights, x)) <= 1e-5, (batch, seq)
