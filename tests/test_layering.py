"""One path per fact in the op stack: the layers import one way, the option lists exist once
(in the C module) and the tables keyed by them are checked at import, the Python argument
checks give the C entry points' messages, autograd matches the operator's arguments by
name, the backend is chosen in one place, and the torch floor is enforced.

Oracles: the C entry points themselves (for the messages), the operator's registered
schema (for the argument names), the modules' own source (for the imports).
"""

from __future__ import annotations

import ast
import importlib
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import lpl_ext
from lpl_ext import _C, _backend, _launch, _ops, _options, _torch_backend

PACKAGE = Path(lpl_ext.__file__).resolve().parent

# The layers, bottom first (lpl_ext/_launch.py describes them). A module may import only
# modules of a lower layer, lazily inside a function included.
LAYERS = [
    {"_C", "_version", "_kernel_sources"},
    {"_cuda"},
    {"_backend"},
    {"_options"},
    {"_torch_backend", "config"},
    {"_launch"},
    {"_ops"},
    {"feature_distance", "outlier_mask"},
    {"lpl_loss"},
    {"objective"},
    {"diagnostics", "__init__", "image_metrics", "synthetic_data", "tiny_sdxl"},
    {"__main__"},
]
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def imported_modules(path: Path) -> set:
    """lpl_ext modules a source file imports (``from . import x``, ``from .x import``,
    ``from lpl_ext.x import``, ``import lpl_ext.x``), wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 and not module:
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif node.level == 1:
                found.add(module.split(".")[0])
            elif module.startswith("lpl_ext."):
                found.add(module.split(".")[1])
            elif module == "lpl_ext":
                found |= {alias.name for alias in node.names if alias.name in RANK}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lpl_ext.")}
    return found & (set(RANK) | {"demo"})


def layering_problems(sources: dict) -> list:
    """'module imports upper' for every import of a module from its own or a higher layer."""
    problems = []
    for name, path in sorted(sources.items()):
        if name not in RANK:
            problems.append(f"{name}: in no layer (add it to LAYERS)")
            continue
        for target in sorted(imported_modules(path) - {"demo"}):
            if RANK[target] >= RANK[name] and target != name:
                problems.append(f"{name} imports {target} (layer {RANK[target]} >= {RANK[name]})")
    return problems


def test_layers_import_one_way():
    sources = {p.stem: p for p in PACKAGE.glob("*.py")}
    assert layering_problems(sources) == []


def test_the_layering_check_can_fail(tmp_path):
    """A launch module that imports the operators back (the old loop) is reported."""
    bad = tmp_path / "_launch.py"
    bad.write_text("def f():\n    from ._ops import feature_distance\n    from . import feature_distance as fd\n")
    assert layering_problems({"_launch": bad}) == ["_launch imports _ops (layer 6 >= 5)",
                                                   "_launch imports feature_distance (layer 7 >= 5)"]
    assert layering_problems({"new_module": bad}) == ["new_module: in no layer (add it to LAYERS)"]


def test_the_backend_is_chosen_in_the_launch_layer_only():
    """use_native_kernels (LPL_EXT_BACKEND and the device) is asked in lpl_ext/_launch.py and
    nowhere else; the C arguments of a device are made in one function there."""
    askers = sorted(p.name for p in PACKAGE.glob("*.py")
                    if "use_native_kernels(" in p.read_text(encoding="utf-8") and p.name != "_backend.py")
    assert askers == ["_launch.py"]
    launch = (PACKAGE / "_launch.py").read_text(encoding="utf-8")
    # one per op, the weighted backward's product, and whether the plane moments pay off
    assert launch.count("use_native_kernels(") == 4
    assert launch.count(".is_cuda") == 0 and launch.count('device.type != "cuda"') == 1


# ---------------------------------------------------------------- option tables


def test_option_lists_are_the_c_modules():
    """docs/spec.md's options, pinned once here; every Python list is the C module's."""
    assert _C.NORMS == ("default", "shared", "batch", "none")
    assert _C.DISTANCES == ("mse", "l1")
    import train_sdxl_lpl as tr
    from lpl_ext import lpl_loss

    fd_module = importlib.import_module("lpl_ext.feature_distance")  # the package attribute is the function
    for names in (_options.NORMS, fd_module.NORMS, lpl_loss.NORM_TYPES,
                  lpl_ext.config.FIELDS["norm_type"].metadata["choices"]):
        assert names == _C.NORMS
    for names in (_options.DISTANCES, fd_module.DISTANCES, lpl_loss.LOSS_TYPES,
                  lpl_ext.config.FIELDS["loss_type"].metadata["choices"]):
        assert names == _C.DISTANCES
    actions = {a.dest: a for a in tr.build_parser()._actions}
    assert tuple(actions["lpl_norm_type"].choices) == _C.NORMS
    assert tuple(actions["lpl_loss_type"].choices) == _C.DISTANCES


def test_every_c_option_is_parsed_by_the_c_entry_point():
    """The C name table and the parser agree (both from LPL_NORM_LIST / LPL_DIST_LIST): each
    exported name is accepted, and the refusal lists exactly the exported names."""
    x = np.ones((1, 2, 3, 3), np.float32)
    for norm in _C.NORMS:
        for distance in _C.DISTANCES:
            _C.feature_distance(x, x, None, np.empty(1), None, norm, distance, 1.0)
    with pytest.raises(ValueError) as norm_error:
        _C.feature_distance(x, x, None, np.empty(1), None, "layer", "mse", 1.0)
    assert str(norm_error.value).endswith("expected one of " + ", ".join(map(repr, _C.NORMS)))
    with pytest.raises(ValueError) as dist_error:
        _C.feature_distance(x, x, None, np.empty(1), None, "shared", "l2", 1.0)
    assert str(dist_error.value).endswith("expected one of " + ", ".join(map(repr, _C.DISTANCES)))


def test_tables_keyed_by_option_are_checked_against_the_c_lists():
    """The torch backend's tables cover exactly the C module's options; a table missing one
    or naming one the kernels do not know fails at import, naming it."""
    _options.require_every_option("norm", _torch_backend._EPS, _C.NORMS, where="test")
    _options.require_every_option("distance", _torch_backend._DISTANCE, _C.DISTANCES, where="test")
    with pytest.raises(ImportError, match=r"missing \['layer'\], unknown \[\]"):
        _options.require_every_option("norm", _torch_backend._EPS, _C.NORMS + ("layer",), where="test")
    with pytest.raises(ImportError, match=r"where: its distance table .* missing \[\], unknown \['l1'\]"):
        _options.require_every_option("distance", _torch_backend._DISTANCE, ("mse",), where="where")


# ---------------------------------------------------------------- one set of messages


def _c_feature_distance(x, y, mask):
    """The C entry point on the same tensors (CPU)."""
    loss = np.empty(x.shape[0])
    _C.feature_distance(_launch.as_c_arg(x), _launch.as_c_arg(y), _launch.as_c_arg(mask), loss, None,
                        "shared", "mse", 1.0)


def _bad_cases():
    x = torch.randn(2, 3, 4, 4)
    mask = torch.rand(2, 3, 4, 4) > 0.5
    return {
        "x 3-D": (x[0], x[0], None),
        "y 3-D": (x, x[0], None),
        # a dtype the C side can name (it calls others "unsupported"; Python names them all)
        "x integer": (x.to(torch.uint8), x.to(torch.uint8), None),
        "y shape": (x, x[:, :2].contiguous(), None),
        "y dtype": (x, x.double(), None),
        "mask dtype": (x, x, mask.float()),
        "mask 3-D": (x, x, mask[0]),
        "mask shape": (x, x, mask[:1].contiguous()),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_python_checks_give_the_c_entry_points_messages(case):
    x, y, mask = _bad_cases()[case]
    with pytest.raises((TypeError, ValueError)) as py_error:
        _options.check_feature_distance_args(x, y, mask)
    with pytest.raises((TypeError, ValueError)) as c_error:
        _c_feature_distance(x, y, mask)
    assert (type(py_error.value), str(py_error.value)) == (type(c_error.value), str(c_error.value))
    # and the public function raises the Python check's error, whichever backend is chosen
    with pytest.raises(type(py_error.value), match="^" + re.escape(str(py_error.value)) + "$"):
        lpl_ext.feature_distance(x, y, mask)


@pytest.mark.parametrize("options", [
    dict(norm="layer"), dict(distance="l2"), dict(weight=float("inf")), dict(weight=float("nan")),
])
def test_option_messages_are_the_c_entry_points(options):
    x = np.ones((1, 1, 2, 2), np.float32)
    merged = dict(dict(norm="shared", distance="mse", weight=1.0), **options)
    with pytest.raises(ValueError) as py_error:
        _options.check_feature_distance_options(**merged)
    with pytest.raises(ValueError) as c_error:
        _C.feature_distance(x, x, None, np.empty(1), None, merged["norm"], merged["distance"], merged["weight"])
    assert str(py_error.value) == str(c_error.value)


@pytest.mark.parametrize("options", [
    (0.7, 2.0, 3, 5), (0.0, 2.0, 3, 5), (0.02, -1.0, 3, 5), (0.02, float("inf"), 3, 5), (0.02, 2.0, 2, 5),
    (0.02, 2.0, 3, -1),
])
def test_outlier_option_messages_are_the_c_entry_points(options):
    y = np.ones((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError) as py_error:
        _options.check_outlier_mask_options(*options)
    with pytest.raises(ValueError) as c_error:
        _C.outlier_mask(y, np.empty(y.shape, np.bool_), None, *options)
    assert str(py_error.value) == str(c_error.value)


# ---------------------------------------------------------------- the operator


def test_autograd_matches_the_operators_arguments_by_name():
    schema = torch.ops.lpl_ext.feature_distance.default._schema
    assert _ops.FEATURE_DISTANCE_ARGS == tuple(a.name for a in schema.arguments)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = lpl_ext.feature_distance(x, torch.randn(2, 3, 4, 4), reentrant=True)
    (grad,) = torch.autograd.grad(loss.sum(), x)  # one gradient per argument, x's in x's place
    assert grad.shape == x.shape and bool(grad.abs().sum() > 0)


# ---------------------------------------------------------------- the torch floor


def test_torch_without_custom_op_is_refused_naming_the_floor():
    _backend.check_torch(torch)  # the torch at hand has it
    old = types.SimpleNamespace(__version__="2.3.1", library=types.SimpleNamespace(Library=object))
    with pytest.raises(ImportError, match=r"needs torch >= 2\.4 .*custom_op.*register_fake.*register_autograd.*"
                                          r"found torch 2\.3\.1"):
        _backend.check_torch(old)
    no_library = types.SimpleNamespace(__version__="1.13.0")
    with pytest.raises(ImportError, match="found torch 1.13.0"):
        _backend.check_torch(no_library)
