/* The CUDA driver API, opened at run time, and the loaded kernels of a device
 * (lpl_cuda_driver.h). State lives in two kinds of Python capsules owned by
 * lpl_ext/_cuda.py: one driver per process, one kernels module per device. */
#include "lpl_cuda_driver.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include "lpl_interop.h"
#include "lpl_ops.h"

#define DRIVER_CAPSULE "lpl_ext.cuda_driver"
#define KERNELS_CAPSULE "lpl_ext.cuda_kernels"

enum {
    ATTR_MULTIPROCESSOR_COUNT = 16,
    ATTR_COMPUTE_CAPABILITY_MAJOR = 75,
    ATTR_COMPUTE_CAPABILITY_MINOR = 76,
    ATTR_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97,
};
/* CUfunction_attribute, CUpointer_attribute, CUmemorytype, CUstreamCaptureMode (cuda.h) */
enum { FUNC_ATTR_SHARED_SIZE_BYTES = 1, FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8 };
enum { PTR_ATTR_MEMORY_TYPE = 2, PTR_ATTR_IS_MANAGED = 8, PTR_ATTR_DEVICE_ORDINAL = 9, PTR_ATTR_RANGE_START = 10,
       PTR_ATTR_RANGE_SIZE = 11 };
enum { MEMORYTYPE_HOST = 1, MEMORYTYPE_DEVICE = 2, MEMORYTYPE_UNIFIED = 4 };
enum { CAPTURE_MODE_RELAXED = 2 };
#define DEFAULT_SHARED_BYTES (48 * 1024)

static const char *const kernel_names[LPL_KERNEL_COUNT] = {
#define LPL_KERNEL_NAME_ENTRY(name) "lpl_" #name,
    LPL_KERNEL_LIST(LPL_KERNEL_NAME_ENTRY)
#undef LPL_KERNEL_NAME_ENTRY
};

/* "what: CUDA_ERROR_NAME (description)" into err. */
static void format_error(const lpl_cuda_driver *drv, lpl_CUresult rc, const char *what, char *err) {
    const char *name = NULL, *desc = NULL;
    if (drv->cuGetErrorName == NULL || drv->cuGetErrorName(rc, &name) != 0) name = NULL;
    if (drv->cuGetErrorString == NULL || drv->cuGetErrorString(rc, &desc) != 0) desc = NULL;
    snprintf(err, LPL_ERR_LEN, "%s: %s (%s, code %d)", what, name ? name : "CUDA error",
             desc ? desc : "no description", rc);
}

static void driver_capsule_free(PyObject *capsule) {
    lpl_cuda_driver *drv = (lpl_cuda_driver *)PyCapsule_GetPointer(capsule, DRIVER_CAPSULE);
    if (drv == NULL) return;
    if (drv->lib) dlclose(drv->lib); /* torch holds its own reference to libcuda */
    PyMem_Free(drv);
}

/* cuda_driver_open(path) -> capsule: dlopen(path) (normally "libcuda.so.1"), resolve the
 * entry points, cuInit(0). RuntimeError naming the library and the remedy on failure. */
PyObject *lpl_py_cuda_driver_open(PyObject *self, PyObject *args) {
    (void)self;
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path)) return NULL;
    lpl_cuda_driver *drv = (lpl_cuda_driver *)PyMem_Calloc(1, sizeof(*drv));
    PyObject *capsule = NULL;
    char err[LPL_ERR_LEN];
    if (drv == NULL) return PyErr_NoMemory();
    drv->lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (drv->lib == NULL) {
        const char *why = dlerror();
        PyErr_Format(PyExc_RuntimeError,
                     "CUDA driver: cannot load %s (%s). CUDA tensors need the NVIDIA driver's "
                     "libcuda.so.1: install the NVIDIA driver (or, in a container, run with the "
                     "NVIDIA container runtime); CPU tensors keep working",
                     path, why ? why : "unknown error");
        goto fail;
    }
    struct {
        void **slot;
        const char *symbol;
    } table[] = {
        {(void **)&drv->cuInit, "cuInit"},
        {(void **)&drv->cuDriverGetVersion, "cuDriverGetVersion"},
        {(void **)&drv->cuDeviceGetCount, "cuDeviceGetCount"},
        {(void **)&drv->cuDeviceGet, "cuDeviceGet"},
        {(void **)&drv->cuDeviceGetAttribute, "cuDeviceGetAttribute"},
        {(void **)&drv->cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain"},
        {(void **)&drv->cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2"},
        {(void **)&drv->cuCtxPushCurrent, "cuCtxPushCurrent_v2"},
        {(void **)&drv->cuCtxPopCurrent, "cuCtxPopCurrent_v2"},
        {(void **)&drv->cuModuleLoadData, "cuModuleLoadData"},
        {(void **)&drv->cuModuleUnload, "cuModuleUnload"},
        {(void **)&drv->cuModuleGetFunction, "cuModuleGetFunction"},
        {(void **)&drv->cuLaunchKernel, "cuLaunchKernel"},
        {(void **)&drv->cuMemsetD8Async, "cuMemsetD8Async"},
        {(void **)&drv->cuGetErrorName, "cuGetErrorName"},
        {(void **)&drv->cuGetErrorString, "cuGetErrorString"},
        {(void **)&drv->cuFuncGetAttribute, "cuFuncGetAttribute"},
        {(void **)&drv->cuFuncSetAttribute, "cuFuncSetAttribute"},
        {(void **)&drv->cuPointerGetAttributes, "cuPointerGetAttributes"},
        {(void **)&drv->cuThreadExchangeStreamCaptureMode, "cuThreadExchangeStreamCaptureMode"},
    };
    for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); ++i) {
        *table[i].slot = dlsym(drv->lib, table[i].symbol);
        if (*table[i].slot == NULL) {
            PyErr_Format(PyExc_RuntimeError,
                         "CUDA driver: %s has no %s; the NVIDIA driver is too old or broken "
                         "(update the driver)", path, table[i].symbol);
            goto fail;
        }
    }
    lpl_CUresult rc = drv->cuInit(0);
    if (rc != 0) {
        format_error(drv, rc, "cuInit", err);
        PyErr_Format(PyExc_RuntimeError,
                     "CUDA driver: %s (is a GPU visible? check nvidia-smi and CUDA_VISIBLE_DEVICES)", err);
        goto fail;
    }
    if (drv->cuDriverGetVersion(&drv->version) != 0) drv->version = 0;
    capsule = PyCapsule_New(drv, DRIVER_CAPSULE, driver_capsule_free);
    if (capsule == NULL) goto fail;
    return capsule;
fail:
    if (drv->lib) dlclose(drv->lib);
    PyMem_Free(drv);
    return NULL;
}

static const lpl_cuda_driver *driver_from(PyObject *obj) {
    if (!PyCapsule_IsValid(obj, DRIVER_CAPSULE)) {
        PyErr_SetString(PyExc_TypeError, "driver: expected the capsule of cuda_driver_open()");
        return NULL;
    }
    return (const lpl_cuda_driver *)PyCapsule_GetPointer(obj, DRIVER_CAPSULE);
}

static int get_device(const lpl_cuda_driver *drv, int ordinal, lpl_CUdevice *dev) {
    char err[LPL_ERR_LEN];
    int count = 0;
    lpl_CUresult rc = drv->cuDeviceGetCount(&count);
    if (rc != 0) {
        format_error(drv, rc, "cuDeviceGetCount", err);
        PyErr_Format(PyExc_RuntimeError, "CUDA driver: %s", err);
        return -1;
    }
    if (ordinal < 0 || ordinal >= count) {
        PyErr_Format(PyExc_ValueError, "device: CUDA device %d does not exist (%d visible)", ordinal, count);
        return -1;
    }
    rc = drv->cuDeviceGet(dev, ordinal);
    if (rc != 0) {
        format_error(drv, rc, "cuDeviceGet", err);
        PyErr_Format(PyExc_RuntimeError, "CUDA driver: %s", err);
        return -1;
    }
    return 0;
}

/* cuda_device_attributes(driver, ordinal) -> dict(driver_version, major, minor, sm_count) */
PyObject *lpl_py_cuda_device_attributes(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *drv_obj;
    int ordinal;
    if (!PyArg_ParseTuple(args, "Oi", &drv_obj, &ordinal)) return NULL;
    const lpl_cuda_driver *drv = driver_from(drv_obj);
    if (drv == NULL) return NULL;
    lpl_CUdevice dev;
    if (get_device(drv, ordinal, &dev) < 0) return NULL;
    int major = 0, minor = 0, sms = 0;
    char err[LPL_ERR_LEN];
    lpl_CUresult rc = drv->cuDeviceGetAttribute(&major, ATTR_COMPUTE_CAPABILITY_MAJOR, dev);
    if (rc == 0) rc = drv->cuDeviceGetAttribute(&minor, ATTR_COMPUTE_CAPABILITY_MINOR, dev);
    if (rc == 0) rc = drv->cuDeviceGetAttribute(&sms, ATTR_MULTIPROCESSOR_COUNT, dev);
    if (rc != 0) {
        format_error(drv, rc, "cuDeviceGetAttribute", err);
        PyErr_Format(PyExc_RuntimeError, "CUDA driver: %s", err);
        return NULL;
    }
    return Py_BuildValue("{s:i,s:i,s:i,s:i}", "driver_version", drv->version, "major", major, "minor", minor,
                         "sm_count", sms);
}

static void kernels_capsule_free(PyObject *capsule) {
    lpl_cuda_kernels *k = (lpl_cuda_kernels *)PyCapsule_GetPointer(capsule, KERNELS_CAPSULE);
    if (k == NULL) return;
    const lpl_cuda_driver *drv = k->drv;
    lpl_CUcontext popped;
    /* errors are ignored: at interpreter exit the driver may already be shutting down */
    if (k->module && drv->cuCtxPushCurrent(k->ctx) == 0) {
        drv->cuModuleUnload(k->module);
        drv->cuCtxPopCurrent(&popped);
    }
    if (k->ctx) drv->cuDevicePrimaryCtxRelease(k->dev);
    Py_XDECREF(k->drv_owner);
    PyMem_Free(k);
}

/* Loads `image` into the current context and resolves every kernel of LPL_KERNEL_LIST,
 * opting each into the device's shared memory beyond the default 48 KiB, in relaxed
 * capture mode (restored before returning). 0, or a CUDA error code with err set
 * (k->module is NULL unless it loaded). No Python calls: runs without the GIL. */
static int load_module_functions(lpl_cuda_kernels *k, const void *image, char *err) {
    const lpl_cuda_driver *drv = k->drv;
    int mode = CAPTURE_MODE_RELAXED;
    lpl_CUresult rc = drv->cuThreadExchangeStreamCaptureMode(&mode);
    if (rc != 0) {
        format_error(drv, rc, "cuThreadExchangeStreamCaptureMode", err);
        return rc;
    }
    rc = drv->cuModuleLoadData(&k->module, image);
    if (rc != 0) {
        k->module = NULL;
        format_error(drv, rc, "cannot load the kernel image: cuModuleLoadData", err);
        goto done;
    }
    for (int i = 0; i < LPL_KERNEL_COUNT; ++i) {
        rc = drv->cuModuleGetFunction(&k->fn[i], k->module, kernel_names[i]);
        if (rc != 0) {
            char what[96];
            snprintf(what, sizeof(what), "the kernel image lacks a kernel: %s", kernel_names[i]);
            format_error(drv, rc, what, err);
            goto done;
        }
        int static_bytes = 0;
        rc = drv->cuFuncGetAttribute(&static_bytes, FUNC_ATTR_SHARED_SIZE_BYTES, k->fn[i]);
        int dynamic = k->smem_optin_bytes - static_bytes;
        if (rc == 0 && dynamic > DEFAULT_SHARED_BYTES - static_bytes)
            rc = drv->cuFuncSetAttribute(k->fn[i], FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic);
        else
            dynamic = DEFAULT_SHARED_BYTES - static_bytes;
        if (rc != 0) {
            format_error(drv, rc, kernel_names[i], err);
            goto done;
        }
        k->max_dynamic_smem[i] = dynamic;
    }
done:;
    int restored = mode;
    drv->cuThreadExchangeStreamCaptureMode(&restored);
    return rc;
}

/* cuda_load_kernels(driver, ordinal, image: bytes, kernel_set=2) -> capsule. `image` is a
 * cubin (or PTX, NUL-terminated) holding every kernel of LPL_KERNEL_LIST; `kernel_set`
 * picks which launch sequences the capsule's calls run (2: current, 1: the 0.2 kernels). RuntimeError with the
 * driver's reason when the driver cannot load it (e.g. a cubin for another
 * architecture, or built by a toolkit newer than the driver). */
PyObject *lpl_py_cuda_load_kernels(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *drv_obj;
    int ordinal;
    Py_buffer image;
    int kernel_set = LPL_KERNEL_SET_V2;
    if (!PyArg_ParseTuple(args, "Oiy*|i", &drv_obj, &ordinal, &image, &kernel_set)) return NULL;
    PyObject *capsule = NULL;
    lpl_cuda_kernels *k = NULL;
    char err[LPL_ERR_LEN];
    lpl_CUresult rc;
    lpl_CUcontext popped;
    int pushed = 0;
    const lpl_cuda_driver *drv = driver_from(drv_obj);
    if (drv == NULL) goto fail;
    if (kernel_set != LPL_KERNEL_SET_V2 && kernel_set != LPL_KERNEL_SET_V1) {
        PyErr_Format(PyExc_ValueError, "kernel_set: expected 2 (current kernels) or 1 (the 0.2 kernels), got %d",
                     kernel_set);
        goto fail;
    }
    if (image.len < 16) {
        PyErr_SetString(PyExc_ValueError, "image: too short to be a cubin or PTX");
        goto fail;
    }
    k = (lpl_cuda_kernels *)PyMem_Calloc(1, sizeof(*k));
    if (k == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    k->drv = drv;
    k->ordinal = ordinal;
    k->kernel_set = kernel_set;
    if (get_device(drv, ordinal, &k->dev) < 0) goto fail;
    if (drv->cuDeviceGetAttribute(&k->sm_count, ATTR_MULTIPROCESSOR_COUNT, k->dev) != 0) k->sm_count = 0;
    rc = drv->cuDevicePrimaryCtxRetain(&k->ctx, k->dev);
    if (rc != 0) {
        k->ctx = NULL;
        format_error(drv, rc, "cuDevicePrimaryCtxRetain", err);
        PyErr_Format(PyExc_RuntimeError, "CUDA driver: %s", err);
        goto fail;
    }
    rc = drv->cuCtxPushCurrent(k->ctx);
    if (rc != 0) {
        format_error(drv, rc, "cuCtxPushCurrent", err);
        PyErr_Format(PyExc_RuntimeError, "CUDA driver: %s", err);
        goto fail;
    }
    pushed = 1;
    if (drv->cuDeviceGetAttribute(&k->smem_optin_bytes, ATTR_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, k->dev) != 0)
        k->smem_optin_bytes = DEFAULT_SHARED_BYTES;
    /* Everything the calls need is loaded here, never lazily at a launch: the module, every
     * function (under lazy loading cuModuleGetFunction is what loads a kernel) and its
     * shared-memory opt-in. The first call may come inside a torch.cuda.graph capture, where
     * a module load is an unsafe call that fails (drivers before 12.3) or invalidates the
     * capture: this thread switches to relaxed capture mode for the load only. */
    Py_BEGIN_ALLOW_THREADS
    rc = load_module_functions(k, image.buf, err);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_Format(PyExc_RuntimeError, "CUDA driver: %s", err);
        goto fail;
    }
    drv->cuCtxPopCurrent(&popped);
    pushed = 0;
    k->drv_owner = drv_obj;
    Py_INCREF(drv_obj);
    capsule = PyCapsule_New(k, KERNELS_CAPSULE, kernels_capsule_free);
    if (capsule == NULL) goto fail; /* k is freed below, drv_owner released */
    PyBuffer_Release(&image);
    return capsule;
fail:
    if (k != NULL) {
        if (k->module) {
            if (!pushed && drv->cuCtxPushCurrent(k->ctx) == 0) pushed = 1;
            drv->cuModuleUnload(k->module); /* from the context it was loaded into */
        }
        if (pushed) drv->cuCtxPopCurrent(&popped);
        if (k->ctx) drv->cuDevicePrimaryCtxRelease(k->dev);
        Py_XDECREF(k->drv_owner);
        PyMem_Free(k);
    }
    PyBuffer_Release(&image);
    return NULL;
}

/* cuda_kernel_names() -> tuple of the kernel symbols every image must export. */
PyObject *lpl_py_cuda_kernel_names(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    PyObject *names = PyTuple_New(LPL_KERNEL_COUNT);
    if (names == NULL) return NULL;
    for (int i = 0; i < LPL_KERNEL_COUNT; ++i) {
        PyObject *s = PyUnicode_FromString(kernel_names[i]);
        if (s == NULL) {
            Py_DECREF(names);
            return NULL;
        }
        PyTuple_SET_ITEM(names, i, s);
    }
    return names;
}

int lpl_kernels_from_object(PyObject *obj, int ordinal, const lpl_cuda_kernels **out) {
    if (obj == NULL || obj == Py_None) {
        PyErr_SetString(PyExc_TypeError,
                        "kernels: required for CUDA tensors (lpl_ext._cuda.kernels_for(device) loads them)");
        return -1;
    }
    if (!PyCapsule_IsValid(obj, KERNELS_CAPSULE)) {
        PyErr_SetString(PyExc_TypeError, "kernels: expected the capsule of lpl_ext._cuda.kernels_for(device)");
        return -1;
    }
    const lpl_cuda_kernels *k = (const lpl_cuda_kernels *)PyCapsule_GetPointer(obj, KERNELS_CAPSULE);
    if (k->ordinal != ordinal) {
        PyErr_Format(PyExc_ValueError, "kernels: loaded for cuda:%d, but the tensors are on cuda:%d", k->ordinal,
                     ordinal);
        return -1;
    }
    *out = k;
    return 0;
}

int lpl_stream_from_object(PyObject *obj, void **out) {
    if (obj == NULL || obj == Py_None) {
        PyErr_SetString(PyExc_ValueError,
                        "stream: required for CUDA tensors; pass the handle of the stream the tensors "
                        "are used on, e.g. torch.cuda.current_stream(device).cuda_stream");
        return -1;
    }
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "stream: expected an int stream handle, got %s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long handle = PyLong_AsUnsignedLongLong(obj);
    if (handle == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "stream: not a valid stream handle (expected a non-negative 64-bit int)");
        return -1;
    }
    *out = (void *)(uintptr_t)handle;
    return 0;
}

int lpl_cpu_call_args(PyObject *stream_obj, PyObject *kernels_obj) {
    if (stream_obj != NULL && stream_obj != Py_None && !PyLong_Check(stream_obj)) {
        PyErr_Format(PyExc_TypeError, "stream: expected an int stream handle or None, got %s",
                     Py_TYPE(stream_obj)->tp_name);
        return -1;
    }
    if (kernels_obj != NULL && kernels_obj != Py_None && !PyCapsule_IsValid(kernels_obj, KERNELS_CAPSULE)) {
        PyErr_SetString(PyExc_TypeError, "kernels: expected None or the capsule of lpl_ext._cuda.kernels_for(device)");
        return -1;
    }
    return 0;
}

int lpl_cuda_call_args(PyObject *stream_obj, PyObject *kernels_obj, PyObject *ws_obj, const lpl_tensor *ref,
                       const char *refname, lpl_dtype ws_dtype, int64_t ws_len, lpl_cuda_call *out,
                       PyObject **keepalive) {
    lpl_tensor ws;
    if (lpl_stream_from_object(stream_obj, &out->stream) < 0) return -1;
    if (lpl_kernels_from_object(kernels_obj, ref->device_id, &out->kernels) < 0) return -1;
    if (ws_len < 0) {
        PyErr_Format(PyExc_ValueError, "%s: shape too large for the CUDA workspace", refname);
        return -1;
    }
    if (ws_obj == NULL || ws_obj == Py_None) {
        PyErr_SetString(PyExc_ValueError, "workspace: required for CUDA tensors");
        return -1;
    }
    if (lpl_tensor_from_object(ws_obj, "workspace", 1, &ws, keepalive) < 0) return -1;
    if (lpl_check_dtype(&ws, "workspace", ws_dtype) < 0) return -1;
    if (lpl_check_1d(&ws, "workspace", ws_len) < 0) return -1;
    if (lpl_check_same_device(&ws, "workspace", ref, refname) < 0) return -1;
    const lpl_tensor *ws_list[] = {&ws};
    static const char *const ws_names[] = {"workspace"};
    if (lpl_cuda_check_memory(out->kernels, ws_list, ws_names, 1) < 0) return -1;
    out->workspace = ws.data;
    return 0;
}

int lpl_cu_begin(const lpl_cuda_kernels *k, char *err) {
    lpl_CUresult rc = k->drv->cuCtxPushCurrent(k->ctx);
    if (rc != 0) {
        format_error(k->drv, rc, "cuCtxPushCurrent", err);
        return -1;
    }
    return 0;
}

void lpl_cu_end(const lpl_cuda_kernels *k) {
    lpl_CUcontext popped;
    k->drv->cuCtxPopCurrent(&popped);
}

int lpl_cuda_check_memory(const lpl_cuda_kernels *k, const lpl_tensor *const *tensors, const char *const *names,
                          int count) {
    for (int i = 0; i < count; ++i) {
        const lpl_tensor *t = tensors[i];
        if (t == NULL) continue;
        const int64_t numel = lpl_numel(t);
        if (numel <= 0) continue; /* nothing is read or written */
        const unsigned long long ptr = (unsigned long long)(uintptr_t)t->data;
        const unsigned long long extent = (unsigned long long)numel * lpl_dtype_size(t->dtype);
        unsigned int memory_type = 0, is_managed = 0;
        int ordinal = -1;
        unsigned long long range_start = 0;
        size_t range_size = 0;
        int attrs[] = {PTR_ATTR_MEMORY_TYPE, PTR_ATTR_IS_MANAGED, PTR_ATTR_DEVICE_ORDINAL, PTR_ATTR_RANGE_START,
                       PTR_ATTR_RANGE_SIZE};
        void *data[] = {&memory_type, &is_managed, &ordinal, &range_start, &range_size};
        /* not a CUDA pointer: CUDA_SUCCESS with the attributes zeroed (cuPointerGetAttributes) */
        lpl_CUresult rc = k->drv->cuPointerGetAttributes(5, attrs, data, ptr);
        if (rc != 0) {
            char err[LPL_ERR_LEN];
            format_error(k->drv, rc, "cuPointerGetAttributes", err);
            PyErr_Format(PyExc_ValueError, "%s: cannot tell whether its memory is on cuda:%d: %s", names[i], k->ordinal,
                         err);
            return -1;
        }
        if (memory_type != MEMORYTYPE_DEVICE && memory_type != MEMORYTYPE_UNIFIED && !is_managed) {
            PyErr_Format(PyExc_ValueError,
                         "%s: labelled cuda:%d, but its memory at %p is %s; a CUDA tensor (DLPack kDLCUDA) must "
                         "point to device memory",
                         names[i], k->ordinal, t->data, memory_type == MEMORYTYPE_HOST ? "host memory" : "not CUDA memory");
            return -1;
        }
        if (!is_managed && ordinal != k->ordinal) {
            PyErr_Format(PyExc_ValueError, "%s: labelled cuda:%d, but its memory belongs to cuda:%d", names[i],
                         k->ordinal, ordinal);
            return -1;
        }
        if (range_size > 0 && (ptr < range_start || ptr - range_start > range_size ||
                               extent > range_size - (ptr - range_start))) {
            PyErr_Format(PyExc_ValueError,
                         "%s: its %llu bytes at %p run past the end of their CUDA allocation (%zu bytes at %p)",
                         names[i], extent, t->data, range_size, (void *)(uintptr_t)range_start);
            return -1;
        }
    }
    return 0;
}

int lpl_cu_launch(const lpl_cuda_kernels *k, int id, int64_t grid, int block, size_t smem, void *stream, void **args,
                  char *err) {
    if (smem > (size_t)k->max_dynamic_smem[id]) {
        snprintf(err, LPL_ERR_LEN, "%s: %zu bytes of dynamic shared memory, more than the %d this GPU allows",
                 kernel_names[id], smem, k->max_dynamic_smem[id]);
        return -1;
    }
    if (grid < 1 || grid > 2147483647LL) {
        snprintf(err, LPL_ERR_LEN, "%s: grid of %lld blocks is outside [1, 2**31 - 1]; the tensor is too large",
                 kernel_names[id], (long long)grid);
        return -1;
    }
    lpl_CUresult rc = k->drv->cuLaunchKernel(k->fn[id], (unsigned)grid, 1, 1, (unsigned)block, 1, 1, (unsigned)smem,
                                             (lpl_CUstream)stream, args, NULL);
    if (rc != 0) {
        format_error(k->drv, rc, kernel_names[id], err);
        return -1;
    }
    return 0;
}

int lpl_cu_memset0(const lpl_cuda_kernels *k, void *ptr, size_t bytes, void *stream, char *err) {
    if (bytes == 0) return 0;
    lpl_CUresult rc = k->drv->cuMemsetD8Async((unsigned long long)(uintptr_t)ptr, 0, bytes, (lpl_CUstream)stream);
    if (rc != 0) {
        format_error(k->drv, rc, "cuMemsetD8Async", err);
        return -1;
    }
    return 0;
}
