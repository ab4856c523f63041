"""Sliding-window attention Triton kernel vs its torch reference, in Triton's CPU interpreter (see conftest.py).

Tolerances: fp32 atol = rtol = 1e-4; fp16/bf16 atol = rtol = 1e-2 (P is rounded to the input dtype before P@V,
as in every flash kernel, and the output is stored in the input dtype).
"""
import random
import zlib

import pytest
import torch

from llmcc.kernels import _common
from llmcc.kernels import sliding_window_attention as swa

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
BF16_INTERPRETER = ("triton 3.9's interpreter gets tl.dot on bfloat16 operands wrong (a plain 16x16 bf16 dot is off "
                    "by ~1e10), so bf16 is only compiled (AOT test for sm_90), not checked numerically")
SMALL = swa.SlidingWindowAttentionConfig(BLOCK_M=16, BLOCK_N=16)


def make_qkv(batch, heads_q, heads_kv, seq_q, seq_kv, head_dim, dtype, gen):
    q = torch.randn(batch, heads_q, seq_q, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, heads_kv, seq_kv, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, heads_kv, seq_kv, head_dim, generator=gen).to(dtype)
    return q, k, v


def check(q, k, v, window, scale=None, config=SMALL, msg=""):
    out = swa.sliding_window_attention(q, k, v, window, scale, config=config)
    ref = swa.sliding_window_attention_reference(q, k, v, window, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out.float()).all(), msg
    torch.testing.assert_close(out.float(), ref.float(), **TOL[q.dtype], msg=lambda m: f"{msg}\n{m}")
    return out


def test_interpreter_engaged():
    kernel = _common.launchable(swa._sliding_window_attention_kernel)
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(kernel, InterpretedFunction)


# (batch, heads_q, heads_kv, seq_q, seq_kv, head_dim, window, dtype)
CASES = {
    "prefill_ragged": (1, 2, 2, 37, 37, 16, 8, torch.float32),
    "prefill_gqa3": (2, 6, 2, 45, 45, 16, 13, torch.float32),
    "decode": (2, 4, 2, 1, 77, 32, 20, torch.float32),
    "decode_mqa_fp16": (1, 4, 1, 1, 96, 32, 33, torch.float16),
    "chunked_prefill": (1, 2, 1, 20, 90, 16, 24, torch.float32),
    "window_longer_than_seq": (1, 2, 1, 50, 50, 16, 1000, torch.float32),
    "window_one": (1, 1, 1, 33, 33, 16, 1, torch.float32),
    "window_none_causal": (1, 2, 2, 40, 40, 16, None, torch.float32),
    "head_dim_24_masked": (1, 2, 1, 30, 30, 24, 9, torch.float32),
    "prefill_fp16": (1, 4, 2, 64, 64, 32, 17, torch.float16),
    "decode_bf16": (1, 2, 1, 1, 50, 16, 16, torch.bfloat16),
    "seq_1": (1, 1, 1, 1, 1, 16, 4, torch.float32),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_fixed_cases(case):
    batch, hq, hkv, sq, sk, d, w, dtype = CASES[case]
    if dtype == torch.bfloat16:
        pytest.skip(BF16_INTERPRETER)
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    check(*make_qkv(batch, hq, hkv, sq, sk, d, dtype, gen), w, msg=case)


def test_default_config_and_custom_scale():
    gen = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(1, 2, 1, 70, 96, 32, torch.float32, gen)
    check(q, k, v, 40, scale=0.37, config=None)
    check(q, k, v, 40, scale=0.37, config=swa.SlidingWindowAttentionConfig(BLOCK_M=32, BLOCK_N=16))


@pytest.mark.parametrize("trial", range(6))
def test_random(trial, seed):
    rng = random.Random(seed + trial)
    heads_kv = rng.choice([1, 2])
    heads_q = heads_kv * rng.choice([1, 2, 3])
    seq_kv = rng.randint(1, 96)
    seq_q = rng.choice([1, seq_kv, rng.randint(1, seq_kv)])
    head_dim = rng.choice([16, 32])
    window = rng.choice([None, 1, rng.randint(1, 40), rng.randint(1, 200)])
    dtype = rng.choice([torch.float32, torch.float16])
    config = swa.SlidingWindowAttentionConfig(BLOCK_M=rng.choice([16, 32]), BLOCK_N=rng.choice([16, 32]))
    msg = (f"seed={seed + trial} batch=1 {heads_q=} {heads_kv=} {seq_q=} {seq_kv=} {head_dim=} {window=} {dtype=} "
           f"{config}")
    gen = torch.Generator().manual_seed(seed + trial)
    check(*make_qkv(rng.choice([1, 2]), heads_q, heads_kv, seq_q, seq_kv, head_dim, dtype, gen), window,
          config=config, msg=msg)


def test_skips_key_blocks_outside_the_window():
    """Poison K/V outside the visited key range with NaN: if the kernel read those blocks, NaN would propagate."""
    gen = torch.Generator().manual_seed(7)
    seq_q, seq_kv, window = 16, 96, 8
    q, k, v = make_qkv(1, 2, 1, seq_q, seq_kv, 16, torch.float32, gen)
    lo, hi = swa.sliding_window_key_range(0, seq_q, seq_kv, window, 16, 16)
    assert (lo, hi) == (64, 96)
    ref = swa.sliding_window_attention_reference(q, k, v, window)
    k[:, :, :lo] = float("nan")
    v[:, :, :lo] = float("nan")
    out = swa.sliding_window_attention(q, k, v, window, config=SMALL)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    # decode: one query at position 95 sees keys 88..95, the kernel walks only [80, 96)
    q1 = q[:, :, -1:].contiguous()
    out1 = swa.sliding_window_attention(q1, k, v, window, config=SMALL)
    torch.testing.assert_close(out1, ref[:, :, -1:], **TOL[torch.float32])


def test_out_argument():
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, torch.float32, gen)
    buf = torch.full_like(q, 123.0)
    res = swa.sliding_window_attention(q, k, v, 5, out=buf, config=SMALL)
    assert res is buf
    torch.testing.assert_close(buf, swa.sliding_window_attention_reference(q, k, v, 5), **TOL[torch.float32])


def test_work_grows_with_window_not_sequence():
    d = 64
    cfg = swa.SlidingWindowAttentionConfig()  # 64 x 64 tiles
    for window in (256, 1024):
        worst = []
        for seq in (4096, 16384):
            spans = [swa.sliding_window_key_range(qb, seq, seq, window, 64, 64) for qb in range(seq // 64)]
            worst.append(max(-(-(hi - lo) // 64) for lo, hi in spans))
            c = swa.sliding_window_op_count(seq, seq, window, d, cfg)
            assert c["tiles"] == sum(-(-(hi - lo) // 64) for lo, hi in spans)
            assert c["tiles"] <= (seq // 64) * ((64 + window) // 64 + 1)
        assert worst[0] == worst[1] == window // 64 + 1, (window, worst)  # per query block: constant in seq
    decode = swa.sliding_window_op_count(1, 16384, 4096, d, swa.SlidingWindowAttentionConfig(16, 64))
    assert decode["tiles"] == 64  # position 16383 sees keys 12288..16383: 64 aligned tiles of 64 keys
    decode = swa.sliding_window_op_count(1, 16384, 4000, d, swa.SlidingWindowAttentionConfig(16, 64))
    assert decode["tiles"] == 63  # keys 12384..16383, walked from 12352


def _qkv(shape_q=(1, 2, 8, 16), shape_kv=(1, 2, 8, 16), dtype=torch.float32):
    return torch.randn(shape_q).to(dtype), torch.randn(shape_kv).to(dtype), torch.randn(shape_kv).to(dtype)


@pytest.mark.parametrize("name,make,window,match", [
    ("q_rank3", lambda: (torch.randn(2, 8, 16), *_qkv()[1:]), 4, "q must be 4-D"),
    ("k_rank5", lambda: (_qkv()[0], torch.randn(1, 1, 2, 8, 16), _qkv()[2]), 4, "k must be 4-D"),
    ("heads_not_multiple", lambda: _qkv((1, 3, 8, 16), (1, 2, 8, 16)), 4, "heads_q=3 must be a positive multiple"),
    ("head_dim_mismatch", lambda: _qkv((1, 2, 8, 16), (1, 2, 8, 32)), 4, "head_dim mismatch"),
    ("batch_mismatch", lambda: _qkv((2, 2, 8, 16), (1, 2, 8, 16)), 4, "batch mismatch"),
    ("kv_shape_mismatch", lambda: (*_qkv()[:2], torch.randn(1, 2, 9, 16)), 4, "k and v must have the same shape"),
    ("dtype_mismatch", lambda: (_qkv()[0].half(), *_qkv()[1:]), 4, "share a dtype"),
    ("int_dtype", lambda: (torch.ones(1, 2, 8, 16, dtype=torch.int32),) * 3, 4, "is not supported"),
    ("noncontiguous", lambda: (torch.randn(1, 8, 2, 16).transpose(1, 2), *_qkv()[1:]), 4, "q must be contiguous"),
    ("seq_q_gt_seq_kv", lambda: _qkv((1, 2, 9, 16), (1, 2, 8, 16)), 4, "seq_q=9 > seq_kv=8"),
    ("window_zero", lambda: _qkv(), 0, "window=0"),
    ("window_float", lambda: _qkv(), 4.0, "window=4.0"),
    ("head_dim_too_big", lambda: _qkv((1, 1, 2, 512), (1, 1, 2, 512)), 4, "head_dim=512"),
    ("not_a_tensor", lambda: ([[1.0]], *_qkv()[1:]), 4, "q must be a torch.Tensor"),
])
def test_validation_errors(name, make, window, match):
    q, k, v = make()
    with pytest.raises(ValueError, match=match):
        swa.sliding_window_attention(q, k, v, window)


def test_validation_scale_config_out():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="scale=nan"):
        swa.sliding_window_attention(q, k, v, 4, float("nan"))
    with pytest.raises(ValueError, match="BLOCK_M=24"):
        swa.SlidingWindowAttentionConfig(BLOCK_M=24)
    with pytest.raises(ValueError, match="config must be"):
        swa.sliding_window_attention(q, k, v, 4, config={"BLOCK_M": 16})
    with pytest.raises(ValueError, match="out must be"):
        swa.sliding_window_attention(q, k, v, 4, out=torch.empty(1, 2, 8, 8))


def test_cpu_tensors_refused_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        swa.sliding_window_attention(q, k, v, 4)


def test_config_default():
    assert swa.SlidingWindowAttentionConfig.get_default() == swa.SlidingWindowAttentionConfig(64, 64, 4, 2)
    assert swa.SlidingWindowAttentionConfig.get_default(seq_q=1).BLOCK_M == 16
    with pytest.raises(Exception):
        swa.SlidingWindowAttentionConfig().BLOCK_M = 32  # frozen


@pytest.mark.parametrize("cc", [80, 90])
def test_aot_compile_for_cuda(cc, aot_env):
    kern = swa.compile_for_cuda(torch.float16, 64, cc)
    assert kern.asm["ptx"].lstrip().startswith("//") and ".entry _sliding_window_attention_kernel" in kern.asm["ptx"]
    assert f".target sm_{cc}" in kern.asm["ptx"]
    assert isinstance(kern.asm["cubin"], bytes) and kern.asm["cubin"][:4] == b"\x7fELF"
    if cc == 80:  # fp32 (IEEE products), small tiles: keeps the compile short
        k32 = swa.compile_for_cuda(torch.float32, 16, cc, swa.SlidingWindowAttentionConfig(16, 16, 2, 1))
        assert k32.asm["cubin"][:4] == b"\x7fELF"
    else:  # bf16: its numerics cannot be checked in the interpreter (see BF16_INTERPRETER)
        kbf = swa.compile_for_cuda(torch.bfloat16, 128, cc)
        assert kbf.asm["cubin"][:4] == b"\x7fELF"
