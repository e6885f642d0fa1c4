package simd

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
)

// Caches are the per-core data cache sizes in bytes that tiles are cut
// from.
type Caches struct {
	L1D, L2 int
	// Source says where the sizes came from: "sysfs" or "default".
	Source string
}

// Default sizes when the OS does not say: a 32 KiB L1D and a 1 MiB L2,
// the smallest of current x86-64 and arm64 server cores.
const (
	defaultL1D = 32 << 10
	defaultL2  = 1 << 20
)

var cachesOnce = sync.OnceValue(func() Caches {
	return readCaches("/sys/devices/system/cpu/cpu0/cache")
})

// CacheSizes returns cpu0's L1 data and L2 sizes (Linux sysfs, which the
// kernel fills from CPUID leaf 4 on x86), or the defaults.
func CacheSizes() Caches { return cachesOnce() }

func readCaches(dir string) Caches {
	c := Caches{Source: "sysfs"}
	ents, _ := filepath.Glob(filepath.Join(dir, "index*"))
	for _, e := range ents {
		level := readTrim(filepath.Join(e, "level"))
		typ := readTrim(filepath.Join(e, "type"))
		size := parseSize(readTrim(filepath.Join(e, "size")))
		if size <= 0 {
			continue
		}
		switch {
		case level == "1" && typ == "Data":
			c.L1D = size
		case level == "2" && (typ == "Unified" || typ == "Data"):
			c.L2 = size
		}
	}
	if c.L1D <= 0 || c.L2 <= 0 {
		return Caches{L1D: defaultL1D, L2: defaultL2, Source: "default"}
	}
	return c
}

func readTrim(p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// parseSize reads sysfs sizes: "48K", "2048K", "1M", or plain bytes.
func parseSize(s string) int {
	mul := 1
	switch {
	case strings.HasSuffix(s, "K"):
		mul, s = 1<<10, strings.TrimSuffix(s, "K")
	case strings.HasSuffix(s, "M"):
		mul, s = 1<<20, strings.TrimSuffix(s, "M")
	case strings.HasSuffix(s, "G"):
		mul, s = 1<<30, strings.TrimSuffix(s, "G")
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		return 0
	}
	return n * mul
}
