// Backward of the weighted feature distance (lpl_ext.weighted_feature_distance): the
// fused kernel already wrote d(sum_n s[n] loss[n])/dx with the forward-time factors s
// folded in, so backward only multiplies by the scalar upstream gradient g, and skips
// the pass when g == 1 (a bf16 step without accumulation or loss scaling). The test of
// g is made on the device, so that the host never waits for it: every block reads the
// one double, and when it is 1 no byte of the gradient is touched.
#include "lpl_device.cuh"

template <typename T>
__device__ __forceinline__ void scale_unless_one(T *__restrict__ grad, lpl_scale_args a) {
    typedef typename lpl_io<T>::acc acc;
    __shared__ double factor_shared;  // one global read per block, not one per thread
    if (threadIdx.x == 0) factor_shared = lpl_ld(a.factor, 0);
    __syncthreads();
    const double factor = factor_shared;
    if (factor == 1.0) return;
    const acc f = (acc)factor;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.numel; i += stride)
        lpl_io<T>::store(grad, i, lpl_io<T>::load(grad, i) * f);
}

#define LPL_SCALE_ENTRY_POINTS(sfx, T)                                                        \
    extern "C" __global__ void __launch_bounds__(LPL_SCALE_THREADS) lpl_scale_grad_##sfx(lpl_scale_args a) { \
        scale_unless_one<T>((T *)a.grad, a);                                                  \
    }
LPL_FOR_EACH_DTYPE(LPL_SCALE_ENTRY_POINTS)
#undef LPL_SCALE_ENTRY_POINTS
