"""CompiledModule: a built model, callable from Python with numpy arrays or torch tensors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from llmcc import artifact, runtime_ops
from llmcc.errors import ArtifactError, DeviceUnavailable, InputError
from llmcc.frontend.onnx_import import TensorSpec
from llmcc.targets import TargetSpec, from_json as target_from_json


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _torch_dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


class CompiledModule:
    """A compiled model: ``m(input_ids=ids)`` runs it; ``m.report`` says what the compiler did."""

    def __init__(self, manifest: dict, library_path: Path, weights: list[np.ndarray], *, owned_dir=None):
        self.manifest = manifest
        self.target: TargetSpec = target_from_json(manifest["target"])
        self.inputs = [TensorSpec.from_json(d) for d in manifest["inputs"]]
        self.outputs = [TensorSpec.from_json(d) for d in manifest["outputs"]]
        self._library_path = Path(library_path)
        self._weights_host = weights
        self._owned_dir = owned_dir  # temp folder of a freshly compiled module, removed with it
        self._vm = None
        self._device = None
        self._weights_dev = None

    # ---------------------------------------------------------------- loading
    @property
    def report(self) -> dict:
        return self.manifest["report"]

    def _ensure_loaded(self):
        if self._vm is not None:
            return
        import tvm
        from tvm import relax

        if self.target.is_gpu:
            device = tvm.cuda(0)
            if not device.exist:
                raise DeviceUnavailable(f"this module was compiled for {self.target.name}, and this machine has no "
                                        f"usable NVIDIA GPU (driver: {_driver_state()}); compile with --target cpu "
                                        f"to run here")
        else:
            device = tvm.cpu(0)
        try:
            lib = tvm.runtime.load_module(str(self._library_path))
        except Exception as exc:
            raise ArtifactError(f"{self._library_path}: cannot load the compiled library "
                                f"({str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__})"
                                ) from None
        self._device = device
        runtime_ops.register()
        self._vm = relax.VirtualMachine(lib, device)
        self._main = self._vm["main"]
        self._weights_dev = [tvm.runtime.tensor(np.ascontiguousarray(w), device) for w in self._weights_host]

    # ---------------------------------------------------------------- calling
    def __call__(self, *args, **kwargs):
        """Run the model. numpy in -> numpy out; torch in -> torch out (zero-copy where possible).

        One output comes back bare; several come back as a tuple in the graph's output order.
        """
        outs = self._run(args, kwargs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def run(self, *args, **kwargs) -> dict:
        """Like calling the module, but returns ``{output name: value}``."""
        return dict(zip((s.name for s in self.outputs), self._run(args, kwargs)))

    def device_ms(self, *args, number: int = 20, repeat: int = 5, **kwargs) -> float:
        """Median milliseconds of one call on the device, timed by TVM's time_evaluator (synchronised, one warm-up
        call, no Python in the loop): the compiled code's own time, where calling the module also times the input
        checks and conversions."""
        import statistics

        _, tvm_inputs = self._inputs(args, kwargs)
        timer = self._vm.time_evaluator("main", self._device, number=number, repeat=repeat)
        return 1e3 * statistics.median(timer(*tvm_inputs, *self._weights_dev).results)

    def _inputs(self, args, kwargs) -> tuple[list, list]:
        """The inputs bound to the signature and checked, and as TVM tensors on the module's device (loaded)."""
        values = self._bind(args, kwargs)
        self._check(values)
        self._ensure_loaded()
        return values, [self._to_tvm(v) for v in values]

    def _bind(self, args, kwargs) -> list:
        names = [s.name for s in self.inputs]
        if len(args) > len(names):
            raise InputError(f"{len(args)} positional inputs given, the model takes {len(names)}: {', '.join(names)}")
        bound = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in names:
                raise InputError(f"unknown input '{key}'; the model's inputs are: {', '.join(names)}")
            if key in bound:
                raise InputError(f"input '{key}' given twice (positionally and by name)")
            bound[key] = value
        missing = [n for n in names if n not in bound]
        if missing:
            raise InputError(f"missing input(s): {', '.join(missing)}")
        return [bound[n] for n in names]

    def _check(self, values) -> None:
        dims: dict[str, tuple[int, str]] = {}
        for spec, value in zip(self.inputs, values):
            if _is_torch(value):
                dtype, shape = _torch_dtype_name(value), tuple(value.shape)
            else:
                if not isinstance(value, np.ndarray):
                    raise InputError(f"input '{spec.name}': expected a numpy array or torch tensor, got "
                                     f"{type(value).__name__}")
                dtype, shape = str(value.dtype), value.shape
            if dtype != spec.dtype:
                raise InputError(f"input '{spec.name}': dtype {dtype}, the model takes {spec.dtype}")
            if len(shape) != len(spec.shape):
                raise InputError(f"input '{spec.name}': rank {len(shape)} (shape {list(shape)}), the model takes "
                                 f"rank {len(spec.shape)} {list(spec.shape)}")
            for axis, (want, got) in enumerate(zip(spec.shape, shape)):
                if isinstance(want, str):
                    if want in dims and dims[want][0] != got:
                        raise InputError(f"input '{spec.name}': dim {axis} ({want}) is {got}, but input "
                                         f"'{dims[want][1]}' has {want}={dims[want][0]}")
                    dims.setdefault(want, (got, spec.name))
                elif want != got:
                    raise InputError(f"input '{spec.name}': dim {axis} is {got}, the model takes {want}")
            bound = self.manifest.get("index_bounds", {}).get(spec.name)
            if bound is not None and np.prod(shape) > 0:
                # Out-of-range ids would read outside the embedding table: TVM's gather does not check.
                low, high = int(value.min()), int(value.max())
                if low < -bound or high >= bound:
                    raise InputError(f"input '{spec.name}': values must lie in [0, {bound}) (the table it indexes "
                                     f"has {bound} rows); got min {low}, max {high}")

    def _run(self, args, kwargs) -> list:
        import tvm

        values, tvm_inputs = self._inputs(args, kwargs)
        use_torch = any(_is_torch(v) for v in values)
        result = self._main(*tvm_inputs, *self._weights_dev)
        outs = list(result) if not isinstance(result, tvm.runtime.Tensor) else [result]
        if use_torch:
            import torch

            return [torch.from_dlpack(o) for o in outs]
        if not self.target.is_gpu:
            return [np.from_dlpack(o) for o in outs]  # zero-copy: each call's outputs are fresh tensors
        return [o.numpy() for o in outs]

    def _to_tvm(self, value):
        import tvm

        if _is_torch(value):
            on_device = (value.device.type == "cuda") == self.target.is_gpu
            if on_device:
                t = value if value.is_contiguous() and value.data_ptr() % 64 == 0 else value.contiguous().clone()
                return tvm.runtime.from_dlpack(t)
            value = value.detach().cpu().numpy()
        if self.target.is_gpu or value.size == 0:
            return tvm.runtime.tensor(np.ascontiguousarray(value), self._device)
        # TVM takes host memory without a copy when it is contiguous and 64-byte aligned (its allocator's
        # alignment); otherwise one aligned copy is still 4x cheaper than tvm.runtime.tensor's allocate-and-copy
        if not (value.flags.c_contiguous and value.ctypes.data % _TVM_ALIGNMENT == 0):
            value = _aligned_copy(value)
        return tvm.runtime.from_dlpack(value)

    # ---------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> Path:
        names = [e["name"] for e in self.manifest.get("weights", {}).get("tensors", [])] or \
            [f"w{i}" for i in range(len(self._weights_host))]
        manifest = {k: v for k, v in self.manifest.items() if k not in ("library", "weights")}
        return artifact.write(path, self._library_path, list(zip(names, self._weights_host)), manifest)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompiledModule":
        path = Path(path)
        manifest = artifact.read_manifest(path)
        artifact.check_files(path, manifest)
        weights = artifact.read_weights(path / manifest["weights"]["file"], manifest["weights"]["tensors"])
        module = cls(manifest, path / manifest["library"]["file"], weights)
        if module.target.is_gpu:
            module._ensure_loaded()  # says now, not at the first call, that there is no GPU
        else:
            _check_cpu_features(path, module.target)
        return module

    def __repr__(self) -> str:
        sig = ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in self.inputs)
        return f"<llmcc.CompiledModule {self.target.name} ({sig})>"

    def __del__(self):
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)


def _check_cpu_features(path: Path, target: TargetSpec) -> None:
    """A CPU artifact's code may use every SIMD feature of the machine that built it (AVX-512, VNNI): run where one
    is missing, it would kill the process with an illegal instruction at its first call."""
    from llmcc.targets import host_cpu

    missing = sorted(set(target.features) - set(host_cpu().features))
    if missing:
        raise ArtifactError(f"{path}: built for a CPU with {', '.join(missing)}, which this CPU lacks (its code would "
                            f"stop with an illegal instruction); compile the model again on this machine")


_TVM_ALIGNMENT = 64


def _aligned_copy(value: np.ndarray) -> np.ndarray:
    raw = np.empty(value.nbytes + _TVM_ALIGNMENT, np.uint8)
    offset = (-raw.ctypes.data) % _TVM_ALIGNMENT
    out = raw[offset:offset + value.nbytes].view(value.dtype).reshape(value.shape)
    np.copyto(out, value)
    return out


def _driver_state() -> str:
    from llmcc import cuda

    return cuda.driver_state()
