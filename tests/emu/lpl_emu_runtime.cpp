// The emulated device's runtime (docs/cuda.md, "The emulated device"): the CUDA threads
// of a block as fibers (or as OS threads, see below); the block barrier and the warp
// barriers with the shuffle exchange; shared-memory poisoning; the global-memory byte
// counters.
//
// Blocks run one at a time, in a seeded shuffled order. Synchronisation between the
// emulated threads exists only where CUDA has it (a block barrier among the block's
// threads, a warp barrier among a warp's lanes, the launch boundary), so that a missing
// barrier shows up in the results, and is a real data race for ThreadSanitizer.
//
// Two ways to run a block's threads:
// - fibers (the plain and the ASan + UBSan builds): every thread a stack of its own on the
//   launching OS thread (an assembly stack switch on x86-64, ucontext elsewhere), switched
//   only where it waits at a barrier or returns, round robin. A thread then runs until it
//   must wait, so what a missing barrier does is the same on every run: a read sees what the
//   threads before it in the round wrote, and the poison where later ones had yet to write.
//   No futex, no scheduler: with OS threads the 2-core CI machine spent most of its
//   emulated-device time in the kernel's futex and sched_yield paths (docs/cuda.md).
// - OS threads (the ThreadSanitizer build, or FAKE_CUDA_THREADS=1): a pool of one OS thread
//   per CUDA thread; every wait is a futex on an atomic whose acquire/release pairs carry
//   the happens-before edges ThreadSanitizer checks; bookkeeping counters are relaxed, so
//   they add none.
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if !defined(__SANITIZE_THREAD__)
#include <sys/mman.h>
#include <ucontext.h>
#define LPL_EMU_HAVE_FIBERS 1
#else
#define LPL_EMU_HAVE_FIBERS 0  // ThreadSanitizer checks the OS-thread model
#endif

#include <algorithm>
#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "lpl_emu.cuh"

#if defined(__SANITIZE_ADDRESS__)
extern "C" void *__asan_region_is_poisoned(void *beg, size_t size);
// ASan's fiber annotations: each switch of stacks is announced, so that a C++ exception
// thrown in a fiber (a deadlocked block's abort) unpoisons the right stack
extern "C" void __sanitizer_start_switch_fiber(void **fake_stack_save, const void *bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void *fake_stack_save, const void **bottom_old, size_t *size_old);
extern "C" void __asan_unpoison_memory_region(void const volatile *addr, size_t size);
#endif

// The kernels' __shared__ statics: the .bss of lpl_emu_kernels.o, renamed to this section
// by tests/emu/build.py (weak: a kernel set without static shared memory has none).
extern "C" char __start_lpl_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_lpl_emu_shared[] __attribute__((weak, visibility("hidden")));

__thread lpl_emu_dim3 threadIdx, blockIdx, blockDim, gridDim;
__thread uint64_t lpl_emu_tl_read, lpl_emu_tl_write;
__thread int lpl_emu_tl_footprint;

namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / kWarp;

int env_int(const char *name, int fallback) {
    const char *v = getenv(name);
    return v && *v ? atoi(v) : fallback;
}

// ---- futex waits on std::atomic<uint32_t> ---------------------------------------------
// Returns false when the timeout passed.
bool futex_wait(std::atomic<uint32_t> *a, uint32_t expected, int timeout_ms) {
    struct timespec ts = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L};
    long rc = syscall(SYS_futex, reinterpret_cast<uint32_t *>(a), FUTEX_WAIT_PRIVATE, expected,
                      timeout_ms >= 0 ? &ts : nullptr, nullptr, 0);
    return !(rc == -1 && errno == ETIMEDOUT);
}
void futex_wake(std::atomic<uint32_t> *a, int count) {
    syscall(SYS_futex, reinterpret_cast<uint32_t *>(a), FUTEX_WAKE_PRIVATE, count, nullptr, nullptr, 0);
}

// ---- warnings ------------------------------------------------------------------------
// A mutex: it orders the threads that warn, which only ever happens in a kernel already
// reported as wrong.
std::mutex g_warn_mutex;
std::vector<std::string> g_warnings;
std::atomic<int> g_launch_warnings{0};

void warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void warn(const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    std::lock_guard<std::mutex> lock(g_warn_mutex);
    g_launch_warnings.fetch_add(1, std::memory_order_relaxed);
    for (const std::string &w : g_warnings)
        if (w == buf) return;  // each distinct message once
    g_warnings.emplace_back(buf);
    fprintf(stderr, "[lpl_emu] warning: %s\n", buf);
}

// ---- barriers --------------------------------------------------------------------------
struct EmuAbort {};

struct Block;
struct Warp;

// A barrier over a fixed set of threads, some of which may exit: state holds
// (expected << 32) | arrived; the last arrival (or the exit that leaves every remaining
// thread arrived) completes it by bumping gen.
struct Barrier {
    std::atomic<uint64_t> state{0};
    std::atomic<uint32_t> gen{0};
    std::atomic<const char *> site{nullptr};
    std::atomic<uint32_t> sleepers{0};  // threads in futex_wait on gen (the completer wakes only those)
    std::atomic<uint32_t> mask{0};      // a warp barrier: the *_sync mask of this episode
    uint32_t size = 0;                  // threads at block start
    Warp *warp = nullptr;               // the warp of a warp barrier, else null

    void reset(uint32_t n) {
        state.store((uint64_t)n << 32, std::memory_order_relaxed);
        site.store(nullptr, std::memory_order_relaxed);
        size = n;
    }
};

struct Warp {
    Barrier bar;
    std::atomic<uint32_t> exited{0};  // lanes that returned from the kernel
    uint32_t lanes = 0;               // lanes that exist (a partial last warp has fewer)
    // Shuffle exchange, alternating between calls: a lane's value and the sequence number
    // of the shuffle it gave it to (a lane that returned earlier leaves an older one).
    uint64_t slots[2][kWarp];
    uint32_t tags[2][kWarp];
};

struct Block {
    Barrier bar;
    Warp warps[kMaxWarps];
    std::atomic<int> live{0}, waiting{0};
    std::atomic<uint64_t> progress{0};
    std::atomic<bool> abort{false};
    char abort_msg[512];
};

struct Interval {
    uintptr_t begin, end;
    int write;
};

struct Worker {
    pthread_t tid;
    uint32_t index = 0;
    std::atomic<uint32_t> go{0};
    std::atomic<uint32_t> asleep{0};  // in futex_wait on go: the launcher must wake it
    std::vector<Interval> footprint;
};

// The launch in flight (one at a time: g_launch_mutex).
struct Launch {
    const lpl_emu_kernel *kernel = nullptr;
    void **params = nullptr;
    lpl_emu_dim3 grid{1, 1, 1}, block{1, 1, 1};
    uint32_t threads = 0;
    uint64_t block_linear = 0;
    bool more_blocks = false;  // another block of this launch follows the current one
    char *dyn = nullptr;
    size_t dyn_size = 0;
    int footprint = 0;
    int deadlock_ms = 10000;
    int spin = 64;
    Block blk;
    std::atomic<uint32_t> remaining{0};
    std::atomic<uint64_t> read{0}, write{0}, atomic{0};
};

std::mutex g_launch_mutex;
Launch g_launch;
std::vector<Worker *> g_workers;

struct ThreadCtx {
    Worker *worker = nullptr;
    uint32_t lane = 0, warp = 0;
    uint32_t shfl_seq = 0;
    uint64_t atomic_bytes = 0;
};
thread_local ThreadCtx t_ctx;

void run_thread(Worker *w);
void block_deadlock(Block &blk, const char *site);

// ---- fibers ------------------------------------------------------------------------------
// Fibers unless this is the ThreadSanitizer build or FAKE_CUDA_THREADS=1 asks for OS
// threads; decided once, at the first launch.
bool use_fibers() {
    static const bool fibers = LPL_EMU_HAVE_FIBERS && env_int("FAKE_CUDA_THREADS", 0) == 0;
    return fibers;
}

#if LPL_EMU_HAVE_FIBERS
#if defined(__x86_64__)
// The stack switch on x86-64 (System V): the callee-saved registers, MXCSR and the x87
// control word, pushed on the old stack, popped from the new one. swapcontext does the
// same plus a sigprocmask system call per switch, which this avoids (switches are the
// emulator's hot path: one per waiting thread at every barrier and shuffle).
extern "C" void lpl_emu_stack_switch(void **save_sp, void *sp);
asm(R"(
    .pushsection .text
    .p2align 4
    .globl lpl_emu_stack_switch
    .hidden lpl_emu_stack_switch
    .type lpl_emu_stack_switch, @function
lpl_emu_stack_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size lpl_emu_stack_switch, .-lpl_emu_stack_switch
    .popsection
)");
struct FiberContext {
    void *sp = nullptr;
};
#else
struct FiberContext {
    ucontext_t uc;
};
#endif

struct Fiber {
    FiberContext ctx;
    char *stack = nullptr;  // the usable stack, above a guard page
    size_t stack_size = 0;
    bool done = true;
    // this emulated thread's thread-locals while another one runs
    lpl_emu_dim3 tid{0, 0, 0};
    uint64_t tl_read = 0, tl_write = 0;
    ThreadCtx tctx;
    void *fake_stack = nullptr;  // ASan's, across a switch
};

// The fibers of the block that runs, on the launching thread (one launch at a time).
struct FiberSched {
    std::vector<Fiber *> fibers;  // one per emulated thread, reused by every block
    uint32_t count = 0;           // the block's threads
    int current = -1;             // -1: the launcher
    FiberContext launcher;
    void *launcher_fake_stack = nullptr;
    const void *launcher_stack = nullptr;
    size_t launcher_stack_size = 0;
    // A deadlock is a full round of yields in which no thread arrived anywhere or returned.
    uint64_t events = 0, events_seen = 0;
    uint32_t idle_yields = 0;
};
FiberSched g_sched;

// The next fiber after the current one, round robin, that has not returned (the current
// one itself when it is the only one left); -1 when all have.
int next_fiber() {
    FiberSched &S = g_sched;
    for (uint32_t k = 1; k <= S.count; ++k) {
        const int i = (int)(((uint32_t)(S.current < 0 ? -1 : S.current) + k) % S.count);
        if (!S.fibers[i]->done) return i;
    }
    return -1;
}

// Saves the running fiber's thread-locals, installs those of `to`, and switches stacks.
void fiber_switch(int to) {
    FiberSched &S = g_sched;
    const int from = S.current;
    Fiber *f = from >= 0 ? S.fibers[from] : nullptr;
    Fiber *t = to >= 0 ? S.fibers[to] : nullptr;
    if (f != nullptr) {
        f->tid = threadIdx;
        f->tl_read = lpl_emu_tl_read;
        f->tl_write = lpl_emu_tl_write;
        f->tctx = t_ctx;
    }
    if (t != nullptr) {
        threadIdx = t->tid;
        lpl_emu_tl_read = t->tl_read;
        lpl_emu_tl_write = t->tl_write;
        t_ctx = t->tctx;
    }
    S.current = to;
#if defined(__SANITIZE_ADDRESS__)
    void **fake = f == nullptr ? &S.launcher_fake_stack : f->done ? nullptr : &f->fake_stack;
    if (t != nullptr)
        __sanitizer_start_switch_fiber(fake, t->stack, t->stack_size);
    else
        __sanitizer_start_switch_fiber(fake, S.launcher_stack, S.launcher_stack_size);
#endif
    FiberContext *save = f != nullptr ? &f->ctx : &S.launcher, *next = t != nullptr ? &t->ctx : &S.launcher;
#if defined(__x86_64__)
    lpl_emu_stack_switch(&save->sp, next->sp);
#else
    swapcontext(&save->uc, &next->uc);
#endif
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(f != nullptr ? f->fake_stack : S.launcher_fake_stack, nullptr, nullptr);
#endif
}

void fiber_main() {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    Fiber *f = g_sched.fibers[g_sched.current];
    run_thread(g_workers[g_sched.current]);  // fiber i runs the block's thread i
    f->done = true;
    ++g_sched.events;
    fiber_switch(next_fiber());  // never resumed: the next block makes a new context
    abort();
}

// A waiting thread gives the CPU to the next one; after a full round without any arrival
// or return, every live thread waits at a barrier that cannot complete.
void fiber_yield(Block &blk, const char *site) {
    FiberSched &S = g_sched;
    if (S.events != S.events_seen) {
        S.events_seen = S.events;
        S.idle_yields = 0;
    } else if (++S.idle_yields > S.count) {
        block_deadlock(blk, site);
    }
    const int next = next_fiber();
    if (next != S.current) fiber_switch(next);
}

#if defined(__x86_64__)
// A fresh stack that lpl_emu_stack_switch enters at fiber_main, as if called (the return
// address slot above it is 0: fiber_main never returns).
void start_context(Fiber *f) {
    uintptr_t top = ((uintptr_t)f->stack + f->stack_size) & ~(uintptr_t)15;
    uint64_t *sp = reinterpret_cast<uint64_t *>(top) - 9;
    uint32_t csr[2] = {0, 0};
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
    memcpy(&sp[0], csr, 8);                             // MXCSR, x87 control word
    for (int i = 1; i <= 6; ++i) sp[i] = 0;             // r15 r14 r13 r12 rbx rbp
    sp[7] = (uint64_t)(uintptr_t)&fiber_main;           // ret
    sp[8] = 0;                                          // fiber_main's return address
    f->ctx.sp = sp;
}
#else
// A context to make fibers from (never resumed as it is: makecontext rewrites it), in a
// function of its own because getcontext returns twice.
__attribute__((noinline)) void init_context(ucontext_t *c) { getcontext(c); }

void start_context(Fiber *f) {
    f->ctx.uc.uc_stack.ss_sp = f->stack;
    f->ctx.uc.uc_stack.ss_size = f->stack_size;
    f->ctx.uc.uc_link = nullptr;
    makecontext(&f->ctx.uc, fiber_main, 0);
}
#endif

int make_fibers(uint32_t n, size_t stack_bytes, char *msg, size_t msg_len) {
    FiberSched &S = g_sched;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    stack_bytes = (stack_bytes + page - 1) / page * page;
    while (S.fibers.size() < n) {
        void *m = mmap(nullptr, stack_bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (m == MAP_FAILED) {
            snprintf(msg, msg_len, "cannot map the stack of emulated thread %zu", S.fibers.size());
            return ENOMEM;
        }
        mprotect(m, page, PROT_NONE);  // a stack overflow faults instead of writing past it
        Fiber *f = new Fiber();
        f->stack = static_cast<char *>(m) + page;
        f->stack_size = stack_bytes;
#if !defined(__x86_64__)
        init_context(&f->ctx.uc);
#endif
        S.fibers.push_back(f);
    }
    return 0;
}

// Runs one block's `threads` fibers from the launcher until every one has returned.
void run_block_fibers(uint32_t threads) {
    FiberSched &S = g_sched;
#if defined(__SANITIZE_ADDRESS__)
    static thread_local const void *stack = nullptr;
    static thread_local size_t stack_size = 0;
    if (stack == nullptr) {
        pthread_attr_t attr;
        void *addr = nullptr;
        if (pthread_getattr_np(pthread_self(), &attr) == 0) {
            pthread_attr_getstack(&attr, &addr, &stack_size);
            pthread_attr_destroy(&attr);
        }
        stack = addr;
    }
    S.launcher_stack = stack;
    S.launcher_stack_size = stack_size;
#endif
    S.count = threads;
    for (uint32_t i = 0; i < threads; ++i) {
        Fiber *f = S.fibers[i];
        f->done = false;
        f->fake_stack = nullptr;
        start_context(f);
#if defined(__SANITIZE_ADDRESS__)
        __asan_unpoison_memory_region(f->stack, f->stack_size);  // the previous block's frames
#endif
    }
    S.events = S.events_seen = 0;
    S.idle_yields = 0;
    S.current = -1;
    fiber_switch(0);  // back here when the last fiber returned
}
#endif  // LPL_EMU_HAVE_FIBERS

void check_exited(const Barrier &b);

void complete(Barrier &b, Block &blk, uint64_t s) {
    if (b.warp != nullptr) check_exited(b);
    b.state.store((s >> 32) << 32, std::memory_order_relaxed);
    b.site.store(nullptr, std::memory_order_relaxed);
    blk.progress.fetch_add(1, std::memory_order_relaxed);
    // seq_cst with the waiters' sleepers increment and gen check: either they see the new
    // gen, or this sees them asleep and wakes them
    b.gen.fetch_add(1, std::memory_order_seq_cst);
    if (b.sleepers.load(std::memory_order_seq_cst) != 0) futex_wake(&b.gen, INT_MAX);
}

// A thread of the block returned: it leaves the barrier (hardware counts exited threads
// as arrived), which completes it when every remaining thread is waiting there.
void leave(Barrier &b, Block &blk) {
    const uint64_t s = b.state.fetch_sub(1ull << 32, std::memory_order_acq_rel) - (1ull << 32);
    if ((uint32_t)s != 0 && (uint32_t)s == (uint32_t)(s >> 32)) complete(b, blk, s);
}

void block_deadlock(Block &blk, const char *site) {
    bool expected = false;
    if (!blk.abort.compare_exchange_strong(expected, true, std::memory_order_relaxed)) return;
    snprintf(blk.abort_msg, sizeof(blk.abort_msg),
             "%s: block %llu deadlocked: its %d live threads all wait at barriers (one of them at %s)",
             g_launch.kernel->name, (unsigned long long)g_launch.block_linear,
             blk.live.load(std::memory_order_relaxed), site);
    futex_wake(&blk.bar.gen, INT_MAX);
    for (Warp &w : blk.warps) futex_wake(&w.bar.gen, INT_MAX);
}

void check_site(Barrier &b, const char *site, const char *what) {
    const char *first = nullptr;
    if (b.site.compare_exchange_strong(first, site, std::memory_order_relaxed)) return;
    if (first != site && strcmp(first, site) != 0)
        warn("%s: %s reached from two source lines, %s and %s (block %llu)", g_launch.kernel->name, what, first,
             site, (unsigned long long)g_launch.block_linear);
}

void arrive_and_wait(Barrier &b, Block &blk, const char *site, const char *what) {
    check_site(b, site, what);
    const uint32_t g = b.gen.load(std::memory_order_acquire);
    blk.waiting.fetch_add(1, std::memory_order_relaxed);
    const uint64_t s = b.state.fetch_add(1, std::memory_order_acq_rel) + 1;
    if ((uint32_t)s == (uint32_t)(s >> 32)) {
        blk.waiting.fetch_sub(1, std::memory_order_relaxed);
        complete(b, blk, s);
        return;
    }
#if LPL_EMU_HAVE_FIBERS
    if (use_fibers()) {
        ++g_sched.events;
        while (b.gen.load(std::memory_order_acquire) == g) {
            if (blk.abort.load(std::memory_order_relaxed)) {
                blk.waiting.fetch_sub(1, std::memory_order_relaxed);
                throw EmuAbort{};
            }
            fiber_yield(blk, site);
        }
        blk.waiting.fetch_sub(1, std::memory_order_relaxed);
        return;
    }
#endif
    // The other participants need the CPU to arrive: yield it a few times (cheaper than a
    // futex sleep and wake on a machine with fewer cores than threads), then sleep.
    for (int i = 0; i < g_launch.spin; ++i) {
        if (b.gen.load(std::memory_order_acquire) != g) {
            blk.waiting.fetch_sub(1, std::memory_order_relaxed);
            return;
        }
        sched_yield();
    }
    // A deadlock (every live thread waiting, no barrier completing) aborts the launch
    // instead of hanging the test run: polled every 200 ms, declared after deadlock_ms.
    int idle_ms = 0;
    uint64_t seen = blk.progress.load(std::memory_order_relaxed);
    while (b.gen.load(std::memory_order_acquire) == g) {
        if (blk.abort.load(std::memory_order_relaxed)) {
            blk.waiting.fetch_sub(1, std::memory_order_relaxed);
            throw EmuAbort{};
        }
        b.sleepers.fetch_add(1, std::memory_order_seq_cst);
        const bool woken = b.gen.load(std::memory_order_seq_cst) != g || futex_wait(&b.gen, g, 200);
        b.sleepers.fetch_sub(1, std::memory_order_relaxed);
        if (woken) continue;
        const uint64_t p = blk.progress.load(std::memory_order_relaxed);
        if (p != seen) {
            seen = p;
            idle_ms = 0;
        } else if ((idle_ms += 200) >= g_launch.deadlock_ms &&
                   blk.waiting.load(std::memory_order_relaxed) >= blk.live.load(std::memory_order_relaxed)) {
            block_deadlock(blk, site);
        }
    }
    blk.waiting.fetch_sub(1, std::memory_order_relaxed);
}

// At the completion of a warp barrier every live lane has arrived and every lane that
// returned has left: a mask naming one of those is a *_sync after lanes exited (undefined
// on the GPU), a live lane outside the mask one this model does not cover.
void check_exited(const Barrier &b) {
    const Warp &w = *b.warp;
    const uint32_t mask = b.mask.load(std::memory_order_relaxed);
    const uint32_t exists = w.lanes >= 32 ? 0xffffffffu : ((1u << w.lanes) - 1u);
    const uint32_t exited = w.exited.load(std::memory_order_relaxed);
    const char *site = b.site.load(std::memory_order_relaxed);
    if (mask & exited)
        warn("%s: a warp shuffle or __syncwarp at %s after lanes exited (mask 0x%08x, exited 0x%08x, block %llu)",
             g_launch.kernel->name, site ? site : "?", mask, exited, (unsigned long long)g_launch.block_linear);
    if ((exists & ~exited) & ~mask)
        warn("%s: a warp shuffle or __syncwarp at %s with a partial mask 0x%08x: the emulator models full-warp "
             "masks only", g_launch.kernel->name, site ? site : "?", mask);
}

// ---- the threads ---------------------------------------------------------------------------
void run_thread(Worker *w) {
    Launch &L = g_launch;
    Block &blk = L.blk;
    const uint32_t id = w->index;
    threadIdx = {id % L.block.x, (id / L.block.x) % L.block.y, id / (L.block.x * L.block.y)};
    const uint64_t b = L.block_linear;
    blockIdx = {(unsigned)(b % L.grid.x), (unsigned)((b / L.grid.x) % L.grid.y),
                (unsigned)(b / ((uint64_t)L.grid.x * L.grid.y))};
    blockDim = L.block;
    gridDim = L.grid;
    t_ctx.worker = w;
    t_ctx.lane = id % kWarp;
    t_ctx.warp = id / kWarp;
    t_ctx.shfl_seq = 0;
    t_ctx.atomic_bytes = 0;
    lpl_emu_tl_read = lpl_emu_tl_write = 0;
    lpl_emu_tl_footprint = L.footprint;
    try {
        L.kernel->run(L.params);
    } catch (const EmuAbort &) {
    }
    Warp &warp = blk.warps[t_ctx.warp];
    warp.exited.fetch_or(1u << t_ctx.lane, std::memory_order_relaxed);
    blk.live.fetch_sub(1, std::memory_order_relaxed);
    blk.progress.fetch_add(1, std::memory_order_relaxed);
    leave(warp.bar, blk);
    leave(blk.bar, blk);
    L.read.fetch_add(lpl_emu_tl_read, std::memory_order_relaxed);
    L.write.fetch_add(lpl_emu_tl_write, std::memory_order_relaxed);
    L.atomic.fetch_add(t_ctx.atomic_bytes, std::memory_order_relaxed);
    if (L.remaining.fetch_sub(1, std::memory_order_acq_rel) == 1 && !use_fibers()) futex_wake(&L.remaining, 1);
}

// Between the blocks of a launch a worker yields a while before it sleeps: the next block
// usually starts within that, and a sleeping worker costs the launcher a futex wake.
// After a launch's last block it sleeps at once.
int g_idle_spin = 0;

void *worker_main(void *arg) {
    Worker *w = static_cast<Worker *>(arg);
    uint32_t seen = 0;
    bool more = false;
    for (;;) {
        uint32_t v;
        for (int i = 0; more && i < g_idle_spin && (v = w->go.load(std::memory_order_acquire)) == seen; ++i)
            sched_yield();
        while ((v = w->go.load(std::memory_order_acquire)) == seen) {
            // seq_cst with the launcher's go increment and asleep check (either it sees this
            // worker asleep and wakes it, or this sees the new go)
            w->asleep.store(1, std::memory_order_seq_cst);
            if (w->go.load(std::memory_order_seq_cst) == seen) futex_wait(&w->go, seen, -1);
            w->asleep.store(0, std::memory_order_relaxed);
        }
        seen = v;
        more = g_launch.more_blocks;  // read before run_thread signals the end of the block
        run_thread(w);
    }
    return nullptr;
}

// The lanes of a warp share one CPU (warp w on the w-th allowed CPU, round robin): a warp
// barrier then passes between threads of one run queue, without waking another core.
// Warps still run in parallel on different CPUs, and every lane is still preemptible.
int g_pin_warps = -1;
void pin_to_cpu(Worker *w) {
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return;
    const int ncpu = CPU_COUNT(&allowed);
    if (ncpu < 1) return;
    int target = (int)((w->index / kWarp) % (uint32_t)ncpu);
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
        if (!CPU_ISSET(cpu, &allowed)) continue;
        if (target-- == 0) {
            cpu_set_t one;
            CPU_ZERO(&one);
            CPU_SET(cpu, &one);
            pthread_setaffinity_np(w->tid, sizeof(one), &one);
            return;
        }
    }
}

int ensure_workers(uint32_t n, char *msg, size_t msg_len) {
    if (g_pin_warps < 0) g_pin_warps = env_int("FAKE_CUDA_PIN_WARPS", 1);
    if (g_workers.size() >= n) return 0;
    // kernels are shallow; sanitizers need more room per frame
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    const int stack_kb = env_int("FAKE_CUDA_STACK_KB", 2048);
#else
    const int stack_kb = env_int("FAKE_CUDA_STACK_KB", 512);
#endif
    const bool fibers = use_fibers();  // a worker is then only its fiber's record: no OS thread
    int rc = 0;
#if LPL_EMU_HAVE_FIBERS
    if (fibers && (rc = make_fibers(n, (size_t)stack_kb * 1024, msg, msg_len)) != 0) return rc;
#endif
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, (size_t)stack_kb * 1024);
    while (g_workers.size() < n) {
        Worker *w = new Worker();
        w->index = (uint32_t)g_workers.size();
        if (!fibers && (rc = pthread_create(&w->tid, &attr, worker_main, w)) != 0) {
            delete w;
            snprintf(msg, msg_len, "cannot start emulated thread %zu: %s", g_workers.size(), strerror(rc));
            break;
        }
        g_workers.push_back(w);
        if (!fibers && g_pin_warps) pin_to_cpu(w);
    }
    pthread_attr_destroy(&attr);
    return rc;
}

// Every byte of the kernels' static and the launch's dynamic shared memory set to
// `value`, so that a read before the block wrote it sees NaN / all-ones, not a zero.
void poison_shared(int value) {
    if (g_launch.dyn_size) memset(g_launch.dyn, value, g_launch.dyn_size);
    char *b = __start_lpl_emu_shared, *e = __stop_lpl_emu_shared;
    if (b == nullptr || e == nullptr) return;
#if defined(__SANITIZE_ADDRESS__)
    while (b < e) {  // the statics' redzones stay untouched
        char *bad = static_cast<char *>(__asan_region_is_poisoned(b, (size_t)(e - b)));
        if (bad == nullptr) bad = e;
        memset(b, value, (size_t)(bad - b));
        b = bad;
        while (b < e && __asan_region_is_poisoned(b, 1)) ++b;
    }
#else
    memset(b, value, (size_t)(e - b));
#endif
}

bool is_shared(const void *p) {
    const char *c = static_cast<const char *>(p);
    if (c >= __start_lpl_emu_shared && c < __stop_lpl_emu_shared) return true;
    return g_launch.dyn_size && c >= g_launch.dyn && c < g_launch.dyn + g_launch.dyn_size;
}

uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Distinct bytes of the intervals of one kind (read or write).
uint64_t distinct_bytes(std::vector<Interval> &all, int write) {
    std::vector<Interval> v;
    for (const Interval &i : all)
        if (i.write == write) v.push_back(i);
    std::sort(v.begin(), v.end(), [](const Interval &a, const Interval &b) { return a.begin < b.begin; });
    uint64_t total = 0;
    uintptr_t cur_b = 0, cur_e = 0;
    for (const Interval &i : v) {
        if (i.begin > cur_e) {
            total += cur_e - cur_b;
            cur_b = i.begin;
            cur_e = i.end;
        } else if (i.end > cur_e) {
            cur_e = i.end;
        }
    }
    return total + (cur_e - cur_b);
}

std::atomic<uint64_t> g_launch_count{0};

}  // namespace

// ---- device-side entry points -------------------------------------------------------------
extern "C" void *lpl_emu_dynamic_shared(void) { return g_launch.dyn; }

extern "C" void lpl_emu_syncthreads(const char *site) {
    arrive_and_wait(g_launch.blk.bar, g_launch.blk, site, "__syncthreads");
}

// A *_sync naming lanes that do not exist is undefined on the GPU (warned at arrival; the
// lanes of a warp are fixed for the block).
static void check_mask(const Warp &w, unsigned mask, const char *site, const char *what) {
    const uint32_t exists = w.lanes >= 32 ? 0xffffffffu : ((1u << w.lanes) - 1u);
    if (mask & ~exists)
        warn("%s: %s at %s names lanes that do not exist (mask 0x%08x, warp of %u lanes, block %llu)",
             g_launch.kernel->name, what, site, mask, w.lanes, (unsigned long long)g_launch.block_linear);
}

extern "C" void lpl_emu_syncwarp(const char *site, unsigned mask) {
    Warp &w = g_launch.blk.warps[t_ctx.warp];
    check_mask(w, mask, site, "__syncwarp");
    w.bar.mask.store(mask, std::memory_order_relaxed);
    arrive_and_wait(w.bar, g_launch.blk, site, "__syncwarp");
}

extern "C" uint64_t lpl_emu_shfl(const char *site, int kind, unsigned mask, uint64_t bits, int arg, int width) {
    Warp &w = g_launch.blk.warps[t_ctx.warp];
    check_mask(w, mask, site, "a warp shuffle");
    w.bar.mask.store(mask, std::memory_order_relaxed);
    const uint32_t seq = t_ctx.shfl_seq++;
    const int p = (int)(seq & 1u);
    const int lane = (int)t_ctx.lane;
    w.slots[p][lane] = bits;
    w.tags[p][lane] = seq;
    arrive_and_wait(w.bar, g_launch.blk, site, "a warp shuffle");
    if (width < 1 || width > kWarp || (width & (width - 1))) width = kWarp;
    const int base = lane & ~(width - 1);
    int src;
    switch (kind) {
    case LPL_EMU_SHFL_UP: src = lane - arg < base ? lane : lane - arg; break;
    case LPL_EMU_SHFL_DOWN: src = lane + arg >= base + width ? lane : lane + arg; break;
    case LPL_EMU_SHFL_XOR: src = (lane ^ arg) >= base + width ? lane : (lane ^ arg); break;
    default: src = base + (arg & (width - 1)); break;
    }
    if (src < 0 || src >= kWarp || (uint32_t)src >= w.lanes || w.tags[p][src] != seq)
        return ~0ull;  // a missing lane's, or one that returned before this shuffle: poison (warned above)
    return w.slots[p][src];
}

extern "C" void lpl_emu_count_atomic(const void *p, size_t bytes) {
    if (!is_shared(p)) {
        t_ctx.atomic_bytes += bytes;
        if (lpl_emu_tl_footprint) lpl_emu_footprint_add(p, bytes, 1);
    }
}

extern "C" void lpl_emu_footprint_add(const void *p, size_t bytes, int write) {
    std::vector<Interval> &v = t_ctx.worker->footprint;
    const uintptr_t b = (uintptr_t)p, e = b + bytes;
    if (!v.empty() && v.back().write == write && v.back().end == b) {
        v.back().end = e;  // contiguous with this thread's last access
        return;
    }
    v.push_back({b, e, write});
}

// ---- driver-side entry points -------------------------------------------------------------
extern "C" int lpl_emu_kernel_index(const char *name) {
    int count;
    const lpl_emu_kernel *table = lpl_emu_kernels(&count);
    for (int i = 0; i < count; ++i)
        if (strcmp(table[i].name, name) == 0) return i;
    return -1;
}

extern "C" int lpl_emu_launch(int index, const unsigned grid[3], const unsigned block[3], size_t dyn_smem,
                              void **params, uint64_t seed, int footprint, lpl_emu_stats *stats, char *msg,
                              size_t msg_len) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    Launch &L = g_launch;
    memset(stats, 0, sizeof(*stats));
    int count;
    const lpl_emu_kernel *table = lpl_emu_kernels(&count);
    if (index < 0 || index >= count) {
        snprintf(msg, msg_len, "no emulated kernel %d", index);
        return 98; /* CUDA_ERROR_INVALID_DEVICE_FUNCTION */
    }
    const uint32_t threads = block[0] * block[1] * block[2];
    if (threads == 0 || threads > (uint32_t)kMaxThreads) {
        snprintf(msg, msg_len, "block of %u threads", threads);
        return 1; /* CUDA_ERROR_INVALID_VALUE (the driver checks first) */
    }
    if (ensure_workers(threads, msg, msg_len) != 0) return 2; /* CUDA_ERROR_OUT_OF_MEMORY */
    L.kernel = &table[index];
    L.params = params;
    L.grid = {grid[0], grid[1], grid[2]};
    L.block = {block[0], block[1], block[2]};
    L.threads = threads;
    L.dyn_size = dyn_smem;
    L.dyn = static_cast<char *>(malloc(dyn_smem ? dyn_smem : 1));
    if (L.dyn == nullptr) {
        snprintf(msg, msg_len, "cannot allocate %zu bytes of dynamic shared memory", dyn_smem);
        return 2; /* CUDA_ERROR_OUT_OF_MEMORY */
    }
    L.footprint = footprint;
    L.deadlock_ms = env_int("FAKE_CUDA_DEADLOCK_MS", 10000);
    L.spin = env_int("FAKE_CUDA_SPIN", 64);
    g_idle_spin = env_int("FAKE_CUDA_IDLE_SPIN", 0);
    L.read.store(0, std::memory_order_relaxed);
    L.write.store(0, std::memory_order_relaxed);
    L.atomic.store(0, std::memory_order_relaxed);
    g_launch_warnings.store(0, std::memory_order_relaxed);
    const int poison = env_int("FAKE_CUDA_POISON", 0xff) & 0xff;
    for (uint32_t i = 0; i < threads; ++i) g_workers[i]->footprint.clear();

    // the blocks in a seeded random order (Fisher-Yates); seed 0 keeps the grid order
    const uint64_t nblocks = (uint64_t)grid[0] * grid[1] * grid[2];
    std::vector<uint64_t> order(nblocks);
    for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
    if (seed != 0) {
        uint64_t st = seed ^ (0x632be59bd9b4e019ull * (g_launch_count.fetch_add(1) + 1));
        for (uint64_t i = nblocks; i > 1; --i) std::swap(order[i - 1], order[splitmix64(&st) % i]);
    }
    int rc = 0;
    Block &blk = L.blk;
    for (uint64_t bi = 0; bi < nblocks && rc == 0; ++bi) {
        L.block_linear = order[bi];
        L.more_blocks = bi + 1 < nblocks;
        blk.bar.reset(threads);
        for (uint32_t w = 0; w * kWarp < threads; ++w) {
            Warp &warp = blk.warps[w];
            warp.lanes = std::min<uint32_t>(kWarp, threads - w * kWarp);
            warp.bar.reset(warp.lanes);
            warp.bar.warp = &warp;
            warp.exited.store(0, std::memory_order_relaxed);
            memset(warp.tags, 0xff, sizeof(warp.tags));
        }
        blk.live.store((int)threads, std::memory_order_relaxed);
        blk.waiting.store(0, std::memory_order_relaxed);
        blk.abort.store(false, std::memory_order_relaxed);
        poison_shared(poison);
        L.remaining.store(threads, std::memory_order_relaxed);
#if LPL_EMU_HAVE_FIBERS
        if (use_fibers()) {
            run_block_fibers(threads);
        } else
#endif
        {
            for (uint32_t i = 0; i < threads; ++i) {
                g_workers[i]->go.fetch_add(1, std::memory_order_seq_cst);
                if (g_workers[i]->asleep.load(std::memory_order_seq_cst)) futex_wake(&g_workers[i]->go, 1);
            }
            uint32_t r;
            while ((r = L.remaining.load(std::memory_order_acquire)) != 0) futex_wait(&L.remaining, r, -1);
        }
        if (blk.abort.load(std::memory_order_relaxed)) {
            snprintf(msg, msg_len, "%s", blk.abort_msg);
            rc = 719; /* CUDA_ERROR_LAUNCH_FAILED */
        }
    }
    stats->read = L.read.load(std::memory_order_relaxed);
    stats->write = L.write.load(std::memory_order_relaxed);
    stats->atomic = L.atomic.load(std::memory_order_relaxed);
    stats->blocks = nblocks;
    stats->threads = nblocks * threads;
    stats->warnings = g_launch_warnings.load(std::memory_order_relaxed);
    if (footprint) {
        std::vector<Interval> all;
        for (uint32_t i = 0; i < threads; ++i) {
            all.insert(all.end(), g_workers[i]->footprint.begin(), g_workers[i]->footprint.end());
            g_workers[i]->footprint.clear();
            g_workers[i]->footprint.shrink_to_fit();
        }
        stats->unique_read = distinct_bytes(all, 0);
        stats->unique_write = distinct_bytes(all, 1);
    }
    free(L.dyn);
    L.dyn = nullptr;
    L.dyn_size = 0;
    return rc;
}

extern "C" int lpl_emu_warning_count(void) {
    std::lock_guard<std::mutex> lock(g_warn_mutex);
    return (int)g_warnings.size();
}

extern "C" const char *lpl_emu_warning(int i) {
    std::lock_guard<std::mutex> lock(g_warn_mutex);
    return i >= 0 && i < (int)g_warnings.size() ? g_warnings[i].c_str() : nullptr;
}

extern "C" void lpl_emu_clear_warnings(void) {
    std::lock_guard<std::mutex> lock(g_warn_mutex);
    g_warnings.clear();
}
