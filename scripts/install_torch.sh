#!/usr/bin/env bash
# Install PyTorch into the given interpreter's environment, the build a user expects:
#  - torch already present: keep it;
#  - a CUDA machine (nvidia-smi answers): the default CUDA build from the package index;
#  - no CUDA: the CPU build of torch==2.13.0, first from local wheels (pip's find-links),
#    else from PyTorch's CPU index. Never the multi-GB CUDA build on a CPU-only machine.
# Writes a pip constraints file pinning the installed version so later installs keep it.
set -euo pipefail
PY="$1"
CONSTRAINT="$2"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[install] CUDA device found: installing the CUDA build of torch"
    "$PY" -m pip install "torch==${TORCH_VERSION}" || "$PY" -m pip install torch
  elif "$PY" -m pip install --no-index --no-deps "torch==${TORCH_VERSION}" 2>/dev/null; then
    echo "[install] no CUDA: CPU build of torch ${TORCH_VERSION} from local wheels"
    "$PY" -m pip install "torch==${TORCH_VERSION}"   # its small dependencies
  else
    echo "[install] no CUDA: CPU build of torch ${TORCH_VERSION} from the PyTorch CPU index"
    "$PY" -m pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_CPU_INDEX" \
      --extra-index-url "$("$PY" -m pip config get global.index-url 2>/dev/null || echo https://pypi.org/simple)"
  fi
fi
"$PY" -c "import torch; v=torch.__version__.split('+')[0]; print(f'torch=={v}')" > "$CONSTRAINT"
echo "[install] $(cat "$CONSTRAINT") ($("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")'))"
