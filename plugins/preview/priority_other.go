//go:build !linux

package main

import "errors"

// lowerPriority is Linux-only (per-thread nice values through /proc).
func lowerPriority(int) error { return errors.New("lower priority: supported on Linux only") }
