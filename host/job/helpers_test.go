package job_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/arenahost/arenahost/host/job"
	"github.com/arenahost/arenahost/host/server"
	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/sdk/api"
)

// buildPlugins installs the preview plugin and the test pipeline (built
// once per test binary) into a fresh plugins directory
// (DIR/NAME/{NAME, plugin.json}).
func buildPlugins(tb testing.TB) string {
	tb.Helper()
	dir := tb.TempDir()
	for _, p := range []struct{ name, pkg, kind string }{
		{"preview", "./plugins/preview", "preview"},
		{"test-pipeline", "./host/job/testdata/pipeline", "pipeline"},
	} {
		man := fmt.Sprintf(`{"name": %q, "version": "0.1.0", "kind": %q, "language": "go", "command": "./%s", "protocol_version": 1}`, p.name, p.kind, p.name)
		testenv.InstallPlugin(tb, dir, p.name, p.pkg, man)
	}
	return dir
}

func TestMain(m *testing.M) { testenv.Main(m) }

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
func wait(tb testing.TB, j *job.Job, bound time.Duration) api.Job {
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
				if e.Type == api.EventFrame {
					out = append(out, e.Frame)
					if onFrame != nil {
						onFrame(e.Frame)
					}
				}
			}
		case <-j.Done():
			for _, e := range sub.Next() {
				if e.Type == api.EventFrame {
					out = append(out, e.Frame)
				}
			}
			return out
		}
	}
}
