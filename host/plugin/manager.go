// Package plugin owns the host's plugin processes: discovery of manifests,
// starting plugins through hashicorp/go-plugin (gRPC only, AutoMTLS for Go,
// checksum verification, own process group, a kernel lifeline), routing
// calls to the current generation, hot swap without dropping a call, crash
// detection and restart with backoff, and the Host service each plugin
// generation reaches back into (arena leases, tensor lookup, publish, log).
//
// Each running process is a generation, numbered from 1 per plugin. Calls go
// to the current generation and are counted in flight there. A swap starts
// the next generation, checks it (health, Describe, protocol version, an
// optional "warmup" method), switches atomically, drains the previous one
// with a bound, kills its process group and releases its arena leases
// (owner "plugin:NAME#GEN"). Whatever fails, the serving generation keeps
// serving.
package plugin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/manifest"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// Errors callers can test with errors.Is.
var (
	// ErrUnknownPlugin: no plugin of that name is registered.
	ErrUnknownPlugin = errors.New("unknown plugin")
	// ErrNotServing: the plugin has no live generation (starting,
	// restarting after a crash, or failed).
	ErrNotServing = errors.New("plugin not serving")
	// ErrPluginExited: the plugin process died during the call.
	ErrPluginExited = errors.New("plugin process exited")
	// ErrClosed: the manager has been closed.
	ErrClosed = errors.New("plugin manager closed")
)

// Defaults for Config's zero fields.
const (
	DefaultStartTimeout      = 20 * time.Second
	DefaultDrainTimeout      = 30 * time.Second
	DefaultKillGrace         = 2 * time.Second
	DefaultRestartBackoff    = 100 * time.Millisecond
	DefaultMaxRestartBackoff = 10 * time.Second
	DefaultCrashLimit        = 5
	DefaultCrashWindow       = time.Minute
	DefaultPollInterval      = time.Second
	DefaultLogLines          = 1000
	DefaultErrorLines        = 5
)

// Config configures a Manager. Zero fields take the Default… values. It
// must not be modified after NewManager.
type Config struct {
	// Dir is the plugins directory Load reads (DIR/NAME/plugin.json).
	Dir string
	// Env is consulted first when expanding ${VAR} in a manifest's command
	// and args (then the host's environment), e.g. ARENAHOST_PYTHON.
	Env map[string]string
	// ChildEnv ("KEY=VALUE") is added to every plugin process's
	// environment, after the host's own: the host tells its plugins which
	// device and arena backend they serve (ARENAHOST_DEVICE,
	// ARENAHOST_ARENA_BACKEND; see docs/deploy.md).
	ChildEnv []string
	// Logger receives the manager's events and every plugin's stderr,
	// under attributes plugin=NAME generation=N.
	Logger *slog.Logger

	Arena     Arena     // leases for Host.Allocate/Free; nil: Allocate is Unimplemented
	Registry  Registry  // Host.LookupTensors; nil: Unimplemented
	Publisher Publisher // Host.Publish; nil: every publish is refused (accepted=false)
	// Slabs is told which generation holds which device slab (see
	// SlabHolders); nil for a host-mapped arena.
	Slabs SlabHolders

	// StartTimeout bounds a new generation's handshake, and separately its
	// health check, Describe and warm-up.
	StartTimeout time.Duration
	// DrainTimeout bounds how long a retired generation's calls may run on.
	DrainTimeout time.Duration
	// KillGrace is how long a retiring process may take to exit after
	// go-plugin's graceful Shutdown before its process group is SIGKILLed.
	KillGrace time.Duration
	// RestartBackoff doubles after each crash, up to MaxRestartBackoff.
	RestartBackoff    time.Duration
	MaxRestartBackoff time.Duration
	// CrashLimit crashes within CrashWindow mark the plugin failed.
	CrashLimit  int
	CrashWindow time.Duration
	// PollInterval is how often manifests and executables are checked for
	// changes that trigger a hot swap; negative disables watching.
	PollInterval time.Duration
	// LogLines is the per-plugin ring of stderr lines kept for Logs.
	LogLines int
	// ErrorLines is how many stderr lines a start or crash error quotes.
	ErrorLines int
	// SocketDir is the parent of this host's socket directory,
	// arenahost-<pid>-<random>, which holds the Host service socket for
	// non-Go plugins and every plugin's own socket (default os.TempDir()).
	// Directories of that form whose host no longer runs are removed when
	// the first plugin starts.
	SocketDir string
}

func (c *Config) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.StartTimeout, DefaultStartTimeout)
	def(&c.DrainTimeout, DefaultDrainTimeout)
	def(&c.KillGrace, DefaultKillGrace)
	def(&c.RestartBackoff, DefaultRestartBackoff)
	def(&c.MaxRestartBackoff, DefaultMaxRestartBackoff)
	def(&c.CrashWindow, DefaultCrashWindow)
	def(&c.PollInterval, DefaultPollInterval)
	if c.CrashLimit == 0 {
		c.CrashLimit = DefaultCrashLimit
	}
	if c.LogLines == 0 {
		c.LogLines = DefaultLogLines
	}
	if c.ErrorLines == 0 {
		c.ErrorLines = DefaultErrorLines
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Manager supervises every plugin. Its methods are safe for concurrent use.
type Manager struct {
	cfg  Config
	log  *slog.Logger
	deps hostDeps

	ctx    context.Context // cancelled by Close; bounds restarts and starts
	cancel context.CancelFunc
	bg     sync.WaitGroup

	mu      sync.Mutex
	plugins map[string]*managed
	closed  bool
	th      *tokenHost
	runDir  string                   // the sockets' directory (runDirLocked)
	genDirs atomic.Uint64            // names the generations' socket directories in runDir
	live    map[*generation]*managed // every process started and not yet torn down
	disc    discovery                // discover.go: new and removed plugin folders
}

// NewManager returns a Manager with no plugins; call Load or Add. When
// watching is enabled it polls for changed manifests and executables until
// Close.
func NewManager(cfg Config) *Manager {
	cfg.setDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		cfg:     cfg,
		log:     cfg.Logger,
		deps:    hostDeps{arena: cfg.Arena, registry: cfg.Registry, publisher: cfg.Publisher, slabs: cfg.Slabs},
		ctx:     ctx,
		cancel:  cancel,
		plugins: map[string]*managed{},
		live:    map[*generation]*managed{},
	}
	if cfg.PollInterval > 0 {
		m.bg.Add(1)
		go m.watch()
	}
	return m
}

func (m *Manager) lookupEnv(k string) (string, bool) {
	if v, ok := m.cfg.Env[k]; ok {
		return v, true
	}
	return os.LookupEnv(k)
}

func (m *Manager) tokenHost() (*tokenHost, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, ErrClosed
	}
	if m.th == nil {
		dir, err := m.runDirLocked()
		if err != nil {
			return nil, err
		}
		th, err := newTokenHost(dir)
		if err != nil {
			return nil, err
		}
		m.th = th
	}
	return m.th, nil
}

// socketDir returns the directory every plugin socket of this host lives
// in (the Host service's, go-plugin's and the Python SDK's, through
// PLUGIN_UNIX_SOCKET_DIR).
func (m *Manager) socketDir() (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return "", ErrClosed
	}
	return m.runDirLocked()
}

// runDirLocked creates, once, <SocketDir>/arenahost-<pid>-<random> with an
// owner file, after removing the directories hosts that no longer run left
// there (a SIGKILLed host cannot remove its own; the next one does, as the
// arena does for shared memory). Close removes it.
func (m *Manager) runDirLocked() (string, error) {
	if m.runDir != "" {
		return m.runDir, nil
	}
	parent := m.cfg.SocketDir
	if parent == "" {
		parent = os.TempDir()
	}
	removed, err := arena.CleanStale(parent)
	for _, d := range removed {
		m.log.Info("removed the plugin sockets of a dead host", "dir", d)
	}
	if err != nil {
		m.log.Warn("clean stale plugin sockets", "dir", parent, "err", err)
	}
	if n := cleanDeadSockets(parent); n > 0 {
		m.log.Info("removed dead go-plugin broker sockets", "dir", parent, "count", n)
	}
	dir, err := arena.MakeOwnedDir(parent)
	if err != nil {
		return "", fmt.Errorf("plugin socket dir: %w", err)
	}
	m.runDir = dir
	return dir, nil
}

func (m *Manager) existingTokenHost() *tokenHost {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.th
}

// track records a process about to start; after Close it refuses, so no
// process can start once Close has taken its final inventory.
func (m *Manager) track(g *generation) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	m.live[g] = nil
	return nil
}

func (m *Manager) untrack(g *generation) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.live, g)
}

// managed is one plugin: its manifest, current generation and history.
type managed struct {
	m    *Manager
	name string
	log  *slog.Logger
	logs *logRing

	current atomic.Pointer[generation]
	swapMu  sync.Mutex // one start/swap/restart at a time

	mu        sync.Mutex
	manifest  *manifest.Manifest
	state     api.PluginState
	lastErr   string
	lastErrAt time.Time
	// lastCall is the newest call that failed for a reason other than its
	// caller's cancellation; lastCallAt when.
	lastCall    string
	lastCallAt  time.Time
	restarts    int
	crashes     []time.Time
	nextGen     uint64
	restartTmr  *time.Timer
	fingerprint string // of the files last started from (or last failed)
	watchBusy   atomic.Bool
}

// Load discovers the manifests under Config.Dir and starts every plugin.
// Plugins that fail to parse or start are reported in the joined error;
// the others serve. A plugin that fails to start stays registered in
// state failed (see Status), and a change to its files retries it.
func (m *Manager) Load(ctx context.Context) error {
	mans, derr := manifest.Discover(m.cfg.Dir)
	errs := []error{derr}
	for _, man := range mans {
		if err := m.Add(ctx, man); err != nil {
			errs = append(errs, err)
		}
	}
	m.disc.loaded.Store(true) // from now on the watch loop picks up new folders
	return errors.Join(errs...)
}

// Add registers the plugin man describes and starts its first generation.
// If the start fails the plugin stays registered in state failed and the
// error says why.
func (m *Manager) Add(ctx context.Context, man *manifest.Manifest) error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return ErrClosed
	}
	if _, dup := m.plugins[man.Name]; dup {
		m.mu.Unlock()
		return fmt.Errorf("add plugin %s from %s: already registered", man.Name, man.Path)
	}
	p := &managed{
		m:        m,
		name:     man.Name,
		log:      m.log.With("plugin", man.Name),
		logs:     newLogRing(m.cfg.LogLines),
		manifest: man,
		state:    api.PluginStarting,
	}
	m.plugins[man.Name] = p
	m.mu.Unlock()

	p.swapMu.Lock()
	defer p.swapMu.Unlock()
	p.mu.Lock()
	p.fingerprint = m.fingerprint(man)
	p.mu.Unlock()
	if err := m.checkRequires(m.startCtx(ctx), man); err != nil {
		if errors.Is(err, ErrUnavailable) {
			p.setUnavailable(err)
		} else {
			p.setFailed(err)
		}
		return err
	}
	g, err := p.startGeneration(m.startCtx(ctx), man)
	if err != nil {
		p.setFailed(err)
		return err
	}
	p.serve(g, man)
	p.log.Info("plugin serving", "generation", g.n, "pid", g.pid, "version", g.desc.GetVersion())
	return nil
}

// startCtx merges the caller's ctx with the manager's lifetime.
func (m *Manager) startCtx(ctx context.Context) context.Context {
	ctx, cancel := context.WithCancel(ctx)
	context.AfterFunc(m.ctx, cancel)
	return ctx
}

func (m *Manager) get(name string) (*managed, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, ErrClosed
	}
	p := m.plugins[name]
	if p == nil {
		return nil, fmt.Errorf("plugin %q: %w", name, ErrUnknownPlugin)
	}
	return p, nil
}

// setUnavailable records that the plugin's requirements are not met.
func (p *managed) setUnavailable(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.state = api.PluginUnavailable
	var ue *unmetError
	if errors.As(err, &ue) {
		p.lastErr = ue.Reason
	} else {
		p.lastErr = err.Error()
	}
	p.log.Warn("plugin unavailable; not started", "reason", p.lastErr)
}

// setLastErr records msg as the last error, now; the caller holds p.mu.
func (p *managed) setLastErr(msg string) {
	p.lastErr, p.lastErrAt = msg, time.Now()
}

func (p *managed) setFailed(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.state = api.PluginFailed
	p.setLastErr(err.Error())
	p.log.Error("plugin failed", "err", err)
}

// serve makes g the current generation and starts watching it for a crash.
func (p *managed) serve(g *generation, man *manifest.Manifest) *generation {
	old := p.current.Swap(g)
	p.mu.Lock()
	p.manifest = man
	p.state = api.PluginServing
	p.mu.Unlock()
	p.m.mu.Lock()
	p.m.live[g] = p
	p.m.mu.Unlock()
	go p.watchExit(g)
	return old
}

// Swap replaces the plugin's running generation with a new one started
// from its manifest, re-read from disk. The old generation keeps serving
// until the new one has passed health, Describe and warm-up; then calls
// switch over atomically and the old one is drained (up to DrainTimeout)
// and killed, and its leases are released. If anything fails, the old
// generation keeps serving and the error says which step failed and what
// the plugin last wrote to stderr. Swap also revives a failed plugin.
func (m *Manager) Swap(ctx context.Context, name string) error {
	p, err := m.get(name)
	if err != nil {
		return err
	}
	return p.swap(ctx, "api")
}

func (p *managed) swap(ctx context.Context, reason string) error {
	p.swapMu.Lock()
	defer p.swapMu.Unlock()
	m := p.m

	p.mu.Lock()
	path := p.manifest.Path
	prevState := p.state
	if p.current.Load() != nil {
		p.state = api.PluginSwapping
	} else {
		p.state = api.PluginStarting
	}
	p.fingerprint = m.fingerprintPath(path)
	p.mu.Unlock()

	restore := func(err error) error {
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.current.Load() != nil {
			p.state = api.PluginServing
		} else if prevState == api.PluginServing || prevState == api.PluginSwapping {
			p.state = api.PluginFailed
		} else {
			p.state = prevState
		}
		p.setLastErr(err.Error())
		p.log.Error("swap refused; previous generation keeps serving", "reason", reason, "err", err)
		return err
	}
	man, err := manifest.Parse(path)
	if err != nil {
		return restore(&SwapError{Plugin: p.name, Step: "manifest", Reason: err.Error(), Err: err})
	}
	if man.Name != p.name {
		return restore(fmt.Errorf("swap plugin %s: manifest %s: field name: now %q; a plugin cannot be renamed in place", p.name, path, man.Name))
	}
	if err := m.checkRequires(m.startCtx(ctx), man); err != nil {
		if errors.Is(err, ErrUnavailable) && p.current.Load() == nil {
			p.mu.Lock()
			p.manifest = man
			p.mu.Unlock()
			p.setUnavailable(err)
			return fmt.Errorf("swap plugin %s: %w", p.name, err)
		}
		return restore(fmt.Errorf("swap plugin %s: %w", p.name, err))
	}
	t0 := time.Now()
	g, err := p.startGeneration(m.startCtx(ctx), man)
	if err != nil {
		return restore(refused(p.name, err)) // swaperr.go: the plugin's own error first
	}
	old := p.serve(g, man)
	p.mu.Lock()
	p.lastErr = "" // recovered; lastErrAt keeps when the last error was
	p.crashes = nil
	if p.restartTmr != nil {
		p.restartTmr.Stop()
		p.restartTmr = nil
	}
	p.mu.Unlock()
	switched := time.Since(t0)
	if old != nil {
		p.retire(old)
	}
	p.log.Info("plugin swapped", "reason", reason, "generation", g.n, "pid", g.pid,
		"previous", genNum(old), "start", switched, "total", time.Since(t0))
	return nil
}

func genNum(g *generation) uint64 {
	if g == nil {
		return 0
	}
	return g.n
}

// retire drains g with the configured bound and tears it down.
func (p *managed) retire(g *generation) {
	g.retiring.Store(true)
	if !g.drain(p.m.cfg.DrainTimeout) {
		g.drainCut.Store(true)
		p.log.Warn("drain timed out; killing generation with calls in flight",
			"generation", g.n, "inflight", g.inFlight(), "bound", p.m.cfg.DrainTimeout)
	}
	p.stop(g, p.m.cfg.KillGrace)
}

// watchExit waits for g's process to exit; an exit that nobody asked for
// is a crash.
func (p *managed) watchExit(g *generation) {
	select {
	case <-g.done.Done():
	case <-g.released:
		return
	}
	if g.retiring.Load() {
		return
	}
	p.onCrash(g)
}

func (p *managed) onCrash(g *generation) {
	m := p.m
	if !p.current.CompareAndSwap(g, nil) {
		return // a retiring generation, not the one serving
	}
	cause := fmt.Sprintf("generation %d (pid %d) exited unexpectedly: %s", g.n, g.pid, g.exitStatus())
	// Fail calls fast and reclaim leases, without waiting for a drain.
	go p.stop(g, 0)
	if tail := p.logs.lastText(m.cfg.ErrorLines, g.n); tail != "" {
		cause += "; last stderr: " + tail
	}
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.setLastErr(cause)
	p.crashes = append(p.crashes, now)
	p.crashes = slices.DeleteFunc(p.crashes, func(t time.Time) bool { return now.Sub(t) > m.cfg.CrashWindow })
	if len(p.crashes) >= m.cfg.CrashLimit {
		p.state = api.PluginFailed
		p.setLastErr(fmt.Sprintf("%d crashes within %s, not restarting (swap to retry); last: %s", len(p.crashes), m.cfg.CrashWindow, cause))
		p.log.Error("plugin crashed; marked failed", "generation", g.n, "crashes", len(p.crashes), "cause", cause)
		return
	}
	backoff := m.cfg.RestartBackoff << (len(p.crashes) - 1)
	if backoff > m.cfg.MaxRestartBackoff || backoff <= 0 {
		backoff = m.cfg.MaxRestartBackoff
	}
	p.state = api.PluginCrashed
	p.log.Error("plugin crashed; restarting", "generation", g.n, "backoff", backoff, "cause", cause)
	p.restartTmr = time.AfterFunc(backoff, p.restart)
}

func (p *managed) restart() {
	m := p.m
	if m.ctx.Err() != nil {
		return
	}
	p.swapMu.Lock()
	defer p.swapMu.Unlock()
	p.mu.Lock()
	if p.current.Load() != nil || p.state != api.PluginCrashed {
		p.mu.Unlock()
		return // revived or failed meanwhile
	}
	p.state = api.PluginRestarting
	man := p.manifest
	p.mu.Unlock()

	g, err := p.startGeneration(m.startCtx(m.ctx), man)
	if err != nil {
		if m.ctx.Err() != nil {
			return
		}
		// A failed restart counts as another crash.
		now := time.Now()
		p.mu.Lock()
		p.setLastErr(err.Error())
		p.crashes = append(p.crashes, now)
		p.crashes = slices.DeleteFunc(p.crashes, func(t time.Time) bool { return now.Sub(t) > m.cfg.CrashWindow })
		if len(p.crashes) >= m.cfg.CrashLimit {
			p.state = api.PluginFailed
			p.log.Error("restart failed; marked failed", "err", err)
		} else {
			p.state = api.PluginCrashed
			backoff := min(m.cfg.RestartBackoff<<(len(p.crashes)-1), m.cfg.MaxRestartBackoff)
			p.log.Error("restart failed; retrying", "backoff", backoff, "err", err)
			p.restartTmr = time.AfterFunc(backoff, p.restart)
		}
		p.mu.Unlock()
		return
	}
	p.serve(g, man)
	p.mu.Lock()
	p.restarts++
	p.mu.Unlock()
	p.log.Info("plugin restarted", "generation", g.n, "pid", g.pid)
}

// Reply is a plugin's answer to a call.
type Reply struct {
	Result  []byte // msgpack
	Tensors []*pluginv1.TensorDescriptor
	// Generation served the call.
	Generation uint64
}

// acquire returns the current generation with the call counted in flight.
func (p *managed) acquire() (*generation, error) {
	for range 10000 {
		g := p.current.Load()
		if g == nil {
			p.mu.Lock()
			st, last := p.state, p.lastErr
			p.mu.Unlock()
			if last != "" {
				return nil, fmt.Errorf("plugin %s is %s: %w (last error: %s)", p.name, st, ErrNotServing, last)
			}
			return nil, fmt.Errorf("plugin %s is %s: %w", p.name, st, ErrNotServing)
		}
		if g.acquire() {
			return g, nil
		}
		// g is draining: the next generation is already current.
	}
	return nil, fmt.Errorf("plugin %s: no generation accepted the call: %w", p.name, ErrNotServing)
}

// exitGrace is how long a failed call waits to learn whether the process
// died.
const exitGrace = 300 * time.Millisecond

// callCtx is ctx, also cancelled when g's process exits.
func callCtx(ctx context.Context, g *generation) (context.Context, func()) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(g.done, cancel)
	return ctx, func() { stop(); cancel() }
}

func (p *managed) callErr(g *generation, method string, err error) error {
	// A dying process breaks the connection a moment before go-plugin sees
	// the exit; give it that moment so the error names the real cause.
	wait := time.Duration(0)
	if c := status.Code(err); c == codes.Unavailable || c == codes.Canceled {
		wait = exitGrace
	}
	exited := time.NewTimer(wait)
	defer exited.Stop()
	select {
	case <-g.done.Done():
		cause := g.exitStatus()
		if g.retiring.Load() && g.drainCut.Load() {
			cause += " after the drain bound expired during a swap"
		}
		if tail := p.logs.lastText(p.m.cfg.ErrorLines, g.n); tail != "" {
			cause += "; last stderr: " + tail
		}
		err := fmt.Errorf("call %s.%s: generation %d (pid %d) died mid-call (%s): %w", p.name, method, g.n, g.pid, cause, ErrPluginExited)
		p.callFailed(err)
		return err
	case <-exited.C:
	}
	code := status.Code(err)
	err = fmt.Errorf("call %s.%s (generation %d): %w", p.name, method, g.n, err)
	if code != codes.Canceled && code != codes.DeadlineExceeded {
		p.callFailed(err)
	}
	return err
}

// callFailed records a failed call for Status (the plugin keeps serving:
// the call, not the process, failed).
func (p *managed) callFailed(err error) {
	p.mu.Lock()
	p.lastCall, p.lastCallAt = err.Error(), time.Now()
	p.mu.Unlock()
}

// Call invokes method on the plugin's current generation. args and the
// result are msgpack. The call fails at once, with ErrPluginExited, if the
// process dies meanwhile; it is never cut by a swap (the old generation
// drains).
func (m *Manager) Call(ctx context.Context, name, method string, args []byte, tensors []*pluginv1.TensorDescriptor) (*Reply, error) {
	p, err := m.get(name)
	if err != nil {
		return nil, err
	}
	g, err := p.acquire()
	if err != nil {
		return nil, err
	}
	defer g.release()
	cctx, done := callCtx(ctx, g)
	defer done()
	if err := m.deps.opened(g.owner, descriptorRegions(nil, tensors...)); err != nil {
		return nil, fmt.Errorf("call %s.%s (generation %d): %w", name, method, g.n, err)
	}
	resp, err := g.rpc.Invoke(cctx, &pluginv1.InvokeRequest{Method: method, Args: args, Tensors: tensors})
	if err != nil {
		return nil, p.callErr(g, method, err)
	}
	return &Reply{Result: resp.GetResult(), Tensors: resp.GetTensors(), Generation: g.n}, nil
}

// Stream invokes a streaming method on the current generation and calls fn
// for each reply, in order. An error from fn ends the stream and is
// returned. The generation stays in flight (and is not drained away) until
// the stream ends.
func (m *Manager) Stream(ctx context.Context, name, method string, args []byte, tensors []*pluginv1.TensorDescriptor, fn func(*Reply) error) error {
	p, err := m.get(name)
	if err != nil {
		return err
	}
	g, err := p.acquire()
	if err != nil {
		return err
	}
	defer g.release()
	cctx, done := callCtx(ctx, g)
	defer done()
	if err := m.deps.opened(g.owner, descriptorRegions(nil, tensors...)); err != nil {
		return fmt.Errorf("call %s.%s (generation %d): %w", name, method, g.n, err)
	}
	st, err := g.rpc.InvokeStream(cctx, &pluginv1.InvokeRequest{Method: method, Args: args, Tensors: tensors})
	if err != nil {
		return p.callErr(g, method, err)
	}
	for {
		resp, err := st.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return p.callErr(g, method, err)
		}
		if err := fn(&Reply{Result: resp.GetResult(), Tensors: resp.GetTensors(), Generation: g.n}); err != nil {
			return err
		}
	}
}

func (p *managed) status() api.PluginStatus {
	p.mu.Lock()
	man := p.manifest
	s := api.PluginStatus{
		Name: p.name, Version: man.Version, Kind: man.Kind, Language: man.Language, Manifest: man.Path,
		State: p.state, Restarts: p.restarts, Crashes: len(p.crashes), LastError: p.lastErr, LastErrorAt: p.lastErrAt,
		CrashLimit: p.m.cfg.CrashLimit, CrashWindowSeconds: p.m.cfg.CrashWindow.Seconds(),
		LastCallError: p.lastCall, LastCallErrorAt: p.lastCallAt,
	}
	p.mu.Unlock()
	if g := p.current.Load(); g != nil {
		s.Generation, s.PID, s.Since, s.InFlight = g.n, g.pid, g.start, g.inFlight()
		if v := g.desc.GetVersion(); v != "" {
			s.Version = v
		}
		for _, mi := range g.desc.GetMethods() {
			s.Methods = append(s.Methods, api.PluginMethod{Name: mi.GetName(), Description: mi.GetDescription(), Streaming: mi.GetStreaming(),
				Public: man.Public(mi.GetName())})
		}
	}
	return s
}

// Status returns a snapshot of every plugin, sorted by name.
func (m *Manager) Status() []api.PluginStatus {
	m.mu.Lock()
	ps := slices.Collect(maps.Values(m.plugins))
	m.mu.Unlock()
	out := make([]api.PluginStatus, 0, len(ps))
	for _, p := range ps {
		out = append(out, p.status())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// PluginStatus returns one plugin's snapshot.
func (m *Manager) PluginStatus(name string) (api.PluginStatus, error) {
	p, err := m.get(name)
	if err != nil {
		return api.PluginStatus{}, err
	}
	return p.status(), nil
}

// Logs returns up to n of the plugin's newest stderr (and Host.Log) lines,
// oldest first, across generations.
func (m *Manager) Logs(name string, n int) ([]api.LogLine, error) {
	p, err := m.get(name)
	if err != nil {
		return nil, err
	}
	return p.logs.tail(n, 0), nil
}

// Remove stops the plugin (draining its calls up to ctx's deadline or
// DrainTimeout) and unregisters it.
func (m *Manager) Remove(ctx context.Context, name string) error {
	p, err := m.get(name)
	if err != nil {
		return err
	}
	m.mu.Lock()
	delete(m.plugins, name)
	m.mu.Unlock()
	p.swapMu.Lock() // let a swap or restart in progress finish first
	defer p.swapMu.Unlock()
	p.shutdown(ctx)
	return nil
}

func (p *managed) shutdown(ctx context.Context) {
	p.mu.Lock()
	if p.restartTmr != nil {
		p.restartTmr.Stop()
	}
	p.state = api.PluginStopped
	p.mu.Unlock()
	g := p.current.Swap(nil)
	if g == nil {
		return
	}
	g.retiring.Store(true)
	bound := p.m.cfg.DrainTimeout
	if dl, ok := ctx.Deadline(); ok {
		bound = min(bound, time.Until(dl))
	}
	if bound > 0 && !g.drain(bound) {
		g.drainCut.Store(true)
	}
	p.stop(g, p.m.cfg.KillGrace)
}

// Close stops every plugin: calls in flight get until ctx's deadline (at
// most DrainTimeout) to finish, then every plugin process group is killed
// and every lease released. Close is independent of ctx's cancellation for
// the teardown itself and leaves no plugin process behind.
func (m *Manager) Close(ctx context.Context) error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	ps := slices.Collect(maps.Values(m.plugins))
	m.mu.Unlock()
	m.cancel() // aborts starts and pending restarts
	m.bg.Wait()

	var wg sync.WaitGroup
	for _, p := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.swapMu.Lock() // wait for an aborted start to clean up
			defer p.swapMu.Unlock()
			p.shutdown(ctx)
		}()
	}
	wg.Wait()
	// Anything still alive (a start racing Close) goes too.
	m.mu.Lock()
	rest := maps.Clone(m.live)
	th := m.th
	m.mu.Unlock()
	for g, p := range rest {
		if p == nil {
			p = &managed{m: m, log: m.log, logs: newLogRing(0)}
		}
		p.stop(g, 0)
	}
	if th != nil {
		th.close()
	}
	m.mu.Lock()
	dir := m.runDir
	m.mu.Unlock()
	if dir != "" {
		if err := os.RemoveAll(dir); err != nil {
			m.log.Warn("remove plugin socket dir", "dir", dir, "err", err)
		}
	}
	return nil
}
