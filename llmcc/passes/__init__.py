"""llmcc's compiler passes: one pass per file, each counting the rewrites it makes.

A pass is a callable ``IRModule -> IRModule`` with a ``name`` and a ``rewrites`` count (set on each call) that the
pipeline copies into the report, so tests and users can see that it fired.
"""

from __future__ import annotations

import tvm


class LlmccPass:
    """Base class: subclasses implement ``transform(mod) -> (mod, rewrites)``."""

    name = "llmcc_pass"

    def __init__(self) -> None:
        self.rewrites = 0

    def transform(self, mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
        raise NotImplementedError

    def __call__(self, mod: tvm.IRModule) -> tvm.IRModule:
        mod, self.rewrites = self.transform(mod)
        return mod


class TvmPass(LlmccPass):
    """One of TVM's own passes, with a function that counts what it changed (``count(before, after)``).

    ``make`` builds the tvm.transform.Pass when the pass runs, so importing llmcc builds none.
    """

    def __init__(self, name: str, make, count=None) -> None:
        super().__init__()
        self.name, self.make, self.count = name, make, count

    def transform(self, mod):
        after = self.make()(mod)
        return after, (self.count(mod, after) if self.count else 0)


# Helpers for the Relax rewriters of the passes (TVM 0.27: constants are tvm.ir.GenericConst).


def op_name(expr) -> str | None:
    """The op name of a Relax call of a registered op (``relax.matmul``), else None."""
    from tvm import relax

    return expr.op.name if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) else None


def const_array(expr):
    """The numpy value of a Relax constant, else None."""
    return expr.value.numpy() if isinstance(expr, tvm.ir.GenericConst) else None


def bound_value(mutator, expr):
    """What a dataflow variable is bound to in ``mutator``'s scope (the expression itself otherwise)."""
    from tvm import relax

    if isinstance(expr, relax.Var):
        value = mutator.lookup_binding(expr)
        return value if value is not None else expr
    return expr


def rewrite_relax_functions(mutator, mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """Run ``mutator`` (a PyExprMutator built on ``mod`` that counts its rewrites in ``mutator.rewrites``) over every
    Relax function of ``mod``: (the module with the rewritten functions, the count); ``mod`` itself when none fired."""
    from tvm import relax

    changed = False
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            before = mutator.rewrites
            new_func = mutator.visit_expr(func)
            if mutator.rewrites > before:
                mutator.builder_.update_func(gv, new_func)
                changed = True
    return (mutator.builder_.get() if changed else mod), mutator.rewrites
