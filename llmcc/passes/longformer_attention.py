"""HF Longformer's attention, which matches no sdpa pattern: its two softmax sites, recognised and rewritten for
fuse_attention.

Longformer (``LongformerSelfAttention``) computes each token's scores against its 2w+1 neighbours by chunked
q @ k^T matmuls, rolls them into a [B, S, H, 2w+1] band with a diagonal mask, concatenates the scores against the G
global keys in front, takes one softmax, zeroes padding rows, and multiplies slices of the probabilities with the
gathered global values and with chunked values (the *band site*). The global tokens' own queries attend to all keys
separately (the *global-query site*). G is a ReduceMax of the global mask at run time.
"""

from __future__ import annotations

import tvm
from tvm import relax

from llmcc.kernels.flash_attention import AttentionSpec
from llmcc.passes import attention_ir as ir


def describe_longformer(probs, var2val) -> tuple[str, bool, str] | None:
    """(kind, fused, reason) for HF Longformer's two softmax sites, which match no sdpa pattern; None for any other.

    Longformer computes each token's scores against its 2w+1 neighbours by chunked q @ k^T matmuls, rolls them into
    a [B, S, H, 2w+1] band with a diagonal mask (scatters into chunk tensors), concatenates the scores against the
    global keys in front ([B, S, H, G + 2w+1]), takes one softmax, then multiplies slices of the probabilities with
    chunked values. The global tokens' own queries attend to all keys separately: [B*H, G, S] scores masked with
    where(padding, min, .) after scattering each row's global slots. G (the number of global tokens) is a ReduceMax
    of the mask at run time."""
    scores = ir.producer(probs.args[0], var2val)
    shape = ir.shape(probs)
    if shape is None or scores is None:
        return None
    if len(shape) == 4 and ir.op_name(scores) in ("relax.concat", "relax.add", "relax.scatter_nd"):
        parts = list(scores.args[0].fields) if ir.op_name(scores) == "relax.concat" \
            and isinstance(scores.args[0], relax.Tuple) else [probs.args[0]]
        band = ir.shape(parts[-1])
        width = band[-1] if band is not None and len(band) == 4 else None
        if not isinstance(width, tvm.tirx.IntImm) or int(width) % 2 != 1 or not ir.same_dim(band[1], shape[1]) \
                or isinstance(shape[1], tvm.tirx.IntImm) and int(width) >= int(shape[1]):
            return None
        built = {ir.op_name(c) for c in ir.upstream(parts[-1], var2val, limit=200)}
        if not {"relax.scatter_nd"} & built or not {"relax.matmul", "relax.call_tir"} & built:
            return None
        window = (int(width) - 1) // 2
        has_global = len(parts) > 1
        kind = "sliding_window+global" if has_global else "sliding_window"
        what = f"[B, S, H, {'G + ' if has_global else ''}{int(width)}]"
        return kind, False, (f"chunked sliding-window scores (HF Longformer, {window} keys each side"
                             f"{', global keys concatenated in front' if has_global else ''}): a {what} band built "
                             "by chunked matmuls and diagonal scatters, not one q @ k^T")
    if len(shape) == 3:
        chain = ir.upstream(probs.args[0], var2val, through={"relax.reshape", "relax.where", "relax.permute_dims"},
                          limit=8)
        if any(ir.op_name(c) == "relax.scatter_nd" for c in chain) and \
                any(ir.op_name(c) == "relax.where" for c in chain):
            return "global", False, ("global-token queries (HF Longformer): 3-D [B*H, G, S] scores masked by "
                                     "where(padding, min, .) after a scatter of each row's global slots, not the "
                                     "4-D sdpa pattern (scaled q @ k^T + additive mask)")
    return None


# Replaced scores (HF's finfo.min fills) become this additive bias: it rounds q.k + bias to itself for any
# |q.k| < 2^75, so a wholly replaced row is uniform, as HF's all-equal row is, and a replaced key gets weight
# exp(-1e30 - max) = 0, as exp(min - max) is. Finite, and above the kernel's running-max start (-3e38).
_REPLACED_SCORE_BIAS = -1.0e30
# A replaced score must be this low for its weight to be exactly 0 next to any real score (exp underflows).
_REPLACED_SCORE_MAX = -1.0e4


def _replaced_bias(bb, scores, slots, updates):
    """The scatter that replaces scores, applied to zeros with ``_REPLACED_SCORE_BIAS``: the additive bias that hides
    the same scores (zeros of the scores' shape, not zeros_like, so the scores need not be computed)."""
    big = relax.const(_REPLACED_SCORE_BIAS, ir.dtype(scores))
    zeros = bb.emit(relax.op.zeros(relax.ShapeExpr(ir.shape(scores)), ir.dtype(scores)))
    fills = bb.emit(relax.op.broadcast_to(big, relax.ShapeExpr(ir.shape(updates))))  # (full_like does not fold)
    return bb.emit(relax.op.scatter_nd(zeros, slots, fills, "update"))


def _cast_chain(var, var2val, consumers) -> list:
    """The astype bindings that alone read ``var``, one after another (float32 and back in a float16 model)."""
    chain = []
    while True:
        users = consumers.get(chain[-1] if chain else var, [])
        if len(users) != 1 or ir.op_name(var2val[users[0]]) != "relax.astype":
            return chain
        chain.append(users[0])


class GlobalQuerySite:
    """HF Longformer's global-token queries as one dense attention: q [B*H, G, D] against every key.

    The exported graph (``_compute_global_attn_output_from_hidden``)::

        s3 = R.matmul(q3, k_t3)                                 # [B*H, G, S], q3 already scaled by 1/sqrt(D)
        t = R.permute_dims(R.reshape(s3, [B, H, G, S]), [0, 2, 1, 3])
        t = R.scatter_nd(t, slots, R.broadcast_to(min, ...))    # a row's padded global slots: every score = min
        w = R.where(padding [.., S], min, R.permute_dims(t, [0, 2, 1, 3]))
        p = R.astype(R.nn.softmax(R.reshape(w, [B*H, G, S])), "float32")
        out3 = R.matmul(p, v3)                                  # [B*H, G, D]

    becomes the flash kernel on reshaped (not copied) q/k^T/v with an additive [B, H, G, S] bias that is
    ``_REPLACED_SCORE_BIAS`` wherever the graph replaced a score (the same scatter and where, applied to zeros), so
    every row's probabilities are HF's: unreplaced keys exactly, replaced ones 0, a wholly replaced row uniform.
    Guards: both fills are the same constant <= _REPLACED_SCORE_MAX, the scatter writes a broadcast of it, nothing
    outside the chain reads an intermediate, shapes line up."""

    def __init__(self, spec, operands, cond, fill, scatter, out_shape):
        self.spec, self.operands, self.cond, self.fill, self.scatter = spec, operands, cond, fill, scatter
        self.out_shape = out_shape
        self.root_var = None  # the value matmul's variable, whose binding the fused call replaces
        self.shape_reads: dict = {}  # shape_of(intermediate) variable -> its static ShapeExpr

    def emit(self, rewriter, binding) -> None:
        bb, visit = rewriter.builder_, rewriter.visit_expr
        q3, k_t3, v3 = (visit(self.operands[n]) for n in ("q", "k_t", "v"))
        b, h, g, s = self.out_shape
        d, dv = ir.shape(q3)[2], ir.shape(v3)[2]
        q = bb.emit(relax.op.reshape(q3, relax.ShapeExpr([b, h, g, d])))
        k_t = bb.emit(relax.op.reshape(k_t3, relax.ShapeExpr([b, h, d, s])))
        v = bb.emit(relax.op.reshape(v3, relax.ShapeExpr([b, h, s, dv])))
        scores = visit(self.scatter.args[0])
        big = relax.const(_REPLACED_SCORE_BIAS, ir.dtype(scores))
        replaced = _replaced_bias(bb, *(visit(a) for a in self.scatter.args))
        bias = bb.emit(relax.op.where(visit(self.cond), big, bb.emit(relax.op.permute_dims(replaced, [0, 2, 1, 3]))))
        out = bb.emit(relax.call_tir(rewriter.kernel(self.spec), [q, k_t, v, bias],
                                     relax.TensorType([b, h, g, dv], ir.dtype(scores))))
        bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(relax.op.reshape(out, ir.shape(binding.var)))))


def global_query_site(probs_var, var2val, consumers, outputs) -> tuple[GlobalQuerySite | None, str]:
    """(site, '') when ``probs_var`` is the softmax of HF Longformer's global-token queries (see GlobalQuerySite)
    and every guard holds, else (None, why not)."""
    probs = var2val[probs_var]
    chain = [probs_var]

    def step(expr, op, what):
        call = ir.producer(expr, var2val)
        if ir.op_name(call) != op:
            raise ir.NoMatch(f"{what} is not {op}")
        chain.extend(v for v in var2val if var2val[v].same_as(call))
        return call

    try:
        flat = step(probs.args[0], "relax.reshape", "the softmax input")
        where = step(flat.args[0], "relax.where", "the masked scores")
        cond, fill = where.args[0], where.args[1]
        back = step(where.args[2], "relax.permute_dims", "the scores under the mask")
        scatter = step(back.args[0], "relax.scatter_nd", "the scores before the permute")
        front = step(scatter.args[0], "relax.permute_dims", "the scattered scores")
        scores4 = step(front.args[0], "relax.reshape", "the scores before the scatter")
        scores3 = step(scores4.args[0], "relax.matmul", "the 4-D scores")
    except ir.NoMatch as exc:
        return None, f"not HF Longformer's global-query chain: {exc}"
    if ir.axes(back) != [0, 2, 1, 3] or ir.axes(front) != [0, 2, 1, 3]:
        return None, "the permutes around the scatter are not [0, 2, 1, 3]"
    if not isinstance(fill, ir.Const) or ir.scalar(fill) is None or ir.scalar(fill) > _REPLACED_SCORE_MAX:
        return None, f"the padding fill is not a scalar constant <= {_REPLACED_SCORE_MAX:g}"
    bcast = ir.producer(scatter.args[2], var2val)
    while ir.op_name(bcast) == "relax.reshape":
        bcast = ir.producer(bcast.args[0], var2val)
    if ir.op_name(bcast) != "relax.broadcast_to" or not isinstance(bcast.args[0], ir.Const) \
            or ir.scalar(bcast.args[0]) != ir.scalar(fill):
        return None, "the scatter does not write the padding fill's constant everywhere"
    q3, k_t3 = scores3.args
    casts = _cast_chain(probs_var, var2val, consumers)  # HF casts to float32 (and back, in a float16 model)
    if not casts:
        return None, "the probabilities have users other than casts"
    cast = casts[-1]
    matmuls = consumers.get(cast, [])
    if len(matmuls) != 1 or ir.op_name(var2val[matmuls[0]]) != "relax.matmul" \
            or not var2val[matmuls[0]].args[0].same_as(cast):
        return None, "the probabilities do not feed one value matmul"
    root = matmuls[0]
    v3 = var2val[root].args[1]
    if not all(ir.ndim(x) == 3 for x in (q3, k_t3, v3)) or ir.ndim(scores4) != 4:
        return None, "q, k^T, v are not 3-D [B*H, ., .] with 4-D [B, H, G, S] scores"
    if len({ir.dtype(x) for x in (q3, k_t3, v3, scores3)}) != 1 or "float" not in ir.dtype(q3) \
            or ir.dtype(cast) != ir.dtype(probs):
        return None, "q/k/v dtypes differ or are not float, or the cast changes the dtype"
    b, h, g, s = ir.shape(scores4)
    qs, ks, vs = ir.shape(q3), ir.shape(k_t3), ir.shape(v3)
    if not (isinstance(h, tvm.tirx.IntImm) and isinstance(qs[2], tvm.tirx.IntImm)
            and isinstance(vs[2], tvm.tirx.IntImm)):
        return None, "heads or head dims are not static"
    if not (ir.same_dim(qs[0], b * h) and ir.same_dim(qs[1], g) and ir.same_dim(ks[1], qs[2]) and ir.same_dim(ks[2], s)
            and ir.same_dim(vs[1], s) and ir.same_dim(ks[0], qs[0]) and ir.same_dim(vs[0], qs[0])):
        return None, "q [B*H, G, D], k^T [B*H, D, S], v [B*H, S, Dv] do not line up with the [B, H, G, S] scores"
    cs = ir.shape(cond)
    if cs is None or len(cs) > 4 or not all(ir.is_one(a) or ir.same_dim(a, c)
                                            for a, c in zip(cs, [b, h, g, s][-len(cs):])):
        return None, "the padding condition does not broadcast to [B, H, G, S]"
    inner = set(chain) | set(casts)
    # The scatter's indices are computed from shape_of(scores): a shape read, which the rewrite answers statically.
    shape_reads = {u for x in inner for u in consumers.get(x, []) if ir.op_name(var2val[u]) == "relax.shape_of"}
    if any(u not in inner | {root} | shape_reads for x in inner for u in consumers.get(x, [])) \
            or any(x in outputs for x in inner):
        return None, "an intermediate (scores or probabilities) is used outside the attention"
    if any(ir.shape(var2val[u].args[0]) is None for u in shape_reads):
        return None, "a shape read of the scores has no static shape to answer with"
    spec = AttentionSpec(num_heads=int(h), num_kv_heads=int(h), head_dim=int(qs[2]), value_dim=int(vs[2]),
                         scale=1.0, dtype=ir.dtype(q3), bias=(ir.is_one(b), False, False), k_layout="bnds")
    site = GlobalQuerySite(spec, {"q": q3, "k_t": k_t3, "v": v3}, cond, fill, scatter, (b, h, g, s))
    site.root_var = root
    site.shape_reads = {u: relax.ShapeExpr(ir.shape(var2val[u].args[0])) for u in shape_reads}
    return site, ""


# ---------------------------------------------------------------------------------------------------------------------
# The band site.


# Ops that only move or select elements: a tensor reached through them is a view of (part of) its source.
_VIEW_OPS = {"relax.reshape", "relax.permute_dims", "relax.strided_slice", "relax.concat", "relax.expand_dims",
             "relax.broadcast_to", "relax.squeeze", "relax.take"}


def _is_view(call) -> bool:
    return ir.op_name(call) in _VIEW_OPS or ir.callee(call).startswith("pad")


def _view_walk(expr, var2val):
    """Each variable ``expr`` is a view of, depth first from ``expr`` itself, up through reshapes, permutes, slices,
    concats (every part), gathers and pads: (variable, True when another op computes it or it is a parameter)."""
    stack, seen = [expr], set()
    while stack:
        e = stack.pop()
        if isinstance(e, relax.Tuple):
            stack.extend(e.fields)
            continue
        if not isinstance(e, relax.Var) or e in seen:
            continue
        seen.add(e)
        val = var2val.get(e)
        if isinstance(val, relax.Var):
            yield e, False
            stack.append(val)
        elif isinstance(val, relax.Call) and _is_view(val):
            yield e, False
            first = val.args[1] if ir.callee(val) else val.args[0]
            stack.extend(first.fields if isinstance(first, relax.Tuple) else [first])
        else:
            yield e, True


def _view_sources(expr, var2val) -> set:
    """The bindings ``expr`` is a view of: the first variables up its view chain that another op computes."""
    return {e for e, computed in _view_walk(expr, var2val) if computed}


def _products(expr, var2val) -> list:
    """The products (matmul, einsum) that ``expr`` is computed from, walking up through anything else."""
    found = []
    for call in ir.upstream(expr, var2val, limit=300):
        if ir.product_operands(call) is not None:
            found.append(call)
    return found


class BandSite:
    """HF Longformer's local attention with global keys as one flash kernel call: q against G gathered global keys
    and the band of ``w`` keys each side (``AttentionSpec(band=w, global_keys=True)``).

    The exported graph (``LongformerSelfAttention.forward``, batch B, S tokens, H heads)::

        e = einsum(q, k_glob)                                 # [B, S, H, G], q [B, S, H, D] scaled by 1/sqrt(D)
        glob = permute(scatter_nd(permute(e), slots, min))    # padded global slots of a row: min
        band = <chunked q @ k^T over 2w+1 diagonals>          # [B, S, H, 2w+1], keys outside [0, S): -inf
             + <the same over where(key is padding or global, min, 0)>
        p = where(query is padding, 0, softmax(concat(glob, band)))
        out = permute(matmul(permute(p[..., :G]), permute(v_glob))) + <chunked p[..., G:] @ v>   # [B, S, H, D]

    becomes::

        k2 = concat(k_glob, k)                                # [B, G + S, H, D]: the global keys in front
        v2 = concat(v_glob, v)
        bias = concat(<-1e30 at the padded global slots>, where(key is padding or global, -1e30, 0))  # [B, H, 1, G+S]
        out = where(query is padding, 0, call_tir(flash_attention_sliding_window_global_mask, (q, k2, v2, bias)))

    where k and v are the [B, S, H, D] tensors the global keys and values are gathered from. Each row sees exactly
    HF's keys with HF's weights: the band keys within w of it (the bias hides padding and global tokens there, as
    HF's diagonal mask does) and the global keys (the bias hides padded slots). The kernel walks the global keys'
    tiles and the band's, so its work is O(S * (G + w)); the chunked band tensors are gone.

    Called without global tokens (LongformerModel's default), HF computes the band alone: softmax(band + key mask),
    the padding rows zeroed, one chunked value product reshaped to [B, H, S, Dv]. That becomes the same kernel with
    no global keys (``band=w`` alone), reading the [B, H, S, D] q, k and v the chunks are views of.

    Guards: the band's product reads views of the same q and k as the global scores, its value product views of the
    same v; every fill is a constant <= _REPLACED_SCORE_MAX; the probabilities feed only the padding where and the
    two slices; shapes line up. A misread shows as a failed check against onnxruntime when the model is compiled."""

    def __init__(self, spec, operands: dict, out_layout_permuted: bool):
        self.spec, self.operands = spec, operands
        self.out_layout_permuted = out_layout_permuted
        self.root_var = None
        self.shape_reads: dict = {}

    def emit(self, rewriter, binding) -> None:
        bb, visit = rewriter.builder_, rewriter.visit_expr
        o = {name: tuple(visit(a) for a in x) if isinstance(x, tuple) else visit(x) if x is not None else None
             for name, x in self.operands.items()}
        q, k, v, k_glob, v_glob = o["q"], o["k"], o["v"], o["k_glob"], o["v_glob"]
        spec = self.spec
        b, s = ir.shape(q)[0], ir.shape(q)[1 if spec.q_layout == "bsnd" else 2]
        h, dv = spec.num_heads, spec.value_dim
        dtype = ir.dtype(q)
        big = relax.const(_REPLACED_SCORE_BIAS, dtype)
        zero = relax.const(0.0, dtype)
        hidden = bb.emit(relax.op.where(o["key_hidden"], big, zero))  # [B, S, 1, 1]
        band_bias = bb.emit(relax.op.reshape(hidden, relax.ShapeExpr([b, 1, 1, s])))
        if k_glob is None:  # no global tokens: the band alone
            k2, v2, bias = k, v, band_bias
        else:
            k2 = bb.emit(relax.op.concat([k_glob, k], axis=1))
            v2 = bb.emit(relax.op.concat([v_glob, v], axis=1))
            g = ir.shape(k_glob)[1]
            if o["slots"] is not None:  # [B, G, H, S] with the padded slots' rows replaced; every position alike
                replaced = _replaced_bias(bb, *o["slots"])
                first = bb.emit(relax.op.strided_slice(replaced, [3], [0], [1]))
                glob_bias = bb.emit(relax.op.permute_dims(first, [0, 2, 3, 1]))  # [B, H, 1, G]
            else:
                glob_bias = bb.emit(relax.op.zeros(relax.ShapeExpr([b, h, 1, g]), dtype))
            band_bias = bb.emit(relax.op.broadcast_to(band_bias, relax.ShapeExpr([b, h, 1, s])))
            bias = bb.emit(relax.op.concat([glob_bias, band_bias], axis=3))
        out_shape = [b, s, h, dv] if self.out_layout_permuted else [b, h, s, dv]
        out = bb.emit(relax.call_tir(rewriter.kernel(self.spec), [q, k2, v2, bias], relax.TensorType(out_shape, dtype)))
        padded = o["query_padding"]  # [B, S, 1, 1]
        if not self.out_layout_permuted:
            padded = bb.emit(relax.op.permute_dims(padded, [0, 2, 1, 3]))
        value = relax.op.where(padded, zero, out)
        bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(value)))


def _fill_ok(expr) -> bool:
    return isinstance(expr, ir.Const) and ir.scalar(expr) is not None and ir.scalar(expr) <= _REPLACED_SCORE_MAX


def _broadcast_fill(expr, var2val):
    """The constant ``expr`` is a broadcast (through reshapes) of, else None."""
    call = ir.producer(expr, var2val)
    while ir.op_name(call) == "relax.reshape":
        call = ir.producer(call.args[0], var2val)
    if ir.op_name(call) == "relax.broadcast_to" and isinstance(call.args[0], ir.Const):
        return call.args[0]
    return None


def _gather_source(x, var2val):
    """The [B, S, H, D] tensor a global-token gather reads: x = scatter_nd(zeros, slots, reshape*(take(reshape(t),
    rows))) (HF's ``key_vectors_only_global``), else None."""
    scatter = ir.producer(x, var2val)
    if ir.op_name(scatter) != "relax.scatter_nd":
        return None
    call = ir.producer(scatter.args[2], var2val)
    while ir.op_name(call) == "relax.reshape":
        call = ir.producer(call.args[0], var2val)
    if ir.op_name(call) != "relax.take" or int(call.attrs.axis) != 0:
        return None
    flat = ir.producer(call.args[0], var2val)
    if ir.op_name(flat) != "relax.reshape" or ir.ndim(flat.args[0]) != 4:
        return None
    return flat.args[0]


def band_site(probs_var, var2val, consumers, outputs) -> tuple[BandSite | None, str]:
    """(site, '') when ``probs_var`` is the softmax of HF Longformer's band with global keys (see BandSite) and
    every guard holds, else (None, why not)."""
    probs = var2val[probs_var]
    try:
        if ir.op_name(ir.producer(probs.args[0], var2val)) != "relax.concat":
            return _match_band_only(probs_var, probs, var2val, consumers, outputs), ""
        return _match_band(probs_var, probs, var2val, consumers, outputs), ""
    except ir.NoMatch as exc:
        return None, str(exc)


def _step(expr, op, what, var2val):
    call = ir.producer(expr, var2val)
    if ir.op_name(call) != op:
        raise ir.NoMatch(f"{what} is not {op}")
    return call


def _only_user(var, consumers, var2val, op, what):
    users = consumers.get(var, [])
    if len(users) != 1 or ir.op_name(var2val[users[0]]) != op:
        raise ir.NoMatch(f"{what} has users other than one {op}")
    return users[0]


def _key_hidden(mask_part, var2val):
    """The [B, S, 1, 1] condition of the band's key mask where(hidden, min, 0), which HF chunks like the keys."""
    for call in ir.upstream(mask_part, var2val, limit=300):
        if ir.op_name(call) == "relax.where" and _fill_ok(call.args[1]) and ir.ndim(call.args[0]) == 4 \
                and ir.dtype(call.args[0]) == "bool" and [int(x) for x in ir.shape(call.args[0])[2:]] == [1, 1]:
            return call.args[0]
    raise ir.NoMatch("the band's key mask is not where(hidden [B, S, 1, 1], min, 0)")


def _zeroed_padding_rows(probs_var, var2val, consumers):
    """(the probabilities as the value products read them, the padding rows' [B, S, 1, 1] condition):
    where(query is padding, 0, astype(softmax)), cast back in a float16 model."""
    head = (_cast_chain(probs_var, var2val, consumers) or [probs_var])[-1]
    masked = _only_user(head, consumers, var2val, "relax.where", "the probabilities")
    where = var2val[masked]
    if not where.args[2].same_as(head) or not isinstance(where.args[1], ir.Const) or ir.scalar(where.args[1]) != 0.0:
        raise ir.NoMatch("the probabilities are not where(query is padding, 0, p)")
    query_padding = where.args[0]
    if ir.ndim(query_padding) != 4 or [int(x) for x in ir.shape(query_padding)[2:]] != [1, 1]:
        raise ir.NoMatch("the padding rows' condition is not [B, S, 1, 1]")
    return (_cast_chain(masked, var2val, consumers) or [masked])[-1], query_padding


def _bnsd_view(expr, var2val, b, h, s):
    """A [B, H, S, D] tensor that ``expr`` (chunks of q, k or v) is a view of: up through view ops, the first one."""
    for e, _ in _view_walk(expr, var2val):
        shape = ir.shape(e)
        if shape is not None and len(shape) == 4 and all(ir.same_dim(x, y) for x, y in zip(shape[:3], (b, h, s))):
            return e
    raise ir.NoMatch("q, k or v is not a view of a [B, H, S, D] tensor")


def _match_band_only(probs_var, probs, var2val, consumers, outputs) -> BandSite:
    """Longformer without global tokens: softmax(band scores + key mask) alone, one chunked value product."""
    b, s, h, width = ir.shape(probs)
    if not isinstance(width, tvm.tirx.IntImm) or int(width) % 2 != 1 or not isinstance(h, tvm.tirx.IntImm):
        raise ir.NoMatch("the band's width (2w + 1) or the head count is not static and odd")
    add = _step(probs.args[0], "relax.add", "the band scores", var2val)
    for scores, mask_part in (add.args, add.args[::-1]):
        products = [p for p in _products(scores, var2val) if ir.ndim(ir.product_operands(p)[0]) >= 3]
        try:
            q, k = (_bnsd_view(x, var2val, b, h, s) for x in ir.product_operands(products[0]))
            key_hidden = _key_hidden(mask_part, var2val)
            break
        except (ir.NoMatch, IndexError):
            continue
    else:
        raise ir.NoMatch("the band scores are not a chunked product of q and k plus a key mask")
    masked, query_padding = _zeroed_padding_rows(probs_var, var2val, consumers)
    value_products = [u for u, val in var2val.items() if ir.product_operands(val) is not None
                      and _view_sources(ir.product_operands(val)[0], var2val) == {masked}]
    if len(value_products) != 1:
        raise ir.NoMatch("the band's probabilities do not feed one value product")
    v = _bnsd_view(ir.product_operands(var2val[value_products[0]])[1], var2val, b, h, s)
    after = consumers.get(value_products[0], [])
    if len(after) != 1 or ir.op_name(var2val[after[0]]) != "relax.reshape" or ir.ndim(after[0]) != 4 \
            or not all(ir.same_dim(x, y) for x, y in zip(ir.shape(after[0])[:3], (b, h, s))):
        raise ir.NoMatch("the value product is not reshaped to [B, H, S, Dv]")
    if probs_var in outputs:
        raise ir.NoMatch("the probabilities are a function output")
    dtype = ir.dtype(q)
    spec = AttentionSpec(num_heads=int(h), num_kv_heads=int(h), head_dim=int(ir.shape(q)[3]),
                         value_dim=int(ir.shape(v)[3]), scale=1.0, dtype=dtype, bias=(ir.is_one(b), True, True),
                         band=(int(width) - 1) // 2)
    site = BandSite(spec, {"q": q, "k": k, "v": v, "k_glob": None, "v_glob": None, "key_hidden": key_hidden,
                           "query_padding": query_padding, "slots": None}, out_layout_permuted=False)
    site.root_var = after[0]
    return site


def _match_band(probs_var, probs, var2val, consumers, outputs) -> BandSite:
    if probs_var in outputs:
        raise ir.NoMatch("the probabilities are a function output")
    cat = _step(probs.args[0], "relax.concat", "the softmax input", var2val)
    parts = list(cat.args[0].fields) if isinstance(cat.args[0], relax.Tuple) else []
    if len(parts) != 2 or int(cat.attrs.axis) not in (-1, 3):
        raise ir.NoMatch("the softmax input is not concat(global-key scores, band scores) on the last axis")
    glob, band = parts
    b, s, h, width = ir.shape(band)
    if not isinstance(width, tvm.tirx.IntImm) or int(width) % 2 != 1 or not isinstance(h, tvm.tirx.IntImm):
        raise ir.NoMatch("the band's width (2w + 1) or the head count is not static and odd")
    w = (int(width) - 1) // 2
    # global-key scores: permute(scatter_nd(permute(einsum(q, k_glob)), slots, fill)) or the einsum as it stands
    slots = None
    scores = ir.producer(glob, var2val)
    if ir.op_name(scores) == "relax.permute_dims":
        scatter = _step(scores.args[0], "relax.scatter_nd", "the permuted global-key scores", var2val)
        fill = _broadcast_fill(scatter.args[2], var2val)
        if fill is None or not _fill_ok(fill):
            raise ir.NoMatch("the global slots' scatter does not write a constant <= -1e4")
        front = _step(scatter.args[0], "relax.permute_dims", "the scattered global-key scores", var2val)
        if ir.axes(front) != [0, 3, 2, 1] or ir.axes(scores) != [0, 3, 2, 1]:
            raise ir.NoMatch("the permutes around the global slots' scatter are not [0, 3, 2, 1]")
        slots = scatter
        scores = ir.producer(front.args[0], var2val)
    if scores is None or not (ir.op_name(scores) == "relax.matmul" or ir.callee(scores).startswith("einsum")):
        raise ir.NoMatch("the global-key scores are not one product of q and the global keys")
    q, k_glob = ir.product_operands(scores)
    if ir.ndim(q) != 4 or ir.ndim(k_glob) != 4:
        raise ir.NoMatch("q or the global keys are not 4-D [B, S, H, D]")
    d = ir.shape(q)[3]
    if not (ir.same_dim(ir.shape(q)[0], b) and ir.same_dim(ir.shape(q)[1], s) and ir.same_dim(ir.shape(q)[2], h)
            and ir.same_dim(ir.shape(k_glob)[3], d) and ir.same_dim(ir.shape(k_glob)[2], h)
            and ir.same_dim(ir.shape(glob)[3], ir.shape(k_glob)[1])):
        raise ir.NoMatch("q [B, S, H, D] and the global keys [B, G, H, D] do not line up with the scores")
    k = _gather_source(k_glob, var2val)
    if k is None or not all(ir.same_dim(x, y) for x, y in zip(ir.shape(k), ir.shape(q))):
        raise ir.NoMatch("the global keys are not gathered from a [B, S, H, D] key tensor")
    # band scores: the chunked product of views of q and k, plus a key mask where(hidden, min, 0)
    add = _step(band, "relax.add", "the band scores", var2val)
    q_src, k_src = _view_sources(q, var2val), _view_sources(k, var2val)
    reads_qk = [any(_view_sources(ir.product_operands(p)[0], var2val) == q_src
                    and _view_sources(ir.product_operands(p)[1], var2val) == k_src for p in _products(a, var2val))
                for a in add.args]
    if reads_qk.count(True) != 1:
        raise ir.NoMatch("the band scores are not one product of views of q and the keys the global keys are "
                         "gathered from, plus a mask")
    mask_part = add.args[reads_qk.index(False)]
    key_hidden = _key_hidden(mask_part, var2val)
    masked, query_padding = _zeroed_padding_rows(probs_var, var2val, consumers)
    slices = consumers.get(masked, [])
    if len(slices) != 2 or any(ir.op_name(var2val[x]) != "relax.strided_slice" for x in slices):
        raise ir.NoMatch("the probabilities feed more than the global and band slices")
    glob_mm = None
    for sl in slices:
        for perm in consumers.get(sl, []):
            for mm in consumers.get(perm, []):
                if ir.op_name(var2val[perm]) == "relax.permute_dims" and ir.op_name(var2val[mm]) == "relax.matmul":
                    glob_mm = mm
    if glob_mm is None:
        raise ir.NoMatch("the global slice does not feed a value matmul")
    v_glob = _step(var2val[glob_mm].args[1], "relax.permute_dims", "the global values", var2val).args[0]
    v = _gather_source(v_glob, var2val)
    if v is None or not (ir.same_dim(ir.shape(v)[0], b) and ir.same_dim(ir.shape(v)[1], s)):
        raise ir.NoMatch("the global values are not gathered from a [B, S, H, Dv] value tensor")
    # the root: add(permute(global part), band part) in [B, S, H, Dv] (or the add of the [B, H, S, Dv] parts)
    after = consumers.get(glob_mm, [])
    permuted = len(after) == 1 and ir.op_name(var2val[after[0]]) == "relax.permute_dims"
    if permuted:
        after = consumers.get(after[0], [])
    if len(after) != 1 or ir.op_name(var2val[after[0]]) != "relax.add":
        raise ir.NoMatch("the global part of the output is not added to the band part")
    root = after[0]
    glob_part = consumers[glob_mm][0] if permuted else glob_mm
    other = [a for a in var2val[root].args if not a.same_as(glob_part)]
    v_src = _view_sources(v, var2val)
    if len(other) != 1 or not any(_view_sources(ir.product_operands(p)[1], var2val) == v_src
                                  for p in _products(other[0], var2val)):
        raise ir.NoMatch("the band part of the output is not a product with the values")
    dtype = ir.dtype(q)
    if "float" not in dtype or {ir.dtype(x) for x in (k, v, k_glob, v_glob)} != {dtype}:
        raise ir.NoMatch("q, k, v and the global keys and values do not share a float dtype")
    spec = AttentionSpec(num_heads=int(h), num_kv_heads=int(h), head_dim=int(d), value_dim=int(ir.shape(v)[3]),
                         scale=1.0, dtype=dtype, bias=(ir.is_one(b), False, True), q_layout="bsnd", k_layout="bsnd",
                         v_layout="bsnd", out_layout="bsnd" if permuted else "bnsd", band=w, global_keys=True)
    operands = {"q": q, "k": k, "v": v, "k_glob": k_glob, "v_glob": v_glob, "key_hidden": key_hidden,
                "query_padding": query_padding,
                "slots": tuple(slots.args) if slots is not None else None}
    site = BandSite(spec, operands, permuted)
    site.root_var = root
    if slots is not None:  # the slots are computed from shape_of(the einsum's permute): answered statically
        front_var = slots.args[0]
        site.shape_reads = {u: relax.ShapeExpr(ir.shape(front_var)) for u in consumers.get(front_var, [])
                            if ir.op_name(var2val[u]) == "relax.shape_of"}
    return site
