"""Two-process DDP on CPU (gloo) with LPLObjective inside the DDP-wrapped training module:
no unused/frozen-parameter failure (the VAE is not a submodule), identical synchronized
gradients, and ranks that do and do not apply LPL in the same step."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrainStep(nn.Module):
    """A toy denoiser plus the LPL objective, wrapped as one module, the way a trainer that
    'prepares' its loss module would do it."""

    def __init__(self, vae):
        super().__init__()
        from lpl_ext import LPLObjective

        self.denoiser = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 4, 3, padding=1))
        self.lpl = LPLObjective(vae, t_threshold=200, snr_gamma=5.0, scale=True)

    def forward(self, latents, noise, timesteps, alphas_cumprod, global_step):
        ac = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = ac.sqrt() * latents + (1 - ac).sqrt() * noise
        pred = self.denoiser(noisy)
        diffusion = ((pred - noise) ** 2).mean()
        lpl, logs = self.lpl(pred, noisy, latents, timesteps, prediction_type="epsilon",
                             alphas_cumprod=alphas_cumprod, global_step=global_step)
        return diffusion + 0.5 * lpl, logs


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from reference_lpl import tiny_vae

        vae = tiny_vae("sdxl_like", seed=0)
        torch.manual_seed(0)  # identical initial denoiser on both ranks
        step_module = TrainStep(vae)
        ddp = nn.parallel.DistributedDataParallel(step_module)  # find_unused_parameters=False
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-2)
        alphas_cumprod = torch.linspace(0.9999, 0.01, 1000)
        g = torch.Generator().manual_seed(100 + rank)
        applied = []
        for step in range(STEPS):
            latents = torch.randn(2, 4, 4, 4, generator=g)
            noise = torch.randn(2, 4, 4, 4, generator=g)
            # rank 0 always has a sample below the threshold; rank 1 only on odd steps
            if rank == 0 or step % 2 == 1:
                timesteps = torch.tensor([50, 700])
            else:
                timesteps = torch.tensor([400, 900])
            # this rank's own gradient, without DDP: the synchronized one must be the mean
            local_loss, _ = step_module(latents, noise, timesteps, alphas_cumprod, step)
            local_grads = torch.autograd.grad(local_loss, list(step_module.parameters()))
            loss, logs = ddp(latents, noise, timesteps, alphas_cumprod, step)
            opt.zero_grad()
            loss.backward()
            applied.append(float(logs["lpl_num_samples"]))
            grads = [p.grad.detach().clone() for p in ddp.parameters()]
            opt.step()
        torch.save({"grads": grads, "local_grads": [g.detach() for g in local_grads],
                    "params": [p.detach() for p in ddp.parameters()], "applied": applied,
                    "vae_grads": [p.grad for p in vae.parameters()],
                    "ddp_param_count": sum(1 for _ in ddp.parameters())},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_with_the_objective_in_the_loss(tmp_path, monkeypatch):
    # Idle OpenMP workers of two processes sharing two cores must not spin.
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["applied"] == [1.0, 1.0, 1.0] and r1["applied"] == [0.0, 1.0, 0.0]
    assert r0["ddp_param_count"] == 4  # the denoiser's two convs; no VAE parameter
    for a, b, l0, l1 in zip(r0["grads"], r1["grads"], r0["local_grads"], r1["local_grads"]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)  # allreduced
        # ... to the mean of the two ranks' own gradients (rank 1 applies no LPL in the last
        # step, rank 0 does: the two differ, so a missing or wrong allreduce shows)
        assert not torch.allclose(l0, l1, rtol=1e-3)
        torch.testing.assert_close(a, (l0 + l1) / 2, rtol=1e-5, atol=1e-8 * float(a.abs().max()))
    for a, b in zip(r0["params"], r1["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(g is None for g in r0["vae_grads"] + r1["vae_grads"])
