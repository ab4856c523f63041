"""Weight-only int8 and int4 GEMV for AVX2 (and AVX512-VNNI) CPUs: integer products, activations kept to float32
precision.

A decode step's matmuls are GEMVs, bound by reading the weight, if the arithmetic keeps up. Dequantizing each
weight to float32 does not here: widen, convert and FMA is 3 vector ops per 8 weights, and this kernel's
predecessor (the rule-scheduled ``dequant_matmul``) read 18 GB/s of int8 weights where memory gives 40. AVX2's
``vpmaddwd`` multiplies 16 int16 pairs and adds each pair into an int32, exactly: 16 products per op. So each row of
activations is split, per row, into two int16 parts,

    s = max|x| / 32767        x / s = hi + lo / 32768        |hi| <= 32767, |lo| <= 16384       (split_rows)

which hold x / s (rounded to float32 first: 2^-24 of max|x|) to within 2^-16 of a step (2^-31 of max|x|): the
scheme stays weight-only, and the kernel agrees with ``x @ dequantize(W)`` to float32 rounding. Both parts multiply
the same widened weight vector; the int32 sums are moved into float32 before they can overflow:

    y[n] = s * sum_blocks (float(sum hi * q) + float(sum lo * q) / 32768) * scale          (int8: per channel)

int8: the weight is the w8a8 GEMV's pair-packed panels (``w8a8_matmul.pack_pairs``), [N/chunk, K/2, chunk, 2]; one
16-byte load widened by ``vpmovsxbw`` is 8 outputs x 2 k steps. Blocks of 256 k pairs: 256 * 2 * 32767 * 127 < 2^31.

int4: two nibbles per byte, [N/chunk, K/2, chunk/16, 16] uint8, byte 2j+e of a 16-byte group holding
k = 2kk+e of column j (low nibble) and of column 8+j (high nibble); ``vpmovzxbw`` then ``& 15`` and ``>> 4`` give the
two 8-column pair vectors. A block is one quantization group (G/2 pairs); its zero point comes off exactly in
int32 through the group's sums of hi and lo: sum (q - z) * hi = sum q * hi - z * sum hi.

Every parallel task owns a contiguous run of panels and splits each row once. Sections: the numpy reference, the
layouts and the choice of kernel (``plan_gemv``), the TIR kernels, and the int4 kernel for VNNI (three int8 digits
per activation, scaled per group, instead of two int16 parts: see there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmcc.kernels.dequant_matmul import INT4_KINDS, INT4_PER_WORD, INT8_KINDS, WeightFormat, dequantize
from llmcc.kernels.w8a8_matmul import (INT8_MAX, QUAD, dot_macro, lane_macros, pack_pairs,
                                       quantize_rows_reference, row_scale, unpack_pairs)

HI_MAX = 32767.0
LO_SCALE = 32768.0         # lo counts 2^-15 steps of hi
LO_WEIGHT = 1.0 / LO_SCALE
TINY = 1e-30               # an all-zero row splits into zeros instead of dividing by zero
LANES = 8                  # int32 (and float32) outputs per vpmaddwd
INT8_BLOCK_PAIRS = 256     # k pairs summed in int32 before the move to float32 (no overflow, see above)


# ----------------------------------------------------------------------------------------- reference (numpy)


def split_rows_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x[rows, K] float32 -> (hi, lo) int16 [rows, K] and s [rows, 1] float32, as the kernel splits it."""
    x = np.asarray(x, np.float32)
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / np.float32(HI_MAX), np.float32(TINY)).astype(np.float32)
    v = (x / s).astype(np.float32)
    hi = np.round(v)
    lo = np.round((v - hi) * np.float32(LO_SCALE))
    return hi.astype(np.int16), lo.astype(np.int16), s


def dequant_gemv_reference(x: np.ndarray, arrays: list[np.ndarray], fmt: WeightFormat) -> np.ndarray:
    """The plain result the kernel must match to float32 rounding: x @ dequantize(W) (``arrays`` as
    ``dequant_matmul.quantize`` stores them); for w4a8, x quantized per row to int8 first."""
    x = np.asarray(x, np.float32)
    if fmt.kind == "w4a8":
        q_x, s_x = quantize_rows_reference(x)
        x = q_x.astype(np.float32) * s_x
    return x @ dequantize(arrays, fmt)


# ----------------------------------------------------------------------------------------- layouts


def pack_nibble_lanes(packed: np.ndarray, chunk: int, per_lane: int = 2) -> np.ndarray:
    """int4 words q[K/8, N] uint32 (``dequant_matmul``'s layout) -> [N/chunk, K/per_lane, chunk/16, 8 * per_lane]
    uint8: byte per_lane * j + e of a group holds k = per_lane * kk + e of column j (low nibble) and of column 8 + j
    (high nibble). per_lane 2: the vpmaddwd pairs; 4: the vpdpbusd quads."""
    k8, n = packed.shape
    k = k8 * INT4_PER_WORD
    nibbles = np.stack([(packed >> np.uint32(4 * i)) & np.uint32(15) for i in range(INT4_PER_WORD)], axis=1)
    q = nibbles.reshape(k // per_lane, per_lane, n // chunk, chunk // 16, 2, 8).astype(np.uint8)
    # axes: kk, e, panel, group, half (low / high nibble), j -> panel, kk, group, j, e with half as the nibble
    q = q.transpose(2, 0, 3, 4, 5, 1)
    return np.ascontiguousarray(q[:, :, :, 0] | (q[:, :, :, 1] << np.uint8(4))).reshape(
        n // chunk, k // per_lane, chunk // 16, 8 * per_lane)


def unpack_nibble_lanes(lanes: np.ndarray) -> np.ndarray:
    """The inverse of ``pack_nibble_lanes`` (either width): the nibbles q[K, N] as uint8."""
    panels, kk, groups, width = lanes.shape
    per_lane = width // 8
    b = lanes.reshape(panels, kk, groups, 8, per_lane)
    q = np.stack([b & np.uint8(15), b >> np.uint8(4)], axis=3)           # panel, kk, group, half, j, e
    return np.ascontiguousarray(q.transpose(1, 5, 0, 2, 3, 4)).reshape(per_lane * kk, panels * groups * 16)


def gemv_check(fmt: WeightFormat, k: int, n: int, chunk: int, vnni: bool = False) -> str | None:
    """Why a [k, n] weight in ``fmt`` cannot take the GEMV (``vnni``: the VNNI int4 one) with ``chunk`` outputs per
    panel, or None."""
    if fmt.kind not in (INT4_KINDS if vnni else ("int8",) + INT4_KINDS):
        return f"{fmt.kind} weights have no integer GEMV" + (" for VNNI" if vnni else "")
    if k % 2:
        return f"K={k} is odd"
    if vnni and fmt.group_size % LANES:
        return f"the group size {fmt.group_size} is not a multiple of {LANES}"
    step = 16 if fmt.kind in INT4_KINDS else LANES
    if chunk % step or n % chunk:
        return f"N={n} is not a multiple of the {chunk}-output chunk (a multiple of {step})"
    if fmt.kind in INT4_KINDS and (fmt.group_size % 2 or k % fmt.group_size):
        return f"K={k} is not a multiple of the group size {fmt.group_size}"
    return None


def gemv_tiles(fmt: WeightFormat, n: int, cores: int) -> tuple[int, int] | None:
    """(chunk, tasks): outputs per panel and parallel tasks. 32 outputs are 4 vectors, each with a hi and a lo
    accumulator: 8 of the 16 AVX2 registers, with room for the weight and the two broadcast activations; fewer when
    N is narrow. Tasks: the fewest runs of whole panels that give every core one (each task splits every row once)."""
    for chunk in ((32, 16) if fmt.kind in INT4_KINDS else (32, 16, 8)):
        if n % chunk == 0:
            panels = n // chunk
            tasks = next((t for t in range(min(cores, panels), panels + 1) if panels % t == 0), panels)
            return chunk, tasks
    return None


def gemv_weights(arrays: list[np.ndarray], fmt: WeightFormat, chunk: int, vnni: bool = False) -> list[np.ndarray]:
    """The kernel's weight inputs from ``dequant_matmul.quantize``'s arrays: the packed panels (nibble quads for
    the VNNI kernel), then the scales (and the int4 zero points). int8 and w8a8 share the pair panels of
    ``w8a8_matmul.pack_pairs``."""
    if fmt.kind in INT8_KINDS:
        return [pack_pairs(arrays[0], chunk)] + list(arrays[1:])
    return [pack_nibble_lanes(arrays[0], chunk, QUAD if vnni else 2)] + list(arrays[1:])


def gemv_weight_matrix(panels: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    """The integer weight q[K, N] a packed panel array holds (for tests)."""
    return unpack_pairs(panels) if fmt.kind in INT8_KINDS else unpack_nibble_lanes(panels)


@dataclass(frozen=True)
class GemvPlan:
    """Which GEMV kernel a [k, n] weight in ``fmt`` takes on a CPU, and its tiles: the VNNI int4 kernel where the
    CPU has vpdpbusd, else the AVX2 one."""

    fmt: WeightFormat
    k: int
    n: int
    chunk: int
    tasks: int
    vnni: bool

    @property
    def name(self) -> str:
        return f"{self.fmt.kind}_gemv_{'vnni' if self.vnni else 'avx2'}"

    def kernel(self):
        make = dequant_gemv_vnni if self.vnni else dequant_gemv_avx2
        return make(self.fmt, self.k, self.n, self.chunk, self.tasks)

    def weights(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return gemv_weights(arrays, self.fmt, self.chunk, self.vnni)


def plan_gemv(fmt: WeightFormat, k: int, n: int, cpu) -> GemvPlan | None:
    """The GEMV for a [k, n] weight on ``cpu`` (a ``CpuModel``), or None when no integer GEMV takes it."""
    if cpu is None or not cpu.int16_madd:
        return None
    tiles = gemv_tiles(fmt, n, cpu.cores)
    if tiles is None:
        return None
    for vnni in ((True, False) if cpu.int8_dot else (False,)):
        if not gemv_check(fmt, k, n, tiles[0], vnni):
            return GemvPlan(fmt, k, n, *tiles, vnni)
    return None


# ----------------------------------------------------------------------------------------- kernels (TIR)


def _plus_pair(total, word):
    """``total`` plus both int16 halves of a pair-packed int32 word (sign-extended)."""
    from tvm.script import tirx as T

    return total + T.shift_right(T.shift_left(word, 16), 16) + T.shift_right(word, 16)


def dequant_gemv_avx2(fmt: WeightFormat, k: int, n: int, chunk: int, tasks: int):
    """The TIR kernel ``(x[rows, K] float32, panels, scale[, zero]) -> y[rows, N] float32``, rows symbolic,
    parallel over ``tasks`` runs of panels; for targets with AVX2."""
    problem = gemv_check(fmt, k, n, chunk)
    if problem:
        raise ValueError(f"dequant GEMV: {problem}")
    panels = n // chunk
    if panels % tasks:
        raise ValueError(f"dequant GEMV: {panels} panels do not split into {tasks} tasks")
    if fmt.kind == "int8":
        return _int8_gemv(k, n, chunk, tasks)
    return _int4_gemv(k, n, chunk, tasks, fmt.group_size, fmt.symmetric, exact=fmt.kind == "int4")


def _split_row(T, k: int, exact: bool = True):
    """The TVMScript macro that splits row m of x into pair-packed (hi, lo) int16 words and its scale; with
    ``exact`` off, hi is x quantized to int8 as ``w8a8_matmul.quantize_rows`` does it, and lo is not written."""
    scale_of = row_scale(T, k, HI_MAX if exact else INT8_MAX)

    @T.macro
    def split_row(x, m, x_hi, x_lo, scale):
        scale_of(x, m, 0, scale, 0)
        for kk in range(k // 2):
            v0 = x[m, 2 * kk] / scale[0]
            v1 = x[m, 2 * kk + 1] / scale[0]
            h0 = T.nearbyint(v0)
            h1 = T.nearbyint(v1)
            x_hi[kk] = T.bitwise_or(T.bitwise_and(T.Cast("int32", h0), 0xFFFF), T.shift_left(T.Cast("int32", h1), 16))
            if exact:
                l0 = T.nearbyint((v0 - h0) * T.float32(LO_SCALE))
                l1 = T.nearbyint((v1 - h1) * T.float32(LO_SCALE))
                x_lo[kk] = T.bitwise_or(T.bitwise_and(T.Cast("int32", l0), 0xFFFF),
                                        T.shift_left(T.Cast("int32", l1), 16))

    return split_row


def _zero_point(T, zero, g, col):
    """Group g's zero points of the 8 columns from ``col`` as int32 lanes (symmetric, ``zero`` None: the stored
    offset 8)."""
    if zero is None:
        return T.broadcast(T.int32(8), LANES)
    return T.Cast("int32x8", zero[g, T.ramp(col, 1, LANES)])


def _int4_prim_func(int4_rows, nibble_shape: tuple, k: int, n: int, n_groups: int, symmetric: bool):
    """An int4 GEMV kernel around its TVMScript macro ``int4_rows(x, y, w, s_w, zero, rows)``: ``(x[rows, K] float32,
    nibbles ``nibble_shape`` uint8, scale[K / G, N][, zero[K / G, N]]) -> y[rows, N] float32``, w the nibbles flat."""
    from tvm.script import tirx as T

    size = int(np.prod(nibble_shape))
    if symmetric:
        @T.prim_func(private=True)
        def int4_gemv(a: T.handle, q_nibbles: T.Buffer(nibble_shape, "uint8"), s_w: T.Buffer((n_groups, n), "float32"),
                      y_handle: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            rows = T.int64()
            x = T.match_buffer(a, (rows, k), "float32")
            y = T.match_buffer(y_handle, (rows, n), "float32")
            w = T.decl_buffer((size,), "uint8", data=q_nibbles.data)
            int4_rows(x, y, w, s_w, None, rows)

        return int4_gemv

    @T.prim_func(private=True)
    def int4_gemv(a: T.handle, q_nibbles: T.Buffer(nibble_shape, "uint8"), s_w: T.Buffer((n_groups, n), "float32"),
                  zero: T.Buffer((n_groups, n), "float32"), y_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(a, (rows, k), "float32")
        y = T.match_buffer(y_handle, (rows, n), "float32")
        w = T.decl_buffer((size,), "uint8", data=q_nibbles.data)
        int4_rows(x, y, w, s_w, zero, rows)

    return int4_gemv


def _int8_gemv(k: int, n: int, chunk: int, tasks: int):
    from tvm.script import tirx as T

    k2, vectors, panels = k // 2, chunk // LANES, n // chunk
    per_task, block = panels // tasks, INT8_BLOCK_PAIRS
    blocks = -(-k2 // block)
    split_row = _split_row(T, k)
    fill, madd_into = lane_macros(T)

    @T.prim_func(private=True)
    def int8_gemv_avx2(a: T.handle, q_pairs: T.Buffer((panels, k2, chunk, 2), "int8"),
                       s_w: T.Buffer((n,), "float32"), y_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(a, (rows, k), "float32")
        y = T.match_buffer(y_handle, (rows, n), "float32")
        w = T.decl_buffer((panels * k2 * chunk * 2,), "int8", data=q_pairs.data)
        for t in T.parallel(tasks):
            x_hi = T.decl_buffer((k2,), "int32")
            x_lo = T.decl_buffer((k2,), "int32")
            scale = T.decl_buffer((1,), "float32")
            acc_hi = T.decl_buffer((chunk,), "int32")
            acc_lo = T.decl_buffer((chunk,), "int32")
            acc = T.decl_buffer((chunk,), "float32")
            for m in range(rows):
                split_row(x, m, x_hi, x_lo, scale)
                for p in range(per_task):
                    fill(acc, vectors, T.float32(0))
                    for b in range(blocks):
                        fill(acc_hi, vectors, T.int32(0))
                        fill(acc_lo, vectors, T.int32(0))
                        for kk in range(b * block, T.min(k2, b * block + block)):
                            xh = T.reinterpret(T.broadcast(x_hi[kk], LANES), dtype="int16x16")
                            xl = T.reinterpret(T.broadcast(x_lo[kk], LANES), dtype="int16x16")
                            for v in T.unroll(vectors):
                                wv = T.Cast("int16x16", w[T.ramp((((t * per_task + p) * k2 + kk) * chunk
                                                                  + v * LANES) * 2, 1, 16)])
                                madd_into(acc_hi, v * LANES, wv, xh)
                                madd_into(acc_lo, v * LANES, wv, xl)
                        for v in T.unroll(vectors):
                            acc[T.ramp(v * LANES, 1, LANES)] = (
                                acc[T.ramp(v * LANES, 1, LANES)]
                                + T.Cast("float32x8", acc_hi[T.ramp(v * LANES, 1, LANES)])
                                + T.Cast("float32x8", acc_lo[T.ramp(v * LANES, 1, LANES)])
                                * T.broadcast(T.float32(LO_WEIGHT), LANES))
                    for j in range(chunk):
                        col = (t * per_task + p) * chunk + j
                        y[m, col] = acc[j] * scale[0] * s_w[col]

    return int8_gemv_avx2


def _int4_gemv(k: int, n: int, chunk: int, tasks: int, group: int, symmetric: bool, exact: bool):
    """int4 weights; ``exact``: x in two int16 parts (weight-only int4), else x quantized to int8 per row (w4a8:
    one vpmaddwd per weight vector instead of two)."""
    from tvm.script import tirx as T

    k2, vectors, panels, nibble_groups = k // 2, chunk // LANES, n // chunk, chunk // 16
    per_task, group_pairs, n_groups = panels // tasks, group // 2, k // group
    split_row = _split_row(T, k, exact)
    fill, madd_into = lane_macros(T)

    @T.macro
    def int4_rows(x, y, w, s_w, zero, rows):
        for t in T.parallel(tasks):
            x_hi = T.decl_buffer((k2,), "int32")
            x_lo = T.decl_buffer((k2,), "int32")
            sum_hi = T.decl_buffer((n_groups,), "int32")
            sum_lo = T.decl_buffer((n_groups,), "int32")
            scale = T.decl_buffer((1,), "float32")
            acc_hi = T.decl_buffer((chunk,), "int32")
            acc_lo = T.decl_buffer((chunk,), "int32")
            acc = T.decl_buffer((chunk,), "float32")
            for m in range(rows):
                split_row(x, m, x_hi, x_lo, scale)
                for g in range(n_groups):
                    sum_hi[g] = 0
                    sum_lo[g] = 0  # stays 0 without the lo part
                    for kk in range(g * group_pairs, g * group_pairs + group_pairs):
                        sum_hi[g] = _plus_pair(sum_hi[g], x_hi[kk])
                        if exact:
                            sum_lo[g] = _plus_pair(sum_lo[g], x_lo[kk])
                for p in range(per_task):
                    fill(acc, vectors, T.float32(0))
                    for g in range(n_groups):
                        fill(acc_hi, vectors, T.int32(0))
                        if exact:
                            fill(acc_lo, vectors, T.int32(0))
                        for kk in range(g * group_pairs, g * group_pairs + group_pairs):
                            xh = T.reinterpret(T.broadcast(x_hi[kk], LANES), dtype="int16x16")
                            for ng in T.unroll(nibble_groups):
                                wv = T.Cast("int16x16", w[T.ramp((((t * per_task + p) * k2 + kk) * nibble_groups
                                                                  + ng) * 16, 1, 16)])
                                w_lo = T.bitwise_and(wv, T.broadcast(T.int16(15), 16))
                                w_hi = T.shift_right(wv, T.broadcast(T.int16(4), 16))
                                madd_into(acc_hi, ng * 16, w_lo, xh)
                                madd_into(acc_hi, ng * 16 + LANES, w_hi, xh)
                                if exact:
                                    xl = T.reinterpret(T.broadcast(x_lo[kk], LANES), dtype="int16x16")
                                    madd_into(acc_lo, ng * 16, w_lo, xl)
                                    madd_into(acc_lo, ng * 16 + LANES, w_hi, xl)
                        for v in T.unroll(vectors):
                            col = (t * per_task + p) * chunk + v * LANES
                            z = _zero_point(T, zero, g, col)
                            group_sum = T.Cast("float32x8", acc_hi[T.ramp(v * LANES, 1, LANES)]
                                               - z * T.broadcast(sum_hi[g], LANES))
                            if exact:
                                group_sum = group_sum + T.Cast(
                                    "float32x8", acc_lo[T.ramp(v * LANES, 1, LANES)]
                                    - z * T.broadcast(sum_lo[g], LANES)) * T.broadcast(T.float32(LO_WEIGHT), LANES)
                            acc[T.ramp(v * LANES, 1, LANES)] = acc[T.ramp(v * LANES, 1, LANES)] + s_w[
                                g, T.ramp(col, 1, LANES)] * group_sum
                    for j in range(chunk):
                        y[m, (t * per_task + p) * chunk + j] = acc[j] * scale[0]

    return _int4_prim_func(int4_rows, (panels, k2, nibble_groups, 16), k, n, n_groups, symmetric)


# ----------------------------------------------------------------------------------------- int4 GEMV for AVX512-VNNI
#
# vpdpbusd multiplies 32 unsigned x signed byte pairs into 8 int32 lanes (four each): 32 products per op, where the
# kernels above get 16 from vpmaddwd, and those were the int4 GEMV's limit (1.19x its memory floor on a Zen 4 VM,
# bench/quant.md). The nibbles are the unsigned operand as they are stored (0..15; the zero point comes off through
# the activations' group sums, as above), and the activations are the signed one: their digits in base 254,
#
#     s_g = max|x over group g| / 127      x / s_g = d0 + d1 / 254 + d2 / 254^2      |d| <= 127   (digit_rows_reference)
#
# Three int8 digits hold x / s_g to half a step of d2, s_g / 2 / 254^2 (6.1e-8 of the group's max|x|, float32's own
# rounding of the largest value there): weight-only int4 with float32-grade activations, in three vpdpbusd per 32
# weights where the pair kernel takes four vpmaddwd and four vpaddd. The scale is the quantization group's, not the
# row's (one more multiply per group in the epilogue, which applies the weight's group scale anyway): an outlier
# channel then costs precision in its own group only. With the row's scale, rows with a 50x outlier channel missed
# 1e-6 relative on some test draws; a fourth digit fixed that too, but a third more vpdpbusd made the kernel
# compute-bound again (bench_quant's int4 row went from under the floor to over it). w4a8 is one digit with the
# row's scale: quantize_rows exactly. The weight is in nibble quads, [N/chunk, K/4, chunk/16, 32] uint8: one 32-byte
# load, masked and shifted, is 16 columns x 4 k.

DIGIT_BASE = 254.0  # |(v - round(v)) * 254| <= 127: each digit fits int8


def digit_rows_reference(x: np.ndarray, digits: int, group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """x[rows, K] float32 -> (d [digits, rows, K] int8, s [rows, K / group] float32: one scale per ``group`` k, or
    per row [rows, 1] without one), as the VNNI kernel splits a row."""
    x = np.asarray(x, np.float32)
    rows, k = x.shape
    span = group or k
    top = np.abs(x).reshape(rows, k // span, span).max(axis=-1)
    s = np.maximum(top / np.float32(INT8_MAX), np.float32(TINY)).astype(np.float32)
    v = (x / np.repeat(s, span, axis=1)).astype(np.float32)
    out = []
    for _ in range(digits):
        d = np.round(v)
        out.append(d.astype(np.int8))
        v = ((v - d) * np.float32(DIGIT_BASE)).astype(np.float32)
    return np.stack(out), s


def dequant_gemv_vnni(fmt: WeightFormat, k: int, n: int, chunk: int, tasks: int):
    """The TIR kernel ``(x[rows, K] float32, nibble quads, scale[, zero]) -> y[rows, N] float32`` for int4 and
    w4a8 weights, rows symbolic, parallel over ``tasks`` runs of panels; for targets with AVX512-VNNI (and VL)."""
    problem = gemv_check(fmt, k, n, chunk, vnni=True)
    if problem:
        raise ValueError(f"dequant GEMV (VNNI): {problem}")
    panels = n // chunk
    if panels % tasks:
        raise ValueError(f"dequant GEMV (VNNI): {panels} panels do not split into {tasks} tasks")
    from tvm.script import tirx as T

    digits = 3 if fmt.kind == "int4" else 1
    k4, vectors, nibble_groups, group = k // QUAD, chunk // LANES, chunk // 16, fmt.group_size
    per_task, group_quads, n_groups = panels // tasks, group // QUAD, k // group
    fill, _ = lane_macros(T)
    dot_into = dot_macro(T)
    per_group = digits > 1  # int4: a scale per quantization group; w4a8: quantize_rows' per row
    scale_of = row_scale(T, group if per_group else k)

    @T.macro
    def digit_row(x, m, words, sums, scales):
        """Row m of x as ``digits`` int8 digits (words: digit i's k quads from i * k4), their scale per group (the
        row's in every group for w4a8), their sums per group."""
        d = T.decl_buffer((digits * k,), "int8", data=words.data)
        v = T.decl_buffer((LANES,), "float32")
        if per_group:
            for g in range(n_groups):
                scale_of(x, m, g * group, scales, g)
        else:
            scale_of(x, m, 0, scales, 0)
            for g in range(1, n_groups):
                scales[g] = scales[0]
        for i in range(k // LANES):
            v[T.ramp(0, 1, LANES)] = x[m, T.ramp(i * LANES, 1, LANES)] / T.broadcast(scales[i * LANES // group], LANES)
            for j in T.unroll(digits):
                digit = T.nearbyint(v[T.ramp(0, 1, LANES)])
                d[T.ramp(j * k + i * LANES, 1, LANES)] = T.Cast(f"int8x{LANES}", T.Cast(f"int32x{LANES}", digit))
                v[T.ramp(0, 1, LANES)] = (v[T.ramp(0, 1, LANES)] - digit) * T.broadcast(T.float32(DIGIT_BASE), LANES)
        for j in range(digits):
            for g in range(n_groups):
                sums[j * n_groups + g] = 0
                for i in range(group):
                    sums[j * n_groups + g] = sums[j * n_groups + g] + T.Cast("int32", d[j * k + g * group + i])

    def digit_sum(dots, sums, j, g, v, z):
        """Digit j's exact int32 sum over group g of 8 columns, zero point off, as float32."""
        return T.Cast("float32x8", dots[T.ramp(j * chunk + v * LANES, 1, LANES)]
                      - z * T.broadcast(sums[j * n_groups + g], LANES))

    def group_sum(dots, sums, g, v, z):
        """sum_k (q - z) x / s over group g of 8 columns: the digits' sums, weighted 1, 1/254, 1/254^2..."""
        total = digit_sum(dots, sums, digits - 1, g, v, z)
        for j in range(digits - 2, -1, -1):  # Python, at parse time: Horner from the smallest digit
            total = digit_sum(dots, sums, j, g, v, z) + total * T.broadcast(T.float32(1 / DIGIT_BASE), LANES)
        return total

    @T.macro
    def int4_rows(x, y, w, s_w, zero, rows):
        for t in T.parallel(tasks):
            words = T.decl_buffer((digits * k4,), "int32")
            sums = T.decl_buffer((digits * n_groups,), "int32")
            scales = T.decl_buffer((n_groups,), "float32")
            dots = T.decl_buffer((digits * chunk,), "int32")
            acc = T.decl_buffer((chunk,), "float32")
            for m in range(rows):
                digit_row(x, m, words, sums, scales)
                for p in range(per_task):
                    fill(acc, vectors, T.float32(0))
                    for g in range(n_groups):
                        fill(dots, digits * vectors, T.int32(0))
                        for kq in range(g * group_quads, g * group_quads + group_quads):
                            for ng in T.unroll(nibble_groups):
                                raw = w[T.ramp((((t * per_task + p) * k4 + kq) * nibble_groups + ng) * 32, 1, 32)]
                                w_lo = T.bitwise_and(raw, T.broadcast(T.uint8(15), 32))
                                w_hi = T.shift_right(raw, T.broadcast(T.uint8(4), 32))
                                for j in T.unroll(digits):
                                    xb = T.broadcast(words[j * k4 + kq], LANES)
                                    dot_into(dots, j * chunk + ng * 16, w_lo, xb)
                                    dot_into(dots, j * chunk + ng * 16 + LANES, w_hi, xb)
                        for v in T.unroll(vectors):
                            col = (t * per_task + p) * chunk + v * LANES
                            acc[T.ramp(v * LANES, 1, LANES)] = acc[T.ramp(v * LANES, 1, LANES)] + s_w[
                                g, T.ramp(col, 1, LANES)] * T.broadcast(scales[g], LANES) * group_sum(
                                    dots, sums, g, v, _zero_point(T, zero, g, col))
                    for j in range(chunk):
                        y[m, (t * per_task + p) * chunk + j] = acc[j]

    return _int4_prim_func(int4_rows, (panels, k4, nibble_groups, 32), k, n, n_groups, fmt.symmetric)
