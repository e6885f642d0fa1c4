// Command arenahost-gpucheck checks and measures the CUDA backend on a
// machine with an NVIDIA GPU (scripts/gpu-check.sh runs it): every kernel
// against the CPU codec (shared/nf4, shared/lora), IPC from a Go process
// and a Python (torch) process in both directions, and the Flux-dev fused
// merge and side-factor build next to a device-to-device copy and a plain
// PyTorch merge. Built with -tags cuda (make cuda); without the tag it
// only says so. The report (Report) is plain Go, tested everywhere.
package main
