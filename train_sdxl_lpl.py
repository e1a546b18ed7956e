#!/usr/bin/env python
"""Fine-tune Stable Diffusion XL with the diffusion loss plus Latent Perceptual Loss (LPL).

Launch with accelerate, on one process or many::

    accelerate launch train_sdxl_lpl.py                       # offline demo: tiny SDXL, built-in data
    accelerate launch train_sdxl_lpl.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --train_data_dir ./my_images --output_dir ./sdxl-lpl   # real weights, imagefolder data

With no ``--pretrained_model_name_or_path`` a tiny SDXL-architecture pipeline is built from configs
(nothing is downloaded) and cached; with no ``--dataset_name`` / ``--train_data_dir`` a small built-in
set of captioned coloured shapes is used. The LPL objective itself is ``lpl_ext.LPLObjective``; this
script owns the UNet, the VAE, the data, the optimiser and the bookkeeping around it.

With ``--rank N`` only LoRA adapters (peft) on the UNet's attention projections are trained (optionally
also on both text encoders, ``--train_text_encoder``); the LPL objective is the same either way.

Outputs in ``--output_dir``: the fine-tuned pipeline (``save_pretrained``; with ``--rank`` the adapters as
``pytorch_lora_weights.safetensors`` instead), ``checkpoint-<step>`` folders (written atomically, with the
diffusers layout: ``unet/``, ``unet_ema/`` or the LoRA weights, plus the accelerate state),
``metrics.csv`` (one row per optimiser step), ``loss_curves.png`` and ``validation/*.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from lpl_ext.config import FIELDS as LPL_FIELDS
from lpl_ext.config import LPLConfig, flag_names
from lpl_ext.objective import PREDICTION_TYPES, LPLObjective, snr_weights

logger = logging.getLogger("train_sdxl_lpl")

# The LPL options' flags, generated from lpl_ext.LPLConfig (one name per option): field -> flag name.
LPL_FLAGS = flag_names()
# Flags of LPLConfig fields that another group defines (--snr_gamma weights the diffusion loss too).
LPL_SHARED_FLAGS = ("snr_gamma",)
# The trainer's own per-step metrics; the LPL ones are LPLObjective.log_keys (metric_names).
TRAINER_METRICS = ("loss", "diffusion_loss")
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_STATE_FILE = "trainer_state.json"
METRICS_CSV = "metrics.csv"
LOSS_PLOT = "loss_curves.png"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# LoRA targets of diffusers' train_text_to_image_lora_sdxl.py: the attention projections of the UNet and,
# with --train_text_encoder, of both CLIP text encoders.
UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TIMESTEP_BIAS_STRATEGIES = ("earlier", "later", "range", "none")
SAVE_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Files never uploaded by --push_to_hub: training state (optimizer, RNG), not the model.
HUB_IGNORE_PATTERNS = [f"{CHECKPOINT_PREFIX}*", f".tmp-{CHECKPOINT_PREFIX}*", f".old-{CHECKPOINT_PREFIX}*",
                       "step_*", "epoch_*"]
# Set to a file path to record, per micro-batch, which dataset examples each process trained on (one JSON
# line each, in "<path>.rank<k>"): a reproducibility check for resumed runs.
SAMPLE_TRACE_ENV_VAR = "LPL_EXT_SAMPLE_TRACE"

# Defaults of the offline demo (no --pretrained_model_name_or_path): sized to finish in a few minutes
# on 2 CPU cores. With real weights the usual SDXL defaults apply instead (see resolve_defaults).
DEMO_DEFAULTS = dict(
    resolution=64,
    max_train_steps=150,
    learning_rate=5e-5,  # fine-tunes the pretrained tiny base without undoing it
    checkpointing_steps=50,
    checkpoints_total_limit=2,
    num_validation_inference_steps=10,
)
REAL_DEFAULTS = dict(
    resolution=1024,
    max_train_steps=None,
    learning_rate=1e-5,
    checkpointing_steps=500,
    checkpoints_total_limit=None,
    num_validation_inference_steps=25,
)
DEMO_VALIDATION_PROMPTS = ("a large red circle on a white background", "a large yellow square on a black background")
# The first two of lpl_ext.demo.textures.evaluation_prompts() (--synthetic_data textures).
TEXTURE_VALIDATION_PROMPTS = ("red and white vertical stripes, period 6", "black and yellow horizontal stripes, period 8")


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


class _NegatableFlag(argparse.Action):
    """``--flag`` sets True, ``--no_flag`` (or ``--no-flag``) sets False."""

    def __init__(self, option_strings, dest, default=None, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings[:2])


def _bool_flag(group, name: str, default, help: str) -> None:
    group.add_argument(f"--{name}", f"--no_{name}", f"--no-{name}", dest=name, action=_NegatableFlag,
                       default=default, help=help)


def build_parser() -> argparse.ArgumentParser:
    """Command-line parser (every flag of the seed document plus the usual diffusers SDXL flags)."""
    p = argparse.ArgumentParser(
        description="Fine-tune SDXL with diffusion loss + Latent Perceptual Loss (LPL).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="SDXL pipeline (hub id or folder). Unset: build/load the offline tiny SDXL pipeline.")
    g.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                   help="Separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix). Unset: the pipeline's VAE.")
    g.add_argument("--revision", type=str, default=None)
    g.add_argument("--variant", type=str, default=None)
    g.add_argument("--cache_dir", type=str, default=None,
                   help="Hub download cache; also where the offline tiny pipeline is cached "
                        "(default $LPL_EXT_CACHE_DIR or ~/.cache/lpl_ext).")
    g.add_argument("--tiny_model_seed", type=int, default=0, help="Seed of the offline tiny pipeline's weights (with the shipped pretrained weights every seed gives the same model).")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", type=str, default=None, help="Hugging Face dataset (needs `datasets`).")
    g.add_argument("--dataset_config_name", type=str, default=None)
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="Imagefolder: images plus metadata.jsonl with 'file_name' and the caption column.")
    g.add_argument("--image_column", type=str, default="image")
    g.add_argument("--caption_column", type=str, default="text")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="Train on N examples drawn by a shuffle seeded with --seed (not the first N).")
    g.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="Probability of replacing a caption with '' (classifier-free guidance dropout), drawn "
                        "anew for every example in every epoch.")
    g.add_argument("--num_synthetic_examples", type=int, default=64,
                   help="Size of the built-in set used when no dataset is given.")
    g.add_argument("--synthetic_data", choices=("shapes", "textures"), default="shapes",
                   help="Built-in set used when no dataset is given: coloured shapes, or fine two-colour textures "
                        "(lpl_ext.demo.textures). With no --pretrained_model_name_or_path it also picks the tiny "
                        "pipeline (tokenizer, VAE, base) trained on it.")
    g.add_argument("--resolution", type=int, default=None, help="Training resolution (demo 64, else 1024).")
    g.add_argument("--center_crop", action="store_true", help="Center crop instead of random crop.")
    g.add_argument("--random_flip", action="store_true", help="Random horizontal flip.")
    g.add_argument("--cache_latents", action="store_true",
                   help="Encode every image once before training; crop coordinates are stored with the latents.")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--local_rank", type=int, default=-1,
                   help="For distributed launchers that pass it; $LOCAL_RANK overrides it (accelerate sets "
                        "the device itself).")

    g = p.add_argument_group("training")
    g.add_argument("--output_dir", type=str, default="sdxl-lpl-output")
    g.add_argument("--logging_dir", type=str, default="logs")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train_batch_size", type=int, default=4, help="Per-process batch size.")
    g.add_argument("--num_train_epochs", type=int, default=1, help="Used when --max_train_steps is unset.")
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimiser steps (demo default 150).")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true", help="UNet gradient checkpointing.")
    g.add_argument("--learning_rate", type=float, default=None, help="Demo 5e-5, else 1e-5.")
    g.add_argument("--scale_lr", action="store_true", help="Multiply lr by processes x batch x accumulation.")
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                            "constant_with_warmup"])
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (5.0 recommended).")
    g.add_argument("--prediction_type", type=str, default=None, choices=PREDICTION_TYPES,
                   help="Unset: the scheduler's. flow_matching: rectified-flow target eps - z0.")
    g.add_argument("--noise_offset", type=float, default=0.0)
    g.add_argument("--timestep_bias_strategy", type=str, default="none", choices=TIMESTEP_BIAS_STRATEGIES,
                   help="Sample some training timesteps more often: 'earlier' / 'later' weight the first / last "
                        "--timestep_bias_portion of the timesteps by --timestep_bias_multiplier, 'range' weights "
                        "[--timestep_bias_begin, --timestep_bias_end).")
    g.add_argument("--timestep_bias_multiplier", type=float, default=1.0,
                   help="Weight of the biased timesteps relative to the others (> 0; 1.0 = no bias).")
    g.add_argument("--timestep_bias_begin", type=int, default=0, help="'range': first biased timestep.")
    g.add_argument("--timestep_bias_end", type=int, default=1000,
                   help="'range': end of the biased timesteps (exclusive, as the slice in diffusers' script).")
    g.add_argument("--timestep_bias_portion", type=float, default=0.25,
                   help="'earlier' / 'later': fraction of the timesteps that is biased, in (0, 1].")
    g.add_argument("--use_ema", action="store_true")
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Overrides the accelerate config.")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--use_8bit_adam", action="store_true",
                   help="bitsandbytes' 8-bit AdamW (needs bitsandbytes and a device it supports).")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention in the UNet (needs xformers and a CUDA GPU).")
    g.add_argument("--enable_npu_flash_attention", action="store_true",
                   help="Ascend NPU flash attention in the UNet (needs torch_npu and an NPU).")
    g.add_argument("--save_precision", type=str, default="fp32", choices=list(SAVE_PRECISIONS),
                   help="dtype of the saved UNet, text encoders and LoRA weights (the VAE is always saved in "
                        "fp32). Default fp32: the trained fp32 weights, bit for bit.")

    g = p.add_argument_group("LoRA (train adapters instead of the whole UNet)")
    g.add_argument("--rank", type=int, default=None,
                   help="Train LoRA adapters of this rank on the UNet's attention projections (to_q, to_k, "
                        "to_v, to_out.0) with the base weights frozen. Unset: full fine-tune.")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (scale alpha/rank). Default: rank.")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="With --rank: also LoRA adapters on both text encoders (q/k/v/out projections).")

    g = p.add_argument_group("checkpoints, validation, logging")
    g.add_argument("--checkpointing_steps", type=int, default=None, help="Demo 50, else 500.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Demo 2, else unlimited.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="A checkpoint folder, or 'latest' (newest complete checkpoint in --output_dir).")
    g.add_argument("--validation_prompt", type=str, default=None,
                   help="Prompt for validation images (demo: two built-in captions).")
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_steps", type=int, default=None,
                   help="Also validate every N steps (always at the end).")
    g.add_argument("--validation_epochs", type=int, default=None,
                   help="Also validate after every epoch whose 0-based index is a multiple of N (diffusers' "
                        "schedule: the 1st, (N+1)th, ... epoch).")
    g.add_argument("--num_validation_inference_steps", type=int, default=None, help="Demo 10, else 25.")
    g.add_argument("--report_to", type=str, default="none",
                   help="accelerate tracker: none, tensorboard, wandb, all (CSV + PNG are always written).")
    g.add_argument("--push_to_hub", action="store_true",
                   help="Upload --output_dir (without checkpoints) to the Hugging Face Hub as the run's last step.")
    g.add_argument("--hub_model_id", type=str, default=None,
                   help="Hub repository for --push_to_hub (default: the name of --output_dir).")
    g.add_argument("--hub_token", type=str, default=None,
                   help="Hub token for --push_to_hub (default: $HF_TOKEN or the `hf auth login` token).")

    g = p.add_argument_group("LPL (seed document; the defaults are its recommended settings)")
    _bool_flag(g, "use_lpl", True, "Add LPL to the diffusion loss.")
    g.add_argument("--lpl_weight", type=float, default=1.0, help="LPL weight (1.0-2.0 recommended).")
    add_lpl_config_flags(g)
    return p


def add_lpl_config_flags(group) -> None:
    """One flag per LPLConfig option that has one (``lpl_ext.config``: help, type, choices and default from the
    field; bools negatable), except those of LPL_SHARED_FLAGS."""
    spelled = {field: f"--{flag}" for field, flag in LPL_FLAGS.items()}
    defaults = LPLConfig()
    for field, flag in LPL_FLAGS.items():
        if flag in LPL_SHARED_FLAGS:
            continue
        meta = LPL_FIELDS[field].metadata
        default = getattr(defaults, field)
        text = LPLConfig.help(field, spelled).replace("%", "%%")  # argparse formats help with %
        if isinstance(default, bool):
            _bool_flag(group, flag, default, text)
        else:
            group.add_argument(f"--{flag}", type=meta["type"] or type(default), default=default,
                               choices=meta["choices"], help=text)


def lpl_config(args: argparse.Namespace) -> LPLConfig:
    """The LPL configuration of the parsed flags (errors name the flags); decoder in fp32 (the config's default)."""
    return LPLConfig.named({field: f"--{flag}" for field, flag in LPL_FLAGS.items()},
                           **{field: getattr(args, flag) for field, flag in LPL_FLAGS.items()})


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on demo mode (no pretrained model) vs real weights."""
    args.offline_demo = args.pretrained_model_name_or_path is None
    args.builtin_data = args.dataset_name is None and args.train_data_dir is None
    table = DEMO_DEFAULTS if args.offline_demo else REAL_DEFAULTS
    for key, value in table.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.validation_prompt is None and args.builtin_data:
        args.validation_prompts = list(DEMO_VALIDATION_PROMPTS if args.synthetic_data == "shapes"
                                       else TEXTURE_VALIDATION_PROMPTS)
    elif args.validation_prompt is not None:
        args.validation_prompts = [args.validation_prompt]
    else:
        args.validation_prompts = []
    if args.lora_alpha is None and args.rank is not None:
        args.lora_alpha = float(args.rank)
    return args


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad combinations with a clear message (``parser.error`` exits 2) before anything is built."""
    try:  # every LPL option (and --snr_gamma), validated once by lpl_ext.LPLConfig
        lpl_config(args)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    if args.prediction_type == "flow_matching":
        import inspect

        from diffusers import DPMSolverMultistepScheduler

        if "use_flow_sigmas" not in inspect.signature(DPMSolverMultistepScheduler.__init__).parameters:
            parser.error("--prediction_type flow_matching needs a newer diffusers (DPMSolverMultistepScheduler "
                         "with use_flow_sigmas, the sampler saved with the pipeline): pip install -U diffusers")
    if args.prediction_type == "flow_matching" and args.snr_gamma is not None:
        parser.error("--snr_gamma (min-SNR weighting) is defined for the DDPM prediction types "
                     "(epsilon, v_prediction, sample), not for --prediction_type flow_matching")
    if args.dataset_name is not None and args.train_data_dir is not None:
        parser.error("give either --dataset_name or --train_data_dir, not both")
    if args.synthetic_data != "shapes" and not args.builtin_data:
        parser.error(f"--synthetic_data {args.synthetic_data} picks the built-in set used without a dataset; "
                     "it cannot be combined with --dataset_name or --train_data_dir")
    if args.synthetic_data == "textures" and args.builtin_data and args.random_flip:
        parser.error("--random_flip with --synthetic_data textures: a mirror turns diagonal stripes into "
                     "antidiagonal ones, so the captions would be wrong")
    if args.train_data_dir is not None:
        folder = Path(args.train_data_dir)
        if not folder.is_dir():
            parser.error(f"--train_data_dir {args.train_data_dir!r} does not exist or is not a folder")
        if not (folder / "metadata.jsonl").is_file():
            parser.error(f"--train_data_dir {args.train_data_dir!r} has no metadata.jsonl (one JSON object "
                         f"per line with 'file_name' and '{args.caption_column}')")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        parser.error(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    for name in ("lpl_weight", "num_validation_images", "noise_offset"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "num_synthetic_examples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "validation_steps",
                 "validation_epochs", "num_validation_inference_steps", "max_train_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.resume_from_checkpoint is not None:
        path = resolve_checkpoint_path(args.output_dir, args.resume_from_checkpoint)
        if path is None and args.resume_from_checkpoint != "latest":
            parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a complete "
                         f"checkpoint (no {CHECKPOINT_STATE_FILE}); use a checkpoint-<step> folder or 'latest'")
        if path is not None:
            seed = json.loads((path / CHECKPOINT_STATE_FILE).read_text(encoding="utf-8")).get("seed", args.seed)
            if seed != args.seed:
                # The seed fixes the sampler's permutations and every random draw of the run: another seed
                # would train this epoch on a different order (some examples twice, some never).
                parser.error(f"--seed {args.seed} differs from the seed {seed} of {path}; resume with --seed {seed}")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        parser.error(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    _validate_timestep_bias(parser, args)
    _validate_lora(parser, args)
    # Environment checks: a flag that cannot work here fails now, before any model is loaded.
    if args.use_8bit_adam:
        reason = check_8bit_adam_usable(_probe_device())
        if reason:
            parser.error(f"--use_8bit_adam cannot be used: {reason}")
    if args.enable_xformers_memory_efficient_attention:
        reason = check_xformers_usable()
        if reason:
            parser.error(f"--enable_xformers_memory_efficient_attention cannot be used: {reason}")
    if args.enable_npu_flash_attention:
        from diffusers.utils.import_utils import is_torch_npu_available

        if not is_torch_npu_available():
            parser.error("--enable_npu_flash_attention cannot be used: it needs the torch_npu extension and an "
                         "Ascend NPU")
    for name in ("hub_model_id", "hub_token"):
        if getattr(args, name) is not None and not args.push_to_hub:
            parser.error(f"--{name} only has an effect with --push_to_hub")
    if args.push_to_hub:
        if args.hub_token is not None and args.report_to in ("wandb", "all"):
            # As diffusers' scripts: the tracker would store the token with the run's config.
            parser.error("--hub_token cannot be combined with --report_to wandb/all (the token would be logged "
                         "with the run config); log in with `hf auth login` or set HF_TOKEN instead")
        reason = check_hub_push(args.hub_token)
        if reason:
            parser.error(f"--push_to_hub cannot be used: {reason}")


def _validate_timestep_bias(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.timestep_bias_strategy == "none":
        return
    m = args.timestep_bias_multiplier
    if not (math.isfinite(m) and m > 0):
        # diffusers' script returns (instead of raising) this error and then crashes later.
        parser.error(f"--timestep_bias_multiplier must be a positive number, got {m} (to disable the bias use "
                     f"--timestep_bias_strategy none)")
    if args.timestep_bias_strategy in ("earlier", "later"):
        if not 0.0 < args.timestep_bias_portion <= 1.0:
            parser.error(f"--timestep_bias_portion must be in (0, 1], got {args.timestep_bias_portion}")
    else:
        begin, end = args.timestep_bias_begin, args.timestep_bias_end
        if begin < 0:
            parser.error(f"--timestep_bias_begin must be >= 0, got {begin}")
        if end <= begin:
            parser.error(f"--timestep_bias_end must be > --timestep_bias_begin ({begin}), got {end}")


def _validate_lora(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.rank is None:
        if args.lora_alpha is not None:
            parser.error("--lora_alpha needs --rank (LoRA training)")
        if args.train_text_encoder:
            parser.error("--train_text_encoder trains LoRA adapters on the text encoders and needs --rank "
                         "(full fine-tuning of the text encoders is not supported)")
        return
    if args.rank < 1:
        parser.error(f"--rank must be >= 1, got {args.rank}")
    if not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        parser.error(f"--lora_alpha must be a positive number, got {args.lora_alpha}")
    if args.use_ema:
        parser.error("--use_ema is not supported with --rank (LoRA): it averages the full UNet's weights")
    try:
        import peft  # noqa: F401
    except ImportError:
        parser.error("--rank (LoRA) needs the peft package: pip install peft")
    import inspect

    from diffusers import StableDiffusionXLPipeline

    if "unet_lora_adapter_metadata" not in inspect.signature(StableDiffusionXLPipeline.save_lora_weights).parameters:
        # Without the adapters' rank and alpha in the file, load_lora_weights would assume alpha = rank.
        parser.error("--rank (LoRA) needs a newer diffusers, whose save_lora_weights stores the adapter "
                     "metadata: pip install -U diffusers")


def _probe_device() -> str:
    """The device this process will train on, as far as it is known before accelerate starts."""
    if torch.cuda.is_available():
        return f"cuda:{max(0, int(os.environ.get('LOCAL_RANK', 0)))}"
    return "cpu"


def check_8bit_adam_usable(device: str) -> str | None:
    """None if bitsandbytes' ``AdamW8bit`` runs one step on ``device``, else the reason it cannot.

    One real step on a 4096-value parameter (the smallest size bitsandbytes keeps in 8 bits), so a
    library that imports but has no kernels for this device is caught here, not after the models load.
    """
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken install that raises at import
        return f"bitsandbytes is not importable ({type(exc).__name__}: {exc}); pip install bitsandbytes"
    try:
        param = torch.nn.Parameter(torch.zeros(4096, device=device))
        opt = bnb.optim.AdamW8bit([param], lr=1e-3)
        param.grad = torch.ones_like(param)
        opt.step()
    except Exception as exc:
        return (f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run AdamW8bit on {device} "
                f"({type(exc).__name__}: {exc})")
    return None


def check_xformers_usable() -> str | None:
    """None if xformers is installed and a CUDA GPU is visible, else the reason."""
    from diffusers.utils.import_utils import is_xformers_available

    if not is_xformers_available():
        return "xformers is not installed (pip install xformers, built for your torch)"
    if not torch.cuda.is_available():
        return "xformers attention runs on CUDA GPUs only and none is visible"
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def check_hub_push(hub_token: str | None) -> str | None:
    """None if an upload can be attempted (huggingface_hub importable, online, a token), else the reason.
    Whether the Hub is reachable is checked when the repository is created, still before any model loads."""
    if _env_flag("HF_HUB_OFFLINE"):
        return "HF_HUB_OFFLINE is set, so the Hub cannot be reached"
    try:
        from huggingface_hub import get_token
    except ImportError:
        return "huggingface_hub is not installed (pip install huggingface_hub)"
    if not (hub_token or get_token()):
        return "no Hub token: pass --hub_token, set HF_TOKEN or run `hf auth login`"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, fill demo/real defaults and validate. Exits with a message on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    args.env_local_rank = env_rank
    if env_rank != -1 and env_rank != args.local_rank:  # as diffusers: the launcher's value wins
        args.local_rank = env_rank
    resolve_defaults(args)
    validate_args(parser, args)
    return args


# ----------------------------------------------------------------------------------------------------
# Checkpoints (atomic)
# ----------------------------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int | None:
    m = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", path.name)
    return int(m.group(1)) if m else None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint is complete when its state file exists (written last, before the atomic rename)."""
    return (Path(path) / CHECKPOINT_STATE_FILE).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete ``checkpoint-<step>`` folders of ``output_dir`` as (step, path), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = _checkpoint_step(child)
        if step is not None and child.is_dir() and is_complete_checkpoint(child):
            found.append((step, child))
    return sorted(found)


def resolve_checkpoint_path(output_dir: str | os.PathLike, spec: str) -> Path | None:
    """'latest' -> newest complete checkpoint; a path or a name under ``output_dir`` -> that one if complete."""
    if spec == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1][1] if ckpts else None
    for candidate in (Path(spec), Path(output_dir) / spec):
        if candidate.is_dir() and is_complete_checkpoint(candidate):
            return candidate
    return None


def save_checkpoint(accelerator, output_dir: str | os.PathLike, global_step: int, total_limit: int | None,
                    extra_state: dict | None = None) -> Path:
    """Save ``accelerator`` state as ``checkpoint-<global_step>`` atomically, then prune to ``total_limit``.

    Every process writes into ``.tmp-checkpoint-<step>``; the main process adds the state file and renames
    the folder into place, so an interrupted save never leaves a ``checkpoint-*`` folder behind (and
    ``latest`` never picks one). Older checkpoints are pruned only after the new one is complete.
    """
    root = Path(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{global_step}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{global_step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".tmp-{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": global_step, "num_processes": accelerator.num_processes, **(extra_state or {})}
        state_path = tmp / CHECKPOINT_STATE_FILE
        with open(state_path, "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():  # re-saving a step (e.g. after resuming): swap the old one out first
            old = root / f".old-{CHECKPOINT_PREFIX}{global_step}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if total_limit is not None:
            ckpts = list_checkpoints(root)
            for _, path in ckpts[: max(0, len(ckpts) - total_limit)]:
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


class ImageCaptionSource:
    """Uniform (PIL image, caption) access over the built-in set, an imagefolder or a HF dataset."""

    def __init__(self, args: argparse.Namespace):
        self.kind = "builtin"
        if args.train_data_dir is not None:
            self.kind = "imagefolder"
            self.records = self._read_imagefolder(Path(args.train_data_dir), args.caption_column)
        elif args.dataset_name is not None:
            self.kind = "hf"
            try:
                from datasets import load_dataset
            except ImportError as exc:
                raise SystemExit("--dataset_name needs the `datasets` package: pip install datasets") from exc

            ds = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)["train"]
            for col in (args.image_column, args.caption_column):
                if col not in ds.column_names:
                    raise SystemExit(f"dataset {args.dataset_name!r} has no column {col!r}; columns: "
                                     f"{', '.join(ds.column_names)} (see --image_column/--caption_column)")
            self.hf = ds
            self.image_column, self.caption_column = args.image_column, args.caption_column
        else:
            if getattr(args, "synthetic_data", "shapes") == "textures":
                from lpl_ext.demo.textures import SyntheticTextures as Synthetic
            else:
                from lpl_ext.demo.synthetic_data import SyntheticShapes as Synthetic

            self.synthetic = Synthetic(args.num_synthetic_examples)
        raw = len(self.records if self.kind == "imagefolder" else self.hf if self.kind == "hf" else self.synthetic)
        if raw == 0:
            raise SystemExit("the training data is empty")
        # Indices into the raw data. --max_train_samples keeps N examples of a permutation seeded with --seed
        # (as diffusers' dataset.shuffle(seed).select(range(N))), not the first N (often one class or folder).
        self.indices = list(range(raw))
        if args.max_train_samples is not None and args.max_train_samples < raw:
            perm = torch.randperm(raw, generator=torch.Generator().manual_seed(args.seed))
            self.indices = perm[: args.max_train_samples].tolist()

    @staticmethod
    def _read_imagefolder(folder: Path, caption_column: str) -> list[tuple[Path, str]]:
        records = []
        with open(folder / "metadata.jsonl", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "file_name" not in row or caption_column not in row:
                    raise SystemExit(f"{folder / 'metadata.jsonl'}:{lineno}: needs 'file_name' and "
                                     f"'{caption_column}' (see --caption_column)")
                path = folder / row["file_name"]
                if not path.is_file():
                    raise SystemExit(f"{folder / 'metadata.jsonl'}:{lineno}: image {path} not found")
                records.append((path, row[caption_column]))
        return records

    def __len__(self) -> int:
        return len(self.indices)

    def raw_index(self, index: int) -> int:
        """Index of example ``index`` in the full data (stable under --max_train_samples)."""
        return self.indices[index]

    def __getitem__(self, index: int, rng: random.Random | None = None):
        """(RGB PIL image, caption); a list of captions gives one drawn with ``rng``."""
        from PIL import Image

        raw = self.indices[index]
        if self.kind == "imagefolder":
            path, caption = self.records[raw]
            image = Image.open(path)
        elif self.kind == "hf":
            row = self.hf[raw]
            image, caption = row[self.image_column], row[self.caption_column]
        else:
            image, caption = self.synthetic[raw]
        if isinstance(caption, (list, tuple)):
            caption = (rng or random).choice(caption)
        return image.convert("RGB"), str(caption)

    get = __getitem__


def example_rng(seed: int, epoch: int | str, index: int, stream: str = "data") -> random.Random:
    """Random stream of one example in one epoch: the same draws whatever the process count, the data loader
    workers, the prefetching or a resume (the global RNGs are advanced differently by each of these).
    ``random.Random`` seeded with a str hashes it with SHA-512, independent of PYTHONHASHSEED."""
    return random.Random(f"{seed}:{epoch}:{index}:{stream}")


def drop_caption(seed: int, epoch: int, index: int, proportion: float) -> bool:
    """Whether example ``index`` trains with an empty caption in ``epoch`` (probability ``proportion``)."""
    return proportion > 0 and example_rng(seed, epoch, index, "caption_dropout").random() < proportion


def preprocess_image(image, resolution: int, center_crop: bool, random_flip: bool,
                     rng: random.Random | None = None):
    """Resize the shorter side to ``resolution``, crop a square, maybe flip.

    Returns (pixels float32 (3, R, R) in [-1, 1], original_size (h, w), crop_top_left (top, left)). The crop
    coordinates are those of the returned pixels in the resized image (after a flip, the left edge is
    measured in the flipped frame), which is what SDXL's micro-conditioning expects.
    """
    import numpy as np
    from PIL import Image

    rng = rng or random.Random()
    original_size = (image.height, image.width)
    scale = resolution / min(image.height, image.width)
    new_w, new_h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    if center_crop:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top, left = rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        left = new_w - left - resolution
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0, original_size, (top, left)


class TrainDataset(torch.utils.data.Dataset):
    """Preprocessed examples: dict(pixel_values, original_size, crop_top_left, caption, index).

    Random crops, flips, the choice among several captions and caption dropout are drawn from
    ``example_rng(seed, epoch, index)``: call ``set_epoch`` before each epoch. ``index`` is the example's
    index in the full data.
    """

    def __init__(self, source, resolution: int, center_crop: bool, random_flip: bool, *, seed: int = 0,
                 proportion_empty_prompts: float = 0.0):
        self.source, self.resolution = source, resolution
        self.center_crop, self.random_flip = center_crop, random_flip
        self.seed, self.proportion_empty_prompts = seed, proportion_empty_prompts
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def _raw_index(self, index: int) -> int:
        return self.source.raw_index(index) if hasattr(self.source, "raw_index") else index

    def example(self, index: int, epoch: int | str) -> dict:
        """Example ``index`` as drawn in ``epoch`` (no caption dropout)."""
        raw = self._raw_index(index)
        rng = example_rng(self.seed, epoch, raw)
        image, caption = self.source.get(index, rng) if hasattr(self.source, "get") else self.source[index]
        pixels, original_size, crop = preprocess_image(image, self.resolution, self.center_crop, self.random_flip,
                                                       rng)
        return {"pixel_values": pixels, "original_size": original_size, "crop_top_left": crop, "caption": caption,
                "index": raw}

    def __getitem__(self, index: int) -> dict:
        item = self.example(index, self.epoch)
        if drop_caption(self.seed, self.epoch, item["index"], self.proportion_empty_prompts):
            item["caption"] = ""
        return item


class CachedLatentDataset(torch.utils.data.Dataset):
    """Latents encoded once, each stored with the crop/size conditioning of the pixels it was encoded from.

    (The reference re-draws crop coordinates every epoch while reusing cached latents, so the UNet is
    told a crop that the latents do not show.) Caption dropout is still drawn per epoch.
    """

    def __init__(self, items: list[dict], *, seed: int = 0, proportion_empty_prompts: float = 0.0):
        self.items = items
        self.seed, self.proportion_empty_prompts = seed, proportion_empty_prompts
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        if drop_caption(self.seed, self.epoch, item["index"], self.proportion_empty_prompts):
            item = {**item, "caption": ""}
        return item


def seeded_generator(*key) -> torch.Generator:
    """CPU generator seeded from ``key`` (SHA-512 of its text, 63 bits)."""
    return torch.Generator().manual_seed(random.Random(":".join(map(str, key))).getrandbits(63))


@torch.no_grad()
def encode_latents(vae, pixel_values: torch.Tensor,
                   generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """(N, 3, R, R) pixels -> (N, 4, R/8, R/8) fp32 diffusion-space latents (VAE in fp32, no autocast).
    The posterior sample is drawn with ``generator`` (one CPU generator, or one per image)."""
    pixel_values = pixel_values.to(device=vae.device, dtype=torch.float32)
    with torch.autocast(device_type=pixel_values.device.type, enabled=False):
        z = vae.encode(pixel_values).latent_dist.sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z - shift) * vae.config.scaling_factor).float()


CACHE_EPOCH = "cache"  # example_rng epoch key of the augmentation that --cache_latents freezes


def build_cached_latents(dataset: TrainDataset, vae, batch_size: int = 8, *, process_index: int = 0,
                         num_processes: int = 1, gather=None) -> CachedLatentDataset:
    """Encode every example once; keep latents, original_size, crop_top_left, caption and index together.

    With several processes each encodes every ``num_processes``-th example and ``gather`` (accelerate's
    ``gather_object``) shares the results, so the dataset is encoded once in total, not once per process.
    Crops and posterior samples are drawn per example, so the cache is the same for any process count.
    """
    mine = list(range(process_index, len(dataset), num_processes))
    items = []
    for start in range(0, len(mine), batch_size):
        batch = [dataset.example(i, CACHE_EPOCH) for i in mine[start:start + batch_size]]
        gens = [seeded_generator(dataset.seed, CACHE_EPOCH, b["index"], "posterior") for b in batch]
        latents = encode_latents(vae, torch.stack([b["pixel_values"] for b in batch]), gens).cpu()
        for pos, b, z in zip(mine[start:start + batch_size], batch, latents):
            items.append((pos, {"latents": z, "original_size": b["original_size"],
                                "crop_top_left": b["crop_top_left"], "caption": b["caption"], "index": b["index"]}))
    if num_processes > 1:
        items = gather(items)
    items.sort(key=lambda pair: pair[0])
    assert [pos for pos, _ in items] == list(range(len(dataset))), "cached latents: missing examples"
    return CachedLatentDataset([item for _, item in items], seed=dataset.seed,
                               proportion_empty_prompts=dataset.proportion_empty_prompts)


def make_collate(tokenizers, resolution: int):
    """Collate dicts into tensors: pixels or latents, add_time_ids (N, 6), input ids of both tokenizers,
    and the examples' dataset indices (N,) int64."""

    def collate(examples: list[dict]) -> dict:
        out = {"indices": torch.tensor([e.get("index", -1) for e in examples], dtype=torch.long)}
        if "latents" in examples[0]:
            out["latents"] = torch.stack([e["latents"] for e in examples])
        else:
            out["pixel_values"] = torch.stack([e["pixel_values"] for e in examples])
        out["add_time_ids"] = torch.tensor(
            [list(e["original_size"]) + list(e["crop_top_left"]) + [resolution, resolution] for e in examples],
            dtype=torch.float32,
        )
        captions = [e["caption"] for e in examples]
        for key, tok in zip(("input_ids", "input_ids_2"), tokenizers):
            out[key] = tok(captions, padding="max_length", max_length=tok.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
        return out

    return collate


# ----------------------------------------------------------------------------------------------------
# Diffusion arithmetic
# ----------------------------------------------------------------------------------------------------


def encode_prompts(text_encoders, input_ids: list[torch.Tensor], *, train: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt embeddings: penultimate hidden states of both encoders concatenated (N, 77, D1+D2),
    and the second encoder's pooled projection (N, P). Without gradients unless ``train`` (text-encoder
    LoRA)."""
    with torch.set_grad_enabled(train):
        embeds, pooled = [], None
        for encoder, ids in zip(text_encoders, input_ids):
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return torch.cat(embeds, dim=-1), pooled


def timestep_weights(strategy: str, num_timesteps: int, *, multiplier: float = 1.0, portion: float = 0.25,
                     begin: int = 0, end: int = 1000) -> torch.Tensor | None:
    """Sampling probabilities (num_timesteps,) float32 of the training timesteps, or None for uniform.

    diffusers' ``generate_timestep_weights``: weight 1 everywhere, ``multiplier`` on the biased timesteps,
    normalised: 'earlier' biases the first ``int(portion * T)`` timesteps, 'later' the last ones, 'range'
    ``[begin, end)``. So P(biased) = m k / (m k + T - k) for k biased timesteps.
    """
    if strategy == "none":
        return None
    if not (math.isfinite(multiplier) and multiplier > 0):
        raise ValueError(f"timestep_bias_multiplier: must be positive, got {multiplier}")
    weights = torch.ones(num_timesteps, dtype=torch.float32)
    if strategy in ("earlier", "later"):
        k = int(portion * num_timesteps)
        if not 0 < portion <= 1 or k < 1:
            raise ValueError(f"timestep_bias_portion: {portion} of {num_timesteps} timesteps biases none of them")
        biased = slice(0, k) if strategy == "earlier" else slice(num_timesteps - k, None)
    elif strategy == "range":
        if begin < 0 or end <= begin:
            raise ValueError(f"timestep_bias_begin/end: need 0 <= begin < end, got [{begin}, {end})")
        if end > num_timesteps:
            raise ValueError(f"timestep_bias_end: {end} is past the scheduler's {num_timesteps} timesteps")
        biased = slice(begin, end)
    else:
        raise ValueError(f"timestep_bias_strategy: unknown {strategy!r}; expected one of {TIMESTEP_BIAS_STRATEGIES}")
    weights[biased] *= multiplier
    return weights / weights.sum()


def sample_noisy_latents(latents: torch.Tensor, noise: torch.Tensor, prediction_type: str, noise_scheduler,
                         generator: torch.Generator | None = None,
                         timestep_probs: torch.Tensor | None = None) -> dict:
    """Draw timesteps and build noisy latents and the regression target, all in fp32.

    latents, noise: (N, C, H, W) fp32. Returns dict(noisy_latents fp32, target fp32, timesteps (N,),
    sigmas (N,) fp32 or None). DDPM types use ``noise_scheduler`` (integer t); flow_matching draws
    sigma ~ U(0, 1), z_t = (1 - sigma) z0 + sigma eps, target eps - z0, timestep = sigma * T.
    ``timestep_probs`` (T,) (see ``timestep_weights``) biases the draw: integer t ~ probs; for flow matching
    sigma = (t + U(0, 1)) / T, which is U(0, 1) for uniform probs.
    Keeping z_t in fp32 matters: LPL reconstructs z0_hat from it (docs/spec.md, "Training integration").
    """
    latents, noise = latents.float(), noise.float()
    n = latents.shape[0]
    num_train = noise_scheduler.config.num_train_timesteps
    if prediction_type == "flow_matching":
        u = torch.rand(n, generator=generator, device="cpu")
        if timestep_probs is not None:
            bucket = torch.multinomial(timestep_probs.cpu(), n, replacement=True, generator=generator)
            u = (bucket.float() + u) / num_train
        sigmas = u.to(latents.device).clamp(min=1.0 / num_train)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1.0 - s) * latents + s * noise
        return {"noisy_latents": noisy, "target": noise - latents, "timesteps": sigmas * num_train, "sigmas": sigmas}
    if timestep_probs is None:
        timesteps = torch.randint(0, num_train, (n,), generator=generator, device="cpu")
    else:
        timesteps = torch.multinomial(timestep_probs.cpu(), n, replacement=True, generator=generator)
    timesteps = timesteps.to(latents.device).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps).float()
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps).float()
    elif prediction_type == "sample":
        target = latents
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return {"noisy_latents": noisy, "target": target, "timesteps": timesteps, "sigmas": None}


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor, prediction_type: str,
                   snr_gamma: float | None = None, alphas_cumprod: torch.Tensor | None = None,
                   timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """MSE diffusion loss in fp32, optionally min-SNR-gamma weighted (Hang et al. 2023). 0-dim tensor.
    The weights are ``lpl_ext.objective.snr_weights`` (DDPM types: ``alphas_cumprod`` (T,) at ``timesteps``)."""
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    weight = snr_weights(timesteps, snr_gamma, prediction_type=prediction_type, alphas_cumprod=alphas_cumprod)
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weight).mean()


class StepMetrics:
    """Per-optimiser-step metric accumulator (sum and count per name, over micro-batches and processes).

    ``add`` during micro-batches, ``pop`` once per optimiser step: returns the means and resets, so each
    logged value describes exactly one step (the reference never reset ``train_loss``). One gather per
    step; values stay on the device until then. A micro-batch's values are stacked into one (names,)
    vector and its weights into another, so ``add`` costs a few device ops whatever the number of names
    (not two small tensors per name, which at ~25 names is most of a GPU step's bookkeeping).
    """

    def __init__(self, names: list[str]):
        self.names = list(names)
        self._known = frozenset(self.names)
        self.reset()

    def reset(self) -> None:
        self.sums: torch.Tensor | None = None    # (names,) float32, weighted sums
        self.counts: torch.Tensor | None = None  # (names,) float32, summed weights

    def add(self, values: dict[str, torch.Tensor | float], weights: dict[str, torch.Tensor] | None = None) -> None:
        """Accumulate ``values``; ``weights[name]`` (0-dim, default 1) weighs a value, e.g. 0 for per-layer
        LPL statistics of a micro-batch where no sample reached LPL (the objective reports zeros there).
        A name outside ``self.names`` is a ValueError: a value nobody would log must not vanish silently."""
        unknown = [n for n in [*values, *(weights or {})] if n not in self._known]
        if unknown:
            raise ValueError(f"StepMetrics.add: unknown metric name(s) {sorted(set(unknown))}; this step logs "
                             f"{self.names} (the trainer's metric_names, from LPLObjective.log_keys)")
        known = {n: values[n] for n in self.names if n in values}
        if not known:
            return
        device = next((v.device for v in known.values() if torch.is_tensor(v)), torch.device("cpu"))
        zero = torch.zeros((), device=device)
        one = torch.ones((), device=device)

        def scalar(v) -> torch.Tensor:
            return v.detach().float().reshape(()) if torch.is_tensor(v) else torch.tensor(float(v), device=device)

        weights = weights or {}
        vals = torch.stack([scalar(known[n]) if n in known else zero for n in self.names])
        ws = torch.stack([(scalar(weights[n]) if n in weights else one) if n in known else zero
                          for n in self.names])
        weighted = vals * ws
        if self.sums is None:
            self.sums, self.counts = weighted, ws
        else:
            self.sums, self.counts = self.sums + weighted, self.counts + ws

    def pop(self, accelerator=None) -> dict[str, float]:
        """Means over this step's micro-batches (and processes); NaN for names never added. Resets."""
        if self.sums is None:
            packed = torch.zeros(2, len(self.names), device=accelerator.device if accelerator is not None else None)
        else:
            packed = torch.stack([self.sums, self.counts])
        if accelerator is not None and accelerator.num_processes > 1:
            packed = accelerator.reduce(packed.contiguous(), reduction="sum")
        packed = packed.cpu()  # the one host sync of the step's bookkeeping
        self.reset()
        out = {}
        for i, name in enumerate(self.names):
            c = float(packed[1, i])
            out[name] = float(packed[0, i]) / c if c > 0 else float("nan")
        return out


def metric_weights(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Weights for ``StepMetrics.add``: the LPL loss and per-layer values are means over the samples LPL was
    applied to, so they weigh by that count (0 where no sample qualified: such micro-batches do not pull
    the step's value towards 0). Totals, the diffusion loss and the applied ratio weigh 1."""
    if "lpl_num_samples" not in metrics:
        return None
    count = metrics["lpl_num_samples"]
    return {k: count for k in metrics if k not in TRAINER_METRICS and k not in LPLObjective.BATCH_KEYS}


def metric_names(num_blocks: int) -> list[str]:
    """The per-step metrics: the trainer's, then ``LPLObjective.log_keys(num_blocks)``."""
    return [*TRAINER_METRICS, *LPLObjective.log_keys(num_blocks)]


def build_lpl_objective(args: argparse.Namespace, vae):
    """``lpl_ext.LPLObjective`` of the --lpl_* flags' configuration (decoder checkpointing: --lpl_grad_ckpt)."""
    import lpl_ext

    return lpl_ext.LPLObjective(vae, config=lpl_config(args))


def compute_losses(*, unet, batch_latents, noise, prompt_embeds, pooled_embeds, add_time_ids, noise_scheduler,
                   prediction_type, args, lpl_objective, global_step, alphas_cumprod,
                   generator=None, timestep_probs=None) -> tuple[torch.Tensor, dict]:
    """One micro-batch: UNet prediction, diffusion loss, LPL. Returns (total loss, metrics dict of tensors).

    The LPL call is deliberately outside any autocast context: the VAE decoder must run in fp32.
    """
    drawn = sample_noisy_latents(batch_latents, noise, prediction_type, noise_scheduler, generator, timestep_probs)
    model_pred = unet(
        drawn["noisy_latents"],
        drawn["timesteps"],
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={"text_embeds": pooled_embeds, "time_ids": add_time_ids},
        return_dict=False,
    )[0]
    is_ddpm = prediction_type != "flow_matching"
    diff = diffusion_loss(model_pred, drawn["target"], prediction_type, args.snr_gamma,
                          alphas_cumprod if is_ddpm else None, drawn["timesteps"])
    metrics: dict[str, torch.Tensor] = {"diffusion_loss": diff.detach()}
    loss = diff
    if lpl_objective is not None:
        with torch.autocast(device_type=batch_latents.device.type, enabled=False):
            lpl, logs = lpl_objective(
                model_pred.float(),
                drawn["noisy_latents"],  # fp32: z0_hat is reconstructed from full-precision z_t
                batch_latents.float(),
                drawn["timesteps"],
                prediction_type=prediction_type,
                alphas_cumprod=alphas_cumprod if is_ddpm else None,
                sigmas=drawn["sigmas"],
                global_step=global_step,
            )
        loss = diff + args.lpl_weight * lpl
        metrics.update(logs)  # lpl_loss included
    metrics["loss"] = loss.detach()
    return loss, metrics


# ----------------------------------------------------------------------------------------------------
# Metrics files
# ----------------------------------------------------------------------------------------------------


class MetricsCSV:
    """``metrics.csv``: one row per optimiser step. On resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, columns: list[str], resume_step: int | None):
        self.path, self.columns = path, ["step", "epoch", "lr", *columns, "elapsed_s"]
        if resume_step is not None and path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
            self._write(rows)
        else:
            self._write([])

    def _write(self, rows: list[dict]) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def append(self, row: dict) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore").writerow(row)


def plot_loss_curves(csv_path: Path, png_path: Path) -> None:
    """PNG with total / diffusion / LPL loss per step (raw and smoothed) and the LPL application ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]

    def col(name):
        return [float(r[name]) if r.get(name) not in (None, "") else float("nan") for r in rows]

    def smooth(values, beta=0.8):
        out, acc, seen = [], 0.0, 0
        for v in values:
            if v != v:  # NaN: step without a value
                out.append(out[-1] if out else float("nan"))
                continue
            seen += 1
            acc = beta * acc + (1 - beta) * v
            out.append(acc / (1 - beta**seen))
        return out

    ratio = col("lpl_applied_ratio")
    lpl = [v if r == r and r > 0 else float("nan") for v, r in zip(col("lpl_loss"), ratio)]
    fig, axes = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax = axes[0]
    # total is drawn last and dashed: with a small LPL term it lies on the diffusion curve
    for name, values, color, style in (("diffusion loss", col("diffusion_loss"), "tab:green", "-"),
                                       ("LPL loss (steps where applied)", lpl, "tab:red", "-"),
                                       ("total loss", col("loss"), "tab:blue", "--")):
        # Raw values as faint dots (LPL has gaps on steps where no sample was below the threshold).
        ax.plot(steps, values, color=color, alpha=0.3, marker=".", ms=3, lw=0)
        if any(v == v for v in values):
            ax.plot(steps, smooth(values), color=color, lw=2 if style == "-" else 1.5, ls=style, label=name)
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title("SDXL + LPL training")
    axes[1].bar(steps, [0 if r != r else r for r in ratio], color="tab:red", alpha=0.6)
    axes[1].set_ylabel("LPL applied\nratio")
    axes[1].set_xlabel("optimiser step")
    axes[1].set_ylim(0, 1)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


def inference_scheduler(prediction_type: str, scheduler_config: dict):
    """The scheduler saved with the pipeline and used for validation images.

    DDPM prediction types: ``EulerDiscreteScheduler`` from the training schedule. flow_matching:
    ``DPMSolverMultistepScheduler`` with flow sigmas and ``flow_prediction`` (x0 = z_t - sigma v, timestep
    sigma * T, exactly the training parameterisation); unlike ``FlowMatchEulerDiscreteScheduler`` it has
    ``init_noise_sigma`` and ``scale_model_input``, so ``StableDiffusionXLPipeline`` can sample with it.
    """
    if prediction_type == "flow_matching":
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(num_train_timesteps=scheduler_config["num_train_timesteps"],
                                           use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0)
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(scheduler_config, prediction_type=prediction_type)


@torch.no_grad()
def generate_validation_images(components: dict, unet, prompts: list[str], num_images: int, resolution: int,
                               num_steps: int, prediction_type: str, scheduler_config, seed: int, device,
                               autocast_dtype: torch.dtype | None = None, guidance_scale: float = 5.0) -> list:
    """Sample ``num_images`` per prompt with ``StableDiffusionXLPipeline`` and classifier-free guidance, for
    every prediction type (scheduler: ``inference_scheduler``). Returns [(prompt, [PIL images])].

    The UNet runs under autocast to ``autocast_dtype`` when given (a LoRA UNet whose frozen base weights are
    in the mixed-precision dtype); the VAE always decodes in fp32 outside autocast.
    """
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(unet=unet, scheduler=inference_scheduler(prediction_type, scheduler_config),
                                     **components)
    pipe.set_progress_bar_config(disable=True)
    device = torch.device(device)
    vae = components["vae"]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = []
    for p_idx, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(seed + p_idx)
        # fp32 embeddings (the text encoders may run in the mixed-precision dtype): the latents, and so the
        # scheduler arithmetic, follow their dtype.
        embeds = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=num_images,
                                    do_classifier_free_guidance=True)
        embeds = [e.float() for e in embeds]
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            latents = pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1],
                           pooled_prompt_embeds=embeds[2], negative_pooled_prompt_embeds=embeds[3],
                           height=resolution, width=resolution, num_inference_steps=num_steps,
                           guidance_scale=guidance_scale, generator=generator, output_type="latent").images
        with torch.autocast(device.type, enabled=False):
            decoded = vae.decode(latents.float() / vae.config.scaling_factor + shift, return_dict=False)[0]
        images.append((prompt, pipe.image_processor.postprocess(decoded, output_type="pil")))
    return images


def save_validation_images(images: list, folder: Path, step: int) -> list[Path]:
    """Write each image and one grid per step (rows: prompts) as PNG; returns the written paths."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for p_idx, (_, imgs) in enumerate(images):
        for i, img in enumerate(imgs):
            path = folder / f"step{step:06d}_prompt{p_idx}_{i}.png"
            img.save(path)
            paths.append(path)
    if images and images[0][1]:
        w, h = images[0][1][0].size
        cols = max(len(imgs) for _, imgs in images)
        grid = Image.new("RGB", (w * cols, h * len(images)), "white")
        for r, (_, imgs) in enumerate(images):
            for c, img in enumerate(imgs):
                grid.paste(img, (c * w, r * h))
        path = folder / f"step{step:06d}_grid.png"
        grid.save(path)
        paths.append(path)
        with open(folder / "prompts.txt", "w", encoding="utf-8") as fh:
            fh.write("\n".join(f"prompt{i}: {p}" for i, (p, _) in enumerate(images)) + "\n")
    return paths


# ----------------------------------------------------------------------------------------------------
# Setup phases (each a function, called in this order by main)
# ----------------------------------------------------------------------------------------------------


def make_accelerator(args: argparse.Namespace):
    """The ``Accelerator``: mixed precision, trackers, a seedable sampler (its state is checkpointed)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

    output_dir = Path(args.output_dir)
    handlers = []
    if args.train_text_encoder:
        # The first text encoder's last layer only feeds its pooled output, which SDXL does not use: its
        # adapters get no gradient, which DDP must be told about.
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / args.logging_dir)),
        # On a machine without GPUs, torchrun-launched processes must use gloo on CPU.
        cpu=not _has_accelerator_device(),
        # Epoch e is permuted with seed + e on every process, and the sampler is saved with each checkpoint,
        # so a resumed epoch replays the same order (a plain RandomSampler would draw a new one).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=handlers,
    )


def prepare_hub_repo(args: argparse.Namespace, accelerator) -> str | None:
    """Create (or find) the Hub repository for --push_to_hub before any model is loaded, so that a missing
    network or a bad token fails the run at once. Returns the repo id on the main process, else None."""
    if not args.push_to_hub or not accelerator.is_main_process:
        return None
    from huggingface_hub import create_repo

    name = args.hub_model_id or Path(args.output_dir).resolve().name
    try:
        return create_repo(repo_id=name, exist_ok=True, token=args.hub_token).repo_id
    except Exception as exc:
        raise SystemExit(f"--push_to_hub: cannot create or reach the Hub repository {name!r} "
                         f"({type(exc).__name__}: {exc}). Nothing was trained. Check the network and the token "
                         f"(--hub_token / HF_TOKEN), or drop --push_to_hub.") from exc


def is_fsdp(accelerator) -> bool:
    """Whether accelerate shards the prepared models with FSDP (an FSDP accelerate config)."""
    from accelerate.utils import DistributedType

    return getattr(accelerator, "distributed_type", None) == DistributedType.FSDP


def check_distributed_setup(args: argparse.Namespace, accelerator) -> None:
    """Refuse, before any model loads, what the FSDP path does not support."""
    if not is_fsdp(accelerator):
        return
    if not getattr(accelerator, "is_fsdp2", False):
        raise SystemExit("FSDP: set fsdp_version: 2 in the accelerate config (FSDP1 wraps the UNet in a module "
                         "that StableDiffusionXLPipeline cannot sample with)")
    if args.use_ema:
        raise SystemExit("--use_ema is not supported with FSDP (the EMA would hold an unsharded copy of the UNet "
                         "on every process)")
    if args.rank is not None:
        raise SystemExit("--rank (LoRA) is not supported with FSDP: LoRA fits on one GPU; use DDP "
                         "(accelerate launch --multi_gpu) to train it on several")


def unet_from_state_dict(config, state_dict: dict, dtype: torch.dtype | None = None):
    """A ``UNet2DConditionModel`` built from ``config`` on the meta device and given ``state_dict``'s tensors
    (no second copy of the weights): how a full state dict gathered from FSDP shards becomes a model that
    ``save_pretrained`` and ``StableDiffusionXLPipeline`` accept."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if dtype is not None:
        model.to(dtype)
    return model


def load_models(args: argparse.Namespace, accelerator, log) -> SimpleNamespace:
    """Tokenizers, text encoders, VAE, UNet and noise scheduler (the scheduler first: the timestep-bias
    flags are checked against it before the large models load)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if args.offline_demo:
        from lpl_ext.demo.tiny_sdxl import ensure_tiny_sdxl

        with accelerator.main_process_first():
            model_path = str(ensure_tiny_sdxl(args.cache_dir, seed=args.tiny_model_seed, dataset=args.synthetic_data))
        log.info(f"offline demo: tiny SDXL pipeline at {model_path}", main_process_only=True)
    else:
        model_path = args.pretrained_model_name_or_path
    load_kw = dict(revision=args.revision, cache_dir=args.cache_dir)
    noise_scheduler = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", **load_kw)
    prediction_type = args.prediction_type or noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise SystemExit(f"scheduler prediction_type {prediction_type!r} is not supported; pass --prediction_type")
    if prediction_type != "flow_matching":
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    try:
        probs = timestep_weights(args.timestep_bias_strategy, noise_scheduler.config.num_train_timesteps,
                                 multiplier=args.timestep_bias_multiplier, portion=args.timestep_bias_portion,
                                 begin=args.timestep_bias_begin, end=args.timestep_bias_end)
    except ValueError as exc:
        raise SystemExit(f"--{exc}") from exc

    tokenizer = CLIPTokenizer.from_pretrained(model_path, subfolder="tokenizer", **load_kw)
    tokenizer_2 = CLIPTokenizer.from_pretrained(model_path, subfolder="tokenizer_2", **load_kw)
    text_encoder = CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder", variant=args.variant, **load_kw)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(model_path, subfolder="text_encoder_2",
                                                                 variant=args.variant, **load_kw)
    if args.pretrained_vae_model_name_or_path is not None:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, torch_dtype=torch.float32,
                                            **load_kw)
    else:
        vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae", variant=args.variant,
                                            torch_dtype=torch.float32, **load_kw)
    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", variant=args.variant, **load_kw)
    return SimpleNamespace(model_path=model_path, load_kw=load_kw, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                           text_encoder=text_encoder, text_encoder_2=text_encoder_2, vae=vae, unet=unet,
                           noise_scheduler=noise_scheduler, scheduler_config=dict(noise_scheduler.config),
                           prediction_type=prediction_type, timestep_probs=probs)


def add_lora_adapters(unet, text_encoders=(), *, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Freeze ``unet`` (and ``text_encoders``) and add peft LoRA adapters on the attention projections, as
    diffusers' ``train_text_to_image_lora_sdxl.py`` (gaussian init of A, zero B: the model's output is
    unchanged at step 0). Returns the adapter parameters, the only trainable ones."""
    from peft import LoraConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(UNET_LORA_TARGETS)))
    for encoder in text_encoders:
        encoder.requires_grad_(False)
        # peft directly, not transformers' ``add_adapter``: the same adapters, without transformers'
        # minimum-peft-version gate (transformers 5 asks for a newer peft than diffusers needs).
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                           target_modules=list(TEXT_ENCODER_LORA_TARGETS)), encoder,
                                adapter_name="default")
    params = [p for model in (unet, *text_encoders) for p in model.parameters() if p.requires_grad]
    return params


def setup_models(args: argparse.Namespace, accelerator, m: SimpleNamespace) -> list[torch.nn.Parameter]:
    """Freeze, add LoRA adapters, place and cast the models; the EMA (--use_ema). Sets ``m.weight_dtype``,
    ``m.trained_text_encoders`` and ``m.ema_unet`` (None without --use_ema); returns the parameters to optimise."""
    m.weight_dtype = SAVE_PRECISIONS.get(accelerator.mixed_precision, torch.float32)
    for frozen in (m.vae, m.text_encoder, m.text_encoder_2):
        frozen.requires_grad_(False)
    m.trained_text_encoders = [m.text_encoder, m.text_encoder_2] if args.train_text_encoder else []
    if args.enable_xformers_memory_efficient_attention:
        m.unet.enable_xformers_memory_efficient_attention()
    if args.enable_npu_flash_attention:
        m.unet.enable_npu_flash_attention()
    if args.rank is not None:
        # The frozen base weights are only read: keep them in the mixed-precision dtype (half the memory), as
        # diffusers' LoRA script does; the adapters train in fp32.
        m.unet.to(accelerator.device, dtype=m.weight_dtype)
        params = add_lora_adapters(m.unet, m.trained_text_encoders, rank=args.rank, alpha=args.lora_alpha)
    else:
        m.unet.requires_grad_(True)
        params = list(m.unet.parameters())
    m.unet.train()
    if args.gradient_checkpointing:
        m.unet.enable_gradient_checkpointing()
        for encoder in m.trained_text_encoders:
            encoder.gradient_checkpointing_enable()
    # The VAE stays fp32 (SDXL's VAE overflows in fp16; LPL decodes through it); text encoders may be low precision.
    m.vae.to(accelerator.device)
    for encoder in (m.text_encoder, m.text_encoder_2):
        encoder.to(accelerator.device, dtype=m.weight_dtype)
    if args.rank is not None:
        for p in params:  # adapters in fp32 whatever the base dtype (diffusers' cast_training_params)
            p.data = p.data.float()
    for encoder in m.trained_text_encoders:
        encoder.train()
    m.ema_unet = None
    if args.use_ema:
        from diffusers import UNet2DConditionModel
        from diffusers.training_utils import EMAModel

        m.ema_unet = EMAModel(m.unet.parameters(), decay=args.ema_decay, model_cls=UNet2DConditionModel,
                              model_config=m.unet.config)
        m.ema_unet.to(accelerator.device)
    return params


def build_optimizer(args: argparse.Namespace, params: list[torch.nn.Parameter], lr: float):
    """AdamW, or bitsandbytes' AdamW8bit with --use_8bit_adam (checked usable at argument parsing)."""
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
               eps=args.adam_epsilon)


def _cast_state_dict(state_dict: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in state_dict.items()}


def lora_save_kwargs(unet, text_encoders=(), dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments of ``StableDiffusionXLPipeline.save_lora_weights``: the adapters of ``unet`` (and of
    the two text encoders, if given) in the diffusers format, cast to ``dtype``, with their peft configs
    (rank, alpha, targets) as metadata so that ``load_lora_weights`` rebuilds the same adapters."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    kwargs = {}
    names = ("unet", "text_encoder", "text_encoder_2")
    for name, model in zip(names, (unet, *text_encoders)):
        kwargs[f"{name}_lora_layers"] = _cast_state_dict(
            convert_state_dict_to_diffusers(get_peft_model_state_dict(model)), dtype)
        kwargs[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    return kwargs


def load_lora_into(folder: str | os.PathLike, unet, text_encoders=()) -> None:
    """Load ``folder/pytorch_lora_weights.safetensors`` into the peft adapters of ``unet`` (and the two
    text encoders, if given) in place. Raises if a key of the file has no adapter to go to."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.training_utils import _set_state_dict_into_text_encoder
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state = StableDiffusionXLPipeline.lora_state_dict(str(folder), weight_name=LORA_WEIGHT_NAME)[0]
    unet_state = convert_unet_state_dict_to_peft(
        {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")})
    result = set_peft_model_state_dict(unet, unet_state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{folder}: LoRA weights that match no adapter of the UNet: {unexpected[:5]}")
    for prefix, encoder in zip(("text_encoder.", "text_encoder_2."), text_encoders):
        _set_state_dict_into_text_encoder(state, prefix=prefix, text_encoder=encoder)


def load_diffusers_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Copy the weights saved by ``save_pretrained`` in ``folder`` into ``model`` in place, one safetensors
    shard at a time (no second copy of the model, unlike ``from_pretrained``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    missing = set(model.state_dict())
    for name in files:
        shard = load_file(str(folder / name))
        result = model.load_state_dict(shard, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"{folder / name}: keys the model does not have: {result.unexpected_keys[:5]}")
        missing -= set(shard)
    if missing:
        raise RuntimeError(f"{folder}: weights missing for {sorted(missing)[:5]}")


def restore_ema(ema_unet, folder: str | os.PathLike, device) -> None:
    """Load the EMA saved in ``folder`` (``EMAModel.save_pretrained``) into ``ema_unet`` and move it to
    ``device``: loading lands on the CPU, and an EMA left there would mix devices at its first step."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    loaded = EMAModel.from_pretrained(str(folder), UNet2DConditionModel)
    ema_unet.load_state_dict(loaded.state_dict())
    ema_unet.to(device)
    del loaded


def register_checkpoint_hooks(accelerator, args: argparse.Namespace, m: SimpleNamespace) -> None:
    """Save/load hooks giving each ``checkpoint-N`` the diffusers layout, as diffusers' SDXL scripts do:
    ``unet/`` (and ``unet_ema/``) loadable with ``from_pretrained``, or, with --rank, the adapters as
    ``pytorch_lora_weights.safetensors`` loadable with ``load_lora_weights``. accelerate still saves the
    optimizer, scheduler, sampler and RNG states next to them."""
    unet, encoders, ema_unet = m.unet, m.trained_text_encoders, m.ema_unet

    def is_model(candidate, target) -> bool:
        return accelerator.unwrap_model(candidate) is target

    def save_hook(models, weights, output_dir):
        if is_fsdp(accelerator):
            # accelerate has saved its sharded model and optimizer state (what resuming loads); add unet/ from
            # the gathered full state dict (a collective: every process takes part).
            for model in models:
                state = accelerator.get_state_dict(model)
                if accelerator.is_main_process:
                    unet_from_state_dict(unet.config, state).save_pretrained(os.path.join(output_dir, "unet"))
            return
        if args.rank is not None:
            if accelerator.is_main_process:
                from diffusers import StableDiffusionXLPipeline

                StableDiffusionXLPipeline.save_lora_weights(output_dir, weight_name=LORA_WEIGHT_NAME,
                                                            **lora_save_kwargs(unet, encoders))
        elif accelerator.is_main_process:
            for model in models:
                if is_model(model, unet):
                    accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, "unet"))
            if ema_unet is not None:
                ema_unet.save_pretrained(os.path.join(output_dir, "unet_ema"))
        for model in list(models):  # saved above: accelerate must not write them again
            if weights and any(is_model(model, t) for t in (unet, *encoders)):
                weights.pop()

    def load_hook(models, input_dir):
        ours = [model for model in models if any(is_model(model, t) for t in (unet, *encoders))]
        if not ours:  # FSDP: accelerate loads its own sharded checkpoint and hands no model to the hooks
            return
        if args.rank is not None:
            load_lora_into(input_dir, unet, encoders)
        else:
            load_diffusers_weights(unet, os.path.join(input_dir, "unet"))
            if ema_unet is not None:
                restore_ema(ema_unet, os.path.join(input_dir, "unet_ema"), accelerator.device)
        for model in ours:
            models.remove(model)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def build_dataloader(args: argparse.Namespace, accelerator, source: ImageCaptionSource, m: SimpleNamespace):
    """Training dataset (pixels, or latents with --cache_latents) and its shuffled DataLoader."""
    train_dataset = TrainDataset(source, args.resolution, args.center_crop, args.random_flip, seed=args.seed,
                                 proportion_empty_prompts=args.proportion_empty_prompts)
    if args.cache_latents:
        from accelerate.utils import gather_object

        train_dataset = build_cached_latents(train_dataset, m.vae, process_index=accelerator.process_index,
                                             num_processes=accelerator.num_processes, gather=gather_object)
    loader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.train_batch_size, shuffle=True,
        collate_fn=make_collate((m.tokenizer, m.tokenizer_2), args.resolution),
        num_workers=args.dataloader_num_workers, drop_last=False,
    )
    return train_dataset, loader


class SampleTrace:
    """Writes, per micro-batch, the dataset indices this process trained on, when $LPL_EXT_SAMPLE_TRACE is set."""

    def __init__(self, process_index: int):
        path = os.environ.get(SAMPLE_TRACE_ENV_VAR)
        self.path = f"{path}.rank{process_index}" if path else None

    def write(self, step: int, micro: int, epoch: int, indices: torch.Tensor) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "micro": micro, "epoch": epoch, "indices": indices.tolist()}) + "\n")


def write_model_card(args: argparse.Namespace, output_dir: Path, repo_id: str, base_model: str) -> Path:
    """``README.md`` for the Hub: base model, data, LPL settings and how to load the result."""
    if args.rank is not None:
        usage = (f"pipe = StableDiffusionXLPipeline.from_pretrained(\"{base_model}\")\n"
                 f"pipe.load_lora_weights(\"{repo_id}\")")
        kind = f"LoRA (rank {args.rank}, alpha {args.lora_alpha:g}) of the UNet's attention projections" + (
            " and of both text encoders" if args.train_text_encoder else "")
    else:
        usage = f"pipe = StableDiffusionXLPipeline.from_pretrained(\"{repo_id}\")"
        kind = "full UNet fine-tune"
    lpl = (f"LPL weight {args.lpl_weight:g}, t < {args.lpl_t_threshold}, {args.lpl_loss_type}, norm "
           f"{args.lpl_norm_type}, {args.lpl_num_blocks} decoder blocks" if args.use_lpl else "off")
    text = (f"---\nbase_model: {base_model}\ntags:\n- stable-diffusion-xl\n- text-to-image\n- diffusers\n"
            f"- latent-perceptual-loss\n{'- lora' + chr(10) if args.rank is not None else ''}---\n\n"
            f"# {repo_id}\n\nFine-tuned from **{base_model}** with `train_sdxl_lpl.py` (diffusion loss + Latent "
            f"Perceptual Loss): {kind}.\n\n- data: {args.dataset_name or args.train_data_dir or 'built-in ' + args.synthetic_data}\n"
            f"- steps: {args.max_train_steps}, resolution {args.resolution}, learning rate {args.learning_rate:g}\n"
            f"- LPL: {lpl}\n\n```python\nfrom diffusers import StableDiffusionXLPipeline\n{usage}\n```\n")
    path = output_dir / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def push_output_to_hub(args: argparse.Namespace, repo_id: str, output_dir: Path) -> None:
    """Upload ``output_dir`` without checkpoints: the run's last step. Everything is saved locally before;
    a failed upload says so and how to retry, and exits non-zero."""
    from huggingface_hub import upload_folder

    try:
        upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="End of training",
                      ignore_patterns=HUB_IGNORE_PATTERNS, token=args.hub_token)
    except Exception as exc:
        raise SystemExit(f"--push_to_hub: the upload to {repo_id} failed ({type(exc).__name__}: {exc}). "
                         f"Nothing is lost: the trained model is saved in {output_dir}. Retry with: "
                         f"hf upload {repo_id} {output_dir} --exclude '{CHECKPOINT_PREFIX}*'") from exc


def save_final_model(args: argparse.Namespace, accelerator, m: SimpleNamespace, unet, output_dir: Path,
                     unet_state: dict | None = None) -> None:
    """Main process: the LoRA weights (--rank) or the whole pipeline, in --save_precision. ``unet_state``: the
    UNet's full state dict, gathered from the FSDP shards by every process beforehand."""
    from diffusers import StableDiffusionXLPipeline

    dtype = SAVE_PRECISIONS[args.save_precision]
    if unet_state is not None:
        model = unet_from_state_dict(m.unet.config, unet_state)
    else:
        model = accelerator.unwrap_model(unet)
    scheduler = inference_scheduler(m.prediction_type, m.scheduler_config)
    if args.rank is not None:
        encoders = [accelerator.unwrap_model(e) for e in m.trained_text_encoders]
        StableDiffusionXLPipeline.save_lora_weights(str(output_dir), weight_name=LORA_WEIGHT_NAME,
                                                    **lora_save_kwargs(model, encoders, dtype))
        # The scheduler matching the trained prediction type (the base pipeline's may differ).
        scheduler.save_pretrained(str(output_dir / "scheduler"))
        return
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if m.ema_unet is not None:
        m.ema_unet.copy_to(model.parameters())
    model.to(dtype)
    encoders = []
    for encoder, cls, sub in ((m.text_encoder, CLIPTextModel, "text_encoder"),
                              (m.text_encoder_2, CLIPTextModelWithProjection, "text_encoder_2")):
        if encoder.dtype != dtype:
            # Not trained, but possibly cast down to the mixed-precision dtype: reload the original weights.
            encoder = cls.from_pretrained(m.model_path, subfolder=sub, variant=args.variant, torch_dtype=dtype,
                                          **m.load_kw)
        encoders.append(encoder)
    pipeline = StableDiffusionXLPipeline(unet=model, scheduler=scheduler, vae=m.vae, text_encoder=encoders[0],
                                         text_encoder_2=encoders[1], tokenizer=m.tokenizer,
                                         tokenizer_2=m.tokenizer_2)
    pipeline.save_pretrained(str(output_dir))


# ----------------------------------------------------------------------------------------------------
# Training phases (main calls them top-down)
# ----------------------------------------------------------------------------------------------------


def _has_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def check_launch() -> None:
    """Stop, naming the command that works, when accelerate was asked for several processes but started one:
    without GPUs, ``accelerate launch --num_processes N`` (no ``--multi_gpu``) runs accelerate's one-process
    launcher, which exports MASTER_ADDR for the processes it does not start, and no launcher set a world size."""
    env = os.environ
    if "ACCELERATE_USE_CPU" not in env or "MASTER_ADDR" not in env or _has_accelerator_device():
        return
    if any(name in env for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")):
        return
    raise SystemExit(f"train_sdxl_lpl: accelerate started 1 process but was asked for more: without GPUs, "
                     f"`accelerate launch --num_processes N` starts N only with --multi_gpu (it exported "
                     f"MASTER_ADDR={env['MASTER_ADDR']} for processes it did not start). Start N processes (gloo "
                     f"on CPU) with:\n    accelerate launch --multi_gpu --num_processes N {shlex.join(sys.argv)}")


def start_run(args: argparse.Namespace):
    """The accelerator, logging (libraries quiet except on the local main process), seeds, TF32 and the
    output folder. Returns (accelerator, accelerate's process-aware logger)."""
    from accelerate.logging import get_logger
    from accelerate.utils import set_seed

    accelerator = make_accelerator(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        import diffusers
        import transformers

        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    # Training randomness (noise, timesteps, crops, caption dropout) comes from generators keyed by
    # (seed, process, step) or (seed, epoch, example); the global seed only covers model initialisation.
    set_seed(args.seed, device_specific=True)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return accelerator, get_logger("train_sdxl_lpl")


@dataclass
class Run:
    """What the training phases share: the models of ``load_models`` / ``setup_models`` (``m``), their
    accelerate-prepared versions, the optimiser, the data, the step schedule and the step counter."""

    args: argparse.Namespace
    accelerator: Any
    log: Any
    m: SimpleNamespace
    unet: torch.nn.Module  # prepared: DDP- or FSDP-wrapped
    trained_encoders: list  # prepared text encoders with LoRA adapters (--train_text_encoder), else []
    text_encoders: tuple  # the two text encoders as the training step calls them
    params: list  # the trained parameters, as the prepared optimizer holds them (sharded under FSDP)
    optimizer: Any
    lr_scheduler: Any
    dataset: Any
    dataloader: Any
    lpl_objective: Any
    alphas_cumprod: torch.Tensor  # (T,) fp32 on the device
    updates_per_epoch: int
    num_epochs: int
    output_dir: Path
    global_step: int = 0
    resume_step: int | None = None  # the step resumed from
    start_time: float = 0.0  # when the first step started (train)

    @property
    def done(self) -> bool:
        return self.global_step >= self.args.max_train_steps


def prepare_training(args: argparse.Namespace, accelerator, log, m: SimpleNamespace, source: ImageCaptionSource,
                     params: list[torch.nn.Parameter]) -> Run:
    """Optimiser, data, lr schedule and step counts, then ``accelerator.prepare``; the LPL objective and the
    trackers."""
    from diffusers.optimization import get_scheduler

    log.info(f"trainable parameters: {sum(p.numel() for p in params)} "
             f"({'LoRA adapters' if args.rank is not None else 'UNet'}); "
             f"UNet parameters: {sum(p.numel() for p in m.unet.parameters())}", main_process_only=True)
    lr = args.learning_rate
    if args.scale_lr:
        lr = lr * args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = build_optimizer(args, params, lr)
    dataset, dataloader = build_dataloader(args, accelerator, source, m)
    # Steps: computed from the per-process dataloader length, as accelerate shards it.
    per_process_batches = math.ceil(len(dataloader) / accelerator.num_processes)
    updates_per_epoch = max(1, math.ceil(per_process_batches / args.gradient_accumulation_steps))
    args.max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)

    prepared = accelerator.prepare(m.unet, *m.trained_text_encoders, optimizer, dataloader, lr_scheduler)
    unet, trained = prepared[0], list(prepared[1:1 + len(m.trained_text_encoders)])
    optimizer, dataloader, lr_scheduler = prepared[-3:]
    updates_per_epoch = max(1, math.ceil(len(dataloader) / args.gradient_accumulation_steps))
    if accelerator.is_main_process and args.report_to != "none":
        tracker_config = {k: v for k, v in vars(args).items()
                          if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers("sdxl-lpl", config=tracker_config)
    return Run(
        args=args, accelerator=accelerator, log=log, m=m, unet=unet, trained_encoders=trained,
        text_encoders=tuple(trained) if trained else (m.text_encoder, m.text_encoder_2),
        # FSDP replaces the UNet's parameters with sharded ones: clip what the optimizer now holds.
        params=[p for model in (unet, *trained) for p in model.parameters() if p.requires_grad],
        optimizer=optimizer, lr_scheduler=lr_scheduler, dataset=dataset, dataloader=dataloader,
        lpl_objective=build_lpl_objective(args, m.vae) if args.use_lpl else None,
        alphas_cumprod=m.noise_scheduler.alphas_cumprod.to(accelerator.device, dtype=torch.float32),
        updates_per_epoch=updates_per_epoch,
        num_epochs=math.ceil(args.max_train_steps / updates_per_epoch), output_dir=Path(args.output_dir))


def resume(run: Run) -> None:
    """--resume_from_checkpoint: load the accelerate state (models through the checkpoint hooks) and the step
    counter. Warns and starts anew when no complete checkpoint exists."""
    spec = run.args.resume_from_checkpoint
    if not spec:
        return
    path = resolve_checkpoint_path(run.output_dir, spec)
    if path is None:
        run.log.warning(f"no complete checkpoint found for --resume_from_checkpoint {spec!r}; starting a new run",
                        main_process_only=True)
        return
    with open(path / CHECKPOINT_STATE_FILE, encoding="utf-8") as fh:
        state = json.load(fh)
    run.accelerator.load_state(str(path))
    run.global_step = run.resume_step = int(state["global_step"])
    run.log.info(f"resumed from {path} at step {run.global_step}", main_process_only=True)


def training_step(run: Run, batch: dict, epoch: int, micro: int, step_metrics: StepMetrics,
                  trace: SampleTrace) -> None:
    """One micro-batch: latents, noise, prompt embeddings, the losses (``compute_losses``), backward. The
    optimiser steps on the micro-batch where accelerate syncs the gradients (the last of an accumulation);
    on the others accelerate makes the optimizer and lr-scheduler steps no-ops."""
    args, accelerator, m = run.args, run.accelerator, run.m
    with accelerator.accumulate(run.unet, *run.trained_encoders):
        trace.write(run.global_step + 1, micro, epoch, batch["indices"])
        generator = seeded_generator(args.seed, "train", accelerator.process_index, run.global_step, micro)
        if "latents" in batch:
            latents = batch["latents"].to(accelerator.device, dtype=torch.float32)
        else:
            latents = encode_latents(m.vae, batch["pixel_values"], generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        if args.noise_offset:
            noise = noise + args.noise_offset * torch.randn(
                latents.shape[0], latents.shape[1], 1, 1, generator=generator).to(latents.device)
        prompt_embeds, pooled = encode_prompts(run.text_encoders, [batch["input_ids"], batch["input_ids_2"]],
                                               train=args.train_text_encoder)
        loss, metrics = compute_losses(
            unet=run.unet, batch_latents=latents, noise=noise, prompt_embeds=prompt_embeds, pooled_embeds=pooled,
            add_time_ids=batch["add_time_ids"].to(accelerator.device), noise_scheduler=m.noise_scheduler,
            prediction_type=m.prediction_type, args=args, lpl_objective=run.lpl_objective,
            global_step=run.global_step, alphas_cumprod=run.alphas_cumprod, generator=generator,
            timestep_probs=m.timestep_probs)
        step_metrics.add(metrics, metric_weights(metrics))
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.params, args.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)


def end_step(run: Run, epoch: int, step_metrics: StepMetrics, progress, csv_file: MetricsCSV | None) -> None:
    """After an optimiser step: the EMA, the step's metrics (progress bar, metrics.csv, trackers), then a
    checkpoint and validation when their schedules say so."""
    args, accelerator = run.args, run.accelerator
    if run.m.ema_unet is not None:
        run.m.ema_unet.step(run.unet.parameters())
    run.global_step += 1
    progress.update(1)
    values = step_metrics.pop(accelerator)  # this step only; reset for the next one
    lr = run.lr_scheduler.get_last_lr()[0]
    progress.set_postfix(diff=f"{values['diffusion_loss']:.4f}",
                         lpl=f"{values['lpl_loss']:.4f}" if args.use_lpl else "off",
                         lpl_ratio=f"{values['lpl_applied_ratio']:.2f}" if args.use_lpl else "-", lr=f"{lr:.1e}")
    if csv_file is not None:
        csv_file.append({"step": run.global_step, "epoch": epoch, "lr": lr, **values,
                         "elapsed_s": round(time.time() - run.start_time, 3)})
    accelerator.log({k: v for k, v in values.items() if v == v} | {"lr": lr}, step=run.global_step)
    if args.checkpointing_steps and run.global_step % args.checkpointing_steps == 0:
        checkpoint(run, epoch)
    if args.validation_steps and run.global_step % args.validation_steps == 0 and not run.done:
        validate(run)


def checkpoint(run: Run, epoch: int) -> None:
    """``checkpoint-<step>`` (atomic; the hooks add the diffusers layout) and the loss plot so far."""
    # The sampler's state: epoch e is permuted with seed + e (accelerate saves a SeedableRandomSampler only
    # for iterable datasets, so it is recorded here).
    path = save_checkpoint(run.accelerator, run.output_dir, run.global_step, run.args.checkpoints_total_limit,
                           {"epoch": epoch, "seed": run.args.seed, "sampler": "SeedableRandomSampler"})
    run.log.info(f"saved {path}", main_process_only=True)
    if run.accelerator.is_main_process:
        plot_loss_curves(run.output_dir / METRICS_CSV, run.output_dir / LOSS_PLOT)


def validate(run: Run) -> None:
    """Validation images of the current weights (the EMA's with --use_ema), saved by the main process."""
    args, accelerator, m = run.args, run.accelerator, run.m
    if not args.validation_prompts or args.num_validation_images == 0:
        return
    # With FSDP every UNet forward gathers the shards from all processes: all of them sample (the same
    # images), the main process saves them.
    if accelerator.is_main_process or is_fsdp(accelerator):
        model = accelerator.unwrap_model(run.unet)
        if m.ema_unet is not None:
            m.ema_unet.store(model.parameters())
            m.ema_unet.copy_to(model.parameters())
        was_training = model.training
        model.eval()
        encoders = [accelerator.unwrap_model(e) for e in run.text_encoders]
        components = dict(vae=m.vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                          tokenizer=m.tokenizer, tokenizer_2=m.tokenizer_2)
        # LoRA keeps the frozen base weights in the mixed-precision dtype: the UNet then samples under autocast.
        lora_low_precision = args.rank is not None and m.weight_dtype != torch.float32
        images = generate_validation_images(
            components, model, args.validation_prompts, args.num_validation_images, args.resolution,
            args.num_validation_inference_steps, m.prediction_type, m.scheduler_config, args.seed,
            accelerator.device, autocast_dtype=m.weight_dtype if lora_low_precision else None)
        model.train(was_training)
        if m.ema_unet is not None:
            m.ema_unet.restore(model.parameters())
    if accelerator.is_main_process:
        save_validation_images(images, run.output_dir / "validation", run.global_step)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                for p_idx, (_, imgs) in enumerate(images):
                    tracker.writer.add_images(f"validation/prompt{p_idx}", np.stack([np.asarray(i) for i in imgs]),
                                              run.global_step, dataformats="NHWC")
    accelerator.wait_for_everyone()


def train(run: Run) -> None:
    """The epochs from the resumed position: ``training_step`` per micro-batch; per optimiser step the EMA,
    the metrics (progress bar, metrics.csv, trackers), checkpoints and validation on their schedules."""
    from tqdm.auto import tqdm

    args, accelerator = run.args, run.accelerator
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    run.log.info(f"examples={len(run.dataset)} epochs={run.num_epochs} steps={args.max_train_steps} "
                 f"batch/process={args.train_batch_size} total batch={total_batch} "
                 f"processes={accelerator.num_processes} mixed_precision={accelerator.mixed_precision} "
                 f"prediction_type={run.m.prediction_type} "
                 f"training={'LoRA rank ' + str(args.rank) if args.rank is not None else 'full UNet'} "
                 f"LPL={'on' if args.use_lpl else 'off'} "
                 f"(weight {args.lpl_weight}, t < {args.lpl_t_threshold}, from step {args.lpl_start})",
                 main_process_only=True)
    names = metric_names(args.lpl_num_blocks)
    step_metrics = StepMetrics(names)
    csv_file = MetricsCSV(run.output_dir / METRICS_CSV, names, run.resume_step) if accelerator.is_main_process else None
    trace = SampleTrace(accelerator.process_index)
    progress = tqdm(range(args.max_train_steps), initial=run.global_step, desc="steps",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    run.start_time = time.time()
    micro = 0  # micro-batch within the current optimiser step
    first_epoch = run.global_step // run.updates_per_epoch
    for epoch in range(first_epoch, run.num_epochs):
        if run.done:
            break
        # The sampler permutes epoch e with seed + e; the dataset draws augmentations per (epoch, example).
        run.dataloader.set_epoch(epoch)
        run.dataset.set_epoch(epoch)
        batches = run.dataloader
        if run.resume_step is not None and epoch == first_epoch:
            skip = (run.resume_step - first_epoch * run.updates_per_epoch) * args.gradient_accumulation_steps
            if skip > 0:
                batches = accelerator.skip_first_batches(run.dataloader, skip)
        for batch in batches:
            training_step(run, batch, epoch, micro, step_metrics, trace)
            if not accelerator.sync_gradients:
                micro += 1
                continue
            micro = 0
            end_step(run, epoch, step_metrics, progress, csv_file)
            if run.done:
                break
        # diffusers' schedule: after epochs 0, N, 2N, ... (the end of training validates anyway).
        if args.validation_epochs and epoch % args.validation_epochs == 0 and not run.done:
            validate(run)
    progress.close()


def save_outputs(run: Run, repo_id: str | None) -> None:
    """The final save: the pipeline or LoRA weights (``save_final_model``), the loss plot, the model card."""
    args, accelerator = run.args, run.accelerator
    unet_state = accelerator.get_state_dict(run.unet) if is_fsdp(accelerator) else None  # collective: every process
    if not accelerator.is_main_process:
        return
    save_final_model(args, accelerator, run.m, run.unet, run.output_dir, unet_state)
    plot_loss_curves(run.output_dir / METRICS_CSV, run.output_dir / LOSS_PLOT)
    if repo_id is not None:
        write_model_card(args, run.output_dir, repo_id, args.pretrained_model_name_or_path or run.m.model_path)
    saved = (f"{LORA_WEIGHT_NAME} (load into {run.m.model_path} with load_lora_weights)" if args.rank is not None
             else "pipeline")
    run.log.info(f"done: {run.global_step} steps in {time.time() - run.start_time:.1f}s; {saved}, {METRICS_CSV}, "
                 f"{LOSS_PLOT} and validation images in {run.output_dir}", main_process_only=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_launch()
    accelerator, log = start_run(args)
    # Before any model is loaded: what FSDP cannot do, the Hub repository (network, token), then the data.
    check_distributed_setup(args, accelerator)
    repo_id = prepare_hub_repo(args, accelerator)
    source = ImageCaptionSource(args)
    # Models: loaded, frozen or given adapters, placed, cast; checkpoints in the diffusers layout.
    m = load_models(args, accelerator, log)
    params = setup_models(args, accelerator, m)
    register_checkpoint_hooks(accelerator, args, m)
    # Data, optimiser and schedule, wrapped by accelerate; then the state of the checkpoint resumed from.
    run = prepare_training(args, accelerator, log, m, source, params)
    resume(run)
    train(run)
    accelerator.wait_for_everyone()
    validate(run)
    save_outputs(run, repo_id)
    accelerator.end_training()
    if repo_id is not None:
        # The last step: everything above is on disk whether or not the upload succeeds.
        push_output_to_hub(args, repo_id, run.output_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
