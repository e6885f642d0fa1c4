package lora

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/nf4"
)

// refCodec is the bitsandbytes CUDA NF4 rule written out from the
// reference (nf4-format.md §1–2) as a test oracle: absmax per block,
// multiply by the fp32 reciprocal, code = number of fp32 midpoints strictly
// below, high nibble first, odd tail padded with code 7.
type refCodec struct{}

var nf4Codes = [16]float32{-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
	-0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534,
	0.16093020141124725, 0.24611230194568634, 0.33791524171829224, 0.44070982933044434,
	0.5626170039176941, 0.7229568362236023, 1.0}

// nf4Mid are the fp32 midpoints between neighbouring codes (§1.2).
var nf4Mid = func() (t [15]float32) {
	hs := []uint32{0xbf591cd8, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec, 0xbe0d38bc, 0xbd3a7871,
		0x3d22faff, 0x3df64862, 0x3e5067e0, 0x3e9582d4, 0x3ec753f9, 0x3f006d04, 0x3f248daf, 0x3f5c89da}
	for i, h := range hs {
		t[i] = math.Float32frombits(h)
	}
	return t
}()

// nf4Code counts the midpoints strictly below x (binary search over the
// ascending list; NaN compares false everywhere and gets code 0).
func nf4Code(x float32) byte {
	lo, hi := 0, len(nf4Mid)
	for lo < hi {
		mid := (lo + hi) / 2
		if x > nf4Mid[mid] {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	return byte(lo)
}

func (refCodec) Quantize(packed []byte, absmax []float32, src []float32, bs int) {
	codes := make([]byte, len(src)+1)
	codes[len(src)] = 7
	for b := 0; b*bs < len(src); b++ {
		blk := src[b*bs : min((b+1)*bs, len(src))]
		var am float32
		for _, v := range blk {
			am = max(am, float32(math.Abs(float64(v))))
		}
		absmax[b] = am
		inv := 1 / am
		for i, v := range blk {
			codes[b*bs+i] = nf4Code(v * inv)
		}
	}
	for i := 0; i < (len(src)+1)/2; i++ {
		packed[i] = codes[2*i]<<4 | codes[2*i+1]
	}
}

func (refCodec) Dequantize(dst []float32, packed []byte, absmax []float32, bs int) {
	for i := range dst {
		c := packed[i/2] >> 4
		if i%2 == 1 {
			c = packed[i/2] & 0xF
		}
		dst[i] = nf4Codes[c] * absmax[i/bs]
	}
}

// nf4Codec is the production codec under test; refCodec is the oracle.
var nf4Codec = NF4Codec{Type: nf4.QuantNF4, DType: nf4.Float32}

// The production codec agrees with the oracle written from the reference,
// and the bf16 variant rounds dequantized values once to bf16.
func TestNF4CodecMatchesReference(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 9))
	n, bs := 64*50+1, 64
	src := make([]float32, n)
	for i := range src {
		src[i] = float32(r.NormFloat64())
	}
	for i := 128; i < 192; i++ {
		src[i] = 0 // an all-zero block
	}
	nb := (n + bs - 1) / bs
	q1, q2 := make([]byte, (n+1)/2), make([]byte, (n+1)/2)
	a1, a2 := make([]float32, nb), make([]float32, nb)
	nf4Codec.Quantize(q1, a1, src, bs)
	refCodec{}.Quantize(q2, a2, src, bs)
	if !bytes.Equal(q1, q2) {
		t.Fatal("packed codes differ from the reference rule")
	}
	d1, d2 := make([]float32, n), make([]float32, n)
	nf4Codec.Dequantize(d1, q1, a1, bs)
	refCodec{}.Dequantize(d2, q2, a2, bs)
	for i := range d1 {
		if math.Float32bits(d1[i]) != math.Float32bits(d2[i]) {
			t.Fatalf("element %d: %v vs %v", i, d1[i], d2[i])
		}
	}
	bf, err := NewNF4Codec(nf4.QuantNF4, nf4.BFloat16)
	if err != nil {
		t.Fatal(err)
	}
	bf.Dequantize(d1, q1, a1, bs)
	for i := range d1 {
		if want := half.BF16ToF32(half.F32ToBF16(d2[i])); d1[i] != want {
			t.Fatalf("bf16 element %d: %v, want %v", i, d1[i], want)
		}
	}
	if _, err := NewNF4Codec("int4", nf4.Float32); err == nil {
		t.Error("quant type int4 accepted")
	}
}

// memStore keeps each layer's packed codes and absmax as bytes (Raw) and
// decodes absmax on every Layer call, so journal restores go through Raw.
type memStore struct {
	bs     int
	m      *Model
	w      *lazyW
	layers map[string]*storedLayer
	orig   map[string][]byte // bytes as first quantized
}

type storedLayer struct {
	out, in int
	packed  []byte
	absmax  []byte // little-endian fp32
}

func (s *memStore) Layer(name string) (*QLayer, error) {
	l, ok := s.layers[name]
	if !ok {
		ml, ok := s.m.Layer(name)
		if !ok {
			return nil, fmt.Errorf("no layer %s", name)
		}
		n, bs := ml.Out*ml.In, s.bs
		nb := (n + bs - 1) / bs
		q := make([]byte, (n+1)/2)
		am := make([]float32, nb)
		refCodec{}.Quantize(q, am, s.w.get(name), bs)
		ab := make([]byte, 4*nb)
		for i, v := range am {
			binary.LittleEndian.PutUint32(ab[4*i:], math.Float32bits(v))
		}
		l = &storedLayer{out: ml.Out, in: ml.In, packed: q, absmax: ab}
		s.layers[name] = l
		s.orig[name] = append(append([]byte(nil), q...), ab...)
	}
	am := make([]float32, len(l.absmax)/4)
	for i := range am {
		am[i] = math.Float32frombits(binary.LittleEndian.Uint32(l.absmax[4*i:]))
	}
	q := &QLayer{Name: name, Out: l.out, In: l.in, Blocksize: s.bs, Packed: l.packed, Absmax: am, Raw: [][]byte{l.packed, l.absmax}}
	q.Commit = func() error {
		for i, v := range q.Absmax {
			binary.LittleEndian.PutUint32(l.absmax[4*i:], math.Float32bits(v))
		}
		return nil
	}
	return q, nil
}

func (s *memStore) snapshot() map[string][]byte {
	out := map[string][]byte{}
	for n, l := range s.layers {
		out[n] = append(append([]byte(nil), l.packed...), l.absmax...)
	}
	return out
}

// quantizedModel quantizes the sample model's random weights with the
// reference rule, each layer on first use.
func quantizedModel(t *testing.T, m *Model, w *lazyW, bs int) *memStore {
	return &memStore{bs: bs, m: m, w: w, layers: map[string]*storedLayer{}, orig: map[string][]byte{}}
}

// checkRestored fails unless every layer the store materialized holds its
// first-quantized bytes.
func (s *memStore) checkRestored(t *testing.T, what string) {
	t.Helper()
	for name, b := range s.snapshot() {
		if !bytes.Equal(b, s.orig[name]) {
			t.Fatalf("layer %s not byte-exact %s", name, what)
		}
	}
}

func crossPlan(t *testing.T, m *Model, c crossLoRAs, s []float64) *Plan {
	t.Helper()
	p, err := BuildSide(m, crossMaps(t, m, c), s, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func crossMaps(t *testing.T, m *Model, c crossLoRAs) []*Mapping {
	t.Helper()
	var maps []*Mapping
	for _, p := range []string{c.peftPath, c.kohyaPath} {
		f, err := Parse(p)
		if err != nil {
			t.Fatal(err)
		}
		mp, err := m.Map(f)
		if err != nil {
			t.Fatal(err)
		}
		maps = append(maps, mp)
	}
	return maps
}

// Fused codes match the bnb rule applied to W_ref = dq(W) + Σ sᵢ·scaleᵢ·BᵢAᵢ
// (fp64) on ≥ 99.9% of elements, the rest one code off.
func TestFuseMatchesOracle(t *testing.T) {
	c := makeCross(t)
	for _, tc := range []struct {
		l      layout.Layout
		prefix string
		bs     int
		tile   int
	}{{layout.FluxBFL, "model.diffusion_model.", 64, 1 << 16}, {layout.FluxDiffusers, "", 128, 1000}} {
		t.Run(tc.l.String(), func(t *testing.T) {
			m, w := sampleModel(t, tc.l, tc.prefix)
			store := quantizedModel(t, m, w, tc.bs)
			p := crossPlan(t, m, c, []float64{6, 9}) // large enough to survive 4-bit steps
			j := NewMemJournal()
			if err := Fuse(context.Background(), p, store, nf4Codec, j, FuseOptions{TileElems: tc.tile}); err != nil {
				t.Fatal(err)
			}
			e := c.expect(m, tc.l, 6, 9)
			var total, equal, offByOne int
			for name, delta := range e {
				l, _ := m.Layer(name)
				n := l.Out * l.In
				sl := store.orig[name]
				am := make([]float32, (n+tc.bs-1)/tc.bs)
				for i := range am {
					am[i] = math.Float32frombits(binary.LittleEndian.Uint32(sl[(n+1)/2+4*i:]))
				}
				dq := make([]float32, n)
				refCodec{}.Dequantize(dq, sl[:(n+1)/2], am, tc.bs)
				ref := make([]float32, n)
				for i := range ref {
					ref[i] = float32(float64(dq[i]) + delta[i])
				}
				wantQ := make([]byte, (n+1)/2)
				refCodec{}.Quantize(wantQ, make([]float32, len(am)), ref, tc.bs)
				got := store.layers[name].packed
				for i := 0; i < n; i++ {
					g, w := got[i/2]>>4, wantQ[i/2]>>4
					if i%2 == 1 {
						g, w = got[i/2]&0xF, wantQ[i/2]&0xF
					}
					total++
					switch d := int(g) - int(w); {
					case d == 0:
						equal++
					case d == 1 || d == -1:
						offByOne++
					default:
						t.Fatalf("layer %s element %d: code %d, oracle %d", name, i, g, w)
					}
				}
			}
			if float64(equal) < 0.999*float64(total) {
				t.Errorf("%d of %d codes equal (%d off by one), want ≥ 99.9%%", equal, total, offByOne)
			}
			t.Logf("%d/%d codes equal, %d off by one; retention %.3f rel error %.3f, peak scratch %d B",
				equal, total, offByOne, p.Report.Retention, p.Report.RelError, p.Report.PeakScratchBytes)
			if p.Report.Retention <= 0 || p.Report.Retention > 1.5 || len(p.Report.Layers) != len(e) {
				t.Errorf("report retention %v layers %d", p.Report.Retention, len(p.Report.Layers))
			}
			for name := range store.layers {
				if e[name] == nil {
					t.Errorf("fuse opened layer %s, which no LoRA touches", name)
				}
			}
			if err := Remove(store, j); err != nil {
				t.Fatal(err)
			}
			store.checkRestored(t, "after remove")
		})
	}
}

// Small LoRA-scale deltas mostly vanish at 4 bits: the report says so.
func TestFuseWarnsOnLowRetention(t *testing.T) {
	c := makeCross(t)
	m, w := sampleModel(t, layout.FluxBFL, "model.diffusion_model.")
	store := quantizedModel(t, m, w, 64)
	p := crossPlan(t, m, c, []float64{0.01, 0.01})
	if err := Fuse(context.Background(), p, store, nf4Codec, NewMemJournal(), FuseOptions{}); err != nil {
		t.Fatal(err)
	}
	if p.Report.Retention >= 0.5 || len(p.Report.Warnings) == 0 {
		t.Errorf("retention %v warnings %v", p.Report.Retention, p.Report.Warnings)
	}
}

// 100 random apply / change-strength / remove cycles, then remove: the
// model's bytes are the original ones exactly.
func TestFuseCyclesRestoreByteExact(t *testing.T) {
	c := makeCross(t)
	m, w := sampleModel(t, layout.FluxBFL, "model.diffusion_model.")
	store := quantizedModel(t, m, w, 64)
	j := NewMemJournal()
	r := rand.New(rand.NewPCG(5, 6))
	maps := crossMaps(t, m, c)
	var p *Plan
	for i := 0; i < 100; i++ {
		switch op := r.IntN(3); {
		case op == 0 || p == nil:
			var err error
			if p, err = BuildSide(m, maps, []float64{r.Float64()*10 - 5, r.Float64()*10 - 5}, nil, nil); err != nil {
				t.Fatal(err)
			}
		case op == 1:
			if _, err := p.SetStrength(r.IntN(2), r.Float64()*10-5); err != nil {
				t.Fatal(err)
			}
		default:
			if err := Remove(store, j); err != nil {
				t.Fatal(err)
			}
			p = nil
			continue
		}
		if err := Fuse(context.Background(), p, store, nf4Codec, j, FuseOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if err := Remove(store, j); err != nil {
		t.Fatal(err)
	}
	store.checkRestored(t, "after 100 cycles and remove")
	if len(j.Layers()) != 0 {
		t.Errorf("journal not empty: %v", j.Layers())
	}
}

// A failing layer mid-pass rolls back the layers already written.
func TestFuseRollsBackOnError(t *testing.T) {
	c := makeCross(t)
	m, w := sampleModel(t, layout.FluxBFL, "model.diffusion_model.")
	store := quantizedModel(t, m, w, 64)
	p := crossPlan(t, m, c, []float64{3, 3})
	last := p.Layers[len(p.Layers)-1].Name
	bad := &failingStore{memStore: store, fail: last}
	j := NewMemJournal()
	err := Fuse(context.Background(), p, bad, nf4Codec, j, FuseOptions{})
	if err == nil {
		t.Fatal("no error")
	}
	store.checkRestored(t, "after a failed fuse")
	if len(j.Layers()) != 0 {
		t.Errorf("journal keeps %v after rollback", j.Layers())
	}
}

// A failure while re-fusing over an earlier fusion (new strengths, one
// LoRA dropped) leaves the earlier fused bytes exactly in place.
func TestFuseFailureKeepsPreviousFusion(t *testing.T) {
	c := makeCross(t)
	m, w := sampleModel(t, layout.FluxBFL, "model.diffusion_model.")
	store := quantizedModel(t, m, w, 64)
	maps := crossMaps(t, m, c)
	p, err := BuildSide(m, maps, []float64{3, 3}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	j := NewMemJournal()
	if err := Fuse(context.Background(), p, store, nf4Codec, j, FuseOptions{}); err != nil {
		t.Fatal(err)
	}
	before := store.snapshot()
	journaled := j.Layers()
	p2, err := BuildSide(m, maps[1:], []float64{-2}, nil, nil) // kohya only: PEFT-only layers get un-fused
	if err != nil {
		t.Fatal(err)
	}
	bad := &failingStore{memStore: store, fail: p2.Layers[len(p2.Layers)-1].Name}
	if err := Fuse(context.Background(), p2, bad, nf4Codec, j, FuseOptions{}); err == nil {
		t.Fatal("no error")
	}
	after := store.snapshot()
	for name, b := range before {
		if !bytes.Equal(b, after[name]) {
			t.Fatalf("layer %s changed by a failed re-fuse", name)
		}
	}
	if got := j.Layers(); !slices.Equal(got, journaled) {
		t.Errorf("journal %v, was %v", got, journaled)
	}
	if err := Remove(store, j); err != nil {
		t.Fatal(err)
	}
	store.checkRestored(t, "after remove")
}

type failingStore struct {
	*memStore
	fail string
}

func (f *failingStore) Layer(name string) (*QLayer, error) {
	q, err := f.memStore.Layer(name)
	if name == f.fail && err == nil {
		q.Commit = func() error { return errCommit }
	}
	return q, err
}

var errCommit = &commitError{}

type commitError struct{}

func (*commitError) Error() string { return "arena write refused" }

// With CallerRestores the pass writes exactly the bytes a journaled pass
// writes, journals nothing, and on an error leaves what it wrote to the
// caller (who holds the originals) instead of restoring it.
func TestFuseCallerRestores(t *testing.T) {
	c := makeCross(t)
	m, w := sampleModel(t, layout.FluxBFL, "model.diffusion_model.")
	journaled := quantizedModel(t, m, w, 64)
	if err := Fuse(context.Background(), crossPlan(t, m, c, []float64{1, -0.7}), journaled, nf4Codec, NewMemJournal(), FuseOptions{}); err != nil {
		t.Fatal(err)
	}
	caller := quantizedModel(t, m, w, 64)
	p := crossPlan(t, m, c, []float64{1, -0.7})
	if err := Fuse(context.Background(), p, caller, nf4Codec, nil, FuseOptions{CallerRestores: true}); err != nil {
		t.Fatal(err)
	}
	want, got := journaled.snapshot(), caller.snapshot()
	if len(got) != len(want) {
		t.Fatalf("%d layers written, want %d", len(got), len(want))
	}
	for name, b := range want {
		if !bytes.Equal(got[name], b) {
			t.Errorf("layer %s: the CallerRestores pass wrote other bytes", name)
		}
	}
	if p.Report.Retention <= 0 || p.Report.RelError <= 0 {
		t.Errorf("report: retention %v, relative error %v", p.Report.Retention, p.Report.RelError)
	}

	store := quantizedModel(t, m, w, 64)
	p = crossPlan(t, m, c, []float64{3, 3})
	last := p.Layers[len(p.Layers)-1].Name
	if err := Fuse(context.Background(), p, &failingStore{memStore: store, fail: last}, nf4Codec, nil, FuseOptions{CallerRestores: true}); err == nil {
		t.Fatal("no error")
	}
	first := p.Layers[0].Name
	if bytes.Equal(store.snapshot()[first], store.orig[first]) {
		t.Errorf("layer %s was restored: the caller does that", first)
	}
}

// A deferred plan builds each layer's factors exactly as BuildSide does,
// one layer at a time, and the fused pass over it writes the same bytes
// and report.
func TestFuseDeferredPlanBitIdentical(t *testing.T) {
	c := makeCross(t)
	m, w := sampleModel(t, layout.FluxBFL, "model.diffusion_model.")
	s := []float64{0.8, -1.3}
	full := crossPlan(t, m, c, s)
	lazy, err := BuildDeferred(m, crossMaps(t, m, c), s, nil)
	if err != nil {
		t.Fatal(err)
	}
	if lazy.Report.SideBytes != full.Report.SideBytes || len(lazy.Layers) != len(full.Layers) {
		t.Fatalf("deferred plan: %d layers, side bytes %d; BuildSide: %d, %d", len(lazy.Layers), lazy.Report.SideBytes, len(full.Layers), full.Report.SideBytes)
	}
	eq := func(a, b []float32) bool {
		if len(a) != len(b) {
			return false
		}
		for i := range a {
			if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
				return false
			}
		}
		return true
	}
	for i, sl := range lazy.Layers {
		want := full.Layers[i]
		if sl.A != nil || sl.B != nil {
			t.Fatalf("layer %s built before Materialize", sl.Name)
		}
		// FactorsInto writes the same A_cat and B_cat into buffers it does
		// not own, whatever they held.
		if !sl.HasDense() && !sl.HasBias() {
			a, b := make([]float32, sl.Rank*sl.In), make([]float32, sl.Out*sl.Rank)
			for i := range a {
				a[i] = float32(math.NaN())
			}
			for i := range b {
				b[i] = 7
			}
			lazy.FactorsInto(sl, a, b)
			if !eq(a, want.A) || !eq(b, want.B) {
				t.Errorf("layer %s: FactorsInto differs from BuildSide's factors", sl.Name)
			}
		}
		lazy.Materialize(sl)
		if !eq(sl.A, want.A) || !eq(sl.B, want.B) || !eq(sl.Dense, want.Dense) || !eq(sl.Bias, want.Bias) || sl.HasDense() != (want.Dense != nil) {
			t.Errorf("layer %s: deferred factors differ from BuildSide's", sl.Name)
		}
		lazy.Release(sl)
		if sl.A != nil || sl.B != nil || sl.Dense != nil {
			t.Errorf("layer %s: factors kept after Release", sl.Name)
		}
	}
	if _, err := lazy.SetStrength(0, 1); err == nil {
		t.Error("SetStrength on a deferred plan succeeded")
	}
	a, b := quantizedModel(t, m, w, 64), quantizedModel(t, m, w, 64)
	if err := Fuse(context.Background(), full, a, nf4Codec, NewMemJournal(), FuseOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := Fuse(context.Background(), lazy, b, nf4Codec, nil, FuseOptions{CallerRestores: true}); err != nil {
		t.Fatal(err)
	}
	got := b.snapshot()
	for name, want := range a.snapshot() {
		if !bytes.Equal(got[name], want) {
			t.Errorf("layer %s: the deferred pass wrote other bytes", name)
		}
	}
	// The workers' partial sums depend on which worker took which tile, so
	// the figures agree to rounding.
	close := func(x, y float64) bool { return math.Abs(x-y) <= 1e-9*math.Abs(y) }
	if !close(lazy.Report.Retention, full.Report.Retention) || !close(lazy.Report.RelError, full.Report.RelError) {
		t.Errorf("report: retention %v rel error %v, BuildSide's %v %v", lazy.Report.Retention, lazy.Report.RelError, full.Report.Retention, full.Report.RelError)
	}
}
