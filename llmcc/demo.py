"""``llmcc demo``: the whole slice on a built-in model, with nothing to download.

Builds a zoo model (a small Llama with grouped KV heads by default), compiles it for this CPU, verifies it against
onnxruntime, saves and reloads the artifact, runs it with numpy and torch inputs, and cross-compiles it for CUDA.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def demo(cuda: bool = True, model: str = "llama-gqa") -> int:
    import llmcc
    from llmcc import zoo
    from llmcc.cli import attention_lines
    from llmcc.verify import relative_error

    print(f"[1/4] building zoo model '{model}' ({zoo.get(model).description})")
    path = zoo.onnx_path(model)
    print(f"      {path}")

    print("[2/4] compiling for cpu and verifying against onnxruntime")
    module = llmcc.compile(path, target="cpu")
    v = module.report["verify"]
    print(f"      verify: passed={v['passed']} rel err {v['rel_err']:.2e} at sizes {v['cases']}")
    for line in attention_lines(module.report):
        print(f"      attention {line}")

    workdir = Path(tempfile.mkdtemp(prefix="llmcc-demo-"))
    try:
        print("[3/4] save, load, run")
        art = module.save(workdir / f"{model}.llmcc")
        loaded = llmcc.load(art)
        seq = zoo.get(model).seq_lens[-1]
        feed = zoo.sample_inputs(model, seq_len=seq, batch=1, seed=0)
        import onnxruntime as ort
        ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
        out = loaded.run(**feed)
        first = loaded.outputs[0].name
        err = relative_error(out[first], ref[0])
        import torch
        tout = loaded(**{k: torch.from_numpy(v).clone() for k, v in feed.items()})
        tout = tout[0] if isinstance(tout, tuple) else tout
        times = []
        for _ in range(5):
            start = time.perf_counter()
            loaded.run(**feed)
            times.append(time.perf_counter() - start)
        print(f"      {art}: output {first} {list(out[first].shape)}, rel err vs onnxruntime {err:.2e}, "
              f"torch output {type(tout).__name__}{list(tout.shape)}, median {1e3 * np.median(times):.2f} ms")
        ok = bool(v["passed"]) and err <= 1e-5

        if cuda and shutil.which("nvcc"):
            print("[4/4] cross-compiling for CUDA")
            for target in ("cuda:sm_80", "cuda:sm_90"):
                start = time.perf_counter()
                cm = llmcc.compile(path, target=target)
                cm.save(workdir / f"{model}-{target.replace(':', '_')}.llmcc")
                cb = cm.report["cuda_binary"]
                print(f"      {target}: {time.perf_counter() - start:.1f}s, SASS {cb['sass_archs']}, "
                      f"PTX {cb['ptx_archs']}, verify: {cm.report['verify'].get('passed')} "
                      f"({cm.report['verify'].get('reason', 'on the GPU')})")
                ok = ok and bool(cb.get("has_fatbin"))
        else:
            print("[4/4] CUDA cross-compile skipped" + ("" if cuda else " (--no-cuda)") +
                  ("" if shutil.which("nvcc") else ": nvcc not found"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1
