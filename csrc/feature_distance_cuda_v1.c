/* The 0.2 launch sequence of the feature distance (kernels in csrc/cuda/v1_*.cuh), kept unchanged
 * for LPL_EXT_KERNEL_SET=v1 until a GPU run has compared it with the current one. */
/* CUDA launch sequence of the fused feature distance (kernels in
 * csrc/cuda/feature_distance_kernels.cuh), through the driver API on the caller's
 * stream. No host sync. */
#include "lpl_cuda_driver.h" /* Python.h first, as CPython asks */

#include <stdio.h>

#include "lpl_ops.h"

#define FD_THREADS LPL_FD_THREADS

int lpl_cuda_feature_distance_v1(const struct lpl_cuda_kernels *k, const lpl_fd_params *p, void *stream, char *err) {
    int64_t N = p->n, C = p->c, hw = p->hw, planes = N * C;
    double *sums = p->workspace;
    double *kept = sums + planes;
    double *plane_sum = kept + planes;
    double *plane_m2 = plane_sum + planes;
    double *chan_mean = plane_m2 + planes;
    double *chan_std = chan_mean + C;
    const void *x = p->x, *y = p->y, *mask = p->mask;
    void *grad = p->grad;
    double *loss = p->loss;
    int norm = p->norm, dist = p->dist, dtype = p->dtype;
    double weight = p->weight;
    const int batch = norm == LPL_NORM_BATCH;
    int rc = -1;

    if (p->grad_scale) {
        snprintf(err, LPL_ERR_LEN, "grad_scale: the 0.2 kernels (LPL_EXT_KERNEL_SET=v1) cannot fold it");
        return -1;
    }
    if (planes > 2147483647LL) {
        snprintf(err, LPL_ERR_LEN, "too many (sample, channel) planes for one launch");
        return -1;
    }
    if (lpl_cu_begin(k, err) < 0) return -1;
    /* sums and kept are adjacent: zero both */
    if (lpl_cu_memset0(k, sums, 2 * sizeof(double) * (size_t)planes, stream, err) < 0) goto fail;
    if (planes > 0) {
        if (mask) {
            int64_t per_plane = (hw + 4 * FD_THREADS - 1) / (4 * FD_THREADS); /* ~1024 bytes per block */
            if (per_plane < 1) per_plane = 1;
            if (per_plane > 2147483647LL / planes) per_plane = 2147483647LL / planes;
            void *args[] = {&mask, &hw, &per_plane, &kept};
            if (lpl_cu_launch(k, LPL_K_v1_fd_kept_count, planes * per_plane, FD_THREADS, 0, stream, args, err) < 0)
                goto fail;
        } else {
            double value = (double)hw;
            void *args[] = {&kept, &planes, &value};
            if (lpl_cu_launch(k, LPL_K_v1_fd_fill, (planes + FD_THREADS - 1) / FD_THREADS, FD_THREADS, 0, stream, args,
                              err) < 0)
                goto fail;
        }
        if (batch) {
            void *args[] = {&y, &mask, &hw, &plane_sum, &plane_m2};
            if (lpl_cu_launch(k, LPL_K_v1_fd_plane_moments_f32 + dtype, planes, FD_THREADS, 0, stream, args, err) < 0)
                goto fail;
        }
    }
    if (batch && C > 0) {
        void *args[] = {&plane_sum, &plane_m2, &N, &C, &hw, &chan_mean, &chan_std};
        if (lpl_cu_launch(k, LPL_K_v1_fd_channel_moments, (C + 127) / 128, 128, 0, stream, args, err) < 0) goto fail;
    }
    if (hw > 0 && planes > 0) {
        /* Small planes: narrower blocks so that more SMs get work. */
        int threads = FD_THREADS;
        while (threads > 64 && N * ((hw + threads - 1) / threads) < 2 * (int64_t)k->sm_count) threads /= 2;
        int64_t blocks_per_sample = (hw + threads - 1) / threads;
        if (blocks_per_sample > 2147483647LL / N) {
            snprintf(err, LPL_ERR_LEN, "shape too large for one launch");
            goto fail;
        }
        int use_shared_acc = C <= 4096;
        const size_t smem = use_shared_acc ? sizeof(double) * (size_t)C : 0;
        void *args[] = {&x,  &y,    &mask, &grad,   &kept,           &chan_mean,         &chan_std, &C,
                        &hw, &norm, &dist, &weight, &use_shared_acc, &blocks_per_sample, &sums};
        if (lpl_cu_launch(k, LPL_K_v1_fd_main_f32 + dtype, N * blocks_per_sample, threads, smem, stream, args, err) < 0)
            goto fail;
    }
    if (N > 0) {
        void *args[] = {&sums, &kept, &C, &weight, &loss};
        if (lpl_cu_launch(k, LPL_K_v1_fd_finalize, N, FD_THREADS, 0, stream, args, err) < 0) goto fail;
    }
    rc = 0;
fail:
    lpl_cu_end(k);
    return rc;
}
