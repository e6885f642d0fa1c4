#!/usr/bin/env bash
# gpu-check.sh: check and measure the CUDA backend on a Linux machine with an
# NVIDIA GPU, its driver, and a Python with torch (CUDA build) and cupy.
# Prints a short table and writes bench/gpu-results.md; under 5 minutes.
#
# It runs bin/cuda/arenahost-gpucheck, built beforehand on any machine (no
# GPU needed) with `make cuda`, which also builds the CPU tree in bin/ and
# the CUDA host and plugins in bin/cuda/: the served step starts
# bin/arenahost (CPU arena) and bin/cuda/arenahost --arena-backend cuda and
# compares them through the HTTP API.
#
# On a GPU machine without Go, build `make gpu-bundle` here and bring only
# bin/gpu-bundle.tar.xz (about 22 MB); this script unpacks it.
#
# The last step, capgen, runs whole Flux-dev generations (1024², 8 steps,
# VAE decode) with 0/3/5 rank-16 and rank-64 LoRAs, side and fused, under
# device-memory caps of 24, 16 and 12 GiB (the arena's capacity plus
# ARENAHOST_TORCH_MEMORY_CAP in the pipeline process), and diffusers + PEFT
# on bitsandbytes under the same caps; it needs diffusers, peft and
# bitsandbytes in $PYTHON and stops starting configurations at its time
# budget (-capgen-budget, and 255 s into the check) so the whole check
# stays under 5 minutes. -steps without capgen leaves it out.
#
# Usage: scripts/gpu-check.sh [arenahost-gpucheck flags, e.g. -device 1 -skip-torch]
# Environment: PYTHON (default python3), ARENAHOST_GPUCHECK (default bin/cuda/arenahost-gpucheck).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${ARENAHOST_GPUCHECK:-bin/cuda/arenahost-gpucheck}
py=${PYTHON:-python3}

if [ ! -x "$bin" ] && [ -z "${ARENAHOST_GPUCHECK:-}" ] && [ -f bin/gpu-bundle.tar.xz ]; then
  echo "gpu-check: unpacking bin/gpu-bundle.tar.xz (make gpu-bundle)" >&2
  tar -xJf bin/gpu-bundle.tar.xz
fi
if [ ! -x "$bin" ]; then
  echo "gpu-check: $bin missing: build it with 'make cuda' (see the header of this script)" >&2
  exit 2
fi
for b in bin/arenahost bin/cuda/arenahost bin/cuda/plugins/lora-nf4/lora-nf4; do
  [ -x "$b" ] || echo "gpu-check: warning: $b missing (make cuda builds it); the served step will fail" >&2
done
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader >&2 || true
else
  echo "gpu-check: nvidia-smi not found; is the NVIDIA driver installed?" >&2
fi
if ! "$py" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  echo "gpu-check: warning: $py has no torch with CUDA; the Python IPC check and the PyTorch baseline will fail (pass -skip-torch to leave them out)" >&2
elif ! "$py" -c 'import diffusers, peft, bitsandbytes' 2>/dev/null; then
  echo "gpu-check: warning: $py lacks diffusers, peft or bitsandbytes; the capgen step will fail (python/requirements-torch.txt has them; pass -steps without capgen to leave it out)" >&2
fi
if "$py" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null && ! "$py" -c 'import cupy' 2>/dev/null; then
  echo "gpu-check: note: no cupy in $py; the Python IPC check uses the CUDA runtime torch loaded instead" >&2
fi
mkdir -p bench
exec timeout --signal=INT --kill-after=10 290 "$bin" -python "$py" -torch-script host/cmd/arenahost-gpucheck/torch_check.py \
  -out bench/gpu-results.md "$@"
