"""Tuning database: MetaSchedule (XGBoost cost model) schedules for llmcc's kernels, kept per target.

A tuning database is a folder holding MetaSchedule's JSON database (``database_workload.json``, one line per kernel
workload, and ``database_tuning_record.json``, one line per measured schedule: ``[workload_idx, [trace, run_secs,
target, args_info]]``). One folder can hold records for many targets: every record keeps the target it was measured
on, and every lookup filters on it, because MetaSchedule's own lookup ignores the target (it would hand an sm_80
record to sm_90, or to llvm).

Target matching rule (``target_key``): a record applies to a compile target when their keys are equal.

    llvm   ("llvm", mcpu, sorted mattr)   e.g. ("llvm", "znver4", ("-avx512f",)); num-cores, mtriple and other
                                          attributes are ignored (tuning adds num-cores for MetaSchedule)
    cuda   ("cuda", arch)                 e.g. ("cuda", "sm_90"); max_threads_per_block etc. are ignored

Nothing is transferred between targets yet (a record for another mcpu/mattr or arch is never applied).

A kernel's workload is its lowered PrimFunc (after llmcc's ``lower`` phase) renamed ``main``; MetaSchedule keys it by
structural hash, so the same kernel in another model finds the same records. ``tune`` tunes the static-shape
kernels of a model; kernels with a symbolic dimension (sequence length) are listed as skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from llmcc.errors import LlmccError

log = logging.getLogger("llmcc")

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
BUILD_FUNC = "llmcc.tuning.build"


class TuningDatabaseError(LlmccError):
    """A tuning database folder that is missing, unreadable or corrupt."""


# ---------------------------------------------------------------------------------------------------------------------
# Targets and workloads


def target_key(target) -> tuple:
    """The part of a target a record must share with the compile target to apply (see the module docstring).

    ``target``: a tvm.target.Target, a dict in Target's JSON form, or an llmcc TargetSpec."""
    import tvm

    from llmcc.targets import TargetSpec

    if isinstance(target, TargetSpec):
        target = target.tvm_target()
    if isinstance(target, dict):
        target = tvm.target.Target(target)
    kind = target.kind.name
    if kind == "cuda":
        return ("cuda", str(target.attrs.get("arch", "")))
    mattr = target.attrs.get("mattr")
    return (kind, str(target.attrs.get("mcpu", "") or ""), tuple(sorted(str(a) for a in (mattr or ()))))


def describe_key(key: tuple) -> str:
    if key[0] == "cuda":
        return f"cuda:{key[1]}"
    return f"{key[0]} mcpu={key[1] or '-'} mattr={','.join(key[2]) or '-'}"


def workload_module(func):
    """The IRModule MetaSchedule keys a kernel by: the PrimFunc alone, named main (same form in tune and compile)."""
    import tvm

    func = func.with_attr("global_symbol", "main").with_attr("tirx.noalias", True)
    return tvm.IRModule({"main": func})


def is_static(func) -> bool:
    """No symbolic dimension in any parameter (MetaSchedule can only measure concrete shapes)."""
    from tvm import tirx
    from tvm.s_tir import meta_schedule as ms

    try:
        infos = ms.arg_info.ArgInfo.from_prim_func(func)
    except Exception:  # a scalar parameter (a symbolic dim passed by value)
        return False
    return all(isinstance(d, (int, tirx.IntImm)) for info in infos for d in info.shape)


def _is_scheduled(func) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


# ---------------------------------------------------------------------------------------------------------------------
# The database


def _check_files(path: Path) -> None:
    """Every line of both files must be a JSON list of two items; else a one-line error naming file and line."""
    for name in (WORKLOAD_FILE, RECORD_FILE):
        file = path / name
        if not file.is_file():
            raise TuningDatabaseError(f"tuning database {path}: not a tuning database (no {name}); "
                                      f"create one with tools/tune.py")
        with open(file, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError:
                    item = None
                if not isinstance(item, list) or len(item) != 2:
                    raise TuningDatabaseError(f"tuning database {file}: line {n} is corrupt (not a MetaSchedule "
                                              f"record)")


class TuningDatabase:
    """A folder holding MetaSchedule's JSON database, queried per target.

    ``TuningDatabase(path)`` opens an existing database (a missing folder, missing files or a corrupt line raise
    TuningDatabaseError naming the path); ``create=True`` makes the folder and empty files when absent.
    ``query(func, target)`` returns the fastest record for the kernel measured on a target that matches ``target``
    (``target_key``), or None; ``schedule(func, target)`` replays it into a scheduled PrimFunc.
    """

    def __init__(self, path, create: bool = False) -> None:
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
            for name in (WORKLOAD_FILE, RECORD_FILE):
                (self.path / name).touch(exist_ok=True)
        elif not self.path.is_dir():
            raise TuningDatabaseError(f"tuning database {self.path}: no such folder")
        _check_files(self.path)
        from tvm.s_tir import meta_schedule as ms

        try:
            self.db = ms.database.JSONDatabase(path_workload=str(self.path / WORKLOAD_FILE),
                                               path_tuning_record=str(self.path / RECORD_FILE),
                                               allow_missing=False)
        except Exception as exc:
            msg = str(exc).strip().splitlines()
            raise TuningDatabaseError(f"tuning database {self.path}: cannot be read: "
                                      f"{msg[-1][:200] if msg else type(exc).__name__}") from None

    def __len__(self) -> int:
        return len(self.db)

    def records(self, target=None) -> list:
        """Every record (valid or not), or those whose target matches ``target``."""
        recs = list(self.db.get_all_tuning_records())
        if target is None:
            return recs
        key = target_key(target)
        return [r for r in recs if target_key(r.target) == key]

    def targets(self) -> dict:
        """{target description: record count}."""
        counts: dict[str, int] = {}
        for r in self.db.get_all_tuning_records():
            name = describe_key(target_key(r.target))
            counts[name] = counts.get(name, 0) + 1
        return counts

    def query(self, func, target):
        """The fastest valid record for kernel ``func`` measured on a target matching ``target``, else None."""
        mod = workload_module(func)
        if not self.db.has_workload(mod):
            return None
        workload = self.db.commit_workload(mod)  # present already: returns it, writes nothing
        key = target_key(target)
        for rec in self.db.get_top_k(workload, 1 << 30):  # sorted fastest first, failed runs left out
            if target_key(rec.target) == key:
                return rec
        return None

    def schedule(self, func, target):
        """``(scheduled PrimFunc, record)`` for ``func`` from its matching record, or ``(None, None)``.

        The PrimFunc keeps ``func``'s attributes (its global symbol, if any) and is marked ``tirx.is_scheduled``."""
        from tvm import s_tir

        rec = self.query(func, target)
        if rec is None:
            return None, None
        sch = s_tir.Schedule(workload_module(func))
        rec.trace.apply_to_schedule(sch, remove_postproc=False)
        new = sch.mod["main"]
        attrs = dict(func.attrs) if func.attrs is not None else {}
        if "global_symbol" not in attrs:
            new = new.without_attr("global_symbol")
        for k, v in attrs.items():
            new = new.with_attr(k, v)
        return new.with_attr("tirx.is_scheduled", True), rec

    def add(self, records) -> int:
        """Append MetaSchedule TuningRecords (from another database) to this one; returns how many."""
        from tvm.s_tir.meta_schedule.database import TuningRecord

        n = 0
        for rec in records:
            workload = self.db.commit_workload(rec.workload.mod)
            self.db.commit_tuning_record(TuningRecord(rec.trace, workload, rec.run_secs, rec.target,
                                                      rec.args_info))
            n += 1
        return n


def open_database(path) -> TuningDatabase:
    return path if isinstance(path, TuningDatabase) else TuningDatabase(path)


def run_secs(rec) -> float | None:
    """The mean measured time of a record in seconds (None for a failed build or run)."""
    secs = [float(s) for s in (rec.run_secs or [])]
    if not secs or min(secs) >= 1e9:
        return None
    return sum(secs) / len(secs)


# ---------------------------------------------------------------------------------------------------------------------
# Tuning


def _register_build() -> None:
    """The builder's function: tirx.build without MetaSchedule's default_build, which imports every tensor
    intrinsic (~30 s per worker per batch, against a 30 s timeout). Runs in each builder worker."""
    import tvm

    @tvm.register_global_func(BUILD_FUNC, override=True)
    def _build(mod, target, _params):
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        with target:  # the nvcc callback reads Target.current() for the arch
            return tvm.tirx.build(mod, target=target)


@contextlib.contextmanager
def _cpu_tensor_intrinsics_only():
    """MetaSchedule's TuneContext imports tvm.s_tir.tensor_intrin, whose package imports every CUDA tensor
    intrinsic (~30 s of TVMScript parsing, more on a busy machine). For CPU tuning only the x86 ones matter: stand in
    a package module that loads just those while the contexts are made (submodules still import on demand)."""
    import importlib
    import importlib.util
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    import tvm.s_tir

    real = importlib.util.find_spec(name)
    stub = types.ModuleType(name)
    stub.__path__ = list(real.submodule_search_locations)
    stub.__package__ = name
    sys.modules[name] = stub
    try:
        importlib.import_module(name + ".x86")
        yield
    finally:
        sys.modules.pop(name, None)
        if getattr(tvm.s_tir, "tensor_intrin", None) is stub:
            del tvm.s_tir.tensor_intrin


def tuning_target(spec, num_cores: int | None = None):
    """The MetaSchedule target for an llmcc TargetSpec (llvm needs num-cores for its parallel rules; the tuned
    schedules' parallel loops are sized for it, default all of this machine's cores). num-cores is not part of
    ``target_key``: a record tuned with 2 cores applies on a 16-core machine of the same mcpu/mattr."""
    import tvm

    config = dict(spec.tvm_target().export())
    if spec.kind == "llvm":
        config["num-cores"] = int(num_cores or os.cpu_count() or 1)
    return tvm.target.Target(config)


def load_proto(model):
    """An ONNX path, a zoo model name or a ModelProto -> (ModelProto, source description)."""
    import onnx

    from llmcc.frontend import onnx_import

    if isinstance(model, onnx.ModelProto):
        return model, "<onnx.ModelProto>"
    text = str(model)
    if not Path(text).exists() and not text.endswith(".onnx"):
        from llmcc import zoo

        path = zoo.onnx_path(zoo.get(text).name)
        return onnx_import.load_model(path), f"zoo:{text}"
    return onnx_import.load_model(model), text


def lowered_kernels(model, spec) -> list[tuple[str, object, str | None, int]]:
    """The kernels llmcc's pipeline makes for ``model`` (graph..lower phases, as llmcc.compile runs them without
    quantization), each ``(name, PrimFunc, reason it is not tunable or None, call sites)``: MetaSchedule's task
    extraction on the lowered module, which merges structurally equal kernels into one task."""
    from tvm import relax, tirx
    from tvm.s_tir import meta_schedule as ms

    from llmcc import pipeline
    from llmcc.frontend import onnx_import

    proto, _ = load_proto(model)
    mod = onnx_import.import_model(proto)
    lowered = pipeline.run(mod, spec, pipeline.PipelineOptions(), stop_after="lower").mod
    with spec.tvm_target():
        tasks = ms.relax_integration.extract_tasks(lowered, tuning_target(spec))
    by_name = {g.name_hint: f for g, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)}
    out = []
    for task in tasks:
        func = by_name.get(task.task_name)
        if func is None:  # extraction renamed it: take the dispatched module's function
            func = task.dispatched[0]["main"]
        if _is_scheduled(func):
            reason = "scheduled by llmcc already (a fused kernel)"
        elif not spec.is_gpu and relax.analysis.has_reshape_pattern(func):
            reason = "reshape (becomes a view, no kernel)"
        elif not is_static(func):
            reason = "symbolic shape (bucketed tuning not implemented)"
        else:
            reason = None
        out.append((task.task_name, func, reason, int(task.weight)))
    return out


def _random_args(func, dev):
    import numpy as np
    import tvm
    from tvm.s_tir import meta_schedule as ms

    rng = np.random.default_rng(0)
    args = []
    for info in ms.arg_info.ArgInfo.from_prim_func(func):
        shape = [int(d) for d in info.shape]
        dtype = str(info.dtype)
        data = rng.standard_normal(shape).astype(dtype) if "float" in dtype else np.zeros(shape, dtype)
        args.append(tvm.runtime.tensor(data, dev))
    return args


def time_kernel(func, spec, number: int = 20, repeat: int = 3) -> float:
    """Mean seconds of one scheduled kernel on this machine's CPU (random inputs)."""
    import tvm

    mod = workload_module(func)
    lib = tvm.compile(mod, target=spec.tvm_target())
    lib = getattr(lib, "jit", None) and lib.jit() or lib.mod
    dev = tvm.cpu()
    return float(lib.time_evaluator("main", dev, number=number, repeat=repeat)(*_random_args(func, dev)).mean)


def rule_schedule(func, spec):
    """The kernel as llmcc's schedule rules schedule it (None when no rule takes it)."""
    from llmcc.passes.apply_schedule_rules import ApplyScheduleRules
    from llmcc.schedules import rules_for

    with spec.tvm_target() as target:
        new, _ = ApplyScheduleRules(rules_for(spec))._schedule(func, target)
    return new


def _rule_trace(func, spec):
    """The trace of llmcc's rule schedule for ``func`` (the first rule that takes it), or None."""
    from tvm import s_tir

    from llmcc.schedules import rules_for

    with spec.tvm_target() as target:
        for rule in rules_for(spec):
            try:
                space = rule.apply(func, target, False)
            except Exception:  # noqa: BLE001 - as in ApplyScheduleRules: a rule that raises declines
                continue
            if space is not None:
                sch = space if isinstance(space, s_tir.Schedule) else space[0]
                return sch.trace
    return None


def _measure(builder, runner, mod, target, args_info) -> list | None:
    """run_secs of one schedule through MetaSchedule's builder and runner (the same measurement as tuning)."""
    from tvm.s_tir import meta_schedule as ms

    (built,) = builder.build([ms.builder.BuilderInput(mod, target)])
    if built.error_msg:
        return None
    (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args_info)])
    result = future.result()
    return None if result.error_msg else [float(x) for x in result.run_secs]


def tune(model, target: str = "cpu", db_dir=None, trials: int = 64, *, trials_per_iter: int = 32,
         max_workers: int = 1, num_cores: int | None = None, seed: int | None = None, compare: bool = False,
         kernels: list[str] | None = None, population: int = 512, keep_slower: bool = False) -> dict:
    """Tune the static-shape kernels of ``model`` for ``target`` with MetaSchedule (XGBoost cost model, local
    builder with ``max_workers`` workers, local runner) and append the measured records to the database folder
    ``db_dir`` (created if missing). ``trials``: MetaSchedule's global trial budget over all kernels.
    ``kernels``: only these kernel names. ``compare``: also time each kernel's rule schedule and tuned schedule.
    ``population``: the evolutionary search's population per round (MetaSchedule's default 512; a small one, e.g.
    32, makes a few-trial run take seconds instead of a minute, for tests).

    Each kernel's search starts from llmcc's rule schedule (its trace, measured like any candidate, seeds the
    evolutionary search); a kernel's records are kept only when the best beats the rule's measured time, so the
    database never makes a kernel slower than compiling without it (within measurement noise); ``keep_slower``
    keeps them anyway (tests and experiments).

    Returns a summary: {"target", "db", "seconds", "records_added", "kernels": [{"kernel", "tuned", "reason",
    "best_us", "rule_measured_us", "rule_us", "tuned_us"}]} (rule_us/tuned_us: timed again with ``compare``).
    """
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from llmcc.targets import resolve

    spec = resolve(target)
    if spec.is_gpu:
        raise LlmccError(f"tuning for {spec.name} needs an RPC runner on a GPU host, which llmcc does not have yet; "
                         f"tune with --target cpu")
    if db_dir is None:
        raise LlmccError("tune needs a database folder (--db DIR)")
    if trials < 1:
        raise LlmccError(f"--trials must be at least 1; got {trials}")
    db = TuningDatabase(db_dir, create=True)
    start = time.perf_counter()
    found = lowered_kernels(model, spec)
    tunable = [(n, f, w) for n, f, r, w in found if r is None and (not kernels or n in kernels)]
    summary = {"target": spec.name, "target_key": describe_key(target_key(spec)), "db": str(db.path),
               "trials": trials, "kernels": []}
    ms_target = tuning_target(spec, num_cores)
    work = Path(tempfile.mkdtemp(prefix="llmcc-tune-"))
    rule_secs: dict[str, float] = {}
    verdicts: dict[str, str] = {}
    try:
        new_records = []
        if tunable:
            with _cpu_tensor_intrinsics_only():
                contexts = [ms.TuneContext(
                    mod=workload_module(f), target=ms_target, space_generator="post-order-apply",
                    search_strategy=ms.search_strategy.EvolutionarySearch(
                        population_size=population, init_min_unmeasured=min(50, max(population // 4, 1)),
                        genetic_num_iters=4 if population >= 256 else 2),
                    task_name=n, num_threads=1, rand_state=-1 if seed is None else seed)
                    for n, f, _ in tunable]
            builder = ms.builder.LocalBuilder(max_workers=max_workers, timeout_sec=120, f_build=BUILD_FUNC,
                                              initializer=_register_build)
            runner = ms.runner.LocalRunner(timeout_sec=60, evaluator_config=ms.runner.EvaluatorConfig(
                number=3, repeat=1, min_repeat_ms=0, enable_cpu_cache_flush=False))
            scratch = ms.database.JSONDatabase(work_dir=str(work))
            rule_secs, seeds = {}, set()
            for (name, func, _), ctx in zip(tunable, contexts):
                trace = _rule_trace(func, spec)
                if trace is None:
                    continue
                args_info = ms.arg_info.ArgInfo.from_prim_func(func)
                sch = s_tir.Schedule(ctx.mod)
                trace.apply_to_schedule(sch, remove_postproc=False)
                secs = _measure(builder, runner, sch.mod, ms_target, args_info)
                if secs is None:
                    continue
                rule_secs[name] = sum(secs) / len(secs)
                seeds.add(str(trace))
                scratch.commit_tuning_record(ms.database.TuningRecord(
                    trace, scratch.commit_workload(ctx.mod), secs, ms_target, args_info))
            ms.tune.tune_tasks(tasks=contexts, task_weights=[float(w) for _, _, w in tunable],
                               work_dir=str(work), max_trials_global=trials,
                               num_trials_per_iter=min(trials_per_iter, trials), builder=builder, runner=runner,
                               database=scratch, cost_model="xgb")
            for (name, func, _), ctx in zip(tunable, contexts):
                workload = scratch.commit_workload(ctx.mod)
                recs = [r for r in scratch.get_top_k(workload, 1 << 30)
                        if str(r.trace) not in seeds and run_secs(r) is not None]
                if not recs:
                    verdicts[name] = "no candidate built and ran"
                elif not keep_slower and name in rule_secs and run_secs(recs[0]) >= rule_secs[name]:
                    verdicts[name] = (f"rule schedule faster ({rule_secs[name] * 1e6:.1f} us vs best tuned "
                                      f"{run_secs(recs[0]) * 1e6:.1f} us): no record kept")
                else:
                    new_records += recs
            summary["records_added"] = db.add(new_records)
        else:
            summary["records_added"] = 0
        summary["seconds"] = round(time.perf_counter() - start, 1)
        for name, func, reason, _ in found:
            row = {"kernel": name, "tuned": reason is None and (not kernels or name in kernels), "reason": reason}
            if row["tuned"] and name in verdicts:
                row.update(tuned=False, reason=verdicts[name])
            if name in rule_secs:
                row["rule_measured_us"] = round(rule_secs[name] * 1e6, 2)
            if row["tuned"]:
                rec = db.query(func, spec)
                row["best_us"] = round(run_secs(rec) * 1e6, 2) if rec is not None else None
                if compare:
                    rule = rule_schedule(func, spec)
                    tuned, _ = db.schedule(func, spec)
                    row["rule_us"] = round(time_kernel(rule, spec) * 1e6, 2) if rule is not None else None
                    row["tuned_us"] = round(time_kernel(tuned, spec) * 1e6, 2) if tuned is not None else None
            summary["kernels"].append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary
