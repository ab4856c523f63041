"""apply_tuning_database: give every kernel with a usable tuning record its tuned schedule.

Runs in the schedule phase before apply_schedule_rules. For each unscheduled PrimFunc it asks
llmcc.tuning.choose_schedule for a schedule on the compile target: the fastest record measured on that target, else
a record of the nearest target of the same kind that replays, fits the target's limits and builds for it
(llmcc.tuning.transfer). The chosen trace is replayed and the kernel marked ``tirx.is_scheduled``, so
apply_schedule_rules leaves it alone; kernels without one are left for the rules. ``self.choices`` says for every
kernel looked at where its schedule came from (the compile report's "tuning" entries).

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
        self.kernels: list[dict] = []  # [{"name", "rule": "tuned"}] for the kernels given a record's schedule
        self.choices: dict[str, object] = {}  # kernel name -> llmcc.tuning.ScheduleChoice

    def transform(self, mod):
        from llmcc.tuning import choose_schedule

        target = tvm.target.Target.current()
        self.kernels, self.choices = [], {}
        updated = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False)):
                continue
            if self.leave_reshapes and relax.analysis.has_reshape_pattern(func):
                continue
            choice = self.choices[gvar.name_hint] = choose_schedule(self.database, func, target)
            if choice.func is None:
                continue
            self.kernels.append({"name": gvar.name_hint, "rule": "tuned"})
            updated[gvar] = choice.func
        for gvar, func in updated.items():
            mod[gvar] = func
        return mod, len(updated)
