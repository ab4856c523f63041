"""The ``llmcc`` command: a thin layer over the Python API.

    llmcc compile model.onnx --target cuda --quant none -o model.llmcc
    llmcc run model.llmcc --random | --input input_ids=ids.npy
    llmcc inspect model.llmcc [--json]
    llmcc tune model.onnx --target cpu --db tuning/ --trials 200 [--rpc-tracker HOST:9190 --rpc-key a100]
    llmcc db list tuning/ ; llmcc db merge a/ b/ -o c/ ; llmcc db prune tuning/ --target cuda:sm_75
    llmcc demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def _targets() -> list[str]:
    from llmcc.targets import TARGETS

    return list(TARGETS)


def _quant_schemes() -> list[str]:
    from llmcc.quant import SCHEMES

    return list(SCHEMES)


def _parse_dims(text: str | None) -> dict[str, int]:
    from llmcc.errors import LlmccError

    dims = {}
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        if not value.isdigit():
            raise LlmccError(f"--dims: '{item}' is not NAME=INT")
        dims[name.strip()] = int(value)
    return dims


def cmd_compile(args) -> int:
    import llmcc
    from llmcc.errors import LlmccError

    src = Path(args.model)
    out = Path(args.output) if args.output else src.with_suffix(".llmcc")
    if out.resolve() == src.resolve():
        raise LlmccError(f"-o {out}: that is the input model; choose another output path")
    if args.calib and not Path(args.calib).is_file():
        raise LlmccError(f"--calib {args.calib}: no such file")
    module = llmcc.compile(src, target=args.target, quant=args.quant, max_error=args.max_error, calib=args.calib,
                           quantize_head=not args.keep_head, quantize_embeddings=not args.keep_embeddings,
                           lora=args.lora, verify=not args.no_verify, seed=args.seed,
                           fuse_attention=not args.no_fuse_attention, debug=args.debug, tuning_db=args.tuning_db)
    module.save(out)
    _print_summary(module.report, out)
    return 0


def _verdict(v: dict) -> str:
    if v.get("passed") is None:
        return f"not verified: {v.get('reason')}"
    return (f"{'PASSED' if v['passed'] else 'FAILED'} vs {v['reference']}: rel err {v['rel_err']:.2e}, "
            f"max abs {v['max_abs_err']:.2e}, input sizes {v.get('cases')}")


def _print_summary(report: dict, path) -> None:
    verdict = _verdict(report["verify"])
    fired = [f"{p['name']}={p['rewrites']}" for p in report["passes"] if p["rewrites"]]
    print(f"wrote {path}  target={report['target']}  verify: {verdict}")
    print(f"passes that rewrote: {', '.join(fired) or 'none'}")
    print("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report["timings"].items()))
    if report.get("quant", {}).get("scheme", "none") != "none":
        print(_quant_summary(report["quant"]))
    for line in _lora_lines(report):
        print(f"LoRA: {line}")
    for line in attention_lines(report):
        print(f"attention: {line}")
    if report.get("kernels"):
        print(f"schedules: {schedule_line(report)}")
    if any(e["provenance"] != "rule" or e.get("dropped") for e in report.get("tuning", [])):
        for line in tuning_lines(report):
            print(f"tuning: {line}")
    if "cuda_binary" in report:
        cb = report["cuda_binary"]
        print(f"CUDA binary: SASS {cb.get('sass_archs')}, PTX {cb.get('ptx_archs')}")


def schedule_line(report: dict) -> str:
    """Kernels per schedule rule, most first (the tiles a sized CUDA rule chose are in --json)."""
    counts: dict = {}
    for kernel in report.get("kernels", []):
        counts[kernel["rule"]] = counts.get(kernel["rule"], 0) + 1
    return ", ".join(f"{rule} {n}" for rule, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def attention_lines(report: dict) -> list[str]:
    """One line per kind: how many sites were fused into which kernel, and why the others were not."""
    by_kind: dict = {}
    for site in report.get("attention", []):
        by_kind.setdefault(site["kind"], []).append(site)
    lines = []
    for kind, sites in by_kind.items():
        fused = [s for s in sites if s["fused"]]
        line = f"{kind}: {len(fused)} of {len(sites)} sites fused"
        if fused:
            line += f" ({fused[0]['kernel']})"
        reasons = sorted({s["reason"] for s in sites if not s["fused"]})
        if reasons:
            line += "; not fused: " + "; ".join(reasons)
        lines.append(line)
    return lines


def _lora_lines(report: dict) -> list[str]:
    return [f"{a['path']} (scale {a['scale']:g}): {a['merged_weights']} weights merged"
            for a in report.get("lora", {}).get("adapters", [])]


def _quant_summary(q: dict) -> str:
    kept = [f"{layer['name']}={layer['scheme']}" for layer in q["layers"] if layer["scheme"] != q["scheme"]]
    error = (f"error {q['error']:.3g} (measured)" if q.get("error") is not None
             else f"error {q['estimated_error']:.3g} (estimated with onnxruntime, not measured on the module)")
    wb = q["weight_bytes"]
    return (f"quant {q['scheme']}: {error} <= --max-error {q['max_error']:g}; matmul weights {wb['stored']} of "
            f"{wb['float32']} float32 bytes ({wb['ratio']}); "
            f"kept at higher precision: {', '.join(kept) or 'none'}")


def _load_inputs(module, args) -> dict:
    import numpy as np

    from llmcc.errors import LlmccError
    from llmcc.inputs import dim_settings, random_inputs

    feed = {}
    for item in args.input or []:
        name, _, file = item.partition("=")
        if not file:
            raise LlmccError(f"--input '{item}': expected NAME=FILE.npy")
        try:
            feed[name] = np.load(file)
        except (OSError, ValueError) as exc:
            raise LlmccError(f"--input {name}={file}: cannot read ({exc})") from None
    if args.random or not feed:
        dims = dim_settings(module.inputs, 1)[0]
        dims.update({k: 16 for k in dims if "batch" not in k.lower()})
        dims.update(_parse_dims(args.dims))
        for spec in module.inputs:  # sizes of the given inputs bind their symbolic dims
            if spec.name in feed and feed[spec.name].ndim == len(spec.shape):
                dims.update({d: n for d, n in zip(spec.shape, feed[spec.name].shape) if isinstance(d, str)})
        rnd = random_inputs(module.inputs, dims, np.random.default_rng(args.seed), module.manifest.get("index_bounds"))
        feed = {**rnd, **feed}
    return feed


def cmd_run(args) -> int:
    import numpy as np

    import llmcc

    module = llmcc.load(args.artifact)
    feed = _load_inputs(module, args)
    outs = module.run(**feed)  # first call: loads weights, warms up
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        outs = module.run(**feed)
        times.append(time.perf_counter() - start)
    for name, value in feed.items():
        print(f"input  {name}: {value.dtype} {list(value.shape)}")
    for name, value in outs.items():
        print(f"output {name}: {value.dtype} {list(value.shape)}  mean {float(np.mean(value)):.4g}")
    print(f"latency: median {1e3 * float(np.median(times)):.3f} ms over {len(times)} runs")
    if args.save_outputs:
        np.savez(args.save_outputs, **outs)
        print(f"wrote {args.save_outputs}")
    return 0


def cmd_inspect(args) -> int:
    from llmcc import artifact

    manifest = artifact.read_manifest(args.artifact)
    report = manifest["report"]
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"artifact  {args.artifact}  (llmcc {manifest['versions']['llmcc']}, TVM {manifest['versions']['tvm']})")
    print(f"target    {report['target']}")
    for kind in ("inputs", "outputs"):
        for spec in report[kind]:
            print(f"{kind[:-1]:<9} {spec['name']}: {spec['dtype']}{spec['shape']}")
    print(f"library   {manifest['library']['file']} {manifest['library']['bytes']} bytes "
          f"sha256 {manifest['library']['sha256'][:16]}...")
    print(f"weights   {len(manifest['weights']['tensors'])} tensors, {manifest['weights']['bytes']} bytes")
    print("passes    " + ", ".join(f"{p['name']}({p['rewrites']})" for p in report["passes"]))
    print(f"verify    {_verdict(report['verify'])}")
    if report.get("quant", {}).get("scheme", "none") != "none":
        print(_quant_summary(report["quant"]))
    for line in _lora_lines(report):
        print(f"lora      {line}")
    for line in attention_lines(report):
        print(f"attention {line}")
    if report.get("kernels"):
        print(f"schedules {schedule_line(report)}")
    for line in tuning_lines(report):
        print(f"tuning    {line}")
    if "cuda_binary" in report:
        print(f"cuda      {report['cuda_binary']}")
    return 0


def tuning_lines(report: dict) -> list[str]:
    """Where the kernels' schedules came from: a count per provenance, then one line per non-rule kernel, per
    length bucket a kernel dispatches to, and per kernel with records dropped."""
    entries = report.get("tuning", [])
    if not entries:
        return []
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["provenance"]] = counts.get(e["provenance"], 0) + 1
    lines = [", ".join(f"{n} {p}" for p, n in counts.items())]
    for e in entries:
        if e["provenance"] != "rule":
            lines.append(f"{e['kernel']}: {e['provenance']} ({e['source_time_us']} us measured there)")
        for bucket in e.get("buckets", []):
            exact = ", ".join(f"{k} = {v}" for k, v in bucket["sizes"].items())
            line = f"{e['kernel']}: {bucket['kernel']} at {exact}"
            if bucket["min_elements"] < math.prod(bucket["sizes"].values()):
                line += (f", and padded up from {', '.join(f'{k} <= {v}' for k, v in bucket['sizes'].items())} "
                         f"with at least {bucket['min_elements']} elements")
            lines.append(line + "; the rule's schedule otherwise")
        if e.get("dropped"):
            lines.append(f"{e['kernel']}: {e['provenance']}; records dropped: {'; '.join(e['dropped'])}")
    return lines


def cmd_tune(args) -> int:
    from llmcc.tuning import tune

    from llmcc.errors import LlmccError
    from llmcc.tuning.buckets import DEFAULT_BUCKETS, DEFAULT_DIMS

    buckets = DEFAULT_BUCKETS
    if args.buckets is not None:
        items = [b.strip() for b in args.buckets.split(",") if b.strip()]
        if not items or not all(b.isdigit() and int(b) > 0 for b in items):
            raise LlmccError(f"--buckets {args.buckets}: expected positive lengths, e.g. 32,128,512")
        buckets = tuple(int(b) for b in items)
    dims = _parse_dims(args.dims) if args.dims is not None else DEFAULT_DIMS
    try:
        summary = tune(args.model, args.target, args.db, args.trials, max_workers=args.workers,
                       num_cores=args.num_cores, seed=args.seed, compare=args.compare, kernels=args.kernel,
                       population=args.population, transfer_from=args.transfer_from, rpc_tracker=args.rpc_tracker,
                       rpc_key=args.rpc_key, progress=lambda line: print(line, file=sys.stderr, flush=True),
                       buckets=buckets, dims=dims, trials_per_iter=args.trials_per_round)
    except KeyboardInterrupt:
        print(f"llmcc: interrupted; every record measured so far is in {args.db}: run the same command again to "
              f"resume", file=sys.stderr)
        return 130
    print(f"tuned for {summary['target']} ({summary['target_key']}, {summary['runner']}) in {summary['seconds']} s: "
          f"{summary['trials_run']} trials run, {summary['trials_before']} were in {summary['db']} already")
    for k in summary["kernels"]:
        if not k["tuned"]:
            print(f"  {k['kernel']}: skipped, {k['reason']}")
            continue
        line = f"  {k['kernel']}: best {k['best_us']} us (rule schedule measured {k.get('rule_measured_us')} us)"
        if k.get("seeded_from"):
            line += f"; seeded from {', '.join(sorted(set(k['seeded_from'])))}"
        if "rule_us" in k:
            speedup = (k["rule_us"] / k["tuned_us"]) if k.get("rule_us") and k.get("tuned_us") else None
            line += f"; rule schedule {k['rule_us']} us, tuned {k['tuned_us']} us"
            line += f" ({speedup:.2f}x)" if speedup else ""
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


def cmd_db(args) -> int:
    from llmcc import tuning

    if args.db_command == "list":
        result = tuning.list_database(args.db)
        if args.json:
            print(json.dumps(result, indent=1))
            return 0
        print(f"{result['db']}: {result['records']} records ({result['shards']} writer shards not yet merged)")
        for name, row in result["targets"].items():
            print(f"  {name:<32} {row['records']:>6} records  {row['kernels']:>4} kernels  {row['failed']:>5} failed")
    elif args.db_command == "merge":
        result = tuning.merge_databases(args.sources, args.output)
        print(f"wrote {result['db']}: {result['records']} records")
    else:
        keys = [tuning.parse_target(t) for t in args.target or []]
        result = tuning.prune_database(args.db, keys, keep_best=args.keep_best)
        print(f"pruned {result['db']}: kept {result['kept']} records, dropped {result['dropped']}")
    return 0


def cmd_demo(args) -> int:
    from llmcc.demo import demo

    return demo(cuda=not args.no_cuda, model=args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmcc", description="Compile LLM inference graphs with Apache TVM.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile an ONNX model into an artifact")
    p.add_argument("model", help="the ONNX file")
    p.add_argument("--target", default="cpu", choices=_targets())
    p.add_argument("--quant", default="none", choices=_quant_schemes(), help="weight quantization scheme")
    p.add_argument("--max-error", type=float, default=None, metavar="E",
                   help="accuracy gate: relative error of the outputs vs float32 (default: the scheme's)")
    p.add_argument("--calib", metavar="FILE.npz", help="calibration inputs for the gate (default: random)")
    p.add_argument("--keep-head", action="store_true", help="keep the output head in float32")
    p.add_argument("--keep-embeddings", action="store_true", help="keep embedding tables in float32")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="PEFT LoRA adapter folder merged into the weights, its update times SCALE (default 1); "
                        "repeat to add several")
    p.add_argument("-o", "--output", help="artifact folder (default: MODEL with suffix .llmcc)")
    p.add_argument("--no-verify", action="store_true", help="skip the check against onnxruntime")
    p.add_argument("--seed", type=int, default=None, help="seed of the verification inputs (default: fresh)")
    p.add_argument("--no-fuse-attention", action="store_true",
                   help="keep attention as the exported ops (the report still lists every site)")
    p.add_argument("--debug", action="store_true", help="check the IR is well formed after every phase")
    p.add_argument("--tuning-db", metavar="DIR", default=None,
                   help="tuning database (llmcc tune): kernels with a record for this target, or a validated one of "
                        "the nearest target of its kind, use its schedule")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run an artifact on given or random inputs")
    p.add_argument("artifact")
    p.add_argument("--input", action="append", metavar="NAME=FILE.npy")
    p.add_argument("--random", action="store_true", help="random inputs for every input not given")
    p.add_argument("--dims", help="sizes of symbolic dims for random inputs, e.g. batch=1,sequence=128")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--save-outputs", metavar="FILE.npz")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="what an artifact holds and what the compiler did")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("tune", help="tune a model's kernels with MetaSchedule into a tuning database")
    p.add_argument("model", help="an ONNX file or a zoo model name")
    p.add_argument("--target", default="cpu", choices=_targets())
    p.add_argument("--db", required=True, metavar="DIR", help="tuning database folder (created if missing)")
    p.add_argument("--trials", type=int, default=64,
                   help="trials over all kernels, counting this target's records already in DIR (default 64)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on the servers of this TVM RPC tracker")
    p.add_argument("--rpc-key", metavar="KEY", help="the key the tracker's servers registered with")
    p.add_argument("--transfer-from", metavar="DIR",
                   help="seed the search with this database's records of the nearest other targets")
    p.add_argument("--buckets", metavar="L1,L2,...",
                   help="sequence lengths a kernel with symbolic sizes is tuned at; compile pads shorter ones up to "
                        "the nearest where that pays (default 128)")
    p.add_argument("--dims", metavar="NAME=V,...",
                   help="the other symbolic sizes' values in every bucket (default batch=1)")
    p.add_argument("--kernel", action="append", help="tune only this kernel (repeatable)")
    p.add_argument("--workers", type=int, default=1, help="builder processes (default 1)")
    p.add_argument("--num-cores", type=int, default=None, help="threads the tuned CPU kernels assume (default: all)")
    p.add_argument("--trials-per-round", type=int, default=32,
                   help="candidates measured per round of the search, for one kernel at a time (default 32)")
    p.add_argument("--population", type=int, default=512,
                   help="evolutionary search population per round (default 512; 32 for a quick smoke run)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compare", action="store_true", help="time each tuned kernel's rule and tuned schedules")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("db", help="list, merge or prune tuning databases")
    db_sub = p.add_subparsers(dest="db_command", required=True)
    q = db_sub.add_parser("list", help="records per target")
    q.add_argument("db", metavar="DIR")
    q.add_argument("--json", action="store_true")
    q = db_sub.add_parser("merge", help="merge databases into one (writer shards compacted)")
    q.add_argument("sources", nargs="+", metavar="DIR")
    q.add_argument("-o", "--output", required=True, metavar="DIR")
    q = db_sub.add_parser("prune", help="drop failed runs, a target's records, or all but the fastest")
    q.add_argument("db", metavar="DIR")
    q.add_argument("--target", action="append",
                   help="drop this target's records (cpu, cuda:sm_75, llvm:MCPU[:+feat,...]); repeatable")
    q.add_argument("--keep-best", type=int, default=None, metavar="N",
                   help="keep only the N fastest records per kernel and target")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("demo", help="compile a built-in model, run it, verify it")
    p.add_argument("--model", default="llama-gqa", help="zoo model to use")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA cross-compile")
    p.set_defaults(func=cmd_demo)
    return parser


def _show_warnings() -> None:
    """llmcc's warnings (a tuning database line skipped...) on stderr, one line each, prefixed like errors."""
    import logging

    class Stderr(logging.Handler):
        def emit(self, record) -> None:  # the current sys.stderr, not the one at setup (main runs in tests too)
            print(f"llmcc: warning: {record.getMessage()}", file=sys.stderr)

    log = logging.getLogger("llmcc")
    if not any(type(h).__name__ == "Stderr" for h in log.handlers):
        log.addHandler(Stderr(logging.WARNING))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _show_warnings()
    from llmcc.errors import LlmccError

    try:
        return args.func(args)
    except LlmccError as exc:
        print(f"llmcc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("llmcc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in llmcc, not the user's input
        if os.environ.get("LLMCC_TRACEBACK"):
            raise
        lines = str(exc).strip().splitlines()
        print(f"llmcc: internal error: {type(exc).__name__}: {lines[-1] if lines else ''} "
              f"(set LLMCC_TRACEBACK=1 for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
