"""flash_attention: the CPU kernel vs the float64 numpy reference, over random shapes, layouts, masks and dtypes;
fast_exp vs numpy; the kernel's scratch memory does not depend on the sequence lengths."""

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from llmcc.kernels.flash_attention import (AttentionSpec, attention_reference, cpu_tiles, fast_exp,
                                           flash_attention_cpu, from_canonical, visible)
from llmcc.targets import resolve

_TARGET = resolve("cpu")
# float32 kernel vs float64 reference: scores reach |q.k|*scale ~ 5, and fast_exp plus the online rescaling
# leave a few 1e-6 on outputs of size ~1 (a seed in CI hit 2.2e-6), so absolute 1e-5 (~80 ulp at 1.0).
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def _build(spec):
    func = flash_attention_cpu(spec).with_attr("global_symbol", "main")
    with _TARGET.tvm_target():
        return tvm.compile(tvm.IRModule({"main": func}), target=_TARGET.tvm_target())["main"]


def _inputs(spec, rng, b, sq, skv, bias_scale=1.0):
    def make(layout, s, d, heads):
        x = rng.standard_normal((b, heads, s, d)).astype(np.float32)
        return from_canonical(x, layout).copy()

    q = make(spec.q_layout, sq, spec.head_dim, spec.num_heads)
    if spec.k_layout == "bnds":
        k = rng.standard_normal((b, spec.num_kv_heads, spec.head_dim, skv)).astype(np.float32)
    else:
        k = make(spec.k_layout, skv, spec.head_dim, spec.num_kv_heads)
    v = make(spec.v_layout, skv, spec.value_dim, spec.num_kv_heads)
    args = [q, k, v]
    if spec.bias is not None:
        shape = [1 if bc else full for bc, full in zip(spec.bias, (b, spec.num_heads, sq))] + [skv]
        args.append((rng.standard_normal(shape) * bias_scale).astype(np.float32))
    return [a.astype(spec.dtype) for a in args]


def _run(fn, spec, args, b, sq):
    out_shape = from_canonical(np.empty((b, spec.num_heads, sq, spec.value_dim)), spec.out_layout).shape
    out = tvm.runtime.tensor(np.zeros(out_shape, spec.dtype))
    fn(*(tvm.runtime.tensor(a) for a in args), out)
    return out.numpy()


def _random_spec(rng, **fixed):
    kv_heads = int(rng.choice([1, 2, 4]))
    d = int(rng.choice([8, 16, 32, 64]))
    window = int(rng.integers(1, 40)) if rng.random() < 0.3 else None
    spec = dict(num_heads=kv_heads * int(rng.choice([1, 2, 3])), num_kv_heads=kv_heads, head_dim=d,
                value_dim=int(rng.choice([d, 16])), scale=float(rng.uniform(0.05, 0.5)),
                causal=bool(window) or bool(rng.random() < 0.5), window=window,
                bias=tuple(bool(x) for x in rng.random(3) < 0.5) if rng.random() < 0.6 else None,
                q_layout=str(rng.choice(["bnsd", "bsnd"])), k_layout=str(rng.choice(["bnsd", "bsnd", "bnds"])),
                v_layout=str(rng.choice(["bnsd", "bsnd"])), out_layout=str(rng.choice(["bnsd", "bsnd"])))
    spec.update(fixed)
    return AttentionSpec(**spec)


@pytest.mark.parametrize("case", range(8))
def test_random_specs_match_reference(case, seed):
    """Random heads/GQA, head dims, layouts, causal/window, broadcast biases; ragged lengths (not tile multiples),
    a query shorter than the keys (a chunk against a cache), one query row, and more queries than keys (no
    alignment: only the bias masks)."""
    rng = np.random.default_rng(seed + case)
    spec = _random_spec(rng)
    fn = _build(spec)
    for sq, skv in [(int(rng.integers(1, 80)),) * 2, (int(rng.integers(1, 20)), int(rng.integers(20, 90))), (1, 33),
                    (int(rng.integers(20, 70)), int(rng.integers(1, 20)))]:
        b = int(rng.integers(1, 3))
        args = _inputs(spec, rng, b, sq, skv)
        got = _run(fn, spec, args, b, sq)
        ref = attention_reference(spec, *args)
        np.testing.assert_allclose(got, ref, **FP32_TOL, err_msg=f"seed {seed + case} {spec} {sq}x{skv}")


def test_decode_spec_with_static_query_length(seed):
    """q_len=1 (a decode step) takes a one-row tile; keys of any length, causal aligned to the newest position."""
    rng = np.random.default_rng(seed)
    spec = AttentionSpec(8, 2, 16, 16, 0.25, causal=True, q_len=1, k_layout="bnsd")
    assert cpu_tiles(spec).tq == 1
    fn = _build(spec)
    for skv in (1, 31, 32, 33, 200):
        args = _inputs(spec, rng, 2, 1, skv)
        np.testing.assert_allclose(_run(fn, spec, args, 2, 1), attention_reference(spec, *args),
                                   **FP32_TOL, err_msg=f"seed {seed} skv {skv}")


def test_hf_finite_mask_matches_unfused_softmax(seed):
    """HF masks with finfo.min (finite): masked keys get exactly 0 and rows agree with a plain softmax."""
    rng = np.random.default_rng(seed)
    spec = AttentionSpec(4, 4, 32, 32, 32 ** -0.5, causal=True, bias=(False, True, False), k_layout="bnds")
    b, s = 2, 45
    q, k, v, _ = _inputs(spec, rng, b, s, s)
    keep = np.tril(np.ones((s, s), bool))[None, None] & (rng.random((b, 1, 1, s)) < 0.8)
    keep[..., 0] = True  # every row sees at least one key
    mask = np.where(keep, 0, np.finfo(np.float32).min).astype(np.float32)
    got = _run(_build(spec), spec, [q, k, v, mask], b, s)
    scores = q.astype(np.float64) @ k.astype(np.float64) * spec.scale + mask
    p = np.exp(scores - scores.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v
    np.testing.assert_allclose(got, ref, **FP32_TOL, err_msg=f"seed {seed}")


@pytest.mark.parametrize("dtype, tol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_half_precision_accumulates_in_float32(dtype, tol, seed):
    rng = np.random.default_rng(seed)
    spec = AttentionSpec(4, 2, 32, 32, 32 ** -0.5, causal=True, dtype=dtype, bias=(False, True, False))
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    fn = _build(spec)
    args = _inputs(spec, rng, 1, 70, 70)
    got = _run(fn, spec, args, 1, 70).astype(np.float32)
    ref = attention_reference(spec, *[a.astype(np.float32) for a in args])
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol, err_msg=f"seed {seed}")


@pytest.mark.parametrize("global_keys", [True, False])
def test_band_with_global_keys_matches_reference(global_keys, seed):
    """Longformer's kind: a two-sided band of ``band`` keys each side, and (global_keys) G gathered global keys in
    front that every row sees; random bands (0 included), G = 0..5, ragged lengths, a per-key bias that hides some
    keys (padding, global tokens in the band) as the fusion pass builds it."""
    rng = np.random.default_rng(seed)
    for trial in range(3):
        band = int(rng.choice([0, 1, int(rng.integers(2, 40))]))
        kv_heads = int(rng.choice([1, 2]))
        spec = AttentionSpec(kv_heads * int(rng.choice([1, 2])), kv_heads, 16, 16, float(rng.uniform(0.1, 0.4)),
                             band=band, global_keys=global_keys, bias=(False, True, True),
                             q_layout="bsnd", k_layout="bsnd", v_layout="bsnd", out_layout="bsnd")
        fn = _build(spec)
        for sq in (int(rng.integers(1, 90)), 33):
            g = int(rng.integers(0, 6)) if global_keys else 0
            b = int(rng.integers(1, 3))
            q, k, v, bias = _inputs(spec, rng, b, sq, sq + g)
            bias = np.where(rng.random(bias.shape) < 0.15, -1e30, 0).astype(np.float32)
            bias[..., g:][..., np.arange(sq) % 7 == 3] = 0  # rows whose own key is hidden still see one key
            got = _run(fn, spec, [q, k, v, bias], b, sq)
            ok = visible(spec, sq, sq + g)
            seen = ok[None, None] & (bias > -1)
            rows = np.broadcast_to(seen.any(-1), (b, spec.num_heads, sq))  # a row that sees no key: not compared
            assert rows.mean() > 0.5
            ref = attention_reference(spec, q, k, v, bias)
            np.testing.assert_allclose(got.transpose(0, 2, 1, 3)[rows], ref.transpose(0, 2, 1, 3)[rows],
                                       **FP32_TOL, err_msg=f"seed {seed} band {band} G {g} Sq {sq}")


def test_visible_band_and_global_keys():
    spec = AttentionSpec(1, 1, 8, 8, 1.0, band=1, global_keys=True)
    got = visible(spec, 3, 5)  # two global keys, then the band over query rows 0..2 at key positions 2..4
    assert got.astype(int).tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 1, 1]]
    assert visible(AttentionSpec(1, 1, 8, 8, 1.0, band=0), 3, 3).tolist() == np.eye(3, dtype=bool).tolist()
    assert AttentionSpec(1, 1, 8, 8, 1.0, global_keys=True).check().startswith("global keys")
    assert "band" in AttentionSpec(1, 1, 8, 8, 1.0, band=2, causal=True).check()


def test_visible_keys_follow_hf_window_and_causality():
    spec = AttentionSpec(1, 1, 8, 8, 1.0, causal=True, window=3)
    got = visible(spec, 2, 6)  # query rows at positions 4 and 5
    assert got.tolist() == [[False, False, True, True, True, False], [False, False, False, True, True, True]]
    assert visible(AttentionSpec(1, 1, 8, 8, 1.0), 3, 5).all()  # no causality: nothing hidden
    assert visible(spec, 6, 4).all()  # more queries than keys: no positions to align, the bias alone masks


def test_fast_exp_matches_numpy():
    x = np.concatenate([np.linspace(-100, 88, 20001), [-np.inf, -3.0e38, 0.0]]).astype(np.float32)
    @T.prim_func
    def kernel(a: T.Buffer((x.size,), "float32"), b: T.Buffer((x.size,), "float32")):
        for i in range(x.size):
            b[i] = fast_exp(a[i])

    with _TARGET.tvm_target():
        fn = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=_TARGET.tvm_target())
    out = tvm.runtime.tensor(np.zeros_like(x))
    fn["main"](tvm.runtime.tensor(x), out)
    ref = np.exp(x.astype(np.float64))
    got = out.numpy()
    big = ref > 1e-30
    assert np.max(np.abs(got[big] - ref[big]) / ref[big]) < 3e-7
    assert np.all(got[x < -88.4] == 0.0)  # masked scores contribute exactly nothing


def test_scratch_memory_does_not_grow_with_sequence():
    """Every buffer the kernel allocates has a static size: no [Sq, Skv] scores anywhere."""
    import re

    spec = AttentionSpec(4, 4, 32, 32, 0.2, causal=True, bias=(False, True, False))
    text = flash_attention_cpu(spec).script()
    shapes = re.findall(r"(?:alloc|decl)_buffer\(\(([^)]*)\)", text)
    assert len(shapes) >= 6, text  # q, k, score and output tiles, row max and sum
    dims = [d.strip() for shape in shapes for d in shape.split(",") if d.strip()]
    assert all(d.isdigit() for d in dims), shapes
    tiles = cpu_tiles(spec)
    total = sum(int(np.prod([int(d) for d in shape.split(",") if d.strip()])) for shape in shapes)
    assert total <= tiles.tq * (spec.head_dim + tiles.tk + spec.value_dim + 2) + spec.head_dim * tiles.tk + 3 + 8
