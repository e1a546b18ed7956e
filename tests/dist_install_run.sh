#!/usr/bin/env bash
# lpl_ext as a user installs it from a package index: an sdist, then
#   1. the sdist installed into a fresh virtual environment on a machine without nvcc
#      (NVCC pointed at nothing): the module imports, ships the kernel sources, no cubins,
#      and NVRTC (when one is installed for the tests) compiles every kernel from them;
#   2. a wheel built from that sdist (with cubins where nvcc exists), repaired into a
#      manylinux wheel by auditwheel, installed into a second fresh environment with NumPy
#      1.x: contents checked, and the kernel tests run against the installed package.
# Every check runs from outside the checkout, so the source folder cannot shadow the
# installed package.
#
# usage: tests/dist_install_run.sh        env: PYTHON (default python), KEEP_DIST_DIR=1,
#   DIST_REBUILD_CUBINS=1 (run nvcc on the sdist instead of reusing the checkout's cubins of the same sources)
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
WORK="$(mktemp -d /tmp/lpl_dist.XXXXXX)"
cleanup() { [ "${KEEP_DIST_DIR:-0}" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
log() { echo "[dist] $*" >&2; }

log "building the sdist"
(cd "$REPO" && "$PY" -m build --sdist --no-isolation --outdir "$WORK/dist" >"$WORK/sdist.log" 2>&1) \
    || { tail -40 "$WORK/sdist.log" >&2; exit 1; }
SDIST=$(ls "$WORK"/dist/lpl_ext-*.tar.gz)
log "checking $(basename "$SDIST") holds every source the build needs"
"$PY" - "$SDIST" "$REPO" <<'EOF'
import sys, tarfile
from pathlib import Path
sdist, repo = sys.argv[1], Path(sys.argv[2])
names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
need = {str(p.relative_to(repo)) for p in (repo / "csrc").rglob("*") if p.suffix in (".c", ".h", ".cu", ".cuh")}
need |= {"setup.py", "pyproject.toml", "lpl_ext/_kernel_sources.py", "lpl_ext/_cuda.py", "README.md"}
need |= {"lpl_ext/demo/__init__.py", "lpl_ext/demo/assets/tiny_vae.safetensors",
         "lpl_ext/demo/assets/tiny_sdxl_base.safetensors",  # the offline demo's weights
         "lpl_ext/demo/assets/tiny_vae_textures.safetensors",  # and the texture pipeline's
         "lpl_ext/demo/assets/tiny_sdxl_textures_base.safetensors"}
missing = sorted(need - names)
junk = sorted(n for n in names if n.endswith((".so", ".o", ".cubin")) or "/_kernels/" in n or "__pycache__" in n)
print(f"[dist] sdist: {len(names)} files, missing {missing or 'nothing'}, build outputs {junk or 'none'}", file=sys.stderr)
sys.exit(1 if missing or junk else 0)
EOF

fresh_venv() {  # fresh_venv DIR: a new environment with the build tools the sdist asks for
    "$PY" -m venv "$1"
    "$1/bin/python" -m pip install -q --upgrade pip >/dev/null
}

NVRTC_LIB=""
for site in "$REPO"/.ci-nvrtc/*; do
    lib=$(ls "$site"/nvidia/*/lib/libnvrtc.so.* 2>/dev/null | grep -v -e builtins -e '\.alt\.' | head -1 || true)
    [ -n "$lib" ] && NVRTC_LIB="$lib"
done

log "1/2: pip install of the sdist without nvcc, into a fresh environment"
fresh_venv "$WORK/venv-nonvcc"
NVCC=/nonexistent/nvcc "$WORK/venv-nonvcc/bin/python" -m pip install -q "$SDIST" >"$WORK/install1.log" 2>&1 \
    || { tail -40 "$WORK/install1.log" >&2; exit 1; }
(cd "$WORK" && LPL_EXT_NVRTC="$NVRTC_LIB" LPL_EXT_CACHE_DIR="$WORK/cache" "$WORK/venv-nonvcc/bin/python" - <<'EOF'
import os, re, sys
import lpl_ext
from lpl_ext import _C, _cuda
info = lpl_ext.build_info()
print(f"[dist] no-nvcc install: {lpl_ext.__file__}", file=sys.stderr)
assert "/venv-nonvcc/" in lpl_ext.__file__, lpl_ext.__file__
assert info["cuda_cubin_archs"] == [] and info["cuda_kernel_sources"] is True, info
sources, folder = _cuda.kernel_sources()
assert "_kernels" in str(folder), folder
if os.environ.get("LPL_EXT_NVRTC"):
    image, path = _cuda.compile_cached(90)
    names = {m.decode() for m in re.findall(rb"lpl_(?:v1_)?(?:fd|om|scale)_[a-z0-9_]+", image)}
    assert set(_C.cuda_kernel_names()) <= names
    print(f"[dist] NVRTC {info['nvrtc']} compiled every kernel for sm_90 from the installed sources "
          f"({len(image)} bytes)", file=sys.stderr)
else:
    print("[dist] no NVRTC installed for the tests: compilation from the installed sources not checked",
          file=sys.stderr)
EOF
)

NVCC_BIN=$(command -v nvcc || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; } || true)
log "2/2: a wheel built from the sdist${NVCC_BIN:+ with $NVCC_BIN}, repaired by auditwheel, installed into a fresh environment with NumPy 1.x"
# nvcc for 7 architectures takes minutes: the checkout's cubins are reused when its build made
# them from the same kernel sources with the same nvcc (setup.py checks both;
# DIST_REBUILD_CUBINS=1 runs nvcc on the sdist's sources instead). Whether the sdist's kernel
# sources compile is checked by NVRTC in step 1 and by the sdist check above.
REUSE=""
[ "${DIST_REBUILD_CUBINS:-0}" = 1 ] || [ ! -f "$REPO/lpl_ext/_kernels/manifest.json" ] || REUSE="$REPO/lpl_ext/_kernels"
LPL_EXT_REUSE_CUBINS_FROM="$REUSE" "$PY" -m pip wheel -v --no-deps "$SDIST" -w "$WORK/wheels" >"$WORK/wheel.log" 2>&1 \
    || { tail -40 "$WORK/wheel.log" >&2; exit 1; }
grep -E "lpl_ext build\] (sm_[0-9]+: cubin .* reused|building with CUDA)" "$WORK/wheel.log" | sed 's/^ */[dist] /' >&2 || true
"$PY" -m auditwheel repair "$WORK"/wheels/lpl_ext-*.whl -w "$WORK/wheelhouse" >"$WORK/repair.log" 2>&1 \
    || { tail -40 "$WORK/repair.log" >&2; exit 1; }
WHEEL=$(ls "$WORK"/wheelhouse/lpl_ext-*manylinux*.whl)
fresh_venv "$WORK/venv-wheel"
"$WORK/venv-wheel/bin/python" -m pip install -q torch==2.13.0 "numpy==${DIST_NUMPY1:-1.26.4}" pytest "$WHEEL" \
    >"$WORK/install2.log" 2>&1 || { tail -40 "$WORK/install2.log" >&2; exit 1; }
(cd "$WORK" && EXPECT_CUBINS="${NVCC_BIN:+1}" "$WORK/venv-wheel/bin/python" - "$WHEEL" <<'EOF'
import os, re, sys, zipfile
from pathlib import Path
import numpy
import lpl_ext
from lpl_ext import _C
info = lpl_ext.build_info()
assert "/venv-wheel/" in lpl_ext.__file__, lpl_ext.__file__
assert numpy.__version__.startswith("1."), numpy.__version__
if os.environ.get("EXPECT_CUBINS"):
    assert {"80", "86", "89", "90"} <= set(info["cuda_cubin_archs"]), info
kdir = Path(lpl_ext.__file__).parent / "_kernels"
for arch in info["cuda_cubin_archs"]:
    names = {m.decode() for m in re.findall(rb"lpl_(?:v1_)?(?:fd|om|scale)_[a-z0-9_]+", (kdir / f"lpl_kernels.sm_{arch}.cubin").read_bytes())}
    assert set(_C.cuda_kernel_names()) <= names, arch
wheel = Path(sys.argv[1])
entries = zipfile.ZipFile(wheel).namelist()
junk = [n for n in entries if n.startswith(("tests/", "csrc/", "benchmarks/", "tools/")) or n.endswith((".o", ".c", ".pyc"))]
assert not junk, junk
assert info["revision"] != "unknown", info
# the offline demo finds its weights inside the installed package (package data of lpl_ext.demo)
from lpl_ext.demo import tiny_sdxl
assets = [tiny_sdxl.tiny_vae_weights_path(), tiny_sdxl.tiny_base_weights_path()]
assert all(p.is_file() and "/venv-wheel/" in str(p) for p in assets), assets
print(f"[dist] wheel {wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB, {len(entries)} files, cubins "
      f"{', '.join('sm_' + a for a in info['cuda_cubin_archs']) or 'none'} (nvcc {info['cuda_cubin_toolkit']}), "
      f"revision {info['revision']}, numpy {numpy.__version__}", file=sys.stderr)
EOF
)
log "the kernel tests against the installed wheel (NumPy 1.x), from outside the checkout"
(cd "$WORK" && LPL_EXT_EXPECT_INSTALLED="$WORK/venv-wheel" "$WORK/venv-wheel/bin/python" -m pytest -q \
    -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO" \
    "$REPO/tests/test_feature_distance.py" "$REPO/tests/test_outlier_mask.py" "$REPO/tests/test_exact_zero.py" \
    "$REPO/tests/test_nonfinite.py" "$REPO/tests/test_diagnostics.py")
log "passed in $(( $(date +%s) - start )) s"
