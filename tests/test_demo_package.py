"""Package layout: the library (``lpl_ext``) and the offline demo (``lpl_ext.demo``: tiny SDXL
pipeline, built-in shapes, image metrics) are separate, and the demo's old import paths
(``lpl_ext.tiny_sdxl`` ...) still work for one release, with a DeprecationWarning."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
import warnings
from fnmatch import fnmatch
from pathlib import Path

import pytest

from lpl_ext import demo

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lpl_ext"


@pytest.mark.parametrize("old", sorted(demo.MOVED_MODULES))
def test_old_import_path_is_the_new_module_with_a_deprecation_warning(old, monkeypatch):
    new = demo.MOVED_MODULES[old]
    monkeypatch.delitem(sys.modules, old, raising=False)  # a first import in this process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        __import__(old)  # what an import statement runs
    module = sys.modules[old]
    assert module is importlib.import_module(new)  # one module: patching either name patches both
    assert sys.modules[old] is module
    moved = [w for w in caught if issubclass(w.category, DeprecationWarning) and new in str(w.message)]
    assert len(moved) == 1, [str(w.message) for w in caught]
    assert old in str(moved[0].message) and "0.3.0" in str(moved[0].message)
    # The warning names the importing line (here: this file), not the alias
    # module or importlib's internals: Python's default filters show it for a __main__ script.
    assert Path(moved[0].filename) == Path(__file__), moved[0].filename


def test_old_from_import_shows_the_warning_in_a_script(tmp_path):
    """What a user's script sees with Python's default warning filters."""
    script = tmp_path / "user_script.py"
    script.write_text("from lpl_ext import tiny_sdxl\nimport lpl_ext.demo.tiny_sdxl as new\n"
                      "print('SAME', tiny_sdxl is new, tiny_sdxl.tiny_vae_weights_path().is_file())\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "SAME True True" in proc.stdout
    assert f"{script}:1: DeprecationWarning: lpl_ext.tiny_sdxl moved to lpl_ext.demo.tiny_sdxl" in proc.stderr


def test_importing_the_library_imports_no_demo_module():
    code = "import lpl_ext, sys; print(sorted(m for m in sys.modules if m.startswith('lpl_ext.')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert "lpl_ext.feature_distance" in loaded  # the probe sees the library's modules
    assert not [m for m in loaded if m.startswith("lpl_ext.demo") or m in demo.MOVED_MODULES], loaded


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "lpl_ext" if node.level == 1 and not node.module else (
                f"lpl_ext.{node.module}" if node.level == 1 else node.module or "")
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_library_modules_do_not_depend_on_the_demo():
    aliases = {name.rsplit(".", 1)[1] + ".py" for name in demo.MOVED_MODULES}
    checked = [p for p in PACKAGE.glob("*.py") if p.name not in aliases]
    assert len(checked) >= 8, checked
    for path in checked:
        bad = {m for m in _imported_modules(path) if m.startswith("lpl_ext.demo") or m in demo.MOVED_MODULES}
        assert not bad, f"{path.name} imports the demo: {sorted(bad)}"


def test_the_demo_package_and_its_assets_are_shipped():
    """pyproject.toml lists lpl_ext.demo and its asset files (tests/dist_install_run.sh checks the
    built wheel and sdist)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert {"lpl_ext", "lpl_ext.demo"} <= set(config["packages"])
    globs = config["package-data"]["lpl_ext.demo"]
    assets = sorted((PACKAGE / "demo" / "assets").iterdir())
    assert {p.name for p in assets} >= {"tiny_vae.safetensors", "tiny_sdxl_base.safetensors"}
    for asset in assets:
        assert any(fnmatch(f"assets/{asset.name}", g) for g in globs), asset
    assert not (PACKAGE / "assets").exists(), "the demo's weights live in lpl_ext/demo/assets only"
