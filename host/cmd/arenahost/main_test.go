package main

import (
	"bytes"
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// The real binary: usage mistakes exit 2 with two lines on stderr (the
// problem and its fix, then where the help is), other failures exit 1
// with one line, help and success exit 0.
func TestExitCodes(t *testing.T) {
	bin := testenv.GoBinary(t, "./host/cmd/arenahost")
	dir := t.TempDir()
	model := filepath.Join(dir, "flux-sample-nf4.safetensors")
	if out, err := exec.Command(bin, "sample", "--out", dir).CombinedOutput(); err != nil {
		t.Fatalf("sample: %v\n%s", err, out)
	}
	tests := []struct {
		name   string
		args   []string
		code   int
		stderr string // the line naming the problem, exactly: the first of a usage error, the last of another ("" = no stderr)
		lines  int    // stderr lines of a usage error
	}{
		{"help", []string{"--help"}, 0, "", 0},
		{"command help", []string{"merge", "--help"}, 0, "", 0},
		{"unknown command", []string{"bogus"}, 2, `arenahost: unknown command "bogus" (commands: inspect, merge, sample, serve, status)`, 2},
		{"bad --as", []string{"merge", "--model", model, "--out", filepath.Join(dir, "o"), "--as", "fp8"}, 2, `arenahost merge: --as must be nf4, bf16 or lora, got "fp8"`, 2},
		{"bad strength", []string{"merge", "--model", model, "--out", filepath.Join(dir, "o"), "--lora", "F:abc"}, 2,
			`arenahost merge: --lora "F:abc": strength "abc" is not a finite number (write FILE:STRENGTH, e.g. style.safetensors:0.8)`, 2},
		{"flag after the file", []string{"inspect", model, "--json"}, 0, "", 0},
		{"missing output directory", []string{"merge", "--model", model, "--out", "/missing/dir/x"}, 1,
			"arenahost: merge: --out /missing/dir/x: directory /missing/dir does not exist (create it first)", 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			cmd := exec.Command(bin, tt.args...)
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			code := 0
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			got := strings.TrimSuffix(stderr.String(), "\n")
			lines := strings.Split(got, "\n")
			if got == "" {
				lines = nil
			}
			first := ""
			if len(lines) > 0 {
				first = lines[0]
				if tt.code == 1 {
					first = lines[len(lines)-1]
				}
			}
			if code != tt.code || first != tt.stderr || (tt.code == 2 && len(lines) != tt.lines) {
				t.Fatalf("exit %d, stderr:\n%s\nwant exit %d and first line\n%s", code, stderr.String(), tt.code, tt.stderr)
			}
			if tt.code == 0 && stdout.Len() == 0 {
				t.Fatal("no output on stdout")
			}
		})
	}
}
