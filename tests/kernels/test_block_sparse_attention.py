"""Block-sparse attention Triton kernel vs its torch reference, in Triton's CPU interpreter (see conftest.py);
layout builders and operation counts.

Tolerances: fp32 atol = rtol = 1e-4; fp16 atol = rtol = 1e-2.
"""
import random
import zlib

import pytest
import torch

from llmcc.kernels import _common
from llmcc.kernels import block_sparse_attention as bsa

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}
SMALL = bsa.BlockSparseAttentionConfig(BLOCK_M=16, BLOCK_N=16)


def make_qkv(batch, heads_q, heads_kv, seq_q, seq_kv, head_dim, dtype, gen):
    q = torch.randn(batch, heads_q, seq_q, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, heads_kv, seq_kv, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, heads_kv, seq_kv, head_dim, generator=gen).to(dtype)
    return q, k, v


def check(q, k, v, layout, block_size, *, causal=False, kv_lengths=None, scale=None, config=SMALL, msg=""):
    out = bsa.block_sparse_attention(q, k, v, layout, block_size, scale, causal=causal, kv_lengths=kv_lengths,
                                     config=config)
    ref = bsa.block_sparse_attention_reference(q, k, v, layout, block_size, scale, causal=causal,
                                               kv_lengths=kv_lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out.float()).all(), msg
    torch.testing.assert_close(out.float(), ref.float(), **TOL[q.dtype], msg=lambda m: f"{msg}\n{m}")
    return out


def test_interpreter_engaged():
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(_common.launchable(bsa._block_sparse_attention_kernel), InterpretedFunction)


def nb(seq, bs):
    return -(-seq // bs)


# name: (batch, heads_q, heads_kv, seq_q, seq_kv, head_dim, block_size, layout kind, causal, kv_lengths, dtype)
CASES = {
    "bigbird_ragged": (1, 2, 2, 90, 90, 16, 16, "bigbird", False, False, torch.float32),
    "bigbird_per_head_gqa": (2, 4, 2, 96, 96, 32, 16, "bigbird_heads", False, False, torch.float32),
    "longformer_ragged_fp16": (1, 2, 1, 75, 75, 32, 16, "longformer", False, False, torch.float16),
    "longformer_kv_lengths": (2, 2, 2, 64, 64, 16, 16, "longformer", False, True, torch.float32),
    "block32_tiles16_causal": (1, 2, 1, 70, 70, 16, 32, "random", True, False, torch.float32),
    "cross_lengths": (1, 2, 2, 33, 80, 16, 16, "random", False, False, torch.float32),
    "decode_like_causal": (1, 3, 1, 1, 61, 16, 16, "dense", True, False, torch.float32),
    "head_dim_24": (1, 1, 1, 40, 40, 24, 16, "bigbird", False, False, torch.float32),
}


def build_layout(kind, heads_q, seq_q, seq_kv, bs, gen):
    nq, nk = nb(seq_q, bs), nb(seq_kv, bs)
    if kind == "bigbird":
        return bsa.bigbird_layout(nq, window_blocks=3, global_blocks=2, random_blocks=1, seed=5)
    if kind == "bigbird_heads":
        return bsa.bigbird_layout(nq, window_blocks=1, global_blocks=1, random_blocks=2, seed=5, num_heads=heads_q)
    if kind == "longformer":
        return bsa.longformer_layout(nq, 3, global_block_ids=(0, -1))
    if kind == "dense":
        return torch.ones(1, nq, nk, dtype=torch.int32)
    return torch.rand(1, nq, nk, generator=gen) < 0.5


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_fixed_cases(case):
    batch, hq, hkv, sq, sk, d, bs, kind, causal, use_lens, dtype = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    layout = build_layout(kind, hq, sq, sk, bs, gen)
    kv_lengths = torch.randint(1, sk + 1, (batch,), generator=gen) if use_lens else None
    check(*make_qkv(batch, hq, hkv, sq, sk, d, dtype, gen), layout, bs, causal=causal, kv_lengths=kv_lengths,
          msg=case)


def test_default_config_and_scale():
    gen = torch.Generator().manual_seed(2)
    q, k, v = make_qkv(1, 2, 1, 70, 70, 32, torch.float32, gen)
    layout = bsa.bigbird_layout(nb(70, 32), random_blocks=0)
    check(q, k, v, layout, 32, scale=0.2, config=None)


@pytest.mark.parametrize("trial", range(6))
def test_random(trial, seed):
    rng = random.Random(seed + trial)
    gen = torch.Generator().manual_seed(seed + trial)
    heads_kv = rng.choice([1, 2])
    heads_q = heads_kv * rng.choice([1, 2])
    bs = rng.choice([16, 32])
    seq_kv = rng.randint(1, 96)
    seq_q = rng.choice([seq_kv, rng.randint(1, seq_kv)])
    head_dim = rng.choice([16, 32])
    causal = rng.random() < 0.3
    dtype = rng.choice([torch.float32, torch.float16])
    lheads = rng.choice([1, heads_q])
    layout = torch.rand(lheads, nb(seq_q, bs), nb(seq_kv, bs), generator=gen) < rng.uniform(0.1, 0.9)
    kv_lengths = torch.randint(0, seq_kv + 1, (2,), generator=gen) if rng.random() < 0.3 else None
    config = bsa.BlockSparseAttentionConfig(BLOCK_M=rng.choice([16, bs]), BLOCK_N=rng.choice([16, bs]))
    msg = (f"seed={seed + trial} {heads_q=} {heads_kv=} {bs=} {seq_q=} {seq_kv=} {head_dim=} {causal=} {dtype=} "
           f"{lheads=} {kv_lengths=} {config}\nlayout={layout.int().tolist()}")
    check(*make_qkv(2, heads_q, heads_kv, seq_q, seq_kv, head_dim, dtype, gen), layout, bs, causal=causal,
          kv_lengths=kv_lengths, config=config, msg=msg)


def test_empty_rows_give_zeros_and_unlisted_blocks_are_never_read():
    """Key blocks in no layout row are poisoned with NaN (the kernel must not read them); an empty query row and an
    all-padded batch give zeros."""
    gen = torch.Generator().manual_seed(11)
    bs, seq = 16, 80  # 5 blocks
    q, k, v = make_qkv(2, 2, 2, seq, seq, 16, torch.float32, gen)
    layout = torch.zeros(1, 5, 5, dtype=torch.bool)
    layout[0, 0, 0] = layout[0, 1, [0, 1]] = layout[0, 3, [3, 0]] = layout[0, 4, 4] = True  # row 2 empty
    ref = bsa.block_sparse_attention_reference(q, k, v, layout, bs)
    k[:, :, 2 * bs:3 * bs] = float("nan")  # column 2: in no row
    v[:, :, 2 * bs:3 * bs] = float("nan")
    out = bsa.block_sparse_attention(q, k, v, layout, bs, config=SMALL)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    assert (out[:, :, 2 * bs:3 * bs] == 0).all()
    lens = torch.tensor([0, 40])
    out = bsa.block_sparse_attention(q, k.nan_to_num(), v.nan_to_num(), layout, bs, kv_lengths=lens, config=SMALL)
    assert (out[0] == 0).all()
    empty = bsa.block_sparse_attention(q, k, v, torch.zeros(1, 5, 5, dtype=torch.bool), bs, config=SMALL)
    assert (empty == 0).all()


def test_layout_to_csr():
    layout = torch.tensor([[[1, 0, 1], [0, 0, 0]], [[0, 1, 0], [1, 1, 1]]], dtype=torch.int8)
    row_ptr, col_idx = bsa.layout_to_csr(layout)
    assert row_ptr.tolist() == [0, 2, 2, 3, 6] and col_idx.tolist() == [0, 2, 1, 0, 1, 2]
    assert row_ptr.dtype == col_idx.dtype == torch.int32


def test_bigbird_layout_structure(seed):
    n, w, g, r = 20, 3, 2, 3
    lay = bsa.bigbird_layout(n, window_blocks=w, global_blocks=g, random_blocks=r, seed=seed, num_heads=3)
    assert lay.shape == (3, n, n) and lay.dtype == torch.bool
    i = torch.arange(n)
    band = (i[:, None] - i[None, :]).abs() <= 1
    assert lay[:, band].all()
    assert lay[:, [0, n - 1], :].all() and lay[:, :, [0, n - 1]].all()
    # every non-global row: band (<= 3) + 2 global columns + exactly r random extra blocks
    for h in range(3):
        for row in range(1, n - 1):
            expected_fixed = int((band[row] | (i == 0) | (i == n - 1)).sum())
            assert int(lay[h, row].sum()) == expected_fixed + r, (seed, h, row)
    assert torch.equal(lay, bsa.bigbird_layout(n, w, g, r, seed=seed, num_heads=3))  # seeded
    assert not torch.equal(lay[0], lay[1]) or not torch.equal(lay[1], lay[2])  # heads draw their own random blocks
    assert bsa.bigbird_layout(4, 3, 2, 10).all()  # fewer free blocks than asked: takes them all
    assert bsa.bigbird_layout(6, 1, 3, 0)[0, :, [0, 1, 5]].all()  # g=3: first two and the last


def test_longformer_layout_structure():
    lay = bsa.longformer_layout(10, 5, global_block_ids=(0, -1, 4), num_heads=2)
    assert lay.shape == (2, 10, 10)
    i = torch.arange(10)
    expected = ((i[:, None] - i[None, :]).abs() <= 2)
    for gid in (0, 9, 4):
        expected[gid, :] = True
        expected[:, gid] = True
    assert torch.equal(lay[0], expected) and torch.equal(lay[1], expected)
    with pytest.raises(ValueError, match="global block id 10"):
        bsa.longformer_layout(10, 3, (10,))
    with pytest.raises(ValueError, match="window_blocks=2"):
        bsa.longformer_layout(10, 2)
    with pytest.raises(ValueError, match="num_blocks=0"):
        bsa.bigbird_layout(0)


def test_op_count():
    layout = bsa.longformer_layout(64, 3, (0,))
    c = bsa.block_sparse_op_count(layout, 64, 64)
    assert c["block_pairs"] == int(layout.sum()) and c["dense_block_pairs"] == 64 * 64
    assert c["flops"] == c["block_pairs"] * 4 * 64 * 64 * 64
    assert c["dense_flops"] == 4 * 4096 * 4096 * 64  # 2 matmuls x 2 flops x seq^2 x head_dim
    # BigBird work grows linearly with the number of blocks: (w + g + r) per row plus the global rows
    for n in (64, 256):
        c = bsa.block_sparse_op_count(bsa.bigbird_layout(n, 3, 2, 3, seed=0), 64, 64)
        assert c["block_pairs"] == (n - 2) * (3 + 2 + 3) - 2 * 1 + 2 * n  # rows 1 and n-2 share a band/global
        assert c["density"] < 9 / n + 2 / n


def _qkv(shape_q=(1, 2, 32, 16), shape_kv=(1, 2, 32, 16), dtype=torch.float32):
    return torch.randn(shape_q).to(dtype), torch.randn(shape_kv).to(dtype), torch.randn(shape_kv).to(dtype)


LAY = torch.ones(1, 2, 2, dtype=torch.bool)


@pytest.mark.parametrize("name,make,layout,bs,kw,match", [
    ("q_rank3", lambda: (torch.randn(2, 32, 16), *_qkv()[1:]), LAY, 16, {}, "q must be 4-D"),
    ("heads_not_multiple", lambda: _qkv((1, 3, 32, 16), (1, 2, 32, 16)), LAY, 16, {}, "heads_q=3"),
    ("head_dim_mismatch", lambda: _qkv((1, 2, 32, 16), (1, 2, 32, 32)), LAY, 16, {}, "head_dim mismatch"),
    ("noncontiguous_k", lambda: (_qkv()[0], torch.randn(1, 32, 2, 16).transpose(1, 2), _qkv()[2]), LAY, 16, {},
     "k must be contiguous"),
    ("layout_rank2", lambda: _qkv(), LAY[0], 16, {}, "layout must be 3-D"),
    ("layout_blocks", lambda: _qkv(), torch.ones(1, 3, 2, dtype=torch.bool), 16, {}, r"layout blocks \(3, 2\)"),
    ("layout_heads", lambda: _qkv(), torch.ones(3, 2, 2, dtype=torch.bool), 16, {}, "layout has 3 heads"),
    ("layout_float", lambda: _qkv(), torch.ones(1, 2, 2), 16, {}, "must be bool or an integer"),
    ("layout_list", lambda: _qkv(), [[[1]]], 16, {}, "layout must be a torch.Tensor"),
    ("block_size_48", lambda: _qkv(), LAY, 48, {}, "block_size=48"),
    ("tile_bigger_than_block", lambda: _qkv(), LAY, 16,
     {"config": bsa.BlockSparseAttentionConfig(BLOCK_M=32)}, "BLOCK_M=32 must divide block_size=16"),
    ("kv_lengths_shape", lambda: _qkv(), LAY, 16, {"kv_lengths": torch.tensor([1, 2])}, "kv_lengths"),
    ("kv_lengths_float", lambda: _qkv(), LAY, 16, {"kv_lengths": torch.tensor([1.0])}, "kv_lengths"),
    ("causal_seq_q_gt_seq_kv", lambda: _qkv((1, 2, 32, 16), (1, 2, 16, 16)), torch.ones(1, 2, 1, dtype=torch.bool),
     16, {"causal": True}, "seq_q=32 > seq_kv=16"),
])
def test_validation_errors(name, make, layout, bs, kw, match):
    q, k, v = make()
    with pytest.raises(ValueError, match=match):
        bsa.block_sparse_attention(q, k, v, layout, bs, **kw)


def test_cpu_tensors_refused_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        bsa.block_sparse_attention(*_qkv(), LAY, 16)


@pytest.mark.parametrize("cc", [80, 90])
def test_aot_compile_for_cuda(cc, aot_env):
    kern = bsa.compile_for_cuda(torch.float16, 64, block_size=64, cc=cc, causal=False, has_kv_lengths=True)
    assert ".entry _block_sparse_attention_kernel" in kern.asm["ptx"] and f".target sm_{cc}" in kern.asm["ptx"]
    assert isinstance(kern.asm["cubin"], bytes) and kern.asm["cubin"][:4] == b"\x7fELF"
    if cc == 90:  # bf16, block 128 walked in 64-wide key tiles
        kb = bsa.compile_for_cuda(torch.bfloat16, 128, block_size=128, cc=cc, causal=True)
        assert kb.asm["cubin"][:4] == b"\x7fELF"
