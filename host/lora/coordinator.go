// Package lora owns the host's side of LoRA application: the coordinator
// that validates an apply, calls the lora-nf4 plugin with the model's
// descriptors, binds the side factors it returns to the model's weights in
// one atomic swap (registry.Bindings), and, for fuse mode, journals each
// weight's original packed bytes and absmax in host-owned arena regions
// before the plugin rewrites it under the model's write lock, so remove
// and every failure (a bad file, a full arena, a plugin killed mid-apply)
// restore the bytes exactly. Applies are serialized per model and all or
// nothing. It also holds the NF4 codec the offline merge uses.
//
// Two packages are named lora. This one is the host's coordinator (state,
// journal, rollback, bindings); it never parses a LoRA file. shared/lora
// owns the LoRA files and the merge math (formats, key mapping, side
// factors, the fused pass), which the lora-nf4 plugin runs; its
// subpackage lorawire is the call contract between the two. Import this
// one as lora inside host/ and shared/lora as slora.
package lora

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/vmihailenco/msgpack/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/plugin"
	"github.com/arenahost/arenahost/host/registry"
	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/layout"
	slora "github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/lora/lorawire"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// Errors an apply returns, wrapped with the step, the LoRA file and key.
var (
	// ErrBadLoRA: a LoRA file or the request is wrong (truncated file,
	// shape mismatch, NaN, unmatched key under strict…).
	ErrBadLoRA = errors.New("bad LoRA")
	// ErrUnsupported: the request is valid but cannot be applied this way
	// (mixed quant types in one fuse, a bias delta).
	ErrUnsupported = errors.New("unsupported")
)

// MaxStrength bounds a LoRA strength's magnitude: beyond a few units a
// LoRA only saturates the model, and huge strengths (1e308) overflow the
// merged weights.
const MaxStrength = 100

// Plugins calls plugin methods; *plugin.Manager satisfies it.
type Plugins interface {
	Call(ctx context.Context, name, method string, args []byte, tensors []*pluginv1.TensorDescriptor) (*plugin.Reply, error)
}

// Memory is what the coordinator needs from the arena; *arena.Arena
// satisfies it. The journal and the factor copies move bytes region to
// region with Copy, and the file journal reads and writes them with Read
// and Write, which all work on every backend (a device-to-device copy and
// a sync, a download, an upload on a device arena), so nothing here needs
// to map the memory.
type Memory interface {
	Alloc(owner arena.Owner, name string, n uint64) (arena.Region, error)
	Free(r arena.Region) error
	Copy(dst, src arena.Region) error
	Read(r arena.Region, off uint64, p []byte) error
	Write(ctx context.Context, r arena.Region, off uint64, p []byte) error
	WriteFrom(ctx context.Context, r arena.Region, off uint64, src io.ReaderAt, srcOff, n int64) error
	Transfer(r arena.Region, to arena.Owner) (arena.Region, error)
	Location(r arena.Region) (arena.Location, error)
}

// Request is an apply, as the coordinator takes it (the HTTP body is
// sdk/api's ApplyRequest; the route confines each LoRA's path first).
type Request struct {
	Model  string // "" is the default model
	LoRAs  []api.AppliedLoRA
	Mode   string // side (default) or fuse
	Strict bool
	// TileElems bounds the fused pass's tile (0: shared/lora's default).
	TileElems int
	// FactorDType is the side factors' storage dtype, lorawire.FactorF32
	// or lorawire.FactorBF16; "": the dtype bound now when the model holds
	// a side set, else the coordinator's FactorDType.
	FactorDType string
}

// Coordinator applies LoRA sets to the registry's models through the
// plugin. All methods are safe for concurrent use; applies to one model
// are serialized.
type Coordinator struct {
	// Plugin is the plugin to call (PluginName by default).
	Plugin string
	// JournalMemory bounds the host memory the fuse journals keep copies
	// of original bytes in, so that a restore need not read the model file
	// (journalmem.go): JournalMemoryAuto (New's default), 0 for none, or
	// a byte budget. Set it before the first apply.
	JournalMemory int64
	// JournalArena is a byte budget of arena (device memory on a device
	// arena) the fuse journals may keep their copies in instead, restored
	// with a device-to-device copy (journalmem.go); 0, the default, keeps
	// none there.
	JournalArena int64
	// FactorDType is the side factors' dtype for requests that name none
	// on a model that holds no side set ("" is lorawire.FactorF32): BF16
	// halves their memory and upload and changes no bit of a forward that
	// computes in bfloat16.
	FactorDType string

	reg      *registry.Registry
	bindings *registry.Bindings
	mem      Memory
	plugins  Plugins
	log      *slog.Logger

	mu     sync.Mutex
	models map[string]*modelState

	memMu     sync.Mutex
	memHeld   int64 // bytes of the journals' in-memory copies
	arenaHeld int64 // bytes of the journals' arena copies of referenced weights
}

type modelState struct {
	loaded  *registry.Model // the registry's model this state is about
	mu      sync.Mutex
	state   api.LoRAState
	journal map[string]journalEntry // by weight key
	filling bool                    // a fillCopies goroutine runs (journalmem.go)
}

// New returns a coordinator over the registry's models, the factor
// bindings, the arena and the plugin manager.
func New(reg *registry.Registry, b *registry.Bindings, mem Memory, plugins Plugins, log *slog.Logger) *Coordinator {
	if log == nil {
		log = slog.Default()
	}
	return &Coordinator{Plugin: PluginName, JournalMemory: JournalMemoryAuto, reg: reg, bindings: b, mem: mem, plugins: plugins, log: log, models: map[string]*modelState{}}
}

// DefaultModel is the model an empty name means.
const DefaultModel = "sample"

func modelName(m string) string {
	if m == "" {
		return DefaultModel
	}
	return m
}

func (c *Coordinator) model(name string) (*modelState, error) {
	rm, ok := c.reg.Model(name)
	if !ok {
		return nil, fmt.Errorf("model %q: %w", name, registry.ErrNotFound)
	}
	c.mu.Lock()
	ms := c.models[name]
	if ms != nil && ms.loaded != rm {
		// The model was unloaded and loaded again: what was applied to the
		// old one (its journal, its factors) does not describe this one.
		delete(c.models, name)
		c.mu.Unlock()
		c.forget(name, ms)
		c.mu.Lock()
		ms = c.models[name]
	}
	if ms == nil {
		ms = &modelState{loaded: rm, state: api.LoRAState{Model: name}, journal: map[string]journalEntry{}}
		c.models[name] = ms
	}
	c.mu.Unlock()
	return ms, nil
}

// State returns what model holds now.
func (c *Coordinator) State(model string) (api.LoRAState, error) {
	ms, err := c.model(modelName(model))
	if err != nil {
		return api.LoRAState{}, err
	}
	ms.mu.Lock()
	defer ms.mu.Unlock()
	return cloneState(ms.state), nil
}

func cloneState(s api.LoRAState) api.LoRAState {
	s.LoRAs = slices.Clone(s.LoRAs)
	s.Fused = slices.Clone(s.Fused)
	if s.LoRAs == nil {
		s.LoRAs = []api.AppliedLoRA{}
	}
	return s
}

func (c *Coordinator) call(ctx context.Context, method string, args any, tensors []*pluginv1.TensorDescriptor, out any) (*plugin.Reply, error) {
	raw, err := msgpack.Marshal(args)
	if err != nil {
		return nil, fmt.Errorf("encode %s arguments: %w", method, err)
	}
	rep, err := c.plugins.Call(ctx, c.Plugin, method, raw, tensors)
	if err != nil {
		return nil, classify(err)
	}
	if out != nil {
		if err := msgpack.Unmarshal(rep.Result, out); err != nil {
			return rep, fmt.Errorf("decode %s.%s result: %w", c.Plugin, method, err)
		}
	}
	return rep, nil
}

// classify maps the plugin's gRPC codes to the package's errors.
func classify(err error) error {
	switch status.Code(err) {
	case codes.InvalidArgument:
		return fmt.Errorf("%w: %w", ErrBadLoRA, err)
	case codes.FailedPrecondition:
		return fmt.Errorf("%w: %w", ErrUnsupported, err)
	case codes.ResourceExhausted:
		return fmt.Errorf("%w: %w", arena.ErrCapacity, err)
	}
	return err
}

func sameSet(a, b []api.AppliedLoRA) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Path != b[i].Path {
			return false
		}
	}
	return true
}

func sameStrengths(a, b []api.AppliedLoRA) bool {
	for i := range a {
		if a[i].Strength != b[i].Strength {
			return false
		}
	}
	return true
}

// Apply applies req's set to its model, replacing what it held. It is all
// or nothing: on any error the model's bytes and bindings are exactly as
// before. An empty set removes. The same set with the same strengths,
// mode and strict flag is a no-op.
func (c *Coordinator) Apply(ctx context.Context, req Request) (*api.LoRAResult, error) {
	start := time.Now()
	req.Model = modelName(req.Model)
	if req.Mode == "" {
		req.Mode = ModeSide
	}
	if req.Mode != ModeSide && req.Mode != ModeFuse {
		return nil, fmt.Errorf("apply: mode %q: want side or fuse: %w", req.Mode, ErrBadLoRA)
	}
	if req.FactorDType != "" {
		fdt, err := lorawire.CheckFactorDType(req.FactorDType)
		if err != nil {
			return nil, fmt.Errorf("apply: %w: %w", err, ErrBadLoRA)
		}
		req.FactorDType = fdt
	}
	for _, e := range req.LoRAs {
		if math.IsNaN(e.Strength) || math.IsInf(e.Strength, 0) || math.Abs(e.Strength) > MaxStrength {
			return nil, fmt.Errorf("apply: lora %s: strength %v: want a finite number in [-%d, %d]: %w", e.Path, e.Strength, MaxStrength, MaxStrength, ErrBadLoRA)
		}
	}
	ms, err := c.model(req.Model)
	if err != nil {
		return nil, fmt.Errorf("apply: %w", err)
	}
	ms.mu.Lock()
	defer ms.mu.Unlock()
	switch {
	case req.Mode == ModeFuse:
		req.FactorDType = "" // fused sets bind no factors
	case req.FactorDType != "":
	case ms.state.Mode == ModeSide:
		// A request that names no dtype (the A1111 and ComfyUI routes
		// never do) keeps the one bound: a bf16 set stays bf16 through
		// their strength changes and no-ops.
		req.FactorDType = ms.state.FactorDType
	default:
		fdt, err := lorawire.CheckFactorDType(c.FactorDType)
		if err != nil {
			return nil, fmt.Errorf("apply: the host's %w: %w", err, ErrBadLoRA)
		}
		req.FactorDType = fdt
	}
	if len(req.LoRAs) == 0 {
		return c.remove(ctx, ms, start)
	}
	cur := ms.state
	res := &api.LoRAResult{}
	switch {
	case cur.Mode == req.Mode && cur.Strict == req.Strict && cur.FactorDType == req.FactorDType && sameSet(cur.LoRAs, req.LoRAs) && sameStrengths(cur.LoRAs, req.LoRAs):
		res.NoOp, res.Path = true, "noop"
	case req.Mode == ModeSide && cur.Mode == ModeSide && cur.Strict == req.Strict && cur.FactorDType == req.FactorDType && sameSet(cur.LoRAs, req.LoRAs):
		err = c.setStrengths(ctx, ms, req)
		res.Path = "set_strengths"
		if errors.Is(err, ErrUnsupported) {
			// The plugin lost its plan (restart): build the set again.
			c.log.Info("lora: plugin holds no plan; applying the set again", "model", req.Model, "err", err)
			err = c.applySide(ctx, ms, req)
			res.Path = "apply"
		}
	case req.Mode == ModeSide:
		err, res.Path = c.applySide(ctx, ms, req), "apply"
	default:
		err, res.Path = c.applyFuse(ctx, ms, req), "apply"
	}
	if err != nil {
		return nil, err
	}
	res.LoRAState = cloneState(ms.state)
	res.Elapsed = time.Since(start)
	c.log.Info("lora applied", "model", req.Model, "mode", req.Mode, "loras", len(req.LoRAs), "path", res.Path, "took", res.Elapsed.Round(time.Microsecond))
	return res, nil
}

func specs(es []api.AppliedLoRA) []lorawire.LoRASpec {
	out := make([]lorawire.LoRASpec, len(es))
	for i, e := range es {
		out[i] = lorawire.LoRASpec{Path: e.Path, Strength: e.Strength}
	}
	return out
}

// factorDescriptors returns read-write descriptors of a model's bound
// factors.
func (c *Coordinator) factorDescriptors(model string, fs []registry.Factors) ([]*pluginv1.TensorDescriptor, error) {
	var out []*pluginv1.TensorDescriptor
	for _, f := range fs {
		ts, err := f.Tensors(lorawire.FactorA(f.Weight), lorawire.FactorB(f.Weight))
		if err != nil {
			return nil, err
		}
		for _, t := range ts {
			d, err := registry.DescriptorOf(c.mem, model, t, pluginv1.Access_ACCESS_READ_WRITE)
			if err != nil {
				return nil, fmt.Errorf("factors of %s: %w", f.Weight, err)
			}
			out = append(out, d)
		}
	}
	return out, nil
}

// setStrengths rewrites the changed LoRAs' columns in copies of the bound
// factors and swaps the copies in: readers never see a half-written B_cat,
// and a failed call leaves the binding as it was.
func (c *Coordinator) setStrengths(ctx context.Context, ms *modelState, req Request) error {
	_, fs := c.bindings.Current(req.Model)
	var fresh []registry.Factors
	var allocated []arena.Region
	fail := func(err error) error {
		for _, r := range allocated {
			_ = c.mem.Free(r)
		}
		return fmt.Errorf("set strengths: %w", err)
	}
	for _, f := range fs {
		nf := f
		for i, r := range []arena.Region{f.A, f.B} {
			nr, err := c.mem.Alloc(arena.HostOwner, "lora factors "+f.Weight, r.Length)
			if err != nil {
				return fail(fmt.Errorf("copy factors of %s: %w", f.Weight, err))
			}
			allocated = append(allocated, nr)
			if err := c.mem.Copy(nr, r); err != nil {
				return fail(fmt.Errorf("copy factors of %s: %w", f.Weight, err))
			}
			if i == 0 {
				nf.A = nr
			} else {
				nf.B = nr
			}
		}
		fresh = append(fresh, nf)
	}
	ds, err := c.factorDescriptors(req.Model, fresh)
	if err != nil {
		return fail(err)
	}
	strengths := make([]float64, len(req.LoRAs))
	for i, e := range req.LoRAs {
		strengths[i] = e.Strength
	}
	var out lorawire.SetStrengthsResult
	if _, err := c.call(ctx, "set_strengths", lorawire.SetStrengthsArgs{Model: req.Model, Strengths: strengths}, ds, &out); err != nil {
		return fail(err)
	}
	gen, err := c.bindings.Swap(req.Model, fresh)
	if err != nil {
		return fail(err)
	}
	ms.state.LoRAs = slices.Clone(req.LoRAs)
	ms.state.BindingGeneration = gen
	ms.state.Report = out.Report
	return nil
}

func (c *Coordinator) applySide(ctx context.Context, ms *modelState, req Request) error {
	var out lorawire.ApplyResult
	rep, err := c.call(ctx, "apply", lorawire.ApplyArgs{Model: req.Model, LoRAs: specs(req.LoRAs), Mode: ModeSide, Strict: req.Strict,
		FactorDType: req.FactorDType}, nil, &out)
	var returned []arena.Region
	if rep != nil {
		for _, d := range rep.Tensors {
			if r, err := arena.RegionFromProto(d.GetRegion()); err == nil {
				returned = append(returned, r)
			}
		}
	}
	// Until the swap, every region the plugin returned is freed on error.
	owned := map[arena.Region]bool{}
	fail := func(err error) error {
		for _, r := range returned {
			if !owned[r] {
				_ = c.mem.Free(r)
			}
		}
		for r := range owned {
			_ = c.mem.Free(r)
		}
		return err
	}
	if err != nil {
		return fail(fmt.Errorf("apply side: %w", err))
	}
	byName := map[string]*pluginv1.TensorDescriptor{}
	for _, d := range rep.Tensors {
		byName[d.GetName()] = d
	}
	var layers []registry.Factors
	for _, f := range out.Factors {
		da, db := byName[f.A], byName[f.B]
		if da == nil || db == nil {
			return fail(fmt.Errorf("apply side: weight %s: the plugin returned no tensors %s and %s", f.Weight, f.A, f.B))
		}
		if _, ok := ms.weight(c.reg, req.Model, f.Weight); !ok && !sideOnlyWeight(c.reg, req.Model, f.Weight, f.Out, f.In) {
			return fail(fmt.Errorf("apply side: the plugin bound factors to %s, which model %q has no 4-bit weight (or plain text-encoder weight) for", f.Weight, req.Model))
		}
		// The plugin must have stored what was asked, in descriptors that
		// say so (a forward reads them by their dtype).
		fdt, want := safetensors.F32, pluginv1.DType_DTYPE_F32
		if req.FactorDType == lorawire.FactorBF16 {
			fdt, want = safetensors.BF16, pluginv1.DType_DTYPE_BF16
		}
		if got, _ := lorawire.CheckFactorDType(f.DType); got != req.FactorDType || da.GetDtype() != want || db.GetDtype() != want {
			return fail(fmt.Errorf("apply side: weight %s: the plugin returned factors of dtype %q (%v, %v), %q was asked",
				f.Weight, f.DType, da.GetDtype(), db.GetDtype(), req.FactorDType))
		}
		fa, fb := registry.Factors{Weight: f.Weight, Rank: f.Rank, Out: f.Out, In: f.In, DType: fdt}, [2]arena.Region{}
		for i, d := range []*pluginv1.TensorDescriptor{da, db} {
			r, err := arena.RegionFromProto(d.GetRegion())
			if err != nil {
				return fail(fmt.Errorf("apply side: weight %s: factor %s: %w", f.Weight, d.GetName(), err))
			}
			nr, err := c.mem.Transfer(r, arena.HostOwner)
			if err != nil {
				return fail(fmt.Errorf("apply side: weight %s: take over factor region: %w", f.Weight, err))
			}
			owned[nr] = true
			for k, x := range returned {
				if x == r {
					returned[k] = nr
				}
			}
			fb[i] = nr
		}
		fa.A, fa.B = fb[0], fb[1]
		layers = append(layers, fa)
	}
	// Past this point nothing fails: restore a fused model, then swap.
	if ms.state.Mode == ModeFuse {
		if err := c.restoreAll(ms); err != nil {
			return fail(fmt.Errorf("apply side: restore fused weights: %w", err))
		}
	}
	gen, err := c.bindings.Swap(req.Model, layers)
	if err != nil {
		return fail(fmt.Errorf("apply side: %w", err))
	}
	ms.state = api.LoRAState{Model: req.Model, Mode: ModeSide, LoRAs: slices.Clone(req.LoRAs), Strict: req.Strict, FactorDType: req.FactorDType,
		BindingGeneration: gen, Report: out.Report}
	return nil
}

// sideOnlyWeight reports whether w is a plain (not 4-bit) [out, in] weight
// of a bundled text encoder of model (denseWeight): side factors may be
// bound to it (the forward reads the weight as it is).
func sideOnlyWeight(reg *registry.Registry, model, w string, out, in int) bool {
	m, ok := reg.Model(model)
	if !ok {
		return false
	}
	t, ok := denseWeight(m, w)
	return ok && t.Shape[0] == int64(out) && t.Shape[1] == int64(in)
}

// denseWeight returns w if it is a plain 2-D weight of a bundled text
// encoder of m (text_encoders.clip_l./t5xxl. …, stored F32, F16, BF16,
// F8_E4M3 or F8_E5M2): side factors bind to it, and a fuse rewrites it in
// place, journaled like a 4-bit weight's tensors.
func denseWeight(m *registry.Model, w string) (*registry.Tensor, bool) {
	t, ok := m.Tensor(w)
	if !ok || t.Quant != nil || t.QuantOf != "" || len(t.Shape) != 2 || !slora.DenseFusable(string(t.DType)) {
		return nil, false
	}
	c, _, ok := layout.ComponentOf(w)
	if !ok || (c.Kind != "te1" && c.Kind != "te2" && c.Kind != "t5") {
		return nil, false
	}
	return t, true
}

func (ms *modelState) weight(reg *registry.Registry, model, w string) (*registry.QuantWeight, bool) {
	m, ok := reg.Model(model)
	if !ok {
		return nil, false
	}
	return m.Weight(w)
}

func (c *Coordinator) applyFuse(ctx context.Context, ms *modelState, req Request) error {
	args := lorawire.ApplyArgs{Model: req.Model, LoRAs: specs(req.LoRAs), Mode: ModeFuse, Strict: req.Strict, TileElems: req.TileElems}
	var plan lorawire.PlanResult
	tPlan := time.Now()
	if _, err := c.call(ctx, "plan", args, nil, &plan); err != nil {
		return fmt.Errorf("apply fuse: %w", err)
	}
	phases := []slora.Phase{{Name: "host: plan call (the plugin parses and maps the set)", Elapsed: time.Since(tPlan)}}
	var out lorawire.ApplyResult
	err := c.reg.WriteLocked(req.Model, func(m *registry.Model) error {
		tJournal := time.Now()
		// 1. Journal the weights fused for the first time.
		fresh := map[string]journalEntry{}
		release := func() {
			for _, e := range fresh {
				c.freeEntry(e)
			}
		}
		for _, w := range plan.Weights {
			if _, ok := ms.journal[w]; ok {
				continue
			}
			e, err := c.journal(m, w)
			if err != nil {
				release()
				return fmt.Errorf("apply fuse: journal: %w", err)
			}
			fresh[w] = e
		}
		// 2. Put the weights fused already back to their originals: the
		// plugin fuses from the bytes it is given, and weights the set no
		// longer touches stay restored. File references are checked
		// before anything is written, so a changed file fails here with
		// the model as it was.
		if err := c.verifyAll(m, ms.journal); err != nil {
			release()
			return fmt.Errorf("apply fuse: restore fused weights: %w", err)
		}
		if err := c.putBackAll(m, ms.journal); err != nil {
			release()
			return fmt.Errorf("apply fuse: restore fused weights: %w; the fused weights may be partly restored: remove the LoRAs (DELETE /v1/loras) or reload the model", err)
		}
		// 3. The plugin rewrites the set's weights through read-write
		// descriptors.
		phases = append(phases, slora.Phase{Name: "host: journal and restore", Elapsed: time.Since(tJournal)})
		tApply := time.Now()
		ds, err := c.fuseDescriptors(m, plan.Weights)
		if err == nil {
			_, err = c.call(ctx, "apply", args, ds, &out)
		}
		if err == nil && out.Report != nil {
			out.Report.Phases = append(append(phases, out.Report.Phases...), slora.Phase{Name: "host: apply call (the plugin's phases above)", Elapsed: time.Since(tApply)})
		}
		if err != nil {
			// 4. Roll back to what the model held: the plugin may have
			// died anywhere in the pass, and leaves what it wrote to the
			// host. A cancelled call returns before the pass stops, so
			// wait for it first.
			c.fence(ctx, req.Model)
			var rerr []error
			for w, e := range fresh {
				rerr = append(rerr, c.putBack(m, w, e))
			}
			release()
			if len(ms.journal) > 0 {
				rerr = append(rerr, c.reFuse(ctx, m, ms))
			}
			if re := errors.Join(rerr...); re != nil {
				return fmt.Errorf("apply fuse: %w (and rollback: %v)", err, re)
			}
			return fmt.Errorf("apply fuse: %w", err)
		}
		for w, e := range fresh {
			ms.journal[w] = e
		}
		// Weights the set no longer touches were restored in step 2.
		fused := map[string]bool{}
		for _, w := range out.Fused {
			fused[w] = true
		}
		for w, e := range ms.journal {
			if !fused[w] {
				c.freeEntry(e)
				delete(ms.journal, w)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	if ms.state.Mode == ModeSide {
		if _, err := c.bindings.Swap(req.Model, nil); err != nil {
			c.log.Warn("lora: free side factors after fuse", "model", req.Model, "err", err)
		}
		if _, err := c.call(ctx, "remove", lorawire.RemoveArgs{Model: req.Model}, nil, nil); err != nil {
			c.log.Warn("lora: drop side plan", "model", req.Model, "err", err)
		}
	}
	fusedList := slices.Clone(out.Fused)
	sort.Strings(fusedList)
	inArena, inFile, inMemory := journalBytes(ms)
	ms.state = api.LoRAState{Model: req.Model, Mode: ModeFuse, LoRAs: slices.Clone(req.LoRAs), Strict: req.Strict, Fused: fusedList,
		JournalBytes: inArena, JournalFileBytes: inFile, JournalMemoryBytes: inMemory, Report: out.Report}
	c.log.Info("lora fuse journal", "model", req.Model, "weights", len(ms.journal),
		"arena", arena.ByteSize(inArena), "referenced_in_file", arena.ByteSize(inFile), "copied_in_host_memory", arena.ByteSize(inMemory))
	c.startFill(ms, req.Model)
	return nil
}

// reFuseTimeout bounds a rollback's fused pass of the previous set, and
// reFuseWait how long it waits for a crashed plugin to serve again.
const (
	reFuseTimeout = 5 * time.Minute
	reFuseWait    = 30 * time.Second
)

// reFuse (re-fuse) is the rollback of a failed fuse over a fused model: it puts the
// previous set's weights back to their originals (the failed pass may have
// written them) and fuses the previous set into them again. The fused pass
// is deterministic, so that is byte for byte what they held, and no copy
// of the fused weights is kept for the length of every re-apply (on a
// device, that copy would be as large as the fused layers). If the pass
// fails again, the weights get their originals back, the journal is freed
// and the model holds no LoRA; the error says so.
func (c *Coordinator) reFuse(ctx context.Context, m *registry.Model, ms *modelState) error {
	prev := ms.state
	weights := slices.Sorted(maps.Keys(ms.journal))
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), reFuseTimeout)
	defer cancel()
	args := lorawire.ApplyArgs{Model: prev.Model, LoRAs: specs(prev.LoRAs), Mode: ModeFuse, Strict: prev.Strict}
	ds, err := c.fuseDescriptors(m, weights)
	var out lorawire.ApplyResult
	// The failure may have been the plugin dying: the manager restarts
	// it after a backoff, so wait for it to serve again. Until the
	// manager has seen the death, a call can still reach the dying
	// generation and fail with ErrPluginExited: that is retried too. Every
	// attempt starts from the originals, since a pass that died may have
	// written some weights.
	wait := time.Now().Add(reFuseWait)
	for delay := 50 * time.Millisecond; err == nil; delay = min(2*delay, time.Second) {
		if err = c.putBackAll(m, ms.journal); err != nil {
			return fmt.Errorf("put back the originals of the previous set's weights: %w", err)
		}
		_, err = c.call(rctx, "apply", args, ds, &out)
		if !(errors.Is(err, plugin.ErrNotServing) || errors.Is(err, plugin.ErrPluginExited)) || time.Now().After(wait) {
			break
		}
		select {
		case <-time.After(delay):
			err = nil
		case <-rctx.Done():
		}
	}
	if err == nil && !slices.Equal(slices.Sorted(slices.Values(out.Fused)), weights) {
		err = fmt.Errorf("it fused %d weights, the previous set had fused %d", len(out.Fused), len(weights))
	}
	if err == nil {
		return nil
	}
	c.fence(rctx, prev.Model)
	if perr := c.putBackAll(m, ms.journal); perr != nil {
		return fmt.Errorf("fuse the previous set again: %w (and put back the originals: %v)", err, perr)
	}
	for w, e := range ms.journal {
		c.freeEntry(e)
		delete(ms.journal, w)
	}
	ms.state = api.LoRAState{Model: prev.Model}
	return fmt.Errorf("fuse the previous set again: %w; the model now holds its original weights and no LoRA", err)
}

// fenceTimeout bounds the wait for a cancelled fused pass to stop: it
// checks its context before every layer.
const fenceTimeout = 2 * time.Minute

// fence waits until no fused pass on model runs in the plugin, so a
// rollback is not overwritten by a pass still writing. A plugin that died
// or restarted writes nothing; that failure is only logged.
func (c *Coordinator) fence(ctx context.Context, model string) {
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fenceTimeout)
	defer cancel()
	if _, err := c.call(fctx, "fence", lorawire.FenceArgs{Model: model}, nil, nil); err != nil {
		c.log.Warn("lora: wait for the failed fused pass to stop", "model", model, "err", err)
	}
}

// fuseDescriptors returns read-write descriptors of the weights to write.
func (c *Coordinator) fuseDescriptors(m *registry.Model, weights []string) ([]*pluginv1.TensorDescriptor, error) {
	names := slices.Clone(weights)
	sort.Strings(names)
	var out []*pluginv1.TensorDescriptor
	for _, w := range names {
		t, ok := denseWeight(m, w)
		if qw, isQ := m.Weight(w); isQ {
			t, ok = qw.Packed, true
		}
		if !ok {
			return nil, fmt.Errorf("the plugin planned weight %s, which model %q has no 4-bit weight (or plain text-encoder weight) for", w, m.Name)
		}
		d, err := registry.DescriptorOf(c.mem, m.Name, t, pluginv1.Access_ACCESS_READ_WRITE)
		if err != nil {
			return nil, fmt.Errorf("weight %s: %w", w, err)
		}
		d.Name = w
		out = append(out, d)
	}
	return out, nil
}

// Remove takes every LoRA off model: side factors are unbound and freed,
// fused weights get their journaled bytes back (byte-exact).
func (c *Coordinator) Remove(ctx context.Context, model string) (*api.LoRAResult, error) {
	start := time.Now()
	ms, err := c.model(modelName(model))
	if err != nil {
		return nil, fmt.Errorf("remove: %w", err)
	}
	ms.mu.Lock()
	defer ms.mu.Unlock()
	return c.remove(ctx, ms, start)
}

func (c *Coordinator) remove(ctx context.Context, ms *modelState, start time.Time) (*api.LoRAResult, error) {
	res := &api.LoRAResult{Path: "remove"}
	switch ms.state.Mode {
	case "":
		res.NoOp, res.Path = true, "noop"
	case ModeSide:
		if _, err := c.bindings.Swap(ms.state.Model, nil); err != nil {
			return nil, fmt.Errorf("remove: free side factors: %w", err)
		}
		if _, err := c.call(ctx, "remove", lorawire.RemoveArgs{Model: ms.state.Model}, nil, nil); err != nil {
			c.log.Warn("lora: drop side plan", "model", ms.state.Model, "err", err)
		}
	case ModeFuse:
		if err := c.restoreAll(ms); err != nil {
			return nil, fmt.Errorf("remove: restore fused weights: %w", err)
		}
	}
	ms.state = api.LoRAState{Model: ms.state.Model}
	res.LoRAState = cloneState(ms.state)
	res.Elapsed = time.Since(start)
	return res, nil
}

// Prepare asks the LoRA plugin to open the device memory model's weights
// lie in, ahead of the first fused apply, and returns how many device
// slabs it holds open (0 for a model in CPU memory). The host calls it
// after loading a model into a device arena.
func (c *Coordinator) Prepare(ctx context.Context, model string) (int, error) {
	var res lorawire.PrepareResult
	if _, err := c.call(ctx, "prepare", lorawire.PrepareArgs{Model: model}, nil, &res); err != nil {
		return 0, fmt.Errorf("prepare model %s: %w", modelName(model), err)
	}
	return res.Slabs, nil
}

// Forget drops what the coordinator holds for a model that is being
// unloaded: its bindings and journal regions (its bytes go with it).
func (c *Coordinator) Forget(model string) {
	c.mu.Lock()
	ms := c.models[model]
	delete(c.models, model)
	c.mu.Unlock()
	if ms != nil {
		c.forget(model, ms)
	}
}

func (c *Coordinator) forget(model string, ms *modelState) {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	if ms.state.Mode == ModeSide {
		_ = c.bindings.Drop(model)
	}
	for w, e := range ms.journal {
		c.freeEntry(e)
		delete(ms.journal, w)
	}
	ms.state = api.LoRAState{Model: model}
}
