"""Does a generated picture show its prompt? A metric for images of the built-in captioned shapes.

Every caption of :mod:`lpl_ext.demo.synthetic_data` names a size, a foreground colour, a shape and a background
colour (``"a large red circle on a white background"``). :func:`analyze_image` reads those back from a
picture, with no model, only the palette and the shapes' geometry:

- **background colour**: the palette colour (nearest in RGB) most frequent on the 3-pixel border;
- **foreground colour**: the palette colour most frequent among the other pixels, after one erosion so that
  the blended pixels along the edge (red on white is pink, which is nearest to orange) do not vote;
- **shape**: the pixels nearer to the measured foreground colour than to the background colour form the
  shape mask (its largest 4-connected part); each of circle, square, triangle and cross is drawn as a
  template filling the mask's bounding box (all four shapes fill a square box of side 2r in the data), also
  slightly shrunk or moved (:data:`FIT_SCALES`, :data:`FIT_SHIFTS_PX`) so that one stray bump on the
  outline does not decide, and the template with the highest IoU with the mask is the shape;
- **size**: the bounding box side; above :data:`SIZE_SPLIT_PX` (between the data's small and large sizes,
  26 and 44 px at 64 px) is ``large``;
- **edge width** (px): pixels in transition between the two colours (projection on the background ->
  foreground colour line strictly between 0.1 and 0.9) per pixel of the mask's boundary. PIL draws the data
  without antialiasing (0 px); the shipped VAE's reconstructions of the same drawings give the floor any
  latent model can reach (:func:`dataset_reference`); blur and mottled regions raise it.

:func:`score_image` compares with the caption; :func:`summarize` averages over images. Images are 64x64 RGB
(PIL images or uint8 arrays (H, W, 3)); other sizes work, with :data:`SIZE_SPLIT_PX` scaled by ``min(H, W)/64``.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from lpl_ext.demo import synthetic_data as sd

PALETTE_NAMES: tuple[str, ...] = tuple(sd.COLORS)
_PALETTE = np.array([sd.COLORS[n] for n in PALETTE_NAMES], dtype=np.float32)  # (8, 3)
BORDER_PX = 3
# Bounding-box side separating "small" (radius 0.2 * 64 -> 25.6 px) from "large" (0.34 * 64 -> 43.5 px).
SIZE_SPLIT_PX = 34.0
# Fewer foreground pixels than this (at 64 px) means no shape was drawn.
MIN_SHAPE_PX = 12
TRANSITION_LOW, TRANSITION_HIGH = 0.1, 0.9
# Template fit around the bounding box: half-size r * scale, centre moved by (dx, dy) (px at 64 px).
FIT_SCALES = (0.85, 0.9, 0.95, 1.0, 1.05)
FIT_SHIFTS_PX = (-2.0, 0.0, 2.0)


@dataclass
class ImageAnalysis:
    """What :func:`analyze_image` read from one picture (colour/shape names are ``None`` when absent)."""

    background: str | None
    foreground: str | None
    shape: str | None
    size: str | None
    shape_iou: dict  # shape name -> IoU of its template with the mask (empty without a mask)
    bbox_side_px: float
    mask_px: int
    edge_width_px: float  # nan without a mask
    background_rgb: tuple
    foreground_rgb: tuple


def parse_caption(caption: str) -> dict:
    """``"a large red circle on a white background"`` -> dict(size, color, shape, background).

    Raises ``ValueError`` naming the caption when it is not of the built-in form.
    """
    words = caption.strip().lower().split()
    ok = (len(words) == 8 and words[0] == "a" and words[4:6] == ["on", "a"] and words[7] == "background"
          and words[1] in ("small", "large") and words[2] in sd.COLORS and words[3] in sd.SHAPES
          and words[6] in sd.COLORS)
    if not ok:
        raise ValueError(f"caption {caption!r} is not of the form 'a <small|large> <colour> <shape> on a "
                         f"<colour> background' with colours {PALETTE_NAMES} and shapes {sd.SHAPES}")
    return {"size": words[1], "color": words[2], "shape": words[3], "background": words[6]}


def _to_array(image) -> np.ndarray:
    """PIL image or array (H, W, 3) -> float32 (H, W, 3) in 0..255."""
    arr = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 2 * BORDER_PX + 2 or arr.shape[1] < 2 * BORDER_PX + 2:
        raise ValueError(f"image must be RGB (H, W, 3) with H, W >= {2 * BORDER_PX + 2}, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8 (0..255), got {arr.dtype}")
    return arr.astype(np.float32)


def nearest_palette(rgb: np.ndarray) -> np.ndarray:
    """Index into :data:`PALETTE_NAMES` of the nearest palette colour (RGB distance); (..., 3) -> (...)."""
    d = ((rgb[..., None, :] - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def _erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion (outside the image counts as background)."""
    p = np.pad(mask, 1, constant_values=False)
    h, w = mask.shape
    out = np.ones_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out &= p[dy:dy + h, dx:dx + w]
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


@functools.lru_cache(maxsize=8)
def _pixel_centres(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    y.setflags(write=False)
    x.setflags(write=False)
    return y, x


def shape_template(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
    """Boolean (height, width) mask of ``shape`` as synthetic_data draws it: centre (cx, cy), half-size r."""
    y, x = _pixel_centres(height, width)
    ax, ay = np.abs(x - cx), np.abs(y - cy)
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        return (ax <= r) & (ay <= r)
    if shape == "triangle":  # apex up at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)
        return (y >= cy - r) & (y <= cy + r) & (ax <= (y - (cy - r)) / 2)
    if shape == "cross":
        arm = r / 3
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    raise ValueError(f"shape must be one of {sd.SHAPES}, got {shape!r}")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def analyze_image(image) -> ImageAnalysis:
    """Read background, foreground colour, shape, size and edge width from one picture (see module doc)."""
    arr = _to_array(image)
    h, w, _ = arr.shape
    scale = min(h, w) / 64
    labels = nearest_palette(arr)
    border = np.ones((h, w), dtype=bool)
    border[BORDER_PX:h - BORDER_PX, BORDER_PX:w - BORDER_PX] = False
    bg_idx = int(np.bincount(labels[border], minlength=len(PALETTE_NAMES)).argmax())
    bg_pixels = arr[border & (labels == bg_idx)]
    bg_rgb = np.median(bg_pixels, axis=0)

    not_bg = labels != bg_idx
    core = _erode(not_bg)
    voters = core if np.count_nonzero(core) >= MIN_SHAPE_PX * scale * scale else not_bg
    empty = ImageAnalysis(PALETTE_NAMES[bg_idx], None, None, None, {}, 0.0, 0, math.nan,
                          tuple(float(v) for v in bg_rgb), ())
    if np.count_nonzero(voters) < MIN_SHAPE_PX * scale * scale:
        return empty
    fg_idx = int(np.bincount(labels[voters], minlength=len(PALETTE_NAMES)).argmax())
    fg_rgb = np.median(arr[voters & (labels == fg_idx)], axis=0)

    # Position of every pixel on the background -> foreground colour line (0 = background, 1 = foreground).
    axis = fg_rgb - bg_rgb
    t = ((arr - bg_rgb) @ axis) / max(float(axis @ axis), 1e-6)
    mask = _largest_component(t > 0.5)
    mask_px = int(np.count_nonzero(mask))
    if mask_px < MIN_SHAPE_PX * scale * scale:
        return ImageAnalysis(PALETTE_NAMES[bg_idx], PALETTE_NAMES[fg_idx], None, None, {}, 0.0, mask_px, math.nan,
                             tuple(float(v) for v in bg_rgb), tuple(float(v) for v in fg_rgb))
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = float(max(x1 - x0, y1 - y0))
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, side / 2
    ious = {s: max(_iou(mask, shape_template(s, cx + dx * scale, cy + dy * scale, r * k, h, w))
                   for k in FIT_SCALES for dx in FIT_SHIFTS_PX for dy in FIT_SHIFTS_PX) for s in sd.SHAPES}
    shape = max(ious, key=ious.get)

    boundary = mask & ~_erode(mask)
    transition = (t > TRANSITION_LOW) & (t < TRANSITION_HIGH)
    edge_width = np.count_nonzero(transition) / max(np.count_nonzero(boundary), 1)
    return ImageAnalysis(
        background=PALETTE_NAMES[bg_idx], foreground=PALETTE_NAMES[fg_idx], shape=shape,
        size="large" if side > SIZE_SPLIT_PX * scale else "small", shape_iou=ious, bbox_side_px=side,
        mask_px=mask_px, edge_width_px=float(edge_width),
        background_rgb=tuple(float(v) for v in bg_rgb), foreground_rgb=tuple(float(v) for v in fg_rgb),
    )


def score_image(image, caption: str) -> dict:
    """Compare one picture with its caption.

    Returns dict: ``fg_ok``, ``bg_ok``, ``shape_ok``, ``size_ok``, ``all_ok`` (bools), ``shape_iou`` (IoU of the
    captioned shape's template with the mask, 0 without a mask), ``edge_width_px`` (nan without a mask),
    ``fg_error`` / ``bg_error`` (RGB distance of the measured colours from the captioned palette colours; nan
    without a foreground), and the ``analysis`` as a dict.
    """
    want = parse_caption(caption)
    a = analyze_image(image)
    fg_ok = a.foreground == want["color"]
    bg_ok = a.background == want["background"]
    shape_ok = a.shape == want["shape"]
    size_ok = a.size == want["size"]
    fg_err = (float(np.linalg.norm(np.array(a.foreground_rgb) - np.array(sd.COLORS[want["color"]])))
              if a.foreground_rgb else math.nan)
    bg_err = float(np.linalg.norm(np.array(a.background_rgb) - np.array(sd.COLORS[want["background"]])))
    return {
        "caption": caption, "fg_ok": fg_ok, "bg_ok": bg_ok, "shape_ok": shape_ok, "size_ok": size_ok,
        "all_ok": fg_ok and bg_ok and shape_ok, "shape_iou": float(a.shape_iou.get(want["shape"], 0.0)),
        "edge_width_px": a.edge_width_px, "fg_error": fg_err, "bg_error": bg_err, "analysis": asdict(a),
    }


def score_images(images, captions) -> list[dict]:
    """:func:`score_image` over paired sequences; raises ``ValueError`` if their lengths differ."""
    images, captions = list(images), list(captions)
    if len(images) != len(captions):
        raise ValueError(f"images and captions must pair up: {len(images)} images, {len(captions)} captions")
    return [score_image(img, cap) for img, cap in zip(images, captions)]


SUMMARY_KEYS = ("fg_acc", "bg_acc", "shape_acc", "size_acc", "all_acc", "shape_iou", "edge_width_px",
                "fg_error", "bg_error")


def summarize(scores: list[dict]) -> dict:
    """Means over images: accuracies (fraction of images right), mean shape IoU, edge width and colour errors
    (the last three over images where a shape was found), plus ``n`` images.

    ``all_acc`` counts an image right when its foreground colour, background colour and shape all are.
    """
    if not scores:
        raise ValueError("scores must not be empty")

    def mean(key, finite_only=False):
        vals = [float(s[key]) for s in scores]
        if finite_only:
            vals = [v for v in vals if math.isfinite(v)]
        return float(np.mean(vals)) if vals else math.nan

    return {
        "n": len(scores), "fg_acc": mean("fg_ok"), "bg_acc": mean("bg_ok"), "shape_acc": mean("shape_ok"),
        "size_acc": mean("size_ok"), "all_acc": mean("all_ok"), "shape_iou": mean("shape_iou"),
        "edge_width_px": mean("edge_width_px", True), "fg_error": mean("fg_error", True),
        "bg_error": mean("bg_error", True),
    }


def evaluation_prompts() -> list[str]:
    """Fixed evaluation captions: every shape 4 times, every foreground colour twice, every background, both
    sizes; the first two are the trainer demo's validation prompts."""
    specs = [
        ("large", "red", "circle", "white"), ("large", "yellow", "square", "black"),
        ("large", "blue", "triangle", "yellow"), ("large", "green", "cross", "white"),
        ("large", "white", "circle", "blue"), ("large", "purple", "square", "yellow"),
        ("large", "orange", "triangle", "black"), ("large", "black", "cross", "yellow"),
        ("small", "red", "square", "blue"), ("small", "yellow", "circle", "black"),
        ("small", "white", "cross", "black"), ("small", "green", "triangle", "white"),
        ("small", "blue", "circle", "white"), ("small", "orange", "square", "blue"),
        ("small", "purple", "triangle", "white"), ("small", "black", "cross", "white"),
    ]
    return [sd.caption_for({"size": s, "color": c, "shape": h, "background": b}) for s, c, h, b in specs]


def dataset_reference(num_images: int = 64, start: int = 1000, vae=None) -> dict:
    """The metric on the dataset's own renderings (64x64 centre crops of examples ``start..start+n``).

    Returns ``{"raw": summary}`` and, with ``vae`` (an ``AutoencoderKL`` taking 64 px images), also
    ``{"vae": summary}`` of its reconstructions (posterior mean): the best a model generating through that
    VAE can score, in particular the edge-width floor.
    """
    import torch

    crops, captions = [], []
    for i in range(start, start + num_images):
        img, cap = sd.draw_example(i)
        left = (img.width - 64) // 2
        crops.append(np.asarray(img.crop((left, 0, left + 64, 64))))
        captions.append(cap)
    out = {"raw": summarize(score_images(crops, captions))}
    if vae is not None:
        x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            rec = vae(x, sample_posterior=False).sample
        rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        out["vae"] = summarize(score_images(list(rec), captions))
    return out


def generate(pipe, prompts: list[str], num_images: int, seed: int, num_inference_steps: int = 10,
             guidance_scale: float = 5.0, resolution: int = 64) -> tuple[list, list[str]]:
    """Sample ``num_images`` PIL images per prompt with a ``StableDiffusionXLPipeline`` (prompt ``k`` uses a
    generator seeded ``seed + k``, as the trainer's validation does). Returns (images, their captions)."""
    import torch

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    pipe.set_progress_bar_config(disable=True)
    images, captions = [], []
    for k, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(seed + k)
        out = pipe(prompt, num_images_per_prompt=num_images, height=resolution, width=resolution,
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=gen,
                   output_type="pil").images
        images += out
        captions += [prompt] * len(out)
    return images, captions
