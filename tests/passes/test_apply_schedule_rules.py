"""apply_schedule_rules: rules in order, a raising rule declines, every kernel's rule recorded."""

import tvm
from tvm import relax
from tvm.s_tir import dlight as dl
from tvm.script import relax as R

from llmcc.passes.apply_schedule_rules import ApplyScheduleRules


@tvm.script.ir_module
class MatmulSoftmax:
    @R.function
    def main(x: R.Tensor((32, 64), "float32"), w: R.Tensor((64, 128), "float32")):
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.nn.softmax(y, axis=-1)
            R.output(z)
        return z


class Exploding:
    def apply(self, func, target, tunable):
        raise RuntimeError("cannot handle this kernel")


def _lowered():
    return relax.transform.LegalizeOps()(MatmulSoftmax)


def test_every_kernel_gets_a_rule_and_a_raising_rule_is_skipped():
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    p = ApplyScheduleRules([Exploding(), dl.gpu.Matmul(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                            dl.gpu.Fallback()])
    with target:
        after = p(_lowered())
    rules = {k["name"]: k["rule"] for k in p.kernels}
    assert rules["matmul"] == "Matmul" and rules["softmax"] in ("GeneralReduction", "Reduction", "Fallback")
    assert p.rewrites == len(rules) == 2
    assert all(f.attrs["tirx.is_scheduled"] for _, f in after.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


def test_no_rule_applies_nothing_changes():
    class Never:
        def apply(self, func, target, tunable):
            return None

    before = _lowered()
    p = ApplyScheduleRules([Never()])
    with tvm.target.Target({"kind": "cuda", "arch": "sm_80"}):
        after = p(before)
    assert p.rewrites == 0 and {k["rule"] for k in p.kernels} == {"none"}
    tvm.ir.assert_structural_equal(after, before)
