"""Executes every ```python block of the "Use it in your trainer" and "The kernels" sections
of README.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Use it in your trainer"


def trainer_section(heading: str = HEADING) -> tuple[str, str]:
    """(source name, markdown text of the README section under `heading`)."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip() == heading)
    end = next((j for j in range(start + 1, len(lines)) if re.match(r"^## (?!#)", lines[j])), len(lines))
    return "README.md", "\n".join(lines[start:end])


def python_blocks(markdown: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", markdown, re.M | re.S)]


SOURCE, SECTION = trainer_section()
BLOCKS = python_blocks(SECTION)


def test_section_has_the_trainer_snippets():
    assert len(BLOCKS) >= 3, f"{SOURCE}: expected the drop-in, diffusers-loop and hook snippets"
    joined = "\n".join(BLOCKS)
    assert "LatentPerceptualLoss" in joined and "LPLObjective" in joined and "predict_z0" in joined


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_snippet_runs(index, capsys):
    namespace = {"__name__": f"readme_snippet_{index}"}
    exec(compile(BLOCKS[index], f"{SOURCE}[python block {index}]", "exec"), namespace)


KERNEL_BLOCKS = python_blocks(trainer_section("## The kernels")[1])


@pytest.mark.parametrize("index", range(len(KERNEL_BLOCKS)), ids=lambda i: f"kernels{i}")
def test_kernel_snippet_runs(index):
    assert KERNEL_BLOCKS, "README.md: 'The kernels' has no python block"
    exec(compile(KERNEL_BLOCKS[index], f"README.md[kernels block {index}]", "exec"), {"__name__": "readme_kernels"})
