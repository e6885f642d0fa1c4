//go:build cuda

package server

import "github.com/arenahost/arenahost/shared/gpu"

// openCUDA opens the device through the driver.
func openCUDA(ordinal int) (device, error) {
	d, err := gpu.Open(ordinal)
	if err != nil {
		return nil, err
	}
	return d, nil
}
