"""The model zoo: every ONNX file matches its torch module, and the cache, inputs and errors behave.

All exports go to one temporary cache for the session (the whole zoo exports in well under two minutes on 2 cores).
Tolerance for fp32 ONNX Runtime vs torch: max |onnx - torch| / max |torch| <= 1e-4, per output.
"""

import copy
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from llmcc import zoo
from llmcc.errors import LlmccError

RTOL = 1e-4

ONNX_DTYPES = {"int64": onnx.TensorProto.INT64, "float32": onnx.TensorProto.FLOAT}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("llmcc-cache")


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch_run(module, feeds):
    with torch.no_grad():
        return [t.numpy() for t in module(*(torch.from_numpy(v) for v in feeds.values()))]


def _rel_err(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _batches(model):
    return (1, 2) if "batch" in model.dynamic_dims else (model.inputs[0].shape[0],)


def _dims(value_info):
    return tuple(d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim)


# --- every model: ONNX vs torch ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_onnx_matches_torch(name, cache_dir):
    """ONNX Runtime agrees with torch_module for every listed seq_len, at batch 1 and 2 where batch is dynamic."""
    model = zoo.get(name)
    sess = _session(zoo.onnx_path(name, cache_dir))
    module = zoo.torch_module(name)
    assert not module.training
    for seq_len in model.seq_lens:
        for batch in _batches(model):
            feeds = zoo.sample_inputs(name, seq_len, batch)
            got = sess.run(None, feeds)
            want = _torch_run(module, feeds)
            assert len(got) == len(want) == len(model.outputs)
            for spec, g, w in zip(model.outputs, got, want):
                assert g.shape == w.shape, (spec.name, seq_len, batch)
                assert _rel_err(g, w) <= RTOL, (spec.name, seq_len, batch, _rel_err(g, w))


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_onnx_signature_matches_spec(name, cache_dir):
    """One self-contained file whose inputs/outputs carry the spec's names, dtypes and (symbolic) shapes."""
    model = zoo.get(name)
    path = zoo.onnx_path(name, cache_dir)
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    for specs, infos in ((model.inputs, proto.graph.input), (model.outputs, proto.graph.output)):
        assert [s.name for s in specs] == [i.name for i in infos]
        for spec, info in zip(specs, infos):
            assert info.type.tensor_type.elem_type == ONNX_DTYPES[spec.dtype], spec.name
            assert _dims(info) == spec.shape, spec.name
    symbolic = {d for i in proto.graph.input for d in _dims(i) if isinstance(d, str)}
    assert symbolic == set(model.dynamic_dims)


# --- the graphs are the HF models -----------------------------------------------------------------------------------


def test_mistral_sliding_window_is_in_the_onnx_graph(cache_dir):
    """At seq 64 > window 16 the exported logits follow the window: equal to full causal attention for the first 16
    positions, different after."""
    module = zoo.torch_module("mistral")
    window = module.hf.config.sliding_window
    assert window == 16
    feeds = zoo.sample_inputs("mistral", 64, batch=1)
    (got,) = _session(zoo.onnx_path("mistral", cache_dir)).run(None, feeds)
    module.hf.config.sliding_window = None  # HF's plain causal mask from here on
    with torch.no_grad():
        full = module.hf(input_ids=torch.from_numpy(feeds["input_ids"]), use_cache=False).logits.numpy()
    per_position = np.abs(got - full).max(axis=(0, 2)) / np.abs(full).max()
    assert per_position[:window].max() <= RTOL
    assert per_position[window:].min() > 100 * RTOL


def test_decode_step_continues_prefill(cache_dir):
    """llama-decode with the KV cache of a prefix gives llama-gqa's logits for the next token (ONNX and torch)."""
    prefill = zoo.torch_module("llama-gqa").hf
    step = zoo.torch_module("llama-decode")
    ids = torch.from_numpy(zoo.sample_inputs("llama-gqa", 12, batch=2)["input_ids"])
    with torch.no_grad():
        full = prefill(input_ids=ids, use_cache=True)
        prefix = prefill(input_ids=ids[:, :-1], use_cache=True)
    cache = getattr(prefix, "cache", None) or prefix.past_key_values
    past = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    feeds = dict(zip(zoo.get("llama-decode").input_names, [t.numpy() for t in (ids[:, -1:], *past)]))

    want_logits = full.logits[:, -1:].numpy()
    full_cache = getattr(full, "cache", None) or full.past_key_values
    want_present = [t.numpy() for layer in full_cache.layers for t in (layer.keys, layer.values)]
    for got in (_torch_run(step, feeds), _session(zoo.onnx_path("llama-decode", cache_dir)).run(None, feeds)):
        assert _rel_err(got[0], want_logits) <= RTOL
        for g, w in zip(got[1:], want_present):
            assert _rel_err(g, w) <= RTOL


def test_minilm_has_the_real_weights(cache_dir):
    """The ONNX sentence embedding equals SentenceTransformer.encode on real text, and ranks similar sentences."""
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(zoo.minilm_dir()), device="cpu")
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    want = model.encode(texts, convert_to_numpy=True)
    tokens = model.tokenize(texts)
    feeds = {k: tokens[k].numpy().astype(np.int64) for k in zoo.get("minilm").input_names}
    _, got = _session(zoo.onnx_path("minilm", cache_dir)).run(None, feeds)
    assert _rel_err(got, want) <= RTOL
    sims = got @ got.T
    assert sims[0, 1] > 0.5 > sims[0, 2]


def test_bigbird_really_is_block_sparse():
    """At 256 tokens HF keeps block-sparse attention (no silent fallback), deterministic in eval, and it differs
    from full attention with the same weights."""
    module = zoo.torch_module("bigbird")
    args = [torch.from_numpy(v) for v in zoo.sample_inputs("bigbird", 256).values()]
    full = copy.deepcopy(module)
    full.hf.set_attention_type("original_full")
    with torch.no_grad():
        (a,) = module(*args)
        (b,) = module(*args)
        dense = full.hf(input_ids=args[0], attention_mask=args[1]).last_hidden_state
    assert module.hf.attention_type == "block_sparse"
    assert torch.equal(a, b)
    assert (a - dense).abs().max() > 1e-3


# --- registry, inputs, cache ------------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_names(cache_dir):
    calls = (lambda: zoo.get("nope"), lambda: zoo.onnx_path("nope", cache_dir), lambda: zoo.sample_inputs("nope", 8))
    for call in calls:
        with pytest.raises(LlmccError) as err:
            call()
        assert "nope" in str(err.value)
        assert all(name in str(err.value) for name in zoo.ZOO)


def test_registry_entries_are_consistent():
    for name, model in zoo.ZOO.items():
        assert model.name == name
        assert len(model.seq_lens) >= (3 if model.seq_dim else 1)
        assert all(1 <= s <= model.max_seq_len for s in model.seq_lens)
        assert set(model.dynamic_dims) <= {d for s in model.inputs for d in s.shape if isinstance(d, str)}
    assert zoo.get("llama-gqa").config["hf"]["num_key_value_heads"] < zoo.get("llama-gqa").config["hf"][
        "num_attention_heads"
    ]


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_sample_inputs_fit_the_spec(name):
    model = zoo.get(name)
    seq_len, batch = model.seq_lens[-1], _batches(model)[-1]
    feeds = zoo.sample_inputs(name, seq_len, batch)
    assert list(feeds) == list(model.input_names)
    for spec in model.inputs:
        value = feeds[spec.name]
        expected = tuple({"batch": batch, model.seq_dim: seq_len}.get(d, d) for d in spec.shape)
        assert value.shape == expected and value.dtype == np.dtype(spec.dtype), spec.name
        if spec.kind == "token_ids":
            assert 0 <= value.min() and value.max() < model.vocab_size
        if spec.kind == "mask":
            assert set(np.unique(value)) <= {0, 1} and value.sum(axis=1).min() >= 1
            assert np.all(np.diff(value, axis=1) <= 0)  # right padding
            assert np.all(feeds["input_ids"][value == 0] == 0)
    again = zoo.sample_inputs(name, seq_len, batch)
    other = zoo.sample_inputs(name, seq_len, batch, seed=123)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)
    assert not all(np.array_equal(feeds[k], other[k]) for k in feeds)


def test_sample_inputs_refuse_invalid_shapes():
    with pytest.raises(LlmccError, match="fixed sequence length"):
        zoo.sample_inputs("bigbird", 128)
    with pytest.raises(LlmccError, match="fixed batch"):
        zoo.sample_inputs("bigbird", 256, batch=2)
    with pytest.raises(LlmccError, match="seq_len"):
        zoo.sample_inputs("gpt2", 0)
    with pytest.raises(LlmccError, match="seq_len"):
        zoo.sample_inputs("gpt2", 10_000)


def test_torch_module_is_reproducible_and_leaves_the_rng_alone():
    state = torch.random.get_rng_state()
    a, b = zoo.torch_module("llama").state_dict(), zoo.torch_module("llama").state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cache_hit_does_not_rebuild(cache_dir, monkeypatch):
    path = zoo.onnx_path("gpt2", cache_dir)
    assert path.parent == cache_dir / "zoo" and path.name.startswith("gpt2-")
    stat = path.stat()

    def no_export(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(zoo, "_export", no_export)
    assert zoo.onnx_path("gpt2", cache_dir) == path
    monkeypatch.setenv("LLMCC_CACHE", str(cache_dir))  # the default cache dir comes from $LLMCC_CACHE
    assert zoo.onnx_path("gpt2") == path
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    assert not list(path.parent.glob("*.tmp"))  # no temporary files left behind


def test_cache_key_follows_zoo_version_and_config(monkeypatch):
    model = zoo.get("gpt2")
    key = zoo._cache_key(model)
    assert zoo._cache_key(model) == key
    changed = dataclasses.replace(model, config={**model.config, "hf": {**model.config["hf"], "n_layer": 3}})
    assert zoo._cache_key(changed) != key
    monkeypatch.setattr(zoo, "ZOO_VERSION", zoo.ZOO_VERSION + "-next")
    assert zoo._cache_key(model) != key


def test_failed_export_leaves_no_file(tmp_path, monkeypatch):
    def broken(model, module, dest):
        dest.write_bytes(b"half a model")
        raise RuntimeError("exporter blew up")

    monkeypatch.setattr(zoo, "_export", broken)
    with pytest.raises(RuntimeError, match="blew up"):
        zoo.onnx_path("gpt2", tmp_path)
    assert not [p for p in (tmp_path / "zoo").iterdir() if not p.name.endswith(".lock")]
