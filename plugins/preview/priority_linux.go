package main

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// lowerPriority sets the nice value of every thread of this process to n.
// Linux keeps a nice value per thread and new threads inherit their
// creator's, so renicing the threads that exist now covers the ones the Go
// runtime starts later. The pass runs twice to catch a thread started
// during the first.
func lowerPriority(n int) error {
	for range 2 {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return fmt.Errorf("lower priority: %w", err)
		}
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			if err := unix.Setpriority(unix.PRIO_PROCESS, tid, n); err != nil {
				return fmt.Errorf("lower priority: thread %d: nice %d: %w", tid, n, err)
			}
		}
	}
	return nil
}
