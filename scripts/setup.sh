#!/usr/bin/env bash
# Create .venv and install neuralhead into it.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --dev    runtime + test tools
# On a CUDA machine set TORCH_SPEC (for example "torch==2.13.0") to the build you want;
# the default is the build pip resolves for torch==2.13.0 on this platform.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${pip[@]}" install "$TORCH_SPEC"
fi
"${pip[@]}" install -e ".${extra}"
# mediapipe 0.10.21 is the last release that ships its face models; its metadata pins
# numpy<2 / protobuf<5, which we override (it runs with the versions installed above).
"${pip[@]}" install --no-deps "mediapipe==0.10.21"
echo "neuralhead installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
