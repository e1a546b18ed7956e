/* The emulated device's C interface (docs/cuda.md, "The emulated device"): what the
 * emulated kernels call (lpl_emu.cuh) and what the stand-in driver
 * (tests/fake_cuda/fake_libcuda.c) calls to run a launch. Valid C11 and C++17. */
#ifndef LPL_EMU_API_H
#define LPL_EMU_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- called by the kernels (through lpl_emu.cuh) ------------------------------------ */
enum { LPL_EMU_SHFL_IDX = 0, LPL_EMU_SHFL_UP = 1, LPL_EMU_SHFL_DOWN = 2, LPL_EMU_SHFL_XOR = 3 };
void *lpl_emu_dynamic_shared(void);
void lpl_emu_syncthreads(const char *site);
void lpl_emu_syncwarp(const char *site, unsigned mask);
uint64_t lpl_emu_shfl(const char *site, int kind, unsigned mask, uint64_t bits, int arg, int width);
void lpl_emu_count_atomic(const void *p, size_t bytes);
void lpl_emu_footprint_add(const void *p, size_t bytes, int write);

/* ---- the kernels of the host build (tests/emu/lpl_emu_kernels.cpp) ------------------- */
typedef struct {
    const char *name;           /* exported symbol on the GPU, e.g. "lpl_fd_main_f32" */
    void (*run)(void **params); /* unpacks cuLaunchKernel's void ** and calls the kernel */
    int nparams;
} lpl_emu_kernel;
const lpl_emu_kernel *lpl_emu_kernels(int *count); /* the table and its length */

/* ---- called by the stand-in driver --------------------------------------------------- */
/* Bytes one launch moved through the kernels' global-memory io helpers (lpl_device.cuh):
 * every access of every thread (`read`, `write`), global atomics (`atomic`, once per
 * operation), and with footprint on the distinct bytes read and written. */
typedef struct {
    uint64_t read, write, atomic;
    uint64_t unique_read, unique_write;
    uint64_t blocks, threads;
    int warnings; /* warnings this launch raised (lpl_emu_warning) */
} lpl_emu_stats;

/* Index of kernel `name` in lpl_emu_kernel_table, or -1. */
int lpl_emu_kernel_index(const char *name);

/* Runs kernel `index` on grid x block threads (every thread a fiber, an OS thread in the
 * ThreadSanitizer build; blocks one at a time in the order `seed` shuffles; seed 0: in
 * order), with `dyn_smem` bytes of dynamic shared memory and cuLaunchKernel's parameter
 * array. 0, or a CUDA error code with a message in msg (719, CUDA_ERROR_LAUNCH_FAILED: the
 * block deadlocked at its barriers). */
int lpl_emu_launch(int index, const unsigned grid[3], const unsigned block[3], size_t dyn_smem, void **params,
                   uint64_t seed, int footprint, lpl_emu_stats *stats, char *msg, size_t msg_len);

/* Warnings since the last clear (a barrier reached from two source lines, a shuffle
 * naming lanes that exited or do not exist): count, and the i-th message. */
int lpl_emu_warning_count(void);
const char *lpl_emu_warning(int i);
void lpl_emu_clear_warnings(void);

#ifdef __cplusplus
}
#endif

#endif /* LPL_EMU_API_H */
