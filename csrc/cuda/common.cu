// CUDA runtime facts reported by lpl_ext.build_info(). Compiled only with CUDA.
#include <cuda_runtime.h>

#include "lpl_ops.h"

extern "C" int lpl_cuda_compiled(void) { return 1; }

extern "C" int lpl_cuda_runtime_version(void) {
    int version = 0;
    // Linked statically: this answers without a driver or GPU present.
    if (cudaRuntimeGetVersion(&version) != cudaSuccess) return 0;
    return version;
}
