#!/usr/bin/env python3
"""Check llmcc's CUDA flash-attention kernel (llmcc/kernels/flash_attention_cuda.py) on a GPU: build each spec for
the local GPU's arch, run it on random inputs at several (Sq, Skv), compare with the float64 numpy reference, time
it, print a table. Takes about a minute (16 kernels to build, a few ms of GPU time each). Specs named ``*_triton`` run
the Triton sliding-window or block-sparse kernel as llmcc embeds it (llmcc/kernels/triton_embed.py: AOT cubin
launched from TIR); ``--emulate`` leaves them out (the emulator runs TIR only). Block-sparse specs run their static
length against a BigBird layout (``BIGBIRD_BLOCKS``), checked against the reference with the layout as a mask.

    python tools/gpu_check_attention.py                   # on a GPU machine: all specs, all sizes
    python tools/gpu_check_attention.py --specs decode    # some specs (names as in SPECS)
    python tools/gpu_check_attention.py --emulate         # no GPU: same flow, kernels run in the CPU emulator
                                                          # of tests/kernels/cuda_emu.py (small sizes; slow)
    python tools/gpu_check_attention.py --out DIR         # also write DIR/gpu_check_attention.{json,md}

Or from Python (e.g. tools/gpu_check.py --attention): ``run_checks(arch) -> rows``, ``format_table(rows)``.

Pass: max |out - reference| <= 2e-5 for float32, 2e-2 for float16, 3e-2 for bfloat16 (outputs are O(1): a convex
combination of N(0, 1) values). Rows that causality or the window hide from every key (Sq > Skv) must be 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = ((1, 1), (37, 37), (1, 300), (128, 128), (333, 333))
EMULATED_SIZES = ((1, 1), (37, 37), (1, 70), (45, 20))
TOLERANCE = {"float32": 2e-5, "float16": 2e-2, "bfloat16": 3e-2}
BATCH = 2


def _specs():
    from llmcc.kernels.flash_attention import AttentionSpec as S

    return {
        "dense_f32_d64": S(8, 8, 64, 64, 0.125),
        "causal_bias_bnds_bsnd": S(8, 8, 64, 64, 0.125, causal=True, bias=(False, True, False), k_layout="bnds",
                                   out_layout="bsnd"),
        "gqa_8q_2kv": S(8, 2, 64, 64, 0.125, causal=True),
        "window_16": S(8, 8, 64, 64, 0.125, causal=True, window=16),
        "decode": S(8, 8, 64, 64, 0.125, causal=True, q_len=1),
        "decode_gqa_f16_d128": S(32, 8, 128, 128, 0.0884, causal=True, q_len=1, dtype="float16"),
        "causal_f16_d128": S(8, 8, 128, 128, 0.0884, causal=True, dtype="float16"),
        "dense_f32_d32": S(8, 8, 32, 32, 0.177),
        "dense_f32_d128": S(8, 8, 128, 128, 0.0884),
        "bf16_bias_bsnd": S(8, 4, 64, 64, 0.125, dtype="bfloat16", bias=(True, True, False), q_layout="bsnd",
                            k_layout="bsnd", v_layout="bsnd", out_layout="bsnd"),
        "window_16_triton": S(8, 8, 64, 64, 0.125, causal=True, window=16),
        "window_gqa_f16_bnds_triton": S(8, 2, 64, 64, 0.125, causal=True, window=32, dtype="float16",
                                        q_layout="bsnd", k_layout="bnds", v_layout="bsnd", out_layout="bsnd"),
        "bigbird_b64_triton": S(8, 8, 64, 64, 0.125, q_len=1024, block_layout=(64, 64, 1)),
        "bigbird_heads_f16_b32_triton": S(8, 2, 64, 64, 0.125, q_len=4096, block_layout=(32, 32, 8),
                                          dtype="float16", q_layout="bsnd", k_layout="bnds", out_layout="bsnd"),
    }


SPECS = ("dense_f32_d64", "causal_bias_bnds_bsnd", "gqa_8q_2kv", "window_16", "decode", "decode_gqa_f16_d128",
         "causal_f16_d128", "dense_f32_d32", "dense_f32_d128", "bf16_bias_bsnd", "window_16_triton",
         "window_gqa_f16_bnds_triton", "bigbird_b64_triton", "bigbird_heads_f16_b32_triton")  # _specs()' keys
BIGBIRD_BLOCKS = dict(window_blocks=3, global_blocks=2, random_blocks=3)


def _is_triton(name: str) -> bool:
    return name.endswith("_triton")


def make_inputs(spec, sq: int, skv: int, batch: int = BATCH, seed: int = 0) -> dict:
    """Random q / k / v (and bias) in the spec's dtype and layouts, plus the symbolic sizes, as numpy arrays."""
    import numpy as np

    from llmcc.kernels.flash_attention import axes_index

    rng = np.random.default_rng(seed)
    dtype = _np_dtype(spec.dtype)

    def rand(shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)

    arrays = {
        "Q": rand(axes_index(spec.q_layout, batch, spec.num_heads, sq, spec.head_dim)),
        "K": rand(axes_index(spec.k_layout, batch, spec.num_kv_heads, skv, spec.head_dim)),
        "V": rand(axes_index(spec.v_layout, batch, spec.num_kv_heads, skv, spec.value_dim)),
    }
    sizes = {"B": batch, "SQ": sq, "SKV": skv}
    if spec.bias is not None:
        bb, bh, bq = spec.bias
        shape = (1 if bb else batch, 1 if bh else spec.num_heads, 1 if bq else sq, skv)
        arrays["Bias"] = rand(shape, 2.0)
        sizes.update(BB=shape[0], BH=shape[1], BQ=shape[2])
    if spec.block_layout:
        from llmcc.kernels import block_layout
        from llmcc.kernels import block_sparse_attention as bsa

        block, _, heads = spec.block_layout
        layout = bsa.bigbird_layout(-(-sq // block), **BIGBIRD_BLOCKS, seed=seed, num_heads=heads).numpy()
        arrays["Rows"], arrays["Cols"] = block_layout.layout_csr(layout)
        keep = layout.repeat(block, 1).repeat(block, 2)[None, :, :sq, :skv]
        arrays["Mask"] = np.where(keep, 0.0, -np.inf)  # for the reference only
    out_shape = axes_index(spec.out_layout, batch, spec.num_heads, sq, spec.value_dim)
    arrays["O"] = np.full(out_shape, np.nan, dtype)
    return {"arrays": arrays, "sizes": sizes}


def reference(spec, arrays: dict):
    """attention_reference in float64; rows with no visible key are 0, as the kernels define."""
    import numpy as np

    from llmcc.kernels.flash_attention import attention_reference

    def f64(name):
        return None if name not in arrays else np.asarray(arrays[name], np.float64)

    with np.errstate(invalid="ignore", divide="ignore"):
        ref = attention_reference(spec, f64("Q"), f64("K"), f64("V"),
                                  f64("Mask") if spec.block_layout else f64("Bias"))
    return np.nan_to_num(np.asarray(ref, np.float64), nan=0.0)


def _np_dtype(dtype: str):
    import numpy as np

    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def max_error(spec, out, arrays) -> float:
    import numpy as np

    out = np.asarray(out, np.float64)
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.max(np.abs(out - reference(spec, arrays)))) if out.size else 0.0


class _GpuRunner:
    def __init__(self, spec, arch: str, triton: bool = False):
        import tvm

        from llmcc import cuda
        from llmcc.kernels import triton_embed
        from llmcc.kernels.flash_attention_cuda import flash_attention_cuda

        if triton:
            func = (triton_embed.block_sparse_attention_func if spec.block_layout
                    else triton_embed.sliding_window_attention_func)(spec, arch)
        else:
            func = flash_attention_cuda(spec, arch)
        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        executable = cuda.build(mod, arch)
        self.module = executable.mod
        # a TIR-only build does not link IRModule external_mods (only Relax's does): import the Triton cubin here
        for name, (cubin, types_, tags) in triton_embed.embedded_kernels(mod).items():
            self.module.import_module(triton_embed.cuda_module(name, cubin, types_, tags))
        self.dev = tvm.cuda(0)
        self.order = ["Q", "K", "V"] + (["Bias"] if spec.bias is not None else []) + \
            (["Rows", "Cols"] if spec.block_layout else []) + ["O"]

    def __call__(self, arrays, sizes):
        import tvm

        args = [tvm.runtime.tensor(arrays[name], self.dev) for name in self.order]
        self.module["main"](*args)
        self.dev.sync()
        out = args[-1].numpy()
        timer = self.module.time_evaluator("main", self.dev, number=20, repeat=3)
        ms = 1e3 * statistics.median(timer(*args).results)
        return out, ms


class _EmulatedRunner:
    def __init__(self, spec, arch: str, triton: bool = False):
        if triton:
            raise ValueError("the CPU emulator runs TIR kernels only, not the embedded Triton cubin")
        sys.path.insert(0, str(ROOT / "tests" / "kernels"))
        from cuda_emu import Emulated

        from llmcc.kernels.flash_attention_cuda import flash_attention_cuda

        self.kernel = Emulated(flash_attention_cuda(spec, arch), arch)

    def __call__(self, arrays, sizes):
        return self.kernel(arrays, sizes)["O"], None


def run_checks(arch: str, specs=None, sizes=SIZES, emulate: bool = False, budget: float = 600.0,
               log=print) -> list[dict]:
    """One row per (spec, Sq, Skv): max abs error against the reference, tolerance, pass, kernel time (GPU)."""
    from llmcc.kernels.flash_attention_cuda import cuda_tiles

    all_specs = _specs()
    names = list(specs or [s for s in SPECS if not (emulate and _is_triton(s))])
    start, rows = time.perf_counter(), []
    for name in names:
        spec = all_specs[name]
        if time.perf_counter() - start > budget:
            rows.append({"spec": name, "skipped": f"budget of {budget:.0f}s spent"})
            continue
        try:
            t0 = time.perf_counter()
            runner = (_EmulatedRunner if emulate else _GpuRunner)(spec, arch, triton=_is_triton(name))
            build_s = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 (one spec that does not build must not hide the others)
            rows.append({"spec": name, "error": f"build: {type(exc).__name__}: {str(exc).strip()[:300]}"})
            log(json.dumps(rows[-1]))
            continue
        if _is_triton(name) and spec.block_layout:
            from llmcc.kernels.block_sparse_attention import BlockSparseAttentionConfig

            c = BlockSparseAttentionConfig.get_default(block_size=spec.block_layout[0], head_dim=spec.head_dim)
            tiles_text = f"triton block={spec.block_layout[0]} warps={c.num_warps}"
        elif _is_triton(name):
            from llmcc.kernels.sliding_window_attention import SlidingWindowAttentionConfig

            c = SlidingWindowAttentionConfig.get_default(seq_q=spec.q_len, head_dim=spec.head_dim)
            tiles_text = f"triton bm={c.BLOCK_M} bn={c.BLOCK_N} warps={c.num_warps}"
        else:
            tiles = cuda_tiles(spec, arch)
            tiles_text = f"{tiles.mode} tq={tiles.tq} tk={tiles.tk} threads={tiles.threads}"
        for sq, skv in ([(spec.q_len, spec.q_len)] if spec.block_layout else sizes):
            if spec.q_len is not None and sq != spec.q_len:
                continue
            data = make_inputs(spec, sq, skv)
            try:
                out, ms = runner(data["arrays"], data["sizes"])
                err = max_error(spec, out, data["arrays"])
                row = {"spec": name, "kind": spec.kind, "dtype": spec.dtype, "tiles": tiles_text, "sq": sq, "skv": skv,
                       "max_err": err, "tol": TOLERANCE[spec.dtype], "ms": ms, "build_s": build_s,
                       "passed": bool(err <= TOLERANCE[spec.dtype])}
            except Exception as exc:  # noqa: BLE001 (report it in the table, go on)
                error = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
                row = {"spec": name, "sq": sq, "skv": skv, "error": error}
            rows.append(row)
            log(json.dumps(row))
    return rows


def format_table(rows: list[dict], arch: str) -> str:
    lines = ["| spec | kind | dtype | tiles | Sq | Skv | max abs err | tol | kernel ms | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "max_err" in r:
            ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
            lines.append(f"| {r['spec']} | {r['kind']} | {r['dtype']} | {r['tiles']} | {r['sq']} | {r['skv']} "
                         f"| {r['max_err']:.1e} | {r['tol']:.0e} | {ms} | {r['passed']} |")
        else:
            lines.append(f"| {r['spec']} | - | - | - | {r.get('sq', '-')} | {r.get('skv', '-')} | "
                         f"{r.get('error') or r.get('skipped')} | - | - | False |")
    return "\n".join(lines) + f"\n\narch {arch}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="*", choices=SPECS, help="specs to check (default: all)")
    parser.add_argument("--emulate", action="store_true", help="no GPU: run the kernels in the CPU emulator")
    parser.add_argument("--arch", help="with --emulate: the arch to build for (default sm_80)")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds after which no new spec starts")
    parser.add_argument("--out", help="folder for gpu_check_attention.json / .md")
    args = parser.parse_args(argv)

    from llmcc import cuda

    if args.emulate:
        arch, sizes = args.arch or "sm_80", EMULATED_SIZES
    else:
        arch = cuda.gpu_arch()
        if arch is None:
            print(f"gpu_check_attention: no usable GPU here (driver: {cuda.driver_state()}); use --emulate",
                  file=sys.stderr)
            return 2
        sizes = SIZES
    print(f"gpu_check_attention: arch {arch}{' (emulated)' if args.emulate else ''}, sizes {sizes}", flush=True)
    rows = run_checks(arch, args.specs, sizes, emulate=args.emulate, budget=args.budget,
                      log=lambda line: print(line, flush=True))
    text = format_table(rows, arch)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check_attention.json").write_text(json.dumps({"arch": arch, "rows": rows}, indent=1))
        (out / "gpu_check_attention.md").write_text(text)
    return 0 if rows and all(r.get("passed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
