/* What the host launcher (feature_distance_cuda.c, outlier_mask_cuda.c) and the device
 * kernels (csrc/cuda/, compiled to cubin by nvcc at build time or by NVRTC at first use)
 * must agree on: the kernels' names, the scratch layout passed by value, the launch
 * constants. Valid C11 and CUDA C++ (NVRTC included: lpl_math.h supplies the types). */
#ifndef LPL_KERNEL_ABI_H
#define LPL_KERNEL_ABI_H

#include "lpl_math.h"

/* Storage dtype codes of tensors (lpl_tensor.h) and of the kernels' per-dtype entry
 * points (LPL_DTYPE_KERNELS order): declared once, here. */
typedef enum {
    LPL_FLOAT32 = 0,
    LPL_FLOAT64 = 1,
    LPL_FLOAT16 = 2,
    LPL_BFLOAT16 = 3,
    LPL_BOOL = 4,
    LPL_UINT8 = 5,
    LPL_DTYPE_OTHER = 6 /* anything else: integers, complex, ... always rejected */
} lpl_dtype;

/* Every kernel of the module, in one list. A per-dtype kernel is four entries in
 * lpl_dtype order (f32, f64, f16, bf16), so the launcher indexes base + dtype. The
 * exported symbol of entry `name` is "lpl_" #name (extern "C", no mangling). */
#define LPL_DTYPE_KERNELS(X, base) X(base##_f32) X(base##_f64) X(base##_f16) X(base##_bf16)
/* The feature-distance kernels (csrc/cuda/feature_distance_kernels.cuh). */
#define LPL_FD_KERNEL_LIST(X)                                                                 \
    LPL_DTYPE_KERNELS(X, fd_stats)                                                            \
    X(fd_setup)                                                                               \
    LPL_DTYPE_KERNELS(X, fd_main)                                                             \
    X(fd_finalize)
/* The outlier-mask kernels (csrc/cuda/outlier_mask_kernels.cuh): the one-block-per-plane
 * path (om_plane) and the streaming path of planes too large for shared memory. */
#define LPL_OM_KERNEL_LIST(X)                                                                 \
    LPL_DTYPE_KERNELS(X, om_plane)                                                            \
    LPL_DTYPE_KERNELS(X, om_hist)                                                             \
    X(om_select)                                                                              \
    LPL_DTYPE_KERNELS(X, om_filter)                                                           \
    X(om_plane_merge)                                                                         \
    X(om_layer_stats)
/* The 0.2 kernels, kept selectable (LPL_EXT_KERNEL_SET=v1) until a GPU run has compared
 * them with the current ones (csrc/cuda/v1_*.cuh; delete with them). */
#define LPL_V1_KERNEL_LIST(X)                                                                 \
    X(v1_fd_kept_count)                                                                       \
    X(v1_fd_fill)                                                                             \
    LPL_DTYPE_KERNELS(X, v1_fd_plane_moments)                                                 \
    X(v1_fd_channel_moments)                                                                  \
    LPL_DTYPE_KERNELS(X, v1_fd_main)                                                          \
    X(v1_fd_finalize)                                                                         \
    LPL_DTYPE_KERNELS(X, v1_om_moments)                                                       \
    X(v1_om_setup)                                                                            \
    LPL_DTYPE_KERNELS(X, v1_om_variance)                                                      \
    LPL_DTYPE_KERNELS(X, v1_om_radix_hist)                                                    \
    X(v1_om_radix_select)                                                                     \
    X(v1_om_thresholds)                                                                       \
    LPL_DTYPE_KERNELS(X, v1_om_keep_rowor)                                                    \
    X(v1_om_col_or)                                                                           \
    X(v1_om_row_and)                                                                          \
    LPL_DTYPE_KERNELS(X, v1_om_final)                                                         \
    X(v1_om_plane_stats)                                                                      \
    X(v1_om_layer_stats)
/* The backward of the weighted feature distance (csrc/cuda/scale_kernels.cuh). */
#define LPL_SCALE_KERNEL_LIST(X) LPL_DTYPE_KERNELS(X, scale_grad)
#define LPL_KERNEL_LIST(X) LPL_FD_KERNEL_LIST(X) LPL_OM_KERNEL_LIST(X) LPL_SCALE_KERNEL_LIST(X) LPL_V1_KERNEL_LIST(X)

/* Parameters of lpl_scale_grad_*: grad[i] *= *factor for i < numel, unless *factor == 1. */
#define LPL_SCALE_THREADS 256
typedef struct {
    void *grad;            /* numel values of the kernel's dtype, C-contiguous */
    const double *factor;  /* one float64 on the device: the upstream gradient */
    int64_t numel;
} lpl_scale_args;

/* The kernel sets a loaded module can run (lpl_cuda_kernels.kernel_set). */
enum { LPL_KERNEL_SET_V2 = 2, LPL_KERNEL_SET_V1 = 1 };

#define LPL_KERNEL_ENUM_ENTRY(name) LPL_K_##name,
enum { LPL_KERNEL_LIST(LPL_KERNEL_ENUM_ENTRY) LPL_KERNEL_COUNT };
#undef LPL_KERNEL_ENUM_ENTRY

/* Threads per block of the feature-distance kernels (the main kernel may use fewer). */
#define LPL_FD_THREADS 256
/* Feature distance (v2): the statistics pass (fd_stats) reads LPL_FD_STATS_CHUNK values
 * per block and step, at most LPL_FD_STATS_PARTS blocks per (n, c) plane; the main kernel
 * runs at most LPL_FD_MAX_BLOCKS blocks per sample, each looping over its pixel tiles.
 * Both bounds keep the workspace a function of (n, c) alone. */
#define LPL_FD_STATS_CHUNK 1024
#define LPL_FD_STATS_PARTS 32
#define LPL_FD_MAX_BLOCKS 256

/* Per-plane moments of where(keep, y, 0), the outlier mask's optional output and the feature
 * distance's optional input (docs/spec.md, "Outlier mask" and "Feature distance"): float64,
 * (N*C, LPL_PM_COMPONENTS) row-major, row q = n*C + c of plane (n, c):
 *   [LPL_PM_MEAN]  mean of where(keep, y, 0) over the plane's h*w values (masked ones as 0)
 *   [LPL_PM_M2]    its M2, the sum of squared deviations from that mean (>= 0)
 *   [LPL_PM_KEPT]  the kept count (an exact integer)
 * summed in the outlier mask's one reduction order (below), so the CPU and the v2 kernels
 * write the same bits; all 0 for planes of no value (h*w = 0: the CPU writes them, the CUDA
 * path launches nothing and lpl_ext._launch zeroes them). */
enum { LPL_PM_MEAN = 0, LPL_PM_M2 = 1, LPL_PM_KEPT = 2, LPL_PM_COMPONENTS = 3 };

/* `batch` statistics of channel c from the plane moments (LPL_PM_* above; docs/spec.md,
 * "Normalization"): the planes (0, c), (1, c), ..., (N - 1, c), each
 * of plane_len values, merged in this order with lpl_om_merge_moments. The CPU runs this
 * helper and fd_setup the same sequence (through its counted loads), so the channel mean and
 * std are the same bits on both. */
LPL_HD void lpl_batch_stats_from_planes(const double *pm, int64_t n_planes, int64_t channels, int64_t c,
                                        double plane_len, double *mean_out, double *std_out) {
    double count = 0.0, mean = 0.0, m2 = 0.0;
    for (int64_t n = 0; n < n_planes; ++n) {
        const double *row = pm + (n * channels + c) * LPL_PM_COMPONENTS;
        lpl_om_merge_moments(&count, &mean, &m2, plane_len, row[LPL_PM_MEAN], row[LPL_PM_M2]);
    }
    *mean_out = mean;
    *std_out = lpl_unbiased_std(count, m2);
}

/* Feature-distance kernel arguments, one by-value struct for every fd kernel (the
 * launcher fills it once, feature_distance_cuda.c). Scratch pointers are into the
 * workspace laid out by lpl_fd_workspace_layout (lpl_ops.h). */
typedef struct {
    const void *x, *y;     /* (N, C, H, W) in the storage dtype */
    const uint8_t *mask;   /* keep-mask bytes, NULL = keep all */
    void *grad;            /* NULL = loss only */
    double *loss;          /* (N,) */
    const double *grad_scale; /* (N,) factors folded into the gradient's plane coefficients, NULL = 1 */
    /* the outlier mask's moments of where(mask, y, 0) (LPL_PM_*), NULL = none: with them
     * fd_setup takes the kept counts and the batch statistics from them, and fd_stats does
     * not run (y and the mask are read by fd_main only) */
    const double *plane_moments;
    int64_t n, c, hw;
    int norm, dist;
    double weight;
    /* statistics pass: blocks per plane (each loops over chunks part, part + parts, ...) */
    int64_t stats_parts;
    /* main kernel: a block is tile_pixels pixel lanes x (blockDim.x / tile_pixels)
     * channel groups; blocks_per_sample blocks loop over tiles_per_sample tiles */
    int64_t tile_pixels, tiles_per_sample, blocks_per_sample;
    /* byte offsets into the main kernel's dynamic shared memory, -1 = not there: the
     * sample's plane coefficients (double), batch scale and shift (acc), the per-pixel
     * scalars (4 acc per pixel), the staged tile of x, y (storage type) and the mask */
    int64_t sh_coef, sh_scale, sh_shift, sh_pixel, sh_x, sh_y, sh_mask;
    /* the tile's keep bits (C rows of ceil(P / 8) bytes) when keep_bits is set */
    int64_t sh_bits;
    /* Packed keep-mask, 1 bit per value, written by fd_stats and read by fd_main in
     * place of the mask bytes: the byte of values [8j, 8j + 8) of plane q lies in the
     * first byte of grad element q * hw + 8j (keep_bits_stride = its storage size). Each
     * main block reads its tile's bytes before it writes the tile's gradient, which
     * overwrites them; NULL = fd_main reads the mask bytes (no gradient, or the bits of
     * a tile do not fit in shared memory). */
    uint8_t *keep_bits;
    int64_t keep_bits_stride;
    /* workspace */
    double *coef;       /* (N*C) lpl_plane_coef per plane (masked) */
    double *chan_mean;  /* (C) batch mean */
    double *chan_scale; /* (C) batch 1 / (std + eps) */
    double *part_kept;  /* (N*C*stats_parts) kept count per statistics block */
    double *part_mean;  /* (N*C*stats_parts) batch: mean of y*keep per statistics block */
    double *part_m2;    /* (N*C*stats_parts) batch: sum of squared deviations from it */
    double *loss_part;  /* (N*blocks_per_sample) per main block: sum of coef * e */
} lpl_fd_args;

/* Threads per block of the outlier-mask kernels over plane values. */
#define LPL_OM_CUDA_THREADS 256
/* Doubles of per-plane scalars in the outlier-mask scratch. */
#define LPL_OM_PLANE_D 16

/* Scratch regions of the 0.2 outlier-mask kernels (csrc/cuda/v1_outlier_mask_kernels.cuh),
 * passed by value (pointers into the workspace laid out by lpl_om_v1_workspace_layout in
 * lpl_ops.h). */
typedef struct {
    double *part_d;   /* per-block partial sums: 4 doubles per block */
    uint64_t *part_u; /* per-block min / max order keys: 2 per block */
    double *plane_d;  /* per-plane scalars: LPL_OM_PLANE_D doubles per plane */
    uint64_t *plane_u;/* per-plane radix-select state: 4 per plane */
    uint32_t *hist;   /* per-plane digit histograms: 512 per plane */
    uint8_t *tmp;     /* intermediate mask of the separable filters: one byte per value */
} lpl_om_v1_ws;

/* ---- outlier mask, current kernels ---- */
/* Digit width of the streaming path's radix select: 11 bits take a float32 key in 3
 * passes (11 + 11 + 10), a 16-bit key in 2, a float64 key in 6; 2 * 2048 bins fit in
 * 16 KiB of shared memory. */
#define LPL_OM_DIGIT_BITS 11
#define LPL_OM_DIGIT_BINS (1 << LPL_OM_DIGIT_BITS)
/* Smallest output tile of the streaming path's fused threshold + closing + opening
 * kernel (the workspace holds partials for this many tiles; the launcher takes tiles of
 * twice these sides where shared memory allows: less halo re-read). */
#define LPL_OM_TILE_W 64
#define LPL_OM_TILE_H 32
/* Per-plane slots: LPL_OM_PLANE_D doubles and LPL_OM_PLANE_U order keys. */
#define LPL_OM_PLANE_U 8
/* Candidate gather of the streaming path's radix select: once the bins a digit pass selects
 * for both order statistics hold at most 1 / LPL_OM_CAND_DIVISOR of the plane's values each,
 * the next pass over the values also copies the keys in those bins (the candidates) into two
 * per-plane lists, and the remaining digit passes histogram the lists instead of re-reading
 * the plane (float32: 3 reads of y instead of 4 on spread-out data). Larger bins (ties, values
 * piled at one magnitude) keep re-reading the plane: the lists' capacity is fixed by the
 * plane's size, the results are the same either way. */
#define LPL_OM_CAND_DIVISOR 32

/* ---- the outlier mask's one reduction order (CPU and both CUDA paths) -------------------
 * Every floating sum of the outlier mask (a plane's finite sum, its sums of (v - mean)^2
 * and (v - mean), its kept moments) and the merge of the planes' moments into the layer
 * statistics are evaluated in this one order, whatever the thread count, block count or
 * launch plan, so the mean, std and ratio are the same bits on the CPU and the GPU:
 *  1. tiles: a plane (h x w, row-major) is cut into tiles of LPL_OM_TILE_H x LPL_OM_TILE_W
 *     (32 x 64) values; tile (ty, tx) is number ty * ceil(w / 64) + tx; edge tiles are
 *     clipped to the plane;
 *  2. lanes: inside a tile, lane l of LPL_OM_LANES (256, the CUDA block) sums the values
 *     at tile positions l, l + 256, l + 512, ... (position t: tile row t / 64, column
 *     t % 64; the lane of row r, column c is lpl_om_lane(r, c)), one after the other in
 *     double from +0.0; positions outside the plane, non-finite values (and, for the
 *     kept moments, masked values) add nothing;
 *  3. the 256 lane sums are combined by lpl_om_tree over 256 items: the tile's value;
 *  4. the tiles' values are combined by lpl_om_tree over the plane's tiles;
 *  5. the planes' (count, mean, M2) moments are combined by lpl_om_tree over the planes in
 *     plane order, the combine being lpl_om_merge_moments (Chan's merge, lpl_math.h).
 * lpl_om_tree over n items a[0..n): with P the smallest power of two >= n, for s = P/2,
 * P/4, ..., 1: a[i] = a[i] (+) a[i + s] for every i < s with i + s < n; the result is
 * a[0]. Each level is parallel (the GPU runs it with a block, a barrier per level); after
 * the level of stride s, a[i] holds the items j < n with j = i (mod s). Adding +0.0 for
 * an absent value leaves a sum unchanged (a sum started at +0.0 is never -0.0 in round to
 * nearest), so the CPU may add 0 where the GPU skips. Counts and min / max keys are exact
 * in any order. */
#define LPL_OM_LANES LPL_OM_CUDA_THREADS
/* Tile rows that one pass of the 256 lanes covers (4: lane l is at row l / 64). */
#define LPL_OM_LANE_ROWS (LPL_OM_LANES / LPL_OM_TILE_W)

/* Lane of the value at row r, column c of a tile (0 <= r < 32, 0 <= c < 64). */
LPL_HD int lpl_om_lane(int r, int c) { return (r % LPL_OM_LANE_ROWS) * LPL_OM_TILE_W + c; }

/* First stride of lpl_om_tree over n items (P / 2; 0 when n <= 1: nothing to combine). */
LPL_HD int64_t lpl_om_tree_top(int64_t n) {
    int64_t p = 1;
    while (p < n) p <<= 1;
    return p >> 1;
}

/* Number of items j < n with j = i (mod step): how many leaves node i of lpl_om_tree
 * holds before the level of stride step / 2 (i < n). */
LPL_HD int64_t lpl_om_tree_span(int64_t n, int64_t i, int64_t step) { return (n - i + step - 1) / step; }

/* lpl_om_tree of sums, sequentially (the CPU's evaluation of it): `comps` doubles per item,
 * items `stride` doubles apart; the results are left in a[0 .. comps). */
LPL_HD void lpl_om_tree_sum(double *a, int64_t n, int64_t stride, int comps) {
    for (int64_t s = lpl_om_tree_top(n); s > 0; s >>= 1)
        for (int64_t i = 0; i < s && i + s < n; ++i)
            for (int c = 0; c < comps; ++c) a[i * stride + c] += a[(i + s) * stride + c];
}

/* One combine of lpl_om_tree over the planes' moments (step 5): node i (a: mean, M2, kept
 * count) takes in node i + s (b) at the level of stride s, over n planes of `len` values;
 * each node's value count follows from the leaves it holds (exact integers in double). */
LPL_HD void lpl_om_tree_merge_planes(double len, int64_t n, int64_t i, int64_t s, double *a, const double *b) {
    double n_a = len * (double)lpl_om_tree_span(n, i, 2 * s);
    const double n_b = len * (double)lpl_om_tree_span(n, i + s, 2 * s);
    lpl_om_merge_moments(&n_a, &a[0], &a[1], n_b, b[0], b[1]);
    a[2] += b[2];
}

/* Scratch regions of the current kernels (lpl_om_workspace_layout in lpl_ops.h). */
typedef struct {
    double *plane_d;   /* per-plane scalars: LPL_OM_PLANE_D doubles per plane */
    uint64_t *plane_u; /* per-plane radix-select state: LPL_OM_PLANE_U per plane */
    double *part_d;    /* per-block partial sums: parts_per_plane * 4 doubles per plane */
    uint64_t *part_u;  /* per-block min / max order keys: parts_per_plane * 2 per plane */
    uint32_t *hist;    /* per-plane digit histograms: 2 * LPL_OM_DIGIT_BINS per plane */
    uint64_t *cand;    /* per-plane candidate lists: 2 * cand_cap keys per plane */
} lpl_om_ws;

/* The one by-value parameter block of every outlier-mask kernel. The launcher fills it
 * once and changes only `pass` / `shift` / `digit_bits` between the radix passes. */
typedef struct {
    const void *y;         /* (planes, h, w) values, storage dtype */
    uint8_t *keep;         /* (planes, h, w) output keep-mask */
    double *stats;         /* (3,) layer statistics, NULL: none */
    double *plane_moments; /* (planes, LPL_PM_COMPONENTS) per-plane moments, NULL: none */
    int64_t planes, h, w, len; /* len = h * w */
    int64_t blocks_per_plane;  /* streaming passes: blocks over each plane's values */
    int64_t tiles_x, tiles_y;  /* filter kernel: tiles per plane row / column */
    int tile_w, tile_h;        /* filter kernel: output tile (a multiple of LPL_OM_TILE_W x _H) */
    int64_t parts_per_plane;   /* part_d / part_u slots per plane */
    double quantile, margin_std;
    int dtype;             /* lpl_dtype */
    int key_bits;          /* bits of the order-preserving key: 16, 32 or 64 */
    /* radii of the closing (max filter) and opening (min filter), clamped to the plane
     * (a window wider than the plane is clipped to it) */
    int rc_x, rc_y, ro_x, ro_y;
    int pass;              /* om_hist / om_select: radix pass, -1 = setup */
    int shift, digit_bits; /* the pass's digit: key bits [shift, shift + digit_bits) */
    int layer_in_shared;   /* om_layer_stats: the planes' moments staged in dynamic shared memory */
    int tiles_in_shared;   /* om_select / om_plane_merge: a plane's tile partials staged there */
    int64_t cand_cap;      /* keys per candidate list (lpl_om_candidate_cap) */
    lpl_om_ws ws;
} lpl_om_args;

#endif /* LPL_KERNEL_ABI_H */
