"""fuse_attention: exported sdpa attention becomes one flash kernel call; look-alikes and unsupported flavours stay as
they are; every zoo model's sites are reported and the fused models match onnxruntime."""

import numpy as np
import pytest
import tvm
from tvm import relax

import llmcc.pipeline
import llmcc.targets
from llmcc import zoo
from llmcc.frontend.onnx_import import import_model, load_model
from llmcc.passes.fuse_attention import FuseAttention

B, H, S, D = 2, 4, 8, 16
SCALE = 1.0 / np.sqrt(D)


def _attention_calls(mod) -> int:
    """call_tir calls of a flash attention kernel in main."""
    n = 0

    def visit(e):
        nonlocal n
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir" and \
                e.args[0].name_hint.startswith("flash_attention"):
            n += 1

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return n


def _sdpa_module(mask_op="add", softmax_axis=-1, nan_guard=True, dtype="float32", probs_escape=False):
    """q, k, v [B, H, S, D] and a mask [B, 1, S, S]: the shape of torch's exported sdpa (sqrt(scale) on q and k^T)."""
    bb = relax.BlockBuilder()
    t = relax.TensorType((B, H, S, D), dtype)
    q, k, v = (relax.Var(n, t) for n in ("q", "k", "v"))
    mask = relax.Var("mask", relax.TensorType((B, 1, S, S), dtype))
    half = relax.const(np.sqrt(SCALE).astype(dtype))
    with bb.function("main", [q, k, v, mask]):
        with bb.dataflow():
            qs = bb.emit(relax.op.multiply(q, half))
            kt = bb.emit(relax.op.multiply(bb.emit(relax.op.permute_dims(k, [0, 1, 3, 2])), half))
            s = bb.emit(relax.op.matmul(qs, kt))
            if mask_op == "add":
                s = bb.emit(relax.op.add(s, mask))
            elif mask_op == "multiply":
                s = bb.emit(relax.op.multiply(s, mask))
            p = bb.emit(relax.op.nn.softmax(s, axis=softmax_axis))
            if nan_guard:
                p = bb.emit(relax.op.where(relax.op.isnan(p), relax.const(0.0, dtype), p))
            o = bb.emit(relax.op.matmul(p, v))
            out = bb.emit_output(relax.op.permute_dims(o, [0, 2, 1, 3]))
            if probs_escape:  # the probabilities are also an output (attention weights returned)
                out = bb.emit_output(relax.Tuple([out, p]))
        bb.emit_func_output(out)
    return bb.get()


def _sdpa_reference(q, k, v, mask):
    s = q @ k.transpose(0, 1, 3, 2) * SCALE + mask
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True) @ v).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float16", 3e-3)])
def test_hand_built_sdpa_fuses_and_matches_numpy(dtype, tol, seed):
    """The exported sdpa shape (split scale, additive mask, NaN guard) becomes one flash kernel call; numerics hold
    against numpy in float64 (fp16 in, fp32 accumulation in the kernel)."""
    p = FuseAttention()
    after = p(_sdpa_module(dtype=dtype))
    assert p.rewrites == 1 and _attention_calls(after) == 1
    assert not any(op in after["main"].script() for op in ("R.nn.softmax", "R.isnan", "R.matmul"))
    assert p.sites[0]["fused"] and p.sites[0]["kernel"] == "flash_attention_cpu"
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, H, S, D)).astype(dtype) for _ in range(3))
    mask = np.where(np.tril(np.ones((S, S), bool)) & (rng.random((B, 1, 1, S)) < 0.7), 0,
                    np.finfo(dtype).min).astype(dtype)
    mask[..., 0] = 0
    vm = relax.VirtualMachine(tvm.compile(after, target="llvm"), tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(a) for a in (q, k, v, mask))).numpy()
    ref = _sdpa_reference(*(a.astype(np.float64) for a in (q, k, v, mask)))
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=tol, atol=tol, err_msg=f"seed {seed}")


def test_probabilities_used_elsewhere_do_not_fuse():
    """When the attention weights leave the function, the site keeps its ops (the kernel never holds them)."""
    before = _sdpa_module(probs_escape=True)
    p = FuseAttention()
    after = p(before)
    assert p.rewrites == 0 and "used outside" in p.sites[0]["reason"]
    tvm.ir.assert_structural_equal(after, before)


def test_cuda_target_gets_the_cuda_kernel():
    p = FuseAttention(llmcc.targets.resolve("cuda:sm_80"))
    after = p(_sdpa_module())
    assert p.rewrites == 1 and p.sites[0]["kernel"] == "flash_attention_cuda"
    kernel = next(f for gv, f in after.functions.items() if gv.name_hint.startswith("flash_attention"))
    assert "threadIdx.x" in kernel.script()


@pytest.mark.parametrize("case, module", [
    ("multiplicative mask", lambda: _sdpa_module(mask_op="multiply")),
    ("softmax not on the last axis", lambda: _sdpa_module(softmax_axis=2)),
])
def test_look_alikes_do_not_fire(case, module):
    """A multiplicative mask or a softmax over another axis is not attention: no rewrite, the module is unchanged."""
    before = module()
    p = FuseAttention()
    after = p(before)
    assert p.rewrites == 0 and _attention_calls(after) == 0, case
    tvm.ir.assert_structural_equal(after, before)
    assert [s["fused"] for s in p.sites] == [False] and p.sites[0]["reason"], case


def test_softmax_over_linear_layer_does_not_fire():
    """softmax(x @ W) @ y with W a weight is a linear layer, not q @ k^T: no rewrite."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((B, H, S, D), "float32"))
    y = relax.Var("y", relax.TensorType((B, H, D, D), "float32"))
    w = relax.const(np.ones((D, D), "float32"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            p = bb.emit(relax.op.nn.softmax(bb.emit(relax.op.matmul(x, w)), axis=-1))
            out = bb.emit_output(relax.op.matmul(p, y))
        bb.emit_func_output(out)
    before = bb.get()
    p = FuseAttention()
    after = p(before)
    assert p.rewrites == 0
    tvm.ir.assert_structural_equal(after, before)


# Per zoo model: (sites fused, sites not fused, kinds seen).
EXPECTED = {
    "llama": (2, 0, {"causal"}),
    "llama-gqa": (2, 0, {"causal+gqa"}),
    "gpt2": (2, 0, {"causal"}),
    "minilm": (6, 0, {"padding_mask"}),
    "llama-decode": (2, 0, {"causal+gqa+kv_cache"}),
    "mistral": (2, 0, {"sliding_window+gqa"}),
    "bigbird": (10, 0, {"block_sparse"}),
    "longformer": (2, 0, {"sliding_window+global", "global"}),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_zoo_sites(name):
    """Every attention site of every zoo model fuses, BigBird's block-sparse pieces (its middle band over the
    concatenated key sets its code gathered included) and both of Longformer's sites (the chunked band with global
    keys, and the global tokens' own queries)."""
    fused, unfused, kinds = EXPECTED[name]
    p = FuseAttention()
    after = p(import_model(load_model(zoo.onnx_path(name))))
    assert p.rewrites == fused == _attention_calls(after)
    assert sum(s["fused"] for s in p.sites) == fused
    assert sum(not s["fused"] for s in p.sites) == unfused
    assert {s["kind"] for s in p.sites} == kinds
    assert all(s["reason"] for s in p.sites if not s["fused"])


@pytest.mark.parametrize("name", ["llama", "llama-gqa", "gpt2", "minilm", "mistral", "llama-decode", "bigbird",
                                  "longformer"])
def test_zoo_numerics_match_onnxruntime(name):
    """After fusion the compiled model matches onnxruntime (fp32 rel err <= 1e-5) at several sequence lengths: one row,
    and one, two and three 32-row query tiles (mistral's window is 16; llama-decode's lengths are the past's;
    BigBird's is fixed at 256, Longformer's at 128, where random padding lengths stand in)."""
    import onnxruntime as ort

    path = zoo.onnx_path(name)
    p = FuseAttention()
    spec = llmcc.targets.resolve("cpu")
    result = llmcc.pipeline.run(p(import_model(load_model(path))), spec)
    assert p.rewrites > 0
    vm = relax.VirtualMachine(tvm.compile(result.mod, target=spec.tvm_target(), relax_pipeline=None), tvm.cpu())
    weights = [tvm.runtime.tensor(w) for _, w in result.weights]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng()
    static = {"bigbird": [(256, 1)] * 2, "longformer": [(128, 1)] * 3}
    for seq, batch in static.get(name, [(1, 2), (16, 2), (37, 2), (77, 1)]):
        feeds = zoo.sample_inputs(name, seq, batch=batch)
        if name in static:  # padding from a random token on: the masks of the gathered blocks, the band's key mask
            feeds["attention_mask"][:, int(rng.integers(2, seq + 1)):] = 0
        out = vm["main"](*(tvm.runtime.tensor(v) for v in feeds.values()), *weights)
        outs = list(out) if isinstance(out, (list, tuple)) or hasattr(out, "__getitem__") and not hasattr(
            out, "numpy") else [out]
        for got, ref in zip(outs, sess.run(None, feeds)):
            rel = np.abs(got.numpy() - ref).max() / np.abs(ref).max()
            assert rel <= 1e-5, f"{name} seq {seq}: rel err {rel:.3g}"


def test_fp16_llama_fuses_and_matches_onnxruntime(tmp_path):
    """The zoo Llama exported from torch in float16: attention fuses (fp16 in, fp32 inside the kernel) and the model
    stays as close to onnxruntime's fp16 run as onnxruntime is to torch's (relative error <= 2e-3 each way)."""
    import onnxruntime as ort

    import llmcc
    from helpers import export_fp16_llama
    from llmcc.verify import relative_error

    path = export_fp16_llama(tmp_path / "llama16.onnx")
    compiled = llmcc.compile(path, verify=False)
    assert [s["fused"] for s in compiled.report["attention"]] == [True, True]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seq in (1, 37):
        feeds = zoo.sample_inputs("llama", seq, batch=2)
        got = compiled(**feeds)
        assert got.dtype == np.float16
        err = relative_error(got.astype(np.float32), sess.run(None, feeds)[0].astype(np.float32))
        assert err <= 2e-3, f"seq {seq}: relative error vs onnxruntime fp16 {err:.3g}"


# llama's fp16 run is the test above
FP16_MODELS = ["llama-gqa", "mistral", "gpt2", "minilm", "bigbird", "longformer", "llama-decode"]


@pytest.mark.parametrize("name", FP16_MODELS)
def test_zoo_fp16_numerics_match_onnxruntime(name, tmp_path):
    """Each zoo model exported in float16: every attention site fuses, and the compiled model is no further from
    onnxruntime's float16 run, nor from the float32 model, than 3x what float16 itself costs (onnxruntime fp16 vs
    fp32, a few 1e-4 relative; run with -s to see each error), at two sequence lengths (static models: random padding;
    llama-decode: two past lengths, its KV cache in float16)."""
    import onnxruntime as ort

    import llmcc
    from llmcc.verify import relative_error

    path = zoo.export(name, tmp_path / f"{name}16.onnx", dtype="float16")
    compiled = llmcc.compile(path, verify=False)
    assert compiled.report["attention"] and all(s["fused"] for s in compiled.report["attention"])
    fp16 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(str(zoo.onnx_path(name)), providers=["CPUExecutionProvider"])
    model, rng = zoo.get(name), np.random.default_rng()
    for seq in (1, 37) if model.dynamic_dims else (model.seq_lens[0],) * 2:
        feeds = zoo.as_float(zoo.sample_inputs(name, seq, batch=2 if model.dynamic_dims else 1), "float16")
        if not model.dynamic_dims:
            feeds["attention_mask"][:, int(rng.integers(2, seq + 1)):] = 0
        got = compiled(**feeds)
        got = (got[0] if isinstance(got, tuple) else got).astype(np.float32)
        ref16 = fp16.run(None, feeds)[0].astype(np.float32)
        ref32 = fp32.run(None, zoo.as_float(feeds, "float32"))[0]  # the same (fp16-rounded) KV cache
        budget = 3 * relative_error(ref16, ref32)
        print(f"{name} seq {seq}: llmcc vs ort fp16 {relative_error(got, ref16):.2e}, vs fp32 "
              f"{relative_error(got, ref32):.2e}; ort fp16 vs fp32 {budget / 3:.2e}")
        assert relative_error(got, ref16) <= budget and relative_error(got, ref32) <= budget, \
            f"{name} seq {seq}: vs ort fp16 {relative_error(got, ref16):.3g}, vs fp32 {relative_error(got, ref32):.3g}"


def test_longformer_band_and_global_queries_fuse():
    """HF Longformer's two softmaxes match no sdpa pattern; both fuse: the local band (chunked q @ k^T over 2w+1
    diagonals, a diagonal key mask, the global-key scores concatenated in front) into one kernel over the global keys
    and the band (kind sliding_window+global, band 16), the global tokens' own queries into one with an additive
    bias. No softmax, einsum or chunked band tensor is left."""
    p = FuseAttention()
    after = p(import_model(load_model(zoo.onnx_path("longformer"))))
    assert p.rewrites == 2 == _attention_calls(after)
    band, global_queries = p.sites
    assert band["kind"] == "sliding_window+global" and band["fused"] and band["kernel"] == "flash_attention_cpu"
    assert global_queries["kind"] == "global" and global_queries["fused"]
    assert list(p._kernels)[0].band == 16 and list(p._kernels)[0].global_keys
    calls = [b.value for f in after.functions.values() if isinstance(f, relax.Function)
             for block in f.body.blocks for b in block.bindings if isinstance(b.value, relax.Call)]
    assert not [c for c in calls if getattr(c.op, "name", "") == "relax.nn.softmax"]
    callees = [c.args[0].name_hint for c in calls if getattr(c.op, "name", "") == "relax.call_tir"]
    assert not [n for n in callees if n.startswith(("einsum", "pad"))], callees


def test_longformer_without_global_tokens_fuses(tmp_path):
    """HF Longformer called without a global mask (as LongformerModel is by default): the band alone (kind
    sliding_window, two-sided), fused, equal to onnxruntime with random padding."""
    import onnxruntime as ort
    import torch

    import llmcc

    class BandOnly(torch.nn.Module):
        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, input_ids, attention_mask):
            return (self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,)

    model = BandOnly(zoo.torch_module("longformer").hf).eval()
    feeds = zoo.sample_inputs("longformer", 128)
    path = tmp_path / "band.onnx"
    with torch.no_grad():
        torch.onnx.export(model, tuple(torch.from_numpy(feeds[n]) for n in ("input_ids", "attention_mask")),
                          str(path), dynamo=False, opset_version=17, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"])
    compiled = llmcc.compile(path)
    (site,) = compiled.report["attention"]
    assert site["kind"] == "sliding_window" and site["fused"] and site["kernel"] == "flash_attention_cpu"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng()
    for _ in range(2):
        feeds["attention_mask"][:] = 1
        feeds["attention_mask"][:, int(rng.integers(2, 129)):] = 0
        ref = sess.run(None, feeds)[0]
        assert np.abs(compiled(**feeds) - ref).max() <= 1e-5 * np.abs(ref).max()


@relax.expr_functor.mutator
class _ChangeBinding(relax.PyExprMutator):
    """Rewrite the first binding ``pick`` selects with ``change``."""

    def __init__(self, mod, pick, change):
        super().__init__(mod)
        self.pick, self.change, self.done = pick, change, False

    def visit_var_binding_(self, binding):
        if not self.done and self.pick(binding.value):
            self.done = True
            value = self.builder_.normalize(self.change(binding.value))
            self.builder_.emit_normalized(relax.VarBinding(binding.var, value))
            return
        super().visit_var_binding_(binding)


def _changed_longformer(pick, change):
    mod = import_model(load_model(zoo.onnx_path("longformer")))
    mutator = _ChangeBinding(mod, pick, change)
    func = mod["main"]
    mod["main"] = relax.Function(func.params, mutator.visit_expr(func.body), func.ret_ty, func.is_pure, func.attrs)
    assert mutator.done
    return mod


def _is_key_mask_where(call):
    """where(hidden [B, S, 1, 1], min, x): the band's key mask before HF chunks it."""
    return (isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.where"
            and isinstance(call.args[1], tvm.ir.GenericConst)
            and call.args[0].ty.dtype == "bool" and len(call.args[0].ty.shape) == 4
            and [int(d) for d in call.args[0].ty.shape.values[2:]] == [1, 1] and call.args[1].value.numpy() < -1e30)


def test_longformer_band_with_a_soft_key_mask_stays():
    """Must not fire: a key mask of -1 instead of finfo.min is a soft bias the band's -1e30 would not reproduce;
    the band stays unfused with the reason, the global queries still fuse."""
    mod = _changed_longformer(_is_key_mask_where, lambda c: relax.op.where(
        c.args[0], relax.const(-1.0, "float32"), c.args[2]))
    p = FuseAttention()
    p(mod)
    band, global_queries = p.sites
    assert not band["fused"] and band["kind"] == "sliding_window+global"
    assert "key mask is not where" in band["reason"] and global_queries["fused"]


def test_longformer_band_reading_other_keys_stays():
    """Must not fire: when the band's product reads keys other than those the global keys are gathered from (here
    the value projection's output), the two parts are no longer one attention over one key set."""
    def picks_band_product(call):
        return isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.call_tir" \
            and call.args[0].name_hint == "einsum"

    def swap_keys(call):
        left, right = call.args[1].fields
        return relax.call_tir(call.args[0], relax.Tuple([left, left]), call.ty)

    p = FuseAttention()
    p(_changed_longformer(picks_band_product, swap_keys))
    band = p.sites[0]
    assert not band["fused"] and "not one product of views of q and the keys" in band["reason"]


def _global_query_chain(scatter_fill: float, mask_fill: float, heads=2, g=3, s=8, d=4):
    """Longformer's global-query chain in Relax, small: 3-D scores, a scatter of ``scatter_fill`` at given element
    indices, where(padding, ``mask_fill``, .), softmax, a cast, the value matmul."""
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((heads, g, d), "float32"))
    k_t = relax.Var("k_t", relax.TensorType((heads, d, s), "float32"))
    v = relax.Var("v", relax.TensorType((heads, s, d), "float32"))
    slots = relax.Var("slots", relax.TensorType((8, 4), "int64"))
    pad = relax.Var("pad", relax.TensorType((1, 1, 1, s), "bool"))
    with bb.function("main", [q, k_t, v, slots, pad]):
        with bb.dataflow():
            scores = bb.emit(relax.op.reshape(bb.emit(relax.op.matmul(q, k_t)), (1, heads, g, s)))
            t = bb.emit(relax.op.permute_dims(scores, [0, 2, 1, 3]))
            fill = bb.emit(relax.op.broadcast_to(relax.const(scatter_fill, "float32"), (8,)))
            t = bb.emit(relax.op.scatter_nd(t, slots, fill, "update"))
            t = bb.emit(relax.op.permute_dims(t, [0, 2, 1, 3]))
            w = bb.emit(relax.op.where(pad, relax.const(mask_fill, "float32"), t))
            p = bb.emit(relax.op.nn.softmax(bb.emit(relax.op.reshape(w, (heads, g, s))), axis=-1))
            out = bb.emit_output(relax.op.matmul(bb.emit(relax.op.astype(p, "float32")), v))
        bb.emit_func_output(out)
    return bb.get()


def _run_cpu(mod, args):
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(a) for a in args)).numpy()


def test_global_query_chain_fuses_exactly():
    """Same fill for the scatter and the padding (HF's finfo.min): fused, and equal to the unfused chain, with a row
    wholly replaced by the scatter (uniform), a row partly replaced, and a padded key."""
    rng = np.random.default_rng()
    low = float(np.finfo(np.float32).min)
    before = _global_query_chain(low, low)
    p = FuseAttention()
    after = p(before)
    assert p.rewrites == 1 == _attention_calls(after)
    assert [s["kind"] for s in p.sites] == ["global"] and p.sites[0]["fused"]
    whole_row = np.array([[0, 0, 1, j] for j in range(8)], np.int64)  # every key of row (g=0, h=1)
    part_rows = np.array([[0, 2, 0, j] for j in range(4)] + [[0, 1, 1, j] for j in (0, 3, 5, 6)], np.int64)
    pad = np.zeros((1, 1, 1, 8), bool)
    pad[..., 6] = True
    for idx in (whole_row, part_rows):
        args = [rng.standard_normal(sh).astype(np.float32) for sh in [(2, 3, 4), (2, 4, 8), (2, 8, 4)]] + [idx, pad]
        want, got = _run_cpu(before, args), _run_cpu(after, args)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_global_query_chain_with_different_fills_stays():
    """A scatter fill other than the padding fill: a wholly replaced row would differ (uniform over all keys or over
    the unpadded ones), so the site is not fused and the reason says why."""
    p = FuseAttention()
    before = _global_query_chain(-1.0e4, float(np.finfo(np.float32).min))
    after = p(before)
    assert p.rewrites == 0
    tvm.ir.assert_structural_equal(after, before)
    (site,) = p.sites
    assert site["kind"] == "global" and not site["fused"]
    assert "does not write the padding fill's constant" in site["reason"]


def _concat_key_chain(scales=(0.25, 0.25), value_bounds=((0, 6), (6, 11))):
    """BigBird's middle band, small: q [B, H, L, bs, D] scored against a per-block key set (6 keys) and a set shared
    by every block (5 keys), each scaled and masked, one softmax over the concatenation, the probabilities sliced at
    ``value_bounds`` and multiplied with the matching value sets, summed."""
    bb = relax.BlockBuilder()
    t = lambda name, shape: relax.Var(name, relax.TensorType(shape, "float32"))  # noqa: E731
    q, k1, k2 = t("q", (1, 2, 3, 4, 8)), t("k1", (1, 2, 3, 6, 8)), t("k2", (1, 2, 1, 5, 8))
    v1, v2 = t("v1", (1, 2, 3, 6, 8)), t("v2", (1, 2, 1, 5, 8))
    m1, m2 = t("m1", (1, 1, 3, 4, 6)), t("m2", (1, 1, 1, 1, 5))
    with bb.function("main", [q, k1, k2, v1, v2, m1, m2]):
        with bb.dataflow():
            parts = []
            for k, m, scale in ((k1, m1, scales[0]), (k2, m2, scales[1])):
                kt = bb.emit(relax.op.permute_dims(k, [0, 1, 2, 4, 3]))
                s = bb.emit(relax.op.multiply(bb.emit(relax.op.matmul(q, kt)), relax.const(scale, "float32")))
                parts.append(bb.emit(relax.op.add(s, m)))
            p = bb.emit(relax.op.nn.softmax(bb.emit(relax.op.concat(parts, axis=-1)), axis=-1))
            outs = [bb.emit(relax.op.matmul(bb.emit(relax.op.strided_slice(p, [4], [lo], [hi])), v))
                    for (lo, hi), v in zip(value_bounds, (v1, v2))]
            out = bb.emit_output(relax.op.add(*outs))
        bb.emit_func_output(out)
    return bb.get()


def test_concat_key_sets_fuse_exactly():
    """Attention over concatenated key sets (one per block, one shared) fuses into one flash call with heads x blocks
    as its heads, and equals the unfused chain on random inputs and masks with hidden keys."""
    rng = np.random.default_rng()
    before = _concat_key_chain()
    p = FuseAttention()
    after = p(before)
    assert p.rewrites == 1 == _attention_calls(after)
    (site,) = p.sites
    assert site["kind"] == "block_sparse" and site["fused"] and "concatenation" in site["reason"]
    (spec,) = p._kernels
    assert (spec.num_heads, spec.q_len, spec.scale) == (6, 4, 0.25)
    shapes = [(1, 2, 3, 4, 8), (1, 2, 3, 6, 8), (1, 2, 1, 5, 8), (1, 2, 3, 6, 8), (1, 2, 1, 5, 8)]
    args = [rng.standard_normal(sh).astype(np.float32) for sh in shapes]
    args += [np.where(rng.random(sh) < 0.3, -1e4, 0).astype(np.float32) for sh in [(1, 1, 3, 4, 6), (1, 1, 1, 1, 5)]]
    np.testing.assert_allclose(_run_cpu(after, args), _run_cpu(before, args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, why", [
    (dict(scales=(0.25, 0.5)), "scaled differently"),
    (dict(value_bounds=((0, 6), (5, 10))), "are not the key sets"),
])
def test_concat_key_sets_that_are_not_one_attention_stay(kwargs, why):
    """Must not fire: sets scaled differently, or probabilities sliced at other bounds than the key sets."""
    before = _concat_key_chain(**kwargs)
    p = FuseAttention()
    after = p(before)
    assert p.rewrites == 0
    tvm.ir.assert_structural_equal(after, before)
    (site,) = p.sites
    assert not site["fused"] and why in site["reason"]
