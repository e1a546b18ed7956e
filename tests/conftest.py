"""Shared pytest setup: tests import their plain-PyTorch oracles from this folder."""

import os
import sys
from pathlib import Path

import pytest

# Idle OpenMP threads sleep instead of spinning. The suite runs multi-process tests
# (accelerate launch, DDP) on a couple of cores, where spinning workers of one process
# starve the others (10-50x slower). Set before torch or lpl_ext load their OpenMP
# runtimes; child processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).parent))

# tests/dist_install_run.sh runs tests against an installed wheel: make sure that is the
# lpl_ext imported, not a checkout's
if os.environ.get("LPL_EXT_EXPECT_INSTALLED"):
    import lpl_ext

    if not os.path.abspath(lpl_ext.__file__).startswith(os.path.abspath(os.environ["LPL_EXT_EXPECT_INSTALLED"])):
        raise RuntimeError(f"testing {lpl_ext.__file__}, not the package installed in $LPL_EXT_EXPECT_INSTALLED")


def pytest_collection_modifyitems(config, items):
    """A test module may thin its own quick subset with ``deselect_in_quick_mode(item)``
    (tests/test_cuda_emulated.py does, for the frozen v1 kernels): those tests are reported
    as deselected."""
    keep, drop = [], []
    for item in items:
        rule = getattr(getattr(item, "module", None), "deselect_in_quick_mode", None)
        (drop if rule is not None and rule(item) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def nvrtc_cache(tmp_path_factory):
    """One NVRTC compile cache ($LPL_EXT_CACHE_DIR) for the whole session: an NVRTC compile
    of every kernel takes tens of seconds, and tests/test_cuda_loader.py and
    tests/test_nvrtc_retry.py load the same images (same sources, target and NVRTC), so each
    is compiled once. test_nvrtc_compiles_every_kernel_for_sm90 always compiles for real
    (and leaves its cubin here); test_nvrtc_path_end_to_end compiles the only sm_75 image
    (into an empty cache). $LPL_EXT_TEST_NVRTC_CACHE names a folder that outlives the
    session: .ci/run empties it, the main test run fills it, and tests/sanitize_run.sh then
    loads those images instead of compiling them again under ASan."""
    shared = os.environ.get("LPL_EXT_TEST_NVRTC_CACHE")
    if shared:
        Path(shared).mkdir(parents=True, exist_ok=True)
        return Path(shared)
    return tmp_path_factory.mktemp("nvrtc_cache")
