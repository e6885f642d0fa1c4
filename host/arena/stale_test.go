//go:build linux

package arena

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestParseShmDirName(t *testing.T) {
	tests := []struct {
		name string
		pid  int
		ok   bool
	}{
		{"arenahost-123-abcdef012345", 123, true},
		{"arenahost-1-0", 1, true},
		{"arenahost-123-", 0, false},
		{"arenahost-123", 0, false},
		{"arenahost--abc", 0, false},
		{"arenahost-0-abc", 0, false},
		{"arenahost-x1-abc", 0, false},
		{"arenahost-12-ABC", 0, false},
		{"arenahost-12-abc-d", 0, false},
		{"arenatest-12-abc", 0, false},
		{"other", 0, false},
	}
	for _, tc := range tests {
		pid, ok := parseShmDirName(tc.name)
		if pid != tc.pid || ok != tc.ok {
			t.Errorf("parseShmDirName(%q) = %d, %v; want %d, %v", tc.name, pid, ok, tc.pid, tc.ok)
		}
	}
}

// deadPID returns a pid that no process has: a child that has exited and
// been reaped.
func deadPID(t *testing.T) int {
	t.Helper()
	p, err := os.StartProcess("/bin/true", []string{"true"}, &os.ProcAttr{})
	if err != nil {
		t.Skipf("start /bin/true: %v", err)
	}
	if _, err := p.Wait(); err != nil {
		t.Fatal(err)
	}
	return p.Pid
}

func TestCleanStale(t *testing.T) {
	base := t.TempDir()
	self := os.Getpid()
	start, err := processStart(self)
	if err != nil {
		t.Fatal(err)
	}
	dead := deadPID(t)
	mk := func(name, owner string) string {
		dir := filepath.Join(base, name)
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if owner != "" {
			if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(owner), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(dir, "segment-1"), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	tests := []struct {
		name, dir, owner string
		removed          bool
	}{
		{"dead host", fmt.Sprintf("arenahost-%d-aa", dead), fmt.Sprintf("%d 5\n", dead), true},
		{"dead host without owner file", fmt.Sprintf("arenahost-%d-bb", dead), "", true},
		{"live host", fmt.Sprintf("arenahost-%d-cc", self), fmt.Sprintf("%d %d\n", self, start), false},
		{"live host, owner file not yet written", fmt.Sprintf("arenahost-%d-dd", self), "", false},
		{"pid reused by another process", fmt.Sprintf("arenahost-%d-ee", self), fmt.Sprintf("%d %d\n", self, start+1), true},
		{"not an arena dir", fmt.Sprintf("arenatest-%d-ff", dead), "", false},
	}
	for _, tc := range tests {
		mk(tc.dir, tc.owner)
	}
	if err := os.WriteFile(filepath.Join(base, fmt.Sprintf("arenahost-%d-ab", dead)), nil, 0o600); err != nil {
		t.Fatal(err) // a plain file with a matching name is not touched
	}
	removed, err := CleanStale(base)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range tests {
		path := filepath.Join(base, tc.dir)
		_, statErr := os.Stat(path)
		if gone := os.IsNotExist(statErr); gone != tc.removed {
			t.Errorf("%s: removed %v, want %v", tc.name, gone, tc.removed)
		}
		if tc.removed != slices.Contains(removed, path) {
			t.Errorf("%s: reported removed list %v", tc.name, removed)
		}
	}
	if _, err := os.Stat(filepath.Join(base, fmt.Sprintf("arenahost-%d-ab", dead))); err != nil {
		t.Errorf("plain file: %v", err)
	}
	if _, err := CleanStale(filepath.Join(base, "missing")); err == nil {
		t.Error("CleanStale of a missing dir: no error")
	}
}
