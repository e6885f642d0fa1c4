package job_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/arenahost/arenahost/host/job"
	"github.com/arenahost/arenahost/host/server"
)

var (
	buildOnce sync.Once
	pluginDir string
	buildErr  error
)

// buildPlugins builds the preview plugin and the test pipeline into a
// plugins directory (DIR/NAME/{NAME, plugin.json}), once per test binary.
func buildPlugins(tb testing.TB) string {
	tb.Helper()
	buildOnce.Do(func() {
		if pluginDir, buildErr = os.MkdirTemp("", "job-plugins"); buildErr != nil {
			return
		}
		for _, p := range []struct{ name, pkg, kind string }{
			{"preview", "../../plugins/preview", "preview"},
			{"test-pipeline", "./testdata/pipeline", "pipeline"},
		} {
			dir := filepath.Join(pluginDir, p.name)
			if buildErr = os.MkdirAll(dir, 0o755); buildErr != nil {
				return
			}
			out, err := exec.Command("go", "build", "-o", filepath.Join(dir, p.name), p.pkg).CombinedOutput()
			if err != nil {
				buildErr = fmt.Errorf("go build %s: %v\n%s", p.pkg, err, out)
				return
			}
			man := fmt.Sprintf(`{"name": %q, "version": "0.1.0", "kind": %q, "language": "go", "command": "./%s", "protocol_version": 1}`, p.name, p.kind, p.name)
			if buildErr = os.WriteFile(filepath.Join(dir, "plugin.json"), []byte(man), 0o644); buildErr != nil {
				return
			}
		}
	})
	if buildErr != nil {
		tb.Fatal(buildErr)
	}
	return pluginDir
}

func TestMain(m *testing.M) {
	code := m.Run()
	if pluginDir != "" {
		os.RemoveAll(pluginDir)
	}
	os.Exit(code)
}

// startHost starts a host (arena, plugin manager, jobs) with the preview
// plugin and the test pipeline.
func startHost(tb testing.TB) *server.Server {
	tb.Helper()
	dir := buildPlugins(tb)
	ctx := context.Background()
	s, err := server.New(ctx, server.Config{DataDir: tb.TempDir(), PluginsDir: dir, ArenaCapacity: 1 << 30, ArenaSegment: 32 << 20})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = s.Close(ctx) })
	return s
}

// wait waits for the job to end and returns its snapshot.
func wait(tb testing.TB, j *job.Job, bound time.Duration) job.Snapshot {
	tb.Helper()
	select {
	case <-j.Done():
	case <-time.After(bound):
		tb.Fatalf("job %s not done after %v: %+v", j.ID(), bound, j.Snapshot())
	}
	return j.Snapshot()
}

// frames collects the frame events of a subscription until the job ends.
func frames(sub *job.Subscription, j *job.Job, onFrame func(*job.Frame)) []*job.Frame {
	var out []*job.Frame
	for {
		select {
		case <-sub.C():
			for _, e := range sub.Next() {
				if e.Type == job.EventFrame {
					out = append(out, e.Frame)
					if onFrame != nil {
						onFrame(e.Frame)
					}
				}
			}
		case <-j.Done():
			for _, e := range sub.Next() {
				if e.Type == job.EventFrame {
					out = append(out, e.Frame)
				}
			}
			return out
		}
	}
}
