package plugin

import (
	"encoding/binary"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/shared/manifest"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// buildGoHello builds the Go SDK's example plugin next to a copy of its
// manifest, as `make build` lays out bin/plugins/NAME/.
func buildGoHello(t testing.TB) string {
	t.Helper()
	src := filepath.Join(testenv.RepoRoot(t), "sdk", "examples", "go-hello")
	dst := filepath.Join(t.TempDir(), "go-hello")
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(src, manifest.File))
	if err != nil {
		t.Fatalf("go-hello example: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dst, manifest.File), b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := testenv.CopyFile(testenv.GoBinary(t, "./sdk/examples/go-hello"), filepath.Join(dst, "go-hello"), 0o755); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dst, manifest.File)
}

// The Go SDK's example plugin under the manager: the Host service reached
// through go-plugin's broker allocates its output under the generation's
// owner, and the output is reclaimed when the generation is retired.
func TestGoSDKExample(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the go-hello example")
	}
	arena := newFakeArena(t, 1<<20)
	m, _ := newTestManager(t, Config{Arena: arena})
	man, err := manifest.Parse(buildGoHello(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Add(t.Context(), man); err != nil {
		t.Fatal(err)
	}
	in, _ := f32Tensor(t, arena, "x", 4, pluginv1.Access_ACCESS_READ_ONLY, func(i int) float32 { return float32(i) + 0.5 })
	args, _ := msgpack.Marshal(map[string]any{"factor": 2})
	r, err := m.Call(t.Context(), "go-hello", "scale", args, []*pluginv1.TensorDescriptor{in})
	if err != nil {
		t.Fatal(err)
	}
	var res struct {
		Count int     `msgpack:"count"`
		Sum   float64 `msgpack:"sum"`
	}
	if err := msgpack.Unmarshal(r.Result, &res); err != nil {
		t.Fatal(err)
	}
	if res.Count != 4 || res.Sum != 2*(0.5+1.5+2.5+3.5) || len(r.Tensors) != 1 {
		t.Fatalf("scale = %+v with %d tensors", res, len(r.Tensors))
	}
	off := r.Tensors[0].GetRegion().GetOffset()
	if got := math.Float32frombits(binary.LittleEndian.Uint32(arena.mem[off+12:])); got != 7 {
		t.Fatalf("output[3] = %v, want 7", got)
	}
	if arena.ownerBytes(Owner("go-hello", 1)) == 0 {
		t.Fatal("the output region is not leased to generation 1")
	}
	if err := m.Swap(t.Context(), "go-hello"); err != nil {
		t.Fatal(err)
	}
	if n := arena.ownerBytes(Owner("go-hello", 1)); n != 0 {
		t.Fatalf("generation 1 still leases %d bytes after the swap", n)
	}
}
