//go:build cuda

package main

import "gorgonia.org/cu"

// deviceCount is how many CUDA devices the driver shows (after gpu.Open
// initialised it).
func deviceCount() (int, error) { return cu.NumDevices() }
