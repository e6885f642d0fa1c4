//go:build cuda

package main

import (
	"fmt"

	"gorgonia.org/cu"
)

func deviceName(ordinal int) string {
	d, err := cu.GetDevice(ordinal)
	if err != nil {
		return fmt.Sprintf("device %d", ordinal)
	}
	name, err := d.Name()
	if err != nil {
		name = "unknown GPU"
	}
	major, minor, _ := d.ComputeCapability()
	return fmt.Sprintf("%s (device %d, compute %d.%d)", name, ordinal, major, minor)
}
