#!/usr/bin/env python3
"""Generate the shipped tuning database of the zoo for this machine's CPU (tuning/zoo-cpu/).

For every zoo model: ``llmcc tune`` at the benchmark's shapes (batch 1; the symbolic sequence length tuned as the
bucket 128, which tools/bench.py runs), a fixed number of search trials per kernel after the rule's own schedule.
The shipped folder keeps, per kernel, the fastest record and the rule's own record (compile compares the two to
decide where padding a shorter sequence up to the bucket still pays), compacted into one MetaSchedule JSON pair,
with summary.json saying what was tuned (per model: its kernels, the trials measured for them in all, those run
by this invocation and how long they took; re-running with the same --work resumes) and the command.

    python tools/tune_zoo.py                                    # every zoo model -> tuning/zoo-cpu/
    python tools/tune_zoo.py --models llama minilm --trials-per-kernel 8 --out /tmp/zoo-db
    python tools/tune_zoo.py --work /tmp/zoo-work               # keep the full database; re-running resumes

Then ``llmcc compile MODEL --target cpu --tuning-db tuning/zoo-cpu`` (tools/bench_tuning.py times it against the
rules). Records carry over to any CPU whose vector features include this one's (llmcc.tuning.keys).
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

BUCKETS = (128,)
DIMS = {"batch": 1}


def shipped_records(db, spec) -> list:
    """Per kernel of ``db`` measured on ``spec``'s key: the fastest record and the rule schedule's own record."""
    from llmcc.tuning import run_secs, target_key, workload_hash
    from llmcc.tuning.search import rule_trace, trace_text

    key = target_key(spec.tvm_target())
    by_workload: dict = {}
    for rec in db.records():
        if target_key(rec.target) == key and run_secs(rec) is not None:
            by_workload.setdefault(workload_hash(rec.workload.mod), []).append(rec)
    kept = []
    for recs in by_workload.values():
        recs.sort(key=run_secs)
        rule = rule_trace(recs[0].workload.mod["main"], spec)
        text = trace_text(rule) if rule is not None else None
        kept.append(recs[0])
        kept += [r for r in recs[1:] if text is not None and trace_text(r.trace) == text][:1]
    return kept


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="zoo models (default: all)")
    parser.add_argument("--trials-per-kernel", type=int, default=16, help="search trials per kernel (default 16)")
    parser.add_argument("--population", type=int, default=128, help="evolutionary search population (default 128)")
    parser.add_argument("--out", default=str(ROOT / "tuning" / "zoo-cpu"), help="the shipped database folder")
    parser.add_argument("--work", default=None, help="the full database (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from llmcc import zoo
    from llmcc.targets import resolve
    from llmcc.tuning import TuningDatabase, lowered_kernels, merge_databases, tune

    spec = resolve("cpu")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="llmcc-zoo-tune-"))
    models = args.models or list(zoo.ZOO)
    rows = []
    start = time.perf_counter()
    for name in models:
        tunable = sum(1 for _, _, reason, _ in lowered_kernels(name, spec, BUCKETS, DIMS) if reason is None)
        if not tunable:
            rows.append({"model": name, "kernels": 0, "trials": 0})
            continue
        print(f"tune {name}: {tunable} kernels x ({args.trials_per_kernel} trials + the rule's)", flush=True)
        summary = tune(name, "cpu", work, tunable * (args.trials_per_kernel + 1), population=args.population,
                       seed=args.seed, buckets=BUCKETS, dims=DIMS,
                       progress=lambda line: print("  " + line, flush=True))
        faster = [k for k in summary["kernels"] if k.get("best_us") and k.get("rule_measured_us")
                  and k["best_us"] < k["rule_measured_us"]]
        rows.append({"model": name, "kernels": tunable, "trials": summary["trials_before"] + summary["trials_run"],
                     "trials_run_now": summary["trials_run"], "seconds_now": summary["seconds"],
                     "faster_than_rule": len(faster),
                     "without_record": [k["kernel"] for k in summary["kernels"] if k["tuned"] is False
                                        and k["reason"] == "no candidate built and ran"]})
        print(f"  {name}: {summary['trials_run']} trials in {summary['seconds']} s; {len(faster)} of {tunable} "
              f"kernels beat the rule's schedule", flush=True)

    out = Path(args.out)
    staging = Path(tempfile.mkdtemp(prefix=".zoo-db-", dir=out.parent if out.parent.exists() else None))
    try:
        kept = shipped_records(TuningDatabase(work), spec)
        TuningDatabase(staging / "records", create=True).add(kept)
        merge_databases([staging / "records"], staging / "db")
        meta = {"command": "python tools/tune_zoo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "target": spec.name, "buckets": list(BUCKETS), "dims": DIMS,
                "trials_per_kernel": args.trials_per_kernel, "population": args.population,
                "records": len(kept), "seconds": round(time.perf_counter() - start, 1), "models": rows,
                "cpu_cores": os.cpu_count()}
        (staging / "db" / "summary.json").write_text(json.dumps(meta, indent=1) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        (staging / "db").rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}: {len(kept)} records ({', '.join(r['model'] for r in rows)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
