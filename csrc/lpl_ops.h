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
    void *grad;          /* (N, C, H, W), dtype: d(sum_n s[n] loss[n]) / dx; NULL = skip */
    /* (N,) float64 on the tensors' device: the per-sample factors s[n] folded into the
     * gradient (the upstream gradient of loss[n] when known at forward time, so that no
     * second pass rescales it); NULL: s[n] = 1 */
    const double *grad_scale;
    /* (N*C, LPL_PM_COMPONENTS) float64 on the tensors' device, only with a mask: the outlier
     * mask's moments of where(mask, y, 0) for this mask (lpl_kernel_abi.h), from which the
     * kept counts and the `batch` channel statistics are taken instead of a pass over the
     * mask and y (the v1 kernels ignore them); NULL: computed here */
    const double *plane_moments;
    double *loss;        /* (N,) float64 */
    int dtype;           /* lpl_dtype of x, y and grad */
    int64_t n, c, hw;
    int norm;            /* LPL_NORM_* */
    int dist;            /* LPL_DIST_* */
    double weight;
    /* CUDA only: device scratch of lpl_feature_distance_workspace(n, c) doubles
     * (lpl_fd_workspace_layout; the v1 kernels lay out their own 4 n c + 2 c) */
    double *workspace;
    /* CPU only: advise 2 MiB pages for grad (LPL_EXT_HUGEPAGES=1; read with the GIL held) */
    int advise_hugepages;
} lpl_fd_params;

/* Non-negative int64 arithmetic that saturates at INT64_MAX (a size no allocation meets)
 * instead of wrapping around. */
static inline int64_t lpl_fd_ws_mul(int64_t a, int64_t b) {
    return (a != 0 && b > INT64_MAX / a) ? INT64_MAX : a * b;
}
static inline int64_t lpl_fd_ws_add(int64_t a, int64_t b) { return a > INT64_MAX - b ? INT64_MAX : a + b; }

/* Offsets (in doubles) of the v2 kernels' scratch regions (lpl_fd_args): P = n c planes
 *   coef       P                      plane coefficients w / (C kept) (masked)
 *   chan_mean  c, chan_scale c        batch statistics
 *   part_kept, part_mean, part_m2     P * LPL_FD_STATS_PARTS each, per statistics block
 *   loss_part  n * LPL_FD_MAX_BLOCKS  per main block
 * None depends on H, W or the device, so Python sizes it from (n, c). */
typedef struct {
    int64_t coef, chan_mean, chan_scale, part_kept, part_mean, part_m2, loss_part, total;
} lpl_fd_layout;

static inline lpl_fd_layout lpl_fd_workspace_layout(int64_t n, int64_t c) {
    lpl_fd_layout l;
    const int64_t planes = lpl_fd_ws_mul(n, c), parts = lpl_fd_ws_mul(planes, LPL_FD_STATS_PARTS);
    l.coef = 0;
    l.chan_mean = lpl_fd_ws_add(l.coef, planes);
    l.chan_scale = lpl_fd_ws_add(l.chan_mean, c);
    l.part_kept = lpl_fd_ws_add(l.chan_scale, c);
    l.part_mean = lpl_fd_ws_add(l.part_kept, parts);
    l.part_m2 = lpl_fd_ws_add(l.part_mean, parts);
    l.loss_part = lpl_fd_ws_add(l.part_m2, parts);
    l.total = lpl_fd_ws_add(l.loss_part, lpl_fd_ws_mul(n, LPL_FD_MAX_BLOCKS));
    return l;
}

/* Doubles of device scratch the CUDA feature-distance kernels need: the larger of the v2
 * layout and the v1 kernels' 4 n c + 2 c, so that one size serves both kernel sets.
 * Saturates at INT64_MAX rather than wrapping. */
static inline int64_t lpl_feature_distance_workspace(int64_t n, int64_t c) {
    const int64_t v1 = lpl_fd_ws_add(lpl_fd_ws_mul(4, lpl_fd_ws_mul(n, c)), lpl_fd_ws_mul(2, c));
    const int64_t v2 = lpl_fd_workspace_layout(n, c).total;
    return v1 > v2 ? v1 : v2;
}

int lpl_cpu_feature_distance(const lpl_fd_params *p, char *err);
/* kernels: the device's loaded module (lpl_cuda_driver.h); stream: the caller's. */
struct lpl_cuda_kernels;
int lpl_cuda_feature_distance(const struct lpl_cuda_kernels *k, const lpl_fd_params *p, void *stream, char *err);
/* The 0.2 launch sequence (feature_distance_cuda_v1.c), k->kernel_set == LPL_KERNEL_SET_V1. */
int lpl_cuda_feature_distance_v1(const struct lpl_cuda_kernels *k, const lpl_fd_params *p, void *stream, char *err);

/* ---- outlier mask (docs/spec.md, "Outlier mask") ------------------------------------------------- */
typedef struct {
    const void *y;     /* (N, C, H, W), dtype */
    uint8_t *keep;     /* (N, C, H, W) output keep-mask (0/1 bytes) */
    double *stats;     /* (3,) float64 output: mean, std of y*keep, outlier ratio; may be NULL */
    /* (N*C, LPL_PM_COMPONENTS) float64 output, the per-plane moments of where(keep, y, 0)
     * (lpl_kernel_abi.h); may be NULL. The CPU writes zeros for h*w = 0, the CUDA path writes
     * nothing then (no launch; the caller zeroes them) and refuses them on the v1 kernels. */
    double *plane_moments;
    int dtype;
    int64_t n, c, h, w;
    double quantile;   /* q in (0, 0.5) */
    double margin_std; /* margin = margin_std * std */
    int closing;       /* odd window of the max filter */
    int opening;       /* odd window of the min filter */
    /* CUDA only: device scratch of lpl_outlier_mask_workspace_bytes(...) bytes */
    void *workspace;
} lpl_om_params;

/* Workspace layout of the 0.2 kernels (outlier_mask_cuda_v1.c; bytes, each region 256-byte
 * aligned), kept byte-identical. P = n*c planes of L = h*w values, B
 * blocks per plane:
 *   part_d  P*B*4 doubles   per-block partial sums (moments, variance, kept stats)
 *   part_u  P*B*2 uint64    per-block min / max order keys of the finite values
 *   plane_d P*16 doubles    per-plane scalars (count, mean, std, thresholds, moments)
 *   plane_u P*4 uint64      per-plane radix-select state (two prefixes, two ranks)
 *   hist    P*2*256 uint32  per-plane digit histograms of the two selections
 *   tmp     P*L bytes       intermediate mask of the separable filters */

static inline int64_t lpl_om_v1_blocks_per_plane(int64_t plane_len) {
    if (plane_len > INT64_MAX / 2) return 64;
    int64_t b = (plane_len + 8 * LPL_OM_CUDA_THREADS - 1) / (8 * LPL_OM_CUDA_THREADS);
    if (b < 1) b = 1;
    if (b > 64) b = 64;
    return b;
}

typedef struct {
    int64_t part_d, part_u, plane_d, plane_u, hist, tmp, total;
} lpl_om_v1_layout;

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
static inline lpl_om_v1_layout lpl_om_v1_workspace_layout(int64_t n, int64_t c, int64_t h, int64_t w) {
    lpl_om_v1_layout l;
    const int64_t planes = lpl_om_mul(n, c), len = lpl_om_mul(h, w);
    const int64_t b = len < 0 ? 1 : lpl_om_v1_blocks_per_plane(len);
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

/* Workspace layout of the current kernels (outlier_mask_cuda.c), bytes, each region
 * 256-byte aligned. P planes of L values; S = lpl_om_parts_per_plane(h, w):
 *   plane_d P*16 doubles        per-plane scalars (count, mean, std, thresholds, moments)
 *   plane_u P*8 uint64          per-plane order keys and radix-select state
 *   part_d  P*S*4 doubles       per-block partial sums of the streaming path
 *   part_u  P*S*2 uint64        per-block min / max keys of the streaming path
 *   hist    P*2*2048 uint32     per-plane digit histograms of the streaming path
 *   cand    P*2*K uint64        per-plane candidate lists of the streaming path's radix
 *                               select, K = lpl_om_candidate_cap(L) keys each (L/32: half a byte
 *                               per value, within the v1 layout's one byte per value)
 * Planes that fit in shared memory use plane_d only. */

/* Blocks over one plane's values in the streaming passes (8 values per thread or more). */
static inline int64_t lpl_om_blocks_per_plane(int64_t plane_len) {
    if (plane_len > INT64_MAX / 2) return 64;
    int64_t b = (plane_len + 8 * LPL_OM_CUDA_THREADS - 1) / (8 * LPL_OM_CUDA_THREADS);
    if (b < 1) b = 1;
    if (b > 64) b = 64;
    return b;
}

/* Tiles of the streaming path's filter kernel over a plane (-1 when a size overflows). */
static inline int64_t lpl_om_tiles_per_plane(int64_t h, int64_t w) {
    if (h < 0 || w < 0) return -1;
    const int64_t ty = h / LPL_OM_TILE_H + (h % LPL_OM_TILE_H != 0), tx = w / LPL_OM_TILE_W + (w % LPL_OM_TILE_W != 0);
    return lpl_om_mul(ty, tx);
}

/* Partial-sum slots per plane: the streaming passes' blocks and the filter's tiles. */
static inline int64_t lpl_om_parts_per_plane(int64_t h, int64_t w) {
    const int64_t len = lpl_om_mul(h, w);
    const int64_t b = len < 0 ? 1 : lpl_om_blocks_per_plane(len), t = lpl_om_tiles_per_plane(h, w);
    return t < 0 ? -1 : (t > b ? t : b);
}

/* Keys per candidate list (LPL_OM_CAND_DIVISOR in lpl_kernel_abi.h). */
static inline int64_t lpl_om_candidate_cap(int64_t plane_len) { return plane_len > 0 ? plane_len / LPL_OM_CAND_DIVISOR : 0; }

typedef struct {
    int64_t plane_d, plane_u, part_d, part_u, hist, cand, total;
} lpl_om_layout;

/* Region offsets in bytes; total = -1 when the sizes overflow int64. */
static inline lpl_om_layout lpl_om_workspace_layout(int64_t n, int64_t c, int64_t h, int64_t w) {
    lpl_om_layout l;
    const int64_t planes = lpl_om_mul(n, c), parts = lpl_om_mul(planes, lpl_om_parts_per_plane(h, w));
    l.plane_d = 0;
    l.plane_u = lpl_om_add(l.plane_d, lpl_om_align256(lpl_om_mul(planes, LPL_OM_PLANE_D * 8)));
    l.part_d = lpl_om_add(l.plane_u, lpl_om_align256(lpl_om_mul(planes, LPL_OM_PLANE_U * 8)));
    l.part_u = lpl_om_add(l.part_d, lpl_om_align256(lpl_om_mul(parts, 4 * 8)));
    l.hist = lpl_om_add(l.part_u, lpl_om_align256(lpl_om_mul(parts, 2 * 8)));
    l.cand = lpl_om_add(l.hist, lpl_om_align256(lpl_om_mul(planes, 2 * LPL_OM_DIGIT_BINS * 4)));
    l.total = lpl_om_add(l.cand, lpl_om_align256(lpl_om_mul(lpl_om_mul(planes, 2 * 8), lpl_om_candidate_cap(lpl_om_mul(h, w)))));
    if (l.total == 0) l.total = 256;
    return l;
}

int lpl_cpu_outlier_mask(const lpl_om_params *p, char *err);
int lpl_cuda_outlier_mask(const struct lpl_cuda_kernels *k, const lpl_om_params *p, void *stream, char *err);
/* The 0.2 launch sequence (outlier_mask_cuda_v1.c), k->kernel_set == LPL_KERNEL_SET_V1. */
int lpl_cuda_outlier_mask_v1(const struct lpl_cuda_kernels *k, const lpl_om_params *p, void *stream, char *err);
int64_t lpl_outlier_mask_workspace_bytes(int64_t n, int64_t c, int64_t h, int64_t w);

/* ---- backward of the weighted feature distance (scale_gradient.c) ---------------------- */
/* grad (numel values of lpl_dtype `dtype`) *= *factor on the stream, unless *factor == 1
 * (tested on the device: no host sync). */
int lpl_cuda_scale_gradient(const struct lpl_cuda_kernels *k, void *grad, int dtype, int64_t numel,
                            const double *factor, void *stream, char *err);

#ifdef __cplusplus
}
#endif

#endif /* LPL_OPS_H */
