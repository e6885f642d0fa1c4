//go:build cuda

package main

import "github.com/arenahost/arenahost/shared/gpu"

func init() {
	openCUDA = func(ordinal int) (device, error) {
		d, err := gpu.Open(ordinal)
		if err != nil {
			return nil, err
		}
		return d, nil
	}
}
