"""Executes every ```python block of README.md and docs/*.md, and checks what each one computed
against the plain-PyTorch oracles.

Each block runs unchanged. The lpl_ext classes it imports are replaced, for the run, by
subclasses that record every call (arguments and results) and otherwise do nothing
different, so that the losses, logs and gradients of every training step can be
recomputed independently: float64 z0_hat and SNR weights, the spec's mask and distance
(tests/reference.py) on the decoder's own blocks. Every block must have a checker: a new
block without one fails ``test_every_block_is_checked``, unless the line right before its
fence says why it cannot run here (``<!-- not run by the tests: needs ... -->``, e.g. a
block that loads SDXL from the Hub).
"""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F

import lpl_ext
from reference import ref_feature_distance, ref_outlier_mask
from test_module_parity import fixed_oracle, layer_stats
from tolerance import assert_close_to_scale

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*not run by the tests:\s*(\S.*?)\s*-->")


class Block(NamedTuple):
    page: str  # path relative to the repository root
    index: int  # position among the page's python blocks
    source: str
    not_run: Optional[str]  # the reason given in the page, for a block the tests cannot run

    @property
    def name(self) -> str:
        return f"{self.page}[python block {self.index}]"


def python_blocks(markdown: str, page: str = "<text>") -> List[Block]:
    """The page's ```python blocks, with the not-run reason of the line before the fence."""
    blocks = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", markdown, re.M | re.S):
        before = markdown[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = NOT_RUN.search(before)
        blocks.append(Block(page, len(blocks), m.group(1), reason.group(1) if reason else None))
    return blocks


ALL_BLOCKS = [block for path in PAGES
              for block in python_blocks(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
BLOCKS = [block for block in ALL_BLOCKS if block.not_run is None]

# LPLObjective's documented defaults (lpl_ext/objective.py)
OBJECTIVE_DEFAULTS = dict(loss_type="mse", norm_type="shared", pow_law=True, num_blocks=4, remove_outliers=True,
                          t_threshold=200, snr_gamma=None, scale=False, start_step=0)


# ---------------------------------------------------------------- recording subclasses

class Recorder:
    """Patches lpl_ext.LPLObjective / LatentPerceptualLoss with recording subclasses."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.objective_calls: List[Dict[str, Any]] = []
        self.loss_modules: List[Any] = []
        calls, modules = self.objective_calls, self.loss_modules

        class RecordingObjective(lpl_ext.LPLObjective):
            def __init__(self, vae, **kwargs):
                super().__init__(vae, **kwargs)
                object.__setattr__(self, "_recorded", (vae, dict(kwargs)))

            def forward(self, model_pred, noisy_latents, latents, timesteps, **kwargs):
                lpl, logs = super().forward(model_pred, noisy_latents, latents, timesteps, **kwargs)
                vae, options = self._recorded
                calls.append(dict(vae=copy.deepcopy(vae), options=options, model_pred=model_pred.detach().clone(),
                                  noisy_latents=noisy_latents.detach().clone(), latents=latents.detach().clone(),
                                  timesteps=timesteps.detach().clone(),
                                  kwargs={k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                          for k, v in kwargs.items()},
                                  lpl=lpl.detach().clone(), logs={k: v.detach().clone() for k, v in logs.items()}))
                return lpl, logs

        class RecordingLoss(lpl_ext.LatentPerceptualLoss):
            def __init__(self, vae, *args, **kwargs):
                super().__init__(vae, *args, **kwargs)
                modules.append((vae, args, kwargs))

        monkeypatch.setattr(lpl_ext, "LPLObjective", RecordingObjective)
        monkeypatch.setattr(lpl_ext, "LatentPerceptualLoss", RecordingLoss)


def run_block(source: str, name: str) -> Dict[str, Any]:
    namespace: Dict[str, Any] = {"__name__": name}
    exec(compile(source, name, "exec"), namespace)
    return namespace


# ---------------------------------------------------------------- oracles

def z0_hat_float64(model_pred, noisy_latents, timesteps, prediction_type, alphas_cumprod=None, sigmas=None):
    pred, zt = model_pred.double(), noisy_latents.double()
    if prediction_type == "sample":
        return pred
    if prediction_type == "flow_matching":
        return zt - sigmas.double().reshape(-1, 1, 1, 1) * pred
    ac = alphas_cumprod.double()[timesteps.long()].view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        return (zt - (1 - ac).sqrt() * pred) / ac.sqrt()
    return ac.sqrt() * zt - (1 - ac).sqrt() * pred


def snr_weights_float64(timesteps, gamma, prediction_type, alphas_cumprod=None, sigmas=None):
    if prediction_type == "flow_matching":
        s = sigmas.double().reshape(-1)
        snr = ((1 - s) / s) ** 2
        return snr.clamp(max=gamma) * s * s
    ac = alphas_cumprod.double()[timesteps.long()]
    snr = ac / (1 - ac)
    return snr.clamp(max=gamma) / {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[
        prediction_type]


def check_objective_call(call: Dict[str, Any], rtol: float = 2e-5) -> bool:
    """Recomputes one LPLObjective call; returns whether any sample was selected."""
    opts = dict(OBJECTIVE_DEFAULTS, **call["options"])
    kw = call["kwargs"]
    t = call["timesteps"].reshape(-1)
    logs = call["logs"]
    if kw.get("global_step", 0) < opts["start_step"]:
        assert float(call["lpl"]) == 0.0
        return False
    sel = torch.ones_like(t, dtype=torch.bool) if opts["t_threshold"] is None else t < opts["t_threshold"]
    assert float(logs["lpl_applied_ratio"]) == pytest.approx(sel.double().mean().item())
    assert float(logs["lpl_num_samples"]) == int(sel.sum())
    if not sel.any():
        assert float(call["lpl"]) == 0.0 and float(logs["lpl_loss"]) == 0.0
        return False
    sigmas = kw.get("sigmas")
    sel_sigmas = None if sigmas is None else sigmas.reshape(-1)[sel]
    z0_hat = z0_hat_float64(call["model_pred"][sel], call["noisy_latents"][sel], t[sel], kw["prediction_type"],
                            kw.get("alphas_cumprod"), sel_sigmas)
    vae = call["vae"]
    dtype = next(vae.parameters()).dtype
    layers = fixed_oracle(vae, z0_hat.to(dtype), call["latents"][sel].to(dtype), num_blocks=opts["num_blocks"],
                          norm=opts["norm_type"], loss_type=opts["loss_type"], pow_law=opts["pow_law"],
                          remove_outliers=opts["remove_outliers"])
    per_sample = sum(layer["loss"].detach() for layer in layers) / len(layers)
    if opts["scale"]:
        per_sample = per_sample * snr_weights_float64(t[sel], opts["snr_gamma"], kw["prediction_type"],
                                                      kw.get("alphas_cumprod"), sel_sigmas)
    want = per_sample.mean()
    assert float(call["lpl"]) == pytest.approx(float(want), rel=rtol)
    assert float(logs["lpl_loss"]) == pytest.approx(float(want), rel=rtol)
    for i, layer in enumerate(layers):
        assert float(logs[f"lpl_layer{i}_loss"]) == pytest.approx(float(layer["loss"].detach().mean()), rel=rtol)
        for key in ("mean", "std", "outlier_ratio"):
            assert float(logs[f"lpl_layer{i}_{key}"]) == pytest.approx(layer["stats"][key], rel=1e-5, abs=1e-6)
    return True


# ---------------------------------------------------------------- per-block checkers

def check_drop_in(ns: Dict[str, Any], rec: Recorder, out: str) -> None:
    """Drop-in LatentPerceptualLoss: per-sample loss, its gradient and the logged stats."""
    (vae, args, kwargs), = rec.loss_modules
    assert not args
    z0_hat, z0 = ns["z0_hat"], ns["z0"]
    layers = fixed_oracle(vae, z0_hat, z0, num_blocks=kwargs["num_mid_blocks"], norm=kwargs["norm_type"],
                          loss_type=kwargs["loss_type"], pow_law=kwargs["pow_law"],
                          remove_outliers=kwargs["remove_outliers"])
    want = sum(layer["loss"] for layer in layers) / len(layers)
    assert_close_to_scale(ns["per_sample"].detach().double(), want.detach(), rtol=2e-5)
    (want_grad,) = torch.autograd.grad(want.mean(), z0_hat)
    torch.testing.assert_close(z0_hat.grad.double(), want_grad.double(), rtol=1e-4,
                               atol=1e-4 * float(want_grad.abs().max()))
    for got, layer in zip(ns["stats"], layers):
        for key in ("mean", "std", "outlier_ratio"):
            assert float(got[key]) == pytest.approx(layer["stats"][key], rel=1e-5, abs=1e-6)


def check_training_loop(ns: Dict[str, Any], rec: Recorder, out: str) -> None:
    """The diffusers-style loop: every step's LPL term and logs, the total loss of the last
    step, and the printed logs."""
    calls = rec.objective_calls
    assert len(calls) == 3
    selected = [check_objective_call(call) for call in calls]
    # A loop whose batches never reach below t_threshold shows no LPL at all (and checks
    # nothing above): the snippet's seed must draw at least one such timestep.
    assert any(selected), ("README loop: no step has a timestep below t_threshold, LPL is never applied "
                           f"(timesteps {[c['timesteps'].tolist() for c in calls]})")
    torch.testing.assert_close(ns["loss"], ns["diffusion_loss"] + ns["lpl_weight"] * ns["lpl"])
    assert calls[-1]["lpl"].item() == ns["lpl"].item()
    printed = [line for line in out.splitlines() if re.match(r"^\d+ \{", line)]
    assert len(printed) == 3
    for step, (line, call) in enumerate(zip(printed, calls)):
        number, _, text = line.partition(" ")
        logged = ast.literal_eval(text)
        assert int(number) == step and logged["lpl_loss"] == round(call["logs"]["lpl_loss"].item(), 6)
        assert logged["lpl_applied_ratio"] == round(call["logs"]["lpl_applied_ratio"].item(), 6)


def check_loss_hook(ns: Dict[str, Any], rec: Recorder, out: str) -> None:
    """The loss hook of a flow-matching trainer: clean latents recovered from the target,
    the LPL term of the selected samples, the total."""
    (call,) = rec.objective_calls
    assert check_objective_call(call)
    torch.testing.assert_close(call["latents"], ns["z0"], rtol=0, atol=1e-5)  # predict_z0(target) = z0
    diffusion = F.mse_loss(ns["model_pred"].detach(), ns["eps"] - ns["z0"])
    assert_close_to_scale(ns["loss"].detach(), diffusion + ns["lpl_weight"] * call["lpl"], rtol=1e-6)


def check_kernels(ns: Dict[str, Any], rec: Recorder, out: str) -> None:
    """The kernel snippet: mask bit for bit, statistics, loss and gradient."""
    x, y, keep, stats, loss = ns["x"], ns["y"], ns["keep"], ns["stats"], ns["loss"]
    assert torch.equal(keep, ref_outlier_mask(y))
    want_stats = layer_stats(y, keep)
    for key in ("mean", "std", "outlier_ratio"):
        assert float(getattr(stats, key)) == pytest.approx(want_stats[key], rel=1e-9, abs=1e-12)
    x64 = x.detach().double().requires_grad_(True)
    want = ref_feature_distance(x64, y.double(), keep, norm="shared", distance="mse", weight=1.0)
    assert_close_to_scale(loss.detach().double(), want.detach(), rtol=1e-5)
    (want_grad,) = torch.autograd.grad(want.mean(), x64)
    torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-4, atol=1e-5 * float(want_grad.abs().max()))


CHECKERS: List[tuple[str, Callable[[str], bool], Callable]] = [
    ("kernels", lambda src: "lpl_ext.outlier_mask(y, return_stats=True)" in src
     and "lpl_ext.feature_distance(x, y, keep" in src, check_kernels),
    ("drop-in", lambda src: "LatentPerceptualLoss(vae" in src, check_drop_in),
    ("training loop", lambda src: "for global_step in range" in src and "LPLObjective(" in src, check_training_loop),
    ("loss hook", lambda src: "def compute_loss" in src and "predict_z0" in src, check_loss_hook),
]


def checker_for(source: str) -> Optional[Callable]:
    matches = [check for _, matches, check in CHECKERS if matches(source)]
    return matches[0] if len(matches) == 1 else None


# ---------------------------------------------------------------- tests

def test_the_pages_have_every_checked_snippet():
    """Each checker finds its snippet exactly once across README.md and docs/*.md: a moved
    snippet is still run, a deleted one fails here."""
    for name, matches, _ in CHECKERS:
        where = [block.name for block in BLOCKS if matches(block.source)]
        assert len(where) == 1, f"snippet {name!r}: found in {where or 'no page'}"
    joined = "\n".join(block.source for block in BLOCKS)
    assert "LatentPerceptualLoss" in joined and "LPLObjective" in joined and "predict_z0" in joined


def test_every_block_is_checked():
    """A snippet that only runs asserts nothing: each one has its checker (or says in the page
    why the tests cannot run it)."""
    for block in ALL_BLOCKS:
        if block.not_run is None:
            assert checker_for(block.source) is not None, f"{block.name} has no (or several) checker(s)"
    skipped = [block for block in ALL_BLOCKS if block.not_run is not None]
    assert len(skipped) <= 2, f"more blocks marked 'not run' than expected: {[b.name for b in skipped]}"


def test_not_run_marker_is_read():
    page = "text\n<!-- not run by the tests: needs the Hub -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    first, second = python_blocks(page)
    assert first.not_run == "needs the Hub" and first.source == "x = 1\n"
    assert second.not_run is None and second.source == "y = 2\n"


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b.page}-block{b.index}")
def test_snippet_runs_and_computes_the_right_values(block, capsys, monkeypatch):
    rec = Recorder(monkeypatch)
    ns = run_block(block.source, block.name)
    check = checker_for(block.source)
    assert check is not None
    check(ns, rec, capsys.readouterr().out)
