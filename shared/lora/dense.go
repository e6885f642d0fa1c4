package lora

import (
	"fmt"

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

// fuseDenseLayer is fuseLayer for a plain weight: tiles of whole rows
// (fuseTiles), each widened to float32, merged and rounded back into the
// stored dtype; a merge that rounds to an infinity stops the pass.
func fuseDenseLayer(sl *SideLayer, q *QLayer, tileElems int, bufs *[][]float32) (dot, norm, diff float64, scratch int64, err error) {
	c := denseCodecs[q.Dense]
	rows := min(max(1, tileElems/sl.In), sl.Out)
	data := func(r0, r1 int) []byte { return q.Data[r0*sl.In*c.size : r1*sl.In*c.size] }
	load := func(orig []float32, r0, r1 int) { c.decode(orig, data(r0, r1)) }
	store := func(w []float32, r0, r1 int) error {
		d := data(r0, r1)
		c.encode(d, w)
		c.decode(w, d)
		if i := firstNonFinite(w); i >= 0 {
			return fmt.Errorf("%w: merged weight at row %d, column %d is %v once rounded to %s: lower the strength or check the LoRA's values",
				ErrNonFinite, r0+i/sl.In, i%sl.In, w[i], q.Dense)
		}
		return nil
	}
	return fuseTiles(sl, rows, bufs, load, store)
}
