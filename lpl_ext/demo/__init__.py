"""The offline demo, the LPL experiment and the tests' fixtures; not part of the loss library.

- :mod:`lpl_ext.demo.tiny_sdxl`: a tiny SDXL-architecture pipeline built from configs and the
  small pretrained weights in ``lpl_ext/demo/assets`` (what ``accelerate launch train_sdxl_lpl.py``
  trains when given no model);
- :mod:`lpl_ext.demo.synthetic_data`: the built-in captioned coloured shapes it trains on;
- :mod:`lpl_ext.demo.image_metrics`: reads colour, shape and size back from generated images;
- :mod:`lpl_ext.demo.textures` / :mod:`lpl_ext.demo.texture_metrics`: the built-in fine two-colour textures
  (stripes, checkerboards, dots, grids, crosshatch) and the spectral / period / orientation / colour / edge
  metrics read back from pictures of them (``train_sdxl_lpl.py --synthetic_data textures``).

They need the trainer's extras (``pip install "lpl_ext[train]"``: diffusers, transformers, pillow);
``import lpl_ext`` never imports them.
"""

from __future__ import annotations

import importlib
import sys
import warnings

# Old module name -> new one. The old names stay importable for one release (removed in 0.3.0).
MOVED_MODULES = {
    "lpl_ext.tiny_sdxl": "lpl_ext.demo.tiny_sdxl",
    "lpl_ext.synthetic_data": "lpl_ext.demo.synthetic_data",
    "lpl_ext.image_metrics": "lpl_ext.demo.image_metrics",
}


def alias_moved_module(old: str) -> None:
    """Make module ``old`` (called from its own body) the module it moved to, with a
    DeprecationWarning pointing at the line that imported the old name.

    ``sys.modules[old]`` becomes the new module itself, so ``lpl_ext.tiny_sdxl is
    lpl_ext.demo.tiny_sdxl``: one set of globals, whichever name a caller patches."""
    new = MOVED_MODULES[old]
    # stacklevel 3: past this function and the alias module to the importing line (warnings
    # skips importlib's own frames), so Python's default filters show it to a __main__ script.
    warnings.warn(f"{old} moved to {new}; import it from there ({old} will be removed in lpl_ext 0.3.0)",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
