"""Cross-compiling Relax modules for NVIDIA GPUs, with or without a GPU on this machine.

TVM's CUDA runtime (``libtvm_runtime_cuda.so``) links against the driver library ``libcuda.so.1`` and is loaded once,
at ``import tvm``. On a machine without an NVIDIA driver that load fails silently, and from then on ``tvm.compile``
for CUDA keeps only CUDA source: ``export_library`` succeeds and ``load_module`` fails later, somewhere else.

``prepare_driver()`` (called by ``llmcc/__init__.py`` before anything imports tvm) prevents that. If the dynamic
loader finds a real ``libcuda.so.1``, it is used and nothing else happens. If there is none, llmcc compiles a stub
driver (``runtime_support/cuda_driver_stub.c``, every call answers CUDA_ERROR_NO_DEVICE) into its cache and loads
it, so that the loader satisfies TVM's ``libcuda.so.1`` dependency with it: builds then keep real kernels (fatbin:
SASS for the target plus PTX), exported libraries load, and anything that touches a GPU fails with "no
CUDA-capable device is detected".

``build()`` compiles with nvcc through TVM's ``tvm_callback_cuda_compile`` hook, replaced only for the duration of
the build. ``cuda_binary_info()`` reads an exported library without loading it and tells a real binary from
source.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcc.errors import ArtifactError, BuildFailure

if TYPE_CHECKING:  # tvm is imported lazily: prepare_driver() has to run first
    import tvm

__all__ = [
    "SUPPORTED_ARCHS",
    "build",
    "cuda_binary_info",
    "cache_dir",
    "driver_problem",
    "driver_state",
    "gencode_flags",
    "gpu_arch",
    "prepare_driver",
]

#: The CUDA architectures ``build`` accepts.
SUPPORTED_ARCHS = ("sm_80", "sm_86", "sm_87", "sm_89", "sm_90")

#: The driver symbols ``libtvm_runtime_cuda.so`` imports; the stub must define all of them (tests check).
REQUIRED_DRIVER_SYMBOLS = (
    "cuDeviceGetName",
    "cuFuncSetAttribute",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuLaunchKernelEx",
    "cuModuleGetFunction",
    "cuModuleLoadData",
    "cuModuleUnload",
    "cuTensorMapEncodeTiled",
)

#: Set to 0 to never use the stub driver (CUDA builds then fail on machines without a driver).
STUB_ENV = "LLMCC_CUDA_STUB"

_DRIVER_SONAME = "libcuda.so.1"
_STUB_SOURCE = Path(__file__).resolve().parent / "runtime_support" / "cuda_driver_stub.c"
_STUB_MARKER = "llmcc_cuda_driver_stub"  # a symbol only the stub defines
_STUB_CFLAGS = ("-shared", "-fPIC", "-O2", f"-Wl,-soname,{_DRIVER_SONAME}")


# --------------------------------------------------------------------------------------------------------------------
# The driver


@dataclass
class _Driver:
    state: str  # "real", "stub" or "missing"
    handle: ctypes.CDLL | None = None
    problem: str = ""  # why it is missing
    runtime_checked: bool = False  # whether a late load of TVM's CUDA runtime was tried (see _cuda_runtime_problem)
    runtime_problem: str = ""
    arch: tuple[str | None] | None = None  # gpu_arch() cache


_driver: _Driver | None = None
_driver_lock = threading.Lock()


def cache_dir() -> Path:
    """llmcc's cache: ``$LLMCC_CACHE``, else ``~/.cache/llmcc``."""
    return Path(os.environ.get("LLMCC_CACHE") or Path.home() / ".cache" / "llmcc")


def prepare_driver() -> None:
    """Make sure TVM's CUDA runtime can load: use the real driver if there is one, else llmcc's stub.

    Call this before ``import tvm`` (``llmcc/__init__.py`` does). It is idempotent and cheap after the first call:
    one ``dlopen`` of ``libcuda.so.1``, and on a machine without a driver one more of the cached stub (compiled with
    the C compiler the first time, ~0.1 s). The stub is used only when the loader cannot find ``libcuda.so.1`` at
    all, so it never shadows a real driver; a driver that is found but fails to load is reported, not replaced.

    If tvm was imported first (so its CUDA runtime could not load), this loads the runtime now, on top of the stub;
    when even that fails, ``build`` raises ``BuildFailure`` saying what to do.
    """
    global _driver
    if _driver is not None:
        return
    with _driver_lock:
        if _driver is not None:
            return
        _driver = _find_driver()
    tvm = sys.modules.get("tvm")
    if tvm is not None and getattr(tvm, "__spec__", None) is not None and hasattr(tvm, "runtime"):
        _cuda_runtime_problem()  # tvm came first: load its CUDA runtime now


def driver_state() -> str:
    """``"real"`` (an NVIDIA driver), ``"stub"`` (llmcc's no-device stub) or ``"missing"`` (neither)."""
    prepare_driver()
    return _driver.state


def driver_problem() -> str:
    """Why the driver is ``"missing"`` (one line), or ``""``."""
    prepare_driver()
    return _driver.problem


def gpu_arch() -> str | None:
    """The architecture (``"sm_90"``) of GPU 0 when a real driver and GPU are present, else ``None``.

    Asks the driver directly (cuInit, no TVM). As with any CUDA initialisation, a process that forks afterwards
    cannot use CUDA in the child: spawn subprocesses instead.
    """
    prepare_driver()
    drv = _driver
    if drv.state != "real":
        return None
    with _driver_lock:
        if drv.arch is None:
            drv.arch = (_query_arch(drv.handle),)
    return drv.arch[0]


def _find_driver() -> _Driver:
    if not sys.platform.startswith("linux"):
        return _Driver("missing", problem=f"CUDA builds need Linux (this is {sys.platform})")
    try:
        handle = ctypes.CDLL(_DRIVER_SONAME)
    except OSError as err:
        # Only "not found" lets the stub in; a driver that is there but broken must stay visible.
        if not str(err).startswith(f"{_DRIVER_SONAME}: cannot open shared object file"):
            return _Driver("missing", problem=f"the NVIDIA driver does not load: {_first_line(err)}")
    else:
        # The stub itself, if someone put llmcc's cache on LD_LIBRARY_PATH.
        return _Driver("stub" if hasattr(handle, _STUB_MARKER) else "real", handle)

    if os.environ.get(STUB_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return _Driver("missing", problem=f"no NVIDIA driver ({_DRIVER_SONAME}) and {STUB_ENV}=0 turns off the stub")
    try:
        path = _build_stub()
        # RTLD_LOCAL is enough: the loader matches the NEEDED entry libcuda.so.1 of libtvm_runtime_cuda.so (and
        # libcudart's dlopen of it) against this library's soname, and its symbols stay out of the global scope.
        handle = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:  # RuntimeError: Path.home() without HOME
        return _Driver("missing", problem=f"no NVIDIA driver, and llmcc's stub driver failed: {_first_line(err)}")
    return _Driver("stub", handle)


def _build_stub() -> Path:
    """Compile the stub driver into the cache (once per stub version) and return its path."""
    source = _STUB_SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(_STUB_CFLAGS).encode() + platform.machine().encode()).hexdigest()[:16]
    out_dir = cache_dir() / "driver-stub" / key
    out = out_dir / _DRIVER_SONAME
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or "cc"]
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run(
            [*compiler, *_STUB_CFLAGS, "-o", tmp, str(_STUB_SOURCE)], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise OSError(f"{' '.join(compiler)} failed on {_STUB_SOURCE.name}: {detail[0] if detail else ''}")
        os.replace(tmp, out)  # atomic: concurrent processes each build, the last rename wins
    except FileNotFoundError as err:
        raise OSError(f"no C compiler to build the stub ({err.filename}); install gcc or set CC") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return out


def _query_arch(handle: ctypes.CDLL) -> str | None:
    c_int = ctypes.c_int
    try:
        if handle.cuInit(ctypes.c_uint(0)) != 0:
            return None
        count, dev, major, minor = c_int(0), c_int(0), c_int(0), c_int(0)
        if handle.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
            return None
        if handle.cuDeviceGet(ctypes.byref(dev), c_int(0)) != 0:
            return None
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR
        if handle.cuDeviceGetAttribute(ctypes.byref(major), c_int(75), dev) != 0:
            return None
        if handle.cuDeviceGetAttribute(ctypes.byref(minor), c_int(76), dev) != 0:
            return None
    except AttributeError:  # not a driver we understand
        return None
    return f"sm_{major.value}{minor.value}"


def _cuda_runtime_problem() -> str:
    """``""`` when TVM's CUDA runtime is registered, else a one-line reason. Imports tvm."""
    prepare_driver()
    drv = _driver
    import tvm  # noqa: F401  (after prepare_driver: this is what loads the runtime normally)
    import tvm_ffi

    def registered() -> bool:
        return tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None

    if registered():
        return ""
    if drv.state == "missing":
        return f"cannot build for CUDA: {drv.problem}"
    with _driver_lock:
        if not drv.runtime_checked:
            drv.runtime_checked = True
            drv.runtime_problem = _load_tvm_cuda_runtime()
    if registered():
        return ""
    return drv.runtime_problem or "cannot build for CUDA: TVM's CUDA runtime is not registered"


def _load_tvm_cuda_runtime() -> str:
    """Load libtvm_runtime_cuda.so now, as ``import tvm`` does, for when tvm was imported before prepare_driver.

    Returns "" on success, else a one-line reason.
    """
    hint = "import llmcc before tvm, or start the process with a driver (or the stub) on LD_LIBRARY_PATH"
    try:
        from tvm.backend import loader
        from tvm.base import _LOADED_LIBS
        from tvm_ffi.libinfo import load_lib_ctypes

        if not loader.is_loaded("cuda"):
            return "cannot build for CUDA: TVM's CUDA backend is not loaded (TVM_DEVICE_BACKEND_AUTOLOAD=0?)"
        runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )
    except (OSError, RuntimeError, ImportError, KeyError, AttributeError) as err:
        return f"cannot build for CUDA: TVM's CUDA runtime did not load ({_first_line(err)}); {hint}"
    return ""


# --------------------------------------------------------------------------------------------------------------------
# Building


@dataclass
class _BuildRecord:
    """What the compile hook saw during one build."""

    arch: str
    units: int = 0  # translation units compiled
    prebuilt: int = 0  # CUDA modules that arrive compiled (embedded Triton cubins)
    kernels: list[str] = field(default_factory=list)
    failure: str = ""


_build_lock = threading.Lock()  # the compile hook is process-global: one CUDA build at a time


def gencode_flags(arch: str) -> list[str]:
    """nvcc flags for ``arch``: its SASS plus PTX of the same version, which newer GPUs JIT-compile."""
    n = _arch_number(arch)
    return ["-gencode", f"arch=compute_{n},code=sm_{n}", "-gencode", f"arch=compute_{n},code=compute_{n}"]


def build(mod: tvm.IRModule, arch: str, *, pipeline: Any = "default") -> tvm.relax.Executable:
    """Compile a Relax module for the CUDA architecture ``arch`` (``"sm_80"`` ... ``"sm_90"``).

    Runs ``tvm.compile`` inside ``with target:``. ``pipeline`` goes to it as ``relax_pipeline``, with its meaning:
    ``"default"`` (the default) is TVM's Relax CUDA pipeline, which legalizes and schedules with dlight; ``None``
    runs no Relax passes, for a module already lowered (llmcc's own pipeline does it all); or a pass / pipeline
    name. Kernels go through nvcc into a fatbin with ``arch``'s SASS plus PTX for newer GPUs, whatever
    ``TVM_CUDA_COMPILE_MODE`` says. Works without a GPU once ``prepare_driver`` has run.

    Raises ``BuildFailure`` (one line) if TVM cannot build the module, if nvcc fails (naming the kernel), or if the
    result would hold CUDA source instead of a binary.
    """
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHS:
        raise BuildFailure(f"unsupported CUDA architecture {arch!r}: expected one of {', '.join(SUPPORTED_ARCHS)}")
    problem = _cuda_runtime_problem()
    if problem:
        raise BuildFailure(problem)
    nvcc_dir = _nvcc_dir()

    import tvm

    from llmcc.kernels.triton_embed import attach_external_modules, embedded_kernels

    mod = attach_external_modules(mod)  # cubins of embedded Triton kernels (no-op without any)
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    record = _BuildRecord(arch, prebuilt=len(embedded_kernels(mod)))
    with _build_lock, _path_with(nvcc_dir), _compile_hook(_make_compile_hook(target, record)), target:
        try:
            executable = tvm.compile(mod, target=target, relax_pipeline=pipeline)
        except Exception as err:  # TVM raises many kinds; all mean "this module does not build"
            if record.failure:
                raise BuildFailure(record.failure) from err
            raise BuildFailure(f"CUDA build for {arch} failed: {_describe_tvm_error(err)}") from err
    _check_binary(executable, record)
    return executable


def _make_compile_hook(target: tvm.target.Target, record: _BuildRecord):
    from tvm.support import nvcc

    arch = record.arch
    flags = gencode_flags(arch)

    def compile_cuda(code, *_ignored) -> bytes:
        code = str(code)
        # Target.current() is what TVM's nvcc wrapper reads for anything not passed in: make it this build's.
        with target:
            try:
                binary = bytes(nvcc.compile_cuda(code, target_format="fatbin", arch=flags, compiler="nvcc"))
            except (RuntimeError, OSError) as err:
                record.failure = _describe_nvcc_error(str(err), code, arch)
                raise RuntimeError(record.failure) from None
        record.units += 1
        record.kernels += _KERNEL_DEF.findall(code)
        return binary

    return compile_cuda


@contextlib.contextmanager
def _compile_hook(hook):
    """Install ``hook`` as TVM's ``tvm_callback_cuda_compile`` for the ``with`` block, then restore the previous."""
    import tvm_ffi

    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, hook, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)
        else:
            tvm_ffi.remove_global_func(name)


@contextlib.contextmanager
def _path_with(directory: str | None):
    """Put ``directory`` at the front of PATH for the ``with`` block (TVM runs plain ``nvcc``)."""
    if directory is None:
        yield
        return
    old = os.environ.get("PATH")
    os.environ["PATH"] = directory + (os.pathsep + old if old else "")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


def _nvcc_dir() -> str | None:
    """None when ``nvcc`` is on PATH, else the toolkit's bin folder to add; BuildFailure when there is none."""
    if shutil.which("nvcc"):
        return None
    homes = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    for home in filter(None, homes):
        if os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin")
    raise BuildFailure(
        "cannot build for CUDA: nvcc not found (install the CUDA toolkit, put nvcc on PATH or set CUDA_HOME)"
    )


def _check_binary(executable: tvm.relax.Executable, record: _BuildRecord) -> None:
    """Fail unless every CUDA module of the build is a compiled binary from our hook."""
    cuda_modules = [m for m in _walk(executable.mod) if m.kind == "cuda"]
    if not cuda_modules:
        return  # nothing ran on the GPU
    if record.units + record.prebuilt < len(cuda_modules) or not all(m.is_runnable() for m in cuda_modules):
        names = ", ".join(record.kernels[:3]) or "its kernels"
        raise BuildFailure(
            f"CUDA build for {record.arch} kept CUDA source instead of a binary for {names}: "
            "TVM did not compile them through llmcc's nvcc hook"
        )


def _walk(module):
    yield module
    for child in module.imports:
        yield from _walk(child)


_KERNEL_DEF = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")
_NVCC_LOCATION = re.compile(r"\.cu\((\d+)\): (?:catastrophic )?error")


def _describe_nvcc_error(message: str, code: str, arch: str) -> str:
    """One line from TVM's nvcc failure message (the whole source, then nvcc's output), naming the kernel."""
    output = message.split("\nCompilation error:\n", 1)[-1]
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    error = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "nvcc failed")
    kernel = None
    located = _NVCC_LOCATION.search(error)
    if located:  # the last kernel defined above the failing line
        above = "\n".join(code.splitlines()[: int(located.group(1))])
        defined = _KERNEL_DEF.findall(above)
        kernel = defined[-1] if defined else None
        error = error[located.end() :].lstrip(": ")
    else:
        quoted = re.search(r"'(\w+)'", error)  # ptxas names the entry function in quotes
        if quoted and quoted.group(1) in _KERNEL_DEF.findall(code):
            kernel = quoted.group(1)
    where = f"kernel {kernel}" if kernel else "CUDA kernels"
    return f"nvcc failed on {where} for {arch}: {_clip(error)}"


def _describe_tvm_error(err: BaseException) -> str:
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("File ")]
    first = lines[0] if lines else type(err).__name__
    func = re.search(r"\bdef (\w+)\(", text)  # TVM prints the offending PrimFunc as TVMScript
    where = f" (in {func.group(1)})" if func and func.group(1) not in first else ""
    return _clip(f"{type(err).__name__}: {first}{where}")


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return _clip(lines[0] if lines else type(err).__name__, 200)


def _arch_number(arch: str) -> str:
    match = re.fullmatch(r"sm_(\d+)", arch)
    if not match:
        raise BuildFailure(f"unsupported CUDA architecture {arch!r}: expected one of {', '.join(SUPPORTED_ARCHS)}")
    return match.group(1)


# --------------------------------------------------------------------------------------------------------------------
# Inspecting exported libraries
#
# An exported library carries its device modules in the symbol __tvm_ffi__library_bin (tvm-ffi's library_module.cc):
#   <nbytes: u64> <import tree: vec<u64> indptr, vec<u64> children> then per module <kind: str> [<bytes: str>]
# ("_lib" stands for the library itself and has no bytes), with vec = u64 count + items, str = u64 length + bytes.
# A "cuda" module's bytes are <fmt: str> <function table> <data: str>: fmt "cuda" means data is CUDA source; otherwise
# data is a fatbin, cubin or PTX. The function table is u64 count, then per kernel: key, name, arg types
# (vec of 4-byte DLDataType), launch parameter tags (vec<str>), arg extra tags (vec of 4-byte ints).

_LIBRARY_SYMBOLS = ("__tvm_ffi__library_bin", "__tvm_dev_mblob")
_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_KIND = {1: "ptx", 2: "elf"}
_FATBIN_COMPRESSED = 0x2000 | 0x8000  # older and CUDA 12.8+ compression


def cuda_binary_info(library_path: str | os.PathLike) -> dict:
    """What CUDA code an exported library (``export_library``'s ``.so``) holds, read from the file without loading it.

    Returns a dict:
      ``has_fatbin``     whether there is compiled GPU code (a fatbin, or a bare cubin: then False but sass_archs set)
      ``source_only``    True when the library has CUDA kernels but only as source (it will not load)
      ``format``         "fatbin", "cubin", "ptx", "source" or None (no CUDA module)
      ``sass_archs``     e.g. ["sm_80"]: machine code present
      ``ptx_archs``      e.g. ["compute_80"]: PTX present
      ``kernels``        number of kernels in TVM's function table; ``kernel_names`` their names
      ``sass_kernels``   {"sm_80": [names...]} read from the SASS itself (entries nvcc compressed are left out)
      ``compressed``     whether nvcc compressed any entry
      ``binary_bytes``   size of the GPU binaries
      ``modules``        kinds of all modules in the library (e.g. ["relax.VMExecutable", "_lib", "cuda"])

    Raises ``ArtifactError`` for a file that is not an ELF shared library.
    """
    path = Path(library_path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ArtifactError(f"cannot read {path}: {err.strerror}") from None
    try:
        blob = _library_blob(data)
        modules = _parse_library_blob(blob) if blob is not None else []
    except (ValueError, struct.error, IndexError) as err:
        raise ArtifactError(f"{path} is not a library exported by TVM: {err}") from None

    info: dict[str, Any] = {
        "path": str(path),
        "modules": [kind for kind, _ in modules],
        "has_fatbin": False,
        "source_only": False,
        "format": None,
        "sass_archs": [],
        "ptx_archs": [],
        "kernels": 0,
        "kernel_names": [],
        "sass_kernels": {},
        "compressed": False,
        "binary_bytes": 0,
    }
    formats = []
    sass, ptx = set(), set()
    for kind, payload in modules:
        if kind != "cuda":
            continue
        fmt, names, binary = _parse_cuda_module(payload)
        info["kernel_names"] += names
        if fmt == "cuda":
            formats.append("source")
            continue
        if binary[:4] == struct.pack("<I", _FATBIN_MAGIC):
            formats.append("fatbin")
            info["has_fatbin"] = True
            for entry in _fatbin_entries(binary):
                info["compressed"] |= entry["compressed"]
                if entry["kind"] == "ptx":
                    ptx.add(f"compute_{entry['arch']}")
                else:
                    arch = f"sm_{entry['arch']}"
                    sass.add(arch)
                    if entry["kernels"] is not None:
                        info["sass_kernels"].setdefault(arch, []).extend(entry["kernels"])
        elif binary[:4] == b"\x7fELF":
            formats.append("cubin")
            arch, kernels = _cubin_arch_and_kernels(binary)
            sass.add(f"sm_{arch}")
            info["sass_kernels"].setdefault(f"sm_{arch}", []).extend(kernels)
        else:
            formats.append("ptx")
            ptx.update(f"compute_{n}" for n in re.findall(rb"\.target\s+sm_(\d+)", binary))
        info["binary_bytes"] += len(binary)
    info["kernels"] = len(info["kernel_names"])
    info["sass_archs"] = sorted(sass)
    info["ptx_archs"] = sorted(ptx)
    info["sass_kernels"] = {arch: sorted(names) for arch, names in sorted(info["sass_kernels"].items())}
    if formats:
        info["format"] = formats[0] if len(set(formats)) == 1 else "+".join(sorted(set(formats)))
        info["source_only"] = set(formats) == {"source"}
    return info


class _Reader:
    def __init__(self, data: bytes, pos: int = 0, end: int | None = None):
        self.data, self.pos, self.end = data, pos, len(data) if end is None else end

    def u64(self) -> int:
        if self.pos + 8 > self.end:
            raise ValueError("truncated module blob")
        (value,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return value

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise ValueError("truncated module blob")
        value = self.data[self.pos : self.pos + n]
        self.pos += n
        return value

    def bytes_(self) -> bytes:
        return self.raw(self.u64())

    def str_(self) -> str:
        return self.bytes_().decode("utf-8", errors="replace")

    def vec_u64(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]

    def done(self) -> bool:
        return self.pos >= self.end


def _library_blob(data: bytes) -> bytes | None:
    """The bytes of __tvm_ffi__library_bin (after its u64 length), or None when the library has no device modules."""
    elf = _Elf(data)
    for name in _LIBRARY_SYMBOLS:
        offset = elf.symbol_offset(name)
        if offset is not None:
            (nbytes,) = struct.unpack_from("<Q", data, offset)
            if offset + 8 + nbytes > len(data):
                raise ValueError(f"{name} runs past the end of the file")
            return data[offset + 8 : offset + 8 + nbytes]
    return None


def _parse_library_blob(blob: bytes) -> list[tuple[str, bytes]]:
    reader = _Reader(blob)
    reader.vec_u64()  # import tree: which module imports which
    reader.vec_u64()
    modules = []
    while not reader.done():
        kind = reader.str_()
        modules.append((kind, b"" if kind == "_lib" else reader.bytes_()))
    return modules


def _parse_cuda_module(payload: bytes) -> tuple[str, list[str], bytes]:
    reader = _Reader(payload)
    fmt = reader.str_()
    names = []
    for _ in range(reader.u64()):
        reader.str_()  # key
        names.append(reader.str_())
        reader.raw(4 * reader.u64())  # argument types
        for _ in range(reader.u64()):  # launch parameter tags
            reader.str_()
        reader.raw(4 * reader.u64())  # argument extra tags
    return fmt, names, reader.bytes_()


def _fatbin_entries(fatbin: bytes) -> list[dict]:
    """The entries of a fatbin: kind ("ptx"/"elf"), arch number, compressed, and for plain ELF its kernels."""
    _, _, header_size, total = struct.unpack_from("<IHHQ", fatbin, 0)
    pos, end = header_size, min(len(fatbin), header_size + total)
    entries = []
    while pos + 64 <= end:
        kind, _, entry_header, size = struct.unpack_from("<HHIQ", fatbin, pos)
        (arch,) = struct.unpack_from("<I", fatbin, pos + 28)
        (flags,) = struct.unpack_from("<Q", fatbin, pos + 40)
        if entry_header == 0 or kind not in _FATBIN_KIND:
            raise ValueError(f"unexpected fatbin entry at offset {pos}")
        payload = fatbin[pos + entry_header : pos + entry_header + size]
        compressed = bool(flags & _FATBIN_COMPRESSED)
        kernels = None
        if _FATBIN_KIND[kind] == "elf" and not compressed and payload[:4] == b"\x7fELF":
            kernels = _cubin_arch_and_kernels(payload)[1]
        entries.append({"kind": _FATBIN_KIND[kind], "arch": arch, "compressed": compressed, "kernels": kernels})
        pos += entry_header + size
    return entries


def _cubin_arch_and_kernels(cubin: bytes) -> tuple[int, list[str]]:
    elf = _Elf(cubin)
    # CUDA ELF ABI version 8 (CUDA 12.8+) moved the SM number from bits 0-7 of e_flags to bits 8-15.
    arch = (elf.flags >> 8) & 0xFF if cubin[8] >= 8 else elf.flags & 0xFF
    kernels = [name[len(".text.") :] for name in elf.section_names() if name.startswith(".text.")]
    return arch, kernels


class _Elf:
    """Just enough of ELF64 little-endian: section names, flags, and where a dynamic symbol's bytes are."""

    def __init__(self, data: bytes):
        if data[:4] != b"\x7fELF":
            raise ValueError("not an ELF file")
        if data[4] != 2 or data[5] != 1:
            raise ValueError("not a 64-bit little-endian ELF file")
        self.data = data
        (self.flags,) = struct.unpack_from("<I", data, 0x30)
        (shoff,) = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        self.sections = []  # (name offset, type, addr, offset, size, link, entsize)
        for i in range(shnum):
            name, stype, _, addr, offset, size, link, _, _, entsize = struct.unpack_from(
                "<IIQQQQIIQQ", data, shoff + i * shentsize
            )
            self.sections.append((name, stype, addr, offset, size, link, entsize))
        self.shstrndx = shstrndx

    def _string(self, section_index: int, offset: int) -> str:
        base = self.sections[section_index][3] + offset
        end = self.data.index(b"\0", base)
        return self.data[base:end].decode("utf-8", errors="replace")

    def section_names(self) -> list[str]:
        return [self._string(self.shstrndx, sec[0]) for sec in self.sections]

    def symbols(self, table: str = "dynsym"):
        """(name, defined, value) of each symbol in .dynsym or .symtab."""
        want_type = {"dynsym": 11, "symtab": 2}[table]  # SHT_DYNSYM, SHT_SYMTAB
        for _, stype, _, offset, size, link, entsize in self.sections:
            if stype != want_type or not entsize:
                continue
            for pos in range(offset + entsize, offset + size, entsize):  # entry 0 is the null symbol
                name, _, _, shndx, value, _ = struct.unpack_from("<IBBHQQ", self.data, pos)
                yield self._string(link, name), shndx != 0, value

    def symbol_offset(self, wanted: str) -> int | None:
        """File offset of the data of the defined symbol ``wanted`` (from .dynsym, else .symtab)."""
        for table in ("dynsym", "symtab"):
            for name, defined, value in self.symbols(table):
                if defined and name == wanted:
                    return self._file_offset(value)
        return None

    def _file_offset(self, address: int) -> int:
        for _, stype, addr, offset, size, _, _ in self.sections:
            if stype != 8 and addr and addr <= address < addr + size:  # 8: SHT_NOBITS has no file bytes
                return offset + (address - addr)
        raise ValueError(f"address {address:#x} is in no section")
