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
HF Longformer has two softmaxes that match no sdpa pattern (``longformer_attention``): its local band (chunked
q @ k^T over 2w+1 diagonals, a diagonal key mask, the global-key scores concatenated in front; kind
"sliding_window+global") fuses into one kernel over the global keys and a two-sided band (``BandSite``); its global
tokens' own queries (3-D scores over all keys, masked by a scatter and a where) fuse as a dense site with an additive
bias (kind "global", ``GlobalQuerySite``).

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
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from llmcc.kernels import block_layout
from llmcc.kernels.flash_attention import AttentionSpec, cpu_tiles, flash_attention_kernel
from llmcc.passes import LlmccPass
from llmcc.passes import attention_ir as ir
from llmcc.passes.concat_key_attention import ConcatKeySite, concat_key_site
from llmcc.passes.longformer_attention import (BandSite, GlobalQuerySite, band_site, describe_longformer,
                                               global_query_site)


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
    # a float16 model may add a float32 mask to the scores cast to float32, then cast back (HF BigBird)
    p["scaled32"] = is_op("relax.astype")(p["scaled"])
    p["masked32"] = is_op("relax.add")(p["scaled32"], p["mask"])
    p["masked"] = is_op("relax.add")(p["scaled"], p["mask"]) | is_op("relax.astype")(p["masked32"]) | p["scaled"]
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
    calls = ir.upstream(mask, var2val)
    for call in calls:
        name = ir.op_name(call)
        if name in _COMPARE_OPS and all(not isinstance(a, ir.Const) for a in call.args):
            offsets = []
            for a in call.args:
                p = ir.producer(a, var2val)
                if ir.op_name(p) in ("relax.subtract", "relax.add") and isinstance(p.args[1], ir.Const):
                    offsets.append(abs(int(p.args[1].value.numpy().reshape(-1)[0])))
            if offsets:
                window = max(offsets)
            elif "causal" not in feats:
                feats.append("causal")
        if name == "relax.astype" and isinstance(call.args[0], relax.Var) and call.args[0] in params:
            feats.append("padding_mask")
    if any(isinstance(a, relax.Var) and a in params and "float" in ir.dtype(a)
           for c in calls for a in c.args):
        feats.append("padding_mask")
    return sorted(set(feats), key=feats.index), window


def _is_gqa(k_or_v, var2val) -> bool:
    """k/v heads repeated: reshape(broadcast_to(expand_dims(x))) merging a [B, Hkv, rep, S, D] tensor."""
    for call in ir.upstream(k_or_v, var2val, through={"relax.reshape", "relax.permute_dims", "relax.multiply"},
                          limit=12):
        if ir.op_name(call) == "relax.broadcast_to" and ir.ndim(call) == 5:
            return True
    return False


def _is_block_sparse(exprs, var2val) -> bool:
    """q/k/v gathered from activation blocks (BigBird's block-sparse attention), not projected tokens."""
    for e in exprs:
        for call in ir.upstream(e, var2val, through=_LAYOUT_OPS | _GATHER_OPS, limit=64):
            if ir.op_name(call) in _GATHER_OPS and not isinstance(call.args[0], ir.Const) \
                    and "float" in ir.dtype(call):
                return True
    return False


def _check(site: _Site, var2val, consumers, outputs, params) -> str:
    """Guards: '' when the site may be fused, else why not. Fills site.kind/scale on the way."""
    m = site.m
    q, k_t, v, probs = m["q"], m["k_t"], m["v"], m["probs"]
    scores = m["scores"]
    if ir.ndim(probs) < 0:
        return "softmax input has no known rank"
    axis = int(probs.attrs.axis)
    if axis not in (-1, ir.ndim(probs) - 1):
        return f"softmax on axis {axis}, not the last (key) axis"
    if not all(ir.ndim(x) == 4 for x in (q, k_t, v, scores)):
        return "scores are not a 4-D [B, H, Sq, Skv] q @ k^T (block-sparse or 3-D attention)"
    if any(isinstance(x, ir.Const) or isinstance(var2val.get(x), ir.Const) for x in (q, k_t, v)):
        return "an operand of the score or value matmul is a constant: softmax over a linear layer, not attention"
    dtypes = {ir.dtype(x) for x in (q, k_t, v, scores)}
    if len(dtypes) != 1 or "float" not in next(iter(dtypes)):
        return f"q/k/v dtypes {sorted(dtypes)} differ or are not float"
    qs, ks, vs = ir.shape(q), ir.shape(k_t), ir.shape(v)
    if not (ir.same_dim(qs[3], ks[2]) and ir.same_dim(ks[3], vs[2]) and ir.same_dim(qs[1], ks[1])
            and ir.same_dim(qs[1], vs[1])):
        return "q [B,H,Sq,D], k^T [B,H,D,Skv], v [B,H,Skv,Dv] do not line up (not BNSH layout)"
    if site.pattern == "sdpa_bsnh_out" and ir.axes(m["root"]) != [0, 2, 1, 3]:
        return "output permute is not BNSH -> BSNH"
    scale = 1.0
    for name, invert in (("q_scale", False), ("k_scale", False), ("score_scale", None)):
        c = m.get(name)
        if c is None:
            continue
        val = ir.scalar(c)
        if val is None:
            return f"{name} is not a scalar constant"
        if name == "score_scale" and ir.op_name(m["scaled"]) == "relax.divide":
            val = 1.0 / val
        scale *= val
    site.scale = scale
    fill = m.get("nan_fill")
    if fill is not None and ir.scalar(fill) != 0.0:
        return "the NaN guard writes a value other than 0"
    mask = m.get("mask")
    feats = []
    if mask is not None:
        ms = ir.shape(mask)
        if ms is None or len(ms) > 4 or "float" not in ir.dtype(mask):
            return "the additive mask is not a float tensor of rank <= 4"
        ss = ir.shape(scores)[4 - len(ms):]
        if not all(ir.is_one(a) or ir.same_dim(a, b) for a, b in zip(ms, ss)):
            return "the mask does not broadcast to [B, H, Sq, Skv]"
        feats, site.window = _mask_features(mask, var2val, params)
    inner = ["scores", "scaled", "scaled32", "masked32", "masked", "probs", "guarded"] + (["out_bnsh"] if site.pattern == "sdpa_bsnh_out"
                                                                   else [])
    owned = [m[n] for n in inner if m.get(n) is not None]
    inner_vars = {x for x in var2val if any(var2val[x].same_as(o) for o in owned)}
    site_vars = inner_vars | {site.root_var} | {u for x in inner_vars for u in consumers.get(x, [])
                                                if ir.op_name(var2val[u]) == "relax.isnan"}
    if any(u not in site_vars for x in inner_vars for u in consumers.get(x, [])) or \
            any(x in outputs for x in inner_vars):
        return "an intermediate (scores or probabilities) is used outside the attention"
    if _is_gqa(k_t, var2val) or _is_gqa(v, var2val):
        feats.append("gqa")
    if not ir.same_dim(qs[2], vs[2]):
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
    where = ir.producer(site.m.get("mask"), var2val)
    if ir.op_name(where) != "relax.where" or not all(isinstance(a, ir.Const) for a in where.args[1:]):
        return "the mask is not where(visible, 0, -inf-like) of constants"
    shown, hidden = ir.scalar(where.args[1]), ir.scalar(where.args[2])
    if shown != 0.0 or hidden is None or hidden > -1e30:
        return f"the mask adds {shown} / {hidden}, not 0 / -inf-like"
    if where.args[0] in params:
        return "the mask's condition is a model input"
    stack, seen = [where.args[0]], set()
    while stack:
        call = ir.producer(stack.pop(), var2val)
        if call is None or call in seen:
            continue
        seen.add(call)
        if len(seen) > 400:
            return "the mask's computation is too large to check"
        name = ir.op_name(call)
        if name not in _WINDOW_MASK_OPS:
            return f"the mask uses {name or 'a non-operator call'}, not only position compares"
        if name == "relax.shape_of":
            continue  # shapes only: the data behind it does not reach the mask
        for a in ir.operand_vars(call):
            if a in params:
                return f"the mask reads model input {a.name_hint} (a padding or custom mask)"
            stack.append(a)
    return ""


def _describe_unmatched(probs_var, probs, var2val) -> tuple[str, str]:
    """kind and reason for a softmax that feeds a matmul but matched no attention pattern."""
    if int(probs.attrs.axis) not in (-1, ir.ndim(probs) - 1):
        return "unknown", f"softmax on axis {int(probs.attrs.axis)}, not the last (key) axis"
    if ir.ndim(probs) == 5:
        return "block_sparse", "5-D block-sparse scores [B, H, blocks, q, k]: not one dense R.nn.attention"
    inner = ir.producer(probs.args[0], var2val)
    if ir.op_name(inner) == "relax.add":
        inner = ir.producer(inner.args[0], var2val)
    if ir.op_name(inner) == "relax.multiply" and not isinstance(inner.args[1], ir.Const):
        return "unknown", "scores are multiplied by a tensor (multiplicative mask), not an additive mask"
    return "unknown", "the softmax input is not (scaled) q @ k^T plus an additive mask"


# ---------------------------------------------------------------------------------------------------------------------
# Operands: where the kernel reads q, k and v from, without the copies the exported graph makes on the way.


def _peel_repeat(x, var2val):
    """(kv, groups): x [B, H, S, D] = reshape(broadcast_to(expand_dims(kv, 2), [B, Hkv, G, S, D])) is kv repeated G
    times per head (HF's repeat_kv); else (x, 1)."""
    r = ir.producer(x, var2val)
    if ir.op_name(r) != "relax.reshape":
        return x, 1
    bc = ir.producer(r.args[0], var2val)
    if ir.op_name(bc) != "relax.broadcast_to" or ir.ndim(bc) != 5:
        return x, 1
    ex = ir.producer(bc.args[0], var2val)
    if ir.op_name(ex) != "relax.expand_dims" or [int(a) for a in ex.attrs.axis] != [2] or ir.ndim(ex.args[0]) != 4:
        return x, 1
    kv, bs, xs = ex.args[0], ir.shape(bc), ir.shape(x)
    groups = bs[2]
    if not isinstance(groups, tvm.tirx.IntImm) or not ir.same_dim(xs[1], bs[1] * groups):
        return x, 1
    return kv, int(groups)


def _peel_permute(x, var2val):
    """(expr, layout) of a BNSH tensor: its BSNH source when x is permute_dims(src, [0, 2, 1, 3])."""
    p = ir.producer(x, var2val)
    if ir.op_name(p) == "relax.permute_dims" and ir.axes(p) == [0, 2, 1, 3]:
        return p.args[0], "bsnd"
    return x, "bnsd"


def _k_operand(k_t, var2val):
    """(expr, layout) of the keys behind k^T [B, H, D, S]: peels torch's reshape(transpose(reshape(k))) and permutes;
    k^T itself ("bnds") when nothing peels."""
    p = ir.producer(k_t, var2val)
    name = ir.op_name(p)
    if name == "relax.permute_dims" and ir.axes(p) == [0, 2, 3, 1]:
        return p.args[0], "bsnd"
    if name == "relax.permute_dims" and ir.axes(p) == [0, 1, 3, 2]:
        return p.args[0], "bnsd"
    if name == "relax.reshape":
        t = ir.producer(p.args[0], var2val)
        if ir.op_name(t) == "relax.permute_dims" and ir.axes(t) == [0, 2, 1] and ir.ndim(t) == 3:
            r = ir.producer(t.args[0], var2val)
            if ir.op_name(r) == "relax.reshape" and ir.ndim(r.args[0]) == 4:
                k = r.args[0]  # [B, H, S, D] reshaped to [B*H, S, D], transposed, reshaped back
                ks, kts = ir.shape(k), ir.shape(k_t)
                if all(ir.same_dim(a, b) for a, b in zip(ks, [kts[0], kts[1], kts[3], kts[2]])):
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
    heads = int(ir.shape(m["q"])[1])
    if groups_k != groups_v:  # keep one repeat rather than none: both operands must have the same kv heads
        k, k_layout = _k_operand(m["k_t"], var2val)
        v, groups_k = m["v"], 1
    k_op = _peel_permute(k, var2val) if k_layout == "bnsd" else (k, k_layout)
    site.operands = {"q": q, "k": k_op, "v": _peel_permute(v, var2val)}
    site.kv_heads = heads // groups_k


def _spec(site: _Site) -> AttentionSpec:
    m = site.m
    qs, vs = ir.shape(m["q"]), ir.shape(m["v"])
    bias = None
    if m.get("mask") is not None:
        ms = [1] * (4 - ir.ndim(m["mask"])) + list(ir.shape(m["mask"]))
        bias = tuple(ir.is_one(d) for d in ms[:3])
    q_len = int(qs[2]) if isinstance(qs[2], tvm.tirx.IntImm) else None
    return AttentionSpec(num_heads=int(qs[1]), num_kv_heads=site.kv_heads, head_dim=int(qs[3]),
                         value_dim=int(vs[3]), scale=site.scale, dtype=ir.dtype(m["scores"]),
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
        if isinstance(site, (GlobalQuerySite, BandSite, ConcatKeySite)):
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
            if ir.dtype(bias) != spec.dtype:  # a float32 mask on float16 scores: the kernel reads it in its dtype
                bias = self.builder_.emit(relax.op.astype(bias, spec.dtype))
            while ir.ndim(bias) < 4:
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
        const = mask if isinstance(mask, ir.Const) else var2val.get(mask)
        skv = ir.shape(site.m["v"])[2]
        if not isinstance(const, ir.Const) or spec.q_len is None or not isinstance(skv, tvm.tirx.IntImm) \
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
            for a in ir.operand_vars(val):
                consumers.setdefault(a, []).append(var)
        # A site is a softmax whose (NaN-guarded) output is the left operand of a matmul; bindings in order.
        softmaxes = [var for var, val in var2val.items() if ir.op_name(val) == "relax.nn.softmax"]
        order = {var: i for i, var in enumerate(var2val)}
        for probs_var in sorted(softmaxes, key=order.get):
            site = self._match(probs_var, var2val, consumers, patterns)
            if site is None:
                self._plan_unmatched(fname, probs_var, var2val, consumers, outputs, plans)
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

    def _plan_unmatched(self, fname, probs_var, var2val, consumers, outputs, plans) -> None:
        """A softmax no sdpa pattern matched: HF Longformer's two sites, attention over concatenated key sets
        (BigBird's middle band), or, if it feeds a value product at all, an unfused site with the reason."""
        longformer = describe_longformer(var2val[probs_var], var2val)
        concat_kind = "block_sparse" if ir.ndim(var2val[probs_var]) >= 5 else "dense"
        kind = longformer[0] if longformer is not None else concat_kind
        matcher = {"global": global_query_site, "sliding_window+global": band_site,
                   "sliding_window": band_site}.get(kind, concat_key_site)
        site, why = matcher(probs_var, var2val, consumers, outputs)
        if site is not None:
            note = ""
            if isinstance(site, BandSite) and self.target is not None and self.target.is_gpu:
                note = (f"kernel {self._kernel_name()}, not triton: the Triton kernels take a causal window or a "
                        "block layout, not a two-sided band with global keys in front")
            if isinstance(site, ConcatKeySite):
                note = ("key sets the model's own code gathered (BigBird's middle band): one dense attention per "
                        "block over their concatenation, whose work already follows the layout")
            self._record(fname, probs_var, kind, True, note, site.spec)
            plans[site.root_var] = site
            plans.update(site.shape_reads)  # so the scores themselves are no longer computed
            return
        if longformer is not None:
            self._record(fname, probs_var, kind, False, f"{longformer[2]}; {why}")
            return
        if not any(self._value_matmuls(probs_var, var2val, consumers)) and not self._feeds_values(
                probs_var, var2val, consumers):
            return  # a softmax that is no attention (classifier head, gating): not a site
        kind, reason = _describe_unmatched(probs_var, var2val[probs_var], var2val)
        if ir.op_name(ir.producer(var2val[probs_var].args[0], var2val)) == "relax.concat":
            reason = f"{reason}; as concatenated key sets: {why}"
        self._record(fname, probs_var, kind, False, reason)

    @staticmethod
    def _feeds_values(probs_var, var2val, consumers) -> bool:
        """The probabilities are sliced, and a slice is the left operand of a matmul (a split value product)."""
        slices = [u for u in consumers.get(probs_var, []) if ir.op_name(var2val[u]) == "relax.strided_slice"]
        return any(ir.op_name(var2val[m]) in ("relax.matmul", "relax.call_tir") for u in slices
                   for m in consumers.get(u, []))

    @staticmethod
    def _value_matmuls(probs_var, var2val, consumers) -> list:
        """Bindings that may root a site of this softmax: the value matmul, then the permute of its output."""
        heads = [probs_var] + [u for u in consumers.get(probs_var, []) if ir.op_name(var2val[u]) == "relax.where"]
        matmuls = [u for h in heads for u in consumers.get(h, [])
                   if ir.op_name(var2val[u]) == "relax.matmul" and var2val[u].args[0].same_as(h)]
        permutes = [u for mm in matmuls for u in consumers.get(mm, [])
                    if ir.op_name(var2val[u]) == "relax.permute_dims"]
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
