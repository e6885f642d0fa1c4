//go:build unix

package render

import (
	"syscall"
	"time"
)

// processCPU is the CPU time (user + system) of the whole test process, to
// report benchmarks on a shared machine where wall time includes waiting.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
