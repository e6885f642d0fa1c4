package lora

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/arenahost/arenahost/shared/simd"
)

// Codec is the 4-bit rule of the fused pass. shared/nf4 provides the
// bitsandbytes one; the fused pass calls it on tiles that start on a
// quantization block.
type Codec interface {
	// Dequantize decodes len(dst) values from packed (two per byte, high
	// nibble first) with one absmax per block of blocksize values.
	Dequantize(dst []float32, packed []byte, absmax []float32, blocksize int)
	// Quantize encodes src into packed and absmax by the bitsandbytes rule.
	Quantize(packed []byte, absmax []float32, src []float32, blocksize int)
}

// QLayer is one quantized layer as the fused pass sees it. Packed and
// Absmax are written in place.
type QLayer struct {
	Name      string
	Out, In   int
	Blocksize int
	Packed    []byte    // (Out·In+1)/2 bytes
	Absmax    []float32 // ceil(Out·In/Blocksize) values, decoded to fp32
	// Raw lists the stored regions that make up the layer (packed codes,
	// absmax, nested statistics); the journal saves and restores exactly
	// these bytes, which is what makes remove byte-exact.
	Raw [][]byte
	// Commit, when set, is called after the pass wrote Packed and Absmax:
	// storage that keeps absmax nested or in another dtype re-encodes it
	// into Raw here.
	Commit func() error
	// Dense, when set, makes this a plain (not quantized) weight stored in
	// that dtype (F32, F16, BF16, F8_E4M3, F8_E5M2; dense.go): Data holds
	// its Out·In values, little-endian, rewritten in place, and Raw is
	// {Data}. Blocksize, Packed and Absmax are unused, and the pass's
	// Codec is not called for it.
	Dense string
	Data  []byte
}

// Store opens a model's quantized layers; the plugin points it at the
// arena. Layer is called again after a journal restore, so a store that
// decodes (nested absmax) must decode the restored bytes.
type Store interface {
	Layer(name string) (*QLayer, error)
}

// Journal keeps each fused layer's original bytes until remove. The plugin
// backs it with host-leased arena regions so a crash can roll back.
type Journal interface {
	Has(layer string) bool
	Save(layer string, raw [][]byte) error
	// Restore copies the saved bytes back into raw (same shapes as saved).
	Restore(layer string, raw [][]byte) error
	Drop(layer string) error
	Layers() []string
}

// MemJournal is an in-memory Journal (offline merge, tests).
type MemJournal struct {
	mu   sync.Mutex
	data map[string][][]byte
}

// NewMemJournal returns an empty in-memory journal.
func NewMemJournal() *MemJournal { return &MemJournal{data: map[string][][]byte{}} }

// Has reports whether layer is journaled.
func (j *MemJournal) Has(layer string) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	_, ok := j.data[layer]
	return ok
}

// Save copies raw.
func (j *MemJournal) Save(layer string, raw [][]byte) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if _, ok := j.data[layer]; ok {
		return fmt.Errorf("journal: layer %s already saved", layer)
	}
	cp := make([][]byte, len(raw))
	for i, r := range raw {
		cp[i] = append([]byte(nil), r...)
	}
	j.data[layer] = cp
	return nil
}

// Restore copies the saved bytes into raw.
func (j *MemJournal) Restore(layer string, raw [][]byte) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	saved, ok := j.data[layer]
	if !ok {
		return fmt.Errorf("journal: layer %s not saved", layer)
	}
	if len(saved) != len(raw) {
		return fmt.Errorf("journal: layer %s: %d regions saved, %d given", layer, len(saved), len(raw))
	}
	for i := range raw {
		if len(saved[i]) != len(raw[i]) {
			return fmt.Errorf("journal: layer %s region %d: %d bytes saved, %d given", layer, i, len(saved[i]), len(raw[i]))
		}
	}
	for i := range raw {
		copy(raw[i], saved[i])
	}
	return nil
}

// Drop forgets a layer.
func (j *MemJournal) Drop(layer string) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	delete(j.data, layer)
	return nil
}

// Layers lists the journaled layers, sorted.
func (j *MemJournal) Layers() []string {
	j.mu.Lock()
	defer j.mu.Unlock()
	var out []string
	for k := range j.data {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// FuseOptions tune the fused pass.
type FuseOptions struct {
	// TileElems bounds the elements of one tile (default: a sixteenth of
	// the L2 cache in fp32 values, so a worker's three scratch tiles fill
	// three quarters of its L2; see defaultTileElems). Tiles are whole
	// rows and whole quant blocks; GOMAXPROCS workers fuse tiles in
	// parallel.
	TileElems int
	// WarnRetention is the retention below which a layer gets a warning
	// (default 0.5).
	WarnRetention float64
	// CallerRestores says the caller keeps the layers' originals itself:
	// every layer of the plan holds its original bytes when Fuse is called
	// (the caller put back layers fused before, and those the plan no
	// longer touches), and on an error the caller puts back every layer of
	// the plan. Fuse then journals nothing (j is not used and may be nil),
	// holds no undo copies, and returns a failed pass's error leaving the
	// bytes it wrote to the caller. The host's coordinator works this way:
	// its journal references the model's file instead of copying it.
	CallerRestores bool
}

// noJournal is the journal of a CallerRestores pass: nothing is journaled.
type noJournal struct{}

func (noJournal) Has(string) bool             { return false }
func (noJournal) Save(string, [][]byte) error { return nil }
func (noJournal) Drop(string) error           { return nil }
func (noJournal) Layers() []string            { return nil }
func (noJournal) Restore(l string, _ [][]byte) error {
	return fmt.Errorf("journal: layer %s: the caller keeps the originals", l)
}

// Fuse writes the plan into the model's NF4 bytes: per layer, one pass over
// row tiles aligned to quantization blocks that dequantizes the original
// weights, adds the sum of all LoRA deltas in fp32 and re-quantizes, so no
// full-layer fp32 temporary exists. A layer's original bytes are journaled
// before its first write; a layer already journaled is fused from its
// original, never from a previous fusion. Layers journaled earlier that the
// plan no longer touches are restored. An apply is all or nothing: on
// error every layer this call wrote gets back the bytes it had before the
// call (layers fused for the first time from the journal; layers already
// fused from an undo copy of their packed bytes and absmax, the only extra
// memory the pass holds besides its tiles); with opt.CallerRestores the
// caller does both, and the pass holds no copy at all. The plan's Report gets the
// per-layer and total retention and relative error.
func Fuse(ctx context.Context, p *Plan, store Store, codec Codec, j Journal, opt FuseOptions) error {
	start := time.Now()
	if opt.TileElems <= 0 {
		opt.TileElems = defaultTileElems()
	}
	if opt.WarnRetention == 0 {
		opt.WarnRetention = DefaultWarnRetention
	}
	if opt.CallerRestores {
		j = noJournal{}
	}
	rep := p.Report
	rep.Mode = "fuse"
	rep.Warnings = nil
	// Rollback state: layers this call wrote, and for layers that were
	// already fused (or are being un-fused) a copy of their current bytes,
	// so a failure puts back exactly what was there.
	var written []string
	undo := map[string][][]byte{}
	keep := func(name string, raw [][]byte) {
		if _, ok := undo[name]; ok {
			return
		}
		cp := make([][]byte, len(raw))
		for i, r := range raw {
			cp[i] = append([]byte(nil), r...)
		}
		undo[name] = cp
	}
	fail := func(err error) error {
		if opt.CallerRestores {
			return err
		}
		for name, saved := range undo {
			q, lerr := store.Layer(name)
			if lerr == nil {
				for i := range q.Raw {
					copy(q.Raw[i], saved[i])
				}
				continue
			}
			err = fmt.Errorf("%w (and rollback of %s: %v)", err, name, lerr)
		}
		for _, name := range written {
			if _, ok := undo[name]; ok {
				continue
			}
			if rerr := restoreLayer(store, j, name); rerr != nil {
				err = fmt.Errorf("%w (and rollback of %s: %v)", err, name, rerr)
			}
		}
		return err
	}
	var dot, norm, diff float64
	var bufs [][]float32 // each worker's scratch, reused from layer to layer
	touched := map[string]bool{}
	var peak int64
	for li, sl := range p.Layers {
		touched[sl.Name] = true
		if err := ctx.Err(); err != nil {
			return fail(fmt.Errorf("fuse: %w", err))
		}
		q, err := store.Layer(sl.Name)
		if err != nil {
			return fail(fmt.Errorf("fuse: layer %s: %w", sl.Name, err))
		}
		if err := checkQLayer(q, sl.Layer); err != nil {
			return fail(err)
		}
		if j.Has(sl.Name) {
			keep(sl.Name, q.Raw)
			if err := j.Restore(sl.Name, q.Raw); err != nil {
				return fail(fmt.Errorf("fuse: layer %s: %w", sl.Name, err))
			}
			if q, err = store.Layer(sl.Name); err != nil {
				return fail(fmt.Errorf("fuse: layer %s: reopen after restore: %w", sl.Name, err))
			}
		} else if err := j.Save(sl.Name, q.Raw); err != nil {
			return fail(fmt.Errorf("fuse: layer %s: journal: %w", sl.Name, err))
		}
		written = append(written, sl.Name)
		p.Materialize(sl)
		d, n, e, scratch, ferr := fuseLayer(sl, q, codec, opt.TileElems, &bufs)
		p.Release(sl)
		if ferr != nil {
			return fail(fmt.Errorf("fuse: layer %s: %w", sl.Name, ferr))
		}
		if q.Commit != nil {
			if err := q.Commit(); err != nil {
				return fail(fmt.Errorf("fuse: layer %s: commit: %w", sl.Name, err))
			}
		}
		peak = max(peak, scratch)
		rep.SetLayerFit(li, sl.Name, d, n, e, opt.WarnRetention)
		dot, norm, diff = dot+d, norm+n, diff+e
	}
	var unpatched []string
	for _, name := range j.Layers() {
		if touched[name] {
			continue
		}
		q, err := store.Layer(name)
		if err != nil {
			return fail(fmt.Errorf("fuse: restore layer %s no longer patched: %w", name, err))
		}
		keep(name, q.Raw)
		if err := j.Restore(name, q.Raw); err != nil {
			return fail(fmt.Errorf("fuse: restore layer %s no longer patched: %w", name, err))
		}
		unpatched = append(unpatched, name)
	}
	for _, name := range unpatched { // only now that nothing can fail
		if err := j.Drop(name); err != nil {
			return fmt.Errorf("fuse: drop journal of %s: %w", name, err)
		}
	}
	rep.SetFit(dot, norm, diff)
	rep.PeakScratchBytes = peak
	rep.Elapsed = time.Since(start)
	return nil
}

func checkQLayer(q *QLayer, l Layer) error {
	if q.Dense != "" {
		return checkDense(q, l)
	}
	n := l.Out * l.In
	switch {
	case q.Out != l.Out || q.In != l.In:
		return fmt.Errorf("fuse: layer %s: stored shape [%d %d], plan has [%d %d]", l.Name, q.Out, q.In, l.Out, l.In)
	case q.Blocksize <= 0 || q.Blocksize%2 != 0:
		return fmt.Errorf("fuse: layer %s: blocksize %d", l.Name, q.Blocksize)
	case len(q.Packed) != (n+1)/2:
		return fmt.Errorf("fuse: layer %s: %d packed bytes, want %d", l.Name, len(q.Packed), (n+1)/2)
	case len(q.Absmax) != (n+q.Blocksize-1)/q.Blocksize:
		return fmt.Errorf("fuse: layer %s: %d absmax values, want %d", l.Name, len(q.Absmax), (n+q.Blocksize-1)/q.Blocksize)
	}
	return nil
}

// fuseLayer runs the tiled pass on one layer, tiles in parallel (each
// worker owns its scratch: 3 tiles of (*bufs)[worker], grown when short and
// kept for the next layer), and returns ⟨ΔW_eff, ΔW⟩, ‖ΔW‖², ‖ΔW_eff − ΔW‖²
// and the scratch bytes held.
//
// A merged weight or an absmax that is not finite (a huge strength, LoRA
// values near the float limits) stops the pass with ErrNonFinite naming the
// first row found: the tiles already written are the caller's rollback.
func fuseLayer(sl *SideLayer, q *QLayer, codec Codec, tileElems int, bufs *[][]float32) (dot, norm, diff float64, scratch int64, err error) {
	if q.Dense != "" {
		return fuseDenseLayer(sl, q, tileElems, bufs)
	}
	// Rows per tile: a multiple of the rows that make whole blocks, so tiles
	// start on a block and on a byte.
	unit := q.Blocksize / gcd(sl.In, q.Blocksize)
	rows := max(unit, tileElems/sl.In/unit*unit)
	rows = min(rows, sl.Out)
	codes := func(r0, r1 int) ([]byte, []float32, int) {
		e0, e1 := r0*sl.In, r1*sl.In
		b0 := e0 / q.Blocksize
		return q.Packed[e0/2 : (e1+1)/2], q.Absmax[b0 : (e1+q.Blocksize-1)/q.Blocksize], b0
	}
	load := func(orig []float32, r0, r1 int) {
		packed, absmax, _ := codes(r0, r1)
		codec.Dequantize(orig, packed, absmax, q.Blocksize)
	}
	store := func(w []float32, r0, r1 int) error {
		packed, absmax, b0 := codes(r0, r1)
		codec.Quantize(packed, absmax, w, q.Blocksize)
		codec.Dequantize(w, packed, absmax, q.Blocksize)
		if i := firstNonFinite(absmax); i >= 0 {
			return fmt.Errorf("%w: absmax of block %d is %v", ErrNonFinite, b0+i, absmax[i])
		}
		if i := firstNonFinite(w); i >= 0 {
			return fmt.Errorf("%w: re-quantized weight at row %d, column %d is %v", ErrNonFinite, r0+i/sl.In, i%sl.In, w[i])
		}
		return nil
	}
	return fuseTiles(sl, rows, bufs, load, store)
}

// fuseTiles is the tiled pass both weight kinds share: tiles of rows whole
// rows, taken in turn by up to GOMAXPROCS workers, each with its scratch in
// (*bufs)[worker] (3 tiles: original, merged, delta; grown when short and
// kept for the next layer). For each tile load decodes the stored original
// into orig, the delta is written (SetDeltaRows) and added, and store
// encodes the merge in place and leaves in w what it stored. A merge that
// is not finite, or a store error, stops every worker; the first is
// returned. It returns ⟨ΔW_eff, ΔW⟩, ‖ΔW‖², ‖ΔW_eff − ΔW‖² and the scratch
// bytes held.
func fuseTiles(sl *SideLayer, rows int, bufs *[][]float32, load func(orig []float32, r0, r1 int), store func(w []float32, r0, r1 int) error) (dot, norm, diff float64, scratch int64, err error) {
	tiles := (sl.Out + rows - 1) / rows
	workers := min(runtime.GOMAXPROCS(0), tiles)
	n := rows * sl.In
	scratch = int64(workers) * int64(12*n)
	for len(*bufs) < workers {
		*bufs = append(*bufs, nil)
	}
	for wi := 0; wi < workers; wi++ {
		if len((*bufs)[wi]) < 3*n {
			(*bufs)[wi] = make([]float32, 3*n)
		}
	}
	type sums struct{ dot, norm, diff float64 }
	results := make([]sums, workers)
	var next atomic.Int64
	var bad atomic.Pointer[error]
	var wg sync.WaitGroup
	for wi := 0; wi < workers; wi++ {
		wg.Add(1)
		go func(res *sums, buf []float32) {
			defer wg.Done()
			orig, w, delta := buf[:n], buf[n:2*n], buf[2*n:3*n]
			for {
				t := int(next.Add(1) - 1)
				if t >= tiles || bad.Load() != nil {
					return
				}
				r0 := t * rows
				r1 := min(r0+rows, sl.Out)
				m := (r1 - r0) * sl.In
				load(orig[:m], r0, r1)
				sl.SetDeltaRows(delta[:m], r0, r1)
				addTile(w[:m], orig[:m], delta[:m])
				if i := firstNonFinite(w[:m]); i >= 0 {
					e := fmt.Errorf("%w: merged weight at row %d, column %d is %v (delta %v): lower the strength or check the LoRA's values",
						ErrNonFinite, r0+i/sl.In, i%sl.In, w[i], delta[i])
					bad.CompareAndSwap(nil, &e)
					return
				}
				if e := store(w[:m], r0, r1); e != nil {
					bad.CompareAndSwap(nil, &e)
					return
				}
				d, nn, e := fitSums(w[:m], orig[:m], delta[:m])
				res.dot, res.norm, res.diff = res.dot+d, res.norm+nn, res.diff+e
			}
		}(&results[wi], (*bufs)[wi])
	}
	wg.Wait()
	if e := bad.Load(); e != nil {
		return 0, 0, 0, scratch, *e
	}
	for _, r := range results {
		dot, norm, diff = dot+r.dot, norm+r.norm, diff+r.diff
	}
	return dot, norm, diff, scratch, nil
}

// ErrNonFinite: a fuse or merge would write a NaN or an infinity into a
// weight or its quantization state. Nothing is written (or what was is
// rolled back).
var ErrNonFinite = errors.New("result is not finite")

// firstNonFinite returns the index of the first NaN or ±Inf in v, or -1.
func firstNonFinite(v []float32) int {
	for i, x := range v {
		if math.Float32bits(x)&0x7f800000 == 0x7f800000 {
			return i
		}
	}
	return -1
}

// defaultTileElems is the tile size from the L2 cache (simd.CacheSizes):
// three fp32 tiles per worker (original, merged, delta) in three quarters
// of it, so the dequantize, delta, add and quantize steps of a tile reuse
// it from L2 instead of memory. At least 1<<14 values.
func defaultTileElems() int {
	return max(1<<14, simd.CacheSizes().L2/16)
}

// addTile sets w = orig + delta, element by element (one rounding each).
func addTile(w, orig, delta []float32) {
	i := addVec(w, orig, delta)
	for ; i < len(w); i++ {
		w[i] = orig[i] + delta[i]
	}
}

// fitSums returns Σ eff·want, Σ want² and Σ (eff − want)² in float64 over
// a tile, eff = w − orig (the re-quantized change) and want = delta. The
// vector path sums in 8 lanes, then the lanes: another order than the
// scalar loop's, which moves the retention figures in their last digits
// and no stored byte.
func fitSums(w, orig, delta []float32) (dot, norm, diff float64) {
	var acc [24]float64
	i := fitVec(w, orig, delta, &acc)
	for l := 0; l < 8; l++ {
		dot, norm, diff = dot+acc[l], norm+acc[8+l], diff+acc[16+l]
	}
	for ; i < len(w); i++ {
		eff, want := float64(w[i])-float64(orig[i]), float64(delta[i])
		dot += eff * want
		norm += want * want
		diff += (eff - want) * (eff - want)
	}
	return dot, norm, diff
}

func gcd(a, b int) int {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

func restoreLayer(store Store, j Journal, name string) error {
	q, err := store.Layer(name)
	if err != nil {
		return err
	}
	if err := j.Restore(name, q.Raw); err != nil {
		return err
	}
	return j.Drop(name)
}

// Remove restores every journaled layer to its original bytes and empties
// the journal: byte-exact, whatever was fused.
func Remove(store Store, j Journal) error {
	for _, name := range j.Layers() {
		if err := restoreLayer(store, j, name); err != nil {
			return fmt.Errorf("remove: layer %s: %w", name, err)
		}
	}
	return nil
}
