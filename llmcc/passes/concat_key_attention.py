"""Attention over key sets the model's own code gathered and concatenated: BigBird's middle band, for fuse_attention.

HF BigBird (``bigbird_block_sparse_attention``) scores each middle query block against four key sets it gathered
itself: the first key block, the three sliding blocks around it, its random blocks and the last key block. Each set
gets its own product, scale and mask; the scores are concatenated, one softmax runs over them, and the
probabilities are sliced back into the four sets and multiplied with the matching value sets::

    s_i = R.add(R.multiply(R.matmul(q, R.permute_dims(K_i)), scale), mask_i)   # q [B, H, L, bs, D], K_i [.., n_i, D]
        (or einsum(q, K_i) with one K_i [B, H, n_i, D] shared by every block l)
    p = R.nn.softmax(R.concat((s_1, ..., s_k), axis=-1))
    out = R.add(..R.add(R.matmul(p[..., 0:n_1], V_1), R.matmul(p[..., n_1:n_1+n_2], V_2)).., R.matmul(p[.., -n_k:], V_k))

That is one dense attention per (batch, head, block) over the concatenated keys, which the flash kernel computes
with (heads x blocks) as its heads::

    K = R.reshape(R.concat((K_1, ..., K_k), axis=3), [B, H*L, N, D])          # N = n_1 + ... + n_k
    V = ..., mask = R.reshape(R.concat(broadcast masks, axis=-1), [B, H*L, bs, N])
    out = R.reshape(R.call_tir(flash_attention_mask, (R.reshape(q, [B, H*L, bs, D]), K, V, mask)), [B, H, L, bs, Dv])

The gathered keys and the masks already exist in the graph at this size (linear in the sequence); the scores and
probabilities do not any more. Guards: one q and one scale constant for every set, masks added and broadcastable,
the slices tile [0, N) in the order of the concat, each slice feeds one product with a value set of its keys'
length, those products are summed and nothing else reads an intermediate.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax

from llmcc.kernels.flash_attention import AttentionSpec
from llmcc.passes import attention_ir as ir


class ConcatKeySite:
    """One site: q, the key, value and mask sets, and the flash kernel's spec (see the module docstring)."""

    def __init__(self, spec, q, keys, values, masks, lead, root_var):
        self.spec, self.q, self.keys, self.values, self.masks = spec, q, keys, values, masks
        self.lead = lead  # [B, H, L, ...]: the leading dims of q before (bs, D)
        self.root_var = root_var
        self.shape_reads: dict = {}

    def emit(self, rewriter, binding) -> None:
        bb, visit = rewriter.builder_, rewriter.visit_expr
        q = visit(self.q)
        rows, d = ir.shape(q)[-2:]
        lead = list(self.lead)
        batch, heads, dv = lead[0], math.prod(int(x) for x in lead[1:]), self.spec.value_dim
        dtype = ir.dtype(q)

        def per_block(x, tail):
            """A set as [B, H, L, n, tail]: one shared by every block ([B, H, n, tail]) is broadcast over them."""
            x = visit(x)
            if ir.ndim(x) == len(lead) + 1:
                x = bb.emit(relax.op.expand_dims(x, len(lead) - 1))
            return bb.emit(relax.op.broadcast_to(x, relax.ShapeExpr(lead + [ir.shape(x)[-2], tail])))

        keys = [per_block(k, d) for k in self.keys]
        values = [per_block(v, dv) for v in self.values]
        masks = [bb.emit(relax.op.broadcast_to(bb.emit(relax.op.astype(visit(m), dtype)),
                                               relax.ShapeExpr(lead + [rows, ir.shape(k)[-2]])))
                 for m, k in zip(self.masks, keys)]
        n = sum(int(ir.shape(k)[-2]) for k in keys)
        axis = len(lead)
        args = [bb.emit(relax.op.reshape(q, relax.ShapeExpr([batch, heads, rows, d]))),
                bb.emit(relax.op.reshape(bb.emit(relax.op.concat(keys, axis)), relax.ShapeExpr([batch, heads, n, d]))),
                bb.emit(relax.op.reshape(bb.emit(relax.op.concat(values, axis)),
                                         relax.ShapeExpr([batch, heads, n, dv]))),
                bb.emit(relax.op.reshape(bb.emit(relax.op.concat(masks, axis + 1)),
                                         relax.ShapeExpr([batch, heads, rows, n])))]
        out = bb.emit(relax.call_tir(rewriter.kernel(self.spec), args, relax.TensorType([batch, heads, rows, dv], dtype)))
        bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(relax.op.reshape(out, ir.shape(binding.var)))))


def concat_key_site(probs_var, var2val, consumers, outputs) -> tuple[ConcatKeySite | None, str]:
    """(site, '') when ``probs_var`` is a softmax over concatenated key sets (see the module docstring) and every
    guard holds, else (None, why not)."""
    try:
        return _match(probs_var, var2val, consumers, outputs), ""
    except ir.NoMatch as exc:
        return None, str(exc)


def _scaled_product(part, var2val):
    """(product, scale, mask) of one set's scores: add(multiply(product, scale), mask), either order."""
    add = _uncast(ir.producer(part, var2val), var2val)
    if ir.op_name(add) != "relax.add":
        raise ir.NoMatch("a set's scores are not scores plus a mask")
    for scaled, mask in (add.args, add.args[::-1]):
        mul = _uncast(ir.producer(scaled, var2val), var2val)
        if ir.op_name(mul) == "relax.multiply" and isinstance(mul.args[1], ir.Const) \
                and ir.scalar(mul.args[1]) is not None:
            product = ir.producer(mul.args[0], var2val)
            if product is not None and ir.product_operands(product) is not None:
                return product, ir.scalar(mul.args[1]), mask
    raise ir.NoMatch("a set's scores are not a product times a scalar constant, plus a mask")


def _uncast(call, var2val):
    """``call``, or what it casts (a float16 model adds a float32 mask to scores cast to float32, then casts back)."""
    while ir.op_name(call) == "relax.astype":
        call = ir.producer(call.args[0], var2val)
    return call


def _key_set(product, q, var2val):
    """The keys a product reads as [.., n, D] (looking through the transpose a matmul takes)."""
    left, right = ir.product_operands(product)
    if not left.same_as(q):
        raise ir.NoMatch("the key sets are not all scored against one q")
    if ir.op_name(product) == "relax.matmul":
        t = ir.producer(right, var2val)
        nd = ir.ndim(right)
        if ir.op_name(t) != "relax.permute_dims" or ir.axes(t) != list(range(nd - 2)) + [nd - 1, nd - 2]:
            raise ir.NoMatch("a key set is not transposed for its product")
        return t.args[0]
    return right  # einsum(q [.., L, bs, D], K [B, H, n, D]): one set for every block


def _match(probs_var, var2val, consumers, outputs) -> ConcatKeySite:
    probs = var2val[probs_var]
    nd = ir.ndim(probs)
    if nd < 5 or int(probs.attrs.axis) not in (-1, nd - 1):
        raise ir.NoMatch("not a softmax over the last axis of [B, H, blocks.., rows, keys] scores")
    cat = ir.producer(probs.args[0], var2val)
    if ir.op_name(cat) != "relax.concat" or int(cat.attrs.axis) not in (-1, nd - 1):
        raise ir.NoMatch("the softmax input is not a concat of key sets' scores")
    parts = list(cat.args[0].fields)
    scored = [_scaled_product(p, var2val) for p in parts]
    q = ir.product_operands(scored[0][0])[0]
    keys = [_key_set(prod, q, var2val) for prod, _, _ in scored]
    scales = {scale for _, scale, _ in scored}
    if len(scales) != 1:
        raise ir.NoMatch(f"the key sets are scaled differently ({sorted(scales)})")
    lead, (rows, d) = ir.shape(q)[:-2], ir.shape(q)[-2:]
    if not all(isinstance(x, tvm.tirx.IntImm) for x in ir.shape(probs)[1:]):
        raise ir.NoMatch("heads, blocks, rows or keys are not static")
    widths = [int(ir.shape(p)[-1]) for p in parts]
    for k, w, (_, _, mask) in zip(keys, widths, scored):
        if int(ir.shape(k)[-2]) != w or not ir.same_dim(ir.shape(k)[-1], d):
            raise ir.NoMatch("a key set's length or head dim does not match its scores")
        ms = ir.shape(mask)
        if ms is None or len(ms) > nd or not all(ir.is_one(a) or ir.same_dim(a, c)
                                                 for a, c in zip(ms[::-1], (ir.shape(parts[0])[:-1] + [w])[::-1])):
            raise ir.NoMatch("a mask does not broadcast to its set's scores")
    # the probabilities: sliced back into the sets, in order, each slice times its value set, summed
    bounds, start = [], 0
    for w in widths:
        bounds.append((start, start + w))
        start += w
    slices = {}
    for user in consumers.get(probs_var, []):
        call = var2val[user]
        if ir.op_name(call) != "relax.strided_slice" or _ints(call.args[1]) not in ([nd - 1], [-1]) \
                or len(call.args) > 4 and _ints(call.args[4]) not in ([1], []):
            raise ir.NoMatch("the probabilities have users other than slices over the keys")
        begin, end = _ints(call.args[2])[0], _ints(call.args[3])[0]
        begin, end = begin + start if begin < 0 else begin, min(end + start if end < 0 else end, start)
        slices[(begin, end)] = user
    if sorted(slices) != bounds:
        raise ir.NoMatch(f"the probability slices {sorted(slices)} are not the key sets {bounds}")
    values, products = [], []
    for bound in bounds:
        users = consumers.get(slices[bound], [])
        call = var2val[users[0]] if len(users) == 1 else None
        ops = ir.product_operands(call) if call is not None else None
        if ops is None or not ops[0].same_as(slices[bound]):
            raise ir.NoMatch("a probability slice does not feed one product with values")
        values.append(ops[1])
        products.append(users[0])
    dv = ir.shape(values[0])[-1]
    if not all(int(ir.shape(v)[-2]) == w and ir.same_dim(ir.shape(v)[-1], dv) for v, w in zip(values, widths)):
        raise ir.NoMatch("a value set's length does not match its keys'")
    root = _sum_of(products, var2val, consumers)
    inner = {probs_var, *slices.values(), *products}
    if any(x in outputs for x in inner):
        raise ir.NoMatch("an intermediate (probabilities or a partial output) is a function output")
    if not isinstance(rows, tvm.tirx.IntImm):
        raise ir.NoMatch("the rows per block are not static")
    heads = math.prod(int(x) for x in lead[1:])
    spec = AttentionSpec(num_heads=heads, num_kv_heads=heads, head_dim=int(d), value_dim=int(dv),
                         scale=scales.pop(), dtype=ir.dtype(q), bias=(False, False, False), q_len=int(rows))
    return ConcatKeySite(spec, q, keys, values, [m for _, _, m in scored], lead, root)


def _ints(tup) -> list[int]:
    return [int(f.value) for f in tup.fields]


def _sum_of(products, var2val, consumers):
    """The add that sums exactly ``products`` through a tree of adds that nothing else reads, else NoMatch."""
    terms = list(products)
    while len(terms) > 1:
        for x in terms:
            users = consumers.get(x, [])
            if len(users) != 1 or ir.op_name(var2val[users[0]]) != "relax.add":
                raise ir.NoMatch("the value products are not summed by adds alone")
            a, b = var2val[users[0]].args
            if any(a.same_as(t) for t in terms) and any(b.same_as(t) for t in terms) and not a.same_as(b):
                terms = [t for t in terms if not (t.same_as(a) or t.same_as(b))] + [users[0]]
                break
        else:
            raise ir.NoMatch("the value products are not summed by adds alone")
    return terms[0]
