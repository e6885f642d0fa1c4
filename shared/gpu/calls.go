package gpu

import (
	"fmt"
	"math"
)

// Arg is one kernel argument, 8 bytes as every kernel parameter is.
type Arg struct {
	Kind byte   // 'p' device pointer, 'i' integer, 'd' float64 bits
	V    uint64 // the value as the kernel receives it
}

func ptr(p DevicePtr) Arg { return Arg{'p', uint64(p)} }
func num(v int) Arg       { return Arg{'i', uint64(int64(v))} }
func flt(v float64) Arg   { return Arg{'d', math.Float64bits(v)} }

// Call is one kernel launch: the entry point, its geometry and arguments.
// The cuda build's Device launches Calls; the CPU emulator test runs the
// same Calls through kernels.cu compiled for the host.
type Call struct {
	Kernel string
	Launch
	Args []Arg
}

func call(name string, l Launch, args ...Arg) (Call, error) {
	if want, ok := Entries[name]; !ok || len(args) != want {
		return Call{}, fmt.Errorf("kernel %s: %d arguments, want %d", name, len(args), Entries[name])
	}
	return Call{Kernel: name, Launch: l, Args: args}, nil
}

// DequantizeCall: n values of packed/absmax as dtype (DTypeF32, DTypeBF16,
// DTypeF16) into out.
func DequantizeCall(packed, absmax DevicePtr, n, blocksize int, out DevicePtr, dtype int) (Call, error) {
	l, err := DequantizeLaunch(n, blocksize)
	if err != nil {
		return Call{}, err
	}
	return call("nf4_dequantize", l, ptr(packed), ptr(absmax), num(n), num(blocksize), ptr(out), num(dtype))
}

// QuantizeCall: n values of dtype at src into packed codes and fp32 absmax
// by the bitsandbytes rule.
func QuantizeCall(src DevicePtr, dtype, n, blocksize int, packed, absmax DevicePtr) (Call, error) {
	l, err := QuantizeLaunch(n, blocksize)
	if err != nil {
		return Call{}, err
	}
	return call("nf4_quantize", l, ptr(src), num(n), num(blocksize), ptr(packed), ptr(absmax), num(dtype))
}

// Nested is a layer's absmax in nested (double-quantized) storage.
type Nested struct {
	Q      DevicePtr // uint8 [nb]
	Absmax DevicePtr // fp32 [ceil(nb/256)]
	Map    DevicePtr // fp32 [256], the stored nested_quant_map
	Offset float32
}

// NestedDequantizeCall decodes nb absmax values into out (fp32).
func NestedDequantizeCall(n Nested, nb int, out DevicePtr) (Call, error) {
	l, err := NestedDequantizeLaunch(nb)
	if err != nil {
		return Call{}, err
	}
	return call("nested_dequantize", l, ptr(n.Q), ptr(n.Absmax), ptr(n.Map), flt(float64(n.Offset)), num(nb), ptr(out))
}

// NestedQuantizeCall encodes nb fp32 absmax values into n.Q and n.Absmax
// with n.Offset, against the map at n.Map.
func NestedQuantizeCall(absmax DevicePtr, nb int, n Nested) (Call, error) {
	l, err := NestedQuantizeLaunch(nb)
	if err != nil {
		return Call{}, err
	}
	return call("nested_quantize", l, ptr(absmax), num(nb), flt(float64(n.Offset)), ptr(n.Map), ptr(n.Q), ptr(n.Absmax))
}

// SumCall adds nb fp32 values into the float64 at out (zero it first).
func SumCall(absmax DevicePtr, nb int, out DevicePtr) (Call, error) {
	l, err := SumLaunch(nb)
	if err != nil {
		return Call{}, err
	}
	return call("absmax_sum", l, ptr(absmax), num(nb), ptr(out))
}

// FuseLayer is one layer of a fused merge: packed codes and fp32 absmax
// (rewritten in place), and the side factors A_cat [Rank × In] and B_cat
// [Out × Rank] in fp32, strengths folded into B_cat.
//
// DType is the layer's logical dtype (DTypeF32, DTypeBF16, DTypeF16: the
// model's compute dtype, bf16 for Flux): the dequantized base weight is
// rounded to it (nearest even) before the delta is added, as bitsandbytes'
// dequantize_4bit, and so PEFT's merge, and the CPU merge (shared/lora.Fuse
// with lora.NF4Codec, nf4.RoundTo) do. DTypeF32 (0, the zero value) adds the
// delta to the fp32 product unrounded.
//
// Stats, when not 0, is 3 float64 in device memory (zero them first) to
// which the kernel adds the layer's retention sums, as shared/lora's fused
// pass measures them: Σ eff·delta, Σ delta², Σ (eff − delta)², where delta
// is the fp32 delta B·A and eff = new − base, the re-quantized weight and
// the original, both dequantized and rounded to DType, taken in float64.
// Measuring changes no byte of the result. A layer with Stats runs the
// measuring entry point (nf4_fuse2d_stats, nf4_fuse_stats); without, the
// plain one, which carries none of the measuring code and so keeps its
// registers and occupancy.
//
// Flags, when not 0, is a uint32 in device memory (zero it first) into
// which the kernel ORs FuseBadMerged when a merged weight (base + delta,
// fp32) is NaN or ±Inf, and FuseBadRequant when a block's new absmax,
// rounded to DType, is not finite (the re-quantized weight would dequantize
// to ±Inf; an fp32 absmax can only be infinite with FuseBadMerged set).
// These are shared/lora's fused-pass checks (lora.ErrNonFinite). The
// kernel writes the layer regardless: a caller that finds a flag restores
// it.
type FuseLayer struct {
	Packed, Absmax DevicePtr
	Out, In        int
	Blocksize      int
	A, B           DevicePtr
	Rank           int
	DType          int
	Flags          DevicePtr
	Stats          DevicePtr
	// TileCols and Direct choose the 2-D kernel's tile width and its
	// round-1 body (FuseShape's fields); zero values are lora-nf4's.
	TileCols int
	Direct   bool
}

// The bits the fused kernels OR into FuseLayer.Flags (FUSE_BAD_* in
// kernels.cu).
const (
	FuseBadMerged  = 1
	FuseBadRequant = 2
)

// FuseFlagsError describes a layer's flag word, "" when it is 0; callers
// wrap it with lora.ErrNonFinite and the layer's name.
func FuseFlagsError(flags uint32) string {
	switch {
	case flags == 0:
		return ""
	case flags&FuseBadMerged != 0:
		return "a merged weight (base + delta) is NaN or infinite"
	case flags&FuseBadRequant != 0:
		return "a re-quantized weight would be infinite in the layer's dtype (absmax too large)"
	default:
		return fmt.Sprintf("unknown fuse flags %#x", flags)
	}
}

// FuseCall: the fused merge of one layer, dequantize (rounded to l.DType),
// add B·A tile by tile in on-chip memory, re-quantize, in one kernel
// (PlanFuse picks nf4_fuse2d or nf4_fuse, and their _stats variant when
// l.Stats is set).
func FuseCall(l FuseLayer) (Call, error) {
	switch l.DType {
	case DTypeF32, DTypeBF16, DTypeF16:
	default:
		return Call{}, fmt.Errorf("fuse: dtype %d (want %d f32, %d bf16 or %d f16)", l.DType, DTypeF32, DTypeBF16, DTypeF16)
	}
	stats := l.Stats != 0
	p, err := PlanFuse(FuseShape{Out: l.Out, In: l.In, Blocksize: l.Blocksize, Rank: l.Rank, Stats: stats, TileCols: l.TileCols, Direct: l.Direct})
	if err != nil {
		return Call{}, err
	}
	var args []Arg
	if p.TwoD() {
		args = []Arg{ptr(l.Packed), ptr(l.Absmax), num(l.Out), num(l.In), num(l.Blocksize),
			ptr(l.A), ptr(l.B), num(l.Rank), num(p.TileCols), num(l.DType), ptr(l.Flags)}
	} else {
		bShared := 0
		if p.BShared {
			bShared = 1
		}
		args = []Arg{ptr(l.Packed), ptr(l.Absmax), num(l.Out), num(l.In), num(l.Blocksize),
			ptr(l.A), ptr(l.B), num(l.Rank), num(p.TileElems), num(bShared), num(p.MaxRows), num(l.DType), ptr(l.Flags)}
	}
	if stats {
		args = append(args, ptr(l.Stats))
	}
	return call(p.Kernel, p.Launch, args...)
}

// SideRowsCall writes one LoRA's A [r × In] (n = r·In values of dtype)
// into its rows of A_cat at dst, times scale.
func SideRowsCall(src DevicePtr, dtype, n int, scale float32, dst DevicePtr) (Call, error) {
	l, err := ElementwiseLaunch(n)
	if err != nil {
		return Call{}, err
	}
	return call("side_rows", l, ptr(src), num(dtype), num(n), flt(float64(scale)), ptr(dst))
}

// SideColsCall writes rows [srcRow0, srcRow0+rows) of one LoRA's unscaled
// B [· × r] (dtype) into B_cat [· × rank] rows from row0, columns [col,
// col+r), times scale: the side-factor build, and the rescale when a
// strength changes.
func SideColsCall(src DevicePtr, dtype, srcRow0, rows, r int, scale float32, dst DevicePtr, row0, rank, col int) (Call, error) {
	if col < 0 || r <= 0 || col+r > rank {
		return Call{}, fmt.Errorf("side cols: columns [%d, %d) outside rank %d", col, col+r, rank)
	}
	l, err := ElementwiseLaunch(rows * r)
	if err != nil {
		return Call{}, err
	}
	return call("side_cols", l, ptr(src), num(dtype), num(srcRow0), num(rows), num(r), flt(float64(scale)),
		ptr(dst), num(row0), num(rank), num(col))
}
