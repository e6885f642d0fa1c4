package manifest

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
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

func TestParse(t *testing.T) {
	const valid = `{"name":"lora-nf4","version":"0.1.0","kind":"lora","language":"go","command":"./lora-nf4","protocol_version":1}`
	cases := []struct {
		name string
		body string
		want string // "" = valid
	}{
		{"valid", valid, ""},
		{"valid with args and sha", `{"name":"p","version":"1","kind":"pipeline","language":"python","command":"${ARENAHOST_PYTHON}","args":["-u","p.py"],"protocol_version":1,"sha256":"` + strings.Repeat("ab", 32) + `"}`, ""},
		{"other kind", `{"name":"x","version":"1","kind":"upscaler","language":"rust","command":"x","protocol_version":1}`, ""},
		{"unknown field", `{"name":"x","version":"1","kind":"lora","language":"go","command":"x","protocol_version":1,"comand":"y"}`, `unknown field "comand"`},
		{"missing name", `{"version":"1","kind":"lora","language":"go","command":"x","protocol_version":1}`, "field name: required"},
		{"bad name", `{"name":"Lora NF4","version":"1","kind":"lora","language":"go","command":"x","protocol_version":1}`, `field name: "Lora NF4"`},
		{"missing version", `{"name":"x","kind":"lora","language":"go","command":"x","protocol_version":1}`, "field version: required"},
		{"missing kind", `{"name":"x","version":"1","language":"go","command":"x","protocol_version":1}`, "field kind: required"},
		{"bad kind", `{"name":"x","version":"1","kind":"LoRA!","language":"go","command":"x","protocol_version":1}`, `field kind: "LoRA!"`},
		{"missing language", `{"name":"x","version":"1","kind":"lora","command":"x","protocol_version":1}`, "field language: required"},
		{"missing command", `{"name":"x","version":"1","kind":"lora","language":"go","protocol_version":1}`, "field command: required"},
		{"missing protocol", `{"name":"x","version":"1","kind":"lora","language":"go","command":"x"}`, "field protocol_version: required"},
		{"wrong protocol", `{"name":"x","version":"1","kind":"lora","language":"go","command":"x","protocol_version":2}`, "field protocol_version: plugin speaks protocol 2 but this host speaks 1"},
		{"protocol as string", `{"name":"x","version":"1","kind":"lora","language":"go","command":"x","protocol_version":"1"}`, "field protocol_version: string is not a valid uint"},
		{"args not a list", `{"name":"x","version":"1","kind":"lora","language":"go","command":"x","args":"-v","protocol_version":1}`, "field args: string"},
		{"short sha", `{"name":"x","version":"1","kind":"lora","language":"go","command":"x","protocol_version":1,"sha256":"abcd"}`, `field sha256: "abcd" is not 64 hex digits`},
		{"public methods on a pipeline", `{"name":"p","version":"1","kind":"pipeline","language":"go","command":"x","protocol_version":1,"public_methods":["run","img2img"]}`, ""},
		{"public methods on a lora plugin", `{"name":"x","version":"1","kind":"lora","language":"go","command":"x","protocol_version":1,"public_methods":["inspect"]}`, `field public_methods: only a plugin of kind "pipeline"`},
		{"blank public method", `{"name":"p","version":"1","kind":"pipeline","language":"go","command":"x","protocol_version":1,"public_methods":[" run"]}`, `field public_methods[0]: " run" is not a method name`},
		{"requires python modules", `{"name":"p","version":"1","kind":"pipeline","language":"python","command":"x","protocol_version":1,"requires":{"python_modules":["torch","diffusers.pipelines"]}}`, ""},
		{"requires modules of a go plugin", `{"name":"x","version":"1","kind":"lora","language":"go","command":"x","protocol_version":1,"requires":{"python_modules":["torch"]}}`, `field requires.python_modules: only for language "python"`},
		{"requires bad module", `{"name":"p","version":"1","kind":"pipeline","language":"python","command":"x","protocol_version":1,"requires":{"python_modules":["torch; rm -rf /"]}}`, `field requires.python_modules[0]: "torch; rm -rf /" is not a Python module name`},
		{"requires unknown need", `{"name":"p","version":"1","kind":"pipeline","language":"python","command":"x","protocol_version":1,"requires":{"gpu":true}}`, `unknown field "gpu"`},
		{"trailing data", valid + `{}`, "trailing data"},
		{"not json", `name = "x"`, "decode"},
	}
	dir := t.TempDir()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "_")+".json")
			writeFile(t, path, tc.body, 0o644)
			m, err := Parse(path)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("Parse: %v", err)
				}
				if m.Path != path || m.Dir() != dir {
					t.Fatalf("Path %q Dir %q, want %q in %q", m.Path, m.Dir(), path, dir)
				}
				return
			}
			if err == nil {
				t.Fatalf("Parse accepted %s", tc.body)
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), path) {
				t.Fatalf("error %q\nwant it to name %q and the file %s", err, tc.want, path)
			}
		})
	}
	if _, err := Parse(filepath.Join(dir, "missing.json")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing manifest: %v", err)
	}
}

// TestPublic: only pipelines have public methods; "run" when none are
// listed.
func TestPublic(t *testing.T) {
	for _, tc := range []struct {
		m      Manifest
		method string
		want   bool
	}{
		{Manifest{Kind: KindPipeline}, "run", true},
		{Manifest{Kind: KindPipeline}, "warmup", false},
		{Manifest{Kind: KindPipeline, PublicMethods: []string{"img2img"}}, "run", false},
		{Manifest{Kind: KindPipeline, PublicMethods: []string{"img2img"}}, "img2img", true},
		{Manifest{Kind: KindLoRA}, "run", false},
		{Manifest{Kind: KindLoRA}, "inspect", false},
		{Manifest{Kind: KindPreview}, "render.factor", false},
	} {
		if got := tc.m.Public(tc.method); got != tc.want {
			t.Errorf("kind %s public %v: Public(%q) = %v", tc.m.Kind, tc.m.PublicMethods, tc.method, got)
		}
	}
}

func TestDiscover(t *testing.T) {
	dir := t.TempDir()
	ok := func(name string) string {
		return `{"name":"` + name + `","version":"1","kind":"lora","language":"go","command":"./x","protocol_version":1}`
	}
	writeFile(t, filepath.Join(dir, "b", File), ok("bee"), 0o644)
	writeFile(t, filepath.Join(dir, "a", File), ok("ay"), 0o644)
	writeFile(t, filepath.Join(dir, "broken", File), `{"name":"broken"}`, 0o644)
	writeFile(t, filepath.Join(dir, "dup", File), ok("ay"), 0o644)
	writeFile(t, filepath.Join(dir, "empty-dir", "README"), "no manifest here", 0o644)
	writeFile(t, filepath.Join(dir, "stray.json"), "{}", 0o644)

	mans, err := Discover(dir)
	var names []string
	for _, m := range mans {
		names = append(names, m.Name)
	}
	if strings.Join(names, ",") != "ay,bee" {
		t.Fatalf("discovered %v, want [ay bee]", names)
	}
	if err == nil {
		t.Fatal("Discover hid the broken and duplicate manifests")
	}
	for _, w := range []string{filepath.Join(dir, "broken", File) + ": field version: required",
		filepath.Join(dir, "dup", File) + `: field name: "ay" already declared by ` + filepath.Join(dir, "a", File)} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("Discover error %q\nlacks %q", err, w)
		}
	}
	if _, err := Discover(filepath.Join(dir, "nope")); err == nil {
		t.Fatal("Discover of a missing directory succeeded")
	}
}
