#!/usr/bin/env bash
# Kernel tests under AddressSanitizer + UndefinedBehaviorSanitizer.
#
# Builds lpl_ext._C with LPL_EXT_SANITIZE=1 OUT OF PLACE (the in-place / installed module
# is not touched), puts a copy of the lpl_ext package with the sanitized module first on
# PYTHONPATH, preloads the sanitizer runtimes into the (uninstrumented) Python, and runs
# the C-kernel tests. Fuzz children inherit the environment, so they run sanitized too.
# Fails on any test failure and on any sanitizer report.
#
# usage: tests/sanitize_run.sh [pytest args...]
#   default: the kernel-level test files that exist (see DEFAULT_TESTS), -m "not slow
#   and not cuda" (the slow 64-bit tests read ~20 GB through zero pages: too slow here),
#   without test_cuda_loader's NVRTC compile of every kernel (the main run has it).
# env: CC (default cc), LPL_SANITIZE_DIR (work dir, default a fresh mktemp -d),
#      KEEP_SANITIZE_DIR=1 keeps it.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
CC="${CC:-cc}"
WORK="${LPL_SANITIZE_DIR:-$(mktemp -d /tmp/lpl_sanitize.XXXXXX)}"
mkdir -p "$WORK"
cleanup() { [ "${KEEP_SANITIZE_DIR:-0}" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT

DEFAULT_TESTS=(test_fuzz.py test_nonfinite.py test_threads.py test_feature_distance.py
               test_outlier_mask.py test_exact_zero.py test_cuda_loader.py)

start=$(date +%s)
echo "[sanitize] building the sanitized extension in $WORK" >&2
(
    cd "$REPO"
    # CPython's own CFLAGS carry -fwrapv, which makes signed overflow defined and so
    # invisible to UBSan: switch it back off, and add the float-to-int overflow check
    # (not part of GCC's "undefined" group); no check may recover.
    CFLAGS="${CFLAGS:-} -fno-wrapv -fsanitize=float-cast-overflow -fno-sanitize-recover=all" \
    # no cubins (NVCC=nothing: nvcc is slow), but the kernel sources, so that the CUDA
    # host path runs sanitized against the stand-in driver with NVRTC-built images
    # (build_py makes lpl_ext/_kernels, the package data; build_ext the sanitized module)
    LPL_EXT_SANITIZE=1 NVCC=/nonexistent/nvcc CC="$CC" "$PY" setup.py -q build_py -d "$WORK/build" \
        build_ext --force -b "$WORK/build" -t "$WORK/tmp" >"$WORK/build.log" 2>&1
) || { tail -60 "$WORK/build.log" >&2; exit 1; }

PKG="$WORK/site"
rm -rf "$PKG" && mkdir -p "$PKG/lpl_ext"
cp "$REPO"/lpl_ext/*.py "$PKG/lpl_ext/"
so=$(find "$WORK/build/lpl_ext" -name '_C*.so' | head -1)
[ -n "$so" ] || { echo "[sanitize] no built module found" >&2; exit 1; }
cp "$so" "$PKG/lpl_ext/"
cp -r "$WORK/build/lpl_ext/_kernels" "$PKG/lpl_ext/"

ASAN_RT=$("$CC" -print-file-name=libasan.so)
UBSAN_RT=$("$CC" -print-file-name=libubsan.so)
for rt in "$ASAN_RT" "$UBSAN_RT"; do
    [ -e "$rt" ] || { echo "[sanitize] sanitizer runtime not found: $rt" >&2; exit 1; }
done

export LD_PRELOAD="$ASAN_RT:$UBSAN_RT${LD_PRELOAD:+:$LD_PRELOAD}"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
# CPython and torch keep memory until exit by design: no leak check. Huge requests from
# fuzzed shapes must come back as NULL (-> a Python exception), as they do without ASan.
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:exitcode=86:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87"
export LPL_EXT_EXPECT_SANITIZE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export PYTHONFAULTHANDLER=1

# the sanitized module must be the one Python imports (not the repo's in-place build)
(cd "$WORK" && "$PY" -c "import lpl_ext, sys; i = lpl_ext._C.build_info(); print('[sanitize] using', lpl_ext._C.__file__, 'sanitize =', i['sanitize'], file=sys.stderr); sys.exit(0 if i['sanitize'] else 1)")

if [ $# -eq 0 ]; then
    args=()
    for t in "${DEFAULT_TESTS[@]}"; do
        [ -e "$REPO/tests/$t" ] && args+=("$REPO/tests/$t")
    done
    args+=(-m "not slow and not cuda")
    # NVRTC compiling every kernel (about 40 s per CUDA version under ASan) exercises NVRTC,
    # not this project's C: the main test run does it; the NVRTC -> stand-in driver path
    # through _C (test_nvrtc_path_end_to_end) still runs here (on the images the main run
    # left in $LPL_EXT_TEST_NVRTC_CACHE when .ci/run sets it; else compiled here).
    args+=(--deselect "tests/test_cuda_loader.py::test_nvrtc_compiles_every_kernel_for_sm90")  # node id, relative to --rootdir
else
    args=()
    for a in "$@"; do  # pytest runs from $WORK below: paths given relative to here must survive
        if [ -e "$a" ] || [ -e "${a%%::*}" ]; then args+=("$(cd "$(dirname "$a")" && pwd)/$(basename "$a")"); else args+=("$a"); fi
    done
fi

# cwd outside the repo: `python -m pytest` puts the cwd first on sys.path, and the repo's
# own lpl_ext (unsanitized) would shadow the copy on PYTHONPATH
set +e
(cd "$WORK" && "$PY" -m pytest -q -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO" "${args[@]}") \
    2> >(tee "$WORK/stderr.log" >&2)
rc=$?
set -e
wait
if grep -qE "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|SUMMARY: UndefinedBehaviorSanitizer" "$WORK/stderr.log"; then
    echo "[sanitize] sanitizer report in the output above" >&2
    [ "$rc" -ne 0 ] || rc=1
fi
echo "[sanitize] exit $rc after $(( $(date +%s) - start )) s" >&2
exit "$rc"
