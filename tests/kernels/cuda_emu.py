"""Run a TIR GPU kernel on the CPU: TVM's generated CUDA source, compiled with g++, one fiber per CUDA thread.

A test helper for machines without a GPU. ``emulate(func, arch, arrays, sizes)`` builds ``func`` for ``arch`` with
``llmcc.cuda.build`` (so nvcc accepts it too), takes the CUDA source TVM generated and the launch TVM's host code
would make (grid, block, scalar arguments, read from the lowered host function and evaluated for ``sizes``), and
runs the kernel block by block. Within a block each CUDA thread is a ``ucontext`` fiber; ``__syncthreads`` switches
back to a scheduler that resumes every fiber in turn (forward, reverse or a seeded random order: a missing barrier
shows up as an order-dependent result), and a fiber that finishes while others wait at a barrier is reported as a
divergent barrier. Warp shuffles are block-wide exchanges between two barriers, so they need the whole block to run
them in the same order, which is what the kernels here do (and what a full-mask ``__shfl_*_sync`` needs of a warp).

Types: ``half`` is GCC's ``_Float16`` (IEEE binary16, round to nearest even), ``nv_bfloat16`` a 16-bit struct with
round-to-nearest-even conversions; ``expf`` is the C library's (CUDA's ``expf`` is within 2 ulp of it). This checks
the algorithm, indexing, masking and synchronisation of a kernel, not its speed or a real GPU's memory model.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

import llmcc.cuda as lc

lc.prepare_driver()

import tvm
import tvm_ffi

CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
_CACHE: dict[str, ctypes.CDLL] = {}
_ORDERS = {"forward": 0, "reverse": 1, "random": 2}

_PRELUDE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ucontext.h>

struct emu_dim3 { unsigned x, y, z; };
static emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define CUDART_INF_F INFINITY
#define CUDART_NAN_F NAN
typedef unsigned int uint;
typedef unsigned char uchar;
typedef unsigned short ushort;

typedef _Float16 half;
struct nv_bfloat16 {
  uint16_t bits;
  nv_bfloat16() = default;
  nv_bfloat16(float f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { bits = 0x7fc0; return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = uint16_t(u >> 16);
  }
  operator float() const { uint32_t u = uint32_t(bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
typedef nv_bfloat16 __nv_bfloat16;

struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
static inline float2 make_float2(float x, float y) { return {x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct alignas(16) longlong2 { long long x, y; };
static inline longlong2 make_longlong2(long long x, long long y) { return {x, y}; }
static inline int2 make_int2(int x, int y) { return {x, y}; }

template <class T> static inline T max(T a, T b) { return a > b ? a : b; }
template <class T> static inline T min(T a, T b) { return a < b ? a : b; }
static inline float max(float a, float b) { return std::fmax(a, b); }
static inline float min(float a, float b) { return std::fmin(a, b); }

// ---- fibers
static const int EMU_MAX_THREADS = 1024;
static ucontext_t emu_sched;
static ucontext_t emu_ctx[EMU_MAX_THREADS];
static int emu_state[EMU_MAX_THREADS];  // 0 runnable, 1 at a barrier, 2 finished
static char* emu_stacks[EMU_MAX_THREADS];
static int emu_cur, emu_nthreads;
static const size_t EMU_STACK = 256 * 1024;
static void emu_call();

static void emu_fiber() {
  emu_call();
  emu_state[emu_cur] = 2;
  swapcontext(&emu_ctx[emu_cur], &emu_sched);
}

static void __syncthreads() {
  emu_state[emu_cur] = 1;
  swapcontext(&emu_ctx[emu_cur], &emu_sched);
}

static inline int emu_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

template <class T> static T emu_exchange(T v, int src) {
  static T slots[EMU_MAX_THREADS];
  slots[emu_tid()] = v;
  __syncthreads();
  T r = slots[src];
  __syncthreads();
  return r;
}

template <class T> static T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  int tid = emu_tid(), lane = tid & 31;
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return emu_exchange(v, tid - lane + src);
}

template <class T> static T __shfl_sync(unsigned, T v, int src_lane, int width = 32) {
  int tid = emu_tid(), lane = tid & 31;
  return emu_exchange(v, tid - lane + ((lane & ~(width - 1)) | (src_lane & (width - 1))));
}

template <class T> static T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  int tid = emu_tid(), lane = tid & 31;
  int src = (lane & (width - 1)) + int(delta) < width ? lane + int(delta) : lane;
  return emu_exchange(v, tid - lane + src);
}
"""

_DRIVER = r"""
static void* emu_bufs[64];
static long long emu_scalars[64];
static unsigned emu_seed;

static void emu_call() {
  %(call)s;
}

static int emu_run_block(int order) {
  int n = emu_nthreads;
  for (int i = 0; i < n; ++i) {
    getcontext(&emu_ctx[i]);
    emu_ctx[i].uc_stack.ss_sp = emu_stacks[i];
    emu_ctx[i].uc_stack.ss_size = EMU_STACK;
    emu_ctx[i].uc_link = nullptr;
    makecontext(&emu_ctx[i], emu_fiber, 0);
    emu_state[i] = 0;
  }
  int perm[EMU_MAX_THREADS];
  for (int round = 0;; ++round) {
    for (int i = 0; i < n; ++i) perm[i] = order == 1 ? n - 1 - i : i;
    if (order == 2) {
      for (int i = n - 1; i > 0; --i) {
        emu_seed = emu_seed * 1103515245u + 12345u;
        int j = int((emu_seed >> 8) %% unsigned(i + 1));
        std::swap(perm[i], perm[j]);
      }
    }
    for (int k = 0; k < n; ++k) {
      int i = perm[k];
      if (emu_state[i] == 2) continue;
      emu_cur = i;
      threadIdx.x = i %% blockDim.x;
      threadIdx.y = (i / blockDim.x) %% blockDim.y;
      threadIdx.z = i / (blockDim.x * blockDim.y);
      emu_state[i] = 0;
      swapcontext(&emu_sched, &emu_ctx[i]);
    }
    int done = 0;
    for (int i = 0; i < n; ++i) done += emu_state[i] == 2;
    if (done == n) return 0;
    if (done) return -(round + 1);  // some threads returned while others wait at a barrier
  }
}

extern "C" int emu_launch(void** bufs, long long* scalars, const unsigned* grid, const unsigned* block, int order,
                          unsigned seed) {
  for (int i = 0; i < %(nbufs)d; ++i) emu_bufs[i] = bufs[i];
  for (int i = 0; i < %(nscalars)d; ++i) emu_scalars[i] = scalars[i];
  emu_seed = seed;
  gridDim = {grid[0], grid[1], grid[2]};
  blockDim = {block[0], block[1], block[2]};
  emu_nthreads = int(block[0] * block[1] * block[2]);
  if (emu_nthreads > EMU_MAX_THREADS) return -100000;
  for (int i = 0; i < emu_nthreads; ++i)
    if (!emu_stacks[i]) emu_stacks[i] = static_cast<char*>(std::malloc(EMU_STACK));
  for (unsigned z = 0; z < grid[2]; ++z)
    for (unsigned y = 0; y < grid[1]; ++y)
      for (unsigned x = 0; x < grid[0]; ++x) {
        blockIdx = {x, y, z};
        int rc = emu_run_block(order);
        if (rc) return rc;
      }
  return 0;
}
"""

_SIGNATURE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\)\s*\{')


class EmulationError(RuntimeError):
    pass


def lower_launch(func: tvm.tirx.PrimFunc, arch: str) -> tuple[str, list, list[str], list]:
    """(kernel name, argument exprs, launch tags, launch value exprs, host bindings) of the single kernel launch in
    ``func``'s lowered host code."""
    from tvm.target import Target
    from tvm.tirx.build import split_host_device_mods

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    target = Target({"kind": "cuda", "arch": arch})
    with target:
        mod = tvm.tirx.transform.BindTarget(target.with_host(Target("llvm")))(mod)
        pipeline, _, _ = tvm.tirx.get_default_tir_pipeline(target)
        mod = pipeline(mod)
        host, _ = split_host_device_mods(mod)
    (host_func,) = list(host.functions.values())
    calls, binds = [], {}
    tvm_ffi.structural_walk(host_func.body, (tvm.ir.expr.Call, calls.append))

    def bind(node):
        binds.setdefault(node.var.name, node.value)

    tvm_ffi.structural_walk(host_func.body, (tvm.tirx.Bind, bind))
    launches = [c for c in calls if getattr(c.op, "name", "") == "tirx.call_ffi_kernel"]
    if len(launches) != 1:
        raise EmulationError(f"expected one kernel launch in the host code, found {len(launches)}")
    call = launches[0]
    tags = [str(t) for t in call.attrs.launch_params]
    args = list(call.args[1:])
    n_launch = len(tags)
    return str(call.args[0].value), args[: len(args) - n_launch], tags, args[len(args) - n_launch:], binds


def _evaluate(expr, env: dict, binds: dict) -> int:
    e = tvm.ir.prim.expr
    if isinstance(expr, int):
        return expr
    if isinstance(expr, e.IntImm):
        return int(expr.value)
    if isinstance(expr, e.Var):
        if expr.name in env:
            return env[expr.name]
        if expr.name in binds:
            env[expr.name] = _evaluate(binds[expr.name], env, binds)
            return env[expr.name]
        raise EmulationError(f"no value for {expr.name}")
    if isinstance(expr, e.Cast):
        return _evaluate(expr.value, env, binds)
    ops = {e.Add: lambda a, b: a + b, e.Sub: lambda a, b: a - b, e.Mul: lambda a, b: a * b,
           e.FloorDiv: lambda a, b: a // b, e.FloorMod: lambda a, b: a % b, e.Min: min, e.Max: max,
           e.Div: lambda a, b: int(a / b), e.Mod: lambda a, b: int(math_fmod(a, b))}
    for cls, fn in ops.items():
        if isinstance(expr, cls):
            return fn(_evaluate(expr.a, env, binds), _evaluate(expr.b, env, binds))
    raise EmulationError(f"cannot evaluate {type(expr).__name__}: {expr}")


def math_fmod(a: int, b: int) -> int:
    return a - int(a / b) * b


def _compile(source: str) -> ctypes.CDLL:
    key = hashlib.sha256(source.encode()).hexdigest()[:20]
    if key in _CACHE:
        return _CACHE[key]
    if CXX is None:
        raise EmulationError("no C++ compiler (g++) for the CUDA emulator")
    out_dir = Path(tempfile.gettempdir()) / f"llmcc-cuda-emu-{os.getuid()}"
    out_dir.mkdir(exist_ok=True)
    lib = out_dir / f"{key}.so"
    if not lib.exists():
        src = out_dir / f"{key}.cpp"
        src.write_text(source)
        tmp = out_dir / f"{key}.{os.getpid()}.so"
        proc = subprocess.run(
            [CXX, "-std=c++17", "-O1", "-fPIC", "-shared", "-fno-strict-aliasing", "-w", "-o", str(tmp), str(src)],
            check=False, capture_output=True, text=True)
        if proc.returncode:
            raise EmulationError(f"g++ failed on the emulated kernel ({src}):\n{proc.stderr[-3000:]}")
        os.replace(tmp, lib)
    handle = ctypes.CDLL(str(lib))
    handle.emu_launch.restype = ctypes.c_int
    _CACHE[key] = handle
    return handle


def _aligned(array: np.ndarray, alignment: int = 64) -> np.ndarray:
    """A C-contiguous copy of ``array`` whose data starts on an ``alignment``-byte boundary (vector loads need it)."""
    raw = np.empty(array.nbytes + alignment, np.uint8)
    start = (-raw.ctypes.data) % alignment
    out = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


class Emulated:
    """One kernel, built and compiled for emulation; call it with arrays and sizes."""

    def __init__(self, func: tvm.tirx.PrimFunc, arch: str = "sm_80", executable=None):
        """``executable``: ``llmcc.cuda.build``'s result for ``func`` on ``arch`` if the caller has one already."""
        if executable is None:
            executable = lc.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), arch)
        cuda = [m for m in lc._walk(executable.mod) if m.kind == "cuda"]
        source = cuda[0].inspect_source("")
        self.kernel, self.args, self.tags, self.launch, self.binds = lower_launch(func, arch)
        found = {m.group(1): m.group(2) for m in _SIGNATURE.finditer(source)}
        if self.kernel not in found:
            raise EmulationError(f"kernel {self.kernel} not in the CUDA source")
        params = [p.strip() for p in found[self.kernel].split(",")]
        if len(params) != len(self.args):
            raise EmulationError(f"{len(params)} kernel parameters, {len(self.args)} launch arguments")
        self.params = []  # (name, ctype, is_pointer)
        call_args, nb, ns = [], 0, 0
        for p in params:
            name = p.split()[-1]
            ctype = p[: p.rindex(name)].replace("__restrict__", "").strip()
            if ctype.endswith("*"):
                call_args.append(f"({ctype})emu_bufs[{nb}]")
                nb += 1
            else:
                call_args.append(f"({ctype})emu_scalars[{ns}]")
                ns += 1
            self.params.append((name, ctype, ctype.endswith("*")))
        body = source[source.index('extern "C" __global__'):]
        body = re.sub(r"__shared__ (alignas\(\d+\)) ", r"\1 static ", body)  # g++ wants attributes first
        self.source = (_PRELUDE + body + _DRIVER % {"call": f"{self.kernel}({', '.join(call_args)})",
                                                      "nbufs": max(nb, 1), "nscalars": max(ns, 1)})
        self.lib = _compile(self.source)

    def __call__(self, buffers: dict[str, np.ndarray], sizes: dict[str, int], order: str = "forward",
                 seed: int = 0) -> dict[str, np.ndarray]:
        """Run once. ``buffers`` maps buffer names (``Q``, ``K``, ...) to arrays, which are copied in and (all of them)
        copied back out in the returned dict; ``sizes`` gives the symbolic shape variables (``B``, ``SQ``, ...)."""
        env = dict(sizes)
        staged = {name: _aligned(np.ascontiguousarray(a)) for name, a in buffers.items()}
        bufs, scalars = [], []
        for (name, _ctype, is_pointer), arg in zip(self.params, self.args):
            if is_pointer:
                key = name.removesuffix("_ptr")
                if key not in staged:
                    raise EmulationError(f"no array for kernel parameter {name}")
                bufs.append(staged[key].ctypes.data)
            else:
                scalars.append(_evaluate(arg, env, self.binds))
        dims = {"blockIdx.x": 1, "blockIdx.y": 1, "blockIdx.z": 1, "threadIdx.x": 1, "threadIdx.y": 1,
                "threadIdx.z": 1}
        for tag, value in zip(self.tags, self.launch):
            if tag in dims:
                dims[tag] = _evaluate(value, env, self.binds)
        grid = (ctypes.c_uint * 3)(dims["blockIdx.x"], dims["blockIdx.y"], dims["blockIdx.z"])
        block = (ctypes.c_uint * 3)(dims["threadIdx.x"], dims["threadIdx.y"], dims["threadIdx.z"])
        if min(grid) == 0:  # CUDA refuses an empty grid; nothing to run
            return staged
        rc = self.lib.emu_launch((ctypes.c_void_p * max(len(bufs), 1))(*bufs),
                                 (ctypes.c_longlong * max(len(scalars), 1))(*scalars), grid, block,
                                 _ORDERS[order], seed)
        if rc == -100000:
            raise EmulationError("more than 1024 threads per block")
        if rc:
            raise EmulationError(f"divergent __syncthreads: some threads returned while others waited (round {-rc})")
        return staged
