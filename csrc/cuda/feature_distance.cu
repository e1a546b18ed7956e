// CUDA implementation of the fused feature distance (spec sections 3-4), the GPU twin of
// feature_distance_cpu.c: same per-element math (lpl_math.h), same outputs.
//
// Launch sequence on the caller's stream:
//   1. plane_stats: kept count M[n, c] per plane (+ sum and M2 of y*keep for `batch`)
//   2. channel_moments (`batch` only): per-channel mean and unbiased std (Chan's formula)
//   3. main: one thread per pixel of one sample; loops over channels (coalesced across the
//      warp), computes e and the gradient, block-reduces e per channel in shared memory
//      and adds one value per channel and block to the per-plane sums
//   4. finalize: loss[n] = sum_c w / (C M[n, c]) * S[n, c]
// The per-plane sums use double atomics, so the loss may differ run to run in the last
// bits; the gradient is deterministic.
#include "lpl_cuda_common.cuh"

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void plane_stats_kernel(const T *__restrict__ y, const uint8_t *__restrict__ mask, int64_t hw,
                                   int with_moments, double *__restrict__ kept,
                                   double *__restrict__ plane_sum, double *__restrict__ plane_m2) {
    __shared__ double red[32];
    const int64_t plane = blockIdx.x;
    const int64_t off = plane * hw;
    double count = 0.0, sum = 0.0;
    for (int64_t i = threadIdx.x; i < hw; i += blockDim.x) {
        const int k = mask ? mask[off + i] != 0 : 1;
        count += k;
        if (with_moments && k) sum += (double)lpl_io<T>::load(y, off + i);
    }
    count = lpl_block_sum(count, red);
    if (threadIdx.x == 0) kept[plane] = count;
    if (!with_moments) return;
    __shared__ double mean_shared;
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
    double count = 0.0, mean = 0.0, m2 = 0.0;
    const double nb = (double)hw;
    for (int64_t n = 0; n < n_samples && nb > 0.0; ++n) {
        const double mb = plane_sum[n * channels + c] / nb;
        const double tot = count + nb;
        const double delta = mb - mean;
        mean += delta * nb / tot;
        m2 += plane_m2[n * channels + c] + delta * delta * count * nb / tot;
        count = tot;
    }
    chan_mean[c] = mean;
    chan_std[c] = count > 1.0 ? sqrt(m2 / (count - 1.0)) : (double)NAN;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
main_kernel(const T *__restrict__ x, const T *__restrict__ y, const uint8_t *__restrict__ mask,
            T *__restrict__ grad, const double *__restrict__ kept, const double *__restrict__ chan_mean,
            const double *__restrict__ chan_std, int64_t channels, int64_t hw, int norm, int dist,
            double weight, int use_shared_acc, double *__restrict__ sums) {
    typedef typename lpl_io<T>::acc acc;
    extern __shared__ double chan_acc[];  // channels doubles when use_shared_acc
    const int64_t n = blockIdx.y;
    const int64_t pix = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
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
        if (norm == LPL_NORM_DEFAULT) {
            nx = (acc)sqrt((double)sx);
            sx = (acc)(1.0 / ((double)nx + eps));
        }
        sy = (acc)(1.0 / (sqrt((double)sy) + eps));
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
                out = (acc)lpl_default_norm_grad_d((double)g, (double)xv, (double)sx, (double)nx, (double)dot);
            } else {
                g = cf * k * (acc)lpl_dist_deriv_f((float)d, dist);
                out = (acc)lpl_default_norm_grad_f((float)g, (float)xv, (float)sx, (float)nx, (float)dot);
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

    if (lpl_cuda_report(cudaMemsetAsync(sums, 0, sizeof(double) * (size_t)planes, stream), "cudaMemsetAsync", err))
        return -1;
    if (planes > 0) {
        if (planes > 2147483647LL) {
            snprintf(err, LPL_ERR_LEN, "too many (sample, channel) planes for one launch");
            return -1;
        }
        plane_stats_kernel<T><<<(unsigned)planes, kThreads, 0, stream>>>(y, p->mask, hw, batch, kept, plane_sum, plane_m2);
        if (lpl_cuda_report(cudaGetLastError(), "plane_stats_kernel", err)) return -1;
    }
    if (batch && C > 0) {
        channel_moments_kernel<<<(unsigned)((C + 127) / 128), 128, 0, stream>>>(plane_sum, plane_m2, N, C, hw, chan_mean,
                                                                                  chan_std);
        if (lpl_cuda_report(cudaGetLastError(), "channel_moments_kernel", err)) return -1;
    }
    if (hw > 0 && planes > 0) {
        const int64_t blocks_x = (hw + kThreads - 1) / kThreads;
        if (blocks_x > 2147483647LL || N > 65535) {
            snprintf(err, LPL_ERR_LEN, "shape too large for one launch (N must be <= 65535)");
            return -1;
        }
        const int use_shared_acc = C <= 4096;
        const size_t smem = use_shared_acc ? sizeof(double) * (size_t)C : 0;
        dim3 grid((unsigned)blocks_x, (unsigned)N);
        main_kernel<T><<<grid, kThreads, smem, stream>>>(x, y, p->mask, grad, kept, chan_mean, chan_std, C, hw, p->norm,
                                                         p->dist, p->weight, use_shared_acc, sums);
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
    if (lpl_cuda_report(cudaSetDevice(p->device), "cudaSetDevice", err)) return -1;
    cudaStream_t s = (cudaStream_t)stream;
    switch (p->dtype) {
    case LPL_FLOAT32: return run<float>(p, s, err);
    case LPL_FLOAT64: return run<double>(p, s, err);
    case LPL_FLOAT16: return run<lpl_f16>(p, s, err);
    case LPL_BFLOAT16: return run<lpl_bf16>(p, s, err);
    default: snprintf(err, LPL_ERR_LEN, "unsupported dtype"); return -1;
    }
}
