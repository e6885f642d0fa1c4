//go:build cuda

package gpu

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
	launch(c Call) error
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

func (q *Queue) launch(c Call) error {
	op, err := q.d.launchOp(c)
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

// Dequantize writes n values of packed/absmax as dtype (DTypeF32, DTypeBF16
// or DTypeF16) to out.
func (k Kernels) Dequantize(packed, absmax DevicePtr, n, blocksize int, out DevicePtr, dtype int) error {
	return k.run(DequantizeCall(packed, absmax, n, blocksize, out, dtype))
}

// Quantize encodes n values of dtype at src into packed codes and fp32
// absmax by the bitsandbytes rule.
func (k Kernels) Quantize(src DevicePtr, dtype, n, blocksize int, packed, absmax DevicePtr) error {
	return k.run(QuantizeCall(src, dtype, n, blocksize, packed, absmax))
}

// NestedDequantize decodes nb absmax values into out (fp32).
func (k Kernels) NestedDequantize(n Nested, nb int, out DevicePtr) error {
	return k.run(NestedDequantizeCall(n, nb, out))
}

// NestedQuantize encodes nb fp32 absmax values into n.Q and n.Absmax with
// n.Offset, against the map at n.Map.
func (k Kernels) NestedQuantize(absmax DevicePtr, nb int, n Nested) error {
	return k.run(NestedQuantizeCall(absmax, nb, n))
}

// Fuse enqueues the fused merge of one layer (FuseCall).
func (k Kernels) Fuse(l FuseLayer) error { return k.run(FuseCall(l)) }

// SideRows writes one LoRA's A [r × In] (n = r·In values of dtype) into its
// rows of A_cat at dst, times scale.
func (k Kernels) SideRows(src DevicePtr, dtype, n int, scale float32, dst DevicePtr) error {
	return k.run(SideRowsCall(src, dtype, n, scale, dst))
}

// SideCols writes rows of one LoRA's unscaled B into its columns of B_cat,
// times scale (SideColsCall): the side-factor build and the rescale.
func (k Kernels) SideCols(src DevicePtr, dtype, srcRow0, rows, r int, scale float32, dst DevicePtr, row0, rank, col int) error {
	return k.run(SideColsCall(src, dtype, srcRow0, rows, r, scale, dst, row0, rank, col))
}

// JournalCopy enqueues the copy of a layer's original bytes (packed codes,
// absmax, nested statistics) into its journal region before the first fuse.
func (k Kernels) JournalCopy(dst, src DevicePtr, n uint64) error { return k.l.copyAsync(dst, src, n) }

func (k Kernels) run(c Call, err error) error {
	if err != nil {
		return err
	}
	return k.l.launch(c)
}

// AbsmaxMean returns the mean of nb fp32 values (summed in float64, then
// rounded once; torch's float32 summation order may differ in the last
// bit). scratch is 8 bytes of device memory. It waits for the stream.
func (d *Device) AbsmaxMean(absmax DevicePtr, nb int, scratch DevicePtr) (float32, error) {
	c, err := SumCall(absmax, nb, scratch)
	if err != nil {
		return 0, err
	}
	if err := d.Zero(scratch, 8); err != nil {
		return 0, err
	}
	if err := d.launch(c); err != nil {
		return 0, err
	}
	var b [8]byte
	if err := d.Download(b[:], scratch); err != nil {
		return 0, err
	}
	return float32(math.Float64frombits(binary.LittleEndian.Uint64(b[:])) / float64(nb)), nil
}

// FuseNested merges into a layer whose absmax is nested, as lora-nf4's
// device pass does: decode it into scratch (l.Absmax must point at nb fp32
// values of scratch), fuse, and re-encode it around n.Offset, the stored
// nested_offset, with n.Map, the stored map (the quant-state JSON that
// holds the offset is not rewritten). It queues the three kernels.
func (d *Device) FuseNested(l FuseLayer, n Nested) error {
	nb := (l.Out*l.In + l.Blocksize - 1) / l.Blocksize
	if err := d.NestedDequantize(n, nb, l.Absmax); err != nil {
		return fmt.Errorf("fuse nested: %w", err)
	}
	if err := d.Fuse(l); err != nil {
		return fmt.Errorf("fuse nested: %w", err)
	}
	if err := d.NestedQuantize(l.Absmax, nb, n); err != nil {
		return fmt.Errorf("fuse nested: %w", err)
	}
	return nil
}
