"""ONNX opset-23 Attention and RotaryEmbedding: compiled through llmcc.compile and compared with onnx.reference.

Every model is compiled twice: as ``llmcc.compile`` does by default (attention fusion is opt-in in
PipelineOptions) and with fusion on, where the compile report's "attention" entries must show each Attention node
recognised as an attention site. Inputs are fresh random values; a failure prints the seed that reproduces it.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper
from onnx.reference import ReferenceEvaluator

import llmcc
import llmcc.pipeline
from llmcc.errors import ImportFailure, InputError
from llmcc.verify import relative_error

RTOL = 1e-4
B, H, S, D = 2, 4, 6, 8
NP_DTYPES = {TP.FLOAT: np.float32, TP.BOOL: np.bool_, TP.INT64: np.int64}


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def _vi(name, shape, elem=TP.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, initializers=(), opset=23):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _attention(inputs, outputs=("y",), **attrs):
    return helper.make_node("Attention", list(inputs), list(outputs), name="attn", **attrs)


def _feed(model, rng, dims, masks=None):
    """Random inputs for ``model``'s graph inputs; symbolic dims from ``dims``; ``masks`` overrides by name."""
    feed = {}
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if masks and vi.name in masks:
            feed[vi.name] = masks[vi.name]
            continue
        tt = vi.type.tensor_type
        shape = [dims[d.dim_param] if d.dim_param else d.dim_value for d in tt.shape.dim]
        dtype = NP_DTYPES[tt.elem_type]
        if dtype == np.bool_:
            feed[vi.name] = rng.random(shape) > 0.3
        else:
            feed[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def _compare(out, ref, what):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != reference {ref.shape}"
    inf = np.isinf(ref)
    assert np.array_equal(np.isinf(out), inf), f"{what}: infinities differ from the reference"
    assert not np.isnan(out).any(), f"{what}: NaN in the output"
    err = relative_error(out[~inf], ref[~inf])
    assert err <= RTOL, f"{what}: relative error {err:.3g} > {RTOL}"


def _check(model, feeds, *, sites=None, ort_outputs=(), verify=False, fuse=True):
    """Compile ``model`` and compare every output with onnx.reference on each feed (a function of the rng).

    ``sites``: the number of Attention nodes, checked in the compile report (with ``fuse``). ``ort_outputs``:
    outputs compared with onnxruntime instead. ``verify``: llmcc's own check against onnxruntime 1.32 too (it runs
    opset-23 Attention and RotaryEmbedding). Returns the report's attention entries.
    """
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    module = llmcc.compile(model, target="cpu", verify=verify, seed=int(seed % 2**31), fuse_attention=fuse)
    ref = ReferenceEvaluator(model)
    names = [o.name for o in model.graph.output]
    for make_feed in feeds:
        feed = make_feed(rng)
        expected = ref.run(None, feed)
        if ort_outputs:
            from llmcc.verify import ort_session

            by_ort = dict(zip(names, ort_session(model).run(None, feed), strict=True))
            expected = [by_ort[n] if n in ort_outputs else e for n, e in zip(names, expected, strict=True)]
        got = module(**feed)
        got = got if isinstance(got, tuple) else (got,)
        for name, g, e in zip(names, got, expected, strict=True):
            _compare(g, e, f"output {name} (seed {seed})")
    report = module.report["attention"]
    if sites is not None:
        assert len(report) == sites, report
        for entry in report:
            assert set(entry) == {"site", "kind", "fused", "reason", "kernel"}
            if not entry["fused"]:
                print(f"attention site {entry['site']} ({entry['kind']}) not fused: {entry['reason']}")
    return report


def _bnsh_inputs(hq=H, hkv=H, sq=S, skv=S, d=D, dv=D):
    return [_vi("q", [B, hq, sq, d]), _vi("k", [B, hkv, skv, d]), _vi("v", [B, hkv, skv, dv])]


# ---------------------------------------------------------------------------------------------------------------------
# Attention


ATTENTION_CASES = {
    # name: (attributes, inputs, output shape, extra mask input or None)
    "4d": ({}, _bnsh_inputs(), [B, H, S, D], None),
    "4d_scale_dv": ({"scale": 0.3}, _bnsh_inputs(dv=12), [B, H, S, 12], None),
    "4d_gqa_causal": ({"is_causal": 1}, _bnsh_inputs(hkv=2), [B, H, S, D], None),
    "4d_mqa": ({}, _bnsh_inputs(hkv=1), [B, H, S, D], None),
    "3d": ({"q_num_heads": H, "kv_num_heads": H}, [_vi("q", [B, S, H * D]), _vi("k", [B, S, H * D]),
                                                   _vi("v", [B, S, H * D])], [B, S, H * D], None),
    "3d_gqa_causal": ({"q_num_heads": H, "kv_num_heads": 2, "is_causal": 1},
                      [_vi("q", [B, S, H * D]), _vi("k", [B, S, 2 * D]), _vi("v", [B, S, 2 * 12])],
                      [B, S, H * 12], None),
    # cross attention, K longer than Q, no past: the spec's offset is past_sequence_length = 0 (top-left)
    "3d_cross_causal": ({"q_num_heads": H, "kv_num_heads": H, "is_causal": 1},
                        [_vi("q", [B, 3, H * D]), _vi("k", [B, 7, H * D]), _vi("v", [B, 7, H * D])],
                        [B, 3, H * D], None),
    "bool_mask": ({}, _bnsh_inputs(), [B, H, S, D], _vi("mask", [B, 1, S, S], TP.BOOL)),
    "bool_mask_causal_3d_mask": ({"is_causal": 1}, _bnsh_inputs(), [B, H, S, D], _vi("mask", [H, S, S], TP.BOOL)),
    "float_mask": ({"scale": 0.5}, _bnsh_inputs(), [B, H, S, D], _vi("mask", [B, 1, S, S])),
    "float_mask_2d_causal_gqa": ({"is_causal": 1}, _bnsh_inputs(hkv=2), [B, H, S, D], _vi("mask", [S, S])),
    "3d_float_mask_causal_gqa": ({"q_num_heads": H, "kv_num_heads": 2, "is_causal": 1},
                                 [_vi("q", [B, S, H * D]), _vi("k", [B, S, 2 * D]), _vi("v", [B, S, 2 * D])],
                                 [B, S, H * D], _vi("mask", [B, 1, S, S])),
    "3d_bool_mask_2d": ({"q_num_heads": H, "kv_num_heads": H},
                        [_vi("q", [B, S, H * D]), _vi("k", [B, S, H * D]), _vi("v", [B, S, H * D])],
                        [B, S, H * D], _vi("mask", [S, S], TP.BOOL)),
}


def _masks_with_dead_rows(model, rng):
    """A bool mask with one fully masked row, a float mask with -inf entries and one all -inf row."""
    out = {}
    for vi in model.graph.input:
        if vi.name != "mask":
            continue
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == TP.BOOL:
            m = rng.random(shape) > 0.3
            m[..., 1, :] = False
        else:
            m = rng.standard_normal(shape).astype(np.float32)
            m[rng.random(shape) < 0.2] = -np.inf
            m[..., 2, :] = -np.inf
        out["mask"] = m
    return out


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_attention(name, fuse):
    attrs, inputs, out_shape, mask = ATTENTION_CASES[name]
    names = ["q", "k", "v"] + (["mask"] if mask is not None else [])
    model = _model([_attention(names, **attrs)], inputs + ([mask] if mask is not None else []), [_vi("y", out_shape)])
    feeds = [lambda rng: _feed(model, rng, {})]
    if mask is not None:
        feeds.append(lambda rng: _feed(model, rng, {}, _masks_with_dead_rows(model, rng)))
    report = _check(model, feeds, sites=1 if fuse else None, fuse=fuse)
    if fuse:
        assert report[0]["fused"], report
        if attrs.get("kv_num_heads", H) < H or "gqa" in name or "mqa" in name:
            assert "gqa" in report[0]["kind"], report
    else:
        assert report == []


def test_past_kv_causal_present_outputs():
    """Decode with a KV cache: K/V concatenated to the past, causal bottom-right (j <= i + past), present outputs."""
    past, sq = 5, 3
    model = _model(
        [_attention(["q", "k", "v", "", "past_k", "past_v"], ["y", "present_k", "present_v"], is_causal=1,
                    q_num_heads=H, kv_num_heads=2)],
        [_vi("q", [B, sq, H * D]), _vi("k", [B, sq, 2 * D]), _vi("v", [B, sq, 2 * D]),
         _vi("past_k", [B, 2, past, D]), _vi("past_v", [B, 2, past, D])],
        [_vi("y", [B, sq, H * D]), _vi("present_k", [B, 2, past + sq, D]), _vi("present_v", [B, 2, past + sq, D])])
    report = _check(model, [lambda rng: _feed(model, rng, {})], sites=1, verify=True)
    assert report[0]["fused"] and "gqa" in report[0]["kind"], report


def test_symbolic_kv_cache_with_short_mask():
    """Symbolic batch / sequence / past, causal, a bool mask of its own symbolic length (when shorter than past +
    sequence, padded with False as the reference does): one model run as prefill (past 0) and as decode steps."""
    model = _model(
        [_attention(["q", "k", "v", "mask", "past_k", "past_v"], ["y", "present_k", "present_v"], is_causal=1)],
        [_vi("q", ["b", H, "s", D]), _vi("k", ["b", 2, "s", D]), _vi("v", ["b", 2, "s", D]),
         _vi("mask", ["b", 1, "s", "m"], TP.BOOL), _vi("past_k", ["b", 2, "p", D]), _vi("past_v", ["b", 2, "p", D])],
        [_vi("y", ["b", H, "s", D]), _vi("present_k", ["b", 2, "t", D]), _vi("present_v", ["b", 2, "t", D])])
    feeds = [lambda rng, b=b, s=s, p=p, m=m: _feed(model, rng, {"b": b, "s": s, "p": p, "m": m})
             for b, s, p, m in ((2, 4, 0, 4), (1, 1, 6, 7), (3, 2, 3, 4))]
    report = _check(model, feeds, sites=1)
    assert report[0]["fused"] and "kv_cache" in report[0]["kind"], report  # the kernel takes any key length


def _modes_model(mode, **extra):
    return _model(
        [_attention(["q", "k", "v", "mask", "past_k", "past_v"], ["y", "present_k", "present_v", "qk"],
                    is_causal=1, qk_matmul_output_mode=mode, **extra)],
        _bnsh_inputs(sq=3, skv=3) + [_vi("mask", [B, 1, 3, 5], TP.BOOL), _vi("past_k", [B, H, 2, D]),
                                     _vi("past_v", [B, H, 2, D])],
        [_vi("y", [B, H, 3, D]), _vi("present_k", [B, H, 5, D]), _vi("present_v", [B, H, 5, D]),
         _vi("qk", [B, H, 3, 5])])


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_qk_matmul_output_modes_and_softcap(mode):
    """All four outputs, with softcap, a KV cache and a bool mask (with a fully masked row): as the reference.

    Mode 0 is "the output of qk matmul" (spec), before softcap; onnx.reference returns it after softcap, against
    its own spec text, while onnxruntime follows the spec: that output is compared with onnxruntime.
    """
    model = _modes_model(mode, softcap=2.5)
    report = _check(model, [lambda rng: _feed(model, rng, {}),
                            lambda rng: _feed(model, rng, {}, _masks_with_dead_rows(model, rng))],
                    sites=1, ort_outputs={"qk"} if mode == 0 else ())
    assert not report[0]["fused"]  # softcap's tanh sits between the scores and the softmax


def test_softmax_precision():
    """A float64 softmax on float32 inputs: cast to float64 and back, as the reference does."""
    model = _modes_model(3, softmax_precision=TP.DOUBLE)
    report = _check(model, [lambda rng: _feed(model, rng, {}),
                            lambda rng: _feed(model, rng, {}, _masks_with_dead_rows(model, rng))])
    # the casts around the softmax hide it from the fusion pass: no site at all
    print("softmax_precision=DOUBLE attention report:", report)


def test_attention_errors():
    q3, k3, v3 = _vi("q", [B, S, 24]), _vi("k", [B, S, 24]), _vi("v", [B, S, 24])
    cases = [
        (_attention("qkv", q_num_heads=5, kv_num_heads=5), [q3, k3, v3], "q_num_heads=5"),
        (_attention("qkv", q_num_heads=4, kv_num_heads=3), [q3, k3, v3], "is not a multiple of kv_num_heads=3"),
        (_attention("qkv"), [q3, k3, v3], "q_num_heads and kv_num_heads"),
        (_attention("qkv"), _bnsh_inputs(hkv=3), "q_num_heads=4 is not a multiple of kv_num_heads=3"),
        (_attention("qkv", q_num_heads=2), _bnsh_inputs(), "q_num_heads=2 but the 4-D input has 4 heads"),
    ]
    for node, inputs, message in cases:
        model = _model([node], inputs, [_vi("y", [B, S, 24])])
        with pytest.raises(ImportFailure, match=r"Attention \(node 'attn', opset 23\).*" + message):
            llmcc.compile(model, target="cpu", verify=False)
    # opset 24's nonpad_kv_seqlen
    model = _model([_attention(["q", "k", "v", "", "", "", "n"])], _bnsh_inputs() + [_vi("n", [B], TP.INT64)],
                   [_vi("y", [B, H, S, D])], opset=24)
    with pytest.raises(ImportFailure, match=r"node 'attn', opset 24.*nonpad_kv_seqlen"):
        llmcc.compile(model, target="cpu", verify=False)


# ---------------------------------------------------------------------------------------------------------------------
# RotaryEmbedding


def _rope_caches(max_pos, half, rng=None):
    theta = np.arange(max_pos)[:, None] / 10000 ** (np.arange(half)[None, :] / half)
    return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


def _rope_model(x_shape, *, interleaved=0, rot_dim=0, num_heads=0, with_pos=True, batch=B, seq=S):
    head = x_shape[-1] if len(x_shape) == 4 else x_shape[-1] // num_heads
    half = (rot_dim or head) // 2
    attrs = {"interleaved": interleaved, "rotary_embedding_dim": rot_dim}
    if num_heads:
        attrs["num_heads"] = num_heads
    if with_pos:
        cos, sin = _rope_caches(32, half)
        inits = [onnx.numpy_helper.from_array(cos, "cos"), onnx.numpy_helper.from_array(sin, "sin")]
        inputs = [_vi("x", x_shape), _vi("pos", [batch, seq], TP.INT64)]
        names = ["x", "cos", "sin", "pos"]
    else:
        inits = []
        inputs = [_vi("x", x_shape), _vi("cos", [batch, seq, half]), _vi("sin", [batch, seq, half])]
        names = ["x", "cos", "sin"]
    node = helper.make_node("RotaryEmbedding", names, ["y"], name="rope", **attrs)
    return _model([node], inputs, [_vi("y", x_shape)], inits)


def _rope_feed(model, rng):
    feed = _feed(model, rng, {})
    if "pos" in feed:
        feed["pos"] = rng.integers(0, 32, feed["pos"].shape).astype(np.int64)
    return feed


@pytest.mark.parametrize("case", [
    {"x_shape": [B, H, S, D]},
    {"x_shape": [B, H, S, D], "interleaved": 1},
    {"x_shape": [B, H, S, 12], "rot_dim": 8},
    {"x_shape": [B, H, S, 12], "rot_dim": 4, "interleaved": 1, "with_pos": False},
    {"x_shape": [B, S, H * D], "num_heads": H, "with_pos": False},
    {"x_shape": [B, S, H * 12], "num_heads": H, "rot_dim": 6, "interleaved": 1},
], ids=["4d", "4d_interleaved", "4d_partial", "4d_partial_interleaved_nopos", "3d_nopos", "3d_partial_interleaved"])
def test_rotary_embedding(case):
    model = _rope_model(**case)
    _check(model, [lambda rng: _rope_feed(model, rng)] * 2)


def test_rotary_position_ids_bounded():
    """position_ids index the cos/sin caches (TVM's take does not check): the module refuses ids past the cache, and
    llmcc's own verification draws ids inside it."""
    model = _rope_model([B, H, S, D])
    module = llmcc.compile(model, target="cpu")  # verified against onnxruntime
    assert module.report["verify"]["passed"]
    feed = _rope_feed(model, np.random.default_rng())
    feed["pos"][0, 0] = 32
    with pytest.raises(InputError, match=r"input 'pos': values must lie in \[0, 32\)"):
        module(**feed)


def test_rotary_errors():
    cases = [
        ({"x_shape": [B, S, 30], "num_heads": H}, "hidden size 30 is not a multiple of num_heads=4"),
        ({"x_shape": [B, H, S, D], "rot_dim": 12}, "rotary_embedding_dim=12"),
    ]
    for case, message in cases:
        with pytest.raises(ImportFailure, match=r"RotaryEmbedding \(node 'rope', opset 23\).*" + message):
            llmcc.compile(_rope_model(**case), target="cpu", verify=False)


# ---------------------------------------------------------------------------------------------------------------------
# Rotary then attention, as an exporter writes a decoder layer


def test_rotary_then_attention():
    """RotaryEmbedding on q and k (shared caches, position_ids), then causal GQA Attention on 3-D inputs."""
    half = D // 2
    cos, sin = _rope_caches(32, half)
    nodes = [
        helper.make_node("RotaryEmbedding", ["q", "cos", "sin", "pos"], ["q_rot"], name="rope_q", num_heads=H),
        helper.make_node("RotaryEmbedding", ["k", "cos", "sin", "pos"], ["k_rot"], name="rope_k", num_heads=2),
        _attention(["q_rot", "k_rot", "v"], is_causal=1, q_num_heads=H, kv_num_heads=2),
    ]
    model = _model(nodes, [_vi("q", [B, S, H * D]), _vi("k", [B, S, 2 * D]), _vi("v", [B, S, 2 * D]),
                           _vi("pos", [B, S], TP.INT64)], [_vi("y", [B, S, H * D])],
                   [onnx.numpy_helper.from_array(cos, "cos"), onnx.numpy_helper.from_array(sin, "sin")])
    report = _check(model, [lambda rng: _rope_feed(model, rng)] * 2, sites=1, verify=True)
    assert report[0]["fused"] and "gqa" in report[0]["kind"], report


def test_symbolic_causal_without_past_any_lengths():
    """is_causal without a KV cache is top-left aligned (j <= i) in ONNX; with symbolic lengths the mask is computed
    from positions, the fused kernel sees a causal site, and its own (bottom-right) hiding must never hide a key the
    mask shows: Sq < Skv, Sq == Skv and Sq > Skv all match the reference."""
    model = _model([_attention(["q", "k", "v"], is_causal=1)],
                   [_vi("q", ["b", H, "s", D]), _vi("k", ["b", H, "t", D]), _vi("v", ["b", H, "t", D])],
                   [_vi("y", ["b", H, "s", D])])
    feeds = [lambda rng, s=s, t=t: _feed(model, rng, {"b": 2, "s": s, "t": t}) for s, t in ((3, 5), (5, 5), (6, 4),
                                                                                            (40, 7))]
    report = _check(model, feeds, sites=1)
    assert report[0]["fused"] and report[0]["kind"].startswith("causal"), report
