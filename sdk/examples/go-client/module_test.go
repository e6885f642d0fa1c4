package main

import (
	"context"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/arenahost/arenahost/internal/testenv"
)

// The done-when of the Go client: a program in a module of its own
// (requiring github.com/arenahost/arenahost through a replace directive, as
// an author outside the repository writes it) that imports only sdk/client
// and sdk/api lists the models of a real `arenahost serve`, applies a LoRA
// and streams a job's previews and events. The host is the built binary
// with the built lora-nf4, preview and NumPy reference pipeline plugins.
func TestOutOfTreeClientAgainstServe(t *testing.T) {
	// Only the standard library, sdk/client and sdk/api.
	f, err := parser.ParseFile(token.NewFileSet(), "main.go", nil, parser.ImportsOnly)
	if err != nil {
		t.Fatal(err)
	}
	for _, imp := range f.Imports {
		p := strings.Trim(imp.Path.Value, `"`)
		if strings.Contains(p, ".") && p != "github.com/arenahost/arenahost/sdk/client" && p != "github.com/arenahost/arenahost/sdk/api" {
			t.Errorf("main.go imports %s: the example may use only sdk/client and sdk/api", p)
		}
	}
	bin := testenv.OutOfTreeModule(t, "example.com/go-client", "main.go")
	h := testenv.StartHost(t, []string{"lora-nf4", "preview", "reference_pipeline"})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	dir := t.TempDir()
	cmd := exec.CommandContext(ctx, bin, "-host", h.URL, "-steps", "6", "-out", dir, "-wait", "2m")
	out, err := cmd.CombinedOutput()
	t.Logf("go-client output:\n%s", out)
	if err != nil {
		t.Fatalf("go-client: %v\nhost log:\n%s", err, h.LogTail(4000))
	}
	s := string(out)
	for _, re := range []string{
		`(?m)^model sample format=bnb-nf4 layout=flux-bfl weights=\d+ bytes=\d+$`,
		`(?m)^lora applied model=sample mode=side path=apply loras=flux-sample-[\w-]+:0\.8 binding_generation=[1-9]\d*$`,
		`(?m)^job \S+ created pipeline=reference-pipeline state=(queued|running)$`,
		`(?m)^preview frame=[1-9]\d* step=[1-9]\d* type=image/jpeg bytes=[1-9]\d*$`,
		`(?m)^events progress=[1-9]\d* frame=\d+ final=done$`,
		`(?m)^job \S+ done step=6/6 previews=[1-9]\d* rendered=[1-9]\d*$`,
		`(?m)^lora removed model=sample loras=0$`,
	} {
		if !regexp.MustCompile(re).MatchString(s) {
			t.Errorf("output lacks a line matching %s", re)
		}
	}
	// The frames it wrote are JPEGs, and as many as it reported.
	frames := regexp.MustCompile(`(?m)^preview frame=`).FindAllString(s, -1)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != len(frames) {
		t.Errorf("%d frame files in %s, %d frames printed", len(ents), dir, len(frames))
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil || len(b) < 4 || b[0] != 0xFF || b[1] != 0xD8 {
			t.Errorf("%s: not a JPEG (%v, %d bytes)", e.Name(), err, len(b))
		}
	}
}

func TestMain(m *testing.M) { testenv.Main(m) }
