#!/usr/bin/env python3
"""Tune a model's kernels with MetaSchedule (XGBoost cost model) into a llmcc tuning database.

    python tools/tune.py MODEL.onnx --target cpu --trials 64 --db tuning/
    python tools/tune.py llama --target cpu --trials 200 --db tuning/ --compare   # a zoo model; time rule vs tuned

Runs llmcc's pipeline up to its lower phase (as `llmcc compile` does), tunes the static-shape kernels on this
machine (local builder and runner, --workers builder processes; each search starts from llmcc's rule schedule), and
appends the measured records, each with its target, to DIR (created if missing); a kernel whose best candidate is
not faster than the rule schedule keeps no record (--keep-slower keeps them). Kernels with a symbolic dimension
are listed as skipped. Then
`llmcc compile MODEL --target cpu --tuning-db DIR` uses the records whose target matches (llmcc.tuning.target_key).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from llmcc.errors import LlmccError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="an ONNX file or a zoo model name")
    p.add_argument("--target", default="cpu", help="llmcc target (only cpu can be measured here)")
    p.add_argument("--trials", type=int, default=64, help="MetaSchedule trials over all kernels (default 64)")
    p.add_argument("--db", required=True, metavar="DIR", help="tuning database folder (created if missing)")
    p.add_argument("--workers", type=int, default=1, help="builder processes (default 1)")
    p.add_argument("--num-cores", type=int, default=None, help="threads the tuned kernels assume (default: all)")
    p.add_argument("--kernel", action="append", help="tune only this kernel (repeatable)")
    p.add_argument("--population", type=int, default=512,
                   help="evolutionary search population per round (default 512; 32 for a quick smoke run)")
    p.add_argument("--keep-slower", action="store_true",
                   help="keep a kernel's records even when llmcc's rule schedule measured faster")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compare", action="store_true", help="time each tuned kernel's rule and tuned schedules")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    args = p.parse_args(argv)
    try:
        from llmcc.tuning import tune

        summary = tune(args.model, args.target, args.db, args.trials, max_workers=args.workers,
                       num_cores=args.num_cores, seed=args.seed, compare=args.compare, kernels=args.kernel,
                       population=args.population, keep_slower=args.keep_slower)
    except LlmccError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"tuned for {summary['target']} ({summary['target_key']}) in {summary['seconds']} s, "
          f"{summary['records_added']} records added to {summary['db']}")
    for k in summary["kernels"]:
        if not k["tuned"]:
            print(f"  {k['kernel']}: skipped, {k['reason']}")
            continue
        line = f"  {k['kernel']}: best {k['best_us']} us (rule schedule measured {k.get('rule_measured_us')} us)"
        if "rule_us" in k:
            speedup = (k["rule_us"] / k["tuned_us"]) if k.get("rule_us") and k.get("tuned_us") else None
            line += f"; rule schedule {k['rule_us']} us, tuned {k['tuned_us']} us"
            line += f" ({speedup:.2f}x)" if speedup else ""
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
