"""Tuning database: tools/tune.py tunes a static matmul kernel (MetaSchedule, XGBoost cost model, a few trials) into
a folder; compile applies the record only for the target it was measured on; a bad folder is a one-line error."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import ROOT, run_cli

M, K, N = 64, 128, 128
KERNEL = "fused_matmul_add_relu"


def _matmul_onnx(path):
    """x[64, 128] @ W + b -> relu: one static kernel that MetaSchedule can measure."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["yb"]),
             helper.make_node("Relu", ["yb"], ["out"])]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [M, N])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(onnx path, db folder, tools/tune.py summary): 4 trials, small population, 1 builder worker; records kept
    even if 4 trials do not beat the rule schedule on a busy machine (what is applied is what is tested here)."""
    tmp = tmp_path_factory.mktemp("tune")
    model = _matmul_onnx(tmp / "mm.onnx")
    db = tmp / "db"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [str(model), "--target", "cpu", "--trials", "4", "--population", "32", "--workers", "1", "--keep-slower",
            "--seed", "0", "--db", str(db), "--json", str(tmp / "summary.json")]
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "tune.py"), *args], capture_output=True, text=True,
                       env=env, timeout=300, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{KERNEL}: best" in r.stdout
    return model, db, json.loads((tmp / "summary.json").read_text())


def _rules(module):
    return {k["name"]: k["rule"] for k in module.report["kernels"]}


def test_tune_writes_records_with_their_target(tuned):
    from llmcc.targets import resolve
    from llmcc.tuning import TuningDatabase, target_key

    _, db, summary = tuned
    (row,) = summary["kernels"]
    assert row["kernel"] == KERNEL and row["tuned"] and row["best_us"] > 0 and row["rule_measured_us"] > 0
    assert summary["records_added"] >= 1
    records = TuningDatabase(db).records()
    assert records and all(target_key(r.target) == target_key(resolve("cpu")) for r in records)


def test_compile_applies_tuned_schedule_and_verifies(tuned):
    import llmcc

    model, db, _ = tuned
    module = llmcc.compile(model, target="cpu", tuning_db=db)
    assert _rules(module) == {KERNEL: "tuned"}
    assert module.report["verify"]["passed"] is True  # vs onnxruntime
    assert next(p for p in module.report["passes"] if p["name"] == "apply_tuning_database")["rewrites"] == 1
    plain = llmcc.compile(model, target="cpu", verify=False)
    assert _rules(plain)[KERNEL] != "tuned"


def test_records_of_other_targets_are_not_applied(tuned, tmp_path):
    import tvm

    import llmcc
    from llmcc.targets import resolve
    from llmcc.tuning import TuningDatabase

    model, db, _ = tuned
    mine = resolve("cpu")
    others = [{"kind": "llvm", "mcpu": "skylake-avx512"},                       # another CPU model
              {"kind": "llvm", "mcpu": mine.mcpu, "mattr": ["+avx512f"]},      # same model, other features
              {"kind": "cuda", "arch": "sm_90"}]
    foreign = TuningDatabase(tmp_path / "foreign", create=True)
    from tvm.s_tir.meta_schedule.database import TuningRecord

    for config in others:
        foreign.add(TuningRecord(r.trace, r.workload, r.run_secs, tvm.target.Target(config), r.args_info)
                    for r in TuningDatabase(db).records())
    reopened = TuningDatabase(tmp_path / "foreign")
    assert len(reopened.targets()) == 3 and not reopened.records(mine)
    module = llmcc.compile(model, target="cpu", tuning_db=tmp_path / "foreign")
    assert _rules(module)[KERNEL] != "tuned"
    assert module.report["verify"]["passed"] is True


def test_target_key_rule():
    import tvm

    from llmcc.tuning import target_key

    a = target_key(tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "mattr": ["-avx512f"], "num-cores": 2}))
    assert a == target_key({"kind": "llvm", "mcpu": "znver4", "mattr": ["-avx512f"]})  # num-cores ignored
    assert a != target_key({"kind": "llvm", "mcpu": "znver4"})
    assert target_key({"kind": "cuda", "arch": "sm_80"}) != target_key({"kind": "cuda", "arch": "sm_90"})


def test_missing_or_corrupt_db_is_a_one_line_error(tuned, tmp_path):
    import llmcc
    from llmcc.errors import LlmccError

    model, db, _ = tuned
    missing = tmp_path / "nope"
    with pytest.raises(LlmccError) as err:
        llmcc.compile(model, target="cpu", tuning_db=missing)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)

    bad = tmp_path / "bad"
    shutil.copytree(db, bad)
    with open(bad / "database_tuning_record.json", "a") as f:
        f.write('[0, [[["GetSBlock"\n')  # a truncated line, as a killed writer leaves it
    with pytest.raises(LlmccError) as err:
        llmcc.compile(model, target="cpu", tuning_db=bad)
    msg = str(err.value)
    assert "database_tuning_record.json" in msg and "line" in msg and "\n" not in msg

    r = run_cli("compile", model, "--tuning-db", missing, "-o", tmp_path / "out.llmcc")
    assert r.returncode == 2 and str(missing) in r.stderr and len(r.stderr.strip().splitlines()) == 1
