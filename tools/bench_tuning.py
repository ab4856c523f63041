#!/usr/bin/env python3
"""Benchmark: what tuning buys, what transfers, and how fast tuning runs (issue 7's goals), on this machine.

Parts (``--only`` picks some; each writes its section of bench/tuning.json and bench/tuning.md):

    zoo        every zoo model compiled with the rules only and with the shipped database (tuning/zoo-cpu, from
               tools/tune_zoo.py), timed alternately at the benchmark's shapes (batch 1, sequence 128)
    transfer   one model tuned in full for a narrower CPU (x86-64-v2: SSE4.2, 128-bit vectors), then for this CPU
               with 10% of the trials warm-started from those records (``llmcc tune --transfer-from``), and with 10%
               cold; each database compiled for this CPU and timed against the full tune of this CPU
    cuda       schedules of the sm_80 search space for a model's kernels (sampled: no GPU measures them here)
               replayed for sm_86 and sm_90: the fraction dropped, and why
    runners    tuning throughput (trials per second) measuring through a TVM RPC tracker with one runner, then two

    python tools/bench_tuning.py                          # every part -> bench/tuning.{json,md}
    python tools/bench_tuning.py --only zoo --models llama minilm
    python tools/bench_tuning.py --only transfer --model llama --trials-per-kernel 16

It is a benchmark, not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

ZOO_DB = ROOT / "tuning" / "zoo-cpu"
BUCKETS = (128,)
DIMS = {"batch": 1}
NARROW_CPU = "x86-64-v2"  # SSE4.2: 128-bit vectors, a vector-feature subset of any AVX2 CPU


def _time_modules(modules: dict, feed: dict, repeat: int, rounds: int) -> dict:
    """{name: fastest median ms}: alternating rounds over the compiled modules (tools/bench.py's method)."""
    from bench import _median_ms

    best = {name: float("inf") for name in modules}
    for _ in range(rounds):
        for name, module in modules.items():
            best[name] = min(best[name], _median_ms(lambda m=module: m.run(**feed), repeat)[0])
    return best


def _tuned_kernels(module) -> dict:
    """Counts of the report's tuning provenance, bucket kernels included."""
    counts: dict = {}
    for entry in module.report.get("tuning", []):
        kind = entry["provenance"].split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def bench_zoo(models: list[str], repeat: int, rounds: int, db: Path = ZOO_DB) -> list[dict]:
    import llmcc
    from llmcc import zoo

    if not (db / "database_workload.json").exists():
        raise SystemExit(f"{db}: no shipped database; run python tools/tune_zoo.py first")
    rows = []
    for name in models:
        entry = zoo.get(name)
        seq = 128 if entry.seq_dim is not None and 128 in entry.seq_lens else entry.seq_lens[-1]
        feed = zoo.sample_inputs(name, seq_len=seq, batch=1, seed=0)
        path = zoo.onnx_path(name)
        rule = llmcc.compile(path, target="cpu")
        tuned = llmcc.compile(path, target="cpu", tuning_db=db)
        times = _time_modules({"rule": rule, "tuned": tuned}, feed, repeat, rounds)
        rows.append({"model": name, "seq": seq, "rule_ms": times["rule"], "tuned_ms": times["tuned"],
                     "speedup": times["rule"] / times["tuned"], "provenance": _tuned_kernels(tuned),
                     "buckets": sum(len(e.get("buckets", [])) for e in tuned.report["tuning"]),
                     "verify": bool(tuned.report["verify"]["passed"])})
        r = rows[-1]
        print(f"  {name}: rule {r['rule_ms']:.2f} ms, tuned {r['tuned_ms']:.2f} ms ({r['speedup']:.2f}x); "
              f"{r['provenance']}", flush=True)
    return rows


def narrow_cpu():
    """An llmcc TargetSpec for NARROW_CPU (LLVM's generic x86-64 with SSE4.2 and no AVX)."""
    from llmcc.targets import TargetSpec

    return TargetSpec("cpu-" + NARROW_CPU, "llvm", mcpu=NARROW_CPU, description=f"LLVM for {NARROW_CPU}")


def bench_transfer(model: str, trials_per_kernel: int, population: int, repeat: int, rounds: int,
                   full_db: Path = ZOO_DB) -> dict:
    """Full tune for the narrow CPU; 10% of the trials for this CPU warm-started from it, and 10% cold; compiled
    for this CPU against ``full_db`` (this CPU's full tune: the shipped zoo database)."""
    import llmcc
    from llmcc import zoo
    from llmcc.targets import resolve
    from llmcc.tuning import lowered_kernels, tune

    host = resolve("cpu")
    kernels = sum(1 for _, _, reason, _ in lowered_kernels(model, host, BUCKETS, DIMS) if reason is None)
    full_trials = kernels * (trials_per_kernel + 1)
    tenth = max(kernels, full_trials // 10)
    work = Path(tempfile.mkdtemp(prefix="llmcc-bench-transfer-"))
    result = {"model": model, "kernels": kernels, "full_trials": full_trials, "tenth_trials": tenth,
              "narrow_target": NARROW_CPU}
    try:
        progress = (lambda line: print("    " + line, flush=True))
        runs = {}
        for name, target, trials, source in (("narrow", narrow_cpu(), full_trials, None),
                                             ("warm", "cpu", tenth, work / "narrow"),
                                             ("cold", "cpu", tenth, None)):
            print(f"  tune {model} {name}: {trials} trials", flush=True)
            summary = tune(model, target, work / name, trials, population=population, seed=0, buckets=BUCKETS,
                           dims=DIMS, transfer_from=source, progress=progress)
            runs[name] = {"trials_run": summary["trials_run"], "seconds": summary["seconds"]}
        result["tuning"] = runs
        entry = zoo.get(model)
        feed = zoo.sample_inputs(model, seq_len=128 if entry.seq_dim is not None else entry.seq_lens[-1], batch=1,
                                 seed=0)
        path = zoo.onnx_path(model)
        modules = {"rule": llmcc.compile(path, target="cpu"),
                   "full": llmcc.compile(path, target="cpu", tuning_db=full_db),
                   "transferred": llmcc.compile(path, target="cpu", tuning_db=work / "narrow"),
                   "warm_10pct": llmcc.compile(path, target="cpu", tuning_db=work / "warm"),
                   "cold_10pct": llmcc.compile(path, target="cpu", tuning_db=work / "cold")}
        result["provenance"] = {name: _tuned_kernels(m) for name, m in modules.items()}
        times = _time_modules(modules, feed, repeat, rounds)
        result["ms"] = times
        result["fraction_of_full"] = {name: times["full"] / t for name, t in times.items()}
        print(f"  {model}: " + ", ".join(f"{n} {t:.2f} ms ({times['full'] / t:.0%} of full)"
                                         for n, t in times.items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def markdown(results: dict, meta: dict) -> str:
    lines = ["# Tuning benchmark", "", f"Machine: {meta['machine']}, {meta['threads']} threads. Each section names "
             "the command that wrote it.", ""]

    def command(part):
        return [f"Command: `{meta['commands'][part]}`", ""] if part in meta.get("commands", {}) else []

    if "zoo" in results:
        lines += ["## Tuned (tuning/zoo-cpu) vs rule-only, batch 1", "",
                  *command("zoo"),
                  "| model | seq | rule ms | tuned ms | speedup | kernels by provenance | bucket kernels |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["zoo"]:
            lines.append(f"| {r['model']} | {r['seq']} | {r['rule_ms']:.2f} | {r['tuned_ms']:.2f} | "
                         f"{r['speedup']:.2f}x | {', '.join(f'{k} {v}' for k, v in r['provenance'].items())} | "
                         f"{r['buckets']} |")
        lines.append("")
    if "transfer" in results:
        t = results["transfer"]
        lines += [f"## Transfer: {t['model']} tuned for {t['narrow_target']}, compiled for this CPU", "",
                  *command("transfer"),
                  f"{t['kernels']} tunable kernels; full tune {t['full_trials']} trials, 10%: {t['tenth_trials']}.",
                  "", "| database | ms | fraction of the full tune's speed | kernels by provenance |",
                  "|---|---|---|---|"]
        for name, ms in t["ms"].items():
            prov = t["provenance"][name]
            lines.append(f"| {name} | {ms:.2f} | {t['fraction_of_full'][name]:.0%} | "
                         f"{', '.join(f'{k} {v}' for k, v in prov.items())} |")
        lines.append("")
    if "cuda" in results:
        cuda = cuda_markdown(results["cuda"])
        lines += cuda[:2] + command("cuda") + cuda[2:]
    if "runners" in results:
        runners = runners_markdown(results["runners"])
        lines += runners[:2] + command("runners") + runners[2:]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="zoo,transfer,cuda,runners", help="comma-separated parts")
    parser.add_argument("--models", nargs="*", help="zoo part: zoo models (default: all)")
    parser.add_argument("--db", default=str(ZOO_DB), help="zoo and transfer parts: this CPU's full tune")
    parser.add_argument("--model", default="llama", help="transfer and cuda parts: the zoo model")
    parser.add_argument("--trials-per-kernel", type=int, default=16, help="transfer part: the full tune's budget")
    parser.add_argument("--population", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench"), help="folder for tuning.json and tuning.md")
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from bench import _cpu_name

    from llmcc import zoo

    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    out = Path(args.out)
    previous = json.loads((out / "tuning.json").read_text()) if (out / "tuning.json").exists() else {}
    results = previous.get("results", {})
    commands = previous.get("meta", {}).get("commands", {})  # the command that wrote each part kept
    command = "python tools/bench_tuning.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    for part in parts:
        print(f"bench_tuning {part} ...", flush=True)
        if part == "zoo":
            results["zoo"] = bench_zoo(args.models or list(zoo.ZOO), args.repeat, args.rounds, Path(args.db))
        elif part == "transfer":
            results["transfer"] = bench_transfer(args.model, args.trials_per_kernel, args.population, args.repeat,
                                                 args.rounds, Path(args.db))
        elif part == "cuda":
            results["cuda"] = bench_cuda(args.model)
        elif part == "runners":
            results["runners"] = bench_runners()
        else:
            raise SystemExit(f"--only: unknown part {part!r} (zoo, transfer, cuda, runners)")
    commands.update({part: command for part in parts})
    meta = {"machine": f"{_cpu_name()} ({os.cpu_count()} cores)", "threads": args.threads,
            "commands": {part: commands[part] for part in results if part in commands},
            "seconds": round(time.perf_counter() - start, 1)}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tuning.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    tmp.rename(out / "tuning.json")
    (out / "tuning.md").write_text(markdown(results, meta))
    print(markdown(results, meta))
    return 0


# ------------------------------------------------------------------------------------------ cuda and runners parts


CUDA_SOURCE = "cuda:sm_80"
CUDA_TARGETS = ("cuda:sm_86", "cuda:sm_90")
CUDA_KERNELS = 6
CUDA_SAMPLES = 8


def _cuda_kernels(model: str, spec, count: int) -> list[tuple[str, object]]:
    """The model's first ``count`` tunable kernels for ``spec``, matmuls first: their schedules stage tiles in
    shared memory, the limit that differs between the archs."""
    from llmcc.tuning import lowered_kernels

    tunable = [(name, func) for name, func, reason, _ in lowered_kernels(model, spec, BUCKETS, DIMS) if reason is None]
    return sorted(tunable, key=lambda row: "matmul" not in row[0])[:count]


def _sm80_samples(func, target, samples: int, seed: int) -> list:
    """Up to ``samples`` distinct traces MetaSchedule's sm_80 search could have measured for ``func``: random
    decisions over its design space (ReplayTrace), each passing sm_80's postprocessors (VerifyGPUCode with its
    limits among them)."""
    from tvm.s_tir import meta_schedule as ms

    from llmcc.tuning.database import workload_module
    from llmcc.tuning.search import trace_text

    ctx = ms.TuneContext(mod=workload_module(func), target=target, space_generator="post-order-apply",
                         search_strategy=ms.search_strategy.ReplayTrace(max_fail_count=64), num_threads=1,
                         rand_state=seed)
    ctx.pre_tuning(max_trials=samples * 2, num_trials_per_iter=samples * 2,
                   design_spaces=ctx.generate_design_space())
    traces: dict[str, object] = {}
    for candidate in ctx.generate_measure_candidates() or []:
        traces.setdefault(trace_text(candidate.sch.trace), candidate.sch.trace)
    ctx.post_tuning()
    return list(traces.values())[:samples]


def _fresh_copy(func):
    """A deep copy of ``func`` for MetaSchedule's sampling and for each record's workload: both schedule what they
    are given, and the kernel the replays start from must stay unscheduled."""
    import tvm

    return tvm.ir.load_json(tvm.ir.save_json(func))


def _drop_class(reason: str) -> str:
    """A drop reason without what differs between kernels and archs (kernel name, arch, ptxas's byte count)."""
    import re

    reason = re.sub(r" for cuda:sm_\d+|nvcc failed on kernel \w+ for sm_\d+: |Entry function '\w+' ", "", reason)
    return re.sub(r"\(0x[0-9a-f]+ bytes, 0x([0-9a-f]+) max\)", lambda m: f"(over {int(m.group(1), 16) // 1024} KiB)",
                  reason)


def bench_cuda(model: str) -> dict:
    """Schedules of ``model``'s kernels sampled from sm_80's search space, as sm_80 records, replayed for sm_86
    and sm_90 the way compile transfers a record (llmcc.tuning.transfer: replay, fit the limits, build with nvcc):
    how many each target keeps, and why the others are dropped. The same checks for sm_80 itself
    (``source_check``) tell a record that no GPU could run from one that does not transfer."""
    from tvm.s_tir import meta_schedule as ms

    from llmcc.targets import resolve
    from llmcc.tuning.database import workload_module
    from llmcc.tuning.search import tuning_target
    from llmcc.tuning.transfer import tensor_intrinsics_only, transfer_record

    start = time.perf_counter()
    source = resolve(CUDA_SOURCE)
    sm80 = tuning_target(source)
    kernels = _cuda_kernels(model, source, CUDA_KERNELS)
    counts = {name: {"kept": 0, "dropped": 0, "dropped_also_on_source": 0, "reasons": {}}
              for name in (CUDA_SOURCE,) + CUDA_TARGETS}
    unsampled, samples = [], 0
    with tensor_intrinsics_only("cuda"):
        for seed, (name, func) in enumerate(kernels):
            try:
                traces = _sm80_samples(_fresh_copy(func), sm80, CUDA_SAMPLES, seed)
            except Exception as exc:  # noqa: BLE001 - the search space itself fails: reported, not fatal
                traces = []
                print(f"  {name}: no sm_80 sample ({str(exc).strip().splitlines()[-1][:150]})", flush=True)
            if not traces:
                unsampled.append(name)
                continue
            samples += len(traces)
            args_info = ms.arg_info.ArgInfo.from_prim_func(func)
            for trace in traces:
                record = ms.database.TuningRecord(trace, ms.database.Workload(workload_module(_fresh_copy(func))),
                                                  [1e-5], sm80, args_info)
                source_fails = False
                for target_name, row in counts.items():
                    reason = transfer_record(func, record, resolve(target_name).tvm_target())[1]
                    if reason is None:
                        row["kept"] += 1
                        continue
                    source_fails = source_fails or target_name == CUDA_SOURCE
                    row["dropped"] += 1
                    row["dropped_also_on_source"] += int(source_fails)
                    reason = _drop_class(reason)
                    row["reasons"][reason] = row["reasons"].get(reason, 0) + 1
            print(f"  {name}: {len(traces)} sm_80 samples; " + ", ".join(
                f"{t} kept {c['kept']} dropped {c['dropped']}" for t, c in counts.items()), flush=True)
    for row in counts.values():
        row["fraction_dropped"] = row["dropped"] / max(row["kept"] + row["dropped"], 1)
    source_check = counts.pop(CUDA_SOURCE)
    del source_check["dropped_also_on_source"]
    return {"model": model, "source": CUDA_SOURCE, "kernels": len(kernels), "samples": samples,
            "unsampled_kernels": unsampled,
            "note": "schedules sampled from sm_80's search space (not measured: no GPU here)",
            "source_check": source_check, "targets": counts, "seconds": round(time.perf_counter() - start, 1)}


def cuda_markdown(result: dict) -> list[str]:
    lines = [f"## CUDA transfer: {result['model']}'s {result['source']} schedules replayed for newer archs", "",
             (f"{result['samples']} schedules of {result['kernels']} kernels; {result['note']}. Each is replayed, "
              f"checked against the target's limits and built with nvcc, as compile transfers a record; the first "
              f"row is the same check for {result['source']} itself ({result['seconds']:.0f} s).")]
    if result["unsampled_kernels"]:
        lines.append(f"No valid sm_80 schedule sampled for: {', '.join(result['unsampled_kernels'])}.")
    lines += ["", "| target | kept | dropped | fraction dropped | of those, dropped on the source too | reasons |",
              "|---|---|---|---|---|---|"]
    rows = {f"{result['source']} (itself)": dict(result["source_check"], dropped_also_on_source="-"),
            **result["targets"]}
    for name, t in rows.items():
        reasons = "; ".join(f"{reason} ({n})" for reason, n in t["reasons"].items()) or "none"
        lines.append(f"| {name} | {t['kept']} | {t['dropped']} | {t['fraction_dropped']:.0%} | "
                     f"{t['dropped_also_on_source']} | {reasons} |")
    lines.append("")
    return lines


RUNNER_KEY = "llmcc-bench"
RUNNER_TRIALS = 32
RUNNER_MODEL = "x[64, 256] @ W[256, 256] + b -> relu"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _matmul_onnx(path: Path) -> Path:
    """RUNNER_MODEL as ONNX: one static kernel, every candidate of which a CPU RPC server can run."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(256).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["yb"]),
             helper.make_node("Relu", ["yb"], ["out"])]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [64, 256])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _start_rpc(command: list[str]):
    """A TVM RPC process (tvm.exec.*) in its own process group: a server's forked worker outlives a plain kill."""
    import subprocess

    return subprocess.Popen([sys.executable, "-m", *command, "--host", "127.0.0.1", "--silent"],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)


def _wait_for_servers(port: int, count: int, timeout: float = 120) -> None:
    import contextlib

    from tvm import rpc

    deadline = time.time() + timeout
    while True:
        with contextlib.suppress(Exception):  # the tracker or the servers not up yet
            if rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"][RUNNER_KEY]["free"] == count:
                return
        if time.time() > deadline:
            raise SystemExit(f"runners part: {count} RPC servers did not register in {timeout:.0f} s")
        time.sleep(0.5)


def bench_runners() -> dict:
    """RUNNER_TRIALS trials of RUNNER_MODEL tuned through a loopback TVM RPC tracker with one CPU server under
    RUNNER_KEY, then again (a fresh database) with a second server registered: trials per second each way."""
    import contextlib
    import signal

    from llmcc.tuning import tune

    work = Path(tempfile.mkdtemp(prefix="llmcc-bench-runners-"))
    port = _free_port()
    procs = [_start_rpc(["tvm.exec.rpc_tracker", "--port", str(port), "--port-end", str(port + 1)])]
    runs = {}
    try:
        model = _matmul_onnx(work / "mm.onnx")
        for name, servers in (("one_runner", 1), ("two_runners", 2)):
            while len(procs) - 1 < servers:
                server_port = _free_port()
                procs.append(_start_rpc(["tvm.exec.rpc_server", "--port", str(server_port), "--port-end",
                                         str(server_port + 20), "--tracker", f"127.0.0.1:{port}", "--key",
                                         RUNNER_KEY]))
            _wait_for_servers(port, servers)
            print(f"  tune through the tracker, {servers} runner(s): {RUNNER_TRIALS} trials", flush=True)
            start = time.perf_counter()
            summary = tune(model, "cpu", work / name, RUNNER_TRIALS, trials_per_iter=16, max_workers=2,
                           population=64, seed=0, rpc_tracker=f"127.0.0.1:{port}", rpc_key=RUNNER_KEY)
            seconds = time.perf_counter() - start
            runs[name] = {"trials": summary["trials_run"], "seconds": round(seconds, 1),
                          "tune_seconds": summary["seconds"], "trials_per_s": summary["trials_run"] / seconds,
                          "runner": summary["runner"]}
            print(f"  {servers} runner(s): {summary['trials_run']} trials in {seconds:.1f} s "
                  f"({runs[name]['trials_per_s']:.2f} trials/s)", flush=True)
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    cores = os.cpu_count()
    return {"model": RUNNER_MODEL, "trials": RUNNER_TRIALS, **runs,
            "speedup": runs["two_runners"]["trials_per_s"] / runs["one_runner"]["trials_per_s"], "cores": cores,
            "note": f"On this {cores}-core machine the search, the builders (2 workers) and both runners share the "
                    f"same {cores} cores (each runner's kernels on TVM_NUM_THREADS threads), so a second runner adds "
                    f"no compute and cannot double throughput here; and a second runner on its own machine splits "
                    f"only the measuring, while building and the search stay on the tuning machine"}


def runners_markdown(result: dict) -> list[str]:
    lines = ["## Tuning throughput through an RPC tracker: one runner vs two", "",
             f"{result['model']}, {result['trials']} trials, CPU RPC servers on loopback. {result['note']}.", "",
             "| runners | trials | seconds (wall) | trials/s |", "|---|---|---|---|"]
    for name, label in (("one_runner", "1"), ("two_runners", "2")):
        r = result[name]
        lines.append(f"| {label} | {r['trials']} | {r['seconds']:.1f} | {r['trials_per_s']:.2f} |")
    lines += ["", f"Two runners: {result['speedup']:.2f}x the trials per second of one ({result['cores']} cores).",
              ""]
    return lines


if __name__ == "__main__":
    sys.exit(main())
