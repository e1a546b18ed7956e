"""Small deterministic built-in image-caption set: coloured shapes on coloured backgrounds.

Every example is drawn with PIL from its index alone (no randomness, no files, no downloads), so two
runs, two processes or two machines see identical data. Captions read like
``"a red circle on a blue background"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "blue", "yellow")

# Native drawing size; the trainer resizes/crops like any other dataset (images are slightly wider
# than tall so that cropping and the SDXL crop-coordinate conditioning are exercised).
DEFAULT_WIDTH = 80
DEFAULT_HEIGHT = 64


def caption_vocabulary() -> list[str]:
    """Every word that appears in a caption (used to give the tiny tokenizer whole-word tokens)."""
    words = {"a", "on", "background", "small", "large"}
    words.update(COLORS)
    words.update(SHAPES)
    return sorted(words)


def num_distinct_examples() -> int:
    """Number of distinct (shape, colour, background, size) combinations."""
    return len(SHAPES) * len(COLORS) * len(BACKGROUNDS) * 2


def example_spec(index: int) -> dict:
    """Deterministic description of example ``index``: shape, colour, background, size, position."""
    shape = SHAPES[index % len(SHAPES)]
    fg_names = [c for c in COLORS]
    fg = fg_names[(index // len(SHAPES)) % len(fg_names)]
    bg_choices = [b for b in BACKGROUNDS if b != fg]
    bg = bg_choices[(index // (len(SHAPES) * len(fg_names))) % len(bg_choices)]
    size = "large" if (index // (len(SHAPES) * len(fg_names) * len(BACKGROUNDS))) % 2 == 0 else "small"
    # Position jitter from a fixed integer hash, so shapes are not always centred.
    h = (index * 2654435761) & 0xFFFFFFFF
    dx = ((h >> 8) % 17) - 8
    dy = ((h >> 16) % 13) - 6
    return {"shape": shape, "color": fg, "background": bg, "size": size, "dx": dx, "dy": dy}


def caption_for(spec: dict) -> str:
    """Caption of an example spec, e.g. ``"a large red circle on a blue background"``."""
    return f"a {spec['size']} {spec['color']} {spec['shape']} on a {spec['background']} background"


def draw_example(index: int, width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT) -> tuple[Image.Image, str]:
    """Draw example ``index``: returns (RGB PIL image of ``width`` x ``height``, caption)."""
    spec = example_spec(index)
    img = Image.new("RGB", (width, height), COLORS[spec["background"]])
    draw = ImageDraw.Draw(img)
    fill = COLORS[spec["color"]]
    base = min(width, height)
    radius = base * (0.34 if spec["size"] == "large" else 0.2)
    cx = width / 2 + spec["dx"] * base / 64
    cy = height / 2 + spec["dy"] * base / 64
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if spec["shape"] == "circle":
        draw.ellipse(box, fill=fill)
    elif spec["shape"] == "square":
        draw.rectangle(box, fill=fill)
    elif spec["shape"] == "triangle":
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=fill)
    else:  # cross
        w = radius / 3
        draw.rectangle([cx - w, cy - radius, cx + w, cy + radius], fill=fill)
        draw.rectangle([cx - radius, cy - w, cx + radius, cy + w], fill=fill)
    return img, caption_for(spec)


class IndexedDrawings:
    """Sequence of ``num_examples`` (PIL image, caption) pairs drawn by ``draw(index, width, height)``
    from the index alone, so index i is always the same picture (the built-in sets' common protocol)."""

    @staticmethod
    def draw(index: int, width: int, height: int) -> tuple[Image.Image, str]:
        raise NotImplementedError

    def __init__(self, num_examples: int = 64, width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT):
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        if width < 1 or height < 1:
            raise ValueError(f"width and height must be >= 1, got {width}x{height}")
        self.num_examples = int(num_examples)
        self.width = int(width)
        self.height = int(height)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        return self.draw(index, self.width, self.height)


class SyntheticShapes(IndexedDrawings):
    """The coloured shapes: :func:`draw_example` of each index."""

    draw = staticmethod(draw_example)


def write_imagefolder(folder: str | os.PathLike, num_examples: int = 16, **size) -> Path:
    """Write the set as an imagefolder (PNG files + ``metadata.jsonl`` with ``file_name`` and ``text``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(num_examples):
        img, caption = draw_example(i, **size)
        name = f"{i:05d}.png"
        img.save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
