"""Choosing a kernel's schedule from the database for a compile target: its own record, else a transferred one.

Lookup order for kernel K compiling for target T (llmcc.tuning.keys has the distance rule):

    1. T's own records for K, fastest first: replayed as they are ("tuned").
    2. Records of the nearest other target of T's kind that has some for K, then the next nearest...: each is
       replayed onto K, checked against T's limits (CUDA: threads per block and shared memory, by MetaSchedule's
       VerifyGPUCode postprocessor with T's limits) and built for T on its own (LLVM, or nvcc for the arch); the first
       that passes is used ("transferred:<source key>"). At most MAX_TRIES_PER_SOURCE records per source target.
    3. None: the schedule rules take K ("rule"); ``dropped`` says why each record tried was not used.

A record's time is the time measured on its own target (``source_time_us``): for a transferred one, not T's.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass

from llmcc.tuning.database import run_secs, workload_module
from llmcc.tuning.keys import cuda_limits, describe_key, target_key, transfer_order

MAX_TRIES_PER_SOURCE = 3


@dataclass(frozen=True)
class ScheduleChoice:
    """Where one kernel's schedule comes from (``func`` is None for "rule")."""

    func: object
    provenance: str                      # "tuned" | "transferred:<key>" | "rule"
    source_time_us: float | None = None  # the record's measured time on its own target
    dropped: tuple[str, ...] = ()        # "<key>: why" for every record tried and not used
    source: tuple | None = None          # the target key the record was measured on


@contextlib.contextmanager
def tensor_intrinsics_only(*families: str):
    """Import only these tensor-intrinsic families (``"x86"``, ``"cuda"``) of tvm.s_tir.tensor_intrin while the
    block runs, when the package is not imported yet.

    Why: MetaSchedule's TuneContext imports the package, whose ``__init__`` imports every intrinsic (the CUDA ones
    are ~30 s of TVMScript parsing, minutes on a busy machine). A stand-in package module loads just the families
    asked for (submodules still import on demand)."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    import tvm.s_tir

    real = importlib.util.find_spec(name)
    stub = types.ModuleType(name)
    stub.__path__ = list(real.submodule_search_locations)
    stub.__package__ = name
    sys.modules[name] = stub
    try:
        for family in families:
            importlib.import_module(f"{name}.{family}")
        yield
    finally:
        sys.modules.pop(name, None)
        if getattr(tvm.s_tir, "tensor_intrin", None) is stub:
            del tvm.s_tir.tensor_intrin


def replay(func, record):
    """``func`` scheduled by ``record``'s trace (its attributes kept, marked tirx.is_scheduled); ``func`` itself is
    left as it was."""
    import tvm
    from tvm import s_tir

    if "Tensorize" in str(record.trace):  # the trace names tensor intrinsics: register its target's family
        importlib.import_module("tvm.s_tir.tensor_intrin." + ("cuda" if target_key(record.target)[0] == "cuda"
                                                              else "x86"))
    # on a deep copy: scheduling the module made from ``func`` rewrote ``func``'s own body in place, and no later
    # record then replayed onto it (choose_schedule tries several)
    sch = s_tir.Schedule(workload_module(tvm.ir.load_json(tvm.ir.save_json(func))))
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    new = sch.mod["main"]
    attrs = dict(func.attrs) if func.attrs is not None else {}
    if "global_symbol" not in attrs:
        new = new.without_attr("global_symbol")
    for k, v in attrs.items():
        new = new.with_attr(k, v)
    return new.with_attr("tirx.is_scheduled", True)


def _short(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def check_fits(scheduled, target) -> str | None:
    """Why the scheduled kernel cannot run on ``target`` (CUDA limits), or None."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    key = target_key(target)
    if key[0] != "cuda":
        return None
    limits = cuda_limits(key[1])
    checked = tvm.target.Target({"kind": "cuda", "arch": key[1],
                                 "max_shared_memory_per_block": limits.smem_per_block_optin,
                                 "max_threads_per_block": limits.max_threads_per_block})
    verify = ms.postproc.VerifyGPUCode()
    with tensor_intrinsics_only():  # the check needs none; TuneContext would import them all
        verify._initialize_with_tune_context(ms.TuneContext(mod=workload_module(scheduled), target=checked))
    if not verify.apply(s_tir.Schedule(workload_module(scheduled))):
        return (f"exceeds {key[1]}'s limits ({limits.max_threads_per_block} threads, "
                f"{limits.smem_per_block_optin // 1024} KiB shared memory per block)")
    return None


def check_builds(scheduled, target) -> str | None:
    """Why the scheduled kernel does not build for ``target`` on its own, or None (CUDA: nvcc for the arch)."""
    import tvm

    key = target_key(target)
    mod = workload_module(scheduled)
    try:
        if key[0] == "cuda":
            from llmcc import cuda

            cuda.build(mod, key[1], pipeline=None)
        else:
            tvm.tirx.build(mod, target=target)
    except Exception as exc:  # noqa: BLE001 - any failure means the same: this record does not build for target
        return f"does not build for {describe_key(key)}: {_short(exc)}"
    return None


def transfer_record(func, record, target) -> tuple:
    """(``func`` scheduled by another target's ``record``, None) when it replays, fits ``target``'s limits and builds
    for it; else (None, why not)."""
    try:
        scheduled = replay(func, record)
    except Exception as exc:  # noqa: BLE001 - a record that does not replay on this kernel, for any reason
        return None, f"does not replay ({_short(exc)})"
    reason = check_fits(scheduled, target) or check_builds(scheduled, target)
    return (None, reason) if reason else (scheduled, None)


def choose_schedule(db, func, target) -> ScheduleChoice:
    """Kernel ``func``'s schedule for ``target`` from ``db`` (module docstring)."""
    key = target_key(target)
    by_key: dict[tuple, list] = {}
    for rec in db.kernel_records(func):  # fastest first
        by_key.setdefault(target_key(rec.target), []).append(rec)
    dropped: list[str] = []
    for rec in by_key.get(key, ()):
        try:
            return ScheduleChoice(replay(func, rec), "tuned", _us(rec), source=key)
        except Exception as exc:  # noqa: BLE001 - a record that no longer replays (another TVM) is skipped
            dropped.append(f"{describe_key(key)}: does not replay ({_short(exc)})")
    for source in transfer_order(by_key, key):
        for rec in by_key[source][:MAX_TRIES_PER_SOURCE]:
            scheduled, reason = transfer_record(func, rec, target)
            if reason:
                dropped.append(f"{describe_key(source)}: {reason}")
                continue
            return ScheduleChoice(scheduled, f"transferred:{describe_key(source)}", _us(rec), tuple(dropped),
                                  source=source)
    return ScheduleChoice(None, "rule", None, tuple(dropped))


def _us(rec) -> float | None:
    secs = run_secs(rec)
    return round(secs * 1e6, 2) if secs is not None else None
