"""Block layouts of constant masks (llmcc.kernels.block_layout) and the kernels that walk them: the CPU flash kernel
(vs the float64 numpy reference with the mask as a bias, fp32 within 1e-5) and the Triton block-sparse kernel's
launcher (its CSR is the wrapper's; the kernel in Triton's interpreter vs its torch reference within 1e-4).

Masks are random: block patterns at random block sizes, token-level patterns with whole hidden tiles, ragged
sequence ends. Must-not-fire: a row that sees no key, a mask with no hidden tile, a mask per batch element, a
visible entry that is not 0 (for dropping the mask), a token-level pattern (no uniform block size)."""

import numpy as np
import pytest
import torch

import llmcc.targets
from llmcc.kernels import block_layout
from llmcc.kernels import block_sparse_attention as bsa
from llmcc.kernels.flash_attention import AttentionSpec, attention_reference, cpu_tiles, flash_attention_kernel

from test_flash_attention import _build, _inputs, _run

HIDE = np.float32(-3.4028235e38)


def _block_mask(rng, heads, sq, skv, bs, density=0.4):
    """An additive mask [heads, sq, skv] from a random block layout at ``bs`` (every row keeps a visible block)."""
    nq, nk = -(-sq // bs), -(-skv // bs)
    layout = rng.random((heads, nq, nk)) < density
    layout[:, 0, -1] = False  # one hidden block (nk >= 2 here)
    layout[:, np.arange(nq), np.minimum(np.arange(nq), nk - 2)] = True  # every row sees a block
    keep = layout.repeat(bs, 1).repeat(bs, 2)[:, :sq, :skv]
    return np.where(keep, np.float32(0), HIDE), layout


def _brute_tiles(mask, bq, bk):
    m = mask.reshape((-1,) + mask.shape[-2:]) > block_layout.HIDDEN
    nq, nk = -(-m.shape[1] // bq), -(-m.shape[2] // bk)
    return np.array([[[m[h, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any() for j in range(nk)] for i in range(nq)]
                     for h in range(m.shape[0])])


@pytest.mark.parametrize("trial", range(6))
def test_tile_layout_and_uniform_block_size(trial, seed):
    rng = np.random.default_rng(seed + trial)
    heads = int(rng.choice([1, 3]))
    bs = int(rng.choice([16, 32, 64]))
    sq, skv = int(rng.integers(2 * bs, 6 * bs)), int(rng.integers(2 * bs, 6 * bs))
    mask, layout = _block_mask(rng, heads, sq, skv, bs)
    for bq, bk in ((32, 32), (int(rng.integers(1, 40)), 32), (bs, bs)):
        tiles = block_layout.tile_layout(mask, heads, bq, bk)
        brute = _brute_tiles(mask, bq, bk)
        assert (tiles is None and brute.all()) or (tiles == brute).all()
    found = block_layout.uniform_block_size(mask, heads)
    assert found is not None and found >= bs
    # the layout at the size found reproduces the mask exactly
    tiles = block_layout.tile_layout(mask, heads, found, found)
    keep = tiles.repeat(found, 1).repeat(found, 2)[:, :sq, :skv]
    assert (keep == (mask > block_layout.HIDDEN)).all()


def test_csr_is_the_triton_wrappers():
    rng = np.random.default_rng(0)
    layout = rng.random((3, 5, 7)) < 0.4
    rows, cols = block_layout.layout_csr(layout)
    t_rows, t_cols = bsa.layout_to_csr(torch.from_numpy(layout))
    assert rows.dtype == cols.dtype == np.int32
    assert (rows == t_rows.numpy()).all() and (cols == t_cols.numpy()).all()
    rows, cols = block_layout.layout_csr(np.zeros((1, 2, 2), bool))
    assert list(rows) == [0, 0, 0] and cols.shape == (1,)  # no zero-size buffer


def test_masks_that_must_not_give_a_layout():
    rng = np.random.default_rng(1)
    mask, _ = _block_mask(rng, 1, 128, 128, 32)
    blind = mask.copy()
    blind[0, 5, :] = HIDE  # a row that sees nothing: the unfused graph spreads it over every key
    assert block_layout.tile_layout(blind, 1, 32, 32) is None
    assert block_layout.uniform_block_size(blind, 1) is None
    assert block_layout.tile_layout(np.zeros((128, 128), np.float32), 4, 32, 32) is None  # nothing hidden
    per_batch = np.stack([mask, mask])  # [2, 1, S, S]: differs per batch element in general
    assert block_layout.tile_layout(per_batch, 1, 32, 32) is None
    alibi = np.where(mask > block_layout.HIDDEN, np.float32(-0.5), HIDE)  # visible but not 0: a bias, not a layout
    assert block_layout.tile_layout(alibi, 1, 32, 32) is not None
    assert block_layout.uniform_block_size(alibi, 1) is None
    token = mask.copy()
    token[0, 3, 100] = 0.0 if token[0, 3, 100] < 0 else HIDE  # one token off the block pattern
    assert block_layout.uniform_block_size(token, 1) is None
    wrong_heads = np.zeros((1, 2, 64, 64), np.float32)
    assert block_layout.tile_layout(wrong_heads, 4, 32, 32) is None


def _spec_with_layout(rng, sq, heads, kv_heads):
    d = int(rng.choice([16, 32, 64]))
    base = AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=d, value_dim=d,
                         scale=float(rng.uniform(0.1, 0.4)), bias=(True, False, False), q_len=sq,
                         q_layout=str(rng.choice(["bnsd", "bsnd"])), k_layout=str(rng.choice(["bnsd", "bnds"])),
                         v_layout=str(rng.choice(["bnsd", "bsnd"])), out_layout=str(rng.choice(["bnsd", "bsnd"])))
    return base


@pytest.mark.parametrize("trial", range(5))
def test_cpu_kernel_walks_the_layout_exactly(trial, seed):
    """Random block masks (blocks of 32 or 64, ragged ends, per head or shared) and token-level masks with hidden tiles:
    the kernel that walks only the listed tiles matches the reference that adds the whole mask."""
    rng = np.random.default_rng(seed + 100 * trial)
    kv_heads = int(rng.choice([1, 2]))
    heads = kv_heads * int(rng.choice([1, 2]))
    mask_heads = int(rng.choice([1, heads]))
    if trial % 2:  # blocks of 32 or 64 (whole CPU tiles), ragged end; the first row's last block hidden
        bs = int(rng.choice([32, 64]))
        sq = skv = int(rng.integers(2 * bs + 1, 4 * bs))
        nb = -(-sq // bs)
        layout = rng.random((mask_heads, nb, nb)) < 0.3
        layout[:, np.arange(nb), np.arange(nb)] = True
        layout[:, 0, -1] = False
        keep = layout.repeat(bs, 1).repeat(bs, 2)[:, :sq, :skv]
        mask = np.where(keep, np.float32(0), HIDE)
    else:  # token-level: random keys in random 32 x 32 tiles, the others (and the top-right one) wholly hidden
        sq = skv = int(rng.integers(40, 200))
        mask = np.where(rng.random((mask_heads, sq, skv)) < 0.5, np.float32(0), HIDE)
        tiles_hidden = rng.random((mask_heads, -(-sq // 32), -(-skv // 32))) < 0.5
        tiles_hidden[:, 0, -1] = True
        mask = np.where(tiles_hidden.repeat(32, 1).repeat(32, 2)[:, :sq, :skv], HIDE, mask)
        mask[:, np.arange(sq), np.arange(sq)] = 0.0  # every row sees itself
    spec = _spec_with_layout(rng, sq, heads, kv_heads)
    tiles = cpu_tiles(spec)
    layout = block_layout.tile_layout(mask, heads, tiles.tq, tiles.tk)
    assert layout is not None and not layout.all()
    spec = AttentionSpec(**{**spec.__dict__, "bias": (True, mask_heads == 1, False),
                            "block_layout": (tiles.tq, tiles.tk, layout.shape[0])})
    q, k, v = _inputs(spec, rng, 1, sq, skv)[:3]
    bias = mask[None]
    rows, cols = block_layout.layout_csr(layout)
    fn = _build(spec)
    out = _run(fn, spec, [q, k, v, bias, rows, cols], 1, sq)
    ref = attention_reference(spec, q, k, v, bias)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # the kernel reads only the listed tiles: a layout that lists none gives zeros, whatever the mask shows
    empty_rows, empty_cols = block_layout.layout_csr(np.zeros_like(layout))
    assert not _run(fn, spec, [q, k, v, bias, empty_rows, empty_cols], 1, sq).any()


def test_cpu_kernel_refuses_a_layout_at_other_tiles():
    spec = AttentionSpec(num_heads=2, num_kv_heads=2, head_dim=16, value_dim=16, scale=0.25, bias=(True, True, False),
                         q_len=64, block_layout=(64, 64, 1))
    with pytest.raises(ValueError, match="not the CPU kernel"):
        flash_attention_kernel(spec, llmcc.targets.resolve("cpu"))
    assert "block layout" in AttentionSpec(**{**spec.__dict__, "causal": True}).check()
    assert "block layout" in AttentionSpec(**{**spec.__dict__, "q_len": None}).check()


def test_cuda_tir_kernel_refuses_a_layout():
    from llmcc.kernels.flash_attention_cuda import flash_attention_cuda

    spec = AttentionSpec(num_heads=2, num_kv_heads=2, head_dim=16, value_dim=16, scale=0.25, q_len=64,
                         block_layout=(32, 32, 1))
    with pytest.raises(ValueError, match="block layout"):
        flash_attention_cuda(spec, "sm_80")


@pytest.mark.parametrize("trial", range(3))
def test_triton_kernel_on_the_pass_layout(trial, seed):
    """The CSR the pass hands the Triton launcher, at the uniform block size it finds, run by the Triton kernel
    (interpreter) against its torch reference and against the dense computation with the mask added."""
    rng = np.random.default_rng(seed + trial)
    heads, bs = 2, int(rng.choice([16, 32]))
    sq = int(rng.integers(3 * bs, 6 * bs))
    mask, _ = _block_mask(rng, int(rng.choice([1, heads])), sq, sq, bs, density=0.35)
    found = block_layout.uniform_block_size(mask, heads)
    assert found is not None
    layout = block_layout.tile_layout(mask, heads, found, found)
    q, k, v = (torch.from_numpy(rng.standard_normal((1, heads, sq, 16)).astype(np.float32)) for _ in range(3))
    cfg = bsa.BlockSparseAttentionConfig(BLOCK_M=16, BLOCK_N=16)
    out = bsa.block_sparse_attention(q, k, v, torch.from_numpy(layout), found, 0.25, config=cfg)
    spec = AttentionSpec(num_heads=heads, num_kv_heads=heads, head_dim=16, value_dim=16, scale=0.25,
                         bias=(True, mask.shape[0] == 1, False))
    ref = attention_reference(spec, q.numpy(), k.numpy(), v.numpy(), mask[None])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_triton_launcher_signature_and_routing(aot_env):
    from llmcc.kernels import triton_embed
    import json

    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=32, value_dim=32, scale=0.2, q_len=256,
                         block_layout=(32, 32, 4), q_layout="bsnd", k_layout="bnds", out_layout="bsnd")
    kind, func = flash_attention_kernel(spec, llmcc.targets.resolve("cuda:sm_80"))
    assert kind == "triton"
    assert [p.name for p in func.params][3:5] == ["Rows", "Cols"] and len(func.params) == 6
    name = str(func.attrs[triton_embed.ATTR_NAME])
    assert name.startswith("llmcc_triton_bsa_fp32_d32_b32") and f'T.call_packed("{name}"' in func.script()
    # 7 pointers + 16 strides + 8 scalars + Triton's 2 scratch pointers, as the cubin's .param list
    assert len(json.loads(str(func.attrs[triton_embed.ATTR_ARG_TYPES]))) == 33
    with pytest.raises(ValueError, match="square blocks"):
        triton_embed.block_sparse_attention_func(AttentionSpec(**{**spec.__dict__, "block_layout": (32, 64, 1)}))
    with pytest.raises(ValueError, match="bias"):
        triton_embed.block_sparse_attention_func(AttentionSpec(**{**spec.__dict__, "bias": (True, True, False)}))
