package safetensors

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"
)

// TestEvict: Evict takes the tensor's whole pages out of the resident set
// (mincore), and afterwards the tensor's bytes (and its neighbours') read
// the same, faulted back in from the file; unknown names are ignored.
func TestEvict(t *testing.T) {
	big := bytes.Repeat([]byte{1, 2, 3, 4, 5, 6, 7}, 3<<12)
	small := []byte{9, 8, 7}
	path := filepath.Join(t.TempDir(), "e.safetensors")
	if err := WriteFile(path, nil, []WriteTensor{{Name: "small", DType: U8, Shape: []int64{3}, Data: small}, {Name: "big", DType: U8, Shape: []int64{int64(len(big))}, Data: big}}); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	info, _ := f.Lookup("big")
	page := int64(os.Getpagesize())
	lo := (f.DataStart + info.Begin + page - 1) / page * page // first whole page of big
	hi := (f.DataStart + info.End) / page * page
	if hi-lo < 2*page {
		t.Fatalf("big spans %d whole pages, want at least 2", (hi-lo)/page)
	}
	// resident is the mapping's resident set in this process (smaps Rss):
	// what Evict drops. (mincore would report the page cache instead,
	// which keeps a file's pages whatever this process does.)
	resident := func() int64 {
		start := uintptr(unsafe.Pointer(&f.mapping[0]))
		b, err := os.ReadFile("/proc/self/smaps")
		if err != nil {
			t.Skipf("no smaps: %v", err)
		}
		in := false
		for _, line := range strings.Split(string(b), "\n") {
			if fields := strings.Fields(line); len(fields) > 0 && strings.Contains(fields[0], "-") && !strings.HasSuffix(fields[0], ":") {
				var lo, hi uintptr
				_, err := fmt.Sscanf(fields[0], "%x-%x", &lo, &hi)
				in = err == nil && lo <= start && start < hi
				continue
			}
			if in && strings.HasPrefix(line, "Rss:") {
				var kb int64
				fmt.Sscanf(strings.TrimPrefix(line, "Rss:"), "%d", &kb)
				return kb << 10
			}
		}
		t.Fatal("mapping not found in /proc/self/smaps")
		return 0
	}
	if _, err := f.Data("big"); err != nil {
		t.Fatal(err)
	}
	var sum byte
	for i := lo; i < hi; i += page { // touch every page
		sum += f.mapping[i]
	}
	t.Logf("touched %d pages (checksum %d)", (hi-lo)/page, sum)
	before := resident()
	if before < hi-lo {
		t.Fatalf("mapping resident %d bytes after reading big's %d whole-page bytes", before, hi-lo)
	}
	if err := f.Evict("big"); err != nil {
		t.Fatal(err)
	}
	if after := resident(); before-after < hi-lo {
		t.Fatalf("Evict dropped %d resident bytes, want at least big's %d whole-page bytes", before-after, hi-lo)
	}
	for _, name := range []string{"big", "small", "missing"} {
		if err := f.Evict(name); err != nil {
			t.Fatalf("evict %s: %v", name, err)
		}
	}
	for name, want := range map[string][]byte{"big": big, "small": small} {
		got, err := f.Data(name)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s after evict: %v, equal %v", name, err, bytes.Equal(got, want))
		}
	}
}
