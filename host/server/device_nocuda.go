//go:build !cuda

package server

// openCUDA fails: this build has no driver binding (make cuda builds
// bin/cuda/arenahost with it).
func openCUDA(int) (device, error) { return nil, ErrNoCUDA }
