"""Converters for the ONNX opset-23 ``Attention`` and ``RotaryEmbedding`` ops (default domain).

TVM 0.27 registers ``Attention`` under the bare name, but its converter is com.microsoft's contrib Attention (one
packed QKV weight, ``num_heads``): an opset-23 node fails there with ``KeyError: 'num_heads'``. It has no
``RotaryEmbedding``. llmcc's importer rejects com.microsoft.Attention before conversion, so the name is free.

``Attention`` emits the form llmcc's ``fuse_attention`` pass recognises (BNSH, ``_sdpa_pattern``)::

    q, k, v     4-D [B, H, S, D]; 3-D [B, S, H*D] inputs are reshaped with q_num_heads / kv_num_heads and permuted
    k, v        past_key / past_value concatenated on the sequence axis (these are present_key / present_value)
    k, v        GQA: kv heads repeated as HF does: expand_dims -> broadcast_to [B, Hkv, rep, S, D] -> reshape
    scores    = R.matmul(q, R.permute_dims(k, [0, 1, 3, 2])) * scale     (scale: attribute, else 1/sqrt(D))
    scores    = softcap * tanh(scores / softcap)                            (softcap > 0 only)
    probs     = R.nn.softmax(scores + bias, axis=-1)                        (bias: attn_mask and is_causal)
    y         = R.matmul(probs, v)

Semantics, as the opset-23 spec and onnx.reference's implementation define them:
  - is_causal: query i attends key j iff ``j <= i + past_sequence_length`` (the keys in past_key; 0 without one).
    That is bottom-right aligned for a self-attention step over a KV cache, and top-left (the plain lower triangle)
    when there is no past_key, even if K is longer than Q (cross attention).
  - attn_mask: bool (True = attend) becomes an additive 0 / finfo(dtype).min bias; a float mask is added as is. A
    mask whose last axis is shorter than the total key length is padded (False / -inf), as the reference does.
  - A query row with no attendable key (every key masked) gives a zero output row, not the average of V: the
    output is ``where(dead_row, 0, y)``, with dead_row computed from the masks (emitted only when attn_mask is
    given: the causal mask alone never masks a whole row). The guard sits after the value matmul, outside the
    pattern the fusion pass matches.
  - qk_matmul_output (4th output) modes 0-3, softcap and softmax_precision are implemented. Mode 0 is the scaled
    q @ k^T before softcap, as the spec text says and onnxruntime 1.32 computes (onnx.reference returns it after
    softcap); modes 1-3 as the reference (mode 2 with -inf where masked, mode 3 with dead rows zeroed).
Not supported (ImportFailure naming the node and the attribute or input): opset 24's nonpad_kv_seqlen input, opset
25's window attributes, head counts that do not divide, non-float inputs.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx
from tvm.sym.analyzer import Analyzer


class AttentionImportError(ValueError):
    """An Attention / RotaryEmbedding node llmcc cannot import; the importer adds op type and node name."""


_FLOATS = ("float16", "bfloat16", "float32", "float64")
_MIN = {"float16": float(np.finfo(np.float16).min), "float32": float(np.finfo(np.float32).min),
        "float64": float(np.finfo(np.float64).min), "bfloat16": -3.3895313892515355e38}


def _shape(x) -> list:
    ty = getattr(x, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise AttentionImportError("input with unknown rank or shape")
    return list(ty.shape.values)


def _dtype(x) -> str:
    return str(x.ty.dtype)


def _int(d) -> int | None:
    return int(d) if isinstance(d, tirx.IntImm) else None


def _fmt(d) -> str:
    """A dim for an error message: 30, not T.int64(30)."""
    return str(int(d)) if isinstance(d, tirx.IntImm) else str(d)


def _same(a, b) -> bool:
    return Analyzer().can_prove_equal(a, b)


def _const(value, dtype: str):
    return relax.const(value, dtype)


def _prim_tensor(bb, value):
    """A (possibly symbolic) int scalar as a 0-D int64 tensor."""
    if _int(value) is not None or isinstance(value, int):
        return _const(int(value), "int64")
    vector = bb.normalize(relax.op.shape_to_tensor(relax.ShapeExpr([value])))
    return bb.normalize(relax.op.reshape(vector, []))


def _slice_last(bb, x, begin: int, end: int, step: int = 1):
    axis = len(_shape(x)) - 1
    return bb.emit(relax.op.strided_slice(x, [axis], [begin], [end], [step] if step != 1 else None))


# ---------------------------------------------------------------------------------------------------------------------
# Attention


class Attention(tvm_onnx.OnnxOpConverter):
    """ONNX Attention (opset 23; 24/25 without their additions), see the module docstring."""

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        inputs = list(inputs) + [None] * (7 - len(inputs))
        q, k, v, mask, past_k, past_v, nonpad = inputs[:7]
        n_out = attr.get("tvm_custom", {}).get("num_outputs", 1)
        _check_unsupported(attr, nonpad)
        ranks = [len(_shape(x)) for x in (q, k, v)]
        if ranks not in ([3, 3, 3], [4, 4, 4]):
            raise AttentionImportError(f"Q, K, V have ranks {ranks}: all must be 3-D or all 4-D")
        dtype = _dtype(q)
        if dtype not in _FLOATS or _dtype(k) != dtype or _dtype(v) != dtype:
            raise AttentionImportError(f"Q, K, V dtypes {_dtype(q)}, {_dtype(k)}, {_dtype(v)}: must be one float type")
        three_d = ranks[0] == 3
        hq, hkv = _head_counts(q, k, v, attr, three_d)
        qh, kh, vh = (_to_bnsh(bb, x, h) if three_d else x for x, h in ((q, hq), (k, hkv), (v, hkv)))
        head_dim = _shape(qh)[3]
        if not _same(head_dim, _shape(kh)[3]):
            raise AttentionImportError(f"Q head size {_fmt(head_dim)} differs from K head size {_fmt(_shape(kh)[3])}")

        past_len = 0
        if (past_k is None) != (past_v is None):
            raise AttentionImportError("past_key and past_value must be given together")
        if past_k is not None:
            past_len = _shape(past_k)[2]
            kh = bb.emit(relax.op.concat([past_k, kh], axis=2))
            vh = bb.emit(relax.op.concat([past_v, vh], axis=2))
        present_k, present_v = kh, vh
        if hq != hkv:
            kh, vh = _repeat_kv(bb, kh, hq // hkv), _repeat_kv(bb, vh, hq // hkv)

        if "scale" in attr:
            scale = float(attr["scale"])
        elif _int(head_dim) is not None:
            scale = 1.0 / math.sqrt(_int(head_dim))
        else:
            raise AttentionImportError(f"head size {_fmt(head_dim)} is symbolic: give the scale attribute")

        scores = bb.emit(relax.op.matmul(qh, bb.emit(relax.op.permute_dims(kh, [0, 1, 3, 2]))))
        scaled = bb.emit(relax.op.multiply(scores, _const(scale, dtype)))
        softcap = float(attr.get("softcap", 0.0))
        capped = scaled
        if softcap > 0:
            c = _const(softcap, dtype)
            capped = bb.emit(relax.op.multiply(bb.emit(relax.op.tanh(bb.emit(relax.op.divide(scaled, c)))), c))
        elif softcap < 0:
            raise AttentionImportError(f"softcap={softcap}: must be >= 0")

        sq, total = _shape(qh)[2], _shape(kh)[2]
        masks = _Masks(bb, dtype, sq, total, past_len, mask, bool(attr.get("is_causal", 0)))
        logits = bb.emit(relax.op.add(capped, masks.bias)) if masks.bias is not None else capped

        precision = _softmax_dtype(attr, dtype)
        if precision != dtype:
            logits = bb.emit(relax.op.astype(logits, precision))
        probs = bb.emit(relax.op.nn.softmax(logits, axis=-1))
        if precision != dtype:
            probs = bb.emit(relax.op.astype(probs, dtype))
        y = bb.emit(relax.op.matmul(probs, vh))                                     # [B, H, Sq, Dv]

        dead = masks.dead_rows()                                                     # [..., Sq, 1] or None
        if three_d:
            y = bb.emit(relax.op.permute_dims(y, [0, 2, 1, 3]))                     # [B, Sq, H, Dv]
            if dead is not None:
                while len(_shape(dead)) < 4:
                    dead = bb.emit(relax.op.expand_dims(dead, 0))
                y = bb.emit(relax.op.where(bb.emit(relax.op.permute_dims(dead, [0, 2, 1, 3])),
                                           _const(0.0, dtype), y))
            b, s = _shape(y)[:2]
            y = bb.emit(relax.op.reshape(y, [b, s, hq * _shape(y)[3]]))
        elif dead is not None:
            y = bb.emit(relax.op.where(dead, _const(0.0, dtype), y))
        if n_out <= 1:
            return y
        outputs = [y, present_k, present_v]
        if n_out >= 4:
            outputs.append(_qk_output(bb, attr, scaled, capped, probs, masks, dtype))
        return relax.Tuple(outputs[:n_out])


def _check_unsupported(attr, nonpad):
    if nonpad is not None:
        raise AttentionImportError("input nonpad_kv_seqlen (opset 24) is not supported")
    for name in ("left_window_size", "right_window_size"):
        if int(attr.get(name, -1)) != -1:
            raise AttentionImportError(f"{name}={attr[name]} (opset 25 sliding window) is not supported")
    mode = int(attr.get("qk_matmul_output_mode", 0))
    if mode not in (0, 1, 2, 3):
        raise AttentionImportError(f"qk_matmul_output_mode={mode}: must be 0, 1, 2 or 3")


def _head_counts(q, k, v, attr, three_d: bool) -> tuple[int, int]:
    if three_d:
        hq, hkv = int(attr.get("q_num_heads", 0)), int(attr.get("kv_num_heads", 0))
        if hq <= 0 or hkv <= 0:
            raise AttentionImportError("3-D Q/K/V need the q_num_heads and kv_num_heads attributes")
        for x, h, what, heads in ((q, hq, "Q", "q_num_heads"), (k, hkv, "K", "kv_num_heads"),
                                  (v, hkv, "V", "kv_num_heads")):
            hidden = _int(_shape(x)[2])
            if hidden is None or hidden % h:
                raise AttentionImportError(f"{what} hidden size {_fmt(_shape(x)[2])} is not a multiple of {heads}={h}")
    else:
        dims = [_int(_shape(x)[1]) for x in (q, k, v)]
        if any(d is None for d in dims):
            raise AttentionImportError(f"head counts {[_fmt(_shape(x)[1]) for x in (q, k, v)]} must be static")
        hq, hkv = dims[0], dims[1]
        if dims[2] != hkv:
            raise AttentionImportError(f"K has {hkv} heads but V has {dims[2]}")
        for name, h in (("q_num_heads", hq), ("kv_num_heads", hkv)):
            if name in attr and int(attr[name]) != h:
                raise AttentionImportError(f"{name}={attr[name]} but the 4-D input has {h} heads")
    if hq % hkv:
        raise AttentionImportError(f"q_num_heads={hq} is not a multiple of kv_num_heads={hkv}")
    return hq, hkv


def _to_bnsh(bb, x, heads: int):
    b, s, hidden = _shape(x)
    x = bb.emit(relax.op.reshape(x, [b, s, heads, _int(hidden) // heads]))
    return bb.emit(relax.op.permute_dims(x, [0, 2, 1, 3]))


def _repeat_kv(bb, x, rep: int):
    """[B, Hkv, S, D] -> [B, Hkv*rep, S, D], each head repeated rep times in place (HF's repeat_kv)."""
    b, h, s, d = _shape(x)
    x5 = bb.emit(relax.op.expand_dims(x, 2))
    x5 = bb.emit(relax.op.broadcast_to(x5, relax.ShapeExpr([b, h, rep, s, d])))
    return bb.emit(relax.op.reshape(x5, [b, h * rep, s, d]))


def _softmax_dtype(attr, dtype: str) -> str:
    if "softmax_precision" not in attr:
        return dtype
    code = int(attr["softmax_precision"])
    try:
        name = "bfloat16" if code == onnx.TensorProto.BFLOAT16 else \
            str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(code)))
    except (KeyError, TypeError, ValueError):  # not a TensorProto data type
        name = str(code)
    if name not in _FLOATS:
        raise AttentionImportError(f"softmax_precision={code} ({name}) is not a float type")
    return name


class _Masks:
    """The additive bias of attn_mask and is_causal, and which (query, key) pairs are allowed at all.

    ``bias``: None or a float tensor broadcastable to [B, H, Sq, T] (0 / finfo.min; a float mask as given).
    ``allowed``: None (every pair allowed) or a bool tensor, True where a key may be attended (bool mask, causal;
    a float mask allows every key it does not set to -inf).
    """

    def __init__(self, bb, dtype, sq, total, past_len, mask, causal: bool):
        self.bb, self.dtype = bb, dtype
        self.bias = self.dead = self.float_mask = None
        # Bool tensors, True where a key may be attended: ``hard`` from is_causal and a bool mask, ``allowed``
        # also from a float mask (the keys it does not set to -inf). Kept apart: TVM 0.27's LLVM codegen emits
        # ill-typed IR (and <N x i1> with <N x i8>) for logical_and of a constant and a computed bool tensor.
        self.hard, self.allowed = [], []
        self.has_mask = mask is not None
        parts = []
        if causal:
            allowed = self._causal_allowed(sq, total, past_len)
            parts.append(self._additive(allowed))
            self.hard.append(_const(allowed, "bool") if isinstance(allowed, np.ndarray) else allowed)
        if mask is not None:
            mask = self._pad(mask, total)
            mdtype = _dtype(mask)
            if mdtype == "bool":
                parts.append(self._additive(mask))
                self.hard.append(mask)
            elif mdtype == dtype:
                self.float_mask = mask
                parts.append(mask)
                self.allowed.append(bb.emit(relax.op.not_equal(mask, _const(float("-inf"), dtype))))
            else:
                raise AttentionImportError(f"attn_mask dtype {mdtype}: must be bool or the inputs' {dtype}")
        self.allowed += self.hard
        if parts:
            self.bias = parts[0] if len(parts) == 1 else bb.emit(relax.op.add(parts[0], parts[1]))

    def _additive(self, allowed):
        """0 where allowed, finfo(dtype).min elsewhere: a constant for a numpy ``allowed``."""
        lowest = _MIN[self.dtype]
        if isinstance(allowed, np.ndarray) and self.dtype != "bfloat16":
            return _const(np.where(allowed, 0.0, lowest).astype(self.dtype), self.dtype)
        if isinstance(allowed, np.ndarray):
            allowed = _const(allowed, "bool")
        return self.bb.emit(relax.op.where(allowed, _const(0.0, self.dtype), _const(lowest, self.dtype)))

    def _causal_allowed(self, sq, total, past_len):
        """[Sq, T] bool: key j allowed for query i iff j <= i + past_len (numpy when the sizes are static)."""
        sizes = [_int(sq), _int(total), past_len if isinstance(past_len, int) else _int(past_len)]
        if None not in sizes:
            n_q, n_k, past = sizes
            return np.arange(n_k)[None, :] <= np.arange(n_q)[:, None] + past
        bb = self.bb
        rows = bb.emit(relax.op.reshape(bb.emit(relax.op.arange(0, sq, 1, "int64")), [sq, 1]))
        if not (isinstance(past_len, int) and past_len == 0):
            rows = bb.emit(relax.op.add(rows, _prim_tensor(bb, past_len)))
        cols = bb.emit(relax.op.reshape(bb.emit(relax.op.arange(0, total, 1, "int64")), [1, total]))
        return bb.emit(relax.op.less_equal(cols, rows))

    def _pad(self, mask, total):
        """The mask with its last axis padded to the total key length (False / -inf), as onnx.reference does."""
        shape = _shape(mask)
        if _same(shape[-1], total) or _int(shape[-1]) == 1:
            return mask
        if _int(shape[-1]) is not None and _int(total) is not None and _int(shape[-1]) > _int(total):
            raise AttentionImportError(f"attn_mask has {_fmt(shape[-1])} keys, more than the {_fmt(total)} of "
                                       f"past_key + K")
        fill = _const(False, "bool") if _dtype(mask) == "bool" else _const(float("-inf"), _dtype(mask))
        pad = self.bb.emit(relax.op.full(relax.ShapeExpr(shape[:-1] + [total - shape[-1]]), fill, _dtype(mask)))
        return self.bb.emit(relax.op.concat([mask, pad], axis=-1))

    def dead_rows(self):
        """[..., Sq, 1] bool: query rows with no attendable key (spec: their output row is 0), or None."""
        if not self.has_mask:
            return None  # the causal frontier j <= i + past always allows key 0
        bb = self.bb
        allowed = None
        for part in self.allowed:
            part = bb.emit(relax.op.astype(part, "int32"))
            allowed = part if allowed is None else bb.emit(relax.op.multiply(allowed, part))
        any_key = bb.emit(relax.op.max(allowed, axis=-1, keepdims=True))
        self.dead = bb.emit(relax.op.equal(any_key, _const(0, "int32")))
        return self.dead

    def mode2(self, capped):
        """The reference's qk + attn_bias: -inf where the bool mask or causal disallows a key."""
        bb = self.bb
        out = capped
        if self.float_mask is not None:
            out = bb.emit(relax.op.add(out, self.float_mask))
        for part in self.hard:
            out = bb.emit(relax.op.where(part, out, _const(float("-inf"), self.dtype)))
        return out


def _qk_output(bb, attr, scaled, capped, probs, masks: _Masks, dtype):
    """The optional 4th output, per qk_matmul_output_mode (the reference's values, -inf included)."""
    mode = int(attr.get("qk_matmul_output_mode", 0))
    if mode == 0:
        return scaled
    if mode == 1:
        return capped
    if mode == 2:
        return masks.mode2(capped)
    if masks.dead is not None:
        return bb.emit(relax.op.where(masks.dead, _const(0.0, dtype), probs))
    return probs


# ---------------------------------------------------------------------------------------------------------------------
# RotaryEmbedding


class RotaryEmbedding(tvm_onnx.OnnxOpConverter):
    """ONNX RotaryEmbedding (opset 23): elementwise rotation of the first rotary_embedding_dim channels."""

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        inputs = list(inputs) + [None] * (4 - len(inputs))
        x, cos, sin, pos = inputs[:4]
        interleaved = bool(attr.get("interleaved", 0))
        rot_dim = int(attr.get("rotary_embedding_dim", 0))
        num_heads = int(attr.get("num_heads", 0))
        shape = _shape(x)
        dtype = _dtype(x)
        if dtype not in _FLOATS or _dtype(cos) != dtype or _dtype(sin) != dtype:
            raise AttentionImportError(f"X, cos_cache, sin_cache dtypes {dtype}, {_dtype(cos)}, {_dtype(sin)}: "
                                       f"must be one float type")
        if len(shape) == 4:
            xs, head_axis = x, 1                                              # [B, H, S, D]
            head = _int(shape[3])
        elif len(shape) == 3:
            hidden = _int(shape[2])
            if num_heads <= 0:
                raise AttentionImportError("3-D input needs the num_heads attribute")
            if hidden is None or hidden % num_heads:
                raise AttentionImportError(f"hidden size {_fmt(shape[2])} is not a multiple of num_heads={num_heads}")
            head = hidden // num_heads
            xs, head_axis = bb.emit(relax.op.reshape(x, [shape[0], shape[1], num_heads, head])), 2  # [B, S, H, D]
        else:
            raise AttentionImportError(f"X has rank {len(shape)}: must be 3-D or 4-D")
        if head is None:
            raise AttentionImportError(f"head size {_fmt(shape[-1])} must be static")
        rot_dim = rot_dim or head
        if rot_dim % 2 or rot_dim > head:
            raise AttentionImportError(f"rotary_embedding_dim={rot_dim} must be even and <= the head size {head}")
        half = rot_dim // 2

        if pos is not None:
            if len(_shape(cos)) != 2 or len(_shape(sin)) != 2:
                raise AttentionImportError("with position_ids, cos_cache and sin_cache must be 2-D [positions, dim/2]")
            cos = bb.emit(relax.op.take(cos, pos, axis=0))
            sin = bb.emit(relax.op.take(sin, pos, axis=0))
        elif len(_shape(cos)) != 3 or len(_shape(sin)) != 3:
            raise AttentionImportError("without position_ids, cos_cache and sin_cache must be 3-D [B, S, dim/2]")
        for name, cache in (("cos_cache", cos), ("sin_cache", sin)):
            last = _int(_shape(cache)[-1])
            if last is not None and last != half:
                raise AttentionImportError(f"{name} last dimension {last} != rotary_embedding_dim/2 = {half}")
        cos = bb.emit(relax.op.expand_dims(cos, head_axis))                  # [B, 1, S, d/2] or [B, S, 1, d/2]
        sin = bb.emit(relax.op.expand_dims(sin, head_axis))

        x_rot = xs if rot_dim == head else _slice_last(bb, xs, 0, rot_dim)
        if interleaved:
            x1, x2 = _slice_last(bb, x_rot, 0, rot_dim, 2), _slice_last(bb, x_rot, 1, rot_dim, 2)
        else:
            x1, x2 = _slice_last(bb, x_rot, 0, half), _slice_last(bb, x_rot, half, rot_dim)
        real = bb.emit(relax.op.subtract(bb.emit(relax.op.multiply(cos, x1)), bb.emit(relax.op.multiply(sin, x2))))
        imag = bb.emit(relax.op.add(bb.emit(relax.op.multiply(sin, x1)), bb.emit(relax.op.multiply(cos, x2))))
        if interleaved:
            pairs = bb.emit(relax.op.concat([bb.emit(relax.op.expand_dims(real, -1)),
                                             bb.emit(relax.op.expand_dims(imag, -1))], axis=-1))
            rotated = bb.emit(relax.op.reshape(pairs, _shape(x_rot)))
        else:
            rotated = bb.emit(relax.op.concat([real, imag], axis=-1))
        out = rotated if rot_dim == head else bb.emit(
            relax.op.concat([rotated, _slice_last(bb, xs, rot_dim, head)], axis=-1))
        if len(shape) == 3:
            out = bb.emit(relax.op.reshape(out, shape))
        return out


ATTENTION_CONVERTERS: dict[str, type] = {"Attention": Attention, "RotaryEmbedding": RotaryEmbedding}
