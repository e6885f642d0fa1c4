package main

import (
	"context"
	"errors"
	"fmt"
	"github.com/arenahost/arenahost/shared/lora/lorawire"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/arenahost/arenahost/sdk"
	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/nf4"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
)

// EnvLayerDelay, when set to a Go duration, makes the fused pass wait that
// long before each layer: a debugging aid that lets tests kill the plugin
// mid-apply and check the host's rollback.
const EnvLayerDelay = "LORA_NF4_LAYER_DELAY"

// EnvDeviceBatch, when set to a byte count, bounds the device scratch of a
// fused pass on the GPU (default DefaultDeviceBatch): the factors of
// consecutive layers are uploaded together in batches of at most this
// size, or one layer's when a layer alone is larger.
const EnvDeviceBatch = "LORA_NF4_DEVICE_BATCH"

// EnvParseWorkers, when set to a count, bounds how many LoRA files of a
// set are parsed at once, and how many layers' side factors are allocated
// and written at once (default: GOMAXPROCS); 1 does both one after
// another, as before (the benchmark's baseline).
const EnvParseWorkers = "LORA_NF4_PARSE_WORKERS"

// DefaultDeviceBatch: 32 MiB of factors per upload. A Flux-dev pass with
// one rank-16 LoRA (about 1 MB of A_cat and B_cat per layer) then makes
// tens of uploads, each a stream synchronisation, instead of two per
// layer, and stays well inside the 64 MiB of extra device memory a fused
// merge may take beyond its journal.
const DefaultDeviceBatch = 32 << 20

// engine holds the side plans the plugin built, one per model, so that a
// strength change rewrites only the changed LoRA's columns. A plugin
// restart loses them; the host then applies the set again.
type engine struct {
	mu     sync.Mutex
	plans  map[string]*sidePlan
	mapper *tensor.Mapper // read-write views of quant side tensors (fuse)
	delay  time.Duration
	batch  int // device scratch bound (EnvDeviceBatch)
	// parseWorkers bounds the LoRA files parsed at once (EnvParseWorkers).
	parseWorkers int
	gpu          *gpuState // the device, for descriptors on CUDA slabs
	// passes holds one lock per model, held while a fused pass writes the
	// model's weights (fence waits for it).
	passes sync.Map  // model name → *sync.Mutex
	files  fileCache // the last plan's parsed LoRA files, for its apply
}

// pass returns the lock a fused pass on model holds.
func (e *engine) pass(model string) *sync.Mutex {
	mu, _ := e.passes.LoadOrStore(modelName(model), &sync.Mutex{})
	return mu.(*sync.Mutex)
}

// fence returns once no fused pass on the model is running: a cancelled
// apply returns on the host's side before the pass stops at its next
// layer, and the host rolls back only after this.
func (e *engine) fence(ctx context.Context, _ *sdk.Call, args lorawire.FenceArgs) (lorawire.FenceResult, error) {
	mu := e.pass(args.Model)
	done := make(chan struct{})
	go func() {
		mu.Lock()
		mu.Unlock() // nothing to guard: this only waits for the running pass
		close(done)
	}()
	select {
	case <-done:
		return lorawire.FenceResult{}, nil
	case <-ctx.Done():
		return lorawire.FenceResult{}, ctx.Err()
	}
}

type sidePlan struct {
	plan  *lora.Plan
	paths []string
	ranks map[string]int // weight key → bound rank (Σr plus dense rows)
	dtype pluginv1.DType // the factors' storage dtype, F32 or BF16
}

func newEngine() *engine {
	e := &engine{plans: map[string]*sidePlan{}, mapper: tensor.NewMapper(), gpu: &gpuState{}, batch: DefaultDeviceBatch, parseWorkers: runtime.GOMAXPROCS(0)}
	if v := os.Getenv(EnvLayerDelay); v != "" {
		if d, err := time.ParseDuration(v); err == nil {
			e.delay = d
		}
	}
	if v := os.Getenv(EnvParseWorkers); v != "" {
		if n, err := strconv.Atoi(v); err == nil && n > 0 {
			e.parseWorkers = n
		}
	}
	if v := os.Getenv(EnvDeviceBatch); v != "" {
		if n, err := strconv.Atoi(v); err == nil && n > 0 {
			e.batch = n
		}
	}
	return e
}

// Close releases the device, if a call opened one.
func (e *engine) Close() error { return e.gpu.Close() }

func (e *engine) register(p *sdk.Plugin) {
	sdk.Method(p, "inspect", e.inspect, sdk.Doc("report LoRA files' key formats, network types, ranks, alphas and (with a model) their target layers"))
	sdk.Method(p, "plan", e.planMethod, sdk.Doc("map a LoRA set on a model and list the weights an apply would touch (the host journals them before a fuse)"))
	sdk.Method(p, "apply", e.apply, sdk.Doc("apply a LoRA set to a model: side (A_cat/B_cat in new host regions) or fuse (NF4 bytes rewritten in place)"))
	sdk.Method(p, "set_strengths", e.setStrengths, sdk.Doc("change strengths of the side set last applied, rewriting only the changed LoRAs' columns of B_cat"))
	sdk.Method(p, "remove", e.remove, sdk.Doc("forget the side plan held for a model"))
	sdk.Method(p, "prepare", e.prepare, sdk.Doc("open the device memory a model's 4-bit weights lie in, ahead of its first fused apply (the host calls it after a load)"))
	sdk.Method(p, "fence", e.fence, sdk.Doc("return once no fused pass on the model is writing (the host calls it before rolling back a failed fuse)"))
}

func modelName(m string) string {
	if m == "" {
		return "sample"
	}
	return m
}

// model is a host model as the plugin sees it: its lora.Model, the
// read-only descriptors of its 4-bit weights by key, and those of the
// plain weights of its bundled text encoders (dense).
type model struct {
	lm      *lora.Model
	weights map[string]*pluginv1.TensorDescriptor
	dense   map[string]*pluginv1.TensorDescriptor
}

// denseTE are the storage dtypes of a bundled text encoder's plain weights
// that LoRAs apply to (Forge's CLIP-L in F16, T5 in F8_E4M3): side mode
// binds factors to them (the forward reads the weight as it is and adds
// the factors' product), fuse mode rewrites them in place, rounded to the
// stored dtype as torch's (w.float() + delta).to(dtype) (shared/lora's
// dense pass), with the host journaling their originals.
var denseTE = map[pluginv1.DType]bool{
	pluginv1.DType_DTYPE_F16: true, pluginv1.DType_DTYPE_BF16: true, pluginv1.DType_DTYPE_F32: true,
	pluginv1.DType_DTYPE_F8_E4M3: true, pluginv1.DType_DTYPE_F8_E5M2: true,
}

// isDenseTE reports whether d is a plain 2-D weight of a bundled text
// encoder (text_encoders.clip_l./t5xxl. …) in a denseTE dtype.
func isDenseTE(d *pluginv1.TensorDescriptor) bool {
	if d.GetQuant() != nil || len(d.GetShape()) != 2 || !strings.HasSuffix(d.GetName(), ".weight") || !denseTE[d.GetDtype()] {
		return false
	}
	comp, _, ok := layout.ComponentOf(d.GetName())
	return ok && (comp.Kind == "te1" || comp.Kind == "te2" || comp.Kind == "t5")
}

// loadModel looks the model up and maps LoRAs onto its 2-D 4-bit weights
// and the plain 2-D weights of its bundled text encoders.
func loadModel(ctx context.Context, c *sdk.Call, name string) (*model, error) {
	resp, err := c.Host().LookupTensors(ctx, &pluginv1.LookupTensorsRequest{Model: name})
	if err != nil {
		return nil, fmt.Errorf("look up model %s: %w", modelName(name), err)
	}
	var names []string
	var layers []lora.Layer
	ws := map[string]*pluginv1.TensorDescriptor{}
	dense := map[string]*pluginv1.TensorDescriptor{}
	for _, d := range resp.GetTensors() {
		names = append(names, d.GetName())
		if isDenseTE(d) {
			dense[d.GetName()] = d
			layers = append(layers, lora.Layer{Name: strings.TrimSuffix(d.GetName(), ".weight"), Out: int(d.GetShape()[0]), In: int(d.GetShape()[1])})
			continue
		}
		q := d.GetQuant()
		if q == nil || len(q.GetShape()) != 2 || !strings.HasSuffix(d.GetName(), ".weight") {
			continue
		}
		ws[d.GetName()] = d
		layers = append(layers, lora.Layer{Name: strings.TrimSuffix(d.GetName(), ".weight"), Out: int(q.GetShape()[0]), In: int(q.GetShape()[1])})
	}
	if len(layers) == 0 {
		return nil, fmt.Errorf("model %s: no 2-D bitsandbytes 4-bit weights", modelName(name))
	}
	info, err := layout.DetectInfo(names)
	if err != nil {
		return nil, fmt.Errorf("model %s: %w", modelName(name), err)
	}
	lm, err := lora.NewModel(info, layers)
	if err != nil {
		return nil, fmt.Errorf("model %s: %w", modelName(name), err)
	}
	lm.NoteTensors(names) // bundled text encoders, for unmatched keys' reasons
	return &model{lm: lm, weights: ws, dense: dense}, nil
}

// mapSet parses and maps every LoRA of the set; under strict, any
// unmatched key is an error naming the file and key. With keep (the plan
// call) the parsed files stay in e.files for the apply that follows.
//
// The files are parsed and mapped concurrently, up to e.parseWorkers at a
// time (each Parse decodes its tensors straight from the file's mapping,
// itself in parallel), so a set of several LoRAs overlaps one file's
// header, sort and map with another's decode. Errors are reported for the
// first failing LoRA in the set's order, as a sequential parse would.
func (e *engine) mapSet(m *lora.Model, specs []lorawire.LoRASpec, strict, keep bool) ([]*lora.Mapping, []float64, error) {
	if len(specs) == 0 {
		return nil, nil, fmt.Errorf("no LoRA given: %w", sdk.ErrInvalidArgument)
	}
	for _, s := range specs {
		if math.IsNaN(s.Strength) || math.IsInf(s.Strength, 0) {
			return nil, nil, fmt.Errorf("lora %s: strength %v: %w", filepath.Base(s.Path), s.Strength, sdk.ErrInvalidArgument)
		}
	}
	type parsed struct {
		mp      *lora.Mapping
		kept    *cachedFile
		err     error
		skipped bool
	}
	res := make([]parsed, len(specs))
	var failed atomic.Int64 // lowest failed index + 1 seen so far (0: none)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range max(1, min(e.parseWorkers, len(specs))) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < len(specs); i = int(next.Add(1) - 1) {
				if f := failed.Load(); f > 0 && int(f-1) < i {
					res[i].skipped = true // a LoRA before it failed: its error is the one reported
					continue
				}
				r := &res[i]
				s := specs[i]
				f, id, statted, err := e.files.parse(s.Path)
				if err == nil {
					if statted {
						r.kept = &cachedFile{id: id, f: f}
					}
					r.mp, err = m.Map(f)
				}
				if err == nil && strict && len(r.mp.Unmatched) > 0 {
					u := r.mp.Unmatched[0]
					err = fmt.Errorf("lora %s: key %s: unmatched (%s) and strict is set (%d unmatched in all)",
						filepath.Base(s.Path), u.Key, u.Reason, len(r.mp.Unmatched))
				}
				if err != nil {
					r.err = err
					for {
						f := failed.Load()
						if (f > 0 && int(f-1) <= i) || failed.CompareAndSwap(f, int64(i+1)) {
							break
						}
					}
				}
			}
		}()
	}
	wg.Wait()
	maps := make([]*lora.Mapping, 0, len(specs))
	strengths := make([]float64, 0, len(specs))
	kept := map[string]cachedFile{}
	for i, r := range res {
		if r.err != nil {
			return nil, nil, fmt.Errorf("%w: %w", r.err, sdk.ErrInvalidArgument)
		}
		if r.skipped {
			continue // unreachable: a failure before it returned above
		}
		if r.kept != nil {
			kept[specs[i].Path] = *r.kept
		}
		maps = append(maps, r.mp)
		strengths = append(strengths, specs[i].Strength)
	}
	if keep {
		e.files.keep(kept)
	}
	return maps, strengths, nil
}

func (e *engine) inspect(ctx context.Context, c *sdk.Call, args lorawire.InspectArgs) (lorawire.InspectResult, error) {
	var m *model
	if args.Model != "" {
		var err error
		if m, err = loadModel(ctx, c, args.Model); err != nil {
			return lorawire.InspectResult{}, err
		}
	}
	var out lorawire.InspectResult
	for _, p := range args.Paths {
		f, err := lora.Parse(p)
		if err != nil {
			return lorawire.InspectResult{}, fmt.Errorf("%w: %w", err, sdk.ErrInvalidArgument)
		}
		fi := lorawire.FileInfo{Path: p, Format: f.Format, Meta: f.Meta, Unknown: f.Unknown}
		seen := map[lora.NetType]bool{}
		for _, mod := range f.Modules {
			if !seen[mod.Type] {
				seen[mod.Type] = true
				fi.Types = append(fi.Types, mod.Type)
			}
			fi.Modules = append(fi.Modules, lorawire.ModuleInfo{Key: mod.Key, Type: mod.Type, Rank: mod.Rank, Alpha: mod.Alpha, Scale: mod.Scale, Out: mod.Out, In: mod.In})
		}
		if m != nil {
			mp, err := m.lm.Map(f)
			if err != nil {
				return lorawire.InspectResult{}, fmt.Errorf("%w: %w", err, sdk.ErrInvalidArgument)
			}
			fi.Targets, fi.Unmatched = targetWeights(mp), mp.Unmatched
		}
		out.Files = append(out.Files, fi)
	}
	return out, nil
}

func targetWeights(maps ...*lora.Mapping) []string {
	set := map[string]bool{}
	for _, mp := range maps {
		for _, t := range mp.Targets {
			for _, pc := range t.Pieces {
				set[pc.Layer+".weight"] = true
			}
		}
	}
	out := make([]string, 0, len(set))
	for w := range set {
		out = append(out, w)
	}
	sort.Strings(out)
	return out
}

// prepare opens the CUDA slabs of a model's weights now, so that the first
// fused apply does not wait for them; a model in CPU memory needs nothing.
func (e *engine) prepare(ctx context.Context, c *sdk.Call, args lorawire.PrepareArgs) (lorawire.PrepareResult, error) {
	m, err := loadModel(ctx, c, args.Model)
	if err != nil {
		return lorawire.PrepareResult{}, err
	}
	n, err := e.gpu.openAll(m.weights)
	if err != nil {
		return lorawire.PrepareResult{}, fmt.Errorf("prepare model %s: %w", modelName(args.Model), err)
	}
	return lorawire.PrepareResult{Slabs: n}, nil
}

func (e *engine) planMethod(ctx context.Context, c *sdk.Call, args lorawire.ApplyArgs) (lorawire.PlanResult, error) {
	m, err := loadModel(ctx, c, args.Model)
	if err != nil {
		return lorawire.PlanResult{}, err
	}
	if args.Mode == lorawire.ModeFuse {
		e.gpu.prefetch(m.weights)
	}
	maps, strengths, err := e.mapSet(m.lm, args.LoRAs, args.Strict, true)
	if err != nil {
		return lorawire.PlanResult{}, err
	}
	_ = strengths
	return lorawire.PlanResult{Weights: targetWeights(maps...)}, nil
}

// baseWeights dequantizes a layer from the host's bytes (DoRA needs W) as
// bitsandbytes' dequantize_4bit does, rounded to the logical dtype. Weights
// on the device are downloaded and dequantized here too.
func (e *engine) baseWeights(c *sdk.Call, m *model) lora.BaseWeights {
	return func(layer string) ([]float32, error) {
		if d, ok := m.dense[layer+".weight"]; ok {
			name, err := tensor.DTypeName(d.GetDtype())
			if err != nil {
				return nil, fmt.Errorf("weight %s: %w", d.GetName(), err)
			}
			b, err := e.hostBytes(c, "weight "+d.GetName(), d)
			if err != nil {
				return nil, err
			}
			v, err := lora.DecodeDense(name, b, int(d.GetShape()[0]*d.GetShape()[1]))
			if err != nil {
				return nil, fmt.Errorf("weight %s: %w", d.GetName(), err)
			}
			return v, nil
		}
		d, ok := m.weights[layer+".weight"]
		if !ok {
			return nil, fmt.Errorf("no 4-bit weight %s.weight", layer)
		}
		st, data, err := e.weightData(c, d)
		if err != nil {
			return nil, err
		}
		out := make([]float32, st.Numel())
		if err := nf4.DequantizeWeight(out, st, data); err != nil {
			return nil, fmt.Errorf("weight %s: %w", d.GetName(), err)
		}
		nf4.RoundTo(out, st.DType)
		return out, nil
	}
}

var logicalDType = map[pluginv1.DType]nf4.DType{
	pluginv1.DType_DTYPE_BF16: "bfloat16", pluginv1.DType_DTYPE_F16: "float16", pluginv1.DType_DTYPE_F32: "float32",
}

func quantState(q *pluginv1.QuantInfo) nf4.QuantState {
	return nf4.QuantState{QuantType: nf4.QuantType(q.GetQuantType()), Blocksize: int(q.GetBlocksize()), DType: logicalDType[q.GetDtype()],
		Shape: q.GetShape(), Nested: q.GetNested(), NestedBlocksize: int(q.GetNestedBlocksize()), NestedDType: "float32", NestedOffset: q.GetNestedOffset()}
}

func (e *engine) refBytes(c *sdk.Call, w string, what string, r *pluginv1.TensorRef) ([]byte, error) {
	if r == nil {
		return nil, fmt.Errorf("weight %s: no %s", w, what)
	}
	n, err := tensor.NBytes(r.GetDtype(), r.GetShape())
	if err != nil {
		return nil, fmt.Errorf("weight %s: %s: %w", w, what, err)
	}
	return e.hostBytes(c, "weight "+w+": "+what, &pluginv1.TensorDescriptor{Name: w + "." + what, Dtype: r.GetDtype(), Shape: r.GetShape(), Nbytes: n,
		Access: pluginv1.Access_ACCESS_READ_ONLY, Region: r.GetRegion()})
}

// hostBytes returns a read-only descriptor's bytes: mapped in place from a
// CPU segment, downloaded from a CUDA slab.
func (e *engine) hostBytes(c *sdk.Call, what string, d *pluginv1.TensorDescriptor) ([]byte, error) {
	if isCUDA(d.GetRegion()) {
		return e.gpu.download(what, d)
	}
	return c.Bytes(d)
}

func (e *engine) weightData(c *sdk.Call, d *pluginv1.TensorDescriptor) (nf4.QuantState, nf4.WeightData, error) {
	q := d.GetQuant()
	st := quantState(q)
	var data nf4.WeightData
	var err error
	if data.Packed, err = e.hostBytes(c, "weight "+d.GetName(), d); err != nil {
		return st, data, err
	}
	if data.Absmax, err = e.refBytes(c, d.GetName(), "absmax", q.GetAbsmax()); err != nil {
		return st, data, err
	}
	if q.GetNested() {
		if data.NestedAbsmax, err = e.refBytes(c, d.GetName(), "nested_absmax", q.GetNestedAbsmax()); err != nil {
			return st, data, err
		}
		if data.NestedQuantMap, err = e.refBytes(c, d.GetName(), "nested_quant_map", q.GetNestedQuantMap()); err != nil {
			return st, data, err
		}
	}
	return st, data, nil
}

func (e *engine) apply(ctx context.Context, c *sdk.Call, args lorawire.ApplyArgs) (lorawire.ApplyResult, error) {
	switch args.Mode {
	case "", lorawire.ModeSide:
		return e.applySide(ctx, c, args)
	case lorawire.ModeFuse:
		return e.applyFuse(ctx, c, args)
	}
	return lorawire.ApplyResult{}, fmt.Errorf("mode %q: want side or fuse: %w", args.Mode, sdk.ErrInvalidArgument)
}

// build maps the set on the model and plans it: for side mode every
// layer's factors are built now (they go into arena regions); for the
// fused pass (deferred) one layer's at a time as the pass reaches it, so
// the plugin never holds every layer's A_cat and B_cat at once.
func (e *engine) build(ctx context.Context, c *sdk.Call, args lorawire.ApplyArgs, deferred bool) (*model, *lora.Plan, error) {
	m, err := loadModel(ctx, c, args.Model)
	if err != nil {
		return nil, nil, err
	}
	maps, strengths, err := e.mapSet(m.lm, args.LoRAs, args.Strict, false)
	if err != nil {
		return nil, nil, err
	}
	var p *lora.Plan
	if deferred {
		p, err = lora.BuildDeferred(m.lm, maps, strengths, e.baseWeights(c, m))
	} else {
		p, err = lora.BuildSide(m.lm, maps, strengths, e.baseWeights(c, m), nil)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", err, sdk.ErrInvalidArgument)
	}
	for _, sl := range p.Layers {
		if sl.HasBias() {
			return nil, nil, fmt.Errorf("layer %s: the set carries a bias delta (lora_B.bias or diff_b), which neither side factors nor the fused 4-bit weight can hold: %w",
				sl.Name, sdk.ErrInvalidArgument)
		}
	}
	return m, p, nil
}

// boundRank is the rank of a layer's bound factors: Σr, plus Out identity
// columns when the layer carries a dense delta.
func boundRank(sl *lora.SideLayer) int {
	r := sl.Rank
	if sl.Dense != nil {
		r += sl.Out
	}
	return r
}

// writeA fills A' [R' × In]: A_cat, then the dense rows.
func writeA(dst []float32, sl *lora.SideLayer) {
	copy(dst, sl.A)
	if sl.Dense != nil {
		copy(dst[sl.Rank*sl.In:], sl.Dense)
	}
}

// writeBCols fills columns [c0, c1) of B' [Out × R'] (all of them with
// c0=0, c1=R'): B_cat's columns, then identity columns for the dense rows.
func writeBCols(dst []float32, sl *lora.SideLayer, c0, c1 int) {
	rr := boundRank(sl)
	for r := 0; r < sl.Out; r++ {
		row := dst[r*rr : (r+1)*rr]
		for k := c0; k < min(c1, sl.Rank); k++ {
			row[k] = sl.B[r*sl.Rank+k]
		}
		if sl.Dense != nil && c1 > sl.Rank {
			for k := max(c0, sl.Rank); k < c1; k++ {
				row[k] = 0
			}
			if sl.Rank+r >= c0 && sl.Rank+r < c1 {
				row[sl.Rank+r] = 1
			}
		}
	}
}

func (e *engine) applySide(ctx context.Context, c *sdk.Call, args lorawire.ApplyArgs) (res lorawire.ApplyResult, err error) {
	fdt, err := lorawire.CheckFactorDType(args.FactorDType)
	if err != nil {
		return lorawire.ApplyResult{}, fmt.Errorf("%w: %w", err, sdk.ErrInvalidArgument)
	}
	dtype := pluginv1.DType_DTYPE_F32
	if fdt == lorawire.FactorBF16 {
		dtype = pluginv1.DType_DTYPE_BF16
	}
	elem, _ := tensor.ElemSize(dtype) // F32 or BF16: known
	_, p, err := e.build(ctx, c, args, false)
	if err != nil {
		return lorawire.ApplyResult{}, err
	}
	// Every layer's regions are allocated and written by a pool of
	// workers: the allocations are calls to the host, the writes host
	// copies (into the mapping, or into a buffer then uploaded: the device
	// serializes the uploads), so layers overlap one another's waits.
	// Results land in the layers' order whatever finishes first.
	type slot struct {
		a, b *pluginv1.TensorDescriptor
		dev  bool
	}
	var live []*lora.SideLayer
	for _, sl := range p.Layers {
		if boundRank(sl) > 0 {
			live = append(live, sl)
		}
	}
	slots := make([]slot, len(live))
	var (
		amu       sync.Mutex
		allocated []*pluginv1.Region
		next      atomic.Int64
		wg        sync.WaitGroup
		firstErr  error
	)
	defer func() {
		if err != nil && len(allocated) > 0 {
			_ = c.Host().Free(context.WithoutCancel(ctx), allocated...)
		}
	}()
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	one := func(i int) error {
		sl := live[i]
		rr := boundRank(sl)
		w := sl.Name + ".weight"
		// Allocate runs to completion even when a sibling's failure
		// cancels wctx: the host allocates regardless of the call's
		// context, and a region whose reply were dropped would never reach
		// allocated and so never be freed.
		a, err := c.Host().Allocate(context.WithoutCancel(ctx), lorawire.FactorA(w), dtype, []int64{int64(rr), int64(sl.In)})
		if err != nil {
			return fmt.Errorf("layer %s: allocate A_cat [%d %d]: %w", sl.Name, rr, sl.In, err)
		}
		amu.Lock()
		allocated = append(allocated, a.GetRegion())
		amu.Unlock()
		b, err := c.Host().Allocate(context.WithoutCancel(ctx), lorawire.FactorB(w), dtype, []int64{int64(sl.Out), int64(rr)})
		if err != nil {
			return fmt.Errorf("layer %s: allocate B_cat [%d %d]: %w", sl.Name, sl.Out, rr, err)
		}
		amu.Lock()
		allocated = append(allocated, b.GetRegion())
		amu.Unlock()
		fv, err := e.factorView(c, w, a, b)
		if err != nil {
			return err
		}
		if err := fv.writeAll(wctx, sl); err != nil {
			return err
		}
		slots[i] = slot{a: a, b: b, dev: fv.dev != nil}
		return nil
	}
	for range max(1, min(e.parseWorkers, len(live))) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < len(live); i = int(next.Add(1) - 1) {
				if wctx.Err() != nil {
					return
				}
				if err := one(i); err != nil {
					amu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					amu.Unlock()
					cancel()
					return
				}
			}
		}()
	}
	wg.Wait()
	if firstErr == nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		return lorawire.ApplyResult{}, firstErr
	}
	ranks := map[string]int{}
	var out []*pluginv1.TensorDescriptor
	onDevice := false
	for i, sl := range live {
		rr, w := boundRank(sl), sl.Name+".weight"
		onDevice = onDevice || slots[i].dev
		out = append(out, slots[i].a, slots[i].b)
		ranks[w] = rr
		res.Factors = append(res.Factors, lorawire.Factor{Weight: w, A: slots[i].a.GetName(), B: slots[i].b.GetName(), Rank: rr, Out: sl.Out, In: sl.In, DType: fdt})
	}
	if onDevice {
		// The factors are read by another process once the descriptors are
		// out: everything enqueued must have landed.
		if err := e.gpu.sync(); err != nil {
			return lorawire.ApplyResult{}, err
		}
	}
	p.Report.SideBytes = 0
	for _, f := range res.Factors {
		p.Report.SideBytes += int64(elem * f.Rank * (f.In + f.Out))
	}
	c.Return(out...)
	var paths []string
	for _, s := range args.LoRAs {
		paths = append(paths, s.Path)
	}
	e.mu.Lock()
	e.plans[modelName(args.Model)] = &sidePlan{plan: p, paths: paths, ranks: ranks, dtype: dtype}
	e.mu.Unlock()
	res.Report = p.Report
	return res, nil
}

// ErrNoPlan says the plugin holds no side plan for the model (it was
// restarted, or the set was applied in fuse mode): apply the set again.
var ErrNoPlan = errors.New("no side plan held for this model; apply the set again")

func (e *engine) setStrengths(ctx context.Context, c *sdk.Call, args lorawire.SetStrengthsArgs) (lorawire.SetStrengthsResult, error) {
	e.mu.Lock()
	sp := e.plans[modelName(args.Model)]
	e.mu.Unlock()
	if sp == nil {
		return lorawire.SetStrengthsResult{}, fmt.Errorf("model %s: %w: %w", modelName(args.Model), ErrNoPlan, sdk.ErrFailedPrecondition)
	}
	p := sp.plan
	if len(args.Strengths) != len(p.Strengths) {
		return lorawire.SetStrengthsResult{}, fmt.Errorf("%d strengths for a set of %d LoRAs: %w", len(args.Strengths), len(p.Strengths), sdk.ErrInvalidArgument)
	}
	for i, s := range args.Strengths {
		if math.IsNaN(s) || math.IsInf(s, 0) {
			return lorawire.SetStrengthsResult{}, fmt.Errorf("lora %s: strength %v: %w", filepath.Base(sp.paths[i]), s, sdk.ErrInvalidArgument)
		}
	}
	// Open every bound factor first, so a bad descriptor changes nothing.
	views := map[string]*factors{}
	for _, sl := range p.Layers {
		w := sl.Name + ".weight"
		rr := sp.ranks[w]
		if rr == 0 {
			continue
		}
		var ds [2]*pluginv1.TensorDescriptor
		for k, name := range []string{lorawire.FactorA(w), lorawire.FactorB(w)} {
			d, err := c.Input(name)
			if err != nil {
				return lorawire.SetStrengthsResult{}, err
			}
			want := rr * sl.In
			if k == 1 {
				want = sl.Out * rr
			}
			es, _ := tensor.ElemSize(sp.dtype) // F32 or BF16: known
			if d.GetAccess() != pluginv1.Access_ACCESS_READ_WRITE || d.GetDtype() != sp.dtype || d.GetNbytes() != uint64(es*want) {
				return lorawire.SetStrengthsResult{}, fmt.Errorf("tensor %s: want read-write %v of %d values (the set was applied so): %w", name, sp.dtype, want, sdk.ErrInvalidArgument)
			}
			ds[k] = d
		}
		fv, err := e.factorView(c, w, ds[0], ds[1])
		if err != nil {
			return lorawire.SetStrengthsResult{}, err
		}
		views[w] = fv
	}
	var touched []lora.Touched
	onDevice := false
	for i, s := range args.Strengths {
		if s == p.Strengths[i] {
			continue
		}
		t, err := p.SetStrength(i, s)
		if err != nil {
			return lorawire.SetStrengthsResult{}, err
		}
		touched = append(touched, t...)
		for _, tc := range t {
			sl := p.Layer(tc.Layer)
			fv := views[tc.Layer+".weight"]
			if fv == nil {
				continue
			}
			if err := fv.rewrite(ctx, sl, tc); err != nil {
				return lorawire.SetStrengthsResult{}, err
			}
			onDevice = onDevice || fv.dev != nil
		}
	}
	if onDevice {
		if err := e.gpu.sync(); err != nil {
			return lorawire.SetStrengthsResult{}, err
		}
	}
	return lorawire.SetStrengthsResult{Touched: touched, Report: p.Report}, nil
}

func (e *engine) remove(_ context.Context, _ *sdk.Call, args lorawire.RemoveArgs) (lorawire.RemoveResult, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	_, ok := e.plans[modelName(args.Model)]
	delete(e.plans, modelName(args.Model))
	return lorawire.RemoveResult{Dropped: ok}, nil
}
