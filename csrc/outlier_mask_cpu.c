/* CPU implementation of the outlier keep-mask (docs/spec.md, "Outlier mask").
 *
 * Per (n, c) plane, over the finite values only (NaN and +-Inf are never kept and are
 * left out of the order statistics and of the std):
 *   pass 1  count, sum, min/max order key and a histogram of the top 16 bits of the
 *           order-preserving key (16-bit dtypes: the whole key, so the histogram alone
 *           gives the exact order statistics);
 *   pass 2  sum of squared deviations from the mean, and a gather of the keys that fall
 *           into the two histogram buckets holding ranks k1 and k2;
 *   select  MSD radix select (8-bit digits) on those few keys: exact order statistics
 *           without sorting; small planes select on a copy of all their keys;
 *   masks   keep0 = lo < y < hi fused with the row pass of the closing (max filter),
 *           column pass of the closing, row and column passes of the opening (min
 *           filter), AND finite, and the kept-value moments for the layer statistics.
 * The masks are 0/1 bytes, so the max / min filters are byte OR / AND.
 *
 * Sums: every floating sum (the finite sum, the deviations, the kept moments) and the
 * merge of the planes into the layer statistics follow the one reduction order of
 * lpl_kernel_abi.h (tiles of 32 x 64 values, 256 lanes per tile, fixed pairwise trees),
 * which the CUDA kernels follow too: the results are the same bits for any thread count
 * and on the GPU. A pass walks a band of 32 rows (one row of tiles) row by row, each value
 * added to its lane's accumulator (lpl_om_lane), and closes the band's tiles with the
 * lane tree.
 *
 * Parallelism: OpenMP over planes; when there are fewer planes than threads and the
 * planes are large, the whole team works on one plane at a time, split by bands of
 * tiles, with per-thread histograms; the per-tile partials are combined by thread 0 in
 * the fixed tree. This file instantiates its dtype-specific passes by including itself
 * once per storage dtype (OM_TEMPLATE_PASS). */
#ifndef OM_TEMPLATE_PASS

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "lpl_math.h"
#include "lpl_ops.h"
#include "lpl_tensor.h"

#define OM_HIST_BITS 16
#define OM_HIST_BINS (1 << OM_HIST_BITS)
/* Planes with at most this many values select on a copy of all their keys (no 256 KiB
 * histogram to clear per plane). */
#define OM_DIRECT_MAX 4096
/* Smallest plane worth splitting across the team when planes are fewer than threads. */
#define OM_TEAM_MIN_LEN 32768

/* Scratch and per-plane results of a team of nthr threads working on one plane. */
typedef struct {
    const lpl_om_params *p;
    int64_t h, w, len;
    int64_t tiles_x, tiles_y, tiles; /* the reduction tiles (lpl_kernel_abi.h) */
    int nthr;
    int direct;          /* select on a copy of all keys (small planes) */
    int failed;          /* allocation failure inside the parallel region */
    /* per thread (index tid) */
    uint32_t *hist;      /* nthr * OM_HIST_BINS, NULL in direct mode */
    uint8_t *rowbuf;     /* nthr * w */
    double *lanes;       /* nthr * 2 * tiles_x * LPL_OM_LANES: lane accumulators of a band */
    int64_t *tcount;     /* nthr * tiles_x: finite / kept counts of a band's tiles */
    uint64_t *tkey;      /* nthr * 2: min and max key */
    int64_t *toff;       /* nthr * 2: where thread tid writes its candidates */
    /* shared */
    double *tile_part;   /* tiles * 4: per-tile count, sum | sum_sq, sum_dev | kept, s1, s2 */
    uint32_t *hmerged;   /* OM_HIST_BINS, team mode only */
    uint8_t *tmp;        /* len: intermediate mask */
    uint64_t *cand;      /* candidate keys, capacity cand_cap */
    int64_t cand_cap;
    /* per-plane results */
    double count, mean, lo, hi;
    int64_t b1, b2, r1, r2, n1, n2;
    int is_const;
} om_team;

/* k-th smallest (1-based) of a[0..n), all of which agree on the bits above shift + 8:
 * MSD radix select with 8-bit digits, compacting the matching digit's keys to the
 * front each round. O(n) per digit, ties included. */
static uint64_t om_radix_select(uint64_t *a, int64_t n, int64_t k, int shift) {
    int64_t cnt[256];
    while (n > 1 && shift >= 0) {
        memset(cnt, 0, sizeof(cnt));
        for (int64_t i = 0; i < n; ++i) cnt[(a[i] >> shift) & 255u]++;
        int d = 0;
        while (k > cnt[d]) {
            k -= cnt[d];
            ++d;
        }
        if (cnt[d] != n) {
            int64_t j = 0;
            for (int64_t i = 0; i < n; ++i)
                if ((int)((a[i] >> shift) & 255u) == d) a[j++] = a[i];
        }
        n = cnt[d];
        shift -= 8;
    }
    return a[0];
}

/* Bucket holding the rank-th smallest (1-based) value, and the rank inside it. */
static void om_hist_find(const uint32_t *hist, int64_t rank, int64_t *bucket, int64_t *rank_in) {
    int64_t before = 0;
    for (int64_t b = 0; b < OM_HIST_BINS; ++b) {
        if (before + (int64_t)hist[b] >= rank) {
            *bucket = b;
            *rank_in = rank - before;
            return;
        }
        before += hist[b];
    }
    *bucket = OM_HIST_BINS - 1;
    *rank_in = 1;
}

static int om_reserve(om_team *t, int64_t n) {
    if (n <= t->cand_cap) return 0;
    int64_t cap = n > 2 * t->cand_cap ? n : 2 * t->cand_cap;
    uint64_t *c = (uint64_t *)realloc(t->cand, (size_t)cap * sizeof(uint64_t));
    if (!c) return -1;
    t->cand = c;
    t->cand_cap = cap;
    return 0;
}

/* out[x] = OR (max) of in[x - r .. x + r] clipped to the row: max-pool border rule. */
static void om_row_or(const uint8_t *in, uint8_t *out, int64_t w, int64_t r) {
    memcpy(out, in, (size_t)w);
    for (int64_t d = 1; d <= r; ++d) {
        for (int64_t x = 0; x + d < w; ++x) out[x] |= in[x + d];
        for (int64_t x = d; x < w; ++x) out[x] |= in[x - d];
    }
}

/* out[x] = AND (min) of in[x - r .. x + r] clipped to the row. */
static void om_row_and(const uint8_t *in, uint8_t *out, int64_t w, int64_t r) {
    memcpy(out, in, (size_t)w);
    for (int64_t d = 1; d <= r; ++d) {
        for (int64_t x = 0; x + d < w; ++x) out[x] &= in[x + d];
        for (int64_t x = d; x < w; ++x) out[x] &= in[x - d];
    }
}

/* Rows [row0, row1) of dst = OR over rows y - r .. y + r (clipped) of src. */
static void om_col_or(const uint8_t *src, uint8_t *dst, int64_t h, int64_t w, int64_t row0,
                      int64_t row1, int64_t r) {
    for (int64_t y = row0; y < row1; ++y) {
        uint8_t *o = dst + y * w;
        int64_t a = y - r < 0 ? 0 : y - r, b = y + r > h - 1 ? h - 1 : y + r;
        memcpy(o, src + a * w, (size_t)w);
        for (int64_t yy = a + 1; yy <= b; ++yy) {
            const uint8_t *s = src + yy * w;
            for (int64_t x = 0; x < w; ++x) o[x] |= s[x];
        }
    }
}

/* out = AND over rows y - r .. y + r (clipped) of src, for one row y. */
static void om_col_and_row(const uint8_t *src, uint8_t *out, int64_t h, int64_t w, int64_t y,
                           int64_t r) {
    int64_t a = y - r < 0 ? 0 : y - r, b = y + r > h - 1 ? h - 1 : y + r;
    memcpy(out, src + a * w, (size_t)w);
    for (int64_t yy = a + 1; yy <= b; ++yy) {
        const uint8_t *s = src + yy * w;
        for (int64_t x = 0; x < w; ++x) out[x] &= s[x];
    }
}

/* The lane tree (lpl_om_tree over the LPL_OM_LANES lane sums, lpl_kernel_abi.h step 3):
 * lpl_om_tree_sum(a, LPL_OM_LANES, 1, 1) with the trip counts fixed, so it can vectorize. */
static void om_lane_tree(double *a) {
    for (int s = LPL_OM_LANES / 2; s > 0; s >>= 1)
        for (int i = 0; i < s; ++i) a[i] += a[i + s];
}

/* ---- dtype-specific passes ---------------------------------------------------------- */
#define OM_TEMPLATE_PASS 1

#define OM_SFX f32
#define OM_T float
#define OM_V float
#define OM_LOAD(r) (r)
#define OM_FINITE(r) lpl_isfinite_f(r)
#define OM_KEY(r) ((uint64_t)lpl_float_sort_key(r))
#define OM_KEYBITS 32
#include "outlier_mask_cpu.c"

#define OM_SFX f64
#define OM_T double
#define OM_V double
#define OM_LOAD(r) (r)
#define OM_FINITE(r) lpl_isfinite_d(r)
#define OM_KEY(r) lpl_double_sort_key(r)
#define OM_KEYBITS 64
#include "outlier_mask_cpu.c"

#define OM_SFX f16
#define OM_T uint16_t
#define OM_V float
#define OM_LOAD(r) lpl_half_to_float(r)
#define OM_FINITE(r) lpl_om_isfinite_f16(r)
#define OM_KEY(r) ((uint64_t)lpl_om_key16(r))
#define OM_KEYBITS 16
#include "outlier_mask_cpu.c"

#define OM_SFX bf16
#define OM_T uint16_t
#define OM_V float
#define OM_LOAD(r) lpl_bf16_to_float(r)
#define OM_FINITE(r) lpl_om_isfinite_bf16(r)
#define OM_KEY(r) ((uint64_t)lpl_om_key16(r))
#define OM_KEYBITS 16
#include "outlier_mask_cpu.c"

#undef OM_TEMPLATE_PASS

/* ---- per-plane driver ----------------------------------------------------------------- */

#define OM_DISPATCH(fn, ...)                                                        \
    do {                                                                            \
        switch (t->p->dtype) {                                                      \
        case LPL_FLOAT32: fn##_f32(__VA_ARGS__); break;                             \
        case LPL_FLOAT64: fn##_f64(__VA_ARGS__); break;                             \
        case LPL_FLOAT16: fn##_f16(__VA_ARGS__); break;                             \
        default: fn##_bf16(__VA_ARGS__); break;                                     \
        }                                                                           \
    } while (0)

static int om_keybits(int dtype) {
    return dtype == LPL_FLOAT64 ? 64 : dtype == LPL_FLOAT32 ? 32 : 16;
}

static void om_barrier(const om_team *t) {
    if (t->nthr > 1) {
#pragma omp barrier
    }
}

/* Phase run by thread 0 after pass 1: merged counts, mean, ranks, buckets and where each
 * thread writes its candidate keys. */
static void om_after_pass1(om_team *t) {
    const lpl_om_params *p = t->p;
    lpl_om_tree_sum(t->tile_part, t->tiles, 4, 2); /* count (exact), sum */
    const double count = t->tile_part[0], sum = t->tile_part[1];
    uint64_t kmin = UINT64_MAX, kmax = 0;
    for (int i = 0; i < t->nthr; ++i) {
        if (t->tkey[2 * i] < kmin) kmin = t->tkey[2 * i];
        if (t->tkey[2 * i + 1] > kmax) kmax = t->tkey[2 * i + 1];
    }
    t->count = count;
    t->mean = count > 0.0 ? sum / count : 0.0;
    t->is_const = count > 0.0 && kmin == kmax;
    if (count <= 0.0) return;
    const int64_t cnt = (int64_t)count;
    t->r1 = lpl_quantile_rank(cnt, p->quantile);
    t->r2 = lpl_quantile_rank(cnt, 1.0 - p->quantile);
    if (t->is_const) {
        /* every order statistic is the single value; the mean is that value exactly */
        t->mean = lpl_om_key_to_double(kmin, p->dtype);
        t->b1 = t->b2 = -1;
        t->n1 = t->n2 = 0;
        t->cand[0] = kmin;
        return;
    }
    if (t->direct) {
        /* pass 1 stored all cnt keys in cand[0..cnt): second copy for the second rank */
        memcpy(t->cand + cnt, t->cand, (size_t)cnt * sizeof(uint64_t));
        t->b1 = t->b2 = -1;
        return;
    }
    const uint32_t *hist = t->hist;
    if (t->nthr > 1) {
        for (int64_t b = 0; b < OM_HIST_BINS; ++b) {
            uint32_t s = 0;
            for (int i = 0; i < t->nthr; ++i) s += t->hist[(int64_t)i * OM_HIST_BINS + b];
            t->hmerged[b] = s;
        }
        hist = t->hmerged;
    }
    int64_t r1, r2;
    om_hist_find(hist, t->r1, &t->b1, &r1);
    om_hist_find(hist, t->r2, &t->b2, &r2);
    t->r1 = r1;
    t->r2 = r2;
    if (om_keybits(p->dtype) == 16) {
        t->n1 = t->n2 = 0; /* the bucket is the key */
        return;
    }
    t->n1 = hist[t->b1];
    t->n2 = hist[t->b2];
    if (om_reserve(t, t->n1 + t->n2) < 0) {
        t->failed = 1;
        t->n1 = t->n2 = 0;
        return;
    }
    int64_t o1 = 0, o2 = t->n1;
    for (int i = 0; i < t->nthr; ++i) {
        t->toff[2 * i] = o1;
        t->toff[2 * i + 1] = o2;
        o1 += t->hist[(int64_t)i * OM_HIST_BINS + t->b1];
        o2 += t->hist[(int64_t)i * OM_HIST_BINS + t->b2];
    }
}

/* Phase run by thread 0 after pass 2: std, order statistics, thresholds. */
static void om_after_pass2(om_team *t) {
    const lpl_om_params *p = t->p;
    if (t->count <= 0.0 || t->failed) {
        t->lo = t->hi = NAN; /* nothing kept */
        return;
    }
    double sum_sq = 0.0, sum_dev = 0.0;
    if (!t->is_const) {
        lpl_om_tree_sum(t->tile_part + 2, t->tiles, 4, 2);
        sum_sq = t->tile_part[2];
        sum_dev = t->tile_part[3];
    }
    const double std_d = lpl_om_sample_std(t->count, sum_sq, sum_dev, t->is_const);
    const int bits = om_keybits(p->dtype);
    uint64_t k1, k2;
    if (t->is_const) {
        k1 = k2 = t->cand[0];
    } else if (t->direct) {
        const int64_t cnt = (int64_t)t->count;
        k1 = om_radix_select(t->cand, cnt, t->r1, bits - 8);
        k2 = om_radix_select(t->cand + cnt, cnt, t->r2, bits - 8);
    } else if (bits == 16) {
        k1 = (uint64_t)t->b1;
        k2 = (uint64_t)t->b2;
    } else {
        k1 = om_radix_select(t->cand, t->n1, t->r1, bits - OM_HIST_BITS - 8);
        k2 = om_radix_select(t->cand + t->n1, t->n2, t->r2, bits - OM_HIST_BITS - 8);
    }
    const double q1 = lpl_om_key_to_double(k1, p->dtype);
    const double q2 = lpl_om_key_to_double(k2, p->dtype);
    lpl_om_thresholds(p->dtype, q1, q2, std_d, p->margin_std, &t->lo, &t->hi);
}

/* The whole pipeline for one plane, run by the nthr threads of the team (tid), each on
 * its bands of tiles (rows [row0, row1)). */
static void om_plane(om_team *t, int64_t plane, int tid, double *plane_moments) {
    const lpl_om_params *p = t->p;
    const int64_t h = t->h, w = t->w, len = t->len;
    const int64_t band0 = t->tiles_y * tid / t->nthr, band1 = t->tiles_y * (tid + 1) / t->nthr;
    const int64_t row0 = band0 * LPL_OM_TILE_H, row1 = band1 * LPL_OM_TILE_H < h ? band1 * LPL_OM_TILE_H : h;
    const size_t esize = p->dtype == LPL_FLOAT64 ? 8 : p->dtype == LPL_FLOAT32 ? 4 : 2;
    const void *y = (const char *)p->y + (size_t)(plane * len) * esize;
    uint8_t *keep = p->keep + plane * len;
    uint32_t *hist = t->direct ? NULL : t->hist + (int64_t)tid * OM_HIST_BINS;
    uint8_t *rowbuf = t->rowbuf + (int64_t)tid * w;
    double *lanes = t->lanes + (int64_t)tid * 2 * t->tiles_x * LPL_OM_LANES;
    int64_t *tcount = t->tcount + (int64_t)tid * t->tiles_x;

    /* pass 1 */
    if (hist) memset(hist, 0, OM_HIST_BINS * sizeof(uint32_t));
    OM_DISPATCH(om_pass1, y, h, w, t->tiles_x, band0, band1, hist, t->direct ? t->cand : NULL, lanes, tcount,
                t->tile_part, t->tkey + 2 * tid);
    om_barrier(t);
    if (tid == 0) om_after_pass1(t);
    om_barrier(t);

    /* pass 2 */
    if (t->count > 0.0 && !t->failed) {
        uint64_t *c1 = NULL, *c2 = NULL;
        if (t->n1 + t->n2 > 0) {
            c1 = t->cand + t->toff[2 * tid];
            c2 = t->cand + t->toff[2 * tid + 1];
        }
        OM_DISPATCH(om_pass2, y, h, w, t->tiles_x, band0, band1, t->mean, t->b1, t->b2, c1, c2, lanes,
                    t->tile_part, t->is_const);
    }
    om_barrier(t);
    if (tid == 0) om_after_pass2(t);
    om_barrier(t);

    /* keep0 and the row pass of the closing, then its column pass */
    const int64_t rc = (p->closing - 1) / 2, ro = (p->opening - 1) / 2;
    OM_DISPATCH(om_keep_rows, y, w, row0, row1, t->lo, t->hi, rc, rowbuf, t->tmp);
    om_barrier(t);
    om_col_or(t->tmp, keep, h, w, row0, row1, rc);
    om_barrier(t);
    /* opening: row pass into tmp, column pass + AND finite into keep, with moments */
    for (int64_t r = row0; r < row1; ++r) om_row_and(keep + r * w, t->tmp + r * w, w, ro);
    om_barrier(t);
    OM_DISPATCH(om_final_bands, y, keep, t->tmp, h, w, t->tiles_x, band0, band1, ro, t->mean, rowbuf, lanes,
                tcount, t->tile_part);
    om_barrier(t);
    if (tid == 0) {
        lpl_om_tree_sum(t->tile_part, t->tiles, 4, 3);
        const double kept = t->tile_part[0];
        double s1 = t->tile_part[1], s2 = t->tile_part[2];
        /* masked positions count as 0: (0 - K) each, K = the finite mean used as shift */
        const double zeros = (double)len - kept, k = t->mean;
        s1 -= zeros * k;
        s2 += zeros * k * k;
        double m2 = len > 0 ? s2 - s1 * s1 / (double)len : 0.0;
        double *row = plane_moments + LPL_PM_COMPONENTS * plane; /* lpl_kernel_abi.h's layout */
        row[LPL_PM_MEAN] = len > 0 ? k + s1 / (double)len : 0.0;
        row[LPL_PM_M2] = m2 > 0.0 ? m2 : 0.0;
        row[LPL_PM_KEPT] = kept;
    }
    om_barrier(t);
}

static void om_team_free(om_team *t) {
    free(t->hist);
    free(t->rowbuf);
    free(t->lanes);
    free(t->tcount);
    free(t->tkey);
    free(t->toff);
    free(t->tile_part);
    free(t->hmerged);
    free(t->tmp);
    free(t->cand);
}

static int om_team_init(om_team *t, const lpl_om_params *p, int nthr) {
    memset(t, 0, sizeof(*t));
    t->p = p;
    t->h = p->h;
    t->w = p->w;
    t->len = p->h * p->w;
    t->tiles_x = (p->w + LPL_OM_TILE_W - 1) / LPL_OM_TILE_W;
    t->tiles_y = (p->h + LPL_OM_TILE_H - 1) / LPL_OM_TILE_H;
    t->tiles = t->tiles_x * t->tiles_y;
    t->nthr = nthr;
    t->direct = t->len <= OM_DIRECT_MAX;
    const int64_t w1 = p->w > 0 ? p->w : 1, len1 = t->len > 0 ? t->len : 1;
    const int64_t tx1 = t->tiles_x > 0 ? t->tiles_x : 1, tiles1 = t->tiles > 0 ? t->tiles : 1;
    if (!t->direct) t->hist = (uint32_t *)malloc((size_t)nthr * OM_HIST_BINS * sizeof(uint32_t));
    if (!t->direct && nthr > 1) t->hmerged = (uint32_t *)malloc(OM_HIST_BINS * sizeof(uint32_t));
    t->rowbuf = (uint8_t *)malloc((size_t)(nthr * w1));
    t->lanes = (double *)malloc((size_t)nthr * 2 * (size_t)tx1 * LPL_OM_LANES * sizeof(double));
    t->tcount = (int64_t *)malloc((size_t)nthr * (size_t)tx1 * sizeof(int64_t));
    t->tkey = (uint64_t *)calloc((size_t)nthr * 2, sizeof(uint64_t));
    t->toff = (int64_t *)calloc((size_t)nthr * 2, sizeof(int64_t));
    t->tile_part = (double *)calloc((size_t)tiles1 * 4, sizeof(double));
    t->tmp = (uint8_t *)malloc((size_t)len1);
    t->cand_cap = t->direct ? 2 * len1 : 1024;
    t->cand = (uint64_t *)malloc((size_t)t->cand_cap * sizeof(uint64_t));
    if ((!t->direct && !t->hist) || (!t->direct && nthr > 1 && !t->hmerged) || !t->rowbuf || !t->lanes ||
        !t->tcount || !t->tkey || !t->toff || !t->tile_part || !t->tmp || !t->cand)
        return -1;
    return 0;
}

int lpl_cpu_outlier_mask(const lpl_om_params *p, char *err) {
    const int64_t planes = p->n * p->c, len = p->h * p->w;
    if (planes == 0 || len == 0) {
        if (p->stats) lpl_om_finish_stats(0.0, 0.0, 0.0, 0.0, p->stats);
        if (p->plane_moments)
            for (int64_t i = 0; i < planes * LPL_PM_COMPONENTS; ++i) p->plane_moments[i] = 0.0;
        return 0;
    }
    int nt = 1;
#ifdef _OPENMP
    nt = omp_get_max_threads();
#endif
    const int team_mode = nt > 1 && planes < nt && len >= OM_TEAM_MIN_LEN;
    int nteams = team_mode ? 1 : (planes < nt ? (int)planes : nt);
    om_team *teams = (om_team *)calloc((size_t)nteams, sizeof(om_team));
    double *moments = (double *)malloc((size_t)planes * LPL_PM_COMPONENTS * sizeof(double));
    int failed = !teams || !moments;
    for (int i = 0; i < nteams && !failed; ++i)
        if (om_team_init(&teams[i], p, team_mode ? nt : 1) < 0) failed = 1;
    if (!failed) {
        if (team_mode) {
#pragma omp parallel num_threads(nt)
            {
                int tid = 0;
#ifdef _OPENMP
                tid = omp_get_thread_num();
#endif
                for (int64_t pl = 0; pl < planes; ++pl) om_plane(&teams[0], pl, tid, moments);
            }
            failed = teams[0].failed;
        } else {
#pragma omp parallel for num_threads(nteams) schedule(dynamic, 1)
            for (int64_t pl = 0; pl < planes; ++pl) {
                int tid = 0;
#ifdef _OPENMP
                tid = omp_get_thread_num();
#endif
                om_plane(&teams[tid], pl, 0, moments);
            }
            for (int i = 0; i < nteams; ++i) failed |= teams[i].failed;
        }
    }
    /* the planes' own moments, before the tree below merges them in place: the rows of
     * `moments` are already the LPL_PM_* layout */
    if (!failed && p->plane_moments)
        memcpy(p->plane_moments, moments, (size_t)planes * LPL_PM_COMPONENTS * sizeof(double));
    if (!failed && p->stats) {
        /* the planes in the fixed tree (lpl_kernel_abi.h, step 5), as om_layer_stats */
        for (int64_t s = lpl_om_tree_top(planes); s > 0; s >>= 1)
            for (int64_t i = 0; i < s && i + s < planes; ++i)
                lpl_om_tree_merge_planes((double)len, planes, i, s, moments + 3 * i, moments + 3 * (i + s));
        lpl_om_finish_stats((double)len * (double)planes, moments[0], moments[1], moments[2], p->stats);
    }
    if (teams)
        for (int i = 0; i < nteams; ++i) om_team_free(&teams[i]);
    free(teams);
    free(moments);
    if (failed) {
        snprintf(err, LPL_ERR_LEN, "out of host memory for the outlier-mask scratch");
        return -1;
    }
    return 0;
}

#else /* OM_TEMPLATE_PASS: the passes for one storage dtype */

#define OM_CAT2(a, b) a##_##b
#define OM_CAT(a, b) OM_CAT2(a, b)
#define OM_FN(name) OM_CAT(name, OM_SFX)

/* Pass 1 over the bands [band0, band1) of tiles: each tile's finite count and sum into
 * tile_part[4 * tile + 0, 1] (reduction order of lpl_kernel_abi.h); keys[0..1] = min and
 * max key; histogram of the top 16 key bits (when hist) or a copy of every finite key in
 * element order (when keys_out, direct mode: one thread per plane). lanes holds
 * tiles_x * LPL_OM_LANES accumulators, tcount tiles_x counts. */
static void OM_FN(om_pass1)(const void *yv, int64_t h, int64_t w, int64_t tiles_x, int64_t band0, int64_t band1,
                            uint32_t *hist, uint64_t *keys_out, double *lanes, int64_t *tcount, double *tile_part,
                            uint64_t *keys) {
    const OM_T *y = (const OM_T *)yv;
    int64_t nkeys = 0;
    uint64_t kmin = UINT64_MAX, kmax = 0;
    for (int64_t band = band0; band < band1; ++band) {
        const int64_t r0 = band * LPL_OM_TILE_H, r1 = r0 + LPL_OM_TILE_H < h ? r0 + LPL_OM_TILE_H : h;
        memset(lanes, 0, (size_t)(tiles_x * LPL_OM_LANES) * sizeof(double));
        memset(tcount, 0, (size_t)tiles_x * sizeof(int64_t));
        for (int64_t r = r0; r < r1; ++r) {
            const OM_T *yr = y + r * w;
            for (int64_t tx = 0; tx < tiles_x; ++tx) {
                const int64_t x0 = tx * LPL_OM_TILE_W, x1 = x0 + LPL_OM_TILE_W < w ? x0 + LPL_OM_TILE_W : w;
                double *acc = lanes + tx * LPL_OM_LANES + lpl_om_lane((int)(r - r0), 0);
                int64_t cnt = 0;
                for (int64_t x = x0; x < x1; ++x) {
                    const OM_T v = yr[x];
                    if (!OM_FINITE(v)) continue;
                    const uint64_t k = OM_KEY(v);
                    acc[x - x0] += (double)OM_LOAD(v);
                    if (hist) hist[k >> (OM_KEYBITS - OM_HIST_BITS)]++;
                    if (keys_out) keys_out[nkeys++] = k;
                    ++cnt;
                    kmin = k < kmin ? k : kmin;
                    kmax = k > kmax ? k : kmax;
                }
                tcount[tx] += cnt;
            }
        }
        for (int64_t tx = 0; tx < tiles_x; ++tx) {
            double *acc = lanes + tx * LPL_OM_LANES, *tp = tile_part + 4 * (band * tiles_x + tx);
            om_lane_tree(acc);
            tp[0] = (double)tcount[tx];
            tp[1] = acc[0];
        }
    }
    keys[0] = kmin;
    keys[1] = kmax;
}

/* Pass 2 over the bands [band0, band1): each tile's sum (v - mean)^2 and sum (v - mean)
 * over the finite values into tile_part[4 * tile + 2, 3]; keys in bucket b1 / b2
 * appended to c1 / c2 (when not NULL). lanes holds 2 * tiles_x * LPL_OM_LANES. */
static void OM_FN(om_pass2)(const void *yv, int64_t h, int64_t w, int64_t tiles_x, int64_t band0, int64_t band1,
                            double mean, int64_t b1, int64_t b2, uint64_t *c1, uint64_t *c2, double *lanes,
                            double *tile_part, int is_const) {
    const OM_T *y = (const OM_T *)yv;
    if (!c1 && is_const) return; /* a constant plane's std is 0 without its sums */
    double *lanes_sd = lanes + tiles_x * LPL_OM_LANES;
    for (int64_t band = band0; band < band1; ++band) {
        const int64_t r0 = band * LPL_OM_TILE_H, r1 = r0 + LPL_OM_TILE_H < h ? r0 + LPL_OM_TILE_H : h;
        memset(lanes, 0, (size_t)(2 * tiles_x * LPL_OM_LANES) * sizeof(double));
        for (int64_t r = r0; r < r1; ++r) {
            const OM_T *yr = y + r * w;
            for (int64_t tx = 0; tx < tiles_x; ++tx) {
                const int64_t x0 = tx * LPL_OM_TILE_W, x1 = x0 + LPL_OM_TILE_W < w ? x0 + LPL_OM_TILE_W : w;
                const int64_t off = tx * LPL_OM_LANES + lpl_om_lane((int)(r - r0), 0);
                double *restrict ss = lanes + off, *restrict sd = lanes_sd + off;
                if (c1) {
                    /* one read for both: the moments and the candidates (never a constant plane) */
                    for (int64_t x = x0; x < x1; ++x) {
                        const OM_T v = yr[x];
                        if (!OM_FINITE(v)) continue;
                        const double d = (double)OM_LOAD(v) - mean;
                        ss[x - x0] += d * d;
                        sd[x - x0] += d;
                        const uint64_t k = OM_KEY(v);
                        const int64_t b = (int64_t)(k >> (OM_KEYBITS - OM_HIST_BITS));
                        if (b == b1) *c1++ = k;
                        if (b == b2) *c2++ = k;
                    }
                } else {
                    for (int64_t x = x0; x < x1; ++x) {
                        const OM_T v = yr[x];
                        if (!OM_FINITE(v)) continue;
                        const double d = (double)OM_LOAD(v) - mean;
                        ss[x - x0] += d * d;
                        sd[x - x0] += d;
                    }
                }
            }
        }
        for (int64_t tx = 0; tx < tiles_x; ++tx) {
            double *tp = tile_part + 4 * (band * tiles_x + tx);
            om_lane_tree(lanes + tx * LPL_OM_LANES);
            om_lane_tree(lanes_sd + tx * LPL_OM_LANES);
            tp[2] = lanes[tx * LPL_OM_LANES];
            tp[3] = lanes_sd[tx * LPL_OM_LANES];
        }
    }
}

/* Rows [row0, row1): keep0 = lo < y < hi (strict: NaN and +-Inf never pass), then the
 * row max filter of the closing (radius rc) into tmp. */
static void OM_FN(om_keep_rows)(const void *yv, int64_t w, int64_t row0, int64_t row1, double lo_d,
                                double hi_d, int64_t rc, uint8_t *rowbuf, uint8_t *tmp) {
    const OM_T *y = (const OM_T *)yv;
    const OM_V lo = (OM_V)lo_d, hi = (OM_V)hi_d; /* exact: thresholds are dtype values */
    for (int64_t r = row0; r < row1; ++r) {
        const OM_T *yr = y + r * w;
        for (int64_t x = 0; x < w; ++x) {
            const OM_V v = OM_LOAD(yr[x]);
            rowbuf[x] = (uint8_t)((lo < v) & (v < hi));
        }
        om_row_or(rowbuf, tmp + r * w, w, rc);
    }
}

/* Bands [band0, band1): keep = column min filter of tmp (radius ro) AND finite(y); each
 * tile's kept count, sum (v - k), sum (v - k)^2 over the kept values into
 * tile_part[4 * tile + 0 .. 2] (reduction order of lpl_kernel_abi.h). */
static void OM_FN(om_final_bands)(const void *yv, uint8_t *keep, const uint8_t *tmp, int64_t h, int64_t w,
                                  int64_t tiles_x, int64_t band0, int64_t band1, int64_t ro, double k,
                                  uint8_t *rowbuf, double *lanes, int64_t *tcount, double *tile_part) {
    const OM_T *y = (const OM_T *)yv;
    double *lanes_s2 = lanes + tiles_x * LPL_OM_LANES;
    for (int64_t band = band0; band < band1; ++band) {
        const int64_t r0 = band * LPL_OM_TILE_H, r1 = r0 + LPL_OM_TILE_H < h ? r0 + LPL_OM_TILE_H : h;
        memset(lanes, 0, (size_t)(2 * tiles_x * LPL_OM_LANES) * sizeof(double));
        memset(tcount, 0, (size_t)tiles_x * sizeof(int64_t));
        for (int64_t r = r0; r < r1; ++r) {
            const OM_T *yr = y + r * w;
            uint8_t *kr = keep + r * w;
            om_col_and_row(tmp, rowbuf, h, w, r, ro);
            for (int64_t tx = 0; tx < tiles_x; ++tx) {
                const int64_t x0 = tx * LPL_OM_TILE_W, x1 = x0 + LPL_OM_TILE_W < w ? x0 + LPL_OM_TILE_W : w;
                const int64_t off = tx * LPL_OM_LANES + lpl_om_lane((int)(r - r0), 0);
                double *restrict s1 = lanes + off, *restrict s2 = lanes_s2 + off;
                int64_t kept = 0;
                for (int64_t x = x0; x < x1; ++x) {
                    const OM_T raw = yr[x];
                    const uint8_t kv = (uint8_t)(rowbuf[x] & (uint8_t)OM_FINITE(raw));
                    kr[x] = kv;
                    if (kv) {
                        const double d = (double)OM_LOAD(raw) - k;
                        ++kept;
                        s1[x - x0] += d;
                        s2[x - x0] += d * d;
                    }
                }
                tcount[tx] += kept;
            }
        }
        for (int64_t tx = 0; tx < tiles_x; ++tx) {
            double *tp = tile_part + 4 * (band * tiles_x + tx);
            om_lane_tree(lanes + tx * LPL_OM_LANES);
            om_lane_tree(lanes_s2 + tx * LPL_OM_LANES);
            tp[0] = (double)tcount[tx];
            tp[1] = lanes[tx * LPL_OM_LANES];
            tp[2] = lanes_s2[tx * LPL_OM_LANES];
        }
    }
}

#undef OM_CAT2
#undef OM_CAT
#undef OM_FN
#undef OM_SFX
#undef OM_T
#undef OM_V
#undef OM_LOAD
#undef OM_FINITE
#undef OM_KEY
#undef OM_KEYBITS

#endif /* OM_TEMPLATE_PASS */
