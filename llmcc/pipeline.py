"""The pass pipeline: what runs between ONNX import and code generation, in phases.

    graph     llmcc's graph passes on the imported Relax (LoRA branches folded, QDQ weights kept int8, attention
              fusion)
    quantize  matmul weights packed to the accuracy gate's plan, dequantization fused into the matmul
    weights   decode GEMVs on int8 / int4 weights take the AVX2 integer GEMV (CPU); CPU matmul weights packed into the
              kernel's panels; weights become parameters, stored beside the library
    lower     ops become TIR PrimFuncs, fused
    schedule  tuned schedules from a tuning database (llmcc.tuning) where one matches the target (a kernel with a
              symbolic length: its tuned length buckets, dispatched at run time), then schedule rules from
              llmcc.schedules for the target
    finalize  TVM's dataflow lowering and memory planning for the VM

Each phase is a function returning its pass list; ``run`` applies them in order, timing each phase and recording
every pass's rewrite count for the report. ``debug=True`` checks the IR is well formed after each phase.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import tvm
from tvm import relax

from llmcc.errors import BuildFailure
from llmcc.passes import TvmPass
from llmcc.passes.apply_schedule_rules import KERNEL_SCHEDULE, RESHAPE_VIEW, ApplyScheduleRules
from llmcc.passes.apply_tuning_database import ApplyTuningDatabase
from llmcc.passes.dispatch_length_buckets import DispatchLengthBuckets
from llmcc.passes.fold_lora_branches import FoldLoraBranches
from llmcc.passes.accumulate_in_float32 import AccumulateInFloat32
from llmcc.passes.expand_integer_power import ExpandIntegerPower
from llmcc.passes.fuse_attention import FuseAttention
from llmcc.passes.fuse_dequantize_matmul import FuseDequantizeMatmul
from llmcc.passes.lift_weights import LiftWeights
from llmcc.passes.pack_matmul_weights import PackMatmulWeights
from llmcc.passes.quantize_weights import QuantizeWeights
from llmcc.passes.run_nonzero_on_device import RunNonzeroOnDevice
from llmcc.passes.select_gemv_kernels import SelectGemvKernels
from llmcc.targets import TargetSpec

log = logging.getLogger("llmcc")


@dataclass
class PipelineOptions:
    debug: bool = False  # well-formedness check after every phase
    fuse_attention: bool = True  # attention sites become one flash kernel call each (passes/fuse_attention.py)
    quant_formats: dict = field(default_factory=dict)  # weight fingerprint -> (layer, format), from the gate
    tuning_db: object = None  # llmcc.tuning.TuningDatabase: its target's tuned schedules win over the rules


@dataclass
class PipelineResult:
    mod: tvm.IRModule
    weights: list            # [(name, np.ndarray)] in parameter order after the user inputs
    passes: list = field(default_factory=list)   # [{"name", "phase", "rewrites"}]
    kernels: list = field(default_factory=list)  # [{"name", "rule"}] for scheduled targets
    tuning: list = field(default_factory=list)  # [{"kernel", "provenance", "source_time_us"(, "dropped")}]
    attention: list = field(default_factory=list)  # [{"site", "kind", "fused", "reason", "kernel"}]
    timings: dict = field(default_factory=dict)  # phase -> seconds
    quantized: dict = field(default_factory=dict)  # weight fingerprint -> bytes stored, for quantized weights


def _count_relax_calls(mod, pred=lambda call: True) -> int:
    """Calls in the module's Relax functions for which ``pred`` holds."""
    n = 0

    def visit(e):
        nonlocal n
        if isinstance(e, relax.Call) and pred(e):
            n += 1

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return n


def _count_calls(mod, op_name: str) -> int:
    return _count_relax_calls(mod, lambda c: isinstance(c.op, tvm.ir.Op) and c.op.name == op_name)


def _count_bindings(mod) -> int:
    return _count_relax_calls(mod)


def _fused_groups(mod) -> int:
    """Relax functions FuseOps made: each holds several ops that FuseTIR turns into one kernel."""
    return sum(1 for _, f in mod.functions.items()
               if isinstance(f, relax.Function) and f.attrs is not None and int(f.attrs.get("Primitive", 0)) == 1)


_FAST_MATH_OPS = ("relax.exp", "relax.nn.softmax", "relax.erf", "relax.tanh")


def _is_fast_math_op(call) -> bool:
    return isinstance(call.op, tvm.ir.Op) and call.op.name in _FAST_MATH_OPS


def _keep_reshape(bb, call):
    return call


def _gelu_fast_erf(bb, call):
    """R.nn.gelu with TVM's vectorizable erf polynomial: the op legalizes to T.erf, one libm erff call per element
    (MiniLM's up-projection with its GELU epilogue ran 1.6x slower than the down-projection of equal FLOPs)."""
    from tvm import topi

    def gelu(x):
        erf = topi.fast_erf(topi.multiply(x, tvm.tirx.const(0.7071067811865476, x.dtype)))
        return topi.multiply(x, topi.add(tvm.tirx.const(0.5, x.dtype),
                                         topi.multiply(erf, tvm.tirx.const(0.5, x.dtype))))

    x = call.args[0]
    if x.ty.dtype != "float32":  # fast_erf is a float32 polynomial: other dtypes take TVM's own legalization
        from tvm.relax.transform.legalize_ops.nn import _nn_gelu

        return _nn_gelu(bb, call)
    return bb.call_te(gelu, x, primfunc_name_hint="gelu")


def _legalize_overrides(target: TargetSpec) -> dict:
    overrides = {"relax.reshape": _keep_reshape}
    if not target.is_gpu:
        overrides["relax.nn.gelu"] = _gelu_fast_erf
    return overrides


def graph_phase(target: TargetSpec, options: PipelineOptions) -> list:
    fusion = [FuseAttention(target)] if options.fuse_attention else []
    return [FoldLoraBranches(), FuseDequantizeMatmul(), ExpandIntegerPower()] + fusion + [
        AccumulateInFloat32(),
        TvmPass("fold_constants", relax.transform.FoldConstant,
                lambda a, b: max(_count_bindings(a) - _count_bindings(b), 0)),
    ]


def quantize_phase(target: TargetSpec, options: PipelineOptions) -> list:
    return [QuantizeWeights(options.quant_formats, target)] if options.quant_formats else []


def weights_phase(target: TargetSpec, options: PipelineOptions) -> list:
    return [SelectGemvKernels(target), PackMatmulWeights(target), LiftWeights()]


def lower_phase(target: TargetSpec, options: PipelineOptions) -> list:
    # CPU: exp/softmax/erf/tanh as TVM's vectorizable polynomial approximations (libm's expf is a scalar call per
    # element: llama's attention softmax 320 -> 140 us, GPT-2's tanh GELU likewise; relative error ~1e-7, and the
    # module is verified against onnxruntime at 1e-5 as always)
    fast_math = [] if target.is_gpu else [
        TvmPass("fast_math", relax.transform.FastMathTransform,
                lambda a, b: _count_relax_calls(a, _is_fast_math_op) - _count_relax_calls(b, _is_fast_math_op))]
    return fast_math + [
        TvmPass("dispatch_sampling", relax.backend.DispatchSampling),
        TvmPass("dispatch_sort_scan", relax.backend.DispatchSortScan),
        RunNonzeroOnDevice(),
        # a reshape stays an op: the VM runs it as a view of the same memory. Legalized, it becomes a copy kernel
        # whose symbolic index arithmetic (a div/mod by the sequence length per element) TVM then no longer
        # recognises as a reshape (llama-decode's KV-cache reshapes: 120 us each)
        TvmPass("legalize_ops", lambda: relax.transform.LegalizeOps(_legalize_overrides(target)),
                lambda a, b: _count_calls(b, "relax.call_tir")),
        TvmPass("annotate_op_pattern", relax.transform.AnnotateTIROpPattern),
        TvmPass("fold_lowered_constants", relax.transform.FoldConstant,
                lambda a, b: max(_count_bindings(a) - _count_bindings(b), 0)),
        TvmPass("fuse_ops", relax.transform.FuseOps, lambda a, b: _fused_groups(b)),
        TvmPass("fuse_tir", relax.transform.FuseTIR, lambda a, b: _fused_groups(a) - _fused_groups(b)),
    ]


def schedule_phase(target: TargetSpec, options: PipelineOptions) -> list:
    from llmcc.schedules import rules_for

    rules = rules_for(target)
    tuned = ([DispatchLengthBuckets(options.tuning_db, target),
              ApplyTuningDatabase(options.tuning_db, leave_reshapes=not target.is_gpu)]
             if options.tuning_db is not None else [])
    # On CUDA, dlight's rules must bind every kernel to threads; on CPU a pure reshape is best left to become a view
    return tuned + ([ApplyScheduleRules(rules, leave_reshapes=not target.is_gpu)] if rules else [])


def finalize_phase(target: TargetSpec, options: PipelineOptions) -> list:
    t = relax.transform
    passes = [t.RewriteDataflowReshape, t.ToNonDataflow, t.RemovePurityChecking, t.CallTIRRewrite,
              t.StaticPlanBlockMemory]
    if target.is_gpu:
        passes.append(t.RewriteCUDAGraph)
    passes += [t.LowerAllocTensor, t.KillAfterLastUse, t.LowerRuntimeBuiltin, t.ComputePrimValue, t.VMShapeLower,
               t.AttachGlobalSymbol]
    return [TvmPass(p.__name__, p) for p in passes]


PHASES = [("graph", graph_phase), ("quantize", quantize_phase), ("weights", weights_phase),
          ("lower", lower_phase), ("schedule", schedule_phase), ("finalize", finalize_phase)]


def _tuning_provenance(kernels: list, choices: dict, buckets: dict, skipped: dict) -> list:
    """The report's "tuning" entries: for every kernel, whether its schedule is a tuned record of this target, one
    transferred from another, or a schedule rule's (with why the records tried were dropped); a kernel with length
    buckets lists them ("buckets": [{"kernel", "sizes", "min_elements"}]: other shapes run its own schedule)."""
    entries = []
    for kernel in kernels:
        if kernel["rule"] in (RESHAPE_VIEW, KERNEL_SCHEDULE):  # a view; a kernel that brings its own schedule
            continue
        choice = choices.get(kernel["name"])
        entry = {"kernel": kernel["name"], "provenance": choice.provenance if choice else "rule",
                 "source_time_us": choice.source_time_us if choice else None}
        dropped = list(choice.dropped if choice is not None else ()) + skipped.get(kernel["name"], [])
        if dropped:
            entry["dropped"] = dropped
        if kernel["name"] in buckets:
            entry["buckets"] = buckets[kernel["name"]]
        entries.append(entry)
    return entries


def run(mod: tvm.IRModule, target: TargetSpec, options: PipelineOptions | None = None,
        stop_after: str | None = None) -> PipelineResult:
    """Apply every phase to ``mod`` for ``target``; the result is ready for code generation.

    ``stop_after``: the last phase to run (``"lower"`` gives the unscheduled kernels that llmcc.tuning tunes)."""
    options = options or PipelineOptions()
    result = PipelineResult(mod=mod, weights=[])
    tuned: list = []
    choices: dict = {}
    buckets: dict = {}
    skipped: dict = {}
    with target.tvm_target():
        for phase, make_passes in PHASES:
            start = time.perf_counter()
            for p in make_passes(target, options):
                try:
                    result.mod = p(result.mod)
                except Exception as exc:
                    msg = str(exc).strip().splitlines()
                    raise BuildFailure(f"pass {p.name} ({phase} phase) failed for target {target.name}: "
                                       f"{msg[-1] if msg else type(exc).__name__}") from None
                result.passes.append({"name": p.name, "phase": phase, "rewrites": int(p.rewrites)})
                if isinstance(p, LiftWeights):
                    result.weights = p.weights
                if isinstance(p, DispatchLengthBuckets):
                    tuned, choices, buckets, skipped = list(p.kernels), dict(p.choices), p.buckets, p.skipped
                if isinstance(p, ApplyTuningDatabase):
                    tuned = result.kernels = tuned + p.kernels
                    choices.update(p.choices)
                if isinstance(p, ApplyScheduleRules):
                    listed = {k["name"] for k in tuned}
                    result.kernels = tuned + [k for k in p.kernels if k["name"] not in listed]
                    result.tuning = _tuning_provenance(result.kernels, choices, buckets, skipped)
                if isinstance(p, FuseAttention):
                    result.attention = p.sites
                if isinstance(p, QuantizeWeights):
                    result.quantized = p.quantized
            result.timings[phase] = time.perf_counter() - start
            log.info("phase %s: %.2fs", phase, result.timings[phase])
            if options.debug and not relax.analysis.well_formed(result.mod):
                raise BuildFailure(f"IR is not well formed after the {phase} phase")
            if phase == stop_after:
                break
    return result
