#!/usr/bin/env python3
"""Profile a compiled model: time per kernel and per VM builtin, summed over runs (the VM's instrument hook).

    python tools/profile_kernels.py gpt2                      # a zoo model, batch 1 x 128, cpu
    python tools/profile_kernels.py minilm --seq 128 --batch 8 --top 20
    python tools/profile_kernels.py model.onnx --dims batch=1,sequence=64
    python tools/profile_kernels.py minilm --seq 128 --batch 8 --quant w8a8    # every layer quantized

Prints the plain time of one run, the instrumented sum (the hook adds a little per call) and the slowest entries
with their calls per run. It reports; nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="zoo model name or ONNX file")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dims", help="for an ONNX file: symbolic dim sizes, e.g. batch=1,sequence=64")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-fuse-attention", action="store_true")
    parser.add_argument("--quant", default="none", help="quantization scheme, every layer (max_error 1.0)")
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import llmcc
    from llmcc import zoo
    from llmcc.cli import _load_inputs

    options = dict(verify=False, fuse_attention=not args.no_fuse_attention, quant=args.quant,
                   max_error=None if args.quant == "none" else 1.0)
    if Path(args.model).is_file():  # random inputs, as `llmcc run --random --dims ...` makes them
        module = llmcc.compile(args.model, **options)
        feeds = _load_inputs(module, argparse.Namespace(input=None, random=True, dims=args.dims, seed=0))
    else:
        module = llmcc.compile(zoo.onnx_path(args.model), **options)
        feeds = zoo.sample_inputs(args.model, args.seq, batch=args.batch)

    for _ in range(3):
        module.run(**feeds)
    start = time.perf_counter()
    for _ in range(args.runs):
        module.run(**feeds)
    plain = (time.perf_counter() - start) / args.runs

    totals: dict = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    started: dict = {}

    def instrument(func, name, before_run, ret_value, *call_args):
        if before_run:
            started[name] = time.perf_counter()
        else:
            totals[name] += time.perf_counter() - started[name]
            counts[name] += 1
        return 0

    module._ensure_loaded()
    module._vm.set_instrument(instrument)
    for _ in range(args.runs):
        module.run(**feeds)
    total = sum(totals.values()) / args.runs
    calls = sum(counts.values()) // args.runs
    print(f"{args.model}: {plain * 1e3:.2f} ms per run; instrumented sum {total * 1e3:.2f} ms over {calls} calls")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1])[:args.top]:
        ms = seconds / args.runs * 1e3
        print(f"  {ms:8.3f} ms {100 * ms / (total * 1e3):5.1f}%  x{counts[name] // args.runs:<4d} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
