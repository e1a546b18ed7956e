/* CUDA launch sequence of the fused feature distance, v2 (kernels and their design in
 * csrc/cuda/feature_distance_kernels.cuh), through the driver API on the caller's
 * stream. No host sync. Every kernel gets the same lpl_fd_args by value. */
#include "lpl_cuda_driver.h" /* Python.h first, as CPython asks */

#include <stdio.h>

#include "lpl_ops.h"

#define FD_THREADS LPL_FD_THREADS
/* Fewest pixels per staged tile: 8 consecutive values of a row per channel still make
 * whole 32-byte sectors in float32. Below it the tile reads global memory instead. */
#define FD_MIN_STAGED_PIXELS 8

static const size_t fd_elem_size[] = {4, 8, 2, 2}; /* storage bytes, lpl_dtype order */

static int64_t fd_pow2_at_least(int64_t v, int64_t cap) {
    int64_t p = 1;
    while (p < v && p < cap) p *= 2;
    return p;
}

static int64_t fd_align16(int64_t v) { return (v + 15) / 16 * 16; }

/* Dynamic shared layout of fd_main for tiles of P pixels (offsets into a.sh_*), staged or
 * not, with the packed keep bits or the mask bytes; returns its size in bytes. acc is
 * the arithmetic type's size. */
static int64_t fd_shared_layout(lpl_fd_args *a, int64_t P, int staged, int params, int bits, size_t esize,
                                size_t acc) {
    const int64_t C = a->c;
    const int cross = a->norm == LPL_NORM_DEFAULT || a->norm == LPL_NORM_SHARED;
    int64_t off = 0;
    a->sh_coef = a->sh_scale = a->sh_shift = a->sh_pixel = a->sh_x = a->sh_y = a->sh_mask = a->sh_bits = -1;
    if (bits) {
        a->sh_bits = off;
        off = fd_align16(off + C * ((P + 7) / 8));
    }
    if (params && a->mask) {
        a->sh_coef = off;
        off = fd_align16(off + C * 8);
    }
    if (params && a->norm == LPL_NORM_BATCH) {
        a->sh_scale = off;
        off = fd_align16(off + C * (int64_t)acc);
        a->sh_shift = off;
        off = fd_align16(off + C * (int64_t)acc);
    }
    if (cross) {
        a->sh_pixel = off;
        off = fd_align16(off + 4 * P * (int64_t)acc);
    }
    if (staged && cross) {
        if (a->norm == LPL_NORM_DEFAULT) {
            a->sh_x = off;
            off = fd_align16(off + C * P * (int64_t)esize);
        }
        a->sh_y = off;
        off = fd_align16(off + C * P * (int64_t)esize);
        if (a->mask && !bits) {
            a->sh_mask = off;
            off = fd_align16(off + C * P);
        }
    }
    return off;
}

/* Chooses the main kernel's tile (a->tile_pixels, a->sh_*) and block size for packed keep
 * bits or not; returns the dynamic shared bytes, or -1 when nothing fits (only possible
 * with bits). Prefers staging with the per-channel parameters in shared memory, then
 * staging without them, then no staging (re-reads, any C). */
static int64_t fd_plan_main(const struct lpl_cuda_kernels *k, lpl_fd_args *a, int dtype, int bits, int *threads) {
    const int64_t budget = k->max_dynamic_smem[LPL_K_fd_main_f32 + dtype];
    const size_t esize = fd_elem_size[dtype], acc = dtype == LPL_FLOAT64 ? 8 : 4;
    const int cross = a->norm == LPL_NORM_DEFAULT || a->norm == LPL_NORM_SHARED;
    const int64_t widest = fd_pow2_at_least(a->hw, FD_THREADS);
    int64_t bytes;
    *threads = FD_THREADS;
    if (cross) {
        for (int params = 1; params >= 0; --params)
            for (int64_t P = widest; P >= FD_MIN_STAGED_PIXELS || P == widest; P /= 2) {
                bytes = fd_shared_layout(a, P, 1, params, bits, esize, acc);
                if (bytes <= budget) {
                    a->tile_pixels = P;
                    return bytes;
                }
                if (P == 1) break;
            }
        /* unstaged: one thread per pixel, blocks of at least a warp */
        a->tile_pixels = widest < 32 ? 32 : widest;
        *threads = (int)a->tile_pixels;
    } else {
        a->tile_pixels = widest;
    }
    bytes = fd_shared_layout(a, a->tile_pixels, 0, 1, bits, esize, acc);
    if (bytes > budget) bytes = fd_shared_layout(a, a->tile_pixels, 0, 0, bits, esize, acc);
    return bytes <= budget || !bits ? bytes : -1;
}

/* Statistics blocks per plane: enough for about FD_STATS_BLOCKS_PER_SM blocks per SM when
 * the layer has few planes (a block streams its chunks in sequence: one block per plane
 * left a layer of 128 large planes latency-bound), at most one per chunk and
 * LPL_FD_STATS_PARTS. Depends on the device only, not on the data: a fixed merge order
 * per device (fd_setup adds the parts in part order). */
#define FD_STATS_BLOCKS_PER_SM 4
static int64_t fd_stats_parts(const struct lpl_cuda_kernels *k, int64_t planes, int64_t hw) {
    const int64_t chunks = (hw + LPL_FD_STATS_CHUNK - 1) / LPL_FD_STATS_CHUNK;
    const int64_t sms = k->sm_count > 0 ? k->sm_count : 1;
    int64_t parts = planes > 0 ? (FD_STATS_BLOCKS_PER_SM * sms + planes - 1) / planes : 1;
    if (parts > chunks) parts = chunks;
    if (parts > LPL_FD_STATS_PARTS) parts = LPL_FD_STATS_PARTS;
    return parts < 1 ? 1 : parts;
}

int lpl_cuda_feature_distance(const struct lpl_cuda_kernels *k, const lpl_fd_params *p, void *stream, char *err) {
    if (k->kernel_set == LPL_KERNEL_SET_V1) return lpl_cuda_feature_distance_v1(k, p, stream, err);
    const int64_t N = p->n, C = p->c, hw = p->hw, planes = N * C;
    const int dtype = p->dtype;
    const lpl_fd_layout ws = lpl_fd_workspace_layout(N, C);
    lpl_fd_args a = {0};
    a.x = p->x;
    a.y = p->y;
    a.mask = p->mask;
    a.grad = p->grad;
    a.loss = p->loss;
    a.grad_scale = p->grad_scale;
    a.plane_moments = p->mask ? p->plane_moments : NULL;
    a.n = N;
    a.c = C;
    a.hw = hw;
    a.norm = p->norm;
    a.dist = p->dist;
    a.weight = p->weight;
    a.coef = p->workspace + ws.coef;
    a.chan_mean = p->workspace + ws.chan_mean;
    a.chan_scale = p->workspace + ws.chan_scale;
    a.part_kept = p->workspace + ws.part_kept;
    a.part_mean = p->workspace + ws.part_mean;
    a.part_m2 = p->workspace + ws.part_m2;
    a.loss_part = p->workspace + ws.loss_part;
    const int batch = p->norm == LPL_NORM_BATCH, has_work = planes > 0 && hw > 0;
    void *args[] = {&a};
    int rc = -1;

    if (dtype < LPL_FLOAT32 || dtype > LPL_BFLOAT16) {
        snprintf(err, LPL_ERR_LEN, "feature distance: unsupported dtype code %d", dtype);
        return -1;
    }
    /* the statistics blocks (planes * parts) and the main blocks (N * blocks per sample)
     * each form one 1-D grid */
    a.stats_parts = fd_stats_parts(k, planes, hw);
    if (planes > 2147483647LL / LPL_FD_STATS_PARTS || N > 2147483647LL / LPL_FD_MAX_BLOCKS) {
        snprintf(err, LPL_ERR_LEN, "feature distance: too many (sample, channel) planes for one launch");
        return -1;
    }
    int threads = FD_THREADS;
    size_t smem = 0;
    if (has_work) {
        /* pack the mask into bits in grad's storage when there is a gradient and a
         * tile's bits fit in shared memory; else fd_main reads the mask bytes again. With
         * the plane moments there is no statistics pass to pack them: fd_main reads the
         * mask bytes, its one read of them. */
        int64_t bytes = p->mask && p->grad && !a.plane_moments ? fd_plan_main(k, &a, dtype, 1, &threads) : -1;
        /* The bits of values [8j, 8j + 8) live in gradient element 8j: they are inside a
         * tile's own gradient only when tiles start at multiples of 8 (or there is one
         * tile); else a block could overwrite bits another block has not read yet. */
        if (bytes >= 0 && hw > a.tile_pixels && a.tile_pixels % 8 != 0) bytes = -1;
        if (bytes >= 0) {
            a.keep_bits = (uint8_t *)p->grad;
            a.keep_bits_stride = (int64_t)fd_elem_size[dtype];
        } else {
            bytes = fd_plan_main(k, &a, dtype, 0, &threads);
        }
        smem = (size_t)bytes;
        a.tiles_per_sample = (hw + a.tile_pixels - 1) / a.tile_pixels;
        a.blocks_per_sample = a.tiles_per_sample < LPL_FD_MAX_BLOCKS ? a.tiles_per_sample : LPL_FD_MAX_BLOCKS;
    }
    if (lpl_cu_begin(k, err) < 0) return -1;
    if (has_work && (p->mask || batch)) {
        /* the kept counts and batch statistics come from the outlier mask's moments when
         * given (docs/spec.md, "Feature distance"): y is then read once, by fd_main */
        if (!a.plane_moments &&
            lpl_cu_launch(k, LPL_K_fd_stats_f32 + dtype, planes * a.stats_parts, FD_THREADS, 0, stream, args, err) < 0)
            goto fail;
        const int64_t items = planes > C ? planes : C;
        if (lpl_cu_launch(k, LPL_K_fd_setup, (items + FD_THREADS - 1) / FD_THREADS, FD_THREADS, 0, stream, args, err) <
            0)
            goto fail;
    }
    if (has_work &&
        lpl_cu_launch(k, LPL_K_fd_main_f32 + dtype, N * a.blocks_per_sample, threads, smem, stream, args, err) < 0)
        goto fail;
    if (N > 0 && lpl_cu_launch(k, LPL_K_fd_finalize, N, FD_THREADS, 0, stream, args, err) < 0) goto fail;
    rc = 0;
fail:
    lpl_cu_end(k);
    return rc;
}
