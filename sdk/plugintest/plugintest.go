// Package plugintest is the conformance suite every arenahost plugin, Go or
// Python, passes: Run starts the real plugin process through go-plugin with
// the arenahost handshake, serves it a FakeHost backed by a memfd arena, and
// checks the handshake, Describe, error handling, zero-copy tensor passing,
// host allocation, streaming and a clean, quick shutdown that leaves no
// process behind. The method contract the suite relies on is in README.md.
package plugintest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/wire"
)

// Config says how to start the plugin under test.
type Config struct {
	// Cmd is the plugin's argv; Cmd[0] is exec'd directly (no shell), in
	// its own process group.
	Cmd []string
	// Env is added to the plugin's environment (after the test's own).
	Env []string
	// Dir is the plugin's working directory (empty: the test's).
	Dir string
	// Language is the manifest's language: "go" (the default) gets
	// AutoMTLS and reaches the fake host through go-plugin's broker; any
	// other language gets plain gRPC and ARENAHOST_HOST_ADDR/TOKEN.
	Language string
	// HostViaEnv makes a Go plugin reach the fake host through
	// ARENAHOST_HOST_ADDR/TOKEN too (host_broker_id 0), as other
	// languages do.
	HostViaEnv bool
	// NoConformanceMethods runs only the checks that need no
	// conformance.* methods (for plugins not built with an SDK).
	NoConformanceMethods bool
	// Host is the fake host to serve; nil: a new one with ArenaBytes.
	Host *FakeHost
	// HostServer, when set, is served instead of Host: a test's own Host
	// service (for example one whose LookupTensors serves a model, or
	// whose tensors live on a simulated GPU: shared/gpu/gpusim). The
	// conformance suite needs the FakeHost and ignores it.
	HostServer pluginv1.HostServer
	// ArenaBytes sizes a new fake host's arena (default 16 MiB).
	ArenaBytes uint64
	// StartTimeout bounds the handshake (default 30 s).
	StartTimeout time.Duration
	// WantName and WantKind, when set, must match Describe.
	WantName, WantKind string
}

// Plugin is a started plugin process.
type Plugin struct {
	// Client calls the plugin's Plugin service.
	Client pluginv1.PluginClient
	// Host is the fake host the plugin was given (made but not served when
	// Config.HostServer was set).
	Host *FakeHost
	// Describe is the plugin's answer to the first Describe.
	Describe *pluginv1.DescribeResponse
	// PID is the plugin's process id (and process group id).
	PID int
	// BrokerID is the broker id the fake host is served on (0 when the
	// plugin reaches it through ARENAHOST_HOST_ADDR).
	BrokerID uint32

	client *plugin.Client
	rpc    plugin.ClientProtocol
	logs   *logSink
}

// Start starts the plugin, runs the handshake and Describe (handing it
// the fake host) and returns it. The process is killed when tb ends.
func Start(tb testing.TB, cfg Config) *Plugin {
	tb.Helper()
	if len(cfg.Cmd) == 0 {
		tb.Fatal("plugintest: Config.Cmd is empty")
	}
	if cfg.Language == "" {
		cfg.Language = "go"
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 30 * time.Second
	}
	h := cfg.Host
	if h == nil {
		size := cfg.ArenaBytes
		if size == 0 {
			size = 16 << 20
		}
		h = NewFakeHost(tb, size)
	}
	goBroker := cfg.Language == "go" && !cfg.HostViaEnv

	cmd := exec.Command(cfg.Cmd[0], cfg.Cmd[1:]...)
	cmd.Dir = cfg.Dir
	cmd.Env = append(os.Environ(), cfg.Env...)
	// A short directory (Unix socket paths are limited to 108 bytes) for
	// the host service socket and the plugin's own listening socket, which
	// go-plugin and the Python SDK put under PLUGIN_UNIX_SOCKET_DIR: removed
	// with the test, even when the plugin is killed.
	dir, err := os.MkdirTemp("", "plugintest")
	if err != nil {
		tb.Fatalf("plugintest: temp dir: %v", err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	cmd.Env = append(cmd.Env, plugin.EnvUnixSocketDir+"="+dir)
	if !goBroker {
		cmd.Env = append(cmd.Env, ServeUnix(tb, dir, hostServer(cfg, h))...)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}

	logs := newLogSink(tb)
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  wire.Handshake,
		Plugins:          wire.PluginMap(nil, nil),
		Cmd:              cmd,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		AutoMTLS:         cfg.Language == "go",
		StartTimeout:     cfg.StartTimeout,
		Logger:           hclog.New(&hclog.LoggerOptions{Name: "plugin", Output: logs, Level: hclog.Debug}),
	})
	p := &Plugin{Host: h, client: client, logs: logs}
	tb.Cleanup(func() {
		p.Kill()
		if p.PID > 0 {
			_ = syscall.Kill(-p.PID, syscall.SIGKILL)
		}
	})

	rpc, err := client.Client()
	if err != nil {
		tb.Fatalf("plugintest: start %v: %v", cfg.Cmd, err)
	}
	p.rpc = rpc
	p.PID = cmd.Process.Pid
	raw, err := rpc.Dispense(wire.PluginName)
	if err != nil {
		tb.Fatalf("plugintest: dispense %q: %v", wire.PluginName, err)
	}
	wc, ok := raw.(*wire.Client)
	if !ok {
		tb.Fatalf("plugintest: dispense %q gave %T, want *wire.Client", wire.PluginName, raw)
	}
	p.Client = wc.PluginClient
	if goBroker {
		p.BrokerID = ServeBroker(wc.Broker, hostServer(cfg, h))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p.Describe, err = p.Client.Describe(ctx, &pluginv1.DescribeRequest{HostBrokerId: p.BrokerID})
	if err != nil {
		tb.Fatalf("plugintest: describe: %v", err)
	}
	return p
}

// hostServer is what Start serves: cfg.HostServer, else the fake host.
func hostServer(cfg Config, h *FakeHost) pluginv1.HostServer {
	if cfg.HostServer != nil {
		return cfg.HostServer
	}
	return h
}

// Ping checks the plugin's gRPC health service ("plugin" SERVING).
func (p *Plugin) Ping() error { return p.rpc.Ping() }

// Kill shuts the plugin down the way the host does (go-plugin's graceful
// Shutdown, SIGKILL after 2 s) and returns how long it took and whether
// go-plugin had to force it. Kill is idempotent. Anything left in the
// plugin's process group is killed when the test ends.
func (p *Plugin) Kill() (took time.Duration, forced bool) {
	start := time.Now()
	p.client.Kill()
	took = time.Since(start)
	return took, p.logs.contains("plugin failed to exit gracefully")
}

// Logs returns what go-plugin logged about the plugin, including the
// plugin's own stderr lines.
func (p *Plugin) Logs() string { return p.logs.String() }

// alive reports whether pid (or, with a negative pid, any member of the
// process group -pid) still exists.
// EPERM means it exists but is not ours to signal.
func alive(pid int) bool { return !errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) }

// logSink collects go-plugin's log of the plugin and mirrors it into the
// test log while the test runs.
type logSink struct {
	tb   testing.TB
	mu   sync.Mutex
	buf  bytes.Buffer
	done bool
}

func newLogSink(tb testing.TB) *logSink {
	s := &logSink{tb: tb}
	tb.Cleanup(func() {
		s.mu.Lock()
		s.done = true
		s.mu.Unlock()
	})
	return s
}

var _ io.Writer = (*logSink)(nil)

func (s *logSink) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.buf.Write(b)
	if !s.done && testing.Verbose() {
		s.tb.Logf("%s", strings.TrimRight(string(b), "\n"))
	}
	return len(b), nil
}

func (s *logSink) contains(sub string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Contains(s.buf.Bytes(), []byte(sub))
}

func (s *logSink) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

func describeString(d *pluginv1.DescribeResponse) string {
	var names []string
	for _, m := range d.GetMethods() {
		names = append(names, m.GetName())
	}
	return fmt.Sprintf("%s %s (kind %s, protocol %d, methods %v)", d.GetName(), d.GetVersion(), d.GetKind(), d.GetProtocolVersion(), names)
}
