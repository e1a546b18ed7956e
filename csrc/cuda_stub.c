/* Stand-ins for the CUDA implementations, compiled only when lpl_ext is built without
 * CUDA. The entry points check lpl_cuda_compiled() first and raise a clear error, so
 * these are never reached with real work; they still fail loudly if they are. */
#ifndef LPL_WITH_CUDA
#include <stdio.h>

#include "lpl_ops.h"

int lpl_cuda_compiled(void) { return 0; }
int lpl_cuda_runtime_version(void) { return 0; }

int lpl_cuda_feature_distance(const lpl_fd_params *p, void *stream, char *err) {
    (void)p;
    (void)stream;
    snprintf(err, LPL_ERR_LEN, "lpl_ext was built without CUDA");
    return -1;
}

int lpl_cuda_outlier_mask(const lpl_om_params *p, void *stream, char *err) {
    (void)p;
    (void)stream;
    snprintf(err, LPL_ERR_LEN, "lpl_ext was built without CUDA");
    return -1;
}
#else
typedef int lpl_cuda_stub_unused; /* ISO C forbids an empty translation unit */
#endif
