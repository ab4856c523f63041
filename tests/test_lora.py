"""LoRA: PEFT adapters merged into the compiled model.

Adapters are real PEFT folders (get_peft_model + save_pretrained) with random, non-zero lora_B
(init_lora_weights=False), so every merge changes the output (checked). The reference is the PeftModel itself in torch,
on fresh random inputs; fp32 tolerance: relative error (Frobenius) <= 1e-5 for compiled modules and for the merged
ONNX graph run by onnxruntime.
"""

import copy
import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import llmcc
from helpers import HIDDEN, VOCAB, make_tiny_mlp, run_cli
from llmcc import lora, zoo
from llmcc.errors import LoraError
from llmcc.verify import relative_error

TOL = 1e-5
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _fresh_seed() -> int:
    return int(np.random.default_rng().integers(1 << 31))


def _peft(hf_model, seed: int, **config):
    """``hf_model`` with a LoRA adapter injected in place (random A and B), as a PeftModel."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(hf_model, LoraConfig(init_lora_weights=False, **config))


def _set_scales(peft_model, scales: dict) -> None:
    """PEFT's own user scale: scaling = scale * lora_alpha / r, what llmcc's 'path:scale' means."""
    from peft.tuners.lora import LoraLayer

    for layer in peft_model.modules():
        if isinstance(layer, LoraLayer):
            for name, scale in scales.items():
                layer.set_scale(name, scale)


def _zoo_reference(name: str, module, seq_len: int = 13):
    """Fresh random zoo inputs and ``module``'s outputs on them."""
    feeds = zoo.sample_inputs(name, seq_len, batch=2, seed=_fresh_seed())
    with torch.no_grad():
        ref = module(*(torch.from_numpy(v) for v in feeds.values()))
    return feeds, [r.numpy() for r in ref]


def _ort(proto: onnx.ModelProto, feeds: dict) -> list:
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _assert_matches(got: list, ref: list, base: list | None = None) -> None:
    for g, r in zip(got, ref):
        assert relative_error(g, r) <= TOL
    if base is not None:  # the adapter really changes the model, so a merge that did nothing would fail
        assert max(relative_error(b, r) for b, r in zip(base, ref)) > 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# Zoo models compiled with adapters: one compile each, shared by the tests that look at it.


@pytest.fixture(scope="module")
def llama_two_adapters(tmp_path_factory):
    """llama with two adapters, PEFT's keys 'model.layers...' against the graph's 'hf.model.layers...' (the zoo
    wrapper's prefix): every Linear at r=4 with user scale 0.5, and q/v at r=2 with rslora and user scale 2."""
    folder = tmp_path_factory.mktemp("llama_lora")
    module = zoo.torch_module("llama")
    peft_model = _peft(module.hf, _fresh_seed(), r=4, lora_alpha=8, target_modules=LLAMA_LINEARS)
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_fresh_seed())
        peft_model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, use_rslora=True, init_lora_weights=False,
                                                    target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(folder)  # the default adapter in folder, the second in folder/second
    peft_model.base_model.set_adapter(["default", "second"])
    _set_scales(peft_model, {"default": 0.5, "second": 2.0})
    compiled = llmcc.compile(zoo.onnx_path("llama"), target="cpu", lora=[f"{folder}:0.5", (folder / "second", 2)])
    return folder, module, compiled


def test_llama_two_adapters_add_up_with_their_scales(llama_two_adapters):
    folder, peft_module, compiled = llama_two_adapters
    assert compiled.report["lora"] == {"adapters": [
        {"path": str(folder), "scale": 0.5, "merged_weights": 14},
        {"path": str(folder / "second"), "scale": 2.0, "merged_weights": 4}]}
    assert compiled.report["verify"]["passed"]  # against onnxruntime on the merged graph
    feeds, ref = _zoo_reference("llama", peft_module)
    base = _ort(onnx.load(str(zoo.onnx_path("llama"))), feeds)
    _assert_matches([compiled(**feeds)], ref, base)


def test_merge_then_int8(llama_two_adapters):
    """Merged in fp32, then quantized: the int8 module stays within int8's budget of the PEFT model (the gate holds
    it on its calibration inputs; fresh inputs get twice that), and the adapter still shows."""
    from llmcc.quant import SCHEMES

    folder, peft_module, _ = llama_two_adapters
    quantized = llmcc.compile(zoo.onnx_path("llama"), quant="int8", lora=[f"{folder}:0.5", (folder / "second", 2)])
    budget = SCHEMES["int8"].max_error
    assert quantized.report["quant"]["error"] <= budget and quantized.report["lora"]["adapters"][0]["merged_weights"]
    feeds, ref = _zoo_reference("llama", peft_module)
    base = _ort(onnx.load(str(zoo.onnx_path("llama"))), feeds)
    got = quantized(**feeds)
    assert relative_error(got, ref[0]) <= 2 * budget
    assert relative_error(base[0], ref[0]) > 4 * budget  # the adapter's effect is far above int8's error


def test_merged_graph_keeps_the_base_graph_and_the_users_model(llama_two_adapters):
    """The adapter costs nothing at run time: the merged graph has the base graph's nodes and weight shapes, only
    weight values change; the caller's ModelProto is not modified."""
    folder, _, _ = llama_two_adapters
    base = onnx.load(str(zoo.onnx_path("llama")))
    untouched = base.SerializeToString()
    merged, _ = lora.merge_adapters(base, lora.read_adapters([folder]))
    assert base.SerializeToString() == untouched
    nodes = [(n.op_type, list(n.input)) for n in base.graph.node]
    assert [(n.op_type, list(n.input)) for n in merged.graph.node] == nodes
    shapes = {t.name: list(t.dims) for t in base.graph.initializer}
    assert {t.name: list(t.dims) for t in merged.graph.initializer} == shapes
    changed = [t.name for t, u in zip(merged.graph.initializer, base.graph.initializer) if t.raw_data != u.raw_data]
    assert len(changed) == 14


def test_gpt2_conv1d_adapter(tmp_path):
    """GPT-2's Conv1D layers (fan_in_fan_out=True, weights kept by name and run by Gemm): c_attn and both c_proj."""
    module = zoo.torch_module("gpt2")
    _peft(module.hf, _fresh_seed(), r=4, lora_alpha=16, fan_in_fan_out=True,
          target_modules=["c_attn", "c_proj"]).save_pretrained(tmp_path)
    compiled = llmcc.compile(zoo.onnx_path("gpt2"), target="cpu", lora=[tmp_path])
    assert compiled.report["lora"]["adapters"][0]["merged_weights"] == 6
    feeds, ref = _zoo_reference("gpt2", module)
    _assert_matches([compiled(**feeds)], ref, _ort(onnx.load(str(zoo.onnx_path("gpt2"))), feeds))


def test_minilm_bert_adapter(tmp_path):
    """BERT's query/key/value and every dense layer of all-MiniLM-L6-v2 (real weights), both outputs compared."""
    module = zoo.torch_module("minilm")
    _peft(module.hf, _fresh_seed(), r=8, lora_alpha=8,
          target_modules=["query", "key", "value", "dense"]).save_pretrained(tmp_path)
    compiled = llmcc.compile(zoo.onnx_path("minilm"), target="cpu", lora=[tmp_path])
    assert compiled.report["lora"]["adapters"][0]["merged_weights"] == 36  # 6 layers x (q, k, v, 3 dense)
    feeds, ref = _zoo_reference("minilm", module)
    _assert_matches(list(compiled(**feeds)), ref, _ort(onnx.load(str(zoo.onnx_path("minilm"))), feeds))


# ---------------------------------------------------------------------------------------------------------------------
# Mapping adapter keys to graph weights (merged graphs run by onnxruntime: no compile needed).


def _strip_metadata(proto: onnx.ModelProto) -> onnx.ModelProto:
    stripped = copy.deepcopy(proto)
    for node in stripped.graph.node:
        del node.metadata_props[:]
    return stripped


def test_without_node_metadata_names_still_map_and_lost_names_are_an_error(tmp_path):
    """GPT-2 keeps its weights' names, so it maps without the exporter's metadata; llama's weights are then only
    'val_N' constants, and the error lists the keys that match nothing."""
    gpt2 = zoo.torch_module("gpt2")
    _peft(gpt2.hf, _fresh_seed(), r=2, lora_alpha=2, fan_in_fan_out=True,
          target_modules=["c_attn"]).save_pretrained(tmp_path / "gpt2")
    merged, report = lora.merge_adapters(_strip_metadata(onnx.load(str(zoo.onnx_path("gpt2")))),
                                         lora.read_adapters(tmp_path / "gpt2"))
    assert report[0]["merged_weights"] == 2
    feeds, ref = _zoo_reference("gpt2", gpt2)
    _assert_matches(_ort(merged, feeds), ref)

    _peft(zoo.torch_module("llama").hf, 0, r=2, lora_alpha=2, target_modules=["q_proj"]).save_pretrained(
        tmp_path / "llama")
    with pytest.raises(LoraError, match=r"2 adapter module\(s\) match no weight of the ONNX graph: "
                                        r"model\.layers\.0\.self_attn\.q_proj, model\.layers\.1\.self_attn\.q_proj"):
        lora.merge_adapters(_strip_metadata(onnx.load(str(zoo.onnx_path("llama")))),
                            lora.read_adapters(tmp_path / "llama"))


def _tiny_onnx(model, legacy: bool) -> onnx.ModelProto:
    ids = torch.randint(0, VOCAB, (2, 7))
    if not legacy:
        from llmcc.frontend.torch_trace import trace

        return trace(model, (ids,))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter is deprecated, and says so
        torch.onnx.export(model, (ids,), buf, dynamo=False, input_names=["input_ids"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}})
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("legacy", [False, True], ids=["dynamo_export", "legacy_export"])
def test_adapter_on_a_wrapper_maps_to_the_inner_models_graph(tmp_path, legacy):
    """The adapter was trained on a wrapper ('base_model.model.inner.blocks.0.up'), the graph exported from the
    inner model ('blocks.0.up'); the legacy exporter records the module only in node names ('/blocks.0/up/MatMul')."""
    inner = make_tiny_mlp()
    proto = _tiny_onnx(inner, legacy)
    wrapper = torch.nn.Module()
    wrapper.inner = copy.deepcopy(inner)
    _peft(wrapper, _fresh_seed(), r=2, lora_alpha=4, target_modules=["up", "down"]).save_pretrained(tmp_path)
    merged, report = lora.merge_adapters(proto, lora.read_adapters(tmp_path))
    assert report[0]["merged_weights"] == 4
    ids = torch.randint(0, VOCAB, (3, 5))
    with torch.no_grad():
        ref = wrapper.inner(ids).numpy()
    _assert_matches(_ort(merged, {proto.graph.input[0].name: ids.numpy()}), [ref])


def _write_adapter(folder, tensors: dict, r: int, alpha: float, **config):
    """An adapter folder written by hand, for graphs PEFT cannot make."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                            **config}))
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))


def test_weight_shared_with_an_unadapted_layer_is_copied(tmp_path):
    """One initializer read by layers 'a' and 'b' (tied weights): an adapter on 'a' changes 'a' only."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng()
    w = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["ya"], name="/a/MatMul"),
         helper.make_node("MatMul", ["x", "w"], ["yb"], name="/b/MatMul")], "tied",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", HIDDEN])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["n", HIDDEN]) for y in ("ya", "yb")],
        [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    a = rng.standard_normal((2, HIDDEN)).astype(np.float32)
    b = rng.standard_normal((HIDDEN, 2)).astype(np.float32)
    _write_adapter(tmp_path, {"base_model.model.a.lora_A.weight": a, "base_model.model.a.lora_B.weight": b}, 2, 6)
    merged, _ = lora.merge_adapters(proto, lora.read_adapters(tmp_path))
    x = rng.standard_normal((5, HIDDEN)).astype(np.float32)
    ya, yb = _ort(merged, {"x": x})
    _assert_matches([ya, yb], [x @ (w + 3.0 * (b @ a).T), x @ w])


# ---------------------------------------------------------------------------------------------------------------------
# Bad adapters: one LoraError naming the folder and the culprit, before anything is compiled.


def test_adapter_spec_parsing(tmp_path):
    assert lora.parse_spec("some/dir:0.25") == (Path("some/dir"), 0.25)
    assert lora.parse_spec("some/dir:-1") == (Path("some/dir"), -1.0)
    assert lora.parse_spec("dir:with:colons") == (Path("dir:with:colons"), 1.0)
    assert lora.parse_spec((tmp_path, 3)) == (tmp_path, 3.0)
    assert lora.parse_spec(tmp_path) == (tmp_path, 1.0)
    with pytest.raises(LoraError, match="scale inf is not finite"):
        lora.parse_spec("dir:inf")
    with pytest.raises(LoraError, match="missing_adapter: no such LoRA adapter folder$"):
        lora.read_adapters(str(tmp_path / "missing_adapter"))
    with pytest.raises(LoraError, match=r"adapter:x: no such LoRA adapter folder \(the text after its last ':' is "
                                        r"not a number"):
        lora.read_adapters(f"{tmp_path / 'adapter'}:x")


def test_shape_mismatch_names_key_initializer_and_shapes(tmp_path):
    """An adapter for llama-gqa (2 KV heads: k_proj is [32, 128]) on llama (k_proj [128, 128])."""
    _peft(zoo.torch_module("llama-gqa").hf, 0, r=2, lora_alpha=2, target_modules=["k_proj"]).save_pretrained(tmp_path)
    with pytest.raises(LoraError, match=r"'model\.layers\.0\.self_attn\.k_proj' gives a \[32, 128\] update .* but ONNX "
                                        r"initializer 'val_\d+' of 'hf\.model\.layers\.0\.self_attn\.k_proj' is "
                                        r"\[128, 128\]"):
        llmcc.compile(zoo.onnx_path("llama"), target="cpu", lora=[tmp_path])


def _llama_adapter(folder):
    _peft(zoo.torch_module("llama").hf, 0, r=2, lora_alpha=2, target_modules=["q_proj"]).save_pretrained(folder)
    return folder


def test_rank_mismatch_and_unmergeable_configs(tmp_path):
    folder = _llama_adapter(tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    for change, message in [({"r": 3}, r"has lora_A \[2, 128\] and lora_B \[128, 2\], but rank r=3"),
                            ({"rank_pattern": {"layers.1.self_attn.q_proj": 5}}, "but rank r=5"),
                            ({"use_dora": True}, r"DoRA \(use_dora\)"),
                            ({"peft_type": "IA3"}, "PEFT type 'IA3' is not supported")]:
        (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(LoraError, match=message):
            lora.read_adapters(folder)


def test_adapter_model_bin_is_read_like_safetensors(tmp_path):
    """Older PEFT writes adapter_model.bin (a torch pickle): the same matrices, the same scale."""
    from safetensors.torch import load_file

    folder = _llama_adapter(tmp_path / "st")
    other = tmp_path / "bin"
    other.mkdir()
    shutil.copy(folder / "adapter_config.json", other)
    torch.save(load_file(str(folder / "adapter_model.safetensors")), other / "adapter_model.bin")
    (st,), (pt,) = lora.read_adapters(folder)[0].modules[:1], lora.read_adapters(other)[0].modules[:1]
    assert st.key == pt.key == "model.layers.0.self_attn.q_proj" and st.scale == pt.scale == 1.0
    np.testing.assert_array_equal(st.delta(), pt.delta())


@pytest.fixture(scope="module")
def cli_case(tmp_path_factory):
    """The tiny MLP as an ONNX file and two adapters for it; a prefix-tuning adapter; llama's adapter (no match)."""
    d = tmp_path_factory.mktemp("lora_cli")
    model = make_tiny_mlp()
    onnx.save(_tiny_onnx(model, legacy=False), str(d / "mlp.onnx"))
    peft_model = _peft(copy.deepcopy(model), _fresh_seed(), r=2, lora_alpha=4, target_modules=["up", "down"])
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_fresh_seed())
        peft_model.add_adapter("second", LoraConfig(r=3, lora_alpha=3, target_modules=["up"], init_lora_weights=False))
    peft_model.save_pretrained(d / "adapters")
    peft_model.base_model.set_adapter(["default", "second"])
    _set_scales(peft_model, {"default": 0.5, "second": 1.0})

    from transformers import GPT2Config, GPT2LMHeadModel

    tiny_gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    get_peft_model(tiny_gpt2, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        d / "prefix")
    _llama_adapter(d / "llama_adapter")
    return d, peft_model.base_model.model


def test_cli_compile_with_two_adapters(cli_case, tmp_path):
    d, peft_mlp = cli_case
    model = d / "mlp.onnx"
    raw = model.read_bytes()
    out = tmp_path / "mlp.llmcc"
    r = run_cli("compile", model, "--lora", f"{d / 'adapters'}:0.5", "--lora", d / "adapters" / "second", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "verify: PASSED" in r.stdout and "4 weights merged" in r.stdout
    assert model.read_bytes() == raw
    report = json.loads(run_cli("inspect", out, "--json").stdout)
    assert report["lora"]["adapters"] == [
        {"path": str(d / "adapters"), "scale": 0.5, "merged_weights": 4},
        {"path": str(d / "adapters" / "second"), "scale": 1.0, "merged_weights": 2}]
    assert f"lora      {d / 'adapters' / 'second'} (scale 1): 2 weights merged" in run_cli("inspect", out).stdout
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        ref = peft_mlp(ids).numpy()
    _assert_matches([llmcc.load(out)(input_ids=ids.numpy())], [ref])


@pytest.mark.parametrize("adapter,message", [
    ("prefix", "PEFT type 'PREFIX_TUNING' is not supported; llmcc merges LoRA adapters (peft_type 'LORA')"),
    ("llama_adapter", ("2 adapter module(s) match no weight of the ONNX graph: model.layers.0.self_attn.q_proj, "
                       "model.layers.1.self_attn.q_proj (the graph's matmul weights are at e.g. blocks.0.down")),
    ("missing", "missing: no such LoRA adapter folder"),
])
def test_cli_bad_adapter_is_one_line_exit_2_nothing_written(cli_case, tmp_path, adapter, message):
    d, _ = cli_case
    out = tmp_path / "o.llmcc"
    r = run_cli("compile", d / "mlp.onnx", "--lora", d / adapter, "-o", out)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("llmcc: error: ") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(tmp_path.iterdir()) == []
