"""Calling a compiled module: numpy and torch in, the right type out, bad inputs refused in one line."""

import numpy as np
import pytest
import torch

from helpers import tiny_feed, tiny_reference
from llmcc.errors import InputError

RTOL = 1e-5  # fp32, relative Frobenius error vs onnxruntime


def rel(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 9), (3, 40)])
def test_numpy_matches_onnxruntime_at_many_lengths(tiny_module, tiny_onnx, batch, seq):
    feed = tiny_feed(np.random.default_rng(), batch, seq)
    out = tiny_module(**feed)
    assert isinstance(out, np.ndarray) and out.shape == (batch, seq, 16)
    assert rel(out, tiny_reference(tiny_onnx, feed)) <= RTOL


def test_torch_in_torch_out_and_positional(tiny_module, tiny_onnx):
    feed = tiny_feed(np.random.default_rng(), 2, 5)
    ids, mask = torch.from_numpy(feed["input_ids"]).clone(), torch.from_numpy(feed["mask"]).clone()
    out = tiny_module(ids, mask)
    assert isinstance(out, torch.Tensor)
    assert rel(out.numpy(), tiny_reference(tiny_onnx, feed)) <= RTOL


def test_misaligned_or_strided_torch_input_is_copied(tiny_module, tiny_onnx):
    feed = tiny_feed(np.random.default_rng(), 2, 6)
    wide = torch.zeros(2, 12, dtype=torch.int64)
    wide[:, ::2] = torch.from_numpy(feed["input_ids"])
    out = tiny_module(input_ids=wide[:, ::2], mask=torch.from_numpy(feed["mask"]))  # non-contiguous view
    assert rel(out.numpy(), tiny_reference(tiny_onnx, feed)) <= RTOL


def test_run_returns_outputs_by_name(tiny_module):
    outs = tiny_module.run(**tiny_feed(np.random.default_rng(), 1, 3))
    assert list(outs) == ["probs"]


@pytest.mark.parametrize("mutate,message", [
    (lambda f: {**f, "input_idz": f["input_ids"]}, "unknown input 'input_idz'"),
    (lambda f: {"mask": f["mask"]}, "missing input(s): input_ids"),
    (lambda f: {**f, "input_ids": f["input_ids"].astype(np.int32)}, "input 'input_ids': dtype int32"),
    (lambda f: {**f, "input_ids": f["input_ids"][0]}, "input 'input_ids': rank 1"),
    (lambda f: {**f, "mask": f["mask"][:, :2]}, "input 'mask': dim 1 (sequence) is 2"),
    (lambda f: {**f, "mask": [[1.0]]}, "input 'mask': expected a numpy array or torch tensor"),
    (lambda f: {**f, "input_ids": f["input_ids"] + 50}, "input 'input_ids': values must lie in [0, 50)"),
])
def test_bad_inputs_name_the_culprit(tiny_module, mutate, message):
    feed = tiny_feed(np.random.default_rng(), 2, 4)
    with pytest.raises(InputError) as info:
        tiny_module(**mutate(feed))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_too_many_positional_inputs(tiny_module):
    feed = tiny_feed(np.random.default_rng(), 1, 2)
    with pytest.raises(InputError, match="3 positional inputs given"):
        tiny_module(feed["input_ids"], feed["mask"], feed["mask"])


def test_report_contract(tiny_module):
    r = tiny_module.report
    assert r["target"] == "cpu"
    assert r["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}
    assert r["outputs"][0]["shape"] == ["batch", "sequence", 16]
    assert all(set(p) >= {"name", "rewrites"} for p in r["passes"])
    fired = {p["name"]: p["rewrites"] for p in r["passes"]}
    assert fired["lift_weights"] == 2 and fired["fuse_ops"] >= 1  # emb and w are lifted; b is below the size cut
    v = r["verify"]
    assert v["passed"] is True and v["rel_err"] <= 1e-5 and v["reference"].startswith("onnxruntime")
    assert len(v["cases"]) == 3 and len({c["sequence"] for c in v["cases"]}) == 3
    assert {"import", "lower", "build"} <= set(r["timings"])


def test_device_ms_times_the_compiled_call_and_checks_inputs_first(tiny_module):
    feed = tiny_feed(np.random.default_rng(), 2, 7)
    ms = tiny_module.device_ms(**feed, number=3, repeat=2)
    assert isinstance(ms, float) and 0 < ms < float("inf")
    with pytest.raises(InputError, match="input 'input_ids': dtype int32"):
        tiny_module.device_ms(**{**feed, "input_ids": feed["input_ids"].astype(np.int32)})
