"""fold_lora_branches: x @ W + (x @ A) @ B * s becomes x @ (W + A @ B * s); look-alikes stay as they are.

Numerics: fp32 against numpy (or torch for the exported PEFT model), relative error <= 1e-5, on fresh random inputs.
"""

import copy

import numpy as np
import pytest
import tvm
from tvm import relax

from helpers import HIDDEN, VOCAB, make_tiny_mlp
from llmcc.passes.fold_lora_branches import FoldLoraBranches
from llmcc.verify import relative_error

M, K, N, R = 6, 16, 8, 2
TOL = 1e-5


def _matmuls(mod) -> int:
    n = 0

    def visit(e):
        nonlocal n
        n += isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.matmul"

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return n


def _weights(rng, b_cols=N):
    f = np.float32
    return {"w": rng.standard_normal((K, N)).astype(f), "bias": rng.standard_normal(N).astype(f),
            "a": rng.standard_normal((K, R)).astype(f), "b": rng.standard_normal((R, b_cols)).astype(f),
            "a2": rng.standard_normal((K, R + 1)).astype(f), "b2": rng.standard_normal((R + 1, N)).astype(f)}


def _module(w, *, build_branches, extra_params=()):
    """main(x [M, K], *extra_params) = add-chain of matmul(x, W) + bias and the branches ``build_branches`` emits."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((M, K), "float32"))
    with bb.function("main", [x, *extra_params]):
        with bb.dataflow():
            base = bb.emit(relax.op.add(bb.emit(relax.op.matmul(x, relax.const(w["w"]))), relax.const(w["bias"])))
            out = build_branches(bb, x, base)
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, *args) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(a) for a in args)).numpy()


def test_scaled_branch_after_bias_folds_into_one_matmul():
    """PEFT's form: base layer with bias, then + (x @ A) @ B * s, scale on the right."""
    rng = np.random.default_rng()
    w = _weights(rng)

    def branch(bb, x, base):
        lora = bb.emit(relax.op.matmul(bb.emit(relax.op.matmul(x, relax.const(w["a"]))), relax.const(w["b"])))
        return relax.op.add(base, bb.emit(relax.op.multiply(lora, relax.const(np.float32(0.5)))))

    before = _module(w, build_branches=branch)
    p = FoldLoraBranches()
    after = p(before)
    assert p.rewrites == 1 and _matmuls(after) == 1
    x = rng.standard_normal((M, K)).astype(np.float32)
    ref = x @ w["w"] + w["bias"] + (x @ w["a"]) @ w["b"] * 0.5
    assert relative_error(_run(after, x), ref) <= TOL


def test_two_branches_either_order_scale_left_per_column_or_absent():
    """Two adapters on one layer: the branch first in the add, a per-column scale on the left; then one unscaled."""
    rng = np.random.default_rng()
    w = _weights(rng)
    s = rng.standard_normal(N).astype(np.float32)

    def branches(bb, x, base):
        lora1 = bb.emit(relax.op.matmul(bb.emit(relax.op.matmul(x, relax.const(w["a"]))), relax.const(w["b"])))
        y = bb.emit(relax.op.add(bb.emit(relax.op.multiply(relax.const(s), lora1)), base))
        lora2 = bb.emit(relax.op.matmul(bb.emit(relax.op.matmul(x, relax.const(w["a2"]))), relax.const(w["b2"])))
        return relax.op.add(y, lora2)

    p = FoldLoraBranches()
    after = p(_module(w, build_branches=branches))
    assert p.rewrites == 2 and _matmuls(after) == 1
    x = rng.standard_normal((M, K)).astype(np.float32)
    ref = x @ w["w"] + w["bias"] + (x @ w["a"]) @ w["b"] * s + (x @ w["a2"]) @ w["b2"]
    assert relative_error(_run(after, x), ref) <= TOL


@pytest.mark.parametrize("case", ["a_is_an_input", "other_x", "product_shape_differs", "per_row_scale"])
def test_must_not_fire(case):
    """A non-constant A, a branch reading another x, A @ B of another shape than W (broadcast by the add), and a
    scale that varies per row (not a property of the weight) all stay as they are."""
    rng = np.random.default_rng(0)
    w = _weights(rng, b_cols=1 if case == "product_shape_differs" else N)
    a_param = relax.Var("a", relax.TensorType((K, R), "float32"))
    x2 = relax.Var("x2", relax.TensorType((M, K), "float32"))
    extra = {"a_is_an_input": (a_param,), "other_x": (x2,)}.get(case, ())

    def branch(bb, x, base):
        a = a_param if case == "a_is_an_input" else relax.const(w["a"])
        xb = x2 if case == "other_x" else x
        lora = bb.emit(relax.op.matmul(bb.emit(relax.op.matmul(xb, a)), relax.const(w["b"])))
        scale = rng.standard_normal((M, 1)).astype(np.float32) if case == "per_row_scale" else np.float32(2.0)
        return relax.op.add(base, bb.emit(relax.op.multiply(lora, relax.const(scale))))

    before = _module(w, build_branches=branch, extra_params=extra)
    p = FoldLoraBranches()
    after = p(before)
    assert p.rewrites == 0
    tvm.ir.assert_structural_equal(after, before)


def test_exported_peft_model_with_two_adapters_compiles_to_plain_matmuls():
    """A PEFT model exported with its LoRA branches (two adapters on every Linear, one unscaled) compiles with every
    branch folded and matches the PEFT model in torch."""
    import torch
    from peft import LoraConfig, get_peft_model

    import llmcc

    torch.manual_seed(int(np.random.default_rng().integers(1 << 31)))
    model = get_peft_model(make_tiny_mlp(), LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"],
                                                       init_lora_weights=False))
    model.add_adapter("second", LoraConfig(r=3, lora_alpha=3, target_modules=["up", "down"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    inner = model.base_model.model.eval()  # PeftModel.forward(*args) does not export with dynamic shapes
    ids = torch.randint(0, VOCAB, (2, 7))
    compiled = llmcc.compile(copy.deepcopy(inner), example_inputs=(ids,), target="cpu")
    folded = {p["name"]: p["rewrites"] for p in compiled.report["passes"]}["fold_lora_branches"]
    assert folded == 8  # 2 blocks x 2 layers x 2 adapters

    ids = torch.randint(0, VOCAB, (3, 11))
    with torch.no_grad():
        ref = inner(ids).numpy()
    out = compiled(input_ids=ids.numpy())
    assert out.shape == (3, 11, HIDDEN)
    assert relative_error(out, ref) <= TOL
