// The 0.2 kernels of the feature distance, kept unchanged (kernel names prefixed lpl_v1_) until a
// GPU run has compared them with the current ones in one call (issue 23;
// LPL_EXT_KERNEL_SET=v1 selects them, docs/cuda.md "Switches"). Delete this file,
// its launcher and its LPL_KERNEL_LIST entries when that comparison is in.
// CUDA kernels of the fused feature distance (docs/spec.md, "Feature distance"), the GPU
// twin of feature_distance_cpu.c: same per-element math (lpl_math.h), same outputs. The
// launch sequence lives in csrc/feature_distance_cuda.c:
//   1. kept_count (or fill with H*W without a mask): M[n, c]; plane_moments: sum and M2
//      of y*keep per plane (`batch` only)
//   2. channel_moments (`batch` only): per-channel mean and unbiased std (Chan's formula)
//   3. main: one thread per pixel of one sample (n folded into grid.x); loops over the
//      channels (coalesced across the warp), computes e and the gradient, block-reduces e
//      per channel and adds one value per channel and block to the per-plane sums
//   4. finalize: loss[n] = sum_c w / (C M[n, c]) * S[n, c]
// The per-plane sums use double atomics, so the loss may differ run to run in the last
// bits; the gradient is deterministic.
#include "lpl_device.cuh"

namespace lpl_v1 {

// Kept count per plane, each plane split over `blocks_per_plane` blocks. Counts are
// integers, so the double atomics are exact and the result is deterministic. `kept` is
// zeroed by the launcher.
extern "C" __global__ void lpl_v1_fd_kept_count(const uint8_t *__restrict__ mask, int64_t hw, int64_t blocks_per_plane,
                                             double *__restrict__ kept) {
    __shared__ double red[32];
    const int64_t blk = blockIdx.x, plane = blk / blocks_per_plane, part = blk % blocks_per_plane;
    const uint8_t *m = mask + plane * hw;
    double count = 0.0;
    for (int64_t i = part * blockDim.x + threadIdx.x; i < hw; i += blocks_per_plane * blockDim.x) count += lpl_ld(m, i) != 0;
    count = lpl_block_sum(count, red);
    if (threadIdx.x == 0 && count != 0.0) atomicAdd(&kept[plane], count);
}

extern "C" __global__ void lpl_v1_fd_fill(double *__restrict__ out, int64_t len, double value) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) lpl_st(out, i, value);
}

// Sum and M2 of y*keep per plane (`batch` only), one block per plane: two passes so the
// moments keep their precision on large planes.
template <typename T>
__device__ __forceinline__ void fd_plane_moments(const T *__restrict__ y, const uint8_t *__restrict__ mask, int64_t hw,
                                                 double *__restrict__ plane_sum, double *__restrict__ plane_m2) {
    __shared__ double red[32];
    __shared__ double mean_shared;
    const int64_t plane = blockIdx.x;
    const int64_t off = plane * hw;
    double sum = 0.0;
    for (int64_t i = threadIdx.x; i < hw; i += blockDim.x) {
        const int k = mask ? lpl_ld(mask, off + i) != 0 : 1;
        if (k) sum += (double)lpl_io<T>::load(y, off + i);
    }
    sum = lpl_block_sum(sum, red);
    if (threadIdx.x == 0) mean_shared = hw > 0 ? sum / (double)hw : 0.0;
    __syncthreads();
    const double mean = mean_shared;
    double m2 = 0.0;
    for (int64_t i = threadIdx.x; i < hw; i += blockDim.x) {
        const int k = mask ? lpl_ld(mask, off + i) != 0 : 1;
        const double v = (k ? (double)lpl_io<T>::load(y, off + i) : 0.0) - mean;
        m2 += v * v;
    }
    m2 = lpl_block_sum(m2, red);
    if (threadIdx.x == 0) {
        lpl_st(plane_sum, plane, sum);
        lpl_st(plane_m2, plane, m2);
    }
}

extern "C" __global__ void lpl_v1_fd_channel_moments(const double *__restrict__ plane_sum,
                                                  const double *__restrict__ plane_m2, int64_t n_samples,
                                                  int64_t channels, int64_t hw, double *__restrict__ chan_mean,
                                                  double *__restrict__ chan_std) {
    const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    double mean, std;  // lpl_channel_moments' own reads of the plane moments are not counted
    lpl_channel_moments(plane_sum + c, plane_m2 + c, n_samples, channels, hw, &mean, &std);
    lpl_st(chan_mean, c, mean);
    lpl_st(chan_std, c, std);
}

// ---- main kernel, in named steps --------------------------------------------------

// Per-pixel channel norms of `default` / `shared`: returns 1 / (||y|| + eps) in *inv_y,
// and for `default` 1 / (||x|| + eps) in *inv_x and ||x|| in *norm_x.
template <typename T, typename acc>
__device__ __forceinline__ void fd_pixel_norms(const T *__restrict__ x, const T *__restrict__ y,
                                               const uint8_t *__restrict__ mask, int64_t base, int64_t channels,
                                               int64_t hw, int norm, acc *inv_x, acc *norm_x, acc *inv_y) {
    acc sx = 0, sy = 0;
    for (int64_t c = 0; c < channels; ++c) {
        const int64_t i = base + c * hw;
        const bool k = mask ? lpl_ld(mask, i) != 0 : true;
        const acc yv = k ? lpl_io<T>::load(y, i) : (acc)0;
        sy += yv * yv;
        if (norm == LPL_NORM_DEFAULT) {
            const acc xv = lpl_io<T>::load(x, i);
            sx += xv * xv;
        }
    }
    const double eps = norm == LPL_NORM_DEFAULT ? LPL_EPS_DEFAULT : LPL_EPS_SHARED;
    if (norm == LPL_NORM_DEFAULT) {
        *norm_x = (acc)sqrt((double)sx);
        *inv_x = lpl_inv_norm(sx, eps);
    }
    *inv_y = lpl_inv_norm(sy, eps);
}

// d = normalized x - normalized y of one element, and the factor `scale` the gradient of
// the distance is multiplied by (1 for `none`; `default` handles its own chain rule).
template <typename acc>
__device__ __forceinline__ acc fd_difference(acc xv, acc yv, int norm, acc inv_x, acc inv_y, double mean,
                                             double std, acc *scale) {
    *scale = 1;
    if (norm == LPL_NORM_DEFAULT) return xv * inv_x - yv * inv_y;
    if (norm == LPL_NORM_SHARED) {
        *scale = inv_y;
        return xv * inv_y - yv * inv_y;
    }
    if (norm == LPL_NORM_BATCH) {
        *scale = (acc)(1.0 / (std + LPL_EPS_BATCH));
        const acc b = (acc)mean;
        return (xv - b) * *scale - (yv - b) * *scale;
    }
    return xv - yv;
}

// Adds e of the warp to the channel's block (or global) sum: one atomic per warp.
__device__ __forceinline__ void fd_reduce_channel(double e, bool use_shared_acc, double *chan_acc, double *sum) {
    for (int off = 16; off > 0; off >>= 1) e += __shfl_down_sync(0xffffffffu, e, off);
    if ((threadIdx.x & 31) == 0 && e != 0.0) atomicAdd(use_shared_acc ? chan_acc : sum, e);
}

// Second channel pass of `default`: the gradient through x / (||x|| + eps) needs the
// per-pixel dot product of the first pass (lpl_default_norm_coef).
template <typename T, typename acc>
__device__ __forceinline__ void fd_default_grad(const T *__restrict__ x, const T *__restrict__ y,
                                                const uint8_t *__restrict__ mask, T *__restrict__ grad,
                                                const double *__restrict__ kept_n, int64_t base, int64_t channels,
                                                int64_t hw, int dist, double weight, acc inv_x, acc norm_x,
                                                acc inv_y, acc dot) {
    const acc q = lpl_default_norm_coef(inv_x, norm_x, dot);
    for (int64_t c = 0; c < channels; ++c) {
        const int64_t i = base + c * hw;
        const bool keep = mask ? lpl_ld(mask, i) != 0 : true;
        const acc k = keep ? (acc)1 : (acc)0;
        const acc xv = lpl_io<T>::load(x, i);
        const acc yv = keep ? lpl_io<T>::load(y, i) : (acc)0;
        const acc d = xv * inv_x - yv * inv_y;
        const acc cf = (acc)lpl_plane_coef(weight, channels, lpl_ld(kept_n, c));
        const acc g = cf * k * lpl_dist_deriv(d, dist);
        lpl_io<T>::store(grad, i, lpl_default_norm_grad(g, xv, inv_x, q));
    }
}

template <typename T>
__device__ __forceinline__ void fd_main(const T *__restrict__ x, const T *__restrict__ y,
                                        const uint8_t *__restrict__ mask, T *__restrict__ grad,
                                        const double *__restrict__ kept, const double *__restrict__ chan_mean,
                                        const double *__restrict__ chan_std, int64_t channels, int64_t hw, int norm,
                                        int dist, double weight, int use_shared_acc, int64_t blocks_per_sample,
                                        double *__restrict__ sums) {
    typedef typename lpl_io<T>::acc acc;
    LPL_DYNAMIC_SHARED(double, chan_acc);  // channels doubles when use_shared_acc
    const int64_t n = blockIdx.x / blocks_per_sample;
    const int64_t pix = (blockIdx.x % blocks_per_sample) * blockDim.x + threadIdx.x;
    const bool active = pix < hw;
    if (use_shared_acc) {
        for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) chan_acc[c] = 0.0;
        __syncthreads();
    }
    const int64_t base = n * channels * hw + pix;
    const double *kept_n = kept + n * channels;

    acc inv_x = 0, norm_x = 0, inv_y = 0, dot = 0;
    if (active && (norm == LPL_NORM_DEFAULT || norm == LPL_NORM_SHARED))
        lpl_v1::fd_pixel_norms<T, acc>(x, y, mask, base, channels, hw, norm, &inv_x, &norm_x, &inv_y);

    for (int64_t c = 0; c < channels; ++c) {
        double e = 0.0;
        if (active) {
            const int64_t i = base + c * hw;
            const acc cf = (acc)lpl_plane_coef(weight, channels, lpl_ld(kept_n, c));
            const bool keep = mask ? lpl_ld(mask, i) != 0 : true;
            const acc k = keep ? (acc)1 : (acc)0;
            const acc xv = lpl_io<T>::load(x, i);
            const acc yv = keep ? lpl_io<T>::load(y, i) : (acc)0;
            acc scale;
            const acc d = lpl_v1::fd_difference<acc>(xv, yv, norm, inv_x, inv_y, norm == LPL_NORM_BATCH ? lpl_ld(chan_mean, c) : 0.0,
                                             norm == LPL_NORM_BATCH ? lpl_ld(chan_std, c) : 0.0, &scale);
            e = (double)(k * lpl_dist_value(d, dist));
            const acc g = cf * k * lpl_dist_deriv(d, dist);
            if (norm == LPL_NORM_DEFAULT)
                dot += g * xv;
            else if (grad)
                lpl_io<T>::store(grad, i, g * scale);
        }
        fd_reduce_channel(e, use_shared_acc, &chan_acc[use_shared_acc ? c : 0], &sums[n * channels + c]);
    }

    if (norm == LPL_NORM_DEFAULT && grad && active)
        lpl_v1::fd_default_grad<T, acc>(x, y, mask, grad, kept_n, base, channels, hw, dist, weight, inv_x, norm_x, inv_y, dot);

    if (use_shared_acc) {
        __syncthreads();
        for (int64_t c = threadIdx.x; c < channels; c += blockDim.x)
            if (chan_acc[c] != 0.0) atomicAdd(&sums[n * channels + c], chan_acc[c]);
    }
}

extern "C" __global__ void lpl_v1_fd_finalize(const double *__restrict__ sums, const double *__restrict__ kept,
                                           int64_t channels, double weight, double *__restrict__ loss) {
    __shared__ double red[32];
    const int64_t n = blockIdx.x;
    double total = 0.0;
    for (int64_t c = threadIdx.x; c < channels; c += blockDim.x)
        total += lpl_plane_coef(weight, channels, lpl_ld(kept, n * channels + c)) * lpl_ld(sums, n * channels + c);
    total = lpl_block_sum(total, red);
    if (threadIdx.x == 0) lpl_st(loss, n, total);
}

#define LPL_FD_ENTRY_POINTS(sfx, T)                                                                                  \
    extern "C" __global__ void lpl_v1_fd_plane_moments_##sfx(const T *__restrict__ y, const uint8_t *__restrict__ mask, \
                                                          int64_t hw, double *__restrict__ plane_sum,                \
                                                          double *__restrict__ plane_m2) {                           \
        lpl_v1::fd_plane_moments<T>(y, mask, hw, plane_sum, plane_m2);                                                       \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(LPL_FD_THREADS) lpl_v1_fd_main_##sfx(                                  \
        const T *__restrict__ x, const T *__restrict__ y, const uint8_t *__restrict__ mask, T *__restrict__ grad,    \
        const double *__restrict__ kept, const double *__restrict__ chan_mean, const double *__restrict__ chan_std, \
        int64_t channels, int64_t hw, int norm, int dist, double weight, int use_shared_acc,                         \
        int64_t blocks_per_sample, double *__restrict__ sums) {                                                      \
        lpl_v1::fd_main<T>(x, y, mask, grad, kept, chan_mean, chan_std, channels, hw, norm, dist, weight, use_shared_acc,    \
                   blocks_per_sample, sums);                                                                         \
    }
LPL_FOR_EACH_DTYPE(LPL_FD_ENTRY_POINTS)
#undef LPL_FD_ENTRY_POINTS

}  // namespace lpl_v1
