"""CUDA cross-compilation without a GPU (llmcc.cuda): real kernels in the library, loadable, and a stub driver that
never stands in for a real one.

Needs nvcc and a C compiler; the GPU-less checks are skipped on a machine with an NVIDIA driver.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import llmcc.cuda as lc
from llmcc.errors import ArtifactError, BuildFailure

lc.prepare_driver()  # before tvm, as llmcc/__init__.py does

import tvm  # noqa: E402
import tvm_ffi  # noqa: E402
from tvm import relax, te, tirx  # noqa: E402
from tvm.script import relax as R  # noqa: E402

pytestmark = pytest.mark.cuda_build

REPO = Path(__file__).resolve().parents[1]
HAS_NVCC = bool(shutil.which("nvcc") or os.access("/usr/local/cuda/bin/nvcc", os.X_OK) or os.environ.get("CUDA_HOME"))
CC = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
REAL_DRIVER = lc.driver_state() == "real"

needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="needs nvcc (CUDA toolkit)")
needs_no_driver = pytest.mark.skipif(REAL_DRIVER, reason="this machine has an NVIDIA driver")
needs_cc = pytest.mark.skipif(not CC, reason="needs a C compiler")


@tvm.script.ir_module
class MatmulSoftmax:
    @R.function
    def main(x: R.Tensor((64, 128), "float32"), w: R.Tensor((128, 256), "float32")):
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.nn.softmax(y, axis=-1)
            R.output(z)
        return z


@tvm.script.ir_module
class MatmulFp16:  # big enough for dlight's tensor-core matmul rule
    @R.function
    def main(x: R.Tensor((256, 512), "float16"), w: R.Tensor((512, 256), "float16")):
        with R.dataflow():
            y = R.matmul(x, w)
            R.output(y)
        return y


MODELS = {
    "fp32": (MatmulSoftmax, [((64, 128), "float32"), ((128, 256), "float32")]),
    "fp16": (MatmulFp16, [((256, 512), "float16"), ((512, 256), "float16")]),
}
BUILDS = [("fp32", "sm_80"), ("fp32", "sm_90"), ("fp16", "sm_80"), ("fp16", "sm_90")]


def run_python(code: str, env: dict | None = None, timeout: float = 300) -> dict:
    """Run ``code`` in a fresh interpreter (repo on sys.path); it prints one JSON line last, which is returned."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    full_env.update(env or {})
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "probe.py"  # a file, not -c: TVMScript reads the source back
        script.write_text(textwrap.dedent(code))
        proc = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=full_env, cwd=REPO, timeout=timeout
        )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hook():
    return tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)


def loaded_stub() -> Path:
    """The stub driver mapped into this process."""
    maps = Path("/proc/self/maps").read_text()
    paths = {line.split()[-1] for line in maps.splitlines() if "/driver-stub/" in line}
    assert len(paths) == 1, paths
    return Path(paths.pop())


def cuda_source(executable) -> str:
    return next(m for m in lc._walk(executable.mod) if m.kind == "cuda").inspect_source("")


def find_cuobjdump() -> str | None:
    candidates = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build each (model, arch) once: {(model, arch): {"path", "seconds", "source"}}."""
    out = tmp_path_factory.mktemp("cuda-libs")
    cache: dict = {}

    def get(model: str, arch: str) -> dict:
        if (model, arch) not in cache:
            before = hook()
            start = time.perf_counter()
            executable = lc.build(MODELS[model][0], arch)
            seconds = time.perf_counter() - start
            assert hook().same_as(before), "build() must restore TVM's compile hook"
            path = out / f"{model}_{arch}.so"
            executable.export_library(str(path))
            cache[model, arch] = {"path": path, "seconds": seconds, "source": cuda_source(executable)}
        return cache[model, arch]

    return get


# ---------------------------------------------------------------------------------------------------------------
# The driver


@needs_no_driver
def test_driver_state_is_stub_without_driver():
    assert lc.driver_state() == "stub"
    assert lc.gpu_arch() is None
    # The stub is the libcuda.so.1 of this process, loaded from llmcc's cache.
    stub = loaded_stub()
    assert stub.name == "libcuda.so.1" and stub.parent.parent == lc.cache_dir() / "driver-stub"
    # and TVM's CUDA runtime registered on top of it
    assert tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None
    assert not tvm.cuda(0).exist


def test_prepare_driver_is_idempotent_and_cheap():
    state = lc.driver_state()
    start = time.perf_counter()
    for _ in range(1000):
        lc.prepare_driver()
    assert time.perf_counter() - start < 0.05
    assert lc.driver_state() == state


@needs_cc
def test_stub_defines_every_driver_symbol_tvm_imports(tmp_path, monkeypatch):
    runtime = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    elf = lc._Elf(runtime.read_bytes())
    imported = {name for name, defined, _ in elf.symbols() if not defined and re.fullmatch(r"cu[A-Z]\w*", name)}
    assert imported and imported <= set(lc.REQUIRED_DRIVER_SYMBOLS)

    monkeypatch.setenv("LLMCC_CACHE", str(tmp_path))
    stub = lc._build_stub()
    assert stub == tmp_path / "driver-stub" / stub.parent.name / "libcuda.so.1"
    stub_elf = lc._Elf(stub.read_bytes())
    exported = {name for name, defined, _ in stub_elf.symbols() if defined}
    assert set(lc.REQUIRED_DRIVER_SYMBOLS) | {"cuInit", "cuGetProcAddress_v2", "llmcc_cuda_driver_stub"} <= exported
    assert b"libcuda.so.1" in stub.read_bytes()  # soname


FAKE_DRIVER = r"""
int cuInit(unsigned flags) { return 0; }
int cuDeviceGetCount(int *n) { *n = 1; return 0; }
int cuDeviceGet(int *d, int ordinal) { *d = ordinal; return 0; }
int cuDeviceGetAttribute(int *v, int attr, int dev) { *v = attr == 75 ? 9 : 0; return 0; }  /* sm_90 */
"""

PROBE_DRIVER = """
    import json, pathlib
    import llmcc.cuda as c
    c.prepare_driver()
    maps = pathlib.Path("/proc/self/maps").read_text()
    print(json.dumps({"state": c.driver_state(), "arch": c.gpu_arch(), "problem": c.driver_problem(),
                      "stub_mapped": "driver-stub" in maps}))
"""


@needs_cc
def test_real_driver_is_never_shadowed(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (tmp_path / "fake.c").write_text(FAKE_DRIVER)
    subprocess.run(
        [*CC.split(), "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", fake / "libcuda.so.1", tmp_path / "fake.c"],
        check=True,
    )
    cache = tmp_path / "cache"
    got = run_python(PROBE_DRIVER, {"LD_LIBRARY_PATH": str(fake), "LLMCC_CACHE": str(cache)})
    assert got == {"state": "real", "arch": "sm_90", "problem": "", "stub_mapped": False}
    assert not (cache / "driver-stub").exists()  # not even built

    # A libcuda.so.1 that is there but broken is reported, not papered over with the stub.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "libcuda.so.1").write_bytes(b"not a library")
    got = run_python(PROBE_DRIVER, {"LD_LIBRARY_PATH": str(broken), "LLMCC_CACHE": str(cache)})
    assert got["state"] == "missing" and got["arch"] is None and not got["stub_mapped"]
    assert "does not load" in got["problem"]


@needs_no_driver
def test_stub_on_ld_library_path_is_recognised():
    got = run_python(PROBE_DRIVER, {"LD_LIBRARY_PATH": str(loaded_stub().parent)})
    assert got["state"] == "stub" and got["arch"] is None


# ---------------------------------------------------------------------------------------------------------------
# Building


@needs_nvcc
@pytest.mark.parametrize("model,arch", BUILDS, ids=[f"{m}-{a}" for m, a in BUILDS])
def test_build_holds_sass_and_ptx(built, model, arch):
    lib = built(model, arch)
    info = lc.cuda_binary_info(lib["path"])
    number = arch[3:]
    assert info["has_fatbin"] and not info["source_only"] and info["format"] == "fatbin"
    assert info["sass_archs"] == [arch]
    assert info["ptx_archs"] == [f"compute_{number}"]
    assert info["kernels"] >= 1 and info["modules"] == ["relax.VMExecutable", "_lib", "cuda"]
    assert info["sass_kernels"] == {arch: sorted(info["kernel_names"])}  # every kernel TVM looks up is in the SASS
    if model == "fp16":
        assert "mma_sync" in lib["source"] or "mma.sync" in lib["source"], "expected a tensor-core schedule"


@needs_nvcc
def test_cuobjdump_agrees(built, tmp_path):
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump")
    lib = built("fp32", "sm_80")
    blob = lc._library_blob(Path(lib["path"]).read_bytes())
    payload = dict(lc._parse_library_blob(blob))["cuda"]
    _, names, fatbin = lc._parse_cuda_module(payload)
    (tmp_path / "k.fatbin").write_bytes(fatbin)
    listing = subprocess.run(
        [tool, "--list-elf", "--list-ptx", str(tmp_path / "k.fatbin")], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"ELF file\s+1: .*sm_80\.cubin", listing) and re.search(r"PTX file\s+1: .*sm_80\.ptx", listing)
    assert "sm_90" not in listing
    elf = subprocess.run([tool, "-elf", str(tmp_path / "k.fatbin")], capture_output=True, text=True).stdout
    for name in names:
        assert f".text.{name}" in elf


@needs_nvcc
@needs_no_driver
def test_exported_libraries_load_in_fresh_process(built):
    libs = {f"{m}-{a}": [str(built(m, a)["path"]), MODELS[m][1]] for m, a in BUILDS}
    got = run_python(
        f"""
        import json
        import llmcc.cuda as c
        c.prepare_driver()
        import numpy as np, tvm
        from tvm import relax
        out = {{"state": c.driver_state()}}
        for name, (path, inputs) in {libs!r}.items():
            lib = tvm.runtime.load_module(path)  # must load: the fatbin is only handed to the driver on first use
            kinds = []
            stack = [lib]
            while stack:
                m = stack.pop(); kinds.append(m.kind); stack.extend(m.imports)
            try:
                vm = relax.VirtualMachine(lib, tvm.cuda(0))
                args = [tvm.runtime.tensor(np.zeros(s, d), tvm.cuda(0)) for s, d in inputs]
                vm["main"](*args)
                error = None
            except Exception as e:
                error = str(e)
            out[name] = {{"kinds": sorted(kinds), "error": error}}
        print(json.dumps(out))
        """
    )
    assert got.pop("state") == "stub"
    for name, result in got.items():
        assert result["kinds"] == ["cuda", "library", "relax.VMExecutable"], name
        assert result["error"] and "no CUDA-capable device" in result["error"], (name, result["error"])


def test_cpu_library_has_no_fatbin(tmp_path):
    executable = tvm.compile(MatmulSoftmax, target=tvm.target.Target({"kind": "llvm"}))
    executable.export_library(str(tmp_path / "cpu.so"))
    info = lc.cuda_binary_info(tmp_path / "cpu.so")
    assert info["has_fatbin"] is False and info["source_only"] is False and info["format"] is None
    assert info["sass_archs"] == [] and info["ptx_archs"] == [] and info["kernels"] == 0
    assert "cuda" not in info["modules"]


def test_cuda_binary_info_rejects_non_libraries(tmp_path):
    (tmp_path / "x.so").write_bytes(b"hello")
    with pytest.raises(ArtifactError):
        lc.cuda_binary_info(tmp_path / "x.so")
    with pytest.raises(ArtifactError):
        lc.cuda_binary_info(tmp_path / "missing.so")


@needs_nvcc
def test_without_stub_build_fails_and_source_only_is_detected(tmp_path):
    """With the stub off and no driver, build() refuses; a plain tvm.compile then yields source only."""
    if REAL_DRIVER:
        pytest.skip("this machine has an NVIDIA driver")
    path = tmp_path / "source_only.so"
    got = run_python(
        f"""
        import json
        import llmcc.cuda as c
        from llmcc.errors import BuildFailure
        c.prepare_driver()
        import tvm
        from tvm.script import relax as R

        @tvm.script.ir_module
        class Mod:
            @R.function
            def main(x: R.Tensor((64, 128), "float32")):
                with R.dataflow():
                    z = R.nn.softmax(x, axis=-1)
                    R.output(z)
                return z

        try:
            c.build(Mod, "sm_80")
            error = None
        except BuildFailure as e:
            error = str(e)
        target = tvm.target.Target({{"kind": "cuda", "arch": "sm_80"}})
        with target:
            tvm.compile(Mod, target=target).export_library({str(path)!r})  # TVM's silent source-only build
        print(json.dumps({{"state": c.driver_state(), "error": error}}))
        """,
        {"LLMCC_CUDA_STUB": "0"},
    )
    assert got["state"] == "missing"
    assert got["error"] and "\n" not in got["error"] and "LLMCC_CUDA_STUB=0" in got["error"]
    info = lc.cuda_binary_info(path)
    assert info["source_only"] is True and info["has_fatbin"] is False and info["format"] == "source"
    assert info["sass_archs"] == [] and info["kernels"] >= 1


@needs_nvcc
@needs_no_driver
def test_tvm_imported_before_llmcc(tmp_path):
    """tvm first means its CUDA runtime found no libcuda.so.1; prepare_driver loads it late, on the stub."""
    path = tmp_path / "late.so"
    got = run_python(
        f"""
        import json
        import tvm, tvm_ffi
        before = tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None
        import llmcc.cuda as c
        c.prepare_driver()
        from tvm.script import relax as R

        @tvm.script.ir_module
        class Mod:
            @R.function
            def main(x: R.Tensor((64, 128), "float32")):
                with R.dataflow():
                    z = R.nn.softmax(x, axis=-1)
                    R.output(z)
                return z

        c.build(Mod, "sm_80").export_library({str(path)!r})
        print(json.dumps({{"before": before, "state": c.driver_state()}}))
        """
    )
    assert got == {"before": False, "state": "stub"}
    assert lc.cuda_binary_info(path)["sass_archs"] == ["sm_80"]


@needs_nvcc
def test_nvcc_failure_names_the_kernel():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((256,), "float32"))
    with bb.function("main", [x]):

        def broken(a):
            return te.compute(a.shape, lambda i: tirx.call_pure_extern("float32", "llmcc_no_such_fn", a[i]))

        bb.emit_func_output(bb.emit_te(broken, x, primfunc_name_hint="broken"))
    before = hook()
    with pytest.raises(BuildFailure) as err:
        lc.build(bb.get(), "sm_80")
    message = str(err.value)
    assert "\n" not in message and len(message) < 400
    assert "broken_kernel" in message and "llmcc_no_such_fn" in message and "sm_80" in message
    assert hook().same_as(before)


@needs_nvcc
def test_pipeline_is_passed_through():
    seen = []

    @tvm.transform.module_pass(opt_level=0, name="recording_pipeline")
    def pipeline(mod, _ctx):
        seen.append(str(tvm.target.Target.current().attrs["arch"]))
        return relax.get_default_pipeline(tvm.target.Target.current())(mod)

    executable = lc.build(MatmulSoftmax, "sm_86", pipeline=pipeline)
    assert seen == ["sm_86"]  # run once, inside the build's target
    assert any(m.kind == "cuda" and m.is_runnable() for m in lc._walk(executable.mod))

    @tvm.transform.module_pass(opt_level=0, name="failing_pipeline")
    def failing(mod, _ctx):
        raise ValueError("llmcc test: this pipeline always fails")

    # None, as in tvm.compile: no Relax passes, for a module already lowered (as llmcc's pipeline leaves it)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    lowered = relax.get_default_pipeline(target)(MatmulSoftmax)
    executable = lc.build(lowered, "sm_80", pipeline=None)
    assert any(m.kind == "cuda" and m.is_runnable() for m in lc._walk(executable.mod))

    with pytest.raises(BuildFailure, match=r"^CUDA build for sm_80 failed: .*this pipeline always fails") as err:
        lc.build(MatmulSoftmax, "sm_80", pipeline=failing)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ["sm_75", "compute_80", "sm_100", "80"])
def test_unsupported_arch(arch):
    with pytest.raises(BuildFailure, match="unsupported CUDA architecture"):
        lc.build(MatmulSoftmax, arch)


def test_gencode_flags():
    assert lc.gencode_flags("sm_86") == [
        "-gencode", "arch=compute_86,code=sm_86", "-gencode", "arch=compute_86,code=compute_86"
    ]
