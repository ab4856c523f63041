"""w8a8 matmul: activations quantized per token at run time, int8 x int8 products summed in int32.

    s_x[m] = max(|x[m, :]|) / 127            q_x = round_half_even(x / s_x)        (quantize_rows)
    y[m, n] = (sum_k int32(q_x[m, k]) * int32(q_w[k, n])) * s_x[m] * s_w[n]        (int8_matmul)

Two kernels, because the row maximum is a reduction of its own that the matmul rules do not take as a prologue.
The weight is ``llmcc.kernels.dequant_matmul``'s int8 format (``q_w[K, N]``, ``s_w[N]``). Sections: the numpy
reference, then the TE kernels.
"""

from __future__ import annotations

import numpy as np

INT8_MAX = 127.0
TINY = 1e-30  # an all-zero row quantizes to zeros instead of dividing by zero


def quantize_rows_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float32)
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / np.float32(INT8_MAX), np.float32(TINY))
    return np.round(x / scale).astype(np.int8), scale.astype(np.float32)


def w8a8_matmul_reference(x: np.ndarray, q_w: np.ndarray, s_w: np.ndarray) -> np.ndarray:
    q_x, s_x = quantize_rows_reference(x)
    acc = q_x.astype(np.int64) @ q_w.astype(np.int64)
    return (acc.astype(np.float32) * s_x * s_w).astype(np.float32)


def quantize_rows_te(x):
    """(x[..., K]) -> (q_x[..., K] int8, s_x[..., 1] float32)."""
    from tvm import te, tirx

    k = te.reduce_axis((0, x.shape[-1]), name="k")
    lead = list(x.shape[:-1])
    amax = te.compute(lead + [1], lambda *i: te.max(te.abs(x[tuple(i[:-1]) + (k,)]), axis=k), name="row_absmax")
    scale = te.compute(lead + [1], lambda *i: te.max(amax[i] / tirx.const(INT8_MAX, x.dtype),
                                                     tirx.const(TINY, x.dtype)), name="row_scale")
    q = te.compute(list(x.shape), lambda *i: tirx.nearbyint(x[i] / scale[tuple(i[:-1]) + (0,)]).astype("int8"),
                   name="quantize_rows")
    return q, scale


def int8_matmul_te(q_x, s_x, q_w, s_w):
    """(q_x[..., K] int8, s_x[..., 1], q_w[K, N] int8, s_w[N]) -> y[..., N] float32."""
    from tvm import te

    k = te.reduce_axis((0, q_w.shape[0]), name="k")
    out_shape = list(q_x.shape[:-1]) + [q_w.shape[1]]
    acc = te.compute(out_shape, lambda *i: te.sum(q_x[tuple(i[:-1]) + (k,)].astype("int32")
                                                  * q_w[k, i[-1]].astype("int32"), axis=k), name="int8_matmul")
    return te.compute(out_shape, lambda *i: acc[i].astype("float32") * s_x[tuple(i[:-1]) + (0,)] * s_w[i[-1]],
                      name="rescale")
