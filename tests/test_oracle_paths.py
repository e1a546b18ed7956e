"""The float64 parity tests hold when the oracle takes another torch path than the module.

Another CPU picks other convolution algorithms, blockings and summation orders than the
one a test was written on; tests that compare two torch paths at ``atol=0`` then fail
there (a few ulp on elements near zero). ``LPL_TEST_ORACLE_PATH`` (tests/reference_lpl.py)
forces the oracles of the parity tests onto another path on this machine, so that a
tolerance that only holds for one summation order fails here, not on a user's machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference_lpl import ORACLE_PATH_ENV, blob_vae, plain_decoder_features
from test_module_parity import blob_latents
from tolerance import assert_close_to_scale

TESTS = Path(__file__).parent
PARITY_FILES = ("test_module_parity.py", "test_lpl_loss.py", "test_dropin.py", "test_objective.py")


def test_channels_last_oracle_really_takes_another_summation_order(monkeypatch):
    """The forced path is not a no-op: float64 decoder features differ in their last bits
    from the module's path (so the run below tests something), by ulps of the tensor's
    magnitude only."""
    vae = blob_vae("sdxl_like")
    x, _ = blob_latents(vae)
    z = x.detach() / vae.config.scaling_factor
    monkeypatch.delenv(ORACLE_PATH_ENV, raising=False)
    plain = plain_decoder_features(vae, z, 4)
    monkeypatch.setenv(ORACLE_PATH_ENV, "channels_last")
    forced = plain_decoder_features(vae, z, 4)
    assert forced[0].is_contiguous(memory_format=torch.channels_last)
    assert any(not torch.equal(a, b) for a, b in zip(plain, forced))
    for i, (a, b) in enumerate(zip(forced, plain)):
        assert_close_to_scale(a, b, rtol=1e-13, what=f"layer {i} features")


def test_unknown_oracle_path_is_refused(monkeypatch):
    monkeypatch.setenv(ORACLE_PATH_ENV, "nchw_please")
    with pytest.raises(ValueError, match=ORACLE_PATH_ENV):
        plain_decoder_features(blob_vae("sdxl_like"), torch.zeros(1, 4, 4, 4, dtype=torch.float64), 1)


ORACLE_PATHS = ("channels_last", "no_mkldnn")


@pytest.fixture(scope="module")
def parity_runs():
    """{path: (returncode, stdout, stderr)} of the parity files run with every oracle forced
    onto each path: the two pytest processes run side by side, one thread each (their
    tensors are small: a second thread gains them little, a second process half the wall)."""
    procs = {}
    for path in ORACLE_PATHS:
        env = dict(os.environ, OMP_NUM_THREADS="1", **{ORACLE_PATH_ENV: path})
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(str(TESTS / f) for f in PARITY_FILES)]
        procs[path] = subprocess.Popen(cmd, env=env, cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    results = {}
    for path, proc in procs.items():
        out, err = proc.communicate()
        results[path] = (proc.returncode, out, err)
    return results


@pytest.mark.parametrize("path", ORACLE_PATHS)
def test_parity_suites_pass_with_the_oracle_on_another_path(path, parity_runs):
    """module parity, lpl_loss, drop-in and objective, with every oracle forced onto
    ``path`` (channels_last changes float64 summation orders; no_mkldnn the float32
    convolutions)."""
    returncode, stdout, stderr = parity_runs[path]
    assert returncode == 0, stdout[-6000:] + stderr[-2000:]
