/* A stand-in for libcuda.so.1 that runs on a machine without a GPU, so that the tests
 * drive lpl_ext's whole CUDA host path (opening the driver, picking and loading a kernel
 * image, argument checks, context push/pop, launch sequences) and execute the real
 * kernels on the emulated device (tests/emu/, docs/cuda.md "The emulated device").
 * "Device memory" is host memory. Built together with the emulator by
 * tests/fake_cuda/build.py.
 *
 * cuModuleGetFunction finds the kernel by name in the loaded image (an ELF symbol string
 * or a PTX .entry) and in the host build of the kernels; from a cubin it also reads the
 * function's static shared memory and __launch_bounds__. cuLaunchKernel refuses what a
 * GPU refuses, with the driver's error code (CUDA_ERROR_INVALID_VALUE: an empty grid or
 * block, more than 1,024 threads or a block dimension over 1,024 / 1,024 / 64, grid y or z
 * over 65,535, static + dynamic shared memory over 48 KiB, or over the function's
 * cuFuncSetAttribute opt-in, itself at most the device's maximum;
 * CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: more threads than the kernel's launch bounds), then
 * runs the kernel with the launch's grid, block, dynamic shared bytes and parameters.
 *
 * Each launch is appended to the file named by FAKE_CUDA_LOG as one line
 *     launch <kernel> grid=<g> block=<b> smem=<s> stream=<handle> depth=<ctx depth> n=0
 *            read=<B> write=<B> atomic=<B> unique_read=<B> unique_write=<B> warnings=<n>
 * (bytes through the kernels' global-memory io helpers; unique_* with FAKE_CUDA_FOOTPRINT=1),
 * a refused one as "refused <kernel> rc=<code> ...".
 * Settings, read at each call: FAKE_CUDA_CC ("90": compute capability 9.0, default),
 * FAKE_CUDA_DEVICES (count, default 1), FAKE_CUDA_SMS (multiprocessors, default 132),
 * FAKE_CUDA_REJECT_CUBIN=N (cuModuleLoadData refuses the first N ELF images after
 * fake_reset(), as a driver older than the toolkit that built them does),
 * FAKE_CUDA_INIT_ERROR=1 (cuInit fails with CUDA_ERROR_NO_DEVICE), FAKE_CUDA_SEED (block
 * order of every launch, shuffled by this seed; 0: grid order; default 1),
 * FAKE_CUDA_FOOTPRINT=1 (count distinct bytes too), FAKE_CUDA_POISON (the byte shared
 * memory is filled with at block start, default 0xff), FAKE_CUDA_DEADLOCK_MS (a block whose
 * threads all wait this long without progress fails the launch, default 10000), and the
 * emulator's scheduling (tests/emu/lpl_emu_runtime.cpp): FAKE_CUDA_SPIN (yields before a
 * barrier wait sleeps, 64), FAKE_CUDA_IDLE_SPIN (yields of an idle thread between blocks, 0),
 * FAKE_CUDA_PIN_WARPS (a warp's threads on one CPU, 1) and FAKE_CUDA_STACK_KB (these two when the
 * threads are created). */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lpl_emu_api.h"

typedef int CUresult;
typedef int CUdevice;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_UNSUPPORTED_PTX_VERSION = 222,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
    CUDA_ERROR_STREAM_CAPTURE_IMPLICIT = 906,
};

/* CUfunction_attribute values used here (cuda.h) */
enum {
    FUNC_ATTR_MAX_THREADS_PER_BLOCK = 0,
    FUNC_ATTR_SHARED_SIZE_BYTES = 1,
    FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8,
    FUNC_ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT = 9,
};

#define DEFAULT_SHARED_LIMIT (48 * 1024)

static __thread int ctx_depth; /* contexts pushed by this thread and not popped */
static int contexts[16];       /* primary context of each device; its address is the handle */
static int retained[16];
static int cubins_rejected;

static int env_int(const char *name, int fallback) {
    const char *v = getenv(name);
    return v && *v ? atoi(v) : fallback;
}

static void log_line(const char *fmt, const char *name, long long a, long long b, long long c, unsigned long long d,
                     int e, int f) {
    const char *path = getenv("FAKE_CUDA_LOG");
    if (!path) return;
    FILE *fp = fopen(path, "a");
    if (!fp) return;
    fprintf(fp, fmt, name, a, b, c, d, e, f);
    fclose(fp);
}

/* Shared memory per block a function may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin)
 * for compute capability `cc` (CUDA C Programming Guide, "Compute Capabilities"). */
static int optin_shared_limit(int cc) {
    switch (cc) {
    case 70: case 72: return 96 * 1024;
    case 75: return 64 * 1024;
    case 80: case 87: return 163 * 1024;
    case 86: case 89: case 120: case 121: return 99 * 1024;
    case 90: case 100: case 103: case 110: return 227 * 1024;
    default: return cc >= 90 ? 227 * 1024 : DEFAULT_SHARED_LIMIT;
    }
}

/* ---- stream capture (torch.cuda.graph) -----------------------------------------------
 * A test opens a capture on a stream handle with fake_begin_capture(stream, mode) and
 * closes it with fake_end_capture(stream), which returns 0, or 901 when the capture was
 * invalidated. While a capture is open, as on a GPU (CUDA Programming Guide, "Stream
 * Capture": cudaStreamCaptureModeGlobal / ThreadLocal / Relaxed):
 *   - a potentially unsafe call (module load / unload, memory allocation or free, a
 *     synchronous copy or synchronization) from a thread whose capture mode is not
 *     relaxed fails with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidates the
 *     capture (global captures: any thread; thread-local ones: the capturing thread);
 *   - work on the legacy default stream (handle 0 or 1) fails with
 *     CUDA_ERROR_STREAM_CAPTURE_IMPLICIT and invalidates the capture;
 *   - launches and async memsets on the capturing stream are recorded (counted, and
 *     logged with captured=1) and, unlike on a GPU, also run at once, so that a test can
 *     compare their results with an uncaptured call. */
enum { CAPTURE_GLOBAL = 0, CAPTURE_THREAD_LOCAL = 1, CAPTURE_RELAXED = 2 };
typedef struct {
    unsigned long long stream;
    int mode;
    int open;
    int invalidated;
    int recorded;
} fake_capture;
static fake_capture captures[4];
static __thread int thread_capture_mode = CAPTURE_GLOBAL;
static __thread int thread_owns_capture; /* thread-local captures begun on this thread */

static fake_capture *capture_of(unsigned long long stream) {
    for (int i = 0; i < 4; ++i)
        if (captures[i].open && captures[i].stream == stream) return &captures[i];
    return NULL;
}

/* 0, or CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED after invalidating the open captures an
 * unsafe call from this thread breaks. */
static CUresult unsafe_call(const char *what) {
    if (thread_capture_mode == CAPTURE_RELAXED) return 0;
    int broken = 0;
    for (int i = 0; i < 4; ++i) {
        fake_capture *c = &captures[i];
        if (!c->open) continue;
        if (c->mode == CAPTURE_GLOBAL || (c->mode == CAPTURE_THREAD_LOCAL && thread_owns_capture)) {
            c->invalidated = 1;
            broken = 1;
        }
    }
    if (!broken) return 0;
    const char *path = getenv("FAKE_CUDA_LOG");
    FILE *fp = path ? fopen(path, "a") : NULL;
    if (fp) {
        fprintf(fp, "refused %s rc=%d during-capture=1\n", what, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
        fclose(fp);
    }
    return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
}

/* 0 for work on `stream`; CUDA_ERROR_STREAM_CAPTURE_IMPLICIT for the legacy stream while a
 * capture is open; *recorded set when `stream` itself is capturing. */
static CUresult stream_work(unsigned long long stream, int *recorded) {
    *recorded = 0;
    int any_open = 0;
    for (int i = 0; i < 4; ++i) any_open |= captures[i].open;
    if (any_open && (stream == 0 || stream == 1)) {
        for (int i = 0; i < 4; ++i)
            if (captures[i].open) captures[i].invalidated = 1;
        return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
    }
    fake_capture *c = capture_of(stream);
    if (c != NULL) {
        if (c->invalidated) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
        c->recorded++;
        *recorded = 1;
    }
    return 0;
}

CUresult cuThreadExchangeStreamCaptureMode(int *mode) {
    if (mode == NULL || *mode < CAPTURE_GLOBAL || *mode > CAPTURE_RELAXED) return CUDA_ERROR_INVALID_VALUE;
    const int previous = thread_capture_mode;
    thread_capture_mode = *mode;
    *mode = previous;
    return 0;
}
CUresult cuStreamIsCapturing(void *stream, int *status) {
    fake_capture *c = capture_of((unsigned long long)(uintptr_t)stream);
    *status = c == NULL ? 0 : (c->invalidated ? 2 : 1); /* none, active, invalidated */
    return 0;
}

/* Unsafe calls lpl_ext must never make while a caller captures; implemented so that a
 * change that starts making them fails the capture tests. */
CUresult cuMemAlloc_v2(unsigned long long *ptr, size_t bytes) {
    CUresult rc = unsafe_call("cuMemAlloc");
    if (rc != 0) return rc;
    void *p = malloc(bytes ? bytes : 1);
    if (p == NULL) return CUDA_ERROR_OUT_OF_MEMORY;
    *ptr = (unsigned long long)(uintptr_t)p;
    return 0;
}
CUresult cuMemFree_v2(unsigned long long ptr) {
    CUresult rc = unsafe_call("cuMemFree");
    if (rc == 0) free((void *)(uintptr_t)ptr);
    return rc;
}
CUresult cuCtxSynchronize(void) { return unsafe_call("cuCtxSynchronize"); }
CUresult cuStreamSynchronize(void *stream) {
    (void)stream;
    return unsafe_call("cuStreamSynchronize");
}
CUresult cuMemcpyHtoD_v2(unsigned long long dst, const void *src, size_t n) {
    CUresult rc = unsafe_call("cuMemcpyHtoD");
    if (rc == 0) memcpy((void *)(uintptr_t)dst, src, n);
    return rc;
}
CUresult cuMemcpyDtoH_v2(void *dst, unsigned long long src, size_t n) {
    CUresult rc = unsafe_call("cuMemcpyDtoH");
    if (rc == 0) memcpy(dst, (const void *)(uintptr_t)src, n);
    return rc;
}

/* ---- pointer attributes ------------------------------------------------------------------
 * "Device memory" is host memory here, so every pointer counts as device memory of
 * cuda:0 with an unknown extent, except the ranges a test registers with
 * fake_register_memory(ptr, bytes, memory_type, ordinal) (memory_type as CUmemorytype:
 * 1 host, 2 device, 4 unified; 0: not CUDA memory at all). */
typedef struct {
    unsigned long long start, size;
    int memory_type, ordinal;
} fake_range;
static fake_range ranges[16];
static int range_count;

enum { PTR_MEMORY_TYPE = 2, PTR_IS_MANAGED = 8, PTR_DEVICE_ORDINAL = 9, PTR_RANGE_START = 10, PTR_RANGE_SIZE = 11 };

CUresult cuPointerGetAttributes(unsigned count, int *attributes, void **data, unsigned long long ptr) {
    int memory_type = 2, ordinal = 0;
    unsigned long long start = 0, size = 0;
    for (int i = 0; i < range_count; ++i)
        if (ptr >= ranges[i].start && ptr - ranges[i].start < ranges[i].size) {
            memory_type = ranges[i].memory_type;
            ordinal = ranges[i].ordinal;
            start = ranges[i].start;
            size = ranges[i].size;
        }
    const int cuda = memory_type != 0; /* not CUDA memory: zeroed attributes, CUDA_SUCCESS */
    for (unsigned i = 0; i < count; ++i) {
        switch (attributes[i]) {
        case PTR_MEMORY_TYPE: *(unsigned *)data[i] = (unsigned)memory_type; break;
        case PTR_IS_MANAGED: *(unsigned *)data[i] = memory_type == 4; break;
        case PTR_DEVICE_ORDINAL: *(int *)data[i] = cuda ? ordinal : -2; break;
        case PTR_RANGE_START: *(unsigned long long *)data[i] = start; break;
        case PTR_RANGE_SIZE: *(size_t *)data[i] = (size_t)size; break;
        default: return CUDA_ERROR_INVALID_VALUE;
        }
    }
    return 0;
}

CUresult cuInit(unsigned int flags) {
    return flags != 0 ? CUDA_ERROR_INVALID_VALUE : (env_int("FAKE_CUDA_INIT_ERROR", 0) ? CUDA_ERROR_NO_DEVICE : 0);
}
CUresult cuDriverGetVersion(int *v) { *v = 12040; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = env_int("FAKE_CUDA_DEVICES", 1); return 0; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    if (ordinal < 0 || ordinal >= env_int("FAKE_CUDA_DEVICES", 1) || ordinal >= 16) return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return 0;
}
CUresult cuDeviceGetAttribute(int *value, int attr, CUdevice d) {
    (void)d;
    const int cc = env_int("FAKE_CUDA_CC", 90);
    switch (attr) {
    case 1: *value = 1024; return 0;                         /* max threads per block */
    case 2: case 3: *value = 1024; return 0;                 /* max block x, y */
    case 4: *value = 64; return 0;                           /* max block z */
    case 5: *value = 2147483647; return 0;                   /* max grid x */
    case 6: case 7: *value = 65535; return 0;                /* max grid y, z */
    case 8: *value = DEFAULT_SHARED_LIMIT; return 0;         /* shared memory per block */
    case 10: *value = 32; return 0;                          /* warp size */
    case 16: *value = env_int("FAKE_CUDA_SMS", 132); return 0; /* multiprocessors */
    case 75: *value = cc / 10; return 0;                     /* compute capability major */
    case 76: *value = cc % 10; return 0;                     /* minor */
    case 97: *value = optin_shared_limit(cc); return 0;      /* shared memory per block, opt-in */
    default: return CUDA_ERROR_INVALID_VALUE;
    }
}
CUresult cuDevicePrimaryCtxRetain(void **ctx, CUdevice d) { *ctx = &contexts[d]; retained[d]++; return 0; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) { return retained[d]-- > 0 ? 0 : CUDA_ERROR_INVALID_CONTEXT; }
CUresult cuCtxPushCurrent_v2(void *ctx) { (void)ctx; ctx_depth++; return 0; }
CUresult cuCtxPopCurrent_v2(void **ctx) {
    if (ctx_depth == 0) return CUDA_ERROR_INVALID_CONTEXT; /* more pops than pushes */
    ctx_depth--;
    if (ctx) *ctx = NULL;
    return 0;
}

typedef struct fake_function {
    char *name;
    int kernel;        /* index in the host build's kernel table */
    int static_shared; /* bytes of __shared__ variables (from the cubin; 0 from PTX) */
    int max_threads;   /* __launch_bounds__ (from the cubin), else 1024 */
    int max_dynamic;   /* CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES */
    struct fake_function *next;
} fake_function;

typedef struct {
    const unsigned char *image; /* copy of the image, NUL-terminated */
    size_t len;
    int elf;
    fake_function *functions; /* freed with the module */
} fake_module;

CUresult cuModuleLoadData(void **module, const void *image) {
    CUresult unsafe = unsafe_call("cuModuleLoadData");
    if (unsafe != 0) return unsafe;
    const unsigned char *p = (const unsigned char *)image;
    int elf = p[0] == 0x7f && p[1] == 'E' && p[2] == 'L' && p[3] == 'F';
    if (elf && cubins_rejected < env_int("FAKE_CUDA_REJECT_CUBIN", 0)) {
        cubins_rejected++;
        return CUDA_ERROR_UNSUPPORTED_PTX_VERSION;
    }
    size_t len;
    if (elf) {
        /* ELF64: section header table offset + count * size bounds the file */
        uint64_t shoff;
        uint16_t shentsize, shnum;
        memcpy(&shoff, p + 0x28, 8);
        memcpy(&shentsize, p + 0x3a, 2);
        memcpy(&shnum, p + 0x3c, 2);
        len = (size_t)(shoff + (uint64_t)shentsize * shnum);
    } else if (memcmp(p, "//", 2) == 0 || memcmp(p, ".version", 8) == 0) {
        len = strlen((const char *)p);
    } else {
        return CUDA_ERROR_INVALID_IMAGE;
    }
    fake_module *m = calloc(1, sizeof(*m));
    unsigned char *copy = malloc(len + 1);
    if (m == NULL || copy == NULL) {
        free(m);
        free(copy);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    memcpy(copy, p, len);
    copy[len] = 0;
    m->image = copy;
    m->len = len;
    m->elf = elf;
    *module = m;
    log_line("load %s bytes=%lld elf=%lld ctx=%lld stream=%llu depth=%d n=%d\n", "image", (long long)len, elf, 0, 0,
             ctx_depth, 0);
    return 0;
}
CUresult cuModuleUnload(void *module) {
    CUresult unsafe = unsafe_call("cuModuleUnload");
    if (unsafe != 0) return unsafe;
    fake_module *m = module;
    for (fake_function *f = m->functions, *next; f; f = next) {
        next = f->next;
        free(f->name);
        free(f);
    }
    free((void *)m->image);
    free(m);
    return 0;
}

/* ---- what a cubin says about a function ------------------------------------------------ */
typedef struct {
    const unsigned char *data;
    size_t len;
    uint64_t shoff;
    uint16_t shentsize, shnum, shstrndx;
} elf_view;

static int elf_section(const elf_view *e, unsigned i, const char **name, uint64_t *off, uint64_t *size) {
    const uint64_t at = e->shoff + (uint64_t)i * e->shentsize;
    if (at + 64 > e->len) return -1;
    uint32_t name_off;
    memcpy(&name_off, e->data + at, 4);
    memcpy(off, e->data + at + 0x18, 8);
    memcpy(size, e->data + at + 0x20, 8);
    const uint64_t str_at = e->shoff + (uint64_t)e->shstrndx * e->shentsize;
    uint64_t str_off, str_size;
    if (str_at + 64 > e->len) return -1;
    memcpy(&str_off, e->data + str_at + 0x18, 8);
    memcpy(&str_size, e->data + str_at + 0x20, 8);
    if (name_off >= str_size || str_off + str_size > e->len) return -1;
    *name = (const char *)e->data + str_off + name_off;
    return memchr(*name, 0, str_size - name_off) ? 0 : -1;
}

/* Static shared bytes and launch bounds of `fn` from the cubin's .nv.shared.<fn> section
 * (nvcc 13 counts the 1 KiB the driver reserves per block into it wherever the image has a
 * .nv.shared.reserved section: sm_90 and newer) and the EIATTR_MAX_THREADS (0x05) record
 * of .nv.info.<fn>. */
static void cubin_function_info(const fake_module *m, const char *fn, int *static_shared, int *max_threads) {
    elf_view e = {m->image, m->len, 0, 0, 0, 0};
    *static_shared = 0;
    *max_threads = 1024;
    if (!m->elf || m->len < 64 || m->image[4] != 2) return; /* ELF64 only */
    memcpy(&e.shoff, m->image + 0x28, 8);
    memcpy(&e.shentsize, m->image + 0x3a, 2);
    memcpy(&e.shnum, m->image + 0x3c, 2);
    memcpy(&e.shstrndx, m->image + 0x3e, 2);
    if (e.shentsize < 64 || e.shstrndx >= e.shnum) return;
    char shared_name[256], info_name[256];
    snprintf(shared_name, sizeof(shared_name), ".nv.shared.%s", fn);
    snprintf(info_name, sizeof(info_name), ".nv.info.%s", fn);
    uint64_t shared = 0;
    int reserved = 0;
    for (unsigned i = 0; i < e.shnum; ++i) {
        const char *name;
        uint64_t off, size;
        if (elf_section(&e, i, &name, &off, &size) < 0) continue;
        if (strncmp(name, ".nv.shared.reserved.", 20) == 0) reserved = 1;
        if (strcmp(name, shared_name) == 0) shared = size;
        if (strcmp(name, info_name) == 0 && off + size <= m->len) {
            for (uint64_t p = off; p + 4 <= off + size;) {
                const unsigned char format = m->image[p], attr = m->image[p + 1];
                uint16_t payload = 0;
                if (format == 0x04) memcpy(&payload, m->image + p + 2, 2); /* EIFMT_SVAL: sized payload */
                if (attr == 0x05 && format == 0x04 && payload >= 12 && p + 16 <= off + size) {
                    uint32_t dims[3];
                    memcpy(dims, m->image + p + 4, 12);
                    *max_threads = (int)(dims[0] * dims[1] * dims[2]);
                }
                p += 4 + payload;
            }
        }
    }
    if (reserved) shared = shared >= 1024 ? shared - 1024 : 0;
    *static_shared = (int)shared;
}

CUresult cuModuleGetFunction(void **fn, void *module, const char *name) {
    fake_module *m = module;
    const size_t n = strlen(name);
    const char *at = (const char *)m->image, *end = (const char *)m->image + m->len;
    for (;;) { /* a whole-word occurrence: an ELF symbol string or a PTX .entry name */
        at = memmem(at, (size_t)(end - at), name, n);
        if (!at) return CUDA_ERROR_NOT_FOUND;
        const char next = at + n < end ? at[n] : 0;
        if (!(next == '_' || (next >= '0' && next <= '9') || (next >= 'a' && next <= 'z'))) break;
        at += n;
    }
    const int kernel = lpl_emu_kernel_index(name);
    if (kernel < 0) return CUDA_ERROR_NOT_FOUND; /* in the image but not in the host build */
    fake_function *f = calloc(1, sizeof(*f));
    if (f == NULL || (f->name = strdup(name)) == NULL) {
        free(f);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    f->kernel = kernel;
    cubin_function_info(m, name, &f->static_shared, &f->max_threads);
    f->max_dynamic = DEFAULT_SHARED_LIMIT - f->static_shared;
    f->next = m->functions;
    m->functions = f;
    *fn = f;
    return 0;
}

CUresult cuFuncGetAttribute(int *value, int attrib, void *fn) {
    const fake_function *f = fn;
    if (f == NULL || value == NULL) return CUDA_ERROR_INVALID_VALUE;
    switch (attrib) {
    case FUNC_ATTR_MAX_THREADS_PER_BLOCK: *value = f->max_threads; return 0;
    case FUNC_ATTR_SHARED_SIZE_BYTES: *value = f->static_shared; return 0;
    case FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES: *value = f->max_dynamic; return 0;
    default: return CUDA_ERROR_INVALID_VALUE;
    }
}

CUresult cuFuncSetAttribute(void *fn, int attrib, int value) {
    fake_function *f = fn;
    if (f == NULL) return CUDA_ERROR_INVALID_VALUE;
    switch (attrib) {
    case FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES:
        /* static + dynamic within the device's opt-in maximum */
        if (value < 0 || value > optin_shared_limit(env_int("FAKE_CUDA_CC", 90)) - f->static_shared)
            return CUDA_ERROR_INVALID_VALUE;
        f->max_dynamic = value;
        return 0;
    case FUNC_ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT:
        return value >= -1 && value <= 100 ? 0 : CUDA_ERROR_INVALID_VALUE;
    default: return CUDA_ERROR_INVALID_VALUE;
    }
}

static void log_refused(const fake_function *f, int rc, unsigned long long grid, unsigned long long block,
                        unsigned smem) {
    const char *path = getenv("FAKE_CUDA_LOG");
    FILE *fp = path ? fopen(path, "a") : NULL;
    if (!fp) return;
    fprintf(fp, "refused %s rc=%d grid=%llu block=%llu smem=%u\n", f ? f->name : "(null)", rc, grid, block, smem);
    fclose(fp);
}

/* The limits a GPU enforces at launch (CUDA C Programming Guide, "Compute Capabilities"). */
static CUresult check_launch(const fake_function *f, const unsigned g[3], const unsigned b[3], unsigned smem) {
    const unsigned long long threads = (unsigned long long)b[0] * b[1] * b[2];
    if (g[0] == 0 || g[1] == 0 || g[2] == 0 || b[0] == 0 || b[1] == 0 || b[2] == 0) return CUDA_ERROR_INVALID_VALUE;
    if (b[0] > 1024 || b[1] > 1024 || b[2] > 64 || threads > 1024) return CUDA_ERROR_INVALID_VALUE;
    if (g[0] > 2147483647u || g[1] > 65535 || g[2] > 65535) return CUDA_ERROR_INVALID_VALUE;
    if ((long long)smem > (long long)f->max_dynamic) return CUDA_ERROR_INVALID_VALUE;
    if (threads > (unsigned long long)f->max_threads) return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    return 0;
}

CUresult cuLaunchKernel(void *fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, void *stream, void **params, void **extra) {
    const fake_function *f = fn;
    const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    const unsigned long long g = (unsigned long long)gx * gy * gz, b = (unsigned long long)bx * by * bz;
    if (f == NULL || params == NULL || extra != NULL) return CUDA_ERROR_INVALID_VALUE; /* lpl_ext passes params */
    if (ctx_depth < 1) return CUDA_ERROR_INVALID_CONTEXT; /* no context current: the launcher forgot to push */
    CUresult rc = check_launch(f, grid, block, smem);
    int captured = 0;
    if (rc == 0) rc = stream_work((unsigned long long)(uintptr_t)stream, &captured);
    if (rc != 0) {
        log_refused(f, rc, g, b, smem);
        return rc;
    }
    lpl_emu_stats st;
    char msg[512] = {0};
    rc = lpl_emu_launch(f->kernel, grid, block, smem, params, (uint64_t)(unsigned)env_int("FAKE_CUDA_SEED", 1),
                        env_int("FAKE_CUDA_FOOTPRINT", 0), &st, msg, sizeof(msg));
    if (rc != 0) fprintf(stderr, "[fake libcuda] %s: launch failed (%d): %s\n", f->name, rc, msg);
    const char *path = getenv("FAKE_CUDA_LOG");
    FILE *fp = path ? fopen(path, "a") : NULL;
    if (fp) {
        fprintf(fp,
                "launch %s grid=%llu block=%llu smem=%u stream=%llu depth=%d n=0 read=%llu write=%llu atomic=%llu "
                "unique_read=%llu unique_write=%llu warnings=%d rc=%d captured=%d\n",
                f->name, g, b, smem, (unsigned long long)(uintptr_t)stream, ctx_depth, (unsigned long long)st.read,
                (unsigned long long)st.write, (unsigned long long)st.atomic, (unsigned long long)st.unique_read,
                (unsigned long long)st.unique_write, st.warnings, rc, captured);
        fclose(fp);
    }
    return rc;
}
CUresult cuMemsetD8Async(unsigned long long ptr, unsigned char v, size_t n, void *stream) {
    int captured;
    CUresult rc = stream_work((unsigned long long)(uintptr_t)stream, &captured);
    if (rc != 0) return rc;
    memset((void *)(uintptr_t)ptr, v, n);
    log_line("memset %s bytes=%lld v=%lld x=%lld stream=%llu depth=%d n=%d\n", "d8", (long long)n, v, 0,
             (unsigned long long)(uintptr_t)stream, ctx_depth, 0);
    return 0;
}
CUresult cuGetErrorName(CUresult rc, const char **s) {
    switch (rc) {
    case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case CUDA_ERROR_NO_DEVICE: *s = "CUDA_ERROR_NO_DEVICE"; break;
    case CUDA_ERROR_INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT"; break;
    case CUDA_ERROR_UNSUPPORTED_PTX_VERSION: *s = "CUDA_ERROR_UNSUPPORTED_PTX_VERSION"; break;
    case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
    case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: *s = "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"; break;
    case CUDA_ERROR_LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
    case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: *s = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
    case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: *s = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"; break;
    case CUDA_ERROR_STREAM_CAPTURE_IMPLICIT: *s = "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT"; break;
    default: *s = "CUDA_ERROR_FAKE"; break;
    }
    return 0;
}
CUresult cuGetErrorString(CUresult rc, const char **s) {
    switch (rc) {
    case CUDA_ERROR_UNSUPPORTED_PTX_VERSION: *s = "the provided PTX was compiled with an unsupported toolchain"; break;
    case CUDA_ERROR_INVALID_VALUE: *s = "invalid argument"; break;
    case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: *s = "too many resources requested for launch"; break;
    case CUDA_ERROR_LAUNCH_FAILED: *s = "unspecified launch failure"; break;
    default: *s = "fake driver error"; break;
    }
    return 0;
}

/* Test hooks (not part of the driver API). */
int fake_ctx_depth(void) { return ctx_depth; }
void fake_reset(void) { cubins_rejected = 0; }
int fake_retained(int device) { return device >= 0 && device < 16 ? retained[device] : -1; }
/* Warnings of the emulated device since the last fake_clear_warnings(). */
int fake_warning_count(void) { return lpl_emu_warning_count(); }
const char *fake_warning(int i) { return lpl_emu_warning(i); }
void fake_clear_warnings(void) { lpl_emu_clear_warnings(); }
/* Opens a capture on `stream` (mode: 0 global, 1 thread-local, 2 relaxed); 0, or -1 when
 * one is open there already or 4 are open. */
int fake_begin_capture(unsigned long long stream, int mode) {
    if (capture_of(stream) != NULL || mode < CAPTURE_GLOBAL || mode > CAPTURE_RELAXED) return -1;
    for (int i = 0; i < 4; ++i)
        if (!captures[i].open) {
            captures[i] = (fake_capture){stream, mode, 1, 0, 0};
            if (mode == CAPTURE_THREAD_LOCAL) thread_owns_capture++;
            return 0;
        }
    return -1;
}
/* Closes the capture on `stream`: 0, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, or -1 (none
 * open); *recorded receives the launches and memsets it recorded. */
int fake_end_capture(unsigned long long stream, int *recorded) {
    fake_capture *c = capture_of(stream);
    if (c == NULL) return -1;
    c->open = 0;
    if (c->mode == CAPTURE_THREAD_LOCAL) thread_owns_capture--;
    if (recorded) *recorded = c->recorded;
    return c->invalidated ? CUDA_ERROR_STREAM_CAPTURE_INVALIDATED : 0;
}
/* Registers a memory range for cuPointerGetAttributes; fake_clear_memory() drops them. */
int fake_register_memory(unsigned long long start, unsigned long long size, int memory_type, int ordinal) {
    if (range_count >= 16) return -1;
    ranges[range_count++] = (fake_range){start, size, memory_type, ordinal};
    return 0;
}
void fake_clear_memory(void) { range_count = 0; }
