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
