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
	pinnedHost = func(d device, n int) ([]byte, func() error, error) {
		gd, ok := d.(*gpu.Device)
		if !ok {
			return make([]byte, n), func() error { return nil }, nil
		}
		pb, err := gd.Pinned(n)
		if err != nil {
			return nil, nil, err
		}
		return pb.Bytes(), pb.Close, nil
	}
}
