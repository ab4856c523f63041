"""llmcc: a compiler for large-language-model inference, on Apache TVM.

    m = llmcc.compile("model.onnx", target="cpu")
    out = m(input_ids=ids)
    m.save("model.llmcc"); m = llmcc.load("model.llmcc")
"""

__version__ = "0.1.0"

# Before anything imports TVM: without an NVIDIA driver, TVM's CUDA runtime only loads against llmcc's stub, and
# without it CUDA builds silently keep only source.
from llmcc import cuda as _cuda  # noqa: E402

_cuda.prepare_driver()

# Before TVM's thread pool exists: TVM alone would take half the cores on a CPU without SMT (llmcc.threads)
from llmcc import threads as _threads  # noqa: E402

_threads.default_to_physical_cores()

from llmcc.compiler import compile  # noqa: E402,A004
from llmcc.errors import LlmccError  # noqa: E402
from llmcc.module import CompiledModule  # noqa: E402

load = CompiledModule.load

__all__ = ["compile", "load", "CompiledModule", "LlmccError", "__version__"]
