"""Tests of the offline tiny SDXL pipeline builder and the built-in synthetic image-caption set."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from lpl_ext.demo import synthetic_data as sd
from lpl_ext.demo import tiny_sdxl as ts

# Reconstruction PSNR of the shipped VAE on the 24 synthetic images of
# test_shipped_vae_reconstructs_synthetic_images, measured (CPU, torch 2.13): mean 28.4 dB, worst 23.7 dB;
# a random-init VAE: mean 8.1 dB, best 11.0 dB. Thresholds leave ~2 dB of margin for other platforms.
PSNR_MEAN_MIN_DB = 26.0
PSNR_MIN_DB = 21.5
RANDOM_PSNR_MEAN_MAX_DB = 11.0


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """Shared cache root (the trainer tests use the same one, so the pipeline is built once per session)."""
    return tmp_path_factory.getbasetemp() / "lpl_tiny_cache"


@pytest.fixture(scope="session")
def tiny_path(tiny_cache):
    return ts.ensure_tiny_sdxl(tiny_cache)


def test_tokenizer_files_give_whole_word_tokens(tmp_path):
    from transformers import CLIPTokenizer

    words = sd.caption_vocabulary()
    ts.write_tokenizer_files(tmp_path, words)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert len(tok) == len(vocab)
    caption = sd.caption_for(sd.example_spec(5))
    ids = tok(caption).input_ids
    # bos + one token per word + eos: every caption word is a single merged token.
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == len(caption.split()) + 2
    assert tok.decode(ids, skip_special_tokens=True).strip() == caption
    # Words outside the vocabulary still tokenize (byte fallback), never to unknown tokens.
    odd = tok("zebra!").input_ids
    assert tok.unk_token_id not in odd[1:-1]
    assert tok.decode(odd, skip_special_tokens=True).replace(" ", "") == "zebra!"


def test_components_have_sdxl_architecture():
    comps = ts.build_tiny_sdxl_components(seed=0)
    unet, vae = comps["unet"], comps["vae"]
    assert unet.config.addition_embed_type == "text_time"
    assert len(vae.decoder.up_blocks) == 4 and vae.post_quant_conv is not None
    te1, te2 = comps["text_encoder"], comps["text_encoder_2"]
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    assert te1.config.vocab_size == len(comps["tokenizer"]) == len(comps["tokenizer_2"])

    ids = comps["tokenizer"](["a red circle", "a blue square"], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids, output_hidden_states=True)
        embeds = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
        time_ids = torch.tensor([[64.0, 80.0, 0.0, 8.0, 64.0, 64.0]] * 2)
        z = torch.randn(2, 4, 8, 8)
        pred = unet(z, torch.tensor([10, 500]), encoder_hidden_states=embeds,
                    added_cond_kwargs={"text_embeds": out2.text_embeds, "time_ids": time_ids}).sample
        assert pred.shape == z.shape and torch.isfinite(pred).all()
        img = vae.decode(z).sample
        assert img.shape == (2, 3, 64, 64)
        # The EOS-pooled embedding must depend on the caption (pooling at the right token).
        assert not torch.allclose(out2.text_embeds[0], out2.text_embeds[1])


def test_components_are_seeded():
    a = ts.build_tiny_sdxl_components(seed=3)
    c = ts.build_tiny_sdxl_components(seed=4)
    # The shipped pretrained base (UNet, text encoders) and VAE are the same for every seed.
    for key in ("unet", "text_encoder", "text_encoder_2", "vae"):
        sa, sc = a[key].state_dict(), c[key].state_dict()
        assert all(torch.equal(sa[k], sc[k]) for k in sa), key
    # Without shipped weights everything follows the seed.
    ra = ts.build_tiny_sdxl_components(seed=3, pretrained_vae=False, pretrained_base=False)
    rb = ts.build_tiny_sdxl_components(seed=3, pretrained_vae=False, pretrained_base=False)
    rc = ts.build_tiny_sdxl_components(seed=4, pretrained_vae=False, pretrained_base=False)
    for key in ("unet", "text_encoder", "text_encoder_2", "vae"):
        sa, sb, sc = ra[key].state_dict(), rb[key].state_dict(), rc[key].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), key
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), key
    assert any(not torch.equal(ra["unet"].state_dict()[k], a["unet"].state_dict()[k]) for k in ra["unet"].state_dict())


def test_shipped_base_weights_exist_are_small_and_documented():
    path = ts.tiny_base_weights_path()
    assert path.is_file(), "lpl_ext/demo/assets/tiny_sdxl_base.safetensors missing (run tools/pretrain_tiny_unet.py)"
    assert path.stat().st_size <= 6 * 1024 * 1024
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert {k.split(".", 1)[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert json.loads(meta["settings"])["seed"] == 0 and "pretrain_tiny_unet.py" in meta["command"]
    record = json.loads(path.with_suffix(".json").read_text())
    assert "pretrain_tiny_unet.py" in record["command"] and record["wall_s"] > 0 and "seed" in record
    # The training seed's text encoders are the random ones of seed 0: the base was trained against them.
    shipped = ts.build_tiny_sdxl_components(seed=0)
    random_init = ts.build_tiny_sdxl_components(seed=0, pretrained_base=False)
    for key in ("text_encoder", "text_encoder_2"):
        sa, sb = shipped[key].state_dict(), random_init[key].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), key


def test_base_weights_argument(tmp_path):
    explicit = ts.build_tiny_sdxl_components(base_weights=ts.tiny_base_weights_path())["unet"].state_dict()
    default = ts.build_tiny_sdxl_components()["unet"].state_dict()
    assert all(torch.equal(explicit[k], default[k]) for k in default)
    with pytest.raises(ValueError, match="base_weights: no such file"):
        ts.build_tiny_sdxl_components(base_weights=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="does not match the tiny architecture"):
        ts.build_tiny_sdxl_components(base_weights=ts.tiny_vae_weights_path())


def _trainer_view_batch(indices) -> torch.Tensor:
    """Synthetic examples as the demo trainer sees them (80x64 -> centre 64x64 crop), float32 (N, 3, 64, 64) in [-1, 1]."""
    crops = []
    for i in indices:
        img, _ = sd.draw_example(i)
        left = (img.width - 64) // 2
        crops.append(np.asarray(img.crop((left, 0, left + 64, 64)), dtype=np.float32))
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2) / 127.5 - 1.0


def _psnr_db(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of [-1, 1] images (N, 3, H, W) -> (N,)."""
    mse = ((recon.clamp(-1, 1) - target) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def test_shipped_vae_weights_exist_and_are_small():
    path = ts.tiny_vae_weights_path()
    assert path.is_file(), "lpl_ext/demo/assets/tiny_vae.safetensors missing (run tools/pretrain_tiny_vae.py)"
    assert path.stat().st_size <= 2 * 1024 * 1024
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert float(f.metadata()["scaling_factor"]) > 0


def test_shipped_vae_reconstructs_synthetic_images():
    # Indices past the 256 base combinations give unseen shape positions as well as every shape/colour.
    x = _trainer_view_batch(range(1000, 1024))
    pretrained = ts.build_tiny_vae(pretrained=True).eval()
    random_init = ts.build_tiny_vae(pretrained=False).eval()
    with torch.no_grad():
        good = _psnr_db(pretrained(x, sample_posterior=False).sample, x)
        bad = _psnr_db(random_init(x, sample_posterior=False).sample, x)
        # scaling_factor = 1 / latent std of the training data: the UNet sees roughly unit-variance latents.
        z = pretrained.encode(x).latent_dist.mean * pretrained.config.scaling_factor
    assert good.mean() > PSNR_MEAN_MIN_DB and good.min() > PSNR_MIN_DB, good
    assert bad.mean() < RANDOM_PSNR_MEAN_MAX_DB, bad
    assert 0.6 < float(z.std()) < 1.6
    assert pretrained.config.scaling_factor != random_init.config.scaling_factor


def test_cached_pipeline_holds_shipped_vae(tiny_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    vae = AutoencoderKL.from_pretrained(str(tiny_path), subfolder="vae")
    shipped = load_file(str(ts.tiny_vae_weights_path()))
    state = vae.state_dict()
    assert state.keys() == shipped.keys()
    assert all(torch.equal(state[k], shipped[k].float()) for k in state)
    assert vae.config.scaling_factor == ts.build_tiny_vae().config.scaling_factor


def test_cached_pipeline_holds_shipped_base(tiny_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(str(tiny_path), subfolder="unet")
    shipped = {k[len("unet."):]: v for k, v in load_file(str(ts.tiny_base_weights_path())).items()
               if k.startswith("unet.")}
    state = unet.state_dict()
    assert state.keys() == shipped.keys()
    assert all(torch.equal(state[k], shipped[k].float()) for k in state)


def test_ensure_builds_once_and_loads_with_from_pretrained(tiny_path, tiny_cache):
    from diffusers import StableDiffusionXLPipeline

    assert ts.is_complete(tiny_path)
    marker = tiny_path / "tiny_sdxl_complete.json"
    before = marker.stat().st_mtime_ns
    assert ts.ensure_tiny_sdxl(tiny_cache) == tiny_path  # cached: not rebuilt
    assert marker.stat().st_mtime_ns == before
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_path))
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert len(pipe.vae.decoder.up_blocks) == 4
    # No leftovers of the atomic build.
    assert not [p for p in tiny_cache.iterdir() if p.name.startswith(".")]


def test_incomplete_cache_is_rebuilt(tmp_path):
    target = ts.tiny_sdxl_path(tmp_path)
    target.mkdir(parents=True)
    (target / "model_index.json").write_text("{}")  # an interrupted, marker-less build
    path = ts.ensure_tiny_sdxl(tmp_path)
    assert path == target and ts.is_complete(path)
    assert (path / "unet" / "config.json").is_file()


def test_cache_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(ts.CACHE_ENV_VAR, str(tmp_path / "envcache"))
    assert ts.tiny_sdxl_path().parent == tmp_path / "envcache"
    monkeypatch.delenv(ts.CACHE_ENV_VAR)
    assert ts.tiny_sdxl_path().parent == ts.default_cache_dir()


def test_synthetic_examples_are_deterministic_and_captioned():
    data = sd.SyntheticShapes(12)
    assert len(data) == 12
    seen = set()
    for i in range(len(data)):
        img, caption = data[i]
        img2, caption2 = sd.draw_example(i)
        assert caption == caption2 and np.array_equal(np.asarray(img), np.asarray(img2))
        assert img.size == (sd.DEFAULT_WIDTH, sd.DEFAULT_HEIGHT) and img.mode == "RGB"
        spec = sd.example_spec(i)
        assert spec["color"] != spec["background"]
        assert set(caption.split()) <= set(sd.caption_vocabulary())
        # The shape colour is really drawn: the pixel at the shape centre has the caption's colour.
        base = min(img.size)
        cx = round(img.size[0] / 2 + spec["dx"] * base / 64)
        cy = round(img.size[1] / 2 + spec["dy"] * base / 64)
        assert img.getpixel((cx, cy)) == sd.COLORS[spec["color"]]
        seen.add(caption)
    assert len(seen) == 12
    with pytest.raises(IndexError):
        data[12]
    with pytest.raises(ValueError, match="num_examples"):
        sd.SyntheticShapes(0)


def test_write_imagefolder(tmp_path):
    folder = sd.write_imagefolder(tmp_path / "imgs", 3)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [sd.draw_example(i)[1] for i in range(3)]
    assert all(os.path.isfile(folder / r["file_name"]) for r in rows)
