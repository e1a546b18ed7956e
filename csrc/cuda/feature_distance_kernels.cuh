// CUDA kernels of the fused feature distance (docs/spec.md, "Feature distance"), v2: the
// GPU twin of feature_distance_cpu.c, same per-element math (lpl_math.h, in the CPU's
// order), same outputs. Every kernel takes one lpl_fd_args (lpl_kernel_abi.h) by value;
// the launch sequence lives in csrc/feature_distance_cuda.c:
//   1. fd_stats (with a mask, or norm="batch", unless the outlier mask's plane moments
//      are given: they hold its results already): per statistics block (at most
//      LPL_FD_STATS_PARTS per plane) the kept count and, for `batch`, the mean and M2 of
//      y*keep, each chunk of LPL_FD_STATS_CHUNK values held in registers for its two
//      passes (y and the mask are read once here); with a gradient it also packs the
//      mask into bits, stored in grad's own storage (lpl_fd_args.keep_bits), so that the
//      main kernel reads 1/8 byte per value instead of the mask byte again;
//   2. fd_setup: per plane coef = lpl_plane_coef(w, C, kept) (partials added in block
//      order: exact integer sums), per channel (`batch`) the partial moments merged in a
//      fixed order with Chan's formula, stored as mean and scale = 1 / (std + eps) (from
//      the plane moments when given: the CPU's order, bit-identical statistics);
//   3. fd_main: a block is a tile of P pixels of one sample x all C channels (P pixel
//      lanes x 256 / P channel groups); it loads the sample's plane coefficients (and
//      batch scale / shift) into shared memory once, then per tile:
//        (its packed keep bits first, into shared memory, before any gradient of the
//        tile overwrites them)
//        none / batch: one unrolled pass, x, y and the keep flags read once;
//        shared: y and the mask staged in shared memory, 1 / (||y|| + eps) per pixel
//          from them, then x read once;
//        default: x, y and the mask staged, the per-pixel norms and sum_c g_c x_c from
//          shared memory, then the gradient;
//        (per-pixel sums over channels in lpl_math.h's chunk-tree order, the CPU's: up to
//        8 thread groups sum a pixel's chunks at once, group 0 finishes the tree)
//      when the staged tile cannot fit the device's shared memory (very large C) the
//      same code reads global memory instead (P = the block, one channel group);
//      each block writes one partial sum_{its elements} coef * e;
//   4. fd_finalize: loss[n] = the sample's block partials added in block order.
// No floating atomics: loss and gradient are bit-identical run to run in any block
// order. y is loaded unconditionally and then selected by the mask (never multiplied:
// a NaN under the mask must not leak), as the CPU selects.
#include "lpl_device.cuh"

#define FD_UNROLL 4  // channels whose loads are in flight together per thread

// ---- conversions of values already in shared memory (no global traffic) ------------
__device__ __forceinline__ float fd_to_acc(float v) { return v; }
__device__ __forceinline__ double fd_to_acc(double v) { return v; }
__device__ __forceinline__ float fd_to_acc(lpl_f16 v) { return lpl_half_to_float(v.bits); }
__device__ __forceinline__ float fd_to_acc(lpl_bf16 v) { return lpl_bf16_to_float(v.bits); }

// v where the element is kept, else +0 (a select, not a product).
template <typename acc> __device__ __forceinline__ acc fd_keep_select(acc v, bool keep) { return keep ? v : (acc)0; }

// Values of statistics chunk `chunk` of plane `plane`, thread's j-th slot.
__device__ __forceinline__ int64_t fd_chunk_index(int64_t chunk, int j) {
    return chunk * LPL_FD_STATS_CHUNK + (int64_t)j * blockDim.x + threadIdx.x;
}

// Number of values of plane positions [0, hw) in the chunks part, part + parts, ...
__device__ __forceinline__ int64_t fd_part_len(int64_t hw, int64_t part, int64_t parts) {
    int64_t len = 0;
    for (int64_t ch = part; ch * LPL_FD_STATS_CHUNK < hw; ch += parts) {
        const int64_t rest = hw - ch * LPL_FD_STATS_CHUNK;
        len += rest < LPL_FD_STATS_CHUNK ? rest : LPL_FD_STATS_CHUNK;
    }
    return len;
}

// ---- 1. statistics pass -------------------------------------------------------------
#define FD_STATS_ITEMS (LPL_FD_STATS_CHUNK / LPL_FD_THREADS)

// Writes the chunk's keep flags as bytes of 8 bits (a.keep_bits): through shared memory,
// one thread per byte. Chunks start at multiples of 8 values, so bytes never straddle.
__device__ __forceinline__ void fd_pack_keep_bits(const lpl_fd_args &a, uint8_t *kept_sh,
                                                  const uint8_t (&m)[FD_STATS_ITEMS], int64_t off, int64_t ch) {
    for (int j = 0; j < FD_STATS_ITEMS; ++j) kept_sh[j * blockDim.x + threadIdx.x] = m[j] != 0;
    __syncthreads();
    for (int64_t g = threadIdx.x; g < LPL_FD_STATS_CHUNK / 8; g += blockDim.x) {
        const int64_t i = ch * LPL_FD_STATS_CHUNK + 8 * g;
        if (i >= a.hw) break;
        unsigned bits = 0;
        for (int b = 0; b < 8; ++b) bits |= (unsigned)kept_sh[8 * g + b] << b;
        lpl_st(a.keep_bits, (off + i) * a.keep_bits_stride, (uint8_t)bits);
    }
    __syncthreads();  // kept_sh is rewritten by the next chunk
}

// Block (plane, part). blockDim.x * FD_STATS_ITEMS == LPL_FD_STATS_CHUNK.
template <typename T> __device__ __forceinline__ void fd_stats(const lpl_fd_args a) {
    typedef typename lpl_io<T>::acc acc;
    __shared__ double red[32];
    __shared__ double chunk_mean;
    __shared__ uint8_t kept_sh[LPL_FD_STATS_CHUNK];  // the chunk's keep flags, for its packed bits
    const T *y = (const T *)a.y;
    const int batch = a.norm == LPL_NORM_BATCH;
    const int64_t plane = blockIdx.x / a.stats_parts, part = blockIdx.x % a.stats_parts;
    const int64_t off = plane * a.hw;
    double kept = 0.0, count = 0.0, mean = 0.0, m2 = 0.0;  // merged moments: thread 0's
    for (int64_t ch = part; ch * LPL_FD_STATS_CHUNK < a.hw; ch += a.stats_parts) {
        // all loads of the chunk first, then the arithmetic
        uint8_t m[FD_STATS_ITEMS];
        acc v[FD_STATS_ITEMS];
        for (int j = 0; j < FD_STATS_ITEMS; ++j) {
            const int64_t i = fd_chunk_index(ch, j);
            m[j] = i < a.hw ? (a.mask ? lpl_ld(a.mask, off + i) : (uint8_t)1) : (uint8_t)0;
            v[j] = (batch && i < a.hw) ? lpl_io<T>::load(y, off + i) : (acc)0;
        }
        double k = 0.0, s = 0.0;
        for (int j = 0; j < FD_STATS_ITEMS; ++j) {
            k += m[j] != 0;
            v[j] = fd_keep_select(v[j], m[j] != 0);
            s += (double)v[j];
        }
        if (a.keep_bits) fd_pack_keep_bits(a, kept_sh, m, off, ch);
        k = lpl_block_sum(k, red);
        if (threadIdx.x == 0) kept += k;
        if (!batch) continue;
        const int64_t rest = a.hw - ch * LPL_FD_STATS_CHUNK;
        const double len = (double)(rest < LPL_FD_STATS_CHUNK ? rest : LPL_FD_STATS_CHUNK);
        s = lpl_block_sum(s, red);
        if (threadIdx.x == 0) chunk_mean = s / len;
        __syncthreads();
        const double mb = chunk_mean;
        double q = 0.0;
        for (int j = 0; j < FD_STATS_ITEMS; ++j) {
            const double dv = (double)v[j] - mb;
            if (fd_chunk_index(ch, j) < a.hw) q += dv * dv;
        }
        q = lpl_block_sum(q, red);
        if (threadIdx.x == 0) lpl_om_merge_moments(&count, &mean, &m2, len, mb, q);
    }
    if (threadIdx.x == 0) {
        if (a.mask) lpl_st(a.part_kept, blockIdx.x, kept);
        if (batch) {
            lpl_st(a.part_mean, blockIdx.x, mean);
            lpl_st(a.part_m2, blockIdx.x, m2);
        }
    }
}

// ---- 2. per-plane coefficients and per-channel batch statistics ---------------------
// Thread t < N*C (masked): plane t's coefficient; thread t < C (batch): channel t.
// With a.plane_moments (the outlier mask's, lpl_kernel_abi.h's LPL_PM_* rows) both come
// from them instead of fd_stats's partials: the kept count as is, the channel statistics
// merged over n = 0 .. N-1 in order, the CPU's lpl_batch_stats_from_planes (same bits).
extern "C" __global__ void lpl_fd_setup(const lpl_fd_args a) {
    const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t planes = a.n * a.c, parts = a.stats_parts;
    const double *pm = a.plane_moments;
    if (a.mask && t < planes) {
        double kept = 0.0;  // integer counts: exact in any order
        if (pm)
            kept = lpl_ld(pm, t * LPL_PM_COMPONENTS + LPL_PM_KEPT);
        else
            for (int64_t j = 0; j < parts; ++j) kept += lpl_ld(a.part_kept, t * parts + j);
        lpl_st(a.coef, t, lpl_plane_coef(a.weight, a.c, kept));
    }
    if (a.norm == LPL_NORM_BATCH && t < a.c && pm) {
        double count = 0.0, mean = 0.0, m2 = 0.0;
        for (int64_t n = 0; n < a.n; ++n) {
            const int64_t row = (n * a.c + t) * LPL_PM_COMPONENTS;
            lpl_om_merge_moments(&count, &mean, &m2, (double)a.hw, lpl_ld(pm, row + LPL_PM_MEAN),
                                 lpl_ld(pm, row + LPL_PM_M2));
        }
        lpl_st(a.chan_mean, t, mean);
        lpl_st(a.chan_scale, t, 1.0 / (lpl_unbiased_std(count, m2) + LPL_EPS_BATCH));
    } else if (a.norm == LPL_NORM_BATCH && t < a.c) {
        double count = 0.0, mean = 0.0, m2 = 0.0;
        for (int64_t n = 0; n < a.n; ++n)
            for (int64_t j = 0; j < parts; ++j) {
                const int64_t b = (n * a.c + t) * parts + j;
                lpl_om_merge_moments(&count, &mean, &m2, (double)fd_part_len(a.hw, j, parts), lpl_ld(a.part_mean, b),
                                     lpl_ld(a.part_m2, b));
            }
        const double std = count > 1.0 ? sqrt(m2 / (count - 1.0)) : (double)NAN;
        lpl_st(a.chan_mean, t, mean);
        lpl_st(a.chan_scale, t, 1.0 / (std + LPL_EPS_BATCH));
    }
}

// ---- 3. main kernel, in named steps -------------------------------------------------

// Per-channel parameters of one sample, from shared memory when the launcher put them
// there, else from the workspace.
struct fd_chan_params {
    const double *coef_sh, *coef_g;  // masked: per plane; else uniform
    double coef_uniform;
    double grad_scale;  // the sample's factor folded into the gradient (a.grad_scale[n], else 1)
    const void *scale_sh, *shift_sh;  // batch, acc-typed
    const double *scale_g, *shift_g;
};

__device__ __forceinline__ double fd_coef(const fd_chan_params &cp, int64_t c) {
    if (cp.coef_sh) return cp.coef_sh[c];
    if (cp.coef_g) return lpl_ld(cp.coef_g, c);
    return cp.coef_uniform;
}

// The gradient's plane coefficient: coef times the sample's folded factor, the product in
// double as the CPU's grad_coef (times 1 exactly when nothing is folded).
__device__ __forceinline__ double fd_grad_coef(const fd_chan_params &cp, int64_t c) {
    return fd_coef(cp, c) * cp.grad_scale;
}

template <typename acc> __device__ __forceinline__ acc fd_chan_scale(const fd_chan_params &cp, int64_t c) {
    return cp.scale_sh ? ((const acc *)cp.scale_sh)[c] : (acc)lpl_ld(cp.scale_g, c);
}
template <typename acc> __device__ __forceinline__ acc fd_chan_shift(const fd_chan_params &cp, int64_t c) {
    return cp.shift_sh ? ((const acc *)cp.shift_sh)[c] : (acc)lpl_ld(cp.shift_g, c);
}

// Loads the sample's per-channel parameters into shared memory (once per block).
template <typename acc>
__device__ __forceinline__ fd_chan_params fd_load_params(const lpl_fd_args &a, unsigned char *smem, int64_t n) {
    fd_chan_params cp;
    cp.coef_uniform = lpl_plane_coef(a.weight, a.c, (double)a.hw);
    cp.coef_g = a.mask ? a.coef + n * a.c : nullptr;
    cp.coef_sh = nullptr;
    cp.scale_g = a.chan_scale;
    cp.shift_g = a.chan_mean;
    cp.scale_sh = cp.shift_sh = nullptr;
    __shared__ double grad_scale_sh;  // one global read per block
    if (threadIdx.x == 0) grad_scale_sh = a.grad_scale ? lpl_ld(a.grad_scale, n) : 1.0;
    if (a.mask && a.sh_coef >= 0) {
        double *sh = (double *)(smem + a.sh_coef);
        for (int64_t c = threadIdx.x; c < a.c; c += blockDim.x) sh[c] = lpl_ld(cp.coef_g, c);
        cp.coef_sh = sh;
    }
    if (a.norm == LPL_NORM_BATCH && a.sh_scale >= 0) {
        acc *scale = (acc *)(smem + a.sh_scale), *shift = (acc *)(smem + a.sh_shift);
        for (int64_t c = threadIdx.x; c < a.c; c += blockDim.x) {
            scale[c] = (acc)lpl_ld(a.chan_scale, c);
            shift[c] = (acc)lpl_ld(a.chan_mean, c);
        }
        cp.scale_sh = scale;
        cp.shift_sh = shift;
    }
    __syncthreads();
    cp.grad_scale = grad_scale_sh;
    return cp;
}

// One tile's element addresses: pixel lane `lane` of the tile at global pixel `pix`.
struct fd_tile {
    int64_t base;  // index of (n, channel 0, pix)
    int64_t P, G, lane, grp;
    bool active;   // pix < hw
};

// Copies the tile's rows of x (default), y and the mask into shared memory, loads first.
template <typename T>
__device__ __forceinline__ void fd_stage_tile(const lpl_fd_args &a, const fd_tile &t, T *sx, T *sy, uint8_t *sm) {
    const T *x = (const T *)a.x, *y = (const T *)a.y;
    for (int64_t c0 = t.grp; c0 < a.c; c0 += FD_UNROLL * t.G) {
        T xv[FD_UNROLL], yv[FD_UNROLL];
        uint8_t mv[FD_UNROLL];
        for (int u = 0; u < FD_UNROLL; ++u) {
            const int64_t c = c0 + u * t.G, i = t.base + c * a.hw;
            if (c < a.c && t.active) {
                if (sx) xv[u] = lpl_ld(x, i);
                yv[u] = lpl_ld(y, i);
                if (sm) mv[u] = lpl_ld(a.mask, i);
            }
        }
        for (int u = 0; u < FD_UNROLL; ++u) {
            const int64_t c = c0 + u * t.G, s = c * t.P + t.lane;
            if (c < a.c && t.active) {
                if (sx) sx[s] = xv[u];
                sy[s] = yv[u];
                if (sm) sm[s] = mv[u];
            }
        }
    }
}

// Element c of the tile's pixel, from the staged copy when there is one.
template <typename T>
__device__ __forceinline__ typename lpl_io<T>::acc fd_value(const T *staged, const T *g, const fd_tile &t, int64_t c,
                                                            int64_t hw) {
    return staged ? fd_to_acc(staged[c * t.P + t.lane]) : lpl_io<T>::load(g, t.base + c * hw);
}
// Where the tile's keep flags come from: its packed bits in shared memory, the staged
// mask bytes, or global memory (no mask: all kept).
struct fd_mask_src {
    const uint8_t *bits;    // C rows of row_bytes bytes, or NULL
    int64_t row_bytes;
    const uint8_t *staged;  // C rows of P bytes, or NULL
    const uint8_t *global;  // the mask, or NULL
};
__device__ __forceinline__ bool fd_kept(const fd_mask_src &ms, const fd_tile &t, int64_t c, int64_t hw) {
    if (!ms.global) return true;
    if (ms.bits) return (ms.bits[c * ms.row_bytes + t.lane / 8] >> (t.lane % 8)) & 1u;
    return (ms.staged ? ms.staged[c * t.P + t.lane] : lpl_ld(ms.global, t.base + c * hw)) != 0;
}

// Copies the tile's packed keep bits into shared memory; the caller syncs before any
// gradient of the tile is written (it overwrites them).
__device__ __forceinline__ void fd_load_keep_bits(const lpl_fd_args &a, uint8_t *bits, int64_t row_bytes, int64_t n,
                                                  int64_t p0) {
    for (int64_t idx = threadIdx.x; idx < a.c * row_bytes; idx += blockDim.x) {
        const int64_t c = idx / row_bytes, p = p0 + 8 * (idx % row_bytes);
        if (p < a.hw) bits[idx] = lpl_ld(a.keep_bits, ((n * a.c + c) * a.hw + p) * a.keep_bits_stride);
    }
}

// d = normalized x - normalized y of one element, and the factor `scale` the gradient of
// the distance is multiplied by (as the CPU's fd_row: (x - b) s - (y - b) s).
template <typename acc>
__device__ __forceinline__ acc fd_difference(acc xv, acc yv, int norm, acc inv_y, acc shift, acc chan_scale,
                                             acc *scale) {
    *scale = 1;
    if (norm == LPL_NORM_SHARED) {
        *scale = inv_y;
        return xv * inv_y - yv * inv_y;
    }
    if (norm == LPL_NORM_BATCH) {
        *scale = chan_scale;
        return (xv - shift) * chan_scale - (yv - shift) * chan_scale;
    }
    return xv - yv;
}

// none / batch / shared: e and the gradient of every element of the tile, the thread's
// channels c = grp, grp + G, ... with FD_UNROLL loads in flight; y and the mask from
// the staged copy when given. Returns the thread's sum of coef * e.
template <typename T>
__device__ __forceinline__ double fd_tile_elementwise(const lpl_fd_args &a, const fd_chan_params &cp,
                                                      const fd_tile &t, const T *sy, const fd_mask_src &ms,
                                                      typename lpl_io<T>::acc inv_y) {
    typedef typename lpl_io<T>::acc acc;
    const T *x = (const T *)a.x, *y = (const T *)a.y;
    T *grad = (T *)a.grad;
    double total = 0.0;
    if (!t.active) return total;
    for (int64_t c0 = t.grp; c0 < a.c; c0 += FD_UNROLL * t.G) {
        acc xv[FD_UNROLL], yv[FD_UNROLL];
        bool keep[FD_UNROLL];
        for (int u = 0; u < FD_UNROLL; ++u) {
            const int64_t c = c0 + u * t.G;
            if (c < a.c) {
                xv[u] = lpl_io<T>::load(x, t.base + c * a.hw);
                yv[u] = fd_value<T>(sy, y, t, c, a.hw);
                keep[u] = fd_kept(ms, t, c, a.hw);
            }
        }
        for (int u = 0; u < FD_UNROLL; ++u) {
            const int64_t c = c0 + u * t.G;
            if (c >= a.c) break;
            const double coef = fd_coef(cp, c);
            const acc k = keep[u] ? (acc)1 : (acc)0;
            const acc ys = fd_keep_select(yv[u], keep[u]);
            acc shift = 0, cs = 1, scale;
            if (a.norm == LPL_NORM_BATCH) {
                shift = fd_chan_shift<acc>(cp, c);
                cs = fd_chan_scale<acc>(cp, c);
            }
            const acc d = fd_difference<acc>(xv[u], ys, a.norm, inv_y, shift, cs, &scale);
            const acc e = k * lpl_dist_value(d, a.dist);
            total += coef * (double)e;
            if (grad)
                lpl_io<T>::store(grad, t.base + c * a.hw,
                                 (acc)fd_grad_coef(cp, c) * k * lpl_dist_deriv(d, a.dist) * scale);
        }
    }
    return total;
}

// Per-pixel scalars of `default` / `shared` kept in shared memory between the steps, and
// the channel groups' partial sums they are made from (at most 8 groups x P pixels, and
// 8 * P <= the block when there are 8 groups: `part` is a static 2 x LPL_FD_THREADS array).
template <typename acc> struct fd_pixel_scalars {
    acc *inv_x, *norm_x, *inv_y, *q;
    acc *part;  // slot (group * P + lane): first half x / dot, second half y
};

// Thread groups that sum a pixel's channel chunks (lpl_math.h's order): the largest power
// of two <= min(G, LPL_PIXEL_CHUNKS); group g owns the contiguous chunks
// [g * per, (g + 1) * per), per = LPL_PIXEL_CHUNKS / groups: a subtree of the fixed tree.
__device__ __forceinline__ int64_t fd_pixel_groups(const fd_tile &t) {
    int64_t g = 1;
    while (2 * g <= t.G && 2 * g <= LPL_PIXEL_CHUNKS) g *= 2;
    return g;
}

// v[0] = the pairwise tree over v[0..n) (n a power of two <= LPL_PIXEL_CHUNKS), the order
// of lpl_math.h: ((v0 + v1) + (v2 + v3)) + ... Constant indices: v stays in registers.
template <typename acc> __device__ __forceinline__ void fd_tree_sum(acc (&v)[LPL_PIXEL_CHUNKS], int64_t n) {
LPL_UNROLL
    for (int w = 1; w < LPL_PIXEL_CHUNKS; w *= 2)
LPL_UNROLL
        for (int i = 0; i + w < LPL_PIXEL_CHUNKS; i += 2 * w)
            if (w < n) v[i] = v[i] + v[i + w];
}

// shared / default, groups < fd_pixel_groups: the thread's subtree of the pixel's sum of
// y_kept^2 (and, `default`, of x^2) into ps.part. Other threads return at once.
template <typename T>
__device__ __forceinline__ void fd_pixel_norm_parts(const lpl_fd_args &a, const fd_tile &t, const T *sx, const T *sy,
                                                    const fd_mask_src &ms,
                                                    fd_pixel_scalars<typename lpl_io<T>::acc> ps) {
    typedef typename lpl_io<T>::acc acc;
    const int64_t groups = fd_pixel_groups(t), per = LPL_PIXEL_CHUNKS / groups;
    if (!t.active || t.grp >= groups) return;
    const bool def = a.norm == LPL_NORM_DEFAULT;
    acc sumx[LPL_PIXEL_CHUNKS], sumy[LPL_PIXEL_CHUNKS];
LPL_UNROLL
    for (int j = 0; j < LPL_PIXEL_CHUNKS; ++j) {
        sumx[j] = sumy[j] = 0;
        if (j >= per) continue;
        const int64_t k = t.grp * per + j;
        for (int64_t c = lpl_pixel_chunk_begin(k, a.c); c < lpl_pixel_chunk_begin(k + 1, a.c); ++c) {
            const acc ys = fd_keep_select(fd_value<T>(sy, (const T *)a.y, t, c, a.hw), fd_kept(ms, t, c, a.hw));
            if (def) {
                const acc xv = fd_value<T>(sx, (const T *)a.x, t, c, a.hw);
                sumx[j] += xv * xv;
            }
            sumy[j] += ys * ys;
        }
    }
    fd_tree_sum<acc>(sumx, per);
    fd_tree_sum<acc>(sumy, per);
    const int64_t slot = t.grp * t.P + t.lane;
    ps.part[slot] = sumx[0];
    ps.part[LPL_FD_THREADS + slot] = sumy[0];
}

// Group 0, after a barrier: the groups' subtrees combined by the rest of the tree, then
// 1 / (||y|| + eps), and for `default` 1 / (||x|| + eps) and ||x||.
template <typename acc>
__device__ __forceinline__ void fd_pixel_norms(const lpl_fd_args &a, const fd_tile &t, fd_pixel_scalars<acc> ps) {
    const bool def = a.norm == LPL_NORM_DEFAULT;
    const int64_t groups = fd_pixel_groups(t);
    acc sumx[LPL_PIXEL_CHUNKS], sumy[LPL_PIXEL_CHUNKS];
LPL_UNROLL
    for (int g = 0; g < LPL_PIXEL_CHUNKS; ++g) {
        sumx[g] = g < groups ? ps.part[g * t.P + t.lane] : (acc)0;
        sumy[g] = g < groups ? ps.part[LPL_FD_THREADS + g * t.P + t.lane] : (acc)0;
    }
    fd_tree_sum<acc>(sumx, groups);
    fd_tree_sum<acc>(sumy, groups);
    const double eps = def ? LPL_EPS_DEFAULT : LPL_EPS_SHARED;
    if (def) {
        ps.norm_x[t.lane] = (acc)sqrt((double)sumx[0]);
        ps.inv_x[t.lane] = lpl_inv_norm(sumx[0], eps);
    }
    ps.inv_y[t.lane] = lpl_inv_norm(sumy[0], eps);
}

// default, every channel group: e of the thread's channels c = grp, grp + G, ... (the
// loss; any order), and, in groups < fd_pixel_groups, the subtree of the pixel's
// sum_c g_c x_c over the group's chunks into ps.part. Returns the thread's sum of coef * e.
template <typename T>
__device__ __forceinline__ double fd_default_dot_part(const lpl_fd_args &a, const fd_chan_params &cp,
                                                      const fd_tile &t, const T *sx, const T *sy,
                                                      const fd_mask_src &ms,
                                                      fd_pixel_scalars<typename lpl_io<T>::acc> ps) {
    typedef typename lpl_io<T>::acc acc;
    const int64_t groups = fd_pixel_groups(t), per = LPL_PIXEL_CHUNKS / groups;
    double total = 0.0;
    if (!t.active || t.grp >= groups) return total;
    const acc rx = ps.inv_x[t.lane], ry = ps.inv_y[t.lane];
    acc dot[LPL_PIXEL_CHUNKS];
LPL_UNROLL
    for (int j = 0; j < LPL_PIXEL_CHUNKS; ++j) {
        dot[j] = 0;
        if (j >= per) continue;
        const int64_t k = t.grp * per + j;
        for (int64_t c = lpl_pixel_chunk_begin(k, a.c); c < lpl_pixel_chunk_begin(k + 1, a.c); ++c) {
            const acc xv = fd_value<T>(sx, (const T *)a.x, t, c, a.hw);
            const acc yv = fd_value<T>(sy, (const T *)a.y, t, c, a.hw);
            const bool keep = fd_kept(ms, t, c, a.hw);
            const acc k1 = keep ? (acc)1 : (acc)0;
            const acc d = xv * rx - fd_keep_select(yv, keep) * ry;
            total += fd_coef(cp, c) * (double)(k1 * lpl_dist_value(d, a.dist));
            dot[j] += (acc)fd_grad_coef(cp, c) * k1 * lpl_dist_deriv(d, a.dist) * xv;
        }
    }
    fd_tree_sum<acc>(dot, per);
    ps.part[t.grp * t.P + t.lane] = dot[0];
    return total;
}

// default, group 0 after a barrier: q = lpl_default_norm_coef of the pixel's dot (the
// groups' subtrees combined by the rest of the tree).
template <typename acc>
__device__ __forceinline__ void fd_default_coef(const fd_tile &t, fd_pixel_scalars<acc> ps) {
    const int64_t groups = fd_pixel_groups(t);
    acc dot[LPL_PIXEL_CHUNKS];
LPL_UNROLL
    for (int g = 0; g < LPL_PIXEL_CHUNKS; ++g) dot[g] = g < groups ? ps.part[g * t.P + t.lane] : (acc)0;
    fd_tree_sum<acc>(dot, groups);
    ps.q[t.lane] = lpl_default_norm_coef(ps.inv_x[t.lane], ps.norm_x[t.lane], dot[0]);
}

// default: the gradient through x / (||x|| + eps) of every element of the tile.
template <typename T>
__device__ __forceinline__ void fd_default_grad(const lpl_fd_args &a, const fd_chan_params &cp, const fd_tile &t,
                                                const T *sx, const T *sy, const fd_mask_src &ms,
                                                fd_pixel_scalars<typename lpl_io<T>::acc> ps) {
    typedef typename lpl_io<T>::acc acc;
    if (!t.active) return;
    const acc rx = ps.inv_x[t.lane], ry = ps.inv_y[t.lane], q = ps.q[t.lane];
    for (int64_t c0 = t.grp; c0 < a.c; c0 += FD_UNROLL * t.G) {
        acc xv[FD_UNROLL], yv[FD_UNROLL];
        bool keep[FD_UNROLL];
        for (int u = 0; u < FD_UNROLL; ++u) {
            const int64_t c = c0 + u * t.G;
            if (c < a.c) {
                xv[u] = fd_value<T>(sx, (const T *)a.x, t, c, a.hw);
                yv[u] = fd_value<T>(sy, (const T *)a.y, t, c, a.hw);
                keep[u] = fd_kept(ms, t, c, a.hw);
            }
        }
        for (int u = 0; u < FD_UNROLL; ++u) {
            const int64_t c = c0 + u * t.G;
            if (c >= a.c) break;
            const acc k = keep[u] ? (acc)1 : (acc)0;
            const acc d = xv[u] * rx - fd_keep_select(yv[u], keep[u]) * ry;
            const acc g = (acc)fd_grad_coef(cp, c) * k * lpl_dist_deriv(d, a.dist);
            lpl_io<T>::store((T *)a.grad, t.base + c * a.hw, lpl_default_norm_grad(g, xv[u], rx, q));
        }
    }
}

template <typename T> __device__ __forceinline__ void fd_main(const lpl_fd_args a) {
    typedef typename lpl_io<T>::acc acc;
    __shared__ double red[32];
    __shared__ acc pixel_parts[2 * LPL_FD_THREADS];
    LPL_DYNAMIC_SHARED(unsigned char, smem);
    const int64_t n = blockIdx.x / a.blocks_per_sample, first = blockIdx.x % a.blocks_per_sample;
    const fd_chan_params cp = fd_load_params<acc>(a, smem, n);
    T *sx = a.sh_x >= 0 ? (T *)(smem + a.sh_x) : nullptr;
    T *sy = a.sh_y >= 0 ? (T *)(smem + a.sh_y) : nullptr;
    uint8_t *sm = a.sh_mask >= 0 ? (uint8_t *)(smem + a.sh_mask) : nullptr;
    fd_mask_src ms;
    ms.global = a.mask;
    ms.staged = sm;
    ms.bits = a.keep_bits ? smem + a.sh_bits : nullptr;
    ms.row_bytes = (a.tile_pixels + 7) / 8;
    fd_pixel_scalars<acc> ps;
    acc *pix = a.sh_pixel >= 0 ? (acc *)(smem + a.sh_pixel) : nullptr;
    ps.inv_x = pix;
    ps.norm_x = pix ? pix + a.tile_pixels : nullptr;
    ps.inv_y = pix ? pix + 2 * a.tile_pixels : nullptr;
    ps.q = pix ? pix + 3 * a.tile_pixels : nullptr;
    ps.part = pixel_parts;

    fd_tile t;
    t.P = a.tile_pixels;
    t.G = blockDim.x / t.P;
    t.lane = threadIdx.x % t.P;
    t.grp = threadIdx.x / t.P;
    const bool in_group = t.grp < t.G;  // threads past G * P only join the barriers
    double total = 0.0;
    for (int64_t tile = first; tile < a.tiles_per_sample; tile += a.blocks_per_sample) {
        const int64_t p = tile * t.P + t.lane;
        t.active = in_group && p < a.hw;
        t.base = n * a.c * a.hw + p;
        if (ms.bits) fd_load_keep_bits(a, smem + a.sh_bits, ms.row_bytes, n, tile * t.P);
        if (sy) fd_stage_tile<T>(a, t, sx, sy, sm);
        if (ms.bits || sy) __syncthreads();
        if (a.norm == LPL_NORM_NONE || a.norm == LPL_NORM_BATCH) {
            total += fd_tile_elementwise<T>(a, cp, t, nullptr, ms, (acc)1);
        } else {
            // up to 8 channel groups sum their chunks of each pixel's channels, group 0
            // combines them (lpl_math.h's order, the CPU's: at C = 512 a tile is often 32
            // pixels x 8 groups, so all 256 threads run the channel loops, not 32)
            const bool pixel_thread = t.active && t.grp == 0;
            fd_pixel_norm_parts<T>(a, t, sx, sy, ms, ps);
            __syncthreads();
            if (pixel_thread) fd_pixel_norms<acc>(a, t, ps);
            __syncthreads();
            if (a.norm == LPL_NORM_DEFAULT) {
                total += fd_default_dot_part<T>(a, cp, t, sx, sy, ms, ps);
                __syncthreads();
                if (pixel_thread) fd_default_coef<acc>(t, ps);
                __syncthreads();
            }
            if (a.norm == LPL_NORM_SHARED)
                total += fd_tile_elementwise<T>(a, cp, t, sy, ms, t.active ? ps.inv_y[t.lane] : (acc)0);
            else if (a.grad)
                fd_default_grad<T>(a, cp, t, sx, sy, ms, ps);
        }
        if (ms.bits || sy || a.norm == LPL_NORM_SHARED || a.norm == LPL_NORM_DEFAULT)
            __syncthreads();  // the next tile overwrites the staged copies and the pixel scalars
    }
    total = lpl_block_sum(total, red);
    if (threadIdx.x == 0) lpl_st(a.loss_part, blockIdx.x, total);
}

// ---- 4. loss per sample -------------------------------------------------------------
extern "C" __global__ void lpl_fd_finalize(const lpl_fd_args a) {
    __shared__ double red[32];
    const int64_t n = blockIdx.x;
    double total = 0.0;  // fixed order: each thread its blocks in order, then the tree
    for (int64_t j = threadIdx.x; j < a.blocks_per_sample; j += blockDim.x)
        total += lpl_ld(a.loss_part, n * a.blocks_per_sample + j);
    total = lpl_block_sum(total, red);
    if (threadIdx.x == 0) lpl_st(a.loss, n, total);
}

#define LPL_FD_ENTRY_POINTS(sfx, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(LPL_FD_THREADS) lpl_fd_stats_##sfx(const lpl_fd_args a) {     \
        fd_stats<T>(a);                                                                                        \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(LPL_FD_THREADS) lpl_fd_main_##sfx(const lpl_fd_args a) {      \
        fd_main<T>(a);                                                                                         \
    }
LPL_FOR_EACH_DTYPE(LPL_FD_ENTRY_POINTS)
#undef LPL_FD_ENTRY_POINTS
