/*
 * A stand-in for the NVIDIA driver library (libcuda.so.1) on machines that have none.
 *
 * TVM's CUDA runtime (libtvm_runtime_cuda.so) links against libcuda.so.1. Without a driver that library cannot be
 * loaded, and TVM then quietly builds CUDA modules as source only. With this stub in the process the runtime loads,
 * so nvcc-built kernels are kept, exported and can be loaded back; anything that would touch a GPU fails with
 * CUDA_ERROR_NO_DEVICE.
 *
 * llmcc.cuda compiles this file at run time (soname libcuda.so.1) into its cache and loads it only when no real
 * libcuda.so.1 can be found. It must define every cu* symbol that libtvm_runtime_cuda.so imports, or loading that
 * library fails: see REQUIRED_DRIVER_SYMBOLS in llmcc/cuda.py, which the tests check against the library.
 */
#include <stddef.h>
#include <stdint.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUmodule;
typedef void *CUfunction;

CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, uint64_t flags);
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, uint64_t flags, int *status);

enum {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_NOT_INITIALIZED = 3,
  CUDA_ERROR_NO_DEVICE = 100,
  CUDA_ERROR_NOT_FOUND = 500,
};

/* Lets llmcc tell this library from a real driver once it is loaded. */
const char llmcc_cuda_driver_stub[] = "llmcc CUDA driver stub 1";

static const char *error_name(CUresult e) {
  switch (e) {
    case CUDA_SUCCESS: return "CUDA_SUCCESS";
    case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
    case CUDA_ERROR_NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
    case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    default: return NULL;
  }
}

CUresult cuGetErrorName(CUresult error, const char **str) {
  if (str == NULL) return CUDA_ERROR_INVALID_VALUE;
  *str = error_name(error);
  return *str ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult cuGetErrorString(CUresult error, const char **str) {
  if (str == NULL) return CUDA_ERROR_INVALID_VALUE;
  if (error == CUDA_ERROR_NO_DEVICE) {
    *str = "no CUDA-capable device is detected (llmcc driver stub: this machine has no NVIDIA driver)";
  } else {
    *str = error_name(error);
  }
  return *str ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* Driver discovery, as done by the CUDA runtime (libcudart) and by llmcc.cuda.gpu_arch().
 *
 * cuDriverGetVersion succeeds with a version above any CUDA runtime's, and cuGetProcAddress hands out this file's
 * functions: libcudart then gets as far as cuInit and reports cudaErrorNoDevice ("no CUDA-capable device is
 * detected"), rather than cudaErrorInsufficientDriver, which would send users looking for a driver update. */
#define STUB_DRIVER_VERSION 99990

CUresult cuInit(unsigned int flags) { (void)flags; return CUDA_ERROR_NO_DEVICE; }

CUresult cuDriverGetVersion(int *version) {
  if (version == NULL) return CUDA_ERROR_INVALID_VALUE;
  *version = STUB_DRIVER_VERSION;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int *count) {
  if (count) *count = 0;
  return CUDA_ERROR_NO_DEVICE;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
  (void)device; (void)ordinal;
  return CUDA_ERROR_NO_DEVICE;
}

CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
  (void)attribute; (void)device;
  if (value) *value = 0;
  return CUDA_ERROR_NO_DEVICE;
}

/* The symbols libtvm_runtime_cuda.so imports directly. None of them can do anything without a device. */
CUresult cuDeviceGetName(char *name, int len, CUdevice device) {
  (void)device;
  if (name && len > 0) name[0] = '\0';
  return CUDA_ERROR_NO_DEVICE;
}

CUresult cuFuncSetAttribute(CUfunction func, int attribute, int value) {
  (void)func; (void)attribute; (void)value;
  return CUDA_ERROR_NO_DEVICE;
}

CUresult cuLaunchKernelEx(const void *config, CUfunction func, void **params, void **extra) {
  (void)config; (void)func; (void)params; (void)extra;
  return CUDA_ERROR_NO_DEVICE;
}

CUresult cuModuleGetFunction(CUfunction *func, CUmodule module, const char *name) {
  (void)module; (void)name;
  if (func) *func = NULL;
  return CUDA_ERROR_NO_DEVICE;
}

CUresult cuModuleLoadData(CUmodule *module, const void *image) {
  (void)image;
  if (module) *module = NULL;
  return CUDA_ERROR_NO_DEVICE;
}

CUresult cuModuleUnload(CUmodule module) { (void)module; return CUDA_ERROR_NO_DEVICE; }

CUresult cuTensorMapEncodeTiled(void *tensor_map, int dtype, uint32_t rank, void *global_address,
                                const uint64_t *global_dim, const uint64_t *global_strides, const uint32_t *box_dim,
                                const uint32_t *element_strides, int interleave, int swizzle, int l2_promotion,
                                int oob_fill) {
  (void)tensor_map; (void)dtype; (void)rank; (void)global_address; (void)global_dim; (void)global_strides;
  (void)box_dim; (void)element_strides; (void)interleave; (void)swizzle; (void)l2_promotion; (void)oob_fill;
  return CUDA_ERROR_NO_DEVICE;
}

/* Entry points handed out by cuGetProcAddress; every other name is CUDA_ERROR_NOT_FOUND. */
typedef void (*stub_fn)(void);
static const struct {
  const char *name;
  stub_fn fn;
} entry_points[] = {
#define ENTRY(f) {#f, (stub_fn)f}
    ENTRY(cuGetErrorName),      ENTRY(cuGetErrorString),    ENTRY(cuInit),
    ENTRY(cuDriverGetVersion),  ENTRY(cuDeviceGetCount),    ENTRY(cuDeviceGet),
    ENTRY(cuDeviceGetAttribute), ENTRY(cuDeviceGetName),    ENTRY(cuFuncSetAttribute),
    ENTRY(cuLaunchKernelEx),    ENTRY(cuModuleGetFunction), ENTRY(cuModuleLoadData),
    ENTRY(cuModuleUnload),      ENTRY(cuTensorMapEncodeTiled),
#undef ENTRY
};

static int same_name(const char *a, const char *b) {
  while (*a && *a == *b) ++a, ++b;
  return *a == *b;
}

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, uint64_t flags, int *status) {
  (void)flags;
  if (symbol == NULL || pfn == NULL) return CUDA_ERROR_INVALID_VALUE;
  *pfn = NULL;
  if (same_name(symbol, "cuGetProcAddress")) {
    /* CUDA 12.0 added the status argument: hand out the signature the caller was built for. */
    *pfn = version >= 12000 ? (void *)cuGetProcAddress_v2 : (void *)cuGetProcAddress;
  } else {
    for (size_t i = 0; i < sizeof(entry_points) / sizeof(entry_points[0]); ++i) {
      if (same_name(symbol, entry_points[i].name)) {
        *pfn = (void *)entry_points[i].fn;
        break;
      }
    }
  }
  if (status) *status = *pfn ? 0 : 1; /* CU_GET_PROC_ADDRESS_SUCCESS / _SYMBOL_NOT_FOUND */
  return *pfn ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}

/* The pre-12.0 signature; libcudart asks for "cuGetProcAddress" by both. */
CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, uint64_t flags) {
  return cuGetProcAddress_v2(symbol, pfn, version, flags, NULL);
}
