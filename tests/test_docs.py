"""The README and the docs are tested like code.

- every relative link and ``#anchor`` resolves (GitHub's heading slugs);
- every test a page cites (``test_x.py::test_name``) and every repository path it names exists;
- every ``lpl_ext.*`` name in inline code imports;
- every command shown in a fenced ``bash`` block (and every inline ``python ...`` /
  ``accelerate launch ...`` / ``bash ...`` command naming a script) parses: a script's flags
  go through that script's own argparse parser (``train_sdxl_lpl.py``, ``benchmarks/run_all.py``,
  ``tools/*.py``), ``accelerate launch`` flags through accelerate's, pytest paths and node ids
  exist, pip extras exist in pyproject.toml; a command nobody knows how to check fails;
- the README is a landing page: short, install / demo / test first, one click to every section;
- no table row is on two pages (each claim lives on one page).

Every checker returns a list of problems; ``test_checkers_report_bad_docs`` feeds each one a
broken page to show that it can fail.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import shlex
import subprocess
import sys
import tomllib
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOC_PAGES, *sorted((ROOT / "benchmarks").glob("*.md")), ROOT / "CHANGELOG.md"]
README_MAX_LINES = 250
# Pages that took over the old README's sections: each of their "## " sections is one click
# from the README.
README_LINKS_EVERY_SECTION_OF = ["docs/training.md", "docs/api.md", "docs/reliability.md", "docs/install.md",
                                 "docs/benchmarks.md"]
# Old names of moved modules: mentioned only where their deprecation is announced.
DEPRECATED_NAMES_ALLOWED_IN = {"README.md", "CHANGELOG.md"}

FENCE = re.compile(r"^(?P<fence>```+|~~~+)[ \t]*(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=fence)[ \t]*$",
                   re.M | re.S)


def rel(path: Path) -> str:
    """The path as the pages name it: relative to the repository root (outside it: as given)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- markdown


class Fenced(NamedTuple):
    lang: str
    body: str
    line: int  # 1-based line of the opening fence


def fenced_blocks(markdown: str) -> List[Fenced]:
    return [Fenced(m.group("lang"), m.group("body"), markdown.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(markdown)]


def prose(markdown: str) -> str:
    """The page without its fenced blocks (blanked, so line numbers stay) and HTML comments."""
    blank = lambda m: "\n" * m.group(0).count("\n")  # noqa: E731
    return re.sub(r"<!--.*?-->", blank, FENCE.sub(blank, markdown), flags=re.S)


def inline_code(text: str) -> List[str]:
    return re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text)


def without_inline_code(text: str) -> str:
    return re.sub(r"(?<!`)`[^`\n]+`(?!`)", "``", text)


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lowercased, punctuation other than '-'
    and '_' removed, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](target) -> text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every #anchor the page defines: its headings (duplicates get -1, -2, ... as on GitHub)
    and explicit <a id=...> / <a name=...>."""
    seen: Dict[str, int] = {}
    found = set()
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", prose(markdown), re.M):
        slug = github_slug(m.group(1))
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    found |= set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", markdown))
    return found


def links(markdown: str) -> List[Tuple[int, str]]:
    """(line, target) of every inline link and image outside code."""
    text = without_inline_code(prose(markdown))
    out = []
    for m in re.finditer(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text):
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


# ---------------------------------------------------------------- checkers (each returns problems)


def link_problems(page: Path, markdown: str) -> List[str]:
    problems = []
    for line, target in links(markdown):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path_part, _, anchor = target.partition("#")
        where = f"{rel(page)}:{line}: link {target!r}"
        if not path_part:  # same page
            if anchor not in anchors(markdown):
                problems.append(f"{where}: no heading with anchor #{anchor} on this page")
            continue
        dest = (page.parent / path_part).resolve()
        if not dest.exists():
            problems.append(f"{where}: {path_part} does not exist")
        elif anchor and dest.suffix != ".md":
            problems.append(f"{where}: anchor into a file that is not markdown")
        elif anchor and anchor not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{where}: no heading with anchor #{anchor} in {rel(dest)}")
    return problems


TEST_ID = re.compile(r"^(?:tests/)?(test_\w+\.py)(?:::(\w+))?$")
REPO_PATH = re.compile(r"^(?:tests|tools|benchmarks|lpl_ext|docs|csrc|\.ci)/[\w./-]*$")


def reference_problems(page: Path, markdown: str) -> List[str]:
    """Cited tests (`test_x.py::test_name`, `tests/test_x.py`) and repository paths exist."""
    problems = []
    for span in inline_code(prose(markdown)):
        for word in re.split(r"[\s,]+", span):
            word = word.rstrip(".,;:)").lstrip("(")
            m = TEST_ID.match(word)
            if m:
                file = ROOT / "tests" / m.group(1)
                if not file.is_file():
                    problems.append(f"{rel(page)}: cites {word}: tests/{m.group(1)} does not exist")
                elif m.group(2) and not re.search(rf"^\s*(?:async\s+)?def {m.group(2)}\(",
                                                  file.read_text(encoding="utf-8"), re.M):
                    problems.append(f"{rel(page)}: cites {word}: no test {m.group(2)} in tests/{m.group(1)}")
            elif REPO_PATH.match(word) and not any(c in word for c in "*<>"):
                if not (ROOT / word).exists():
                    problems.append(f"{rel(page)}: names {word}, which does not exist")
    return problems


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # old names are reported below
                obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def name_problems(page: Path, markdown: str) -> List[str]:
    """Every `lpl_ext.x.y` in inline code imports, and moved modules go by their new names."""
    from lpl_ext.demo import MOVED_MODULES

    problems = []
    for span in inline_code(prose(markdown)):
        for dotted in re.findall(r"(?<![\w/.])lpl_ext(?:\.[A-Za-z_]\w*)+", span):
            if not _resolves(dotted):
                problems.append(f"{rel(page)}: `{span}` names {dotted}, which does not import")
            elif page.name not in DEPRECATED_NAMES_ALLOWED_IN and any(
                    dotted == old or dotted.startswith(old + ".") for old in MOVED_MODULES):
                problems.append(f"{rel(page)}: `{span}` uses the deprecated name {dotted}")
    return problems


# ---------------------------------------------------------------- commands


class Command(NamedTuple):
    page: str
    line: int
    words: Tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}: {' '.join(self.words)}"


def split_commands(text: str, page: str, first_line: int) -> Iterator[Command]:
    """Shell words per simple command: continuations joined, comments dropped, split at
    && || ; |, leading VAR=value assignments removed."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        start, logical = i, lines[i]
        while logical.endswith("\\") and i + 1 < len(lines):
            i += 1
            logical = logical[:-1] + " " + lines[i]
        i += 1
        words = shlex.split(logical, comments=True)
        current: List[str] = []
        for word in words + ["&&"]:
            if word in ("&&", "||", ";", "|"):
                while current and re.match(r"^[A-Za-z_]\w*=", current[0]):
                    current.pop(0)
                if current:
                    yield Command(page, first_line + 1 + start, tuple(current))
                current = []
            else:
                current.append(word)


def page_commands(page: Path, markdown: str) -> List[Command]:
    """Commands of the fenced bash blocks, and inline code that runs a script or a module."""
    commands: List[Command] = []
    for block in fenced_blocks(markdown):
        if block.lang in ("bash", "sh", "shell"):
            commands.extend(split_commands(block.body, rel(page), block.line))
    text = prose(markdown)
    for m in re.finditer(r"(?<!`)`([^`\n]+)`(?!`)", text):
        span = m.group(1)
        if re.match(r"^(?:python3?|bash|accelerate launch) ", span) and re.search(r"\.(?:py|sh)\b| -m ", span):
            commands.extend(split_commands(span, rel(page), text.count("\n", 0, m.start())))
    return commands


def continuation_problems(page: Path, markdown: str) -> List[str]:
    """A comment after a line continuation breaks the command (the reference README's bug)."""
    problems = []
    for block in fenced_blocks(markdown):
        if block.lang in ("bash", "sh", "shell"):
            for k, line in enumerate(block.body.splitlines()):
                if re.search(r"\\\s*#", line) or re.search(r"\\[ \t]+$", line):
                    problems.append(f"{rel(page)}:{block.line + 1 + k}: broken line continuation: {line!r}")
    return problems


PYTHON = ("python", "python3")
# Runs scripts as __main__ with argparse stopped right after parsing: the script's own parser
# judges the shown flags and values; nothing else of the script runs.
ARGV_PROBE = r"""
import argparse, json, os, runpy, sys

class Parsed(Exception):
    pass

real = argparse.ArgumentParser.parse_known_args

def probe(self, args=None, namespace=None):
    self.allow_abbrev = False  # the docs spell flags out: an abbreviation breaks when a flag is added
    namespace, rest = real(self, args, namespace)  # exits 2 with argparse's message on a bad flag or value
    raise Parsed(rest)

argparse.ArgumentParser.parse_known_args = probe
results = []
for script, argv in json.loads(sys.stdin.read()):
    sys.argv = [script, *argv]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name="__main__")
        results.append(["no argparse parser was called", None])
    except Parsed as done:
        results.append(["parsed", done.args[0]])
    except SystemExit as exc:
        results.append(["exit", exc.code])
print("PROBE-RESULTS " + json.dumps(results))
"""


@lru_cache(maxsize=None)
def pytest_options() -> frozenset:
    out = subprocess.run([sys.executable, "-m", "pytest", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300).stdout
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", out))


def pytest_arg_problems(where: str, args: List[str]) -> List[str]:
    problems = []
    options = pytest_options()
    takes_value = {"-k", "-m", "-p", "-c", "--rootdir", "--tb", "--maxfail", "-W"}
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg.startswith("-"):
            flag = arg.split("=", 1)[0]
            if flag not in options:
                problems.append(f"{where}: pytest has no option {flag}")
            skip = flag in takes_value and "=" not in arg
            continue
        path, _, node = arg.partition("::")
        path = path.replace("$PWD/", "")
        if not (ROOT / path).exists():
            problems.append(f"{where}: {path} does not exist")
        elif node and not re.search(rf"^\s*def {node.split('[')[0]}\(", (ROOT / path).read_text(), re.M):
            problems.append(f"{where}: no test {node} in {path}")
    return problems


def extras_problems(where: str, args: List[str]) -> List[str]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    problems = []
    for arg in args:
        m = re.match(r"^\.(?:\[([\w,-]+)\])?$", arg)
        if arg.startswith(".") and not m:
            problems.append(f"{where}: cannot read the local requirement {arg!r}")
        elif m and m.group(1):
            problems += [f"{where}: pyproject.toml has no extra [{e}]" for e in m.group(1).split(",")
                         if e not in extras]
    return problems


def check_command(cmd: Command, scripts: List[Tuple[Command, str, List[str]]]) -> List[str]:
    """Problems of one command; script runs are queued in `scripts` for the argparse probe."""
    words = list(cmd.words)
    head = words[0]
    if head in PYTHON and len(words) >= 3 and words[1] == "-m":
        module, args = words[2], words[3:]
        if module == "pytest":
            return pytest_arg_problems(cmd.where, args)
        if module == "pip":
            return extras_problems(cmd.where, args[1:]) if args[:1] == ["install"] else \
                [f"{cmd.where}: unexpected pip command"]
        if module in ("venv", "build", "lpl_ext"):
            return [] if importlib.util.find_spec(module) else [f"{cmd.where}: module {module} not found"]
        return [f"{cmd.where}: no checker for python -m {module}"]
    if head in PYTHON and len(words) >= 2:
        return queue_script(cmd, words[1], words[2:], scripts)
    if head == "accelerate" and words[1:2] == ["launch"]:
        from accelerate.commands.launch import launch_command_parser

        message = io.StringIO()
        try:
            with contextlib.redirect_stderr(message):
                parser = launch_command_parser()
                parser.allow_abbrev = False
                parsed = parser.parse_args(words[2:])
        except SystemExit:
            return [f"{cmd.where}: accelerate launch rejects these arguments: {message.getvalue().strip()[-200:]}"]
        return queue_script(cmd, parsed.training_script, list(parsed.training_script_args), scripts)
    if head == "bash" or head.endswith(".sh"):
        script, args = (words[1], words[2:]) if head == "bash" else (head, words[1:])
        path = ROOT / script
        if not path.is_file():
            return [f"{cmd.where}: {script} does not exist"]
        if head != "bash" and not path.stat().st_mode & 0o111:
            return [f"{cmd.where}: {script} is run directly but is not executable"]
        if script == "tests/sanitize_run.sh":  # passes its arguments to pytest
            return pytest_arg_problems(cmd.where, args)
        return []
    if head == "auditwheel":
        return [] if words[1:2] in (["repair"], ["show"]) else [f"{cmd.where}: unexpected auditwheel command"]
    if head in (".", "source") and len(words) == 2 and words[1].endswith("bin/activate"):
        return []
    if head == "cd" and len(words) <= 2:
        return []
    return [f"{cmd.where}: no checker knows this command (add one to tests/test_docs.py)"]


def queue_script(cmd: Command, script: str, args: List[str], scripts: list) -> List[str]:
    path = ROOT / script
    if not path.is_file() or path.suffix != ".py":
        return [f"{cmd.where}: {script} is not a python script of the repository"]
    source = path.read_text(encoding="utf-8")
    if script == "tests/test_fuzz.py":  # child mode: GROUP[,GROUP...] [SEED]
        sys.path.insert(0, str(ROOT / "tests"))
        groups = importlib.import_module("test_fuzz").GROUPS
        problems = [f"{cmd.where}: no fuzz group {g}" for g in (args[0].split(",") if args else []) if g not in groups]
        if len(args) > 2 or (len(args) == 2 and not args[1].isdigit()):
            problems.append(f"{cmd.where}: expected GROUPS [SEED]")
        return problems
    if "argparse" not in source:  # flags read from sys.argv: the script must test for each literally
        return [f"{cmd.where}: {script} does not test for {a}" for a in args
                if a.startswith("--") and f'"{a}"' not in source]
    scripts.append((cmd, script, args))
    return []


def probe_scripts(scripts: List[Tuple[Command, str, List[str]]]) -> List[str]:
    """Runs each script's own argparse parser on the shown arguments (one child process)."""
    if not scripts:
        return []
    payload = json.dumps([[s, a] for _, s, a in scripts])
    proc = subprocess.run([sys.executable, "-c", ARGV_PROBE], input=payload, capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PROBE-RESULTS ")), None)
    assert line is not None, proc.stderr[-3000:]
    problems = []
    for (cmd, _, args), (kind, value) in zip(scripts, json.loads(line[len("PROBE-RESULTS "):])):
        if kind == "parsed" and value:
            problems.append(f"{cmd.where}: unknown arguments {value}")
        elif kind == "exit" and not (value == 0 and "--help" in args):
            problems.append(f"{cmd.where}: the script's parser rejects it (exit {value})")
        elif kind not in ("parsed", "exit"):
            problems.append(f"{cmd.where}: {kind}")
    return problems


def command_problems(pages: List[Tuple[Path, str]]) -> List[str]:
    problems: List[str] = []
    scripts: List[Tuple[Command, str, List[str]]] = []
    for page, markdown in pages:
        for cmd in page_commands(page, markdown):
            problems += check_command(cmd, scripts)
    return problems + probe_scripts(scripts)


# ---------------------------------------------------------------- tests


def read(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def page_ids(pages: List[Path]) -> List[str]:
    return [rel(p) for p in pages]


def test_github_slugs():
    assert github_slug("Train SDXL with LPL: `train_sdxl_lpl.py`") == "train-sdxl-with-lpl-train_sdxl_lplpy"
    assert github_slug("Non-finite values (NaN, +Inf, -Inf)") == "non-finite-values-nan-inf--inf"
    assert github_slug("LoRA + LPL on one GPU") == "lora--lpl-on-one-gpu"
    assert github_slug("Flags of diffusers' SDXL fine-tuning script") == "flags-of-diffusers-sdxl-fine-tuning-script"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n## B <a id=\"b2\"></a>\n") >= {"a", "a-1", "b", "b2"}
    assert "not-a-heading" not in anchors("```python\n# not a heading\n```\n")


@pytest.mark.parametrize("page", PAGES, ids=page_ids(PAGES))
def test_relative_links_and_anchors_resolve(page):
    problems = link_problems(page, read(page))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=page_ids(PAGES))
def test_cited_tests_paths_and_names_exist(page):
    text = read(page)
    problems = reference_problems(page, text) + name_problems(page, text)
    assert not problems, "\n".join(problems)


def test_every_shown_command_parses():
    pages = [(page, read(page)) for page in PAGES]
    assert sum(len(page_commands(p, t)) for p, t in pages) >= 30  # the collector sees the commands
    problems = command_problems(pages) + [p for page, text in pages for p in continuation_problems(page, text)]
    assert not problems, "\n".join(problems)


def test_readme_is_a_landing_page():
    text = read(README)
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    first_screen = "\n".join(lines[:60])
    for command in ("pip install -e", "accelerate launch train_sdxl_lpl.py\n", "python -m pytest -q\n"):
        assert command in first_screen, f"{command!r} is not in the README's first screen"
    order = [first_screen.index(c) for c in ("pip install -e", "accelerate launch train_sdxl_lpl.py\n",
                                             "python -m pytest -q\n")]
    assert order == sorted(order), "install, then the demo, then the tests"
    python = [b.body for b in fenced_blocks(text) if b.lang == "python"]
    assert any("lpl_ext.feature_distance(" in b for b in python) and any("LatentPerceptualLoss(vae" in b
                                                                         for b in python)
    assert "| verified where |" in text
    linked = {(README.parent / t.partition("#")[0]).resolve(): set() for _, t in links(text)}
    for _, target in links(text):
        path, _, anchor = target.partition("#")
        linked[(README.parent / path).resolve()].add(anchor)
    for page in DOC_PAGES:
        assert page.resolve() in linked, f"README.md does not link {rel(page)}"
    for name in README_LINKS_EVERY_SECTION_OF:
        page = ROOT / name
        sections = {github_slug(h) for h in re.findall(r"^## (.+?)\s*$", prose(read(page)), re.M)}
        missing = sections - linked[page.resolve()]
        assert not missing, f"README.md has no link to these sections of {name}: {sorted(missing)}"


def table_rows(markdown: str) -> List[str]:
    """Body rows of the page's tables (header and separator rows left out), cells joined."""
    rows: List[str] = []
    previous_was_row = False
    for line in prose(markdown).splitlines():
        if not line.lstrip().startswith("|"):
            previous_was_row = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
            if previous_was_row:
                rows.pop()  # the header
        else:
            rows.append(" | ".join(cells))
        previous_was_row = True
    return rows


def duplicate_row_problems(pages: List[Tuple[str, str]]) -> List[str]:
    """A table row on two pages: a claim kept in two places drifts apart."""
    where: Dict[str, str] = {}
    problems = []
    for name, text in pages:
        for row in set(table_rows(text)):
            if len(row) < 40:  # short rows are trivia ("| `--lpl_start` | 0 |"), not claims
                continue
            if row in where and where[row] != name:
                problems.append(f"table row on {where[row]} and {name}: {row[:100]}")
            where.setdefault(row, name)
    return problems


def test_no_table_row_is_on_two_pages():
    problems = duplicate_row_problems([(rel(p), read(p)) for p in [README, *DOC_PAGES]])
    assert not problems, "\n".join(problems)


def test_checkers_report_bad_docs(tmp_path):
    """Each checker fails on a broken page: the tests above would catch these mistakes."""
    page = tmp_path / "page.md"
    bad_links = "# Title\n\n[gone](missing.md) [anchor](#nowhere) [ok](#title)\n"
    assert len(link_problems(page, bad_links)) == 2
    assert len(link_problems(README, "[x](docs/api.md#no-such-section)\n")) == 1
    assert not link_problems(README, "[x](docs/api.md#feature_distance) [y](https://example.com/#z)\n")
    assert len(reference_problems(README, "`test_lpl_loss.py::test_no_such_test`, `tools/nothing.py`\n")) == 2
    assert len(name_problems(ROOT / "docs" / "x.md", "`lpl_ext.no_such_name`, `lpl_ext.tiny_sdxl`\n")) == 2
    bash = "```bash\n{}\n```\n".format
    broken = {  # page text -> the problem it must produce
        bash("accelerate launch train_sdxl_lpl.py --lpl_wieght 2"): "unknown arguments ['--lpl_wieght', '2']",
        bash("accelerate launch train_sdxl_lpl.py --lpl_num_blocks x"): "x: the script's parser rejects it (exit 2)",
        bash("accelerate launch --num_procs 2 train_sdxl_lpl.py"): "accelerate launch rejects",
        bash("accelerate launch train_sdxl_lpl.py --max_train_step 9"): "unknown arguments ['--max_train_step', '9']",
        bash("python benchmarks/run_all.py --onyl head"): "unknown arguments ['--onyl', 'head']",
        bash("python -m pytest tests/test_nothing.py -q"): "tests/test_nothing.py does not exist",
        bash("python -m pytest tests/test_docs.py::test_not_here"): "no test test_not_here",
        bash('python -m pip install -e ".[nonexistent]"'): "no extra [nonexistent]",
        bash("python tests/test_fuzz.py no_such_group 1"): "no fuzz group no_such_group",
        "`python tools/lpl_experiment.py --no-such-flag`\n": "--no-such-flag: the script's parser rejects",
        bash("make all"): "no checker knows this command",
    }
    problems = command_problems([(page, text) for text in broken])
    assert len(problems) == len(broken), "\n".join(problems)
    for expected in broken.values():
        assert sum(expected in p for p in problems) == 1, (expected, problems)
    assert not command_problems([(page, bash("python benchmarks/run_all.py --only head --quick"))])
    assert len(continuation_problems(page, bash("python x.py \\  # note\n  --y"))) == 1
    table = ("| header long enough to count as a row | a | b |\n|---|---|---|\n"
             "| a row long enough to count as a claim | 1 | 2 |\n")
    assert table_rows(table) == ["a row long enough to count as a claim | 1 | 2"]
    assert len(duplicate_row_problems([("a.md", table), ("b.md", table)])) == 1
