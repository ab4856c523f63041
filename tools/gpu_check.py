#!/usr/bin/env python3
"""The one script to run on a lent GPU: build the zoo for it, check numerics against torch on the device, time
llmcc against torch eager, print a table. Sized for a 15-minute lease: stops starting new models after --budget
seconds (default 420) so the whole run ends well under 8 minutes.

    python tools/gpu_check.py                    # on a GPU machine: target = the GPU's arch
    python tools/gpu_check.py --dry-run          # no GPU: same flow on the CPU (what the tests run)
    python tools/gpu_check.py --out DIR          # also write DIR/gpu_check.json and DIR/gpu_check.md
    python tools/gpu_check.py --attention        # also check the CUDA flash-attention kernel on its own
                                                 # (tools/gpu_check_attention.py; --dry-run: in the CPU emulator)
    python tools/gpu_check.py --quant            # also compile, verify and time every quantization scheme
                                                 # (tools/gpu_check_quant.py; --dry-run: on the CPU)

"llmcc ms" times a call from Python with torch tensors on the device, as torch's time is taken; "device ms" the
compiled code alone (CompiledModule.device_ms).

Numbers it prints are only as good as the machine it ran on: record the command and the machine with them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

TOLERANCE = 1e-4  # fp32 on GPU: TF32 is off in TVM's kernels, but reduction order differs from torch


def timed_ms(fn, sync, repeat=20, warmup=3) -> float:
    """Median milliseconds of ``fn()`` followed by ``sync()``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def check_model(name: str, target: str, device: str, seq: int | None) -> dict:
    import numpy as np
    import torch

    import llmcc
    from llmcc import zoo
    from llmcc.verify import relative_error

    entry = zoo.get(name)
    seq = seq if seq is not None and entry.seq_dim is not None else entry.seq_lens[-1]
    t0 = time.perf_counter()
    compiled = llmcc.compile(zoo.onnx_path(name), target=target)
    build_s = time.perf_counter() - t0
    feed = zoo.sample_inputs(name, seq_len=seq, batch=1, seed=0)
    module = zoo.torch_module(name).to(device)
    inputs = [torch.from_numpy(feed[n]).clone().to(device) for n in entry.input_names]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        ref = [t.float().cpu().numpy() for t in module(*inputs)]
    outs = compiled(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    err = max(relative_error(o.float().cpu().numpy(), r) for o, r in zip(outs, ref))

    def run_torch():
        with torch.no_grad():
            module(*inputs)

    return {"model": name, "target": compiled.report["target"], "seq": seq, "build_s": build_s,
            "verify_rel_err": compiled.report["verify"].get("rel_err"),
            "llmcc_ms": timed_ms(lambda: compiled(*inputs), sync), "device_ms": compiled.device_ms(*inputs),
            "torch_ms": timed_ms(run_torch, sync),
            "rel_err_vs_torch": err, "passed": bool(err <= TOLERANCE and np.isfinite(err))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="run the same flow on the CPU")
    parser.add_argument("--models", nargs="*", help="zoo models (default: all; dry run: llama)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds after which no new model, attention spec or scheme starts")
    parser.add_argument("--out", help="folder for gpu_check.json / gpu_check.md")
    parser.add_argument("--attention", action="store_true",
                        help="also check the CUDA flash-attention kernel against its numpy reference")
    parser.add_argument("--quant", action="store_true", help="also check every quantization scheme")
    args = parser.parse_args(argv)

    import torch

    from llmcc import cuda, zoo

    if args.dry_run:
        target, device = "cpu", "cpu"
        models = args.models or ["llama"]
        args.seq = min(args.seq, 32)
    else:
        arch = cuda.gpu_arch()
        if arch is None or not torch.cuda.is_available():
            print(f"gpu_check: no usable GPU here (driver: {cuda.driver_state()}); use --dry-run", file=sys.stderr)
            return 2
        target, device = f"cuda:{arch}", "cuda"
        models = args.models or list(zoo.ZOO)
    print(f"gpu_check: target {target}, torch device {device}, models {models}", flush=True)
    start, rows = time.perf_counter(), []

    def budget_left() -> float:
        return max(0.0, args.budget - (time.perf_counter() - start))

    for name in models:
        if not budget_left():
            rows.append({"model": name, "skipped": f"budget of {args.budget:.0f}s spent"})
            continue
        try:
            rows.append(check_model(name, target, device, args.seq))
        except Exception as exc:  # keep going: one broken model must not hide the others' figures
            traceback.print_exc()  # the log keeps where it failed; the table keeps its last line
            lines = str(exc).strip().splitlines()
            rows.append({"model": name, "error": f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]})
        print(json.dumps(rows[-1]), flush=True)

    table = ["| model | seq | build s | verify rel err (onnxruntime) | llmcc ms | device ms | torch ms "
             "| llmcc / torch | rel err vs torch | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "llmcc_ms" in r:
            verify = "-" if r["verify_rel_err"] is None else f"{r['verify_rel_err']:.1e}"
            table.append(f"| {r['model']} | {r['seq']} | {r['build_s']:.1f} | {verify} | {r['llmcc_ms']:.3f} "
                         f"| {r['device_ms']:.3f} | {r['torch_ms']:.3f} | {r['llmcc_ms'] / r['torch_ms']:.2f}x "
                         f"| {r['rel_err_vs_torch']:.1e} | {r['passed']} |")
        else:
            table.append(f"| {r['model']} | - | - | - | - | - | - | - | {r.get('error') or r.get('skipped')} "
                         "| False |")
    text = "\n".join(table) + f"\n\ntarget {target}; total {time.perf_counter() - start:.0f}s\n"
    attention_rows = []
    if args.attention:
        import gpu_check_attention as gca

        arch = "sm_80" if args.dry_run else target.split(":", 1)[1]
        attention_rows = gca.run_checks(arch, specs=["decode", "dense_f32_d32"] if args.dry_run else None,
                                        sizes=gca.EMULATED_SIZES if args.dry_run else gca.SIZES,
                                        emulate=args.dry_run, budget=budget_left(),
                                        log=lambda line: print(line, flush=True))
        text += "\nCUDA flash attention vs numpy reference" + (" (emulated on the CPU)" if args.dry_run else "") \
            + ":\n\n" + gca.format_table(attention_rows, arch)
    quant_rows = []
    if args.quant:
        import gpu_check_quant as gcq

        quant_rows = gcq.run_checks(target, device, n=512 if args.dry_run else 4096, budget=budget_left(),
                                    log=lambda line: print(line, flush=True))
        text += ("\nQuantized kernels, verified by the compiler on the device:\n\n"
                 + gcq.format_table(quant_rows, target))
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps({"target": target, "rows": rows,
                                                        "attention_rows": attention_rows,
                                                        "quant_rows": quant_rows}, indent=1))
        (out / "gpu_check.md").write_text(text)
    return 0 if all(r.get("passed") for r in rows + attention_rows + quant_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
