package nf4

import (
	"encoding/binary"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

// checkpoint is an in-memory set of tensors for layout tests.
type checkpoint struct {
	meta map[string]TensorMeta
	data map[string][]byte
}

func newCheckpoint() *checkpoint {
	return &checkpoint{meta: map[string]TensorMeta{}, data: map[string][]byte{}}
}

func (c *checkpoint) add(e Entry) {
	c.meta[e.Key] = TensorMeta{DType: e.DType, Shape: slices.Clone(e.Shape)}
	c.data[e.Key] = slices.Clone(e.Data)
}

func (c *checkpoint) read(key string) ([]byte, error) {
	b, ok := c.data[key]
	if !ok {
		return nil, fmt.Errorf("no tensor %q", key)
	}
	return b, nil
}

func (c *checkpoint) clone() *checkpoint {
	d := newCheckpoint()
	for k, m := range c.meta {
		d.meta[k] = TensorMeta{DType: m.DType, Shape: slices.Clone(m.Shape)}
	}
	for k, b := range c.data {
		d.data[k] = slices.Clone(b)
	}
	return d
}

func randWeights(n int, seed uint64) []float32 {
	r := rand.New(rand.NewPCG(seed, seed+1))
	x := make([]float32, n)
	for i := range x {
		x[i] = float32(r.NormFloat64() * 0.02)
	}
	return x
}

// sample builds a checkpoint with one nested NF4 weight, one plain FP4
// weight with an odd count, and a bias.
func sample(t *testing.T) (*checkpoint, map[string]*Encoded) {
	t.Helper()
	c := newCheckpoint()
	enc := map[string]*Encoded{}
	e1, err := Encode(randWeights(96*70, 1), []int64{96, 70}, "bfloat16", 64, true)
	if err != nil {
		t.Fatal(err)
	}
	e2, err := EncodeType(randWeights(7*33, 2), []int64{7, 33}, "float16", 128, false, QuantFP4)
	if err != nil {
		t.Fatal(err)
	}
	enc["blocks.0.qkv.weight"], enc["blocks.1.proj.weight"] = e1, e2
	for name, e := range enc {
		for _, en := range e.Entries(name) {
			c.add(en)
		}
	}
	c.add(Entry{Key: "blocks.0.qkv.bias", DType: "BF16", Shape: []int64{96}, Data: make([]byte, 192)})
	return c, enc
}

func TestEntriesOrderAndShapes(t *testing.T) {
	e, err := Encode(randWeights(300, 3), []int64{3, 100}, "bfloat16", 64, true)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, en := range e.Entries("x.weight") {
		got = append(got, fmt.Sprintf("%s %s %v", en.Key, en.DType, en.Shape))
	}
	js := e.State.MarshalPython()
	want := []string{
		"x.weight U8 [150 1]", "x.weight.absmax U8 [5]", "x.weight.quant_map F32 [16]",
		"x.weight.nested_absmax F32 [1]", "x.weight.nested_quant_map F32 [256]",
		fmt.Sprintf("x.weight.quant_state.bitsandbytes__nf4 U8 [%d]", len(js)),
	}
	if !slices.Equal(got, want) {
		t.Errorf("entries\n%v\nwant\n%v", got, want)
	}
	if !strings.HasPrefix(string(js), `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [3, 100], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": `) {
		t.Errorf("json %s", js)
	}
}

func TestGroupAndDequantize(t *testing.T) {
	c, enc := sample(t)
	weights, plain, err := GroupWeights("m.safetensors", c.meta, c.read)
	if err != nil {
		t.Fatal(err)
	}
	if len(weights) != 2 || weights[0].Name != "blocks.0.qkv.weight" || weights[1].Name != "blocks.1.proj.weight" {
		t.Fatalf("weights %+v", weights)
	}
	if !slices.Equal(plain, []string{"blocks.0.qkv.bias"}) {
		t.Fatalf("plain %v", plain)
	}
	for _, w := range weights {
		e := enc[w.Name]
		got, err := w.DequantizeF32(c.read)
		if err != nil {
			t.Fatal(err)
		}
		am := e.Absmax
		if e.State.Nested {
			am, err = Absmax(e.State, e.Data())
			if err != nil {
				t.Fatal(err)
			}
		}
		want := make([]float32, w.Numel())
		Dequantize(want, e.Packed, am, w.State.QuantType.Table(), w.Numel(), w.State.Blocksize)
		if !slices.Equal(got, want) {
			t.Errorf("%s: dequantized weight differs", w.Name)
		}
		b, err := w.DequantizeDType(c.read)
		if err != nil || len(b) != w.Numel()*w.State.DType.Size() {
			t.Errorf("%s: DequantizeDType %d bytes, %v", w.Name, len(b), err)
		}
	}
}

// TestQuantStorage accepts packed bytes stored as another dtype
// (bnb_4bit_quant_storage), reinterpreted as bytes.
func TestQuantStorage(t *testing.T) {
	c, _ := sample(t)
	c.meta["blocks.0.qkv.weight"] = TensorMeta{DType: "BF16", Shape: []int64{96 * 70 / 4, 1}}
	if _, _, err := GroupWeights("m.safetensors", c.meta, c.read); err != nil {
		t.Fatal(err)
	}
}

func TestGroupWeightsErrors(t *testing.T) {
	const w0 = "blocks.0.qkv.weight"
	const w1 = "blocks.1.proj.weight"
	nanMap := make([]byte, 64)
	binary.LittleEndian.PutUint32(nanMap[12:], math.Float32bits(float32(math.NaN())))
	tests := []struct {
		name string
		edit func(c *checkpoint)
		want string
	}{
		{"missing absmax", func(c *checkpoint) { delete(c.meta, w0+".absmax") }, "m.safetensors: tensor blocks.0.qkv.weight.absmax: missing"},
		{"missing packed", func(c *checkpoint) { delete(c.meta, w1) }, "tensor blocks.1.proj.weight: missing"},
		{"missing nested map", func(c *checkpoint) { delete(c.meta, w0+".nested_quant_map") }, "nested_quant_map: missing"},
		{"nested map on plain", func(c *checkpoint) {
			c.meta[w1+".nested_quant_map"] = TensorMeta{"F32", []int64{256}}
		}, "blocks.1.proj.weight.nested_quant_map: present but the quant state is not nested"},
		{"NaN in quant_map", func(c *checkpoint) { c.data[w1+".quant_map"] = nanMap }, "blocks.1.proj.weight.quant_map: NaN at index 3"},
		{"absmax dtype", func(c *checkpoint) { c.meta[w1+".absmax"] = TensorMeta{"F16", []int64{2}} }, "absmax: F16 [2], want F32 [2]"},
		{"absmax count", func(c *checkpoint) { c.meta[w0+".absmax"] = TensorMeta{"U8", []int64{104}} }, "absmax: U8 [104], want U8 [105]"},
		{"packed size", func(c *checkpoint) { c.meta[w0] = TensorMeta{"U8", []int64{3359, 1}} }, "holds 3359 bytes but quant state shape [96 70] needs 3360"},
		{"json shape", func(c *checkpoint) {
			st := `{"quant_type": "fp4", "blocksize": 128, "dtype": "float16", "shape": [7, 35]}`
			c.data[w1+".quant_state.bitsandbytes__fp4"] = []byte(st)
			c.meta[w1+".quant_state.bitsandbytes__fp4"] = TensorMeta{"U8", []int64{int64(len(st))}}
		}, "blocks.1.proj.weight: U8 [116 1] holds 116 bytes but quant state shape [7 35] needs 123"},
		{"bad json", func(c *checkpoint) {
			c.data[w1+".quant_state.bitsandbytes__fp4"] = []byte(`{"quant_type": "fp4",`)
			c.meta[w1+".quant_state.bitsandbytes__fp4"] = TensorMeta{"U8", []int64{21}}
		}, "blocks.1.proj.weight.quant_state.bitsandbytes__fp4: quant state"},
		{"type disagrees with key", func(c *checkpoint) {
			k := w1 + ".quant_state.bitsandbytes__fp4"
			c.meta[w1+".quant_state.bitsandbytes__nf4"], c.data[w1+".quant_state.bitsandbytes__nf4"] = c.meta[k], c.data[k]
			delete(c.meta, k)
		}, `quant_type "fp4" disagrees with the key's "nf4"`},
		{"state not U8", func(c *checkpoint) {
			k := w1 + ".quant_state.bitsandbytes__fp4"
			c.meta[k] = TensorMeta{"I8", c.meta[k].Shape}
		}, "want a 1-D U8 tensor"},
		{"unexpected key", func(c *checkpoint) { c.meta[w0+".scb"] = TensorMeta{"F32", []int64{1}} }, "blocks.0.qkv.weight.scb: unexpected key for 4-bit weight blocks.0.qkv.weight"},
		{"orphan absmax", func(c *checkpoint) {
			c.meta["other.weight"] = TensorMeta{"U8", []int64{4, 1}}
			c.meta["other.weight.absmax"] = TensorMeta{"F32", []int64{1}}
		}, "other.weight.absmax: 4-bit statistics without a quant state"},
		{"packed dtype", func(c *checkpoint) { c.meta[w0] = TensorMeta{"F4", []int64{3360, 1}} }, `dtype "F4" cannot hold packed 4-bit codes`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, _ := sample(t)
			tc.edit(c)
			before := maps.Clone(c.meta)
			w, p, err := GroupWeights("m.safetensors", c.meta, c.read)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
			if w != nil || p != nil {
				t.Errorf("partial result on error: %v %v", w, p)
			}
			if len(before) != len(c.meta) {
				t.Error("GroupWeights modified meta")
			}
		})
	}
}

func TestEncodeErrors(t *testing.T) {
	x := make([]float32, 12)
	for _, tc := range []struct {
		name  string
		shape []int64
		dtype string
		bs    int
		qt    QuantType
		want  string
	}{
		{"shape", []int64{5, 2}, "bfloat16", 64, QuantNF4, "shape [5 2] does not hold 12 elements"},
		{"dtype", []int64{12}, "int8", 64, QuantNF4, `dtype "int8"`},
		{"blocksize", []int64{12}, "bfloat16", 100, QuantNF4, "blocksize 100"},
		{"type", []int64{12}, "bfloat16", 64, "int4", `unknown quant type "int4"`},
	} {
		if _, err := EncodeType(x, tc.shape, tc.dtype, tc.bs, false, tc.qt); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want %q", tc.name, err, tc.want)
		}
	}
}

func TestDequantizeWeightErrors(t *testing.T) {
	e, err := Encode(randWeights(200, 4), []int64{200}, "float16", 64, true)
	if err != nil {
		t.Fatal(err)
	}
	d := e.Data()
	dst := make([]float32, 200)
	if err := DequantizeWeight(dst, e.State, d); err != nil {
		t.Fatal(err)
	}
	short := d
	short.Packed = d.Packed[:99]
	if err := DequantizeWeight(dst, e.State, short); err == nil || !strings.Contains(err.Error(), "packed: 99 bytes, want 100") {
		t.Errorf("short packed: %v", err)
	}
	short = d
	short.NestedQuantMap = d.NestedQuantMap[:1000]
	if err := DequantizeWeight(dst, e.State, short); err == nil || !strings.Contains(err.Error(), "nested_quant_map") {
		t.Errorf("short nested map: %v", err)
	}
	if err := DequantizeWeight(dst[:10], e.State, d); err == nil {
		t.Error("short dst accepted")
	}
	if err := DequantizeWeightTo(make([]byte, 399), e.State, d); err == nil {
		t.Error("short byte dst accepted")
	}
}
