#!/usr/bin/env python3
"""Prefill matmul throughput: llmcc's w8a8 GEMM (``w8a8_gemm_avx2``: its own row quantization included) against the
float32 matmul llmcc builds for the same shape, on this CPU. Each is one ONNX MatMul x[rows, K] @ W[K, N] compiled
by ``llmcc.compile`` (w8a8 with max_error 1.0) and timed by ``CompiledModule.device_ms``; GMAC/s = rows*K*N / time.

    python tools/bench_w8a8_gemm.py                       # MiniLM's shapes at batch 8 x 128 (1024 rows)
    python tools/bench_w8a8_gemm.py --rows 256 --shapes 4096x4096

It reports figures; nothing asserts a timing.
"""

from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--shapes", nargs="*", default=["384x384", "384x1536", "1536x384"], help="KxN")
    args = parser.parse_args(argv)

    import llmcc

    x_rng = np.random.default_rng(1)
    print("| K x N | rows | fp32 ms | fp32 GMAC/s | w8a8 ms | w8a8 GMAC/s | w8a8 / fp32 | w8a8 kernel |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        x = x_rng.standard_normal((args.rows, k)).astype(np.float32)
        model = matmul_model(k, n)
        fp32 = llmcc.compile(model)
        w8a8 = llmcc.compile(model, quant="w8a8", max_error=1.0)
        ms = [m.device_ms(x, number=10, repeat=7) for m in (fp32, w8a8)]
        macs = args.rows * k * n / 1e6
        kernel = ", ".join(kn["name"] for kn in w8a8.report["kernels"])
        print(f"| {k} x {n} | {args.rows} | {ms[0]:.3f} | {macs / ms[0]:.1f} | {ms[1]:.3f} | {macs / ms[1]:.1f} "
              f"| {ms[0] / ms[1]:.2f}x faster | {kernel} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
