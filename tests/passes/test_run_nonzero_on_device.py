"""run_nonzero_on_device: R.nonzero calls llmcc.run.nonzero, whose indices stay on the input's device; a graph with
NonZero compiles and matches onnxruntime, saved and reloaded in a fresh process, and its CUDA build calls llmcc's
function rather than TVM's host-only one."""

import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper
from tvm import relax

import llmcc
from llmcc import runtime_ops
from llmcc.passes.run_nonzero_on_device import RunNonzeroOnDevice
from llmcc.verify import ort_session

HAS_NVCC = bool(shutil.which("nvcc") or os.access("/usr/local/cuda/bin/nvcc", os.X_OK) or os.environ.get("CUDA_HOME"))


def _module(with_nonzero: bool):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, 5), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nonzero(x) if with_nonzero else relax.op.abs(x))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _extern_calls(mod) -> list[str]:
    names = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: names.append(e.global_symbol) if isinstance(
        e, relax.ExternFunc) else None)
    return names


def test_nonzero_is_routed_and_runs_like_numpy(seed):
    p = RunNonzeroOnDevice()
    after = p(_module(True))
    assert p.rewrites == 1 and _extern_calls(after) == [runtime_ops.NONZERO]
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((3, 5)) < 0.4, rng.standard_normal((3, 5)), 0).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(after, target="llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x))
    assert got.device == tvm.cpu(0)
    np.testing.assert_array_equal(got.numpy(), np.stack(np.nonzero(x)), err_msg=f"seed {seed}")


def test_module_without_nonzero_is_left_alone():
    p = RunNonzeroOnDevice()
    before = _module(False)
    after = p(before)
    assert p.rewrites == 0 and _extern_calls(after) == []
    tvm.ir.assert_structural_equal(after, before)


@pytest.mark.parametrize("shape", [(6,), (2, 3, 4), ()])
def test_runtime_nonzero_keeps_the_device_and_the_onnx_rank(shape, seed):
    rng = np.random.default_rng(seed)
    x = (rng.random(shape) < 0.5).astype(np.int64) * rng.integers(1, 9, shape)
    got = runtime_ops._nonzero(tvm.runtime.tensor(x, tvm.cpu(0)))
    assert got.device == tvm.cpu(0) and str(got.dtype) == "int64"
    np.testing.assert_array_equal(got.numpy(), np.stack(np.nonzero(np.atleast_1d(x))), err_msg=f"seed {seed}")


def _nonzero_onnx() -> onnx.ModelProto:
    """mask [batch, n] -> the columns of its nonzero entries, gathered from x [n, 4] and summed: y [count, 4]."""
    nodes = [helper.make_node("NonZero", ["mask"], ["idx"]),
             helper.make_node("Gather", ["idx", "one"], ["cols"], axis=0),
             helper.make_node("Gather", ["x", "cols"], ["picked"], axis=0),
             helper.make_node("Mul", ["picked", "two"], ["y"])]
    graph = helper.make_graph(
        nodes, "nonzero_gather",
        [helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", 16]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["count", 4])],
        [helper.make_tensor("one", TensorProto.INT64, [], [1]),
         helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_onnx_nonzero_compiles_matches_onnxruntime_and_reloads_in_a_fresh_process(tmp_path, seed):
    model = _nonzero_onnx()
    module = llmcc.compile(model, target="cpu")
    assert module.report["verify"]["passed"]
    assert {"name": "run_nonzero_on_device", "phase": "lower", "rewrites": 1} in module.report["passes"]
    rng = np.random.default_rng(seed)
    feed = {"mask": (rng.random((2, 16)) < 0.3).astype(np.int64), "x": rng.standard_normal((16, 4)).astype(np.float32)}
    (want,) = ort_session(model).run(None, feed)
    np.testing.assert_allclose(module(**feed), want, rtol=1e-6, err_msg=f"seed {seed}")
    module.save(tmp_path / "nz.llmcc")
    np.savez(tmp_path / "feed.npz", **feed)
    script = ("import numpy as np, llmcc; f = dict(np.load('feed.npz')); "
              "np.save('got.npy', llmcc.load('nz.llmcc')(**f))")
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "got.npy"), want, rtol=1e-6)


@pytest.mark.cuda_build
@pytest.mark.skipif(not HAS_NVCC, reason="needs nvcc (CUDA toolkit)")
def test_cuda_build_calls_llmcc_nonzero(monkeypatch):
    from llmcc import cuda

    built = {}
    real_build = cuda.build

    def capture(mod, arch, pipeline=None):
        built["mod"] = mod
        return real_build(mod, arch, pipeline=pipeline)

    monkeypatch.setattr(cuda, "build", capture)
    llmcc.compile(_nonzero_onnx(), target="cuda:sm_80")
    calls = _extern_calls(built["mod"])
    assert runtime_ops.NONZERO in calls and "relax.run.nonzero" not in calls
