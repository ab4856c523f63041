"""The command line: compile, run, inspect; every bad input is one line, exit code 2, and leaves nothing behind."""

import json

import numpy as np
import pytest

from helpers import VOCAB, run_cli


def test_compile_run_inspect(tiny_onnx, tmp_path):
    out = tmp_path / "t.llmcc"
    r = run_cli("compile", tiny_onnx, "--target", "cpu", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "verify: PASSED" in r.stdout
    ids = np.random.default_rng().integers(0, VOCAB, (1, 8)).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    r = run_cli("run", out, "--input", f"input_ids={tmp_path / 'ids.npy'}", "--random", "--repeat", "2")
    assert r.returncode == 0, r.stderr
    assert "output probs: float32 [1, 8, 16]" in r.stdout and "latency" in r.stdout
    r = run_cli("inspect", out, "--json")
    report = json.loads(r.stdout)
    assert report["inputs"][0]["shape"] == ["batch", "sequence"] and report["verify"]["passed"]
    r = run_cli("inspect", out)
    assert "input     input_ids: int64['batch', 'sequence']" in r.stdout


def test_default_output_path_is_beside_the_model(tiny_onnx, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_onnx.read_bytes())
    r = run_cli("compile", model, "--no-verify")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.llmcc" / "manifest.json").exists()
    assert "not verified" in r.stdout


def _bad(tmp_path):
    (tmp_path / "text.onnx").write_text("this is not a model")
    return tmp_path


@pytest.mark.parametrize("make_args,message", [
    (lambda d, m: ["compile", d / "missing.onnx", "-o", d / "o.llmcc"], "missing.onnx: no such file"),
    (lambda d, m: ["compile", d / "text.onnx", "-o", d / "o.llmcc"], "text.onnx: not a readable ONNX model"),
    (lambda d, m: ["compile", d / "trunc.onnx", "-o", d / "o.llmcc"], "trunc.onnx: not a readable ONNX model"),
    (lambda d, m: ["compile", m, "--target", "tpu", "-o", d / "o.llmcc"], "invalid choice: 'tpu'"),
    (lambda d, m: ["compile", m, "--quant", "int3", "-o", d / "o.llmcc"], "invalid choice: 'int3'"),
    (lambda d, m: ["compile", d / "custom.onnx", "-o", d / "o.llmcc"],
     "unsupported ONNX op com.example.FancyAttention (node 'fancy_0', opset 18)"),
    (lambda d, m: ["compile", m, "-o", m], "that is the input model"),
    (lambda d, m: ["run", d / "nothing.llmcc"], "nothing.llmcc: no such artifact"),
])
def test_bad_input_is_one_line_exit_2_no_partial_artifact(tiny_onnx, tmp_path, make_args, message):
    import onnx
    from onnx import helper

    d = _bad(tmp_path)
    raw = tiny_onnx.read_bytes()
    (d / "trunc.onnx").write_bytes(raw[: len(raw) // 3])
    model = onnx.load(str(tiny_onnx))
    model.graph.node.append(helper.make_node("FancyAttention", ["probs"], ["z"], name="fancy_0",
                                             domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(model, str(d / "custom.onnx"))
    m = d / "m.onnx"
    m.write_bytes(raw)
    before = {p.name for p in d.iterdir()}
    r = run_cli(*make_args(d, m))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("llmcc") or ln.startswith("usage")]
    assert "Traceback" not in r.stderr and len(lines) >= 1
    if not make_args(d, m)[0].startswith("-") and "invalid choice" not in message:
        assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
    assert {p.name for p in d.iterdir()} == before  # no artifact, no temp folder
    assert m.read_bytes() == raw                   # the user's model untouched


def test_wrong_run_input_is_one_line(tiny_artifact, tmp_path):
    np.save(tmp_path / "ids.npy", np.zeros((1, 4), np.int32))
    r = run_cli("run", tiny_artifact, "--input", f"input_ids={tmp_path / 'ids.npy'}", "--random")
    assert r.returncode == 2
    assert r.stderr.strip() == "llmcc: error: input 'input_ids': dtype int32, the model takes int64"


def test_compile_says_what_attention_fusion_did(tmp_path):
    """The summary names each attention kind, how many sites fused and into which kernel; --no-fuse-attention keeps
    the exported ops (no sites in the report)."""
    from llmcc import zoo

    path = zoo.onnx_path("llama")
    r = run_cli("compile", path, "-o", tmp_path / "f.llmcc")
    assert r.returncode == 0, r.stderr
    assert "attention: causal: 2 of 2 sites fused (flash_attention_cpu)" in r.stdout, r.stdout
    assert "attention causal: 2 of 2 sites fused" in run_cli("inspect", tmp_path / "f.llmcc").stdout
    # and which rule scheduled how many kernels; the hand-scheduled flash kernels count as their own
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("schedules: "))
    counts = dict(part.rsplit(" ", 1) for part in line.removeprefix("schedules: ").split(", "))
    assert int(counts["its own (llmcc.kernels)"]) >= 1 and int(counts["CpuMatmul"]) >= 4, line
    r = run_cli("compile", path, "-o", tmp_path / "u.llmcc", "--no-fuse-attention")
    assert r.returncode == 0, r.stderr
    assert "attention:" not in r.stdout and "verify: PASSED" in r.stdout
    report = json.loads(run_cli("inspect", tmp_path / "u.llmcc", "--json").stdout)
    assert report["attention"] == [] and not any(k["name"].startswith("flash_attention") for k in report["kernels"])


def test_demo_without_cuda_says_what_it_did():
    r = run_cli("demo", "--no-cuda")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo: OK" in r.stdout and "verify: passed=True" in r.stdout
    assert "attention causal+gqa: 2 of 2 sites fused (flash_attention_cpu)" in r.stdout, r.stdout
