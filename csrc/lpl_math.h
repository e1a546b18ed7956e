/* Per-element math shared by the C (CPU) and CUDA kernels. Every formula of the loss
 * and of the outlier mask that is evaluated per element or per plane lives here, as
 * inline host/device functions, so the CPU tests cover the arithmetic the GPU runs.
 * Both sides round every product and sum on its own: the C build has -ffp-contract=off
 * and the device code -fmad=false (docs/spec.md, "CPU and GPU agree"). Valid C11 and
 * CUDA C++ (NVRTC included). */
#ifndef LPL_MATH_H
#define LPL_MATH_H

#ifdef __CUDACC_RTC__
/* NVRTC compiles the kernels at first use without any system header: the fixed-width
 * types and the few macros used here are spelled out (LP64, as on every CUDA host). */
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#define INT64_MAX 9223372036854775807LL
#define UINT64_MAX 18446744073709551615ULL
#define NAN __longlong_as_double(0x7ff8000000000000LL)
/* bit casts go through memcpy, which NVRTC does not declare; fixed-size byte copies
 * compile to register moves */
__device__ __forceinline__ void *lpl_rtc_memcpy(void *dst, const void *src, unsigned long long n) {
    for (unsigned long long i = 0; i < n; ++i) ((char *)dst)[i] = ((const char *)src)[i];
    return dst;
}
#define memcpy lpl_rtc_memcpy
#else
#include <math.h>
#include <stdint.h>
#include <string.h>
#endif

#ifdef __CUDACC__
#define LPL_HD __host__ __device__ __forceinline__
#else
#define LPL_HD static inline
#endif

/* ---- options: one list each ---------------------------------------------------------
 * The only place an option is named. Each list gives X(ctx, ID, "name") per option, in
 * enum order; the enums below, the C entry points' name tables (lpl_ops.h) and with them
 * lpl_ext._C.NORMS / _C.DISTANCES, which the Python side takes its option lists from, are
 * all built from these lists, so names and enum values cannot drift apart. ctx is passed
 * through unchanged to X (a parenthesized tuple carries several values). */
#define LPL_NORM_LIST(X, ctx) \
    X(ctx, DEFAULT, "default") X(ctx, SHARED, "shared") X(ctx, BATCH, "batch") X(ctx, NONE, "none")
#define LPL_DIST_LIST(X, ctx) X(ctx, MSE, "mse") X(ctx, L1, "l1")

#define LPL_OPTION_ENUM(kind, id, name) LPL_##kind##_##id,
enum { LPL_NORM_LIST(LPL_OPTION_ENUM, NORM) LPL_NORM_COUNT };
enum { LPL_DIST_LIST(LPL_OPTION_ENUM, DIST) LPL_DIST_COUNT };

/* eps (docs/spec.md, "Normalization"): 1e-10 for `default`, 1e-6 for `shared` and `batch`. They are
 * applied in fp32 or fp64 arithmetic, never in fp16 where 1e-10 underflows to 0. */
#define LPL_EPS_DEFAULT 1e-10
#define LPL_EPS_SHARED 1e-6
#define LPL_EPS_BATCH 1e-6

/* ---- 16-bit float conversions (round to nearest even, NaN kept NaN) -------------- */
LPL_HD float lpl_bits_to_float(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

LPL_HD uint32_t lpl_float_to_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof(bits));
    return bits;
}

LPL_HD float lpl_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0x1fu) return lpl_bits_to_float(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
        /* zero or subnormal: mant * 2^-24, exact in float */
        float v = (float)mant * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return lpl_bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

LPL_HD uint16_t lpl_float_to_half(float f) {
    uint32_t x = lpl_float_to_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) {
        /* result is subnormal or zero: scale so that rounding happens at 2^-24 */
        float af = lpl_bits_to_float(ax);
        float scaled = af * 16777216.0f; /* exact: power of two */
        /* round half to even of a value < 1024 */
        float fl = floorf(scaled);
        float rem = scaled - fl;
        uint32_t m = (uint32_t)fl;
        if (rem > 0.5f || (rem == 0.5f && (m & 1u))) m += 1u;
        return (uint16_t)(sign | m);
    }
    uint32_t mant = ax & 0x7fffffu;
    uint32_t exp = (ax >> 23) - 112u;
    uint32_t h = (exp << 10) | (mant >> 13);
    uint32_t round_bits = mant & 0x1fffu;
    if (round_bits > 0x1000u || (round_bits == 0x1000u && (h & 1u))) h += 1u;
    return (uint16_t)(sign | h);
}

LPL_HD float lpl_bf16_to_float(uint16_t b) { return lpl_bits_to_float((uint32_t)b << 16); }

LPL_HD uint16_t lpl_float_to_bf16(float f) {
    uint32_t x = lpl_float_to_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* quiet NaN */
    uint32_t lsb = (x >> 16) & 1u;
    x += 0x7fffu + lsb;
    return (uint16_t)(x >> 16);
}

/* ---- feature distance -------------------------------------------------------------- */

/* e = (d)^2 for mse, |d| for l1, with d = x_normalized - y_normalized. */
LPL_HD float lpl_dist_value_f(float d, int dist) { return dist == LPL_DIST_MSE ? d * d : fabsf(d); }
LPL_HD double lpl_dist_value_d(double d, int dist) { return dist == LPL_DIST_MSE ? d * d : fabs(d); }

/* de/dd: 2d for mse, sign(d) for l1 (0 at d == 0, as torch's abs backward). */
LPL_HD float lpl_dist_deriv_f(float d, int dist) {
    if (dist == LPL_DIST_MSE) return 2.0f * d;
    return (float)((d > 0.0f) - (d < 0.0f));
}
LPL_HD double lpl_dist_deriv_d(double d, int dist) {
    if (dist == LPL_DIST_MSE) return 2.0 * d;
    return (double)((d > 0.0) - (d < 0.0));
}

/* Per-pixel sums over channels (the `default` / `shared` norms and the `default` norm's
 * sum_c g_c x_c) have ONE order, used by the CPU and the CUDA kernels alike so that the
 * per-pixel scalars, hence the gradients, are bit-identical: the C channels are cut into
 * LPL_PIXEL_CHUNKS contiguous chunks, chunk k = [lpl_pixel_chunk_begin(k, C),
 * lpl_pixel_chunk_begin(k + 1, C)) (empty chunks when C < 8 sum to +0), each summed in
 * channel order; the chunk sums are combined by the fixed pairwise tree
 * ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)). A GPU block sums the chunks in up to
 * 8 thread groups at once (each group a subtree), where one thread per pixel summing all
 * C channels left most of the block idle at large C. */
#define LPL_PIXEL_CHUNKS 8
#define LPL_PIXEL_TREE_LEVELS 3 /* log2(LPL_PIXEL_CHUNKS) */
LPL_HD int64_t lpl_pixel_chunk_begin(int64_t k, int64_t C) { return k * C / LPL_PIXEL_CHUNKS; }

/* 1 / (||v|| + eps) from the sum of squares over channels. */
LPL_HD float lpl_inv_norm_f(float sumsq, double eps) { return 1.0f / (sqrtf(sumsq) + (float)eps); }
LPL_HD double lpl_inv_norm_d(double sumsq, double eps) { return 1.0 / (sqrt(sumsq) + eps); }

/* Gradient of L through x_n = x * r, r = 1 / (||x|| + eps), for one channel j:
 *   dL/dx_j = r g_j - q x_j,   q = (r^2 / ||x||) sum_c g_c x_c,
 * with q computed once per pixel. At ||x|| == 0 q is taken as 0 (the subgradient torch's
 * norm uses). Splitting q out keeps the per-channel loop free of the ||x|| == 0 test
 * (GCC 12 left the combined form as a branch, and the loop scalar). */
LPL_HD float lpl_default_norm_coef_f(float r, float norm, float dot) {
    const float safe = norm > 0.0f ? norm : 1.0f;
    return norm > 0.0f ? (r * r / safe) * dot : 0.0f;
}
LPL_HD double lpl_default_norm_coef_d(double r, double norm, double dot) {
    const double safe = norm > 0.0 ? norm : 1.0;
    return norm > 0.0 ? (r * r / safe) * dot : 0.0;
}
LPL_HD float lpl_default_norm_grad_f(float g, float x, float r, float coef) { return r * g - coef * x; }
LPL_HD double lpl_default_norm_grad_d(double g, double x, double r, double coef) { return r * g - coef * x; }

/* Per-channel mean and unbiased std of the `batch` norm from per-plane sums and sums of
 * squared deviations (each plane holds `plane_len` values; planes n * stride apart),
 * merged with Chan's parallel formula so large planes keep their precision. torch.std
 * semantics: divisor count - 1, NaN for a single value. */
LPL_HD void lpl_channel_moments(const double *plane_sum, const double *plane_m2, int64_t n_planes,
                                int64_t stride, int64_t plane_len, double *mean_out,
                                double *std_out) {
    double count = 0.0, mean = 0.0, m2 = 0.0;
    const double nb = (double)plane_len;
    for (int64_t n = 0; n < n_planes && nb > 0.0; ++n) {
        const double mb = plane_sum[n * stride] / nb;
        const double tot = count + nb;
        const double delta = mb - mean;
        mean += delta * nb / tot;
        m2 += plane_m2[n * stride] + delta * delta * count * nb / tot;
        count = tot;
    }
    *mean_out = mean;
    *std_out = count > 1.0 ? sqrt(m2 / (count - 1.0)) : (double)NAN;
}

/* Weight of one (n, c) plane in the per-sample loss: w / (C * M), 0 for an empty mask
 * (docs/spec.md, "Feature distance": a fully masked plane contributes 0, not 0/0). */
LPL_HD double lpl_plane_coef(double weight, int64_t channels, double kept) {
    return kept > 0.0 ? weight / ((double)channels * kept) : 0.0;
}

/* ---- outlier mask ------------------------------------------------------------------ */

/* Rank (1-indexed) of the order statistic for quantile q over `count` values:
 * floor(count * q), clamped into [1, count] (the reference crashes for k = 0). */
LPL_HD int64_t lpl_quantile_rank(int64_t count, double q) {
    double k = floor((double)count * q);
    int64_t r = (int64_t)k;
    if (r < 1) r = 1;
    if (r > count) r = count;
    return r;
}

/* Order-preserving map of a float's bits to an unsigned key (finite values only). */
LPL_HD uint32_t lpl_float_sort_key(float f) {
    uint32_t b = lpl_float_to_bits(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
LPL_HD float lpl_sort_key_to_float(uint32_t key) {
    uint32_t b = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
    return lpl_bits_to_float(b);
}
LPL_HD uint64_t lpl_double_sort_key(double f) {
    uint64_t b;
    memcpy(&b, &f, sizeof(b));
    return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
}
LPL_HD double lpl_sort_key_to_double(uint64_t key) {
    uint64_t b = (key & 0x8000000000000000ull) ? (key & 0x7fffffffffffffffull) : ~key;
    double f;
    memcpy(&f, &b, sizeof(f));
    return f;
}

LPL_HD int lpl_isfinite_f(float v) { return (lpl_float_to_bits(v) & 0x7f800000u) != 0x7f800000u; }
LPL_HD int lpl_isfinite_d(double v) {
    uint64_t b;
    memcpy(&b, &v, sizeof(b));
    return (b & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}

/* Round a float to the storage dtype (0 f32, 2 f16, 3 bf16: lpl_dtype codes), so that
 * thresholds computed in float match the reference's arithmetic in that dtype. */
LPL_HD float lpl_round_to_dtype_f(float v, int dtype) {
    if (dtype == 2) return lpl_half_to_float(lpl_float_to_half(v));
    if (dtype == 3) return lpl_bf16_to_float(lpl_float_to_bf16(v));
    return v;
}

/* ==== outlier mask helpers ========================================================= */

/* Order-preserving key of a 16-bit float (float16 or bfloat16 bits; finite values). */
LPL_HD uint32_t lpl_om_key16(uint16_t bits) {
    return (bits & 0x8000u) ? (uint32_t)(~(uint32_t)bits & 0xffffu) : (uint32_t)(bits | 0x8000u);
}
LPL_HD uint16_t lpl_om_key16_to_bits(uint32_t key) {
    return (key & 0x8000u) ? (uint16_t)(key & 0x7fffu) : (uint16_t)(~key & 0xffffu);
}
/* Finite test on raw 16-bit patterns: float16 (exponent 0x7c00) or bfloat16 (0x7f80). */
LPL_HD int lpl_om_isfinite_f16(uint16_t bits) { return (bits & 0x7c00u) != 0x7c00u; }
LPL_HD int lpl_om_isfinite_bf16(uint16_t bits) { return (bits & 0x7f80u) != 0x7f80u; }

/* Value of an order-statistic key as a double (exact), for storage dtype `dtype`
 * (lpl_dtype codes: 0 f32, 1 f64, 2 f16, 3 bf16). */
LPL_HD double lpl_om_key_to_double(uint64_t key, int dtype) {
    if (dtype == 1) return lpl_sort_key_to_double(key);
    if (dtype == 0) return (double)lpl_sort_key_to_float((uint32_t)key);
    uint16_t bits = lpl_om_key16_to_bits((uint32_t)key);
    return (double)(dtype == 2 ? lpl_half_to_float(bits) : lpl_bf16_to_float(bits));
}

/* Sample standard deviation (divisor count - 1) from the two-pass moments of the
 * finite values: sum_sq = sum (v - mean)^2, sum_dev = sum (v - mean) (the rounding
 * error of mean, removed here). NaN for one value (as torch), 0 for none. A constant
 * plane (min == max) has exactly 0: callers pass is_constant so that rounding in the
 * mean can never make it positive (torch's Welford reduction gives 0 there too). */
LPL_HD double lpl_om_sample_std(double count, double sum_sq, double sum_dev, int is_constant) {
    if (count < 2.0) return count == 1.0 ? NAN : 0.0;
    if (is_constant) return 0.0;
    double m2 = sum_sq - sum_dev * sum_dev / count;
    if (m2 < 0.0) m2 = 0.0;
    return sqrt(m2 / (count - 1.0));
}

/* Keep thresholds (lo, hi) of one plane, rounded the way the reference's torch ops
 * round them in the storage dtype:
 *   float64: m = margin * std, lo = q1 - m, hi = q2 + m in double;
 *   float32: std rounded to float, then float32 products and sums;
 *   float16 / bfloat16: std rounded to the dtype (via float, as torch casts its double
 *   Welford result), m = dtype(float(margin) * std), lo = dtype(float(q1) - m), ... */
LPL_HD void lpl_om_thresholds(int dtype, double q1, double q2, double std_d, double margin_std,
                              double *lo, double *hi) {
    if (dtype == 1) {
        double m = margin_std * std_d;
        *lo = q1 - m;
        *hi = q2 + m;
        return;
    }
    float s = lpl_round_to_dtype_f((float)std_d, dtype);
    float m = lpl_round_to_dtype_f((float)margin_std * s, dtype);
    *lo = (double)lpl_round_to_dtype_f((float)q1 - m, dtype);
    *hi = (double)lpl_round_to_dtype_f((float)q2 + m, dtype);
}

/* Chan et al. merge of (count, mean, M2) moments; b is added into a. */
LPL_HD void lpl_om_merge_moments(double *n_a, double *mean_a, double *m2_a, double n_b,
                                 double mean_b, double m2_b) {
    if (n_b <= 0.0) return;
    double n = *n_a + n_b;
    double delta = mean_b - *mean_a;
    *mean_a += delta * (n_b / n);
    *m2_a += m2_b + delta * delta * (*n_a * n_b / n);
    *n_a = n;
}

/* Unbiased std from merged (count, M2) moments: torch.std semantics, NaN for one value. */
LPL_HD double lpl_unbiased_std(double count, double m2) { return count > 1.0 ? sqrt(m2 / (count - 1.0)) : (double)NAN; }

/* Layer statistics (mean, unbiased std, outlier ratio) from merged moments. */
LPL_HD void lpl_om_finish_stats(double n, double mean, double m2, double kept, double *stats) {
    stats[0] = n > 0.0 ? mean : NAN;
    stats[1] = n > 1.0 ? sqrt((m2 > 0.0 ? m2 : 0.0) / (n - 1.0)) : NAN;
    stats[2] = n > 0.0 ? 1.0 - kept / n : NAN;
}

#endif /* LPL_MATH_H */
