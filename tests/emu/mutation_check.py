"""Proof that the emulated-device checks bite (docs/cuda.md, "The emulated device"): each
mutant is a copy of the kernel sources with one deliberate bug; it must fail the emulated
tests (tests/test_cuda_emulated.py) or the sanitizers (tests/emu/run_sanitized.sh), and
the sanitizer it is aimed at must report it. Prints which check caught each mutant.

    python tests/emu/mutation_check.py [--only NAME,...] [--work DIR]

Exit 0 when every mutant was caught as required.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from fake_cuda.build import KERNEL_FILES, build  # noqa: E402

# name: (file under csrc/, text, replacement, the sanitizer that must report it or None, why)
MUTANTS: Dict[str, Tuple[str, str, str, Optional[str], str]] = {
    "barrier": (
        "cuda/lpl_device.cuh",
        "    if (lane == 0) shared[warp] = v;\n    __syncthreads();\n",
        "    if (lane == 0) shared[warp] = v;\n",
        "thread",
        "lpl_block_sum without the __syncthreads between the warps' partial sums and their read",
    ),
    "global_index": (
        "cuda/feature_distance_kernels.cuh",
        "                lpl_io<T>::store(grad, t.base + c * a.hw,\n",
        "                lpl_io<T>::store(grad, t.base + c * a.hw + 1,\n",
        "address",
        "fd_main stores each gradient one element further (the last one past the tensor)",
    ),
    "shared_index": (
        "cuda/outlier_mask_kernels.cuh",
        "    if (lane == 31) shared[warp] = inclusive;",
        "    if (lane == 31) shared[warp + 1] = inclusive;",
        "address",
        "block_exclusive_scan (the radix select's digit pick) stores each warp's total one slot further "
        "(the last one past the shared array)",
    ),
    "mask_test": (
        "cuda/feature_distance_kernels.cuh",
        "    if (!ms.global) return true;\n    if (ms.bits)",
        "    return true;\n    if (ms.bits)",
        None,
        "fd_main ignores the keep-mask in its main loop",
    ),
}

# The tests each mutant runs: the plain quick grid of one shape (stops at the first
# failure), and a smaller selection under its sanitizer (which halts on the first report).
PLAIN_SELECTION = ["-x", "-k", "matches_cpu and (odd or blocks)"]
SANITIZER_SELECTION = ["-x", "-k", "matches_cpu and odd"]


def mutate(dest: Path, rel: str, old: str, new: str) -> Path:
    for f in KERNEL_FILES:
        text = (ROOT / "csrc" / f).read_text()
        if f == rel:
            if text.count(old) != 1:
                raise SystemExit(f"mutation_check: the text to mutate occurs {text.count(old)} times in {rel} "
                                 f"(the sources changed: update MUTANTS)\n{old}")
            text = text.replace(old, new)
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        (dest / f).write_text(text)
    return dest


def run_tests(csrc: Path, build_dir: Path, sanitize: Optional[str], log: Path) -> Tuple[bool, str]:
    """(caught, how): the mutant fails the emulated tests, or its sanitizer reports it."""
    env = dict(os.environ, LPL_EMU_CSRC=str(csrc), LPL_EMU_BUILD_DIR=str(build_dir), PYTHONUNBUFFERED="1")
    env.pop("LPL_EMU_FULL", None)
    test = str(ROOT / "tests" / "test_cuda_emulated.py")
    if sanitize is None:
        env.pop("LPL_EMU_SANITIZE", None)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test, *PLAIN_SELECTION]
    else:
        cmd = ["bash", str(ROOT / "tests" / "emu" / "run_sanitized.sh"), sanitize, test, *SANITIZER_SELECTION]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    log.write_text(" ".join(cmd) + "\n" + out)
    if sanitize == "thread":
        caught = "WARNING: ThreadSanitizer: data race" in out
        how = "ThreadSanitizer: data race" if caught else "no race reported"
    elif sanitize == "address":  # the AddressSanitizer + UBSan build: whichever reports first
        kinds = [k for k in ("heap-buffer-overflow", "global-buffer-overflow", "stack-buffer-overflow")
                 if f"AddressSanitizer: {k}" in out]
        ub = re.search(r"runtime error: ([^\n]*)", out)
        caught = bool(kinds) or ub is not None
        how = f"AddressSanitizer: {kinds[0]}" if kinds else (f"UBSan: {ub.group(1)}" if ub else "no report")
    else:
        failed = [ln.split(" - ")[0].replace("FAILED ", "") for ln in out.splitlines() if ln.startswith("FAILED ")]
        crashed = proc.returncode < 0  # e.g. glibc aborting on the heap the mutant overran
        caught = proc.returncode != 0 and (bool(failed) or crashed)
        how = (f"fails {failed[0].split('::')[-1]}" if failed else "") + (
            f"{' and ' if failed else ''}crashes (signal {-proc.returncode})" if crashed else "")
        if not caught:
            how = f"passes (exit {proc.returncode})"
    return caught, how


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help=f"comma list of {list(MUTANTS)}")
    p.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(MUTANTS)
    for n in names:
        if n not in MUTANTS:
            p.error(f"--only: unknown mutant {n!r}; expected {list(MUTANTS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="lpl_mutants."))
    build_dir = Path(os.environ.get("LPL_EMU_BUILD_DIR") or work / "builds")
    rows, ok = [], True
    start = time.time()
    for name in names:
        rel, old, new, sanitizer, why = MUTANTS[name]
        src = mutate(work / name / "csrc", rel, old, new)
        results = {}
        for check in (None, sanitizer) if sanitizer else (None,):
            build(build_dir, check, src)  # here, so that a build error is not mistaken for a catch
            results[check or "tests"] = run_tests(src, build_dir, check, work / name / f"{check or 'tests'}.log")
        caught_by = [k for k, (c, _) in results.items() if c]
        required = sanitizer or "tests"
        good = bool(caught_by) and results[required][0]
        ok &= good
        rows.append((name, why, results, good))
        print(f"[mutation] {name}: {'caught' if good else 'NOT CAUGHT'} "
              + "; ".join(f"{k}: {how}" for k, (_, how) in results.items()), flush=True)
    print("\n| mutant | bug | emulated tests | sanitizer |\n|---|---|---|---|")
    for name, why, results, good in rows:
        san = next((f"{k}: {how}" for k, (c, how) in results.items() if k != "tests"), "–")
        print(f"| {name} | {why} | {results['tests'][1]} | {san} |")
    print(f"\n[mutation] {'all mutants caught' if ok else 'SOME MUTANT ESCAPED'} in {time.time() - start:.0f} s "
          f"(logs in {work})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
