// Package wire owns the go-plugin glue that the host and every Go plugin
// share: the handshake, the plugin-set name, the environment variables the
// host passes to plugins, and the GRPCPlugin adapter that connects the
// generated pluginv1 services to go-plugin's gRPC transport and broker.
//
// It is the transport every plugin shares; what a given kind of plugin's
// methods take and return is that kind's contract package:
// shared/lora/lorawire (kind lora) and shared/preview/previewwire (kind
// preview).
package wire

import (
	"context"
	"errors"

	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// ProtocolVersion is the arenahost plugin protocol version. It is the
// go-plugin handshake's ProtocolVersion and the value plugins report in
// DescribeResponse.protocol_version.
const ProtocolVersion = uint(pluginv1.ProtocolVersion_PROTOCOL_VERSION_1)

// Handshake is the go-plugin handshake every arenahost plugin uses. The
// magic cookie only stops a plugin binary from being run by hand; it is not
// a security measure.
var Handshake = plugin.HandshakeConfig{
	ProtocolVersion:  ProtocolVersion,
	MagicCookieKey:   "ARENAHOST_PLUGIN",
	MagicCookieValue: "arenahost-plugin-7f3c1e2a",
}

// PluginName is the single entry in every arenahost plugin's plugin set.
const PluginName = "arenahost"

// Environment variables the host sets for every plugin process.
const (
	// EnvHostAddr is the address of the Host service for plugins that do
	// not use go-plugin's broker (Python): "unix:///path" or "127.0.0.1:PORT".
	EnvHostAddr = "ARENAHOST_HOST_ADDR"
	// EnvHostToken identifies the plugin generation to the Host service.
	// Non-broker clients send it as gRPC metadata under MetadataToken.
	EnvHostToken = "ARENAHOST_HOST_TOKEN"
	// EnvPluginName and EnvGeneration tell a plugin who it is.
	EnvPluginName = "ARENAHOST_PLUGIN_NAME"
	EnvGeneration = "ARENAHOST_PLUGIN_GENERATION"
)

// MetadataToken is the gRPC metadata key carrying EnvHostToken.
const MetadataToken = "arenahost-host-token"

// ErrNoHost is returned by HostConn when the host passed no broker id.
var ErrNoHost = errors.New("host service not offered by the host")

// GRPCPlugin adapts pluginv1 services to go-plugin. On the plugin side set
// Impl; on the host side leave it nil and use the returned client.
type GRPCPlugin struct {
	plugin.NetRPCUnsupportedPlugin
	// Impl is the plugin's service (plugin side only).
	Impl pluginv1.PluginServer
	// OnBroker, when set on the plugin side, receives go-plugin's broker so
	// the plugin can dial the Host service at the id the host sends in
	// DescribeRequest.host_broker_id.
	OnBroker func(*plugin.GRPCBroker)
}

var _ plugin.GRPCPlugin = (*GRPCPlugin)(nil)

// GRPCServer registers Impl on the plugin's gRPC server.
func (p *GRPCPlugin) GRPCServer(b *plugin.GRPCBroker, s *grpc.Server) error {
	if p.Impl == nil {
		return errors.New("wire: GRPCPlugin.Impl is nil")
	}
	if p.OnBroker != nil {
		p.OnBroker(b)
	}
	pluginv1.RegisterPluginServer(s, p.Impl)
	return nil
}

// GRPCClient returns a *Client for the host side.
func (p *GRPCPlugin) GRPCClient(_ context.Context, b *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return &Client{PluginClient: pluginv1.NewPluginClient(c), Broker: b, Conn: c}, nil
}

// Client is what the host gets from Dispense: the Plugin service client and
// the broker on which the host serves its Host service to this plugin.
type Client struct {
	pluginv1.PluginClient
	Broker *plugin.GRPCBroker
	Conn   *grpc.ClientConn
}

// PluginMap returns the plugin set for go-plugin's ClientConfig.Plugins /
// ServeConfig.Plugins.
func PluginMap(impl pluginv1.PluginServer, onBroker func(*plugin.GRPCBroker)) plugin.PluginSet {
	return plugin.PluginSet{PluginName: &GRPCPlugin{Impl: impl, OnBroker: onBroker}}
}
