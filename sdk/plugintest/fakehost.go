package plugintest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/go-plugin"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
	"github.com/arenahost/arenahost/shared/wire"
)

// regionAlign is the alignment of every region the fake host hands out.
const regionAlign = 64

// FakeHost is a small Host service for tests: one memfd segment with a bump
// allocator, tensors put by the test, and records of what the plugin
// allocated, freed, published and logged. It serves the plugin through
// go-plugin's broker (Go plugins) or a Unix socket with a token (others).
type FakeHost struct {
	pluginv1.UnimplementedHostServer

	seg  *pluginv1.CPUSegment
	fd   int
	data []byte

	mu        sync.Mutex
	next      uint64
	gen       uint64
	named     map[string]*pluginv1.TensorDescriptor
	allocated []*pluginv1.TensorDescriptor
	freed     []*pluginv1.Region
	published []*pluginv1.PublishRequest
	logs      []*pluginv1.LogRequest
}

// NewFakeHost returns a FakeHost whose arena is a memfd of size bytes,
// closed and unmapped when tb ends.
func NewFakeHost(tb testing.TB, size uint64) *FakeHost {
	tb.Helper()
	fd, err := unix.MemfdCreate("plugintest-arena", unix.MFD_CLOEXEC)
	if err != nil {
		tb.Fatalf("fake host: memfd_create: %v", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		tb.Fatalf("fake host: ftruncate arena to %d bytes: %v", size, err)
	}
	data, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		tb.Fatalf("fake host: mmap arena: %v", err)
	}
	h := &FakeHost{
		fd: fd, data: data, gen: 0, named: make(map[string]*pluginv1.TensorDescriptor),
		seg: &pluginv1.CPUSegment{Id: 1, Path: fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), fd), Size: size, HostPid: int32(os.Getpid())},
	}
	tb.Cleanup(func() {
		_ = unix.Munmap(h.data)
		_ = unix.Close(h.fd)
	})
	return h
}

// Segment returns the arena's segment as plugins see it.
func (h *FakeHost) Segment() *pluginv1.CPUSegment { return h.seg }

func (h *FakeHost) alloc(name string, dtype pluginv1.DType, shape []int64, nbytes uint64, access pluginv1.Access) (*pluginv1.TensorDescriptor, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	off := (h.next + regionAlign - 1) / regionAlign * regionAlign
	if nbytes > h.seg.Size || off > h.seg.Size-nbytes {
		return nil, status.Errorf(codes.ResourceExhausted, "fake host: allocate %q: %d bytes at %d in an arena of %d", name, nbytes, off, h.seg.Size)
	}
	h.next = off + nbytes
	h.gen++
	return &pluginv1.TensorDescriptor{
		Name: name, Dtype: dtype, Shape: shape, Nbytes: nbytes, Access: access,
		Region: &pluginv1.Region{Segment: &pluginv1.Region_Cpu{Cpu: h.seg}, Offset: off, Length: nbytes, Generation: h.gen},
	}, nil
}

// Alloc returns a new zeroed region for a dense tensor, which
// LookupTensors finds by name; fill it through Bytes. It fails tb on a bad
// dtype/shape or a full arena.
func (h *FakeHost) Alloc(tb testing.TB, name string, dtype pluginv1.DType, shape []int64, access pluginv1.Access) *pluginv1.TensorDescriptor {
	tb.Helper()
	n, err := tensor.NBytes(dtype, shape)
	if err != nil {
		tb.Fatalf("fake host: alloc %q: %v", name, err)
	}
	d, err := h.alloc(name, dtype, shape, n, access)
	if err != nil {
		tb.Fatalf("fake host: alloc %q: %v", name, err)
	}
	h.mu.Lock()
	h.named[name] = d
	h.mu.Unlock()
	return d
}

// Put copies data into a new region and returns its descriptor, which
// LookupTensors also finds by name. It fails tb on a bad dtype/shape or a
// full arena.
func (h *FakeHost) Put(tb testing.TB, name string, dtype pluginv1.DType, shape []int64, data []byte, access pluginv1.Access) *pluginv1.TensorDescriptor {
	tb.Helper()
	n, err := tensor.NBytes(dtype, shape)
	if err != nil || n != uint64(len(data)) {
		tb.Fatalf("fake host: put %q: %v %v is %d bytes, data is %d (%v)", name, dtype, shape, n, len(data), err)
	}
	d, err := h.alloc(name, dtype, shape, n, access)
	if err != nil {
		tb.Fatalf("fake host: put %q: %v", name, err)
	}
	copy(h.data[d.Region.Offset:], data)
	h.mu.Lock()
	h.named[name] = d
	h.mu.Unlock()
	return d
}

// Bytes returns the host's own view of a descriptor's bytes in the arena,
// checking that it points into this arena.
func (h *FakeHost) Bytes(d *pluginv1.TensorDescriptor) ([]byte, error) {
	if err := tensor.Check(d); err != nil {
		return nil, err
	}
	r := d.GetRegion()
	if r.GetCpu().GetId() != h.seg.Id || r.GetCpu().GetPath() != h.seg.Path {
		return nil, fmt.Errorf("tensor %q: segment %d (%s) is not the fake host's arena", d.GetName(), r.GetCpu().GetId(), r.GetCpu().GetPath())
	}
	if r.GetOffset() > h.seg.Size || d.GetNbytes() > h.seg.Size-r.GetOffset() {
		return nil, fmt.Errorf("tensor %q: [%d, +%d) outside the arena: %w", d.GetName(), r.GetOffset(), d.GetNbytes(), tensor.ErrOutOfBounds)
	}
	return h.data[r.GetOffset() : r.GetOffset()+d.GetNbytes()], nil
}

// Allocated returns the descriptors the plugin got from Allocate.
func (h *FakeHost) Allocated() []*pluginv1.TensorDescriptor {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]*pluginv1.TensorDescriptor(nil), h.allocated...)
}

// Freed returns the regions the plugin freed.
func (h *FakeHost) Freed() []*pluginv1.Region {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]*pluginv1.Region(nil), h.freed...)
}

// Published returns the plugin's Publish requests.
func (h *FakeHost) Published() []*pluginv1.PublishRequest {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]*pluginv1.PublishRequest(nil), h.published...)
}

// Logs returns the plugin's Log requests.
func (h *FakeHost) Logs() []*pluginv1.LogRequest {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]*pluginv1.LogRequest(nil), h.logs...)
}

// Allocate implements pluginv1.HostServer.
func (h *FakeHost) Allocate(_ context.Context, req *pluginv1.AllocateRequest) (*pluginv1.AllocateResponse, error) {
	n := req.GetNbytes()
	if len(req.GetShape()) > 0 {
		var err error
		if n, err = tensor.NBytes(req.GetDtype(), req.GetShape()); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "fake host: allocate %q: %v", req.GetName(), err)
		}
		if req.GetNbytes() != 0 && req.GetNbytes() != n {
			return nil, status.Errorf(codes.InvalidArgument, "fake host: allocate %q: shape gives %d bytes but nbytes is %d", req.GetName(), n, req.GetNbytes())
		}
	}
	if n == 0 {
		return nil, status.Errorf(codes.InvalidArgument, "fake host: allocate %q: zero bytes", req.GetName())
	}
	d, err := h.alloc(req.GetName(), req.GetDtype(), req.GetShape(), n, pluginv1.Access_ACCESS_READ_WRITE)
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	h.allocated = append(h.allocated, d)
	h.mu.Unlock()
	return &pluginv1.AllocateResponse{Tensor: d}, nil
}

// Free implements pluginv1.HostServer (the bump allocator only records it).
func (h *FakeHost) Free(_ context.Context, req *pluginv1.FreeRequest) (*pluginv1.FreeResponse, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.freed = append(h.freed, req.GetRegions()...)
	return &pluginv1.FreeResponse{}, nil
}

// LookupTensors implements pluginv1.HostServer over the tensors put by the test.
func (h *FakeHost) LookupTensors(_ context.Context, req *pluginv1.LookupTensorsRequest) (*pluginv1.LookupTensorsResponse, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	resp := &pluginv1.LookupTensorsResponse{}
	for _, n := range req.GetNames() {
		d, ok := h.named[n]
		if !ok {
			return nil, status.Errorf(codes.NotFound, "fake host: tensor %q not found", n)
		}
		resp.Tensors = append(resp.Tensors, d)
	}
	if req.GetPrefix() != "" {
		for n, d := range h.named {
			if strings.HasPrefix(n, req.GetPrefix()) {
				resp.Tensors = append(resp.Tensors, d)
			}
		}
	}
	return resp, nil
}

// Publish implements pluginv1.HostServer.
func (h *FakeHost) Publish(_ context.Context, req *pluginv1.PublishRequest) (*pluginv1.PublishResponse, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.published = append(h.published, req)
	return &pluginv1.PublishResponse{Accepted: true}, nil
}

// Log implements pluginv1.HostServer.
func (h *FakeHost) Log(_ context.Context, req *pluginv1.LogRequest) (*pluginv1.LogResponse, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.logs = append(h.logs, req)
	return &pluginv1.LogResponse{}, nil
}

// ServeBroker serves h on a new id of go-plugin's broker and returns the id
// to send in DescribeRequest.host_broker_id.
func (h *FakeHost) ServeBroker(b *plugin.GRPCBroker) uint32 { return ServeBroker(b, h) }

// ServeBroker serves any Host service implementation on a new id of
// go-plugin's broker and returns the id for DescribeRequest.host_broker_id.
func ServeBroker(b *plugin.GRPCBroker, srv pluginv1.HostServer) uint32 {
	id := b.NextId()
	go b.AcceptAndServe(id, func(opts []grpc.ServerOption) *grpc.Server {
		s := grpc.NewServer(opts...)
		pluginv1.RegisterHostServer(s, srv)
		return s
	})
	return id
}

// ServeUnix serves h on a Unix socket in dir for plugins outside go-plugin's
// broker and returns the environment to give the plugin: ARENAHOST_HOST_ADDR
// and a random ARENAHOST_HOST_TOKEN that every call must carry as
// arenahost-host-token metadata. The server stops when tb ends.
func (h *FakeHost) ServeUnix(tb testing.TB, dir string) []string {
	tb.Helper()
	return ServeUnix(tb, dir, h)
}

// ServeUnix serves any Host service implementation as FakeHost.ServeUnix
// does.
func ServeUnix(tb testing.TB, dir string, srv pluginv1.HostServer) []string {
	tb.Helper()
	path := filepath.Join(dir, "host.sock")
	lis, err := net.Listen("unix", path)
	if err != nil {
		tb.Fatalf("fake host: listen on %s: %v", path, err)
	}
	var raw [16]byte
	_, _ = rand.Read(raw[:])
	token := hex.EncodeToString(raw[:])
	s := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		if got := md.Get(wire.MetadataToken); len(got) != 1 || got[0] != token {
			return nil, status.Errorf(codes.Unauthenticated, "fake host: %s: missing or wrong %s metadata", info.FullMethod, wire.MetadataToken)
		}
		return handler(ctx, req)
	}))
	pluginv1.RegisterHostServer(s, srv)
	go func() { _ = s.Serve(lis) }()
	tb.Cleanup(s.Stop)
	return []string{wire.EnvHostAddr + "=unix://" + path, wire.EnvHostToken + "=" + token}
}
