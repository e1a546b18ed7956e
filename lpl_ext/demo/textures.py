"""Small deterministic built-in image-caption set of fine two-colour textures (issue 27).

Patterns: stripes (horizontal, vertical, diagonal, antidiagonal), checkerboards (axis-aligned and
diagonal), dots (square and diagonal lattice), fine grids and crosshatch, at periods of 6, 8 and 12
pixels, in two contrasting colours of :data:`lpl_ext.demo.synthetic_data.COLORS`. Every example is drawn
from its index alone (numpy, no randomness, no files); the pattern's integer pixel offset varies with the
index so a model learns the texture, not one picture. Captions name the colours (the first is the
pattern's "ink": stripes, squares, dots, lines; the second the rest), the pattern and its period::

    "red and white vertical stripes, period 6"
    "black and yellow diagonal checkerboard, period 8"
    "blue and orange dots, period 6"

Why 64 px (not 128): the tiny SDXL VAE downsamples 8x, so at 64 px its latent is 8x8 and can only
carry frequencies below its Nyquist limit of 1/16 cycle per pixel (periods > 16 px). Every period here
(6-12 px, 1/6 to 1/12 cycle per pixel) lies between that limit and the pixel Nyquist limit (period 2),
i.e. exactly where the decoder must invent detail the latent does not resolve spatially, which is what
LPL's decoder-feature loss is about. A 64 px canvas holds 5 to 16 periods, enough for a sharp FFT peak
(bin width 1/64 cycle per pixel: period 12 sits at bin 5.3, period 6 at bin 10.7). 128 px would change none
of these ratios but cost 4x the compute per step (the tiny UNet's pretraining was 0.35 s/step at 64 px
on the 2 shared CPU cores; the LPL experiment needs >= 3 seeds x 3 arms in about 90 minutes).

Periods: 4 px is the finest that keeps at least one pure pixel of each colour per period with half duty
(antialiased; at 3 px most offsets leave no pure pixel, so the colours cannot be read back), and the set
first had 4, 6, 8 and 12. Period 4 is dropped: the tiny VAE (``tiny_vae_textures.safetensors``, the one the
texture pipeline uses) did not reconstruct it in the compute available (1000 fine-tuning steps: 11.0 dB
PSNR, 0% of its reconstructions with the right period, orientation and colours, against 13.4 / 13.3 /
15.3 dB and 18 / 35 / 45% for periods 6 / 8 / 12; the full per-pattern record is
``lpl_ext/demo/assets/tiny_vae_textures.json``). No pattern is dropped: each is reconstructed at some periods.

The canvas is 80x64 like the shapes so the trainer's random crop (and SDXL's crop conditioning) is
exercised; the patterns are drawn with 4x4 supersampling (box-filtered, like a camera's pixel area),
so diagonal edges are antialiased and axis-aligned ones at integer offsets are pure.

Do not train with horizontal flips: a mirror turns diagonal (45 degree) textures into antidiagonal
(135 degree) ones and their captions would be wrong (the trainer refuses ``--random_flip`` with them).
"""

from __future__ import annotations

import math
import re

import numpy as np
from PIL import Image

from lpl_ext.demo.synthetic_data import COLORS, IndexedDrawings

PATTERNS: tuple[str, ...] = ("stripes", "checkerboard", "dots", "grid", "crosshatch")
# Period 4 was in the set and is dropped: the tiny texture VAE did not reconstruct it (see the module
# docstring); 6/8/12 are >= 33% apart, so a period error of 15% is unambiguous.
PERIODS: tuple[int, ...] = (6, 8, 12)
# Orientation of a pattern's lines (or lattice axis), degrees counter-clockwise from horizontal (y up),
# and the word the caption uses for it ("" = not named: the pattern has only that orientation, or 0
# degrees for the patterns that also come diagonal).
ORIENTATION_WORDS: dict[str, dict[int, str]] = {
    "stripes": {0: "horizontal", 45: "diagonal", 90: "vertical", 135: "antidiagonal"},
    "checkerboard": {0: "", 45: "diagonal"},
    "dots": {0: "", 45: "diagonal"},
    "grid": {0: ""},
    "crosshatch": {45: ""},
}
# (pattern, orientation) slots, cycled fastest by the index so every pattern is in any 10 examples.
SLOTS: tuple[tuple[str, int], ...] = tuple((p, o) for p in PATTERNS for o in ORIENTATION_WORDS[p])
# Ordered (ink, background) colour pairs: both orders of every pair with RGB distance >= 150 and a
# luminance difference >= 40 (so the texture is visible in grey levels too); 42 pairs.
_CONTRASTING = (
    ("red", "yellow"), ("red", "white"), ("red", "black"), ("green", "blue"), ("green", "yellow"),
    ("green", "white"), ("green", "black"), ("green", "orange"), ("blue", "yellow"), ("blue", "white"),
    ("blue", "black"), ("blue", "orange"), ("yellow", "purple"), ("yellow", "white"), ("yellow", "black"),
    ("purple", "white"), ("purple", "black"), ("purple", "orange"), ("white", "black"), ("white", "orange"),
    ("black", "orange"),
)
COLOR_PAIRS: tuple[tuple[str, str], ...] = tuple(p for a, b in _CONTRASTING for p in ((a, b), (b, a)))

DEFAULT_WIDTH = 80
DEFAULT_HEIGHT = 64
# Pattern geometry as fractions of the period: dot radius, grid / crosshatch line widths.
DOT_RADIUS = 0.3
GRID_LINE = 0.3  # 1.2 px at period 4: thinner and the 2nd harmonic of 1-px lines equals the fundamental
CROSSHATCH_LINE = 1.0 / 3.0
SUPERSAMPLE = 4

_CAPTION_RE = re.compile(
    r"^\s*(?P<a>[a-z]+) and (?P<b>[a-z]+) (?:(?P<orient>horizontal|vertical|diagonal|antidiagonal) )?"
    r"(?P<pattern>[a-z]+), period (?P<period>\d+)\s*$"
)


def num_distinct_examples() -> int:
    """Number of distinct captions: (pattern, orientation) slots x periods x colour pairs (1260)."""
    return len(SLOTS) * len(PERIODS) * len(COLOR_PAIRS)


def caption_vocabulary() -> list[str]:
    """Every word of a caption (for the tiny tokenizer's whole-word tokens; digits and the comma are
    single-byte tokens already)."""
    words = {"and", "period"}
    words.update(COLORS)
    words.update(PATTERNS)
    for table in ORIENTATION_WORDS.values():
        words.update(w for w in table.values() if w)
    return sorted(words)


def _phase_hash(index: int) -> int:
    return (index * 2654435761 + 0x9E3779B9) & 0xFFFFFFFF


def texture_spec(index: int) -> dict:
    """Deterministic description of example ``index`` (int >= 0).

    Returns ``{"pattern", "period_px", "orientation_deg", "colors": (ink, background), "phase": (dx, dy),
    "index"}``; ``phase`` is the pattern's integer pixel offset, in ``[0, period)``. Every caption occurs
    once in any :func:`num_distinct_examples` consecutive indices; the first 30 indices already cover every
    slot, every period and 30 colour pairs.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    c = index % num_distinct_examples()
    pattern, orientation = SLOTS[c % len(SLOTS)]
    block = len(SLOTS) * len(PERIODS)
    period = PERIODS[(c // len(SLOTS)) % len(PERIODS)]
    # With c = q * block + r: (q + c) mod 42 = ((block + 1) q + r) mod 42, a bijection of q for a fixed r
    # since block + 1 = 31 is coprime with 42 (the tests check every caption occurs once), so the colour
    # pair varies fastest too without breaking the one-caption-per-cycle property.
    colors = COLOR_PAIRS[(c // block + c) % len(COLOR_PAIRS)]
    h = _phase_hash(index)
    phase = ((h >> 8) % period, (h >> 20) % period)
    return {"pattern": pattern, "period_px": period, "orientation_deg": orientation, "colors": colors,
            "phase": phase, "index": index}


def caption_for(spec: dict) -> str:
    """Caption of a spec, e.g. ``"red and white vertical stripes, period 6"``."""
    word = ORIENTATION_WORDS[spec["pattern"]][int(spec["orientation_deg"])]
    a, b = spec["colors"]
    return f"{a} and {b} {word + ' ' if word else ''}{spec['pattern']}, period {int(spec['period_px'])}"


def parse_caption(caption: str) -> dict:
    """Inverse of :func:`caption_for`: ``{"pattern", "period_px", "orientation_deg", "colors"}``.

    Any integer period >= 2 and any two different colours of ``COLORS`` are accepted (not only the set's),
    so wrong-period references can be rendered. Raises ``ValueError`` naming the caption otherwise.
    """
    m = _CAPTION_RE.match(caption) if isinstance(caption, str) else None
    if m is None:
        raise ValueError(f"not a texture caption: {caption!r} (expected e.g. "
                         f"'red and white vertical stripes, period 6')")
    a, b, pattern, word = m["a"], m["b"], m["pattern"], m["orient"] or ""
    if a not in COLORS or b not in COLORS or a == b:
        raise ValueError(f"texture caption {caption!r}: colours must be two different names of {sorted(COLORS)}")
    if pattern not in ORIENTATION_WORDS:
        raise ValueError(f"texture caption {caption!r}: unknown pattern {pattern!r} (one of {PATTERNS})")
    by_word = {w: o for o, w in ORIENTATION_WORDS[pattern].items()}
    if word not in by_word:
        raise ValueError(f"texture caption {caption!r}: {pattern} cannot be {word or 'unqualified'} "
                         f"(allowed: {sorted(w or '<none>' for w in by_word)})")
    period = int(m["period"])
    if period < 2:
        raise ValueError(f"texture caption {caption!r}: period must be >= 2 pixels, got {period}")
    return {"pattern": pattern, "period_px": period, "orientation_deg": by_word[word], "colors": (a, b)}


def ink_coverage(spec: dict, width: int, height: int, phase: tuple[float, float] = (0, 0)) -> np.ndarray:
    """Fraction of each pixel covered by the ink colour, float32 (height, width) in [0, 1] (4x4 supersampled)."""
    s = SUPERSAMPLE
    period = float(spec["period_px"])
    theta = math.radians(float(spec["orientation_deg"]))
    xs = (np.arange(width * s) + 0.5) / s - float(phase[0])
    ys = (np.arange(height * s) + 0.5) / s - float(phase[1])
    x, y = np.meshgrid(xs, ys)
    # Image y points down; orientation is counter-clockwise with y up. u runs across the lines, v along.
    u = (x * math.sin(theta) + y * math.cos(theta)) / period
    v = (x * math.cos(theta) - y * math.sin(theta)) / period
    # Tiny offset so that lines through exact sub-sample positions do not flip with float rounding.
    u, v = u + 1e-9, v + 1e-9
    pattern = spec["pattern"]
    if pattern == "stripes":
        ink = (u % 1.0) < 0.5
    elif pattern == "checkerboard":
        ink = (np.floor(2 * u) + np.floor(2 * v)) % 2 == 0
    elif pattern == "dots":
        ink = ((u % 1.0) - 0.5) ** 2 + ((v % 1.0) - 0.5) ** 2 < DOT_RADIUS ** 2
    elif pattern in ("grid", "crosshatch"):
        w = GRID_LINE if pattern == "grid" else CROSSHATCH_LINE
        ink = ((u % 1.0) < w) | ((v % 1.0) < w)
    else:
        raise ValueError(f"spec pattern must be one of {PATTERNS}, got {pattern!r}")
    return ink.reshape(height, s, width, s).mean(axis=(1, 3)).astype(np.float32)


def render(spec_or_caption: dict | str, width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT,
           phase: tuple[float, float] | None = (0, 0)) -> Image.Image:
    """Draw a texture spec or caption as an RGB PIL image of ``width`` x ``height``.

    ``phase``: the pattern's offset in pixels (dx, dy); ``None`` uses the spec's own ``"phase"`` (what
    :func:`draw_example` does). Used both for the training set and for the metrics' real references.
    """
    spec = parse_caption(spec_or_caption) if isinstance(spec_or_caption, str) else spec_or_caption
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be >= 1, got {width}x{height}")
    if phase is None:
        phase = spec.get("phase", (0, 0))
    alpha = ink_coverage(spec, int(width), int(height), phase)[..., None]
    ink = np.asarray(COLORS[spec["colors"][0]], dtype=np.float32)
    paper = np.asarray(COLORS[spec["colors"][1]], dtype=np.float32)
    rgb = alpha * ink + (1.0 - alpha) * paper
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


def draw_example(index: int, width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT) -> tuple[Image.Image, str]:
    """Draw example ``index``: (RGB PIL image of ``width`` x ``height``, caption)."""
    spec = texture_spec(index)
    return render(spec, width, height, phase=None), caption_for(spec)


class SyntheticTextures(IndexedDrawings):
    """Sequence of ``num_examples`` (PIL image, caption) pairs; index i is always the same picture
    (:func:`draw_example` of each index)."""

    draw = staticmethod(draw_example)


def evaluation_prompts() -> list[str]:
    """Fixed evaluation captions (16): every (pattern, orientation) slot, every period at least 3 times,
    every colour, inks and backgrounds both light and dark; the first two are the trainer's default
    validation prompts for ``--synthetic_data textures``."""
    specs = [
        ("stripes", 90, 6, ("red", "white")), ("stripes", 0, 8, ("black", "yellow")),
        ("stripes", 45, 8, ("blue", "orange")), ("stripes", 135, 12, ("green", "white")),
        ("stripes", 90, 12, ("purple", "yellow")), ("stripes", 0, 8, ("white", "blue")),
        ("checkerboard", 0, 8, ("black", "white")), ("checkerboard", 45, 12, ("yellow", "purple")),
        ("checkerboard", 0, 6, ("orange", "blue")),
        ("dots", 0, 6, ("white", "black")), ("dots", 45, 8, ("red", "yellow")),
        ("dots", 0, 12, ("blue", "white")),
        ("grid", 0, 6, ("green", "black")), ("grid", 0, 12, ("black", "orange")),
        ("crosshatch", 45, 8, ("purple", "white")), ("crosshatch", 45, 6, ("yellow", "green")),
    ]
    return [caption_for({"pattern": p, "orientation_deg": o, "period_px": t, "colors": c}) for p, o, t, c in specs]
