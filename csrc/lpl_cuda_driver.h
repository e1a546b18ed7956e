/* The CUDA driver API as lpl_ext uses it: libcuda is opened at run time (dlopen), so the
 * module links no CUDA library, imports on any machine, and needs only the driver that
 * the user's torch already needs. Kernels come as a cubin (shipped with the package or
 * compiled by NVRTC at first use; lpl_ext/_cuda.py picks) loaded into the device's
 * primary context, the one torch uses. Launches go to the stream the caller passes. */
#ifndef LPL_CUDA_DRIVER_H
#define LPL_CUDA_DRIVER_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>

#include "lpl_kernel_abi.h"
#include "lpl_tensor.h"

/* The few driver types used, as cuda.h declares them (no CUDA header is needed). */
typedef int lpl_CUresult;
typedef int lpl_CUdevice;
typedef struct lpl_CUctx_st *lpl_CUcontext;
typedef struct lpl_CUmod_st *lpl_CUmodule;
typedef struct lpl_CUfunc_st *lpl_CUfunction;
typedef struct lpl_CUstream_st *lpl_CUstream;

/* Entry points resolved from libcuda.so.1 (versioned symbol names where cuda.h maps
 * the plain name to one). */
typedef struct {
    void *lib;
    int version; /* cuDriverGetVersion, e.g. 12040 */
    lpl_CUresult (*cuInit)(unsigned int);
    lpl_CUresult (*cuDriverGetVersion)(int *);
    lpl_CUresult (*cuDeviceGetCount)(int *);
    lpl_CUresult (*cuDeviceGet)(lpl_CUdevice *, int);
    lpl_CUresult (*cuDeviceGetAttribute)(int *, int, lpl_CUdevice);
    lpl_CUresult (*cuDevicePrimaryCtxRetain)(lpl_CUcontext *, lpl_CUdevice);
    lpl_CUresult (*cuDevicePrimaryCtxRelease)(lpl_CUdevice);
    lpl_CUresult (*cuCtxPushCurrent)(lpl_CUcontext);
    lpl_CUresult (*cuCtxPopCurrent)(lpl_CUcontext *);
    lpl_CUresult (*cuModuleLoadData)(lpl_CUmodule *, const void *);
    lpl_CUresult (*cuModuleUnload)(lpl_CUmodule);
    lpl_CUresult (*cuModuleGetFunction)(lpl_CUfunction *, lpl_CUmodule, const char *);
    lpl_CUresult (*cuLaunchKernel)(lpl_CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                   unsigned, lpl_CUstream, void **, void **);
    lpl_CUresult (*cuMemsetD8Async)(unsigned long long, unsigned char, size_t, lpl_CUstream);
    lpl_CUresult (*cuGetErrorName)(lpl_CUresult, const char **);
    lpl_CUresult (*cuGetErrorString)(lpl_CUresult, const char **);
    lpl_CUresult (*cuFuncGetAttribute)(int *, int, lpl_CUfunction);
    lpl_CUresult (*cuFuncSetAttribute)(lpl_CUfunction, int, int);
    lpl_CUresult (*cuPointerGetAttributes)(unsigned, int *, void **, unsigned long long);
    lpl_CUresult (*cuThreadExchangeStreamCaptureMode)(int *);
} lpl_cuda_driver;

/* The kernels of one device: a loaded module and its functions (LPL_KERNEL_LIST). */
typedef struct lpl_cuda_kernels {
    const lpl_cuda_driver *drv;
    PyObject *drv_owner; /* the driver capsule, kept alive while the module lives */
    int ordinal;
    lpl_CUdevice dev;
    lpl_CUcontext ctx; /* the device's primary context, retained */
    lpl_CUmodule module;
    lpl_CUfunction fn[LPL_KERNEL_COUNT];
    int sm_count;
    int smem_optin_bytes;                   /* shared memory per block a kernel may opt into */
    int max_dynamic_smem[LPL_KERNEL_COUNT]; /* dynamic shared bytes each kernel is opted in to */
    int kernel_set; /* LPL_KERNEL_SET_V2 (current) or LPL_KERNEL_SET_V1 (the 0.2 kernels) */
} lpl_cuda_kernels;

/* The kernels capsule passed to an entry point for a tensor on CUDA device `ordinal`;
 * 0, or -1 with TypeError / ValueError naming `kernels`. */
int lpl_kernels_from_object(PyObject *obj, int ordinal, const lpl_cuda_kernels **out);

/* The CUDA stream handle a caller passes (an int, e.g. torch's
 * current_stream().cuda_stream; 0 is the legacy default stream); None is refused, so
 * that no call silently runs on another stream than the caller's. 0 or -1 with
 * ValueError / TypeError naming `stream`. */
int lpl_stream_from_object(PyObject *obj, void **out);

/* What a CUDA call takes besides its tensors, checked with the GIL held: the caller's
 * stream, the kernels of `ref`'s device, and the scratch buffer (`ws_dtype`, `ws_len`
 * elements on `ref`'s device; ws_len < 0 means the shape is too large for it).
 * `*keepalive` receives a reference that must outlive the call. 0, or -1 with a Python
 * exception naming the argument. */
typedef struct {
    void *stream;
    const lpl_cuda_kernels *kernels;
    void *workspace;
} lpl_cuda_call;
int lpl_cuda_call_args(PyObject *stream_obj, PyObject *kernels_obj, PyObject *ws_obj, const lpl_tensor *ref,
                       const char *refname, lpl_dtype ws_dtype, int64_t ws_len, lpl_cuda_call *out,
                       PyObject **keepalive);

/* The same arguments of a CPU call: ignored, but junk is refused as it would be for CUDA
 * (stream None or an int, kernels None or a kernels capsule). */
int lpl_cpu_call_args(PyObject *stream_obj, PyObject *kernels_obj);

/* Makes the kernels' context current on this thread (and lpl_cu_end restores the
 * caller's), so a call never changes which device or context the caller has. */
int lpl_cu_begin(const lpl_cuda_kernels *k, char *err);
void lpl_cu_end(const lpl_cuda_kernels *k);

/* 0 when every tensor (NULL entries skipped) is device (or managed) memory of the kernels'
 * device over its whole extent, per cuPointerGetAttributes; else -1 with ValueError
 * naming the tensor (a CUDA-labelled DLPack capsule over host memory would otherwise
 * fault the context). GIL held. */
int lpl_cuda_check_memory(const lpl_cuda_kernels *k, const lpl_tensor *const *tensors, const char *const *names,
                          int count);

/* Launches kernel `id` on a 1-D grid; args as cuLaunchKernel takes them. `smem` beyond
 * the kernel's opt-in (max_dynamic_smem) is refused here, with a message. */
int lpl_cu_launch(const lpl_cuda_kernels *k, int id, int64_t grid, int block, size_t smem, void *stream, void **args,
                  char *err);
/* Zeroes `bytes` bytes of device memory on the stream. */
int lpl_cu_memset0(const lpl_cuda_kernels *k, void *ptr, size_t bytes, void *stream, char *err);

/* Python entry points (module.c registers them). */
PyObject *lpl_py_cuda_driver_open(PyObject *self, PyObject *args);
PyObject *lpl_py_cuda_device_attributes(PyObject *self, PyObject *args);
PyObject *lpl_py_cuda_load_kernels(PyObject *self, PyObject *args);
PyObject *lpl_py_cuda_kernel_names(PyObject *self, PyObject *unused);

#endif /* LPL_CUDA_DRIVER_H */
