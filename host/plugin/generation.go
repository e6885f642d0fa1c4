package plugin

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	goplugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/arenahost/arenahost/shared/manifest"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/wire"
)

// EnvLifelineFD names the plugin's lifeline descriptor (always 3): the read
// end of a pipe that reaches EOF when the host exits or retires the
// generation.
const EnvLifelineFD = "ARENAHOST_LIFELINE_FD"

// WarmupMethod is invoked (with an empty msgpack map) on a new generation
// before it takes traffic, when the plugin lists it in Describe.
const WarmupMethod = "warmup"

// generation is one running plugin process.
type generation struct {
	n      uint64
	owner  string
	token  string // host service token (non-broker plugins)
	client *goplugin.Client
	cmd    *exec.Cmd
	rpc    *wire.Client
	pid    int
	done   context.Context // cancelled when the process exits
	desc   *pluginv1.DescribeResponse
	start  time.Time

	lifeline *os.File      // write end of the plugin's lifeline pipe
	sockDir  string        // where the plugin creates its listening socket; removed on stop
	released chan struct{} // closed once the generation is torn down
	stopOnce sync.Once
	retiring atomic.Bool // stopped on purpose: an exit is not a crash
	drainCut atomic.Bool // killed with calls still in flight

	mu       sync.Mutex
	inflight int
	closing  bool
	idle     chan struct{} // closed when closing and inflight == 0
}

// acquire counts a call in flight; false when the generation no longer
// takes calls (it is draining or gone).
func (g *generation) acquire() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closing {
		return false
	}
	g.inflight++
	return true
}

func (g *generation) release() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.inflight--
	if g.closing && g.inflight == 0 {
		close(g.idle)
	}
}

func (g *generation) inFlight() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.inflight
}

// drain stops new calls and waits, up to bound, for the calls in flight.
func (g *generation) drain(bound time.Duration) bool {
	g.mu.Lock()
	if !g.closing {
		g.closing = true
		if g.inflight == 0 {
			close(g.idle)
		}
	}
	g.mu.Unlock()
	t := time.NewTimer(bound)
	defer t.Stop()
	select {
	case <-g.idle:
		return true
	case <-g.done.Done():
		return true
	case <-t.C:
		return false
	}
}

func (g *generation) exitStatus() string {
	select {
	case <-g.done.Done():
	default:
		return "still running"
	}
	if g.cmd.ProcessState == nil {
		return "exited"
	}
	return g.cmd.ProcessState.String()
}

// hostSide is the host's go-plugin plugin: wire's adapter, keeping the
// context go-plugin cancels when the plugin process exits.
type hostSide struct {
	wire.GRPCPlugin
	done context.Context
}

func (h *hostSide) GRPCClient(ctx context.Context, b *goplugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	h.done = ctx
	return h.GRPCPlugin.GRPCClient(ctx, b, c)
}

// startError is a failed start: the step, the cause and the last lines the
// plugin wrote to stderr.
type startError struct {
	Plugin     string
	Generation uint64
	Step       string
	Err        error
	Stderr     string
}

func (e *startError) Error() string {
	s := fmt.Sprintf("start plugin %s generation %d: %s: %v", e.Plugin, e.Generation, e.Step, e.Err)
	if e.Stderr != "" {
		s += "; last stderr: " + e.Stderr
	}
	return s
}

func (e *startError) Unwrap() error { return e.Err }

// startGeneration starts, checks and warms up a new generation of p from
// man. On any failure the process is gone and its leases released.
func (p *managed) startGeneration(ctx context.Context, man *manifest.Manifest) (*generation, error) {
	m := p.m
	p.mu.Lock()
	p.nextGen++
	n := p.nextGen
	p.mu.Unlock()

	g := &generation{
		n:        n,
		owner:    Owner(man.Name, n),
		released: make(chan struct{}),
		idle:     make(chan struct{}),
	}
	fail := func(step string, err error) (*generation, error) {
		se := &startError{Plugin: man.Name, Generation: n, Step: step, Err: err}
		p.stop(g, 0)
		se.Stderr = p.logs.lastText(m.cfg.ErrorLines, n)
		return nil, se
	}

	r, err := resolveManifest(man, m.lookupEnv)
	if err != nil {
		return fail("resolve command", err)
	}
	hs := &hostService{
		src:  Source{Plugin: man.Name, Generation: n, Owner: g.owner},
		deps: m.deps,
		log:  p.log.With("generation", n),
		ring: p.logs,
	}
	isGo := man.Language == manifest.LanguageGo

	sockDir, err := m.socketDir()
	if err != nil {
		return fail("socket dir", err)
	}
	env := m.childEnv()
	env = append(env,
		wire.EnvPluginName+"="+man.Name,
		wire.EnvGeneration+"="+strconv.FormatUint(n, 10))
	// The plugin's own listening socket (go-plugin's server and the Python
	// SDK create it in EnvUnixSocketDir) goes into a directory of this
	// generation inside the host's own socket directory, removed when the
	// generation stops: a plugin that is killed (crash, drain bound,
	// SIGKILL) cannot leave its socket behind, and a killed host's sockets
	// go with its directory at the next start. The name is short (g1,
	// g2, …, unique within the host's directory) because a unix socket's
	// whole path must fit in 107 bytes.
	g.sockDir = filepath.Join(sockDir, "g"+strconv.FormatUint(m.genDirs.Add(1), 36))
	if err = os.Mkdir(g.sockDir, 0o700); err != nil {
		g.sockDir = ""
		return fail("socket dir", err)
	}
	env = append(env, goplugin.EnvUnixSocketDir+"="+g.sockDir)
	if !isGo {
		th, err := m.tokenHost()
		if err != nil {
			return fail("host service", err)
		}
		tok, err := th.register(hs)
		if err != nil {
			return fail("host service", err)
		}
		g.token = tok
		env = append(env, wire.EnvHostAddr+"="+th.addr(), wire.EnvHostToken+"="+tok)
	}

	// The lifeline: the plugin's fd 3 is the read end of a pipe whose only
	// write end the host holds; EOF means the host is gone or done with
	// this generation. It backs up Pdeathsig for plugins that want to stop
	// gracefully (the Python SDK watches it) or that fork children.
	lr, lw, err := os.Pipe()
	if err != nil {
		return fail("lifeline", err)
	}
	g.lifeline = lw
	env = append(env, EnvLifelineFD+"=3")

	cmd := exec.Command(r.command, r.args...)
	cmd.Dir = man.Dir()
	cmd.Env = env
	cmd.ExtraFiles = []*os.File{lr}
	// Own process group, so teardown reaches the plugin's children; killed
	// by the kernel when the thread that forked it dies (see spawn).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	g.cmd = cmd

	out := &lineWriter{log: p.log.With("generation", n), ring: p.logs, gen: n}
	side := &hostSide{}
	cc := &goplugin.ClientConfig{
		HandshakeConfig:  wire.Handshake,
		Plugins:          goplugin.PluginSet{wire.PluginName: side},
		Cmd:              cmd,
		AllowedProtocols: []goplugin.Protocol{goplugin.ProtocolGRPC},
		AutoMTLS:         isGo,
		StartTimeout:     m.cfg.StartTimeout,
		Stderr:           out,
		SyncStderr:       out,
		SyncStdout:       out,
		SkipHostEnv:      true,
		Logger:           hclog.New(&hclog.LoggerOptions{Level: hclog.Off}),
	}
	if man.SHA256 != "" {
		sum, _ := hex.DecodeString(man.SHA256)
		cc.SecureConfig = &goplugin.SecureConfig{Checksum: sum, Hash: sha256.New()}
	}
	if err := m.track(g); err != nil {
		_ = lw.Close()
		_ = lr.Close()
		g.lifeline = nil
		return fail("start", err)
	}
	g.client = goplugin.NewClient(cc)

	err = spawn(g)
	_ = lr.Close() // the child has its copy
	if cmd.Process != nil {
		g.pid = cmd.Process.Pid
	}
	if err != nil {
		switch {
		case errors.Is(err, goplugin.ErrChecksumsDoNotMatch):
			err = fmt.Errorf("%s: sha256 does not match the manifest's %s: %w", r.command, man.SHA256, err)
		case strings.Contains(err.Error(), "incompatible API version"):
			// go-plugin's negotiation failed: the plugin was built for
			// another arenahost protocol.
			err = fmt.Errorf("%w: this host speaks protocol %d (rebuild the plugin against it): %w", ErrProtocolMismatch, wire.ProtocolVersion, err)
		}
		return fail("handshake", err)
	}
	g.start = time.Now()

	cp, err := g.client.Client()
	if err != nil {
		return fail("connect", err)
	}
	raw, err := cp.Dispense(wire.PluginName)
	if err != nil {
		return fail("dispense", err)
	}
	wc, ok := raw.(*wire.Client)
	if !ok || side.done == nil {
		return fail("dispense", fmt.Errorf("unexpected client type %T", raw))
	}
	g.rpc = wc
	g.done = side.done

	sctx, cancel := context.WithTimeout(ctx, m.cfg.StartTimeout)
	defer cancel()
	stopOnExit := context.AfterFunc(g.done, cancel)
	defer stopOnExit()

	hc, err := healthpb.NewHealthClient(wc.Conn).Check(sctx, &healthpb.HealthCheckRequest{Service: "plugin"})
	if err != nil {
		return fail("health", p.exitCause(g, err))
	}
	if hc.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return fail("health", fmt.Errorf("service \"plugin\" is %v, want SERVING", hc.GetStatus()))
	}

	var brokerID uint32
	if isGo {
		brokerID = wc.Broker.NextId()
		go wc.Broker.AcceptAndServe(brokerID, func(opts []grpc.ServerOption) *grpc.Server {
			s := grpc.NewServer(opts...)
			pluginv1.RegisterHostServer(s, hs)
			return s
		})
	}
	desc, err := wc.Describe(sctx, &pluginv1.DescribeRequest{HostBrokerId: brokerID})
	if err != nil {
		return fail("describe", p.exitCause(g, err))
	}
	if err := checkDescribe(man, desc); err != nil {
		return fail("describe", err)
	}
	g.desc = desc
	for _, mi := range desc.GetMethods() {
		if mi.GetName() == WarmupMethod && !mi.GetStreaming() {
			if _, err := wc.Invoke(sctx, &pluginv1.InvokeRequest{Method: WarmupMethod, Args: []byte{0x80}, CallId: "warmup"}); err != nil {
				return fail("warmup", p.exitCause(g, err))
			}
		}
	}
	select {
	case <-g.done.Done():
		return fail("warmup", fmt.Errorf("plugin exited (%s)", g.exitStatus()))
	default:
	}
	return g, nil
}

// ErrProtocolMismatch is returned when a plugin reports a protocol version
// this host does not speak.
var ErrProtocolMismatch = errors.New("plugin protocol version mismatch")

func checkDescribe(man *manifest.Manifest, d *pluginv1.DescribeResponse) error {
	switch {
	case d.GetProtocolVersion() != uint32(wire.ProtocolVersion):
		return fmt.Errorf("plugin reports protocol_version %d but this host speaks %d (rebuild the plugin against protocol v%d): %w",
			d.GetProtocolVersion(), wire.ProtocolVersion, wire.ProtocolVersion, ErrProtocolMismatch)
	case d.GetName() != man.Name:
		return fmt.Errorf("plugin reports name %q but manifest %s declares %q", d.GetName(), man.Path, man.Name)
	case d.GetKind() != man.Kind:
		return fmt.Errorf("plugin reports kind %q but manifest %s declares %q", d.GetKind(), man.Path, man.Kind)
	}
	return nil
}

// pluginEnv is the host's environment minus the variables the host sets
// per plugin generation, so a host started from a plugin cannot leak its
// own identity into its children.
// childEnv is a plugin process's base environment: the host's (filtered by
// pluginEnv) plus ChildEnv. The requirement check runs in it too, so it
// sees what the plugin will.
func (m *Manager) childEnv() []string {
	return append(pluginEnv(os.Environ()), pluginEnv(m.cfg.ChildEnv)...)
}

func pluginEnv(environ []string) []string {
	out := make([]string, 0, len(environ)+4)
	for _, kv := range environ {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case wire.EnvHostAddr, wire.EnvHostToken, wire.EnvPluginName, wire.EnvGeneration, wire.Handshake.MagicCookieKey, EnvLifelineFD:
			continue
		}
		if strings.HasPrefix(k, "PLUGIN_") {
			continue
		}
		out = append(out, kv)
	}
	return out
}

// spawn runs go-plugin's Start (fork, exec, handshake) on a goroutine locked
// to its OS thread, and keeps that thread locked, and so alive, until the
// generation is torn down. Pdeathsig fires when the forking *thread* exits
// (golang/go#27505), so this pins the lifeline to the host process rather
// than to whatever thread happened to fork.
func spawn(g *generation) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		_, err := g.client.Start()
		errc <- err
		if err == nil {
			<-g.released
		} else {
			// go-plugin killed the process; wait until it is reaped
			// before the thread may be reused.
			g.client.Kill()
		}
		runtime.UnlockOSThread()
	}()
	return <-errc
}

// exitCause explains an RPC error: if the process has died, say so.
func (p *managed) exitCause(g *generation, err error) error {
	if g.done != nil {
		select {
		case <-g.done.Done():
			return fmt.Errorf("%w: %w (process %d %s)", ErrPluginExited, err, g.pid, g.exitStatus())
		case <-time.After(50 * time.Millisecond):
		}
	}
	return err
}

// stop tears g down: revoke its host token, kill it (gracefully, then the
// whole process group after grace), release its arena leases. Safe to call
// more than once; later calls wait for the first.
func (p *managed) stop(g *generation, grace time.Duration) {
	g.stopOnce.Do(func() {
		g.retiring.Store(true)
		m := p.m
		if g.token != "" {
			if th := m.existingTokenHost(); th != nil {
				th.revoke(g.token)
			}
		}
		if g.client != nil {
			killed := make(chan struct{})
			go func() {
				g.client.Kill()
				close(killed)
			}()
			if grace > 0 {
				select {
				case <-killed:
				case <-time.After(grace):
				}
			}
			killGroup(g.pid)
			<-killed
			killGroup(g.pid) // children that outlived the leader
		}
		if g.lifeline != nil {
			_ = g.lifeline.Close()
		}
		if m.deps.arena != nil {
			if err := m.deps.arena.ReleaseOwner(g.owner); err != nil {
				p.log.Warn("release leases", "owner", g.owner, "err", err)
			}
		}
		// The process is gone, so are its IPC imports: slabs the arena
		// closed meanwhile can be freed now.
		if err := m.deps.released(g.owner); err != nil {
			p.log.Warn("release device slabs", "owner", g.owner, "err", err)
		}
		if g.sockDir != "" {
			_ = os.RemoveAll(g.sockDir)
		}
		close(g.released)
		m.untrack(g)
	})
	<-g.released
}

func killGroup(pid int) {
	if pid > 0 {
		_ = syscall.Kill(-pid, syscall.SIGKILL)
	}
}
