/* A stand-in for libcuda.so.1 that runs on a machine without a GPU, so that the tests
 * can drive lpl_ext's whole CUDA host path: opening the driver, picking and loading a
 * kernel image, argument checks, context push/pop and the launch sequences. "Device
 * memory" is host memory; kernels do not run: each launch is appended to the file
 * named by FAKE_CUDA_LOG as one line
 *     launch <kernel> grid=<g> block=<b> smem=<s> stream=<handle> depth=<ctx depth> n=0
 * Settings, read at each call: FAKE_CUDA_CC ("90": compute capability 9.0, default),
 * FAKE_CUDA_DEVICES (count, default 1), FAKE_CUDA_REJECT_CUBIN=N (cuModuleLoadData
 * refuses the first N ELF images after fake_reset(), as a driver older than the toolkit
 * that built them does), FAKE_CUDA_INIT_ERROR=1 (cuInit fails with CUDA_ERROR_NO_DEVICE). */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;

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

CUresult cuInit(unsigned int flags) { return flags != 0 ? 1 : (env_int("FAKE_CUDA_INIT_ERROR", 0) ? 100 : 0); }
CUresult cuDriverGetVersion(int *v) { *v = 12040; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = env_int("FAKE_CUDA_DEVICES", 1); return 0; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    if (ordinal < 0 || ordinal >= env_int("FAKE_CUDA_DEVICES", 1) || ordinal >= 16) return 101; /* INVALID_DEVICE */
    *d = ordinal;
    return 0;
}
CUresult cuDeviceGetAttribute(int *value, int attr, CUdevice d) {
    (void)d;
    const int cc = env_int("FAKE_CUDA_CC", 90);
    switch (attr) {
    case 16: *value = 132; return 0;    /* multiprocessors */
    case 75: *value = cc / 10; return 0; /* compute capability major */
    case 76: *value = cc % 10; return 0; /* minor */
    default: return 1;
    }
}
CUresult cuDevicePrimaryCtxRetain(void **ctx, CUdevice d) { *ctx = &contexts[d]; retained[d]++; return 0; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) { return retained[d]-- > 0 ? 0 : 201; }
CUresult cuCtxPushCurrent_v2(void *ctx) { (void)ctx; ctx_depth++; return 0; }
CUresult cuCtxPopCurrent_v2(void **ctx) {
    if (ctx_depth == 0) return 201; /* INVALID_CONTEXT: more pops than pushes */
    ctx_depth--;
    if (ctx) *ctx = NULL;
    return 0;
}

typedef struct {
    const char *image; /* copy of the image, NUL-terminated */
    size_t len;
} fake_module;

CUresult cuModuleLoadData(void **module, const void *image) {
    const unsigned char *p = (const unsigned char *)image;
    int elf = p[0] == 0x7f && p[1] == 'E' && p[2] == 'L' && p[3] == 'F';
    if (elf && cubins_rejected < env_int("FAKE_CUDA_REJECT_CUBIN", 0)) {
        cubins_rejected++;
        return 222; /* UNSUPPORTED_PTX_VERSION */
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
        return 200; /* INVALID_IMAGE */
    }
    fake_module *m = malloc(sizeof(*m));
    char *copy = malloc(len + 1);
    memcpy(copy, p, len);
    copy[len] = 0;
    m->image = copy;
    m->len = len;
    *module = m;
    log_line("load %s bytes=%lld elf=%lld ctx=%lld stream=%llu depth=%d n=%d\n", "image", (long long)len, elf, 0, 0,
             ctx_depth, 0);
    return 0;
}
CUresult cuModuleUnload(void *module) {
    fake_module *m = module;
    free((void *)m->image);
    free(m);
    return 0;
}
CUresult cuModuleGetFunction(void **fn, void *module, const char *name) {
    fake_module *m = module;
    const size_t n = strlen(name);
    const char *at = m->image, *end = m->image + m->len;
    for (;;) { /* a whole-word occurrence: an ELF symbol string or a PTX .entry name */
        at = memmem(at, (size_t)(end - at), name, n);
        if (!at) return 500; /* NOT_FOUND */
        const char next = at + n < end ? at[n] : 0;
        if (!(next == '_' || (next >= '0' && next <= '9') || (next >= 'a' && next <= 'z'))) break;
        at += n;
    }
    *fn = strdup(name); /* leaks one name per kernel per load: a test stand-in */
    return 0;
}
CUresult cuLaunchKernel(void *fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, void *stream, void **params, void **extra) {
    (void)extra;
    if (params == NULL) return 1;  /* every lpl_ext kernel takes arguments */
    if (ctx_depth < 1) return 201; /* no context current: the launcher forgot to push */
    log_line("launch %s grid=%lld block=%lld smem=%lld stream=%llu depth=%d n=%d\n", (const char *)fn,
             (long long)gx * gy * gz, (long long)bx * by * bz, (long long)smem,
             (unsigned long long)(uintptr_t)stream, ctx_depth, 0);
    return 0;
}
CUresult cuMemsetD8Async(unsigned long long ptr, unsigned char v, size_t n, void *stream) {
    memset((void *)(uintptr_t)ptr, v, n);
    log_line("memset %s bytes=%lld v=%lld x=%lld stream=%llu depth=%d n=%d\n", "d8", (long long)n, v, 0,
             (unsigned long long)(uintptr_t)stream, ctx_depth, 0);
    return 0;
}
CUresult cuGetErrorName(CUresult rc, const char **s) {
    *s = rc == 222 ? "CUDA_ERROR_UNSUPPORTED_PTX_VERSION" : rc == 100 ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_FAKE";
    return 0;
}
CUresult cuGetErrorString(CUresult rc, const char **s) {
    *s = rc == 222 ? "the provided PTX was compiled with an unsupported toolchain" : "fake driver error";
    return 0;
}

/* Test hooks (not part of the driver API). */
int fake_ctx_depth(void) { return ctx_depth; }
void fake_reset(void) { cubins_rejected = 0; }
int fake_retained(int device) { return device >= 0 && device < 16 ? retained[device] : -1; }
