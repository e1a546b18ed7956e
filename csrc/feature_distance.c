/* Python entry point of the fused feature-distance op: argument checks, then the CPU or
 * CUDA implementation with the GIL released. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "lpl_cuda_driver.h"
#include "lpl_interop.h"
#include "lpl_math.h"
#include "lpl_ops.h"

#define LPL_OPTION_NAME(unused, id, name) name,
const char *const lpl_norm_names[LPL_NORM_COUNT + 1] = {LPL_NORM_LIST(LPL_OPTION_NAME, 0) NULL};
const char *const lpl_dist_names[LPL_DIST_COUNT + 1] = {LPL_DIST_LIST(LPL_OPTION_NAME, 0) NULL};
#undef LPL_OPTION_NAME

/* -1 with ValueError when the bytes of `out` overlap those of `in` (same device assumed):
 * the kernels write the gradient while they read the inputs, and the CUDA ones park the
 * packed mask in the gradient's buffer before they read x and y. */
static int check_no_overlap(const lpl_tensor *out, const char *outname, const lpl_tensor *in, const char *inname) {
    const int64_t n_out = lpl_numel(out), n_in = lpl_numel(in);
    if (n_out <= 0 || n_in <= 0) return 0;
    const uintptr_t o0 = (uintptr_t)out->data, i0 = (uintptr_t)in->data;
    const uintptr_t o1 = o0 + (uintptr_t)n_out * lpl_dtype_size(out->dtype);
    const uintptr_t i1 = i0 + (uintptr_t)n_in * lpl_dtype_size(in->dtype);
    if (o0 < i1 && i0 < o1) {
        PyErr_Format(PyExc_ValueError, "%s: overlaps %s in memory; pass a separate output buffer", outname, inname);
        return -1;
    }
    return 0;
}

PyObject *lpl_py_feature_distance(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"x", "y", "mask", "loss", "grad", "norm", "distance",
                             "weight", "stream", "workspace", "kernels", "grad_scale", "plane_moments", NULL};
    PyObject *x_obj, *y_obj, *mask_obj, *loss_obj, *grad_obj, *norm_obj, *dist_obj;
    PyObject *ws_obj = Py_None, *stream_obj = Py_None, *kernels_obj = Py_None, *scale_obj = Py_None;
    PyObject *moments_obj = Py_None;
    double weight;
    PyObject *keep[8] = {NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    PyObject *result = NULL;
    lpl_tensor x, y, mask, loss, grad, scale, moments;
    lpl_fd_params p;
    char err[LPL_ERR_LEN] = {0};
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOd|OOOOO", kwlist, &x_obj, &y_obj,
                                     &mask_obj, &loss_obj, &grad_obj, &norm_obj, &dist_obj,
                                     &weight, &stream_obj, &ws_obj, &kernels_obj, &scale_obj, &moments_obj))
        return NULL;

    int norm = lpl_parse_choice(norm_obj, "norm", lpl_norm_names);
    if (norm < 0) goto fail;
    int dist = lpl_parse_choice(dist_obj, "distance", lpl_dist_names);
    if (dist < 0) goto fail;
    if (!isfinite(weight)) {
        PyObject *value = PyFloat_FromDouble(weight); /* NULL: MemoryError set */
        if (value != NULL) {
            PyErr_Format(PyExc_ValueError, "weight: must be finite, got %R", value);
            Py_DECREF(value);
        }
        goto fail;
    }

    if (lpl_tensor_from_object(x_obj, "x", 0, &x, &keep[0]) < 0) goto fail;
    if (lpl_check_nchw(&x, "x", 1) < 0) goto fail;
    if (lpl_tensor_from_object(y_obj, "y", 0, &y, &keep[1]) < 0) goto fail;
    if (lpl_check_nchw(&y, "y", 1) < 0) goto fail;
    if (lpl_check_same_shape(&y, "y", &x, "x") < 0) goto fail;
    if (lpl_check_same_device(&y, "y", &x, "x") < 0) goto fail;
    if (y.dtype != x.dtype) {
        PyErr_Format(PyExc_TypeError, "y: dtype %s does not match x dtype %s",
                     lpl_dtype_name(y.dtype), lpl_dtype_name(x.dtype));
        goto fail;
    }

    const int64_t n = x.shape[0], c = x.shape[1], hw = x.shape[2] * x.shape[3];
    memset(&p, 0, sizeof(p));
    if (mask_obj != Py_None) {
        if (lpl_tensor_from_object(mask_obj, "mask", 0, &mask, &keep[2]) < 0) goto fail;
        if (lpl_check_mask_dtype(&mask, "mask") < 0) goto fail;
        if (lpl_check_nchw(&mask, "mask", 0) < 0) goto fail;
        if (lpl_check_same_shape(&mask, "mask", &x, "x") < 0) goto fail;
        if (lpl_check_same_device(&mask, "mask", &x, "x") < 0) goto fail;
        p.mask = (const uint8_t *)mask.data;
    }
    if (lpl_tensor_from_object(loss_obj, "loss", 1, &loss, &keep[3]) < 0) goto fail;
    if (lpl_check_dtype(&loss, "loss", LPL_FLOAT64) < 0) goto fail;
    if (lpl_check_1d(&loss, "loss", n) < 0) goto fail;
    if (lpl_check_same_device(&loss, "loss", &x, "x") < 0) goto fail;
    if (grad_obj != Py_None) {
        if (lpl_tensor_from_object(grad_obj, "grad", 1, &grad, &keep[4]) < 0) goto fail;
        if (lpl_check_nchw(&grad, "grad", 1) < 0) goto fail;
        if (lpl_check_same_shape(&grad, "grad", &x, "x") < 0) goto fail;
        if (lpl_check_same_device(&grad, "grad", &x, "x") < 0) goto fail;
        if (grad.dtype != x.dtype) {
            PyErr_Format(PyExc_TypeError, "grad: dtype %s does not match x dtype %s",
                         lpl_dtype_name(grad.dtype), lpl_dtype_name(x.dtype));
            goto fail;
        }
        if (check_no_overlap(&grad, "grad", &x, "x") < 0 || check_no_overlap(&grad, "grad", &y, "y") < 0 ||
            (mask_obj != Py_None && check_no_overlap(&grad, "grad", &mask, "mask") < 0))
            goto fail;
        p.grad = grad.data;
    }
    if (scale_obj != Py_None) {
        if (p.grad == NULL) {
            PyErr_SetString(PyExc_ValueError, "grad_scale: scales the gradient, but grad is None");
            goto fail;
        }
        if (lpl_tensor_from_object(scale_obj, "grad_scale", 0, &scale, &keep[6]) < 0) goto fail;
        if (lpl_check_dtype(&scale, "grad_scale", LPL_FLOAT64) < 0) goto fail;
        if (lpl_check_1d(&scale, "grad_scale", n) < 0) goto fail;
        if (lpl_check_same_device(&scale, "grad_scale", &x, "x") < 0) goto fail;
        p.grad_scale = (const double *)scale.data;
    }
    if (moments_obj != Py_None) {
        /* the moments of where(mask, y, 0) (docs/spec.md, "Feature distance"): meaningless
         * without the mask they were computed with */
        if (mask_obj == Py_None) {
            PyErr_SetString(PyExc_ValueError, "plane_moments: given without a mask (they are the moments of "
                                              "where(mask, y, 0) that outlier_mask returns with its mask)");
            goto fail;
        }
        if (lpl_tensor_from_object(moments_obj, "plane_moments", 0, &moments, &keep[7]) < 0) goto fail;
        if (lpl_check_plane_moments(&moments, "plane_moments", n * c) < 0) goto fail;
        if (lpl_check_same_device(&moments, "plane_moments", &x, "x") < 0) goto fail;
        p.plane_moments = (const double *)moments.data;
    }

    p.x = x.data;
    p.y = y.data;
    p.loss = (double *)loss.data;
    p.dtype = (int)x.dtype;
    p.n = n;
    p.c = c;
    p.hw = hw;
    p.norm = norm;
    p.dist = dist;
    p.weight = weight;
    {
        /* read here, with the GIL held: os.environ writes from other threads take it too */
        const char *hugepages = getenv("LPL_EXT_HUGEPAGES");
        p.advise_hugepages = hugepages != NULL && strcmp(hugepages, "1") == 0;
    }

    if (x.device_type == LPL_CUDA) {
        lpl_cuda_call call;
        if (lpl_cuda_call_args(stream_obj, kernels_obj, ws_obj, &x, "x", LPL_FLOAT64,
                               lpl_feature_distance_workspace(n, c), &call, &keep[5]) < 0)
            goto fail;
        {
            const lpl_tensor *tensors[] = {&x, &y, p.mask ? &mask : NULL, &loss, p.grad ? &grad : NULL,
                                           p.grad_scale ? &scale : NULL, p.plane_moments ? &moments : NULL};
            static const char *const names[] = {"x", "y", "mask", "loss", "grad", "grad_scale", "plane_moments"};
            if (lpl_cuda_check_memory(call.kernels, tensors, names, 7) < 0) goto fail;
        }
        p.workspace = (double *)call.workspace;
        Py_BEGIN_ALLOW_THREADS
        rc = lpl_cuda_feature_distance(call.kernels, &p, call.stream, err);
        Py_END_ALLOW_THREADS
    } else {
        if (lpl_cpu_call_args(stream_obj, kernels_obj) < 0) goto fail;
        Py_BEGIN_ALLOW_THREADS
        rc = lpl_cpu_feature_distance(&p, err);
        Py_END_ALLOW_THREADS
    }
    if (rc != 0) {
        PyErr_Format(PyExc_RuntimeError, "feature_distance: %s", err);
        goto fail;
    }
    Py_INCREF(Py_None);
    result = Py_None;
fail:
    for (int i = 0; i < 8; ++i) Py_XDECREF(keep[i]);
    return result;
}
