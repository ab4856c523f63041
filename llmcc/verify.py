"""Check a compiled module against onnxruntime on fresh random inputs, at several sizes of the symbolic dims."""

from __future__ import annotations

import re

import numpy as np
import onnx

from llmcc.errors import VerificationFailure
from llmcc.inputs import dim_settings, index_bounds, random_inputs

TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 3e-2}


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / denom) if denom > 0 else float(np.linalg.norm(out - ref))


def ort_session(model: onnx.ModelProto):
    """An onnxruntime CPU session that computes what the ONNX graph says. With QuantizeLinear/DequantizeLinear in
    the graph, onnxruntime's optimizer would rewrite QDQ groups into integer kernels (QLinearMatMul...) that round
    differently from the graph's float semantics (rel err 0.03 on a two-matmul QDQ model), so it runs unoptimized.

    Two things seen on a GPU machine's onnxruntime 1.30 are retried rather than fatal: a model whose IR version is
    newer than onnxruntime reads (onnx 1.23 writes one; ops are versioned by the opset, so the reference loads at the
    highest IR version onnxruntime names) and a graph its optimizer fails on (torch 2.11's Longformer export), which
    loads unoptimized. Anything else is one line naming onnxruntime, not a traceback from inside it."""
    import onnxruntime as ort

    optimize = not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    try:
        return _ort_session(model, optimize)
    except Exception as exc:  # noqa: BLE001 (onnxruntime's own exception types)
        error = _ort_message(exc)
    supported = re.search(r"max supported IR version: (\d+)", error)
    if supported:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.ir_version = int(supported.group(1))
    try:
        return _ort_session(model, optimize=False)
    except Exception as exc:  # noqa: BLE001
        raise VerificationFailure(f"onnxruntime {ort.__version__}, llmcc's reference, cannot load the model: "
                                  f"{_ort_message(exc)}") from None


def _ort_session(model: onnx.ModelProto, optimize: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _ort_message(exc: Exception) -> str:
    """onnxruntime's message without its status prefix and the C++ source location and signature."""
    lines = str(exc).strip().splitlines()
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", lines[-1] if lines else type(exc).__name__)
    return re.sub(r"/\S+\.(cc|h):\d+ [^(]*\([^)]*\) ", "", text)[:300]


def verify(module, model: onnx.ModelProto, *, seed: int | None = None, tolerance: float | None = None) -> dict:
    """Run ``module`` and onnxruntime on the same random inputs; the worst errors over all outputs and sizes."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    session = ort_session(model)
    bounds = index_bounds(model)
    out_dtypes = {spec.dtype for spec in module.outputs}
    tol = tolerance if tolerance is not None else max(TOLERANCE.get(d, 1e-5) for d in out_dtypes)
    worst_abs, worst_rel, cases = 0.0, 0.0, []
    for dims in dim_settings(module.inputs):
        feed = random_inputs(module.inputs, dims, rng, bounds)
        ref = session.run(None, feed)
        got = module.run(**feed)
        for spec, r in zip(module.outputs, ref):
            g = got[spec.name]
            if g.shape != r.shape:
                raise AssertionError(f"output {spec.name}: shape {g.shape} but onnxruntime gives {r.shape} "
                                     f"at {dims}")
            abs_err = float(np.max(np.abs(g.astype(np.float64) - r))) if r.size else 0.0
            rel = relative_error(g, r)
            worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel)
        cases.append({k: int(v) for k, v in dims.items()})
    return {"reference": f"onnxruntime {ort.__version__}", "max_abs_err": worst_abs, "rel_err": worst_rel,
            "tolerance": tol, "passed": bool(worst_rel <= tol), "cases": cases}
