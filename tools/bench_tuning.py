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
        counts[entry["provenance"].split(":")[0]] = counts.get(entry["provenance"].split(":")[0], 0) + 1
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
    lines = ["# Tuning benchmark", "", f"Machine: {meta['machine']}, {meta['threads']} threads. "
             f"Command: `{meta['command']}`", ""]
    if "zoo" in results:
        lines += ["## Tuned (tuning/zoo-cpu) vs rule-only, batch 1", "",
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
                  f"{t['kernels']} tunable kernels; full tune {t['full_trials']} trials, 10%: {t['tenth_trials']}.",
                  "", "| database | ms | fraction of the full tune's speed | kernels by provenance |",
                  "|---|---|---|---|"]
        for name, ms in t["ms"].items():
            prov = t["provenance"][name]
            lines.append(f"| {name} | {ms:.2f} | {t['fraction_of_full'][name]:.0%} | "
                         f"{', '.join(f'{k} {v}' for k, v in prov.items())} |")
        lines.append("")
    if "cuda" in results:
        lines += cuda_markdown(results["cuda"])
    if "runners" in results:
        lines += runners_markdown(results["runners"])
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
    previous = out / "tuning.json"
    results = json.loads(previous.read_text())["results"] if previous.exists() else {}
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
    meta = {"machine": f"{_cpu_name()} ({os.cpu_count()} cores)", "threads": args.threads,
            "command": "python tools/bench_tuning.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": round(time.perf_counter() - start, 1)}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tuning.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    tmp.rename(out / "tuning.json")
    (out / "tuning.md").write_text(markdown(results, meta))
    print(markdown(results, meta))
    return 0


# ------------------------------------------------------------------------------------------ cuda and runners parts


def bench_cuda(model: str) -> dict:
    raise NotImplementedError("cuda part: being written")


def cuda_markdown(result: dict) -> list[str]:
    raise NotImplementedError("cuda part: being written")


def bench_runners() -> dict:
    raise NotImplementedError("runners part: being written")


def runners_markdown(result: dict) -> list[str]:
    raise NotImplementedError("runners part: being written")


if __name__ == "__main__":
    sys.exit(main())
