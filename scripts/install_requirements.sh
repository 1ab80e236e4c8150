#!/usr/bin/env bash
# Install requirements.txt with the given pip (default: pip): scripts/test.sh, scripts/serve.sh
# (through test.sh's .venv) and the Dockerfile call this.
#
# sam2 (SAM 2.1, stable_sam/sam2_base.py) is published as an sdist only, whose setup.py imports
# torch and by default compiles an optional CUDA extension (connected components for its video
# post-processing, which the image path never calls). Built with pip's default build isolation it
# would download a torch of its own into the build environment, and with nvcc around it would
# compile. So: everything else first, then sam2 without build isolation (with this
# environment's setuptools), without its CUDA extension and without dependencies (all of them
# are pinned in requirements.txt and installed by the first step).
set -euo pipefail
PIP="${1:-pip}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUIREMENTS="$ROOT/requirements.txt"

sam2_pin="$(grep -E '^sam2==' "$REQUIREMENTS" | cut -d' ' -f1)"
rest="$(mktemp)"
trap 'rm -f "$rest"' EXIT
grep -vE '^sam2==' "$REQUIREMENTS" > "$rest"
"$PIP" install --quiet -r "$rest"
SAM2_BUILD_CUDA=0 "$PIP" install --quiet --no-build-isolation --no-deps "$sam2_pin"
