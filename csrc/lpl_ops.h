/* Kernel parameter blocks and the CPU / CUDA implementations of each op. The Python
 * entry points (feature_distance.c, outlier_mask.c) validate arguments, fill these
 * blocks and call the implementation for the tensors' device with the GIL released.
 * Implementations return 0 on success, or -1 after writing a message into err. */
#ifndef LPL_OPS_H
#define LPL_OPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LPL_ERR_LEN 256

/* ---- feature distance (spec sections 3-4) ------------------------------------------ */
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
    /* CUDA only: device scratch of lpl_feature_distance_workspace(n, c) doubles */
    double *workspace;
    int device;
} lpl_fd_params;

/* Doubles of device scratch the CUDA feature-distance kernels need. */
static inline int64_t lpl_feature_distance_workspace(int64_t n, int64_t c) {
    return 2 * n * c + 4 * c;
}

int lpl_cpu_feature_distance(const lpl_fd_params *p, char *err);
int lpl_cuda_feature_distance(const lpl_fd_params *p, void *stream, char *err);

/* ---- outlier mask (spec section 2) ------------------------------------------------- */
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
    int device;
} lpl_om_params;

int lpl_cpu_outlier_mask(const lpl_om_params *p, char *err);
int lpl_cuda_outlier_mask(const lpl_om_params *p, void *stream, char *err);
int64_t lpl_outlier_mask_workspace_bytes(int64_t n, int64_t c, int64_t h, int64_t w);

/* ---- CUDA runtime facts (stubs answer 0 / "" when built without CUDA) -------------- */
int lpl_cuda_compiled(void);
int lpl_cuda_runtime_version(void);

#ifdef __cplusplus
}
#endif

#endif /* LPL_OPS_H */
