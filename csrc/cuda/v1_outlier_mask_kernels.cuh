// The 0.2 kernels of the outlier mask, kept unchanged (kernel names prefixed lpl_v1_) until a
// GPU run has compared them with the current ones in one call (issue 23;
// LPL_EXT_KERNEL_SET=v1 selects them, docs/cuda.md "Switches"). Delete this file,
// its launcher and its LPL_KERNEL_LIST entries when that comparison is in.
// CUDA kernels of the outlier keep-mask (docs/spec.md, "Outlier mask"), the GPU twin of
// outlier_mask_cpu.c: same order statistics (exact, by radix select on the same
// order-preserving keys), same std formula and thresholds (lpl_math.h), same separable
// max / min filters with max-pool borders, same layer statistics.
//
// Launch sequence (csrc/outlier_mask_cuda.c) on the caller's stream (no host sync anywhere; B blocks per plane,
// per-block partials combined in a fixed order, so results are deterministic):
//   1. moments        finite count, sum, min/max key per block
//   2. setup          per plane: count, mean, ranks k1, k2; clears the digit histograms
//   3. variance       sum (v - mean)^2 and sum (v - mean) per block
//   4. radix passes   for each 8-bit digit from the top: histogram of the digit among the
//                     finite keys that match the selected prefix (two selections at once),
//                     then one thread per (plane, selection) picks the digit
//   5. thresholds     per plane: std, q1, q2, lo, hi
//   6. keep_rowor     keep0 = lo < y < hi, row max filter (closing) -> tmp
//   7. col_or         column max filter (closing) tmp -> keep
//   8. row_and        row min filter (opening) keep -> tmp
//   9. final          column min filter (opening) tmp, AND finite -> keep; kept moments
//  10. plane_stats / layer_stats   statistics into stats (3,) float64
#include "lpl_device.cuh"

namespace lpl_v1 {

#define kThreads LPL_OM_CUDA_THREADS

template <typename T> struct om_traits;
template <> struct om_traits<float> {
    static constexpr int kKeyBits = 32;
    static __device__ __forceinline__ int finite(float r) { return lpl_isfinite_f(r); }
    static __device__ __forceinline__ uint64_t key(float r) { return (uint64_t)lpl_float_sort_key(r); }
    static __device__ __forceinline__ float load(float r) { return r; }
};
template <> struct om_traits<double> {
    static constexpr int kKeyBits = 64;
    static __device__ __forceinline__ int finite(double r) { return lpl_isfinite_d(r); }
    static __device__ __forceinline__ uint64_t key(double r) { return lpl_double_sort_key(r); }
    static __device__ __forceinline__ double load(double r) { return r; }
};
template <> struct om_traits<lpl_f16> {
    static constexpr int kKeyBits = 16;
    static __device__ __forceinline__ int finite(lpl_f16 r) { return lpl_om_isfinite_f16(r.bits); }
    static __device__ __forceinline__ uint64_t key(lpl_f16 r) { return (uint64_t)lpl_om_key16(r.bits); }
    static __device__ __forceinline__ float load(lpl_f16 r) { return lpl_half_to_float(r.bits); }
};
template <> struct om_traits<lpl_bf16> {
    static constexpr int kKeyBits = 16;
    static __device__ __forceinline__ int finite(lpl_bf16 r) { return lpl_om_isfinite_bf16(r.bits); }
    static __device__ __forceinline__ uint64_t key(lpl_bf16 r) { return (uint64_t)lpl_om_key16(r.bits); }
    static __device__ __forceinline__ float load(lpl_bf16 r) { return lpl_bf16_to_float(r.bits); }
};

// plane_d slots (LPL_OM_PLANE_D doubles per plane)
enum { PD_COUNT = 0, PD_MEAN, PD_CONST, PD_LO, PD_HI, PD_PMEAN, PD_PM2, PD_KEPT };
// plane_u slots (4 uint64 per plane)
enum { PU_PREFIX1 = 0, PU_PREFIX2, PU_RANK1, PU_RANK2 };

typedef lpl_om_v1_ws om_ws;  // scratch regions (lpl_kernel_abi.h)

__device__ __forceinline__ uint64_t block_min_u64(uint64_t v, uint64_t *shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < (unsigned)s && shared[threadIdx.x + s] < shared[threadIdx.x])
            shared[threadIdx.x] = shared[threadIdx.x + s];
        __syncthreads();
    }
    const uint64_t r = shared[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ uint64_t block_max_u64(uint64_t v, uint64_t *shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < (unsigned)s && shared[threadIdx.x + s] > shared[threadIdx.x])
            shared[threadIdx.x] = shared[threadIdx.x + s];
        __syncthreads();
    }
    const uint64_t r = shared[0];
    __syncthreads();
    return r;
}

// 1. Block (plane, j) of B handles the plane's values j*T + t, stepping B*T (coalesced).
template <typename T>
__device__ __forceinline__ void moments_kernel(const T *__restrict__ y, int64_t len, int64_t nb, om_ws ws) {
    __shared__ double red[32];
    __shared__ uint64_t redu[kThreads];
    const int64_t plane = blockIdx.x / nb, j = blockIdx.x % nb;
    const T *yp = y + plane * len;
    double count = 0.0, sum = 0.0;
    uint64_t kmin = UINT64_MAX, kmax = 0;
    for (int64_t i = j * kThreads + threadIdx.x; i < len; i += nb * kThreads) {
        const T r = lpl_ld(yp, i);
        if (!om_traits<T>::finite(r)) continue;
        const uint64_t k = om_traits<T>::key(r);
        count += 1.0;
        sum += (double)om_traits<T>::load(r);
        kmin = k < kmin ? k : kmin;
        kmax = k > kmax ? k : kmax;
    }
    count = lpl_block_sum(count, red);
    __syncthreads();
    sum = lpl_block_sum(sum, red);
    kmin = block_min_u64(kmin, redu);
    kmax = block_max_u64(kmax, redu);
    if (threadIdx.x == 0) {
        lpl_st(ws.part_d, (int64_t)blockIdx.x * 4, count);
        lpl_st(ws.part_d, (int64_t)blockIdx.x * 4 + 1, sum);
        lpl_st(ws.part_u, (int64_t)blockIdx.x * 2, kmin);
        lpl_st(ws.part_u, (int64_t)blockIdx.x * 2 + 1, kmax);
    }
}

// 2. One thread per plane.
extern "C" __global__ void lpl_v1_om_setup(int64_t planes, int64_t nb, double quantile, int dtype, om_ws ws) {
    const int64_t plane = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (plane >= planes) return;
    double count = 0.0, sum = 0.0;
    uint64_t kmin = UINT64_MAX, kmax = 0;
    for (int64_t j = 0; j < nb; ++j) {
        const int64_t b = plane * nb + j;
        count += lpl_ld(ws.part_d, b * 4);
        sum += lpl_ld(ws.part_d, b * 4 + 1);
        const uint64_t lo = lpl_ld(ws.part_u, b * 2), hi = lpl_ld(ws.part_u, b * 2 + 1);
        kmin = lo < kmin ? lo : kmin;
        kmax = hi > kmax ? hi : kmax;
    }
    double *pd = ws.plane_d + plane * LPL_OM_PLANE_D;
    uint64_t *pu = ws.plane_u + plane * 4;
    const int is_const = count > 0.0 && kmin == kmax;
    lpl_st(pd, PD_COUNT, count);
    lpl_st(pd, PD_MEAN, count > 0.0 ? (is_const ? lpl_om_key_to_double(kmin, dtype) : sum / count) : 0.0);
    lpl_st(pd, PD_CONST, (double)is_const);
    const int64_t cnt = (int64_t)count;
    lpl_st(pu, PU_PREFIX1, 0);
    lpl_st(pu, PU_PREFIX2, 0);
    lpl_st(pu, PU_RANK1, cnt > 0 ? (uint64_t)lpl_quantile_rank(cnt, quantile) : 1);
    lpl_st(pu, PU_RANK2, cnt > 0 ? (uint64_t)lpl_quantile_rank(cnt, 1.0 - quantile) : 1);
    uint32_t *h = ws.hist + plane * 512;
    for (int i = 0; i < 512; ++i) lpl_st(h, i, 0);
}

// 3. Two-pass variance partials.
template <typename T>
__device__ __forceinline__ void variance_kernel(const T *__restrict__ y, int64_t len, int64_t nb, om_ws ws) {
    __shared__ double red[32];
    const int64_t plane = blockIdx.x / nb, j = blockIdx.x % nb;
    const T *yp = y + plane * len;
    const double mean = lpl_ld(ws.plane_d, plane * LPL_OM_PLANE_D + PD_MEAN);
    double ss = 0.0, sd = 0.0;
    for (int64_t i = j * kThreads + threadIdx.x; i < len; i += nb * kThreads) {
        const T r = lpl_ld(yp, i);
        if (!om_traits<T>::finite(r)) continue;
        const double d = (double)om_traits<T>::load(r) - mean;
        ss += d * d;
        sd += d;
    }
    ss = lpl_block_sum(ss, red);
    __syncthreads();
    sd = lpl_block_sum(sd, red);
    if (threadIdx.x == 0) {
        lpl_st(ws.part_d, (int64_t)blockIdx.x * 4 + 2, ss);
        lpl_st(ws.part_d, (int64_t)blockIdx.x * 4 + 3, sd);
    }
}

__device__ __forceinline__ int prefix_matches(uint64_t key, uint64_t prefix, int shift) {
    const int hi = shift + 8;
    return hi >= 64 ? 1 : ((key ^ prefix) >> hi) == 0;
}

// 4a. Digit histogram (bits shift .. shift+7) of the finite keys matching each prefix.
template <typename T>
__device__ __forceinline__ void radix_hist_kernel(const T *__restrict__ y, int64_t len, int64_t nb, int shift, om_ws ws) {
    __shared__ uint32_t h[512];
    const int64_t plane = blockIdx.x / nb, j = blockIdx.x % nb;
    for (int i = threadIdx.x; i < 512; i += blockDim.x) h[i] = 0;
    __syncthreads();
    const uint64_t p1 = lpl_ld(ws.plane_u, plane * 4 + PU_PREFIX1), p2 = lpl_ld(ws.plane_u, plane * 4 + PU_PREFIX2);
    const T *yp = y + plane * len;
    for (int64_t i = j * kThreads + threadIdx.x; i < len; i += nb * kThreads) {
        const T r = lpl_ld(yp, i);
        if (!om_traits<T>::finite(r)) continue;
        const uint64_t k = om_traits<T>::key(r);
        const unsigned d = (unsigned)((k >> shift) & 255u);
        if (prefix_matches(k, p1, shift)) atomicAdd(&h[d], 1u);
        if (prefix_matches(k, p2, shift)) atomicAdd(&h[256 + d], 1u);
    }
    __syncthreads();
    uint32_t *g = ws.hist + plane * 512;
    for (int i = threadIdx.x; i < 512; i += blockDim.x)
        if (h[i]) atomicAdd(&g[i], h[i]);
}

// 4b. One thread per (plane, selection): pick the digit holding the rank, clear the bins.
extern "C" __global__ void lpl_v1_om_radix_select(int64_t planes, int shift, om_ws ws) {
    const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= planes * 2) return;
    const int64_t plane = t >> 1;
    const int s = (int)(t & 1);
    uint32_t *h = ws.hist + plane * 512 + s * 256;
    uint64_t *pu = ws.plane_u + plane * 4;
    uint64_t rank = lpl_ld(pu, PU_RANK1 + s);
    uint64_t before = 0;
    int digit = -1;
    for (int d = 0; d < 256; ++d) {
        const uint32_t hd = lpl_ld(h, d);
        if (digit < 0 && before + hd >= rank) digit = d;
        if (digit < 0) before += hd;
        lpl_st(h, d, 0);
    }
    if (digit < 0) return;  // no finite value: nothing to select
    lpl_st(pu, PU_RANK1 + s, rank - before);
    lpl_st(pu, PU_PREFIX1 + s, lpl_ld(pu, PU_PREFIX1 + s) | ((uint64_t)digit << shift));
}

// 5. One thread per plane: std, order statistics, thresholds (lpl_math.h).
extern "C" __global__ void lpl_v1_om_thresholds(int64_t planes, int64_t nb, double margin_std, int dtype, om_ws ws) {
    const int64_t plane = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (plane >= planes) return;
    double *pd = ws.plane_d + plane * LPL_OM_PLANE_D;
    const uint64_t *pu = ws.plane_u + plane * 4;
    const double count = lpl_ld(pd, PD_COUNT);
    if (count <= 0.0) {
        lpl_st(pd, PD_LO, NAN);
        lpl_st(pd, PD_HI, NAN);
        return;
    }
    double ss = 0.0, sd = 0.0;
    for (int64_t j = 0; j < nb; ++j) {
        ss += lpl_ld(ws.part_d, (plane * nb + j) * 4 + 2);
        sd += lpl_ld(ws.part_d, (plane * nb + j) * 4 + 3);
    }
    const double std_d = lpl_om_sample_std(count, ss, sd, lpl_ld(pd, PD_CONST) != 0.0);
    const double q1 = lpl_om_key_to_double(lpl_ld(pu, PU_PREFIX1), dtype);
    const double q2 = lpl_om_key_to_double(lpl_ld(pu, PU_PREFIX2), dtype);
    double lo, hi;
    lpl_om_thresholds(dtype, q1, q2, std_d, margin_std, &lo, &hi);
    lpl_st(pd, PD_LO, lo);
    lpl_st(pd, PD_HI, hi);
}

// 6. keep0 and the row max filter of the closing, one thread per pixel.
template <typename T>
__device__ __forceinline__ void keep_rowor_kernel(const T *__restrict__ y, int64_t total, int64_t len, int64_t w, int64_t r,
                                  om_ws ws) {
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t plane = idx / len;
        const int64_t x = idx % w;
        const double *pd = ws.plane_d + plane * LPL_OM_PLANE_D;
        const double lo = lpl_ld(pd, PD_LO), hi = lpl_ld(pd, PD_HI);
        const int64_t a = x - r < 0 ? -x : -r, b = x + r > w - 1 ? w - 1 - x : r;
        uint8_t out = 0;
        for (int64_t d = a; d <= b && !out; ++d) {
            // compared in the dtype's value type: exact, the thresholds are dtype values
            const double v = (double)om_traits<T>::load(lpl_ld(y, idx + d));
            out = (uint8_t)((lo < v) & (v < hi));
        }
        lpl_st(ws.tmp, idx, out);
    }
}

// 7. Column max filter (closing): tmp -> keep.
extern "C" __global__ void lpl_v1_om_col_or(const uint8_t *__restrict__ src, uint8_t *__restrict__ dst, int64_t total, int64_t len,
                              int64_t h, int64_t w, int64_t r) {
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = (idx % len) / w;
        const int64_t a = row - r < 0 ? -row : -r, b = row + r > h - 1 ? h - 1 - row : r;
        uint8_t out = 0;
        for (int64_t d = a; d <= b; ++d) out |= lpl_ld(src, idx + d * w);
        lpl_st(dst, idx, out);
    }
}

// 8. Row min filter (opening): keep -> tmp.
extern "C" __global__ void lpl_v1_om_row_and(const uint8_t *__restrict__ src, uint8_t *__restrict__ dst, int64_t total, int64_t w,
                               int64_t r) {
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t x = idx % w;
        const int64_t a = x - r < 0 ? -x : -r, b = x + r > w - 1 ? w - 1 - x : r;
        uint8_t out = 1;
        for (int64_t d = a; d <= b; ++d) out &= lpl_ld(src, idx + d);
        lpl_st(dst, idx, out);
    }
}

// 9. Column min filter (opening) AND finite -> keep, with the kept-value moments per
// block (same block layout as moments_kernel, so the partials are deterministic).
template <typename T>
__device__ __forceinline__ void final_kernel(const T *__restrict__ y, uint8_t *__restrict__ keep, int64_t len, int64_t h, int64_t w,
                             int64_t r, int64_t nb, om_ws ws) {
    __shared__ double red[32];
    const int64_t plane = blockIdx.x / nb, j = blockIdx.x % nb;
    const T *yp = y + plane * len;
    const uint8_t *tp = ws.tmp + plane * len;
    uint8_t *kp = keep + plane * len;
    const double k = lpl_ld(ws.plane_d, plane * LPL_OM_PLANE_D + PD_MEAN);
    double kept = 0.0, s1 = 0.0, s2 = 0.0;
    for (int64_t i = j * kThreads + threadIdx.x; i < len; i += nb * kThreads) {
        const int64_t row = i / w;
        const int64_t a = row - r < 0 ? -row : -r, b = row + r > h - 1 ? h - 1 - row : r;
        uint8_t out = 1;
        for (int64_t d = a; d <= b; ++d) out &= lpl_ld(tp, i + d * w);
        const T raw = lpl_ld(yp, i);
        out &= (uint8_t)om_traits<T>::finite(raw);
        lpl_st(kp, i, out);
        if (out) {
            const double dv = (double)om_traits<T>::load(raw) - k;
            kept += 1.0;
            s1 += dv;
            s2 += dv * dv;
        }
    }
    kept = lpl_block_sum(kept, red);
    __syncthreads();
    s1 = lpl_block_sum(s1, red);
    __syncthreads();
    s2 = lpl_block_sum(s2, red);
    if (threadIdx.x == 0) {
        lpl_st(ws.part_d, (int64_t)blockIdx.x * 4, kept);
        lpl_st(ws.part_d, (int64_t)blockIdx.x * 4 + 1, s1);
        lpl_st(ws.part_d, (int64_t)blockIdx.x * 4 + 2, s2);
    }
}

// 10a. Per-plane moments of where(keep, y, 0) (masked values count as 0).
extern "C" __global__ void lpl_v1_om_plane_stats(int64_t planes, int64_t nb, int64_t len, om_ws ws) {
    const int64_t plane = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (plane >= planes) return;
    double *pd = ws.plane_d + plane * LPL_OM_PLANE_D;
    double kept = 0.0, s1 = 0.0, s2 = 0.0;
    for (int64_t j = 0; j < nb; ++j) {
        kept += lpl_ld(ws.part_d, (plane * nb + j) * 4);
        s1 += lpl_ld(ws.part_d, (plane * nb + j) * 4 + 1);
        s2 += lpl_ld(ws.part_d, (plane * nb + j) * 4 + 2);
    }
    const double zeros = (double)len - kept, k = lpl_ld(pd, PD_MEAN);
    s1 -= zeros * k;
    s2 += zeros * k * k;
    const double m2 = len > 0 ? s2 - s1 * s1 / (double)len : 0.0;
    lpl_st(pd, PD_PMEAN, len > 0 ? k + s1 / (double)len : 0.0);
    lpl_st(pd, PD_PM2, m2 > 0.0 ? m2 : 0.0);
    lpl_st(pd, PD_KEPT, kept);
}

// 10b. Single thread: planes merged in order (as the CPU does).
extern "C" __global__ void lpl_v1_om_layer_stats(int64_t planes, int64_t len, om_ws ws, double *stats) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double n = 0.0, mean = 0.0, m2 = 0.0, kept = 0.0;
    for (int64_t pl = 0; pl < planes && len > 0; ++pl) {
        const double *pd = ws.plane_d + pl * LPL_OM_PLANE_D;
        lpl_om_merge_moments(&n, &mean, &m2, (double)len, lpl_ld(pd, PD_PMEAN), lpl_ld(pd, PD_PM2));
        kept += lpl_ld(pd, PD_KEPT);
    }
    double out[3];
    lpl_om_finish_stats(n, mean, m2, kept, out);
    for (int i = 0; i < 3; ++i) lpl_st(stats, i, out[i]);
}

#define LPL_OM_ENTRY_POINTS(sfx, T)                                                                                  \
    extern "C" __global__ void lpl_v1_om_moments_##sfx(const T *__restrict__ y, int64_t len, int64_t nb, om_ws ws) {    \
        lpl_v1::moments_kernel<T>(y, len, nb, ws);                                                                           \
    }                                                                                                                \
    extern "C" __global__ void lpl_v1_om_variance_##sfx(const T *__restrict__ y, int64_t len, int64_t nb, om_ws ws) {   \
        lpl_v1::variance_kernel<T>(y, len, nb, ws);                                                                          \
    }                                                                                                                \
    extern "C" __global__ void lpl_v1_om_radix_hist_##sfx(const T *__restrict__ y, int64_t len, int64_t nb, int shift,  \
                                                       om_ws ws) {                                                   \
        lpl_v1::radix_hist_kernel<T>(y, len, nb, shift, ws);                                                                 \
    }                                                                                                                \
    extern "C" __global__ void lpl_v1_om_keep_rowor_##sfx(const T *__restrict__ y, int64_t total, int64_t len,          \
                                                       int64_t w, int64_t r, om_ws ws) {                             \
        lpl_v1::keep_rowor_kernel<T>(y, total, len, w, r, ws);                                                               \
    }                                                                                                                \
    extern "C" __global__ void lpl_v1_om_final_##sfx(const T *__restrict__ y, uint8_t *__restrict__ keep, int64_t len,  \
                                                  int64_t h, int64_t w, int64_t r, int64_t nb, om_ws ws) {           \
        lpl_v1::final_kernel<T>(y, keep, len, h, w, r, nb, ws);                                                              \
    }
LPL_FOR_EACH_DTYPE(LPL_OM_ENTRY_POINTS)
#undef LPL_OM_ENTRY_POINTS

}  // namespace lpl_v1
#undef kThreads
