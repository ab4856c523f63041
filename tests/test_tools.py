"""tools/ scripts start and write what they promise (smoke runs; no timing is asserted)."""

import json
import os
import subprocess
import sys

from helpers import ROOT


def _run(*args, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_gpu_check_dry_run(tmp_path):
    r = _run(ROOT / "tools" / "gpu_check.py", "--dry-run", "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["target"] == "cpu"
    (row,) = data["rows"]
    assert row["model"] == "llama" and row["passed"] and row["rel_err_vs_torch"] <= 1e-4
    assert "| llama |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_without_gpu_says_so():
    r = _run(ROOT / "tools" / "gpu_check.py")
    assert r.returncode == 2 and "no usable GPU here" in r.stderr


def test_bench_quick_writes_json_and_markdown(tmp_path):
    r = _run(ROOT / "tools" / "bench.py", "--quick", "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    (row,) = data["rows"]
    assert {"llmcc_ms", "onnxruntime_ms", "torch_ms", "err_llmcc", "err_onnxruntime"} <= set(row)
    assert row["err_llmcc"] <= 1e-5 and row["verify"] is True
    assert "| llama | 1 x 16 |" in (tmp_path / "results.md").read_text()


def test_bench_quant_quick_writes_json_and_markdown(tmp_path):
    r = _run(ROOT / "tools" / "bench_quant.py", "--quick", "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "quant.json").read_text())
    assert {"bandwidth", "gemv", "decode", "minilm", "gate", "meta"} <= set(data)
    assert {"llmcc fp32", "llmcc int4", "onnxruntime int8 (dynamic)"} <= {row["system"] for row in data["gemv"]}
    text = (tmp_path / "quant.md").read_text()
    for section in ("## Memory bandwidth", "## GEMV chain", "## Tiny Llama decode step", "## all-MiniLM-L6-v2 int8",
                    "## Accuracy gate"):
        assert section in text


def test_bench_lora_smoke_same_kernels_with_and_without_adapter(tmp_path):
    r = _run(ROOT / "tools" / "bench_lora.py", "--seq", "16", "--repeat", "3", "--rounds", "1", "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    base, merged, folded = json.loads((tmp_path / "lora.json").read_text())["rows"]
    assert merged["merged_weights"] == 14 and folded["folded_branches"] == 14
    assert base["kernels"] == merged["kernels"] == folded["kernels"]
    assert base["weights"] == merged["weights"] == folded["weights"]
    assert merged["err_vs_peft"] <= 1e-5 and folded["err_vs_peft"] <= 1e-5
    assert "| adapter merged (--lora) |" in (tmp_path / "lora.md").read_text()


def test_bench_attention_smoke(tmp_path):
    """Fused and unfused agree; the unfused block's first call holds score-sized buffers, the fused one does not."""
    r = _run(ROOT / "tools" / "bench_attention.py", "--seqs", "512", "--zoo", "llama:16", "--rounds", "1",
             "--repeat", "3", "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "attention.json").read_text())
    (block,) = data["block"]
    assert block["max_rel_diff"] <= 1e-5
    assert block["unfused_peak_mb"] >= block["scores_mb"] > 10 * block["fused_peak_mb"]
    sites = {row["model"]: row for row in data["sites"]}
    assert sites["llama"]["fused"] == sites["llama"]["sites"] == 2
    assert sites["bigbird"]["fused"] == sites["bigbird"]["sites"] == 10
    assert sites["longformer"]["fused"] == sites["longformer"]["sites"] == 2
    assert "| 512 |" in (tmp_path / "attention.md").read_text()


def test_profile_lists_kernels(tmp_path):
    r = _run(ROOT / "tools" / "profile_kernels.py", "llama", "--seq", "16", "--runs", "2", "--top", "40")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ms per run" in r.stdout and "flash_attention_causal" in r.stdout


def test_no_tool_shadows_a_standard_module():
    """tools/ is sys.path[0] when a tool runs: a tools/profile.py made `import cProfile` (torch) load it instead."""
    shadowing = [p.name for p in (ROOT / "tools").glob("*.py") if p.stem in sys.stdlib_module_names]
    assert not shadowing, shadowing


def test_tune_zoo_and_bench_tuning_smoke(tmp_path):
    """tune_zoo writes a compacted database with its summary; bench_tuning's zoo part compiles with it and says
    which kernels got a tuned schedule."""
    db = tmp_path / "zoo-db"
    r = _run(ROOT / "tools" / "tune_zoo.py", "--models", "llama-decode", "--trials-per-kernel", "1", "--population",
             "16", "--out", db)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((db / "summary.json").read_text())
    assert summary["models"][0]["model"] == "llama-decode" and summary["records"] >= 1
    assert not list(db.glob("database_workload.*.json"))  # shards compacted into the plain pair
    r = _run(ROOT / "tools" / "bench_tuning.py", "--only", "zoo", "--models", "llama-decode", "--db", db,
             "--repeat", "3", "--rounds", "1", "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = json.loads((tmp_path / "tuning.json").read_text())["results"]["zoo"]
    assert row["model"] == "llama-decode" and row["verify"] and row["provenance"].get("tuned", 0) >= 1
    assert "| llama-decode |" in (tmp_path / "tuning.md").read_text()


def test_gpu_check_quant_dry_run(tmp_path):
    r = _run(ROOT / "tools" / "gpu_check_quant.py", "--dry-run", "--n", "256", "--schemes", "int8", "w4a8",
             "--out", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "gpu_check_quant.json").read_text())["rows"]
    assert [(row["part"], row["scheme"]) for row in rows] == [
        ("decode", "int8"), ("decode", "w4a8"), ("gemv", "int8"), ("gemv", "w4a8"),
        ("gemv", "torch float32"), ("gemv", "torch float16")]
    for row in rows[:4]:  # checked by the compiler against the plan's dequantized weights, at the plan's tolerance
        assert row["passed"] and row["verify_rel_err"] <= row["verify_tol"] and row["device_ms"] > 0
        assert 0 < row["quant_error"] < 0.5
    assert "| gemv | w4a8 |" in (tmp_path / "gpu_check_quant.md").read_text()


def test_gpu_check_quant_without_gpu_says_so():
    r = _run(ROOT / "tools" / "gpu_check_quant.py")
    assert r.returncode == 2 and "no usable GPU here" in r.stderr


def test_bench_w8a8_gemm_reports_both_kernels():
    """float32 and the pair GEMM everywhere; the VNNI GEMM too where the CPU has it (each row names its kernels)."""
    from llmcc.targets import host_cpu

    r = _run(ROOT / "tools" / "bench_w8a8_gemm.py", "--rows", "9", "--shapes", "32x48")
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = [line for line in r.stdout.splitlines() if line.startswith("| 32 x 48 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    vnni = host_cpu().model().int8_dot
    assert len(cells) == (11 if vnni else 8) and float(cells[2]) > 0 and float(cells[4]) > 0
    if host_cpu().model().int16_madd:
        assert "w8a8_gemm_avx2" in cells[-1] and ("w8a8_gemm_vnni" in cells[-1]) == vnni


def test_mac_throughput_probe_builds_and_runs(tmp_path):
    import shutil

    import pytest

    from llmcc.targets import host_cpu

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not host_cpu().model().int16_madd:
        pytest.skip("needs a C compiler and an AVX2 CPU")
    exe = tmp_path / "mac_throughput"
    subprocess.run([cc, "-O2", "-mavx2", "-mfma", str(ROOT / "tools" / "mac_throughput.c"), "-o", str(exe)],
                   check=True, timeout=120)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("GMAC/s on one core: float32 FMA") and "vpmaddwd" in out and "VNNI" not in out
    if host_cpu().model().int8_dot:  # built for VNNI, it times vpdpwssd and vpdpbusd too
        subprocess.run([cc, "-O2", "-mavx2", "-mfma", "-mavx512vnni", "-mavx512vl",
                        str(ROOT / "tools" / "mac_throughput.c"), "-o", str(exe)], check=True, timeout=120)
        out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120).stdout
        assert "VNNI: int16 vpdpwssd" in out and "vpdpbusd" in out
