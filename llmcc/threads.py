"""TVM's CPU thread pool: one worker per physical core.

Unless TVM_NUM_THREADS or OMP_NUM_THREADS is set, TVM sizes its pool as the logical CPUs / 2 on x86 ("ignore
hyper-threading", src/runtime/threading_backend.cc), whether or not the CPU has SMT: on a machine with one thread per
core that is half the cores (one worker on a 2-core VM, where every parallel kernel then ran serially). TVM reads the
variable when its pool is first used, so llmcc sets TVM_NUM_THREADS to the physical cores it may run on at import,
unless the user set either variable.
"""

from __future__ import annotations

import os
from pathlib import Path

USER_VARIABLES = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on (Linux sysfs); elsewhere, the CPUs."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(len(cores), 1)


def default_to_physical_cores() -> None:
    if not any(v in os.environ for v in USER_VARIABLES):
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
