package server

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

func TestNewLoadsSampleAndCloses(t *testing.T) {
	tests := []struct {
		name string
		mode string
	}{
		{"memfd", "memfd"},
		{"shm", "shm"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			s, err := New(ctx, Config{DataDir: dir, Samples: true, ShmMode: tc.mode, ArenaCapacity: 256 << 20, Logger: quiet})
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			if _, err := os.Stat(filepath.Join(dir, "models", "flux-sample-nf4.safetensors")); err != nil {
				t.Fatalf("sample model not written: %v", err)
			}
			m, ok := s.Registry.Model(DefaultModelName)
			if !ok || m.Layout != "flux-bfl" || len(m.Weights) != 42 {
				t.Fatalf("sample model not registered as expected: %+v", m)
			}
			if s.Arena.Stats().Allocated == 0 {
				t.Fatal("arena holds nothing after loading the sample")
			}
			// LookupTensors through the plugin manager's seam hands out read-only
			// descriptors whose quant info names the side tensors.
			resp, err := lookup{reg: s.Registry, loc: s.Arena}.LookupTensors(ctx, &pluginv1.LookupTensorsRequest{Prefix: "double_blocks.0.img_attn.qkv"})
			if err != nil {
				t.Fatalf("LookupTensors: %v", err)
			}
			var found bool
			for _, d := range resp.Tensors {
				if d.Name == "double_blocks.0.img_attn.qkv.weight" {
					found = true
					if d.Quant == nil || d.Quant.Absmax == nil || d.Access != pluginv1.Access_ACCESS_READ_ONLY {
						t.Errorf("qkv descriptor lacks quant info or is writable: %v", d)
					}
					if got := d.Quant.Shape; len(got) != 2 || got[0] != 768 || got[1] != 256 {
						t.Errorf("qkv logical shape %v, want [768 256]", got)
					}
				}
			}
			if !found {
				t.Fatalf("qkv weight not among %d descriptors", len(resp.Tensors))
			}
			if err := s.Close(ctx); err != nil {
				t.Fatalf("Close: %v", err)
			}
			// A second start reuses the written sample.
			s2, err := New(ctx, Config{DataDir: dir, Samples: true, ShmMode: tc.mode, ArenaCapacity: 256 << 20, Logger: quiet})
			if err != nil {
				t.Fatalf("second New: %v", err)
			}
			if err := s2.Close(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestNewFailsCleanly(t *testing.T) {
	dir := t.TempDir()
	// An arena too small for the sample: New fails and tears down what it built.
	_, err := New(context.Background(), Config{DataDir: dir, Samples: true, ArenaCapacity: 1 << 20, ArenaSegment: 1 << 20, Logger: quiet})
	if err == nil {
		t.Fatal("want an error loading the sample into a 1 MiB arena")
	}
	t.Logf("error: %v", err)
}

var quiet = slog.New(slog.DiscardHandler)

// TestBrokenPluginDoesNotStopHost: a plugin that cannot start is reported
// as failed, with its error, and the host serves on.
func TestBrokenPluginDoesNotStopHost(t *testing.T) {
	plugins := t.TempDir()
	dir := filepath.Join(plugins, "broken")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	man := `{"name": "broken", "version": "0.1.0", "kind": "pipeline", "language": "python",
 "command": "${ARENAHOST_PYTHON}", "args": ["plugin.py"], "protocol_version": 1}`
	if err := os.WriteFile(filepath.Join(dir, "plugin.json"), []byte(man), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("ARENAHOST_PYTHON", "")
	os.Unsetenv("ARENAHOST_PYTHON")
	s, err := New(context.Background(), Config{DataDir: t.TempDir(), PluginsDir: plugins, Samples: true, ArenaCapacity: 256 << 20, Logger: quiet})
	if err != nil {
		t.Fatalf("New with a broken plugin: %v", err)
	}
	defer s.Close(context.Background())
	st, err := s.Plugins.PluginStatus("broken")
	if err != nil {
		t.Fatal(err)
	}
	if st.State != "failed" || !strings.Contains(st.LastError, "ARENAHOST_PYTHON") {
		t.Fatalf("broken plugin: state %q, last error %q; want failed naming ARENAHOST_PYTHON", st.State, st.LastError)
	}
	if _, ok := s.Registry.Model(DefaultModelName); !ok {
		t.Fatal("the sample model is not loaded")
	}
}
