"""Length buckets: which kernels may be padded along their symbolic sizes (and which must not), tuning at bucket
sizes, and the compiled dispatcher that runs a bucket's tuned static kernel on padded rows where it pays, checked
against numpy at lengths inside, at the edges of and outside every bucket, with the kernels the VM actually called."""

import json

import numpy as np
import onnx
import pytest
import tvm
from helpers import run_cli
from onnx import TensorProto, helper, numpy_helper
from tvm import te, tirx

from llmcc.tuning import buckets as lb

K, N = 256, 192


def _func(*tensors):
    return te.create_prim_func(list(tensors))


def _matmul_rows(n):
    """x[n, K] @ w[K, N]: rows independent along n."""
    x, w = te.placeholder((n, K), "float32", "x"), te.placeholder((K, N), "float32", "w")
    k = te.reduce_axis((0, K), "k")
    return _func(x, w, te.compute((n, N), lambda i, j: te.sum(x[i, k] * w[k, j], axis=k), name="y"))


def test_row_independent_kernels_qualify():
    n, b = tirx.Var("sequence", "int64"), tirx.Var("batch", "int64")
    assert lb.bucket_reason(_matmul_rows(n)) == ([n], None)
    x = te.placeholder((b, n, K), "float32", "x")
    k = te.reduce_axis((0, K), "k")
    norm = te.compute((b, n), lambda i, j: te.sum(x[i, j, k] * x[i, j, k], axis=k), name="sumsq")
    variables, reason = lb.bucket_reason(_func(x, norm))
    assert reason is None and [v.name for v in variables] == ["batch", "sequence"]


def test_kernels_that_must_not_be_padded():
    n = tirx.Var("sequence", "int64")
    x = te.placeholder((n, K), "float32", "x")
    r = te.reduce_axis((0, n), "r")
    over_keys = _func(x, te.compute((K,), lambda j: te.sum(x[r, j], axis=r), name="colsum"))
    assert "reduces along sequence" in lb.bucket_reason(over_keys)[1]
    scores = _func(x, te.compute((n, n), lambda i, j: x[i, 0] * x[j, 0], name="scores"))
    assert "iterates sequence twice" in lb.bucket_reason(scores)[1]
    causal = _func(x, te.compute((n, K), lambda i, j: tvm.tirx.if_then_else(i < n - 1, x[i, j], 0.0), name="c"))
    assert "uses sequence in its computation" in lb.bucket_reason(causal)[1]
    flipped = _func(x, te.compute((n, K), lambda i, j: x[n - 1 - i, j], name="flip"))
    assert lb.bucket_reason(flipped)[1] is not None
    table = te.placeholder((512, K), "float32", "pos")
    positions = _func(x, table, te.compute((n, K), lambda i, j: x[i, j] + table[i, j], name="pos_add"))
    assert "outside its sequence dimension" in lb.bucket_reason(positions)[1]
    scale = tirx.Var("scale", "int64")
    by_value = _func(x, te.compute((n, K), lambda i, j: x[i, j] * scale.astype("float32"), name="s"), scale)
    assert "scalar parameter" in lb.bucket_reason(by_value)[1]
    y = te.placeholder((n + 1, K), "float32", "y")
    assert "expression" in lb.bucket_reason(_func(y, te.compute((n + 1, K), lambda i, j: y[i, j], name="c")))[1]


def test_tuning_bindings_and_specialize():
    n, b = tirx.Var("sequence", "int64"), tirx.Var("batch", "int64")
    x = te.placeholder((b, n, K), "float32", "x")
    func = _func(x, te.compute((b, n, K), lambda i, j, k: x[i, j, k] * 2.0, name="y"))
    bindings, reason = lb.tuning_bindings(func, (16, 64), {"batch": 2})
    assert reason is None and bindings == [{"batch": 2, "sequence": 16}, {"batch": 2, "sequence": 64}]
    assert "--dims" in lb.tuning_bindings(func, (16,), {})[1]
    assert "--buckets" in lb.tuning_bindings(func, (), {"batch": 1})[1]
    static = lb.specialize(func, bindings[1])
    assert [[int(d) for d in p.shape] for p in static.params] == [[2, 64, K], [2, 64, K]]
    with pytest.raises(ValueError, match="sequence"):
        lb.specialize(func, {"batch": 1})


def test_lowest_elements():
    assert lb.lowest_elements(128, 25.0, 100.0) == int(128 * 0.25 * 1.05) + 1  # 4x faster: from 34 rows on
    assert lb.lowest_elements(128, 99.0, 100.0) > 128  # not faster by the margin: never
    assert lb.lowest_elements(128, 10.0, None) == 128  # no rule time: its own size only


def _model(path, seed):
    """x[batch, seq, K] @ W + b -> relu: a kernel with two symbolic sizes, rows independent."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((K, N)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["yb"]),
             helper.make_node("Relu", ["yb"], ["out"])]
    graph = helper.make_graph(
        nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", N])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path, w, b


@pytest.fixture(scope="module")
def bucket_db(tmp_path_factory):
    """(model, W, b, database folder, summary): ``llmcc tune --buckets 16,32 --dims batch=2``, a few trials (4 per
    round, so that both buckets get some after the two rule schedules)."""
    tmp = tmp_path_factory.mktemp("buckets")
    model, w, b = _model(tmp / "mm.onnx", 0)
    db = tmp / "db"
    r = run_cli("tune", model, "--target", "cpu", "--trials", "10", "--population", "32", "--seed", "0",
                "--trials-per-round", "4", "--buckets", "16,32", "--dims", "batch=2", "--db", db,
                "--json", tmp / "summary.json", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return model, w, b, db, json.loads((tmp / "summary.json").read_text())


def test_tune_measures_each_bucket(bucket_db):
    from llmcc.tuning import TuningDatabase

    _, _, _, db, summary = bucket_db
    names = [k["kernel"] for k in summary["kernels"]]
    assert any(n.endswith("@batch=2,seq=16") for n in names) and any(n.endswith("@batch=2,seq=32") for n in names)
    shapes = TuningDatabase(db).argument_shapes()
    assert any(args[0] == ("float32", (2, 16, K)) for args in shapes), shapes


def _faster_copy(db, out, factor):
    """``db``'s records plus, per workload, its slowest record made ``factor`` times faster than the rule's: a
    stand-in for a long tune that beat the rule (a few trials rarely do)."""
    from tvm.s_tir.meta_schedule.database import TuningRecord

    from llmcc.tuning import TuningDatabase
    from llmcc.tuning.database import run_secs, workload_hash

    records = TuningDatabase(db).records()
    by_workload: dict = {}
    for r in records:
        by_workload.setdefault(workload_hash(r.workload.mod), []).append(r)
    extra = []
    for recs in by_workload.values():
        ran = sorted((r for r in recs if run_secs(r) is not None), key=run_secs)
        if len(ran) >= 2:
            extra.append(TuningRecord(ran[-1].trace, ran[-1].workload, [run_secs(ran[0]) / factor],
                                      ran[-1].target, ran[-1].args_info))
    TuningDatabase(out, create=True).add(records + extra)
    return out


def _called(module, x):
    names = []
    module._ensure_loaded()
    module._vm.set_instrument(lambda func, name, before, *rest: (names.append(name) if before else None) or 0)
    out = module(x)
    module._vm.set_instrument(None)
    return np.asarray(out[0] if isinstance(out, (list, tuple)) else out), names


def test_dispatcher_runs_buckets_where_they_pay_and_the_rule_elsewhere(bucket_db, tmp_path, seed):
    import llmcc

    model, w, b, db, _ = bucket_db
    faster = _faster_copy(db, tmp_path / "faster", 8.0)
    module = llmcc.compile(model, target="cpu", tuning_db=faster)
    entry = next(e for e in module.report["tuning"] if e.get("buckets"))
    buckets = {tuple(sorted(bk["sizes"].items())): bk for bk in entry["buckets"]}
    assert set(buckets) == {(("batch", 2), ("seq", 16)), (("batch", 2), ("seq", 32))}
    small, large = buckets[(("batch", 2), ("seq", 16))], buckets[(("batch", 2), ("seq", 32))]
    assert 1 <= small["min_elements"] <= 32 and large["min_elements"] <= 64
    provenance = {e["kernel"]: e["provenance"] for e in module.report["tuning"]}
    assert provenance[small["kernel"]] == provenance[large["kernel"]] == "tuned"
    rng = np.random.default_rng(seed)

    def expected(batch, length):
        """The smallest bucket the shape fits in with at least its min_elements (its own sizes always), else the
        rule's kernel; and whether the rows are padded."""
        for bk in (small, large):
            if (batch, length) == (2, bk["sizes"]["seq"]):
                return bk["kernel"], False
            if batch <= 2 and length <= bk["sizes"]["seq"] and batch * length >= bk["min_elements"]:
                return bk["kernel"], True
        return None, False

    # min_elements come from measured timings: the last shapes sit just at and below each bucket's threshold, so
    # that some shape takes the padded path whatever they are (but for both at their bucket's full size)
    low, high = int(small["min_elements"]), int(large["min_elements"])
    shapes = [(2, 16), (1, 16), (2, 17), (2, 32), (1, 32), (2, 33), (3, 8), (1, 1),
              (2, low // 2), (2, -(-low // 2)), (1, low), (2, -(-high // 2)), (1, high), (1, high - 1)]
    cases = {s: expected(*s) for s in shapes if s[1] >= 1}
    assert cases[(2, 16)][0] == small["kernel"] and cases[(2, 32)][0] == large["kernel"]
    assert any(padded for _, padded in cases.values()), (small, large)  # the padded path is exercised too
    for (batch, length), (expected, padded) in cases.items():
        x = rng.standard_normal((batch, length, K)).astype(np.float32)
        got, called = _called(module, x)
        # float32 sums of K = 256 products of size ~1 against float64: ~1e-5 absolute on outputs of size ~16
        ref = np.maximum(x.astype(np.float64) @ w + b, 0)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4, err_msg=f"seed {seed} batch {batch} seq {length}")
        ran = [n for n in called if n.startswith("fused_matmul") and not n.endswith(("_buckets", "_padded"))]
        assert ran == [expected or entry["kernel"]], (batch, length, called)
        assert any(n.startswith("pad_rows") for n in called) == padded, (batch, length, called)


def test_buckets_no_faster_than_the_rule_are_not_used(bucket_db, tmp_path):
    """Every record as fast as the rule's own: padding cannot pay, so no dispatch, and the report says why."""
    from tvm.s_tir.meta_schedule.database import TuningRecord

    import llmcc
    from llmcc.tuning import TuningDatabase

    model, _, _, db, _ = bucket_db
    equal = TuningDatabase(tmp_path / "equal", create=True)
    equal.add([TuningRecord(r.trace, r.workload, [1e-4], r.target, r.args_info) for r in TuningDatabase(db).records()])
    module = llmcc.compile(model, target="cpu", tuning_db=equal.path)
    entries = [e for e in module.report["tuning"] if e["kernel"].startswith("fused_matmul")]
    assert len(entries) == 1 and not entries[0].get("buckets"), entries
    assert any("is not 5% under the rule's 100.00 us" in d for d in entries[0]["dropped"]), entries


def test_dispatcher_builds_for_cuda(tmp_path, monkeypatch):
    """sm_80: the bucket's static kernel (an sm_80 record: the rule's dlight schedule, as if tuned) and the
    dispatcher's pad and take kernels cross-compile with nvcc; the rule's time is patched in, a CUDA record of it
    being unmeasurable here."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.database import TuningRecord, Workload

    import llmcc
    from llmcc.passes.dispatch_length_buckets import DispatchLengthBuckets
    from llmcc.targets import resolve
    from llmcc.tuning import TuningDatabase, lowered_kernels, workload_module
    from llmcc.tuning.search import rule_trace

    model, _, _ = _model(tmp_path / "mm.onnx", 1)
    sm80 = resolve("cuda:sm_80")
    kernels = [(f, n) for n, f, reason, _ in lowered_kernels(model, sm80, (16,), {"batch": 2}) if reason is None]
    assert [n.split("@")[1] for _, n in kernels] == ["batch=2,seq=16"]
    db = TuningDatabase(tmp_path / "db", create=True)
    db.add([TuningRecord(rule_trace(f, sm80), Workload(workload_module(f)), [2e-6], sm80.tvm_target(),
                         ms.arg_info.ArgInfo.from_prim_func(f)) for f, _ in kernels])
    monkeypatch.setattr(DispatchLengthBuckets, "_rule_us", lambda self, static, source: 100.0)
    module = llmcc.compile(model, target="cuda:sm_80", tuning_db=db.path)
    entry = next(e for e in module.report["tuning"] if e.get("buckets"))
    assert entry["buckets"][0]["sizes"] == {"batch": 2, "seq": 16}
    assert 1 <= entry["buckets"][0]["min_elements"] < 32  # the padded path is built too
    module.save(tmp_path / "mm.llmcc")


def test_sizes_only_an_output_has_are_not_dispatched():
    """A broadcast to [batch, seq, K] from [seq, K]: the dispatcher could not read batch off its inputs."""
    from llmcc.passes.dispatch_length_buckets import _output_only_sizes

    n, b = tirx.Var("seq", "int64"), tirx.Var("batch", "int64")
    x = te.placeholder((n, K), "float32", "x")
    func = _func(x, te.compute((b, n, K), lambda i, j, k: x[j, k], name="y"))
    assert _output_only_sizes(func, 1) == {"batch"}
    assert _output_only_sizes(_matmul_rows(n), 2) == set()
