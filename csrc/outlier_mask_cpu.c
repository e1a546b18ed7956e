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
 * Parallelism: OpenMP over planes; when there are fewer planes than threads and the
 * planes are large, the whole team works on one plane at a time, split by rows, with
 * per-thread histograms and partial sums merged in thread order (deterministic for a
 * given thread count). This file instantiates its dtype-specific passes by including
 * itself once per storage dtype (OM_TEMPLATE_PASS). */
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
    int nthr;
    int direct;          /* select on a copy of all keys (small planes) */
    int failed;          /* allocation failure inside the parallel region */
    /* per thread (index tid) */
    uint32_t *hist;      /* nthr * OM_HIST_BINS, NULL in direct mode */
    uint8_t *rowbuf;     /* nthr * w */
    double *tpart;       /* nthr * 4: count, sum | sum_sq, sum_dev | kept, s1, s2 */
    uint64_t *tkey;      /* nthr * 2: min and max key */
    int64_t *toff;       /* nthr * 2: where thread tid writes its candidates */
    /* shared */
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
    double count = 0.0, sum = 0.0;
    uint64_t kmin = UINT64_MAX, kmax = 0;
    for (int i = 0; i < t->nthr; ++i) {
        count += t->tpart[4 * i];
        sum += t->tpart[4 * i + 1];
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
    for (int i = 0; i < t->nthr; ++i) {
        sum_sq += t->tpart[4 * i];
        sum_dev += t->tpart[4 * i + 1];
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

/* The whole pipeline for one plane, run by the nthr threads of the team (tid). */
static void om_plane(om_team *t, int64_t plane, int tid, double *plane_moments) {
    const lpl_om_params *p = t->p;
    const int64_t h = t->h, w = t->w, len = t->len;
    const int64_t row0 = h * tid / t->nthr, row1 = h * (tid + 1) / t->nthr;
    const int64_t i0 = row0 * w, i1 = row1 * w;
    const size_t esize = p->dtype == LPL_FLOAT64 ? 8 : p->dtype == LPL_FLOAT32 ? 4 : 2;
    const void *y = (const char *)p->y + (size_t)(plane * len) * esize;
    uint8_t *keep = p->keep + plane * len;
    uint32_t *hist = t->direct ? NULL : t->hist + (int64_t)tid * OM_HIST_BINS;
    uint8_t *rowbuf = t->rowbuf + (int64_t)tid * w;
    double *part = t->tpart + 4 * tid;

    /* pass 1 */
    if (hist) memset(hist, 0, OM_HIST_BINS * sizeof(uint32_t));
    OM_DISPATCH(om_pass1, y, i0, i1, hist, t->direct ? t->cand : NULL, part, t->tkey + 2 * tid);
    om_barrier(t);
    if (tid == 0) om_after_pass1(t);
    om_barrier(t);

    /* pass 2 */
    part[0] = part[1] = 0.0;
    if (t->count > 0.0 && !t->failed) {
        uint64_t *c1 = NULL, *c2 = NULL;
        if (t->n1 + t->n2 > 0) {
            c1 = t->cand + t->toff[2 * tid];
            c2 = t->cand + t->toff[2 * tid + 1];
        }
        OM_DISPATCH(om_pass2, y, i0, i1, t->mean, t->b1, t->b2, c1, c2, part, t->is_const);
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
    part[0] = part[1] = part[2] = 0.0;
    OM_DISPATCH(om_final_rows, y, keep, t->tmp, h, w, row0, row1, ro, t->mean, rowbuf, part);
    om_barrier(t);
    if (tid == 0) {
        double kept = 0.0, s1 = 0.0, s2 = 0.0;
        for (int i = 0; i < t->nthr; ++i) {
            kept += t->tpart[4 * i];
            s1 += t->tpart[4 * i + 1];
            s2 += t->tpart[4 * i + 2];
        }
        /* masked positions count as 0: (0 - K) each, K = the finite mean used as shift */
        const double zeros = (double)len - kept, k = t->mean;
        s1 -= zeros * k;
        s2 += zeros * k * k;
        double m2 = len > 0 ? s2 - s1 * s1 / (double)len : 0.0;
        plane_moments[3 * plane] = len > 0 ? k + s1 / (double)len : 0.0;
        plane_moments[3 * plane + 1] = m2 > 0.0 ? m2 : 0.0;
        plane_moments[3 * plane + 2] = kept;
    }
    om_barrier(t);
}

static void om_team_free(om_team *t) {
    free(t->hist);
    free(t->rowbuf);
    free(t->tpart);
    free(t->tkey);
    free(t->toff);
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
    t->nthr = nthr;
    t->direct = t->len <= OM_DIRECT_MAX;
    const int64_t w1 = p->w > 0 ? p->w : 1, len1 = t->len > 0 ? t->len : 1;
    if (!t->direct) t->hist = (uint32_t *)malloc((size_t)nthr * OM_HIST_BINS * sizeof(uint32_t));
    if (!t->direct && nthr > 1) t->hmerged = (uint32_t *)malloc(OM_HIST_BINS * sizeof(uint32_t));
    t->rowbuf = (uint8_t *)malloc((size_t)(nthr * w1));
    t->tpart = (double *)calloc((size_t)nthr * 4, sizeof(double));
    t->tkey = (uint64_t *)calloc((size_t)nthr * 2, sizeof(uint64_t));
    t->toff = (int64_t *)calloc((size_t)nthr * 2, sizeof(int64_t));
    t->tmp = (uint8_t *)malloc((size_t)len1);
    t->cand_cap = t->direct ? 2 * len1 : 1024;
    t->cand = (uint64_t *)malloc((size_t)t->cand_cap * sizeof(uint64_t));
    if ((!t->direct && !t->hist) || (!t->direct && nthr > 1 && !t->hmerged) || !t->rowbuf ||
        !t->tpart || !t->tkey || !t->toff || !t->tmp || !t->cand)
        return -1;
    return 0;
}

int lpl_cpu_outlier_mask(const lpl_om_params *p, char *err) {
    const int64_t planes = p->n * p->c, len = p->h * p->w;
    if (planes == 0 || len == 0) {
        if (p->stats) lpl_om_finish_stats(0.0, 0.0, 0.0, 0.0, p->stats);
        return 0;
    }
    int nt = 1;
#ifdef _OPENMP
    nt = omp_get_max_threads();
#endif
    const int team_mode = nt > 1 && planes < nt && len >= OM_TEAM_MIN_LEN;
    int nteams = team_mode ? 1 : (planes < nt ? (int)planes : nt);
    om_team *teams = (om_team *)calloc((size_t)nteams, sizeof(om_team));
    double *moments = (double *)malloc((size_t)planes * 3 * sizeof(double));
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
    if (!failed && p->stats) {
        double n = 0.0, mean = 0.0, m2 = 0.0, kept = 0.0;
        for (int64_t pl = 0; pl < planes; ++pl) {
            lpl_om_merge_moments(&n, &mean, &m2, (double)len, moments[3 * pl], moments[3 * pl + 1]);
            kept += moments[3 * pl + 2];
        }
        lpl_om_finish_stats(n, mean, m2, kept, p->stats);
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

/* Pass 1 over values [i0, i1): part[0] = finite count, part[1] = sum; keys[0..1] = min
 * and max key; histogram of the top 16 key bits (when hist) or a copy of every finite
 * key (when keys_out, direct mode). */
static void OM_FN(om_pass1)(const void *yv, int64_t i0, int64_t i1, uint32_t *hist,
                            uint64_t *keys_out, double *part, uint64_t *keys) {
    const OM_T *y = (const OM_T *)yv;
    int64_t cnt = 0;
    double sum = 0.0;
    uint64_t kmin = UINT64_MAX, kmax = 0;
    for (int64_t i = i0; i < i1; ++i) {
        const OM_T r = y[i];
        if (!OM_FINITE(r)) continue;
        const uint64_t k = OM_KEY(r);
        sum += (double)OM_LOAD(r);
        if (hist) hist[k >> (OM_KEYBITS - OM_HIST_BITS)]++;
        if (keys_out) keys_out[cnt] = k;
        ++cnt;
        kmin = k < kmin ? k : kmin;
        kmax = k > kmax ? k : kmax;
    }
    part[0] = (double)cnt;
    part[1] = sum;
    keys[0] = kmin;
    keys[1] = kmax;
}

/* Pass 2 over [i0, i1): part[0] = sum (v - mean)^2, part[1] = sum (v - mean) over the
 * finite values; keys in bucket b1 / b2 appended to c1 / c2 (when not NULL). */
static void OM_FN(om_pass2)(const void *yv, int64_t i0, int64_t i1, double mean, int64_t b1,
                            int64_t b2, uint64_t *c1, uint64_t *c2, double *part, int is_const) {
    const OM_T *y = (const OM_T *)yv;
    double ss = 0.0, sd = 0.0;
    if (c1) {
        /* one read for both: the moments and the candidates (never a constant plane) */
        for (int64_t i = i0; i < i1; ++i) {
            const OM_T r = y[i];
            if (!OM_FINITE(r)) continue;
            const double d = (double)OM_LOAD(r) - mean;
            ss += d * d;
            sd += d;
            const uint64_t k = OM_KEY(r);
            const int64_t b = (int64_t)(k >> (OM_KEYBITS - OM_HIST_BITS));
            if (b == b1) *c1++ = k;
            if (b == b2) *c2++ = k;
        }
    } else if (!is_const) {
        for (int64_t i = i0; i < i1; ++i) {
            const OM_T r = y[i];
            if (!OM_FINITE(r)) continue;
            const double d = (double)OM_LOAD(r) - mean;
            ss += d * d;
            sd += d;
        }
    }
    part[0] = ss;
    part[1] = sd;
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

/* Rows [row0, row1): keep = column min filter of tmp (radius ro) AND finite(y); part =
 * kept count, sum (v - k), sum (v - k)^2 over the kept values. */
static void OM_FN(om_final_rows)(const void *yv, uint8_t *keep, const uint8_t *tmp, int64_t h,
                                 int64_t w, int64_t row0, int64_t row1, int64_t ro, double k,
                                 uint8_t *rowbuf, double *part) {
    const OM_T *y = (const OM_T *)yv;
    int64_t kept = 0;
    double s1 = 0.0, s2 = 0.0;
    for (int64_t r = row0; r < row1; ++r) {
        const OM_T *yr = y + r * w;
        uint8_t *kr = keep + r * w;
        om_col_and_row(tmp, rowbuf, h, w, r, ro);
        for (int64_t x = 0; x < w; ++x) {
            const OM_T raw = yr[x];
            const uint8_t kv = (uint8_t)(rowbuf[x] & (uint8_t)OM_FINITE(raw));
            kr[x] = kv;
            if (kv) {
                const double d = (double)OM_LOAD(raw) - k;
                ++kept;
                s1 += d;
                s2 += d * d;
            }
        }
    }
    part[0] = (double)kept;
    part[1] = s1;
    part[2] = s2;
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
