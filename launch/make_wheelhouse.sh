#!/usr/bin/env bash
# Build a wheelhouse for machines without network (the GPU suite, air-gapped clusters).
#
#   launch/make_wheelhouse.sh [DEST=.whl] [PYVER=3.12] [PLATFORM=manylinux2014_x86_64]
#
# Downloads binary wheels, without dependencies (the list below is already closed over what mff_ds,
# its tests and benchmarks import, minus torch and triton, which the target machine must have), for the
# given Python version and platform, at the versions installed in this environment ($PYTHON, default
# .venv/bin/python; unpinned if absent there). Packages published only as sdists (deepspeed, braceexpand
# at some versions) are built into pure-python wheels here (`pip wheel --no-deps --no-build-isolation`;
# deepspeed's setup imports torch, so $PYTHON must have it; DS_BUILD_OPS=0 keeps ops JIT-built).
# Copy DEST to the target and run there:
#   pip install --no-index --no-deps --target /tmp/site DEST/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
# (benchmarks/run_gpu_suite.sh does this itself, only for the distributions the machine lacks).
# torchvision must match the target's torch: the pinned one matches requirements.txt's torch.
# PKGS replaces the list, EXTRA adds to it (e.g. EXTRA="matplotlib contourpy cycler fonttools kiwisolver
# pyparsing python-dateutil six" for the throughput chart, "tensorboard ..." for training logs). The default
# list is about 45 MB, under the 64 MiB a device run may carry.
set -euo pipefail
DEST=${1:-${DEST:-.whl}}
PYVER=${2:-${PYVER:-3.12}}
PLATFORM=${3:-${PLATFORM:-manylinux2014_x86_64}}
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
ABI="cp${PYVER/./}"
PKGS=${PKGS:-"deepspeed hjson msgpack ninja psutil py-cpuinfo einops packaging nvidia-ml-py
pydantic pydantic-core annotated-types typing-inspection typing-extensions
webdataset braceexpand timm huggingface-hub safetensors pyyaml tqdm filelock fsspec
numpy pillow simplejpeg torchvision pytest pytest-timeout pluggy iniconfig pygments"}
PKGS="$PKGS ${EXTRA:-}"
mkdir -p "$DEST"
FREEZE=$("$PYTHON" -m pip freeze 2>/dev/null || true)
spec() {  # pkg -> pkg==version as installed here, or bare pkg
  local v
  v=$(printf '%s\n' "$FREEZE" | grep -i -E "^$(echo "$1" | sed 's/[-_]/[-_]/g')==" | head -1 || true)
  echo "${v:-$1}"
}
failed=""
for p in $PKGS; do
  s=$(spec "$p")
  if ! "$PYTHON" -m pip download --quiet --only-binary=:all: --no-deps --python-version "$PYVER" \
      --implementation cp --abi "$ABI" --abi abi3 --abi none --platform "$PLATFORM" \
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any -d "$DEST" "$s"; then
    echo "no binary wheel for $s: building a pure-python wheel from the sdist" >&2
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" "$s" || failed="$failed $s"
  fi
done
ls -1 "$DEST"/*.whl | sed 's#.*/##'
if [ -n "$failed" ]; then echo "FAILED:$failed" >&2; exit 1; fi
echo "wheelhouse ready: $DEST ($(ls "$DEST"/*.whl | wc -l) wheels for Python $PYVER, $PLATFORM)"
