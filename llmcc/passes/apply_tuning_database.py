"""apply_tuning_database: give every kernel with a matching tuning record its tuned schedule.

Runs in the schedule phase before apply_schedule_rules. For each unscheduled PrimFunc it asks the llmcc.tuning
TuningDatabase for the fastest record of that kernel measured on a target matching the compile target (see
llmcc.tuning.target_key: llvm by kind + mcpu + mattr, CUDA by arch; records of other targets are never used), replays
the record's MetaSchedule trace and marks the kernel ``tirx.is_scheduled``, so apply_schedule_rules leaves it alone.
Kernels without a matching record are left for the rules. ``self.kernels`` lists the tuned ones with rule "tuned".

Before::

    @T.prim_func
    def fused_matmul_add_relu(x: T.Buffer((64, 128)), w: T.Buffer((128, 128)), ...): ...          # plain loops

After::

    @T.prim_func
    def fused_matmul_add_relu(...):
        T.func_attr({"tirx.is_scheduled": True, ...})
        for i0_0_i1_0_fused in T.parallel(16): ...                                  # the tuned trace, replayed
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from llmcc.passes import LlmccPass


class ApplyTuningDatabase(LlmccPass):
    name = "apply_tuning_database"

    def __init__(self, database, leave_reshapes: bool = False) -> None:
        """``database``: a llmcc.tuning.TuningDatabase. ``leave_reshapes``: as in ApplyScheduleRules (a pure
        reshape stays unscheduled so it can become a view)."""
        super().__init__()
        self.database = database
        self.leave_reshapes = leave_reshapes
        self.kernels: list[dict] = []  # [{"name", "rule": "tuned", "tuned_us"}]

    def transform(self, mod):
        from llmcc.tuning import run_secs

        target = tvm.target.Target.current()
        self.kernels = []
        updated = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False)):
                continue
            if self.leave_reshapes and relax.analysis.has_reshape_pattern(func):
                continue
            new_func, rec = self.database.schedule(func, target)
            if new_func is None:
                continue
            secs = run_secs(rec)
            self.kernels.append({"name": gvar.name_hint, "rule": "tuned",
                                 "tuned_us": round(secs * 1e6, 2) if secs is not None else None})
            updated[gvar] = new_func
        for gvar, func in updated.items():
            mod[gvar] = func
        return mod, len(updated)
