"""expand_integer_power: x ** n for small integer n becomes multiplications; other exponents stay powers."""

import numpy as np
import pytest
import tvm
from tvm import relax

from llmcc.passes.expand_integer_power import ExpandIntegerPower


def _power_module(exponent, dtype="float32"):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 37), dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.power(x, relax.const(np.array(exponent, dtype))))
            out = bb.emit_output(relax.op.add(y, x))
        bb.emit_func_output(out)
    return bb.get()


def _ops(mod) -> list[str]:
    names = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: names.append(e.op.name) if isinstance(
        e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    return names


@pytest.mark.parametrize("exponent, multiplies, divides", [(3.0, 2, 0), (2.0, 1, 0), (1.0, 0, 0), (-2.0, 1, 1),
                                                           (4.0, 3, 0)])
def test_integer_exponents_expand_and_match_numpy(exponent, multiplies, divides, seed):
    p = ExpandIntegerPower()
    after = p(_power_module(exponent))
    ops = _ops(after)
    assert p.rewrites == 1 and "relax.power" not in ops
    assert ops.count("relax.multiply") == multiplies and ops.count("relax.divide") == divides
    x = np.random.default_rng(seed).uniform(0.5, 2.0, (4, 37)).astype(np.float32) * \
        np.random.default_rng(seed + 1).choice([-1, 1], (4, 37)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(after, target="llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    # |x| <= 2, so |x ** n| <= 16: a few float32 ulps of that, absolute (x ** n + x can cancel)
    np.testing.assert_allclose(got, x.astype(np.float64) ** exponent + x, rtol=1e-6, atol=16 * 2e-7,
                               err_msg=f"seed {seed}")


@pytest.mark.parametrize("exponent, dtype", [(0.5, "float32"), (5.0, "float32"), (2.5, "float32"), (0.0, "float32"),
                                             (3, "int32")])
def test_other_powers_stay(exponent, dtype):
    before = _power_module(exponent, dtype)
    p = ExpandIntegerPower()
    after = p(before)
    assert p.rewrites == 0
    tvm.ir.assert_structural_equal(after, before)
