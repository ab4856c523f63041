"""dispatch_length_buckets: a kernel with symbolic sizes runs its tuned bucket kernels where they are faster.

Runs in the schedule phase when a tuning database is given, before apply_tuning_database. For each unscheduled
kernel with symbolic sizes (batch, sequence) whose rows are independent along them (llmcc.tuning.buckets), it
looks up the static sizes the database holds records for (``llmcc tune --buckets 32,128 --dims batch=1``). A bucket
with a record usable on the target (its own, or a validated transfer: llmcc.tuning.choose_schedule) becomes a static
kernel ``<name>_batch1_sequence128`` with that schedule, used for the bucket's own sizes as they are, and for every
shape that fits in the bucket and has at least ``min_elements`` (batch x sequence) elements on rows padded up to it;
below that, padding costs more than the tuned schedule saves (buckets.lowest_elements, padding_overhead_us). The
kernel's call sites go through a dispatcher function that picks the smallest such bucket at run time; any other
shape runs the symbolic kernel, which the rules schedule as before.
``self.buckets`` says which shapes go where and ``self.skipped`` why a bucket in the database is not used (the
report's "tuning" entry of the kernel gets them as "buckets" and "dropped").

Before::

    lv = R.call_tir(fused_matmul_add, (x, w), R.Tensor((batch, sequence, 512), "float32"))

After::

    lv = fused_matmul_add_buckets(x, w)

    @R.function(private=True)
    def fused_matmul_add_buckets(x: R.Tensor((batch, sequence, 512)), w: R.Tensor((512, 512))):
        if batch == 1 and sequence == 128:          # the bucket's own sizes: its tuned kernel on x as it is
            r = R.call_tir(fused_matmul_add_batch1_sequence128, (x, w), R.Tensor((batch, sequence, 512)))
        elif batch <= 1 and sequence <= 128 and batch * sequence >= 40:    # worth padding to the bucket
            r = fused_matmul_add_batch1_sequence128_padded(x, w)
        else:
            r = R.call_tir(fused_matmul_add, (x, w), R.Tensor((batch, sequence, 512)))   # rule-scheduled
        return r

    @R.function(private=True)   # its own function: memory planned apart from the other branches
    def fused_matmul_add_batch1_sequence128_padded(x, w):
        xp = R.call_tir(pad_rows, (x,), R.Tensor((1, 128, 512)))         # rows past the true sizes: zero
        yp = R.call_tir(fused_matmul_add_batch1_sequence128, (xp, w), R.Tensor((1, 128, 512)))
        return R.call_tir(take_rows, (yp,), R.Tensor((batch, sequence, 512)))
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, te, tirx

from llmcc.passes import LlmccPass, op_name
from llmcc.tuning.buckets import symbolic_vars


def _static_shape(shape, sizes: dict):
    """``shape`` with each symbolic dim replaced by ``sizes[name]`` (an int or an expression)."""
    return [sizes[d.name] if isinstance(d, tirx.Var) else d for d in shape]


def _const(value: int):
    return tirx.const(int(value), "int64")


def pad_rows_func(shape, dtype, binding: dict):
    """x (symbolic dims) -> the same with every symbolic dim at its bucket size, the rows past the true size zero."""
    sizes = {name: tirx.Var(name, "int64") for name in binding}
    x = te.placeholder(_static_shape(shape, sizes), dtype, name="x")
    padded = [i for i, d in enumerate(shape) if isinstance(d, tirx.Var)]
    out = te.compute(_static_shape(shape, {k: _const(v) for k, v in binding.items()}),
                     lambda *i: te.if_then_else(tirx.all(*[i[d] < sizes[shape[d].name] for d in padded]), x(*i),
                                                tirx.const(0, dtype)), name="padded")
    return te.create_prim_func([x, out])


def take_rows_func(shape, dtype, binding: dict):
    """The padded result (symbolic dims at the bucket's sizes) -> its leading rows, the true sizes."""
    sizes = {name: tirx.Var(name, "int64") for name in binding}
    padded = te.placeholder(_static_shape(shape, {k: _const(v) for k, v in binding.items()}), dtype, name="padded")
    out = te.compute(_static_shape(shape, sizes), lambda *i: padded(*i), name="rows")
    return te.create_prim_func([padded, out])


class DispatchLengthBuckets(LlmccPass):
    name = "dispatch_length_buckets"

    def __init__(self, database, target) -> None:
        """``database``: a llmcc.tuning.TuningDatabase; ``target``: the llmcc TargetSpec compiled for."""
        super().__init__()
        self.database = database
        self.target = target
        self.kernels: list[dict] = []  # [{"name", "rule"}]: the bucket kernels ("tuned"), the pad and take ones
        self.choices: dict[str, object] = {}  # bucket kernel name -> llmcc.tuning.ScheduleChoice
        self.buckets: dict[str, list] = {}  # symbolic kernel -> [{"kernel", "sizes", "min_elements"}]
        self.skipped: dict[str, list] = {}  # symbolic kernel -> ["bucket <b>: why it is not used"]

    # ------------------------------------------------------------------ matching: which kernels, which buckets

    def _plan(self, func) -> tuple:
        """([(binding, fewest elements, ScheduleChoice)], [why a bucket is not used]) for a kernel that can be
        padded along its symbolic sizes; ([], []) otherwise."""
        from llmcc.tuning import buckets as lb
        from llmcc.tuning.transfer import choose_schedule

        if func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False)):
            return [], []
        if lb.bucket_reason(func)[1] is not None:
            return [], []
        plan, skipped = [], []
        for binding in lb.candidate_bindings(self.database, func):
            static = lb.specialize(func, binding)
            choice = choose_schedule(self.database, static, tvm.target.Target.current())
            name = lb.binding_name(binding)
            if choice.func is None:
                skipped.append(f"bucket {name}: no usable record" + (f" ({'; '.join(choice.dropped)})"
                                                                        if choice.dropped else ""))
                continue
            elements = math.prod(binding.values())
            rule_us = self._rule_us(static, choice.source)
            tuned = choice.source_time_us + lb.DISPATCH_US if choice.source_time_us is not None else None
            if lb.lowest_elements(elements, tuned, rule_us) <= elements:
                padded = tuned + lb.padding_overhead_us(func, binding) if tuned is not None else None
                plan.append((binding, min(lb.lowest_elements(elements, padded, rule_us), elements), choice))
            else:
                skipped.append(f"bucket {name}: tuned {choice.source_time_us} us (+{lb.DISPATCH_US:.0f} us to "
                               f"dispatch) is not {lb.PADDING_MARGIN:.0%} under the rule's {rule_us:.2f} us")
        return plan, skipped

    def _add_copy_kernel(self, bb, func, name):
        """A pad or take kernel, scheduled by the rules here: on CPU the take (a copy of leading rows) looks like a
        reshape to apply_schedule_rules, which would leave it unscheduled for a view it cannot become."""
        from llmcc.passes.apply_schedule_rules import ApplyScheduleRules
        from llmcc.schedules import rules_for

        scheduled, rule = ApplyScheduleRules(rules_for(self.target))._schedule(func, tvm.target.Target.current())
        gvar = bb.add_func(scheduled if scheduled is not None else func, name)
        if rule is not None and all(k["name"] != gvar.name_hint for k in self.kernels):
            self.kernels.append({"name": gvar.name_hint, "rule": type(rule).__name__})
        return gvar

    def _rule_us(self, static, source_key) -> float | None:
        """The rule schedule's measured time for the static kernel on the record's own target (``tune`` measures
        it first), or None."""
        from llmcc.tuning.database import run_secs
        from llmcc.tuning.keys import target_key
        from llmcc.tuning.search import rule_trace, trace_text

        trace = rule_trace(static, self.target)
        if trace is None or source_key is None:
            return None
        text = trace_text(trace)
        times = [run_secs(r) for r in self.database.kernel_records(static)
                 if target_key(r.target) == source_key and trace_text(r.trace) == text]
        times = [t for t in times if t is not None]
        return min(times) * 1e6 if times else None

    # ------------------------------------------------------------------ rewriting: kernels, dispatcher, call sites

    def transform(self, mod):
        self.kernels, self.choices, self.buckets, self.skipped = [], {}, {}, {}
        sites = _call_sites(mod)
        bb = relax.BlockBuilder(mod)
        routes = {}
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc) or gvar.name_hint not in sites:
                continue
            num_inputs = sites[gvar.name_hint]
            if num_inputs is None or _output_only_sizes(func, num_inputs):
                continue  # the dispatcher reads the sizes off its inputs: a size only an output has is unknown there
            plan, skipped = self._plan(func)
            if skipped:
                self.skipped[gvar.name_hint] = skipped
            if not plan:
                continue
            buckets = []
            for binding, fewest, choice in plan:
                name = gvar.name_hint + "_" + "_".join(f"{k}{v}" for k, v in binding.items())
                static_gv = bb.add_func(choice.func, name)
                self.kernels.append({"name": static_gv.name_hint, "rule": "tuned"})
                self.choices[static_gv.name_hint] = choice
                buckets.append((binding, fewest, static_gv))
                self.buckets.setdefault(gvar.name_hint, []).append(
                    {"kernel": static_gv.name_hint, "sizes": dict(binding), "min_elements": fewest})
            routes[gvar] = bb.add_func(_dispatcher(bb, lambda f, n: self._add_copy_kernel(bb, f, n), gvar, func,
                                                   num_inputs, buckets), f"{gvar.name_hint}_buckets")
        if not routes:
            return mod, 0
        mod = bb.get()
        router = _Router(mod, routes)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function) and gv not in routes.values():
                new_func = router.visit_expr(func)
                router.builder_.update_func(gv, new_func)
        return relax.transform.Normalize()(router.builder_.get()), router.rewrites


def _output_only_sizes(func, num_inputs: int) -> set:
    """The symbolic sizes of ``func`` that none of its first ``num_inputs`` parameters (the inputs) has."""
    def names(params):
        return {d.name for p in params for d in getattr(p, "shape", None) or () if isinstance(d, tirx.Var)}

    return names(func.params[num_inputs:]) - names(func.params[:num_inputs])


def _call_sites(mod) -> dict:
    """kernel name -> number of tensor inputs at its call_tir sites (None if the sites disagree or pass
    symbolic values as extra arguments)."""
    sites: dict = {}

    def visit(expr):
        if op_name(expr) == "relax.call_tir" and isinstance(expr.args[0], tvm.ir.GlobalVar):
            name = expr.args[0].name_hint
            count = len(expr.args[1].fields) if len(expr.args) == 2 and isinstance(expr.args[1], relax.Tuple) else None
            sites[name] = count if sites.get(name, count) == count else None

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return sites


def _dispatcher(bb, add_kernel, kernel_gv, func, num_inputs: int, buckets: list):
    """The private Relax function choosing a bucket by the symbolic sizes at run time (module docstring).
    ``add_kernel(func, name)``: adds a pad or take kernel to the module, scheduled."""
    names = [v.name for v in symbolic_vars(func)]
    sizes = {name: tirx.Var(name, "int64") for name in names}

    def sinfo(param, values):
        return relax.TensorType(_static_shape(param.shape, values), param.dtype)

    inputs, outputs = func.params[:num_inputs], func.params[num_inputs:]
    params = [relax.Var(f"x{i}", sinfo(p, sizes)) for i, p in enumerate(inputs)]
    out_sinfo = [sinfo(p, sizes) for p in outputs]
    ret = out_sinfo[0] if len(out_sinfo) == 1 else relax.TupleType(out_sinfo)

    def seq(bindings, result):
        return relax.SeqExpr([relax.BindingBlock(bindings)], result)

    def padded_call(binding, static_gv):
        """A private function: pad, the static kernel, take the rows. Its own function, so that its memory is
        planned apart from the other branches (StaticPlanBlockMemory shared a storage across the branches of one
        function's If, and the branch that had not allocated it crashed)."""
        static = {k: _const(v) for k, v in binding.items()}
        own = {name: tirx.Var(name, "int64") for name in names}
        args_in = [relax.Var(f"x{i}", sinfo(p, own)) for i, p in enumerate(inputs)]
        own_out = [sinfo(p, own) for p in outputs]
        bindings, args = [], []
        for param, x in zip(inputs, args_in):
            if not any(isinstance(d, tirx.Var) for d in param.shape):
                args.append(x)
                continue
            pad = add_kernel(pad_rows_func(param.shape, param.dtype, binding), "pad_rows")
            padded = relax.Var("padded", sinfo(param, static))
            bindings.append(relax.VarBinding(padded, relax.call_tir(pad, relax.Tuple([x]), sinfo(param, static))))
            args.append(padded)
        static_sinfo = [sinfo(p, static) for p in outputs]
        result = relax.Var("static_result", static_sinfo[0] if len(static_sinfo) == 1
                           else relax.TupleType(static_sinfo))
        bindings.append(relax.VarBinding(result, relax.call_tir(static_gv, relax.Tuple(args), static_sinfo)))
        rows = []
        for i, param in enumerate(outputs):
            item = result
            if len(outputs) > 1:
                item = relax.Var(f"item{i}", static_sinfo[i])
                bindings.append(relax.VarBinding(item, relax.TupleGetItem(result, i)))
            take = add_kernel(take_rows_func(param.shape, param.dtype, binding), "take_rows")
            row = relax.Var("rows", own_out[i])
            bindings.append(relax.VarBinding(row, relax.call_tir(take, relax.Tuple([item]), own_out[i])))
            rows.append(row)
        own_ret = own_out[0] if len(own_out) == 1 else relax.TupleType(own_out)
        if len(rows) == 1:
            body = seq(bindings, rows[0])
        else:
            out = relax.Var("rows", own_ret)
            bindings.append(relax.VarBinding(out, relax.Tuple(rows)))
            body = seq(bindings, out)
        return bb.add_func(relax.Function(args_in, body, own_ret, is_pure=True), static_gv.name_hint + "_padded")

    def call(expr):
        result = relax.Var("result", ret)
        return seq([relax.VarBinding(result, expr)], result)

    def choose(cond, then, otherwise):
        chosen = relax.Var("result", ret)
        return seq([relax.VarBinding(chosen, relax.If(relax.prim_value(cond), then, otherwise))], chosen)

    branch = call(relax.call_tir(kernel_gv, relax.Tuple(params), out_sinfo))
    elements = math.prod(sizes.values())
    for binding, fewest, static_gv in reversed(buckets):  # the smallest bucket that fits is tested first
        if fewest < math.prod(binding.values()):
            fits = [sizes[k] <= _const(v) for k, v in binding.items()] + [elements >= _const(fewest)]
            branch = choose(tirx.all(*fits), call(relax.Call(padded_call(binding, static_gv), params)), branch)
        # the bucket's own sizes: the static kernel on the tensors as they are (its shape checks pass), no copies
        exact = call(relax.call_tir(static_gv, relax.Tuple(params), out_sinfo))
        branch = choose(tirx.all(*[sizes[k] == _const(v) for k, v in binding.items()]), exact, branch)
    return relax.Function(params, branch, ret, is_pure=True)


@relax.expr_functor.mutator
class _Router(relax.PyExprMutator):
    """call_tir of a dispatched kernel -> a call of its dispatcher."""

    def __init__(self, mod, routes) -> None:
        super().__init__(mod)
        self.routes = routes
        self.rewrites = 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if op_name(call) == "relax.call_tir" and isinstance(call.args[0], tvm.ir.GlobalVar):
            for kernel_gv, dispatcher_gv in self.routes.items():
                if call.args[0].same_as(kernel_gv):
                    self.rewrites += 1
                    return relax.Call(dispatcher_gv, list(call.args[1].fields))
        return call
