#!/usr/bin/env bash
# The test suite on the OLDEST supported stack: torch 2.11.0 + triton 3.6.0 (the H200
# machine's versions), numpy < 2.4 (triton 3.6's interpreter), setuptools 81 (the newest
# that stack allows; checks the pyproject.toml editable build path).
#
# Each stack builds resnet_fused._C in place, against its own torch, so this one runs in a
# copy of the tree (tracked and untracked-not-ignored files) instead of beside .venv's build.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${RESNET_FUSED_OLDEST_DIR:-${TMPDIR:-/tmp}/resnet_fused-oldest-stack}
rm -rf "$DEST"
mkdir -p "$DEST"
git ls-files -z -co --exclude-standard | tar --null -cf - -T - | tar -xf - -C "$DEST"
cd "$DEST"
# Its own compile caches (see .ci/run): nothing shared with the newer stack's run.
export TORCHINDUCTOR_CACHE_DIR="$DEST/.cache/inductor" TORCH_EXTENSIONS_DIR="$DEST/.cache/torch_extensions"
python3 -m venv .venv
.venv/bin/pip install -q torch==2.11.0 triton==3.6.0 torchvision==0.26.0 timm==1.0.31 transformers==5.23.0 "numpy<2.4" "setuptools==81.*" ninja
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} .venv/bin/pip install -q --no-build-isolation -e ".[test,bench]"
.venv/bin/python -c "import torch, triton; print('oldest stack: torch', torch.__version__, 'triton', triton.__version__)"
.venv/bin/python -m pytest -q tests
