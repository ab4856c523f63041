"""The Triton sliding-window kernel embedded in compiled CUDA modules as an AOT cubin (llmcc.kernels.triton_embed).

No GPU here: checks the PrimFunc's signature against flash_attention_cuda's, the routing, the mistral zoo model's
report and binary for sm_80 and sm_90, and that the exported library loads without Triton up to needing a GPU.
Numerics on a GPU: tools/gpu_check_attention.py (its triton rows)."""

import json
import re
import subprocess
import sys
import textwrap

import pytest

import llmcc
import llmcc.targets
from llmcc import cuda, zoo
from llmcc.kernels import sliding_window_attention  # noqa: F401  (triton imported now, before the interpret fixture)
from llmcc.kernels import triton_embed
from llmcc.kernels.flash_attention import AttentionSpec, flash_attention_kernel
from llmcc.kernels.flash_attention_cuda import flash_attention_cuda

MISTRAL = dict(num_heads=8, num_kv_heads=2, head_dim=16, value_dim=16, scale=0.25, causal=True, window=16,
               q_layout="bnsd", k_layout="bnsd", v_layout="bsnd", out_layout="bsnd")


def _signature(func) -> str:
    """The ``def main(...)`` line of a PrimFunc's script: parameter names aside, buffers, shapes and dtypes."""
    line = next(l for l in func.script().splitlines() if l.startswith("def "))
    return re.sub(r"\b\w+: T\.Buffer", "T.Buffer", line)


@pytest.mark.parametrize("spec", [
    AttentionSpec(**MISTRAL),
    AttentionSpec(**{**MISTRAL, "q_len": 1, "dtype": "float16", "head_dim": 64, "value_dim": 64}),
    AttentionSpec(**{**MISTRAL, "k_layout": "bnds", "q_layout": "bsnd", "out_layout": "bnsd", "v_layout": "bnsd",
                     "num_kv_heads": 8, "dtype": "bfloat16", "head_dim": 128, "value_dim": 128}),
], ids=["mistral", "decode-fp16", "bnds-bf16"])
def test_parameters_match_flash_attention_cuda(spec, aot_env):
    func = triton_embed.sliding_window_attention_func(spec, "sm_80")
    assert _signature(func) == _signature(flash_attention_cuda(spec, "sm_80"))
    assert func.attrs["tirx.is_scheduled"] and int(func.attrs["op_pattern"]) == 8
    name = str(func.attrs[triton_embed.ATTR_NAME])
    assert name.startswith("llmcc_triton_swa_") and f'T.call_packed("{name}"' in func.script()
    # 4 pointers + 16 strides + 7 scalars + Triton's 2 scratch pointers, matching the cubin's .param list
    assert len(json.loads(str(func.attrs[triton_embed.ATTR_ARG_TYPES]))) == 29


def test_routing(aot_env):
    sm80, cpu = llmcc.targets.resolve("cuda:sm_80"), llmcc.targets.resolve("cpu")
    spec = AttentionSpec(**MISTRAL)
    assert flash_attention_kernel(spec, sm80)[0] == "triton"
    assert flash_attention_kernel(spec, cpu)[0] == "flash_attention_cpu"
    masked = AttentionSpec(**MISTRAL, bias=(False, True, False))  # a bias tensor: the TIR kernel adds it
    assert flash_attention_kernel(masked, sm80)[0] == "flash_attention_cuda"
    assert "bias" in triton_embed.sliding_window_unsupported(masked)
    causal = AttentionSpec(**{**MISTRAL, "window": None})
    assert flash_attention_kernel(causal, sm80)[0] == "flash_attention_cuda"


_LOAD_WITHOUT_TRITON = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # any import of triton now raises ImportError
    import llmcc, tvm
    from llmcc.errors import DeviceUnavailable
    art = sys.argv[1]
    lib = tvm.runtime.load_module(art + "/model.so")  # deserialises the cubin module (no GPU needed yet)
    mods = []
    def walk(m):
        mods.append(m)
        for i in m.imports:
            walk(i)
    walk(lib)
    kinds = [m.kind for m in mods]
    assert any(m.implements_function(sys.argv[2]) for m in mods if m.kind == "cuda"), kinds
    try:
        llmcc.load(art)
        print("LOADED")
    except DeviceUnavailable as e:
        print("NEEDS GPU:", e)
    assert not any(k == "triton" or k.startswith("triton.") for k in sys.modules if sys.modules[k] is not None)
    print("OK", kinds)
""")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_mistral_sliding_window_sites_run_triton(arch, aot_env, tmp_path):
    module = llmcc.compile(zoo.onnx_path("mistral"), target=f"cuda:{arch}")
    sites = module.report["attention"]
    window = [s for s in sites if s["kind"].startswith("sliding_window")]
    assert window and all(s["fused"] and s["kernel"] == "triton" and not s["reason"] for s in window)

    art = module.save(tmp_path / "m.llmcc")
    info = cuda.cuda_binary_info(art / "model.so")
    names = [n for n in info["kernel_names"] if n.startswith("llmcc_triton_swa_")]
    assert len(names) == 1, info["kernel_names"]
    assert names[0] in info["sass_kernels"][arch]  # the Triton cubin's SASS, for this arch
    assert info["sass_archs"] == [arch] and info["modules"].count("cuda") == 2
    assert not any(n.startswith("flash_attention") for n in info["kernel_names"])

    run = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_TRITON, str(art), names[0]], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr[-3000:]
    if cuda.gpu_arch() is None:
        assert "NEEDS GPU:" in run.stdout and f"compiled for cuda:{arch}" in run.stdout


def test_a_mask_that_is_not_the_window_keeps_the_tir_kernel(aot_env):
    """A window site whose mask also reads a model input (padding) keeps flash_attention_cuda and says why."""
    import numpy as np
    from tvm import relax

    from llmcc.passes.fuse_attention import FuseAttention

    B, H, S, D = 1, 2, 8, 16
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((B, H, S, D), "float32"))
    k = relax.Var("k", relax.TensorType((B, H, S, D), "float32"))
    v = relax.Var("v", relax.TensorType((B, H, S, D), "float32"))
    pad = relax.Var("pad", relax.TensorType((B, 1, 1, S), "float32"))
    with bb.function("main", [q, k, v, pad]):
        with bb.dataflow():
            pos = bb.emit(relax.op.arange(0, S, 1, "int64"))
            rows = bb.emit(relax.op.reshape(pos, (S, 1)))
            cols = bb.emit(relax.op.reshape(pos, (1, S)))
            causal = bb.emit(relax.op.less_equal(cols, rows))
            lo = bb.emit(relax.op.subtract(rows, relax.const(4, "int64")))
            inside = bb.emit(relax.op.greater(cols, lo))
            visible = bb.emit(relax.op.logical_and(causal, inside))
            mask = bb.emit(relax.op.where(visible, relax.const(0.0, "float32"), relax.const(-3.4e38, "float32")))
            mask = bb.emit(relax.op.reshape(mask, (1, 1, S, S)))
            mask = bb.emit(relax.op.add(mask, pad))
            kt = bb.emit(relax.op.permute_dims(k, [0, 1, 3, 2]))
            s = bb.emit(relax.op.matmul(q, kt))
            s = bb.emit(relax.op.multiply(s, relax.const(np.float32(0.25))))
            s = bb.emit(relax.op.add(s, mask))
            p = bb.emit(relax.op.nn.softmax(s, axis=-1))
            out = bb.emit_output(relax.op.matmul(p, v))
        bb.emit_func_output(out)
    p = FuseAttention(llmcc.targets.resolve("cuda:sm_80"))
    p(bb.get())
    assert p.rewrites == 1
    (site,) = p.sites
    assert site["kind"].startswith("sliding_window") and site["kernel"] == "flash_attention_cuda"
    assert "not triton" in site["reason"]
