package plugin

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/arenahost/arenahost/sdk/api"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/wire"
)

// Arena is what the plugin manager needs from the arena: regions leased to
// an owner ("plugin:NAME#GEN"), freed one by one or all at once when the
// generation dies.
type Arena interface {
	// Alloc leases nbytes to owner; name says what the region is for.
	Alloc(owner, name string, nbytes uint64) (*pluginv1.Region, error)
	// Free returns one region; it fails if owner does not hold it.
	Free(owner string, region *pluginv1.Region) error
	// ReleaseOwner frees every region owner still holds.
	ReleaseOwner(owner string) error
}

// Registry is what the Host service needs from the tensor registry.
type Registry interface {
	LookupTensors(ctx context.Context, req *pluginv1.LookupTensorsRequest) (*pluginv1.LookupTensorsResponse, error)
}

// Publisher receives what plugins publish (latents, progress, frames).
type Publisher interface {
	Publish(ctx context.Context, from Source, req *pluginv1.PublishRequest) (accepted bool, err error)
}

// Source names the plugin generation behind a Host service call.
type Source struct {
	Plugin     string
	Generation uint64
	// Owner is the arena owner of the generation's leases.
	Owner string
}

// Owner returns the arena owner name of a plugin generation.
func Owner(plugin string, gen uint64) string { return fmt.Sprintf("plugin:%s#%d", plugin, gen) }

// hostService is the Host service as seen by one plugin generation: every
// call is attributed to that generation.
type hostService struct {
	pluginv1.UnimplementedHostServer
	src  Source
	deps hostDeps
	log  *slog.Logger
	ring *logRing
}

type hostDeps struct {
	arena     Arena
	registry  Registry
	publisher Publisher
	slabs     SlabHolders // nil for a host-mapped arena
}

var dtypeSize = map[pluginv1.DType]uint64{
	pluginv1.DType_DTYPE_F32: 4, pluginv1.DType_DTYPE_F16: 2, pluginv1.DType_DTYPE_BF16: 2,
	pluginv1.DType_DTYPE_U8: 1, pluginv1.DType_DTYPE_I8: 1, pluginv1.DType_DTYPE_I16: 2,
	pluginv1.DType_DTYPE_I32: 4, pluginv1.DType_DTYPE_I64: 8, pluginv1.DType_DTYPE_F8_E4M3: 1,
	pluginv1.DType_DTYPE_F8_E5M2: 1, pluginv1.DType_DTYPE_BOOL: 1, pluginv1.DType_DTYPE_F64: 8,
	pluginv1.DType_DTYPE_U16: 2, pluginv1.DType_DTYPE_U32: 4, pluginv1.DType_DTYPE_U64: 8,
}

// allocSize works out an AllocateRequest's byte count: the shape times the
// dtype size when a shape is given, else nbytes.
func allocSize(req *pluginv1.AllocateRequest) (pluginv1.DType, []int64, uint64, error) {
	dt := req.GetDtype()
	shape := req.GetShape()
	if len(shape) == 0 {
		if req.GetNbytes() == 0 {
			return 0, nil, 0, errors.New("neither shape nor nbytes given")
		}
		if dt == pluginv1.DType_DTYPE_UNSPECIFIED {
			dt = pluginv1.DType_DTYPE_U8
		}
		size, ok := dtypeSize[dt]
		if !ok {
			return 0, nil, 0, fmt.Errorf("dtype %v: unknown size", dt)
		}
		if req.GetNbytes()%size != 0 {
			return 0, nil, 0, fmt.Errorf("nbytes %d is not a multiple of %v's %d bytes", req.GetNbytes(), dt, size)
		}
		return dt, []int64{int64(req.GetNbytes() / size)}, req.GetNbytes(), nil
	}
	size, ok := dtypeSize[dt]
	if !ok {
		return 0, nil, 0, fmt.Errorf("dtype %v: unknown size (give a dtype with a shape)", dt)
	}
	n := size
	for i, d := range shape {
		if d <= 0 {
			return 0, nil, 0, fmt.Errorf("shape[%d] = %d: dimensions must be positive", i, d)
		}
		if n > (1<<62)/uint64(d) {
			return 0, nil, 0, fmt.Errorf("shape %v: size overflows", shape)
		}
		n *= uint64(d)
	}
	if req.GetNbytes() != 0 && req.GetNbytes() != n {
		return 0, nil, 0, fmt.Errorf("nbytes %d but shape %v of %v is %d bytes", req.GetNbytes(), shape, dt, n)
	}
	return dt, shape, n, nil
}

func (h *hostService) Allocate(_ context.Context, req *pluginv1.AllocateRequest) (*pluginv1.AllocateResponse, error) {
	if h.deps.arena == nil {
		return nil, status.Error(codes.Unimplemented, "allocate: this host has no arena")
	}
	dt, shape, n, err := allocSize(req)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "allocate %q: %v", req.GetName(), err)
	}
	region, err := h.deps.arena.Alloc(h.src.Owner, req.GetName(), n)
	if err != nil {
		return nil, status.Errorf(codes.ResourceExhausted, "allocate %q (%d bytes) for %s: %v", req.GetName(), n, h.src.Owner, err)
	}
	if err := h.deps.opened(h.src.Owner, []*pluginv1.Region{region}); err != nil {
		if ferr := h.deps.arena.Free(h.src.Owner, region); ferr != nil {
			err = errors.Join(err, ferr)
		}
		return nil, status.Errorf(codes.FailedPrecondition, "allocate %q (%d bytes) for %s: %v", req.GetName(), n, h.src.Owner, err)
	}
	return &pluginv1.AllocateResponse{Tensor: &pluginv1.TensorDescriptor{
		Name:   req.GetName(),
		Dtype:  dt,
		Shape:  shape,
		Nbytes: n,
		Access: pluginv1.Access_ACCESS_READ_WRITE,
		Region: region,
	}}, nil
}

func (h *hostService) Free(_ context.Context, req *pluginv1.FreeRequest) (*pluginv1.FreeResponse, error) {
	if h.deps.arena == nil {
		return nil, status.Error(codes.Unimplemented, "free: this host has no arena")
	}
	var errs []error
	for i, r := range req.GetRegions() {
		if err := h.deps.arena.Free(h.src.Owner, r); err != nil {
			errs = append(errs, fmt.Errorf("regions[%d] (offset %d, %d bytes): %w", i, r.GetOffset(), r.GetLength(), err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "free for %s: %v", h.src.Owner, err)
	}
	return &pluginv1.FreeResponse{}, nil
}

func (h *hostService) LookupTensors(ctx context.Context, req *pluginv1.LookupTensorsRequest) (*pluginv1.LookupTensorsResponse, error) {
	if h.deps.registry == nil {
		return nil, status.Error(codes.Unimplemented, "lookup tensors: this host has no tensor registry")
	}
	resp, err := h.deps.registry.LookupTensors(ctx, req)
	if err != nil {
		if _, ok := status.FromError(err); ok {
			return nil, err
		}
		return nil, status.Errorf(codes.NotFound, "lookup tensors in model %q: %v", req.GetModel(), err)
	}
	if err := h.deps.opened(h.src.Owner, lookupRegions(resp)); err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "lookup tensors in model %q: %v", req.GetModel(), err)
	}
	return resp, nil
}

func (h *hostService) Publish(ctx context.Context, req *pluginv1.PublishRequest) (*pluginv1.PublishResponse, error) {
	if h.deps.publisher == nil {
		return &pluginv1.PublishResponse{Accepted: false}, nil
	}
	ok, err := h.deps.publisher.Publish(ctx, h.src, req)
	if err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "publish job %q topic %q: %v", req.GetJobId(), req.GetTopic(), err)
	}
	return &pluginv1.PublishResponse{Accepted: ok}, nil
}

func (h *hostService) Log(ctx context.Context, req *pluginv1.LogRequest) (*pluginv1.LogResponse, error) {
	level := parseLevel(req.GetLevel())
	attrs := make([]any, 0, 2*len(req.GetAttrs())+2)
	attrs = append(attrs, "stream", "host-log")
	for k, v := range req.GetAttrs() {
		attrs = append(attrs, k, v)
	}
	h.ring.add(api.LogLine{Time: time.Now(), Generation: h.src.Generation, Level: levelName(level), Text: req.GetMessage()})
	h.log.Log(ctx, level, req.GetMessage(), attrs...)
	return &pluginv1.LogResponse{}, nil
}

// tokenHost serves the Host service on a unix socket to plugins that do not
// use go-plugin's broker. Each call carries its generation's token as gRPC
// metadata (wire.MetadataToken); the token selects the hostService.
type tokenHost struct {
	pluginv1.UnimplementedHostServer
	dir    string
	path   string
	srv    *grpc.Server
	mu     sync.RWMutex
	tokens map[string]*hostService
}

// newTokenHost serves on dir/host.sock; dir is the manager's socket
// directory, which the manager removes.
func newTokenHost(dir string) (*tokenHost, error) {
	path := filepath.Join(dir, "host.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("host service listen on %s: %w", path, err)
	}
	t := &tokenHost{dir: dir, path: path, srv: grpc.NewServer(), tokens: map[string]*hostService{}}
	pluginv1.RegisterHostServer(t.srv, t)
	go func() { _ = t.srv.Serve(ln) }()
	return t, nil
}

// addr is the value of wire.EnvHostAddr.
func (t *tokenHost) addr() string { return "unix://" + t.path }

func (t *tokenHost) register(h *hostService) (string, error) {
	var b [24]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("host token: %w", err)
	}
	tok := hex.EncodeToString(b[:])
	t.mu.Lock()
	t.tokens[tok] = h
	t.mu.Unlock()
	return tok, nil
}

func (t *tokenHost) revoke(tok string) {
	t.mu.Lock()
	delete(t.tokens, tok)
	t.mu.Unlock()
}

func (t *tokenHost) close() {
	t.srv.Stop()
	_ = os.Remove(t.path)
}

func (t *tokenHost) lookup(ctx context.Context) (*hostService, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get(wire.MetadataToken)
	if len(vals) != 1 {
		return nil, status.Errorf(codes.Unauthenticated, "host service: metadata %q missing (send the value of %s)", wire.MetadataToken, wire.EnvHostToken)
	}
	t.mu.RLock()
	h := t.tokens[vals[0]]
	t.mu.RUnlock()
	if h == nil {
		return nil, status.Error(codes.Unauthenticated, "host service: unknown or retired plugin generation token")
	}
	return h, nil
}

func (t *tokenHost) Allocate(ctx context.Context, req *pluginv1.AllocateRequest) (*pluginv1.AllocateResponse, error) {
	h, err := t.lookup(ctx)
	if err != nil {
		return nil, err
	}
	return h.Allocate(ctx, req)
}

func (t *tokenHost) Free(ctx context.Context, req *pluginv1.FreeRequest) (*pluginv1.FreeResponse, error) {
	h, err := t.lookup(ctx)
	if err != nil {
		return nil, err
	}
	return h.Free(ctx, req)
}

func (t *tokenHost) LookupTensors(ctx context.Context, req *pluginv1.LookupTensorsRequest) (*pluginv1.LookupTensorsResponse, error) {
	h, err := t.lookup(ctx)
	if err != nil {
		return nil, err
	}
	return h.LookupTensors(ctx, req)
}

func (t *tokenHost) Publish(ctx context.Context, req *pluginv1.PublishRequest) (*pluginv1.PublishResponse, error) {
	h, err := t.lookup(ctx)
	if err != nil {
		return nil, err
	}
	return h.Publish(ctx, req)
}

func (t *tokenHost) Log(ctx context.Context, req *pluginv1.LogRequest) (*pluginv1.LogResponse, error) {
	h, err := t.lookup(ctx)
	if err != nil {
		return nil, err
	}
	return h.Log(ctx, req)
}
