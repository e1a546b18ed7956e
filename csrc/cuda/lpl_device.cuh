// Device helpers shared by the CUDA kernels: dtype loads/stores through lpl_math.h and
// block reductions. Device code only, no CUDA runtime header: the same text compiles
// with nvcc (-cubin, at build time) and with NVRTC (at first use). Host launches go
// through the driver API (csrc/cuda_driver.c).
#ifndef LPL_DEVICE_CUH
#define LPL_DEVICE_CUH

#include "lpl_kernel_abi.h"
#include "lpl_math.h"

// Full unrolling of loops with constant bounds (register arrays indexed by the loop
// counter stay in registers); the emulated device's host compiler has no such pragma.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define LPL_UNROLL _Pragma("unroll")
#else
#define LPL_UNROLL
#endif

// Storage of 16-bit floats as raw bits; conversions are the shared lpl_math.h ones, so
// the GPU rounds exactly as the CPU does.
struct lpl_f16 { uint16_t bits; };
struct lpl_bf16 { uint16_t bits; };

// Every global-memory access of the kernels goes through lpl_ld / lpl_st (or lpl_io,
// which converts through them): plain loads and stores on the GPU, where the hooks are
// empty; the emulated device (tests/emu/lpl_emu.cuh) defines them to count the bytes
// each launch moves. Shared memory is accessed directly.
#ifndef LPL_EMU_GLOBAL_READ
#define LPL_EMU_GLOBAL_READ(ptr, bytes) ((void)0)
#define LPL_EMU_GLOBAL_WRITE(ptr, bytes) ((void)0)
#endif
template <typename T> __device__ __forceinline__ T lpl_ld(const T *p, int64_t i) {
    LPL_EMU_GLOBAL_READ(p + i, sizeof(T));
    return p[i];
}
template <typename T> struct lpl_same { typedef T type; };  // keeps v out of deduction: literals convert
template <typename T> __device__ __forceinline__ void lpl_st(T *p, int64_t i, typename lpl_same<T>::type v) {
    LPL_EMU_GLOBAL_WRITE(p + i, sizeof(T));
    p[i] = v;
}

template <typename T> struct lpl_io;
template <> struct lpl_io<float> {
    typedef float acc;
    static __device__ __forceinline__ float load(const float *p, int64_t i) { return lpl_ld(p, i); }
    static __device__ __forceinline__ void store(float *p, int64_t i, float v) { lpl_st(p, i, v); }
};
template <> struct lpl_io<double> {
    typedef double acc;
    static __device__ __forceinline__ double load(const double *p, int64_t i) { return lpl_ld(p, i); }
    static __device__ __forceinline__ void store(double *p, int64_t i, double v) { lpl_st(p, i, v); }
};
template <> struct lpl_io<lpl_f16> {
    typedef float acc;
    static __device__ __forceinline__ float load(const lpl_f16 *p, int64_t i) { return lpl_half_to_float(lpl_ld(p, i).bits); }
    static __device__ __forceinline__ void store(lpl_f16 *p, int64_t i, float v) {
        lpl_st(p, i, lpl_f16{lpl_float_to_half(v)});
    }
};
template <> struct lpl_io<lpl_bf16> {
    typedef float acc;
    static __device__ __forceinline__ float load(const lpl_bf16 *p, int64_t i) { return lpl_bf16_to_float(lpl_ld(p, i).bits); }
    static __device__ __forceinline__ void store(lpl_bf16 *p, int64_t i, float v) {
        lpl_st(p, i, lpl_bf16{lpl_float_to_bf16(v)});
    }
};

// Overloads of the lpl_math.h formulas on the accumulation type (float for 32- and
// 16-bit storage, double for float64), so templated kernels pick the CPU's formula.
__device__ __forceinline__ float lpl_dist_value(float d, int dist) { return lpl_dist_value_f(d, dist); }
__device__ __forceinline__ double lpl_dist_value(double d, int dist) { return lpl_dist_value_d(d, dist); }
__device__ __forceinline__ float lpl_dist_deriv(float d, int dist) { return lpl_dist_deriv_f(d, dist); }
__device__ __forceinline__ double lpl_dist_deriv(double d, int dist) { return lpl_dist_deriv_d(d, dist); }
__device__ __forceinline__ float lpl_inv_norm(float sumsq, double eps) { return lpl_inv_norm_f(sumsq, eps); }
__device__ __forceinline__ double lpl_inv_norm(double sumsq, double eps) { return lpl_inv_norm_d(sumsq, eps); }
__device__ __forceinline__ float lpl_default_norm_coef(float r, float norm, float dot) {
    return lpl_default_norm_coef_f(r, norm, dot);
}
__device__ __forceinline__ double lpl_default_norm_coef(double r, double norm, double dot) {
    return lpl_default_norm_coef_d(r, norm, dot);
}
__device__ __forceinline__ float lpl_default_norm_grad(float g, float x, float r, float coef) {
    return lpl_default_norm_grad_f(g, x, r, coef);
}
__device__ __forceinline__ double lpl_default_norm_grad(double g, double x, double r, double coef) {
    return lpl_default_norm_grad_d(g, x, r, coef);
}

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

// Dynamic shared memory (the launch's `smem` bytes). C++ cannot express the CUDA
// declaration `extern __shared__ T name[]`, so the emulated device (tests/emu/lpl_emu.cuh)
// defines this macro first; nvcc and NVRTC get the real declaration.
#ifndef LPL_DYNAMIC_SHARED
#define LPL_DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]  // kernels carve doubles from it
#endif

// Per-dtype kernel entry points with C linkage (names in LPL_KERNEL_LIST): M(suffix, T)
// is expanded once per storage type, in lpl_dtype order.
#define LPL_FOR_EACH_DTYPE(M) M(f32, float) M(f64, double) M(f16, lpl_f16) M(bf16, lpl_bf16)

#endif  // LPL_DEVICE_CUH
