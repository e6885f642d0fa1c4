package cli

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/host/inspect"
	"github.com/arenahost/arenahost/shared/safetensors"
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
		{"sample bad dtype", []string{"sample", "--out", dir, "--dtype", "int8"}, true, `--dtype must be bfloat16 or float16, got "int8"`},
		{"sample bad blocksize", []string{"sample", "--out", dir, "--blocksize", "100"}, false, "blocksize"},
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
			out, errOut, err := run(t, name, "--help")
			if err != nil {
				t.Fatalf("%s --help: %v", name, err)
			}
			if !strings.Contains(out, "Example:") || errOut != "" {
				t.Errorf("%s --help has no example on stdout, or writes to stderr:\n%s\nstderr: %s", name, out, errOut)
			}
		})
	}
}

// writeKohyaLoRA writes a small kohya-format Flux LoRA (BFL module names) for
// the sample model's first double block.
func writeKohyaLoRA(t *testing.T, path string) {
	t.Helper()
	f32 := func(n int, v float32) []byte {
		b := make([]byte, 4*n)
		for i := 0; i < n; i++ {
			binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v*float32(i%7-3)))
		}
		return b
	}
	var ts []safetensors.WriteTensor
	for _, m := range []struct {
		name    string
		in, out int
	}{{"lora_unet_double_blocks_0_img_attn_qkv", 256, 768}, {"lora_unet_single_blocks_1_linear2", 1280, 256}} {
		ts = append(ts,
			safetensors.WriteTensor{Name: m.name + ".lora_down.weight", DType: safetensors.F32, Shape: []int64{4, int64(m.in)}, Data: f32(4*m.in, 0.01)},
			safetensors.WriteTensor{Name: m.name + ".lora_up.weight", DType: safetensors.F32, Shape: []int64{int64(m.out), 4}, Data: f32(4*m.out, 0.02)},
			safetensors.WriteTensor{Name: m.name + ".alpha", DType: safetensors.F32, Shape: []int64{}, Data: f32(1, 0)},
		)
	}
	if err := safetensors.WriteFile(path, map[string]string{"ss_base_model_version": "flux1"}, ts); err != nil {
		t.Fatal(err)
	}
}

func TestInspectLoRA(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kohya.safetensors")
	writeKohyaLoRA(t, path)
	text, _, err := run(t, "inspect", path)
	if err != nil {
		t.Fatalf("inspect: %v", err)
	}
	for _, w := range []string{"LoRA, kohya keys", "ranks:", "[4]", "flux1", "double_blocks", "modules:       2"} {
		if !strings.Contains(text, w) {
			t.Errorf("inspect text lacks %q:\n%s", w, text)
		}
	}
	js, _, err := run(t, "inspect", "--json", path)
	if err != nil {
		t.Fatal(err)
	}
	var r inspect.Report
	if err := json.Unmarshal([]byte(js), &r); err != nil {
		t.Fatal(err)
	}
	if r.Kind != inspect.KindLoRA || r.LoRA == nil || r.LoRA.Modules != 2 || r.LoRA.BaseModel != "flux1" {
		t.Fatalf("report = %+v", r)
	}
}
