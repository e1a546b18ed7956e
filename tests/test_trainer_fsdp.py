"""train_sdxl_lpl.py under FSDP: the parts a CPU can run.

accelerate (1.15) enables FSDP only on accelerator devices (CUDA, NPU, XPU, ...), so ``accelerate launch``
with an FSDP config cannot run the trainer on this CPU-only machine. What the CPU can run is torch's
FSDP2 itself (``fully_shard`` over gloo), which is what accelerate's ``fsdp_version: 2`` applies:

- two gloo processes shard the tiny SDXL UNet the way accelerate's FSDP2 does (each transformer and
  resnet block, then the root), with the frozen VAE and the LPL objective left outside; one training step
  through the trainer's ``compute_losses`` gives the unsharded gradients and weights;
- the full state dict gathered from the shards (what ``accelerator.get_state_dict`` returns) becomes a
  ``unet/`` folder through the trainer's ``unet_from_state_dict`` (the checkpoint hook and the final save)
  that loads with ``from_pretrained``;
- validation images sampled by every process with the sharded UNet (the trainer's FSDP validation) equal
  the unsharded ones;
- and the setups the FSDP path refuses fail before any model loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_sdxl_lpl as tr  # noqa: E402
from lpl_ext.demo import tiny_sdxl as ts  # noqa: E402
from test_train_sdxl_lpl import _env, free_port, tiny_cache  # noqa: E402,F401


def _fake_accelerator(fsdp2: bool):
    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=fsdp2)


@pytest.mark.parametrize("argv, fsdp2, message", [
    ([], False, "set fsdp_version: 2 in the accelerate config"),
    (["--use_ema"], True, "--use_ema is not supported with FSDP"),
    (["--rank", "4"], True, "--rank (LoRA) is not supported with FSDP"),
])
def test_fsdp_refusals_name_the_setting(argv, fsdp2, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        tr.check_distributed_setup(tr.parse_args(argv), _fake_accelerator(fsdp2))
    tr.check_distributed_setup(tr.parse_args([]), _fake_accelerator(True))  # plain FSDP2 full fine-tune: fine
    tr.check_distributed_setup(tr.parse_args(argv), SimpleNamespace(distributed_type="MULTI_GPU"))  # not FSDP


_PLUGIN_PROBE = """
import json, os
from accelerate.utils import FullyShardedDataParallelPlugin
p = FullyShardedDataParallelPlugin()
print("PLUGIN", json.dumps({"version": p.fsdp_version, "classes": p.transformer_cls_names_to_wrap,
                            "reshard": bool(p.reshard_after_forward), "state_dict": str(p.state_dict_type),
                            "use_fsdp": os.environ.get("ACCELERATE_USE_FSDP")}))
"""


def test_readme_fsdp_config_is_what_accelerate_reads(tmp_path):
    """The accelerate config of docs/training.md, through `accelerate launch`, gives the FSDP plugin the trainer expects:
    FSDP2, the UNet's transformer and resnet blocks as units, sharded checkpoints."""
    import re

    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    config = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    assert "distributed_type: FSDP" in config
    (tmp_path / "fsdp.yaml").write_text(config)
    (tmp_path / "probe.py").write_text(_PLUGIN_PROBE)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp.yaml"),
           "--num_processes", "1", "--main_process_port", str(free_port()), str(tmp_path / "probe.py")]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PLUGIN ")), None)
    assert line is not None, proc.stderr[-3000:]
    plugin = json.loads(line[len("PLUGIN "):])
    assert plugin == {"version": 2, "classes": ["BasicTransformerBlock", "ResnetBlock2D"], "reshard": True,
                      "state_dict": "StateDictType.SHARDED_STATE_DICT", "use_fsdp": "true"}


def _worker(out: Path) -> None:
    """One of two gloo processes (started by torch.distributed.run)."""
    import copy

    import torch.distributed as dist
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    path = ts.ensure_tiny_sdxl()
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    reference = copy.deepcopy(unet)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    vae.requires_grad_(False)
    for module in unet.modules():  # accelerate's FSDP2 wrap policy for these block classes, then the root
        if isinstance(module, (BasicTransformerBlock, ResnetBlock2D)):
            fully_shard(module, mesh=mesh)
    fully_shard(unet, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in unet.parameters())

    args = tr.parse_args(["--lpl_t_threshold", "1000"])  # LPL on every sample
    objective = tr.build_lpl_objective(args, vae)  # built on the plain VAE: outside the sharded module
    assert not list(objective.parameters()) and not any(isinstance(p, DTensor) for p in vae.parameters())
    sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    g = torch.Generator().manual_seed(0)  # the same batch on both processes: the averaged gradient is the
    batch = dict(batch_latents=torch.randn(2, 4, 8, 8, generator=g),  # single-process one
                 noise=torch.randn(2, 4, 8, 8, generator=g), prompt_embeds=torch.randn(2, 77, 64, generator=g),
                 pooled_embeds=torch.randn(2, 32, generator=g),
                 add_time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
    losses, grads = [], []
    for model in (unet, reference):
        # SGD: the update is lr * gradient, so equal gradients give equal weights (Adam's first step,
        # g / (|g| + eps), would amplify rounding in near-zero gradients).
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss, metrics = tr.compute_losses(unet=model, **batch, noise_scheduler=sched, prediction_type="epsilon",
                                          args=args, lpl_objective=objective, global_step=0,
                                          alphas_cumprod=sched.alphas_cumprod.float(),
                                          generator=torch.Generator().manual_seed(1))
        assert float(metrics["lpl_applied_ratio"]) == 1.0
        loss.backward()
        grads.append({n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                      for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        losses.append(float(loss))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(reference.parameters()))
    scale = max(float(g.abs().max()) for g in grads[1].values())
    full = get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result = {"rank": rank, "losses": losses, "grad_scale": scale,
              "max_grad_diff": max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[1])}
    if rank == 0:
        ref_state = reference.state_dict()
        assert full.keys() == ref_state.keys()
        result["max_weight_diff"] = max(float((full[k] - ref_state[k]).abs().max()) for k in full)
        tr.unet_from_state_dict(reference.config, full).save_pretrained(str(out / "unet"))
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref_state.items()}, str(out / "reference.safetensors"))

    components = dict(vae=vae, text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
                      text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"),
                      tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                      tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
    prompts = ["a large red circle on a white background"]
    images = {}
    for name, model in (("sharded", unet), ("reference", reference)):
        model.eval()
        out_images = tr.generate_validation_images(components, model, prompts, 1, 64, 2, "epsilon",
                                                   dict(sched.config), 0, "cpu")
        images[name] = np.asarray(out_images[0][1][0], dtype=np.int16)
    result["max_image_diff"] = int(np.abs(images["sharded"] - images["reference"]).max())
    result["image_std"] = float(images["reference"].std())
    (out / f"result{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_sharded_unet_trains_saves_and_samples_like_the_unsharded_one(tmp_path, tiny_cache):
    env = _env(tiny_cache)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, "--worker", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        sharded_loss, plain_loss = r["losses"]
        assert sharded_loss == pytest.approx(plain_loss, rel=1e-5)
        # Sampled by both processes with the sharded UNet: the unsharded pipeline's image.
        assert r["max_image_diff"] <= 1 and r["image_std"] > 0
        # The averaged gradient of the two shards' processes is the single-process gradient (to rounding).
        assert r["max_grad_diff"] <= 1e-5 * r["grad_scale"]
    assert results[0]["max_weight_diff"] < 1e-6  # after one SGD step on it

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    saved = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")).state_dict()
    reference = load_file(str(tmp_path / "reference.safetensors"))
    assert saved.keys() == reference.keys()
    assert all(torch.allclose(saved[k], reference[k], atol=1e-6) for k in saved)


if __name__ == "__main__" and "--worker" in sys.argv:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
