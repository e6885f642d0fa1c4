package plugin

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/manifest"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// syncBuffer collects log output from many goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func newTestManager(t testing.TB, cfg Config) (*Manager, *syncBuffer) {
	t.Helper()
	logs := &syncBuffer{}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = -1
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 10 * time.Second
	}
	if cfg.SocketDir == "" {
		cfg.SocketDir = shortTempDir(t)
	}
	m := NewManager(cfg)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = m.Close(ctx)
		if t.Failed() {
			t.Logf("manager log:\n%s", logs.String())
		}
	})
	return m, logs
}

func addFixture(t testing.TB, m *Manager, dir, name, mode string, edit func(*manifest.Manifest)) *manifest.Manifest {
	t.Helper()
	path := writeFixture(t, dir, name, mode, edit)
	man, err := manifest.Parse(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Add(context.Background(), man); err != nil {
		t.Fatal(err)
	}
	return man
}

func callGen(ctx context.Context, m *Manager, name, echo string) (genReply, *Reply, error) {
	args, _ := msgpack.Marshal(map[string]any{"echo": echo})
	r, err := m.Call(ctx, name, "gen", args, nil)
	if err != nil {
		return genReply{}, nil, err
	}
	var g genReply
	if err := msgpack.Unmarshal(r.Result, &g); err != nil {
		return genReply{}, r, err
	}
	return g, r, nil
}

func mustStatus(t testing.TB, m *Manager, name string) api.PluginStatus {
	t.Helper()
	s, err := m.PluginStatus(name)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	if err := syscall.Kill(pid, 0); err != nil {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// pid (comm) S …: the state follows the last ')'.
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}

func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for time.Since(start) < d {
		if cond() {
			return time.Since(start)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s: not within %s", what, d)
	return 0
}

func TestCallStreamAndHostService(t *testing.T) {
	arena := newFakeArena(t, 1<<20)
	pub := &fakePublisher{}
	m, logs := newTestManager(t, Config{Arena: arena, Publisher: pub})
	dir := t.TempDir()
	addFixture(t, m, dir, "echo", "echo", nil)

	st := mustStatus(t, m, "echo")
	if st.State != api.PluginServing || st.Generation != 1 || !alive(st.PID) {
		t.Fatalf("status after Add = %+v, want serving generation 1 with a live pid", st)
	}
	g, r, err := callGen(t.Context(), m, "echo", "hi")
	if err != nil {
		t.Fatal(err)
	}
	if g.Generation != 1 || r.Generation != 1 || g.PID != st.PID || g.Echo != "hi" {
		t.Fatalf("gen reply %+v (reply generation %d), want generation 1 pid %d echo hi", g, r.Generation, st.PID)
	}

	var got []int
	err = m.Stream(t.Context(), "echo", "count", nil, nil, func(r *Reply) error {
		var v struct {
			I int `msgpack:"i"`
		}
		if err := msgpack.Unmarshal(r.Result, &v); err != nil {
			return err
		}
		got = append(got, v.I)
		return nil
	})
	if err != nil || len(got) != 5 || got[4] != 4 {
		t.Fatalf("stream = %v, %v; want 0..4", got, err)
	}

	// Host service: allocate through the arena under the generation's owner.
	args, _ := msgpack.Marshal(map[string]any{"n": 1000})
	r, err = m.Call(t.Context(), "echo", "alloc", args, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Tensors) != 1 || r.Tensors[0].GetNbytes() != 4000 || r.Tensors[0].GetRegion().GetCpu() == nil {
		t.Fatalf("alloc tensors = %v", r.Tensors)
	}
	if n := arena.ownerBytes(Owner("echo", 1)); n < 4000 {
		t.Fatalf("arena bytes of %s = %d, want ≥ 4000", Owner("echo", 1), n)
	}
	if _, err := m.Call(t.Context(), "echo", "free", nil, r.Tensors); err != nil {
		t.Fatal(err)
	}
	if n := arena.allocated(); n != 0 {
		t.Fatalf("after free the arena holds %d bytes", n)
	}

	if r, err = m.Call(t.Context(), "echo", "publish", nil, nil); err != nil {
		t.Fatal(err)
	}
	pub.mu.Lock()
	if len(pub.got) != 1 || pub.got[0].from.Owner != Owner("echo", 1) || pub.got[0].req.GetStep() != 3 {
		t.Fatalf("published %+v", pub.got)
	}
	pub.mu.Unlock()

	if _, err := m.Call(t.Context(), "echo", "log", nil, nil); err != nil {
		t.Fatal(err)
	}
	lines, _ := m.Logs("echo", 100)
	found := false
	for _, l := range lines {
		found = found || (l.Text == "hello from the plugin" && l.Level == "warn" && l.Generation == 1)
	}
	if !found {
		t.Fatalf("Logs lack the Host.Log line: %+v", lines)
	}
	if !strings.Contains(logs.String(), "plugin=echo") {
		t.Fatalf("manager log does not name the plugin:\n%s", logs.String())
	}

	if _, err := m.Call(t.Context(), "nope", "gen", nil, nil); !errors.Is(err, ErrUnknownPlugin) {
		t.Fatalf("call to unknown plugin: %v, want ErrUnknownPlugin", err)
	}
	if _, err := m.Call(t.Context(), "echo", "nope", nil, nil); err == nil || !strings.Contains(err.Error(), `unknown method "nope"`) {
		t.Fatalf("unknown method error = %v", err)
	}
}

// The registry behind Host.LookupTensors is reached with the request as
// sent; the fixture does not use it, so call the service directly.
func TestHostServiceLookupAndAllocateErrors(t *testing.T) {
	reg := &fakeRegistry{tensors: map[string]*pluginv1.TensorDescriptor{"w": {Name: "w", Nbytes: 8}}}
	h := &hostService{src: Source{Plugin: "p", Generation: 2, Owner: Owner("p", 2)}, deps: hostDeps{registry: reg, arena: newFakeArena(t, 4096)},
		log: slog.New(slog.DiscardHandler), ring: newLogRing(4)}
	resp, err := h.LookupTensors(t.Context(), &pluginv1.LookupTensorsRequest{Names: []string{"w"}})
	if err != nil || len(resp.GetTensors()) != 1 {
		t.Fatalf("lookup = %v, %v", resp, err)
	}
	if _, err := h.LookupTensors(t.Context(), &pluginv1.LookupTensorsRequest{Names: []string{"x"}}); err == nil || !strings.Contains(err.Error(), `"x" not found`) {
		t.Fatalf("lookup missing = %v", err)
	}
	for _, tc := range []struct {
		name string
		req  *pluginv1.AllocateRequest
		want string
	}{
		{"nothing", &pluginv1.AllocateRequest{Name: "a"}, "neither shape nor nbytes"},
		{"negative dim", &pluginv1.AllocateRequest{Name: "a", Dtype: pluginv1.DType_DTYPE_F32, Shape: []int64{2, -1}}, "shape[1] = -1"},
		{"nbytes disagrees", &pluginv1.AllocateRequest{Name: "a", Dtype: pluginv1.DType_DTYPE_F16, Shape: []int64{4}, Nbytes: 9}, "nbytes 9 but shape [4]"},
		{"too big", &pluginv1.AllocateRequest{Name: "big", Nbytes: 1 << 20}, "arena full"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := h.Allocate(t.Context(), tc.req)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Allocate(%v) = %v, want error containing %q", tc.req, err, tc.want)
			}
		})
	}
}

func TestSwapKeepsServingAndBumpsGeneration(t *testing.T) {
	ar := newRealArena(t)
	m, _ := newTestManager(t, Config{Arena: ArenaOf(ar)})
	dir := t.TempDir()
	addFixture(t, m, dir, "echo", "echo", nil)
	args, _ := msgpack.Marshal(map[string]any{"n": 256})
	r, err := m.Call(t.Context(), "echo", "alloc", args, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Free through the real arena: only the owner may free.
	if _, err := m.Call(t.Context(), "echo", "free", nil, r.Tensors); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Call(t.Context(), "echo", "free", nil, r.Tensors); err == nil || !strings.Contains(err.Error(), "regions[0]") {
		t.Fatalf("double free = %v, want an error naming regions[0]", err)
	}
	if _, err := m.Call(t.Context(), "echo", "alloc", args, nil); err != nil {
		t.Fatal(err)
	}
	if ar.Owned(arena.PluginOwner("echo", 1)) == 0 {
		t.Fatal("generation 1 owns nothing after alloc")
	}
	old := mustStatus(t, m, "echo")
	if err := m.Swap(t.Context(), "echo"); err != nil {
		t.Fatal(err)
	}
	st := mustStatus(t, m, "echo")
	if st.Generation != 2 || st.State != api.PluginServing || st.PID == old.PID {
		t.Fatalf("after swap: %+v", st)
	}
	if alive(old.PID) {
		t.Fatalf("old generation pid %d still alive after swap", old.PID)
	}
	if n := ar.Owned(arena.PluginOwner("echo", 1)); n != 0 {
		t.Fatalf("old generation still leases %v", n)
	}
	g, _, err := callGen(t.Context(), m, "echo", "")
	if err != nil || g.Generation != 2 || g.PID != st.PID {
		t.Fatalf("call after swap = %+v, %v", g, err)
	}
}

// The manager's owner names are the arena's plugin owners.
func TestOwnerMatchesArena(t *testing.T) {
	if got, want := Owner("lora-nf4", 7), string(arena.PluginOwner("lora-nf4", 7)); got != want {
		t.Fatalf("Owner = %q, arena.PluginOwner = %q", got, want)
	}
}

// shortTempDir is a temporary directory with a short path (removed at the
// end of the test): t.TempDir's names the test, and a plugin socket's whole
// path, several directories below, must fit in 107 bytes.
func shortTempDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "ah")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(d) })
	return d
}
