//go:build !cuda

package main

// The default build never links the CUDA driver (gorgonia.org/cu exits the
// process when no GPU is present): a real device descriptor gets a clear
// error instead.
func init() {
	openCUDA = func(int) (device, error) { return nil, errNoCUDA }
}
