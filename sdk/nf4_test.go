package sdk_test

import (
	"encoding/binary"
	"errors"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/sdk"
	"github.com/arenahost/arenahost/sdk/plugintest"
	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/nf4"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
)

func f32Bytes(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

var protoDType = map[string]pluginv1.DType{"float32": pluginv1.DType_DTYPE_F32, "float16": pluginv1.DType_DTYPE_F16, "bfloat16": pluginv1.DType_DTYPE_BF16}

// putWeight encodes src with shared/nf4 and lays it out in the fake host's
// arena as the host describes a 4-bit weight: the descriptor's region is
// the packed codes (its shape the packed shape), quant the logical one.
func putWeight(t *testing.T, h *plugintest.FakeHost, name string, src []float32, shape []int64, dtype string, nested bool) (*pluginv1.TensorDescriptor, *nf4.Encoded) {
	t.Helper()
	enc, err := nf4.Encode(src, shape, dtype, 64, nested)
	if err != nil {
		t.Fatal(err)
	}
	ro := pluginv1.Access_ACCESS_READ_ONLY
	d := h.Put(t, name, pluginv1.DType_DTYPE_U8, []int64{int64(len(enc.Packed)), 1}, enc.Packed, ro)
	ref := func(key string, dt pluginv1.DType, shape []int64, b []byte) *pluginv1.TensorRef {
		r := h.Put(t, name+"."+key, dt, shape, b, ro)
		return &pluginv1.TensorRef{Dtype: dt, Shape: shape, Region: r.GetRegion()}
	}
	q := &pluginv1.QuantInfo{QuantType: "nf4", Blocksize: 64, Dtype: protoDType[dtype], Shape: shape, Nested: nested,
		QuantMap: ref("quant_map", pluginv1.DType_DTYPE_F32, []int64{16}, f32Bytes(enc.QuantMap[:]))}
	if nested {
		q.Absmax = ref("absmax", pluginv1.DType_DTYPE_U8, []int64{int64(len(enc.QuantAbsmax))}, enc.QuantAbsmax)
		q.NestedAbsmax = ref("nested_absmax", pluginv1.DType_DTYPE_F32, []int64{int64(len(enc.NestedAbsmax))}, f32Bytes(enc.NestedAbsmax))
		q.NestedQuantMap = ref("nested_quant_map", pluginv1.DType_DTYPE_F32, []int64{256}, f32Bytes(enc.NestedQuantMap[:]))
		q.NestedBlocksize = uint32(enc.State.NestedBlocksize)
		q.NestedOffset = enc.State.NestedOffset
	} else {
		q.Absmax = ref("absmax", pluginv1.DType_DTYPE_F32, []int64{int64(len(enc.Absmax))}, f32Bytes(enc.Absmax))
	}
	d.Quant = q
	return d, enc
}

// The Go SDK's helper decodes a descriptor exactly as shared/nf4 decodes
// the same weight from its files (bit for bit, in the logical dtype), and
// widens bf16/f16 exactly.
func TestDequantizeNF4MatchesSharedNF4(t *testing.T) {
	h := plugintest.NewFakeHost(t, 1<<20)
	m := tensor.NewMapper()
	t.Cleanup(func() { m.Close() })
	rng := rand.New(rand.NewPCG(1, 2))
	for _, tc := range []struct {
		dtype  string
		nested bool
		shape  []int64
	}{
		{"bfloat16", true, []int64{24, 40}},
		{"bfloat16", false, []int64{7, 33}}, // odd count: the last byte holds one code
		{"float16", true, []int64{16, 64}},
		{"float32", false, []int64{3, 64}},
	} {
		n := int(tc.shape[0] * tc.shape[1])
		src := make([]float32, n)
		for i := range src {
			src[i] = float32(rng.NormFloat64())
		}
		d, enc := putWeight(t, h, tc.dtype, src, tc.shape, tc.dtype, tc.nested)
		got, err := sdk.DequantizeNF4Bytes(m, d)
		if err != nil {
			t.Fatalf("%s nested=%v: %v", tc.dtype, tc.nested, err)
		}
		wd := nf4.WeightData{Packed: enc.Packed, QuantMap: f32Bytes(enc.QuantMap[:])}
		if tc.nested {
			wd.Absmax, wd.NestedAbsmax, wd.NestedQuantMap = enc.QuantAbsmax, f32Bytes(enc.NestedAbsmax), f32Bytes(enc.NestedQuantMap[:])
		} else {
			wd.Absmax = f32Bytes(enc.Absmax)
		}
		want := make([]byte, n*enc.State.DType.Size())
		if err := nf4.DequantizeWeightTo(want, enc.State, wd); err != nil {
			t.Fatal(err)
		}
		if string(got) != string(want) {
			t.Fatalf("%s nested=%v: bytes differ from shared/nf4", tc.dtype, tc.nested)
		}
		f, err := sdk.DequantizeNF4(m, d)
		if err != nil || len(f) != n {
			t.Fatalf("DequantizeNF4: %d values, %v", len(f), err)
		}
		for i, x := range f {
			var w float32
			switch tc.dtype {
			case "bfloat16":
				w = half.BF16ToF32(binary.LittleEndian.Uint16(want[2*i:]))
			case "float16":
				w = half.F16ToF32(binary.LittleEndian.Uint16(want[2*i:]))
			default:
				w = math.Float32frombits(binary.LittleEndian.Uint32(want[4*i:]))
			}
			if math.Float32bits(x) != math.Float32bits(w) {
				t.Fatalf("%s: value %d = %v, want %v", tc.dtype, i, x, w)
			}
		}
	}
}

func TestDequantizeNF4Refuses(t *testing.T) {
	h := plugintest.NewFakeHost(t, 1<<20)
	m := tensor.NewMapper()
	t.Cleanup(func() { m.Close() })
	src := make([]float32, 128)
	for _, tc := range []struct {
		name string
		edit func(d *pluginv1.TensorDescriptor)
		want string
	}{
		{"not quantized", func(d *pluginv1.TensorDescriptor) { d.Quant = nil }, "not quantized"},
		{"logical dtype", func(d *pluginv1.TensorDescriptor) { d.Quant.Dtype = pluginv1.DType_DTYPE_U8 }, "quant.dtype"},
		{"quant type", func(d *pluginv1.TensorDescriptor) { d.Quant.QuantType = "int8" }, "quant_type"},
		{"no absmax", func(d *pluginv1.TensorDescriptor) { d.Quant.Absmax = nil }, "quant.absmax missing"},
		{"absmax dtype", func(d *pluginv1.TensorDescriptor) { d.Quant.Absmax.Dtype = pluginv1.DType_DTYPE_F16 }, "quant.absmax dtype"},
		{"shape too big for region", func(d *pluginv1.TensorDescriptor) { d.Quant.Shape = []int64{4096, 4096} }, "packed codes"},
		{"zero blocksize", func(d *pluginv1.TensorDescriptor) { d.Quant.Blocksize = 0 }, "blocksize"},
	} {
		d, _ := putWeight(t, h, tc.name, src, []int64{2, 64}, "bfloat16", false)
		tc.edit(d)
		_, err := sdk.DequantizeNF4(m, d)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), tc.name) {
			t.Errorf("%s: %v, want an error naming the tensor and %q", tc.name, err, tc.want)
		}
		if err != nil && !errors.Is(err, sdk.ErrInvalidArgument) && !errors.Is(err, tensor.ErrOutOfBounds) && !errors.Is(err, tensor.ErrBadDescriptor) {
			t.Errorf("%s: %v is neither invalid argument nor a bad descriptor", tc.name, err)
		}
	}
}
