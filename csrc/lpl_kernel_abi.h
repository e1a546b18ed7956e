/* What the host launcher (feature_distance_cuda.c, outlier_mask_cuda.c) and the device
 * kernels (csrc/cuda/, compiled to cubin by nvcc at build time or by NVRTC at first use)
 * must agree on: the kernels' names, the scratch layout passed by value, the launch
 * constants. Valid C11 and CUDA C++ (NVRTC included: lpl_math.h supplies the types). */
#ifndef LPL_KERNEL_ABI_H
#define LPL_KERNEL_ABI_H

#include "lpl_math.h"

/* Every kernel of the module, in one list. A per-dtype kernel is four entries in
 * lpl_dtype order (f32, f64, f16, bf16), so the launcher indexes base + dtype. The
 * exported symbol of entry `name` is "lpl_" #name (extern "C", no mangling). */
#define LPL_DTYPE_KERNELS(X, base) X(base##_f32) X(base##_f64) X(base##_f16) X(base##_bf16)
#define LPL_KERNEL_LIST(X)                                                                    \
    X(fd_kept_count)                                                                          \
    X(fd_fill)                                                                                \
    LPL_DTYPE_KERNELS(X, fd_plane_moments)                                                    \
    X(fd_channel_moments)                                                                     \
    LPL_DTYPE_KERNELS(X, fd_main)                                                             \
    X(fd_finalize)                                                                            \
    LPL_DTYPE_KERNELS(X, om_moments)                                                          \
    X(om_setup)                                                                               \
    LPL_DTYPE_KERNELS(X, om_variance)                                                         \
    LPL_DTYPE_KERNELS(X, om_radix_hist)                                                       \
    X(om_radix_select)                                                                        \
    X(om_thresholds)                                                                          \
    LPL_DTYPE_KERNELS(X, om_keep_rowor)                                                       \
    X(om_col_or)                                                                              \
    X(om_row_and)                                                                             \
    LPL_DTYPE_KERNELS(X, om_final)                                                            \
    X(om_plane_stats)                                                                         \
    X(om_layer_stats)

#define LPL_KERNEL_ENUM_ENTRY(name) LPL_K_##name,
enum { LPL_KERNEL_LIST(LPL_KERNEL_ENUM_ENTRY) LPL_KERNEL_COUNT };
#undef LPL_KERNEL_ENUM_ENTRY

/* Threads per block of the feature-distance kernels (the main kernel may use fewer). */
#define LPL_FD_THREADS 256
/* Threads per block of the outlier-mask kernels over plane values. */
#define LPL_OM_CUDA_THREADS 256
/* Doubles of per-plane scalars in the outlier-mask scratch. */
#define LPL_OM_PLANE_D 16

/* Outlier-mask scratch regions, passed by value to the kernels (pointers into the
 * workspace laid out by lpl_om_workspace_layout in lpl_ops.h). */
typedef struct {
    double *part_d;   /* per-block partial sums: 4 doubles per block */
    uint64_t *part_u; /* per-block min / max order keys: 2 per block */
    double *plane_d;  /* per-plane scalars: LPL_OM_PLANE_D doubles per plane */
    uint64_t *plane_u;/* per-plane radix-select state: 4 per plane */
    uint32_t *hist;   /* per-plane digit histograms: 512 per plane */
    uint8_t *tmp;     /* intermediate mask of the separable filters: one byte per value */
} lpl_om_ws;

#endif /* LPL_KERNEL_ABI_H */
