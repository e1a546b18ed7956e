"""Mutation check of the module-level tests: plant known bugs in a throwaway copy of the
repository and require that the tests of ``LatentPerceptualLoss`` / ``LPLObjective`` catch
every one of them.

Each mutant is a bug the kernel tests cannot see because the kernels stay right; only a
module that calls them wrongly (or a kernel constant off by a little) is planted:

    margin   LatentPerceptualLoss passes margin_std=2.1 to the outlier mask instead of 2.0
    no_mask  lpl_loss.py ignores the outlier mask (the distance gets no mask)
    windows  layer 2 gets the down-factor-1 windows (closing 3, opening 5) of layers 3-4
    eps      the shared-norm eps in csrc/lpl_math.h is 1e-5 instead of 1e-6 (rebuilt)

Procedure: copy the working tree (tracked and untracked, not ignored files) to a temporary
directory, build the extension there CPU-only (``LPL_EXT_CUDA=0``: ~20 s on 2 cores, and
the same build for the baseline and every mutant), run the module-level tests on the
unmutated copy (they must all pass, or the check means nothing), then for each mutant:
apply it, rebuild if it touched C, run the same tests, count failures, revert. Prints a
table and exits 1 if the baseline fails, a mutant survives (0 failures) or a mutant cannot
be applied (the code it targets changed: update MUTANTS).

    python tools/mutation_check.py                  # all mutants, ~3-4 minutes on 2 cores
    python tools/mutation_check.py --only margin,eps
    python tools/mutation_check.py --keep           # keep the temporary copy for inspection
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_module_parity.py", "tests/test_lpl_loss.py", "tests/test_objective.py"]


class MutantError(RuntimeError):
    """The code a mutant targets is not there (any more)."""


def _sub(pattern: str, repl: str, text: str, what: str, flags: int = 0) -> str:
    new, count = re.subn(pattern, repl, text, flags=flags)
    if count == 0:
        raise MutantError(f"{what}: pattern {pattern!r} not found")
    return new


def _calls(text: str, name: str) -> List[Tuple[int, int]]:
    """(start, end) of the argument text of every call ``name(...)`` (not ``x.name(``,
    not a ``def``), parentheses matched."""
    spans = []
    for m in re.finditer(r"(?<![\w.])" + re.escape(name) + r"\(", text):
        if text[max(0, m.start() - 4):m.start()] == "def ":
            continue
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        spans.append((m.end(), i - 1))
    return spans


def _split_top_level(args: str) -> List[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(args):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(args[start:i])
            start = i + 1
    parts.append(args[start:])
    return parts


def mutate_margin(text: str) -> str:
    """margin_std=2.1 in the outlier_mask calls of lpl_loss.py that rely on the default
    2.0 (LatentPerceptualLoss's own); if every call passes one, those values become 2.1."""
    spans = _calls(text, "outlier_mask")
    if not spans:
        raise MutantError("margin: no outlier_mask(...) call")
    implicit = [(a, b) for a, b in spans if "margin_std" not in text[a:b]]
    for start, end in reversed(implicit or spans):
        args = text[start:end]
        if "margin_std" in args:
            new = re.sub(r"(margin_std\s*=\s*)[\d.]+", r"\g<1>2.1", args)
        else:
            parts = _split_top_level(args)
            new = ",".join([parts[0], " margin_std=2.1"] + parts[1:])
        text = text[:start] + new + text[end:]
    return text


def mutate_no_mask(text: str) -> str:
    """The distance kernel gets no mask: feature_distance(x, y, None, ...)."""
    spans = _calls(text, "feature_distance")
    if not spans:
        raise MutantError("no_mask: no feature_distance(...) call")
    for start, end in reversed(spans):
        parts = _split_top_level(text[start:end])
        keyword = [i for i, part in enumerate(parts) if re.match(r"\s*mask\s*=", part)]
        if keyword:
            parts[keyword[0]] = " mask=None"
        elif len(parts) >= 3 and "=" not in parts[2]:
            parts[2] = " None"
        else:
            raise MutantError(f"no_mask: no mask argument in feature_distance({text[start:end]})")
        text = text[:start] + ",".join(parts) + text[end:]
    return text


def mutate_windows(text: str) -> str:
    """Layer 2's down factor 2 -> 1: it gets the (3, 5) windows of layers 3 and 4."""
    return _sub(r"(\{\s*2\s*:\s*)2(\s*,)", r"\g<1>1\2", text, "windows")


def mutate_eps(text: str) -> str:
    """Shared-norm eps 1e-6 -> 1e-5 (docs/spec.md, "Normalization")."""
    return _sub(r"(#define\s+LPL_EPS_SHARED\s+)1(?:\.0*)?e-6\b", r"\g<1>1e-5", text, "eps")


@dataclass
class Mutant:
    name: str
    path: str
    mutate: Callable[[str], str]
    needs_build: bool
    what: str


MUTANTS = [
    Mutant("margin", "lpl_ext/lpl_loss.py", mutate_margin, False, "outlier margin 2.0 -> 2.1 passed to the kernel"),
    Mutant("no_mask", "lpl_ext/lpl_loss.py", mutate_no_mask, False, "outlier mask ignored by the loss"),
    Mutant("windows", "lpl_ext/lpl_loss.py", mutate_windows, False, "layer 2 given the down-factor-1 windows"),
    Mutant("eps", "csrc/lpl_math.h", mutate_eps, True, "shared-norm eps 1e-6 -> 1e-5"),
]


def copy_tree(dest: Path) -> None:
    """The working tree's tracked and untracked (not ignored) files, without .git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             check=True, capture_output=True).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "build", "__pycache__"}
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not (set(p.relative_to(ROOT).parts) & skip)
                 and not p.relative_to(ROOT).parts[0].startswith(".venv")]
    for rel in files:
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def build(copy: Path, log: Path) -> None:
    """CPU-only in-place build of the copy's extension (--force: header changes)."""
    for so in (copy / "lpl_ext").glob("_C*.so"):
        so.unlink()
    env = dict(os.environ, LPL_EXT_CUDA="0")
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "--force"], cwd=copy, env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"build failed (exit {proc.returncode}), see {log}:\n" + log.read_text()[-3000:])


def check_import(copy: Path) -> None:
    """The copy's own package and extension must be the ones the tests import."""
    code = "import lpl_ext, sys; print(lpl_ext.__file__); sys.exit(0 if not lpl_ext.build_info()['cuda'] else 3)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=copy, env=test_env(copy), capture_output=True, text=True)
    where = proc.stdout.strip()
    if proc.returncode != 0 or not Path(where).resolve().is_relative_to(copy.resolve()):
        raise RuntimeError(f"the copy's lpl_ext is not the one imported: {where!r} (exit {proc.returncode})\n"
                           f"{proc.stderr[-2000:]}")


def test_env(copy: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run_tests(copy: Path, tests: List[str], report: Path) -> Tuple[int, int, List[str]]:
    """(tests run, failed + errors, names of the first failures)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *tests]
    subprocess.run(cmd, cwd=copy, env=test_env(copy), capture_output=True, text=True)
    if not report.exists():
        return 0, 1, ["pytest wrote no report"]
    root = ET.parse(report).getroot()
    total, failed, names = 0, 0, []
    for case in root.iter("testcase"):
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
            module = (case.get("classname") or "?").split(".")
            module = next((part for part in module if part.startswith("test_")), module[-1])
            names.append(f"{module}.py::{case.get('name')}")
    for suite in root.iter("testsuite"):  # collection errors have no testcase
        errors = int(suite.get("errors", 0))
        if errors and not names:
            failed += errors
            names.append("collection error")
    return total, failed, names


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated mutant names (default: all)")
    parser.add_argument("--tests", nargs="+", default=TESTS, help="test files or node ids run for each mutant")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args(argv)
    mutants = MUTANTS
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {m.name for m in MUTANTS}
        if unknown:
            parser.error(f"--only: unknown mutants {sorted(unknown)}; known: {[m.name for m in MUTANTS]}")
        mutants = [m for m in MUTANTS if m.name in wanted]

    start = time.time()
    work = Path(tempfile.mkdtemp(prefix="lpl_mutation."))
    copy = work / "repo"
    rows: List[Tuple[str, str, str, str]] = []
    ok = True
    try:
        copy_tree(copy)
        print(f"[mutation] copy in {copy}; building CPU-only", flush=True)
        build(copy, work / "build-baseline.log")
        check_import(copy)
        total, failed, names = run_tests(copy, args.tests, work / "baseline.xml")
        print(f"[mutation] baseline: {total} tests, {failed} failed ({time.time() - start:.0f} s)", flush=True)
        if failed or total == 0:
            print("[mutation] the unmutated copy fails, so no mutant result means anything:\n  "
                  + "\n  ".join(names[:20]))
            return 1
        for m in mutants:
            path = copy / m.path
            original = path.read_text()
            try:
                mutated = m.mutate(original)
            except MutantError as exc:
                rows.append((m.name, m.what, "NOT APPLIED", str(exc)))
                ok = False
                continue
            if path.suffix == ".py":
                compile(mutated, str(path), "exec")  # a mutant must be a bug, not a syntax error
            path.write_text(mutated)
            try:
                if m.needs_build:
                    build(copy, work / f"build-{m.name}.log")
                total_m, failed_m, names_m = run_tests(copy, args.tests, work / f"{m.name}.xml")
            finally:
                path.write_text(original)
                if m.needs_build and m is not mutants[-1]:
                    build(copy, work / f"build-{m.name}-revert.log")
            verdict = "killed" if failed_m else "SURVIVED"
            ok &= bool(failed_m)
            per_file: Dict[str, int] = {}
            for n in names_m:
                per_file[n.split("::")[0]] = per_file.get(n.split("::")[0], 0) + 1
            rows.append((m.name, m.what, f"{failed_m}/{total_m} failed: {verdict}",
                         ", ".join(f"{f} {c}" for f, c in sorted(per_file.items()))))
            print(f"[mutation] {m.name}: {failed_m} of {total_m} tests failed ({time.time() - start:.0f} s)", flush=True)
    finally:
        if args.keep:
            print(f"[mutation] kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print("| mutant | bug | module-level tests | failures per file |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n[mutation] {'all mutants killed' if ok else 'FAILED'} in {time.time() - start:.0f} s "
          f"(tests: {' '.join(args.tests)})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
