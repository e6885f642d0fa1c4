package lora

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/arenahost/arenahost/shared/half"
)

// The fused pass on a plain weight (a bundled text encoder's CLIP-L in F16,
// T5 in F8_E4M3, or BF16/F32): per row tile, the stored values are widened
// to float32, the deltas added as on a 4-bit layer (SetDeltaRows, then one
// fp32 addition per element), and the sum rounded back to the storage
// dtype in place, exactly as torch's (w.float() + delta).to(dtype):
// round to nearest even, F16/BF16/E5M2 overflow to ±Inf (refused, see
// below), E4M3 saturating at ±448 as torch 2.15 does. A merged value that
// is not finite, or that rounds to an infinity, stops the pass with
// ErrNonFinite naming the row and column, as the 4-bit pass does.

// denseCodec widens and rounds one storage dtype.
type denseCodec struct {
	size   int
	decode func([]float32, []byte) int
	encode func([]byte, []float32) int
}

var denseCodecs = map[string]denseCodec{
	"F32":     {4, half.DecodeF32, half.EncodeF32},
	"F16":     {2, half.DecodeF16, half.EncodeF16},
	"BF16":    {2, half.DecodeBF16, half.EncodeBF16},
	"F8_E4M3": {1, half.DecodeF8E4M3, half.EncodeF8E4M3},
	"F8_E5M2": {1, half.DecodeF8E5M2, half.EncodeF8E5M2},
}

// DenseFusable reports whether a plain weight stored as dtype (safetensors
// names: F32, F16, BF16, F8_E4M3, F8_E5M2) can be fused.
func DenseFusable(dtype string) bool { _, ok := denseCodecs[dtype]; return ok }

// DecodeDense widens a plain weight's stored values to float32 (the base a
// DoRA layer needs): len(data) must hold exactly n values.
func DecodeDense(dtype string, data []byte, n int) ([]float32, error) {
	c, ok := denseCodecs[dtype]
	if !ok {
		return nil, fmt.Errorf("dtype %s: want F32, F16, BF16, F8_E4M3 or F8_E5M2", dtype)
	}
	if len(data) != n*c.size {
		return nil, fmt.Errorf("%d bytes of %s for %d values", len(data), dtype, n)
	}
	out := make([]float32, n)
	c.decode(out, data)
	return out, nil
}

func checkDense(q *QLayer, l Layer) error {
	c, ok := denseCodecs[q.Dense]
	switch {
	case !ok:
		return fmt.Errorf("fuse: layer %s: plain weight stored as %s: want F32, F16, BF16, F8_E4M3 or F8_E5M2", l.Name, q.Dense)
	case q.Out != l.Out || q.In != l.In:
		return fmt.Errorf("fuse: layer %s: stored shape [%d %d], plan has [%d %d]", l.Name, q.Out, q.In, l.Out, l.In)
	case len(q.Data) != l.Out*l.In*c.size:
		return fmt.Errorf("fuse: layer %s: %d bytes of %s, want %d", l.Name, len(q.Data), q.Dense, l.Out*l.In*c.size)
	}
	return nil
}

// fuseDenseLayer is fuseLayer for a plain weight: tiles of whole rows,
// fused in parallel, each worker with its scratch in (*bufs)[worker].
func fuseDenseLayer(sl *SideLayer, q *QLayer, tileElems int, bufs *[][]float32) (dot, norm, diff float64, scratch int64, err error) {
	c := denseCodecs[q.Dense]
	rows := min(max(1, tileElems/sl.In), sl.Out)
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
				e0, e1 := r0*sl.In, r1*sl.In
				m := e1 - e0
				data := q.Data[e0*c.size : e1*c.size]
				c.decode(orig[:m], data)
				sl.SetDeltaRows(delta[:m], r0, r1)
				addTile(w[:m], orig[:m], delta[:m])
				if i := firstNonFinite(w[:m]); i >= 0 {
					e := fmt.Errorf("%w: merged weight at row %d, column %d is %v (delta %v): lower the strength or check the LoRA's values",
						ErrNonFinite, r0+i/sl.In, i%sl.In, w[i], delta[i])
					bad.CompareAndSwap(nil, &e)
					return
				}
				c.encode(data, w[:m])
				c.decode(w[:m], data)
				if i := firstNonFinite(w[:m]); i >= 0 {
					e := fmt.Errorf("%w: merged weight at row %d, column %d is %v once rounded to %s: lower the strength or check the LoRA's values",
						ErrNonFinite, r0+i/sl.In, i%sl.In, w[i], q.Dense)
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
