"""apply_schedule_rules: give every unscheduled PrimFunc a schedule from llmcc.schedules' rules.

Rules are tried in order (dlight style: ``rule.apply(func, target, tunable) -> Schedule | None``). Unlike dlight's
ApplyDefaultSchedule, a rule that raises on a kernel it claimed (dlight's reduction rule does on some decode
kernels: "The reduction block vars are not used to index the output buffers") counts as declining it, and the next
rule, ending with the fallback, gets the kernel. ``self.kernels`` records which rule scheduled each kernel, and the
tiles a sized rule chose (``rule.tiles``, set by the rule's last ``apply``).

Before::

    @T.prim_func
    def fused_matmul(A: T.Buffer((n, 128)), B: T.Buffer((128, 128)), C: T.Buffer((n, 128))): ...   # plain loops

After::

    @T.prim_func
    def fused_matmul(...):
        T.func_attr({"tirx.is_scheduled": True})
        for i0_0 in T.thread_binding(..., thread="blockIdx.x"): ...                                # tiled, bound
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import relax, s_tir, tirx

from llmcc.passes import LlmccPass
from llmcc.schedules.cuda import NO_TENSORIZE


RESHAPE_VIEW = "reshape view (no kernel)"
KERNEL_SCHEDULE = "its own (llmcc.kernels)"  # hand-scheduled kernels: flash attention, the AVX2 GEMVs


def _is_scheduled(func) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


class ApplyScheduleRules(LlmccPass):
    name = "apply_schedule_rules"

    def __init__(self, rules: list, leave_reshapes: bool = False) -> None:
        """``leave_reshapes``: leave pure reshapes unscheduled, so the finalize phase's RewriteDataflowReshape still
        recognises them and turns them into no-copy views (a scheduled one no longer matches its pattern and stays a
        copy, which for symbolic shapes divides every index by the sequence length)."""
        super().__init__()
        self.rules = rules
        self.leave_reshapes = leave_reshapes
        self.kernels: list[dict] = []  # [{"name", "rule"}]

    def _schedule(self, func, target):
        for rule in self.rules:
            try:
                space = rule.apply(func, target, False)
            except Exception:  # the rule claimed a kernel it cannot handle: let the next rule have it
                continue
            if space is None:
                continue
            sch = space if isinstance(space, s_tir.Schedule) else space[0]
            func = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            if NO_TENSORIZE in func.attrs:  # a rule's private marker (schedules/cuda.py), not the kernel's
                func = func.without_attr(NO_TENSORIZE)
            return func, rule
        return None, None

    def transform(self, mod):
        target = tvm.target.Target.current()
        self.kernels = []
        updated = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if _is_scheduled(func):  # a kernel of llmcc.kernels (or tuned: the pipeline lists those as such)
                self.kernels.append({"name": gvar.name_hint, "rule": KERNEL_SCHEDULE})
                continue
            if self.leave_reshapes and relax.analysis.has_reshape_pattern(func):
                self.kernels.append({"name": gvar.name_hint, "rule": RESHAPE_VIEW})
                continue
            new_func, rule = self._schedule(func, target)
            entry = {"name": gvar.name_hint, "rule": type(rule).__name__ if rule is not None else "none"}
            if getattr(rule, "tiles", None) is not None:
                entry["tiles"] = dataclasses.asdict(rule.tiles)
            self.kernels.append(entry)
            if new_func is not None:
                updated[gvar] = new_func
        for gvar, func in updated.items():
            mod[gvar] = func
        return mod, len(updated)
