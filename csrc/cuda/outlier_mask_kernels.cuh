// CUDA kernels of the outlier keep-mask (docs/spec.md, "Outlier mask"), the GPU twin of
// outlier_mask_cpu.c: same order statistics (exact, by radix select on the same
// order-preserving keys), same std formula and thresholds (lpl_math.h), same separable
// max / min filters with max-pool borders (windows clipped to the plane), same layer
// statistics. Every kernel takes one lpl_om_args by value (lpl_kernel_abi.h).
//
// Two paths, chosen per call by csrc/outlier_mask_cuda.c (no host sync anywhere):
//
// Plane path (om_plane), when a plane's values and two mask bytes per value fit in the
// block's dynamic shared memory: one block per plane reads the plane ONCE, then works in
// shared memory only: the finite count, sum, min / max key and the two-pass variance
// summed by one thread in element order (the CPU's order: the plane's mean, std and kept
// moments are bit-identical to outlier_mask_cpu.c's), the two order statistics by an
// 8-bit MSD radix select (block histogram + block-wide scan per digit), thresholds,
// keep0 -> closing (row, column max) -> opening (row, column min) -> AND finite, the
// mask written ONCE, and the plane's kept moments (3 doubles) for the layer statistics.
// Global traffic: the values once, the mask once, 24 bytes per plane.
//
// Streaming path, for larger planes (B blocks per plane, per-block partials combined in a
// fixed order, so results do not depend on the block order):
//   om_select pass -1   clears the plane's digit histograms
//   om_hist   pass 0    finite count, sum, min/max key; histogram of the top 11 key bits
//   om_select pass 0    count, mean, ranks k1, k2; picks each rank's digit (block scan)
//   om_hist   pass 1    sum (v - mean)^2, sum (v - mean); histograms of the next digit
//                       among the keys matching each selected prefix
//   om_select pass 1..  std; digits; after the last digit the thresholds lo, hi
//   om_hist / om_select further digits (11 bits each: float32 3 passes over y in all,
//                       16-bit 2, float64 6)
//   om_filter           2-D tiles with a halo of r_close + r_open: threshold, closing,
//                       opening, AND finite in shared memory, the mask written once;
//                       per-tile kept moments
//   om_plane_merge      per plane: kept moments from the tiles in tile order
// Its sums are in block-reduction order: the layer mean / std agree with the CPU within
// rounding, not bit for bit (the CPU sums a plane sequentially, or, for a few large
// planes, split by rows over its thread team).
//
// Both paths end with om_layer_stats: one thread merges the planes' moments in plane
// order with lpl_om_merge_moments, as the CPU does (bit-identical given the same plane
// moments; planes are few).
#include "lpl_device.cuh"

#define kThreads LPL_OM_CUDA_THREADS

template <typename T> struct om_traits;
template <> struct om_traits<float> {
    typedef float V;  // the type the CPU compares and converts in
    static __device__ __forceinline__ int finite(float r) { return lpl_isfinite_f(r); }
    static __device__ __forceinline__ uint64_t key(float r) { return (uint64_t)lpl_float_sort_key(r); }
    static __device__ __forceinline__ float load(float r) { return r; }
};
template <> struct om_traits<double> {
    typedef double V;
    static __device__ __forceinline__ int finite(double r) { return lpl_isfinite_d(r); }
    static __device__ __forceinline__ uint64_t key(double r) { return lpl_double_sort_key(r); }
    static __device__ __forceinline__ double load(double r) { return r; }
};
template <> struct om_traits<lpl_f16> {
    typedef float V;
    static __device__ __forceinline__ int finite(lpl_f16 r) { return lpl_om_isfinite_f16(r.bits); }
    static __device__ __forceinline__ uint64_t key(lpl_f16 r) { return (uint64_t)lpl_om_key16(r.bits); }
    static __device__ __forceinline__ float load(lpl_f16 r) { return lpl_half_to_float(r.bits); }
};
template <> struct om_traits<lpl_bf16> {
    typedef float V;
    static __device__ __forceinline__ int finite(lpl_bf16 r) { return lpl_om_isfinite_bf16(r.bits); }
    static __device__ __forceinline__ uint64_t key(lpl_bf16 r) { return (uint64_t)lpl_om_key16(r.bits); }
    static __device__ __forceinline__ float load(lpl_bf16 r) { return lpl_bf16_to_float(r.bits); }
};

// plane_d slots (LPL_OM_PLANE_D doubles per plane)
enum { PD_COUNT = 0, PD_MEAN, PD_CONST, PD_STD, PD_LO, PD_HI, PD_PMEAN, PD_PM2, PD_KEPT };
// plane_u slots (LPL_OM_PLANE_U order keys per plane)
enum { PU_PREFIX1 = 0, PU_PREFIX2, PU_RANK1, PU_RANK2, PU_KMIN };

typedef lpl_om_args om_args;

// ---- block-wide helpers (blockDim.x == kThreads) ---------------------------------------------

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

// Exclusive prefix sum of v over the block's threads in thread order: a warp scan by
// shuffles, then the warps' totals (integers, so exact; a plane's counts fit 32 bits, as
// its histogram bins do). `shared` holds kThreads / 32 entries.
__device__ __forceinline__ unsigned block_exclusive_scan(unsigned v, unsigned *shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned inclusive = v;
    for (int off = 1; off < 32; off <<= 1) {
        const unsigned up = __shfl_up_sync(0xffffffffu, inclusive, off);
        if (lane >= off) inclusive += up;
    }
    if (lane == 31) shared[warp] = inclusive;
    __syncthreads();
    unsigned before = 0;
    for (int i = 0; i < warp; ++i) before += shared[i];
    __syncthreads();
    return before + inclusive - v;
}

// The bin holding the rank-th smallest key (1-based) of a histogram whose bins are
// dealt PER consecutive ones to each thread (c: this thread's counts): one block-wide
// scan instead of a serial walk. The thread owning it writes *digit and the rank inside
// the bin; *digit stays as it was when no bin holds the rank (no finite value).
template <int PER>
__device__ __forceinline__ void select_bin(const uint32_t (&c)[PER], uint64_t rank, unsigned *scan, int *digit,
                                           uint64_t *rank_in_bin) {
    unsigned mine = 0;
    for (int i = 0; i < PER; ++i) mine += c[i];
    uint64_t before = block_exclusive_scan(mine, scan);
    if (rank > before && rank <= before + mine) {
        int d = 0;
        while (rank > before + c[d]) before += c[d++];
        *digit = (int)threadIdx.x * PER + d;
        *rank_in_bin = rank - before;
    }
    __syncthreads();
}

// The key matches the prefix on every bit at and above bit `hi`.
__device__ __forceinline__ int prefix_matches(uint64_t key, uint64_t prefix, int hi) {
    return hi >= 64 ? 1 : ((key ^ prefix) >> hi) == 0;
}

// Thresholds of a plane from its order-statistic keys (lpl_math.h); NaN: nothing kept.
__device__ __forceinline__ void plane_thresholds(const om_args &a, double count, double std_d, uint64_t k1,
                                                 uint64_t k2, double *lo, double *hi) {
    if (count <= 0.0) {
        *lo = *hi = NAN;
        return;
    }
    lpl_om_thresholds(a.dtype, lpl_om_key_to_double(k1, a.dtype), lpl_om_key_to_double(k2, a.dtype), std_d,
                      a.margin_std, lo, hi);
}

// Moments of where(keep, y, 0) over the plane from the kept count and the kept values'
// sums of (v - k), (v - k)^2 (k = the finite mean): masked positions count as 0 - k.
__device__ __forceinline__ void store_plane_moments(const om_args &a, int64_t plane, double kept, double s1,
                                                    double s2, double k) {
    double *pd = a.ws.plane_d + plane * LPL_OM_PLANE_D;
    const double len = (double)a.len, zeros = len - kept;
    s1 -= zeros * k;
    s2 += zeros * k * k;
    const double m2 = s2 - s1 * s1 / len;
    lpl_st(pd, PD_PMEAN, k + s1 / len);
    lpl_st(pd, PD_PM2, m2 > 0.0 ? m2 : 0.0);
    lpl_st(pd, PD_KEPT, kept);
}

// ---- plane path: one block per plane, the plane in shared memory ---------------------------------

// Clipped 1-D max (is_or) or min filter along a row (step 1) or a column (step w) of a
// 0/1 byte image in shared memory, over the whole plane.
__device__ __forceinline__ void filter_pass(const uint8_t *src, uint8_t *dst, int len, int w, int h, int r,
                                            int along_rows, int is_or) {
    for (int i = threadIdx.x; i < len; i += kThreads) {
        const int row = i / w, col = i - row * w;
        const int pos = along_rows ? col : row, extent = along_rows ? w : h, step = along_rows ? 1 : w;
        const int lo = pos - r < 0 ? 0 : pos - r, hi = pos + r > extent - 1 ? extent - 1 : pos + r;
        const uint8_t *s = src + (i - pos * step);
        uint8_t out = is_or ? 0 : 1;
        for (int p = lo; p <= hi; ++p) out = is_or ? (uint8_t)(out | s[p * step]) : (uint8_t)(out & s[p * step]);
        dst[i] = out;
    }
    __syncthreads();
}

template <typename T>
__device__ __forceinline__ void plane_kernel(const om_args &a) {
    typedef om_traits<T> tr;
    typedef typename tr::V V;
    LPL_DYNAMIC_SHARED(uint64_t, dyn);  // vals (len T, 8-byte aligned), buf_a, buf_b (len bytes each)
    __shared__ uint32_t hist[2 * 256];
    __shared__ unsigned scan[kThreads / 32];
    __shared__ uint64_t prefix[2], rank[2];
    __shared__ int digit[2];
    __shared__ double plane_sh[4];  // count, mean, std, is_const
    __shared__ double bounds[2];    // lo, hi
    const int len = (int)a.len, w = (int)a.w, h = (int)a.h;
    const int64_t plane = blockIdx.x;
    T *vals = reinterpret_cast<T *>(dyn);
    uint8_t *buf_a = reinterpret_cast<uint8_t *>(dyn) + ((int64_t)len * (int64_t)sizeof(T) + 7) / 8 * 8;
    uint8_t *buf_b = buf_a + len;
    const T *yp = static_cast<const T *>(a.y) + plane * a.len;

    // the one read of the plane
    for (int i = threadIdx.x; i < len; i += kThreads) vals[i] = lpl_ld(yp, i);
    __syncthreads();

    // moments in the CPU's order (outlier_mask_cpu.c om_pass1 / om_pass2): one thread
    if (threadIdx.x == 0) {
        int64_t cnt = 0;
        double sum = 0.0;
        uint64_t kmin = UINT64_MAX, kmax = 0;
        for (int i = 0; i < len; ++i) {
            const T r = vals[i];
            if (!tr::finite(r)) continue;
            const uint64_t k = tr::key(r);
            sum += (double)tr::load(r);
            ++cnt;
            kmin = k < kmin ? k : kmin;
            kmax = k > kmax ? k : kmax;
        }
        const double count = (double)cnt;
        const int is_const = cnt > 0 && kmin == kmax;
        // a constant plane's mean is its value exactly
        const double mean = cnt > 0 ? (is_const ? lpl_om_key_to_double(kmin, a.dtype) : sum / count) : 0.0;
        double ss = 0.0, sd = 0.0;
        if (cnt > 0 && !is_const) {
            for (int i = 0; i < len; ++i) {
                const T r = vals[i];
                if (!tr::finite(r)) continue;
                const double d = (double)tr::load(r) - mean;
                ss += d * d;
                sd += d;
            }
        }
        plane_sh[0] = count;
        plane_sh[1] = mean;
        plane_sh[2] = cnt > 0 ? lpl_om_sample_std(count, ss, sd, is_const) : 0.0;
        plane_sh[3] = (double)is_const;
        prefix[0] = prefix[1] = 0;
        rank[0] = cnt > 0 ? (uint64_t)lpl_quantile_rank(cnt, a.quantile) : 1;
        rank[1] = cnt > 0 ? (uint64_t)lpl_quantile_rank(cnt, 1.0 - a.quantile) : 1;
    }
    __syncthreads();

    // order statistics: 8-bit MSD radix select of both ranks at once, on shared memory
    for (int shift = a.key_bits - 8; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 512; i += kThreads) hist[i] = 0;
        if (threadIdx.x == 0) digit[0] = digit[1] = -1;
        __syncthreads();
        const uint64_t p1 = prefix[0], p2 = prefix[1];
        for (int i = threadIdx.x; i < len; i += kThreads) {
            const T r = vals[i];
            if (!tr::finite(r)) continue;
            const uint64_t k = tr::key(r);
            const unsigned d = (unsigned)((k >> shift) & 255u);
            if (prefix_matches(k, p1, shift + 8)) atomicAdd(&hist[d], 1u);
            if (prefix_matches(k, p2, shift + 8)) atomicAdd(&hist[256 + d], 1u);
        }
        __syncthreads();
        for (int s = 0; s < 2; ++s) {
            const uint32_t c[1] = {hist[s * 256 + threadIdx.x]};
            select_bin<1>(c, rank[s], scan, &digit[s], &rank[s]);
        }
        if (threadIdx.x == 0)
            for (int s = 0; s < 2; ++s)
                if (digit[s] >= 0) prefix[s] |= (uint64_t)digit[s] << shift;
        __syncthreads();
    }
    if (threadIdx.x == 0) plane_thresholds(a, plane_sh[0], plane_sh[2], prefix[0], prefix[1], &bounds[0], &bounds[1]);
    __syncthreads();

    // keep0 = lo < y < hi (in the dtype's value type: exact, the thresholds are dtype
    // values; NaN and +-Inf never pass), closing, opening
    const V lo = (V)bounds[0], hi = (V)bounds[1];
    for (int i = threadIdx.x; i < len; i += kThreads) {
        const V v = tr::load(vals[i]);
        buf_a[i] = (uint8_t)((lo < v) & (v < hi));
    }
    __syncthreads();
    filter_pass(buf_a, buf_b, len, w, h, a.rc_x, 1, 1);
    filter_pass(buf_b, buf_a, len, w, h, a.rc_y, 0, 1);
    filter_pass(buf_a, buf_b, len, w, h, a.ro_x, 1, 0);
    // column min filter AND finite: the mask, written once
    uint8_t *kp = a.keep + plane * a.len;
    for (int i = threadIdx.x; i < len; i += kThreads) {
        const int row = i / w;
        const int lo_r = row - a.ro_y < 0 ? 0 : row - a.ro_y, hi_r = row + a.ro_y > h - 1 ? h - 1 : row + a.ro_y;
        uint8_t out = (uint8_t)tr::finite(vals[i]);
        for (int rr = lo_r; rr <= hi_r; ++rr) out &= buf_b[i + (rr - row) * w];
        buf_a[i] = out;
        lpl_st(kp, i, out);
    }
    if (a.stats == NULL) return;
    __syncthreads();
    // kept moments in the CPU's order (om_final_rows)
    if (threadIdx.x == 0) {
        const double k = plane_sh[1];
        int64_t kept = 0;
        double s1 = 0.0, s2 = 0.0;
        for (int i = 0; i < len; ++i) {
            if (!buf_a[i]) continue;
            const double d = (double)tr::load(vals[i]) - k;
            ++kept;
            s1 += d;
            s2 += d * d;
        }
        store_plane_moments(a, plane, (double)kept, s1, s2, k);
    }
}

// ---- streaming path -------------------------------------------------------------------------------

// One pass over the values of plane blockIdx.x / B (block j = blockIdx.x % B takes values
// j*T + t, stepping B*T: coalesced): pass 0 the finite moments, pass 1 the deviations;
// every pass the digit [shift, shift + digit_bits) histogram of the finite keys matching
// each selection's prefix (pass 0: one histogram, the prefixes are empty), added into
// the plane's global histograms.
template <typename T>
__device__ __forceinline__ void hist_kernel(const om_args &a) {
    typedef om_traits<T> tr;
    __shared__ uint32_t h[2 * LPL_OM_DIGIT_BINS];
    __shared__ double red[32];
    __shared__ uint64_t redu[kThreads];
    __shared__ uint64_t prefix_sh[2];
    __shared__ double mean_sh;
    const int64_t nb = a.blocks_per_plane, plane = blockIdx.x / nb, j = blockIdx.x % nb;
    const int selections = a.pass == 0 ? 1 : 2, bins = selections * LPL_OM_DIGIT_BINS;
    for (int i = threadIdx.x; i < bins; i += kThreads) h[i] = 0;
    if (threadIdx.x == 0) {
        prefix_sh[0] = lpl_ld(a.ws.plane_u, plane * LPL_OM_PLANE_U + PU_PREFIX1);
        prefix_sh[1] = lpl_ld(a.ws.plane_u, plane * LPL_OM_PLANE_U + PU_PREFIX2);
        mean_sh = a.pass == 1 ? lpl_ld(a.ws.plane_d, plane * LPL_OM_PLANE_D + PD_MEAN) : 0.0;
    }
    __syncthreads();
    const uint64_t p1 = prefix_sh[0], p2 = prefix_sh[1], digit_mask = ((uint64_t)1 << a.digit_bits) - 1;
    const int hi_bit = a.shift + a.digit_bits;
    const double mean = mean_sh;
    const T *yp = static_cast<const T *>(a.y) + plane * a.len;
    double s_a = 0.0, s_b = 0.0;  // pass 0: count, sum; pass 1: sum (v - mean)^2, sum (v - mean)
    uint64_t kmin = UINT64_MAX, kmax = 0;
    for (int64_t i = j * kThreads + threadIdx.x; i < a.len; i += nb * kThreads) {
        const T r = lpl_ld(yp, i);
        if (!tr::finite(r)) continue;
        const uint64_t k = tr::key(r);
        if (a.pass == 0) {
            s_a += 1.0;
            s_b += (double)tr::load(r);
            kmin = k < kmin ? k : kmin;
            kmax = k > kmax ? k : kmax;
        } else if (a.pass == 1) {
            const double d = (double)tr::load(r) - mean;
            s_a += d * d;
            s_b += d;
        }
        const unsigned d = (unsigned)((k >> a.shift) & digit_mask);
        if (prefix_matches(k, p1, hi_bit)) atomicAdd(&h[d], 1u);
        if (selections == 2 && prefix_matches(k, p2, hi_bit)) atomicAdd(&h[LPL_OM_DIGIT_BINS + d], 1u);
    }
    __syncthreads();
    uint32_t *g = a.ws.hist + plane * 2 * LPL_OM_DIGIT_BINS;
    for (int i = threadIdx.x; i < bins; i += kThreads)
        if (h[i]) atomicAdd(&g[i], h[i]);
    if (a.pass > 1) return;
    s_a = lpl_block_sum(s_a, red);
    __syncthreads();
    s_b = lpl_block_sum(s_b, red);
    const int64_t slot = plane * a.parts_per_plane + j;
    if (a.pass == 0) {
        kmin = block_min_u64(kmin, redu);
        kmax = block_max_u64(kmax, redu);
    }
    if (threadIdx.x == 0) {
        lpl_st(a.ws.part_d, slot * 4 + 2 * a.pass, s_a);
        lpl_st(a.ws.part_d, slot * 4 + 2 * a.pass + 1, s_b);
        if (a.pass == 0) {
            lpl_st(a.ws.part_u, slot * 2, kmin);
            lpl_st(a.ws.part_u, slot * 2 + 1, kmax);
        }
    }
}

// One block per plane. Pass -1: clear the histograms and the prefixes. Pass p >= 0: merge
// the pass's block partials in block order (pass 0: count, mean, ranks; pass 1: std),
// pick each selection's digit from the histograms, clear them for the next pass; after
// the last digit (shift 0) the thresholds.
extern "C" __global__ void __launch_bounds__(kThreads) lpl_om_select(const om_args a) {
    __shared__ unsigned scan[kThreads / 32];
    __shared__ uint64_t prefix[2], rank[2];
    __shared__ int digit[2];
    const int64_t plane = blockIdx.x;
    uint32_t *g = a.ws.hist + plane * 2 * LPL_OM_DIGIT_BINS;
    double *pd = a.ws.plane_d + plane * LPL_OM_PLANE_D;
    uint64_t *pu = a.ws.plane_u + plane * LPL_OM_PLANE_U;
    if (a.pass < 0) {
        for (int i = threadIdx.x; i < 2 * LPL_OM_DIGIT_BINS; i += kThreads) lpl_st(g, i, 0u);
        if (threadIdx.x == 0) {
            lpl_st(pu, PU_PREFIX1, 0);
            lpl_st(pu, PU_PREFIX2, 0);
        }
        return;
    }
    const int64_t nb = a.blocks_per_plane, base = plane * a.parts_per_plane;
    if (threadIdx.x == 0) {
        if (a.pass == 0) {
            double count = 0.0, sum = 0.0;
            uint64_t kmin = UINT64_MAX, kmax = 0;
            for (int64_t j = 0; j < nb; ++j) {
                count += lpl_ld(a.ws.part_d, (base + j) * 4);
                sum += lpl_ld(a.ws.part_d, (base + j) * 4 + 1);
                const uint64_t lo = lpl_ld(a.ws.part_u, (base + j) * 2), hi = lpl_ld(a.ws.part_u, (base + j) * 2 + 1);
                kmin = lo < kmin ? lo : kmin;
                kmax = hi > kmax ? hi : kmax;
            }
            const int is_const = count > 0.0 && kmin == kmax;
            const int64_t cnt = (int64_t)count;
            lpl_st(pd, PD_COUNT, count);
            lpl_st(pd, PD_MEAN, count > 0.0 ? (is_const ? lpl_om_key_to_double(kmin, a.dtype) : sum / count) : 0.0);
            lpl_st(pd, PD_CONST, (double)is_const);
            rank[0] = cnt > 0 ? (uint64_t)lpl_quantile_rank(cnt, a.quantile) : 1;
            rank[1] = cnt > 0 ? (uint64_t)lpl_quantile_rank(cnt, 1.0 - a.quantile) : 1;
            prefix[0] = prefix[1] = 0;
        } else {
            if (a.pass == 1) {
                double ss = 0.0, sd = 0.0;
                for (int64_t j = 0; j < nb; ++j) {
                    ss += lpl_ld(a.ws.part_d, (base + j) * 4 + 2);
                    sd += lpl_ld(a.ws.part_d, (base + j) * 4 + 3);
                }
                const double count = lpl_ld(pd, PD_COUNT);
                lpl_st(pd, PD_STD, count > 0.0 ? lpl_om_sample_std(count, ss, sd, lpl_ld(pd, PD_CONST) != 0.0) : 0.0);
            }
            rank[0] = lpl_ld(pu, PU_RANK1);
            rank[1] = lpl_ld(pu, PU_RANK2);
            prefix[0] = lpl_ld(pu, PU_PREFIX1);
            prefix[1] = lpl_ld(pu, PU_PREFIX2);
        }
        digit[0] = digit[1] = -1;
    }
    __syncthreads();
    const int per = LPL_OM_DIGIT_BINS / kThreads;
    for (int s = 0; s < 2; ++s) {
        const uint32_t *hs = g + (a.pass == 0 ? 0 : s * LPL_OM_DIGIT_BINS);
        uint32_t c[LPL_OM_DIGIT_BINS / kThreads];
        for (int i = 0; i < per; ++i) c[i] = lpl_ld(hs, (int64_t)threadIdx.x * per + i);
        select_bin<LPL_OM_DIGIT_BINS / kThreads>(c, rank[s], scan, &digit[s], &rank[s]);
    }
    // every thread has read its bins (select_bin ends with a barrier): clear them
    for (int i = threadIdx.x; i < (a.pass == 0 ? 1 : 2) * LPL_OM_DIGIT_BINS; i += kThreads) lpl_st(g, i, 0u);
    if (threadIdx.x != 0) return;
    for (int s = 0; s < 2; ++s)
        if (digit[s] >= 0) prefix[s] |= (uint64_t)digit[s] << a.shift;
    lpl_st(pu, PU_PREFIX1, prefix[0]);
    lpl_st(pu, PU_PREFIX2, prefix[1]);
    lpl_st(pu, PU_RANK1, rank[0]);
    lpl_st(pu, PU_RANK2, rank[1]);
    if (a.shift == 0) {
        double lo, hi;
        plane_thresholds(a, lpl_ld(pd, PD_COUNT), lpl_ld(pd, PD_STD), prefix[0], prefix[1], &lo, &hi);
        lpl_st(pd, PD_LO, lo);
        lpl_st(pd, PD_HI, hi);
    }
}

// One block per output tile of tile_h x tile_w pixels. Shared: the tile's
// raw values, and two byte images of the tile plus a halo of hx = rc_x + ro_x columns and
// hy = rc_y + ro_y rows each side. Outside the plane keep0 is 0 (neutral for the max
// filter) and the closed mask 1 (neutral for the min filter): windows clipped to the
// plane, the max-pool border rule. Bit 1 of img_a holds finite(y).
template <typename T>
__device__ __forceinline__ void filter_kernel(const om_args &a) {
    typedef om_traits<T> tr;
    typedef typename tr::V V;
    LPL_DYNAMIC_SHARED(uint64_t, dyn);
    __shared__ double red[32];
    __shared__ double plane_sh[3];  // lo, hi, mean
    const int64_t tiles = a.tiles_x * a.tiles_y, plane = blockIdx.x / tiles, tile = blockIdx.x % tiles;
    const int hx = a.rc_x + a.ro_x, hy = a.rc_y + a.ro_y;
    const int tw = a.tile_w, th = a.tile_h, rw = tw + 2 * hx, rh = th + 2 * hy, area = rw * rh;
    const int64_t x0 = (tile % a.tiles_x) * tw - hx, y0 = (tile / a.tiles_x) * th - hy;
    T *vals = reinterpret_cast<T *>(dyn);
    uint8_t *img_a = reinterpret_cast<uint8_t *>(dyn) + (int64_t)tw * th * (int64_t)sizeof(T);
    uint8_t *img_b = img_a + area;
    if (threadIdx.x == 0) {
        const double *pd = a.ws.plane_d + plane * LPL_OM_PLANE_D;
        plane_sh[0] = lpl_ld(pd, PD_LO);
        plane_sh[1] = lpl_ld(pd, PD_HI);
        plane_sh[2] = lpl_ld(pd, PD_MEAN);
    }
    __syncthreads();
    const V lo = (V)plane_sh[0], hi = (V)plane_sh[1];
    const T *yp = static_cast<const T *>(a.y) + plane * a.len;
    // keep0 and finite over tile + halo; the tile's values kept for the moments
    for (int i = threadIdx.x; i < area; i += kThreads) {
        const int ry = i / rw, rx = i - ry * rw;
        const int64_t gy = y0 + ry, gx = x0 + rx;
        uint8_t b = 0;
        if (gy >= 0 && gy < a.h && gx >= 0 && gx < a.w) {
            const T r = lpl_ld(yp, gy * a.w + gx);
            const V v = tr::load(r);
            b = (uint8_t)(((lo < v) & (v < hi)) | (tr::finite(r) << 1));
            if (ry >= hy && ry < hy + th && rx >= hx && rx < hx + tw) vals[(ry - hy) * tw + (rx - hx)] = r;
        }
        img_a[i] = b;
    }
    __syncthreads();
    // closing, row max: columns [rc_x, rw - rc_x)
    for (int i = threadIdx.x; i < area; i += kThreads) {
        const int rx = i % rw;
        uint8_t out = 0;
        if (rx >= a.rc_x && rx < rw - a.rc_x)
            for (int d = -a.rc_x; d <= a.rc_x; ++d) out |= img_a[i + d] & 1;
        img_b[i] = out;
    }
    __syncthreads();
    // closing, column max: rows [rc_y, rh - rc_y); 1 outside the plane
    for (int i = threadIdx.x; i < area; i += kThreads) {
        const int ry = i / rw, rx = i - ry * rw;
        if (ry < a.rc_y || ry >= rh - a.rc_y || rx < a.rc_x || rx >= rw - a.rc_x) continue;
        const int64_t gy = y0 + ry, gx = x0 + rx;
        uint8_t out = 0;
        for (int d = -a.rc_y; d <= a.rc_y; ++d) out |= img_b[i + d * rw];
        if (gy < 0 || gy >= a.h || gx < 0 || gx >= a.w) out = 1;
        img_a[i] = (uint8_t)((img_a[i] & 2) | out);
    }
    __syncthreads();
    // opening, row min: rows [rc_y, rh - rc_y), columns [hx, rw - hx)
    for (int i = threadIdx.x; i < area; i += kThreads) {
        const int ry = i / rw, rx = i - ry * rw;
        if (ry < a.rc_y || ry >= rh - a.rc_y || rx < hx || rx >= rw - hx) continue;
        uint8_t out = 1;
        for (int d = -a.ro_x; d <= a.ro_x; ++d) out &= img_a[i + d];
        img_b[i] = out;
    }
    __syncthreads();
    // opening, column min AND finite over the tile: the mask, written once; kept moments
    const double k = plane_sh[2];
    double kept = 0.0, s1 = 0.0, s2 = 0.0;
    uint8_t *kp = a.keep + plane * a.len;
    for (int t = threadIdx.x; t < tw * th; t += kThreads) {
        const int ty = t / tw, tx = t - ty * tw;
        const int64_t gy = y0 + hy + ty, gx = x0 + hx + tx;
        if (gy >= a.h || gx >= a.w) continue;
        const int i = (ty + hy) * rw + tx + hx;
        uint8_t out = (uint8_t)(img_a[i] >> 1);
        for (int d = -a.ro_y; d <= a.ro_y; ++d) out &= img_b[i + d * rw];
        lpl_st(kp, gy * a.w + gx, out);
        if (out) {
            const double dv = (double)tr::load(vals[t]) - k;
            kept += 1.0;
            s1 += dv;
            s2 += dv * dv;
        }
    }
    if (a.stats == NULL) return;
    kept = lpl_block_sum(kept, red);
    __syncthreads();
    s1 = lpl_block_sum(s1, red);
    __syncthreads();
    s2 = lpl_block_sum(s2, red);
    if (threadIdx.x == 0) {
        const int64_t slot = plane * a.parts_per_plane + tile;
        lpl_st(a.ws.part_d, slot * 4, kept);
        lpl_st(a.ws.part_d, slot * 4 + 1, s1);
        lpl_st(a.ws.part_d, slot * 4 + 2, s2);
    }
}

// One thread per plane: the plane's kept moments from its tiles, in tile order.
extern "C" __global__ void lpl_om_plane_merge(const om_args a) {
    const int64_t plane = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (plane >= a.planes) return;
    const int64_t tiles = a.tiles_x * a.tiles_y, base = plane * a.parts_per_plane;
    double kept = 0.0, s1 = 0.0, s2 = 0.0;
    for (int64_t t = 0; t < tiles; ++t) {
        kept += lpl_ld(a.ws.part_d, (base + t) * 4);
        s1 += lpl_ld(a.ws.part_d, (base + t) * 4 + 1);
        s2 += lpl_ld(a.ws.part_d, (base + t) * 4 + 2);
    }
    store_plane_moments(a, plane, kept, s1, s2, lpl_ld(a.ws.plane_d, plane * LPL_OM_PLANE_D + PD_MEAN));
}

// Single thread: planes merged in plane order (as the CPU does).
extern "C" __global__ void lpl_om_layer_stats(const om_args a) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double n = 0.0, mean = 0.0, m2 = 0.0, kept = 0.0;
    for (int64_t pl = 0; pl < a.planes && a.len > 0; ++pl) {
        const double *pd = a.ws.plane_d + pl * LPL_OM_PLANE_D;
        lpl_om_merge_moments(&n, &mean, &m2, (double)a.len, lpl_ld(pd, PD_PMEAN), lpl_ld(pd, PD_PM2));
        kept += lpl_ld(pd, PD_KEPT);
    }
    double out[3];
    lpl_om_finish_stats(n, mean, m2, kept, out);
    for (int i = 0; i < 3; ++i) lpl_st(a.stats, i, out[i]);
}

#define LPL_OM_ENTRY_POINTS(sfx, T)                                                                               \
    extern "C" __global__ void __launch_bounds__(kThreads) lpl_om_plane_##sfx(const om_args a) { plane_kernel<T>(a); } \
    extern "C" __global__ void __launch_bounds__(kThreads) lpl_om_hist_##sfx(const om_args a) { hist_kernel<T>(a); }   \
    extern "C" __global__ void __launch_bounds__(kThreads) lpl_om_filter_##sfx(const om_args a) { filter_kernel<T>(a); }
LPL_FOR_EACH_DTYPE(LPL_OM_ENTRY_POINTS)
#undef LPL_OM_ENTRY_POINTS
