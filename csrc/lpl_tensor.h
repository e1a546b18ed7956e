/* One view of a tensor that the kernels read or write, whichever front door it came
 * through (a numpy array through the NumPy C API, or a DLPack capsule from torch).
 * The view borrows memory: whoever made it keeps the owner alive for the call. */
#ifndef LPL_TENSOR_H
#define LPL_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#include "lpl_kernel_abi.h" /* lpl_dtype */

#ifdef __cplusplus
extern "C" {
#endif

#define LPL_MAX_NDIM 8


typedef enum { LPL_CPU = 0, LPL_CUDA = 1 } lpl_device_type;

typedef struct {
    void *data;                       /* first element (byte offset already applied) */
    lpl_dtype dtype;
    int ndim;
    int64_t shape[LPL_MAX_NDIM];
    int64_t strides[LPL_MAX_NDIM];    /* in elements */
    lpl_device_type device_type;
    int device_id;
    int readonly;
} lpl_tensor;

/* Bytes of one element of dtype (0 for LPL_DTYPE_OTHER). */
size_t lpl_dtype_size(lpl_dtype dtype);
const char *lpl_dtype_name(lpl_dtype dtype);

/* Number of elements; -1 when the product overflows int64. */
int64_t lpl_numel(const lpl_tensor *t);

/* 1 when the strides are those of a C-contiguous tensor of this shape. */
int lpl_is_contiguous(const lpl_tensor *t);

#ifdef __cplusplus
}
#endif

#endif /* LPL_TENSOR_H */
