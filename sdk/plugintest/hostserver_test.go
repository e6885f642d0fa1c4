package plugintest_test

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/arenahost/arenahost/sdk/plugintest"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// countingHost is a test's own Host service: the fake host's, with each
// Allocate counted and renamed, so the test can tell which one served.
type countingHost struct {
	*plugintest.FakeHost
	allocs atomic.Int32
}

func (h *countingHost) Allocate(ctx context.Context, req *pluginv1.AllocateRequest) (*pluginv1.AllocateResponse, error) {
	h.allocs.Add(1)
	return h.FakeHost.Allocate(ctx, req)
}

// TestHostServer: Config.HostServer replaces the fake host as the Host
// service the plugin calls, through go-plugin's broker and through
// ARENAHOST_HOST_ADDR alike.
func TestHostServer(t *testing.T) {
	bin := plugintest.NewBinary("../examples/go-hello", "go-hello")
	t.Cleanup(bin.Remove)
	for _, tc := range []struct {
		name    string
		viaEnv  bool
		ownHost bool
	}{
		{"broker, own host", false, true},
		{"env, own host", true, true},
		{"broker, fake host", false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := plugintest.NewFakeHost(t, 1<<20)
			own := &countingHost{FakeHost: fake}
			cfg := plugintest.Config{Cmd: []string{bin.Path(t)}, Host: fake, HostViaEnv: tc.viaEnv}
			if tc.ownHost {
				cfg.HostServer = own
			}
			p := plugintest.Start(t, cfg)
			args, _ := msgpack.Marshal(map[string]any{"name": "x", "count": 4, "start": 1.0, "step": 1.0})
			if _, err := p.Client.Invoke(t.Context(), &pluginv1.InvokeRequest{Method: "conformance.fill", Args: args}); err != nil {
				t.Fatal(err)
			}
			want := int32(0)
			if tc.ownHost {
				want = 1
			}
			if got := own.allocs.Load(); got != want {
				t.Errorf("own host served %d allocations, want %d", got, want)
			}
			if n := len(fake.Allocated()); n != 1 {
				t.Errorf("fake host recorded %d allocations, want 1", n)
			}
		})
	}
}
