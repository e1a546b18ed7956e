/* Kernel parameter blocks and the CPU / CUDA implementations of each op. The Python
 * entry points (feature_distance.c, outlier_mask.c) validate arguments, fill these
 * blocks and call the implementation for the tensors' device with the GIL released.
 * Implementations return 0 on success, or -1 after writing a message into err. */
#ifndef LPL_OPS_H
#define LPL_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "lpl_kernel_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LPL_ERR_LEN 256

/* The option names, NULL-terminated, in enum order (from LPL_NORM_LIST / LPL_DIST_LIST in
 * lpl_math.h): what the entry points parse and what lpl_ext._C.NORMS / _C.DISTANCES export.
 * Defined in feature_distance.c. */
extern const char *const lpl_norm_names[LPL_NORM_COUNT + 1];
extern const char *const lpl_dist_names[LPL_DIST_COUNT + 1];

/* ---- feature distance (docs/spec.md, "Normalization" and "Feature distance") ------------------------------------------ */
typedef struct {
    const void *x;       /* (N, C, H, W), dtype */
    const void *y;       /* (N, C, H, W), dtype */
    const uint8_t *mask; /* (N, C, H, W) keep-mask, nonzero = keep; NULL = keep all */
    void *grad;          /* (N, C, H, W), dtype: d(sum_n loss[n]) / dx; NULL = skip */
    double *loss;        /* (N,) float64 */
    int dtype;           /* lpl_dtype of x, y and grad */
    int64_t n, c, hw;
    int norm;            /* LPL_NORM_* */
    int dist;            /* LPL_DIST_* */
    double weight;
    /* CUDA only: device scratch of lpl_feature_distance_workspace(n, c) doubles:
     * per-plane sums, kept counts, batch moments; per-channel mean and std */
    double *workspace;
    /* CPU only: advise 2 MiB pages for grad (LPL_EXT_HUGEPAGES=1; read with the GIL held) */
    int advise_hugepages;
} lpl_fd_params;

/* Doubles of device scratch the CUDA feature-distance kernels need. */
static inline int64_t lpl_feature_distance_workspace(int64_t n, int64_t c) {
    return 4 * n * c + 2 * c;
}

int lpl_cpu_feature_distance(const lpl_fd_params *p, char *err);
/* kernels: the device's loaded module (lpl_cuda_driver.h); stream: the caller's. */
struct lpl_cuda_kernels;
int lpl_cuda_feature_distance(const struct lpl_cuda_kernels *k, const lpl_fd_params *p, void *stream, char *err);

/* ---- outlier mask (docs/spec.md, "Outlier mask") ------------------------------------------------- */
typedef struct {
    const void *y;     /* (N, C, H, W), dtype */
    uint8_t *keep;     /* (N, C, H, W) output keep-mask (0/1 bytes) */
    double *stats;     /* (3,) float64 output: mean, std of y*keep, outlier ratio; may be NULL */
    int dtype;
    int64_t n, c, h, w;
    double quantile;   /* q in (0, 0.5) */
    double margin_std; /* margin = margin_std * std */
    int closing;       /* odd window of the max filter */
    int opening;       /* odd window of the min filter */
    /* CUDA only: device scratch of lpl_outlier_mask_workspace_bytes(...) bytes */
    void *workspace;
} lpl_om_params;

/* CUDA workspace layout (bytes, each region 256-byte aligned), shared by the size query
 * (compiled in every build) and the CUDA kernels. P = n*c planes of L = h*w values, B
 * blocks per plane:
 *   part_d  P*B*4 doubles   per-block partial sums (moments, variance, kept stats)
 *   part_u  P*B*2 uint64    per-block min / max order keys of the finite values
 *   plane_d P*16 doubles    per-plane scalars (count, mean, std, thresholds, moments)
 *   plane_u P*4 uint64      per-plane radix-select state (two prefixes, two ranks)
 *   hist    P*2*256 uint32  per-plane digit histograms of the two selections
 *   tmp     P*L bytes       intermediate mask of the separable filters */

static inline int64_t lpl_om_blocks_per_plane(int64_t plane_len) {
    if (plane_len > INT64_MAX / 2) return 64;
    int64_t b = (plane_len + 8 * LPL_OM_CUDA_THREADS - 1) / (8 * LPL_OM_CUDA_THREADS);
    if (b < 1) b = 1;
    if (b > 64) b = 64;
    return b;
}

typedef struct {
    int64_t part_d, part_u, plane_d, plane_u, hist, tmp, total;
} lpl_om_layout;

/* Non-negative int64 arithmetic that saturates to -1 on overflow (or a -1 operand). */
static inline int64_t lpl_om_mul(int64_t a, int64_t b) {
    if (a < 0 || b < 0) return -1;
    if (a != 0 && b > INT64_MAX / a) return -1;
    return a * b;
}
static inline int64_t lpl_om_add(int64_t a, int64_t b) {
    if (a < 0 || b < 0 || a > INT64_MAX - b) return -1;
    return a + b;
}
static inline int64_t lpl_om_align256(int64_t v) {
    if (v < 0 || v > INT64_MAX - 255) return -1;
    return (v + 255) / 256 * 256;
}

/* Region offsets in bytes; total = -1 when the sizes overflow int64. */
static inline lpl_om_layout lpl_om_workspace_layout(int64_t n, int64_t c, int64_t h, int64_t w) {
    lpl_om_layout l;
    const int64_t planes = lpl_om_mul(n, c), len = lpl_om_mul(h, w);
    const int64_t b = len < 0 ? 1 : lpl_om_blocks_per_plane(len);
    const int64_t blocks = lpl_om_mul(planes, b);
    l.part_d = 0;
    l.part_u = lpl_om_add(l.part_d, lpl_om_align256(lpl_om_mul(blocks, 4 * 8)));
    l.plane_d = lpl_om_add(l.part_u, lpl_om_align256(lpl_om_mul(blocks, 2 * 8)));
    l.plane_u = lpl_om_add(l.plane_d, lpl_om_align256(lpl_om_mul(planes, LPL_OM_PLANE_D * 8)));
    l.hist = lpl_om_add(l.plane_u, lpl_om_align256(lpl_om_mul(planes, 4 * 8)));
    l.tmp = lpl_om_add(l.hist, lpl_om_align256(lpl_om_mul(planes, 2 * 256 * 4)));
    l.total = lpl_om_add(l.tmp, lpl_om_align256(lpl_om_mul(planes, len)));
    if (l.total == 0) l.total = 256;
    return l;
}

int lpl_cpu_outlier_mask(const lpl_om_params *p, char *err);
int lpl_cuda_outlier_mask(const struct lpl_cuda_kernels *k, const lpl_om_params *p, void *stream, char *err);
int64_t lpl_outlier_mask_workspace_bytes(int64_t n, int64_t c, int64_t h, int64_t w);

#ifdef __cplusplus
}
#endif

#endif /* LPL_OPS_H */
