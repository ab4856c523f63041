"""llmcc gives TVM's thread pool one worker per physical core, unless the user chose a count."""

import os
import subprocess
import sys

from llmcc.threads import physical_cores

PROBE = "import llmcc, os, tvm; print(os.environ.get('TVM_NUM_THREADS'), tvm.runtime.num_threads())"


def _probe(env):
    clean = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         timeout=300, check=True)
    return out.stdout.split()[-2:]


def test_pool_takes_every_physical_core_by_default():
    cores = physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    assert _probe({}) == [str(cores), str(cores)]


def test_a_users_choice_is_kept():
    assert _probe({"TVM_NUM_THREADS": "1"}) == ["1", "1"]
    assert _probe({"OMP_NUM_THREADS": "1"}) == ["None", "1"]
