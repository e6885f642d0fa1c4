package registry

import (
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// prefaultOn lets BenchmarkLoad compare loads with and without prefault.
var prefaultOn = true

var pageSize = uintptr(os.Getpagesize())

// prefault asks the kernel to populate the pages under b for writing in one
// call (MADV_POPULATE_WRITE, Linux 5.14+) instead of taking one page fault
// per 4 KiB page during the copy; on the benchmark machine this roughly
// doubles load throughput. b is widened to whole pages: arena segments are
// page-aligned mappings whose size is a multiple of the page size, so the
// widened range stays inside the segment, and populating does not change
// the bytes of neighbouring regions. Only advice: errors (older kernels,
// memory that is not a mapping) are ignored.
func prefault(b []byte) {
	if len(b) == 0 || !prefaultOn {
		return
	}
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	start := p &^ (pageSize - 1)
	end := (p + uintptr(len(b)) + pageSize - 1) &^ (pageSize - 1)
	_, _, _ = unix.Syscall(unix.SYS_MADVISE, start, end-start, unix.MADV_POPULATE_WRITE)
	runtime.KeepAlive(b)
}
