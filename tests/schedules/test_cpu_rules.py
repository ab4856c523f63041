"""llmcc's CPU schedule rules: each one, on a small PrimFunc, gives a parallel + vectorized schedule whose results
equal the unscheduled function's (numpy reference), and declines what it must not handle."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import te, tirx  # noqa: E402

from llmcc import targets  # noqa: E402
from llmcc.schedules import rules_for  # noqa: E402
from llmcc.schedules.cpu import CpuFallback, CpuMatmul, CpuReduction  # noqa: E402
from llmcc.schedules.cpu_model import CpuModel  # noqa: E402


@pytest.fixture(scope="module")
def target():
    return targets.host_cpu().tvm_target()


def _schedule(rule, func, target):
    """The structure tests use small shapes: their model parallelizes any size (test_small_kernels_stay_serial
    checks the real thresholds)."""
    if rule.model is None:
        rule.model = dataclasses.replace(CpuModel.get(target), parallel_min_elems=1, parallel_min_work=1)
    with target:
        return rule.apply(func, target, False)


def _script(sch) -> str:
    return sch.mod["main"].script()


def _build(func, target):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


def _run(func, target, arrays):
    lib = _build(func, target)
    dev = tvm.cpu(0)
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    lib["main"](*args)
    return [a.numpy() for a in args]


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _matmul_bias_func(m_sym=True, k=48, n=40):
    m = tirx.Var("m", "int64") if m_sym else 1
    a = te.placeholder((m, k), name="A")
    w = te.placeholder((k, n), name="W")
    bias = te.placeholder((n,), name="bias")
    r = te.reduce_axis((0, k), name="k")
    mm = te.compute((m, n), lambda i, j: te.sum(a[i, r] * w[r, j], axis=r), name="matmul")
    out = te.compute((m, n), lambda i, j: mm[i, j] + bias[j], name="add")
    return te.create_prim_func([a, w, bias, out])


def _i64(v):
    return tirx.IntImm("int64", v)


def _batch_matmul_func():
    b, s = _i64(2), _i64(33)
    q = te.placeholder((b, _i64(2), s, _i64(16)), name="Q")
    kt = te.placeholder((b, _i64(2), _i64(16), _i64(24)), name="KT")
    r = te.reduce_axis((_i64(0), _i64(16)), name="k")
    out = te.compute((b, 2, s, 24), lambda i, h, x, y: te.sum(q[i, h, x, r] * kt[i, h, r, y], axis=r), name="bmm")
    return te.create_prim_func([q, kt, out])


def _softmax_func():
    rows = tirx.Var("rows", "int64")
    x = te.placeholder((rows, 203), name="X")
    k1 = te.reduce_axis((0, 203), name="k1")
    mx = te.compute((rows,), lambda i: te.max(x[i, k1], axis=k1), name="maxelem")
    ex = te.compute((rows, 203), lambda i, j: te.exp(x[i, j] - mx[i]), name="exp")
    k2 = te.reduce_axis((0, 203), name="k2")
    sm = te.compute((rows,), lambda i: te.sum(ex[i, k2], axis=k2), name="expsum")
    out = te.compute((rows, 203), lambda i, j: ex[i, j] / sm[i], name="norm")
    return te.create_prim_func([x, out])


def _elementwise_func(n=None):
    s = tirx.Var("s", "int64") if n is None else n
    x = te.placeholder((s, 256), name="X")
    y = te.placeholder((256,), name="Y")
    out = te.compute((s, 256), lambda i, j: te.sigmoid(x[i, j]) * y[j], name="silu")
    return te.create_prim_func([x, y, out])


def _transpose_func():
    s = tirx.Var("s", "int64")
    x = te.placeholder((s, 8, 32), name="X")
    out = te.compute((8, s, 32), lambda h, i, d: x[i, h, d] + 1.0, name="t")
    return te.create_prim_func([x, out])


def _assert_parallel_vectorized(sch):
    text = _script(sch)
    assert "T.parallel(" in text, text
    assert "T.vectorized(" in text, text


# ------------------------------------------------------------------------------------------------ model
def test_cpu_model_reads_target_features():
    avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "mattr": ["-avx512f"]})
    avx512 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    assert CpuModel.get(avx2).lanes(32) == 8
    assert CpuModel.get(avx512).lanes(32) == 16
    model = CpuModel.get(avx2)
    assert model.cores >= 1
    mr, nv = model.matmul_tile(16)
    assert mr * nv + nv + 1 <= model.vector_registers and 16 % nv == 0
    assert model.matmul_tile(16, gemv=True)[0] == 1


def test_rules_for_cpu_and_gpu():
    cpu_rules = [type(r).__name__ for r in rules_for(targets.host_cpu())]
    assert cpu_rules == ["CpuMatmul", "CpuReduction", "CpuFallback"]
    gpu_rules = [type(r).__name__ for r in rules_for(targets.resolve("cuda:sm_80"))]
    assert "CpuMatmul" not in gpu_rules


# ------------------------------------------------------------------------------------------------ matmul
def test_matmul_symbolic_m_with_epilogue(target):
    func = _matmul_bias_func()
    sch = _schedule(CpuMatmul(), func, target)
    assert sch is not None
    _assert_parallel_vectorized(sch)
    assert "T.unroll(" in _script(sch)
    for m in (1, 7, 13):  # not a multiple of the row tile: the predicate handles the rest
        a, w, bias = _rand(m, 48), _rand(48, 40, seed=1), _rand(40, seed=2)
        out = _run(sch.mod["main"], target, [a, w, bias, np.zeros((m, 40), "float32")])[-1]
        ref = _run(func, target, [a, w, bias, np.zeros((m, 40), "float32")])[-1]
        np.testing.assert_allclose(out, a @ w + bias, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_batch_matmul_heads(target):
    func = _batch_matmul_func()
    sch = _schedule(CpuMatmul(), func, target)
    assert sch is not None
    _assert_parallel_vectorized(sch)
    q, kt = _rand(2, 2, 33, 16), _rand(2, 2, 16, 24, seed=1)
    out = _run(sch.mod["main"], target, [q, kt, np.zeros((2, 2, 33, 24), "float32")])[-1]
    np.testing.assert_allclose(out, q @ kt, rtol=1e-5, atol=1e-5)


def test_gemv_m1(target):
    func = _matmul_bias_func(m_sym=False, k=256, n=128)
    sch = _schedule(CpuMatmul(), func, target)
    assert sch is not None
    _assert_parallel_vectorized(sch)
    a, w, bias = _rand(1, 256), _rand(256, 128, seed=1), _rand(128, seed=2)
    out = _run(sch.mod["main"], target, [a, w, bias, np.zeros((1, 128), "float32")])[-1]
    np.testing.assert_allclose(out, a @ w + bias, rtol=1e-5, atol=1e-5)


def test_matmul_declines_non_matmul(target):
    assert _schedule(CpuMatmul(), _softmax_func(), target) is None
    assert _schedule(CpuMatmul(), _elementwise_func(), target) is None
    # A transposed weight (C[m, n] += A[m, k] * W[n, k]) has no vector axis shared by B and C: not this rule's
    m = tirx.Var("m", "int64")
    a, w = te.placeholder((m, 32), name="A"), te.placeholder((16, 32), name="W")
    r = te.reduce_axis((0, 32), name="k")
    nt = te.compute((m, 16), lambda i, j: te.sum(a[i, r] * w[j, r], axis=r), name="nt")
    assert _schedule(CpuMatmul(), te.create_prim_func([a, w, nt]), target) is None


def test_matmul_declines_gpu_target():
    func = _matmul_bias_func()
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    assert CpuMatmul().apply(func, cuda, False) is None


# ------------------------------------------------------------------------------------------------ reduction
def test_softmax(target):
    func = _softmax_func()
    sch = _schedule(CpuReduction(), func, target)
    assert sch is not None
    _assert_parallel_vectorized(sch)
    x = _rand(11, 203)
    out = _run(sch.mod["main"], target, [x, np.zeros_like(x)])[-1]
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(out, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_reduction_declines_injective(target):
    assert _schedule(CpuReduction(), _elementwise_func(), target) is None


# ------------------------------------------------------------------------------------------------ fallback
def test_elementwise(target):
    func = _elementwise_func()
    sch = _schedule(CpuFallback(), func, target)
    assert sch is not None
    _assert_parallel_vectorized(sch)
    x, y = _rand(10, 256), _rand(256, seed=1)
    out = _run(sch.mod["main"], target, [x, y, np.zeros_like(x)])[-1]
    np.testing.assert_allclose(out, y / (1 + np.exp(-x)), rtol=1e-5, atol=1e-6)


def test_transpose(target):
    func = _transpose_func()
    sch = _schedule(CpuFallback(), func, target)
    assert sch is not None
    _assert_parallel_vectorized(sch)
    x = _rand(5, 8, 32)
    out = _run(sch.mod["main"], target, [x, np.zeros((8, 5, 32), "float32")])[-1]
    np.testing.assert_allclose(out, x.transpose(1, 0, 2) + 1.0)


def test_fallback_keeps_tiny_static_kernels_serial(target):
    sch = _schedule(CpuFallback(CpuModel.get(target)), _elementwise_func(n=2), target)
    assert sch is not None
    text = _script(sch)
    assert "T.vectorized(" in text and "T.parallel(" not in text


# ------------------------------------------------------------------------------------------------ tails
def _block_text(text: str, name: str) -> str:
    """The TVMScript of one block (from its ``T.sblock("name")`` line to the next block or loop at its depth)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if f'T.sblock("{name}")' in line)
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = [lines[start]]
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line)
    return "\n".join(body)


def _lowered(func, target):
    from tvm import s_tir

    seq = [s_tir.transform.LowerInitBlock(), s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
           s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.CompactBufferAllocation(),
           s_tir.transform.LowerOpaqueBlock()]
    with target:
        return tvm.ir.transform.Sequential(seq)(tvm.IRModule({"main": func}))["main"].script()


def _scores_func():
    """Attention scores q @ k^T: N (the vector axis) is the symbolic sequence length."""
    s = tirx.Var("s", "int64")
    q = te.placeholder((_i64(1), _i64(2), s, _i64(16)), name="Q")
    kt = te.placeholder((_i64(1), _i64(2), _i64(16), s), name="KT")
    r = te.reduce_axis((_i64(0), _i64(16)), name="k")
    out = te.compute((1, 2, s, s), lambda i, h, x, y: te.sum(q[i, h, x, r] * kt[i, h, r, y], axis=r), name="scores")
    return te.create_prim_func([q, kt, out])


def test_matmul_symbolic_m_full_tiles_without_predicate(target):
    """A symbolic M is padded to the row tile: the k loop's update has no predicate, the accumulator compacts to
    one MR x NR tile (registers), only the write-back is predicated; numerics for M not a multiple of the tile."""
    func = _matmul_bias_func()
    sch = _schedule(CpuMatmul(), func, target)
    text = _script(sch)
    update = _block_text(text, "matmul_update")
    assert "T.where" not in update, update
    assert "T.vectorized(" in text and "A_pad" in text
    lowered = _lowered(sch.mod["main"], target)
    acc = [line for line in lowered.splitlines() if "matmul_pad = T.alloc_buffer(" in line]
    shape = acc[0].split("T.alloc_buffer(")[1].split(", annotations")[0] if acc else ""
    # a static MR x NR tile, not M x N: a small constant global allocation is a stack slot LLVM keeps in registers
    assert shape and not re.search(r"\bm\b", shape), acc
    for m in (1, 5, 7, 13):
        a, w, bias = _rand(m, 48), _rand(48, 40, seed=1), _rand(40, seed=2)
        out = _run(sch.mod["main"], target, [a, w, bias, np.zeros((m, 40), "float32")])[-1]
        np.testing.assert_allclose(out, a @ w + bias, rtol=1e-5, atol=1e-5)


def test_attention_scores_symbolic_n_full_vectors_without_predicate(target):
    """q @ k^T with N = sequence: B is padded to whole vectors, so the vectorized lanes carry no bounds check."""
    func = _scores_func()
    sch = _schedule(CpuMatmul(), func, target)
    assert sch is not None
    text = _script(sch)
    update = _block_text(text, "scores_update")
    assert "T.where" not in update, update
    assert "T.vectorized(" in text
    for s in (1, 5, 8, 17):
        q, kt = _rand(1, 2, s, 16), _rand(1, 2, 16, s, seed=1)
        out = _run(sch.mod["main"], target, [q, kt, np.zeros((1, 2, s, s), "float32")])[-1]
        np.testing.assert_allclose(out, q @ kt, rtol=1e-5, atol=1e-5)


def test_fallback_does_not_fuse_symbolic_loops_into_the_parallel_loop(target):
    """A KV-cache reshape [batch, heads, past, dim]: the parallel loop is the static heads loop (fusing past + 1
    under it made every index a div/mod by a symbolic extent: seconds of compile time per kernel)."""
    batch, past = tirx.Var("batch", "int64"), tirx.Var("past", "int64")
    x = te.placeholder((batch, _i64(2), _i64(4), past, _i64(16)), name="X")
    out = te.compute((batch, _i64(8), past, _i64(16)),
                     lambda b, h, p, d: x[b, h // 4, h % 4, p, d], name="kv")
    func = te.create_prim_func([x, out])
    sch = _schedule(CpuFallback(), func, target)
    assert sch is not None
    text = _script(sch)
    par = [line for line in text.splitlines() if "T.parallel(" in line]
    assert len(par) == 1 and "past" not in par[0] and "batch" not in par[0], par
    assert "T.vectorized(" in text
    xs = _rand(2, 2, 4, 6, 16)
    res = _run(sch.mod["main"], target, [xs, np.zeros((2, 8, 6, 16), "float32")])[-1]
    np.testing.assert_allclose(res, xs.reshape(2, 8, 6, 16))


def test_softmax_symbolic_row_length_has_no_predicated_lanes(target):
    """Attention-score softmax: the row length is the symbolic sequence. Its injective stages stay plain loops
    (LLVM vectorizes them with a scalar tail) instead of TIR vectors with a bounds check per lane."""
    rows, n = tirx.Var("rows", "int64"), tirx.Var("n", "int64")
    x = te.placeholder((rows, n), name="X")
    k1 = te.reduce_axis((_i64(0), n), name="k1")
    mx = te.compute((rows,), lambda i: te.max(x[i, k1], axis=k1), name="maxelem")
    ex = te.compute((rows, n), lambda i, j: te.exp(x[i, j] - mx[i]), name="exp")
    k2 = te.reduce_axis((_i64(0), n), name="k2")
    sm = te.compute((rows,), lambda i: te.sum(ex[i, k2], axis=k2), name="expsum")
    out = te.compute((rows, n), lambda i, j: ex[i, j] / sm[i], name="norm")
    sch = _schedule(CpuReduction(), te.create_prim_func([x, out]), target)
    assert sch is not None
    text = _script(sch)
    assert "T.parallel(" in text and "T.where" not in text, text
    for length in (1, 7, 9, 20):
        xs = _rand(3, length)
        res = _run(sch.mod["main"], target, [xs, np.zeros_like(xs)])[-1]
        e = np.exp(xs - xs.max(axis=1, keepdims=True))
        np.testing.assert_allclose(res, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, parallel", [(128, False), (2048, True)])
def test_small_kernels_stay_serial(target, n, parallel):
    """A decode-size GEMV (128 x 128: 16K multiply-adds) is cheaper than a parallel launch; a 2048 x 2048 one is
    not. Same for a copy of 16K vs 4M elements."""
    with target:
        sch = CpuMatmul().apply(_matmul_bias_func(m_sym=False, k=n, n=n), target, False)
    assert ("T.parallel" in _script(sch)) == parallel
    with target:
        sch = CpuFallback().apply(_elementwise_func(n=n), target, False)
    assert ("T.parallel" in _script(sch)) == parallel


def _rope_concat_func(head=8):
    """The fused RoPE kernel of a 3-D RotaryEmbedding: concat(cos*x1 - sin*x2, sin*x1 + cos*x2) on [B, S, H, head]
    with the caches broadcast over heads (a concat is an if_then_else per element)."""
    half = head // 2
    x = te.placeholder((2, 6, 4, head), name="x")
    cos = te.placeholder((2, 6, half), name="cos")
    sin = te.placeholder((2, 6, half), name="sin")
    out = te.compute((2, 6, 4, head), lambda b, s, h, d: tirx.if_then_else(
        d < half, cos[b, s, d] * x[b, s, h, d] - sin[b, s, d] * x[b, s, h, d + half],
        sin[b, s, d - half] * x[b, s, h, d - half] + cos[b, s, d - half] * x[b, s, h, d]), name="rope")
    return te.create_prim_func([x, cos, sin, out])


@pytest.mark.parametrize("vector_bits", [256, 512])
def test_fallback_vectorizes_a_concat_along_its_innermost_axis(target, vector_bits):
    """A select per element (concat) is vectorized along its innermost axis only, even where that axis (8) is shorter
    than a vector: fused across rows, LLVM for AVX-512 computed garbage from the predicated gathers (this RoPE
    kernel at 16 lanes). Must not fire: a plain elementwise kernel with a short innermost axis still fuses."""
    model = dataclasses.replace(CpuModel.get(target), vector_bits=vector_bits, parallel_min_elems=1,
                                parallel_min_work=1)
    sch = _schedule(CpuFallback(model), _rope_concat_func(), target)
    vectorized = re.findall(r"in T\.vectorized\((?:T\.int64\()?(\d+)", _script(sch))
    assert vectorized == ["8"], _script(sch)
    rng = np.random.default_rng()
    x, cos, sin = (rng.standard_normal(s).astype("float32") for s in ((2, 6, 4, 8), (2, 6, 4), (2, 6, 4)))
    out = _run(sch.mod["main"], target, [x, cos, sin, np.zeros_like(x)])[-1]
    c, s_ = cos[:, :, None, :], sin[:, :, None, :]
    want = np.concatenate([c * x[..., :4] - s_ * x[..., 4:], s_ * x[..., :4] + c * x[..., 4:]], axis=-1)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    # must not fire: the same shape without a select fuses its rows into whole vectors (16 lanes at 512 bits)
    xt, ct = te.placeholder((2, 6, 4, 8), name="x"), te.placeholder((2, 6, 8), name="c")
    plain = te.create_prim_func([xt, ct, te.compute((2, 6, 4, 8), lambda b, s, h, d: ct[b, s, d] * xt[b, s, h, d])])
    sch = _schedule(CpuFallback(model), plain, target)
    assert re.findall(r"in T\.vectorized\((?:T\.int64\()?(\d+)", _script(sch)) == [str(vector_bits // 32)]
