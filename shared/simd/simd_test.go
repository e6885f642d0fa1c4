package simd

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestParsePath(t *testing.T) {
	tests := []struct {
		in      string
		want    Path
		auto    bool
		wantErr bool
	}{
		{"", Generic, true, false},
		{"auto", Generic, true, false},
		{"off", Generic, false, false},
		{"generic", Generic, false, false},
		{" AVX2 ", AVX2, false, false},
		{"avx512", AVX512, false, false},
		{"sse", Generic, false, true},
	}
	for _, tc := range tests {
		p, auto, err := ParsePath(tc.in)
		if (err != nil) != tc.wantErr || p != tc.want || auto != tc.auto {
			t.Errorf("ParsePath(%q) = %s, %v, %v; want %s, %v, error %v", tc.in, p, auto, err, tc.want, tc.auto, tc.wantErr)
		}
	}
}

// TestForce: forcing a path the CPU lacks reports it and keeps a supported
// one; forcing back restores.
func TestForce(t *testing.T) {
	orig := Current()
	defer Force(orig)
	for _, p := range []Path{Generic, AVX2, AVX512} {
		prev, ok := Force(p)
		if ok != Supported(p) {
			t.Errorf("Force(%s): ok %v, Supported %v", p, ok, Supported(p))
		}
		if got := Current(); (ok && got != p) || (!ok && got != Best()) {
			t.Errorf("Force(%s): current %s (best %s)", p, got, Best())
		}
		Force(prev)
	}
	t.Logf("best path on this CPU: %s", Best())
}

func TestReadCaches(t *testing.T) {
	c := readCaches(filepath.Join("testdata", "cache"))
	if c != (Caches{L1D: 48 << 10, L2: 2 << 20, Source: "sysfs"}) {
		t.Errorf("testdata caches: %+v", c)
	}
	if c := readCaches(filepath.Join("testdata", "missing")); c.Source != "default" || c.L1D != defaultL1D || c.L2 != defaultL2 {
		t.Errorf("missing dir: %+v", c)
	}
	for in, want := range map[string]int{"48K": 48 << 10, "1M": 1 << 20, "512": 512, "x": 0, "-1K": 0} {
		if got := parseSize(in); got != want {
			t.Errorf("parseSize(%q) = %d, want %d", in, got, want)
		}
	}
}

// TestEnvVar: ARENAHOST_SIMD picks the path at start; a path the CPU
// lacks falls back to the best one. The test binary runs itself once per
// value.
func TestEnvVar(t *testing.T) {
	if os.Getenv("SIMD_TEST_CHILD") == "1" {
		fmt.Printf("path=%s\n", Current())
		return
	}
	for _, v := range []string{"off", "avx2", "avx512", "auto", "bogus"} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestEnvVar$", "-test.count=1")
		cmd.Env = append(os.Environ(), "SIMD_TEST_CHILD=1", EnvVar+"="+v)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s=%s: %v\n%s", EnvVar, v, err, out)
		}
		want := Best()
		switch p, auto, err := ParsePath(v); {
		case err == nil && !auto && Supported(p):
			want = p
		case err == nil && !auto:
			t.Logf("this CPU lacks %s: the child falls back to %s", v, Best())
		}
		if !strings.Contains(string(out), "path="+want.String()+"\n") {
			t.Errorf("%s=%s: child says %q, want path=%s", EnvVar, v, out, want)
		}
	}
}
