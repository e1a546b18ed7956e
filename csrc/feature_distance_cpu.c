/* CPU implementation of the fused feature distance (docs/spec.md, "Normalization" and "Feature distance"): one streaming
 * pass over x, y and mask that produces the per-sample loss and, in the same pass, the
 * gradient with respect to x. OpenMP-parallel over (sample, pixel tile) items. */
#if defined(__linux__) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE /* madvise */
#endif
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "lpl_math.h"
#include "lpl_ops.h"
#include "lpl_tensor.h"

/* Fewest elements worth a parallel region. */
#define LPL_FD_PARALLEL_MIN (1 << 16)

#ifndef LPL_FD_TILE_BYTES
#define LPL_FD_TILE_BYTES (4 * 1024 * 1024)
#endif

/* ---- one instantiation per storage dtype ------------------------------------------- */
#define FD_T float
#define FD_ACC float
#define FD_UINT uint32_t
#define FD_LOAD(v) (v)
#define FD_STORE(v) (v)
#define FD_SUFFIX f32
#define FD_M(name) name##_f
#include "feature_distance_cpu_impl.h"
#undef FD_T
#undef FD_ACC
#undef FD_UINT
#undef FD_LOAD
#undef FD_STORE
#undef FD_SUFFIX

#define FD_T uint16_t
#define FD_ACC float
#define FD_UINT uint32_t
#define FD_LOAD(v) lpl_half_to_float(v)
#define FD_STORE(v) lpl_float_to_half(v)
#define FD_SUFFIX f16
#include "feature_distance_cpu_impl.h"
#undef FD_T
#undef FD_ACC
#undef FD_UINT
#undef FD_LOAD
#undef FD_STORE
#undef FD_SUFFIX

#define FD_T uint16_t
#define FD_ACC float
#define FD_UINT uint32_t
#define FD_LOAD(v) lpl_bf16_to_float(v)
#define FD_STORE(v) lpl_float_to_bf16(v)
#define FD_SUFFIX bf16
#include "feature_distance_cpu_impl.h"
#undef FD_T
#undef FD_ACC
#undef FD_UINT
#undef FD_LOAD
#undef FD_STORE
#undef FD_SUFFIX
#undef FD_M

#define FD_T double
#define FD_ACC double
#define FD_UINT uint64_t
#define FD_LOAD(v) (v)
#define FD_STORE(v) (v)
#define FD_SUFFIX f64
#define FD_M(name) name##_d
#include "feature_distance_cpu_impl.h"
#undef FD_T
#undef FD_ACC
#undef FD_UINT
#undef FD_LOAD
#undef FD_STORE
#undef FD_SUFFIX
#undef FD_M

/* Sum and M2 of y*keep for one plane, whatever the dtype. */
static void plane_moments(const lpl_fd_params *p, int64_t plane, double *sum, double *m2) {
    const int64_t off = plane * p->hw;
    const uint8_t *m = p->mask ? p->mask + off : NULL;
    switch (p->dtype) {
    case LPL_FLOAT32: fd_plane_moments_f32((const float *)p->y + off, m, p->hw, sum, m2); break;
    case LPL_FLOAT64: fd_plane_moments_f64((const double *)p->y + off, m, p->hw, sum, m2); break;
    case LPL_FLOAT16: fd_plane_moments_f16((const uint16_t *)p->y + off, m, p->hw, sum, m2); break;
    default: fd_plane_moments_bf16((const uint16_t *)p->y + off, m, p->hw, sum, m2); break;
    }
}

/* The gradient is usually a fresh, never-touched allocation as large as x, and first-touch
 * faults on 4 KiB pages cost about 0.75 us each here. With LPL_EXT_HUGEPAGES=1
 * (p->advise_hugepages) and transparent huge pages in "madvise" mode, the whole-page part
 * of the buffer is advised to use 2 MiB pages before it is written. Opt-in, because it is
 * bimodal: on a 2x256x256x256 layer, fwd + bwd, 40-50 ms per call when the kernel has free
 * huge pages, 59-83 ms without the advice, but 165-290 ms whenever the kernel must compact
 * memory to make them (defrag=madvise stalls the faulting thread) -- and with other large
 * allocations between calls, as in a trainer, that happened every other call (median 169-201
 * ms with the advice, 87-108 ms without). Advice only: no effect on results. */
static void advise_huge_pages(void *data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    if (data == NULL || bytes < 2 * huge) return;
    uintptr_t begin = ((uintptr_t)data + huge - 1) & ~(huge - 1);
    uintptr_t end = ((uintptr_t)data + bytes) & ~(huge - 1);
    if (end > begin) (void)madvise((void *)begin, (size_t)(end - begin), MADV_HUGEPAGE);
#else
    (void)data;
    (void)bytes;
#endif
}

int lpl_cpu_feature_distance(const lpl_fd_params *p, char *err) {
    const int64_t N = p->n, C = p->c, hw = p->hw, planes = p->n * p->c;
    double *coef = NULL, *grad_coef = NULL, *plane_sum = NULL, *plane_m2 = NULL, *chan_mean = NULL, *chan_std = NULL;
    int rc = -1;
    size_t nplanes = (size_t)(planes > 0 ? planes : 1), nchan = (size_t)(C > 0 ? C : 1);

    if (N == 0) return 0;
    if (hw == 0 || C == 0) {
        /* No elements: every plane is empty and contributes 0. Returning before any
         * O(N * C) scratch keeps (1, 2**31, 0, 1) from asking for gigabytes. */
        for (int64_t n = 0; n < N; ++n) p->loss[n] = 0.0;
        return 0;
    }
    /* Waking a thread team costs more than a small layer's whole pass. */
    const int parallel = planes * hw >= LPL_FD_PARALLEL_MIN;
    /* the outlier mask's moments of where(mask, y, 0), meaningful with that mask only */
    const double *pm = p->mask ? p->plane_moments : NULL;
    if (p->grad && p->advise_hugepages) advise_huge_pages(p->grad, (size_t)(planes * hw) * lpl_dtype_size((lpl_dtype)p->dtype));
    coef = (double *)malloc(sizeof(double) * nplanes);
    if (!coef) {
        snprintf(err, LPL_ERR_LEN, "out of host memory");
        goto fail;
    }
    /* M[n, c] = number of kept values of the plane; coef = w / (C * M), 0 when M = 0. With
     * the outlier mask's plane moments, M is their kept count (the same exact integer). */
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t pl = 0; pl < planes; ++pl) {
        if (pm) { /* (as a double: caller-given, never converted to an integer) */
            coef[pl] = lpl_plane_coef(p->weight, C, pm[pl * LPL_PM_COMPONENTS + LPL_PM_KEPT]);
            continue;
        }
        int64_t kept = hw;
        if (p->mask) {
            const uint8_t *m = p->mask + pl * hw;
            kept = 0;
#pragma omp simd reduction(+ : kept)
            for (int64_t i = 0; i < hw; ++i) kept += m[i] != 0;
        }
        coef[pl] = lpl_plane_coef(p->weight, C, (double)kept);
    }
    /* The gradient's plane coefficient: coef times the sample's folded factor (one product
     * per plane; the per-element arithmetic is unchanged). */
    if (p->grad_scale) {
        grad_coef = (double *)malloc(sizeof(double) * nplanes);
        if (!grad_coef) {
            snprintf(err, LPL_ERR_LEN, "out of host memory");
            goto fail;
        }
        for (int64_t pl = 0; pl < planes; ++pl) grad_coef[pl] = coef[pl] * p->grad_scale[pl / C];
    }

    if (p->norm == LPL_NORM_BATCH && pm) {
        /* The channel statistics from the outlier mask's plane moments, merged in the order
         * fd_setup merges them (lpl_batch_stats_from_planes): no pass over y here, and the
         * CPU's gradient is the GPU's bits. */
        chan_mean = (double *)malloc(sizeof(double) * nchan);
        chan_std = (double *)malloc(sizeof(double) * nchan);
        if (!chan_mean || !chan_std) {
            snprintf(err, LPL_ERR_LEN, "out of host memory");
            goto fail;
        }
        for (int64_t c = 0; c < C; ++c)
            lpl_batch_stats_from_planes(pm, N, C, c, (double)hw, &chan_mean[c], &chan_std[c]);
    } else if (p->norm == LPL_NORM_BATCH) {
        /* Per-channel mean and unbiased std of y*keep over (n, h, w). */
        plane_sum = (double *)malloc(sizeof(double) * nplanes);
        plane_m2 = (double *)malloc(sizeof(double) * nplanes);
        chan_mean = (double *)malloc(sizeof(double) * nchan);
        chan_std = (double *)malloc(sizeof(double) * nchan);
        if (!plane_sum || !plane_m2 || !chan_mean || !chan_std) {
            snprintf(err, LPL_ERR_LEN, "out of host memory");
            goto fail;
        }
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
        for (int64_t pl = 0; pl < planes; ++pl) plane_moments(p, pl, &plane_sum[pl], &plane_m2[pl]);
        for (int64_t c = 0; c < C; ++c)
            lpl_channel_moments(plane_sum + c, plane_m2 + c, N, C, hw, &chan_mean[c], &chan_std[c]);
    }

    switch (p->dtype) {
    case LPL_FLOAT32: rc = fd_run_f32(p, coef, grad_coef ? grad_coef : coef, chan_mean, chan_std, err); break;
    case LPL_FLOAT64: rc = fd_run_f64(p, coef, grad_coef ? grad_coef : coef, chan_mean, chan_std, err); break;
    case LPL_FLOAT16: rc = fd_run_f16(p, coef, grad_coef ? grad_coef : coef, chan_mean, chan_std, err); break;
    case LPL_BFLOAT16: rc = fd_run_bf16(p, coef, grad_coef ? grad_coef : coef, chan_mean, chan_std, err); break;
    default: snprintf(err, LPL_ERR_LEN, "unsupported dtype"); rc = -1; break;
    }
fail:
    free(coef);
    free(grad_coef);
    free(plane_sum);
    free(plane_m2);
    free(chan_mean);
    free(chan_std);
    return rc;
}
