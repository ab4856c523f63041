"""``llmcc.compile``: model in, verified CompiledModule out."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import onnx

from llmcc import lora as lora_mod
from llmcc import pipeline as pipeline_mod
from llmcc.errors import BuildFailure, LlmccError, VerificationFailure
from llmcc.frontend import onnx_import
from llmcc.inputs import index_bounds
from llmcc.module import CompiledModule
from llmcc.passes.select_gemv_kernels import is_dequant_matmul
from llmcc.quant import gate
from llmcc.quant import get as quant_scheme
from llmcc.targets import resolve


def _versions() -> dict:
    import tvm

    from llmcc import __version__

    return {"llmcc": __version__, "tvm": tvm.__version__}


@contextlib.contextmanager
def _quiet_native_warnings():
    """TVM's C++ code logs warnings straight to file descriptor 2 ("Fast mode segfaults when there are
    out-of-bounds indices", one per gather); they say nothing to a user. LLMCC_VERBOSE=1 keeps them."""
    if os.environ.get("LLMCC_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def compile(model, *, target: str = "cpu", quant: str = "none", max_error: float | None = None, calib=None,
            quantize_head: bool = True, quantize_embeddings: bool = True, lora=None, example_inputs=None,
            verify: bool = True, seed: int | None = None, fuse_attention: bool = True,
            debug: bool = False, tuning_db=None) -> CompiledModule:  # noqa: A001
    """Compile an ONNX file, ModelProto or torch.nn.Module for ``target``; verified unless ``verify=False``.

    ``quant`` names a scheme in ``llmcc.quant.SCHEMES``; the accuracy gate keeps the outputs' relative error vs
    float32 within ``max_error`` (the scheme's default when None) on the ``calib`` inputs (.npz; random when None).
    ``lora``: PEFT LoRA adapter folders merged into the weights before anything else (so before quantization), each
    a path, "path:scale" or (path, scale); see llmcc.lora. ``fuse_attention=False`` keeps every attention site as
    the exported ops (the report still lists the sites). ``tuning_db``: a tuning database folder (llmcc.tuning,
    made by ``llmcc tune``); kernels with a record for this target, or a validated one of the nearest target of its
    kind, get its schedule (report "tuning": provenance "tuned" / "transferred:<target>" / "rule" per kernel).
    """
    with _quiet_native_warnings():
        return _compile(model, target=target, quant=quant, max_error=max_error, calib=calib,
                        quantize_head=quantize_head, quantize_embeddings=quantize_embeddings, lora=lora,
                        example_inputs=example_inputs, verify=verify, seed=seed, fuse_attention=fuse_attention,
                        debug=debug, tuning_db=tuning_db)


def _compile(model, *, target, quant, max_error, calib, quantize_head, quantize_embeddings, lora, example_inputs,
             verify, seed, fuse_attention, debug, tuning_db) -> CompiledModule:
    scheme = quant_scheme(quant)
    spec = resolve(target)
    adapters = lora_mod.read_adapters(lora)  # read first: a bad adapter fails before any slow step
    if tuning_db is not None:  # likewise a missing or corrupt tuning database
        from llmcc.tuning import open_database

        tuning_db = open_database(tuning_db)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    if isinstance(model, (str, Path, onnx.ModelProto)):
        proto = onnx_import.load_model(model)
        source = str(model) if not isinstance(model, onnx.ModelProto) else "<onnx.ModelProto>"
    elif type(model).__module__.startswith("torch") or hasattr(model, "forward"):
        from llmcc.frontend.torch_trace import trace

        proto = trace(model, example_inputs)
        source = f"<torch {type(model).__name__}>"
        timings["trace"] = time.perf_counter() - start
        start = time.perf_counter()
    else:
        raise LlmccError(f"cannot compile a {type(model).__name__}: pass an ONNX path, an onnx.ModelProto or a "
                         f"torch.nn.Module")
    lora_report = []
    if adapters:  # merged before import, so verification below runs onnxruntime on the merged model
        proto, lora_report = lora_mod.merge_adapters(proto, adapters)
    inputs, outputs = onnx_import.graph_signature(proto)
    mod = onnx_import.import_model(proto)
    timings["import"] = time.perf_counter() - start

    plan = None
    if scheme.weight is not None:
        start = time.perf_counter()
        plan = gate.plan(proto, scheme, max_error=max_error, calib=calib, quantize_head=quantize_head,
                         quantize_embeddings=quantize_embeddings, seed=seed)
        timings["quant_plan"] = time.perf_counter() - start

    options = pipeline_mod.PipelineOptions(debug=debug, quant_formats=plan.formats() if plan else {},
                                           fuse_attention=fuse_attention, tuning_db=tuning_db)
    result = pipeline_mod.run(mod, spec, options)
    timings.update(result.timings)

    start = time.perf_counter()
    executable = _build(result.mod, spec)
    timings["build"] = time.perf_counter() - start

    start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="llmcc-"))
    library = workdir / "model.so"
    try:
        executable.export_library(str(library))
    except Exception as exc:
        raise BuildFailure(f"cannot link the compiled library for {spec.name}: "
                           f"{str(exc).strip().splitlines()[-1][:300]}") from None
    timings["export"] = time.perf_counter() - start

    report = {
        "source": source,
        "target": spec.name,
        "target_detail": spec.to_json(),
        "quant": {**(gate.report(plan, None, result.quantized) if plan else {"scheme": "none"}),
                  # counts the kernels of imported quantized weights (MatMulNBits, QDQ) too
                  "dequantize_matmul_kernels": sum(is_dequant_matmul(k["name"]) for k in result.kernels)},
        "lora": {"adapters": lora_report},
        "inputs": [s.to_json() for s in inputs],
        "outputs": [s.to_json() for s in outputs],
        "passes": [{"name": p["name"], "phase": p["phase"], "rewrites": p["rewrites"]} for p in result.passes],
        "attention": result.attention,
        "kernels": result.kernels,
        "tuning": result.tuning,
        "verify": {"passed": None, "reason": "skipped (--no-verify)"},
        "timings": timings,
    }
    if spec.is_gpu:
        from llmcc import cuda

        report["cuda_binary"] = cuda.cuda_binary_info(library)
    manifest = {
        "versions": _versions(),
        "target": spec.to_json(),
        "inputs": report["inputs"],
        "outputs": report["outputs"],
        "weights": {"tensors": [{"name": name} for name, _ in result.weights]},
        "index_bounds": index_bounds(proto),
        "report": report,
    }
    module = CompiledModule(manifest, library, [w for _, w in result.weights], owned_dir=workdir)

    if verify:
        if spec.is_gpu and not _gpu_present():
            report["verify"] = {"passed": None, "reason": "not run: no GPU on this machine; the same passes are "
                                "verified on CPU by compiling with --target cpu, CUDA numerics by "
                                "tools/gpu_check.py on a GPU"}
        else:
            start = time.perf_counter()
            from llmcc.verify import verify as run_verify

            # a quantized module must compute exactly what its plan says (the float model with the plan's
            # dequantized weights), and the plan must keep the budget on the compiled module too
            reference = gate.simulated_model(plan, set(result.quantized)) if plan else proto
            report["verify"] = run_verify(module, reference, seed=seed,
                                          tolerance=gate.verify_tolerance(plan) if plan else None)
            if plan:
                report["verify"]["reference"] += " (float model with the quantized weights dequantized)"
            timings["verify"] = time.perf_counter() - start
            if not report["verify"]["passed"]:
                v = report["verify"]
                raise VerificationFailure(
                    f"compiled module disagrees with {v['reference']}: relative error {v['rel_err']:.3g} > "
                    f"tolerance {v['tolerance']:.3g} (max abs {v['max_abs_err']:.3g}); nothing was written")
            if plan:
                error = gate.measure(module, plan)
                report["quant"]["error"] = error
                if error > plan.max_error:
                    raise VerificationFailure(
                        f"--quant {scheme.name}: output error {error:.3g} vs float32 exceeds --max-error "
                        f"{plan.max_error:g} on the compiled module; nothing was written")
    return module


def _gpu_present() -> bool:
    import tvm

    return bool(tvm.cuda(0).exist)


def _build(mod, spec):
    import tvm

    if spec.is_gpu:
        from llmcc import cuda

        return cuda.build(mod, spec.arch, pipeline=None)
    try:
        return tvm.compile(mod, target=spec.tvm_target(), relax_pipeline=None)
    except Exception as exc:
        raise BuildFailure(f"code generation for {spec.name} failed: "
                           f"{str(exc).strip().splitlines()[-1][:300]}") from None
