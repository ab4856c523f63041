"""Helpers shared by the tests: a tiny two-input ONNX model, its reference, and a CLI runner."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN = 50, 16


def make_tiny_onnx(path: Path, seed: int = 0) -> Path:
    """input_ids[batch, sequence] -> embedding -> (x * mask) @ W + b -> softmax: small, symbolic, two inputs."""
    rng = np.random.default_rng(seed)
    emb = numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "emb")
    w = numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), "b")
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"], name="embed"),
        helper.make_node("Unsqueeze", ["mask", "axis2"], ["mask3"], name="mask_unsqueeze"),
        helper.make_node("Mul", ["x", "mask3"], ["xm"], name="apply_mask"),
        helper.make_node("MatMul", ["xm", "w"], ["y"], name="proj"),
        helper.make_node("Add", ["y", "b"], ["yb"], name="bias"),
        helper.make_node("Softmax", ["yb"], ["probs"], name="softmax", axis=-1),
    ]
    axis2 = numpy_helper.from_array(np.array([2], np.int64), "axis2")
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "sequence"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])],
        [emb, w, b, axis2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_reference(tiny_onnx, feed):
    import onnxruntime as ort

    return ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def tiny_feed(rng, batch, seq):
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
            "mask": (rng.random((batch, seq)) > 0.2).astype(np.float32)}


def run_cli(*args, cwd=None, timeout=600):
    """Run ``python -m llmcc ARGS`` in a fresh process; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "llmcc", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def make_tiny_mlp(seed: int = 0):
    """A torch model with named Linear layers for LoRA: input_ids -> embed -> 2 residual blocks (up, relu, down)."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(HIDDEN, 2 * HIDDEN), torch.nn.Linear(2 * HIDDEN, HIDDEN)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    class TinyMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, input_ids):
            x = self.embed(input_ids)
            for block in self.blocks:
                x = x + block(x)
            return x

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyMLP().eval()


def export_fp16_llama(path: Path) -> Path:
    """The zoo Llama in float16, exported from torch with symbolic batch and sequence, saved at ``path``."""
    from llmcc import zoo

    return zoo.export("llama", path, dtype="float16")


def matmul_module(w: np.ndarray, rows_dims: list):
    """A Relax module ``main(x[*rows_dims, K]) = x @ W`` with W a constant [K, N]: one matmul for the quantization
    passes to take."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(rows_dims + [w.shape[0]], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(w)))
        bb.emit_func_output(out)
    return bb.get()
