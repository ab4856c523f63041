#!/usr/bin/env python3
"""Prefill matmul throughput: llmcc's w8a8 GEMMs (``w8a8_gemm_avx2`` on vpmaddwd pairs and, on a CPU with
AVX512-VNNI, ``w8a8_gemm_vnni`` on vpdpbusd quads; each quantizes its own rows) against the float32 matmul llmcc
builds for the same shape, on this CPU. Each is one ONNX MatMul x[rows, K] @ W[K, N] compiled by ``llmcc.compile``
(w8a8 with max_error 1.0; the pair kernel on a VNNI CPU by compiling as if it had none) and timed by
``CompiledModule.device_ms``; GMAC/s = rows*K*N / time.

    python tools/bench_w8a8_gemm.py                       # MiniLM's shapes at batch 8 x 128 (1024 rows)
    python tools/bench_w8a8_gemm.py --rows 256 --shapes 4096x4096
    python tools/bench_w8a8_gemm.py --vnni-tile-rows 4 6 8  # the VNNI kernel alone at each register-tile height

It reports figures; nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def matmul_model(k: int, n: int, seed: int = 0):
    from onnx import TensorProto, helper, numpy_helper

    w = (0.05 * np.random.default_rng(seed).standard_normal((k, n))).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def vnni_tiles(rows: int, shapes: list[str], heights: list[int]) -> int:
    import tvm

    from llmcc.kernels import w8a8_matmul
    from llmcc.kernels.dequant_matmul import WeightFormat, quantize
    from llmcc.targets import host_cpu

    cpu = host_cpu()
    if not cpu.model().int8_dot:
        print("this CPU has no AVX512-VNNI")
        return 1
    rng = np.random.default_rng(1)
    print("| K x N | rows | panel | tile rows | ms | GMAC/s |")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        k, n = map(int, shape.split("x"))
        x = rng.standard_normal((rows, k)).astype(np.float32)
        q_w, s_w = quantize(rng.standard_normal((k, n)).astype(np.float32), WeightFormat("w8a8"))
        chunk = max(w8a8_matmul.gemv_pairs_chunk(n, cpu.model().cores), w8a8_matmul.GEMM_STRIP)
        arrays = [x, *w8a8_matmul.quad_weights(q_w, s_w, chunk), np.zeros((rows, n), np.float32)]
        for height in heights:
            func = w8a8_matmul.gemm_quads_vnni(k, n, chunk, height).with_attr("global_symbol", "main")
            lib = tvm.tirx.build(func, target=cpu.tvm_target())
            timer = lib.time_evaluator("main", tvm.cpu(), number=10, repeat=7)
            ms = 1e3 * float(np.median(timer(*[tvm.runtime.tensor(a) for a in arrays]).results))
            print(f"| {k} x {n} | {rows} | {chunk} | {height} | {ms:.3f} | {rows * k * n / ms / 1e6:.1f} |", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--shapes", nargs="*", default=["384x384", "384x1536", "1536x384"], help="KxN")
    parser.add_argument("--vnni-tile-rows", type=int, nargs="*",
                        help="instead: time w8a8_gemm_vnni alone (TIR build, time_evaluator) at these tile heights")
    args = parser.parse_args(argv)
    if args.vnni_tile_rows:
        return vnni_tiles(args.rows, args.shapes, args.vnni_tile_rows)

    from unittest import mock

    import llmcc
    from llmcc.passes import quantize_weights

    vnni = llmcc.targets.host_cpu().model().int8_dot
    variants = [("pairs", False)] + ([("vnni", True)] if vnni else [])
    x_rng = np.random.default_rng(1)
    print("| K x N | rows | fp32 ms | fp32 GMAC/s | " + " | ".join(
        f"w8a8 {name} ms | GMAC/s | vs fp32" for name, _ in variants) + " | kernels |")
    print("|---|---|---|---|" + "---|---|---|" * len(variants) + "---|")
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        x = x_rng.standard_normal((args.rows, k)).astype(np.float32)
        model = matmul_model(k, n)
        modules = [llmcc.compile(model)]
        for _, use_vnni in variants:  # the pair GEMM on a VNNI CPU: compiled as if int8_dot were off
            host = quantize_weights._integer_simd_cpu(llmcc.targets.host_cpu())
            cpu = dataclasses.replace(host, int8_dot=use_vnni) if host else None
            with mock.patch.object(quantize_weights, "_integer_simd_cpu", lambda target, cpu=cpu: cpu):
                modules.append(llmcc.compile(model, quant="w8a8", max_error=1.0))
        ms = [m.device_ms(x, number=10, repeat=7) for m in modules]
        macs = args.rows * k * n / 1e6
        cells = " | ".join(f"{t:.3f} | {macs / t:.1f} | {ms[0] / t:.2f}x faster" for t in ms[1:])
        kernels = ", ".join(kn["name"] for m in modules[1:] for kn in m.report["kernels"])
        print(f"| {k} x {n} | {args.rows} | {ms[0]:.3f} | {macs / ms[0]:.1f} | {cells} | {kernels} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
