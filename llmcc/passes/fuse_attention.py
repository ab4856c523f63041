"""fuse_attention: rewrite each exported attention subgraph into one call of a flash attention kernel.

transformers' sdpa attention exports as MatMul(q, k^T) with its scale (a scalar on the scores, or its square root
on both q and k^T), Add(mask), Softmax, a NaN guard Where(IsNaN(p), 0, p) and MatMul(p, v), all in BNSH layout
(batch, heads, sequence, head dim). This pass finds every softmax that feeds such a value matmul (a *site*), checks
it (guards below) and replaces the site's output with ``R.call_tir`` of a flash kernel
(``llmcc.kernels.flash_attention``) built for the site's ``AttentionSpec``: its kind (causal, sliding window from
the mask's structure; padding or any additive mask as a bias tensor; GQA groups; a KV cache when the key length
differs from the query length), the product of the scale constants, and where q, k and v already sit in memory:
the kernel reads q and v before their BSNH -> BNSH permutes, k before torch's reshape/transpose chain, and the
un-repeated k/v heads under HF's repeat_kv (expand_dims, broadcast_to, reshape), so those copies disappear too.
Sites of one spec share a kernel. The seq x seq scores never exist in memory. BigBird's block-sparse attention
exports as several such sites over key blocks its own code gathered (global, window and random blocks): each is
fused as it stands (kind "block_sparse"), so the work follows the gathered blocks, not seq^2. A site whose mask is
a constant with wholly hidden tiles (a block-sparse pattern kept as a buffer; static shapes) is kind "block_sparse"
too: the kernel gets the mask's tile layout in CSR form (two int32 constants, ``kernels.block_layout``) and walks only
those tiles; on CUDA the Triton block-sparse kernel does, with the mask dropped, when the mask is uniform in blocks.
HF Longformer has two softmaxes that match no sdpa pattern (``_describe_longformer``): its global tokens' own queries
(3-D scores over all keys, masked by a scatter and a where) fuse as a dense site with an additive bias (kind
"global", ``_GlobalQuerySite``); its local band (chunked q @ k^T, a diagonal mask, global-key scores concatenated in
front, kind "sliding_window+global") is reported unfused with the reason.

Runs in the graph phase on the imported module, before lift_weights. Every site is reported in ``self.sites``:
{"site", "kind", "fused", "reason", "kernel"}.

Guards (a site that fails one stays as it is, with the reason recorded):
  - softmax on the last axis; scores, q, k^T, v all 4-D, float, same dtype; q and k^T are activations (not
    constants: a softmax over a linear layer's output is not attention);
  - the scale factors are scalar constants; the mask is *added* (a multiplicative mask does not match) and its
    shape broadcasts to [B, H, Sq, Skv] with the keys' length in full;
  - the NaN guard, when present, writes 0.0 (dropping it is exact: HF's mask is finite, so softmax gives no NaN);
  - the scores, probabilities and value-matmul output have no user outside the site (attention weights returned
    as an output keep the site unfused);
The kernel is the target's: ``flash_attention_cpu`` (LLVM) or ``flash_attention_cuda``; on CUDA a sliding-window site
whose mask is exactly its causal window (where(visible, 0, -inf-like) computed from positions and shapes alone, no
model input) runs the Triton sliding-window kernel embedded as a cubin (report kernel "triton"; the kernel computes
the mask itself, so the mask tensor is not read). Any other window site keeps ``flash_attention_cuda`` and its report
entry's reason says why not Triton.
Causality and the window are read from the ops that build the mask (compares of position ranges, with the window as
the constant offset) and let the kernel skip hidden tiles; the mask tensor is still added. A misread would hide keys
the mask shows: the compiled model's check against onnxruntime fails then, loudly.

Before::

    lv1 = R.multiply(q, R.const(0.42))                  # q: [B, H, S, D] = permute_dims(q_bsnh, [0, 2, 1, 3])
    lv2 = R.multiply(k_t, R.const(0.42))                # k_t: [B, H, D, S]
    lv3 = R.matmul(lv1, lv2)
    lv4 = R.add(lv3, mask)                              # mask: [B, 1, S, S], 0 or -3.4e38
    lv5 = R.nn.softmax(lv4, axis=-1)
    lv6 = R.where(R.isnan(lv5), R.const(0.0), lv5)
    lv7 = R.matmul(lv6, v)                              # v: [B, H, S, D]
    out = R.permute_dims(lv7, axes=[0, 2, 1, 3])

After::

    out = R.call_tir(flash_attention_causal_mask, (q_bsnh, k_t, v, mask), R.Tensor((B, S, H, D)))
    # AttentionSpec(scale=0.1767767, causal=True, bias=(False, True, False), q_layout="bsnd", k_layout="bnds", ...)
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm.sym.analyzer import Analyzer
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from llmcc.kernels import block_layout
from llmcc.kernels.flash_attention import AttentionSpec, cpu_tiles, flash_attention_kernel
from llmcc.passes import LlmccPass

_Const = tvm.ir.GenericConst  # TVM 0.27: relax constants are tvm.ir.GenericConst(.value, .ty)

# ---------------------------------------------------------------------------------------------------------------------
# Patterns: what an exported attention site looks like. Guards check what a pattern cannot say.


def _sdpa_pattern(with_output_permute: bool):
    """Dense scaled-dot-product attention in BNSH, as torch's sdpa exports it; every scale and the mask optional."""
    p = {name: wildcard() for name in ("q", "k_t", "v", "mask")}
    p.update({name: is_const() for name in ("q_scale", "k_scale", "score_scale", "nan_fill")})
    q_scaled = is_op("relax.multiply")(p["q"], p["q_scale"]) | p["q"]
    k_scaled = is_op("relax.multiply")(p["k_t"], p["k_scale"]) | p["k_t"]
    p["scores"] = is_op("relax.matmul")(q_scaled, k_scaled)
    p["scaled"] = (is_op("relax.multiply")(p["scores"], p["score_scale"])
                   | is_op("relax.divide")(p["scores"], p["score_scale"]) | p["scores"])
    p["masked"] = is_op("relax.add")(p["scaled"], p["mask"]) | p["scaled"]
    p["probs"] = is_op("relax.nn.softmax")(p["masked"])
    p["guarded"] = is_op("relax.where")(is_op("relax.isnan")(p["probs"]), p["nan_fill"], p["probs"]) | p["probs"]
    p["out_bnsh"] = is_op("relax.matmul")(p["guarded"], p["v"])
    p["root"] = is_op("relax.permute_dims")(p["out_bnsh"]) if with_output_permute else p["out_bnsh"]
    return p


# Tried in order: with the trailing BNSH -> BSNH permute first, so the fused op writes the consumer's layout.
_PATTERNS = (("sdpa_bsnh_out", True), ("sdpa_bnsh_out", False))

_LAYOUT_OPS = {"relax.permute_dims", "relax.reshape", "relax.multiply", "relax.add", "relax.subtract",
               "relax.concat", "relax.strided_slice", "relax.negative", "relax.expand_dims", "relax.broadcast_to",
               "relax.squeeze", "relax.astype"}
_GATHER_OPS = {"relax.take", "relax.gather_elements", "relax.gather_nd"}
_COMPARE_OPS = {"relax.less", "relax.less_equal", "relax.greater", "relax.greater_equal"}


# ---------------------------------------------------------------------------------------------------------------------
# Small IR helpers.


def _op_name(expr) -> str | None:
    return expr.op.name if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) else None


def _ty(expr):
    ty = getattr(expr, "ty", None)
    return ty if isinstance(ty, relax.TensorType) else None


def _shape(expr):
    ty = _ty(expr)
    return list(ty.shape.values) if ty is not None and ty.shape is not None else None


def _dtype(expr) -> str:
    ty = _ty(expr)
    return str(ty.dtype) if ty is not None else ""


def _ndim(expr) -> int:
    ty = _ty(expr)
    return ty.ndim if ty is not None else -1


def _scalar(const) -> float | None:
    """The value of a constant with one element, else None."""
    arr = const.value.numpy()
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


def _same_dim(a, b) -> bool:
    return Analyzer().can_prove_equal(a, b)


def _is_one(d) -> bool:
    return isinstance(d, (int, tvm.tirx.IntImm)) and int(d) == 1


def _producer(expr, var2val):
    """The call that computes ``expr`` (looking through variable bindings), or None."""
    seen = 0
    while isinstance(expr, relax.Var) and expr in var2val and seen < 8:
        expr, seen = var2val[expr], seen + 1
    return expr if isinstance(expr, relax.Call) else None


def _operand_vars(expr) -> list:
    """The variables ``expr`` uses directly: a call's arguments, a tuple's fields (nested), a tuple item's tuple."""
    if isinstance(expr, relax.Var):
        return [expr]
    if isinstance(expr, relax.Call):
        return [v for a in expr.args for v in _operand_vars(a)]
    if isinstance(expr, relax.Tuple):
        return [v for f in expr.fields for v in _operand_vars(f)]
    if isinstance(expr, relax.TupleGetItem):
        return _operand_vars(expr.tuple_value)
    return []


def _axes(call) -> list[int]:
    return [int(a) for a in call.attrs.axes]


def _upstream(expr, var2val, *, through=None, limit=400):
    """Calls reachable from ``expr`` through its arguments (only through ops in ``through`` when given)."""
    out, stack, seen = [], [expr], set()
    while stack and len(out) < limit:
        e = stack.pop()
        call = _producer(e, var2val)
        if call is None or call in seen:
            continue
        seen.add(call)
        out.append(call)
        if through is not None and _op_name(call) not in through:
            continue
        for a in call.args:
            if isinstance(a, relax.Tuple):
                stack.extend(a.fields)
            else:
                stack.append(a)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Matching: find the sites and decide, per site, whether and how to fuse it.


class _Site:
    def __init__(self, root_var, matched: dict, pattern: str):
        self.root_var, self.m, self.pattern = root_var, matched, pattern
        self.kind, self.reason, self.scale, self.window, self.causal = "dense", "", 1.0, None, False
        self.operands: dict = {}
        self.kv_heads = 0
        self.spec: AttentionSpec | None = None
        self.drop_mask = False  # the kernel computes the mask itself (the causal window): the tensor is not read
        self.layout = None  # (row_ptr, col_idx) int32 arrays: the tiles of a constant mask the kernel walks
        self.note = ""  # for a fused site: why it kept the TIR kernel where the Triton one was considered


def _outputs(func) -> set:
    """Variables that leave their dataflow block (or the function): a site may not swallow them."""
    out = set()
    for block in func.body.blocks if isinstance(func.body, relax.SeqExpr) else []:
        for binding in block.bindings:
            if not isinstance(binding.var, relax.DataflowVar):
                out.add(binding.var)
    return out


def _mask_features(mask, var2val, params) -> tuple[list[str], int | None]:
    """What HF's mask builder put in the mask: causal, padding (from a user mask input), a sliding window."""
    feats, window = [], None
    calls = _upstream(mask, var2val)
    for call in calls:
        name = _op_name(call)
        if name in _COMPARE_OPS and all(not isinstance(a, _Const) for a in call.args):
            offsets = []
            for a in call.args:
                p = _producer(a, var2val)
                if _op_name(p) in ("relax.subtract", "relax.add") and isinstance(p.args[1], _Const):
                    offsets.append(abs(int(p.args[1].value.numpy().reshape(-1)[0])))
            if offsets:
                window = max(offsets)
            elif "causal" not in feats:
                feats.append("causal")
        if name == "relax.astype" and isinstance(call.args[0], relax.Var) and call.args[0] in params:
            feats.append("padding_mask")
    if any(isinstance(a, relax.Var) and a in params and "float" in _dtype(a)
           for c in calls for a in c.args):
        feats.append("padding_mask")
    return sorted(set(feats), key=feats.index), window


def _is_gqa(k_or_v, var2val) -> bool:
    """k/v heads repeated: reshape(broadcast_to(expand_dims(x))) merging a [B, Hkv, rep, S, D] tensor."""
    for call in _upstream(k_or_v, var2val, through={"relax.reshape", "relax.permute_dims", "relax.multiply"},
                          limit=12):
        if _op_name(call) == "relax.broadcast_to" and _ndim(call) == 5:
            return True
    return False


def _is_block_sparse(exprs, var2val) -> bool:
    """q/k/v gathered from activation blocks (BigBird's block-sparse attention), not projected tokens."""
    for e in exprs:
        for call in _upstream(e, var2val, through=_LAYOUT_OPS | _GATHER_OPS, limit=64):
            if _op_name(call) in _GATHER_OPS and not isinstance(call.args[0], _Const) \
                    and "float" in _dtype(call):
                return True
    return False


def _check(site: _Site, var2val, consumers, outputs, params) -> str:
    """Guards: '' when the site may be fused, else why not. Fills site.kind/scale on the way."""
    m = site.m
    q, k_t, v, probs = m["q"], m["k_t"], m["v"], m["probs"]
    scores = m["scores"]
    if _ndim(probs) < 0:
        return "softmax input has no known rank"
    axis = int(probs.attrs.axis)
    if axis not in (-1, _ndim(probs) - 1):
        return f"softmax on axis {axis}, not the last (key) axis"
    if not all(_ndim(x) == 4 for x in (q, k_t, v, scores)):
        return "scores are not a 4-D [B, H, Sq, Skv] q @ k^T (block-sparse or 3-D attention)"
    if any(isinstance(x, _Const) or isinstance(var2val.get(x), _Const) for x in (q, k_t, v)):
        return "an operand of the score or value matmul is a constant: softmax over a linear layer, not attention"
    dtypes = {_dtype(x) for x in (q, k_t, v, scores)}
    if len(dtypes) != 1 or "float" not in next(iter(dtypes)):
        return f"q/k/v dtypes {sorted(dtypes)} differ or are not float"
    qs, ks, vs = _shape(q), _shape(k_t), _shape(v)
    if not (_same_dim(qs[3], ks[2]) and _same_dim(ks[3], vs[2]) and _same_dim(qs[1], ks[1])
            and _same_dim(qs[1], vs[1])):
        return "q [B,H,Sq,D], k^T [B,H,D,Skv], v [B,H,Skv,Dv] do not line up (not BNSH layout)"
    if site.pattern == "sdpa_bsnh_out" and _axes(m["root"]) != [0, 2, 1, 3]:
        return "output permute is not BNSH -> BSNH"
    scale = 1.0
    for name, invert in (("q_scale", False), ("k_scale", False), ("score_scale", None)):
        c = m.get(name)
        if c is None:
            continue
        val = _scalar(c)
        if val is None:
            return f"{name} is not a scalar constant"
        if name == "score_scale" and _op_name(m["scaled"]) == "relax.divide":
            val = 1.0 / val
        scale *= val
    site.scale = scale
    fill = m.get("nan_fill")
    if fill is not None and _scalar(fill) != 0.0:
        return "the NaN guard writes a value other than 0"
    mask = m.get("mask")
    feats = []
    if mask is not None:
        ms = _shape(mask)
        if ms is None or len(ms) > 4 or _dtype(mask) != _dtype(scores):
            return "the additive mask is not a float tensor of rank <= 4 with the scores' dtype"
        ss = _shape(scores)[4 - len(ms):]
        if not all(_is_one(a) or _same_dim(a, b) for a, b in zip(ms, ss)):
            return "the mask does not broadcast to [B, H, Sq, Skv]"
        feats, site.window = _mask_features(mask, var2val, params)
    inner = ["scores", "scaled", "masked", "probs", "guarded"] + (["out_bnsh"] if site.pattern == "sdpa_bsnh_out"
                                                                   else [])
    owned = [m[n] for n in inner if m.get(n) is not None]
    inner_vars = {x for x in var2val if any(var2val[x].same_as(o) for o in owned)}
    site_vars = inner_vars | {site.root_var} | {u for x in inner_vars for u in consumers.get(x, [])
                                                if _op_name(var2val[u]) == "relax.isnan"}
    if any(u not in site_vars for x in inner_vars for u in consumers.get(x, [])) or \
            any(x in outputs for x in inner_vars):
        return "an intermediate (scores or probabilities) is used outside the attention"
    if _is_gqa(k_t, var2val) or _is_gqa(v, var2val):
        feats.append("gqa")
    if not _same_dim(qs[2], vs[2]):
        feats.append("kv_cache")
    site.causal = "causal" in feats
    site.kind = "+".join(feats) or "dense"
    if site.window is not None:
        site.kind = "+".join(["sliding_window"] + [f for f in feats if f != "causal"])
    if _is_block_sparse([q, k_t, v], var2val):
        site.kind = "block_sparse"
    _plan_operands(site, var2val)
    site.spec = _spec(site)
    return site.spec.check() or ""


# What HF's mask builder uses to compute a causal sliding-window mask from positions alone.
_WINDOW_MASK_OPS = {"relax.add", "relax.subtract", "relax.arange", "relax.astype", "relax.broadcast_to",
                    "relax.concat", "relax.cumsum", "relax.equal", "relax.not_equal", "relax.expand_dims",
                    "relax.gather_nd", "relax.greater", "relax.greater_equal", "relax.less", "relax.less_equal",
                    "relax.logical_and", "relax.logical_or", "relax.logical_not", "relax.shape_of",
                    "relax.shape_to_tensor", "relax.strided_slice", "relax.where", "relax.reshape",
                    "relax.permute_dims", "relax.squeeze"}


def _not_window_mask(site: _Site, var2val, params) -> str:
    """'' when the site's additive mask is exactly its causal window: where(visible, 0, <= -1e30) with ``visible``
    computed from shapes and constants alone (position compares; no model input, so no padding); else why not."""
    if not site.causal:
        return "the mask is not read as causal"
    where = _producer(site.m.get("mask"), var2val)
    if _op_name(where) != "relax.where" or not all(isinstance(a, _Const) for a in where.args[1:]):
        return "the mask is not where(visible, 0, -inf-like) of constants"
    shown, hidden = _scalar(where.args[1]), _scalar(where.args[2])
    if shown != 0.0 or hidden is None or hidden > -1e30:
        return f"the mask adds {shown} / {hidden}, not 0 / -inf-like"
    if where.args[0] in params:
        return "the mask's condition is a model input"
    stack, seen = [where.args[0]], set()
    while stack:
        call = _producer(stack.pop(), var2val)
        if call is None or call in seen:
            continue
        seen.add(call)
        if len(seen) > 400:
            return "the mask's computation is too large to check"
        name = _op_name(call)
        if name not in _WINDOW_MASK_OPS:
            return f"the mask uses {name or 'a non-operator call'}, not only position compares"
        if name == "relax.shape_of":
            continue  # shapes only: the data behind it does not reach the mask
        for a in _operand_vars(call):
            if a in params:
                return f"the mask reads model input {a.name_hint} (a padding or custom mask)"
            stack.append(a)
    return ""


def _describe_unmatched(probs_var, probs, var2val) -> tuple[str, str]:
    """kind and reason for a softmax that feeds a matmul but matched no attention pattern."""
    if int(probs.attrs.axis) not in (-1, _ndim(probs) - 1):
        return "unknown", f"softmax on axis {int(probs.attrs.axis)}, not the last (key) axis"
    if _ndim(probs) == 5:
        return "block_sparse", "5-D block-sparse scores [B, H, blocks, q, k]: not one dense R.nn.attention"
    inner = _producer(probs.args[0], var2val)
    if _op_name(inner) == "relax.add":
        inner = _producer(inner.args[0], var2val)
    if _op_name(inner) == "relax.multiply" and not isinstance(inner.args[1], _Const):
        return "unknown", "scores are multiplied by a tensor (multiplicative mask), not an additive mask"
    return "unknown", "the softmax input is not (scaled) q @ k^T plus an additive mask"


def _describe_longformer(probs, var2val) -> tuple[str, bool, str] | None:
    """(kind, fused, reason) for HF Longformer's two softmax sites, which match no sdpa pattern; None for any other.

    Longformer computes each token's scores against its 2w+1 neighbours by chunked q @ k^T matmuls, rolls them into
    a [B, S, H, 2w+1] band with a diagonal mask (scatters into chunk tensors), concatenates the scores against the
    global keys in front ([B, S, H, G + 2w+1]), takes one softmax, then multiplies slices of the probabilities with
    chunked values. The global tokens' own queries attend to all keys separately: [B*H, G, S] scores masked with
    where(padding, min, .) after scattering each row's global slots. G (the number of global tokens) is a ReduceMax
    of the mask at run time."""
    scores = _producer(probs.args[0], var2val)
    shape = _shape(probs)
    if shape is None or scores is None:
        return None
    if len(shape) == 4 and _op_name(scores) in ("relax.concat", "relax.add", "relax.scatter_nd"):
        parts = list(scores.args[0].fields) if _op_name(scores) == "relax.concat" \
            and isinstance(scores.args[0], relax.Tuple) else [probs.args[0]]
        band = _shape(parts[-1])
        width = band[-1] if band is not None and len(band) == 4 else None
        if not isinstance(width, tvm.tirx.IntImm) or int(width) % 2 != 1 or not _same_dim(band[1], shape[1]) \
                or isinstance(shape[1], tvm.tirx.IntImm) and int(width) >= int(shape[1]):
            return None
        built = {_op_name(c) for c in _upstream(parts[-1], var2val, limit=200)}
        if not {"relax.scatter_nd"} & built or not {"relax.matmul", "relax.call_tir"} & built:
            return None
        window = (int(width) - 1) // 2
        has_global = len(parts) > 1
        kind = "sliding_window+global" if has_global else "sliding_window"
        what = f"[B, S, H, {'G + ' if has_global else ''}{int(width)}]"
        return kind, False, (f"chunked sliding-window scores (HF Longformer, {window} keys each side"
                             f"{', global keys concatenated in front' if has_global else ''}): a {what} band built "
                             "by chunked matmuls and diagonal scatters, not one q @ k^T; no kernel reads this layout")
    if len(shape) == 3:
        chain = _upstream(probs.args[0], var2val, through={"relax.reshape", "relax.where", "relax.permute_dims"},
                          limit=8)
        if any(_op_name(c) == "relax.scatter_nd" for c in chain) and \
                any(_op_name(c) == "relax.where" for c in chain):
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


class _GlobalQuerySite:
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
        d, dv = _shape(q3)[2], _shape(v3)[2]
        q = bb.emit(relax.op.reshape(q3, relax.ShapeExpr([b, h, g, d])))
        k_t = bb.emit(relax.op.reshape(k_t3, relax.ShapeExpr([b, h, d, s])))
        v = bb.emit(relax.op.reshape(v3, relax.ShapeExpr([b, h, s, dv])))
        scores, slots, updates = (visit(a) for a in self.scatter.args)
        big = relax.const(_REPLACED_SCORE_BIAS, _dtype(scores))
        replaced = bb.emit(relax.op.scatter_nd(bb.emit(relax.op.zeros_like(scores)), slots,
                                               bb.emit(relax.op.full_like(updates, big)), "update"))
        bias = bb.emit(relax.op.where(visit(self.cond), big, bb.emit(relax.op.permute_dims(replaced, [0, 2, 1, 3]))))
        out = bb.emit(relax.call_tir(rewriter.kernel(self.spec), [q, k_t, v, bias],
                                     relax.TensorType([b, h, g, dv], _dtype(scores))))
        bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(relax.op.reshape(out, _shape(binding.var)))))


def _global_query_site(probs_var, var2val, consumers, outputs) -> tuple[_GlobalQuerySite | None, str]:
    """(site, '') when ``probs_var`` is the softmax of HF Longformer's global-token queries (see _GlobalQuerySite)
    and every guard holds, else (None, why not)."""
    probs = var2val[probs_var]
    chain = [probs_var]

    def step(expr, op, what):
        call = _producer(expr, var2val)
        if _op_name(call) != op:
            raise _NoMatch(f"{what} is not {op}")
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
    except _NoMatch as exc:
        return None, f"not HF Longformer's global-query chain: {exc}"
    if _axes(back) != [0, 2, 1, 3] or _axes(front) != [0, 2, 1, 3]:
        return None, "the permutes around the scatter are not [0, 2, 1, 3]"
    if not isinstance(fill, _Const) or _scalar(fill) is None or _scalar(fill) > _REPLACED_SCORE_MAX:
        return None, f"the padding fill is not a scalar constant <= {_REPLACED_SCORE_MAX:g}"
    bcast = _producer(scatter.args[2], var2val)
    while _op_name(bcast) == "relax.reshape":
        bcast = _producer(bcast.args[0], var2val)
    if _op_name(bcast) != "relax.broadcast_to" or not isinstance(bcast.args[0], _Const) \
            or _scalar(bcast.args[0]) != _scalar(fill):
        return None, "the scatter does not write the padding fill's constant everywhere"
    q3, k_t3 = scores3.args
    uses = [u for u in consumers.get(probs_var, [])]
    if len(uses) != 1 or _op_name(var2val[uses[0]]) != "relax.astype":
        return None, "the probabilities have users other than one cast"
    cast = uses[0]
    matmuls = consumers.get(cast, [])
    if len(matmuls) != 1 or _op_name(var2val[matmuls[0]]) != "relax.matmul" \
            or not var2val[matmuls[0]].args[0].same_as(cast):
        return None, "the probabilities do not feed one value matmul"
    root = matmuls[0]
    v3 = var2val[root].args[1]
    if not all(_ndim(x) == 3 for x in (q3, k_t3, v3)) or _ndim(scores4) != 4:
        return None, "q, k^T, v are not 3-D [B*H, ., .] with 4-D [B, H, G, S] scores"
    if len({_dtype(x) for x in (q3, k_t3, v3, scores3)}) != 1 or "float" not in _dtype(q3) \
            or _dtype(cast) != _dtype(probs):
        return None, "q/k/v dtypes differ or are not float, or the cast changes the dtype"
    b, h, g, s = _shape(scores4)
    qs, ks, vs = _shape(q3), _shape(k_t3), _shape(v3)
    if not (isinstance(h, tvm.tirx.IntImm) and isinstance(qs[2], tvm.tirx.IntImm)
            and isinstance(vs[2], tvm.tirx.IntImm)):
        return None, "heads or head dims are not static"
    if not (_same_dim(qs[0], b * h) and _same_dim(qs[1], g) and _same_dim(ks[1], qs[2]) and _same_dim(ks[2], s)
            and _same_dim(vs[1], s) and _same_dim(ks[0], qs[0]) and _same_dim(vs[0], qs[0])):
        return None, "q [B*H, G, D], k^T [B*H, D, S], v [B*H, S, Dv] do not line up with the [B, H, G, S] scores"
    cs = _shape(cond)
    if cs is None or len(cs) > 4 or not all(_is_one(a) or _same_dim(a, c) for a, c in zip(cs, [b, h, g, s][-len(cs):])):
        return None, "the padding condition does not broadcast to [B, H, G, S]"
    inner = set(chain) | {cast}
    # The scatter's indices are computed from shape_of(scores): a shape read, which the rewrite answers statically.
    shape_reads = {u for x in inner for u in consumers.get(x, []) if _op_name(var2val[u]) == "relax.shape_of"}
    if any(u not in inner | {root} | shape_reads for x in inner for u in consumers.get(x, [])) \
            or any(x in outputs for x in inner):
        return None, "an intermediate (scores or probabilities) is used outside the attention"
    if any(_shape(var2val[u].args[0]) is None for u in shape_reads):
        return None, "a shape read of the scores has no static shape to answer with"
    spec = AttentionSpec(num_heads=int(h), num_kv_heads=int(h), head_dim=int(qs[2]), value_dim=int(vs[2]),
                         scale=1.0, dtype=_dtype(q3), bias=(_is_one(b), False, False), k_layout="bnds")
    site = _GlobalQuerySite(spec, {"q": q3, "k_t": k_t3, "v": v3}, cond, fill, scatter, (b, h, g, s))
    site.root_var = root
    site.shape_reads = {u: relax.ShapeExpr(_shape(var2val[u].args[0])) for u in shape_reads}
    return site, ""


class _NoMatch(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# Operands: where the kernel reads q, k and v from, without the copies the exported graph makes on the way.


def _peel_repeat(x, var2val):
    """(kv, groups): x [B, H, S, D] = reshape(broadcast_to(expand_dims(kv, 2), [B, Hkv, G, S, D])) is kv repeated G
    times per head (HF's repeat_kv); else (x, 1)."""
    r = _producer(x, var2val)
    if _op_name(r) != "relax.reshape":
        return x, 1
    bc = _producer(r.args[0], var2val)
    if _op_name(bc) != "relax.broadcast_to" or _ndim(bc) != 5:
        return x, 1
    ex = _producer(bc.args[0], var2val)
    if _op_name(ex) != "relax.expand_dims" or [int(a) for a in ex.attrs.axis] != [2] or _ndim(ex.args[0]) != 4:
        return x, 1
    kv, bs, xs = ex.args[0], _shape(bc), _shape(x)
    groups = bs[2]
    if not isinstance(groups, tvm.tirx.IntImm) or not _same_dim(xs[1], bs[1] * groups):
        return x, 1
    return kv, int(groups)


def _peel_permute(x, var2val):
    """(expr, layout) of a BNSH tensor: its BSNH source when x is permute_dims(src, [0, 2, 1, 3])."""
    p = _producer(x, var2val)
    if _op_name(p) == "relax.permute_dims" and _axes(p) == [0, 2, 1, 3]:
        return p.args[0], "bsnd"
    return x, "bnsd"


def _k_operand(k_t, var2val):
    """(expr, layout) of the keys behind k^T [B, H, D, S]: peels torch's reshape(transpose(reshape(k))) and permutes;
    k^T itself ("bnds") when nothing peels."""
    p = _producer(k_t, var2val)
    name = _op_name(p)
    if name == "relax.permute_dims" and _axes(p) == [0, 2, 3, 1]:
        return p.args[0], "bsnd"
    if name == "relax.permute_dims" and _axes(p) == [0, 1, 3, 2]:
        return p.args[0], "bnsd"
    if name == "relax.reshape":
        t = _producer(p.args[0], var2val)
        if _op_name(t) == "relax.permute_dims" and _axes(t) == [0, 2, 1] and _ndim(t) == 3:
            r = _producer(t.args[0], var2val)
            if _op_name(r) == "relax.reshape" and _ndim(r.args[0]) == 4:
                k = r.args[0]  # [B, H, S, D] reshaped to [B*H, S, D], transposed, reshaped back
                ks, kts = _shape(k), _shape(k_t)
                if all(_same_dim(a, b) for a, b in zip(ks, [kts[0], kts[1], kts[3], kts[2]])):
                    return k, "bnsd"
    return k_t, "bnds"


def _plan_operands(site: _Site, var2val) -> None:
    """Fill site.operands {"q", "k", "v": (expr, layout)} and site.kv_heads."""
    m = site.m
    q = _peel_permute(m["q"], var2val)
    k, k_layout = _k_operand(m["k_t"], var2val)
    v, groups_v = _peel_repeat(m["v"], var2val)
    if k_layout == "bnsd":
        k, groups_k = _peel_repeat(k, var2val)
    else:
        groups_k = 1
    heads = int(_shape(m["q"])[1])
    if groups_k != groups_v:  # keep one repeat rather than none: both operands must have the same kv heads
        k, k_layout = _k_operand(m["k_t"], var2val)
        v, groups_k = m["v"], 1
    k_op = _peel_permute(k, var2val) if k_layout == "bnsd" else (k, k_layout)
    site.operands = {"q": q, "k": k_op, "v": _peel_permute(v, var2val)}
    site.kv_heads = heads // groups_k


def _spec(site: _Site) -> AttentionSpec:
    m = site.m
    qs, vs = _shape(m["q"]), _shape(m["v"])
    bias = None
    if m.get("mask") is not None:
        ms = [1] * (4 - _ndim(m["mask"])) + list(_shape(m["mask"]))
        bias = tuple(_is_one(d) for d in ms[:3])
    q_len = int(qs[2]) if isinstance(qs[2], tvm.tirx.IntImm) else None
    return AttentionSpec(num_heads=int(qs[1]), num_kv_heads=site.kv_heads, head_dim=int(qs[3]),
                         value_dim=int(vs[3]), scale=site.scale, dtype=_dtype(m["scores"]),
                         causal=site.causal, window=site.window, bias=bias, q_layout=site.operands["q"][1],
                         k_layout=site.operands["k"][1], v_layout=site.operands["v"][1],
                         out_layout="bsnd" if site.pattern == "sdpa_bsnh_out" else "bnsd", q_len=q_len)


# ---------------------------------------------------------------------------------------------------------------------
# Rewriting: each accepted site's root binding becomes one call of its flash kernel.


@relax.expr_functor.mutator
class _SiteRewriter(relax.PyExprMutator):
    def __init__(self, plans: dict, kernel_for, mod=None):
        super().__init__(mod)
        self.plans, self.kernel_for = plans, kernel_for
        self.kernels: dict = {}  # spec -> GlobalVar: sites of one shape share a kernel

    def visit_var_binding_(self, binding):
        site = self.plans.get(binding.var)
        if site is None:
            super().visit_var_binding_(binding)
            return
        if isinstance(site, _GlobalQuerySite):
            site.emit(self, binding)
            return
        if isinstance(site, relax.ShapeExpr):  # a shape read of a fused site's intermediate: its static shape
            self.builder_.emit_normalized(relax.VarBinding(binding.var, site))
            return
        spec = site.spec
        args = [self.visit_expr(site.operands[n][0]) for n in ("q", "k", "v")]
        bias = None if site.drop_mask else site.m.get("mask")
        if bias is not None:
            bias = self.visit_expr(bias)
            while _ndim(bias) < 4:
                bias = self.builder_.emit(relax.op.expand_dims(bias, 0))
            args.append(bias)
        if site.layout is not None:
            args += [relax.const(a) for a in site.layout]
        out = relax.call_tir(self.kernel(spec), args, binding.var.ty)
        # Keep the site's output variable (a dataflow output stays one); only its value changes.
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(out)))

    def kernel(self, spec: AttentionSpec):
        """The GlobalVar of ``spec``'s kernel, added to the module on first use."""
        if spec not in self.kernels:
            self.kernels[spec] = self.builder_.add_func(self.kernel_for(spec),
                                                          "flash_attention_" + spec.kind.replace("+", "_"))
        return self.kernels[spec]


class FuseAttention(LlmccPass):
    """Rewrite exported sdpa attention sites into one flash kernel call each; ``sites`` reports every site."""

    name = "fuse_attention"

    def __init__(self, target=None) -> None:
        """``target``: the TargetSpec the kernels are for (None: the CPU)."""
        super().__init__()
        self.target = target
        self.sites: list[dict] = []
        self._kernels: dict = {}  # spec -> (kernel name, PrimFunc) from flash_attention_kernel

    def _kernel_name(self, spec: AttentionSpec | None = None) -> str:
        if spec is not None and spec in self._kernels:
            return self._kernels[spec][0]
        return "flash_attention_cuda" if self.target is not None and self.target.is_gpu else "flash_attention_cpu"

    def _kernel_for(self, spec: AttentionSpec):
        if spec not in self._kernels:
            self._kernels[spec] = flash_attention_kernel(spec, self.target)
        return self._kernels[spec][1]

    def _plan_block_layout(self, site: _Site, var2val) -> None:
        """A site whose mask is a constant with wholly hidden tiles (a block-sparse pattern kept as a buffer) becomes
        kind "block_sparse": its kernel walks only the tiles the mask leaves visible (kernels.block_layout). On the
        CPU the flash kernel does so at its own tiles and still adds the mask; on CUDA the Triton block-sparse
        kernel does so when the mask is uniform in blocks of 16..128 (the mask is then dropped), else
        flash_attention_cuda computes every tile with the mask, and the site's reason says why."""
        mask, spec = site.m.get("mask"), site.spec
        const = mask if isinstance(mask, _Const) else var2val.get(mask)
        skv = _shape(site.m["v"])[2]
        if not isinstance(const, _Const) or spec.q_len is None or not isinstance(skv, tvm.tirx.IntImm) \
                or spec.causal or spec.window:
            return
        values = const.value.numpy()
        kind = "+".join(["block_sparse"] + [f for f in site.kind.split("+") if f == "gqa"])
        if self.target is not None and self.target.is_gpu:
            block = block_layout.uniform_block_size(values, spec.num_heads)
            if block is None:
                if block_layout.tile_layout(values, spec.num_heads, 16, 16) is not None:
                    site.kind = kind
                    site.note = ("kernel flash_attention_cuda over every tile, not triton: the constant mask is not "
                                 "uniform in blocks of 16..128 (or not 0 where visible)")
                return
            layout = block_layout.tile_layout(values, spec.num_heads, block, block)
            candidate = dataclasses.replace(spec, bias=None, block_layout=(block, block, layout.shape[0]))
            try:
                self._kernel_for(candidate)
            except ValueError as exc:
                site.kind = kind
                site.note = f"kernel flash_attention_cuda over every tile, not triton: {exc}"
                return
            site.spec, site.drop_mask = candidate, True
        else:
            tiles = cpu_tiles(spec)
            layout = block_layout.tile_layout(values, spec.num_heads, tiles.tq, tiles.tk)
            if layout is None:
                return
            site.spec = dataclasses.replace(spec, block_layout=(tiles.tq, tiles.tk, layout.shape[0]))
        site.kind, site.layout = kind, block_layout.layout_csr(layout)

    def _choose_triton(self, site: _Site, var2val, params) -> None:
        """On CUDA, a sliding-window site whose mask is exactly the causal window goes to the Triton kernel, which
        computes that mask itself (the mask tensor is dropped); any other window site keeps flash_attention_cuda,
        with the reason in the site's report."""
        if self.target is None or not self.target.is_gpu or site.spec is None or not site.spec.window:
            return
        why = _not_window_mask(site, var2val, params) if site.spec.bias is not None else ""
        if not why:
            candidate = dataclasses.replace(site.spec, bias=None)
            try:
                self._kernel_for(candidate)
            except ValueError as exc:
                why = str(exc)
            else:
                if self._kernels[candidate][0] == "triton":
                    site.spec, site.drop_mask = candidate, True
                    return
                why = "flash_attention_kernel did not pick Triton for this spec"
        site.note = f"kernel {self._kernel_name()}, not triton: {why}"

    def transform(self, mod):
        self.sites = []
        total = 0
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function) or (func.attrs is not None and "Primitive" in func.attrs):
                continue
            plans = self._plan_function(gv.name_hint, func)
            if not plans:
                continue
            rewriter = _SiteRewriter(plans, self._kernel_for, mod)
            new_body = rewriter.visit_expr(func.body)
            mod = rewriter.builder_.get()  # with the kernels it added
            new_func = relax.Function(func.params, new_body, func.ret_ty, func.is_pure, func.attrs)
            mod[gv] = relax.analysis.remove_all_unused(new_func)
            total += sum(not isinstance(site, relax.ShapeExpr) for site in plans.values())
        return mod, total

    def _plan_function(self, fname: str, func) -> dict:
        """The sites of ``func`` to fuse, keyed by their root variable; every site is recorded on the way."""
        var2val = relax.analysis.get_var2val(func)
        outputs = _outputs(func)
        params = set(func.params)
        patterns = [(name, _sdpa_pattern(out_permute)) for name, out_permute in _PATTERNS]
        plans = {}
        consumers: dict = {}
        for var, val in var2val.items():
            for a in _operand_vars(val):
                consumers.setdefault(a, []).append(var)
        # A site is a softmax whose (NaN-guarded) output is the left operand of a matmul; bindings in order.
        softmaxes = [var for var, val in var2val.items() if _op_name(val) == "relax.nn.softmax"]
        order = {var: i for i, var in enumerate(var2val)}
        for probs_var in sorted(softmaxes, key=order.get):
            site = self._match(probs_var, var2val, consumers, patterns)
            if site is None:
                longformer = _describe_longformer(var2val[probs_var], var2val)
                if longformer is not None and longformer[0] == "global":
                    site, why = _global_query_site(probs_var, var2val, consumers, outputs)
                    if site is not None:
                        self._record(fname, probs_var, "global", True, "", site.spec)
                        plans[site.root_var] = site
                        plans.update(site.shape_reads)  # so the scores themselves are no longer computed
                        continue
                    longformer = ("global", False, f"{longformer[2]}; {why}")
                if longformer is not None:
                    self._record(fname, probs_var, *longformer)
                    continue
                if not any(self._value_matmuls(probs_var, var2val, consumers)):
                    continue  # a softmax that is no attention (classifier head, gating): not a site
                kind, reason = _describe_unmatched(probs_var, var2val[probs_var], var2val)
                self._record(fname, probs_var, kind, False, reason)
                continue
            reason = _check(site, var2val, consumers, outputs, params)
            if not reason:
                self._plan_block_layout(site, var2val)
                self._choose_triton(site, var2val, params)
                if site.kind == "block_sparse" and site.layout is None and not site.note:
                    site.note = ("dense pieces over key blocks the model's own code gathered (BigBird): the work "
                                 "already follows its layout, so the dense kernel runs each piece")
            self._record(fname, probs_var, site.kind, not reason, reason or site.note, site.spec)
            if not reason:
                plans[site.root_var] = site
        return plans

    @staticmethod
    def _value_matmuls(probs_var, var2val, consumers) -> list:
        """Bindings that may root a site of this softmax: the value matmul, then the permute of its output."""
        heads = [probs_var] + [u for u in consumers.get(probs_var, []) if _op_name(var2val[u]) == "relax.where"]
        matmuls = [u for h in heads for u in consumers.get(h, [])
                   if _op_name(var2val[u]) == "relax.matmul" and var2val[u].args[0].same_as(h)]
        permutes = [u for mm in matmuls for u in consumers.get(mm, [])
                    if _op_name(var2val[u]) == "relax.permute_dims"]
        return matmuls, permutes

    @staticmethod
    def _match(probs_var, var2val, consumers, patterns):
        matmuls, permutes = FuseAttention._value_matmuls(probs_var, var2val, consumers)
        for name, pat in patterns:
            for var in (permutes if name == "sdpa_bsnh_out" else matmuls):
                matched = pat["root"].extract_matched_expr(var2val[var], var2val)
                if matched is None or not matched[pat["probs"]].same_as(var2val[probs_var]):
                    continue
                return _Site(var, {k: matched[p] for k, p in pat.items() if p in matched}, name)
        return None

    def _record(self, fname, probs_var, kind, fused, reason, spec=None):
        self.sites.append({"site": f"{fname}/{probs_var.name}", "kind": kind, "fused": bool(fused),
                           "reason": reason, "kernel": self._kernel_name(spec) if fused else None})
