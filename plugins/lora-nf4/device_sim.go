package main

import (
	"github.com/arenahost/arenahost/shared/gpu"
	"github.com/arenahost/arenahost/shared/gpu/gpusim"
)

// isSimHandle reports whether an IPC handle names a slab of the simulated
// GPU (a host running arena.backend: cuda-sim).
func isSimHandle(h [gpu.HandleSize]byte) bool { return gpusim.IsHandle(h) }

// openSim opens the simulated GPU: plain Go, in every build.
func openSim(ordinal int) (device, error) { return gpusim.New(ordinal), nil }
