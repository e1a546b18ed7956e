/* Body of the CPU feature-distance kernel for one storage dtype. Included by
 * feature_distance_cpu.c once per dtype with these macros defined:
 *   FD_T          storage type of x, y, grad
 *   FD_ACC        arithmetic type (float, or double for float64 inputs)
 *   FD_LOAD(v)    FD_T -> FD_ACC
 *   FD_STORE(v)   FD_ACC -> FD_T
 *   FD_SUFFIX     name suffix
 *   FD_M(name)    suffixed math helper (lpl_xxx_f or lpl_xxx_d)
 * One work item is (sample n, tile of pixels [p0, p1)): all C channels of the tile are
 * visited while they stay in cache, so x, y and mask are read from memory once and the
 * gradient written once. */

#define FD_CAT2(a, b) a##_##b
#define FD_CAT(a, b) FD_CAT2(a, b)
#define FD_FN(name) FD_CAT(name, FD_SUFFIX)

/* Row kernels. Each is always inlined into a switch that passes its flags as literal
 * constants, so every combination compiles to its own branch-free loop that GCC
 * vectorizes (a runtime ternary per element kept these loops scalar). y is loaded
 * unconditionally and selected by the mask, never multiplied by it: a NaN under the mask
 * must not leak into the loss. */
#define FD_INLINE static inline __attribute__((always_inline))

/* The switches' cases are generated, never written out: one per combination of the flags,
 * the distances taken from LPL_DIST_LIST (lpl_math.h), so a new distance gets its loops
 * without touching fd_tile. A key packs the flags, the same way for the case labels and
 * the runtime switch. Defined once for all dtype instantiations (FD_FN expands at use). */
#ifndef FD_DISPATCH_MACROS
#define FD_DISPATCH_MACROS
#define FD_UNPACK(...) __VA_ARGS__
#define FD_APPLY(M, ...) M(__VA_ARGS__)
/* (has_mask, dist): the `default` norm's sweeps */
#define FD_KEY2(HM, DI) ((HM) * LPL_DIST_COUNT + (DI))
/* (has_mask, per_pixel, dist, has_grad): fd_row */
#define FD_KEY4(HM, PP, DI, HG) ((FD_KEY2(HM, DI) * 2 + (PP)) * 2 + (HG))
/* CASES2(CALL): `case key: CALL(HM, DI); break;` for every has_mask and distance */
#define FD_CASE2(CALL, HM, DI) \
    case FD_KEY2(HM, DI): CALL(HM, DI); break;
#define FD_CASE2_DIST(ctx, id, name) FD_APPLY(FD_CASE2, FD_UNPACK ctx, LPL_DIST_##id)
#define FD_CASES2(CALL) LPL_DIST_LIST(FD_CASE2_DIST, (CALL, 0)) LPL_DIST_LIST(FD_CASE2_DIST, (CALL, 1))
/* CASES4(CALL): the same for every has_mask, per_pixel, distance and has_grad */
#define FD_CASE4(CALL, HM, PP, DI) \
    case FD_KEY4(HM, PP, DI, 0): CALL(HM, PP, DI, 0); break; \
    case FD_KEY4(HM, PP, DI, 1): CALL(HM, PP, DI, 1); break;
#define FD_CASE4_DIST(ctx, id, name) FD_APPLY(FD_CASE4, FD_UNPACK ctx, LPL_DIST_##id)
#define FD_CASES4_PP(CALL, HM) \
    LPL_DIST_LIST(FD_CASE4_DIST, (CALL, HM, 0)) LPL_DIST_LIST(FD_CASE4_DIST, (CALL, HM, 1))
#define FD_CASES4(CALL) FD_CASES4_PP(CALL, 0) FD_CASES4_PP(CALL, 1)
#endif

/* v where the mask byte is nonzero, else +0. Done with an integer AND on the bits, not a
 * multiply (a NaN under the mask must not leak) nor a select (GCC 12 keeps loops with
 * byte-conditioned float selects scalar). */
/* 1 where the mask byte is nonzero, else 0, by integer arithmetic only: written as
 * `(float)(m != 0)` GCC 12 turns it into a branch in some row kernels, which then stay
 * scalar ("control flow in loop"). (0 - m) has bit 31 set exactly when m != 0. */
FD_INLINE uint32_t FD_FN(fd_keep_bit)(uint8_t m) { return (0u - (uint32_t)m) >> 31; }

FD_INLINE FD_ACC FD_FN(fd_keep_select)(FD_ACC v, uint8_t keep) {
    /* A union, not memcpy: memcpy takes the address of a local, which under `omp simd`
     * becomes a per-lane array and keeps the whole loop scalar. C11 allows the pun. */
    union {
        FD_ACC f;
        FD_UINT u;
    } pun;
    pun.f = v;
    pun.u &= (FD_UINT)0 - (FD_UINT)FD_FN(fd_keep_bit)(keep);
    return pun.f;
}

/* Sum and sum of squared deviations of y*keep over one plane (batch norm statistics),
 * in double. Two branch-free loops, with and without a mask, like the row kernels. */
FD_INLINE void FD_FN(fd_plane_moments_impl)(const FD_T *restrict y, const uint8_t *restrict m,
                                            int64_t hw, double *sum, double *m2,
                                            const int has_mask) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < hw; ++i)
        s += (double)FD_FN(fd_keep_select)(FD_LOAD(y[i]), has_mask ? m[i] : 1);
    const double mean = hw > 0 ? s / (double)hw : 0.0;
    double q = 0.0;
#pragma omp simd reduction(+ : q)
    for (int64_t i = 0; i < hw; ++i) {
        const double v = (double)FD_FN(fd_keep_select)(FD_LOAD(y[i]), has_mask ? m[i] : 1) - mean;
        q += v * v;
    }
    *sum = s;
    *m2 = q;
}

static void FD_FN(fd_plane_moments)(const FD_T *y, const uint8_t *m, int64_t hw, double *sum,
                                    double *m2) {
    if (m != NULL)
        FD_FN(fd_plane_moments_impl)(y, m, hw, sum, m2, 1);
    else
        FD_FN(fd_plane_moments_impl)(y, NULL, hw, sum, m2, 0);
}

/* shared / batch / none: d = (x - b) s - (y - b) s with s per pixel (shared) or per
 * channel (batch, none); returns sum of keep * e, writes the gradient when has_grad. */
FD_INLINE FD_ACC FD_FN(fd_row)(const FD_T *restrict xr, const FD_T *restrict yr,
                               const uint8_t *restrict mr, FD_T *restrict gr,
                               const FD_ACC *restrict scale_px, FD_ACC a, FD_ACC b, FD_ACC cf,
                               int64_t len, const int has_mask, const int per_pixel,
                               const int dist, const int has_grad) {
    FD_ACC s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < len; ++i) {
        const FD_ACC k = has_mask ? (FD_ACC)(int32_t)FD_FN(fd_keep_bit)(mr[i]) : (FD_ACC)1;
        const FD_ACC yv = FD_FN(fd_keep_select)(FD_LOAD(yr[i]), has_mask ? mr[i] : 1);
        const FD_ACC sc = per_pixel ? scale_px[i] : a;
        const FD_ACC d = (FD_LOAD(xr[i]) - b) * sc - (yv - b) * sc;
        s += k * FD_M(lpl_dist_value)(d, dist);
        if (has_grad) gr[i] = FD_STORE(cf * k * FD_M(lpl_dist_deriv)(d, dist) * sc);
    }
    return s;
}

/* default, sweep 2: d = x rx - y ry; returns sum of keep * e, accumulates sum_c g_c x_c. */
FD_INLINE FD_ACC FD_FN(fd_row_default)(const FD_T *restrict xr, const FD_T *restrict yr,
                                       const uint8_t *restrict mr, const FD_ACC *restrict rx,
                                       const FD_ACC *restrict ry, FD_ACC *restrict dot, FD_ACC cf,
                                       int64_t len, const int has_mask, const int dist) {
    FD_ACC s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < len; ++i) {
        const FD_ACC k = has_mask ? (FD_ACC)(int32_t)FD_FN(fd_keep_bit)(mr[i]) : (FD_ACC)1;
        const FD_ACC xv = FD_LOAD(xr[i]);
        const FD_ACC yv = FD_FN(fd_keep_select)(FD_LOAD(yr[i]), has_mask ? mr[i] : 1);
        const FD_ACC d = xv * rx[i] - yv * ry[i];
        s += k * FD_M(lpl_dist_value)(d, dist);
        dot[i] += cf * k * FD_M(lpl_dist_deriv)(d, dist) * xv;
    }
    return s;
}

/* default, sweep 3: the gradient through |x| (needs the whole column's dot). */
FD_INLINE void FD_FN(fd_grad_default)(const FD_T *restrict xr, const FD_T *restrict yr,
                                      const uint8_t *restrict mr, FD_T *restrict gr,
                                      const FD_ACC *restrict rx, const FD_ACC *restrict ry,
                                      const FD_ACC *restrict q, FD_ACC cf, int64_t len,
                                      const int has_mask, const int dist) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
        const FD_ACC k = has_mask ? (FD_ACC)(int32_t)FD_FN(fd_keep_bit)(mr[i]) : (FD_ACC)1;
        const FD_ACC xv = FD_LOAD(xr[i]);
        const FD_ACC yv = FD_FN(fd_keep_select)(FD_LOAD(yr[i]), has_mask ? mr[i] : 1);
        const FD_ACC d = xv * rx[i] - yv * ry[i];
        const FD_ACC g = cf * k * FD_M(lpl_dist_deriv)(d, dist);
        gr[i] = FD_STORE(FD_M(lpl_default_norm_grad)(g, xv, rx[i], q[i]));
    }
}

/* channel-norm sweep: acc[i] += v^2 over one channel row (v = y*keep, or x). */
FD_INLINE void FD_FN(fd_sumsq)(const FD_T *restrict vr, const uint8_t *restrict mr,
                               FD_ACC *restrict acc, int64_t len, const int has_mask) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
        const FD_ACC v = FD_FN(fd_keep_select)(FD_LOAD(vr[i]), has_mask ? mr[i] : 1);
        acc[i] += v * v;
    }
}

#ifndef FD_SCRATCH_ROWS
/* sx, sy, |x|, dot, and the tree stacks of sx, sy and dot */
#define FD_SCRATCH_ROWS (4 + 3 * LPL_PIXEL_TREE_LEVELS)
#endif

/* One chunk's per-pixel sums `cur` joins the pairwise tree of lpl_math.h (chunks come in
 * order 0..7, `stack` holds LPL_PIXEL_TREE_LEVELS rows of pending left operands, as a
 * binary counter). After the last chunk, cur holds the pixel's total. */
FD_INLINE void FD_FN(fd_tree_push)(FD_ACC *restrict cur, FD_ACC *restrict stack, int64_t chunk, int64_t len,
                                   int64_t tile) {
    int level = 0;
    while ((chunk >> level) & 1) {
        const FD_ACC *restrict left = stack + (int64_t)level * tile;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) cur[i] = left[i] + cur[i];
        ++level;
    }
    if (level < LPL_PIXEL_TREE_LEVELS) memcpy(stack + (int64_t)level * tile, cur, sizeof(FD_ACC) * (size_t)len);
}

/* Per-tile work. scratch holds FD_SCRATCH_ROWS * tile FD_ACC values owned by the calling thread;
 * sums[n * C + c] accumulates sum over the tile of keep * e; grad_coef[n * C + c] is the
 * gradient's plane coefficient (the loss's coef times the folded grad_scale[n]). */
static void FD_FN(fd_tile)(const lpl_fd_params *p, const double *grad_coef, const FD_ACC *chan_scale,
                           const FD_ACC *chan_shift, int64_t n, int64_t p0, int64_t p1,
                           FD_ACC *scratch, int64_t tile, double *sums) {
    const int64_t C = p->c, hw = p->hw, len = p1 - p0;
    const FD_T *X = (const FD_T *)p->x;
    const FD_T *Y = (const FD_T *)p->y;
    FD_T *G = (FD_T *)p->grad;
    const uint8_t *Mk = p->mask;
    const int norm = p->norm, dist = p->dist, has_mask = Mk != NULL;
    FD_ACC *sx = scratch;             /* default: sum x^2, then 1/(|x|+eps) */
    FD_ACC *sy = scratch + tile;      /* sum y^2, then 1/(|y|+eps) */
    FD_ACC *nxv = scratch + 2 * tile; /* default: |x| */
    FD_ACC *dot = scratch + 3 * tile; /* default: sum_c g_c x_c */
    /* the pending tree operands of sx, sy, dot (LPL_PIXEL_TREE_LEVELS rows each) */
    FD_ACC *stack_x = scratch + 4 * tile, *stack_y = stack_x + LPL_PIXEL_TREE_LEVELS * tile;
    FD_ACC *stack_dot = stack_y + LPL_PIXEL_TREE_LEVELS * tile;

    if (norm == LPL_NORM_DEFAULT || norm == LPL_NORM_SHARED) {
        /* channel chunks in the order of lpl_math.h (the CUDA kernels' order) */
        for (int64_t k = 0; k < LPL_PIXEL_CHUNKS; ++k) {
            for (int64_t i = 0; i < len; ++i) sx[i] = sy[i] = 0;
            for (int64_t c = lpl_pixel_chunk_begin(k, C); c < lpl_pixel_chunk_begin(k + 1, C); ++c) {
                const int64_t off = (n * C + c) * hw + p0;
                if (norm == LPL_NORM_DEFAULT) FD_FN(fd_sumsq)(X + off, NULL, sx, len, 0);
                if (has_mask)
                    FD_FN(fd_sumsq)(Y + off, Mk + off, sy, len, 1);
                else
                    FD_FN(fd_sumsq)(Y + off, NULL, sy, len, 0);
            }
            if (norm == LPL_NORM_DEFAULT) FD_FN(fd_tree_push)(sx, stack_x, k, len, tile);
            FD_FN(fd_tree_push)(sy, stack_y, k, len, tile);
        }
        const double eps = norm == LPL_NORM_DEFAULT ? LPL_EPS_DEFAULT : LPL_EPS_SHARED;
        for (int64_t i = 0; i < len; ++i) {
            if (norm == LPL_NORM_DEFAULT) {
                nxv[i] = (FD_ACC)sqrt((double)sx[i]);
                sx[i] = FD_M(lpl_inv_norm)(sx[i], eps);
            }
            sy[i] = FD_M(lpl_inv_norm)(sy[i], eps);
        }
    }

    int64_t chunk = 0, chunk_end = lpl_pixel_chunk_begin(1, C); /* default: dot's chunks */
    if (norm == LPL_NORM_DEFAULT)
        for (int64_t i = 0; i < len; ++i) dot[i] = 0;
    for (int64_t c = 0; c < C; ++c) {
        const int64_t off = (n * C + c) * hw + p0;
        const FD_T *xr = X + off;
        const FD_T *yr = Y + off;
        const uint8_t *mr = has_mask ? Mk + off : NULL;
        FD_T *gr = G ? G + off : NULL;
        const FD_ACC cf = (FD_ACC)grad_coef[n * C + c];
        FD_ACC s = 0;
        if (norm == LPL_NORM_DEFAULT) {
            while (c >= chunk_end) { /* chunks before c's (empty ones included) are complete */
                FD_FN(fd_tree_push)(dot, stack_dot, chunk, len, tile);
                for (int64_t i = 0; i < len; ++i) dot[i] = 0;
                chunk_end = lpl_pixel_chunk_begin(++chunk + 1, C);
            }
        }
        if (norm == LPL_NORM_DEFAULT) {
#define FD_DEF(HM, DI) s = FD_FN(fd_row_default)(xr, yr, mr, sx, sy, dot, cf, len, HM, DI)
            switch (FD_KEY2(has_mask, dist)) {
                FD_CASES2(FD_DEF)
            default: break; /* unreachable: dist is validated by the entry point */
            }
#undef FD_DEF
        } else {
            /* shared: per-pixel scale; batch: per-channel scale and shift; none: 1, 0 */
            const FD_ACC a = norm == LPL_NORM_BATCH ? chan_scale[c] : (FD_ACC)1;
            const FD_ACC b = norm == LPL_NORM_BATCH ? chan_shift[c] : (FD_ACC)0;
            const int per_pixel = norm == LPL_NORM_SHARED;
#define FD_ROW(HM, PP, DI, HG) s = FD_FN(fd_row)(xr, yr, mr, gr, sy, a, b, cf, len, HM, PP, DI, HG)
            switch (FD_KEY4(has_mask, per_pixel, dist, gr != NULL)) {
                FD_CASES4(FD_ROW)
            default: break; /* unreachable: dist is validated by the entry point */
            }
#undef FD_ROW
        }
        sums[n * C + c] += (double)s;
    }
    if (norm == LPL_NORM_DEFAULT) /* the remaining chunks: the last non-empty one, then empty ones */
        for (; chunk < LPL_PIXEL_CHUNKS; ++chunk) {
            FD_FN(fd_tree_push)(dot, stack_dot, chunk, len, tile);
            if (chunk + 1 < LPL_PIXEL_CHUNKS)
                for (int64_t i = 0; i < len; ++i) dot[i] = 0;
        }

    if (norm == LPL_NORM_DEFAULT && G) {
        /* The gradient through |x| needs sum_c g_c x_c of the whole pixel column, so it is
         * written in a third sweep over the (cached) tile, after one per-pixel pass turns
         * that sum into the coefficient q of x (in place of dot). */
        for (int64_t i = 0; i < len; ++i) dot[i] = FD_M(lpl_default_norm_coef)(sx[i], nxv[i], dot[i]);
        for (int64_t c = 0; c < C; ++c) {
            const int64_t off = (n * C + c) * hw + p0;
            const FD_T *xr = X + off;
            const FD_T *yr = Y + off;
            const uint8_t *mr = has_mask ? Mk + off : NULL;
            FD_T *gr = G + off;
            const FD_ACC cf = (FD_ACC)grad_coef[n * C + c];
#define FD_GD(HM, DI) FD_FN(fd_grad_default)(xr, yr, mr, gr, sx, sy, dot, cf, len, HM, DI)
            switch (FD_KEY2(has_mask, dist)) {
                FD_CASES2(FD_GD)
            default: break; /* unreachable: dist is validated by the entry point */
            }
#undef FD_GD
        }
    }
}

static int FD_FN(fd_run)(const lpl_fd_params *p, const double *coef, const double *grad_coef, const double *chan_mean,
                         const double *chan_std, char *err) {
    const int64_t N = p->n, C = p->c, hw = p->hw;
    FD_ACC *chan_scale = NULL, *chan_shift = NULL;
    double *all_sums = NULL;
    int rc = -1, nthreads = 1, failed = 0;
    int64_t esize = (int64_t)sizeof(FD_T);
    /* Tile size. `none` and `batch` have no cross-channel step: long contiguous rows
     * stream best. `default` and `shared` revisit every channel of a tile after the
     * channel-norm sweep, so the tile of all channels of x, y, mask (and grad) is sized to
     * stay in this core's share of the last-level cache (~4 MiB): one DRAM read each. */
    int64_t tile;
    if (p->norm == LPL_NORM_NONE || p->norm == LPL_NORM_BATCH) {
        tile = 16384;
    } else {
        int64_t per_pixel = C * (3 * esize + 1);
        tile = per_pixel > 0 ? LPL_FD_TILE_BYTES / per_pixel : hw;
        if (tile < 256) tile = 256;
        if (tile > 16384) tile = 16384;
        tile = (tile / 16) * 16;
    }
    if (tile > hw) tile = hw;
    if (tile < 1) tile = 1;
    const int64_t ntiles = (hw + tile - 1) / tile;
    const int64_t nitems = N * ntiles;

    chan_scale = (FD_ACC *)malloc(sizeof(FD_ACC) * (size_t)(C > 0 ? C : 1));
    chan_shift = (FD_ACC *)malloc(sizeof(FD_ACC) * (size_t)(C > 0 ? C : 1));
    if (!chan_scale || !chan_shift) {
        snprintf(err, LPL_ERR_LEN, "out of host memory for channel statistics");
        goto fail;
    }
    for (int64_t c = 0; c < C; ++c) {
        chan_scale[c] = chan_std ? (FD_ACC)(1.0 / (chan_std[c] + LPL_EPS_BATCH)) : (FD_ACC)1;
        chan_shift[c] = chan_mean ? (FD_ACC)chan_mean[c] : (FD_ACC)0;
    }
#ifdef _OPENMP
    nthreads = omp_get_max_threads();
    if ((int64_t)nthreads > nitems) nthreads = nitems > 0 ? (int)nitems : 1;
    if (N * C * hw < LPL_FD_PARALLEL_MIN) nthreads = 1;
#endif
    all_sums = (double *)calloc((size_t)nthreads * (size_t)(N * C > 0 ? N * C : 1), sizeof(double));
    if (!all_sums) {
        snprintf(err, LPL_ERR_LEN, "out of host memory for partial sums");
        goto fail;
    }

#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        double *sums = all_sums + (size_t)tid * (size_t)(N * C);
        FD_ACC *scratch = (FD_ACC *)malloc(sizeof(FD_ACC) * FD_SCRATCH_ROWS * (size_t)tile);
        if (!scratch) failed = 1;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < nitems; ++item) {
            if (!scratch) continue;
            const int64_t n = item / ntiles, t = item % ntiles;
            const int64_t p0 = t * tile;
            const int64_t p1 = p0 + tile < hw ? p0 + tile : hw;
            FD_FN(fd_tile)(p, grad_coef, chan_scale, chan_shift, n, p0, p1, scratch, tile, sums);
        }
        free(scratch);
    }
    if (failed) {
        snprintf(err, LPL_ERR_LEN, "out of host memory for tile scratch");
        goto fail;
    }
    /* Reduce per-thread partial sums in thread order: deterministic for a thread count. */
    for (int64_t n = 0; n < N; ++n) {
        double total = 0.0;
        for (int64_t c = 0; c < C; ++c) {
            double s = 0.0;
            for (int t = 0; t < nthreads; ++t) s += all_sums[(size_t)t * (size_t)(N * C) + n * C + c];
            total += coef[n * C + c] * s;
        }
        p->loss[n] = total;
    }
    rc = 0;
fail:
    free(chan_scale);
    free(chan_shift);
    free(all_sums);
    return rc;
}

#undef FD_FN
#undef FD_INLINE
#undef FD_CAT
#undef FD_CAT2
