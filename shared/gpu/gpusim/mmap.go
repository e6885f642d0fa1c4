package gpusim

import (
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Mappings are placed at increasing addresses (a hint the kernel honours
// when the range is free), with a gap after each, so an address freed by
// this process is not soon handed out again: a stale device pointer then
// reads as "already freed" instead of silently hitting newer memory. The
// hint wraps around at the end of its window.
const (
	hintStart = 0x2000_0000_0000
	hintEnd   = 0x6000_0000_0000
	hintAlign = 2 << 20
)

var nextHint atomic.Uint64

func init() { nextHint.Store(hintStart) }

func hint(size uint64) uintptr {
	step := (size+hintAlign-1)&^(hintAlign-1) + hintAlign
	for {
		cur := nextHint.Load()
		at, next := cur, cur+step
		if next > hintEnd {
			at, next = hintStart, hintStart+step
		}
		if nextHint.CompareAndSwap(cur, next) {
			return uintptr(at)
		}
	}
}

// mmap maps size bytes of fd (-1 with MAP_ANONYMOUS) read-write.
func mmap(fd int, size uint64, flags int) ([]byte, error) {
	p, err := unix.MmapPtr(fd, 0, unsafe.Add(unsafe.Pointer(nil), hint(size)), uintptr(size), unix.PROT_READ|unix.PROT_WRITE, flags)
	if err != nil {
		return nil, err
	}
	return unsafe.Slice((*byte)(p), size), nil
}

func munmap(b []byte) error {
	return unix.MunmapPtr(unsafe.Pointer(unsafe.SliceData(b)), uintptr(len(b)))
}
