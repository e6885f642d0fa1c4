package sdk

import (
	"context"
	"fmt"
	"os"
	"sync"

	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
	"github.com/arenahost/arenahost/shared/wire"
)

// Host is the plugin's client for the host's Host service. Under go-plugin
// it dials the broker id the host sends in DescribeRequest.host_broker_id;
// otherwise it dials ARENAHOST_HOST_ADDR and sends ARENAHOST_HOST_TOKEN as
// gRPC metadata. Under go-plugin it connects as soon as the host offers the
// broker id (see offerBroker); otherwise on first use. It is safe for
// concurrent use.
type Host struct {
	mu       sync.Mutex
	broker   *plugin.GRPCBroker
	brokerID uint32
	addr     string
	token    string
	conn     *grpc.ClientConn
	client   pluginv1.HostClient
}

func newHost() *Host {
	return &Host{addr: os.Getenv(wire.EnvHostAddr), token: os.Getenv(wire.EnvHostToken)}
}

func (h *Host) setBroker(b *plugin.GRPCBroker) {
	h.mu.Lock()
	h.broker = b
	h.mu.Unlock()
}

// offerBroker records the broker id from Describe. A new non-zero id (the
// host re-described this plugin with a new Host server) drops the previous
// connection; 0 keeps whatever the plugin has.
func (h *Host) offerBroker(id uint32) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if id == 0 || id == h.brokerID {
		return
	}
	h.brokerID = id
	if h.broker == nil {
		return
	}
	if h.conn != nil {
		_ = h.conn.Close()
		h.conn, h.client = nil, nil
	}
	// Connect now: go-plugin's broker forgets connection info that nobody
	// picks up within 5 s, so a lazy dial on a plugin's first Host call
	// would fail whenever that call comes later than that. A failure here
	// is retried (and reported) by Client.
	if conn, err := h.broker.Dial(id); err == nil {
		h.conn, h.client = conn, pluginv1.NewHostClient(conn)
	}
}

// Client returns the raw Host service client, connecting on first use. It
// fails with wire.ErrNoHost when the host offered neither a broker id nor
// an address.
func (h *Host) Client() (pluginv1.HostClient, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.client != nil {
		return h.client, nil
	}
	var (
		conn *grpc.ClientConn
		err  error
	)
	switch {
	case h.broker != nil && h.brokerID != 0:
		conn, err = h.broker.Dial(h.brokerID)
		if err != nil {
			return nil, fmt.Errorf("dial host service on broker id %d: %w", h.brokerID, err)
		}
	case h.addr != "":
		conn, err = grpc.NewClient(h.addr,
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithUnaryInterceptor(tokenInterceptor(h.token)))
		if err != nil {
			return nil, fmt.Errorf("dial host service at %s=%s: %w", wire.EnvHostAddr, h.addr, err)
		}
	default:
		return nil, fmt.Errorf("host client: no broker id in Describe and %s unset: %w", wire.EnvHostAddr, wire.ErrNoHost)
	}
	h.conn, h.client = conn, pluginv1.NewHostClient(conn)
	return h.client, nil
}

func tokenInterceptor(token string) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if token != "" {
			ctx = metadata.AppendToOutgoingContext(ctx, wire.MetadataToken, token)
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
}

func (h *Host) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.conn != nil {
		_ = h.conn.Close()
		h.conn, h.client = nil, nil
	}
}

// Allocate asks the host for a read-write region holding a dense tensor of
// dtype and shape, leased to this plugin generation. Map it with Call.Bytes.
func (h *Host) Allocate(ctx context.Context, name string, dtype pluginv1.DType, shape []int64) (*pluginv1.TensorDescriptor, error) {
	n, err := tensor.NBytes(dtype, shape)
	if err != nil {
		return nil, fmt.Errorf("allocate %q: %w", name, err)
	}
	return h.allocate(ctx, &pluginv1.AllocateRequest{Name: name, Dtype: dtype, Shape: shape, Nbytes: n})
}

// AllocateBytes asks the host for an untyped read-write region of nbytes.
func (h *Host) AllocateBytes(ctx context.Context, name string, nbytes uint64) (*pluginv1.TensorDescriptor, error) {
	return h.allocate(ctx, &pluginv1.AllocateRequest{Name: name, Dtype: pluginv1.DType_DTYPE_U8, Nbytes: nbytes})
}

func (h *Host) allocate(ctx context.Context, req *pluginv1.AllocateRequest) (*pluginv1.TensorDescriptor, error) {
	c, err := h.Client()
	if err != nil {
		return nil, fmt.Errorf("allocate %q: %w", req.GetName(), err)
	}
	resp, err := c.Allocate(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("allocate %q (%d bytes): %w", req.GetName(), req.GetNbytes(), err)
	}
	d := resp.GetTensor()
	if err := tensor.Check(d); err != nil {
		return nil, fmt.Errorf("allocate %q: host answered with %w", req.GetName(), err)
	}
	if d.GetNbytes() < req.GetNbytes() {
		return nil, fmt.Errorf("allocate %q: asked %d bytes, host gave %d: %w", req.GetName(), req.GetNbytes(), d.GetNbytes(), tensor.ErrOutOfBounds)
	}
	return d, nil
}

// Free returns regions this plugin allocated to the host.
func (h *Host) Free(ctx context.Context, regions ...*pluginv1.Region) error {
	c, err := h.Client()
	if err != nil {
		return fmt.Errorf("free: %w", err)
	}
	if _, err := c.Free(ctx, &pluginv1.FreeRequest{Regions: regions}); err != nil {
		return fmt.Errorf("free %d regions: %w", len(regions), err)
	}
	return nil
}

// LookupTensors resolves tensor names (or a prefix) in a registry model to
// descriptors, optionally with their bound LoRA factors.
func (h *Host) LookupTensors(ctx context.Context, req *pluginv1.LookupTensorsRequest) (*pluginv1.LookupTensorsResponse, error) {
	c, err := h.Client()
	if err != nil {
		return nil, fmt.Errorf("lookup tensors: %w", err)
	}
	resp, err := c.LookupTensors(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("lookup tensors in model %q: %w", req.GetModel(), err)
	}
	return resp, nil
}

// Publish sends an event, latent or frame for a job; it reports whether the
// host accepted it.
func (h *Host) Publish(ctx context.Context, req *pluginv1.PublishRequest) (bool, error) {
	c, err := h.Client()
	if err != nil {
		return false, fmt.Errorf("publish: %w", err)
	}
	resp, err := c.Publish(ctx, req)
	if err != nil {
		return false, fmt.Errorf("publish %s for job %q: %w", req.GetTopic(), req.GetJobId(), err)
	}
	return resp.GetAccepted(), nil
}

// Log writes one line to the host's log under this plugin's name.
func (h *Host) Log(ctx context.Context, level, msg string, attrs map[string]string) error {
	c, err := h.Client()
	if err != nil {
		return fmt.Errorf("log: %w", err)
	}
	if _, err := c.Log(ctx, &pluginv1.LogRequest{Level: level, Message: msg, Attrs: attrs}); err != nil {
		return fmt.Errorf("log: %w", err)
	}
	return nil
}
