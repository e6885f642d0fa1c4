package cuda

import (
	"errors"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/shared/gpu"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

type fakeOpener struct {
	opens  map[[HandleSize]byte]DevicePtr
	closed []DevicePtr
	next   DevicePtr
	fail   bool
}

func (f *fakeOpener) OpenIPC(h [HandleSize]byte) (DevicePtr, error) {
	if f.fail {
		return 0, errors.New("cuIpcOpenMemHandle: CUDA_ERROR_INVALID_VALUE")
	}
	if _, dup := f.opens[h]; dup {
		return 0, errors.New("opened twice")
	}
	f.next += 1 << 30
	f.opens[h] = f.next
	return f.next, nil
}

func (f *fakeOpener) CloseIPC(p DevicePtr) error {
	f.closed = append(f.closed, p)
	return nil
}

func cudaRegion(t *testing.T, loc arena.Location, off, n uint64) *pluginv1.Region {
	t.Helper()
	s, err := SlabProto(loc)
	if err != nil {
		t.Fatal(err)
	}
	return &pluginv1.Region{Segment: &pluginv1.Region_Cuda{Cuda: s}, Offset: off, Length: n, Generation: 1}
}

func TestSlabCache(t *testing.T) {
	f := &fakeOpener{opens: map[[HandleSize]byte]DevicePtr{}}
	c := gpu.NewSlabCache(f)
	a := testLocation()
	b := testLocation()
	b.SegmentID, b.IPCHandle = 6, append([]byte(nil), a.IPCHandle...)
	b.IPCHandle[0] ^= 0xff
	p1, err := c.Addr(cudaRegion(t, a, 4096, 16))
	if err != nil {
		t.Fatal(err)
	}
	p2, err := c.Addr(cudaRegion(t, a, 8192, 16)) // same slab: no second open
	if err != nil {
		t.Fatal(err)
	}
	p3, err := c.Addr(cudaRegion(t, b, 0, 16))
	if err != nil {
		t.Fatal(err)
	}
	if p2-p1 != 4096 || c.Open() != 2 || len(f.opens) != 2 || p3 == p1-4096 {
		t.Fatalf("addresses %#x %#x %#x, %d open", p1, p2, p3, c.Open())
	}
	changed := testLocation()
	changed.IPCHandle[5] ^= 1 // the host restarted: same id, new handle
	if _, err := c.Addr(cudaRegion(t, changed, 0, 16)); err == nil || !strings.Contains(err.Error(), "changed") {
		t.Fatalf("changed handle: %v", err)
	}
	if _, err := c.Addr(cudaRegion(t, a, 64<<20-8, 16)); err == nil {
		t.Fatal("region past the slab accepted")
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if len(f.closed) != 2 || c.Open() != 0 {
		t.Fatalf("closed %v", f.closed)
	}
	if _, err := c.Addr(cudaRegion(t, a, 0, 16)); err == nil {
		t.Fatal("use after close")
	}
	f2 := &fakeOpener{opens: map[[HandleSize]byte]DevicePtr{}, fail: true}
	if _, err := gpu.NewSlabCache(f2).Addr(cudaRegion(t, a, 0, 16)); err == nil || !strings.Contains(err.Error(), "slab 5 of host 4321: open") {
		t.Fatalf("open failure: %v", err)
	}
}
