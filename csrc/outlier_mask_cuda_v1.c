/* The 0.2 launch sequence of the outlier mask (kernels in csrc/cuda/v1_*.cuh), kept unchanged
 * for LPL_EXT_KERNEL_SET=v1 until a GPU run has compared it with the current one. */
/* CUDA launch sequence of the outlier keep-mask (kernels and the order of the steps in
 * csrc/cuda/outlier_mask_kernels.cuh), through the driver API on the caller's stream.
 * No host sync. */
#include "lpl_cuda_driver.h" /* Python.h first, as CPython asks */

#include <stdio.h>

#include "lpl_ops.h"

static int64_t grid_for(int64_t work, int64_t threads) {
    int64_t g = (work + threads - 1) / threads;
    return g < 1 ? 1 : g;
}

/* Bits of the order-preserving key per storage dtype (f32, f64, f16, bf16). */
static const int key_bits[4] = {32, 64, 16, 16};

int lpl_cuda_outlier_mask_v1(const struct lpl_cuda_kernels *k, const lpl_om_params *p, void *stream, char *err) {
    int64_t planes = p->n * p->c, h = p->h, w = p->w, len = h * w, total = planes * len;
    const lpl_om_v1_layout layout = lpl_om_v1_workspace_layout(p->n, p->c, p->h, p->w);
    int64_t nb = lpl_om_v1_blocks_per_plane(len);
    uint8_t *base = (uint8_t *)p->workspace;
    lpl_om_v1_ws ws;
    ws.part_d = (double *)(base + layout.part_d);
    ws.part_u = (uint64_t *)(base + layout.part_u);
    ws.plane_d = (double *)(base + layout.plane_d);
    ws.plane_u = (uint64_t *)(base + layout.plane_u);
    ws.hist = (uint32_t *)(base + layout.hist);
    ws.tmp = base + layout.tmp;
    const void *y = p->y;
    uint8_t *keep = p->keep, *tmp = ws.tmp;
    double *stats = p->stats;
    double quantile = p->quantile, margin_std = p->margin_std;
    int dtype = p->dtype;
    int64_t r_close = (p->closing - 1) / 2, r_open = (p->opening - 1) / 2;
    const int T = LPL_OM_CUDA_THREADS;
    int rc = -1;

    if (dtype < 0 || dtype > 3) {
        snprintf(err, LPL_ERR_LEN, "unsupported dtype");
        return -1;
    }
    if (planes > 0 && len > 0 && planes * nb > 2147483647LL) {
        snprintf(err, LPL_ERR_LEN, "too many (sample, channel) planes for one launch");
        return -1;
    }
    if (lpl_cu_begin(k, err) < 0) return -1;
#define OM_LAUNCH(id, grid, block, ...)                                                 \
    do {                                                                                \
        void *args_[] = {__VA_ARGS__};                                                  \
        if (lpl_cu_launch(k, (id), (grid), (block), 0, stream, args_, err) < 0) goto fail; \
    } while (0)
    if (planes > 0 && len > 0) {
        const int64_t plane_blocks = planes * nb, per_plane_grid = grid_for(planes, 128);
        const int64_t pix_grid = grid_for(total, T) > 2147483647LL ? 2147483647LL : grid_for(total, T);
        OM_LAUNCH(LPL_K_v1_om_moments_f32 + dtype, plane_blocks, T, &y, &len, &nb, &ws);
        OM_LAUNCH(LPL_K_v1_om_setup, per_plane_grid, 128, &planes, &nb, &quantile, &dtype, &ws);
        OM_LAUNCH(LPL_K_v1_om_variance_f32 + dtype, plane_blocks, T, &y, &len, &nb, &ws);
        for (int shift = key_bits[dtype] - 8; shift >= 0; shift -= 8) {
            OM_LAUNCH(LPL_K_v1_om_radix_hist_f32 + dtype, plane_blocks, T, &y, &len, &nb, &shift, &ws);
            OM_LAUNCH(LPL_K_v1_om_radix_select, grid_for(planes * 2, 128), 128, &planes, &shift, &ws);
        }
        OM_LAUNCH(LPL_K_v1_om_thresholds, per_plane_grid, 128, &planes, &nb, &margin_std, &dtype, &ws);
        /* the per-pixel kernels loop over the grid, so the grid may be capped */
        OM_LAUNCH(LPL_K_v1_om_keep_rowor_f32 + dtype, pix_grid, T, &y, &total, &len, &w, &r_close, &ws);
        OM_LAUNCH(LPL_K_v1_om_col_or, pix_grid, T, &tmp, &keep, &total, &len, &h, &w, &r_close);
        OM_LAUNCH(LPL_K_v1_om_row_and, pix_grid, T, &keep, &tmp, &total, &w, &r_open);
        OM_LAUNCH(LPL_K_v1_om_final_f32 + dtype, plane_blocks, T, &y, &keep, &len, &h, &w, &r_open, &nb, &ws);
        if (stats) OM_LAUNCH(LPL_K_v1_om_plane_stats, per_plane_grid, 128, &planes, &nb, &len, &ws);
    }
    if (stats) OM_LAUNCH(LPL_K_v1_om_layer_stats, 1, 32, &planes, &len, &ws, &stats);
#undef OM_LAUNCH
    rc = 0;
fail:
    lpl_cu_end(k);
    return rc;
}
