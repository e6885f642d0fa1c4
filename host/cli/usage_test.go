package cli

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/samples"
)

// Every command-line mistake prints exactly two lines on stderr: the
// problem and its fix, then where the help is; nothing on stdout; and the
// error is a usage error (exit 2 in main).
func TestUsageErrorsAreOneLine(t *testing.T) {
	model, kohya, _ := mergeFixture(t, false)
	out := filepath.Join(t.TempDir(), "out.safetensors")
	tests := []struct {
		name string
		args []string
		line string // the first stderr line, exactly
	}{
		{"no command", nil, `arenahost: no command given (commands: inspect, merge, sample, serve, status)`},
		{"unknown command", []string{"bogus"}, `arenahost: unknown command "bogus" (commands: inspect, merge, sample, serve, status)`},
		{"merge bad --as", []string{"merge", "--model", model, "--out", out, "--as", "fp8"}, `arenahost merge: --as must be nf4, bf16 or lora, got "fp8"`},
		{"merge bad strength", []string{"merge", "--model", model, "--out", out, "--lora", "F:abc"}, `arenahost merge: --lora "F:abc": strength "abc" is not a finite number (write FILE:STRENGTH, e.g. style.safetensors:0.8)`},
		{"merge infinite strength", []string{"merge", "--model", model, "--out", out, "--lora", kohya + ":inf"}, `arenahost merge: --lora "` + kohya + `:inf": strength "inf" is not a finite number (write FILE:STRENGTH, e.g. style.safetensors:0.8)`},
		{"merge strength without file", []string{"merge", "--model", model, "--out", out, "--lora", ":0.5"}, `arenahost merge: --lora ":0.5": no LoRA file before the strength (write FILE[:STRENGTH])`},
		{"merge without model", []string{"merge", "--out", out}, `arenahost merge: needs --model IN, the bitsandbytes 4-bit safetensors model to merge into`},
		{"merge without out", []string{"merge", "--model", model}, `arenahost merge: needs --out OUT, the safetensors file to write`},
		{"merge positional", []string{"merge", "--model", model, "--out", out, kohya}, `arenahost merge: takes no positional arguments, got ["` + kohya + `"] (give LoRAs as --lora FILE[:STRENGTH])`},
		{"merge lora without lora", []string{"merge", "--model", model, "--out", out, "--as", "lora"}, `arenahost merge: --as lora needs at least one --lora FILE[:STRENGTH] to concatenate`},
		{"merge unknown flag", []string{"merge", "--model", model, "--bogus"}, `arenahost merge: unknown flag --bogus (this command takes --as, --lora, --max-shard-size, --model, --out, --report, --strict)`},
		{"merge flag without value", []string{"merge", "--model"}, `arenahost merge: --model needs a value (string: input bitsandbytes 4-bit safetensors model)`},
		{"merge bad bool", []string{"merge", "--strict=maybe"}, `arenahost merge: --strict "maybe": not a valid value (fail when a LoRA has keys that match no layer)`},
		{"inspect without file", []string{"inspect", "--json"}, `arenahost inspect: needs at least one FILE to describe (a checkpoint or LoRA .safetensors)`},
		{"sample without out", []string{"sample"}, `arenahost sample: needs --out DIR, the directory to write the sample model into`},
		{"sample bad dtype", []string{"sample", "--out", t.TempDir(), "--dtype", "int8"}, `arenahost sample: --dtype must be bfloat16 or float16, got "int8"`},
		{"sample bad int", []string{"sample", "--blocksize", "big"}, `arenahost sample: --blocksize "big": not a valid value (int: NF4 blocksize (32..4096, a power of two))`},
		{"status positional", []string{"status", "now"}, `arenahost status: takes no positional arguments, got ["now"] (name the host with --host URL)`},
		{"status bad host", []string{"status", "--host", "127.0.0.1:7860"}, `arenahost status: --host "127.0.0.1:7860": want http://HOST:PORT (the console URL serve prints)`},
		{"serve positional", []string{"serve", "now"}, `arenahost serve: takes no positional arguments, got ["now"] (settings are flags: see --help)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdout, stderr, err := run(t, tt.args...)
			if !errors.Is(err, ErrUsage) {
				t.Fatalf("err = %v, want a usage error", err)
			}
			lines := strings.Split(strings.TrimSuffix(stderr, "\n"), "\n")
			if len(lines) != 2 || lines[0] != tt.line || !strings.Contains(lines[1], "--help") || stdout != "" {
				t.Fatalf("stderr:\n%s\nwant exactly:\n%s\nRun '… --help' …\n(stdout %q)", stderr, tt.line, stdout)
			}
			if _, err := os.Stat(out); err == nil {
				t.Fatal("a usage error wrote the output")
			}
		})
	}
}

// Flags work before and after the positional arguments, and "--" ends
// them.
func TestFlagsInEitherPosition(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := run(t, "sample", "--out", dir); err != nil {
		t.Fatal(err)
	}
	model := filepath.Join(dir, samples.ModelFile)
	before, _, err := run(t, "inspect", "--json", model)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(before, "{") {
		t.Fatalf("inspect --json FILE: %q", before)
	}
	for _, args := range [][]string{
		{"inspect", model, "--json"},
		{"inspect", model, "-json"},
		{"inspect", "--json=true", model},
	} {
		after, _, err := run(t, args...)
		if err != nil || after != before {
			t.Fatalf("%q: %v\n%s\nwant the same as inspect --json FILE", args, err, after)
		}
	}
	// After "--", "--json" is a file name.
	_, _, err = run(t, "inspect", model, "--", "--json")
	if err == nil || errors.Is(err, ErrUsage) || !strings.Contains(err.Error(), "--json") {
		t.Fatalf("inspect FILE -- --json: %v, want an error opening the file --json", err)
	}
	// merge: flags in any order.
	out := filepath.Join(t.TempDir(), "copy.safetensors")
	if _, _, err := run(t, "merge", "--out", out, "--as", "nf4", "--model", model); err != nil {
		t.Fatal(err)
	}
	// sample: the output directory after other flags.
	dir2 := t.TempDir()
	if _, _, err := run(t, "sample", "--nested", "--out", dir2); err != nil {
		t.Fatal(err)
	}
}

// Errors that are not usage errors name the user's paths, never the
// temporary file the output is written through.
func TestMergeErrorsNameUserPaths(t *testing.T) {
	model, kohya, _ := mergeFixture(t, false)
	missingDir := filepath.Join(t.TempDir(), "missing", "dir")
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"missing output directory", []string{"merge", "--model", model, "--lora", kohya, "--out", filepath.Join(missingDir, "x.safetensors")},
			"merge: --out " + filepath.Join(missingDir, "x.safetensors") + ": directory " + missingDir + " does not exist (create it first)"},
		{"missing output directory, identity copy", []string{"merge", "--model", model, "--out", filepath.Join(missingDir, "x.safetensors")},
			"directory " + missingDir + " does not exist"},
		{"output is a directory", []string{"merge", "--model", model, "--lora", kohya, "--as", "lora", "--out", t.TempDir()}, "is a directory; name the output file"},
		// nf4 and bf16 write a diffusers folder to a directory --out; the
		// sample is BFL-named, which only a .safetensors file can hold.
		{"folder output of a BFL model", []string{"merge", "--model", model, "--lora", kohya, "--out", t.TempDir()}, "write a .safetensors file instead"},
		{"missing model", []string{"merge", "--model", model + ".missing", "--lora", kohya, "--out", filepath.Join(t.TempDir(), "o.safetensors")}, model + ".missing"},
		{"missing lora", []string{"merge", "--model", model, "--lora", kohya + ".missing:0.5", "--out", filepath.Join(t.TempDir(), "o.safetensors")}, kohya + ".missing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, stderr, err := run(t, tt.args...)
			if err == nil || errors.Is(err, ErrUsage) {
				t.Fatalf("err = %v, want a plain error", err)
			}
			if msg := err.Error(); !strings.Contains(msg, tt.want) || strings.Contains(msg, ".tmp") || strings.Contains(msg, "\n") {
				t.Fatalf("err = %q, want one line containing %q and no temporary file", msg, tt.want)
			}
			if strings.Contains(stderr, ".tmp") {
				t.Fatalf("stderr names a temporary file: %s", stderr)
			}
		})
	}
}

// merge says what it wrote in one summary line (matched and unmatched keys
// per LoRA, retention for nf4) without --report, and says when it writes
// an identity copy; off a terminal it draws no bar.
func TestMergeSummary(t *testing.T) {
	model, kohya, peft := mergeFixture(t, false)
	dir := t.TempDir()
	tests := []struct {
		name   string
		args   []string
		stdout []string
		stderr string
	}{
		{"nf4", []string{"--lora", kohya + ":0.8", "--lora", peft, "--as", "nf4"},
			[]string{"(nf4, 2 LoRAs, ", filepath.Base(kohya) + " ", " keys matched, 0 unmatched; " + filepath.Base(peft) + " ", "; retention 0."}, ""},
		{"bf16", []string{"--lora", kohya, "--as", "bf16"}, []string{"(bf16, 1 LoRAs, ", filepath.Base(kohya) + " "}, ""},
		{"lora", []string{"--lora", kohya, "--as", "lora"}, []string{"(lora, 1 LoRAs, "}, ""},
		{"identity", []string{"--as", "nf4"}, []string{"(nf4, 0 LoRAs, ", ": identity copy, no LoRA changes a weight"}, "merge: no --lora given: writing an identity copy of " + model + "\n"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := filepath.Join(dir, tt.name+".safetensors")
			stdout, stderr, err := run(t, append([]string{"merge", "--model", model, "--out", out}, tt.args...)...)
			if err != nil {
				t.Fatalf("merge: %v\n%s", err, stderr)
			}
			lines := strings.Split(strings.TrimSuffix(stdout, "\n"), "\n")
			if len(lines) != 1 || !strings.HasPrefix(lines[0], "wrote "+out+" ") {
				t.Fatalf("stdout %q: want one summary line", stdout)
			}
			for _, w := range tt.stdout {
				if !strings.Contains(lines[0], w) {
					t.Errorf("summary %q lacks %q", lines[0], w)
				}
			}
			if stderr != tt.stderr {
				t.Errorf("stderr %q, want %q", stderr, tt.stderr)
			}
			_ = i
		})
	}
}
