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
// summed by all threads in the one reduction order of lpl_kernel_abi.h (tiles of 32 x 64,
// 256 lanes = the block's threads, fixed trees: the CPU's order, so the plane's mean, std
// and kept moments are bit-identical to outlier_mask_cpu.c's), the two order statistics by an
// 8-bit MSD radix select (block histogram + block-wide scan per digit), thresholds,
// keep0 -> closing (row, column max) -> opening (row, column min) -> AND finite, the
// mask written ONCE, and the plane's kept moments (3 doubles) for the layer statistics.
// Global traffic: the values once, the mask once, 24 bytes per plane.
//
// Streaming path, for larger planes (B blocks per plane, each on every B-th reduction
// tile; per-tile partials combined in the fixed tree, so results do not depend on the
// block count or order and are the CPU's bits):
//   om_select pass -1   clears the plane's digit histograms
//   om_hist   pass 0    per tile finite count, sum; per block min/max key; histogram of
//                       the top 11 key bits
//   om_select pass 0    count, mean (tile tree), ranks k1, k2; picks each rank's digit
//                       (block scan)
//   om_hist   pass 1    per tile sum (v - mean)^2, sum (v - mean); histograms of the next
//                       digit among the keys matching each selected prefix
//   om_select pass 1..  std; digits; after the last digit the thresholds lo, hi
//   om_hist / om_select further digits (11 bits each: float32 3 passes over y in all,
//                       16-bit 2, float64 6). Candidate gather (LPL_OM_CAND_DIVISOR):
//                       once a select finds both selected bins holding at most 1/32 of
//                       the plane's values and two or more digits left, the next om_hist
//                       pass also copies the keys in those bins into two per-plane lists
//                       (a block scan per step, one counter reservation per list), and
//                       every later digit is counted by om_select from the lists in
//                       shared memory (om_hist returns at once; no global histogram to
//                       clear or read): spread-out float32 reads y twice here, float64
//                       twice instead of 6 times; piled-up values (bins over 1/32) keep
//                       the passes over y. Same keys selected either way.
//   om_filter           2-D tiles with a halo of r_close + r_open: threshold, closing,
//                       opening, AND finite in shared memory, the mask written once;
//                       kept moments per 32 x 64 reduction tile (a filter tile holds 1 or 4)
//   om_plane_merge      one block per plane: kept moments from the tiles (tile tree)
//
// Both paths end with om_layer_stats: one block merges the planes' moments with
// lpl_om_merge_moments in the fixed plane tree, as the CPU does: the layer mean, std and
// ratio are bit-identical to the CPU's on both paths.
#include "lpl_device.cuh"

#define kThreads LPL_OM_CUDA_THREADS
static_assert(LPL_OM_LANES == kThreads && (LPL_OM_TILE_W * LPL_OM_TILE_H) % kThreads == 0 && LPL_OM_TILE_W >= 32,
              "the reduction order's lanes are the block's threads, whole warps per tile row");

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
// plane_u slots (LPL_OM_PLANE_U order keys per plane): the selections' prefixes and ranks,
// the streaming path's candidate mode (OM_MODE_*) and its two list lengths
enum { PU_PREFIX1 = 0, PU_PREFIX2, PU_RANK1, PU_RANK2, PU_KMIN, PU_MODE, PU_NCAND1, PU_NCAND2 };
// Streaming digit passes (LPL_OM_CAND_DIVISOR): over the plane; over the plane, copying the
// keys that match each selection's prefix into its list (the candidates); over the lists.
enum { OM_MODE_PLANE = 0, OM_MODE_GATHER = 1, OM_MODE_LISTS = 2 };

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

// Step 3 of the reduction order (lpl_kernel_abi.h): the lane tree of N sums, lane =
// threadIdx.x; results valid in thread 0. Strides 128, 64, 32 in shared memory, then 16 .. 1
// inside warp 0 by shuffles (the same tree: lane i < s adds lane i + s). Ends with a
// barrier, so `sh` (N * kThreads doubles) can be reused at once.
template <int N>
__device__ __forceinline__ void lane_tree(double (&v)[N], double *sh) {
    for (int c = 0; c < N; ++c) sh[c * kThreads + threadIdx.x] = v[c];
    __syncthreads();
    for (int s = kThreads / 2; s >= 32; s >>= 1) {
        if (threadIdx.x < (unsigned)s)
            for (int c = 0; c < N; ++c) sh[c * kThreads + threadIdx.x] += sh[c * kThreads + threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x < 32)
        for (int c = 0; c < N; ++c) {
            double x = sh[c * kThreads + threadIdx.x];
            for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
            v[c] = x;
        }
    __syncthreads();
}

// Step 4: the tile tree over n items of 4 doubles (components [C0, C0 + NC)), in place,
// run by the block (a barrier per level); the results are left in a[C0 ..]. Global
// memory (through lpl_ld / lpl_st) or shared memory.
template <int C0, int NC, bool GLOBAL>
__device__ __forceinline__ void tile_tree(double *a, int64_t n) {
    for (int64_t s = lpl_om_tree_top(n); s > 0; s >>= 1) {
        for (int64_t i = threadIdx.x; i < s && i + s < n; i += kThreads)
            for (int c = C0; c < C0 + NC; ++c) {
                if (GLOBAL)
                    lpl_st(a, 4 * i + c, lpl_ld(a, 4 * i + c) + lpl_ld(a, 4 * (i + s) + c));
                else
                    a[4 * i + c] += a[4 * (i + s) + c];
            }
        __syncthreads();
    }
}

// The tile tree of one plane's partials in global memory (items of 4 doubles at g,
// components [C0, C0 + NC)): staged in shared memory `sh` (4 doubles per tile: each
// partial read once) when not NULL, else in place in g. The NC results are returned in
// out (valid in thread 0).
template <int C0, int NC>
__device__ __forceinline__ void plane_tile_tree(double *g, int64_t n, double *sh, double (&out)[NC]) {
    if (sh) {
        for (int64_t i = threadIdx.x; i < n; i += kThreads)
            for (int c = 0; c < NC; ++c) sh[4 * i + c] = lpl_ld(g, 4 * i + C0 + c);
        __syncthreads();
        tile_tree<0, NC, false>(sh, n);
        for (int c = 0; c < NC; ++c) out[c] = sh[c];
    } else {
        tile_tree<C0, NC, true>(g, n);
        if (threadIdx.x == 0)
            for (int c = 0; c < NC; ++c) out[c] = lpl_ld(g, C0 + c);
    }
}

// Reduction tiles (32 x 64) of a plane along its rows, and in all.
__device__ __forceinline__ int64_t red_tiles_x(const om_args &a) { return (a.w + LPL_OM_TILE_W - 1) / LPL_OM_TILE_W; }
__device__ __forceinline__ int64_t red_tiles(const om_args &a) {
    return red_tiles_x(a) * ((a.h + LPL_OM_TILE_H - 1) / LPL_OM_TILE_H);
}
// Positions of a reduction tile each thread (lane) visits, in its order: t = lane + k * 256.
#define OM_TILE_STEPS (LPL_OM_TILE_W * LPL_OM_TILE_H / kThreads)

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
// scan instead of a serial walk. The thread owning it writes *digit, the rank inside
// the bin and the bin's count; *digit stays as it was when no bin holds the rank (no
// finite value).
template <int PER>
__device__ __forceinline__ void select_bin(const uint32_t (&c)[PER], uint64_t rank, unsigned *scan, int *digit,
                                           uint64_t *rank_in_bin, uint32_t *bin_count) {
    unsigned mine = 0;
    for (int i = 0; i < PER; ++i) mine += c[i];
    uint64_t before = block_exclusive_scan(mine, scan);
    if (rank > before && rank <= before + mine) {
        int d = 0;
        while (rank > before + c[d]) before += c[d++];
        *digit = (int)threadIdx.x * PER + d;
        *rank_in_bin = rank - before;
        *bin_count = c[d];
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
// sums of (v - k), (v - k)^2 (k = the finite mean): masked positions count as 0 - k. Into
// the workspace for the layer statistics (a.stats) and into the caller's plane_moments
// (lpl_kernel_abi.h's LPL_PM_* row), the same bits as outlier_mask_cpu.c's.
__device__ __forceinline__ void store_plane_moments(const om_args &a, int64_t plane, double kept, double s1,
                                                    double s2, double k) {
    double *pd = a.ws.plane_d + plane * LPL_OM_PLANE_D;
    const double len = (double)a.len, zeros = len - kept;
    s1 -= zeros * k;
    s2 += zeros * k * k;
    const double m2 = s2 - s1 * s1 / len, mean = k + s1 / len, m2_clamped = m2 > 0.0 ? m2 : 0.0;
    if (a.stats) {
        lpl_st(pd, PD_PMEAN, mean);
        lpl_st(pd, PD_PM2, m2_clamped);
        lpl_st(pd, PD_KEPT, kept);
    }
    if (a.plane_moments) {
        double *row = a.plane_moments + plane * LPL_PM_COMPONENTS;
        lpl_st(row, LPL_PM_MEAN, mean);
        lpl_st(row, LPL_PM_M2, m2_clamped);
        lpl_st(row, LPL_PM_KEPT, kept);
    }
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
    __shared__ uint32_t bin_count[2];
    __shared__ double plane_sh[4];  // count, mean, std, is_const
    __shared__ double bounds[2];    // lo, hi
    __shared__ double red[3 * kThreads];
    __shared__ uint64_t redu[kThreads];
    const int len = (int)a.len, w = (int)a.w, h = (int)a.h;
    const int64_t plane = blockIdx.x;
    const int tiles_x = (int)red_tiles_x(a), tiles = (int)red_tiles(a);
    // dynamic shared: vals (len T, 8-byte aligned), per-tile partials (tiles * 4 doubles),
    // buf_a, buf_b (len bytes each): outlier_mask_cuda.c plane_path_smem
    T *vals = reinterpret_cast<T *>(dyn);
    double *tp = reinterpret_cast<double *>(dyn) + ((int64_t)len * (int64_t)sizeof(T) + 7) / 8;
    uint8_t *buf_a = reinterpret_cast<uint8_t *>(tp + 4 * (int64_t)tiles);
    uint8_t *buf_b = buf_a + len;
    const T *yp = static_cast<const T *>(a.y) + plane * a.len;

    // the one read of the plane
    for (int i = threadIdx.x; i < len; i += kThreads) vals[i] = lpl_ld(yp, i);
    __syncthreads();

    // moments in the reduction order of lpl_kernel_abi.h (the CPU's): per tile, lane =
    // thread; then the tile tree
    uint64_t kmin = UINT64_MAX, kmax = 0;
    for (int tile = 0; tile < tiles; ++tile) {
        const int gy0 = tile / tiles_x * LPL_OM_TILE_H, gx0 = tile % tiles_x * LPL_OM_TILE_W;
        double v[2] = {0.0, 0.0};  // count, sum
        for (int k = 0; k < OM_TILE_STEPS; ++k) {
            const int t = threadIdx.x + k * kThreads, gy = gy0 + t / LPL_OM_TILE_W, gx = gx0 + t % LPL_OM_TILE_W;
            if (gy >= h || gx >= w) continue;
            const T r = vals[gy * w + gx];
            if (!tr::finite(r)) continue;
            const uint64_t key = tr::key(r);
            v[0] += 1.0;
            v[1] += (double)tr::load(r);
            kmin = key < kmin ? key : kmin;
            kmax = key > kmax ? key : kmax;
        }
        lane_tree<2>(v, red);
        if (threadIdx.x == 0) {
            tp[4 * tile] = v[0];
            tp[4 * tile + 1] = v[1];
        }
    }
    kmin = block_min_u64(kmin, redu);  // (its barriers publish tp)
    kmax = block_max_u64(kmax, redu);
    tile_tree<0, 2, false>(tp, tiles);
    if (threadIdx.x == 0) {
        const double count = tp[0], sum = tp[1];
        const int64_t cnt = (int64_t)count;
        const int is_const = cnt > 0 && kmin == kmax;
        // a constant plane's mean is its value exactly
        plane_sh[0] = count;
        plane_sh[1] = cnt > 0 ? (is_const ? lpl_om_key_to_double(kmin, a.dtype) : sum / count) : 0.0;
        plane_sh[3] = (double)is_const;
        prefix[0] = prefix[1] = 0;
        rank[0] = cnt > 0 ? (uint64_t)lpl_quantile_rank(cnt, a.quantile) : 1;
        rank[1] = cnt > 0 ? (uint64_t)lpl_quantile_rank(cnt, 1.0 - a.quantile) : 1;
    }
    __syncthreads();
    const double count = plane_sh[0], mean = plane_sh[1];
    const int is_const = plane_sh[3] != 0.0;
    if (count > 0.0 && !is_const) {  // (uniform over the block)
        for (int tile = 0; tile < tiles; ++tile) {
            const int gy0 = tile / tiles_x * LPL_OM_TILE_H, gx0 = tile % tiles_x * LPL_OM_TILE_W;
            double v[2] = {0.0, 0.0};  // sum (v - mean)^2, sum (v - mean)
            for (int k = 0; k < OM_TILE_STEPS; ++k) {
                const int t = threadIdx.x + k * kThreads, gy = gy0 + t / LPL_OM_TILE_W, gx = gx0 + t % LPL_OM_TILE_W;
                if (gy >= h || gx >= w) continue;
                const T r = vals[gy * w + gx];
                if (!tr::finite(r)) continue;
                const double d = (double)tr::load(r) - mean;
                v[0] += d * d;
                v[1] += d;
            }
            lane_tree<2>(v, red);
            if (threadIdx.x == 0) {
                tp[4 * tile + 2] = v[0];
                tp[4 * tile + 3] = v[1];
            }
        }
        __syncthreads();
        tile_tree<2, 2, false>(tp, tiles);
    }
    if (threadIdx.x == 0)
        plane_sh[2] = count > 0.0 ? lpl_om_sample_std(count, is_const ? 0.0 : tp[2], is_const ? 0.0 : tp[3], is_const)
                                  : 0.0;
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
            select_bin<1>(c, rank[s], scan, &digit[s], &rank[s], &bin_count[s]);
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
    if (a.stats == NULL && a.plane_moments == NULL) return;  // (uniform)
    __syncthreads();
    // kept moments in the reduction order (the CPU's om_final_bands)
    const double k = plane_sh[1];
    for (int tile = 0; tile < tiles; ++tile) {
        const int gy0 = tile / tiles_x * LPL_OM_TILE_H, gx0 = tile % tiles_x * LPL_OM_TILE_W;
        double v[3] = {0.0, 0.0, 0.0};  // kept, sum (v - k), sum (v - k)^2
        for (int kk = 0; kk < OM_TILE_STEPS; ++kk) {
            const int t = threadIdx.x + kk * kThreads, gy = gy0 + t / LPL_OM_TILE_W, gx = gx0 + t % LPL_OM_TILE_W;
            if (gy >= h || gx >= w || !buf_a[gy * w + gx]) continue;
            const double d = (double)tr::load(vals[gy * w + gx]) - k;
            v[0] += 1.0;
            v[1] += d;
            v[2] += d * d;
        }
        lane_tree<3>(v, red);
        if (threadIdx.x == 0)
            for (int c = 0; c < 3; ++c) tp[4 * tile + c] = v[c];
    }
    __syncthreads();
    tile_tree<0, 3, false>(tp, tiles);
    if (threadIdx.x == 0) store_plane_moments(a, plane, tp[0], tp[1], tp[2], k);
}

// ---- streaming path -------------------------------------------------------------------------------

// Appends the keys of this block step whose flags are set (bit 0: selection 0's list, bit
// 16: selection 1's) to the plane's candidate lists: one block-wide scan of the packed
// flags, one counter reservation per list and step. Called by every thread of the block.
// The lists' order depends on the blocks' order; the histograms built from them do not.
__device__ __forceinline__ void append_candidates(const om_args &a, int64_t plane, uint64_t key, unsigned flags,
                                                  unsigned *scan, unsigned long long *base_sh) {
    const unsigned before = block_exclusive_scan(flags, scan);
    if (threadIdx.x == kThreads - 1) {  // the step's totals: reserve each list's slots once
        const unsigned total = before + flags;
        unsigned long long *count = (unsigned long long *)(a.ws.plane_u + plane * LPL_OM_PLANE_U + PU_NCAND1);
        base_sh[0] = (total & 0xffffu) ? atomicAdd(count, (unsigned long long)(total & 0xffffu)) : 0ull;
        base_sh[1] = (total >> 16) ? atomicAdd(count + 1, (unsigned long long)(total >> 16)) : 0ull;
    }
    __syncthreads();
    uint64_t *lists = a.ws.cand + plane * 2 * a.cand_cap;
    // the select only asks for a gather when each list's keys fit (its bin count <= cap)
    if (flags & 1u) lpl_st(lists, (int64_t)(base_sh[0] + (before & 0xffffu)), key);
    if (flags >> 16) lpl_st(lists + a.cand_cap, (int64_t)(base_sh[1] + (before >> 16)), key);
    __syncthreads();  // base_sh is rewritten by the next step
}

// The digit histograms of the plane's candidate lists (OM_MODE_LISTS, passes >= 2), in
// shared memory h (2 * LPL_OM_DIGIT_BINS, zeroed): histogram s counts list s's keys that
// match selection s's prefix. Run by the select's block: the lists are small, so no
// digit pass over the plane and no global histogram.
__device__ __forceinline__ void hist_from_lists(const om_args &a, int64_t plane, const uint64_t (&prefix)[2],
                                                const uint64_t (&lengths)[2], uint32_t *h) {
    const uint64_t digit_mask = ((uint64_t)1 << a.digit_bits) - 1;
    const int hi_bit = a.shift + a.digit_bits;
    for (int s = 0; s < 2; ++s) {
        const uint64_t *list = a.ws.cand + (plane * 2 + s) * a.cand_cap, p = prefix[s];
        for (int64_t i = threadIdx.x; i < (int64_t)lengths[s]; i += kThreads) {
            const uint64_t key = lpl_ld(list, i);
            if (prefix_matches(key, p, hi_bit))
                atomicAdd(&h[s * LPL_OM_DIGIT_BINS + (unsigned)((key >> a.shift) & digit_mask)], 1u);
        }
    }
    __syncthreads();
}

// One pass over the values of plane blockIdx.x / B: block j = blockIdx.x % B takes the
// reduction tiles j, j + B, ... (lane = thread: coalesced rows of 64 values). Pass 0 each
// tile's finite count and sum, pass 1 its deviations (into part_d, reduction order of
// lpl_kernel_abi.h); pass 0 also the block's min / max key (part_u); every pass the digit
// [shift, shift + digit_bits) histogram of the finite keys matching each selection's
// prefix (pass 0: one histogram, the prefixes are empty), added into the plane's global
// histograms. In OM_MODE_GATHER the pass also copies those keys into the candidate lists;
// in OM_MODE_LISTS there is nothing to do (the select histograms the lists).
template <typename T>
__device__ __forceinline__ void hist_kernel(const om_args &a) {
    typedef om_traits<T> tr;
    __shared__ uint32_t h[2 * LPL_OM_DIGIT_BINS];
    __shared__ double red[2 * kThreads];
    __shared__ uint64_t redu[kThreads];
    __shared__ uint64_t prefix_sh[2];
    __shared__ double mean_sh;
    __shared__ int mode_sh;
    __shared__ unsigned scan[kThreads / 32];
    __shared__ unsigned long long cand_base[2];
    const int64_t nb = a.blocks_per_plane, plane = blockIdx.x / nb, j = blockIdx.x % nb;
    const int selections = a.pass == 0 ? 1 : 2, bins = selections * LPL_OM_DIGIT_BINS;
    for (int i = threadIdx.x; i < bins; i += kThreads) h[i] = 0;
    if (threadIdx.x == 0) {
        const uint64_t *pu = a.ws.plane_u + plane * LPL_OM_PLANE_U;
        prefix_sh[0] = lpl_ld(pu, PU_PREFIX1);
        prefix_sh[1] = lpl_ld(pu, PU_PREFIX2);
        mode_sh = (int)lpl_ld(pu, PU_MODE);
        mean_sh = a.pass == 1 ? lpl_ld(a.ws.plane_d, plane * LPL_OM_PLANE_D + PD_MEAN) : 0.0;
    }
    __syncthreads();
    const int mode = mode_sh;
    if (mode == OM_MODE_LISTS) return;  // (uniform over the block)
    const uint64_t p1 = prefix_sh[0], p2 = prefix_sh[1], digit_mask = ((uint64_t)1 << a.digit_bits) - 1;
    const int hi_bit = a.shift + a.digit_bits;
    const double mean = mean_sh;
    const int64_t base = plane * a.parts_per_plane;
    uint64_t kmin = UINT64_MAX, kmax = 0;
    {
        const T *yp = static_cast<const T *>(a.y) + plane * a.len;
        const int64_t tiles_x = red_tiles_x(a), tiles = red_tiles(a);
        for (int64_t tile = j; tile < tiles; tile += nb) {
            const int64_t gy0 = tile / tiles_x * LPL_OM_TILE_H, gx0 = tile % tiles_x * LPL_OM_TILE_W;
            double v[2] = {0.0, 0.0};  // pass 0: count, sum; pass 1: sum (v - mean)^2, sum (v - mean)
            for (int k = 0; k < OM_TILE_STEPS; ++k) {
                const int t = threadIdx.x + k * kThreads;
                const int64_t gy = gy0 + t / LPL_OM_TILE_W, gx = gx0 + t % LPL_OM_TILE_W;
                const T r = gy < a.h && gx < a.w ? lpl_ld(yp, gy * a.w + gx) : T();
                const bool finite = gy < a.h && gx < a.w && tr::finite(r);
                const uint64_t key = finite ? tr::key(r) : 0;
                const bool m1 = finite && prefix_matches(key, p1, hi_bit);
                const bool m2 = finite && selections == 2 && prefix_matches(key, p2, hi_bit);
                if (finite) {
                    if (a.pass == 0) {
                        v[0] += 1.0;
                        v[1] += (double)tr::load(r);
                        kmin = key < kmin ? key : kmin;
                        kmax = key > kmax ? key : kmax;
                    } else if (a.pass == 1) {
                        const double d = (double)tr::load(r) - mean;
                        v[0] += d * d;
                        v[1] += d;
                    }
                    const unsigned d = (unsigned)((key >> a.shift) & digit_mask);
                    if (m1) atomicAdd(&h[d], 1u);
                    if (m2) atomicAdd(&h[LPL_OM_DIGIT_BINS + d], 1u);
                }
                if (mode == OM_MODE_GATHER)  // (uniform over the block)
                    append_candidates(a, plane, key, (unsigned)m1 | ((unsigned)m2 << 16), scan, cand_base);
            }
            if (a.pass <= 1) {  // (uniform over the block)
                lane_tree<2>(v, red);
                if (threadIdx.x == 0) {
                    lpl_st(a.ws.part_d, (base + tile) * 4 + 2 * a.pass, v[0]);
                    lpl_st(a.ws.part_d, (base + tile) * 4 + 2 * a.pass + 1, v[1]);
                }
            }
        }
    }
    __syncthreads();
    uint32_t *g = a.ws.hist + plane * 2 * LPL_OM_DIGIT_BINS;
    for (int i = threadIdx.x; i < bins; i += kThreads)
        if (h[i]) atomicAdd(&g[i], h[i]);
    if (a.pass != 0) return;
    kmin = block_min_u64(kmin, redu);
    kmax = block_max_u64(kmax, redu);
    if (threadIdx.x == 0) {
        lpl_st(a.ws.part_u, (base + j) * 2, kmin);
        lpl_st(a.ws.part_u, (base + j) * 2 + 1, kmax);
    }
}

// One block per plane. Pass -1: clear the histograms, the prefixes and the candidate mode.
// Pass p >= 0: merge the pass's block partials in block order (pass 0: count, mean, ranks;
// pass 1: std), pick each selection's digit from the histograms, clear them for the next
// pass, set the next pass's candidate mode; after the last digit (shift 0) the thresholds.
extern "C" __global__ void __launch_bounds__(kThreads) lpl_om_select(const om_args a) {
    LPL_DYNAMIC_SHARED(double, staged);  // a.tiles_in_shared: the tile partials (tile tree)
    __shared__ unsigned scan[kThreads / 32];
    __shared__ uint64_t prefix[2], rank[2];
    __shared__ int digit[2];
    __shared__ uint32_t bin_count[2];
    __shared__ uint64_t mode_sh[2], lengths[2];  // this pass's and the next pass's mode; the lists' lengths
    __shared__ uint32_t list_hist[2 * LPL_OM_DIGIT_BINS];  // OM_MODE_LISTS
    const int64_t plane = blockIdx.x;
    uint32_t *g = a.ws.hist + plane * 2 * LPL_OM_DIGIT_BINS;
    double *pd = a.ws.plane_d + plane * LPL_OM_PLANE_D;
    uint64_t *pu = a.ws.plane_u + plane * LPL_OM_PLANE_U;
    if (a.pass < 0) {
        for (int i = threadIdx.x; i < 2 * LPL_OM_DIGIT_BINS; i += kThreads) lpl_st(g, i, 0u);
        if (threadIdx.x == 0) {
            lpl_st(pu, PU_PREFIX1, 0);
            lpl_st(pu, PU_PREFIX2, 0);
            lpl_st(pu, PU_MODE, (uint64_t)OM_MODE_PLANE);
        }
        return;
    }
    const int64_t nb = a.blocks_per_plane, base = plane * a.parts_per_plane, tiles = red_tiles(a);
    // the tiles' partials of pass 0 (count, sum) or 1 (deviations) in the tile tree
    double tree[2] = {0.0, 0.0};
    if (a.pass == 0)
        plane_tile_tree<0, 2>(a.ws.part_d + base * 4, tiles, a.tiles_in_shared ? staged : NULL, tree);
    else if (a.pass == 1)
        plane_tile_tree<2, 2>(a.ws.part_d + base * 4, tiles, a.tiles_in_shared ? staged : NULL, tree);
    if (threadIdx.x == 0) {
        if (a.pass == 0) {
            const double count = tree[0], sum = tree[1];
            uint64_t kmin = UINT64_MAX, kmax = 0;
            for (int64_t j = 0; j < nb; ++j) {  // exact in any order
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
                const double ss = tree[0], sd = tree[1];
                const double count = lpl_ld(pd, PD_COUNT);
                lpl_st(pd, PD_STD, count > 0.0 ? lpl_om_sample_std(count, ss, sd, lpl_ld(pd, PD_CONST) != 0.0) : 0.0);
            }
            rank[0] = lpl_ld(pu, PU_RANK1);
            rank[1] = lpl_ld(pu, PU_RANK2);
            prefix[0] = lpl_ld(pu, PU_PREFIX1);
            prefix[1] = lpl_ld(pu, PU_PREFIX2);
        }
        digit[0] = digit[1] = -1;
        mode_sh[0] = lpl_ld(pu, PU_MODE);
        if (mode_sh[0] == OM_MODE_LISTS) {
            lengths[0] = lpl_ld(pu, PU_NCAND1);
            lengths[1] = lpl_ld(pu, PU_NCAND2);
        }
    }
    __syncthreads();
    const uint64_t mode = mode_sh[0];
    if (mode == OM_MODE_LISTS) {  // (uniform over the block)
        for (int i = threadIdx.x; i < 2 * LPL_OM_DIGIT_BINS; i += kThreads) list_hist[i] = 0;
        __syncthreads();
        hist_from_lists(a, plane, prefix, lengths, list_hist);
    }
    const int per = LPL_OM_DIGIT_BINS / kThreads;
    for (int s = 0; s < 2; ++s) {
        const int64_t at = (a.pass == 0 ? 0 : s * LPL_OM_DIGIT_BINS) + (int64_t)threadIdx.x * per;
        uint32_t c[LPL_OM_DIGIT_BINS / kThreads];
        for (int i = 0; i < per; ++i) c[i] = mode == OM_MODE_LISTS ? list_hist[at + i] : lpl_ld(g, at + i);
        select_bin<LPL_OM_DIGIT_BINS / kThreads>(c, rank[s], scan, &digit[s], &rank[s], &bin_count[s]);
    }
    if (threadIdx.x == 0) {
        // the next pass's candidate mode: once gathered, the lists; else gather when the
        // two selected bins fit the lists and at least one pass follows the next one
        uint64_t next = mode == OM_MODE_PLANE ? (uint64_t)OM_MODE_PLANE : (uint64_t)OM_MODE_LISTS;
        if (mode == OM_MODE_PLANE && a.shift > LPL_OM_DIGIT_BITS && digit[0] >= 0 && digit[1] >= 0 &&
            (int64_t)bin_count[0] <= a.cand_cap && (int64_t)bin_count[1] <= a.cand_cap)
            next = OM_MODE_GATHER;
        mode_sh[1] = next;
    }
    __syncthreads();
    // every thread has read its bins (select_bin ends with a barrier): clear them for the
    // next pass, unless it reads the lists (then no global histogram is used again; the
    // next call's pass -1 clears them)
    if (mode != OM_MODE_LISTS && mode_sh[1] != OM_MODE_LISTS)
        for (int i = threadIdx.x; i < (a.pass == 0 ? 1 : 2) * LPL_OM_DIGIT_BINS; i += kThreads) lpl_st(g, i, 0u);
    if (threadIdx.x != 0) return;
    for (int s = 0; s < 2; ++s)
        if (digit[s] >= 0) prefix[s] |= (uint64_t)digit[s] << a.shift;
    lpl_st(pu, PU_PREFIX1, prefix[0]);
    lpl_st(pu, PU_PREFIX2, prefix[1]);
    lpl_st(pu, PU_RANK1, rank[0]);
    lpl_st(pu, PU_RANK2, rank[1]);
    if (mode_sh[1] == OM_MODE_GATHER) {
        lpl_st(pu, PU_NCAND1, 0);
        lpl_st(pu, PU_NCAND2, 0);
    }
    lpl_st(pu, PU_MODE, mode_sh[1]);
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
    __shared__ double red[3 * kThreads];
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
    // per 32 x 64 reduction tile of the tile (reduction order of lpl_kernel_abi.h: lane =
    // thread, then the lane tree; om_plane_merge runs the tile tree)
    const double k = plane_sh[2];
    uint8_t *kp = a.keep + plane * a.len;
    const int64_t rtx = red_tiles_x(a), base = plane * a.parts_per_plane;
    for (int sy = 0; sy < th / LPL_OM_TILE_H; ++sy)
        for (int sx = 0; sx < tw / LPL_OM_TILE_W; ++sx) {
            const int64_t gy0 = y0 + hy + sy * LPL_OM_TILE_H, gx0 = x0 + hx + sx * LPL_OM_TILE_W;
            if (gy0 >= a.h || gx0 >= a.w) continue;  // (uniform: a sub-tile past the plane's edge)
            double v[3] = {0.0, 0.0, 0.0};          // kept, sum (v - k), sum (v - k)^2
            for (int kk = 0; kk < OM_TILE_STEPS; ++kk) {
                const int t = threadIdx.x + kk * kThreads;
                const int ty = sy * LPL_OM_TILE_H + t / LPL_OM_TILE_W, tx = sx * LPL_OM_TILE_W + t % LPL_OM_TILE_W;
                const int64_t gy = y0 + hy + ty, gx = x0 + hx + tx;
                if (gy >= a.h || gx >= a.w) continue;
                const int i = (ty + hy) * rw + tx + hx;
                uint8_t out = (uint8_t)(img_a[i] >> 1);
                for (int d = -a.ro_y; d <= a.ro_y; ++d) out &= img_b[i + d * rw];
                lpl_st(kp, gy * a.w + gx, out);
                if (out) {
                    const double dv = (double)tr::load(vals[ty * tw + tx]) - k;
                    v[0] += 1.0;
                    v[1] += dv;
                    v[2] += dv * dv;
                }
            }
            if (a.stats == NULL && a.plane_moments == NULL) continue;  // (uniform)
            lane_tree<3>(v, red);
            if (threadIdx.x == 0) {
                const int64_t rtile = gy0 / LPL_OM_TILE_H * rtx + gx0 / LPL_OM_TILE_W;
                for (int c = 0; c < 3; ++c) lpl_st(a.ws.part_d, (base + rtile) * 4 + c, v[c]);
            }
        }
}

// One block per plane: the plane's kept moments from its reduction tiles (tile tree).
extern "C" __global__ void __launch_bounds__(kThreads) lpl_om_plane_merge(const om_args a) {
    LPL_DYNAMIC_SHARED(double, staged);  // a.tiles_in_shared: the tile partials (tile tree)
    const int64_t plane = blockIdx.x, base = plane * a.parts_per_plane;
    double tree[3];
    plane_tile_tree<0, 3>(a.ws.part_d + base * 4, red_tiles(a), a.tiles_in_shared ? staged : NULL, tree);
    if (threadIdx.x != 0) return;
    store_plane_moments(a, plane, tree[0], tree[1], tree[2], lpl_ld(a.ws.plane_d, plane * LPL_OM_PLANE_D + PD_MEAN));
}

// One block: the planes' moments merged in the fixed plane tree (step 5 of the reduction
// order, as the CPU), a barrier per level: in dynamic shared memory (3 doubles per plane,
// each plane's moments read once) when a.layer_in_shared, else in place in plane_d.
extern "C" __global__ void __launch_bounds__(kThreads) lpl_om_layer_stats(const om_args a) {
    LPL_DYNAMIC_SHARED(double, staged);
    if (blockIdx.x != 0) return;
    const int64_t n = a.len > 0 ? a.planes : 0;
    const double len = (double)a.len;
    const bool sh = a.layer_in_shared != 0;
    if (sh) {
        for (int64_t i = threadIdx.x; i < n; i += kThreads) {
            const double *pd = a.ws.plane_d + i * LPL_OM_PLANE_D;
            staged[3 * i] = lpl_ld(pd, PD_PMEAN);
            staged[3 * i + 1] = lpl_ld(pd, PD_PM2);
            staged[3 * i + 2] = lpl_ld(pd, PD_KEPT);
        }
        __syncthreads();
    }
    for (int64_t s = lpl_om_tree_top(n); s > 0; s >>= 1) {
        for (int64_t i = threadIdx.x; i < s && i + s < n; i += kThreads) {
            if (sh) {
                lpl_om_tree_merge_planes(len, n, i, s, staged + 3 * i, staged + 3 * (i + s));
                continue;
            }
            double *pa = a.ws.plane_d + i * LPL_OM_PLANE_D;
            const double *pb = a.ws.plane_d + (i + s) * LPL_OM_PLANE_D;
            double va[3] = {lpl_ld(pa, PD_PMEAN), lpl_ld(pa, PD_PM2), lpl_ld(pa, PD_KEPT)};
            const double vb[3] = {lpl_ld(pb, PD_PMEAN), lpl_ld(pb, PD_PM2), lpl_ld(pb, PD_KEPT)};
            lpl_om_tree_merge_planes(len, n, i, s, va, vb);
            lpl_st(pa, PD_PMEAN, va[0]);
            lpl_st(pa, PD_PM2, va[1]);
            lpl_st(pa, PD_KEPT, va[2]);
        }
        __syncthreads();
    }
    if (threadIdx.x != 0) return;
    double out[3];
    if (n > 0 && sh)
        lpl_om_finish_stats(len * (double)n, staged[0], staged[1], staged[2], out);
    else if (n > 0)
        lpl_om_finish_stats(len * (double)n, lpl_ld(a.ws.plane_d, PD_PMEAN), lpl_ld(a.ws.plane_d, PD_PM2),
                            lpl_ld(a.ws.plane_d, PD_KEPT), out);
    else
        lpl_om_finish_stats(0.0, 0.0, 0.0, 0.0, out);
    for (int i = 0; i < 3; ++i) lpl_st(a.stats, i, out[i]);
}

#define LPL_OM_ENTRY_POINTS(sfx, T)                                                                               \
    extern "C" __global__ void __launch_bounds__(kThreads) lpl_om_plane_##sfx(const om_args a) { plane_kernel<T>(a); } \
    extern "C" __global__ void __launch_bounds__(kThreads) lpl_om_hist_##sfx(const om_args a) { hist_kernel<T>(a); }   \
    extern "C" __global__ void __launch_bounds__(kThreads) lpl_om_filter_##sfx(const om_args a) { filter_kernel<T>(a); }
LPL_FOR_EACH_DTYPE(LPL_OM_ENTRY_POINTS)
#undef LPL_OM_ENTRY_POINTS
