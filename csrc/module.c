/* lpl_ext._C: flat entry points over the fused LPL kernels. Outputs are allocated by
 * the Python caller and passed down; CUDA work runs on the stream the caller passes,
 * with kernels loaded through the driver API (lpl_cuda_driver.h). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define PY_ARRAY_UNIQUE_SYMBOL lpl_ext_ARRAY_API
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "lpl_cuda_driver.h"
#include "lpl_ops.h"

#ifndef LPL_COMPILER
#define LPL_COMPILER "unknown"
#endif
#ifndef LPL_REVISION
#define LPL_REVISION "unknown"
#endif

PyObject *lpl_py_feature_distance(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *lpl_py_scale_gradient(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *lpl_py_outlier_mask(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *lpl_py_outlier_mask_workspace_bytes(PyObject *self, PyObject *args);

static PyObject *py_build_info(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    int openmp = 0, max_threads = 1;
#ifdef _OPENMP
    openmp = _OPENMP;
    max_threads = omp_get_max_threads();
#endif
    int sanitize = 0;
#ifdef LPL_SANITIZE
    sanitize = 1;
#endif
    return Py_BuildValue("{s:s,s:s,s:i,s:i,s:O,s:s,s:i,s:i}", "revision", LPL_REVISION,
                         "cuda_launcher", "driver-api",
                         "openmp", openmp, "omp_max_threads", max_threads, "sanitize",
                         sanitize ? Py_True : Py_False, "compiler", LPL_COMPILER,
                         "numpy_abi_version", (int)NPY_ABI_VERSION, "cuda_kernel_count",
                         LPL_KERNEL_COUNT);
}

static PyObject *py_fd_workspace(PyObject *self, PyObject *args) {
    (void)self;
    long long n, c;
    if (!PyArg_ParseTuple(args, "LL", &n, &c)) return NULL;
    if (n < 0 || c < 0) {
        PyErr_SetString(PyExc_ValueError, "n and c must be non-negative");
        return NULL;
    }
    /* 4 * n * c + 2 * c must fit in int64 */
    if ((c > 0 && n > (INT64_MAX / 8) / c) || c > INT64_MAX / 8) {
        PyErr_SetString(PyExc_OverflowError, "feature_distance_workspace: n * c is too large");
        return NULL;
    }
    return PyLong_FromLongLong((long long)lpl_feature_distance_workspace(n, c));
}

static PyMethodDef lpl_methods[] = {
    {"build_info", py_build_info, METH_NOARGS,
     "build_info() -> dict: how this module was compiled (CUDA, OpenMP, sanitizers)."},
    {"feature_distance", (PyCFunction)(void (*)(void))lpl_py_feature_distance,
     METH_VARARGS | METH_KEYWORDS,
     "feature_distance(x, y, mask, loss, grad, norm, distance, weight, stream=None, "
     "workspace=None, kernels=None, grad_scale=None, plane_moments=None)\n\nPer-sample LPL layer loss into "
     "loss (N,) float64 and, when grad is not None, d(sum_n s[n] loss[n])/dx into grad (x's shape and dtype); "
     "s = grad_scale, (N,) float64, or 1. plane_moments: (N*C, 3) float64, the outlier mask's moments of "
     "where(mask, y, 0) for this mask (kept counts and batch statistics taken from them)."},
    {"scale_gradient", (PyCFunction)(void (*)(void))lpl_py_scale_gradient, METH_VARARGS | METH_KEYWORDS,
     "scale_gradient(grad, factor, stream=None, kernels=None)\n\ngrad *= factor[0] in place (factor (1,) "
     "float64 on grad's device), unless factor[0] == 1: then grad is not touched."},
    {"feature_distance_workspace", py_fd_workspace, METH_VARARGS,
     "feature_distance_workspace(n, c) -> number of float64 scratch values the CUDA "
     "kernels need."},
    {"outlier_mask", (PyCFunction)(void (*)(void))lpl_py_outlier_mask,
     METH_VARARGS | METH_KEYWORDS,
     "outlier_mask(y, keep, stats, quantile, margin_std, closing, opening, stream=None, "
     "workspace=None, kernels=None, plane_moments=None)\n\nKeep-mask of the target features y into keep "
     "(bool/uint8, y's shape); stats (3,) float64 receives mean, std and outlier ratio; plane_moments (N*C, 3) "
     "float64 the mean, M2 and kept count of where(keep, y, 0) per plane."},
    {"cuda_driver_open", lpl_py_cuda_driver_open, METH_VARARGS,
     "cuda_driver_open(path) -> capsule: dlopen the CUDA driver library (libcuda.so.1) and "
     "cuInit it."},
    {"cuda_device_attributes", lpl_py_cuda_device_attributes, METH_VARARGS,
     "cuda_device_attributes(driver, ordinal) -> dict(driver_version, major, minor, sm_count)."},
    {"cuda_load_kernels", lpl_py_cuda_load_kernels, METH_VARARGS,
     "cuda_load_kernels(driver, ordinal, image) -> capsule: load a cubin / PTX image holding "
     "every kernel into the device's primary context."},
    {"cuda_kernel_names", lpl_py_cuda_kernel_names, METH_NOARGS,
     "cuda_kernel_names() -> tuple of the kernel symbols a kernel image must export."},
    {"outlier_mask_workspace_bytes", lpl_py_outlier_mask_workspace_bytes, METH_VARARGS,
     "outlier_mask_workspace_bytes(n, c, h, w) -> bytes of CUDA scratch outlier_mask needs."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef lpl_module = {PyModuleDef_HEAD_INIT, "_C",
                                        "Fused Latent Perceptual Loss kernels (C / CUDA).", -1,
                                        lpl_methods, NULL, NULL, NULL, NULL};

/* names (NULL-terminated) as the tuple of str `attr` of the module. */
static int add_option_names(PyObject *module, const char *attr, const char *const *names) {
    Py_ssize_t count = 0;
    while (names[count] != NULL) ++count;
    PyObject *tuple = PyTuple_New(count);
    if (tuple == NULL) goto fail;
    for (Py_ssize_t i = 0; i < count; ++i) {
        PyObject *name = PyUnicode_FromString(names[i]);
        if (name == NULL) goto fail;
        PyTuple_SET_ITEM(tuple, i, name); /* steals the reference */
    }
    if (PyModule_AddObject(module, attr, tuple) < 0) goto fail; /* steals it on success only */
    return 0;
fail:
    Py_XDECREF(tuple); /* a partly filled tuple releases the items it holds */
    return -1;
}

PyMODINIT_FUNC PyInit__C(void) {
    import_array();
    PyObject *module = PyModule_Create(&lpl_module);
    if (module == NULL) goto fail;
    /* The option lists of lpl_math.h, in enum order: the Python side's only source of
     * them (lpl_ext/_options.py). */
    if (add_option_names(module, "NORMS", lpl_norm_names) < 0) goto fail;
    if (add_option_names(module, "DISTANCES", lpl_dist_names) < 0) goto fail;
    return module;
fail:
    Py_XDECREF(module);
    return NULL;
}
