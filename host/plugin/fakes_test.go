package plugin

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/arenahost/arenahost/host/arena"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// fakeArena is a memfd-backed bump allocator: real shared memory a plugin
// process can map through /proc/PID/fd/N, with per-owner leases.
type fakeArena struct {
	mu     sync.Mutex
	fd     int
	size   uint64
	mem    []byte
	next   uint64
	gen    uint64
	leases map[uint64]lease // by offset
}

type lease struct {
	owner string
	n     uint64
}

func newFakeArena(t testing.TB, size uint64) *fakeArena {
	t.Helper()
	fd, err := unix.MemfdCreate("arena-test", 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	a := &fakeArena{fd: fd, size: size, mem: mem, leases: map[uint64]lease{}}
	t.Cleanup(func() {
		_ = unix.Munmap(mem)
		_ = unix.Close(fd)
	})
	return a
}

func (a *fakeArena) segment() *pluginv1.CPUSegment {
	return &pluginv1.CPUSegment{Id: 1, Path: fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), a.fd), Size: a.size, HostPid: int32(os.Getpid())}
}

func (a *fakeArena) Alloc(owner, name string, n uint64) (*pluginv1.Region, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	n = (n + 63) &^ 63
	if a.next+n > a.size {
		return nil, fmt.Errorf("arena full: %d of %d bytes used, %d asked for %q", a.next, a.size, n, name)
	}
	off := a.next
	a.next += n
	a.gen++
	a.leases[off] = lease{owner: owner, n: n}
	return &pluginv1.Region{Segment: &pluginv1.Region_Cpu{Cpu: a.segment()}, Offset: off, Length: n, Generation: a.gen}, nil
}

func (a *fakeArena) Free(owner string, r *pluginv1.Region) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	l, ok := a.leases[r.GetOffset()]
	if !ok || l.owner != owner {
		return fmt.Errorf("region at offset %d is not leased to %s", r.GetOffset(), owner)
	}
	delete(a.leases, r.GetOffset())
	return nil
}

func (a *fakeArena) ReleaseOwner(owner string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	for off, l := range a.leases {
		if l.owner == owner {
			delete(a.leases, off)
		}
	}
	return nil
}

// allocated is the bytes currently leased.
func (a *fakeArena) allocated() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	var n uint64
	for _, l := range a.leases {
		n += l.n
	}
	return n
}

// ownerBytes is the bytes leased to owner.
func (a *fakeArena) ownerBytes(owner string) uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	var n uint64
	for _, l := range a.leases {
		if l.owner == owner {
			n += l.n
		}
	}
	return n
}

// newRealArena is the host's arena on memfd segments.
func newRealArena(t testing.TB) *arena.Arena {
	t.Helper()
	quiet := slog.New(slog.DiscardHandler)
	b, err := arena.NewCPUBackend(arena.CPUConfig{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	a, err := arena.New(context.Background(), b, arena.Config{Capacity: 4 << 20, SegmentSize: 1 << 20, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })
	return a
}

type published struct {
	from Source
	req  *pluginv1.PublishRequest
}

type fakePublisher struct {
	mu  sync.Mutex
	got []published
}

func (p *fakePublisher) Publish(_ context.Context, from Source, req *pluginv1.PublishRequest) (bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.got = append(p.got, published{from, req})
	return true, nil
}

type fakeRegistry struct {
	tensors map[string]*pluginv1.TensorDescriptor
}

func (r *fakeRegistry) LookupTensors(_ context.Context, req *pluginv1.LookupTensorsRequest) (*pluginv1.LookupTensorsResponse, error) {
	resp := &pluginv1.LookupTensorsResponse{}
	for _, n := range req.GetNames() {
		t, ok := r.tensors[n]
		if !ok {
			return nil, fmt.Errorf("tensor %q not found", n)
		}
		resp.Tensors = append(resp.Tensors, t)
	}
	return resp, nil
}
