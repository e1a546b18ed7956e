/* CUDA launch sequence of the outlier keep-mask (the kernels and both paths are described
 * in csrc/cuda/outlier_mask_kernels.cuh), through the driver API on the caller's stream.
 * No host sync, no allocation: the scratch is the caller's workspace
 * (lpl_om_workspace_layout). */
#include "lpl_cuda_driver.h" /* Python.h first, as CPython asks */

#include <stdio.h>

#include "lpl_ops.h"

/* Bits of the order-preserving key and bytes of a value per storage dtype (f32, f64,
 * f16, bf16). */
static const int key_bits[4] = {32, 64, 16, 16};
static const int value_bytes[4] = {4, 8, 2, 2};

/* Filter radius (odd window) clamped to a plane extent: a window wider than the plane is
 * clipped to it, so radius extent - 1 gives the same result. */
static int clamp_radius(int window, int64_t extent) {
    const int64_t r = (window - 1) / 2, cap = extent > 0 ? extent - 1 : 0;
    return (int)(r < cap ? r : cap);
}

/* Dynamic shared bytes of om_plane for an h x w plane: the values (8-byte aligned), the
 * per-tile partial sums (4 doubles per 32 x 64 reduction tile) and two mask bytes per
 * value; -1 when far too large. */
static int64_t plane_path_smem(int64_t h, int64_t w, int dtype) {
    const int64_t len = h * w;
    if (len > ((int64_t)1 << 30)) return -1;
    return (len * value_bytes[dtype] + 7) / 8 * 8 + lpl_om_tiles_per_plane(h, w) * 4 * 8 + 2 * len;
}

static int launch(const struct lpl_cuda_kernels *k, int id, int64_t grid, int block, size_t smem, void *stream,
                  lpl_om_args *args, char *err) {
    void *params[] = {args};
    return lpl_cu_launch(k, id, grid, block, smem, stream, params, err);
}

/* streaming_path's answer when the windows' halo does not fit the tiled filter's shared
 * memory (windows of ~145+ on a plane too large for the plane path): nothing was launched,
 * and the caller runs the separable filters of the 0.2 sequence instead, which take any
 * window (its workspace is within lpl_outlier_mask_workspace_bytes: the larger layout). */
#define STREAMING_TILE_TOO_SMALL 1

/* The streaming path: radix passes over the values, then the tiled filter. 0, -1 with err,
 * or STREAMING_TILE_TOO_SMALL. */
static int streaming_path(const struct lpl_cuda_kernels *k, lpl_om_args *a, void *stream, char *err) {
    const int T = LPL_OM_CUDA_THREADS, dtype = a->dtype;
    if (a->planes * a->blocks_per_plane > 2147483647LL || a->planes * lpl_om_tiles_per_plane(a->h, a->w) > 2147483647LL) {
        snprintf(err, LPL_ERR_LEN, "too many (sample, channel) planes for one launch");
        return -1;
    }
    /* the larger tile where it fits: the halo re-read shrinks with the tile's sides */
    const int64_t hx = a->rc_x + a->ro_x, hy = a->rc_y + a->ro_y, smem_cap = k->max_dynamic_smem[LPL_K_om_filter_f32 + dtype];
    int64_t filter_smem = -1;
    for (int scale = 2; scale >= 1; --scale) {
        const int64_t tw = LPL_OM_TILE_W * scale, th = LPL_OM_TILE_H * scale;
        filter_smem = tw * th * value_bytes[dtype] + 2 * (tw + 2 * hx) * (th + 2 * hy);
        a->tile_w = (int)tw;
        a->tile_h = (int)th;
        if (filter_smem <= smem_cap) break;
    }
    a->tiles_x = a->w / a->tile_w + (a->w % a->tile_w != 0);
    a->tiles_y = a->h / a->tile_h + (a->h % a->tile_h != 0);
    const int64_t tiles = a->tiles_x * a->tiles_y;
    if (filter_smem > smem_cap) return STREAMING_TILE_TOO_SMALL; /* before any launch */
    /* the tile trees of om_select and om_plane_merge in shared memory when a plane's tile
     * partials (4 doubles per tile) fit: each partial read once; else in place in the
     * workspace */
    const int64_t red_tiles = lpl_om_tiles_per_plane(a->h, a->w);
    a->tiles_in_shared = red_tiles * 4 * 8 <= k->max_dynamic_smem[LPL_K_om_select] &&
                         red_tiles * 4 * 8 <= k->max_dynamic_smem[LPL_K_om_plane_merge];
    const size_t select_smem = a->tiles_in_shared ? (size_t)(red_tiles * 4 * 8) : 0, merge_smem = select_smem;
    a->pass = -1;
    if (launch(k, LPL_K_om_select, a->planes, T, 0, stream, a, err) < 0) return -1;
    /* digits of LPL_OM_DIGIT_BITS from the top; the last one may be narrower */
    int top = key_bits[dtype];
    for (int pass = 0; top > 0; ++pass) {
        a->pass = pass;
        a->shift = top > LPL_OM_DIGIT_BITS ? top - LPL_OM_DIGIT_BITS : 0;
        a->digit_bits = top - a->shift;
        if (launch(k, LPL_K_om_hist_f32 + dtype, a->planes * a->blocks_per_plane, T, 0, stream, a, err) < 0 ||
            launch(k, LPL_K_om_select, a->planes, T, select_smem, stream, a, err) < 0)
            return -1;
        top = a->shift;
    }
    if (launch(k, LPL_K_om_filter_f32 + dtype, a->planes * tiles, T, (size_t)filter_smem, stream, a, err) < 0)
        return -1;
    if ((a->stats || a->plane_moments) && launch(k, LPL_K_om_plane_merge, a->planes, T, merge_smem, stream, a, err) < 0)
        return -1;
    return 0;
}

/* The 0.2 kernels do not write the per-plane moments (and their sums follow another order
 * than the CPU's): refused with this message rather than left unwritten. */
static int refuse_plane_moments_on_v1(const char *why, char *err) {
    snprintf(err, LPL_ERR_LEN, "plane_moments: not produced by the 0.2 outlier-mask kernels (%s)", why);
    return -1;
}

int lpl_cuda_outlier_mask(const struct lpl_cuda_kernels *k, const lpl_om_params *p, void *stream, char *err) {
    if (k->kernel_set == LPL_KERNEL_SET_V1) {
        if (p->plane_moments) return refuse_plane_moments_on_v1("LPL_EXT_KERNEL_SET=v1", err);
        return lpl_cuda_outlier_mask_v1(k, p, stream, err);
    }
    if (p->dtype < 0 || p->dtype > 3) {
        snprintf(err, LPL_ERR_LEN, "unsupported dtype");
        return -1;
    }
    if (p->closing < 1 || p->opening < 1 || p->closing % 2 == 0 || p->opening % 2 == 0) {
        snprintf(err, LPL_ERR_LEN, "closing and opening windows must be odd and >= 1, got %d and %d", p->closing,
                 p->opening);
        return -1;
    }
    const lpl_om_layout layout = lpl_om_workspace_layout(p->n, p->c, p->h, p->w);
    if (layout.total < 0) {
        snprintf(err, LPL_ERR_LEN, "outlier_mask workspace size overflows int64");
        return -1;
    }
    uint8_t *base = (uint8_t *)p->workspace;
    lpl_om_args a;
    a.y = p->y;
    a.keep = p->keep;
    a.stats = p->stats;
    a.plane_moments = p->plane_moments;
    a.planes = p->n * p->c;
    a.h = p->h;
    a.w = p->w;
    a.len = p->h * p->w;
    a.blocks_per_plane = lpl_om_blocks_per_plane(a.len);
    a.tiles_x = a.tiles_y = 0; /* set with the tile by the streaming path */
    a.tile_w = LPL_OM_TILE_W;
    a.tile_h = LPL_OM_TILE_H;
    a.parts_per_plane = lpl_om_parts_per_plane(p->h, p->w);
    a.quantile = p->quantile;
    a.margin_std = p->margin_std;
    a.dtype = p->dtype;
    a.key_bits = key_bits[p->dtype];
    a.rc_x = clamp_radius(p->closing, p->w);
    a.rc_y = clamp_radius(p->closing, p->h);
    a.ro_x = clamp_radius(p->opening, p->w);
    a.ro_y = clamp_radius(p->opening, p->h);
    a.pass = 0;
    a.shift = 0;
    a.digit_bits = 0;
    a.layer_in_shared = 0;
    a.tiles_in_shared = 0;
    a.ws.plane_d = (double *)(base + layout.plane_d);
    a.ws.plane_u = (uint64_t *)(base + layout.plane_u);
    a.ws.part_d = (double *)(base + layout.part_d);
    a.ws.part_u = (uint64_t *)(base + layout.part_u);
    a.ws.hist = (uint32_t *)(base + layout.hist);
    a.ws.cand = (uint64_t *)(base + layout.cand);
    a.cand_cap = lpl_om_candidate_cap(a.len);
    if (a.planes > 2147483647LL) {
        snprintf(err, LPL_ERR_LEN, "too many (sample, channel) planes for one launch");
        return -1;
    }

    if (lpl_cu_begin(k, err) < 0) return -1;
    int rc = 0;
    if (a.planes > 0 && a.len > 0) {
        const int64_t smem = plane_path_smem(a.h, a.w, a.dtype);
        if (smem >= 0 && smem <= k->max_dynamic_smem[LPL_K_om_plane_f32 + a.dtype])
            rc = launch(k, LPL_K_om_plane_f32 + a.dtype, a.planes, LPL_OM_CUDA_THREADS, (size_t)smem, stream, &a, err);
        else
            rc = streaming_path(k, &a, stream, err);
    }
    if (rc == STREAMING_TILE_TOO_SMALL) {
        lpl_cu_end(k);
        if (p->plane_moments) return refuse_plane_moments_on_v1("windows this wide on planes this large run them", err);
        return lpl_cuda_outlier_mask_v1(k, p, stream, err);
    }
    if (rc == 0 && a.stats) {
        /* the planes' tree in shared memory when their moments fit (3 doubles each): each
         * plane's moments read once; else in place in the workspace */
        const int64_t stage = a.planes * 3 * 8;
        a.layer_in_shared = stage <= k->max_dynamic_smem[LPL_K_om_layer_stats];
        rc = launch(k, LPL_K_om_layer_stats, 1, LPL_OM_CUDA_THREADS, a.layer_in_shared ? (size_t)stage : 0, stream,
                    &a, err);
    }
    lpl_cu_end(k);
    return rc < 0 ? -1 : 0;
}
