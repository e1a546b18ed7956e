#!/usr/bin/env bash
# The emulated-device tests under a sanitizer (docs/cuda.md, "The emulated device"): the
# stand-in driver, the emulator and the kernels built with ThreadSanitizer, or with
# AddressSanitizer + UndefinedBehaviorSanitizer, the runtime preloaded into Python. They
# stand in for compute-sanitizer racecheck and memcheck until a GPU runs those: a race
# between two threads of a block (global or shared memory), an out-of-bounds access, or
# undefined behaviour in a kernel fails the run. The _C module stays the plain one.
#
# usage: tests/emu/run_sanitized.sh thread|address [pytest args...]
#   default pytest args: tests/test_cuda_emulated.py (its sanitizer subset: LPL_EMU_SANITIZE)
# env: PYTHON (default python), LPL_EMU_SANITIZE_LOG (keep the sanitizer output there).
set -euo pipefail

kind="${1:-}"
case "$kind" in
thread | address) shift ;;
*) echo "usage: $0 thread|address [pytest args...]" >&2; exit 2 ;;
esac
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PYTHON:-python}"
start=$(date +%s)

runtime=$("$PY" "$REPO/tests/fake_cuda/build.py" --sanitize "$kind" --print-runtime)
export LPL_EMU_SANITIZE="$kind"
# One CPU thread for the CPU reference kernels and torch: OpenMP's own barriers are futexes
# ThreadSanitizer cannot see, so its workers would be reported as racing.
export OMP_NUM_THREADS=1
export PYTHONFAULTHANDLER=1
if [ "$kind" = thread ]; then
    export TSAN_OPTIONS="halt_on_error=1:exitcode=66:report_signal_unsafe=0:history_size=4${TSAN_OPTIONS:+:$TSAN_OPTIONS}"
    pattern="WARNING: ThreadSanitizer|ThreadSanitizer: "
else
    # CPython and torch keep memory until exit by design: no leak check
    export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:exitcode=86:strict_string_checks=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
    pattern="ERROR: AddressSanitizer|runtime error:|SUMMARY: UndefinedBehaviorSanitizer"
fi

# --capture=sys: pytest captures Python's sys.stderr only, so that a sanitizer's report
# (written to file descriptor 2 by C code) reaches the log even when it stops the process.
args=()
has_path=0
for a in "$@"; do  # paths relative to the caller; the run's cwd is the repository
    if [ -e "${a%%::*}" ]; then
        has_path=1
        args+=("$(cd "$(dirname "$a")" && pwd)/$(basename "$a")")
    else
        args+=("$a")
    fi
done
[ "$has_path" = 1 ] || args=("$REPO/tests/test_cuda_emulated.py" "${args[@]}")
log="${LPL_EMU_SANITIZE_LOG:-$(mktemp /tmp/lpl_emu_sanitize.XXXXXX)}"
set +e
(cd "$REPO" && LD_PRELOAD="$runtime${LD_PRELOAD:+:$LD_PRELOAD}" "$PY" -m pytest -q -p no:cacheprovider --capture=sys "${args[@]}") \
    2> >(tee "$log" >&2)
rc=$?
set -e
wait
if grep -qE "$pattern" "$log"; then
    echo "[emulated $kind sanitizer] report in the output above" >&2
    [ "$rc" -ne 0 ] || rc=1
fi
[ -n "${LPL_EMU_SANITIZE_LOG:-}" ] || rm -f "$log"
echo "[emulated $kind sanitizer] exit $rc after $(( $(date +%s) - start )) s" >&2
exit "$rc"
