package plugin

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/manifest"
)

func writeFile(t testing.TB, path, body string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(body), mode); err != nil {
		t.Fatal(err)
	}
}

func TestResolveCommand(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "bin", "plug"), "#!/bin/sh\n", 0o755)
	writeFile(t, filepath.Join(dir, "script.py"), "print(1)\n", 0o644)
	writeFile(t, filepath.Join(dir, "data.txt"), "x", 0o644)
	writeFile(t, filepath.Join(dir, "noexec"), "x", 0o644)
	env := map[string]string{"PY": filepath.Join(dir, "bin", "plug"), "EMPTY": ""}
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	cases := []struct {
		name, command string
		args          []string
		wantCmd       string
		wantArgs      []string
		wantErr       string
	}{
		{"relative", "./bin/plug", nil, filepath.Join(dir, "bin", "plug"), nil, ""},
		{"relative without dot", "bin/plug", nil, filepath.Join(dir, "bin", "plug"), nil, ""},
		{"variable", "${PY}", []string{"-u", "script.py", "--model=${PY}"}, filepath.Join(dir, "bin", "plug"), []string{"-u", "script.py", "--model=" + env["PY"]}, ""},
		{"absolute", filepath.Join(dir, "bin", "plug"), nil, filepath.Join(dir, "bin", "plug"), nil, ""},
		{"undefined variable", "${NOPE_NOT_SET_ANYWHERE}", nil, "", nil, "field command: variable ${NOPE_NOT_SET_ANYWHERE} is not set"},
		{"undefined in args", "./bin/plug", []string{"$NOPE_NOT_SET_ANYWHERE"}, "", nil, "field args[0]: variable ${NOPE_NOT_SET_ANYWHERE} is not set"},
		{"empty expansion", "${EMPTY}", nil, "", nil, "expands to nothing"},
		{"bare name is not looked up in PATH", "python3", nil, "", nil, "field command: stat " + filepath.Join(dir, "python3")},
		{"not executable", "noexec", nil, "", nil, "is not an executable file"},
		{"directory", "bin", nil, "", nil, "is not an executable file"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := &manifest.Manifest{Name: "x", Command: tc.command, Args: tc.args, Path: filepath.Join(dir, manifest.File)}
			r, err := resolveManifest(m, lookup)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), m.Path) {
					t.Fatalf("resolve error = %v, want %q naming %s", err, tc.wantErr, m.Path)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if r.command != tc.wantCmd || strings.Join(r.args, " ") != strings.Join(tc.wantArgs, " ") {
				t.Fatalf("resolved %q %q, want %q %q", r.command, r.args, tc.wantCmd, tc.wantArgs)
			}
		})
	}
	m := &manifest.Manifest{Command: "./bin/plug", Args: []string{"-u", "script.py", "/etc/passwd", "data.txt", "missing.py"}, Path: filepath.Join(dir, manifest.File)}
	r, err := resolveManifest(m, lookup)
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(watchedFiles(m, r), " ")
	want := strings.Join([]string{m.Path, filepath.Join(dir, "bin", "plug"), filepath.Join(dir, "script.py"), filepath.Join(dir, "data.txt")}, " ")
	if got != want {
		t.Fatalf("watched files\n got %s\nwant %s", got, want)
	}
}
