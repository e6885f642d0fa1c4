// Package job owns runs of pipeline plugins and their live previews: a job
// is one call of a pipeline plugin's method with msgpack parameters and its
// own preview settings (nothing about previews is global). The Manager is
// the plugin manager's Publisher: pipelines publish each step's latent, the
// job copies it into a host-owned arena region (so the pipeline may reuse
// or free its buffer the moment Publish returns), keeps only the newest
// unrendered one, and renders it asynchronously through a preview plugin.
// Publishing never waits for a render. Frames and progress fan out to
// subscribers through bounded drop-oldest queues, so a stalled client never
// slows a job or the other clients. A preview plugin that crashes or is
// swapped mid-job costs the frames in flight (counted as dropped); previews
// resume at the next published step.
package job

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/arenahost/arenahost/host/plugin"
	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/preview/previewwire"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// Errors callers can test with errors.Is.
var (
	// ErrInvalid: the job spec is wrong (unknown preview method, bad
	// format...); nothing was started.
	ErrInvalid = errors.New("invalid job")
	// ErrNotFound: no job has that id.
	ErrNotFound = errors.New("job not found")
	// ErrForbidden: the spec names a plugin that is not a pipeline, or a
	// method its manifest does not declare public; nothing was started.
	ErrForbidden = errors.New("method is not public")
	// ErrUnavailable: the pipeline exists but is not serving now
	// (starting, restarting, crashed or failed); retry later.
	ErrUnavailable = errors.New("plugin unavailable")
)

// Plugins is what jobs need from the plugin manager.
type Plugins interface {
	Call(ctx context.Context, name, method string, args []byte, tensors []*pluginv1.TensorDescriptor) (*plugin.Reply, error)
	Stream(ctx context.Context, name, method string, args []byte, tensors []*pluginv1.TensorDescriptor, fn func(*plugin.Reply) error) error
	PluginStatus(name string) (api.PluginStatus, error)
	Status() []api.PluginStatus
}

// Preview methods besides those a preview plugin lists.
const (
	MethodNone    = "none"                   // previews off: latents are counted, never rendered
	MethodDefault = previewwire.MethodFactor // when a spec names none
)

// checkOrigin accepts 1 to 32 lower-case letters, digits, '-' and '_'.
func checkOrigin(o string) error {
	if len(o) > 32 {
		return fmt.Errorf("%w: origin: %d characters, at most 32", ErrInvalid, len(o))
	}
	for _, c := range o {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return fmt.Errorf("%w: origin %q: character %q is not allowed (use a-z, 0-9, '-', '_')", ErrInvalid, o, c)
		}
	}
	return nil
}

// Config configures a Manager.
type Config struct {
	Memory Memory
	Logger *slog.Logger
	// MaxRunning bounds the jobs running at once; the others wait queued
	// (default 1, as a single accelerator runs one pipeline at a time).
	MaxRunning int
	// Keep is how many finished jobs stay queryable (default 64).
	Keep int
	// RenderTimeout bounds one render call (default 10 s).
	RenderTimeout time.Duration
	// FlushTimeout bounds how long a finished job waits for its last
	// frame before it reports its final state (default 5 s).
	FlushTimeout time.Duration
}

// Manager creates, runs and tracks jobs and receives what their pipelines
// publish. It is safe for concurrent use.
type Manager struct {
	cfg     Config
	log     *slog.Logger
	plugins atomic.Pointer[pluginsBox]
	queue   *runQueue // queue.go: run slots, first come first served
	seq     atomic.Uint64

	mu    sync.Mutex
	jobs  map[string]*Job
	order []*Job // creation order

	subMu sync.RWMutex
	subs  map[*Subscription]struct{}

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

type pluginsBox struct{ p Plugins }

// New returns a Manager. Attach the plugin manager before creating jobs;
// the two refer to each other (the plugin manager publishes into this one).
func New(cfg Config) *Manager {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MaxRunning <= 0 {
		cfg.MaxRunning = 1
	}
	if cfg.Keep <= 0 {
		cfg.Keep = 64
	}
	if cfg.RenderTimeout <= 0 {
		cfg.RenderTimeout = 10 * time.Second
	}
	if cfg.FlushTimeout <= 0 {
		cfg.FlushTimeout = 5 * time.Second
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Manager{cfg: cfg, log: cfg.Logger, queue: newRunQueue(cfg.MaxRunning), jobs: map[string]*Job{},
		subs: map[*Subscription]struct{}{}, ctx: ctx, cancel: cancel}
}

// Attach sets the plugin manager jobs run on.
func (m *Manager) Attach(p Plugins) { m.plugins.Store(&pluginsBox{p}) }

func (m *Manager) pluginsOrErr() (Plugins, error) {
	b := m.plugins.Load()
	if b == nil {
		return nil, errors.New("job manager: no plugin manager attached")
	}
	return b.p, nil
}

// Job is one run of a pipeline plugin.
type Job struct {
	id       string
	spec     api.JobSpec
	m        *Manager
	ctx      context.Context
	cancel   context.CancelFunc
	args     []byte
	stream   bool
	pv       *previewer // nil: previews off
	done     chan struct{}
	slot     chan struct{} // closed when the run queue gives the job its slot
	created  time.Time
	finished atomic.Bool

	mu         sync.Mutex
	state      api.JobState
	step       int
	total      int
	started    time.Time
	firstStep  time.Time
	lastStep   time.Time
	ended      time.Time
	err        string
	result     any
	cancelSeen bool

	published, rendered, dropped atomic.Uint64
}

// ID is the job's id.
func (j *Job) ID() string { return j.id }

// Done is closed when the job has reached a final state.
func (j *Job) Done() <-chan struct{} { return j.done }

// Create checks spec and starts the job (queued until a run slot is free).
// A bad spec, an unknown pipeline or an unknown preview method is refused
// here, never mid-run.
func (m *Manager) Create(ctx context.Context, spec api.JobSpec) (*Job, error) {
	ps, err := m.pluginsOrErr()
	if err != nil {
		return nil, err
	}
	if spec.Pipeline == "" {
		return nil, fmt.Errorf("%w: pipeline: required", ErrInvalid)
	}
	if spec.Method == "" {
		spec.Method = "run"
	}
	if spec.Origin == "" {
		spec.Origin = api.OriginAPI
	}
	if err := checkOrigin(spec.Origin); err != nil {
		return nil, err
	}
	st, err := ps.PluginStatus(spec.Pipeline)
	if err != nil {
		return nil, fmt.Errorf("pipeline %q: %w", spec.Pipeline, err)
	}
	if st.Kind != api.KindPipeline {
		return nil, fmt.Errorf("%w: plugin %q is of kind %q: only pipeline plugins run jobs, and only their public methods (method %q)",
			ErrForbidden, spec.Pipeline, st.Kind, spec.Method)
	}
	switch {
	case st.State == api.PluginUnavailable:
		// Its manifest's needs are not met: no restart will help.
		return nil, fmt.Errorf("pipeline %q: %w: %s", spec.Pipeline, plugin.ErrUnavailable, st.LastError)
	case st.State != api.PluginServing && st.State != api.PluginSwapping:
		msg := ""
		if st.LastError != "" {
			msg = " (last error: " + st.LastError + ")"
		}
		return nil, fmt.Errorf("%w: pipeline %q is %s%s", ErrUnavailable, spec.Pipeline, st.State, msg)
	}
	mi := slices.IndexFunc(st.Methods, func(x api.PluginMethod) bool { return x.Name == spec.Method })
	if mi >= 0 && !st.Methods[mi].Public {
		return nil, fmt.Errorf("%w: pipeline %q: method %q is internal (public: %v; see public_methods in its plugin.json)",
			ErrForbidden, spec.Pipeline, spec.Method, publicMethods(st))
	}
	if mi < 0 {
		return nil, fmt.Errorf("%w: method: pipeline %q (%s) serves no method %q", ErrInvalid, spec.Pipeline, st.State, spec.Method)
	}
	pv, err := m.checkPreview(ps, &spec.Preview)
	if err != nil {
		return nil, err
	}
	id := fmt.Sprintf("job-%d-%d", time.Now().Unix(), m.seq.Add(1))
	params, err := msgpackParams(spec.Params, id)
	if err != nil {
		return nil, fmt.Errorf("%w: params: %w", ErrInvalid, err)
	}
	jctx, cancel := context.WithCancel(m.ctx)
	j := &Job{id: id, spec: spec, m: m, ctx: jctx, cancel: cancel, args: params, stream: st.Methods[mi].Streaming,
		done: make(chan struct{}), created: time.Now(), state: api.JobQueued}
	if pv != nil {
		pv.job = j
		j.pv = pv
	}
	m.mu.Lock()
	m.jobs[id] = j
	m.order = append(m.order, j)
	m.pruneLocked()
	m.mu.Unlock()
	m.broadcast(Event{Type: api.EventState, Job: j.Snapshot()})
	j.slot = m.queue.enqueue() // its place in line, in creation order
	m.wg.Add(1)
	go j.run()
	return j, nil
}

// publicMethods lists the methods of st that HTTP clients may run.
func publicMethods(st api.PluginStatus) []string {
	out := []string{}
	for _, m := range st.Methods {
		if m.Public {
			out = append(out, m.Name)
		}
	}
	return out
}

// checkPreview validates the preview settings against the preview plugin
// and returns the job's previewer (nil when previews are off).
func (m *Manager) checkPreview(ps Plugins, p *api.PreviewSpec) (*previewer, error) {
	defaulted := p.Method == ""
	if defaulted {
		p.Method = MethodDefault
	}
	if p.Method == MethodNone {
		return nil, nil
	}
	f, err := previewwire.NormalizeFormat(p.Format)
	if err != nil {
		return nil, fmt.Errorf("%w: preview.format: %w", ErrInvalid, err)
	}
	p.Format = f
	if err := previewwire.CheckQuality(p.Quality); err != nil {
		return nil, fmt.Errorf("%w: preview.quality: %w", ErrInvalid, err)
	}
	if err := previewwire.CheckMaxSide(p.MaxSide); err != nil {
		return nil, fmt.Errorf("%w: preview.max_side: %w", ErrInvalid, err)
	}
	if p.EveryN < 0 || p.MinIntervalMS < 0 {
		return nil, fmt.Errorf("%w: preview.every_n %d / min_interval_ms %d: must not be negative", ErrInvalid, p.EveryN, p.MinIntervalMS)
	}
	var st api.PluginStatus
	if p.Plugin == "" {
		all := ps.Status()
		i := slices.IndexFunc(all, func(s api.PluginStatus) bool { return s.Kind == "preview" })
		if i < 0 {
			if defaulted {
				// Nobody asked for previews and none can be made: the
				// job runs without them.
				p.Method = MethodNone
				return nil, nil
			}
			return nil, fmt.Errorf("%w: preview: no plugin of kind \"preview\" is loaded (use method %q for none)", ErrInvalid, MethodNone)
		}
		st = all[i]
		p.Plugin = st.Name
	} else {
		var err error
		if st, err = ps.PluginStatus(p.Plugin); err != nil {
			return nil, fmt.Errorf("%w: preview.plugin: %w", ErrInvalid, err)
		}
	}
	if st.State != api.PluginServing && st.State != api.PluginSwapping {
		// The preview plugin is down or restarting: the job still runs;
		// latents offered while it is down are counted dropped, and
		// previews resume when it serves again.
		return newPreviewer(*p), nil
	}
	var have []string
	for _, mi := range st.Methods {
		if name, ok := strings.CutPrefix(mi.Name, previewwire.MethodPrefix); ok && name != "" {
			have = append(have, name)
		}
	}
	if !slices.Contains(have, p.Method) {
		return nil, fmt.Errorf("%w: preview.method: %q unknown (plugin %s serves %v, or %q)", ErrInvalid, p.Method, p.Plugin, have, MethodNone)
	}
	return newPreviewer(*p), nil
}

func newPreviewer(set api.PreviewSpec) *previewer {
	return &previewer{set: set, inflight: -1, wake: make(chan struct{}, 1), exited: make(chan struct{})}
}

func (m *Manager) pruneLocked() {
	finished := 0
	for _, j := range m.order {
		if j.finished.Load() {
			finished++
		}
	}
	for i := 0; finished > m.cfg.Keep && i < len(m.order); {
		j := m.order[i]
		if j.finished.Load() {
			delete(m.jobs, j.id)
			m.order = slices.Delete(m.order, i, i+1)
			finished--
			continue
		}
		i++
	}
}

// Get returns a job by id.
func (m *Manager) Get(id string) (*Job, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, ok := m.jobs[id]
	if !ok {
		return nil, fmt.Errorf("job %q: %w", id, ErrNotFound)
	}
	return j, nil
}

// List returns every tracked job, oldest first.
func (m *Manager) List() []*Job {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.order)
}

// Current is the job an A1111-style client means: the newest running job,
// else the newest queued, else the newest job; nil when there is none.
func (m *Manager) Current() *Job {
	m.mu.Lock()
	defer m.mu.Unlock()
	var queued *Job
	for i := len(m.order) - 1; i >= 0; i-- {
		j := m.order[i]
		switch j.State() {
		case api.JobRunning:
			return j
		case api.JobQueued:
			if queued == nil {
				queued = j
			}
		}
	}
	if queued != nil {
		return queued
	}
	if len(m.order) > 0 {
		return m.order[len(m.order)-1]
	}
	return nil
}

// Cancel cancels a job: a queued job never starts, a running one has its
// pipeline call cancelled.
func (m *Manager) Cancel(id string) (*Job, error) {
	j, err := m.Get(id)
	if err != nil {
		return nil, err
	}
	j.Cancel()
	return j, nil
}

// Cancel cancels the job (see Manager.Cancel).
func (j *Job) Cancel() {
	j.mu.Lock()
	j.cancelSeen = true
	j.mu.Unlock()
	j.cancel()
}

// State returns the job's state.
func (j *Job) State() api.JobState {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.state
}

func (j *Job) setState(s api.JobState, errMsg string) {
	j.mu.Lock()
	j.state = s
	now := time.Now()
	switch {
	case s == api.JobRunning:
		j.started = now
	case s.Final():
		j.ended = now
		if errMsg != "" {
			j.err = errMsg
		}
	}
	j.mu.Unlock()
	j.m.broadcast(Event{Type: api.EventState, Job: j.Snapshot()})
}

// run waits for a slot, calls the pipeline, flushes the last preview and
// settles the final state.
func (j *Job) run() {
	m := j.m
	defer m.wg.Done()
	defer close(j.done)
	select {
	case <-j.slot:
	case <-j.ctx.Done():
	}
	if j.ctx.Err() != nil {
		// Cancelled while it waited (even if its turn came at the same
		// moment): it never starts, and its place goes to the next.
		m.queue.leave(j.slot)
		j.finish(api.JobCancelled, "cancelled before it started")
		return
	}
	defer m.queue.release()
	j.setState(api.JobRunning, "")
	if j.pv != nil {
		j.pv.start()
	}
	ps, err := m.pluginsOrErr()
	var reply *plugin.Reply
	if err == nil {
		if j.stream {
			err = ps.Stream(j.ctx, j.spec.Pipeline, j.spec.Method, j.args, nil, func(r *plugin.Reply) error {
				reply = r
				return nil
			})
		} else {
			reply, err = ps.Call(j.ctx, j.spec.Pipeline, j.spec.Method, j.args, nil)
		}
	}
	if reply != nil {
		var res any
		if derr := unmarshalResult(reply.Result, &res); derr == nil {
			j.mu.Lock()
			j.result = res
			j.mu.Unlock()
		}
	}
	j.mu.Lock()
	cancelled := j.cancelSeen || m.ctx.Err() != nil
	j.mu.Unlock()
	switch {
	case err == nil:
		j.finish(api.JobDone, "")
	case cancelled:
		j.finish(api.JobCancelled, fmt.Sprintf("cancelled: %v", err))
	default:
		j.finish(api.JobFailed, err.Error())
	}
}

// finish stops the previewer (rendering the last latent on success, within
// FlushTimeout), then settles the final state.
func (j *Job) finish(s api.JobState, errMsg string) {
	if j.pv != nil {
		j.pv.stop(s == api.JobDone, j.m.cfg.FlushTimeout)
	}
	j.finished.Store(true)
	j.setState(s, errMsg)
	j.cancel()
	if s != api.JobDone {
		j.m.log.Info("job ended", "job", j.id, "state", s, "err", errMsg)
	}
}

// progress records a published step.
func (j *Job) progress(step, total int) {
	now := time.Now()
	j.mu.Lock()
	if j.state != api.JobRunning {
		j.mu.Unlock()
		return
	}
	if j.firstStep.IsZero() {
		j.firstStep = now
	}
	if step > j.step || total != j.total {
		j.step, j.lastStep = step, now
	}
	j.total = total
	j.mu.Unlock()
	j.m.broadcast(Event{Type: api.EventProgress, Job: j.Snapshot()})
}

// Snapshot returns the job's current state.
func (j *Job) Snapshot() api.Job {
	j.mu.Lock()
	s := api.Job{ID: j.id, Pipeline: j.spec.Pipeline, Method: j.spec.Method, ClientID: j.spec.ClientID, Origin: j.spec.Origin,
		Params: j.spec.Params, State: j.state,
		Step: j.step, Total: j.total, Created: j.created, Started: j.started, Ended: j.ended, Error: j.err, Result: j.result}
	first, last := j.firstStep, j.lastStep
	j.mu.Unlock()
	if s.Total > 0 {
		s.Progress = min(1, float64(s.Step)/float64(s.Total))
	}
	if s.State == api.JobDone {
		s.Progress = 1
	}
	switch {
	case s.Started.IsZero():
		// Never ran (still queued, or cancelled before it started).
	case !s.Ended.IsZero():
		s.Elapsed = s.Ended.Sub(s.Started).Seconds()
	case !s.Started.IsZero():
		s.Elapsed = time.Since(s.Started).Seconds()
	}
	if s.State == api.JobRunning && s.Step > 0 && s.Total > s.Step {
		// Time per step from the first published step on (the first step
		// also carries the pipeline's start-up), times the steps left.
		per := last.Sub(s.Started).Seconds() / float64(s.Step)
		if s.Step > 1 {
			per = last.Sub(first).Seconds() / float64(s.Step-1)
		}
		s.ETA = math.Max(0, per*float64(s.Total-s.Step)-time.Since(last).Seconds())
	}
	s.Preview.PreviewSpec = j.spec.Preview
	s.Preview.PreviewCounters = api.PreviewCounters{Published: j.published.Load(), Rendered: j.rendered.Load(), Dropped: j.dropped.Load()}
	if j.pv != nil {
		j.pv.info(&s.Preview)
	}
	return s
}

// Counters returns the job's preview figures.
func (j *Job) Counters() api.PreviewCounters {
	return api.PreviewCounters{Published: j.published.Load(), Rendered: j.rendered.Load(), Dropped: j.dropped.Load()}
}

// Done is closed when the Manager is closed.
func (m *Manager) Done() <-chan struct{} { return m.ctx.Done() }

// Close cancels every job and waits for them to end.
func (m *Manager) Close(ctx context.Context) error {
	m.cancel()
	done := make(chan struct{})
	go func() { m.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("close jobs: %w", ctx.Err())
	}
}
