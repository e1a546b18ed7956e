"""Executes every ```python block of the "Use it in your trainer" section: from README.md
once it has the section (heading "## Use it in your trainer"), else from the fragment
docs/use_in_trainer.md that is merged into it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Use it in your trainer"


def trainer_section() -> tuple[str, str]:
    """(source name, markdown text of the section)."""
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    lines = text.splitlines()
    if HEADING in (line.rstrip() for line in lines):
        start = next(i for i, line in enumerate(lines) if line.rstrip() == HEADING)
        end = next((j for j in range(start + 1, len(lines)) if re.match(r"^## (?!#)", lines[j])), len(lines))
        return "README.md", "\n".join(lines[start:end])
    return "docs/use_in_trainer.md", (ROOT / "docs" / "use_in_trainer.md").read_text(encoding="utf-8")


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
