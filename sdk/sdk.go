// Package sdk is what a Go plugin author uses to write an arenahost plugin:
// a Plugin with typed methods whose arguments and results travel as msgpack,
// input tensors that arrive as descriptors and are mapped zero-copy, a client
// for the host's Host service (arena allocations, tensor lookup, publishing,
// logging), and Serve, which runs the plugin under go-plugin's gRPC
// transport with the arenahost handshake.
//
// A plugin's main is a few lines:
//
//	p := sdk.New("hello", "0.1.0", "other")
//	sdk.Method(p, "greet", greet, sdk.Doc("say hello"))
//	sdk.Serve(p)
//
// Every Plugin also serves the conformance.* methods documented in
// sdk/plugintest/README.md, which the conformance suite calls.
package sdk

import (
	"context"
	"fmt"
	"log/slog"
	"runtime/debug"
	"sort"
	"sync"

	"github.com/vmihailenco/msgpack/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
	"github.com/arenahost/arenahost/shared/wire"
)

// Plugin is one plugin: its identity, its methods, the segment mappings its
// calls share and its connection to the host. Register methods before
// Serve; a Plugin must not gain methods while it serves.
type Plugin struct {
	// Name, Version and Kind are reported by Describe. Kind is "lora",
	// "preview", "pipeline" or another kind.
	Name, Version, Kind string
	// Metadata is reported by Describe.
	Metadata map[string]string
	// Logger receives the plugin's logs. Serve sets it, when nil, to JSON
	// on stderr in the format go-plugin re-logs under the plugin's name.
	Logger *slog.Logger

	methods map[string]*method
	mapper  *tensor.Mapper
	host    *Host
}

type method struct {
	info   *pluginv1.MethodInfo
	unary  func(ctx context.Context, c *Call, args []byte) ([]byte, error)
	stream func(ctx context.Context, c *Call, args []byte, send func([]byte) error) error
}

// New returns a Plugin with the built-in conformance.* methods registered.
func New(name, version, kind string) *Plugin {
	p := &Plugin{
		Name: name, Version: version, Kind: kind,
		methods: make(map[string]*method),
		mapper:  tensor.NewMapper(),
		host:    newHost(),
	}
	registerConformance(p)
	return p
}

// MethodOption configures a registered method.
type MethodOption func(*pluginv1.MethodInfo)

// Doc sets the method's description in Describe.
func Doc(description string) MethodOption {
	return func(mi *pluginv1.MethodInfo) { mi.Description = description }
}

// Method registers a unary method. Its msgpack arguments are decoded into A
// (empty arguments leave A zero) and its result R is encoded as msgpack.
// Output tensors are attached with Call.Return. Registering an empty or
// duplicate name is a programming error and panics, as http.Handle does.
func Method[A, R any](p *Plugin, name string, fn func(ctx context.Context, c *Call, args A) (R, error), opts ...MethodOption) {
	p.register(name, false, opts, &method{
		unary: func(ctx context.Context, c *Call, raw []byte) ([]byte, error) {
			var args A
			if err := decodeArgs(raw, &args); err != nil {
				return nil, err
			}
			res, err := fn(ctx, c, args)
			if err != nil {
				return nil, err
			}
			out, err := msgpack.Marshal(res)
			if err != nil {
				return nil, fmt.Errorf("encode result: %w", err)
			}
			return out, nil
		},
	})
}

// StreamMethod registers a server-streaming method, called through
// InvokeStream. Each send delivers one result together with the tensors
// returned (Call.Return) since the previous send.
func StreamMethod[A, R any](p *Plugin, name string, fn func(ctx context.Context, c *Call, args A, send func(R) error) error, opts ...MethodOption) {
	p.register(name, true, opts, &method{
		stream: func(ctx context.Context, c *Call, raw []byte, send func([]byte) error) error {
			var args A
			if err := decodeArgs(raw, &args); err != nil {
				return err
			}
			return fn(ctx, c, args, func(r R) error {
				out, err := msgpack.Marshal(r)
				if err != nil {
					return fmt.Errorf("encode result: %w", err)
				}
				return send(out)
			})
		},
	})
}

func (p *Plugin) register(name string, streaming bool, opts []MethodOption, m *method) {
	if name == "" {
		panic("sdk: method name is empty")
	}
	if _, dup := p.methods[name]; dup {
		panic(fmt.Sprintf("sdk: method %q registered twice", name))
	}
	m.info = &pluginv1.MethodInfo{Name: name, Streaming: streaming}
	for _, o := range opts {
		o(m.info)
	}
	p.methods[name] = m
}

// Methods returns the registered method names, sorted.
func (p *Plugin) Methods() []string {
	names := make([]string, 0, len(p.methods))
	for n := range p.methods {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Host returns the plugin's client for the host's Host service.
func (p *Plugin) Host() *Host { return p.host }

func (p *Plugin) logger() *slog.Logger {
	if p.Logger != nil {
		return p.Logger
	}
	return slog.Default()
}

// server implements pluginv1.PluginServer over a Plugin.
type server struct {
	pluginv1.UnimplementedPluginServer
	p *Plugin
}

// Server returns the plugin's pluginv1.PluginServer, for serving it on a
// transport other than go-plugin's (tests, benchmarks).
func (p *Plugin) Server() pluginv1.PluginServer { return &server{p: p} }

func (s *server) Describe(_ context.Context, req *pluginv1.DescribeRequest) (*pluginv1.DescribeResponse, error) {
	s.p.host.offerBroker(req.GetHostBrokerId())
	resp := &pluginv1.DescribeResponse{
		Name: s.p.Name, Version: s.p.Version, Kind: s.p.Kind,
		ProtocolVersion: uint32(wire.ProtocolVersion),
		Metadata:        s.p.Metadata,
	}
	for _, n := range s.p.Methods() {
		resp.Methods = append(resp.Methods, s.p.methods[n].info)
	}
	return resp, nil
}

func (s *server) lookup(name string) (*method, error) {
	m, ok := s.p.methods[name]
	if !ok {
		return nil, status.Errorf(codes.Unimplemented, "plugin %s: unknown method %q (serves %v)", s.p.Name, name, s.p.Methods())
	}
	return m, nil
}

func (s *server) Invoke(ctx context.Context, req *pluginv1.InvokeRequest) (resp *pluginv1.InvokeResponse, err error) {
	m, err := s.lookup(req.GetMethod())
	if err != nil {
		return nil, err
	}
	if m.unary == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "plugin %s: method %q is streaming: call it with InvokeStream", s.p.Name, req.GetMethod())
	}
	c := s.p.newCall(req)
	defer s.recoverTo(req.GetMethod(), &err)
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	out, err := m.unary(ctx, c, req.GetArgs())
	if err != nil {
		return nil, s.status(req.GetMethod(), err)
	}
	return &pluginv1.InvokeResponse{Result: out, Tensors: c.takeReturned()}, nil
}

func (s *server) InvokeStream(req *pluginv1.InvokeRequest, stream pluginv1.Plugin_InvokeStreamServer) (err error) {
	m, err := s.lookup(req.GetMethod())
	if err != nil {
		return err
	}
	c := s.p.newCall(req)
	defer s.recoverTo(req.GetMethod(), &err)
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	if m.stream == nil {
		// A unary method over InvokeStream yields exactly one result.
		out, err := m.unary(stream.Context(), c, req.GetArgs())
		if err != nil {
			return s.status(req.GetMethod(), err)
		}
		return stream.Send(&pluginv1.InvokeResponse{Result: out, Tensors: c.takeReturned()})
	}
	err = m.stream(stream.Context(), c, req.GetArgs(), func(out []byte) error {
		return stream.Send(&pluginv1.InvokeResponse{Result: out, Tensors: c.takeReturned()})
	})
	if err != nil {
		return s.status(req.GetMethod(), err)
	}
	return nil
}

func (s *server) status(method string, err error) error {
	st := toStatus(fmt.Sprintf("plugin %s: method %q", s.p.Name, method), err)
	if st.Code() == codes.Internal {
		s.p.logger().Error("method failed", "method", method, "err", err)
	}
	return st.Err()
}

// recoverTo turns a panic in a handler into an Internal error so one bad
// call does not take the plugin, and every other call, down. Handlers run
// with debug.SetPanicOnFault, so a write through a read-only mapping (on
// the handler's goroutine) is such a panic rather than a crash.
func (s *server) recoverTo(method string, err *error) {
	if r := recover(); r != nil {
		s.p.logger().Error("method panicked", "method", method, "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
		*err = status.Errorf(codes.Internal, "plugin %s: method %q panicked: %v", s.p.Name, method, r)
	}
}

// Call is one invocation of a method: its input descriptors, the tensors it
// returns, and access to the mapper and the host. A Call is safe for
// concurrent use by the goroutines of one handler.
type Call struct {
	// ID is the host's call id (may be empty); Method the method name.
	ID, Method string

	p        *Plugin
	inputs   []*pluginv1.TensorDescriptor
	mu       sync.Mutex
	returned []*pluginv1.TensorDescriptor
}

func (p *Plugin) newCall(req *pluginv1.InvokeRequest) *Call {
	return &Call{ID: req.GetCallId(), Method: req.GetMethod(), p: p, inputs: req.GetTensors()}
}

// Inputs returns the descriptors the host passed, in order.
func (c *Call) Inputs() []*pluginv1.TensorDescriptor { return c.inputs }

// Input returns the input descriptor named name, or an ErrInvalidArgument
// error naming the missing tensor.
func (c *Call) Input(name string) (*pluginv1.TensorDescriptor, error) {
	for _, d := range c.inputs {
		if d.GetName() == name {
			return d, nil
		}
	}
	return nil, fmt.Errorf("input tensor %q not passed: %w", name, ErrInvalidArgument)
}

// InputAt returns the i-th input descriptor, or an ErrInvalidArgument error.
func (c *Call) InputAt(i int) (*pluginv1.TensorDescriptor, error) {
	if i < 0 || i >= len(c.inputs) {
		return nil, fmt.Errorf("input tensor #%d: %d passed: %w", i, len(c.inputs), ErrInvalidArgument)
	}
	return c.inputs[i], nil
}

// Bytes maps d (an input, or a region the host allocated) and returns its
// bytes without copying: read-write when d's access is read-write. The
// mapping is shared by every call and lives as long as the plugin.
func (c *Call) Bytes(d *pluginv1.TensorDescriptor) ([]byte, error) { return c.p.mapper.Bytes(d) }

// Float32s maps d and views it as []float32, checking that d is F32.
func (c *Call) Float32s(d *pluginv1.TensorDescriptor) ([]float32, error) {
	if d.GetDtype() != pluginv1.DType_DTYPE_F32 {
		return nil, fmt.Errorf("tensor %q: dtype %v, want F32: %w", d.GetName(), d.GetDtype(), ErrInvalidArgument)
	}
	b, err := c.Bytes(d)
	if err != nil {
		return nil, err
	}
	return tensor.Float32s(b)
}

// Return attaches descriptors to the call's response: the tensors the
// method produced (usually regions from Host.Allocate).
func (c *Call) Return(ds ...*pluginv1.TensorDescriptor) {
	c.mu.Lock()
	c.returned = append(c.returned, ds...)
	c.mu.Unlock()
}

func (c *Call) takeReturned() []*pluginv1.TensorDescriptor {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := c.returned
	c.returned = nil
	return out
}

// Host returns the client for the host's Host service.
func (c *Call) Host() *Host { return c.p.host }

// Logger returns the plugin's logger with the method and call id attached.
func (c *Call) Logger() *slog.Logger {
	return c.p.logger().With("method", c.Method, "call_id", c.ID)
}
