//go:build !cuda

package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "arenahost-gpucheck: built without -tags cuda; build it with `make cuda` (go build -tags cuda) and run scripts/gpu-check.sh")
	os.Exit(2)
}
