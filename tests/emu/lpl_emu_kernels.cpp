// The CUDA kernels of csrc/cuda/ compiled as host C++ on the emulation header, and the
// table through which the stand-in driver finds them by name and launches them with
// cuLaunchKernel's `void **` parameter array (docs/cuda.md, "The emulated device").
//
// The kernel text is included unchanged, inside an unnamed namespace: its __shared__
// statics then have internal linkage, so that AddressSanitizer gives them redzones (GCC
// leaves the statics of templates with vague linkage uninstrumented), and tests/emu/build.py
// moves this file's .bss, which holds nothing but them, into the section the runtime
// poisons at every block start.
#include "lpl_emu.cuh"

namespace {
#include "lpl_kernels.cu"
}  // namespace

namespace {

using namespace lpl_v1;  // the 0.2 kernels (csrc/cuda/v1_*.cuh) keep their helpers in a namespace

template <typename... A, size_t... I> void call(void (*kernel)(A...), void **params, std::index_sequence<I...>) {
    // each argument is copied from the caller's buffer, as the driver copies it to the GPU
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<A>> *>(params[I])...);
}
template <typename... A> void invoke(void (*kernel)(A...), void **params) {
    call(kernel, params, std::index_sequence_for<A...>{});
}
template <typename... A> constexpr int arity(void (*)(A...)) { return (int)sizeof...(A); }
template <auto K> void trampoline(void **params) { invoke(K, params); }

}  // namespace

// A kernel whose name an lpl_math.h formula overloads (C++ overloading, as in CUDA) is
// taken at its own type: LPL_EMU_CAST_<name> holds the cast (a signature change is then a
// compile error here); every other kernel's address is unambiguous.
#define LPL_EMU_CAST_om_thresholds ~, static_cast<void (*)(int64_t, int64_t, double, int, om_ws)>
#define LPL_EMU_SECOND(a, b, ...) b
#define LPL_EMU_SECOND_(...) LPL_EMU_SECOND(__VA_ARGS__)
#define LPL_EMU_CAST(name) LPL_EMU_SECOND_(LPL_EMU_CAST_##name, , ~)
#define LPL_EMU_ADDR(name) LPL_EMU_CAST(name)(&lpl_##name)
#define LPL_EMU_KERNEL_ENTRY(name) {"lpl_" #name, &trampoline<LPL_EMU_ADDR(name)>, arity(LPL_EMU_ADDR(name))},
// internal linkage: no exported data in this object (an exported global gets an
// AddressSanitizer ODR indicator in .bss, which build.py keeps for __shared__ statics only)
static const lpl_emu_kernel kernel_table[] = {LPL_KERNEL_LIST(LPL_EMU_KERNEL_ENTRY)};
#undef LPL_EMU_KERNEL_ENTRY

extern "C" const lpl_emu_kernel *lpl_emu_kernels(int *count) {
    *count = (int)(sizeof(kernel_table) / sizeof(kernel_table[0]));
    return kernel_table;
}
