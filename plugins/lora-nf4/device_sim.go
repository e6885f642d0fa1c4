package main

import (
	"fmt"

	"github.com/arenahost/arenahost/shared/gpu"
	"github.com/arenahost/arenahost/shared/gpu/gpusim"
)

// isSimHandle reports whether an IPC handle names a slab of the simulated
// GPU (a host running arena.backend: cuda-sim).
func isSimHandle(h [gpu.HandleSize]byte) bool { return gpusim.IsHandle(h) }

// openSim opens the simulated GPU: plain Go, in every build.
func openSim(ordinal int) (device, error) {
	d, ok := any(gpusim.New(ordinal)).(device)
	if !ok {
		return nil, fmt.Errorf("gpusim: no kernel launches in this build of shared/gpu/gpusim")
	}
	return d, nil
}
