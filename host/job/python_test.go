package job_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/arenahost/arenahost/host/server"
	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/sdk/api"
)

// TestPythonReferencePipeline runs the SDK's NumPy reference pipeline as a
// job: its "latent" publishes (payload arch flux1, layout chw, a region it
// frees two steps later) are copied, rendered and counted. On a device
// arena (the simulated one here) the pipeline's regions are device
// memory and the latents are downloaded into the preview arena.
func TestPythonReferencePipeline(t *testing.T) {
	for _, backend := range []string{server.BackendCPU, server.BackendCUDASim} {
		t.Run(backend, func(t *testing.T) { testReferencePipeline(t, backend) })
	}
}

func testReferencePipeline(t *testing.T, backend string) {
	py := testenv.Python(t)
	root := testenv.RepoRoot(t)
	plugins := t.TempDir()
	for _, name := range []string{"preview"} {
		src := filepath.Join(buildPlugins(t), name)
		if err := os.CopyFS(filepath.Join(plugins, name), os.DirFS(src)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.CopyFS(filepath.Join(plugins, "reference-pipeline"), os.DirFS(filepath.Join(root, "sdk", "python", "examples", "reference_pipeline"))); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	s, err := server.New(ctx, server.Config{DataDir: t.TempDir(), PluginsDir: plugins, ArenaCapacity: 1 << 30, Samples: true, ArenaBackend: backend,
		PluginEnv: map[string]string{"ARENAHOST_PYTHON": py}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(ctx) })
	j, err := s.Jobs.Create(t.Context(), api.JobSpec{Pipeline: "reference-pipeline",
		Params: map[string]any{"steps": 6, "width": 64, "height": 48, "seed": 3}, Preview: api.PreviewSpec{Format: "png"}})
	if err != nil {
		t.Fatal(err)
	}
	snap := wait(t, j, 60*time.Second)
	if snap.State != api.JobDone || snap.Step != 6 || snap.Total != 6 {
		t.Fatalf("job %+v", snap)
	}
	c := snap.Preview.PreviewCounters
	if c.Published != 6 || c.Rendered+c.Dropped != 6 || c.Rendered == 0 {
		t.Fatalf("counters %+v", c)
	}
	f := j.Frame()
	if f == nil || f.Step != 6 || f.Width != 64 || f.Height != 48 || f.Format != "png" {
		t.Fatalf("last frame %+v", f)
	}
	res, ok := snap.Result.(map[string]any)
	if !ok || res["job_id"] != j.ID() {
		t.Fatalf("result %v: want the pipeline to have run under job id %s", snap.Result, j.ID())
	}
}
