package gpusim

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// memfd creates the anonymous shared file behind a slab.
func memfd(name string) (int, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC)
	if err != nil {
		return -1, fmt.Errorf("memfd_create %s: %w", name, err)
	}
	return fd, nil
}
