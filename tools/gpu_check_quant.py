#!/usr/bin/env python3
"""Check llmcc's quantized kernels on a GPU: compile with each scheme for the local GPU's arch, let the compiler's own
verification run there (the module against the float model with the plan's dequantized weights, at the plan's
tolerance, and the output error vs float32), and time it. Two parts:

1. a tiny Llama decode step (zoo "llama-decode", batch 1, past 128), every layer quantized (max_error 1.0);
2. four chained N x N GEMVs (tools/bench_quant.py's model, N = 4096), timed against the GPU's read bandwidth, which
   torch measures here (sum of a 2 GiB float32 tensor): x floor = time / (weight bytes / bandwidth).

    python tools/gpu_check_quant.py                       # on a GPU machine
    python tools/gpu_check_quant.py --dry-run             # no GPU: the same flow on the CPU, small sizes
    python tools/gpu_check_quant.py --out DIR             # also write DIR/gpu_check_quant.{json,md}

Or from Python (tools/gpu_check.py --quant): ``run_checks(target) -> rows``, ``format_table(rows)``.

"call ms" times a call of the module from Python with torch tensors already on the device (what a user sees);
"device ms" times the compiled code alone (``CompiledModule.device_ms``: TVM's time_evaluator, no Python in the loop).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from gpu_check import timed_ms  # noqa: E402 (tools/ is put on the path just above)

DECODE_SCHEMES = ("none", "fp16", "bf16", "int8", "int4", "int4-g128-asym", "w8a8", "w4a8")
GEMV_SCHEMES = ("none", "fp16", "int8", "int4", "w4a8")
DECODE_PAST = 128


@functools.cache
def _chain(n: int):
    """bench_quant's GEMV chain model and its weights, made once per size (64M random normals at N = 4096)."""
    from bench_quant import gemv_chain_model

    return gemv_chain_model(n)


def read_bandwidth_gbs(device: str) -> float:
    """GB/s of reading a 2 GiB float32 tensor (torch's sum), best of 5; 256 MiB on the CPU."""
    import torch

    n = (2 << 30) // 4 if device == "cuda" else (256 << 20) // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x.sum()
    sync()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        sync()
        best = min(best, time.perf_counter() - t0)
    return 4 * n / best / 1e9


def _compile_row(part: str, model, quant: str, target: str) -> tuple[dict, object]:
    import llmcc

    t0 = time.perf_counter()
    module = llmcc.compile(model, target=target, quant=quant, max_error=None if quant == "none" else 1.0)
    build_s = time.perf_counter() - t0
    report = module.report
    verify, q = report["verify"], report["quant"]
    row = {"part": part, "scheme": quant, "build_s": build_s,
           "verify_rel_err": verify.get("rel_err"), "verify_tol": verify.get("tolerance"),
           "quant_error": q.get("error"), "weight_ratio": q.get("weight_bytes", {}).get("ratio"),
           "dequant_kernels": q.get("dequantize_matmul_kernels", 0),
           "passed": bool(verify.get("passed"))}
    return row, module


def check_decode(quant: str, target: str, device: str) -> dict:
    import torch

    from llmcc import zoo

    row, module = _compile_row("decode", zoo.onnx_path("llama-decode"), quant, target)
    feed = zoo.sample_inputs("llama-decode", seq_len=DECODE_PAST, batch=1, seed=0)
    inputs = {k: torch.from_numpy(v).to(device) for k, v in feed.items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    row.update(call_ms=timed_ms(lambda: module(**inputs), sync, repeat=50, warmup=5),
               device_ms=module.device_ms(**inputs))
    return row


def check_gemv_chain(quant: str, target: str, device: str, n: int, bandwidth_gbs: float) -> dict:
    import numpy as np
    import torch
    model, weights = _chain(n)
    row, module = _compile_row("gemv", model, quant, target)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, n)).astype(np.float32)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    row.update(call_ms=timed_ms(lambda: module(x), sync, repeat=50, warmup=5), device_ms=module.device_ms(x), n=n)
    stored = (row["weight_ratio"] or 1.0) * sum(w.nbytes for w in weights)
    row["x_floor"] = row["device_ms"] / (1e3 * stored / (bandwidth_gbs * 1e9))
    return row


def torch_gemv_chain(dtype: str, device: str, n: int, bandwidth_gbs: float) -> dict:
    """The same chain in torch eager (x @ W1 @ W2 @ W3 @ W4), float32 or float16 weights and activations."""
    import torch
    _, weights = _chain(n)
    torch_dtype = getattr(torch, dtype)
    ws = [torch.from_numpy(w).to(device=device, dtype=torch_dtype) for w in weights]
    x = torch.ones((1, n), dtype=torch_dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        h = x
        for w in ws:
            h = h @ w
        return h

    ms = timed_ms(run, sync, repeat=50, warmup=5)
    stored = sum(w.numel() * w.element_size() for w in ws)
    return {"part": "gemv", "scheme": f"torch {dtype}", "call_ms": ms, "n": n,
            "x_floor": ms / (1e3 * stored / (bandwidth_gbs * 1e9)), "passed": True}


def run_checks(target: str, device: str, n: int = 4096, budget: float = 300.0, schemes=None, log=print) -> list[dict]:
    """One row per (part, scheme); a scheme that fails to compile or verify becomes an error row. ``schemes`` limits
    both parts to those schemes (default: DECODE_SCHEMES and GEMV_SCHEMES)."""
    start, rows = time.perf_counter(), []
    bandwidth = read_bandwidth_gbs(device)
    log(json.dumps({"read_bandwidth_gbs": bandwidth}))
    decode, gemv = (DECODE_SCHEMES, GEMV_SCHEMES) if schemes is None else (schemes, schemes)
    jobs = [("decode", q, lambda q=q: check_decode(q, target, device)) for q in decode] + \
        [("gemv", q, lambda q=q: check_gemv_chain(q, target, device, n, bandwidth)) for q in gemv] + \
        [("gemv", f"torch {d}", lambda d=d: torch_gemv_chain(d, device, n, bandwidth)) for d in ("float32", "float16")]
    for part, quant, job in jobs:
        if time.perf_counter() - start > budget:
            rows.append({"part": part, "scheme": quant, "skipped": f"budget of {budget:.0f}s spent"})
        else:
            try:
                rows.append(job())
            except Exception as exc:  # noqa: BLE001 (one scheme that fails must not hide the others' figures)
                traceback.print_exc()
                lines = str(exc).strip().splitlines()
                rows.append({"part": part, "scheme": quant,
                             "error": f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]})
        rows[-1]["read_bandwidth_gbs"] = bandwidth
        log(json.dumps(rows[-1]))
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict], target: str) -> str:
    lines = ["| part | scheme | build s | verify rel err | tol | error vs fp32 | weights / fp32 | dequant kernels "
             "| call ms | device ms | x floor | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "build_s" not in r and "call_ms" in r:  # a torch baseline: timed from Python only
            lines.append(f"| {r['part']} | {r['scheme']} | - | - | - | - | - | - | {r['call_ms']:.3f} | - "
                         f"| {r['x_floor']:.2f} (call) | - |")
        elif "build_s" in r:
            lines.append(f"| {r['part']} | {r['scheme']} | {r['build_s']:.1f} | {_fmt(r['verify_rel_err'], '.1e')} "
                         f"| {_fmt(r['verify_tol'], '.0e')} | {_fmt(r['quant_error'], '.3g')} "
                         f"| {_fmt(r['weight_ratio'], '.3f')} | {r['dequant_kernels']} | {r['call_ms']:.3f} "
                         f"| {r['device_ms']:.4f} | {_fmt(r.get('x_floor'), '.2f')} | {r['passed']} |")
        else:
            lines.append(f"| {r['part']} | {r['scheme']} | - | {r.get('error') or r.get('skipped')} "
                         "| - | - | - | - | - | - | - | False |")
    bandwidth = rows[0]["read_bandwidth_gbs"] if rows else float("nan")
    n = next((r["n"] for r in rows if "n" in r), None)
    return "\n".join(lines) + (f"\n\ntarget {target}; decode: llama-decode, batch 1, past {DECODE_PAST}; gemv: four "
                               f"chained {n} x {n}; read bandwidth {bandwidth:.0f} GB/s (torch sum)\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="no GPU: run the same flow on the CPU, N = 512")
    parser.add_argument("--n", type=int, help="GEMV size (default 4096; dry run 512)")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds after which no new scheme starts")
    parser.add_argument("--schemes", nargs="*", choices=DECODE_SCHEMES, help="schemes to check (default: all)")
    parser.add_argument("--out", help="folder for gpu_check_quant.json / .md")
    args = parser.parse_args(argv)

    from llmcc import cuda

    if args.dry_run:
        target, device, n = "cpu", "cpu", args.n or 512
    else:
        arch = cuda.gpu_arch()
        if arch is None:
            print(f"gpu_check_quant: no usable GPU here (driver: {cuda.driver_state()}); use --dry-run",
                  file=sys.stderr)
            return 2
        target, device, n = f"cuda:{arch}", "cuda", args.n or 4096
    print(f"gpu_check_quant: target {target}, N {n}", flush=True)
    rows = run_checks(target, device, n, args.budget, args.schemes, log=lambda line: print(line, flush=True))
    text = format_table(rows, target)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check_quant.json").write_text(json.dumps({"target": target, "rows": rows}, indent=1))
        (out / "gpu_check_quant.md").write_text(text)
    return 0 if rows and all(r.get("passed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
