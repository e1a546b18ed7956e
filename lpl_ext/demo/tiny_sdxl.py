"""Offline tiny SDXL-architecture pipeline for demos and tests.

Builds, from configs and the small weights shipped in ``lpl_ext/demo/assets`` (nothing is downloaded), a pipeline
with every component the SDXL trainer uses:

- ``unet``: ``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` (SDXL micro-conditioning),
- ``vae``: ``AutoencoderKL`` with 4 down / 4 up blocks (downsampling factor 8, like SDXL's VAE, so the
  LPL features mid + up0..up3 exist), loaded with the pretrained weights shipped in
  ``lpl_ext/demo/assets/tiny_vae.safetensors`` (trained on the synthetic shapes by
  ``tools/pretrain_tiny_vae.py``) so decoded images and LPL decoder features are meaningful,
- ``text_encoder`` (``CLIPTextModel``) and ``text_encoder_2`` (``CLIPTextModelWithProjection``),
- the UNet and both text encoders are loaded from ``lpl_ext/demo/assets/tiny_sdxl_base.safetensors``: a base
  trained on the synthetic shapes by ``tools/pretrain_tiny_unet.py`` (with these text encoders frozen at
  their random initialisation), so the pipeline already draws captions such as "a large red circle on a
  white background"; the training record (command, seed, wall time, evaluation) is
  ``tiny_sdxl_base.json`` next to it,
- ``tokenizer`` / ``tokenizer_2``: ``CLIPTokenizer`` loaded from a byte-level ``vocab.json`` /
  ``merges.txt`` written locally,
- ``scheduler``: ``EulerDiscreteScheduler`` with SDXL's scaled-linear betas.

The texture variant (``dataset="textures"``: :mod:`lpl_ext.demo.textures`) has the same architecture with
its own tokenizer vocabulary (the texture captions' words), VAE (``tiny_vae_textures.safetensors``, trained
on shapes plus textures) and base (``tiny_sdxl_textures_base.safetensors``, trained on the textures), cached
in its own folder.

The pipeline is seeded, saved once with ``save_pretrained`` into a cache folder (atomically: built in a
temporary folder, then renamed), and loaded back with ``from_pretrained(local_path)`` by the trainer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# Bump when the architecture below or the shipped VAE weights change so that stale caches are rebuilt,
# not silently reused (v2: pretrained VAE from lpl_ext/assets; v3: VAE retrained; v4: pretrained base UNet
# and text encoders from lpl_ext/assets).
TINY_SDXL_VERSION = 4
CACHE_ENV_VAR = "LPL_EXT_CACHE_DIR"
_COMPLETE_MARKER = "tiny_sdxl_complete.json"

# Sizes shared by the components (the UNet's cross-attention width is the two encoders' widths added).
TEXT_HIDDEN_1 = 32
TEXT_HIDDEN_2 = 32
TEXT_PROJECTION_2 = 32
ADDITION_TIME_EMBED_DIM = 8
MAX_TOKEN_LENGTH = 77

# Pretrained tiny VAE shipped in the package (regenerate with tools/pretrain_tiny_vae.py, then bump
# TINY_SDXL_VERSION). Its safetensors metadata holds the latent ``scaling_factor``.
TINY_VAE_ASSET_NAME = "tiny_vae.safetensors"
# Pretrained base (UNet + the two text encoders it was trained with; keys prefixed "unet.", "text_encoder.",
# "text_encoder_2."), shipped in the package; regenerate with tools/pretrain_tiny_unet.py, then bump
# TINY_SDXL_VERSION.
TINY_BASE_ASSET_NAME = "tiny_sdxl_base.safetensors"
_BASE_PREFIXES = ("unet", "text_encoder", "text_encoder_2")
# The texture variant's assets (tools/pretrain_tiny_vae.py --data shapes+textures, tools/pretrain_tiny_unet.py
# --data textures). Its cache folder name holds a hash of these files, so no version to bump.
TINY_VAE_TEXTURES_ASSET_NAME = "tiny_vae_textures.safetensors"
TINY_TEXTURES_BASE_ASSET_NAME = "tiny_sdxl_textures_base.safetensors"
DATASETS = ("shapes", "textures")
# Scaling factor of the randomly initialised VAE (SDXL's value; only used when no weights are shipped).
_RANDOM_VAE_SCALING_FACTOR = 0.13025


def default_cache_dir() -> Path:
    """Cache root: ``$LPL_EXT_CACHE_DIR`` if set, else ``~/.cache/lpl_ext``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lpl_ext"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (256 entries)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word: repeatedly merge the adjacent pair of lowest merge rank."""
    word = list(symbols)
    while len(word) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
        rank, _ = min(pairs)
        if rank == len(ranks):
            break
        a, b = next((word[i], word[i + 1]) for r, i in pairs if r == rank)
        merged, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def _repair_merges(words: list[str], merges: list[str], vocab: dict[str, int]) -> None:
    """Append merges (in place) until every word of ``words`` is one token under CLIP's BPE.

    The left-to-right merges of a word can be pre-empted by an earlier-ranked merge of another word that
    shares a pair (``p e`` of "period" splits "stripes" into ``stri pe s</w>``); then join the pieces BPE
    does produce, left to right. Vocabularies that need no repair (the shapes') are left unchanged."""
    for _ in range(10):
        ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
        broken = False
        for word in words:
            pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            current = pieces[0]
            for nxt in pieces[1:]:
                broken = True
                merge = f"{current} {nxt}"
                if merge not in merges:
                    merges.append(merge)
                current = current + nxt
                vocab.setdefault(current, len(vocab))
        if not broken:
            return
    raise RuntimeError(f"could not build whole-word BPE merges for {words}")


def write_tokenizer_files(folder: str | os.PathLike, words: list[str] | None = None) -> tuple[Path, Path]:
    """Write a small byte-level BPE vocabulary usable by ``CLIPTokenizer``.

    The vocabulary holds every byte symbol, alone and as a word end (``</w>``), plus whole-word tokens
    for ``words`` (built by explicit merges), then ``<|startoftext|>`` and ``<|endoftext|>`` last.
    Returns the paths of ``vocab.json`` and ``merges.txt``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    byte_symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for sym in byte_symbols:
        vocab.setdefault(sym, len(vocab))
    for sym in byte_symbols:
        vocab.setdefault(sym + "</w>", len(vocab))
    merges: list[str] = []
    for word in words or []:
        # Merge left to right: "c i r c l e</w>" -> "ci r ..." -> "cir ..." ... -> "circle</w>".
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for nxt in symbols[1:]:
            merge = f"{current} {nxt}"
            if merge not in merges:
                merges.append(merge)
            current = current + nxt
            vocab.setdefault(current, len(vocab))
    _repair_merges(words or [], merges, vocab)
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    vocab_path = folder / "vocab.json"
    merges_path = folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + ("\n" if merges else ""), encoding="utf-8")
    return vocab_path, merges_path


def _check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    return dataset


def _caption_words(dataset: str = "shapes") -> list[str]:
    if _check_dataset(dataset) == "textures":
        from lpl_ext.demo.textures import caption_vocabulary
    else:
        from lpl_ext.demo.synthetic_data import caption_vocabulary

    return caption_vocabulary()


def tiny_vae_weights_path(dataset: str = "shapes") -> Path:
    """Path of the shipped pretrained tiny VAE weights of ``dataset`` (may not exist in a stripped install)."""
    name = TINY_VAE_TEXTURES_ASSET_NAME if _check_dataset(dataset) == "textures" else TINY_VAE_ASSET_NAME
    return Path(__file__).resolve().parent / "assets" / name


def tiny_base_weights_path(dataset: str = "shapes") -> Path:
    """Path of the shipped pretrained base (UNet + text encoders) of ``dataset`` (may not exist)."""
    name = TINY_TEXTURES_BASE_ASSET_NAME if _check_dataset(dataset) == "textures" else TINY_BASE_ASSET_NAME
    return Path(__file__).resolve().parent / "assets" / name


def load_base_weights(components: dict, path: str | os.PathLike) -> None:
    """Load a base file written by ``tools/pretrain_tiny_unet.py`` into ``components`` (in place, strict).

    The file holds the state dicts of ``unet``, ``text_encoder`` and ``text_encoder_2`` under those prefixes.
    Raises ``ValueError`` naming the file when a component's keys or shapes do not match.
    """
    from safetensors.torch import load_file

    state = load_file(str(path))
    for prefix in _BASE_PREFIXES:
        part = {k[len(prefix) + 1:]: v.float() for k, v in state.items() if k.split(".", 1)[0] == prefix}
        module = components[prefix]
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"base weights {path}: {prefix} does not match the tiny architecture: {exc}") from exc


def build_tiny_vae(seed: int = 1, pretrained: bool = True, dataset: str = "shapes",
                   weights: str | os.PathLike | None = None):
    """The tiny SDXL-shaped ``AutoencoderKL`` (4 down / 4 up blocks, factor 8, 4 latent channels, 64 px).

    With ``pretrained`` and the shipped weights present (``weights``, default
    :func:`tiny_vae_weights_path` of ``dataset``), loads them and their ``scaling_factor`` (1 / std of the
    training latents); otherwise it is randomly initialised from ``seed`` with SDXL's scaling factor.
    The texture VAE falls back to the shapes VAE (with a warning) while its file is not shipped.
    """
    import torch
    from diffusers import AutoencoderKL

    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise ValueError(f"weights: no such file {weights}")
    else:
        weights = tiny_vae_weights_path(dataset)
        if pretrained and dataset == "textures" and not weights.is_file():
            import warnings

            warnings.warn(f"{weights} not found: the texture pipeline uses the shapes VAE", stacklevel=2)
            weights = tiny_vae_weights_path("shapes")
    use_weights = pretrained and weights.is_file()
    scaling_factor = _RANDOM_VAE_SCALING_FACTOR
    if use_weights:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(weights), framework="pt") as f:
            scaling_factor = float((f.metadata() or {})["scaling_factor"])
        state = load_file(str(weights))
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )
    if use_weights:
        vae.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return vae


def build_tiny_sdxl_components(seed: int = 0, tokenizer_folder: str | os.PathLike | None = None,
                               pretrained_vae: bool = True, pretrained_base: bool = True,
                               base_weights: str | os.PathLike | None = None, dataset: str = "shapes",
                               vae_weights: str | os.PathLike | None = None) -> dict:
    """Build the tiny SDXL components (randomly initialised with ``seed``, then loaded where weights exist).

    ``dataset`` ("shapes" or "textures") picks the tokenizer vocabulary and the default shipped weights
    (``vae_weights`` / ``base_weights`` override them); the rest below is for "shapes", "textures" alike.

    - VAE: the shipped pretrained weights (same for every ``seed``) when ``pretrained_vae`` is true and
      ``lpl_ext/demo/assets/tiny_vae.safetensors`` exists; see :func:`build_tiny_vae`.
    - UNet and both text encoders: the pretrained base ``base_weights`` (default: the shipped
      :func:`tiny_base_weights_path`, if present) when ``pretrained_base`` is true, the same for every
      ``seed``; otherwise (or without the file) random from ``seed``.

    Returns a dict with keys unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
    ready for ``StableDiffusionXLPipeline(**components)``.
    """
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    own_tmp = None
    if tokenizer_folder is None:
        own_tmp = tempfile.mkdtemp(prefix="lpl_tiny_tok_")
        tokenizer_folder = own_tmp
    try:
        write_tokenizer_files(tokenizer_folder, _caption_words(dataset))
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_folder), model_max_length=MAX_TOKEN_LENGTH)
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(tokenizer_folder), model_max_length=MAX_TOKEN_LENGTH)
    finally:
        if own_tmp is not None:
            shutil.rmtree(own_tmp, ignore_errors=True)

    vocab_size = len(tokenizer)
    special = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=TEXT_HIDDEN_1 + TEXT_HIDDEN_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        # 6 micro-conditioning ids (original size, crop top-left, target size) + pooled text embedding.
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + TEXT_PROJECTION_2,
        norm_num_groups=16,
    )
    vae = build_tiny_vae(seed=seed + 1, pretrained=pretrained_vae, dataset=dataset, weights=vae_weights)
    text_cfg = dict(
        vocab_size=vocab_size,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=MAX_TOKEN_LENGTH,
        hidden_act="gelu",
        **special,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=TEXT_HIDDEN_1, projection_dim=TEXT_HIDDEN_1, **text_cfg))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=TEXT_HIDDEN_2, projection_dim=TEXT_PROJECTION_2, **text_cfg)
    )
    components = dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    if pretrained_base:
        path = Path(base_weights) if base_weights is not None else tiny_base_weights_path(dataset)
        if base_weights is not None and not path.is_file():
            raise ValueError(f"base_weights: no such file {path}")
        if path.is_file():
            load_base_weights(components, path)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type="epsilon",
    )
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
    )


def _texture_assets_hash() -> str:
    """Short hash of the texture variant's shipped files (absent ones count as absent)."""
    import hashlib

    digest = hashlib.sha256(f"v{TINY_SDXL_VERSION}".encode())
    for path in (tiny_vae_weights_path("textures"), tiny_base_weights_path("textures")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    return digest.hexdigest()[:10]


def tiny_sdxl_path(cache_dir: str | os.PathLike | None = None, seed: int = 0, dataset: str = "shapes") -> Path:
    """Folder the tiny pipeline is (or will be) saved in (for textures: named after its assets' hash,
    so a re-shipped asset is never served from a stale cache)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _check_dataset(dataset) == "textures":
        return root / f"tiny-sdxl-textures-{_texture_assets_hash()}-seed{seed}"
    return root / f"tiny-sdxl-v{TINY_SDXL_VERSION}-seed{seed}"


def is_complete(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a fully written tiny pipeline."""
    return (Path(path) / _COMPLETE_MARKER).is_file()


def ensure_tiny_sdxl(cache_dir: str | os.PathLike | None = None, seed: int = 0, dataset: str = "shapes") -> Path:
    """Return the folder of the cached tiny pipeline of ``dataset`` ("shapes" or "textures"), building and
    saving it first if needed.

    Safe against concurrent callers and interrupted builds: the pipeline is written into a temporary
    sibling folder and renamed into place only once complete; a loser of the race discards its copy.
    """
    target = tiny_sdxl_path(cache_dir, seed, dataset)
    if is_complete(target):
        return target
    from diffusers import StableDiffusionXLPipeline

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        components = build_tiny_sdxl_components(seed=seed, tokenizer_folder=tmp / "_tokenizer_src", dataset=dataset)
        shutil.rmtree(tmp / "_tokenizer_src", ignore_errors=True)
        pipe = StableDiffusionXLPipeline(**components)
        pipe.save_pretrained(str(tmp))
        (tmp / _COMPLETE_MARKER).write_text(
            json.dumps({"version": TINY_SDXL_VERSION, "seed": seed} if dataset == "shapes" else
                       {"version": TINY_SDXL_VERSION, "seed": seed, "dataset": dataset}), encoding="utf-8"
        )
        if target.exists() and not is_complete(target):
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (target is a non-empty directory): keep theirs.
            if not is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
