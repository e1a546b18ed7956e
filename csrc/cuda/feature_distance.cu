// CUDA implementation of the fused feature distance (spec sections 3-4), the GPU twin of
// feature_distance_cpu.c: same per-element math (lpl_math.h), same outputs.
//
// Launch sequence on the caller's stream:
//   1. kept_count (or a fill with H*W without a mask): M[n, c]; plane_moments: sum and
//      M2 of y*keep per plane (`batch` only)
//   2. channel_moments (`batch` only): per-channel mean and unbiased std (Chan's formula)
//   3. main: one thread per pixel of one sample (n folded into grid.x); loops over channels (coalesced across the
//      warp), computes e and the gradient, block-reduces e per channel in shared memory
//      and adds one value per channel and block to the per-plane sums
//   4. finalize: loss[n] = sum_c w / (C M[n, c]) * S[n, c]
// The per-plane sums use double atomics, so the loss may differ run to run in the last
// bits; the gradient is deterministic.
#include "lpl_cuda_common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kMaxThreads = 256;

// Kept count per plane, each plane split over `blocks_per_plane` blocks. Counts are
// integers, so the double atomics are exact and the result is deterministic. `kept` is
// zeroed by the caller.
__global__ void kept_count_kernel(const uint8_t *__restrict__ mask, int64_t hw, int64_t blocks_per_plane,
                                  double *__restrict__ kept) {
    __shared__ double red[32];
    const int64_t blk = blockIdx.x, plane = blk / blocks_per_plane, part = blk % blocks_per_plane;
    const uint8_t *m = mask + plane * hw;
    double count = 0.0;
    for (int64_t i = part * blockDim.x + threadIdx.x; i < hw; i += blocks_per_plane * blockDim.x) count += m[i] != 0;
    count = lpl_block_sum(count, red);
    if (threadIdx.x == 0 && count != 0.0) atomicAdd(&kept[plane], count);
}

__global__ void fill_kernel(double *__restrict__ out, int64_t len, double value) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) out[i] = value;
}

// Sum and M2 of y*keep per plane (`batch` only), one block per plane: two passes so the
// moments keep their precision on large planes.
template <typename T>
__global__ void plane_moments_kernel(const T *__restrict__ y, const uint8_t *__restrict__ mask, int64_t hw,
                                     double *__restrict__ plane_sum, double *__restrict__ plane_m2) {
    __shared__ double red[32];
    __shared__ double mean_shared;
    const int64_t plane = blockIdx.x;
    const int64_t off = plane * hw;
    double sum = 0.0;
    for (int64_t i = threadIdx.x; i < hw; i += blockDim.x) {
        const int k = mask ? mask[off + i] != 0 : 1;
        if (k) sum += (double)lpl_io<T>::load(y, off + i);
    }
    sum = lpl_block_sum(sum, red);
    if (threadIdx.x == 0) mean_shared = hw > 0 ? sum / (double)hw : 0.0;
    __syncthreads();
    const double mean = mean_shared;
    double m2 = 0.0;
    for (int64_t i = threadIdx.x; i < hw; i += blockDim.x) {
        const int k = mask ? mask[off + i] != 0 : 1;
        const double v = (k ? (double)lpl_io<T>::load(y, off + i) : 0.0) - mean;
        m2 += v * v;
    }
    m2 = lpl_block_sum(m2, red);
    if (threadIdx.x == 0) {
        plane_sum[plane] = sum;
        plane_m2[plane] = m2;
    }
}

__global__ void channel_moments_kernel(const double *__restrict__ plane_sum, const double *__restrict__ plane_m2,
                                       int64_t n_samples, int64_t channels, int64_t hw,
                                       double *__restrict__ chan_mean, double *__restrict__ chan_std) {
    const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    lpl_channel_moments(plane_sum + c, plane_m2 + c, n_samples, channels, hw, &chan_mean[c], &chan_std[c]);
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
main_kernel(const T *__restrict__ x, const T *__restrict__ y, const uint8_t *__restrict__ mask,
            T *__restrict__ grad, const double *__restrict__ kept, const double *__restrict__ chan_mean,
            const double *__restrict__ chan_std, int64_t channels, int64_t hw, int norm, int dist,
            double weight, int use_shared_acc, int64_t blocks_per_sample, double *__restrict__ sums) {
    typedef typename lpl_io<T>::acc acc;
    extern __shared__ double chan_acc[];  // channels doubles when use_shared_acc
    const int64_t blk = blockIdx.x;
    const int64_t n = blk / blocks_per_sample;
    const int64_t pix = (blk % blocks_per_sample) * blockDim.x + threadIdx.x;
    const bool active = pix < hw;
    if (use_shared_acc) {
        for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) chan_acc[c] = 0.0;
        __syncthreads();
    }
    const int64_t base = n * channels * hw + pix;

    acc sx = 0, sy = 0, nx = 0, dot = 0;
    if (active && (norm == LPL_NORM_DEFAULT || norm == LPL_NORM_SHARED)) {
        for (int64_t c = 0; c < channels; ++c) {
            const int64_t i = base + c * hw;
            const bool k = mask ? mask[i] != 0 : true;
            const acc yv = k ? lpl_io<T>::load(y, i) : (acc)0;
            sy += yv * yv;
            if (norm == LPL_NORM_DEFAULT) {
                const acc xv = lpl_io<T>::load(x, i);
                sx += xv * xv;
            }
        }
        const double eps = norm == LPL_NORM_DEFAULT ? LPL_EPS_DEFAULT : LPL_EPS_SHARED;
        // same float/double formulas as the CPU kernel (lpl_math.h)
        if (norm == LPL_NORM_DEFAULT) {
            nx = (acc)sqrt((double)sx);
            sx = sizeof(acc) == sizeof(double) ? (acc)lpl_inv_norm_d((double)sx, eps)
                                               : (acc)lpl_inv_norm_f((float)sx, eps);
        }
        sy = sizeof(acc) == sizeof(double) ? (acc)lpl_inv_norm_d((double)sy, eps) : (acc)lpl_inv_norm_f((float)sy, eps);
    }

    for (int64_t c = 0; c < channels; ++c) {
        const int64_t i = base + c * hw;
        const acc cf = (acc)lpl_plane_coef(weight, channels, kept[n * channels + c]);
        double e = 0.0;
        if (active) {
            const bool keep = mask ? mask[i] != 0 : true;
            const acc k = keep ? (acc)1 : (acc)0;
            const acc xv = lpl_io<T>::load(x, i);
            const acc yv = keep ? lpl_io<T>::load(y, i) : (acc)0;
            acc d, scale = 1;
            if (norm == LPL_NORM_DEFAULT) {
                d = xv * sx - yv * sy;
            } else if (norm == LPL_NORM_SHARED) {
                scale = sy;
                d = xv * scale - yv * scale;
            } else if (norm == LPL_NORM_BATCH) {
                scale = (acc)(1.0 / (chan_std[c] + LPL_EPS_BATCH));
                const acc b = (acc)chan_mean[c];
                d = (xv - b) * scale - (yv - b) * scale;
            } else {
                d = xv - yv;
            }
            acc ev, deriv;
            if (sizeof(acc) == sizeof(double)) {
                ev = (acc)lpl_dist_value_d((double)d, dist);
                deriv = (acc)lpl_dist_deriv_d((double)d, dist);
            } else {
                ev = (acc)lpl_dist_value_f((float)d, dist);
                deriv = (acc)lpl_dist_deriv_f((float)d, dist);
            }
            e = (double)(k * ev);
            const acc g = cf * k * deriv;
            if (norm == LPL_NORM_DEFAULT) {
                dot += g * xv;
            } else if (grad) {
                lpl_io<T>::store(grad, i, g * scale);
            }
        }
        // Per-channel block reduction: warp shuffle, then one shared (or global) add per warp.
        for (int off = 16; off > 0; off >>= 1) e += __shfl_down_sync(0xffffffffu, e, off);
        if ((threadIdx.x & 31) == 0 && e != 0.0) {
            if (use_shared_acc)
                atomicAdd(&chan_acc[c], e);
            else
                atomicAdd(&sums[n * channels + c], e);
        }
    }

    if (norm == LPL_NORM_DEFAULT && grad && active) {
        const acc q = sizeof(acc) == sizeof(double)
                          ? (acc)lpl_default_norm_coef_d((double)sx, (double)nx, (double)dot)
                          : (acc)lpl_default_norm_coef_f((float)sx, (float)nx, (float)dot);
        for (int64_t c = 0; c < channels; ++c) {
            const int64_t i = base + c * hw;
            const bool keep = mask ? mask[i] != 0 : true;
            const acc k = keep ? (acc)1 : (acc)0;
            const acc xv = lpl_io<T>::load(x, i);
            const acc yv = keep ? lpl_io<T>::load(y, i) : (acc)0;
            const acc d = xv * sx - yv * sy;
            const acc cf = (acc)lpl_plane_coef(weight, channels, kept[n * channels + c]);
            acc g, out;
            if (sizeof(acc) == sizeof(double)) {
                g = cf * k * (acc)lpl_dist_deriv_d((double)d, dist);
                out = (acc)lpl_default_norm_grad_d((double)g, (double)xv, (double)sx, (double)q);
            } else {
                g = cf * k * (acc)lpl_dist_deriv_f((float)d, dist);
                out = (acc)lpl_default_norm_grad_f((float)g, (float)xv, (float)sx, (float)q);
            }
            lpl_io<T>::store(grad, i, out);
        }
    }

    if (use_shared_acc) {
        __syncthreads();
        for (int64_t c = threadIdx.x; c < channels; c += blockDim.x)
            if (chan_acc[c] != 0.0) atomicAdd(&sums[n * channels + c], chan_acc[c]);
    }
}

__global__ void finalize_kernel(const double *__restrict__ sums, const double *__restrict__ kept, int64_t channels,
                                double weight, double *__restrict__ loss) {
    __shared__ double red[32];
    const int64_t n = blockIdx.x;
    double total = 0.0;
    for (int64_t c = threadIdx.x; c < channels; c += blockDim.x)
        total += lpl_plane_coef(weight, channels, kept[n * channels + c]) * sums[n * channels + c];
    total = lpl_block_sum(total, red);
    if (threadIdx.x == 0) loss[n] = total;
}

template <typename T>
int run(const lpl_fd_params *p, cudaStream_t stream, char *err) {
    const int64_t N = p->n, C = p->c, hw = p->hw, planes = N * C;
    double *sums = p->workspace;
    double *kept = sums + planes;
    double *plane_sum = kept + planes;
    double *plane_m2 = plane_sum + planes;
    double *chan_mean = plane_m2 + planes;
    double *chan_std = chan_mean + C;
    const T *x = (const T *)p->x;
    const T *y = (const T *)p->y;
    T *grad = (T *)p->grad;
    const int batch = p->norm == LPL_NORM_BATCH;

    if (planes > 2147483647LL) {
        snprintf(err, LPL_ERR_LEN, "too many (sample, channel) planes for one launch");
        return -1;
    }
    // sums and kept are adjacent: zero both
    if (lpl_cuda_report(cudaMemsetAsync(sums, 0, 2 * sizeof(double) * (size_t)planes, stream), "cudaMemsetAsync", err))
        return -1;
    if (planes > 0) {
        if (p->mask) {
            int64_t per_plane = (hw + 4 * kThreads - 1) / (4 * kThreads);  // ~1024 bytes per block
            if (per_plane < 1) per_plane = 1;
            if (per_plane > 2147483647LL / planes) per_plane = 2147483647LL / planes;
            kept_count_kernel<<<(unsigned)(planes * per_plane), kThreads, 0, stream>>>(p->mask, hw, per_plane, kept);
            if (lpl_cuda_report(cudaGetLastError(), "kept_count_kernel", err)) return -1;
        } else {
            fill_kernel<<<(unsigned)((planes + kThreads - 1) / kThreads), kThreads, 0, stream>>>(kept, planes, (double)hw);
            if (lpl_cuda_report(cudaGetLastError(), "fill_kernel", err)) return -1;
        }
        if (batch) {
            plane_moments_kernel<T><<<(unsigned)planes, kThreads, 0, stream>>>(y, p->mask, hw, plane_sum, plane_m2);
            if (lpl_cuda_report(cudaGetLastError(), "plane_moments_kernel", err)) return -1;
        }
    }
    if (batch && C > 0) {
        channel_moments_kernel<<<(unsigned)((C + 127) / 128), 128, 0, stream>>>(plane_sum, plane_m2, N, C, hw, chan_mean,
                                                                                  chan_std);
        if (lpl_cuda_report(cudaGetLastError(), "channel_moments_kernel", err)) return -1;
    }
    if (hw > 0 && planes > 0) {
        // Small planes: narrower blocks so that more SMs get work.
        int sm_count = 0, dev = 0;
        if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
            sm_count = 0;
        int threads = kThreads;
        while (threads > 64 && N * ((hw + threads - 1) / threads) < 2 * (int64_t)sm_count) threads /= 2;
        const int64_t blocks_per_sample = (hw + threads - 1) / threads;
        if (blocks_per_sample > 2147483647LL / N) {
            snprintf(err, LPL_ERR_LEN, "shape too large for one launch");
            return -1;
        }
        const int use_shared_acc = C <= 4096;
        const size_t smem = use_shared_acc ? sizeof(double) * (size_t)C : 0;
        main_kernel<T><<<(unsigned)(N * blocks_per_sample), threads, smem, stream>>>(
            x, y, p->mask, grad, kept, chan_mean, chan_std, C, hw, p->norm, p->dist, p->weight, use_shared_acc,
            blocks_per_sample, sums);
        if (lpl_cuda_report(cudaGetLastError(), "main_kernel", err)) return -1;
    }
    if (N > 0) {
        finalize_kernel<<<(unsigned)N, kThreads, 0, stream>>>(sums, kept, C, p->weight, p->loss);
        if (lpl_cuda_report(cudaGetLastError(), "finalize_kernel", err)) return -1;
    }
    return 0;
}

}  // namespace

extern "C" int lpl_cuda_feature_distance(const lpl_fd_params *p, void *stream, char *err) {
    int prev = -1;
    if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
    if (prev != p->device && lpl_cuda_report(cudaSetDevice(p->device), "cudaSetDevice", err)) return -1;
    cudaStream_t s = (cudaStream_t)stream;
    int rc;
    switch (p->dtype) {
    case LPL_FLOAT32: rc = run<float>(p, s, err); break;
    case LPL_FLOAT64: rc = run<double>(p, s, err); break;
    case LPL_FLOAT16: rc = run<lpl_f16>(p, s, err); break;
    case LPL_BFLOAT16: rc = run<lpl_bf16>(p, s, err); break;
    default: snprintf(err, LPL_ERR_LEN, "unsupported dtype"); rc = -1; break;
    }
    if (prev >= 0 && prev != p->device) cudaSetDevice(prev);  // leave the caller's device current
    return rc;
}
