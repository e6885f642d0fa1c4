#!/usr/bin/env bash
# gpu-bundle.sh: pack what scripts/gpu-check.sh runs into one compressed
# file, bin/gpu-bundle.tar.xz (about 22 MB), for a GPU machine that has no
# Go toolchain: the CPU host and lora-nf4 (bin/), and the CUDA host,
# lora-nf4, the diffusers-flux pipeline plugin and GPU check (bin/cuda/),
# stripped. Builds on any machine; the
# CUDA side links against the stub libcuda from scripts/cuda-env.sh and
# needs the real driver only where it runs. gpu-check.sh unpacks the
# bundle when bin/cuda/arenahost-gpucheck is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
go=${GO:-go}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
flags=(-trimpath -ldflags=-s\ -w)
mkdir -p "$stage/bin/plugins/lora-nf4" "$stage/bin/cuda/plugins/lora-nf4"
"$go" build "${flags[@]}" -o "$stage/bin/arenahost" ./host/cmd/arenahost
"$go" build "${flags[@]}" -o "$stage/bin/plugins/lora-nf4/lora-nf4" ./plugins/lora-nf4
eval "$(bash scripts/cuda-env.sh)"
"$go" build -tags cuda "${flags[@]}" -o "$stage/bin/cuda/arenahost" ./host/cmd/arenahost
"$go" build -tags cuda "${flags[@]}" -o "$stage/bin/cuda/plugins/lora-nf4/lora-nf4" ./plugins/lora-nf4
"$go" build -tags cuda "${flags[@]}" -o "$stage/bin/cuda/arenahost-gpucheck" ./host/cmd/arenahost-gpucheck
cp plugins/lora-nf4/plugin.json "$stage/bin/plugins/lora-nf4/"
cp plugins/lora-nf4/plugin.json "$stage/bin/cuda/plugins/lora-nf4/"
# The capgen step's pipeline plugin (Python; it runs from the checkout's sdk/python).
cp -r sdk/python/examples/diffusers_flux "$stage/bin/cuda/plugins/diffusers_flux"
mkdir -p bin
tar -C "$stage" -cJf bin/gpu-bundle.tar.xz.tmp bin
mv bin/gpu-bundle.tar.xz.tmp bin/gpu-bundle.tar.xz
ls -l bin/gpu-bundle.tar.xz
