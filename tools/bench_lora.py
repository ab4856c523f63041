#!/usr/bin/env python3
"""Benchmark: what a LoRA adapter costs at run time once llmcc has merged it (it should cost nothing).

Compiles one zoo model for `cpu` three ways and times them on the same inputs: the base model alone; the base ONNX
with a PEFT adapter merged by ``--lora``; and the PEFT model exported with its LoRA branches still in the graph
(folded by the fold_lora_branches pass). The adapter has random, non-zero A and B on every Linear. Timings alternate
between the three for a few rounds and keep each variant's fastest round (its median): on a shared machine other
load only ever adds time, and alternating spreads it over all three. Kernel and weight counts show the compiled
code is the same.
Errors are relative (Frobenius) vs the PEFT model in torch eager fp32. Writes bench/lora.json and bench/lora.md.

    python tools/bench_lora.py                  # llama, batch 1 x 128, r=16 on every Linear
    python tools/bench_lora.py --model mistral --rank 64 --seq 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROOT, _cpu_name, _median_ms  # tools/ is not a package: imported by path

LINEARS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "gpt2": ["c_attn", "c_proj", "c_fc"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama", help="zoo model (llama family or gpt2)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=30, help="runs per round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench"), help="folder for lora.json and lora.md")
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch
    from peft import LoraConfig, get_peft_model

    import llmcc
    from llmcc import zoo
    from llmcc.verify import relative_error

    torch.set_num_threads(args.threads)
    entry = zoo.get(args.model)
    targets = LINEARS["gpt2" if entry.family == "gpt2" else "llama"]
    path = zoo.onnx_path(args.model)
    module = zoo.torch_module(args.model)
    torch.manual_seed(0)
    peft_model = get_peft_model(module.hf, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets,
                                                      fan_in_fan_out=entry.family == "gpt2",
                                                      init_lora_weights=False))
    feed = zoo.sample_inputs(args.model, args.seq, seed=0)
    inputs = [torch.from_numpy(feed[n]) for n in entry.input_names]
    with torch.no_grad():
        ref = [t.numpy() for t in module(*inputs)]  # module.hf now runs the adapter

    with tempfile.TemporaryDirectory() as adapter:
        peft_model.save_pretrained(adapter)
        print("compile: base", flush=True)
        variants = {"base model alone": llmcc.compile(path, target="cpu")}
        print("compile: adapter merged (--lora)", flush=True)
        variants["adapter merged (--lora)"] = llmcc.compile(path, target="cpu", lora=[adapter])
    print("compile: exported with LoRA branches", flush=True)
    example = tuple(torch.from_numpy(v) for v in zoo.sample_inputs(args.model, 17, batch=2, seed=0).values())
    variants["branches in the graph (folded)"] = llmcc.compile(module, example_inputs=example, target="cpu")

    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, compiled in variants.items():
            rounds[name].append(_median_ms(lambda c=compiled: c.run(**feed), args.repeat)[0])
    rows = []
    for name, compiled in variants.items():
        outs = compiled.run(**feed)
        rows.append({
            "variant": name, "ms": min(rounds[name]), "round_ms": rounds[name],
            "kernels": len(compiled.report["kernels"]),
            "err_vs_peft": max(relative_error(outs[s.name], r) for s, r in zip(compiled.outputs, ref)),
            "weights": len(compiled.manifest["weights"]["tensors"]),
            "folded_branches": {p["name"]: p["rewrites"] for p in compiled.report["passes"]}["fold_lora_branches"],
            "merged_weights": sum(a["merged_weights"] for a in compiled.report["lora"]["adapters"]),
        })
    base_ms = rows[0]["ms"]
    meta = {"machine": f"{_cpu_name()} ({os.cpu_count()} cores)", "threads": args.threads, "model": args.model,
            "batch_x_seq": f"1 x {args.seq}", "rank": args.rank, "targets": targets, "repeat": args.repeat,
            "rounds": args.rounds, "command": "python tools/bench_lora.py " + " ".join(
                argv if argv is not None else sys.argv[1:])}
    table = ("| variant | ms | vs base | kernels | weight tensors | merged weights | folded branches | err vs PEFT |\n"
             "|---|---|---|---|---|---|---|---|\n" + "".join(
                 f"| {r['variant']} | {r['ms']:.2f} | {r['ms'] / base_ms:.2f}x | {r['kernels']} | {r['weights']} | "
                 f"{r['merged_weights']} | {r['folded_branches']} | "
                 f"{'-' if r['variant'] == 'base model alone' else format(r['err_vs_peft'], '.1e')} |\n"
                 for r in rows))
    note = (f"\n{meta['model']} {meta['batch_x_seq']}, LoRA r={args.rank} on {', '.join(targets)}; {meta['machine']}; "
            f"{args.threads} threads; fastest of {args.rounds} alternating rounds, each the median of up to "
            f"{args.repeat} runs after warm-up; errors vs the PEFT model in torch fp32. "
            f"Command: `{meta['command'].strip()}`\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "lora.md").write_text(table + note)
    print(table + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
