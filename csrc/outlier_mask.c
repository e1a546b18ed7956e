/* Python entry point of the outlier keep-mask (docs/spec.md, "Outlier mask"): argument checks,
 * then the CPU or CUDA implementation with the GIL released. Also the CUDA workspace
 * size query, compiled in every build. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>


#include "lpl_cuda_driver.h"
#include "lpl_interop.h"
#include "lpl_math.h"
#include "lpl_ops.h"

int64_t lpl_outlier_mask_workspace_bytes(int64_t n, int64_t c, int64_t h, int64_t w) {
    /* the larger of the two kernel sets' layouts (LPL_EXT_KERNEL_SET picks one per module) */
    const int64_t v2 = lpl_om_workspace_layout(n, c, h, w).total, v1 = lpl_om_v1_workspace_layout(n, c, h, w).total;
    return v1 < 0 || v2 < 0 ? -1 : (v1 > v2 ? v1 : v2);
}

/* ValueError "<message>, got <repr(value)>" (as Python formats the float); returns -1. */
static int bad_double(const char *message, double value) {
    PyObject *v = PyFloat_FromDouble(value); /* NULL: MemoryError set */
    if (v != NULL) {
        PyErr_Format(PyExc_ValueError, "%s, got %R", message, v);
        Py_DECREF(v);
    }
    return -1;
}

/* Option checks with the messages of the Python side (lpl_ext/_options.py): ValueError
 * naming the argument. Returns 0 or -1 with the exception set. */
static int check_options(double quantile, double margin_std, int closing, int opening) {
    if (!(quantile > 0.0 && quantile < 0.5))
        return bad_double("quantile: must be in the open interval (0, 0.5)", quantile);
    if (!(isfinite(margin_std) && margin_std >= 0.0))
        return bad_double("margin_std: must be a finite number >= 0", margin_std);
    if (closing < 1 || closing % 2 == 0) {
        PyErr_Format(PyExc_ValueError, "closing: window size must be odd and positive, got %d",
                     closing);
        return -1;
    }
    if (opening < 1 || opening % 2 == 0) {
        PyErr_Format(PyExc_ValueError, "opening: window size must be odd and positive, got %d",
                     opening);
        return -1;
    }
    return 0;
}

PyObject *lpl_py_outlier_mask(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"y",       "keep",    "stats",  "quantile",  "margin_std",
                             "closing", "opening", "stream", "workspace", "kernels", "plane_moments", NULL};
    PyObject *y_obj, *keep_obj, *stats_obj;
    PyObject *ws_obj = Py_None, *stream_obj = Py_None, *kernels_obj = Py_None, *moments_obj = Py_None;
    double quantile, margin_std;
    int closing, opening;
    PyObject *hold[5] = {NULL, NULL, NULL, NULL, NULL};
    PyObject *result = NULL;
    lpl_tensor y, keep, stats, moments;
    lpl_om_params p;
    char err[LPL_ERR_LEN] = {0};
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOddii|OOOO", kwlist, &y_obj, &keep_obj,
                                     &stats_obj, &quantile, &margin_std, &closing, &opening,
                                     &stream_obj, &ws_obj, &kernels_obj, &moments_obj))
        return NULL;
    if (check_options(quantile, margin_std, closing, opening) < 0) goto fail;

    if (lpl_tensor_from_object(y_obj, "y", 0, &y, &hold[0]) < 0) goto fail;
    if (lpl_check_nchw(&y, "y", 1) < 0) goto fail;
    if (y.shape[2] * y.shape[3] > (int64_t)UINT32_MAX) {
        /* the selection histograms count in 32 bits per plane */
        PyErr_Format(PyExc_ValueError, "y: a plane of %lld x %lld values is larger than the "
                     "2**32 - 1 supported per (sample, channel)", (long long)y.shape[2],
                     (long long)y.shape[3]);
        goto fail;
    }
    if (lpl_tensor_from_object(keep_obj, "keep", 1, &keep, &hold[1]) < 0) goto fail;
    if (lpl_check_mask_dtype(&keep, "keep") < 0) goto fail;
    if (lpl_check_nchw(&keep, "keep", 0) < 0) goto fail;
    if (lpl_check_same_shape(&keep, "keep", &y, "y") < 0) goto fail;
    if (lpl_check_same_device(&keep, "keep", &y, "y") < 0) goto fail;

    memset(&p, 0, sizeof(p));
    if (stats_obj != Py_None) {
        if (lpl_tensor_from_object(stats_obj, "stats", 1, &stats, &hold[2]) < 0) goto fail;
        if (lpl_check_dtype(&stats, "stats", LPL_FLOAT64) < 0) goto fail;
        if (lpl_check_1d(&stats, "stats", 3) < 0) goto fail;
        if (lpl_check_same_device(&stats, "stats", &y, "y") < 0) goto fail;
        p.stats = (double *)stats.data;
    }
    if (moments_obj != Py_None) {
        if (lpl_tensor_from_object(moments_obj, "plane_moments", 1, &moments, &hold[4]) < 0) goto fail;
        if (lpl_check_plane_moments(&moments, "plane_moments", y.shape[0] * y.shape[1]) < 0) goto fail;
        if (lpl_check_same_device(&moments, "plane_moments", &y, "y") < 0) goto fail;
        p.plane_moments = (double *)moments.data;
    }

    p.y = y.data;
    p.keep = (uint8_t *)keep.data;
    p.dtype = (int)y.dtype;
    p.n = y.shape[0];
    p.c = y.shape[1];
    p.h = y.shape[2];
    p.w = y.shape[3];
    p.quantile = quantile;
    p.margin_std = margin_std;
    p.closing = closing;
    p.opening = opening;

    if (y.device_type == LPL_CUDA) {
        lpl_cuda_call call;
        if (lpl_cuda_call_args(stream_obj, kernels_obj, ws_obj, &y, "y", LPL_UINT8,
                               lpl_outlier_mask_workspace_bytes(p.n, p.c, p.h, p.w), &call, &hold[3]) < 0)
            goto fail;
        {
            const lpl_tensor *tensors[] = {&y, &keep, p.stats ? &stats : NULL, p.plane_moments ? &moments : NULL};
            static const char *const names[] = {"y", "keep", "stats", "plane_moments"};
            if (lpl_cuda_check_memory(call.kernels, tensors, names, 4) < 0) goto fail;
        }
        p.workspace = call.workspace;
        Py_BEGIN_ALLOW_THREADS
        rc = lpl_cuda_outlier_mask(call.kernels, &p, call.stream, err);
        Py_END_ALLOW_THREADS
    } else {
        if (lpl_cpu_call_args(stream_obj, kernels_obj) < 0) goto fail;
        Py_BEGIN_ALLOW_THREADS
        rc = lpl_cpu_outlier_mask(&p, err);
        Py_END_ALLOW_THREADS
    }
    if (rc != 0) {
        PyErr_Format(PyExc_RuntimeError, "outlier_mask: %s", err);
        goto fail;
    }
    Py_INCREF(Py_None);
    result = Py_None;
fail:
    for (int i = 0; i < 5; ++i) Py_XDECREF(hold[i]);
    return result;
}

PyObject *lpl_py_outlier_mask_workspace_bytes(PyObject *self, PyObject *args) {
    (void)self;
    long long n, c, h, w;
    if (!PyArg_ParseTuple(args, "LLLL", &n, &c, &h, &w)) return NULL;
    if (n < 0 || c < 0 || h < 0 || w < 0) {
        PyErr_SetString(PyExc_ValueError, "n, c, h and w must be non-negative");
        return NULL;
    }
    const int64_t bytes = lpl_outlier_mask_workspace_bytes(n, c, h, w);
    if (bytes < 0) {
        PyErr_SetString(PyExc_OverflowError, "outlier_mask workspace size overflows int64");
        return NULL;
    }
    return PyLong_FromLongLong((long long)bytes);
}
