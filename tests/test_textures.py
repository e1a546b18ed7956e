"""The built-in texture set (lpl_ext.demo.textures): captions, determinism, geometry, protocol."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from lpl_ext.demo import textures as tx
from lpl_ext.demo.synthetic_data import COLORS


def test_parse_caption_round_trips_over_every_index():
    n = tx.num_distinct_examples()
    captions = []
    for index in range(n):
        spec = tx.texture_spec(index)
        caption = tx.caption_for(spec)
        parsed = tx.parse_caption(caption)
        assert parsed == {k: spec[k] for k in ("pattern", "period_px", "orientation_deg", "colors")}, caption
        captions.append(caption)
    # One cycle of indices holds every caption exactly once; the next cycle repeats them.
    assert len(set(captions)) == n
    assert tx.caption_for(tx.texture_spec(n + 5)) == captions[5]


def test_first_indices_cover_every_slot_and_period():
    first = len(tx.SLOTS) * len(tx.PERIODS)
    specs = [tx.texture_spec(i) for i in range(first)]
    assert {(s["pattern"], s["orientation_deg"]) for s in specs} == set(tx.SLOTS)
    assert {s["period_px"] for s in specs} == set(tx.PERIODS)
    assert len({s["colors"] for s in specs}) == min(first, len(tx.COLOR_PAIRS))
    for s in specs:
        assert all(0 <= p < s["period_px"] for p in s["phase"])
        assert s["colors"][0] != s["colors"][1]


def test_caption_example_and_vocabulary():
    spec = {"pattern": "stripes", "period_px": 6, "orientation_deg": 90, "colors": ("red", "white")}
    assert tx.caption_for(spec) == "red and white vertical stripes, period 6"
    vocab = set(tx.caption_vocabulary())
    for index in range(0, tx.num_distinct_examples(), 7):
        words = re.findall(r"[a-z]+", tx.caption_for(tx.texture_spec(index)))
        assert set(words) <= vocab


@pytest.mark.parametrize("caption", [
    "red and white stripes, period 6",            # stripes need an orientation
    "red and white vertical checkerboard, period 6",
    "red and red vertical stripes, period 6",     # two different colours
    "red and pink vertical stripes, period 6",
    "red and white vertical zigzag, period 6",
    "red and white vertical stripes, period 1",
    "a large red circle on a white background",
    "",
])
def test_parse_caption_rejects_naming_the_caption(caption):
    with pytest.raises(ValueError, match=re.escape(repr(caption))):
        tx.parse_caption(caption)


def test_draw_example_is_deterministic_two_coloured_and_phase_varies():
    img, caption = tx.draw_example(3)
    again, caption2 = tx.draw_example(3)
    assert caption == caption2 and np.array_equal(np.asarray(img), np.asarray(again))
    assert img.size == (tx.DEFAULT_WIDTH, tx.DEFAULT_HEIGHT) and img.mode == "RGB"
    spec = tx.texture_spec(3)
    a, b = (np.asarray(COLORS[c], dtype=float) for c in spec["colors"])
    px = np.asarray(img, dtype=float).reshape(-1, 3)
    # Every pixel is a mix of the two colours (antialiasing): on the segment between them.
    t = (px - b) @ (a - b) / ((a - b) @ (a - b))
    assert np.abs(b + t[:, None] * (a - b) - px).max() <= 1.0
    assert (t > 0.99).mean() > 0.1 and (t < 0.01).mean() > 0.1
    # Same caption at other indices: other offsets of the same texture, not one picture.
    n = tx.num_distinct_examples()
    repeats = [tx.draw_example(k * n + 3) for k in range(1, 6)]
    assert all(cap == caption for _, cap in repeats)
    assert len({np.asarray(im).tobytes() for im, _ in repeats + [(img, caption)]}) >= 4


def _ink_mask(caption: str, phase=(0, 0), size=(24, 24)) -> np.ndarray:
    spec = tx.parse_caption(caption)
    arr = np.asarray(tx.render(caption, *size, phase=phase), dtype=float)
    ink = np.asarray(COLORS[spec["colors"][0]], dtype=float)
    paper = np.asarray(COLORS[spec["colors"][1]], dtype=float)
    return (arr - paper) @ (ink - paper) / ((ink - paper) @ (ink - paper))


def test_render_geometry():
    vertical = _ink_mask("red and white vertical stripes, period 6")
    assert np.allclose(vertical, vertical[:1])  # constant down each column
    assert np.allclose(vertical[0, :12], [1, 1, 1, 0, 0, 0] * 2)
    shifted = _ink_mask("red and white vertical stripes, period 6", phase=(2, 0))
    assert np.allclose(shifted[0, 2:14], vertical[0, :12])
    horizontal = _ink_mask("red and white horizontal stripes, period 4")
    assert np.allclose(horizontal, horizontal[:, :1]) and np.allclose(horizontal[:8, 0], [1, 1, 0, 0] * 2)
    # 45 degrees (y up): the lines rise to the right, constant along (x + 1, y - 1) in image coordinates.
    diag = _ink_mask("red and white diagonal stripes, period 8")
    assert np.allclose(diag[1:, :-1], diag[:-1, 1:], atol=1e-2)
    assert not np.allclose(diag[:-1, :-1], diag[1:, 1:], atol=0.1)
    anti = _ink_mask("red and white antidiagonal stripes, period 8")
    assert np.allclose(anti[:-1, :-1], anti[1:, 1:], atol=1e-2)
    checker = _ink_mask("black and white checkerboard, period 4")
    assert np.allclose(checker[:4, :4], [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    grid = _ink_mask("black and white grid, period 12")
    assert grid[0].min() > 0.99 and grid[:, 0].min() > 0.99 and grid[6, 6] < 0.01
    dots = _ink_mask("black and white dots, period 12")
    assert dots[6, 6] > 0.99 and dots[0, 0] < 0.01 and 0.2 < dots.mean() < 0.35


def test_synthetic_textures_protocol():
    ds = tx.SyntheticTextures(5, width=40, height=32)
    assert len(ds) == 5
    img, caption = ds[4]
    assert img.size == (40, 32) and caption == tx.draw_example(4)[1]
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError, match="num_examples"):
        tx.SyntheticTextures(0)


def test_evaluation_prompts_cover_the_set():
    prompts = tx.evaluation_prompts()
    assert 12 <= len(prompts) <= 16 and len(set(prompts)) == len(prompts)
    specs = [tx.parse_caption(p) for p in prompts]
    assert {(s["pattern"], s["orientation_deg"]) for s in specs} == set(tx.SLOTS)
    assert {s["period_px"] for s in specs} == set(tx.PERIODS)
    assert len({c for s in specs for c in s["colors"]}) == len(COLORS)
    assert all(s["colors"] in tx.COLOR_PAIRS for s in specs)


def test_tiny_tokenizer_has_a_token_per_caption_word(tmp_path):
    from transformers import CLIPTokenizer

    from lpl_ext.demo.tiny_sdxl import write_tokenizer_files

    write_tokenizer_files(tmp_path, tx.caption_vocabulary())
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    for word in tx.caption_vocabulary():  # shared pairs ("p e" of period / stripes) need repaired merges
        assert tok.tokenize(word) == [word + "</w>"], word
    caption = "purple and yellow antidiagonal stripes, period 12"
    pieces = tok.tokenize(caption)
    # Whole words, the comma, and the digits one by one (CLIP splits numbers into digits).
    assert pieces == ["purple</w>", "and</w>", "yellow</w>", "antidiagonal</w>", "stripes</w>", ",</w>",
                      "period</w>", "1</w>", "2</w>"]


# ---- trainer plumbing (train_sdxl_lpl.py --synthetic_data) and the texture pipeline -------------------

def _trainer():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train_sdxl_lpl

    return train_sdxl_lpl


def test_trainer_synthetic_data_textures_flag(capsys, tmp_path):
    tr = _trainer()
    args = tr.parse_args(["--synthetic_data", "textures", "--num_synthetic_examples", "12"])
    assert args.validation_prompts == list(tr.TEXTURE_VALIDATION_PROMPTS)
    assert set(args.validation_prompts) <= set(tx.evaluation_prompts())
    source = tr.ImageCaptionSource(args)
    assert len(source) == 12
    image, caption = source[7]
    assert caption == tx.draw_example(7)[1]
    assert np.array_equal(np.asarray(image), np.asarray(tx.draw_example(7)[0]))
    # The default stays the shapes.
    shapes = tr.parse_args([])
    assert shapes.synthetic_data == "shapes" and shapes.validation_prompts == list(tr.DEMO_VALIDATION_PROMPTS)
    assert tr.ImageCaptionSource(shapes)[0][1] == "a large red circle on a white background"
    (tmp_path / "metadata.jsonl").write_text("")
    for argv, needle in ((["--train_data_dir", str(tmp_path)], "cannot be combined with --dataset_name or"),
                         (["--random_flip"], "--random_flip with --synthetic_data textures")):
        with pytest.raises(SystemExit) as exc:
            tr.parse_args(["--synthetic_data", "textures"] + argv)
        assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_texture_pipeline_has_its_own_cache_and_vocabulary(tmp_path):
    import warnings

    from lpl_ext.demo import tiny_sdxl as ts

    shapes_path = ts.tiny_sdxl_path(tmp_path)
    textures_path = ts.tiny_sdxl_path(tmp_path, dataset="textures")
    assert shapes_path.name == f"tiny-sdxl-v{ts.TINY_SDXL_VERSION}-seed0"  # unchanged
    assert textures_path.parent == tmp_path and textures_path != shapes_path
    with pytest.raises(ValueError, match="dataset"):
        ts.tiny_sdxl_path(tmp_path, dataset="faces")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the texture VAE may not be shipped yet
        comps = ts.build_tiny_sdxl_components(seed=0, dataset="textures")
    tok = comps["tokenizer"]
    caption = tx.evaluation_prompts()[2]
    words = caption.split(",")[0].split()
    assert tok.tokenize(caption)[:len(words)] == [w + "</w>" for w in words]
    assert comps["text_encoder"].config.vocab_size == len(tok)
    unet = comps["unet"]
    assert unet.config.cross_attention_dim == 64 and unet.config.addition_embed_type == "text_time"


def test_pretrain_tiny_vae_carries_the_stage_history(tmp_path):
    """A stage fine-tuned with --init keeps the earlier stages' commands and results in its
    record: the --init file's own run becomes the last of them, its note is kept."""
    import importlib.util

    tool = Path(__file__).resolve().parents[1] / "tools" / "pretrain_tiny_vae.py"
    spec = importlib.util.spec_from_file_location("pretrain_tiny_vae_under_test", tool)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    init = tmp_path / "stage2.safetensors"
    assert mod.carried_history(str(init)) == {}  # no record next to it: nothing to carry
    assert mod.carried_history(None) == {}
    first = {"command": "stage 1", "train_s": 1.0}
    init.with_suffix(".json").write_text(json.dumps({
        "note": "why", "stages": [first], "command": "stage 2", "train_s": 2.5, "wall_s": 3.0, "s_per_step": 0.1,
        "textures": {"overall": {"psnr_db": 15.0}, "per_period": {"6": {}}, "shapes_psnr_db": 20.0}}))
    carried = mod.carried_history(str(init))
    assert carried["note"] == "why"
    assert carried["stages"][0] == first
    assert carried["stages"][1] == {"command": "stage 2", "train_s": 2.5, "wall_s": 3.0, "s_per_step": 0.1,
                                    "textures_overall": {"psnr_db": 15.0}, "textures_per_period": {"6": {}},
                                    "shapes_psnr_db": 20.0}
