/* scale_gradient(grad, factor, stream=None, kernels=None): grad *= factor[0] in place,
 * unless factor[0] == 1, where grad is left untouched (no pass over it). The backward of
 * lpl_ext.weighted_feature_distance, whose forward already folded the per-sample factors
 * into grad: only the scalar upstream gradient remains. On CUDA the test of the factor is
 * made on the device (csrc/cuda/scale_kernels.cuh), so the host never waits for it. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdio.h>

#include "lpl_cuda_driver.h"
#include "lpl_interop.h"
#include "lpl_math.h"
#include "lpl_ops.h"

#define SCALE_PARALLEL_MIN (1 << 16)

/* The CPU twin of scale_unless_one: the product in the accumulation type (float for 32-
 * and 16-bit storage, double for float64), rounded back to the storage dtype. */
static void scale_cpu(void *grad, int dtype, int64_t numel, double factor) {
    const int parallel = numel >= SCALE_PARALLEL_MIN;
    (void)parallel;
    switch (dtype) {
    case LPL_FLOAT32: {
        float *g = (float *)grad;
        const float f = (float)factor;
#pragma omp parallel for simd schedule(static) if (parallel)
        for (int64_t i = 0; i < numel; ++i) g[i] = g[i] * f;
        break;
    }
    case LPL_FLOAT64: {
        double *g = (double *)grad;
#pragma omp parallel for simd schedule(static) if (parallel)
        for (int64_t i = 0; i < numel; ++i) g[i] = g[i] * factor;
        break;
    }
    case LPL_FLOAT16: {
        uint16_t *g = (uint16_t *)grad;
        const float f = (float)factor;
#pragma omp parallel for schedule(static) if (parallel)
        for (int64_t i = 0; i < numel; ++i) g[i] = lpl_float_to_half(lpl_half_to_float(g[i]) * f);
        break;
    }
    default: { /* LPL_BFLOAT16 (validated by the entry point) */
        uint16_t *g = (uint16_t *)grad;
        const float f = (float)factor;
#pragma omp parallel for schedule(static) if (parallel)
        for (int64_t i = 0; i < numel; ++i) g[i] = lpl_float_to_bf16(lpl_bf16_to_float(g[i]) * f);
        break;
    }
    }
}

int lpl_cuda_scale_gradient(const struct lpl_cuda_kernels *k, void *grad, int dtype, int64_t numel,
                            const double *factor, void *stream, char *err) {
    if (numel <= 0) return 0;
    /* enough blocks to stream the tensor when it is scaled; each reads 8 bytes when not */
    int64_t blocks = (numel + LPL_SCALE_THREADS - 1) / LPL_SCALE_THREADS;
    const int64_t cap = 8 * (int64_t)(k->sm_count > 0 ? k->sm_count : 1);
    if (blocks > cap) blocks = cap;
    lpl_scale_args a = {grad, factor, numel};
    void *args[] = {&a};
    if (lpl_cu_begin(k, err) < 0) return -1;
    const int rc = lpl_cu_launch(k, LPL_K_scale_grad_f32 + dtype, blocks, LPL_SCALE_THREADS, 0, stream, args, err);
    lpl_cu_end(k);
    return rc;
}

PyObject *lpl_py_scale_gradient(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"grad", "factor", "stream", "kernels", NULL};
    PyObject *grad_obj, *factor_obj, *stream_obj = Py_None, *kernels_obj = Py_None;
    PyObject *hold[2] = {NULL, NULL};
    PyObject *result = NULL;
    lpl_tensor grad, factor;
    char err[LPL_ERR_LEN] = {0};
    int rc = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|OO", kwlist, &grad_obj, &factor_obj, &stream_obj,
                                     &kernels_obj))
        return NULL;
    if (lpl_tensor_from_object(grad_obj, "grad", 1, &grad, &hold[0]) < 0) goto fail;
    if (lpl_check_nchw(&grad, "grad", 1) < 0) goto fail;
    if (lpl_tensor_from_object(factor_obj, "factor", 0, &factor, &hold[1]) < 0) goto fail;
    if (lpl_check_dtype(&factor, "factor", LPL_FLOAT64) < 0) goto fail;
    if (lpl_check_1d(&factor, "factor", 1) < 0) goto fail;
    if (lpl_check_same_device(&factor, "factor", &grad, "grad") < 0) goto fail;
    const int64_t numel = lpl_numel(&grad);

    if (grad.device_type == LPL_CUDA) {
        void *stream;
        const lpl_cuda_kernels *kernels;
        if (lpl_stream_from_object(stream_obj, &stream) < 0) goto fail;
        if (lpl_kernels_from_object(kernels_obj, grad.device_id, &kernels) < 0) goto fail;
        const lpl_tensor *tensors[] = {&grad, &factor};
        static const char *const names[] = {"grad", "factor"};
        if (lpl_cuda_check_memory(kernels, tensors, names, 2) < 0) goto fail;
        Py_BEGIN_ALLOW_THREADS
        rc = lpl_cuda_scale_gradient(kernels, grad.data, (int)grad.dtype, numel, (const double *)factor.data, stream,
                                     err);
        Py_END_ALLOW_THREADS
    } else {
        if (lpl_cpu_call_args(stream_obj, kernels_obj) < 0) goto fail;
        const double f = *(const double *)factor.data;
        if (f != 1.0) {
            Py_BEGIN_ALLOW_THREADS
            scale_cpu(grad.data, (int)grad.dtype, numel, f);
            Py_END_ALLOW_THREADS
        }
    }
    if (rc != 0) {
        PyErr_Format(PyExc_RuntimeError, "scale_gradient: %s", err);
        goto fail;
    }
    Py_INCREF(Py_None);
    result = Py_None;
fail:
    Py_XDECREF(hold[0]);
    Py_XDECREF(hold[1]);
    return result;
}
