"""A model whose attention mask is a constant block-sparse pattern (a BigBird-style layout kept as a buffer, as
Sparse-Transformer-like models do), traced from torch and compiled end to end.

CPU: the site is kind "block_sparse", the flash kernel walks only the visible tiles, and the module matches torch
(fp32, relative error <= 1e-5) and onnxruntime (the compile's own check). CUDA (cross-compiled, no GPU): the site
runs the Triton block-sparse kernel, embedded as a cubin; a mask that is not uniform in blocks keeps
flash_attention_cuda with the mask and says why. Must-not-fire: a mask with no hidden tile stays an ordinary masked
site."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from test_triton_embed import _LOAD_WITHOUT_TRITON

import llmcc
from llmcc import cuda
from llmcc.frontend.torch_trace import trace
from llmcc.kernels import block_sparse_attention as bsa

SEQ, HIDDEN, HEADS = 256, 64, 2


class BlockSparseSelfAttention(torch.nn.Module):
    """One pre-norm attention layer whose [S, S] visibility is a fixed buffer (per head when ``keep`` is 3-D)."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.qkv = torch.nn.Linear(HIDDEN, 3 * HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, HIDDEN)
        self.register_buffer("keep", keep)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, HEADS, HIDDEN // HEADS).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.keep)
        return x + self.out(y.transpose(1, 2).reshape(b, s, HIDDEN))


def _export(keep, tmp_path, seed):
    torch.manual_seed(seed)
    model = BlockSparseSelfAttention(keep).eval()
    x = torch.randn(1, SEQ, HIDDEN)
    path = tmp_path / "block_sparse.onnx"
    path.write_bytes(trace(model, (x,), dynamic=False).SerializeToString())
    return model, path


def _bigbird_keep(block: int, seed: int, per_head: bool) -> torch.Tensor:
    layout = bsa.bigbird_layout(SEQ // block, 3, 2, 1, seed=seed, num_heads=HEADS if per_head else 1)
    keep = bsa.layout_token_mask(layout, block, SEQ, SEQ)
    return keep if per_head else keep[0]


@pytest.mark.parametrize("block,per_head", [(32, False), (32, True), (16, False)])
def test_cpu_walks_the_layout_and_matches_torch(block, per_head, seed, tmp_path):
    model, path = _export(_bigbird_keep(block, seed, per_head), tmp_path, seed)
    module = llmcc.compile(path, target="cpu")
    (site,) = module.report["attention"]
    assert site["fused"] and site["kind"] == "block_sparse" and site["kernel"] == "flash_attention_cpu"
    assert module.report["verify"]["passed"]
    x = np.random.default_rng(seed).standard_normal((1, SEQ, HIDDEN)).astype(np.float32)
    out = module(x)
    ref = model(torch.from_numpy(x)).detach().numpy()
    assert np.abs(np.asarray(out) - ref).max() / np.abs(ref).max() <= 1e-5


def test_a_mask_with_nothing_hidden_is_no_layout(seed, tmp_path):
    keep = torch.rand(SEQ, SEQ, generator=torch.Generator().manual_seed(seed)) < 0.7
    keep[torch.arange(SEQ), torch.arange(SEQ)] = True  # token-level: every 32 x 32 tile shows something
    _, path = _export(keep, tmp_path, seed)
    module = llmcc.compile(path, target="cpu")
    (site,) = module.report["attention"]
    assert site["fused"] and site["kind"] != "block_sparse"
    assert module.report["verify"]["passed"]


def test_cuda_runs_the_triton_kernel(aot_env, seed, tmp_path):
    _, path = _export(_bigbird_keep(32, seed, False), tmp_path, seed)
    module = llmcc.compile(path, target="cuda:sm_80")
    (site,) = module.report["attention"]
    assert site["fused"] and site["kind"] == "block_sparse" and site["kernel"] == "triton" and not site["reason"]
    art = module.save(tmp_path / "m.llmcc")
    info = cuda.cuda_binary_info(art / "model.so")
    names = [n for n in info["kernel_names"] if n.startswith("llmcc_triton_bsa_")]
    assert len(names) == 1 and names[0] in info["sass_kernels"]["sm_80"]
    # the artifact loads without Triton (up to needing a GPU here)
    run = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_TRITON, str(art), names[0]], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr[-3000:]


def test_cuda_keeps_the_mask_when_blocks_are_not_uniform(aot_env, seed, tmp_path):
    keep = _bigbird_keep(32, seed, False).clone()
    keep[5, 200] = ~keep[5, 200]  # one token off the block pattern
    _, path = _export(keep, tmp_path, seed)
    module = llmcc.compile(path, target="cuda:sm_80")
    (site,) = module.report["attention"]
    assert site["fused"] and site["kind"] == "block_sparse" and site["kernel"] == "flash_attention_cuda"
    assert "not uniform" in site["reason"]
