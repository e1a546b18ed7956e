"""lpl_ext.demo.texture_metrics: read back from real renderings, and catch blur, wrong periods and colours."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageFilter

from lpl_ext.demo import texture_metrics as tm
from lpl_ext.demo import textures as tx

SIZE = 64


def _renderings(captions, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for caption in captions:
        period = tx.parse_caption(caption)["period_px"]
        out.append(tx.render(caption, SIZE, SIZE, phase=tuple(int(p) for p in rng.integers(0, period, 2))))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_real_renderings_recover_every_evaluation_caption(seed):
    captions = tx.evaluation_prompts()
    for image, caption in zip(_renderings(captions, seed), captions):
        s = tm.score_image(image, caption)
        assert s["period_ok"] and s["period_rel_error"] < 0.02, (caption, s)
        assert s["orientation_ok"] and s["orientation_error_deg"] < 1.0, (caption, s)
        assert s["colors_ok"], (caption, s)
        # Dots of period 4-6 have no pure ink pixel at most offsets, so the ink read back is a little mixed.
        assert s["color_error"] < (50.0 if "dots" in caption else 6.0), (caption, s)
        assert s["edge_width_px"] <= 1.0, (caption, s)


def test_training_examples_are_recovered():
    for index in range(0, tx.num_distinct_examples(), 37):
        image, caption = tx.draw_example(index)
        s = tm.score_image(image.crop((8, 0, 8 + SIZE, SIZE)), caption)
        assert s["period_ok"] and s["orientation_ok"] and s["colors_ok"], (caption, s)


def test_blur_raises_high_band_error_and_edge_width():
    captions = tx.evaluation_prompts()
    sharp = _renderings(captions)
    blurred = [im.filter(ImageFilter.GaussianBlur(1.0)) for im in sharp]
    ev_sharp = tm.evaluate(sharp, captions, seed=5)
    ev_blur = tm.evaluate(blurred, captions, seed=5)
    # Same texture at other phases has (nearly) the same spectrum: little error in the bands that carry it.
    assert ev_sharp["band_error_mid"] < 0.05 and ev_sharp["band_error_high"] < 0.05
    assert ev_blur["band_error_high"] > ev_sharp["band_error_high"] + 0.5
    assert ev_blur["band_log_ratio_high"] < -0.5  # blur removes power, it does not add any
    assert ev_blur["edge_width_px"] > ev_sharp["edge_width_px"] + 0.5
    per_image = [tm.score_image(b, c)["edge_width_px"] > tm.score_image(s, c)["edge_width_px"]
                 for s, b, c in zip(sharp, blurred, captions)]
    assert all(per_image)


@pytest.mark.parametrize("caption", tx.evaluation_prompts())
def test_wrong_period_is_caught(caption):
    period = tx.parse_caption(caption)["period_px"]
    for wrong in (p for p in tx.PERIODS if p != period):
        image = tx.render(caption.replace(f"period {period}", f"period {wrong}"), SIZE, SIZE)
        s = tm.score_image(image, caption)
        assert not s["period_ok"], (caption, wrong, s)
        assert s["period_rel_error"] == pytest.approx(abs(wrong - period) / period, abs=0.03)


def test_wrong_orientation_and_colours_are_caught():
    caption = "red and white vertical stripes, period 8"
    s = tm.score_image(tx.render("red and white horizontal stripes, period 8", SIZE, SIZE), caption)
    assert s["period_ok"] and not s["orientation_ok"] and s["orientation_error_deg"] == pytest.approx(90, abs=1)
    s = tm.score_image(tx.render("red and white diagonal stripes, period 8", SIZE, SIZE),
                       "red and white antidiagonal stripes, period 8")
    assert not s["orientation_ok"] and s["orientation_error_deg"] == pytest.approx(90, abs=1)
    s = tm.score_image(tx.render("blue and white vertical stripes, period 8", SIZE, SIZE), caption)
    assert s["orientation_ok"] and not s["colors_ok"] and s["color_error"] > 100
    # The colours are compared order-free: swapping ink and paper is a phase shift, not an error (the
    # dominant colours come out dark first, so the caption names the bright one first here).
    s = tm.score_image(tx.render(caption, SIZE, SIZE), "white and red vertical stripes, period 8")
    assert s["colors_ok"] and s["color_error"] < 1
    flat = Image.new("RGB", (SIZE, SIZE), (220, 40, 40))
    assert not tm.score_image(flat, caption)["colors_ok"]
    # A flat mix of the two colours is all transition: wide edges, but per true boundary pixel, not / 0.
    grey = Image.new("RGB", (SIZE, SIZE), (232, 142, 142))
    width = tm.score_image(grey, caption)["edge_width_px"]
    assert 2.0 < width <= SIZE * SIZE / tm.boundary_length(1 - tx.ink_coverage(tx.parse_caption(caption), SIZE, SIZE))


def test_fft_peak_of_a_sinusoid():
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    for period, lines_deg in ((5.0, 30.0), (9.5, 100.0), (4.0, 0.0)):
        theta = math.radians(lines_deg)
        # Lines at `lines_deg` (y up): the wave runs along the normal (sin, cos) in image coordinates.
        u = x * math.sin(theta) + y * math.cos(theta)
        img = 127.5 + 100 * np.cos(2 * math.pi * u / period)
        peak = tm.fft_peak(np.repeat(img[..., None], 3, axis=2))
        assert peak["period_px"] == pytest.approx(period, rel=0.03)
        assert tm.angle_difference(peak["orientation_deg"], lines_deg) < 2.0


def test_radial_power_spectrum_normalisation_and_peak():
    rng = np.random.default_rng(0)
    sigma = 0.1
    noise = np.clip(0.5 + sigma * rng.standard_normal((SIZE, SIZE, 3)), 0, 1) * 255
    spec = tm.radial_power_spectrum(noise)
    assert spec.shape == (SIZE // 2 + 1,) and spec.dtype == np.float64
    # White noise: ~sigma^2 in every bin (the window is normalised out).
    assert np.median(spec[2:]) == pytest.approx(sigma ** 2, rel=0.15)
    stripes = tm.radial_power_spectrum(tx.render("black and white vertical stripes, period 8", SIZE, SIZE))
    assert int(np.argmax(stripes)) == SIZE // 8
    non_square = tm.radial_power_spectrum(tx.render("black and white vertical stripes, period 8", 80, SIZE))
    assert non_square.shape == (SIZE // 2 + 1,) and int(np.argmax(non_square)) == SIZE // 8
    bins = tm.band_bins(SIZE)
    assert bins["low"].tolist() == [1, 2, 3] and bins["mid"][0] == 4 and bins["high"][-1] == SIZE // 2
    assert sum(len(b) for b in bins.values()) == SIZE // 2


def test_band_errors_and_summary(monkeypatch):
    captions = tx.evaluation_prompts()[:4]
    images = _renderings(captions)
    errors = tm.band_spectrum_errors(images, images)
    assert set(errors) == set(tm.BANDS) and all(v == 0.0 for v in errors.values())
    brighter = [Image.fromarray(np.clip(np.asarray(im, dtype=float) * 0.5, 0, 255).astype(np.uint8)) for im in images]
    # Half the amplitude: a quarter of the power in every band (log10 4 = 0.6), without the floor.
    monkeypatch.setattr(tm, "POWER_FLOOR", 1e-12)
    ratios = tm.band_log_power_ratios(brighter, images)
    assert ratios["mid"] == pytest.approx(-math.log10(4), abs=0.05)
    assert ratios["high"] == pytest.approx(-math.log10(4), abs=0.1)
    monkeypatch.undo()
    summary = tm.summarize(tm.score_images(images, captions))
    assert summary["n"] == 4 and summary["all_ok"] == 100.0 and summary["period_ok"] == 100.0
    wrong = tm.score_images([images[1]] + images[1:], captions)  # image 1 under caption 0
    assert tm.summarize(wrong)["all_ok"] == 75.0
    ev = tm.evaluate(images, captions, references_per_caption=2, seed=1)
    assert {f"band_error_{b}" for b in tm.BANDS} <= set(ev) and ev["n"] == 4
    for bad in ((images, captions[:3]), ([], [])):
        with pytest.raises(ValueError):
            tm.score_images(*bad) if bad[0] else tm.summarize([])
    with pytest.raises(ValueError, match="same length"):
        tm.band_spectrum_errors(images, images[:2])
    with pytest.raises(ValueError, match="not a texture caption"):
        tm.score_image(images[0], "a large red circle on a white background")
