//go:build !linux

package gpusim

import "fmt"

// memfd: slabs are memfds opened by other processes through /proc, which
// only Linux has.
func memfd(name string) (int, error) {
	return -1, fmt.Errorf("create %s: the simulated GPU's slabs need Linux (memfd_create and /proc/<pid>/fd)", name)
}
