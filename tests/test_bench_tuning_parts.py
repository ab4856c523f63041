"""tools/bench_tuning.py's cuda and runners parts, without running them (minutes each): their drop reasons group
across kernels and archs, their markdown sections render from results of the shape they return, and the runners
part's model is a valid ONNX model."""

import sys

import onnx
from helpers import ROOT

sys.path.insert(0, str(ROOT / "tools"))

import bench_tuning  # tools/ is not a package: imported from the path above

CUDA_RESULT = {
    "model": "llama", "source": "cuda:sm_80", "kernels": 2, "samples": 3, "unsampled_kernels": ["matmul9"],
    "note": "schedules sampled from sm_80's search space (not measured: no GPU here)",
    "source_check": {"kept": 2, "dropped": 1, "fraction_dropped": 1 / 3, "reasons": {"too big (x)": 1}},
    "targets": {name: {"kept": 2, "dropped": 1, "dropped_also_on_source": 1, "fraction_dropped": 1 / 3,
                       "reasons": {"too big (x)": 1}} for name in ("cuda:sm_86", "cuda:sm_90")},
    "seconds": 12.0}
RUNNERS_RESULT = {
    "model": bench_tuning.RUNNER_MODEL, "trials": 32, "cores": 2, "speedup": 1.25, "note": "Shared cores",
    "one_runner": {"trials": 32, "seconds": 40.0, "tune_seconds": 39.0, "trials_per_s": 0.8, "runner": "rpc"},
    "two_runners": {"trials": 32, "seconds": 32.0, "tune_seconds": 31.0, "trials_per_s": 1.0, "runner": "rpc"}}


def test_drop_reasons_group_across_kernels_and_archs():
    ptxas = ("does not build for cuda:sm_{0}: nvcc failed on kernel {1} for sm_{0}: ptxas error : Entry function "
             "'{1}' uses too much shared data (0x{2:x} bytes, 0xc000 max)")
    grouped = {bench_tuning._drop_class(ptxas.format(arch, kernel, size))
               for arch, kernel, size in (("80", "main_kernel", 0x11a00), ("90", "other_kernel", 0x24000))}
    assert grouped == {"does not build: ptxas error : uses too much shared data (over 48 KiB)"}
    limits = "exceeds sm_86's limits (1024 threads, 99 KiB shared memory per block)"
    assert bench_tuning._drop_class(limits) == limits


def test_markdown_sections():
    cuda = bench_tuning.cuda_markdown(CUDA_RESULT)
    assert cuda[0].startswith("## ") and cuda[-1] == ""
    assert "| cuda:sm_80 (itself) | 2 | 1 | 33% | - | too big (x) (1) |" in cuda
    assert "| cuda:sm_90 | 2 | 1 | 33% | 1 | too big (x) (1) |" in cuda
    assert any("matmul9" in line for line in cuda)
    runners = bench_tuning.runners_markdown(RUNNERS_RESULT)
    assert runners[0].startswith("## ") and runners[-1] == ""
    assert "| 2 | 32 | 32.0 | 1.00 |" in runners and any("1.25x" in line for line in runners)
    whole = bench_tuning.markdown({"cuda": CUDA_RESULT, "runners": RUNNERS_RESULT},
                                  {"machine": "m", "threads": 2, "command": "c"})
    assert "## CUDA transfer" in whole and "## Tuning throughput" in whole


def test_runners_model_is_valid_onnx(tmp_path):
    model = onnx.load(str(bench_tuning._matmul_onnx(tmp_path / "mm.onnx")))
    onnx.checker.check_model(model)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [64, 256]
