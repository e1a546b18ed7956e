#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define NO_IMPORT_ARRAY
#define PY_ARRAY_UNIQUE_SYMBOL lpl_ext_ARRAY_API
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <string.h>

#include "lpl_dlpack.h"
#include "lpl_interop.h"

size_t lpl_dtype_size(lpl_dtype dtype) {
    switch (dtype) {
    case LPL_FLOAT32: return 4;
    case LPL_FLOAT64: return 8;
    case LPL_FLOAT16: return 2;
    case LPL_BFLOAT16: return 2;
    case LPL_BOOL: return 1;
    case LPL_UINT8: return 1;
    default: return 0;
    }
}

const char *lpl_dtype_name(lpl_dtype dtype) {
    switch (dtype) {
    case LPL_FLOAT32: return "float32";
    case LPL_FLOAT64: return "float64";
    case LPL_FLOAT16: return "float16";
    case LPL_BFLOAT16: return "bfloat16";
    case LPL_BOOL: return "bool";
    case LPL_UINT8: return "uint8";
    default: return "unsupported";
    }
}

int64_t lpl_numel(const lpl_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; ++i) {
        if (t->shape[i] == 0) return 0;
    }
    for (int i = 0; i < t->ndim; ++i) {
        if (t->shape[i] < 0 || (t->shape[i] > 0 && n > INT64_MAX / t->shape[i])) return -1;
        n *= t->shape[i];
    }
    return n;
}

int lpl_is_contiguous(const lpl_tensor *t) {
    const int64_t numel = lpl_numel(t);
    /* A tensor with no elements may carry any strides; one whose size overflows int64
     * (or has a negative dimension) describes no memory at all. */
    if (numel == 0) return 1;
    if (numel < 0) return 0;
    int64_t expected = 1; /* product of trailing dimensions: <= numel, never overflows */
    for (int i = t->ndim - 1; i >= 0; --i) {
        /* A dimension of size 1 may carry any stride. */
        if (t->shape[i] != 1 && t->strides[i] != expected) return 0;
        expected *= t->shape[i];
    }
    return 1;
}

static lpl_dtype dtype_from_numpy(PyArrayObject *arr) {
    switch (PyArray_TYPE(arr)) {
    case NPY_FLOAT: return LPL_FLOAT32;
    case NPY_DOUBLE: return LPL_FLOAT64;
    case NPY_HALF: return LPL_FLOAT16;
    case NPY_BOOL: return LPL_BOOL;
    case NPY_UBYTE: return LPL_UINT8;
    default: return LPL_DTYPE_OTHER;
    }
}

static int from_numpy(PyArrayObject *arr, const char *argname, int writable, lpl_tensor *out) {
    int ndim = PyArray_NDIM(arr);
    if (ndim > LPL_MAX_NDIM) {
        PyErr_Format(PyExc_ValueError, "%s: at most %d dimensions are supported, got %d",
                     argname, LPL_MAX_NDIM, ndim);
        return -1;
    }
    if (!PyArray_ISNOTSWAPPED(arr)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: array is not in native byte order; convert it with "
                     "arr.astype(arr.dtype.newbyteorder('='))",
                     argname);
        return -1;
    }
    if (!PyArray_ISALIGNED(arr)) {
        PyErr_Format(PyExc_ValueError, "%s: array data is not aligned for its dtype", argname);
        return -1;
    }
    if (writable && !PyArray_ISWRITEABLE(arr)) {
        PyErr_Format(PyExc_ValueError, "%s: output array is read-only", argname);
        return -1;
    }
    out->dtype = dtype_from_numpy(arr);
    out->ndim = ndim;
    out->data = PyArray_DATA(arr);
    out->device_type = LPL_CPU;
    out->device_id = 0;
    out->readonly = !PyArray_ISWRITEABLE(arr);
    npy_intp itemsize = PyArray_ITEMSIZE(arr);
    for (int i = 0; i < ndim; ++i) {
        npy_intp stride = PyArray_STRIDE(arr, i);
        out->shape[i] = (int64_t)PyArray_DIM(arr, i);
        if (stride % itemsize != 0) {
            PyErr_Format(PyExc_ValueError, "%s: stride %zd of dimension %d is not a multiple "
                         "of the item size %zd", argname, (Py_ssize_t)stride, i,
                         (Py_ssize_t)itemsize);
            return -1;
        }
        out->strides[i] = (int64_t)(stride / itemsize);
    }
    return 0;
}

static lpl_dtype dtype_from_dlpack(DLDataType t) {
    if (t.lanes != 1) return LPL_DTYPE_OTHER;
    if (t.code == kDLFloat && t.bits == 32) return LPL_FLOAT32;
    if (t.code == kDLFloat && t.bits == 64) return LPL_FLOAT64;
    if (t.code == kDLFloat && t.bits == 16) return LPL_FLOAT16;
    if (t.code == kDLBfloat && t.bits == 16) return LPL_BFLOAT16;
    if (t.code == kDLBool && t.bits == 8) return LPL_BOOL;
    if (t.code == kDLUInt && t.bits == 8) return LPL_UINT8;
    return LPL_DTYPE_OTHER;
}

static int from_dltensor(const DLTensor *dl, int readonly, const char *argname, int writable,
                         lpl_tensor *out) {
    if (dl->ndim < 0 || dl->ndim > LPL_MAX_NDIM) {
        PyErr_Format(PyExc_ValueError, "%s: at most %d dimensions are supported, got %d",
                     argname, LPL_MAX_NDIM, (int)dl->ndim);
        return -1;
    }
    if (dl->device.device_type == kDLCPU) {
        out->device_type = LPL_CPU;
    } else if (dl->device.device_type == kDLCUDA) {
        out->device_type = LPL_CUDA;
    } else {
        PyErr_Format(PyExc_ValueError,
                     "%s: unsupported device type %d (only CPU and CUDA tensors are supported)",
                     argname, (int)dl->device.device_type);
        return -1;
    }
    if (writable && readonly) {
        PyErr_Format(PyExc_ValueError, "%s: output tensor is read-only", argname);
        return -1;
    }
    if (dl->ndim > 0 && dl->shape == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: DLPack tensor has no shape array", argname);
        return -1;
    }
    out->device_id = dl->device.device_id;
    out->dtype = dtype_from_dlpack(dl->dtype);
    out->ndim = dl->ndim;
    out->readonly = readonly;
    for (int i = 0; i < dl->ndim; ++i) {
        if (dl->shape[i] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: dimension %d has negative size %lld", argname,
                         i, (long long)dl->shape[i]);
            return -1;
        }
        out->shape[i] = dl->shape[i];
    }
    const int64_t numel = lpl_numel(out);
    if (numel < 0) {
        PyErr_Format(PyExc_ValueError, "%s: number of elements overflows int64", argname);
        return -1;
    }
    /* Compact strides when the producer gives none: every partial product is <= numel
     * (or the tensor is empty and the strides never address memory), so no overflow. */
    int64_t expected = 1;
    for (int i = dl->ndim - 1; i >= 0; --i) {
        out->strides[i] = dl->strides ? dl->strides[i] : expected;
        if (numel != 0) expected *= dl->shape[i];
    }
    if (dl->data == NULL && numel != 0) {
        PyErr_Format(PyExc_ValueError, "%s: DLPack tensor has a NULL data pointer", argname);
        return -1;
    }
    /* uintptr_t arithmetic: a pointer offset past the allocation would be undefined. */
    out->data = (void *)((uintptr_t)dl->data + (uintptr_t)dl->byte_offset);
    size_t esize = lpl_dtype_size(out->dtype);
    if (esize > 1 && ((uintptr_t)out->data % esize) != 0 && numel != 0) {
        PyErr_Format(PyExc_ValueError, "%s: tensor data is not aligned for its dtype", argname);
        return -1;
    }
    return 0;
}

static int from_capsule(PyObject *capsule, const char *argname, int writable, lpl_tensor *out) {
    if (PyCapsule_IsValid(capsule, "dltensor")) {
        DLManagedTensor *m = (DLManagedTensor *)PyCapsule_GetPointer(capsule, "dltensor");
        if (m == NULL) return -1;
        return from_dltensor(&m->dl_tensor, 0, argname, writable, out);
    }
    if (PyCapsule_IsValid(capsule, "dltensor_versioned")) {
        DLManagedTensorVersioned *m =
            (DLManagedTensorVersioned *)PyCapsule_GetPointer(capsule, "dltensor_versioned");
        if (m == NULL) return -1;
        if (m->version.major != 1) {
            PyErr_Format(PyExc_ValueError, "%s: unsupported DLPack major version %u", argname,
                         (unsigned)m->version.major);
            return -1;
        }
        int readonly = (m->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
        return from_dltensor(&m->dl_tensor, readonly, argname, writable, out);
    }
    PyErr_Format(PyExc_TypeError, "%s: capsule is not an unconsumed DLPack tensor", argname);
    return -1;
}

int lpl_tensor_from_object(PyObject *obj, const char *argname, int writable, lpl_tensor *out,
                           PyObject **keepalive) {
    memset(out, 0, sizeof(*out));
    *keepalive = NULL;
    if (PyArray_Check(obj)) {
        return from_numpy((PyArrayObject *)obj, argname, writable, out);
    }
    if (PyCapsule_CheckExact(obj)) {
        return from_capsule(obj, argname, writable, out);
    }
    if (PyObject_HasAttrString(obj, "__dlpack__")) {
        PyObject *capsule = PyObject_CallMethod(obj, "__dlpack__", NULL);
        if (capsule == NULL) return -1;
        if (!PyCapsule_CheckExact(capsule)) {
            Py_DECREF(capsule);
            PyErr_Format(PyExc_TypeError, "%s: __dlpack__() did not return a capsule", argname);
            return -1;
        }
        if (from_capsule(capsule, argname, writable, out) < 0) {
            Py_DECREF(capsule);
            return -1;
        }
        *keepalive = capsule;
        return 0;
    }
    PyErr_Format(PyExc_TypeError,
                 "%s: expected a numpy.ndarray, a DLPack capsule or an object with __dlpack__, "
                 "got %s",
                 argname, Py_TYPE(obj)->tp_name);
    return -1;
}

int lpl_check_nchw(const lpl_tensor *t, const char *argname, int require_float) {
    if (t->ndim != 4) {
        PyErr_Format(PyExc_ValueError, "%s: expected a 4-D (N, C, H, W) tensor, got %d-D",
                     argname, t->ndim);
        return -1;
    }
    if (require_float && t->dtype != LPL_FLOAT32 && t->dtype != LPL_FLOAT64 &&
        t->dtype != LPL_FLOAT16 && t->dtype != LPL_BFLOAT16) {
        PyErr_Format(PyExc_TypeError,
                     "%s: expected float32, float64, float16 or bfloat16, got %s", argname,
                     lpl_dtype_name(t->dtype));
        return -1;
    }
    if (lpl_numel(t) < 0) {
        PyErr_Format(PyExc_ValueError, "%s: number of elements overflows int64", argname);
        return -1;
    }
    if (!lpl_is_contiguous(t)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous tensor", argname);
        return -1;
    }
    return 0;
}

int lpl_check_same_shape(const lpl_tensor *t, const char *argname, const lpl_tensor *ref,
                         const char *refname) {
    int same = t->ndim == ref->ndim;
    for (int i = 0; same && i < t->ndim; ++i) same = t->shape[i] == ref->shape[i];
    if (!same) {
        char a[160], b[160];
        size_t pa = 0, pb = 0;
        a[0] = b[0] = '\0';
        for (int i = 0; i < t->ndim && pa < sizeof(a) - 24; ++i)
            pa += (size_t)snprintf(a + pa, sizeof(a) - pa, i ? ", %lld" : "%lld",
                                   (long long)t->shape[i]);
        for (int i = 0; i < ref->ndim && pb < sizeof(b) - 24; ++i)
            pb += (size_t)snprintf(b + pb, sizeof(b) - pb, i ? ", %lld" : "%lld",
                                   (long long)ref->shape[i]);
        PyErr_Format(PyExc_ValueError, "%s: shape (%s) does not match %s shape (%s)", argname, a,
                     refname, b);
        return -1;
    }
    return 0;
}

int lpl_check_same_device(const lpl_tensor *t, const char *argname, const lpl_tensor *ref,
                          const char *refname) {
    if (t->device_type != ref->device_type || t->device_id != ref->device_id) {
        PyErr_Format(PyExc_ValueError, "%s: on %s:%d but %s is on %s:%d", argname,
                     t->device_type == LPL_CUDA ? "cuda" : "cpu", t->device_id, refname,
                     ref->device_type == LPL_CUDA ? "cuda" : "cpu", ref->device_id);
        return -1;
    }
    return 0;
}

int lpl_check_dtype(const lpl_tensor *t, const char *argname, lpl_dtype want) {
    if (t->dtype != want) {
        PyErr_Format(PyExc_TypeError, "%s: expected dtype %s, got %s", argname,
                     lpl_dtype_name(want), lpl_dtype_name(t->dtype));
        return -1;
    }
    return 0;
}

int lpl_check_mask_dtype(const lpl_tensor *t, const char *argname) {
    if (t->dtype != LPL_BOOL && t->dtype != LPL_UINT8) {
        PyErr_Format(PyExc_TypeError, "%s: expected a bool or uint8 mask, got %s", argname,
                     lpl_dtype_name(t->dtype));
        return -1;
    }
    return 0;
}

int lpl_check_1d(const lpl_tensor *t, const char *argname, int64_t len) {
    if (t->ndim != 1 || t->shape[0] != len) {
        PyErr_Format(PyExc_ValueError, "%s: expected a 1-D tensor of length %lld", argname,
                     (long long)len);
        return -1;
    }
    if (!lpl_is_contiguous(t)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a contiguous tensor", argname);
        return -1;
    }
    return 0;
}

int lpl_check_plane_moments(const lpl_tensor *t, const char *argname, int64_t planes) {
    if (lpl_check_dtype(t, argname, LPL_FLOAT64) < 0) return -1;
    if (t->ndim != 2 || t->shape[0] != planes || t->shape[1] != LPL_PM_COMPONENTS) {
        PyErr_Format(PyExc_ValueError, "%s: expected shape (%lld, %d) (N*C planes of mean, M2, kept)", argname,
                     (long long)planes, (int)LPL_PM_COMPONENTS);
        return -1;
    }
    if (!lpl_is_contiguous(t)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a contiguous tensor", argname);
        return -1;
    }
    return 0;
}

int lpl_parse_choice(PyObject *obj, const char *argname, const char *const *choices) {
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a string, got %s", argname,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    Py_ssize_t len = 0;
    const char *s = PyUnicode_AsUTF8AndSize(obj, &len);
    if (s == NULL) return -1;
    /* Compare lengths too: "mse\0junk" must not match "mse". */
    for (int i = 0; choices[i] != NULL; ++i) {
        if ((size_t)len == strlen(choices[i]) && memcmp(s, choices[i], (size_t)len) == 0) return i;
    }
    PyObject *joined = PyUnicode_FromString("");
    for (int i = 0; joined && choices[i] != NULL; ++i) {
        PyObject *next = PyUnicode_FromFormat("%U%s'%s'", joined, i ? ", " : "", choices[i]);
        Py_DECREF(joined);
        joined = next;
    }
    if (joined) {
        PyErr_Format(PyExc_ValueError, "%s: unknown option '%s'; expected one of %U", argname, s,
                     joined);
        Py_DECREF(joined);
    }
    return -1;
}
