"""Read texture period, orientation, colours, edge width and power spectrum back from pictures.

No learned model: every number comes from the pixels (numpy FFTs and a two-colour fit), so it can be
checked on the real renderings of :mod:`lpl_ext.demo.textures`, which it recovers exactly (tests).

Conventions: images are RGB (PIL images or uint8/float arrays (H, W, 3) in 0..255), read as float64 in
[0, 1]; frequencies are in cycles per pixel; orientations are those of the pattern's lines, degrees
counter-clockwise from horizontal with y up, in [0, 180).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lpl_ext.demo import textures as tx
from lpl_ext.demo.synthetic_data import COLORS

# Frequency bands, cycles per pixel (a bin k of a radial spectrum sits at k / min(H, W)).
# - low: below 1/16, the Nyquist limit of the 8x-downsampled latent (an 8x8 latent at 64 px resolves
#   periods > 16 px): what the latent itself can carry;
# - mid: 1/16 to 1/4 (periods 16 to 4 px): the texture fundamentals of the set live here, detail the
#   decoder has to produce inside one latent cell;
# - high: 1/4 to 1/2 (periods 4 to 2 px, up to the pixel Nyquist limit): edge sharpness (square-wave
#   harmonics) and the period-4 textures.
BANDS: dict[str, tuple[float, float]] = {"low": (0.0, 1.0 / 16), "mid": (1.0 / 16, 0.25), "high": (0.25, 0.5)}
# Power floor added to both spectra before a log ratio: ~8x the power of 8-bit quantisation noise
# ((1/255)^2 / 12 per pixel), so that bins a rendering leaves empty do not give infinite ratios.
POWER_FLOOR = 1e-5
# Peaks below this frequency (periods > 32 px) are ignored: the DC lobe of the window, and shading.
MIN_PEAK_FREQUENCY = 1.0 / 32
PERIOD_TOLERANCE = 0.15  # relative; the set's periods are >= 33% apart
ORIENTATION_TOLERANCE_DEG = 10.0
# Pixels whose position between the two dominant colours is in (0.15, 0.85) are in transition.
TRANSITION = (0.15, 0.85)
_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[n] for n in _PALETTE_NAMES], dtype=np.float64)


def to_array(image) -> np.ndarray:
    """RGB float64 (H, W, 3) in [0, 1] of a PIL image or an array (H, W, 3) in 0..255."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be RGB (H, W, 3), got shape {arr.shape}")
    return arr / 255.0


def _window(height: int, width: int) -> np.ndarray:
    # Hann window: without it the image border is a step that leaks power into every frequency.
    return np.outer(np.hanning(height), np.hanning(width))


def power_spectrum_2d(image) -> np.ndarray:
    """Windowed power spectrum (H, W), float64, mean over RGB, DC at [0, 0] (``np.fft`` order).

    Each channel minus its mean, times a Hann window, FFT; power ``|X|^2 / (H * W * mean(w^2))``, so white
    noise of variance s^2 (pixels in [0, 1]) has expected power s^2 in every bin, whatever the size."""
    x = to_array(image)
    h, w = x.shape[:2]
    win = _window(h, w)
    x = (x - x.mean(axis=(0, 1))) * win[..., None]
    power = np.abs(np.fft.fft2(x, axes=(0, 1))) ** 2
    return power.mean(axis=2) / (h * w * float((win ** 2).mean()))


def _frequencies(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    fy = np.fft.fftfreq(height)[:, None] * np.ones((1, width))
    fx = np.fft.fftfreq(width)[None, :] * np.ones((height, 1))
    return fx, fy


def radial_power_spectrum(image) -> np.ndarray:
    """Radially averaged power spectrum, float64 (min(H, W) // 2 + 1,).

    Bin k is the mean of :func:`power_spectrum_2d` over the frequencies with ``round(|f| * N) == k``,
    ``N = min(H, W)``, i.e. bin k is at k / N cycles per pixel (bin 0 is DC, ~0 since the mean is removed);
    frequencies beyond the inscribed circle (|f| > 1/2, the corners) are left out."""
    power = power_spectrum_2d(image)
    h, w = power.shape
    n = min(h, w)
    fx, fy = _frequencies(h, w)
    bins = np.rint(np.hypot(fx, fy) * n).astype(int).ravel()
    nbins = n // 2 + 1
    keep = bins < nbins
    sums = np.bincount(bins[keep], weights=power.ravel()[keep], minlength=nbins)
    counts = np.bincount(bins[keep], minlength=nbins)
    return sums / np.maximum(counts, 1)


def band_bins(n: int) -> dict[str, np.ndarray]:
    """Radial bin indices of each band for images with ``min(H, W) == n`` (DC excluded)."""
    k = np.arange(n // 2 + 1)
    f = k / n
    out = {}
    for name, (lo, hi) in BANDS.items():
        sel = (f >= lo) & ((f < hi) if hi < 0.5 else (f <= hi)) & (k > 0)
        out[name] = k[sel]
    return out


def _reference_spectra(images: Sequence, references: Sequence) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(images) != len(references):
        raise ValueError(f"images and references must have the same length, got {len(images)} and {len(references)}")
    if len(images) == 0:
        raise ValueError("images must not be empty")
    pairs = []
    for image, ref in zip(images, references):
        refs = list(ref) if isinstance(ref, (list, tuple)) else [ref]
        if not refs:
            raise ValueError("every entry of references must hold at least one image")
        spec = radial_power_spectrum(image)
        ref_spec = np.mean([radial_power_spectrum(r) for r in refs], axis=0)
        if spec.shape != ref_spec.shape:
            raise ValueError(f"image and reference sizes differ (spectra {spec.shape} vs {ref_spec.shape})")
        pairs.append((spec, ref_spec))
    return pairs


def _band_log_ratios(images: Sequence, references: Sequence) -> dict[str, np.ndarray]:
    """Per image and band: the log10 power ratios of the band's bins, (N, bins) arrays."""
    pairs = _reference_spectra(images, references)
    n = 2 * (len(pairs[0][0]) - 1)
    ratios = np.stack([np.log10((s + POWER_FLOOR) / (r + POWER_FLOOR)) for s, r in pairs])
    # A spectrum of length n//2 + 1 comes from min side n or n + 1; the bands only need n approximately.
    return {name: ratios[:, idx] for name, idx in band_bins(n).items()}


def band_spectrum_errors(images: Sequence, references: Sequence) -> dict[str, float]:
    """Mean |log10 power ratio| per band (keys of :data:`BANDS`) between images and their references.

    ``references[i]`` is a reference image for ``images[i]`` or a list of them (their radial spectra are
    averaged, e.g. renderings of the same caption at several phases). For every image and every radial
    bin of a band, ``|log10((P_image + floor) / (P_reference + floor))|`` (``floor`` = :data:`POWER_FLOOR`),
    averaged over the band's bins, then over the images. 0 = same spectrum; 1 = a factor 10 off."""
    return {name: float(np.abs(r).mean()) for name, r in _band_log_ratios(images, references).items()}


def band_log_power_ratios(images: Sequence, references: Sequence) -> dict[str, float]:
    """Signed counterpart of :func:`band_spectrum_errors`: mean log10 power ratio per band (> 0: the images
    have more power there than the references, e.g. noise; < 0: less, e.g. blur)."""
    return {name: float(r.mean()) for name, r in _band_log_ratios(images, references).items()}


def _parabolic_offset(left: float, centre: float, right: float) -> float:
    """Sub-bin offset of a peak from three log powers (vertex of the parabola through them)."""
    denom = left - 2 * centre + right
    if denom >= 0:
        return 0.0
    return float(np.clip(0.5 * (left - right) / denom, -0.5, 0.5))


def fft_peak(image) -> dict:
    """Strongest non-DC peak of the windowed power spectrum.

    Returns ``{"period_px", "orientation_deg", "frequency": (fx, fy) cycles per pixel (image axes, y
    down), "power_fraction": peak bin power / total power}``. The peak is refined to sub-bin precision
    by a parabola through the log powers of its neighbours along each axis; frequencies below
    :data:`MIN_PEAK_FREQUENCY` are ignored. ``orientation_deg`` is that of the lines the peak's wave
    makes (perpendicular to the wave vector)."""
    power = power_spectrum_2d(image)
    h, w = power.shape
    fx, fy = _frequencies(h, w)
    masked = np.where(np.hypot(fx, fy) >= MIN_PEAK_FREQUENCY, power, -1.0)
    iy, ix = np.unravel_index(int(np.argmax(masked)), masked.shape)
    logp = np.log(power + 1e-30)
    dx = _parabolic_offset(logp[iy, (ix - 1) % w], logp[iy, ix], logp[iy, (ix + 1) % w])
    dy = _parabolic_offset(logp[(iy - 1) % h, ix], logp[iy, ix], logp[(iy + 1) % h, ix])
    fxp = float(fx[iy, ix] + dx / w)
    fyp = float(fy[iy, ix] + dy / h)
    freq = math.hypot(fxp, fyp)
    # Wave vector with y up is (fx, -fy); the lines are perpendicular to it.
    orientation = (math.degrees(math.atan2(-fyp, fxp)) + 90.0) % 180.0
    return {"period_px": 1.0 / freq, "orientation_deg": orientation, "frequency": (fxp, fyp),
            "power_fraction": float(power[iy, ix] / max(power.sum(), 1e-30))}


def expected_peak(caption_or_spec: str | dict) -> tuple[float, tuple[float, ...]]:
    """Period (px) and the possible line orientations (degrees) of a texture's strongest FFT peak.

    Stripes: the period and orientation. Dots, grids, crosshatch: the period, along either lattice axis.
    Checkerboard of period P at angle a: the square waves multiply, so the fundamental lies on the
    diagonals: period P / sqrt(2) at a +- 45 degrees."""
    spec = tx.parse_caption(caption_or_spec) if isinstance(caption_or_spec, str) else caption_or_spec
    period, o = float(spec["period_px"]), float(spec["orientation_deg"])
    if spec["pattern"] == "stripes":
        return period, (o % 180.0,)
    if spec["pattern"] == "checkerboard":
        return period / math.sqrt(2.0), ((o + 45.0) % 180.0, (o - 45.0) % 180.0)
    return period, (o % 180.0, (o + 90.0) % 180.0)


def angle_difference(a: float, b: float) -> float:
    """Distance between two line orientations, degrees in [0, 90] (orientations are modulo 180)."""
    d = abs(a - b) % 180.0
    return min(d, 180.0 - d)


def dominant_colors(image, iterations: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two dominant colours of an image and every pixel's position between them.

    2-means in RGB (started from the darkest and the brightest pixel); each colour is then the mean of
    the outer quarter of its cluster along the line between the two centres, so antialiased and blurred
    transition pixels do not pull the colours towards each other. Returns (colour 1, colour 2) as float64
    RGB in 0..255 and t (H, W): 0 at colour 1, 1 at colour 2 (projection, clipped to [0, 1])."""
    x = to_array(image) * 255.0
    h, w = x.shape[:2]
    px = x.reshape(-1, 3)
    lum = px @ np.array([0.299, 0.587, 0.114])
    centres = np.stack([px[np.argmin(lum)], px[np.argmax(lum)]])
    labels = np.zeros(len(px), dtype=bool)
    for _ in range(iterations):
        d = ((px[:, None, :] - centres[None]) ** 2).sum(-1)
        labels = d[:, 1] < d[:, 0]
        for k, sel in enumerate((~labels, labels)):
            if sel.any():
                centres[k] = px[sel].mean(0)
    axis = centres[1] - centres[0]
    norm2 = float(axis @ axis)
    if norm2 < 1e-9:  # a flat image: one colour
        return centres[0], centres[1], np.zeros((h, w))
    t = (px - centres[0]) @ axis / norm2
    colors = []
    for k, sel in enumerate((~labels, labels)):
        tk = t[sel] if sel.any() else t
        outer = tk <= np.quantile(tk, 0.25) if k == 0 else tk >= np.quantile(tk, 0.75)
        colors.append((px[sel] if sel.any() else px)[outer].mean(0))
    c1, c2 = colors
    axis = c2 - c1
    norm2 = max(float(axis @ axis), 1e-9)
    t = np.clip((px - c1) @ axis / norm2, 0.0, 1.0).reshape(h, w)
    return c1, c2, t


def nearest_color_name(rgb: np.ndarray) -> str:
    """Name of the palette colour (``COLORS``) nearest to ``rgb`` (0..255)."""
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, dtype=np.float64)) ** 2).sum(1)))]


def color_position(image, color_a, color_b) -> np.ndarray:
    """Each pixel's position between two RGB colours (0..255): projection on the segment a -> b, clipped to
    [0, 1], float64 (H, W)."""
    px = to_array(image) * 255.0
    a, b = np.asarray(color_a, dtype=np.float64), np.asarray(color_b, dtype=np.float64)
    axis = b - a
    t = (px - a) @ axis / max(float(axis @ axis), 1e-9)
    return np.clip(t, 0.0, 1.0)


def boundary_length(t: np.ndarray) -> int:
    """Neighbour pairs (horizontal and vertical) on opposite sides of t = 0.5: the boundary length in pixels
    (exact for axis-aligned edges, up to sqrt(2) too long for diagonal ones)."""
    binary = t >= 0.5
    return int((binary[:, 1:] != binary[:, :-1]).sum() + (binary[1:, :] != binary[:-1, :]).sum())


def edge_width(t: np.ndarray, min_boundary: int = 1) -> float:
    """Pixels in transition between the two colours per boundary pixel.

    ``t`` (H, W) is each pixel's position between the two colours (:func:`color_position`). Transition
    pixels: t in :data:`TRANSITION`. Boundary length: neighbour pairs (horizontal and vertical) on opposite
    sides of t = 0.5 (:func:`boundary_length`), at least ``min_boundary`` (so that an image with almost no
    boundary, e.g. flat mid-colour, does not divide by ~0). A sharp axis-aligned edge at an integer
    position: 0; antialiased: ~0.5-1; a blurred edge several pixels."""
    transition = int(((t > TRANSITION[0]) & (t < TRANSITION[1])).sum())
    return float(transition / max(boundary_length(t), min_boundary, 1))


def _reference_boundary(spec: dict, shape: tuple[int, int]) -> int:
    """Boundary length of the caption's real rendering at phase 0, the same size as the image."""
    ref = tx.ink_coverage(spec, shape[1], shape[0])
    return boundary_length(1.0 - ref)


def score_image(image, caption: str) -> dict:
    """Score one image against its texture caption.

    Keys: ``period_px`` / ``orientation_deg`` (measured FFT peak), ``period_rel_error`` (|measured -
    expected| / expected, expected from :func:`expected_peak`), ``period_ok`` (<= :data:`PERIOD_TOLERANCE`),
    ``orientation_error_deg`` (to the nearest expected orientation), ``orientation_ok``
    (<= :data:`ORIENTATION_TOLERANCE_DEG`), ``color_error`` (mean RGB distance, 0..255 scale, of the two
    dominant colours to the caption's two, in the better of the two pairings), ``colors_ok`` (the nearest
    palette names of the two dominant colours are the caption's two), ``contrast`` (distance between the
    dominant colours / that of the caption's colours), ``edge_width_px`` (:func:`edge_width` between the
    caption's two colours: a blur that also lowers the contrast counts as wide edges, a fit to the
    image's own colours would hide it; per boundary pixel of the image, or of the caption's real
    rendering if that is longer, so a nearly flat image scores its transition pixels per true boundary
    pixel instead of dividing by ~0), 
    ``peak_power_fraction``."""
    spec = tx.parse_caption(caption)
    peak = fft_peak(image)
    period, orientations = expected_peak(spec)
    rel = abs(peak["period_px"] - period) / period
    orient_err = min(angle_difference(peak["orientation_deg"], o) for o in orientations)
    c1, c2, t_own = dominant_colors(image)
    t_shape = t_own.shape
    ref_a, ref_b = (np.asarray(COLORS[n], dtype=np.float64) for n in spec["colors"])
    dist = np.linalg.norm
    color_error = min((dist(c1 - ref_a) + dist(c2 - ref_b)) / 2, (dist(c1 - ref_b) + dist(c2 - ref_a)) / 2)
    names = {nearest_color_name(c1), nearest_color_name(c2)}
    return {
        "period_px": peak["period_px"],
        "orientation_deg": peak["orientation_deg"],
        "period_rel_error": float(rel),
        "period_ok": bool(rel <= PERIOD_TOLERANCE),
        "orientation_error_deg": float(orient_err),
        "orientation_ok": bool(orient_err <= ORIENTATION_TOLERANCE_DEG),
        "color_error": float(color_error),
        "colors_ok": names == set(spec["colors"]),
        "contrast": float(dist(c1 - c2) / max(dist(ref_a - ref_b), 1e-9)),
        "edge_width_px": edge_width(color_position(image, ref_a, ref_b), min_boundary=_reference_boundary(spec, t_shape)),
        "peak_power_fraction": peak["power_fraction"],
    }


def score_images(images: Sequence, captions: Sequence[str]) -> list[dict]:
    """:func:`score_image` of every (image, caption) pair."""
    if len(images) != len(captions):
        raise ValueError(f"images and captions must have the same length, got {len(images)} and {len(captions)}")
    return [score_image(img, cap) for img, cap in zip(images, captions)]


SUMMARY_KEYS = ("period_ok", "orientation_ok", "colors_ok", "all_ok", "period_rel_error",
                "orientation_error_deg", "color_error", "contrast", "edge_width_px")


def summarize(scores: Sequence[dict]) -> dict:
    """Means over images: ``*_ok`` keys as percentages (0-100; ``all_ok``: period, orientation and colours
    all right), the rest as plain means; plus ``n``."""
    if not scores:
        raise ValueError("scores must not be empty")
    out: dict = {"n": len(scores)}
    for key in SUMMARY_KEYS:
        if key == "all_ok":
            vals = [s["period_ok"] and s["orientation_ok"] and s["colors_ok"] for s in scores]
        else:
            vals = [s[key] for s in scores]
        mean = float(np.mean([float(v) for v in vals]))
        out[key] = 100.0 * mean if key.endswith("_ok") else mean
    return out


def reference_renderings(captions: Sequence[str], width: int, height: int, references_per_caption: int = 4,
                         seed: int = 0) -> dict[str, list]:
    """``references_per_caption`` real renderings (:func:`textures.render`) of every distinct caption at
    integer phases drawn from ``seed`` (numpy ``default_rng``), keyed by caption."""
    if references_per_caption < 1:
        raise ValueError(f"references_per_caption must be >= 1, got {references_per_caption}")
    rng = np.random.default_rng(seed)
    out = {}
    for caption in dict.fromkeys(captions):
        period = tx.parse_caption(caption)["period_px"]
        out[caption] = [tx.render(caption, width, height, phase=tuple(int(p) for p in rng.integers(0, period, 2)))
                        for _ in range(references_per_caption)]
    return out


def evaluate(images: Sequence, captions: Sequence[str], *, references_per_caption: int = 4, seed: int = 0) -> dict:
    """Everything for one set of generated images: :func:`summarize` of :func:`score_images`, plus
    ``band_error_{low,mid,high}`` (:func:`band_spectrum_errors`) and ``band_log_ratio_{low,mid,high}``
    (:func:`band_log_power_ratios`) against :func:`reference_renderings` of the same captions, the same
    size as the images."""
    images = list(images)
    captions = list(captions)
    out = summarize(score_images(images, captions))
    if not images:
        return out
    width, height = to_array(images[0]).shape[1::-1]
    refs = reference_renderings(captions, width, height, references_per_caption, seed)
    per_image = [refs[c] for c in captions]
    for name, value in band_spectrum_errors(images, per_image).items():
        out[f"band_error_{name}"] = value
    for name, value in band_log_power_ratios(images, per_image).items():
        out[f"band_log_ratio_{name}"] = value
    return out
