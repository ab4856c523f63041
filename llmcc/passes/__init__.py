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
