package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/host/inspect"
)

func run(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	err := Run(context.Background(), args, &out, &errb)
	return out.String(), errb.String(), err
}

func TestSampleThenInspect(t *testing.T) {
	tests := []struct {
		name      string
		flags     []string
		wantText  []string
		nested    bool
		blocksize int
		dtype     string
	}{
		{"plain", nil, []string{"bnb-nf4 plain, blocksize 64, dtype bfloat16", "flux-bfl", "42 4-bit weights"}, false, 64, "bfloat16"},
		{"nested fp16 128", []string{"--nested", "--blocksize", "128", "--dtype", "float16"}, []string{"bnb-nf4 nested, blocksize 128, dtype float16"}, true, 128, "float16"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			out, _, err := run(t, append([]string{"sample", "--out", dir}, tc.flags...)...)
			if err != nil {
				t.Fatalf("sample: %v", err)
			}
			path := filepath.Join(dir, "flux-sample-nf4.safetensors")
			if !strings.Contains(out, path) {
				t.Errorf("sample output %q does not name %s", out, path)
			}
			text, _, err := run(t, "inspect", path)
			if err != nil {
				t.Fatalf("inspect: %v", err)
			}
			for _, w := range tc.wantText {
				if !strings.Contains(text, w) {
					t.Errorf("inspect text lacks %q:\n%s", w, text)
				}
			}
			js, _, err := run(t, "inspect", "--json", path)
			if err != nil {
				t.Fatalf("inspect --json: %v", err)
			}
			var r inspect.Report
			if err := json.Unmarshal([]byte(js), &r); err != nil {
				t.Fatalf("inspect --json output is not JSON: %v\n%s", err, js)
			}
			m := r.Model
			if r.Kind != inspect.KindModel || m == nil {
				t.Fatalf("kind = %q, want model", r.Kind)
			}
			if m.Nested != tc.nested || m.Blocksize != tc.blocksize || m.DType != tc.dtype || m.Layout != "flux-bfl" {
				t.Errorf("got nested=%v blocksize=%d dtype=%s layout=%s", m.Nested, m.Blocksize, m.DType, m.Layout)
			}
			// FluxSample: every linear weight is one NF4 entry; params are the logical count.
			if m.Weights != 42 || m.Params != 10418752 {
				t.Errorf("weights=%d params=%d, want 42 and 10418752", m.Weights, m.Params)
			}
		})
	}
}

func TestErrors(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.safetensors")
	if err := os.WriteFile(garbage, []byte("not a safetensors file at all"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		args    []string
		usage   bool
		wantErr string
	}{
		{"no command", nil, true, ""},
		{"unknown command", []string{"frobnicate"}, true, "unknown command"},
		{"inspect without file", []string{"inspect"}, true, "needs at least one FILE"},
		{"inspect missing file", []string{"inspect", filepath.Join(dir, "missing.safetensors")}, false, "missing.safetensors"},
		{"inspect garbage", []string{"inspect", garbage}, false, "garbage.safetensors"},
		{"sample without out", []string{"sample"}, true, "--out"},
		{"sample bad dtype", []string{"sample", "--out", dir, "--dtype", "int8"}, false, `dtype "int8"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := run(t, tc.args...)
			if err == nil {
				t.Fatal("want an error")
			}
			if got := errors.Is(err, ErrUsage); got != tc.usage {
				t.Errorf("errors.Is(ErrUsage) = %v, want %v (%v)", got, tc.usage, err)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("error %q does not contain %q", err, tc.wantErr)
			}
		})
	}
}

func TestHelpHasExamples(t *testing.T) {
	for name := range commands {
		t.Run(name, func(t *testing.T) {
			_, errOut, err := run(t, name, "--help")
			if err != nil {
				t.Fatalf("%s --help: %v", name, err)
			}
			if !strings.Contains(errOut, "Example:") {
				t.Errorf("%s --help has no example:\n%s", name, errOut)
			}
		})
	}
}
