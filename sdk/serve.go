package sdk

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	"github.com/arenahost/arenahost/shared/cpuprofile"
	"github.com/arenahost/arenahost/shared/wire"
)

// MaxMessageBytes is the largest Invoke request or response the plugin's
// gRPC server accepts (go-plugin leaves the server at gRPC's 4 MiB default).
// Tensors travel as descriptors, so this bounds msgpack payloads only.
const MaxMessageBytes = 64 << 20

// parentPoll is how often Serve checks that the host is still alive.
const parentPoll = 250 * time.Millisecond

// Serve runs p as a go-plugin gRPC plugin and exits the process when the
// plugin stops: with status 0 after the host's graceful shutdown (go-plugin's
// GRPCController) or when the host process dies, 1 if serving failed.
//
// go-plugin itself does not stop a plugin whose host died: the plugin keeps
// serving its socket as an orphan. Serve therefore watches its parent
// process and stops when it is replaced (the plugin was re-parented).
func Serve(p *Plugin) {
	if err := p.Serve(context.Background()); err != nil {
		p.logger().Error("plugin stopped", "err", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// Serve runs p under go-plugin until the host shuts it down, the host
// process dies, or ctx is done, then unmaps its segments and returns.
// Logging goes to p.Logger, or when nil to JSON on stderr (set as the
// slog default). The process must have been started by a go-plugin host
// (the handshake cookie is checked).
func (p *Plugin) Serve(ctx context.Context) error {
	if os.Getenv(wire.Handshake.MagicCookieKey) != wire.Handshake.MagicCookieValue {
		return fmt.Errorf("serve plugin %s: not started by arenahost (%s unset or wrong): this binary is a plugin, not a command", p.Name, wire.Handshake.MagicCookieKey)
	}
	if p.Logger == nil {
		// Capture the real stderr now: plugin.Serve swaps os.Stderr for a
		// pipe that only reaches the host through GRPCStdio.
		p.Logger = slog.New(NewLogHandler(os.Stderr, slog.LevelInfo)).With("plugin", p.Name)
		slog.SetDefault(p.Logger)
	}
	defer p.mapper.Close()
	defer p.host.close()
	// With ARENAHOST_CPU_PROFILE set (shared/cpuprofile), the plugin
	// profiles its run into that directory.
	if stopProfile, err := cpuprofile.Start(p.Name); err != nil {
		p.logger().Warn("no cpu profile", "err", err)
	} else {
		defer func() {
			if err := stopProfile(); err != nil {
				p.logger().Warn("cpu profile", "err", err)
			}
		}()
	}

	var (
		mu  sync.Mutex
		srv *grpc.Server
	)
	stop := func(why string) {
		mu.Lock()
		defer mu.Unlock()
		if srv != nil {
			p.logger().Info("stopping", "reason", why)
			srv.Stop()
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		<-ctx.Done()
		stop("context done")
	}()
	go watchParent(ctx, os.Getppid(), func() { stop("host process exited") })

	p.logger().Info("serving", "version", p.Version, "kind", p.Kind, "methods", len(p.methods))
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: wire.Handshake,
		Plugins:         wire.PluginMap(p.Server(), p.host.setBroker),
		GRPCServer: func(opts []grpc.ServerOption) *grpc.Server {
			opts = append(opts, grpc.MaxRecvMsgSize(MaxMessageBytes), grpc.MaxSendMsgSize(MaxMessageBytes))
			mu.Lock()
			defer mu.Unlock()
			srv = grpc.NewServer(opts...)
			return srv
		},
	})
	mu.Lock()
	srv = nil // stopped; the deferred cancel must not report a second stop
	mu.Unlock()
	p.logger().Info("stopped")
	return nil
}

// watchParent calls gone once the process's parent is no longer ppid.
func watchParent(ctx context.Context, ppid int, gone func()) {
	t := time.NewTicker(parentPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if os.Getppid() != ppid {
				gone()
				return
			}
		}
	}
}

// NewLogHandler returns a slog JSON handler writing hclog's JSON keys
// (@timestamp, @level, @message), which go-plugin's host side parses from a
// plugin's stderr and re-logs under the plugin's name at the right level.
func NewLogHandler(w io.Writer, level slog.Leveler) slog.Handler {
	return slog.NewJSONHandler(w, &slog.HandlerOptions{
		Level: level,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) > 0 {
				return a
			}
			switch a.Key {
			case slog.TimeKey:
				return slog.String("@timestamp", a.Value.Time().Format("2006-01-02T15:04:05.000000Z07:00"))
			case slog.LevelKey:
				if l, ok := a.Value.Any().(slog.Level); ok {
					return slog.String("@level", hclogLevel(l))
				}
			case slog.MessageKey:
				return slog.String("@message", a.Value.String())
			}
			return a
		},
	})
}

func hclogLevel(l slog.Level) string {
	switch {
	case l < slog.LevelInfo:
		return "debug"
	case l < slog.LevelWarn:
		return "info"
	case l < slog.LevelError:
		return "warn"
	default:
		return "error"
	}
}
