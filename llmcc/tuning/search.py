"""``tune``: MetaSchedule (XGBoost cost model) search for the static-shape kernels of a model, into a database.

Runs llmcc's pipeline up to its ``lower`` phase (as ``llmcc compile`` does), extracts the kernels as MetaSchedule
tasks and measures candidates either on this machine (local builder and runner) or on the machines registered with
a TVM RPC tracker under a key (``rpc_tracker="HOST:PORT"``, ``rpc_key``: TVM's own ``tvm.exec.rpc_tracker`` /
``rpc_server`` and MetaSchedule's RPCRunner; CUDA targets can only be measured this way).

Every measured candidate is appended to the database as it is measured (llmcc.tuning.database: this process's own
shard, one flushed line per record), so Ctrl-C or a kill keeps all of them, and a second tuner on the same folder
loses nothing. Re-running resumes: the target's records already in the database count toward ``trials`` and seed
the search (MetaSchedule's evolutionary search starts from the database's best and never measures a schedule twice).

Seeds measured before the search, and kept as records like any candidate:
    * llmcc's rule schedule for each kernel, so the database's best is never slower than compiling without it
    * ``transfer_from``: records of the nearest other targets in another database, replayed onto this target
      (llmcc.tuning.keys.transfer_order; CUDA limits checked) -- a warm start from, say, sm_80's records for sm_90
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from llmcc.errors import LlmccError
from llmcc.tuning.buckets import DEFAULT_BUCKETS, DEFAULT_DIMS, binding_name, specialize, tuning_bindings
from llmcc.tuning.database import TuningDatabase, open_database, run_secs, workload_hash, workload_module
from llmcc.tuning.keys import cuda_limits, describe_key, key_target, target_key, transfer_order
from llmcc.tuning.transfer import check_fits, replay, tensor_intrinsics_only

BUILD_FUNC = "llmcc.tuning.build"
TRANSFER_SEEDS_PER_KERNEL = 4


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


def _register_build() -> None:
    """The builder's function: tirx.build without MetaSchedule's default_build, which imports every tensor
    intrinsic (~30 s per worker per batch, against a 30 s timeout). Runs in each builder worker."""
    import tvm

    @tvm.register_global_func(BUILD_FUNC, override=True)
    def _build(mod, target, _params):
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        if target.kind.name == "cuda":  # nvcc into a fatbin for the arch, as llmcc.compile builds
            from llmcc import cuda

            return cuda.build(mod, str(target.attrs["arch"]), pipeline=None).mod  # the runtime module to export
        return tvm.tirx.build(mod, target=target)


def tuning_target(spec, num_cores: int | None = None):
    """The MetaSchedule target for an llmcc TargetSpec (llvm needs num-cores for its parallel rules; the tuned
    schedules' parallel loops are sized for it, default all of this machine's cores; CUDA needs the arch's limits
    for MetaSchedule's VerifyGPUCode). Neither is part of ``target_key``: a record tuned with 2 cores applies on a
    16-core machine of the same mcpu/mattr. The shared memory limit is the static one (48 KiB): MetaSchedule's
    CUDA rules stage tiles in static ``shared`` buffers, and with the opt-in limit (163 KiB on sm_80) 22 of 48
    sampled sm_80 schedules of llama's kernels passed the check and then failed ptxas (bench_tuning's cuda part)."""
    import tvm

    config = dict(spec.tvm_target().export())
    if spec.kind == "llvm":
        config["num-cores"] = int(num_cores or os.cpu_count() or 1)
    else:
        limits = cuda_limits(spec.arch)
        config.update(max_shared_memory_per_block=limits.static_smem_per_block,
                      max_threads_per_block=limits.max_threads_per_block)
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


def lowered_kernels(model, spec, buckets=(), dims=None) -> list[tuple[str, object, str | None, int]]:
    """The kernels llmcc's pipeline makes for ``model`` (graph..lower phases, as llmcc.compile runs them without
    quantization), each ``(name, PrimFunc, reason it is not tunable or None, call sites)``: MetaSchedule's task
    extraction on the lowered module, which merges structurally equal kernels into one task. A kernel with
    symbolic sizes comes once per bucket, its sizes bound to ``dims`` and its length to each of ``buckets``
    (``<kernel>@batch=1,sequence=128``), when its rows are independent along them (llmcc.tuning.buckets); else
    once, with the reason."""
    dims = DEFAULT_DIMS if dims is None else dims
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
            bindings, reason = tuning_bindings(func, buckets, dims)
            if reason is None:
                out += [(f"{task.task_name}@{binding_name(b)}", specialize(func, b), None, int(task.weight))
                        for b in bindings]
                continue
            reason = f"symbolic shape: {reason}"
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


def rule_trace(func, spec):
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


_LAMBDA = re.compile(r"lambda ([^:]*):")


def trace_text(trace) -> str:
    """A trace's text with every lambda's parameters renamed by position: the same schedule printed from a record
    read back and from a fresh rule application names its index maps' variables differently."""
    text = str(trace)
    out, pos = [], 0
    for match in _LAMBDA.finditer(text):
        names = [n.strip() for n in match.group(1).split(",") if n.strip()]
        end = text.find("\n", match.end())
        end = len(text) if end < 0 else end
        body = text[match.end():end]
        for i, name in enumerate(names):
            body = re.sub(rf"\b{re.escape(name)}\b", f"_p{i}", body)
        out += [text[pos:match.start()], "lambda " + ", ".join(f"_p{i}" for i in range(len(names))) + ":", body]
        pos = end
    return "".join(out) + text[pos:]


def _device_type(spec) -> str:
    return "cuda" if spec.is_gpu else "cpu"


def _measure(builder, runner, candidates: list, target, device_type: str) -> list:
    """run_secs (None where it failed) of ``(IRModule, args_info)`` candidates, built and run in one batch each
    through MetaSchedule's builder and runner (the same measurement as tuning; one batch: one worker start)."""
    from tvm.s_tir import meta_schedule as ms

    if not candidates:
        return []
    built = builder.build([ms.builder.BuilderInput(mod, target) for mod, _ in candidates])
    runnable = [i for i, b in enumerate(built) if not b.error_msg]
    futures = runner.run([ms.runner.RunnerInput(built[i].artifact_path, device_type, candidates[i][1])
                          for i in runnable])
    secs: list = [None] * len(candidates)
    for i, future in zip(runnable, futures):
        result = future.result()
        if not result.error_msg:
            secs[i] = [float(x) for x in result.run_secs]
    return secs


def parse_tracker(text: str) -> tuple[str, int]:
    """"HOST:PORT" -> (host, port); a one-line error naming --rpc-tracker otherwise."""
    host, _, port = str(text).rpartition(":")
    if not host or not port.isdigit():
        raise LlmccError(f"--rpc-tracker {text}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def tracker_servers(tracker: str, key: str) -> int:
    """How many servers the tracker has for ``key`` (free or busy); one-line errors for an unreachable tracker or
    a key with no server."""
    from tvm import rpc

    host, port = parse_tracker(tracker)
    try:
        socket.create_connection((host, port), timeout=10).close()  # TVM's own connect retries for a minute
        summary = rpc.connect_tracker(host, port).summary()
    except Exception as exc:  # noqa: BLE001 - refused, timed out, not a tracker: the same to the user
        lines = str(exc).strip().splitlines()
        raise LlmccError(f"--rpc-tracker {tracker}: cannot reach a TVM RPC tracker "
                         f"({lines[-1][:150] if lines else type(exc).__name__})") from None
    queue = summary.get("queue_info", {})
    servers = sum(1 for s in summary.get("server_info", []) if str(s.get("key", "")).split(":")[-1] == key)
    if key not in queue and not servers:
        raise LlmccError(f"--rpc-key {key}: no server registered with the tracker at {tracker} "
                         f"(keys there: {', '.join(queue) or 'none'})")
    return max(servers, int(queue.get(key, {}).get("free", 0)), 1)


def _make_runner(spec, rpc_tracker: str | None, rpc_key: str | None, number: int = 3):
    """(MetaSchedule runner, description): RPCRunner over the tracker's servers for ``rpc_key``, else local."""
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=number, repeat=1, min_repeat_ms=0, enable_cpu_cache_flush=False)
    if rpc_tracker is None:
        if spec.is_gpu:
            raise LlmccError(f"tuning for {spec.name} measures on a GPU: pass --rpc-tracker HOST:PORT --rpc-key KEY "
                             f"of TVM RPC servers on {spec.arch} GPUs")
        return ms.runner.LocalRunner(timeout_sec=60, evaluator_config=evaluator), "local"
    if not rpc_key:
        raise LlmccError(f"--rpc-tracker {rpc_tracker}: needs --rpc-key, the key its servers registered with")
    servers = tracker_servers(rpc_tracker, rpc_key)
    host, port = parse_tracker(rpc_tracker)
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=rpc_key,
                                 session_timeout_sec=60)
    return (ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=servers),
            f"rpc {rpc_tracker} key {rpc_key} ({servers} servers)")


def _progress_callback(names: list[str], trials: int, report):
    """A MetaSchedule measure callback calling ``report(line)`` after each measured batch: trials done, best time
    per kernel and the ETA (elapsed time per trial so far times the trials left)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def __init__(self) -> None:
            super().__init__()
            self.start = time.perf_counter()
            self.done = 0
            self.best: dict[str, float] = {}

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            self.done += len(measure_candidates)
            for result in runner_results:
                if result.error_msg is None and result.run_secs:
                    secs = sum(float(s) for s in result.run_secs) / len(result.run_secs)
                    name = names[task_id]
                    self.best[name] = min(self.best.get(name, secs), secs)
            elapsed = time.perf_counter() - self.start
            eta = elapsed / self.done * max(trials - self.done, 0)
            best = ", ".join(f"{n} {s * 1e6:.1f} us" for n, s in self.best.items()) or "none yet"
            report(f"tune: {self.done}/{trials} trials, {elapsed:.0f} s, ETA {eta:.0f} s; best: {best}")

    return Progress()


def _session_database(seed_records, writer):
    """The database MetaSchedule tunes against: in memory, holding this target's records already in the folder
    (the search's seeds, never re-measured), and appending every new record to ``writer``'s shard as committed."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.database import PyDatabase

    @derived_object
    class SessionDatabase(PyDatabase):
        def __init__(self) -> None:
            super().__init__()
            self.memory = ms.database.MemoryDatabase()
            for rec in seed_records:
                self.memory.commit_tuning_record(ms.database.TuningRecord(
                    rec.trace, self.memory.commit_workload(rec.workload.mod), rec.run_secs, rec.target,
                    rec.args_info))

        def has_workload(self, mod) -> bool:
            return self.memory.has_workload(mod)

        def commit_workload(self, mod):
            return self.memory.commit_workload(mod)

        def commit_tuning_record(self, record) -> None:
            self.memory.commit_tuning_record(record)
            writer.append(record)

        def get_top_k(self, workload, top_k: int):
            return self.memory.get_top_k(workload, top_k)

        def get_all_tuning_records(self):
            return self.memory.get_all_tuning_records()

        def __len__(self) -> int:
            return len(self.memory)

    return SessionDatabase()


def tune(model, target: str = "cpu", db_dir=None, trials: int = 64, *, trials_per_iter: int = 32,
         max_workers: int = 1, num_cores: int | None = None, seed: int | None = None, compare: bool = False,
         kernels: list[str] | None = None, population: int = 512, transfer_from=None,
         rpc_tracker: str | None = None, rpc_key: str | None = None, progress=None,
         buckets=DEFAULT_BUCKETS, dims=None) -> dict:
    """Tune the static-shape kernels of ``model`` for ``target`` into the database folder ``db_dir`` (created if
    missing); see the module docstring. ``trials``: the trial budget over all kernels, counting this target's
    records of these kernels already in the database. ``kernels``: only these kernel names. ``compare``: time each
    kernel's rule and best schedule again (local only). ``population``: the evolutionary search's population per
    round (512 as MetaSchedule; 32 makes a few-trial run take seconds, for tests). ``transfer_from``: another
    database folder whose records of the nearest targets seed the search. ``rpc_tracker`` ("HOST:PORT") and
    ``rpc_key``: measure on that tracker's servers. ``progress``: called with one line per measured batch.
    ``buckets``: the lengths a kernel with symbolic sizes is tuned at, ``dims`` ({name: value}, default batch=1)
    its other sizes (llmcc.tuning.buckets).

    Returns a summary: {"target", "target_key", "db", "runner", "trials", "trials_before", "trials_run",
    "records_added", "seconds", "kernels": [{"kernel", "tuned", "reason", "best_us", "rule_measured_us",
    "seeded_from", "rule_us", "tuned_us"}]}.
    """
    from tvm.s_tir import meta_schedule as ms

    from llmcc.targets import TargetSpec, resolve

    spec = target if isinstance(target, TargetSpec) else resolve(target)
    if db_dir is None:
        raise LlmccError("tune needs a database folder (--db DIR)")
    if trials < 1:
        raise LlmccError(f"--trials must be at least 1; got {trials}")
    if compare and rpc_tracker:
        raise LlmccError("--compare times kernels on this machine; it cannot be combined with --rpc-tracker")
    source_db = open_database(transfer_from) if transfer_from is not None else None
    runner, runner_name = _make_runner(spec, rpc_tracker, rpc_key)
    db = TuningDatabase(db_dir, create=True)
    start = time.perf_counter()
    key = target_key(spec)
    buckets = _check_buckets(buckets)
    found = lowered_kernels(model, spec, buckets, dims)
    tunable = [(n, f, w) for n, f, r, w in found if r is None and (not kernels or n in kernels)]
    hashes = {workload_hash(workload_module(func)) for _, func, _ in tunable}
    before = [r for r in (db.record(e) for e in db.entries if e.key == key and e.shash in hashes) if r is not None]
    summary = {"target": spec.name, "target_key": describe_key(key), "db": str(db.path), "runner": runner_name,
               "trials": trials, "trials_before": len(before), "trials_run": 0, "records_added": 0, "kernels": []}
    ms_target = tuning_target(spec, num_cores)
    device_type = _device_type(spec)
    report = progress or (lambda line: None)
    rule_secs: dict[str, float] = {}
    seeded_from: dict[str, list[str]] = {}
    work = Path(tempfile.mkdtemp(prefix="llmcc-tune-"))
    try:
        with db.writer() as shard:
            if tunable:
                session = _session_database(before, shard)
                intrinsics = contextlib.nullcontext() if spec.is_gpu else tensor_intrinsics_only("x86")
                with intrinsics:
                    contexts = [ms.TuneContext(
                        mod=workload_module(f), target=ms_target, space_generator="post-order-apply",
                        search_strategy=ms.search_strategy.EvolutionarySearch(
                            population_size=population, init_min_unmeasured=min(50, max(population // 4, 1)),
                            genetic_num_iters=4 if population >= 256 else 2),
                        task_name=n, num_threads=1, rand_state=-1 if seed is None else seed)
                        for n, f, _ in tunable]
                builder = ms.builder.LocalBuilder(max_workers=max_workers, timeout_sec=120, f_build=BUILD_FUNC,
                                                  initializer=_register_build)
                seeds: list = []  # (kernel name, tune context, trace, why: "rule" or a source key)
                for (name, func, _), ctx in zip(tunable, contexts):
                    trace = rule_trace(func, spec)
                    if trace is not None:
                        seeds.append((name, ctx, trace, "rule"))
                    if source_db is not None:
                        seeds += [(name, ctx, t, source) for t, source in _transfer_seeds(source_db, func, key)]
                for (name, ctx, trace, why), secs in _measure_seeds(seeds, before, builder, runner, ms_target,
                                                                    device_type, session):
                    if secs is not None and why == "rule":
                        rule_secs[name] = secs
                    elif why != "rule":
                        seeded_from.setdefault(name, []).append(why)
                seeds_run = shard.count
                remaining = trials - len(before) - seeds_run
                if remaining > 0:
                    callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
                    callbacks.append(_progress_callback([n for n, _, _ in tunable], remaining, report))
                    ms.tune.tune_tasks(tasks=contexts, task_weights=[float(w) for _, _, w in tunable],
                                       work_dir=str(work), max_trials_global=remaining,
                                       num_trials_per_iter=min(trials_per_iter, remaining), builder=builder,
                                       runner=runner, database=session, cost_model="xgb",
                                       measure_callbacks=callbacks)
                else:
                    report(f"tune: {len(before) + seeds_run} of {trials} trials already measured for "
                           f"{describe_key(key)}; nothing to run (raise --trials to continue)")
            summary["records_added"] = summary["trials_run"] = shard.count
        db.reload()
        summary["seconds"] = round(time.perf_counter() - start, 1)
        for name, func, reason, _ in found:
            summary["kernels"].append(_kernel_row(db, spec, name, func, reason, kernels, rule_secs,
                                                  seeded_from, compare))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _check_buckets(buckets) -> tuple[int, ...]:
    try:
        lengths = tuple(sorted({int(b) for b in buckets or ()}))
    except (TypeError, ValueError):
        raise LlmccError(f"--buckets {buckets}: expected lengths, e.g. 32,128,512") from None
    if any(b < 1 for b in lengths):
        raise LlmccError(f"--buckets {','.join(map(str, lengths))}: lengths must be at least 1")
    return lengths


def _measure_seeds(seeds: list, before: list, builder, runner, target, device_type: str, session) -> list:
    """Measure the seed schedules (once per kernel and distinct trace; one already in the database keeps its
    record) in one batch and commit each as a record of ``target`` to ``session``; returns
    [(seed, mean seconds or None)]."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    # keyed by workload too: a rule's trace (splits by None) reads the same for two shapes of one kernel
    measured = {(workload_hash(r.workload.mod), trace_text(r.trace)): run_secs(r) for r in before}
    todo, candidates, out = [], [], []
    for seed in seeds:
        _, ctx, trace, _ = seed
        key = (workload_hash(ctx.mod), trace_text(trace))
        if key in measured:
            out.append((seed, measured[key]))
            continue
        measured[key] = None
        sch = s_tir.Schedule(ctx.mod)
        trace.apply_to_schedule(sch, remove_postproc=False)
        todo.append(seed)
        candidates.append((sch.mod, ms.arg_info.ArgInfo.from_prim_func(ctx.mod["main"])))
    for seed, (_, args_info), secs in zip(todo, candidates, _measure(builder, runner, candidates, target,
                                                                      device_type)):
        _, ctx, trace, _ = seed
        session.commit_tuning_record(ms.database.TuningRecord(
            trace, session.commit_workload(ctx.mod), secs or [1e10], target, args_info))
        out.append((seed, sum(secs) / len(secs) if secs else None))
    return out


def _transfer_seeds(source_db, func, key) -> list:
    """Up to TRANSFER_SEEDS_PER_KERNEL ``(trace, source key)`` of ``source_db``'s records for ``func`` from the
    nearest targets (its own target's first), each replaying onto ``func`` and fitting ``key``'s limits."""
    by_key: dict[tuple, list] = {}
    for rec in source_db.kernel_records(func):
        by_key.setdefault(target_key(rec.target), []).append(rec)
    seeds = []
    for source in [key] + transfer_order(by_key, key):
        for rec in by_key.get(source, ()):
            if len(seeds) >= TRANSFER_SEEDS_PER_KERNEL:
                return seeds
            try:
                if check_fits(replay(func, rec), key_target(key)) is not None:
                    continue
            except Exception:  # noqa: BLE001 - a record that does not replay on this kernel is no seed
                continue
            seeds.append((rec.trace, describe_key(source)))
    return seeds


def _kernel_row(db, spec, name, func, reason, kernels, rule_secs, seeded_from, compare) -> dict:
    row = {"kernel": name, "tuned": reason is None and (not kernels or name in kernels), "reason": reason}
    if not row["tuned"]:
        if reason is None:
            row["reason"] = "not selected (--kernel)"
        return row
    if name in rule_secs:
        row["rule_measured_us"] = round(rule_secs[name] * 1e6, 2)
    if seeded_from.get(name):
        row["seeded_from"] = sorted(set(seeded_from[name]))
    rec = db.query(func, spec)
    row["best_us"] = round(run_secs(rec) * 1e6, 2) if rec is not None else None
    if rec is None:
        row.update(tuned=False, reason="no candidate built and ran")
    elif compare:
        rule = rule_schedule(func, spec)
        row["rule_us"] = round(time_kernel(rule, spec) * 1e6, 2) if rule is not None else None
        row["tuned_us"] = round(time_kernel(replay(func, rec), spec) * 1e6, 2)
    return row
