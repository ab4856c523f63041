"""torch.nn.Module in: traced with torch's default exporter, symbolic batch and sequence kept, checked vs eager."""

import numpy as np
import pytest
import torch

import llmcc
from llmcc.errors import ImportFailure


class MLPBlock(torch.nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, 4 * d)
        self.down = torch.nn.Linear(4 * d, d)

    def forward(self, hidden):
        return hidden + self.down(torch.nn.functional.gelu(self.up(self.norm(hidden))))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def mlp_module():
    torch.manual_seed(0)
    block = MLPBlock().eval()
    return block, llmcc.compile(block, example_inputs=(torch.randn(2, 8, 32),), target="cpu")


def test_traced_module_keeps_symbolic_dims(mlp_module):
    _, compiled = mlp_module
    assert compiled.inputs[0].name == "hidden"
    assert compiled.inputs[0].shape == ("batch", "sequence", 32)
    assert compiled.report["verify"]["passed"]


@pytest.mark.parametrize("batch,seq", [(1, 1), (3, 5), (2, 64)])
def test_traced_module_matches_eager(mlp_module, batch, seq):
    block, compiled = mlp_module
    x = torch.randn(batch, seq, 32)
    with torch.no_grad():
        ref = block(x)
    out = compiled(x)
    assert isinstance(out, torch.Tensor)
    assert rel(out.numpy(), ref.numpy()) <= 1e-5


def test_untraceable_module_fails_in_one_line():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on data: torch.export refuses it
                return x * 2
            return x

    with pytest.raises(ImportFailure) as info:
        llmcc.compile(DataDependent(), example_inputs=(torch.randn(2, 3),), target="cpu")
    assert str(info.value).startswith("cannot trace DataDependent to ONNX:")
    assert "\n" not in str(info.value)


def test_torch_module_needs_example_inputs():
    with pytest.raises(ImportFailure, match="needs example_inputs"):
        llmcc.compile(MLPBlock(), target="cpu")


def test_qwen2_from_a_batch_one_example(seed):
    """A transformers Qwen2 (GQA, qkv biases) traced from a batch-1 example: the batch stays static (torch.export
    specializes a size-1 dim), the sequence stays symbolic, attention fuses, and it matches torch at other lengths."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    wrapped = Logits(hf).eval()
    example = torch.randint(0, 500, (1, 24))
    module = llmcc.compile(wrapped, example_inputs=(example,))
    assert tuple(module.inputs[0].shape) == (1, "sequence"), module.inputs[0].shape
    assert [(s["kind"], s["fused"]) for s in module.report["attention"]] == [("causal+gqa", True)] * 2
    rng = np.random.default_rng(seed)
    for seq in (1, 9, 40):
        ids = torch.from_numpy(rng.integers(0, 500, (1, seq)))
        with torch.no_grad():
            ref = wrapped(ids).numpy()
        assert rel(module(ids.numpy()), ref) <= 1e-5, f"seed {seed} seq {seq}"
