package job

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/arenahost/arenahost/host/plugin"
	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/preview/previewwire"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
)

// Frame is one rendered preview.
type Frame struct {
	// ID counts the job's frames from 1.
	ID    uint64
	Step  int
	Total int
	// Plugin and Generation name the preview plugin process that rendered
	// it; Method its preview method.
	Plugin     string
	Generation uint64
	Method     string
	// Format is "jpeg" or "png"; Data the encoded image.
	Format        string
	Width, Height int
	Data          []byte
	// Published is when the host received the latent; Rendered when the
	// frame came back.
	Published, Rendered time.Time
	// Render and Encode are the plugin's own times for the two stages.
	Render, Encode time.Duration
}

// MIME is the frame's media type.
func (f *Frame) MIME() string {
	if f.Format == "png" {
		return "image/png"
	}
	return "image/jpeg"
}

// latentBuf is a host-owned arena region holding a copy of a published
// latent.
type latentBuf struct {
	region *pluginv1.Region
	mem    []byte
}

// pendingLatent is the newest unrendered latent of a job.
type pendingLatent struct {
	buf          int // index into previewer.bufs
	step, total  int
	dtype        pluginv1.DType
	shape        []int64
	nbytes       uint64
	family       string
	layout       string
	gridH, gridW int
	published    time.Time
}

// previewer renders one job's latents. Latents are copied on publish into
// one of two host-owned buffers: the one the preview plugin is reading
// (inflight) is never written; the other holds the newest pending latent
// and is overwritten by a newer one, which drops the older.
//
// Why a copy rather than a lease on the pipeline's region: the arena has
// no shared leases, a pipeline frees or rewrites its step buffers as soon
// as Publish returns (the reference pipeline keeps two), and a 1024² FLUX
// latent is 1 MiB, a memcpy of well under a millisecond. The copy makes
// the pipeline's buffer its own again the moment Publish returns, and the
// preview plugin reads a region nobody writes. The buffers are freed when
// the render loop exits; a render cut by RenderTimeout may still be
// reading when its buffer is reused, which can tear that one frame but
// never fault (the plugin maps whole segments).
type previewer struct {
	job  *Job
	set  api.PreviewSpec
	wake chan struct{}

	mu        sync.Mutex
	bufs      [2]*latentBuf
	pending   *pendingLatent
	inflight  int // buffer index being rendered, -1 none
	lastTaken time.Time
	stopping  bool
	flush     bool
	started   bool          // loop was started (set by the job before it runs)
	exited    chan struct{} // closed when the loop has exited
	frame     *Frame
	frameSeq  uint64
	lastErr   string
}

func (p *previewer) info(pi *api.PreviewInfo) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.frame != nil {
		pi.Frame, pi.FrameStep, pi.Generation = p.frame.ID, p.frame.Step, p.frame.Generation
	}
	pi.LastError = p.lastErr
}

// Frame returns the job's newest frame, or nil.
func (j *Job) Frame() *Frame {
	if j.pv == nil {
		return nil
	}
	j.pv.mu.Lock()
	defer j.pv.mu.Unlock()
	return j.pv.frame
}

// Publish receives what a plugin publishes through the Host service. Only
// the job's own pipeline may publish to it. Topics: "latent" (step, total
// and tensor #0, the latent; payload {arch, layout, grid_h, grid_w}
// optional) and "progress" (step, total). It never waits for a render: it
// copies the latent (a memcpy) and returns.
func (m *Manager) Publish(_ context.Context, from plugin.Source, req *pluginv1.PublishRequest) (bool, error) {
	m.mu.Lock()
	j, ok := m.jobs[req.GetJobId()]
	m.mu.Unlock()
	if !ok || j.spec.Pipeline != from.Plugin {
		return false, nil
	}
	switch req.GetTopic() {
	case previewwire.TopicProgress:
		j.progress(int(req.GetStep()), int(req.GetTotal()))
		return true, nil
	case previewwire.TopicLatent:
	default:
		return false, nil
	}
	if j.State() != api.JobRunning {
		return false, nil
	}
	j.published.Add(1)
	j.progress(int(req.GetStep()), int(req.GetTotal()))
	if j.pv == nil {
		j.dropped.Add(1)
		return true, nil
	}
	if err := j.pv.offer(req); err != nil {
		j.dropped.Add(1)
		j.pv.mu.Lock()
		j.pv.lastErr = err.Error()
		j.pv.mu.Unlock()
		m.log.Warn("preview latent dropped", "job", j.id, "step", req.GetStep(), "err", err)
	}
	return true, nil
}

// offer copies a published latent into the job's pending buffer. A latent
// that the throttle skips or a newer one supersedes is counted dropped.
func (p *previewer) offer(req *pluginv1.PublishRequest) error {
	j := p.job
	step, total := int(req.GetStep()), int(req.GetTotal())
	last := total > 0 && step >= total
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopping {
		j.dropped.Add(1)
		return nil
	}
	if !last {
		if n := p.set.EveryN; n > 1 && step%n != 0 {
			j.dropped.Add(1)
			return nil
		}
		if iv := time.Duration(p.set.MinIntervalMS) * time.Millisecond; iv > 0 && !p.lastTaken.IsZero() && now.Sub(p.lastTaken) < iv {
			j.dropped.Add(1)
			return nil
		}
	}
	if len(req.GetTensors()) == 0 {
		return fmt.Errorf("latent step %d: no tensor", step)
	}
	d := req.GetTensors()[0]
	if !previewwire.LatentDType(d.GetDtype()) {
		return fmt.Errorf("latent %q: dtype %v (want F32, F16 or BF16)", d.GetName(), d.GetDtype())
	}
	n, err := tensor.NBytes(d.GetDtype(), d.GetShape())
	if err != nil || n == 0 {
		return fmt.Errorf("latent %q: shape %v: %v", d.GetName(), d.GetShape(), cmp.Or(err, errors.New("empty")))
	}
	var pl previewwire.LatentPayload
	if len(req.GetPayload()) > 0 {
		if err := msgpack.Unmarshal(req.GetPayload(), &pl); err != nil {
			return fmt.Errorf("latent %q: payload: %w", d.GetName(), err)
		}
	}
	if have := d.GetRegion().GetLength(); have < n {
		return fmt.Errorf("latent %q: shape %v %v needs %d bytes, region holds %d", d.GetName(), d.GetShape(), d.GetDtype(), n, have)
	}
	target := 0
	switch {
	case p.inflight >= 0:
		target = 1 - p.inflight
	case p.pending != nil:
		target = p.pending.buf
	}
	b := p.bufs[target]
	if b == nil || uint64(len(b.mem)) != n {
		if b != nil {
			_ = j.m.cfg.Memory.Free(b.region)
			p.bufs[target] = nil
		}
		r, mem, err := j.m.cfg.Memory.Alloc(fmt.Sprintf("job/%s/latent-copy-%d", j.id, target), n)
		if err != nil {
			return fmt.Errorf("latent %q: host copy: %w", d.GetName(), err)
		}
		b = &latentBuf{region: r, mem: mem[:n]}
		p.bufs[target] = b
	}
	if err := j.m.cfg.Memory.Read(d.GetRegion(), b.mem); err != nil {
		if p.pending != nil && p.pending.buf == target {
			// The buffer may be half overwritten: its latent is lost.
			p.pending = nil
			j.dropped.Add(1)
		}
		return fmt.Errorf("latent %q: %w", d.GetName(), err)
	}
	if p.pending != nil {
		j.dropped.Add(1) // superseded before it was rendered
	}
	fam := cmp.Or(p.set.Family, pl.RenderFamily())
	layout := pl.RenderLayout()
	p.pending = &pendingLatent{buf: target, step: step, total: total, dtype: d.GetDtype(), shape: append([]int64(nil), d.GetShape()...),
		nbytes: n, family: fam, layout: layout, gridH: pl.GridH, gridW: pl.GridW, published: now}
	p.lastTaken = now
	select {
	case p.wake <- struct{}{}:
	default:
	}
	return nil
}

// start runs the render loop.
func (p *previewer) start() {
	p.mu.Lock()
	p.started = true
	p.mu.Unlock()
	go p.loop()
}

// loop renders pending latents until stop.
func (p *previewer) loop() {
	defer close(p.exited)
	defer p.release()
	for {
		p.mu.Lock()
		pl := p.pending
		if pl != nil && (!p.stopping || p.flush) {
			p.pending, p.inflight = nil, pl.buf
		} else if p.stopping {
			p.mu.Unlock()
			return
		}
		p.mu.Unlock()
		if pl == nil {
			<-p.wake
			continue
		}
		p.render(pl)
		p.mu.Lock()
		p.inflight = -1
		p.mu.Unlock()
	}
}

// render renders one latent through the preview plugin.
func (p *previewer) render(pl *pendingLatent) {
	j := p.job
	ps, err := j.m.pluginsOrErr()
	if err != nil {
		p.failed(pl, err)
		return
	}
	b := p.bufs[pl.buf]
	d := &pluginv1.TensorDescriptor{Name: "job/" + j.id + "/latent", Dtype: pl.dtype, Shape: pl.shape, Nbytes: pl.nbytes,
		Access: pluginv1.Access_ACCESS_READ_ONLY, Region: b.region}
	args, err := msgpack.Marshal(previewwire.RenderArgs{Family: pl.family, Layout: pl.layout, GridH: pl.gridH, GridW: pl.gridW,
		MaxSide: p.set.MaxSide, Format: p.set.Format, Quality: p.set.Quality})
	if err != nil {
		p.failed(pl, err)
		return
	}
	ctx, cancel := context.WithTimeout(j.m.ctx, j.m.cfg.RenderTimeout)
	reply, err := ps.Call(ctx, p.set.Plugin, previewwire.MethodPrefix+p.set.Method, args, []*pluginv1.TensorDescriptor{d})
	cancel()
	if err != nil {
		p.failed(pl, err)
		return
	}
	var res previewwire.RenderResult
	if err := msgpack.Unmarshal(reply.Result, &res); err != nil || len(res.Image) == 0 {
		p.failed(pl, fmt.Errorf("render result from %s generation %d: %v (%d image bytes)", p.set.Plugin, reply.Generation, err, len(res.Image)))
		return
	}
	p.mu.Lock()
	p.frameSeq++
	f := &Frame{ID: p.frameSeq, Step: pl.step, Total: pl.total, Plugin: p.set.Plugin, Generation: reply.Generation, Method: p.set.Method,
		Format: res.Format, Width: res.Width, Height: res.Height, Data: res.Image, Published: pl.published, Rendered: time.Now(),
		Render: time.Duration(res.RenderMS * float64(time.Millisecond)), Encode: time.Duration(res.EncodeMS * float64(time.Millisecond))}
	p.frame = f
	p.lastErr = ""
	p.mu.Unlock()
	j.rendered.Add(1)
	j.m.broadcast(Event{Type: api.EventFrame, Job: j.Snapshot(), Frame: f})
}

func (p *previewer) failed(pl *pendingLatent, err error) {
	p.job.dropped.Add(1)
	p.mu.Lock()
	p.lastErr = fmt.Sprintf("step %d: %v", pl.step, err)
	p.mu.Unlock()
	p.job.m.log.Warn("preview render failed", "job", p.job.id, "step", pl.step, "err", err)
}

// stop ends the loop: with flush, the pending latent is rendered first
// (waiting at most bound); without, it is dropped. The loop frees the
// buffers when it exits; stop returns when it has, or after bound.
func (p *previewer) stop(flush bool, bound time.Duration) {
	p.mu.Lock()
	p.stopping, p.flush = true, flush
	started := p.started
	if !flush && p.pending != nil {
		p.pending = nil
		p.job.dropped.Add(1)
	}
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
	if !started {
		p.release()
		return
	}
	t := time.NewTimer(bound)
	defer t.Stop()
	select {
	case <-p.exited:
	case <-t.C:
		p.job.m.log.Warn("preview flush timed out; the last frame may come late", "job", p.job.id, "bound", bound)
	}
}

// release frees the buffers and counts a latent left pending as dropped.
func (p *previewer) release() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pending != nil {
		p.pending = nil
		p.job.dropped.Add(1)
	}
	for i, b := range p.bufs {
		if b != nil {
			if err := p.job.m.cfg.Memory.Free(b.region); err != nil {
				p.job.m.log.Warn("free preview buffer", "job", p.job.id, "err", err)
			}
			p.bufs[i] = nil
		}
	}
}

// msgpackParams encodes a job's parameters with "job_id" set. JSON numbers
// that are whole become msgpack integers (pipelines check "steps" is an
// int).
func msgpackParams(params map[string]any, id string) ([]byte, error) {
	out := make(map[string]any, len(params)+1)
	for k, v := range params {
		out[k] = intify(v)
	}
	out["job_id"] = id
	return msgpack.Marshal(out)
}

func intify(v any) any {
	switch x := v.(type) {
	case float64:
		if x == math.Trunc(x) && math.Abs(x) < 1<<53 {
			return int64(x)
		}
	case json.Number:
		if i, err := x.Int64(); err == nil {
			return i
		}
		if f, err := x.Float64(); err == nil {
			return f
		}
	case map[string]any:
		m := make(map[string]any, len(x))
		for k, e := range x {
			m[k] = intify(e)
		}
		return m
	case []any:
		s := make([]any, len(x))
		for i, e := range x {
			s[i] = intify(e)
		}
		return s
	}
	return v
}

// unmarshalResult decodes a msgpack result into JSON-friendly values (maps
// with string keys).
func unmarshalResult(b []byte, v *any) error {
	if len(b) == 0 {
		return nil
	}
	dec := msgpack.NewDecoder(bytes.NewReader(b))
	dec.SetMapDecoder(func(d *msgpack.Decoder) (any, error) { return d.DecodeUntypedMap() })
	var raw any
	if err := dec.Decode(&raw); err != nil {
		return err
	}
	*v = jsonable(raw)
	return nil
}

func jsonable(v any) any {
	switch x := v.(type) {
	case map[any]any:
		m := make(map[string]any, len(x))
		for k, e := range x {
			m[fmt.Sprint(k)] = jsonable(e)
		}
		return m
	case map[string]any:
		for k, e := range x {
			x[k] = jsonable(e)
		}
		return x
	case []any:
		for i, e := range x {
			x[i] = jsonable(e)
		}
		return x
	case []byte:
		return x // encoding/json writes it as base64 (a pipeline's PNGs)
	case float64:
		if math.IsNaN(x) || math.IsInf(x, 0) {
			return nil
		}
	case float32:
		if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
			return nil
		}
	}
	return v
}
