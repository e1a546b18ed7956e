// Helpers shared by the CUDA kernels: dtype loads/stores through lpl_math.h, launch
// error reporting, block reductions.
#ifndef LPL_CUDA_COMMON_CUH
#define LPL_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include "lpl_math.h"
#include "lpl_ops.h"
#include "lpl_tensor.h"

// Storage of 16-bit floats as raw bits; conversions are the shared lpl_math.h ones, so
// the GPU rounds exactly as the CPU does.
struct lpl_f16 { uint16_t bits; };
struct lpl_bf16 { uint16_t bits; };

template <typename T> struct lpl_io;
template <> struct lpl_io<float> {
    typedef float acc;
    static __device__ __forceinline__ float load(const float *p, int64_t i) { return p[i]; }
    static __device__ __forceinline__ void store(float *p, int64_t i, float v) { p[i] = v; }
};
template <> struct lpl_io<double> {
    typedef double acc;
    static __device__ __forceinline__ double load(const double *p, int64_t i) { return p[i]; }
    static __device__ __forceinline__ void store(double *p, int64_t i, double v) { p[i] = v; }
};
template <> struct lpl_io<lpl_f16> {
    typedef float acc;
    static __device__ __forceinline__ float load(const lpl_f16 *p, int64_t i) { return lpl_half_to_float(p[i].bits); }
    static __device__ __forceinline__ void store(lpl_f16 *p, int64_t i, float v) { p[i].bits = lpl_float_to_half(v); }
};
template <> struct lpl_io<lpl_bf16> {
    typedef float acc;
    static __device__ __forceinline__ float load(const lpl_bf16 *p, int64_t i) { return lpl_bf16_to_float(p[i].bits); }
    static __device__ __forceinline__ void store(lpl_bf16 *p, int64_t i, float v) { p[i].bits = lpl_float_to_bf16(v); }
};

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); result valid in
// thread 0. `shared` holds 32 doubles.
__device__ __forceinline__ double lpl_block_sum(double v, double *shared) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < (unsigned)nwarps) ? shared[lane] : 0.0;
    if (warp == 0)
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return v;
}

static inline int lpl_cuda_report(cudaError_t status, const char *what, char *err) {
    if (status == cudaSuccess) return 0;
    snprintf(err, LPL_ERR_LEN, "%s: %s", what, cudaGetErrorString(status));
    return -1;
}

#endif  // LPL_CUDA_COMMON_CUH
