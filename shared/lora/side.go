package lora

import (
	"fmt"
	"path/filepath"
	"sort"
	"time"
)

// BaseWeights returns the dequantized fp32 weight [Out × In] of a layer. It
// is called only for modules whose delta depends on the base weight (DoRA),
// one layer at a time; the plugin dequantizes from the arena.
type BaseWeights func(layer string) ([]float32, error)

// Alloc returns zeroed storage for a layer's side factors: a [aLen] (A_cat,
// Σr × In) and b [bLen] (B_cat, Out × Σr). The plugin points it at arena
// regions; nil means make.
type Alloc func(layer string, aLen, bLen int) (a, b []float32, err error)

// colBlock is one module's columns in a layer's B_cat (and rows in A_cat).
type colBlock struct {
	lora   int
	col    int
	rank   int
	scale  float64
	b      Mat // unscaled B of the module
	a      Mat // A of the module
	pieces []Piece
}

// denseTerm is one module's dense delta on a layer, strength not applied.
type denseTerm struct {
	lora   int
	key    string
	delta  Mat // [Out × In] of the module (scale applied)
	pieces []Piece
	bias   []float32
}

// SideLayer is the side-mode state of one layer: y = x·Wᵀ + (x·Aᵀ)·Bᵀ +
// x·Denseᵀ + Bias.
type SideLayer struct {
	Layer
	Rank int       // Σr
	A    []float32 // [Rank × In], row-major
	B    []float32 // [Out × Rank], strength·scale folded in
	// Dense is the summed strength-weighted delta of modules with no cheap
	// exact factorisation (nil when there are none).
	Dense []float32
	// Bias is the summed strength-weighted bias delta (nil when none).
	Bias  []float32
	cols  []colBlock
	dense []denseTerm
}

// Plan is the side-mode application of several LoRAs to one model.
type Plan struct {
	Model     *Model
	Mappings  []*Mapping
	Strengths []float64
	Layers    []*SideLayer
	byName    map[string]*SideLayer
	Report    *Report
	// deferred: the layers' factors are built by Materialize, one layer at
	// a time, into bufA and bufB (reused from layer to layer).
	deferred   bool
	bufA, bufB []float32
}

// BuildSide places every mapping on the model and builds each touched
// layer's A_cat and B_cat, with strengths[i]·scale folded into LoRA i's
// columns of B_cat. Types with an exact cheap factorisation (LoRA, LoHa,
// LoKr) go into the factors; full diffs, DoRA and factorisations costlier
// than dense become a per-layer dense delta, flagged in the report.
func BuildSide(m *Model, maps []*Mapping, strengths []float64, base BaseWeights, alloc Alloc) (*Plan, error) {
	return buildSide(m, maps, strengths, base, alloc, false)
}

// BuildDeferred is BuildSide for the fused pass: it places the mappings
// (and computes DoRA deltas) but builds no layer's A_cat, B_cat, dense or
// bias sums; Materialize builds one layer's, exactly as BuildSide would,
// into buffers the plan reuses from layer to layer, and Release drops
// them. The pass then holds one layer's factors at a time instead of every
// layer's. The report is the one BuildSide gives.
func BuildDeferred(m *Model, maps []*Mapping, strengths []float64, base BaseWeights) (*Plan, error) {
	return buildSide(m, maps, strengths, base, nil, true)
}

func buildSide(m *Model, maps []*Mapping, strengths []float64, base BaseWeights, alloc Alloc, deferred bool) (*Plan, error) {
	start := time.Now()
	if len(strengths) != len(maps) {
		return nil, fmt.Errorf("build side: %d strengths for %d LoRAs", len(strengths), len(maps))
	}
	p := &Plan{Model: m, Mappings: maps, Strengths: append([]float64(nil), strengths...), byName: map[string]*SideLayer{}}
	rep := newReport(maps, strengths, "side")
	get := func(name string) *SideLayer {
		if l, ok := p.byName[name]; ok {
			return l
		}
		l := &SideLayer{Layer: m.layers[name]}
		p.byName[name] = l
		p.Layers = append(p.Layers, l)
		return l
	}
	for li, mp := range maps {
		file := filepath.Base(mp.File.Path)
		for _, t := range mp.Targets {
			mod := t.Module
			lr := &rep.LoRAs[li]
			if b, a, ok := factors(mod); ok && !mod.DoRA {
				for _, pc := range t.Pieces {
					sl := get(pc.Layer)
					sl.cols = append(sl.cols, colBlock{lora: li, col: sl.Rank, rank: a.Rows, scale: mod.Scale, b: b, a: a, pieces: []Piece{pc}})
					sl.Rank += a.Rows
				}
				lr.Factored++
				continue
			}
			var d Mat
			if mod.DoRA {
				if base == nil {
					return nil, fmt.Errorf("build side: lora %s: key %s: DoRA needs the base weight and none was given", file, mod.Key)
				}
				w := make([]float32, mod.Out*mod.In)
				for _, pc := range t.Pieces {
					full, err := base(pc.Layer)
					if err != nil {
						return nil, fmt.Errorf("build side: lora %s: key %s: base weight of %s: %w", file, mod.Key, pc.Layer, err)
					}
					copy(w[pc.SrcRow*mod.In:(pc.SrcRow+pc.Rows)*mod.In], full[pc.DstRow*mod.In:(pc.DstRow+pc.Rows)*mod.In])
				}
				d = doraDelta(mod, w)
			} else {
				d = dense(mod)
				if mod.Scale != 1 {
					s := float32(mod.Scale)
					scaled := Mat{Rows: d.Rows, Cols: d.Cols, Data: make([]float32, len(d.Data))}
					for i, v := range d.Data {
						scaled.Data[i] = v * s
					}
					d = scaled
				}
			}
			for _, pc := range t.Pieces {
				sl := get(pc.Layer)
				sl.dense = append(sl.dense, denseTerm{lora: li, key: mod.Key, delta: d, pieces: []Piece{pc}})
			}
			lr.Dense = append(lr.Dense, mod.Key)
		}
		for _, t := range mp.Targets {
			if t.Module.BiasDelta == nil {
				continue
			}
			for _, pc := range t.Pieces {
				sl := get(pc.Layer)
				sl.dense = append(sl.dense, denseTerm{lora: li, key: t.Module.Key, pieces: []Piece{pc}, bias: t.Module.BiasDelta})
			}
		}
	}
	sort.Slice(p.Layers, func(i, j int) bool { return p.Layers[i].Name < p.Layers[j].Name })
	p.deferred = deferred
	for _, sl := range p.Layers {
		if deferred {
			nd, nb := sl.sumLens()
			rep.SideBytes += int64(4 * (sl.Rank*sl.In + sl.Out*sl.Rank + nd + nb))
			rep.Layers = append(rep.Layers, LayerReport{Layer: sl.Name, Rank: sl.Rank, Dense: nd > 0})
			continue
		}
		if sl.Rank > 0 {
			aLen, bLen := sl.Rank*sl.In, sl.Out*sl.Rank
			var err error
			if alloc != nil {
				sl.A, sl.B, err = alloc(sl.Name, aLen, bLen)
				if err != nil {
					return nil, fmt.Errorf("build side: layer %s: allocate factors (%d+%d floats): %w", sl.Name, aLen, bLen, err)
				}
				if len(sl.A) != aLen || len(sl.B) != bLen {
					return nil, fmt.Errorf("build side: layer %s: allocator returned %d+%d floats, want %d+%d", sl.Name, len(sl.A), len(sl.B), aLen, bLen)
				}
			} else {
				sl.A, sl.B = make([]float32, aLen), make([]float32, bLen)
			}
			// A_cat rows: each block's A.
			for _, cb := range sl.cols {
				copy(sl.A[cb.col*sl.In:(cb.col+cb.rank)*sl.In], cb.a.Data)
			}
			rep.SideBytes += int64(4 * (aLen + bLen))
		}
		sl.rewrite(p.Strengths, -1)
		rep.SideBytes += int64(4 * (len(sl.Dense) + len(sl.Bias)))
		rep.Layers = append(rep.Layers, LayerReport{Layer: sl.Name, Rank: sl.Rank, Dense: sl.Dense != nil})
	}
	rep.LayersTouched = len(p.Layers)
	rep.Elapsed = time.Since(start)
	p.Report = rep
	return p, nil
}

// sumLens returns the lengths the layer's dense and bias sums have once
// built (0 when it has none).
func (sl *SideLayer) sumLens() (dense, bias int) {
	for _, d := range sl.dense {
		if d.delta.ok() {
			dense = sl.Out * sl.In
		}
		if d.bias != nil {
			bias = sl.Out
		}
	}
	return dense, bias
}

// HasDense reports whether the layer carries a dense delta (full diff,
// DoRA…), built or not.
func (sl *SideLayer) HasDense() bool { d, _ := sl.sumLens(); return d > 0 }

// HasBias reports whether the layer carries a bias delta, built or not.
func (sl *SideLayer) HasBias() bool { _, b := sl.sumLens(); return b > 0 }

// Materialize builds sl's A_cat, B_cat and dense and bias sums for a plan
// from BuildDeferred, bit for bit as BuildSide does, reusing the plan's
// buffers: the previous layer's factors are gone. It does nothing for a
// plan from BuildSide, whose layers are built already.
func (p *Plan) Materialize(sl *SideLayer) {
	if !p.deferred {
		return
	}
	if sl.Rank > 0 {
		aLen, bLen := sl.Rank*sl.In, sl.Out*sl.Rank
		if cap(p.bufA) < aLen {
			p.bufA = make([]float32, aLen)
		}
		if cap(p.bufB) < bLen {
			p.bufB = make([]float32, bLen)
		}
		sl.A, sl.B = p.bufA[:aLen], p.bufB[:bLen]
		clear(sl.A)
		clear(sl.B)
		for _, cb := range sl.cols {
			copy(sl.A[cb.col*sl.In:(cb.col+cb.rank)*sl.In], cb.a.Data)
		}
	}
	sl.rewrite(p.Strengths, -1)
}

// Release drops what Materialize built for sl (a plan from BuildDeferred).
func (p *Plan) Release(sl *SideLayer) {
	if p.deferred {
		sl.A, sl.B, sl.Dense, sl.Bias = nil, nil, nil, nil
	}
}

// Deferred reports whether the plan builds its layers on Materialize.
func (p *Plan) Deferred() bool { return p.deferred }

// FactorsInto writes sl's A_cat into a (Rank·In values) and B_cat into b
// (Out·Rank), bit for bit as Materialize builds them, and touches nothing
// else, so the layers of one plan can be written concurrently. It writes
// no dense or bias sums: a layer with them (HasDense, HasBias) needs
// Materialize.
func (p *Plan) FactorsInto(sl *SideLayer, a, b []float32) {
	a, b = a[:sl.Rank*sl.In], b[:sl.Out*sl.Rank]
	clear(a)
	for _, cb := range sl.cols {
		copy(a[cb.col*sl.In:(cb.col+cb.rank)*sl.In], cb.a.Data)
		sl.writeB(b, cb, p.Strengths)
	}
}

// writeB writes module cb's columns of B_cat b: its unscaled B times
// strength·scale, zero in rows it does not reach.
func (sl *SideLayer) writeB(b []float32, cb colBlock, strengths []float64) {
	f := float32(strengths[cb.lora] * cb.scale)
	for r := 0; r < sl.Out; r++ {
		clear(b[r*sl.Rank+cb.col : r*sl.Rank+cb.col+cb.rank])
	}
	for _, pc := range cb.pieces {
		for i := 0; i < pc.Rows; i++ {
			src := cb.b.Data[(pc.SrcRow+i)*cb.rank : (pc.SrcRow+i+1)*cb.rank]
			dst := b[(pc.DstRow+i)*sl.Rank+cb.col:]
			for j, v := range src {
				dst[j] = v * f
			}
		}
	}
}

// rewrite recomputes B_cat columns of LoRA only (all when only < 0) and the
// dense sums.
func (sl *SideLayer) rewrite(strengths []float64, only int) {
	for _, cb := range sl.cols {
		if only >= 0 && cb.lora != only {
			continue
		}
		sl.writeB(sl.B, cb, strengths)
	}
	if len(sl.dense) == 0 {
		return
	}
	if only >= 0 {
		touched := false
		for _, d := range sl.dense {
			touched = touched || d.lora == only
		}
		if !touched {
			return
		}
	}
	sl.Dense, sl.Bias = nil, nil
	for _, d := range sl.dense {
		s := float32(strengths[d.lora])
		for _, pc := range d.pieces {
			if d.delta.ok() {
				if sl.Dense == nil {
					sl.Dense = make([]float32, sl.Out*sl.In)
				}
				for i := 0; i < pc.Rows; i++ {
					src := d.delta.Data[(pc.SrcRow+i)*sl.In : (pc.SrcRow+i+1)*sl.In]
					dst := sl.Dense[(pc.DstRow+i)*sl.In:]
					for j, v := range src {
						dst[j] += s * v
					}
				}
			}
			if d.bias != nil {
				if sl.Bias == nil {
					sl.Bias = make([]float32, sl.Out)
				}
				for i := 0; i < pc.Rows; i++ {
					sl.Bias[pc.DstRow+i] += s * d.bias[pc.SrcRow+i]
				}
			}
		}
	}
}

// Touched names the B_cat columns a strength change rewrote in one layer.
type Touched struct {
	Layer string `json:"layer"`
	Col   int    `json:"col"`
	Cols  int    `json:"cols"`
	Dense bool   `json:"dense"` // the dense delta or bias changed too
}

// SetStrength changes LoRA i's strength, rewriting only its columns of each
// layer's B_cat (and the dense sums it contributes to), and returns what
// changed so the caller can publish just that.
func (p *Plan) SetStrength(i int, s float64) ([]Touched, error) {
	if i < 0 || i >= len(p.Strengths) {
		return nil, fmt.Errorf("set strength: LoRA %d of %d", i, len(p.Strengths))
	}
	if p.deferred {
		return nil, fmt.Errorf("set strength: the plan builds its layers one at a time (BuildDeferred); build it with BuildSide")
	}
	p.Strengths[i] = s
	p.Report.LoRAs[i].Strength = s
	var out []Touched
	for _, sl := range p.Layers {
		var t *Touched
		for _, cb := range sl.cols {
			if cb.lora == i {
				if t == nil {
					out = append(out, Touched{Layer: sl.Name, Col: cb.col})
					t = &out[len(out)-1]
				}
				t.Cols = cb.col + cb.rank - t.Col
			}
		}
		hasDense := false
		for _, d := range sl.dense {
			hasDense = hasDense || d.lora == i
		}
		if hasDense {
			if t == nil {
				out = append(out, Touched{Layer: sl.Name})
				t = &out[len(out)-1]
			}
			t.Dense = true
		}
		if t != nil {
			sl.rewrite(p.Strengths, i)
		}
	}
	return out, nil
}

// Layer returns the side state of a layer, or nil when no LoRA touches it.
func (p *Plan) Layer(name string) *SideLayer { return p.byName[name] }

// DeltaRows adds the layer's full delta rows [r0, r1) (factors, dense, all
// strengths applied) into dst [(r1−r0) × In] in float32 — the fused pass's
// per-tile delta, never a full-layer temporary. Per element the factor
// product is one chain of float32 fused multiply-adds into the element,
// d = fma(b_k, a_k, d), rank after rank, each rounded once; it skips a
// group of four ranks whose four b are zero and, past the last whole
// group, a rank whose b is zero. The CUDA kernel (__fmaf_rn) and its
// emulator reproduce this order, and so does every simd path (addFactors:
// VFMADD231PS, or simd.FMA32 in portable Go): the vector kernels change
// the speed, never a bit. The dense delta is added after, on its own.
func (sl *SideLayer) DeltaRows(dst []float32, r0, r1 int) { sl.deltaRows(dst, r0, r1, false) }

// SetDeltaRows is DeltaRows writing dst rather than adding into it: the
// bits of clearing dst and calling DeltaRows, without the pass that clears
// it (the kernels start their accumulators at +0). The fused pass uses it.
func (sl *SideLayer) SetDeltaRows(dst []float32, r0, r1 int) { sl.deltaRows(dst, r0, r1, true) }

func (sl *SideLayer) deltaRows(dst []float32, r0, r1 int, set bool) {
	in := sl.In
	rows := r1 - r0
	if rows <= 0 {
		return
	}
	if sl.Rank > 0 {
		addFactors(dst[:rows*in], sl.B[r0*sl.Rank:r1*sl.Rank], sl.Rank, sl.A[:sl.Rank*in], in, rows, set)
	} else if set {
		clear(dst[:rows*in])
	}
	if sl.Dense != nil {
		for r := r0; r < r1; r++ {
			out := dst[(r-r0)*in : (r-r0+1)*in]
			for j, v := range sl.Dense[r*in : (r+1)*in] {
				out[j] += v
			}
		}
	}
}
