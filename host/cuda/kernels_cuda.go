//go:build cuda

package cuda

import (
	"encoding/binary"
	"fmt"
	"math"
)

// Kernels enqueues the kernels on a device's stream, one driver round
// trip per launch (Device embeds it), or collects them into a Queue that
// submits them all in one round trip (Device.Queue, Queue.Flush). None
// waits: call Device.Sync before reading results on the host or handing
// out their descriptors. Pointers are device addresses (slab base + region
// offset).
type Kernels struct{ l launcher }

type launcher interface {
	launch(name string, l Launch, args ...uint64) error
	copyAsync(dst, src DevicePtr, n uint64) error
}

// Queue collects launches and copies and submits them in one call on the
// device thread: for the thousands of small launches of a side-factor build.
type Queue struct {
	Kernels
	d   *Device
	ops []func() error
}

// Queue returns an empty queue on d.
func (d *Device) Queue() *Queue {
	q := &Queue{d: d}
	q.Kernels = Kernels{l: q}
	return q
}

func (q *Queue) launch(name string, l Launch, args ...uint64) error {
	op, err := q.d.launchOp(name, l, args)
	if err != nil {
		return err
	}
	q.ops = append(q.ops, op)
	return nil
}

func (q *Queue) copyAsync(dst, src DevicePtr, n uint64) error {
	q.ops = append(q.ops, func() error { return q.d.copyLocked(dst, src, n) })
	return nil
}

// Len is the number of queued operations.
func (q *Queue) Len() int { return len(q.ops) }

// Flush submits the queued operations in order on the device thread and
// empties the queue; the first error stops it.
func (q *Queue) Flush() error {
	ops := q.ops
	q.ops = nil
	return q.d.Do(func() error {
		for _, op := range ops {
			if err := op(); err != nil {
				return err
			}
		}
		return nil
	})
}

func f64(x float64) uint64 { return math.Float64bits(x) }

// Dequantize writes n values of packed/absmax as dtype (DTypeF32, DTypeBF16
// or DTypeF16) to out.
func (k Kernels) Dequantize(packed, absmax DevicePtr, n, blocksize int, out DevicePtr, dtype int) error {
	l, err := DequantizeLaunch(n, blocksize)
	if err != nil {
		return err
	}
	return k.l.launch("nf4_dequantize", l, uint64(packed), uint64(absmax), uint64(n), uint64(blocksize), uint64(out), uint64(dtype))
}

// Quantize encodes n values of dtype at src into packed codes and fp32
// absmax by the bitsandbytes rule.
func (k Kernels) Quantize(src DevicePtr, dtype, n, blocksize int, packed, absmax DevicePtr) error {
	l, err := QuantizeLaunch(n, blocksize)
	if err != nil {
		return err
	}
	return k.l.launch("nf4_quantize", l, uint64(src), uint64(n), uint64(blocksize), uint64(packed), uint64(absmax), uint64(dtype))
}

// Nested is a layer's absmax in nested (double-quantized) storage.
type Nested struct {
	Q      DevicePtr // uint8 [nb]
	Absmax DevicePtr // fp32 [ceil(nb/256)]
	Map    DevicePtr // fp32 [256], the stored nested_quant_map
	Offset float32
}

// NestedDequantize decodes nb absmax values into out (fp32).
func (k Kernels) NestedDequantize(n Nested, nb int, out DevicePtr) error {
	l, err := NestedDequantizeLaunch(nb)
	if err != nil {
		return err
	}
	return k.l.launch("nested_dequantize", l, uint64(n.Q), uint64(n.Absmax), uint64(n.Map), f64(float64(n.Offset)), uint64(nb), uint64(out))
}

// NestedQuantize encodes nb fp32 absmax values into n.Q and n.Absmax with
// n.Offset, against the map at n.Map.
func (k Kernels) NestedQuantize(absmax DevicePtr, nb int, n Nested) error {
	l, err := NestedQuantizeLaunch(nb)
	if err != nil {
		return err
	}
	return k.l.launch("nested_quantize", l, uint64(absmax), uint64(nb), f64(float64(n.Offset)), uint64(n.Map), uint64(n.Q), uint64(n.Absmax))
}

// AbsmaxMean returns the mean of nb fp32 values (summed in float64, then
// rounded once; torch's float32 summation order may differ in the last
// bit). scratch is 8 bytes of device memory. It waits for the stream.
func (d *Device) AbsmaxMean(absmax DevicePtr, nb int, scratch DevicePtr) (float32, error) {
	l, err := SumLaunch(nb)
	if err != nil {
		return 0, err
	}
	if err := d.Do(func() error { return memsetAsync(d, scratch, 8) }); err != nil {
		return 0, err
	}
	if err := d.launch("absmax_sum", l, uint64(absmax), uint64(nb), uint64(scratch)); err != nil {
		return 0, err
	}
	var b [8]byte
	if err := d.Download(b[:], scratch); err != nil {
		return 0, err
	}
	return float32(math.Float64frombits(binary.LittleEndian.Uint64(b[:])) / float64(nb)), nil
}

// FuseLayer is one layer of a fused merge: packed codes and fp32 absmax
// (rewritten in place), and the side factors A_cat [Rank × In] and B_cat
// [Out × Rank] in fp32, strengths folded into B_cat.
type FuseLayer struct {
	Packed, Absmax DevicePtr
	Out, In        int
	Blocksize      int
	A, B           DevicePtr
	Rank           int
}

// Fuse enqueues the fused merge of one layer: dequantize, add B·A tile by
// tile in on-chip memory, re-quantize, in one kernel (PlanFuse picks
// nf4_fuse2d or nf4_fuse).
func (k Kernels) Fuse(l FuseLayer) error {
	p, err := PlanFuse(FuseShape{Out: l.Out, In: l.In, Blocksize: l.Blocksize, Rank: l.Rank})
	if err != nil {
		return err
	}
	if p.Kernel == "nf4_fuse2d" {
		return k.l.launch(p.Kernel, p.Launch, uint64(l.Packed), uint64(l.Absmax), uint64(l.Out), uint64(l.In), uint64(l.Blocksize),
			uint64(l.A), uint64(l.B), uint64(l.Rank), uint64(p.TileCols))
	}
	bShared := uint64(0)
	if p.BShared {
		bShared = 1
	}
	return k.l.launch("nf4_fuse", p.Launch, uint64(l.Packed), uint64(l.Absmax), uint64(l.Out), uint64(l.In), uint64(l.Blocksize),
		uint64(l.A), uint64(l.B), uint64(l.Rank), uint64(p.TileElems), bShared, uint64(p.MaxRows))
}

// FuseNested merges into a layer whose absmax is nested: decode it into
// scratch (l.Absmax must point at nb fp32 values of scratch), fuse,
// re-encode with a new offset (the mean), which it returns. meanScratch is
// 8 bytes. It waits for the stream once (the mean).
func (d *Device) FuseNested(l FuseLayer, n Nested, meanScratch DevicePtr) (float32, error) {
	nb := (l.Out*l.In + l.Blocksize - 1) / l.Blocksize
	if err := d.NestedDequantize(n, nb, l.Absmax); err != nil {
		return 0, fmt.Errorf("fuse nested: %w", err)
	}
	if err := d.Fuse(l); err != nil {
		return 0, fmt.Errorf("fuse nested: %w", err)
	}
	off, err := d.AbsmaxMean(l.Absmax, nb, meanScratch)
	if err != nil {
		return 0, fmt.Errorf("fuse nested: mean: %w", err)
	}
	n.Offset = off
	if err := d.NestedQuantize(l.Absmax, nb, n); err != nil {
		return 0, fmt.Errorf("fuse nested: %w", err)
	}
	return off, nil
}

// SideRows writes one LoRA's A [r × In] (n = r·In values of dtype) into its
// rows of A_cat at dst, times scale.
func (k Kernels) SideRows(src DevicePtr, dtype, n int, scale float32, dst DevicePtr) error {
	l, err := ElementwiseLaunch(n)
	if err != nil {
		return err
	}
	return k.l.launch("side_rows", l, uint64(src), uint64(dtype), uint64(n), f64(float64(scale)), uint64(dst))
}

// SideCols writes rows [srcRow0, srcRow0+rows) of one LoRA's unscaled B
// [· × r] (dtype) into B_cat [· × rank] rows from row0, columns [col,
// col+r), times scale: the side-factor build, and the rescale when a
// strength changes.
func (k Kernels) SideCols(src DevicePtr, dtype, srcRow0, rows, r int, scale float32, dst DevicePtr, row0, rank, col int) error {
	if col < 0 || col+r > rank {
		return fmt.Errorf("side cols: columns [%d, %d) outside rank %d", col, col+r, rank)
	}
	l, err := ElementwiseLaunch(rows * r)
	if err != nil {
		return err
	}
	return k.l.launch("side_cols", l, uint64(src), uint64(dtype), uint64(srcRow0), uint64(rows), uint64(r), f64(float64(scale)),
		uint64(dst), uint64(row0), uint64(rank), uint64(col))
}

// JournalCopy enqueues the copy of a layer's original bytes (packed codes,
// absmax, nested statistics) into its journal region before the first fuse.
func (k Kernels) JournalCopy(dst, src DevicePtr, n uint64) error { return k.l.copyAsync(dst, src, n) }
