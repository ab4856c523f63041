"""fold_lora_branches: fold a LoRA branch left in an exported graph into its base weight (one matmul, not three).

A model exported with its LoRA adapters still active (a PeftModel, or a hand-written ``x @ W + (x @ A) @ B * s``)
computes each adapted projection as the base matmul plus a low-rank branch. With W, A, B and s constants the branch
is linear in x, so ``x @ W + ((x @ A) @ B) * s == x @ (W + (A @ B) * s)``: this pass computes the merged weight once,
in fp32, and the branch's two matmuls disappear.

Matches (each add's operands in either order, s on either side of its multiply or absent)::

    add(matmul(x, W), branch)
    add(add(matmul(x, W), bias), branch)        PEFT adds its branch after the base layer's bias
    branch = multiply(matmul(matmul(x, A), B), s)  |  matmul(matmul(x, A), B)

Several adapters on one layer, ``add(add(base, branch1), branch2)``, fold one after the other: the outer add sees
the inner one already folded.

Guards (anything else stays as it is): W [K, N], A [K, r] and B [r, N] are 2-D constants of one float dtype; A @ B
has W's shape; s is a constant with one element or one per output column ([N]); the branch reads the same x as the
base matmul.

Runs first in the graph phase, while the weights are still constants (before fold_constants and lift_weights).

Before::

    lv  = R.matmul(x, W)                        # W: const [K, N]
    lv1 = R.add(lv, bias)
    lv2 = R.matmul(x, A)                        # A: const [K, r]
    lv3 = R.matmul(lv2, B)                      # B: const [r, N]
    lv4 = R.multiply(lv3, R.const(2.0))
    gv  = R.add(lv1, lv4)

After::

    lv5 = R.matmul(x, W_merged)                 # W_merged = W + (A @ B) * 2.0, computed at compile time
    gv  = R.add(lv5, bias)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from llmcc.passes import LlmccPass, bound_value
from llmcc.passes import const_array as _const_array
from llmcc.passes import op_name as _op_name

_FLOAT_DTYPES = ("float16", "float32", "float64")


class FoldLoraBranches(LlmccPass):
    name = "fold_lora_branches"

    def transform(self, mod):
        folder = _BranchFolder(mod)
        return folder.run(), folder.folded


@dataclass(frozen=True)
class _Base:
    """``matmul(x, W)``, optionally plus ``bias`` (an add operand on the side given by ``bias_first``)."""

    x: relax.Expr
    weight: np.ndarray
    bias: relax.Expr | None = None
    bias_first: bool = False


@dataclass(frozen=True)
class _Branch:
    """``(x @ A) @ B * scale``."""

    x: relax.Expr
    a: np.ndarray
    b: np.ndarray
    scale: np.ndarray | None


def _float_matrix(expr) -> np.ndarray | None:
    arr = _const_array(expr)
    return arr if arr is not None and arr.ndim == 2 and str(arr.dtype) in _FLOAT_DTYPES else None


@relax.expr_functor.mutator
class _BranchFolder(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod = mod
        self.folded = 0

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod.functions.items():
            if isinstance(func, relax.Function):
                before = self.folded
                new_func = self.visit_expr(func)
                if self.folded > before:  # the folded branches' matmuls are now unused
                    self.builder_.update_func(gv, relax.analysis.remove_all_unused(new_func))
        return self.builder_.get() if self.folded else self.mod

    def _bound(self, expr):
        return bound_value(self, expr)

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if _op_name(call) != "relax.add":
            return call
        for base_arg, branch_arg in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
            base, branch = self._match_base(base_arg), self._match_branch(branch_arg)
            if base is not None and branch is not None and self._foldable(base, branch):
                return self._fold(base, branch)
        return call

    def _match_matmul(self, expr) -> tuple[relax.Expr, np.ndarray] | None:
        """``matmul(x, W)`` with W a constant float matrix -> (x, W)."""
        call = self._bound(expr)
        if _op_name(call) != "relax.matmul":
            return None
        weight = _float_matrix(call.args[1])
        return (call.args[0], weight) if weight is not None else None

    def _match_base(self, expr) -> _Base | None:
        plain = self._match_matmul(expr)
        if plain is not None:
            return _Base(*plain)
        call = self._bound(expr)
        if _op_name(call) != "relax.add":
            return None
        for i in (0, 1):
            matmul = self._match_matmul(call.args[i])
            if matmul is not None:
                return _Base(*matmul, bias=call.args[1 - i], bias_first=i == 1)
        return None

    def _match_branch(self, expr) -> _Branch | None:
        call, scale = self._bound(expr), None
        if _op_name(call) == "relax.multiply":
            for i in (0, 1):
                scale = _const_array(call.args[i])
                if scale is not None:
                    call = self._bound(call.args[1 - i])
                    break
            else:
                return None
        if _op_name(call) != "relax.matmul":
            return None
        b = _float_matrix(call.args[1])
        inner = self._bound(call.args[0])
        if b is None or _op_name(inner) != "relax.matmul":
            return None
        a = _float_matrix(inner.args[1])
        return _Branch(inner.args[0], a, b, scale) if a is not None else None

    @staticmethod
    def _foldable(base: _Base, branch: _Branch) -> bool:
        w, a, b, s = base.weight, branch.a, branch.b, branch.scale
        if not base.x.same_as(branch.x):
            return False
        if not (w.dtype == a.dtype == b.dtype and a.shape[1] == b.shape[0] and (a.shape[0], b.shape[1]) == w.shape):
            return False
        if s is None:
            return True
        # One factor for the whole product, or one per output column: both commute with x @ (.). A scale of
        # higher rank than the product would broadcast it to a new shape.
        x_ndim = base.x.ty.ndim if isinstance(base.x.ty, relax.TensorType) else -1
        return (str(s.dtype) in _FLOAT_DTYPES and 0 <= s.ndim <= x_ndim
                and (s.size == 1 or s.shape[-1:] == (w.shape[1],) and s.size == w.shape[1]))

    def _fold(self, base: _Base, branch: _Branch) -> relax.Expr:
        delta = branch.a.astype(np.float32) @ branch.b.astype(np.float32)
        if branch.scale is not None:
            delta = delta * branch.scale.astype(np.float32).reshape(-1)
        merged = (base.weight.astype(np.float32) + delta).astype(base.weight.dtype)
        matmul = self.builder_.emit(relax.op.matmul(base.x, relax.const(merged)))
        self.folded += 1
        if base.bias is None:
            return matmul
        return relax.op.add(base.bias, matmul) if base.bias_first else relax.op.add(matmul, base.bias)
