// Emulation of the CUDA device-code dialect for host C++ (g++ -std=c++17): the same
// csrc/cuda/ text that nvcc and NVRTC compile runs here, each CUDA thread a fiber (an OS
// thread under ThreadSanitizer), so that the stand-in driver (tests/fake_cuda/fake_libcuda.c)
// executes the real kernels on a machine without a GPU (docs/cuda.md, "The emulated device").
//
// Included before the kernel sources (tests/emu/lpl_emu_kernels.cpp). It models:
//   threadIdx, blockIdx, blockDim, gridDim   thread-local, set by the runtime per thread;
//   __syncthreads()                          a barrier over the block's live threads;
//   __shfl_*_sync()                          a barrier over the warp's live lanes + exchange;
//   __shared__                               static storage: blocks run one at a time, so a
//                                            static is per block; poisoned at block start;
//   LPL_DYNAMIC_SHARED(T, name)              the launch's dynamic shared bytes, poisoned;
//   atomicAdd/Min/Max/CAS/Exch               GCC __atomic builtins (relaxed, as CUDA's);
//   LPL_EMU_GLOBAL_READ / _WRITE             the io helpers' byte counters (lpl_device.cuh).
// Barriers and shuffles take their call site, so that a barrier reached from two source
// lines, or a shuffle after lanes exited, is reported (lpl_emu_runtime.cpp). No CUDA
// header and no GPU are needed.
#ifndef LPL_EMU_CUH
#define LPL_EMU_CUH

#ifdef __CUDACC__
#error "lpl_emu.cuh is the host emulation of device code: nvcc and NVRTC compile the kernels natively"
#endif

// The headers lpl_math.h includes, first and at global scope: the kernels are included
// inside an unnamed namespace (lpl_emu_kernels.cpp), where these must not be re-opened.
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <utility>

#include "lpl_emu_api.h"

// ---- keywords --------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time, so one static object per declaration is exactly one per block.
#define __shared__ static
#define LPL_DYNAMIC_SHARED(T, name) T *const name = static_cast<T *>(lpl_emu_dynamic_shared())

// ---- thread and block coordinates --------------------------------------------------------
struct lpl_emu_dim3 {
    unsigned int x, y, z;
};
extern __thread lpl_emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

// ---- byte counters of the io helpers (lpl_device.cuh) --------------------------------------
// Every access counts its bytes; with FAKE_CUDA_FOOTPRINT=1 the accessed ranges are also
// logged, so that the runtime can report the distinct bytes of each launch.
extern __thread uint64_t lpl_emu_tl_read, lpl_emu_tl_write;
extern __thread int lpl_emu_tl_footprint;
#define LPL_EMU_GLOBAL_READ(ptr, bytes) \
    (lpl_emu_tl_read += (bytes), lpl_emu_tl_footprint ? lpl_emu_footprint_add((ptr), (bytes), 0) : (void)0)
#define LPL_EMU_GLOBAL_WRITE(ptr, bytes) \
    (lpl_emu_tl_write += (bytes), lpl_emu_tl_footprint ? lpl_emu_footprint_add((ptr), (bytes), 1) : (void)0)

// ---- barriers ---------------------------------------------------------------------------------
#define LPL_EMU_STR2(x) #x
#define LPL_EMU_STR(x) LPL_EMU_STR2(x)
#define LPL_EMU_SITE __FILE__ ":" LPL_EMU_STR(__LINE__)
#define __syncthreads() lpl_emu_syncthreads(LPL_EMU_SITE)
#define __syncwarp(...) lpl_emu::syncwarp(LPL_EMU_SITE, ##__VA_ARGS__)

namespace lpl_emu {
inline void syncwarp(const char *site, unsigned mask = 0xffffffffu) { lpl_emu_syncwarp(site, mask); }
template <typename T> inline T shuffle(const char *site, int kind, unsigned mask, T value, int arg, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffled values are at most 64 bits");
    uint64_t bits = 0;
    memcpy(&bits, &value, sizeof(T));
    bits = lpl_emu_shfl(site, kind, mask, bits, arg, width);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}
template <typename T> inline T shfl(const char *site, unsigned mask, T v, int src, int width = 32) {
    return shuffle(site, LPL_EMU_SHFL_IDX, mask, v, src, width);
}
template <typename T> inline T shfl_up(const char *site, unsigned mask, T v, unsigned d, int width = 32) {
    return shuffle(site, LPL_EMU_SHFL_UP, mask, v, (int)d, width);
}
template <typename T> inline T shfl_down(const char *site, unsigned mask, T v, unsigned d, int width = 32) {
    return shuffle(site, LPL_EMU_SHFL_DOWN, mask, v, (int)d, width);
}
template <typename T> inline T shfl_xor(const char *site, unsigned mask, T v, int m, int width = 32) {
    return shuffle(site, LPL_EMU_SHFL_XOR, mask, v, m, width);
}
}  // namespace lpl_emu
#define __shfl_sync(...) lpl_emu::shfl(LPL_EMU_SITE, __VA_ARGS__)
#define __shfl_up_sync(...) lpl_emu::shfl_up(LPL_EMU_SITE, __VA_ARGS__)
#define __shfl_down_sync(...) lpl_emu::shfl_down(LPL_EMU_SITE, __VA_ARGS__)
#define __shfl_xor_sync(...) lpl_emu::shfl_xor(LPL_EMU_SITE, __VA_ARGS__)

// ---- atomics (relaxed, like CUDA's; counted when the address is global memory) ---------------
namespace lpl_emu {
template <typename T> inline void count_atomic(const T *p) { lpl_emu_count_atomic(p, sizeof(T)); }
template <typename T> inline T atomic_add(T *p, T v) {
    count_atomic(p);
    if constexpr (std::is_integral<T>::value) {
        return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
    } else {
        T old;
        __atomic_load(p, &old, __ATOMIC_RELAXED);
        T sum = old + v;
        while (!__atomic_compare_exchange(p, &old, &sum, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) sum = old + v;
        return old;
    }
}
template <typename T> inline T atomic_min(T *p, T v) {
    count_atomic(p);
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <typename T> inline T atomic_max(T *p, T v) {
    count_atomic(p);
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v > old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
}  // namespace lpl_emu
inline float atomicAdd(float *p, float v) { return lpl_emu::atomic_add(p, v); }
inline double atomicAdd(double *p, double v) { return lpl_emu::atomic_add(p, v); }
inline int atomicAdd(int *p, int v) { return lpl_emu::atomic_add(p, v); }
inline unsigned int atomicAdd(unsigned int *p, unsigned int v) { return lpl_emu::atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) { return lpl_emu::atomic_add(p, v); }
inline int atomicMin(int *p, int v) { return lpl_emu::atomic_min(p, v); }
inline unsigned int atomicMin(unsigned int *p, unsigned int v) { return lpl_emu::atomic_min(p, v); }
inline unsigned long long atomicMin(unsigned long long *p, unsigned long long v) { return lpl_emu::atomic_min(p, v); }
inline int atomicMax(int *p, int v) { return lpl_emu::atomic_max(p, v); }
inline unsigned int atomicMax(unsigned int *p, unsigned int v) { return lpl_emu::atomic_max(p, v); }
inline unsigned long long atomicMax(unsigned long long *p, unsigned long long v) { return lpl_emu::atomic_max(p, v); }
template <typename T> inline T atomicCAS(T *p, T compare, T value) {
    lpl_emu::count_atomic(p);
    __atomic_compare_exchange_n(p, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return compare;
}
template <typename T> inline T atomicExch(T *p, T value) {
    lpl_emu::count_atomic(p);
    return __atomic_exchange_n(p, value, __ATOMIC_RELAXED);
}

// ---- intrinsics -------------------------------------------------------------------------------
inline double __longlong_as_double(long long v) {
    double d;
    memcpy(&d, &v, sizeof(d));
    return d;
}
inline long long __double_as_longlong(double v) {
    long long i;
    memcpy(&i, &v, sizeof(i));
    return i;
}
inline float __int_as_float(int v) {
    float f;
    memcpy(&f, &v, sizeof(f));
    return f;
}
inline int __float_as_int(float v) {
    int i;
    memcpy(&i, &v, sizeof(i));
    return i;
}
inline int __popc(unsigned int v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz((unsigned)v); }
inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll((unsigned long long)v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }

#endif  // LPL_EMU_CUH
