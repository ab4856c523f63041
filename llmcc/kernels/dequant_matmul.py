"""Weight-quantized matmul: ``y = x @ dequantize(W_q)``, dequantization fused into the matmul kernel.

Sections: the weight formats and their numpy quantize/dequantize (the reference), the TE kernels that the
``quantize_weights`` pass emits for each format (the matmul, and the embedding gather ``dequant_take_te``), and
``dequant_matmul_reference``.

Layouts keep the weight as the matmul reads it, ``[K, N]`` with N (the output channel) innermost, so the CPU matmul
rule vectorizes over N and reads each packed weight row once per k step:

    fp16   w[K, N] float16                          w = float(w)
    bf16   w[K, N] uint16 (bfloat16 bits)            w = reinterpret_f32(bits << 16)
    int8   q[K, N] int8, scale[N]                    w = q * scale[n]         (scale applied after the K sum)
    int4   q[K/8, N] uint32 (8 k-consecutive nibbles per word), scale[K/G, N] (+ zero[K/G, N] if asymmetric)
                                                    w = (nibble - 8) * scale  (symmetric)
                                                    w = (nibble - zero) * scale  (asymmetric)

The dequantized weight never exists in memory: each kernel reads the packed words and converts in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT4_PER_WORD = 8
WEIGHT_FORMAT_ATTR = "llmcc.weight_format"  # PrimFunc attribute of a dequant_matmul kernel: its format's tag
INT8_KINDS = ("int8", "w8a8")  # w8a8 stores its weight as int8 does; its kernel also quantizes the activations
INT4_KINDS = ("int4", "w4a8")  # likewise w4a8 (int4 groups, activations quantized per token to int8)
INT8_ACTIVATION_KINDS = ("w8a8", "w4a8")  # the kinds whose kernels quantize their activations


@dataclass(frozen=True)
class WeightFormat:
    """How one weight is stored: ``kind`` in fp16 / bf16 / int8 / int4 / w8a8 (int8 weights, and the activations
    quantized per token at run time: ``llmcc.kernels.w8a8_matmul``) / w4a8 (int4 weights, activations likewise),
    with the int4 group size and symmetry."""

    kind: str
    group_size: int = 0
    symmetric: bool = True

    def check(self, k: int, n: int) -> str | None:
        """Why a [k, n] weight cannot take this format, or None."""
        if self.kind in INT4_KINDS:
            if k % self.group_size:
                return f"K={k} is not a multiple of the group size {self.group_size}"
            if k % INT4_PER_WORD:
                return f"K={k} is not a multiple of {INT4_PER_WORD}"
        return None

    @property
    def tag(self) -> str:
        if self.kind not in INT4_KINDS:
            return self.kind
        return f"{self.kind}_g{self.group_size}" + ("" if self.symmetric else "_asym")

    @staticmethod
    def from_tag(tag: str) -> "WeightFormat":
        kind, _, rest = tag.partition("_g")
        if kind not in INT4_KINDS:
            return WeightFormat(tag)
        group, _, asym = rest.partition("_")
        return WeightFormat(kind, int(group), symmetric=asym != "asym")


# ----------------------------------------------------------------------------------------- reference (numpy)


def quantize(w: np.ndarray, fmt: WeightFormat) -> list[np.ndarray]:
    """The stored arrays of a float ``w[K, N]`` in ``fmt`` (the kernel's extra inputs, in order)."""
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    if fmt.kind == "fp16":
        return [w.astype(np.float16)]
    if fmt.kind == "bf16":
        bits = w.view(np.uint32)
        # round to nearest even on the dropped 16 bits
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return [(rounded >> np.uint32(16)).astype(np.uint16)]
    if fmt.kind in INT8_KINDS:
        scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        return [q, scale.astype(np.float32)]
    if fmt.kind in INT4_KINDS:
        why = fmt.check(k, n)
        if why:
            raise ValueError(why)
        g = w.reshape(k // fmt.group_size, fmt.group_size, n)
        if fmt.symmetric:
            scale = np.maximum(np.abs(g).max(axis=1), 1e-12) / 7.0
            q = np.clip(np.round(g / scale[:, None, :]), -8, 7) + 8
            extra = []
        else:
            lo, hi = np.minimum(g.min(axis=1), 0.0), np.maximum(g.max(axis=1), 0.0)
            scale = np.maximum(hi - lo, 1e-12) / 15.0
            zero = np.clip(np.round(-lo / scale), 0, 15)
            q = np.clip(np.round(g / scale[:, None, :]) + zero[:, None, :], 0, 15)
            extra = [zero.astype(np.float32)]
        nibbles = q.reshape(k // INT4_PER_WORD, INT4_PER_WORD, n).astype(np.uint32)
        packed = np.zeros((k // INT4_PER_WORD, n), dtype=np.uint32)
        for i in range(INT4_PER_WORD):
            packed |= nibbles[:, i, :] << np.uint32(4 * i)
        return [packed, scale.astype(np.float32)] + extra
    raise ValueError(f"unknown weight format {fmt.kind}")


def dequantize(arrays: list[np.ndarray], fmt: WeightFormat) -> np.ndarray:
    """The float32 ``[K, N]`` weight that ``arrays`` stand for: what the kernel computes with."""
    if fmt.kind == "fp16":
        return arrays[0].astype(np.float32)
    if fmt.kind == "bf16":
        return (arrays[0].astype(np.uint32) << np.uint32(16)).view(np.float32)
    if fmt.kind in INT8_KINDS:
        q, scale = arrays
        return q.astype(np.float32) * scale[None, :]
    packed, scale = arrays[0], arrays[1]
    k8, n = packed.shape
    nibbles = np.stack([(packed >> np.uint32(4 * i)) & np.uint32(15) for i in range(INT4_PER_WORD)], axis=1)
    q = nibbles.reshape(k8 * INT4_PER_WORD, n).astype(np.float32)
    zero = 8.0 if fmt.symmetric else np.repeat(arrays[2], fmt.group_size, axis=0)
    return (q - zero) * np.repeat(scale, fmt.group_size, axis=0)


def dequant_matmul_reference(x: np.ndarray, arrays: list[np.ndarray], fmt: WeightFormat) -> np.ndarray:
    return np.asarray(x, np.float32) @ dequantize(arrays, fmt)


def stored_bytes(arrays: list[np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays))


# ----------------------------------------------------------------------------------------- kernel (TE)


def _weight_expr(fmt: WeightFormat, stored, dtype):
    """(k, n) -> the dequantized weight element, as a TE expression over the stored arrays."""
    from tvm import tirx

    if fmt.kind == "fp16":
        (w,) = stored
        return lambda k, n: w[k, n].astype(dtype)
    if fmt.kind == "bf16":
        (w,) = stored
        return lambda k, n: tirx.reinterpret("float32", w[k, n].astype("uint32") << tirx.const(16, "uint32")
                                             ).astype(dtype)
    if fmt.kind in INT8_KINDS:
        q, scale = stored
        return lambda k, n: q[k, n].astype(dtype)  # the matmul applies the scale after the sum; see below
    packed, scale = stored[0], stored[1]
    zero = stored[2] if not fmt.symmetric else None
    g = fmt.group_size

    def int4(k, n):
        shift = (k % INT4_PER_WORD).astype("uint32") * tirx.const(4, "uint32")
        nibble = ((packed[k // INT4_PER_WORD, n] >> shift) & tirx.const(15, "uint32")).astype(dtype)
        offset = tirx.const(8.0, dtype) if zero is None else zero[k // g, n].astype(dtype)
        return (nibble - offset) * scale[k // g, n].astype(dtype)

    return int4


def dequant_take_te(fmt: WeightFormat, dtype: str = "float32"):
    """A TE function ``(ids[...], *stored) -> table[ids, :]`` for an embedding table quantized as its transpose
    ``[H, V]`` (so int8's per-column scale is one scale per vocabulary row): only the gathered rows are dequantized."""
    from tvm import te

    def kernel(ids, *stored):
        weight = _weight_expr(fmt, stored, dtype)
        hidden = stored[0].shape[0] * (INT4_PER_WORD if fmt.kind in INT4_KINDS else 1)
        scale = stored[1] if fmt.kind in INT8_KINDS else None

        def row(*i):
            v = ids[i[:-1]].astype("int64")
            value = weight(i[-1], v)
            return value * scale[v].astype(dtype) if scale is not None else value

        return te.compute(list(ids.shape) + [hidden], row, name="dequantize_take")

    return kernel


def call_dequant_matmul(bb, fmt: WeightFormat, x, *stored):
    """``bb.call_te`` of ``dequant_matmul_te(fmt)``, the kernel tagged with its format (``WEIGHT_FORMAT_ATTR``): how
    later passes (select_gemv_kernels) know what the stored constants hold."""
    return bb.call_te(dequant_matmul_te(fmt), x, *stored, primfunc_name_hint=f"dequant_matmul_{fmt.tag}",
                      primfunc_attrs={WEIGHT_FORMAT_ATTR: fmt.tag})


def dequant_matmul_te(fmt: WeightFormat):
    """A TE function ``(x[..., K], *stored) -> y[..., N]`` for ``builder.call_te``: one PrimFunc with a dequantize
    block (inlined into the matmul by the schedule rules), the K reduction, and for int8 the per-channel scale as an
    epilogue (a scale that does not vary with k is cheaper after the sum, and keeps GEMV rules matching)."""
    from tvm import te

    def kernel(x, *stored):
        dtype = x.dtype
        k_dim = x.shape[-1]
        n_dim = stored[0].shape[-1]
        w = te.compute((k_dim, n_dim), _weight_expr(fmt, stored, dtype), name="dequantize")
        k = te.reduce_axis((0, k_dim), name="k")
        out_shape = list(x.shape[:-1]) + [n_dim]
        y = te.compute(out_shape, lambda *i: te.sum(x[tuple(i[:-1]) + (k,)] * w[k, i[-1]], axis=k), name="matmul")
        if fmt.kind not in INT8_KINDS:
            return y
        scale = stored[1]
        return te.compute(out_shape, lambda *i: y[i] * scale[i[-1]].astype(dtype), name="scale")

    return kernel
