"""Tuning database: ``llmcc tune`` tunes a static matmul kernel (MetaSchedule, XGBoost cost model, a few trials) into
a folder; compile applies a record for its own target, or a transferred one of the nearest target of the same kind,
and says which in the report; the folder survives corrupt lines, kills and concurrent writers; ``llmcc db``
lists, merges and prunes it."""

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import onnx
import pytest
from helpers import ROOT, run_cli
from onnx import TensorProto, helper, numpy_helper
from tvm.relax import TensorType

from llmcc.passes.pack_matmul_weights import panel_width
from llmcc.targets import resolve

M, K, N = 64, 128, 128
# the host's kernel: pack_matmul_weights names the matmul after its panel width (the host's register tile)
KERNEL = f"fused_matmul_packed_p{panel_width(resolve('cpu').tvm_target(), TensorType((M, K), 'float32'), N)}_add_relu"
AVX2_ONLY = {"kind": "llvm", "mattr": ["+avx2", "+fma"]}  # generic x86-64 plus AVX2: runs on any AVX2 machine
AVX512 = {"kind": "llvm", "mcpu": "skylake-avx512"}
SAPPHIRE_RAPIDS = {"kind": "llvm", "mcpu": "sapphirerapids"}  # AVX-512 and AMX: wider than any AVX-512-only CPU


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
    """(onnx path, db folder, summary, stderr): ``llmcc tune`` with 4 trials, a small population, 1 builder."""
    tmp = tmp_path_factory.mktemp("tune")
    model = _matmul_onnx(tmp / "mm.onnx")
    db = tmp / "db"
    r = run_cli("tune", model, "--target", "cpu", "--trials", "4", "--population", "32", "--workers", "1",
                "--seed", "0", "--db", db, "--json", tmp / "summary.json", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{KERNEL}: best" in r.stdout
    return model, db, json.loads((tmp / "summary.json").read_text()), r.stderr


def _retargeted(db, config, scale=1.0):
    """The records of ``db`` as if measured on ``config`` (times scaled)."""
    import tvm
    from tvm.s_tir.meta_schedule.database import TuningRecord

    from llmcc.tuning import TuningDatabase

    return [TuningRecord(r.trace, r.workload, [float(s) * scale for s in r.run_secs], tvm.target.Target(config),
                         r.args_info) for r in TuningDatabase(db).records()]


def _tuning(module):
    return {e["kernel"]: e for e in module.report["tuning"]}


def test_tune_writes_records_with_their_target_and_reports_progress(tuned):
    from llmcc.targets import resolve
    from llmcc.tuning import TuningDatabase, target_key

    _, db, summary, stderr = tuned
    (row,) = summary["kernels"]
    assert row["kernel"] == KERNEL and row["tuned"] and row["best_us"] > 0 and row["rule_measured_us"] > 0
    assert row["best_us"] <= row["rule_measured_us"]  # the rule's own record is kept: never slower than the rule
    assert summary["trials_run"] == summary["records_added"] >= 2 and summary["trials_before"] == 0
    records = TuningDatabase(db).records()
    assert records and all(target_key(r.target) == target_key(resolve("cpu")) for r in records)
    progress = [line for line in stderr.splitlines() if line.startswith("tune: ")]
    assert progress and "trials" in progress[-1] and "ETA" in progress[-1] and KERNEL in progress[-1]


def test_compile_applies_tuned_schedule_and_reports_it(tuned, tmp_path):
    import llmcc

    model, db, summary, _ = tuned
    module = llmcc.compile(model, target="cpu", tuning_db=db)
    entry = _tuning(module)[KERNEL]
    assert entry["provenance"] == "tuned" and entry["source_time_us"] == summary["kernels"][0]["best_us"]
    assert module.report["verify"]["passed"] is True  # vs onnxruntime
    assert next(p for p in module.report["passes"] if p["name"] == "apply_tuning_database")["rewrites"] == 1
    plain = llmcc.compile(model, target="cpu", verify=False)
    assert _tuning(plain)[KERNEL]["provenance"] == "rule"
    module.save(tmp_path / "m.llmcc")
    r = run_cli("inspect", tmp_path / "m.llmcc")
    assert r.returncode == 0 and "tuning    1 tuned" in r.stdout and f"{KERNEL}: tuned" in r.stdout


def test_nearest_cpu_target_transfers_but_never_a_wider_isa(tuned, tmp_path):
    """An AVX2-only record serves this machine when it has no record of its own; records of a CPU with vector
    features this one lacks (AVX-512, AMX), and CUDA records, never do."""
    import llmcc
    from llmcc.targets import resolve
    from llmcc.tuning import TuningDatabase, parse_target, target_key
    from llmcc.tuning.keys import vector_features

    here = vector_features(target_key(resolve("cpu")))
    if not vector_features(parse_target("llvm::+avx2,+fma")) <= here:
        pytest.skip("this CPU has no AVX2")
    wider = next((c for c in (AVX512, SAPPHIRE_RAPIDS) if not vector_features(parse_target(json.dumps(c))) <= here),
                 None)
    if wider is None:
        pytest.skip("this CPU has every vector feature of the wider CPUs this test knows")
    model, db, _, _ = tuned
    foreign = TuningDatabase(tmp_path / "foreign", create=True)
    foreign.add(_retargeted(db, wider, scale=0.5) + _retargeted(db, {"kind": "cuda", "arch": "sm_90"}, scale=0.1))
    module = llmcc.compile(model, target="cpu", tuning_db=foreign.path)
    assert _tuning(module)[KERNEL]["provenance"] == "rule"

    foreign.add(_retargeted(db, AVX2_ONLY, scale=2.0))
    module = llmcc.compile(model, target="cpu", tuning_db=foreign.path)
    entry = _tuning(module)[KERNEL]
    assert entry["provenance"] == "transferred:llvm::+avx2,+fma" and entry["source_time_us"] > 0
    assert module.report["verify"]["passed"] is True


def test_transfer_order():
    from llmcc.tuning import parse_target, transfer_order

    cuda = [parse_target(f"cuda:{a}") for a in ("sm_70", "sm_75", "sm_80", "sm_86", "sm_90")]
    assert transfer_order(cuda, parse_target("cuda:sm_89")) == [cuda[3], cuda[2], cuda[1], cuda[0], cuda[4]]
    assert transfer_order(cuda, parse_target("cuda:sm_90"))[0] == cuda[3]
    cpus = [parse_target(json.dumps(c)) for c in (AVX512, AVX2_ONLY, {"kind": "llvm"})]
    haswell = parse_target("llvm:haswell")
    assert transfer_order(cpus, haswell) == [cpus[1], cpus[2]]                       # avx2 nearer than sse2
    assert transfer_order(cpus, parse_target("llvm:skylake-avx512"))[:1] == [cpus[1]]  # avx2 runs on avx512
    assert parse_target("llvm::+avx2,+fma") == cpus[1]
    from llmcc.errors import LlmccError

    with pytest.raises(LlmccError, match="--target cuda:sm_x"):
        parse_target("cuda:sm_x")


def test_corrupt_line_is_skipped_with_a_warning_and_missing_db_is_an_error(tuned, tmp_path, caplog):
    import llmcc
    from llmcc.errors import LlmccError

    model, db, _, _ = tuned
    missing = tmp_path / "nope"
    with pytest.raises(LlmccError) as err:
        llmcc.compile(model, target="cpu", tuning_db=missing)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    r = run_cli("compile", model, "--tuning-db", missing, "-o", tmp_path / "out.llmcc")
    assert r.returncode == 2 and str(missing) in r.stderr and len(r.stderr.strip().splitlines()) == 1

    bad = tmp_path / "bad"
    shutil.copytree(db, bad)
    record_file = next(bad.glob("database_tuning_record*.json"))
    lines = record_file.read_text().splitlines()
    with open(record_file, "a") as f:
        f.write('[0, [[["GetSBlock"\n')  # a truncated line, as a killed writer leaves it
    with caplog.at_level(logging.WARNING, logger="llmcc"):
        module = llmcc.compile(model, target="cpu", tuning_db=bad, verify=False)
    assert _tuning(module)[KERNEL]["provenance"] == "tuned"
    assert f"{record_file}: line {len(lines) + 1} is corrupt" in caplog.text


WRITER = """
    import sys, time
    from tvm.s_tir.meta_schedule.database import TuningRecord
    from llmcc.tuning import TuningDatabase, shard_writer

    src, dst, tag, count, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    (rec,) = TuningDatabase(src).records()[:1]
    with shard_writer(dst) as shard:
        print("ready", flush=True)
        for i in range(count):
            shard.append(TuningRecord(rec.trace, rec.workload, [tag + i * 1e-6], rec.target, rec.args_info))
            time.sleep(pause)
"""


def _writer(script, src, dst, tag, count, pause):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(script), str(src), str(dst), str(tag), str(count), str(pause)],
                            env=env, stdout=subprocess.PIPE, text=True)


def test_concurrent_writers_and_a_kill_lose_nothing(tuned, tmp_path):
    """This process and another append to one database at once; then the other is killed mid-stream."""
    from tvm.s_tir.meta_schedule.database import TuningRecord

    from llmcc.tuning import TuningDatabase, list_database, shard_writer

    _, db, _, _ = tuned
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(WRITER))
    dst = TuningDatabase(tmp_path / "shared", create=True).path
    other = _writer(script, db, dst, 2, 2000, 0.005)
    assert other.stdout.readline().strip() == "ready"
    (rec,) = TuningDatabase(db).records()[:1]
    with shard_writer(dst) as shard:
        for i in range(20):
            shard.append(TuningRecord(rec.trace, rec.workload, [1 + i * 1e-6], rec.target, rec.args_info))
            time.sleep(0.01)
    other.send_signal(signal.SIGKILL)
    other.wait()
    tags = [int(e.raw[1][0]) for e in TuningDatabase(dst).entries]
    assert tags.count(1) == 20 and tags.count(2) >= 20
    assert list_database(dst)["shards"] == 2


def test_db_list_merge_prune(tuned, tmp_path, capsys):
    from llmcc.cli import main
    from llmcc.tuning import TuningDatabase

    _, db, _, _ = tuned
    other = TuningDatabase(tmp_path / "other", create=True)
    other.add(_retargeted(db, {"kind": "cuda", "arch": "sm_75"}) + _retargeted(db, AVX2_ONLY))
    n = len(TuningDatabase(db))
    assert main(["db", "merge", str(db), str(other.path), "-o", str(tmp_path / "merged")]) == 0
    merged = TuningDatabase(tmp_path / "merged")
    assert len(merged) == 3 * n and sorted(p.name for p in merged.path.glob("database_*.json")) == [
        "database_tuning_record.json", "database_workload.json"]
    assert main(["db", "list", str(merged.path)]) == 0
    out = capsys.readouterr().out
    assert "cuda:sm_75" in out and "llvm::+avx2,+fma" in out and f"{n:>6} records" in out
    assert main(["db", "prune", str(merged.path), "--target", "cuda:sm_75", "--keep-best", "1"]) == 0
    assert TuningDatabase(merged.path).targets() == {"llvm::+avx2,+fma": 1, **{
        k: 1 for k in TuningDatabase(db).targets()}}
    assert main(["db", "prune", str(merged.path), "--target", "cuda:sm_x"]) == 2
    assert "--target cuda:sm_x" in capsys.readouterr().err


def _big_shared_memory_record(arch):
    """C = A @ B with all of B [256, 128] copied into shared memory by every block (128 KiB: fits sm_90's 227 KiB,
    not sm_86's 99 KiB), as a record measured on ``arch``."""
    import tvm
    from tvm import s_tir, te
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.database import TuningRecord, Workload

    from llmcc.tuning import workload_module

    a, b = te.placeholder((64, 256), name="A"), te.placeholder((256, 128), name="B")
    k = te.reduce_axis((0, 256), "k")
    c = te.compute((64, 128), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    func = te.create_prim_func([a, b, c])
    sch = s_tir.Schedule(workload_module(func))
    block = sch.get_sblock("C")
    tile = sch.cache_read(block, 1, "shared.dyn")
    i, j, _ = sch.get_loops(block)
    sch.bind(i, "blockIdx.x")
    sch.bind(j, "threadIdx.x")
    sch.compute_at(tile, i)
    sch.bind(sch.get_loops(tile)[-1], "threadIdx.x")
    record = TuningRecord(sch.trace, Workload(workload_module(func)), [1e-5],
                          tvm.target.Target({"kind": "cuda", "arch": arch}), ms.arg_info.ArgInfo.from_prim_func(func))
    return func, record


@pytest.mark.cuda_build
@pytest.mark.skipif(not (shutil.which("nvcc") or os.access("/usr/local/cuda/bin/nvcc", os.X_OK)),
                    reason="needs nvcc (CUDA toolkit)")
def test_cuda_record_transfers_to_newer_archs_or_is_dropped_with_a_reason(tmp_path):
    """An sm_80 record replays and builds (nvcc) for sm_90, in a whole compile, and for sm_86; an sm_90 record
    whose shared memory exceeds sm_86's is dropped there, and the report says why."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.database import TuningRecord, Workload

    import llmcc
    from llmcc.targets import resolve
    from llmcc.tuning import TuningDatabase, choose_schedule, lowered_kernels, workload_module
    from llmcc.tuning.search import rule_trace

    model = _matmul_onnx(tmp_path / "mm.onnx")
    sm80 = resolve("cuda:sm_80")
    (name, func, _, _), = lowered_kernels(model, sm80)
    db = TuningDatabase(tmp_path / "db", create=True)
    db.add([TuningRecord(rule_trace(func, sm80), Workload(workload_module(func)), [2e-6], sm80.tvm_target(),
                         ms.arg_info.ArgInfo.from_prim_func(func))])
    module = llmcc.compile(model, target="cuda:sm_90", tuning_db=db.path, verify=False)
    assert _tuning(module)[name] == {"kernel": name, "provenance": "transferred:cuda:sm_80", "source_time_us": 2.0}
    assert module.report["cuda_binary"]["sass_archs"] == ["sm_90"]
    with resolve("cuda:sm_86").tvm_target() as sm86:
        assert choose_schedule(db, func, sm86).provenance == "transferred:cuda:sm_80"

    big, record = _big_shared_memory_record("sm_90")
    db.add([record])
    with resolve("cuda:sm_86").tvm_target() as sm86:
        choice = choose_schedule(db, big, sm86)
    assert choice.provenance == "rule" and choice.func is None
    assert choice.dropped == ("cuda:sm_90: exceeds sm_86's limits (1024 threads, 99 KiB shared memory per block)",)
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90"}) as sm90:
        assert choose_schedule(db, big, sm90).provenance == "tuned"


@pytest.mark.cuda_build
@pytest.mark.skipif(not (shutil.which("nvcc") or os.access("/usr/local/cuda/bin/nvcc", os.X_OK)),
                    reason="needs nvcc (CUDA toolkit)")
def test_cuda_tuning_builds_candidates_in_builder_workers_and_needs_a_tracker(tmp_path):
    """What ``llmcc tune --target cuda:ARCH`` can do without a GPU: its candidates build (nvcc, in MetaSchedule's
    builder processes) into artifacts an RPC runner uploads; measuring them needs --rpc-tracker."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from llmcc.errors import LlmccError
    from llmcc.targets import resolve
    from llmcc.tuning import tune, workload_module
    from llmcc.tuning.search import BUILD_FUNC, _register_build, rule_trace, tuning_target

    spec = resolve("cuda:sm_90")
    func, _ = _big_shared_memory_record("sm_90")
    sch = s_tir.Schedule(workload_module(func))
    rule_trace(func, spec).apply_to_schedule(sch, remove_postproc=False)
    builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=120, f_build=BUILD_FUNC, initializer=_register_build)
    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, tuning_target(spec))])
    assert built.error_msg is None and os.path.getsize(built.artifact_path) > 0
    with pytest.raises(LlmccError, match="tuning for cuda:sm_90 measures on a GPU: pass --rpc-tracker"):
        tune(tmp_path / "none.onnx", "cuda:sm_90", tmp_path / "db")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rpc_tracker_with_two_servers():
    """"127.0.0.1:PORT" of a TVM RPC tracker (tvm.exec.rpc_tracker) with two CPU servers (tvm.exec.rpc_server)
    under the key "llmcc-test", each in its own process group, killed whole afterwards (a server's forked worker
    outlives a plain kill)."""
    from tvm import rpc

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
             "--port-end", str(port + 1), "--silent"]
    procs = [subprocess.Popen(start, env=env, start_new_session=True)]
    try:
        for _ in range(2):
            server_port = _free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(server_port),
                 "--port-end", str(server_port + 20), "--tracker", f"127.0.0.1:{port}", "--key", "llmcc-test",
                 "--silent"], env=env, start_new_session=True))
        deadline = time.time() + 120
        while True:
            try:
                if rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"]["llmcc-test"]["free"] == 2:
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            assert time.time() < deadline, "the RPC tracker and its two servers did not come up in 120 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_tune_through_an_rpc_tracker_seeded_from_another_target_then_resumed(tuned, tmp_path,
                                                                           rpc_tracker_with_two_servers):
    """Candidates measured by MetaSchedule's RPCRunner on the tracker's two servers land in the database; the
    search starts from the rule schedule and, with --transfer-from, from another target's records replayed here;
    a second run with the same trial budget finds them all done."""
    from llmcc.errors import LlmccError
    from llmcc.targets import resolve
    from llmcc.tuning import TuningDatabase, tune

    model, db, _, _ = tuned
    tracker = rpc_tracker_with_two_servers
    other = TuningDatabase(tmp_path / "other", create=True)
    other.add(_retargeted(db, AVX2_ONLY))
    lines = []
    first = tune(model, "cpu", tmp_path / "db", trials=7, population=32, seed=0, rpc_tracker=tracker,
                 rpc_key="llmcc-test", transfer_from=other.path, progress=lines.append)
    assert first["runner"] == f"rpc {tracker} key llmcc-test (2 servers)"
    (row,) = first["kernels"]
    assert row["tuned"] and row["best_us"] > 0 and row["seeded_from"] == ["llvm::+avx2,+fma"]
    mine = TuningDatabase(tmp_path / "db").records(resolve("cpu"))
    assert len(mine) == first["trials_run"] >= 3
    assert {str(r.trace) for r in mine} & {str(r.trace) for r in other.records()}  # the seeds, measured here
    assert lines and lines[-1].startswith("tune: ")

    again = tune(model, "cpu", tmp_path / "db", trials=first["trials_run"], population=32, seed=0,
                 rpc_tracker=tracker, rpc_key="llmcc-test", transfer_from=other.path, progress=lines.append)
    assert again["trials_before"] == first["trials_run"] and again["trials_run"] == 0
    assert "nothing to run" in lines[-1]

    with pytest.raises(LlmccError, match="--rpc-key nope: no server registered"):
        tune(model, "cpu", tmp_path / "db", trials=3, rpc_tracker=tracker, rpc_key="nope")
    with pytest.raises(LlmccError, match="--rpc-tracker 127.0.0.1:1: cannot reach"):
        tune(model, "cpu", tmp_path / "db", trials=3, rpc_tracker="127.0.0.1:1", rpc_key="llmcc-test")


def test_replay_leaves_the_kernel_unscheduled(tuned):
    """Replaying a record must not rewrite the kernel it starts from: choose_schedule tries several records on one
    kernel, and after an in-place rewrite none of the later ones replayed ("does not replay")."""
    import tvm

    from llmcc.tuning import TuningDatabase
    from llmcc.tuning.transfer import replay

    _, db, _, _ = tuned
    records = TuningDatabase(db).records()
    func = records[0].workload.mod["main"]
    before = tvm.ir.save_json(func)
    for rec in records:
        replay(func, rec)
        assert tvm.ir.save_json(func) == before
