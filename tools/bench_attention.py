#!/usr/bin/env python3
"""Benchmark: fused flash attention vs the exported (unfused) attention ops, on the CPU.

Three parts, written to bench/attention.json and bench/attention.md:

1. Attention block, seq 512 and 2048: q, k, v [1, 4, S, 32] and an additive mask [1, 1, S, S] (an input, as a model
   with an attention_mask computes it), through llmcc's pipeline with and without the fuse_attention pass. Time
   (alternating rounds, fastest median kept) and the peak memory the first call adds (VmHWM after it minus the
   resident size before it, in a fresh process per variant, inputs already allocated).
2. Zoo models end to end (llama, prefill 128 and 512 tokens; llama-decode, past 128): `llmcc.compile` with and
   without attention fusion.
3. Sites per zoo model: how many attention sites each has, how many were fused, and the kinds.
4. Block-sparse layouts at seq 2048: the block with a *constant* BigBird or Longformer block mask (block 64), fused
   (the kernel walks the mask's tiles: kind block_sparse), fused with the same mask as an input (every tile), and
   unfused; with the share of tiles walked.
5. Operation counts per layout (no timing): matmul work of the block-sparse and sliding-window Triton kernels vs
   dense attention at seq 4096 and 16384, and of the CPU kernel (its 32 x 32 tiles) on the same layouts.

    python tools/bench_attention.py                 # all of them
    python tools/bench_attention.py --sweep         # also the CPU kernel's tile sweep (cpu_tiles' choice)
    python tools/bench_attention.py --only layouts,ops   # re-run parts, keeping the others from attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROOT, _cpu_name, _median_ms  # tools/ is not a package: imported by path

HEADS, HEAD_DIM = 4, 32


def _block_module(dtype="float32", const_mask=None):
    """The exported sdpa shape with a symbolic sequence length: scale on q and k^T, mask add, softmax, NaN guard.
    With ``const_mask`` ([1, 1, S, S]) the length is static and the mask a constant, as a model that keeps a
    block-sparse pattern in a buffer exports it."""
    import numpy as np
    import tvm
    from tvm import relax

    seq = tvm.tirx.Var("seq", "int64") if const_mask is None else const_mask.shape[-1]
    bb = relax.BlockBuilder()
    t = relax.TensorType((1, HEADS, seq, HEAD_DIM), dtype)
    q, k, v = (relax.Var(n, t) for n in ("q", "k", "v"))
    if const_mask is None:
        mask = relax.Var("mask", relax.TensorType((1, 1, seq, seq), dtype))
        params = [q, k, v, mask]
    else:
        mask, params = relax.const(const_mask.astype(dtype)), [q, k, v]
    half = relax.const(np.float32(HEAD_DIM ** -0.25).astype(dtype))
    with bb.function("main", params):
        with bb.dataflow():
            qs = bb.emit(relax.op.multiply(q, half))
            kt = bb.emit(relax.op.multiply(bb.emit(relax.op.permute_dims(k, [0, 1, 3, 2])), half))
            s = bb.emit(relax.op.add(bb.emit(relax.op.matmul(qs, kt)), mask))
            p = bb.emit(relax.op.nn.softmax(s, axis=-1))
            p = bb.emit(relax.op.where(relax.op.isnan(p), relax.const(0.0, dtype), p))
            out = bb.emit_output(relax.op.permute_dims(bb.emit(relax.op.matmul(p, v)), [0, 2, 1, 3]))
        bb.emit_func_output(out)
    return bb.get()


def _build_block(fused: bool, const_mask=None):
    import tvm
    from tvm import relax

    from llmcc import pipeline
    from llmcc.targets import resolve

    spec = resolve("cpu")
    result = pipeline.run(_block_module(const_mask=const_mask), spec, pipeline.PipelineOptions(fuse_attention=fused))
    vm = relax.VirtualMachine(tvm.compile(result.mod, target=spec.tvm_target(), relax_pipeline=None), tvm.cpu())
    if not result.weights:
        return vm["main"], result
    main, weights = vm["main"], [tvm.runtime.tensor(w) for _, w in result.weights]  # the lifted constants
    return (lambda *inputs: main(*inputs, *weights)), result


def _block_inputs(seq: int):
    import numpy as np
    import tvm

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, HEADS, seq, HEAD_DIM)).astype(np.float32) for _ in range(3))
    mask = np.where(np.tril(np.ones((seq, seq), bool)), 0, np.finfo(np.float32).min).astype(np.float32)[None, None]
    return [tvm.runtime.tensor(a) for a in (q, k, v, mask)]


def _peak_child(fused: bool, seq: int) -> None:
    """Run in a fresh process: print the bytes the first call adds to the peak resident size (the VM's allocator
    pools memory process-wide, so only a first call shows what the module needs)."""
    fn, _ = _build_block(fused)
    args = _block_inputs(seq)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _status_kb("VmRSS")
    fn(*args)
    print(json.dumps({"peak_added_mb": (_status_kb("VmHWM") - before) / 1024}))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def bench_block(seqs, rounds: int, repeat: int) -> list[dict]:
    import numpy as np

    variants = {"fused": _build_block(True), "unfused": _build_block(False)}
    rows = []
    for seq in seqs:
        args = _block_inputs(seq)
        outs = {name: fn(*args).numpy() for name, (fn, _) in variants.items()}
        err = float(np.abs(outs["fused"] - outs["unfused"]).max() / np.abs(outs["unfused"]).max())
        best = {}
        for _ in range(rounds):
            for name, (fn, _) in variants.items():
                ms, _n = _median_ms(lambda: fn(*args), repeat)
                best[name] = min(best.get(name, 1e30), ms)
        peaks = {}
        for name in variants:
            out = subprocess.run([sys.executable, __file__, "--peak-child", name, str(seq)], capture_output=True,
                                 text=True, env={**os.environ}, check=True)
            peaks[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_added_mb"]
        rows.append({"seq": seq, "fused_ms": best["fused"], "unfused_ms": best["unfused"],
                     "speedup": best["unfused"] / best["fused"], "fused_peak_mb": peaks["fused"],
                     "unfused_peak_mb": peaks["unfused"], "scores_mb": HEADS * seq * seq * 4 / 2 ** 20,
                     "max_rel_diff": err})
        print(rows[-1], flush=True)
    return rows


LAYOUT_SEQ, LAYOUT_BLOCK = 2048, 64


def _layouts(seq: int, block: int) -> dict:
    """name -> [1, nb, nb] bool block layout: BigBird (window 3 blocks, first and last global, 3 random per row) and
    Longformer (a band of 512 tokens each side plus the first block global)."""
    from llmcc.kernels import block_sparse_attention as bsa

    nb = seq // block
    return {"bigbird": bsa.bigbird_layout(nb, 3, 2, 3, seed=0).numpy(),
            "longformer": bsa.longformer_layout(nb, 2 * (512 // block) + 1, (0,)).numpy()}


def bench_layouts(rounds: int, repeat: int, seq: int = LAYOUT_SEQ, block: int = LAYOUT_BLOCK) -> list[dict]:
    import numpy as np
    import tvm

    rows = []
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, HEADS, seq, HEAD_DIM)).astype(np.float32) for _ in range(3))
    for name, layout in _layouts(seq, block).items():
        keep = layout.repeat(block, 1).repeat(block, 2)[None]
        mask = np.where(keep, 0, np.finfo(np.float32).min).astype(np.float32)
        layout_fn, result = _build_block(True, const_mask=mask)
        (site,) = result.attention
        variants = {"layout": (layout_fn, [q, k, v]), "every tile": (_build_block(True)[0], [q, k, v, mask]),
                    "unfused": (_build_block(False, const_mask=mask)[0], [q, k, v])}
        args = {n: [tvm.runtime.tensor(a) for a in a_] for n, (_, a_) in variants.items()}
        outs = {n: fn(*args[n]).numpy() for n, (fn, _) in variants.items()}
        err = max(float(np.abs(outs[n] - outs["unfused"]).max() / np.abs(outs["unfused"]).max()) for n in outs)
        best = {}
        for _ in range(rounds):
            for n, (fn, _) in variants.items():
                ms, _n = _median_ms(lambda: fn(*args[n]), repeat)
                best[n] = min(best.get(n, 1e30), ms)
        tiles = layout.repeat(block // 32, 1).repeat(block // 32, 2)
        rows.append({"layout": name, "seq": seq, "block": block, "kind": site["kind"], "kernel": site["kernel"],
                     "tiles_walked": float(tiles.mean()), "layout_ms": best["layout"],
                     "every_tile_ms": best["every tile"], "unfused_ms": best["unfused"], "max_rel_diff": err})
        print(rows[-1], flush=True)
    return rows


def op_counts(seqs=(4096, 16384), block: int = 64, head_dim: int = 64) -> list[dict]:
    """Work per (batch, head) of each layout vs dense: block-sparse layouts through block_sparse_op_count (Triton
    kernel, 64-token blocks), a causal sliding window through sliding_window_op_count, and the CPU kernel's
    32 x 32 tiles of the same layouts."""
    import torch

    from llmcc.kernels import block_sparse_attention as bsa
    from llmcc.kernels import sliding_window_attention as swa

    rows = []
    for seq in seqs:
        for name, layout in _layouts(seq, block).items():
            c = bsa.block_sparse_op_count(torch.from_numpy(layout), block, head_dim)
            cpu = layout.repeat(block // 32, 1).repeat(block // 32, 2)
            rows.append({"layout": name, "seq": seq, "gflop": c["flops"] / 1e9, "dense_gflop": c["dense_flops"] / 1e9,
                         "density": c["density"], "cpu_tiles_share": float(cpu.mean())})
        for window in (1024, 4096):
            c = swa.sliding_window_op_count(seq, seq, window, head_dim)
            rows.append({"layout": f"sliding window {window} (causal)", "seq": seq, "gflop": c["flops"] / 1e9,
                         "dense_gflop": c["dense_flops"] / 1e9, "density": c["flops"] / c["dense_flops"],
                         "cpu_tiles_share": None})
    return rows


def bench_zoo(cases, rounds: int, repeat: int) -> list[dict]:
    import llmcc
    from llmcc import zoo

    rows = []
    for name, seq in cases:
        mods = {f: llmcc.compile(zoo.onnx_path(name), fuse_attention=f, verify=f) for f in (True, False)}
        feeds = zoo.sample_inputs(name, seq, batch=1)
        best = {}
        for _ in range(rounds):
            for f, m in mods.items():
                ms, _n = _median_ms(lambda: m.run(**feeds), repeat)
                best[f] = min(best.get(f, 1e30), ms)
        rows.append({"model": name, "seq": seq, "fused_ms": best[True], "unfused_ms": best[False],
                     "speedup": best[False] / best[True]})
        print(rows[-1], flush=True)
    return rows


def zoo_sites() -> list[dict]:
    from llmcc import zoo
    from llmcc.frontend.onnx_import import import_model, load_model
    from llmcc.passes.fuse_attention import FuseAttention

    rows = []
    for name in zoo.ZOO:
        p = FuseAttention()
        p(import_model(load_model(zoo.onnx_path(name))))
        rows.append({"model": name, "sites": len(p.sites), "fused": sum(s["fused"] for s in p.sites),
                     "kinds": sorted({s["kind"] for s in p.sites}),
                     "unfused_reasons": sorted({s["reason"] for s in p.sites if not s["fused"]})})
    return rows


def sweep(seq: int = 1024) -> list[dict]:
    """The CPU kernel alone over tile configs (causal, mask, k as k^T): what cpu_tiles chose from."""
    import numpy as np
    import tvm

    from llmcc.kernels.flash_attention import AttentionSpec, CpuTiles, flash_attention_cpu
    from llmcc.targets import resolve

    target = resolve("cpu")
    rows = []
    rng = np.random.default_rng(0)
    for d in (32, 64):
        spec = AttentionSpec(HEADS, HEADS, d, d, d ** -0.5, causal=True, bias=(False, True, False),
                             k_layout="bnds", out_layout="bsnd")
        args = [tvm.runtime.tensor(rng.standard_normal(s).astype(np.float32)) for s in
                [(1, HEADS, seq, d), (1, HEADS, d, seq), (1, HEADS, seq, d), (1, 1, seq, seq)]]
        args.append(tvm.runtime.tensor(np.zeros((1, seq, HEADS, d), np.float32)))
        for tq, tk, rows_ in [(16, 16, 4), (16, 32, 2), (32, 32, 2), (32, 32, 1), (64, 32, 2), (64, 32, 1),
                              (32, 24, 2), (32, 48, 2)]:
            func = flash_attention_cpu(spec, CpuTiles(tq, tk, rows_)).with_attr("global_symbol", "main")
            with target.tvm_target():
                fn = tvm.compile(tvm.IRModule({"main": func}), target=target.tvm_target())["main"]
            ms, _n = _median_ms(lambda: fn(*args), 15)
            flops = 4 * HEADS * seq * seq * d * 0.5
            rows.append({"head_dim": d, "tq": tq, "tk": tk, "rows": rows_, "ms": ms, "gflops": flops / ms / 1e6})
            print(rows[-1], flush=True)
    return rows


def markdown(result: dict) -> str:
    meta = result["meta"]
    out = ["# Attention: fused flash kernel vs the exported ops (CPU)", "",
           f"`python tools/bench_attention.py` on {meta['cpu']}, {meta['threads']} threads; fastest of "
           f"{meta['rounds']} alternating rounds (median of each). Peak: what the first call adds to the process's "
           f"peak resident memory (fresh process per variant, inputs allocated before).", "",
           "## Attention block (q, k, v [1, 4, S, 32], mask [1, 1, S, S] as an input)", "",
           "| seq | fused ms | unfused ms | speedup | fused peak MB | unfused peak MB | one fp32 score matrix MB "
           "| max rel diff |", "|---|---|---|---|---|---|---|---|"]
    for r in result.get("block", []):
        out.append(f"| {r['seq']} | {r['fused_ms']:.2f} | {r['unfused_ms']:.2f} | {r['speedup']:.2f}x | "
                   f"{r['fused_peak_mb']:.1f} | {r['unfused_peak_mb']:.1f} | {r['scores_mb']:.0f} | "
                   f"{r['max_rel_diff']:.1e} |")
    out += ["", "## Zoo models end to end", "", "| model | seq | fused ms | unfused ms | speedup |",
            "|---|---|---|---|---|"]
    for r in result.get("zoo", []):
        out.append(f"| {r['model']} | {r['seq']} | {r['fused_ms']:.2f} | {r['unfused_ms']:.2f} | "
                   f"{r['speedup']:.2f}x |")
    out += ["", "## Attention sites per zoo model", "", "| model | sites | fused | kinds | why not fused |",
            "|---|---|---|---|---|"]
    for r in result.get("sites", []):
        out.append(f"| {r['model']} | {r['sites']} | {r['fused']} | {', '.join(r['kinds'])} | "
                   f"{'; '.join(r['unfused_reasons']) or '-'} |")
    if result.get("layouts"):
        out += ["", f"## Block-sparse layouts (a constant block mask, block {LAYOUT_BLOCK}, q, k, v [1, 4, S, 32])",
                "", "Kind and kernel as the report says; *every tile*: the same mask as an input, so the fused kernel "
                "cannot skip.", "",
                "| layout | seq | kind (kernel) | tiles walked | layout ms | every tile ms | unfused ms | max rel diff |",
                "|---|---|---|---|---|---|---|---|"]
        for r in result["layouts"]:
            out.append(f"| {r['layout']} | {r['seq']} | {r['kind']} ({r['kernel']}) | {r['tiles_walked']:.0%} | "
                       f"{r['layout_ms']:.2f} | {r['every_tile_ms']:.2f} | {r['unfused_ms']:.2f} | "
                       f"{r['max_rel_diff']:.1e} |")
    if result.get("ops"):
        out += ["", "## Operation counts per layout (per batch and head, head dim 64; arithmetic, no timing)", "",
                "| layout | seq | GFLOP | dense GFLOP | work vs dense | CPU kernel tiles (32 x 32) |",
                "|---|---|---|---|---|---|"]
        for r in result["ops"]:
            cpu = "-" if r["cpu_tiles_share"] is None else f"{r['cpu_tiles_share']:.1%}"
            out.append(f"| {r['layout']} | {r['seq']} | {r['gflop']:.2f} | {r['dense_gflop']:.2f} | "
                       f"{r['density']:.1%} | {cpu} |")
    if result.get("sweep"):
        out += ["", "## CPU kernel tile sweep (causal, seq 1024)", "", "| head dim | TQ | TK | rows | ms | GFLOP/s |",
                "|---|---|---|---|---|---|"]
        for r in result["sweep"]:
            out.append(f"| {r['head_dim']} | {r['tq']} | {r['tk']} | {r['rows']} | {r['ms']:.2f} | "
                       f"{r['gflops']:.1f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="512,2048", help="attention block sequence lengths")
    parser.add_argument("--zoo", default="llama:128,llama:512,llama-decode:128,bigbird:256,longformer:128",
                        help="zoo model:seq pairs timed end to end ('' for none)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sweep", action="store_true", help="also sweep the CPU kernel's tile configs")
    parser.add_argument("--only", default="", help="comma list of parts to re-run (block, zoo, sites, layouts, ops, "
                        "sweep); the others are kept from the existing attention.json")
    parser.add_argument("--out", default=str(ROOT / "bench"), help="folder for attention.json and attention.md")
    parser.add_argument("--peak-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    if args.peak_child:
        _peak_child(args.peak_child[0] == "fused", int(args.peak_child[1]))
        return 0
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.zoo.split(",") if c]
    parts = {"block": lambda: bench_block([int(s) for s in args.seqs.split(",")], args.rounds, args.repeat),
             "zoo": lambda: bench_zoo(cases, args.rounds, args.repeat), "sites": zoo_sites,
             "layouts": lambda: bench_layouts(args.rounds, args.repeat), "ops": op_counts,
             "sweep": lambda: sweep() if args.sweep or "sweep" in args.only else []}
    only = [p for p in args.only.split(",") if p]
    unknown = sorted(set(only) - set(parts))
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(parts)}")
    out = Path(args.out)
    result = json.loads((out / "attention.json").read_text()) if only and (out / "attention.json").exists() else {}
    result["meta"] = {"cpu": _cpu_name(), "threads": args.threads, "rounds": args.rounds}
    for name, run in parts.items():
        if not only or name in only:
            result[name] = run()
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("attention.json", json.dumps(result, indent=1)), ("attention.md", markdown(result))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
