// The one CUDA translation unit of lpl_ext: every kernel, with C linkage (names in
// lpl_kernel_abi.h). Built to a cubin per architecture by nvcc when the package is built
// (setup.py), or compiled by NVRTC for the GPU at hand at first use (lpl_ext/_cuda.py).
// Both compile with FMA contraction off (-fmad=false), as the CPU build has
// -ffp-contract=off: x*s - y*s must round like the CPU's, so that x == y gives exactly 0.
#include "feature_distance_kernels.cuh"
#include "outlier_mask_kernels.cuh"
#include "scale_kernels.cuh"
#include "v1_feature_distance_kernels.cuh"
#include "v1_outlier_mask_kernels.cuh"
