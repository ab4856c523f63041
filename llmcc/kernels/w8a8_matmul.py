"""w8a8 matmul: activations quantized per token at run time, int8 x int8 products summed in int32.

    s_x[m] = max(|x[m, :]|) / 127            q_x = round_half_even(x / s_x)        (quantize_rows)
    y[m, n] = (sum_k int32(q_x[m, k]) * int32(q_w[k, n])) * s_x[m] * s_w[n]        (int8_matmul)

Two kernels, because the row maximum is a reduction of its own that the matmul rules do not take as a prologue.
The weight is ``llmcc.kernels.dequant_matmul``'s int8 format (``q_w[K, N]``, ``s_w[N]``). Sections: the numpy
reference; the TE kernels; hand-scheduled TIR for x86: the GEMV and GEMM on vpmaddwd pair panels (AVX2), and the GEMM
on vpdpbusd quad panels (AVX512-VNNI).
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


# ----------------------------------------------------------------------------------------- GEMV for AVX2 CPUs
#
# Decode's w8a8 matmuls are GEMVs: bound by reading the int8 weight, if the integer products keep up. Widening
# int8 -> int32 and multiplying (vpmulld) does not: the TE kernel above read 18 GB/s of weights here. AVX2's
# vpmaddwd multiplies 16 int16 pairs and adds each pair into an int32, exactly (|q| <= 127: no saturation, unlike
# vpmaddubsw's 16-bit sums), so the weight is stored with each pair of consecutive k rows interleaved,
#     q_pairs[k / 2, n, 2] = (q_w[k, n], q_w[k + 1, n])        (still one byte per weight)
# and one 16-byte load, widened by vpmovsxbw, is 8 outputs x 2 k steps against the broadcast pair of activations.
# Each parallel task owns ``chunk`` outputs and keeps their sums in registers; its weight columns are one contiguous
# panel, q_pairs[N / chunk, K / 2, chunk, 2], so it streams its bytes front to back (rows of the plain layout are
# N * 2 bytes apart: every 128-byte step would land on a new 4 KB page, where no prefetcher follows).

GEMV_LANES = 8  # int32 outputs per vpmaddwd


def pack_pairs(q_w: np.ndarray, chunk: int) -> np.ndarray:
    """q_w[K, N] int8 -> q_pairs[N / chunk, K / 2, chunk, 2] (K even, N a multiple of chunk)."""
    k, n = q_w.shape
    return np.ascontiguousarray(q_w.reshape(k // 2, 2, n // chunk, chunk).transpose(2, 0, 3, 1))


def unpack_pairs(q_pairs: np.ndarray) -> np.ndarray:
    panels, k2, chunk, _ = q_pairs.shape
    return q_pairs.transpose(1, 3, 0, 2).reshape(2 * k2, panels * chunk)


def gemv_pairs_reference(q_x: np.ndarray, s_x: np.ndarray, q_pairs: np.ndarray, s_w: np.ndarray) -> np.ndarray:
    """The kernel's result from its own inputs (q_x [rows, K] int8, s_x [rows, 1])."""
    q_w = unpack_pairs(q_pairs)
    acc = q_x.astype(np.int64) @ q_w.astype(np.int64)
    return (acc.astype(np.float32) * s_x * s_w).astype(np.float32)


def gemv_pairs_check(k: int, n: int, chunk: int) -> str | None:
    """Why a [k, n] weight cannot take the pair-packed GEMV with ``chunk`` outputs per task, or None."""
    if k % 2:
        return f"K={k} is odd"
    if chunk % GEMV_LANES or n % chunk:
        return f"N={n} is not a multiple of the {chunk}-output chunk"
    return None


def gemv_pairs_chunk(n: int, cores: int) -> int | None:
    """Outputs per parallel task: eight vpmaddwd accumulators (64 outputs) keep the 16 AVX2 registers busy without
    spilling; fewer when N has too few chunks to give every core one."""
    for chunk in (64, 32, 16, 8):
        if n % chunk == 0 and (n // chunk >= cores or chunk == 8):
            return chunk
    return None


def madd_pairs(w_pairs, x_pairs):
    """vpmaddwd: 16 int16 products, summed in adjacent pairs into 8 int32 lanes."""
    from tvm.script import tirx as T

    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), w_pairs, x_pairs,
                                   dtype="int32x8")


def lane_macros(T):
    """TVMScript macros shared by the vpmaddwd kernels (here and in dequant_gemv): fill ``vectors`` 8-lane vectors
    of a buffer with ``value``; add one vpmaddwd into the 8 int32 lanes of ``acc`` starting at ``at``."""

    @T.macro
    def fill(buf, vectors, value):
        for v in range(vectors):
            buf[T.ramp(v * GEMV_LANES, 1, GEMV_LANES)] = T.broadcast(value, GEMV_LANES)

    @T.macro
    def madd_into(acc, at, w_pairs, x_pairs):
        acc[T.ramp(at, 1, GEMV_LANES)] = acc[T.ramp(at, 1, GEMV_LANES)] + madd_pairs(w_pairs, x_pairs)

    return fill, madd_into


def gemv_pairs_avx2(k: int, n: int, chunk: int):
    """The hand-scheduled TIR kernel ``(q_x[rows, K] int8, s_x[rows, 1], q_pairs[N/chunk, K/2, chunk, 2] int8,
    s_w[N]) -> y[rows, N] float32``, rows symbolic, parallel over chunks of N; for targets with AVX2."""
    problem = gemv_pairs_check(k, n, chunk)
    if problem:
        raise ValueError(f"w8a8 GEMV: {problem}")
    from tvm.script import tirx as T

    k2, vectors, panels = k // 2, chunk // GEMV_LANES, n // chunk
    fill, madd_into = lane_macros(T)

    @T.prim_func(private=True)
    def w8a8_gemv_avx2(a: T.handle, sa: T.handle, q_pairs: T.Buffer((panels, k2, chunk, 2), "int8"),
                       s_w: T.Buffer((n,), "float32"), y_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        q_x = T.match_buffer(a, (rows, k), "int8")
        s_x = T.match_buffer(sa, (rows, 1), "float32")
        y = T.match_buffer(y_handle, (rows, n), "float32")
        w = T.decl_buffer((panels * k2 * chunk * 2,), "int8", data=q_pairs.data)
        for c in T.parallel(panels):
            acc = T.decl_buffer((chunk,), "int32")
            for m in range(rows):
                fill(acc, vectors, T.int32(0))
                for kk in range(k2):
                    pair = T.bitwise_or(T.bitwise_and(T.Cast("int32", q_x[m, 2 * kk]), 0xFFFF),
                                        T.shift_left(T.Cast("int32", q_x[m, 2 * kk + 1]), 16))
                    x_pairs = T.reinterpret(T.broadcast(pair, GEMV_LANES), dtype="int16x16")
                    for v in T.unroll(vectors):
                        w_pairs = T.Cast("int16x16", w[T.ramp(((c * k2 + kk) * chunk + v * GEMV_LANES) * 2, 1, 16)])
                        madd_into(acc, v * GEMV_LANES, w_pairs, x_pairs)
                for j in range(chunk):
                    y[m, c * chunk + j] = T.Cast("float32", acc[j]) * s_x[m, 0] * s_w[c * chunk + j]

    return w8a8_gemv_avx2


# ----------------------------------------------------------------------------------------- GEMM for AVX2 CPUs
#
# Prefill's w8a8 matmuls are compute-bound. Without VNNI, vpmaddwd + vpaddd still sustain 1.67x the multiply-adds of
# float32 FMA on one core of an AVX2 Zen VM (tools/mac_throughput.c: 72 vs 43 GMAC/s), so integer products can beat
# float32 here where the GEMV above only had to keep up with memory. The kernel reads the GEMV's pair panels (one
# set of constants for both) and quantizes the activation rows itself, once, into a workspace where each k pair is
# one int32 word (two int16 halves), so that a row's pair is one vpbroadcastd. Its register tile is GEMM_ROWS rows
# x 16 outputs: per k pair, two weight loads (vpmovsxbw) and four broadcasts feed eight vpmaddwd into eight
# accumulators (128 multiply-adds in 22 ops). Each parallel task owns whole panels; inside one, 16-output strips,
# then blocks of rows, walk the panel front to back while its bytes stay in cache. int32 sums cannot overflow:
# |q| <= 127, so a k pair adds at most 32258, and K <= GEMM_MAX_K keeps the total under 2^31. 1.33-1.36x llmcc's
# float32 matmul at MiniLM's shapes on that VM (tools/bench_w8a8_gemm.py).

GEMM_ROWS = 4
GEMM_STRIP = 16               # outputs of one register tile: two vpmaddwd vectors
GEMM_MAX_K = 2 * (2**31 - 1) // (2 * 127 * 127)


def gemm_pairs_check(k: int, n: int, chunk: int) -> str | None:
    """Why a [k, n] weight in ``chunk``-output pair panels cannot take the GEMM, or None."""
    problem = gemv_pairs_check(k, n, chunk)
    if problem:
        return problem
    if chunk % GEMM_STRIP:
        return f"the {chunk}-output panels are not a multiple of the {GEMM_STRIP}-output register tile"
    if k > GEMM_MAX_K:
        return f"K={k} could overflow the int32 sums (at most {GEMM_MAX_K})"
    return None


def row_scale(T, k: int, top: float = INT8_MAX):
    """The TVMScript macro ``row_scale(x, m, start, out, at)``: out[at] = max(max|x[m, start:start + k]| / top,
    TINY), the scale ``quantize_rows`` gives row m of x (bit for bit: a maximum is exact in any order) when the span
    is the whole row, over 8 lanes."""
    lanes, vectors = GEMV_LANES, k // GEMV_LANES

    @T.macro
    def row_scale(x, m, start, out, at):
        lane_max = T.decl_buffer((lanes,), "float32")
        lane_max[T.ramp(0, 1, lanes)] = T.broadcast(T.float32(0), lanes)
        for v in range(vectors):
            lane_max[T.ramp(0, 1, lanes)] = T.max(lane_max[T.ramp(0, 1, lanes)],
                                                  T.fabs(x[m, T.ramp(start + v * lanes, 1, lanes)]))
        out[at] = T.float32(0)
        for i in range(lanes):
            out[at] = T.max(out[at], lane_max[i])
        for i in range(vectors * lanes, k):
            out[at] = T.max(out[at], T.fabs(x[m, start + i]))
        out[at] = T.max(out[at] / T.float32(top), T.float32(TINY))

    return row_scale


def row_quantizer(T, k: int, dtype: str, offset: int = 0):
    """The TVMScript macro ``quantize_rows(x, rows, words, s_x)`` of the GEMMs: each row of x[rows, K] quantized as
    ``quantize_rows`` does (bit for bit: the same max, division and round-half-even), plus ``offset``, stored as
    ``dtype`` into the workspace ``words`` (rows * K of them, so that one int32 word holds 2 int16 or 4 uint8
    consecutive k), its scale into s_x[m]; parallel over rows."""
    lanes, vectors = GEMV_LANES, k // GEMV_LANES
    vector_dtype, int32_vector = f"{dtype}x{lanes}", f"int32x{lanes}"
    scale_of = row_scale(T, k)

    @T.macro
    def quantize_rows(x, rows, words, s_x):
        q = T.decl_buffer((rows * k,), dtype, data=words.data)
        for m in T.parallel(rows):
            scale = T.decl_buffer((1,), "float32")
            scale_of(x, m, 0, scale, 0)
            s_x[m] = scale[0]
            for v in range(vectors):
                q[T.ramp(m * k + v * lanes, 1, lanes)] = T.Cast(vector_dtype, T.Cast(int32_vector, T.nearbyint(
                    x[m, T.ramp(v * lanes, 1, lanes)] / T.broadcast(scale[0], lanes))) + T.broadcast(offset, lanes))
            for i in range(vectors * lanes, k):
                q[m * k + i] = T.Cast(dtype, T.Cast("int32", T.nearbyint(x[m, i] / scale[0])) + offset)

    return quantize_rows


def gemm_pairs_avx2(k: int, n: int, chunk: int):
    """The hand-scheduled TIR kernel ``(x[rows, K] float32, q_pairs[N/chunk, K/2, chunk, 2] int8, s_w[N]) ->
    y[rows, N] float32``, rows symbolic, for targets with AVX2. Two parallel loops: over rows, quantizing each as
    ``quantize_rows`` does (bit for bit: the same max, division and round-half-even) into a workspace of pair words;
    then over panels, the register-tiled products."""
    problem = gemm_pairs_check(k, n, chunk)
    if problem:
        raise ValueError(f"w8a8 GEMM: {problem}")
    from tvm.script import tirx as T

    k2, panels, strips, lanes, tile = k // 2, n // chunk, chunk // GEMM_STRIP, GEMV_LANES, GEMM_ROWS
    fill, madd_into = lane_macros(T)
    quantize_rows = row_quantizer(T, k, "int16")  # word kk of a row: its k = 2kk and 2kk + 1

    @T.prim_func(private=True)
    def w8a8_gemm_avx2(a: T.handle, q_pairs: T.Buffer((panels, k2, chunk, 2), "int8"),
                       s_w: T.Buffer((n,), "float32"), y_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(a, (rows, k), "float32")
        y = T.match_buffer(y_handle, (rows, n), "float32")
        w = T.decl_buffer((panels * k2 * chunk * 2,), "int8", data=q_pairs.data)
        x_pairs = T.decl_buffer((rows * k2,), "int32")
        s_x = T.decl_buffer((rows,), "float32")
        quantize_rows(x, rows, x_pairs, s_x)
        for c in T.parallel(panels):
            acc = T.decl_buffer((tile * GEMM_STRIP,), "int32")
            for strip in range(strips):
                for block in range((rows + tile - 1) // tile):
                    fill(acc, tile * 2, T.int32(0))
                    for kk in range(k2):
                        base = ((c * k2 + kk) * chunk + strip * GEMM_STRIP) * 2
                        w0 = T.Cast("int16x16", w[T.ramp(base, 1, 16)])
                        w1 = T.Cast("int16x16", w[T.ramp(base + 16, 1, 16)])
                        for r in T.unroll(tile):
                            xb = T.reinterpret(T.broadcast(x_pairs[T.min(block * tile + r, rows - 1) * k2 + kk],
                                                           lanes), dtype="int16x16")
                            madd_into(acc, 2 * r * lanes, w0, xb)
                            madd_into(acc, (2 * r + 1) * lanes, w1, xb)
                    for r in range(tile):
                        if block * tile + r < rows:
                            for j in range(GEMM_STRIP):
                                col = c * chunk + strip * GEMM_STRIP + j
                                y[block * tile + r, col] = (T.Cast("float32", acc[r * GEMM_STRIP + j])
                                                            * s_x[block * tile + r] * s_w[col])

    return w8a8_gemm_avx2


# ----------------------------------------------------------------------------------------- GEMM for AVX512-VNNI
#
# With VNNI one vpdpbusd multiplies 32 unsigned x signed byte pairs and adds each group of four into an int32 lane:
# twice vpdpwssd's multiply-adds per op, and 4x float32 FMA on one Zen 4 core (tools/mac_throughput.c built with
# -mavx512vnni: 216 vs 54 GMAC/s). So this GEMM stores the weight with each quad of consecutive k rows in one int32
# lane,
#     q_quads[N / chunk, K / 4, chunk, 4] = q_w[4 kq + i, n]               (one byte per weight, as the pairs)
# and quantizes its activation rows to the same int8 values as quantize_rows, stored offset by 128 as unsigned
# bytes (vpdpbusd's first operand is unsigned): sum_k (q_x + 128) q_w = sum_k q_x q_w + 128 sum_k q_w, and the
# second term is a per-output constant (w_sums, from the compile-time weight), subtracted in int32: the sums are
# exactly the pair kernel's. The register tile, the panels and the parallel loops are the pair GEMM's.

QUAD = 4
# AVX-512's 32 vector registers hold a taller tile than the pair GEMM's: 8 rows x 16 outputs, 16 accumulators, so
# each weight load feeds twice the vpdpbusd (python tools/bench_w8a8_gemm.py --vnni-tile-rows 4 6 8 times them)
GEMM_QUADS_ROWS = 8
GEMM_QUADS_MAX_K = QUAD * ((2**31 - 1) // (255 * 127 * QUAD))  # |sum_k u w| (u <= 255, |w| <= 127) < 2^31


def pack_quads(q_w: np.ndarray, chunk: int) -> np.ndarray:
    """q_w[K, N] int8 -> q_quads[N / chunk, K / 4, chunk, 4] (K a multiple of 4, N of chunk)."""
    k, n = q_w.shape
    return np.ascontiguousarray(q_w.reshape(k // QUAD, QUAD, n // chunk, chunk).transpose(2, 0, 3, 1))


def unpack_quads(q_quads: np.ndarray) -> np.ndarray:
    panels, k4, chunk, _ = q_quads.shape
    return q_quads.transpose(1, 3, 0, 2).reshape(QUAD * k4, panels * chunk)


def quad_weights(q_w: np.ndarray, s_w: np.ndarray, chunk: int) -> list[np.ndarray]:
    """The VNNI GEMM's constants from the int8 format's (q_w[K, N], s_w[N]): the quad panels, s_w, and w_sums[N] =
    128 * sum_k q_w[k, n] (int32), what the unsigned offset of the activations adds."""
    w_sums = 128 * q_w.astype(np.int64).sum(axis=0)
    return [pack_quads(q_w, chunk), np.asarray(s_w, np.float32), w_sums.astype(np.int32)]


def gemm_quads_check(k: int, n: int, chunk: int) -> str | None:
    """Why a [k, n] weight in ``chunk``-output quad panels cannot take the VNNI GEMM, or None."""
    if k % QUAD:
        return f"K={k} is not a multiple of {QUAD}"
    if chunk % GEMM_STRIP or n % chunk:
        return f"N={n} is not a multiple of the {chunk}-output chunk, or the chunk not of {GEMM_STRIP}"
    if k > GEMM_QUADS_MAX_K:
        return f"K={k} could overflow the int32 sums (at most {GEMM_QUADS_MAX_K})"
    return None


def dot_quads(acc, x_quads, w_quads):
    """vpdpbusd (256-bit): acc + the sums of four u8 (x) x s8 (w) products per int32 lane."""
    from tvm.script import tirx as T

    # LLVM's intrinsic takes its byte operands as <32 x i8> (TVM's LLVM; older ones had <8 x i32>)
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256"), acc,
                                   T.reinterpret(x_quads, dtype="int8x32"), T.reinterpret(w_quads, dtype="int8x32"),
                                   dtype="int32x8")


def dot_macro(T):
    """The TVMScript macro ``dot_into(acc, at, u8_quads, s8_quads)``: one vpdpbusd into the 8 int32 lanes of ``acc``
    starting at ``at`` (the VNNI kernels here and in dequant_gemv)."""

    @T.macro
    def dot_into(acc, at, u8_quads, s8_quads):
        acc[T.ramp(at, 1, GEMV_LANES)] = dot_quads(acc[T.ramp(at, 1, GEMV_LANES)], u8_quads, s8_quads)

    return dot_into


def gemm_quads_vnni(k: int, n: int, chunk: int, tile_rows: int = GEMM_QUADS_ROWS):
    """The hand-scheduled TIR kernel ``(x[rows, K] float32, q_quads[N/chunk, K/4, chunk, 4] int8, s_w[N],
    w_sums[N] int32) -> y[rows, N] float32``, rows symbolic, for targets with AVX512-VNNI (and VL). Two parallel
    loops: over rows, quantizing each as ``quantize_rows`` does (bit for bit) into unsigned bytes offset by 128;
    then over panels, the register-tiled vpdpbusd products."""
    problem = gemm_quads_check(k, n, chunk)
    if problem:
        raise ValueError(f"w8a8 VNNI GEMM: {problem}")
    from tvm.script import tirx as T

    k4, panels, strips, lanes, tile = k // QUAD, n // chunk, chunk // GEMM_STRIP, GEMV_LANES, tile_rows
    fill, _ = lane_macros(T)
    dot_into = dot_macro(T)
    quantize_rows = row_quantizer(T, k, "uint8", 128)  # vpdpbusd's unsigned operand; word kq: k = 4kq .. 4kq + 3

    @T.prim_func(private=True)
    def w8a8_gemm_vnni(a: T.handle, q_quads: T.Buffer((panels, k4, chunk, QUAD), "int8"),
                       s_w: T.Buffer((n,), "float32"), w_sums: T.Buffer((n,), "int32"), y_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(a, (rows, k), "float32")
        y = T.match_buffer(y_handle, (rows, n), "float32")
        w = T.decl_buffer((panels * k4 * chunk,), "int32", data=q_quads.data)
        x_quads = T.decl_buffer((rows * k4,), "int32")
        s_x = T.decl_buffer((rows,), "float32")
        quantize_rows(x, rows, x_quads, s_x)
        for c in T.parallel(panels):
            acc = T.decl_buffer((tile * GEMM_STRIP,), "int32")
            for strip in range(strips):
                for block in range((rows + tile - 1) // tile):
                    fill(acc, tile * 2, T.int32(0))
                    for kq in range(k4):
                        base = (c * k4 + kq) * chunk + strip * GEMM_STRIP
                        w0 = w[T.ramp(base, 1, lanes)]
                        w1 = w[T.ramp(base + lanes, 1, lanes)]
                        for r in T.unroll(tile):
                            xb = T.broadcast(x_quads[T.min(block * tile + r, rows - 1) * k4 + kq], lanes)
                            dot_into(acc, 2 * r * lanes, xb, w0)
                            dot_into(acc, (2 * r + 1) * lanes, xb, w1)
                    for r in range(tile):
                        if block * tile + r < rows:
                            for j in range(GEMM_STRIP):
                                col = c * chunk + strip * GEMM_STRIP + j
                                y[block * tile + r, col] = (T.Cast("float32", acc[r * GEMM_STRIP + j] - w_sums[col])
                                                            * s_x[block * tile + r] * s_w[col])

    return w8a8_gemm_vnni
