"""Host functions a compiled module calls at run time, registered with TVM's runtime before a module loads.

TVM 0.27 runs ``R.nonzero`` (ONNX NonZero: Longformer's global-token indices) through ``relax.run.nonzero``, a Python
function that returns its result on the CPU whatever device the input was on. On a GPU the next kernel then fails
its argument check ("expected cuda"), as tools/gpu_check.py saw on an H200. llmcc's pass
run_nonzero_on_device calls ``llmcc.run.nonzero`` instead, which returns the indices on the input's device.
"""

from __future__ import annotations

import numpy as np

NONZERO = "llmcc.run.nonzero"

_registered = False


def _nonzero(x):
    """[ndim, count] int64 indices of x's nonzero elements, on x's device; a 0-d x counts as 1-d (as ONNX says)."""
    import tvm

    indices = np.stack(np.atleast_1d(x.numpy()).nonzero(), axis=0).astype(np.int64)
    return tvm.runtime.tensor(indices, x.device)


def register() -> None:
    """Make the functions known to TVM's runtime (once per process; before a VirtualMachine is made)."""
    global _registered
    if not _registered:
        import tvm

        tvm.register_global_func(NONZERO, _nonzero, override=True)
        _registered = True
