package plugin

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/arenahost/arenahost/host/arena"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// fakeSlabs records Opened and Released calls as "owner:id" and
// "release owner".
type fakeSlabs struct {
	mu      sync.Mutex
	calls   []string
	openErr error
}

func (f *fakeSlabs) Opened(holder arena.Owner, id uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.openErr != nil {
		return f.openErr
	}
	f.calls = append(f.calls, fmt.Sprintf("%s:%d", holder, id))
	return nil
}

func (f *fakeSlabs) Released(holder arena.Owner, ids ...uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, fmt.Sprintf("release %s %v", holder, ids))
	return nil
}

func (f *fakeSlabs) got() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

func cudaRegion(id uint32, off uint64) *pluginv1.Region {
	return &pluginv1.Region{Offset: off, Length: 256, Generation: 1, Segment: &pluginv1.Region_Cuda{Cuda: &pluginv1.CUDASlab{
		Id: id, IpcHandle: make([]byte, 64), Size: 1 << 20, HostPid: int32(os.Getpid())}}}
}

func cpuRegion(id uint32) *pluginv1.Region {
	return &pluginv1.Region{Length: 256, Generation: 1, Segment: &pluginv1.Region_Cpu{Cpu: &pluginv1.CPUSegment{Id: id, Size: 1 << 20}}}
}

// quantDescriptor is a 4-bit weight on slab w whose side tensors are on
// slabs a (absmax) and q (quant map).
func quantDescriptor(name string, w, a, q uint32) *pluginv1.TensorDescriptor {
	return &pluginv1.TensorDescriptor{Name: name, Region: cudaRegion(w, 0), Quant: &pluginv1.QuantInfo{
		Absmax: &pluginv1.TensorRef{Region: cudaRegion(a, 256)}, QuantMap: &pluginv1.TensorRef{Region: cudaRegion(q, 512)}}}
}

func TestCudaSlabsOfDescriptors(t *testing.T) {
	tests := []struct {
		name string
		ds   []*pluginv1.TensorDescriptor
		want []uint32
	}{
		{"none", nil, nil},
		{"cpu only", []*pluginv1.TensorDescriptor{{Region: cpuRegion(1)}}, nil},
		{"side tensors", []*pluginv1.TensorDescriptor{quantDescriptor("w", 3, 4, 3)}, []uint32{3, 4}},
		{"repeats and a cpu region", []*pluginv1.TensorDescriptor{{Region: cudaRegion(2, 0)}, {Region: cpuRegion(9)}, {Region: cudaRegion(2, 256)}, nil},
			[]uint32{2}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := cudaSlabs(descriptorRegions(nil, tc.ds...)); !slices.Equal(got, tc.want) {
				t.Fatalf("slabs %v, want %v", got, tc.want)
			}
		})
	}
	resp := &pluginv1.LookupTensorsResponse{
		Tensors: []*pluginv1.TensorDescriptor{quantDescriptor("w", 1, 2, 2)},
		Factors: []*pluginv1.LayerFactors{{Layer: "w", A: &pluginv1.TensorDescriptor{Region: cudaRegion(5, 0)}, B: &pluginv1.TensorDescriptor{Region: cudaRegion(6, 0)}}},
	}
	if got := cudaSlabs(lookupRegions(resp)); !slices.Equal(got, []uint32{1, 2, 5, 6}) {
		t.Fatalf("lookup slabs %v, want [1 2 5 6]", got)
	}
}

// cudaArena hands out regions on CUDA slab 7 and records frees.
type cudaArena struct {
	mu    sync.Mutex
	freed []string
}

func (a *cudaArena) Alloc(owner, name string, n uint64) (*pluginv1.Region, error) {
	return cudaRegion(7, 0), nil
}

func (a *cudaArena) Free(owner string, r *pluginv1.Region) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.freed = append(a.freed, owner)
	return nil
}

func (a *cudaArena) ReleaseOwner(string) error { return nil }

// TestHostServiceOpensSlabs: LookupTensors and Allocate answers tell the
// slab holders which slabs the calling generation may open; a slab that
// cannot be handed out fails the call (and frees the allocation).
func TestHostServiceOpensSlabs(t *testing.T) {
	owner := Owner("lora-nf4", 3)
	slabs := &fakeSlabs{}
	ar := &cudaArena{}
	reg := &fakeRegistry{tensors: map[string]*pluginv1.TensorDescriptor{
		"w": quantDescriptor("w", 1, 2, 2), "bias": {Name: "bias", Region: cpuRegion(4)}}}
	h := &hostService{src: Source{Plugin: "lora-nf4", Generation: 3, Owner: owner}, deps: hostDeps{arena: ar, registry: reg, slabs: slabs}}
	ctx := t.Context()

	if _, err := h.LookupTensors(ctx, &pluginv1.LookupTensorsRequest{Names: []string{"w", "bias"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Allocate(ctx, &pluginv1.AllocateRequest{Name: "scratch", Nbytes: 64}); err != nil {
		t.Fatal(err)
	}
	want := []string{owner + ":1", owner + ":2", owner + ":7"}
	if got := slabs.got(); !slices.Equal(got, want) {
		t.Fatalf("calls %v, want %v", got, want)
	}

	slabs.openErr = errors.New("cuda backend: open slab 7: slab is being closed")
	_, err := h.LookupTensors(ctx, &pluginv1.LookupTensorsRequest{Names: []string{"w"}})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("lookup with a closing slab: %v, want FailedPrecondition", err)
	}
	_, err = h.Allocate(ctx, &pluginv1.AllocateRequest{Name: "scratch", Nbytes: 64})
	if status.Code(err) != codes.FailedPrecondition || len(ar.freed) != 1 || ar.freed[0] != owner {
		t.Fatalf("allocate on a closing slab: %v (frees %v), want FailedPrecondition and the region freed", err, ar.freed)
	}

	// Without holders (a host-mapped arena) nothing is recorded.
	h.deps.slabs = nil
	if _, err := h.LookupTensors(ctx, &pluginv1.LookupTensorsRequest{Names: []string{"w"}}); err != nil {
		t.Fatal(err)
	}
}

// TestManagerSlabHolders: tensors passed with Call open their slabs for the
// serving generation; a swap and Close release each generation's slabs.
func TestManagerSlabHolders(t *testing.T) {
	slabs := &fakeSlabs{}
	m, _ := newTestManager(t, Config{Arena: newFakeArena(t, 1<<20), Slabs: slabs})
	addFixture(t, m, t.TempDir(), "echo", "echo", nil)
	args, _ := msgpack.Marshal(map[string]any{"echo": "x"})
	if _, err := m.Call(t.Context(), "echo", "gen", args, []*pluginv1.TensorDescriptor{quantDescriptor("w", 4, 5, 4)}); err != nil {
		t.Fatal(err)
	}
	gen1, gen2 := Owner("echo", 1), Owner("echo", 2)
	if got, want := slabs.got(), []string{gen1 + ":4", gen1 + ":5"}; !slices.Equal(got, want) {
		t.Fatalf("after the call: %v, want %v", got, want)
	}
	if err := m.Swap(t.Context(), "echo"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "generation 1 released", func() bool {
		return slices.Contains(slabs.got(), "release "+gen1+" []")
	})
	if err := m.Stream(t.Context(), "echo", "count", nil, []*pluginv1.TensorDescriptor{{Region: cudaRegion(8, 0)}}, func(*Reply) error { return nil }); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.Close(ctx); err != nil {
		t.Fatal(err)
	}
	got := slabs.got()
	if !slices.Contains(got, gen2+":8") || got[len(got)-1] != "release "+gen2+" []" {
		t.Fatalf("after stream and close: %v, want %s:8 and generation 2 released last", got, gen2)
	}

	// A slab that cannot be handed out fails the call before it is sent.
	slabs2 := &fakeSlabs{openErr: errors.New("slab is being closed")}
	m2, _ := newTestManager(t, Config{Arena: newFakeArena(t, 1<<20), Slabs: slabs2})
	addFixture(t, m2, t.TempDir(), "echo", "echo", nil)
	if _, err := m2.Call(t.Context(), "echo", "gen", args, []*pluginv1.TensorDescriptor{{Region: cudaRegion(9, 0)}}); err == nil {
		t.Fatal("a call with a closing slab went through")
	}
}
