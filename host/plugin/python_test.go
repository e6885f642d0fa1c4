package plugin

import (
	"encoding/binary"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/manifest"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// copyPythonExample copies the Python SDK's example plugin (manifest and
// script) into a fresh plugins directory, so a test can touch it.
func copyPythonExample(t testing.TB) (path string) {
	t.Helper()
	src := filepath.Join(testenv.RepoRoot(t), "sdk", "python", "examples", "hello")
	dst := filepath.Join(t.TempDir(), "hello-py")
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"plugin.json", "hello_plugin.py"} {
		b, err := os.ReadFile(filepath.Join(src, f))
		if err != nil {
			t.Fatalf("python example: %v", err)
		}
		if err := os.WriteFile(filepath.Join(dst, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dst, manifest.File)
}

// f32Tensor leases n float32 values in the arena to the test, fills them
// with fill(i) and describes them with the given access.
func f32Tensor(t testing.TB, a *fakeArena, name string, n int, access pluginv1.Access, fill func(int) float32) (*pluginv1.TensorDescriptor, []byte) {
	t.Helper()
	r, err := a.Alloc("test", name, uint64(4*n))
	if err != nil {
		t.Fatal(err)
	}
	mem := a.mem[r.GetOffset() : r.GetOffset()+uint64(4*n)]
	for i := range n {
		binary.LittleEndian.PutUint32(mem[4*i:], math.Float32bits(fill(i)))
	}
	return &pluginv1.TensorDescriptor{
		Name: name, Dtype: pluginv1.DType_DTYPE_F32, Shape: []int64{int64(n)}, Nbytes: uint64(4 * n),
		Access: access, Region: r,
	}, mem
}

func f32At(mem []byte, i int) float32 {
	return math.Float32frombits(binary.LittleEndian.Uint32(mem[4*i:]))
}

// The Python SDK's example plugin through its whole life: start, a
// zero-copy read of a host tensor, an in-place write the host sees, an
// allocation leased to the generation, a swap, and a graceful stop.
func TestPythonPluginLifecycle(t *testing.T) {
	python := testenv.Python(t)
	arena := newFakeArena(t, 4<<20)
	m, logs := newTestManager(t, Config{Arena: arena, Env: map[string]string{"ARENAHOST_PYTHON": python}})
	man, err := manifest.Parse(copyPythonExample(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Add(t.Context(), man); err != nil {
		t.Fatal(err)
	}
	st := mustStatus(t, m, "hello-py")
	if st.State != api.PluginServing || st.Generation != 1 || st.Language != manifest.LanguagePython {
		t.Fatalf("status = %+v", st)
	}

	// Zero-copy read: the values exist only in the arena's shared memory.
	const n = 1 << 16
	ro, _ := f32Tensor(t, arena, "x", n, pluginv1.Access_ACCESS_READ_ONLY, func(i int) float32 { return float32(i % 7) })
	r, err := m.Call(t.Context(), "hello-py", "stats", nil, []*pluginv1.TensorDescriptor{ro})
	if err != nil {
		t.Fatal(err)
	}
	var stats struct {
		Count int     `msgpack:"count"`
		Sum   float64 `msgpack:"sum"`
		Max   float64 `msgpack:"max"`
	}
	if err := msgpack.Unmarshal(r.Result, &stats); err != nil {
		t.Fatal(err)
	}
	var want float64
	for i := range n {
		want += float64(i % 7)
	}
	if stats.Count != n || stats.Sum != want || stats.Max != 6 {
		t.Fatalf("stats = %+v, want count %d sum %v max 6", stats, n, want)
	}

	// In-place write through a read-write descriptor, seen by the host.
	rw, mem := f32Tensor(t, arena, "y", 1024, pluginv1.Access_ACCESS_READ_WRITE, func(i int) float32 { return float32(i) })
	args, _ := msgpack.Marshal(map[string]any{"factor": 2.5})
	if _, err := m.Call(t.Context(), "hello-py", "scale", args, []*pluginv1.TensorDescriptor{rw}); err != nil {
		t.Fatal(err)
	}
	for _, i := range []int{0, 1, 511, 1023} {
		if got := f32At(mem, i); got != 2.5*float32(i) {
			t.Fatalf("y[%d] = %v after scale, want %v", i, got, 2.5*float32(i))
		}
	}
	// A read-only descriptor cannot be written.
	if _, err := m.Call(t.Context(), "hello-py", "scale", args, []*pluginv1.TensorDescriptor{ro}); err == nil {
		t.Fatal("scale through a read-only descriptor succeeded")
	}

	// An allocation through the Host service (unix socket + token) is
	// leased to generation 1 and reclaimed when it is retired.
	args, _ = msgpack.Marshal(map[string]any{"a": 2.0, "b": 1.0})
	r, err = m.Call(t.Context(), "hello-py", "affine", args, []*pluginv1.TensorDescriptor{rw})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Tensors) != 1 {
		t.Fatalf("affine returned %d tensors", len(r.Tensors))
	}
	out := r.Tensors[0].GetRegion()
	if got := f32At(arena.mem[out.GetOffset():], 3); got != 2*7.5+1 {
		t.Fatalf("affine output[3] = %v, want 16", got)
	}
	if arena.ownerBytes(Owner("hello-py", 1)) < 4096 {
		t.Fatalf("affine output is not leased to %s", Owner("hello-py", 1))
	}
	if !strings.Contains(logs.String(), "affine done") {
		t.Fatalf("Host.Log line missing from the host log")
	}

	// Swap: generation 2 serves, generation 1 is gone with its leases.
	if err := m.Swap(t.Context(), "hello-py"); err != nil {
		t.Fatal(err)
	}
	st2 := mustStatus(t, m, "hello-py")
	if st2.Generation != 2 || st2.State != api.PluginServing || alive(st.PID) {
		t.Fatalf("after swap: %+v (old pid %d alive: %v)", st2, st.PID, alive(st.PID))
	}
	if b := arena.ownerBytes(Owner("hello-py", 1)); b != 0 {
		t.Fatalf("generation 1 still leases %d bytes after the swap", b)
	}
	if _, err := m.Call(t.Context(), "hello-py", "stats", nil, []*pluginv1.TensorDescriptor{ro}); err != nil {
		t.Fatal(err)
	}

	// Graceful stop: GRPCController.Shutdown, exit status 0, no SIGKILL.
	p, _ := m.get("hello-py")
	g := p.current.Load()
	t0 := time.Now()
	if err := m.Remove(t.Context(), "hello-py"); err != nil {
		t.Fatal(err)
	}
	took := time.Since(t0)
	if g.cmd.ProcessState == nil || !g.cmd.ProcessState.Success() {
		t.Fatalf("generation 2 did not exit gracefully: %v", g.cmd.ProcessState)
	}
	if alive(st2.PID) {
		t.Fatalf("pid %d alive after Remove", st2.PID)
	}
	t.Logf("graceful stop took %v", took)
	if took > 500*time.Millisecond {
		t.Errorf("graceful stop took %v, want < 500 ms", took)
	}
}
