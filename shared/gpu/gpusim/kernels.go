package gpusim

import (
	"encoding/binary"
	"fmt"
	"math"
	"slices"
	"strings"

	"github.com/arenahost/arenahost/shared/gpu"
	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/nf4"
)

// kernel is one entry point of kernels.cu as the simulator runs it.
type kernel struct {
	params string   // argument kinds in order: 'p', 'i', 'd' (gpu.Arg.Kind)
	names  []string // argument names, as in kernels.cu
	block  int      // the block size the kernel requires, 0 when any multiple of 32 does
	plan   func(a args, names []string, l gpu.Launch) (plan, error)
}

// plan is a checked launch: the device memory each pointer argument
// covers, and the work over those bytes (in the order of bufs).
type plan struct {
	bufs []buf
	run  func(b [][]byte) error
}

type buf struct {
	arg int    // index of the pointer argument
	n   uint64 // bytes from the pointer, or from the pointer + off
	off uint64
}

// args reads a launch's arguments as the kernel receives them.
type args []gpu.Arg

func (a args) p(i int) gpu.DevicePtr { return gpu.DevicePtr(a[i].V) }
func (a args) i(i int) int64         { return int64(a[i].V) }
func (a args) f(i int) float64       { return math.Float64frombits(a[i].V) }

var kernels = map[string]kernel{
	"nf4_dequantize":    {"ppiipi", []string{"packed", "absmax", "n", "bs", "out", "dtype"}, 0, planDequantize},
	"nf4_quantize":      {"piippi", []string{"src", "n", "bs", "packed", "absmax", "dtype"}, 0, planQuantize},
	"nested_dequantize": {"pppdip", []string{"q", "nabs", "map", "offset", "nb", "out"}, 0, planNestedDequantize},
	"nested_quantize":   {"pidppp", []string{"absmax", "nb", "offset", "map", "q", "nabs"}, gpu.NestedBlocksize, planNestedQuantize},
	"absmax_sum":        {"pip", []string{"absmax", "nb", "out"}, gpu.ThreadsPerBlock, planSum},
	"nf4_fuse": {"ppiiippiiiiip", []string{"packed", "absmax", "out_dim", "in_dim", "bs", "a", "b", "rank", "tile", "b_smem", "max_rows", "dtype", "flags"},
		0, planFuse(false)},
	"nf4_fuse_stats": {"ppiiippiiiiipp", []string{"packed", "absmax", "out_dim", "in_dim", "bs", "a", "b", "rank", "tile", "b_smem", "max_rows", "dtype", "flags", "stats"},
		0, planFuse(true)},
	"nf4_fuse2d": {"ppiiippiiip", []string{"packed", "absmax", "out_dim", "in_dim", "bs", "a", "b", "rank", "tile_cols", "dtype", "flags"},
		gpu.ThreadsPerBlock, planFuse2D(false)},
	"nf4_fuse2d_direct": {"ppiiippiiip", []string{"packed", "absmax", "out_dim", "in_dim", "bs", "a", "b", "rank", "tile_cols", "dtype", "flags"},
		gpu.ThreadsPerBlock, planFuse2D(false)},
	"nf4_fuse2d_stats": {"ppiiippiiipp", []string{"packed", "absmax", "out_dim", "in_dim", "bs", "a", "b", "rank", "tile_cols", "dtype", "flags", "stats"},
		gpu.ThreadsPerBlock, planFuse2D(true)},
	"side_rows": {"piidp", []string{"src", "dtype", "n", "scale", "dst"}, 0, planSideRows},
	"side_cols": {"piiiidpiii", []string{"src", "dtype", "src_row0", "rows", "r", "scale", "dst", "row0", "rank", "col"},
		0, planSideCols},
}

// Launch checks a kernel call (name, argument count against gpu.Entries
// and kinds, geometry, the memory every pointer covers) and queues it.
func (d *Device) Launch(c gpu.Call) error {
	k, err := checkCall(c)
	if err != nil {
		return err
	}
	p, err := k.plan(args(c.Args), k.names, c.Launch)
	if err != nil {
		return fmt.Errorf("launch %s: %w", c.Kernel, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return d.errClosed("launch " + c.Kernel)
	}
	run := func(d *Device) (err error) {
		bs, err := d.resolveLocked(c, k, p)
		if err != nil {
			return err
		}
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("%s: %v", c.Kernel, r)
			}
		}()
		if err := p.run(bs); err != nil {
			return fmt.Errorf("%s: %w", c.Kernel, err)
		}
		return nil
	}
	return d.enqueueLocked(op{what: c.Kernel, run: run}, func() error {
		_, err := d.resolveLocked(c, k, p)
		return err
	})
}

func checkCall(c gpu.Call) (kernel, error) {
	k, ok := kernels[c.Kernel]
	if !ok {
		return kernel{}, fmt.Errorf("launch %s: no such kernel", c.Kernel)
	}
	want, ok := gpu.Entries[c.Kernel]
	switch {
	case !ok:
		return kernel{}, fmt.Errorf("launch %s: not in gpu.Entries", c.Kernel)
	case len(c.Args) != want:
		return kernel{}, fmt.Errorf("launch %s: %d arguments, the kernel takes %d", c.Kernel, len(c.Args), want)
	case len(k.params) != want:
		return kernel{}, fmt.Errorf("launch %s: gpu.Entries says %d arguments but the simulator implements %d (gpusim is behind kernels.cu)",
			c.Kernel, want, len(k.params))
	}
	for i, a := range c.Args {
		if a.Kind != k.params[i] {
			return kernel{}, fmt.Errorf("launch %s: argument %d (%s) of kind %q, want %q", c.Kernel, i, k.names[i], a.Kind, k.params[i])
		}
	}
	l := c.Launch
	switch {
	case l.Grid < 1 || l.Grid > math.MaxInt32:
		return kernel{}, fmt.Errorf("launch %s: grid %d", c.Kernel, l.Grid)
	case k.block != 0 && l.Block != k.block:
		return kernel{}, fmt.Errorf("launch %s: block %d, the kernel needs %d threads", c.Kernel, l.Block, k.block)
	case l.Block < 32 || l.Block > 1024 || l.Block%32 != 0:
		return kernel{}, fmt.Errorf("launch %s: block %d (want whole warps, at most 1024 threads)", c.Kernel, l.Block)
	case l.Shared < 0 || l.Shared > gpu.MaxSharedBytes:
		return kernel{}, fmt.Errorf("launch %s: %d bytes of dynamic shared memory (at most %d)", c.Kernel, l.Shared, gpu.MaxSharedBytes)
	}
	return k, nil
}

// resolveLocked maps a plan's buffers to device memory.
func (d *Device) resolveLocked(c gpu.Call, k kernel, p plan) ([][]byte, error) {
	out := make([][]byte, len(p.bufs))
	for i, b := range p.bufs {
		ptr := gpu.DevicePtr(c.Args[b.arg].V) + gpu.DevicePtr(b.off)
		m, err := d.spanLocked(ptr, b.n)
		if err != nil {
			return nil, fmt.Errorf("launch %s: argument %d (%s): %w", c.Kernel, b.arg, k.names[b.arg], err)
		}
		out[i] = m
	}
	return out, nil
}

// dtypes maps the kernels' dtype codes to shared/nf4's.
var dtypes = map[int64]nf4.DType{gpu.DTypeF32: nf4.Float32, gpu.DTypeBF16: nf4.BFloat16, gpu.DTypeF16: nf4.Float16}

func dtypeArg(a args, i int, name string) (nf4.DType, error) {
	dt, ok := dtypes[a.i(i)]
	if !ok {
		return "", fmt.Errorf("%s %d (want %d f32, %d bf16 or %d f16)", name, a.i(i), gpu.DTypeF32, gpu.DTypeBF16, gpu.DTypeF16)
	}
	return dt, nil
}

// positive checks integer arguments that must be > 0.
func positive(a args, names []string, idx ...int) error {
	for _, i := range idx {
		if a.i(i) <= 0 || a.i(i) > 1<<40 {
			return fmt.Errorf("%s %d", names[i], a.i(i))
		}
	}
	return nil
}

func evenBlocksize(bs int64) error {
	if bs <= 0 || bs%2 != 0 || bs > 4096 {
		return fmt.Errorf("bs %d (want an even size up to 4096)", bs)
	}
	return nil
}

func blocks(n, bs int64) int64 { return (n + bs - 1) / bs }

// loadElems decodes n values of dtype into float32, as kernels.cu's
// load_elem.
func loadElems(b []byte, dt nf4.DType, n int) []float32 {
	v := make([]float32, n)
	switch dt {
	case nf4.Float32:
		half.DecodeF32(v, b)
	case nf4.BFloat16:
		half.DecodeBF16(v, b)
	default:
		half.DecodeF16(v, b)
	}
	return v
}

func f32s(b []byte) []float32 {
	v := make([]float32, len(b)/4)
	half.DecodeF32(v, b)
	return v
}

func putF32s(b []byte, v []float32) { half.EncodeF32(b, v) }

func planDequantize(a args, names []string, _ gpu.Launch) (plan, error) {
	if err := positive(a, names, 2); err != nil {
		return plan{}, err
	}
	n, bs := a.i(2), a.i(3)
	if err := evenBlocksize(bs); err != nil {
		return plan{}, err
	}
	dt, err := dtypeArg(a, 5, "dtype")
	if err != nil {
		return plan{}, err
	}
	return plan{
		bufs: []buf{{arg: 0, n: uint64((n + 1) / 2)}, {arg: 1, n: uint64(4 * blocks(n, bs))}, {arg: 4, n: uint64(n) * uint64(dt.Size())}},
		run: func(b [][]byte) error {
			nf4.DequantizeTo(b[2], dt, b[0], f32s(b[1]), &nf4.NF4, int(n), int(bs))
			return nil
		},
	}, nil
}

func planQuantize(a args, names []string, _ gpu.Launch) (plan, error) {
	if err := positive(a, names, 1); err != nil {
		return plan{}, err
	}
	n, bs := a.i(1), a.i(2)
	if err := evenBlocksize(bs); err != nil {
		return plan{}, err
	}
	dt, err := dtypeArg(a, 5, "dtype")
	if err != nil {
		return plan{}, err
	}
	nb := blocks(n, bs)
	return plan{
		bufs: []buf{{arg: 0, n: uint64(n) * uint64(dt.Size())}, {arg: 3, n: uint64((n + 1) / 2)}, {arg: 4, n: uint64(4 * nb)}},
		run: func(b [][]byte) error {
			src := loadElems(b[0], dt, int(n))
			absmax := make([]float32, nb)
			nf4.Quantize(b[1], absmax, src, int(bs), nf4.QuantNF4)
			putF32s(b[2], absmax)
			return nil
		},
	}, nil
}

func planNestedDequantize(a args, names []string, _ gpu.Launch) (plan, error) {
	if err := positive(a, names, 4); err != nil {
		return plan{}, err
	}
	nb := a.i(4)
	off := float32(a.f(3))
	return plan{
		bufs: []buf{{arg: 0, n: uint64(nb)}, {arg: 1, n: uint64(4 * blocks(nb, gpu.NestedBlocksize))}, {arg: 2, n: 4 * 256}, {arg: 5, n: uint64(4 * nb)}},
		run: func(b [][]byte) error {
			m := (*[256]float32)(f32s(b[2]))
			out := make([]float32, nb)
			nf4.DequantizeNested(out, b[0], f32s(b[1]), m, off, gpu.NestedBlocksize)
			putF32s(b[3], out)
			return nil
		},
	}, nil
}

func planNestedQuantize(a args, names []string, _ gpu.Launch) (plan, error) {
	if err := positive(a, names, 1); err != nil {
		return plan{}, err
	}
	nb := a.i(1)
	off := float32(a.f(2))
	nc := blocks(nb, gpu.NestedBlocksize)
	return plan{
		bufs: []buf{{arg: 0, n: uint64(4 * nb)}, {arg: 3, n: 4 * 256}, {arg: 4, n: uint64(nb)}, {arg: 5, n: uint64(4 * nc)}},
		run: func(b [][]byte) error {
			absmax, code := f32s(b[0]), (*[256]float32)(f32s(b[1]))
			q, nabs := make([]byte, len(absmax)), make([]float32, nc)
			nf4.QuantizeNestedInto(q, nabs, absmax, off, code)
			copy(b[2], q)
			putF32s(b[3], nabs)
			return nil
		},
	}, nil
}

func planSum(a args, names []string, _ gpu.Launch) (plan, error) {
	if err := positive(a, names, 1); err != nil {
		return plan{}, err
	}
	nb := a.i(1)
	return plan{
		bufs: []buf{{arg: 0, n: uint64(4 * nb)}, {arg: 2, n: 8}},
		run: func(b [][]byte) error {
			s := math.Float64frombits(binary.LittleEndian.Uint64(b[1]))
			var part float64
			for _, v := range f32s(b[0]) {
				part += float64(v)
			}
			binary.LittleEndian.PutUint64(b[1], math.Float64bits(s+part))
			return nil
		},
	}, nil
}

// fuseShape checks the arguments the fused-merge kernels share, and the
// shared memory the launch leaves for the static arrays: the measuring
// variants (stats) add gpu.FuseStaticShared to the 48 KiB a block has.
// It returns the index of the stats argument, -1 for a plain kernel, and
// of the flags argument, -1 when it is null (the kernel reports nothing); a
// measuring kernel given no stats pointer is refused, as the GPU would
// fault on it.
func fuseShape(a args, names []string, l gpu.Launch, stats bool) (out, in, bs, rank int64, dt nf4.DType, statsIdx, flagsIdx int, err error) {
	statsIdx, flagsIdx = -1, -1
	if err = positive(a, names, 2, 3, 4, 7); err != nil {
		return
	}
	out, in, bs, rank = a.i(2), a.i(3), a.i(4), a.i(7)
	if err = evenBlocksize(bs); err != nil {
		return
	}
	di, fi := len(names)-2, len(names)-1
	if stats {
		di, fi, statsIdx = len(names)-3, len(names)-2, len(names)-1
		switch {
		case a.p(statsIdx) == 0:
			err = fmt.Errorf("stats is null (the plain kernel measures nothing)")
			return
		case l.Shared+gpu.FuseStaticShared > gpu.MaxSharedBytes:
			err = fmt.Errorf("%d bytes of dynamic shared memory and %d static (the sums' reduction) exceed %d",
				l.Shared, gpu.FuseStaticShared, gpu.MaxSharedBytes)
			return
		}
	}
	if a.p(fi) != 0 {
		flagsIdx = fi
	}
	dt, err = dtypeArg(a, di, "dtype")
	return
}

func planFuse(stats bool) func(a args, names []string, l gpu.Launch) (plan, error) {
	return func(a args, names []string, l gpu.Launch) (plan, error) {
		return checkFuse1D(a, names, l, stats)
	}
}

func checkFuse1D(a args, names []string, l gpu.Launch, stats bool) (plan, error) {
	out, in, bs, rank, dt, statsIdx, flagsIdx, err := fuseShape(a, names, l, stats)
	if err != nil {
		return plan{}, err
	}
	tile, bSmem, maxRows := a.i(8), a.i(9), a.i(10)
	n := out * in
	switch {
	case tile <= 0 || tile%bs != 0:
		return plan{}, fmt.Errorf("tile %d (want a positive multiple of bs %d)", tile, bs)
	case bSmem != 0 && bSmem != 1:
		return plan{}, fmt.Errorf("b_smem %d (want 0 or 1)", bSmem)
	}
	need := 4 * tile
	if bSmem == 1 {
		// Every tile's B rows must fit the max_rows the shared memory holds.
		rows := int64(0)
		for e0 := int64(0); e0 < n; e0 += tile {
			rows = max(rows, (min(e0+tile, n)-1)/in-e0/in+1)
		}
		if maxRows < rows {
			return plan{}, fmt.Errorf("max_rows %d, but a tile of %d elements spans %d rows of %d", maxRows, tile, rows, in)
		}
		need += 4 * maxRows * rank
	}
	if int64(l.Shared) < need {
		return plan{}, fmt.Errorf("%d bytes of shared memory, the tile needs %d", l.Shared, need)
	}
	return fusePlan(out, in, bs, rank, dt, statsIdx, flagsIdx)
}

func planFuse2D(stats bool) func(a args, names []string, l gpu.Launch) (plan, error) {
	return func(a args, names []string, l gpu.Launch) (plan, error) {
		return checkFuse2D(a, names, l, stats)
	}
}

func checkFuse2D(a args, names []string, l gpu.Launch, stats bool) (plan, error) {
	out, in, bs, rank, dt, statsIdx, flagsIdx, err := fuseShape(a, names, l, stats)
	if err != nil {
		return plan{}, err
	}
	cols := a.i(8)
	switch {
	case bs&(bs-1) != 0 || in%bs != 0:
		return plan{}, fmt.Errorf("bs %d with in_dim %d: the 2-D kernel needs a power-of-two blocksize dividing in_dim", bs, in)
	case cols < bs || cols < gpu.FuseMinTileCols || cols > gpu.FuseTileCols || cols&(cols-1) != 0:
		return plan{}, fmt.Errorf("tile_cols %d (want a power of two from max(bs %d, %d) to %d)", cols, bs, gpu.FuseMinTileCols, gpu.FuseTileCols)
	}
	need := int64(gpu.Fuse2DShared(int(cols), int(bs)))
	if int64(l.Shared) < need {
		return plan{}, fmt.Errorf("%d bytes of shared memory, tile_cols %d needs %d", l.Shared, cols, need)
	}
	return fusePlan(out, in, bs, rank, dt, statsIdx, flagsIdx)
}

// fuseChunk is how many elements the simulator merges at a time (rounded
// to whole blocks): the layer never exists in float32 all at once.
const fuseChunk = 1 << 16

// fusePlan is both fused-merge kernels' work, which differs only in
// tiling: the CPU's fused pass (lora.NF4Codec and SideLayer.DeltaRows),
// block-aligned chunk by chunk, in place. With stats ≥ 0, that argument
// points at 3 float64 to which it adds Σ eff·delta, Σ delta² and
// Σ (eff − delta)² (eff = the re-quantized weight minus the original, both
// dequantized and rounded to dt), as the kernels and shared/lora do. With
// flags ≥ 0, that argument points at a uint32 into which it ORs
// gpu.FuseBadMerged (a merged weight is NaN or ±Inf) and gpu.FuseBadRequant
// (the re-quantized weight, rounded to dt, is not finite), as the kernels
// do; like them it writes the layer regardless.
func fusePlan(out, in, bs, rank int64, dt nf4.DType, statsIdx, flagsIdx int) (plan, error) {
	stats := statsIdx >= 0
	n := out * in
	nb := blocks(n, bs)
	codec, err := lora.NewNF4Codec(nf4.QuantNF4, dt)
	if err != nil {
		return plan{}, err
	}
	bufs := []buf{{arg: 0, n: uint64((n + 1) / 2)}, {arg: 1, n: uint64(4 * nb)}, {arg: 5, n: uint64(4 * rank * in)}, {arg: 6, n: uint64(4 * out * rank)}}
	if stats {
		bufs = append(bufs, buf{arg: statsIdx, n: 24})
	}
	fi := -1
	if flagsIdx >= 0 {
		fi = len(bufs)
		bufs = append(bufs, buf{arg: flagsIdx, n: 4})
	}
	return plan{
		bufs: bufs,
		run: func(b [][]byte) error {
			packed, absmax := b[0], f32s(b[1])
			var orig []float32
			var dot, norm, diff float64
			sl := &lora.SideLayer{Layer: lora.Layer{Out: int(out), In: int(in)}, Rank: int(rank), A: f32s(b[2]), B: f32s(b[3])}
			chunk := max(bs, fuseChunk/bs*bs)
			var w, delta, check []float32
			var bad uint32
			for e0 := int64(0); e0 < n; e0 += chunk {
				e1 := min(e0+chunk, n)
				r0, r1 := e0/in, (e1-1)/in+1
				w = grow(w, int(e1-e0))
				delta = grow(delta, int((r1-r0)*in))
				clear(delta)
				codec.Dequantize(w, packed[e0/2:(e1+1)/2], absmax[e0/bs:], int(bs))
				sl.DeltaRows(delta, int(r0), int(r1))
				if stats {
					orig = append(orig[:0], w...)
				}
				for i, d := range delta[e0-r0*in : e1-r0*in] {
					w[i] += d
					if nonFinite(w[i]) {
						bad |= gpu.FuseBadMerged
					}
				}
				codec.Quantize(packed[e0/2:(e1+1)/2], absmax[e0/bs:blocks(e1, bs)], w, int(bs))
				if fi >= 0 {
					check = grow(check, len(w))
					codec.Dequantize(check, packed[e0/2:(e1+1)/2], absmax[e0/bs:], int(bs))
					if slices.ContainsFunc(check, nonFinite) {
						bad |= gpu.FuseBadRequant
					}
				}
				if stats {
					codec.Dequantize(w, packed[e0/2:(e1+1)/2], absmax[e0/bs:], int(bs))
					for i, d := range delta[e0-r0*in : e1-r0*in] {
						eff, want := float64(w[i])-float64(orig[i]), float64(d)
						dot += eff * want
						norm += want * want
						diff += (eff - want) * (eff - want)
					}
				}
			}
			putF32s(b[1], absmax)
			if fi >= 0 {
				binary.LittleEndian.PutUint32(b[fi], binary.LittleEndian.Uint32(b[fi])|bad)
			}
			if stats {
				for k, v := range []float64{dot, norm, diff} {
					old := math.Float64frombits(binary.LittleEndian.Uint64(b[4][8*k:]))
					binary.LittleEndian.PutUint64(b[4][8*k:], math.Float64bits(old+v))
				}
			}
			return nil
		},
	}, nil
}

// nonFinite reports a NaN or ±Inf.
func nonFinite(v float32) bool { return math.Float32bits(v)&0x7f800000 == 0x7f800000 }

func grow(v []float32, n int) []float32 {
	if cap(v) < n {
		return make([]float32, n)
	}
	return v[:n]
}

func planSideRows(a args, names []string, _ gpu.Launch) (plan, error) {
	if err := positive(a, names, 2); err != nil {
		return plan{}, err
	}
	dt, err := dtypeArg(a, 1, "dtype")
	if err != nil {
		return plan{}, err
	}
	n, scale := a.i(2), float32(a.f(3))
	return plan{
		bufs: []buf{{arg: 0, n: uint64(n) * uint64(dt.Size())}, {arg: 4, n: uint64(4 * n)}},
		run: func(b [][]byte) error {
			v := loadElems(b[0], dt, int(n))
			for i := range v {
				v[i] *= scale
			}
			putF32s(b[1], v)
			return nil
		},
	}, nil
}

func planSideCols(a args, names []string, _ gpu.Launch) (plan, error) {
	if err := positive(a, names, 3, 4, 8); err != nil {
		return plan{}, err
	}
	dt, err := dtypeArg(a, 1, "dtype")
	if err != nil {
		return plan{}, err
	}
	srcRow0, rows, r, scale := a.i(2), a.i(3), a.i(4), float32(a.f(5))
	row0, rank, col := a.i(7), a.i(8), a.i(9)
	var bad []string
	for _, c := range []struct {
		name string
		v    int64
	}{{"src_row0", srcRow0}, {"row0", row0}, {"col", col}} {
		if c.v < 0 || c.v > 1<<40 {
			bad = append(bad, fmt.Sprintf("%s %d", c.name, c.v))
		}
	}
	if len(bad) > 0 {
		return plan{}, fmt.Errorf("%s", strings.Join(bad, ", "))
	}
	if col+r > rank {
		return plan{}, fmt.Errorf("columns [%d, %d) outside rank %d", col, col+r, rank)
	}
	size := int64(dt.Size())
	dstOff := 4 * (row0*rank + col)
	dstLen := 4 * ((rows-1)*rank + r)
	return plan{
		bufs: []buf{{arg: 0, off: uint64(srcRow0 * r * size), n: uint64(rows * r * size)}, {arg: 6, off: uint64(dstOff), n: uint64(dstLen)}},
		run: func(b [][]byte) error {
			v := loadElems(b[0], dt, int(rows*r))
			var e [4]byte
			for row := range rows {
				for j := range r {
					binary.LittleEndian.PutUint32(e[:], math.Float32bits(v[row*r+j]*scale))
					copy(b[1][4*(row*rank+j):], e[:])
				}
			}
			return nil
		},
	}, nil
}
