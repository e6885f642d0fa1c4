package nf4

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
)

// Key suffixes bitsandbytes appends to a 4-bit weight's name ("X.weight").
const (
	SuffixAbsmax         = ".absmax"
	SuffixQuantMap       = ".quant_map"
	SuffixNestedAbsmax   = ".nested_absmax"
	SuffixNestedQuantMap = ".nested_quant_map"
	SuffixQuantStateNF4  = ".quant_state.bitsandbytes__nf4"
	SuffixQuantStateFP4  = ".quant_state.bitsandbytes__fp4"
)

// TensorMeta is what the layout needs from a checkpoint's header entry:
// the safetensors dtype spelling ("U8", "F32", "BF16", …) and the shape.
type TensorMeta struct {
	DType string
	Shape []int64
}

// TensorBytes returns the raw little-endian bytes of the tensor stored
// under key.
type TensorBytes func(key string) ([]byte, error)

// WeightKeys names the tensors of one 4-bit weight; nested keys are empty
// when the weight is not nested.
type WeightKeys struct {
	Weight         string // packed codes, uint8 or another quant_storage dtype
	Absmax         string
	QuantMap       string
	NestedAbsmax   string
	NestedQuantMap string
	QuantState     string // the JSON, uint8
}

// All returns the present keys in bitsandbytes' state-dict order.
func (k WeightKeys) All() []string {
	out := []string{k.Weight, k.Absmax, k.QuantMap}
	if k.NestedAbsmax != "" {
		out = append(out, k.NestedAbsmax, k.NestedQuantMap)
	}
	return append(out, k.QuantState)
}

// Weight is one bitsandbytes 4-bit weight found in a checkpoint.
type Weight struct {
	Name  string // the weight's key, e.g. "double_blocks.0.img_attn.qkv.weight"
	File  string // the checkpoint it came from, for error messages
	Keys  WeightKeys
	State QuantState
}

// Numel returns the weight's logical element count.
func (w Weight) Numel() int { return int(w.State.Numel()) }

// stDTypeSize is the element size of each safetensors dtype a packed
// 4-bit weight may be stored as (quant_storage), by header spelling.
var stDTypeSize = map[string]int{
	"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
	"I16": 2, "U16": 2, "F16": 2, "BF16": 2,
	"I32": 4, "U32": 4, "F32": 4,
	"I64": 8, "U64": 8, "F64": 8, "C64": 8,
}

// GroupWeights finds the 4-bit weights among a checkpoint's tensors. A
// weight is announced by its quant-state key ("X.weight.quant_state.
// bitsandbytes__nf4" or "__fp4"); its JSON is read through read, parsed and
// the weight's tensors validated (see Weight.Validate). Every other key
// under "X.weight." is an error, as is a ".absmax", ".quant_map",
// ".nested_absmax" or ".nested_quant_map" key next to a tensor that has no
// quant state. plain lists the remaining keys (biases, norms, unquantized
// layers), sorted; weights are sorted by name. Errors name file and key.
func GroupWeights(file string, meta map[string]TensorMeta, read TensorBytes) (weights []Weight, plain []string, err error) {
	keys := slices.Sorted(maps.Keys(meta))
	claimed := map[string]bool{}
	for _, key := range keys {
		var qt QuantType
		var name string
		switch {
		case strings.HasSuffix(key, SuffixQuantStateNF4):
			qt, name = QuantNF4, strings.TrimSuffix(key, SuffixQuantStateNF4)
		case strings.HasSuffix(key, SuffixQuantStateFP4):
			qt, name = QuantFP4, strings.TrimSuffix(key, SuffixQuantStateFP4)
		default:
			continue
		}
		if claimed[name] {
			return nil, nil, fmt.Errorf("%s: tensor %s: both an nf4 and an fp4 quant state", file, name)
		}
		claimed[name] = true
		w, err := newWeight(file, name, key, qt, meta, read)
		if err != nil {
			return nil, nil, err
		}
		weights = append(weights, w)
	}
	owned := map[string]bool{}
	for _, w := range weights {
		for _, k := range w.Keys.All() {
			owned[k] = true
		}
	}
	for _, key := range keys {
		if owned[key] {
			continue
		}
		for i := strings.IndexByte(key, '.'); i >= 0; i = nextDot(key, i) {
			if claimed[key[:i]] {
				return nil, nil, fmt.Errorf("%s: tensor %s: unexpected key for 4-bit weight %s", file, key, key[:i])
			}
		}
		for _, suf := range []string{SuffixAbsmax, SuffixQuantMap, SuffixNestedAbsmax, SuffixNestedQuantMap} {
			if base, ok := strings.CutSuffix(key, suf); ok {
				if _, exists := meta[base]; exists {
					return nil, nil, fmt.Errorf("%s: tensor %s: 4-bit statistics without a quant state (%s%s or %s%s missing)",
						file, key, base, SuffixQuantStateNF4, base, SuffixQuantStateFP4)
				}
			}
		}
		plain = append(plain, key)
	}
	return weights, plain, nil
}

// nextDot returns the index of the next '.' in key after i, or -1.
func nextDot(key string, i int) int {
	j := strings.IndexByte(key[i+1:], '.')
	if j < 0 {
		return -1
	}
	return i + 1 + j
}

func newWeight(file, name, stateKey string, qt QuantType, meta map[string]TensorMeta, read TensorBytes) (Weight, error) {
	w := Weight{Name: name, File: file}
	m := meta[stateKey]
	if m.DType != "U8" || len(m.Shape) != 1 {
		return w, fmt.Errorf("%s: tensor %s: quant state is %s %v, want a 1-D U8 tensor", file, stateKey, m.DType, m.Shape)
	}
	if m.Shape[0] > MaxStateJSON {
		return w, fmt.Errorf("%s: tensor %s: quant state of %d bytes exceeds the %d-byte limit", file, stateKey, m.Shape[0], MaxStateJSON)
	}
	data, err := read(stateKey)
	if err != nil {
		return w, fmt.Errorf("%s: tensor %s: read: %w", file, stateKey, err)
	}
	st, err := ParseQuantState(data)
	if err != nil {
		return w, fmt.Errorf("%s: tensor %s: %w", file, stateKey, err)
	}
	if st.QuantType != qt {
		return w, fmt.Errorf("%s: tensor %s: quant_type %q disagrees with the key's %q", file, stateKey, st.QuantType, qt)
	}
	w.State = st
	w.Keys = WeightKeys{Weight: name, Absmax: name + SuffixAbsmax, QuantMap: name + SuffixQuantMap, QuantState: stateKey}
	if st.Nested {
		w.Keys.NestedAbsmax = name + SuffixNestedAbsmax
		w.Keys.NestedQuantMap = name + SuffixNestedQuantMap
	} else {
		for _, k := range []string{name + SuffixNestedAbsmax, name + SuffixNestedQuantMap} {
			if _, ok := meta[k]; ok {
				return w, fmt.Errorf("%s: tensor %s: present but the quant state is not nested", file, k)
			}
		}
	}
	if err := w.Validate(meta, read); err != nil {
		return w, err
	}
	return w, nil
}

// Validate checks the weight's tensors against its quant state: the packed
// tensor holds exactly (n+1)/2 bytes whatever its dtype (quant_storage is
// reinterpreted as bytes); absmax is [ceil(n/blocksize)], F32, or U8 when
// nested; quant_map is F32 [16] without NaN; when nested, nested_absmax is
// F32 [ceil(blocks/nested_blocksize)] and nested_quant_map F32 [256] without
// NaN; nested keys are present iff the state is nested. Errors name the file
// and key.
func (w Weight) Validate(meta map[string]TensorMeta, read TensorBytes) error {
	st := w.State
	n := st.Numel()
	if n == 0 {
		return fmt.Errorf("%s: tensor %s: quant state shape %v has no elements", w.File, w.Keys.QuantState, st.Shape)
	}
	if !ValidBlocksize(st.Blocksize) {
		return fmt.Errorf("%s: tensor %s: blocksize %d is not a power of two from 32 to 4096", w.File, w.Keys.QuantState, st.Blocksize)
	}
	get := func(key string) (TensorMeta, error) {
		m, ok := meta[key]
		if !ok {
			return m, fmt.Errorf("%s: tensor %s: missing (needed by 4-bit weight %s)", w.File, key, w.Name)
		}
		return m, nil
	}
	// Packed codes.
	pm, err := get(w.Keys.Weight)
	if err != nil {
		return err
	}
	size, ok := stDTypeSize[pm.DType]
	if !ok {
		return fmt.Errorf("%s: tensor %s: dtype %q cannot hold packed 4-bit codes", w.File, w.Keys.Weight, pm.DType)
	}
	bytes, ok := shapeBytes(pm.Shape, size)
	want := (n + 1) / 2
	if !ok || bytes != want {
		return fmt.Errorf("%s: tensor %s: %s %v holds %d bytes but quant state shape %v needs %d",
			w.File, w.Keys.Weight, pm.DType, pm.Shape, bytes, st.Shape, want)
	}
	blocks := (n + int64(st.Blocksize) - 1) / int64(st.Blocksize)
	absDType := "F32"
	if st.Nested {
		absDType = "U8"
	}
	if err := w.expect(meta, w.Keys.Absmax, absDType, blocks); err != nil {
		return err
	}
	if err := w.expect(meta, w.Keys.QuantMap, "F32", 16); err != nil {
		return err
	}
	if err := w.noNaN(w.Keys.QuantMap, read); err != nil {
		return err
	}
	if st.Nested {
		nb := (blocks + int64(st.NestedBlocksize) - 1) / int64(st.NestedBlocksize)
		if err := w.expect(meta, w.Keys.NestedAbsmax, "F32", nb); err != nil {
			return err
		}
		if err := w.expect(meta, w.Keys.NestedQuantMap, "F32", 256); err != nil {
			return err
		}
		if err := w.noNaN(w.Keys.NestedQuantMap, read); err != nil {
			return err
		}
	}
	return nil
}

func shapeBytes(shape []int64, size int) (int64, bool) {
	b := int64(size)
	for _, d := range shape {
		if d < 0 || (d != 0 && b > math.MaxInt64/d) {
			return 0, false
		}
		b *= d
	}
	return b, true
}

func (w Weight) expect(meta map[string]TensorMeta, key, dtype string, n int64) error {
	m, ok := meta[key]
	if !ok {
		return fmt.Errorf("%s: tensor %s: missing (needed by 4-bit weight %s)", w.File, key, w.Name)
	}
	if m.DType != dtype || len(m.Shape) != 1 || m.Shape[0] != n {
		return fmt.Errorf("%s: tensor %s: %s %v, want %s [%d] for quant state shape %v blocksize %d",
			w.File, key, m.DType, m.Shape, dtype, n, w.State.Shape, w.State.Blocksize)
	}
	return nil
}

func (w Weight) noNaN(key string, read TensorBytes) error {
	b, err := read(key)
	if err != nil {
		return fmt.Errorf("%s: tensor %s: read: %w", w.File, key, err)
	}
	for i := 0; i+4 <= len(b); i += 4 {
		if f := math.Float32frombits(binary.LittleEndian.Uint32(b[i:])); f != f {
			return fmt.Errorf("%s: tensor %s: NaN at index %d", w.File, key, i/4)
		}
	}
	return nil
}

// WeightData holds the raw bytes of one weight's tensors (nested fields
// empty when not nested).
type WeightData struct {
	Packed, Absmax, QuantMap, NestedAbsmax, NestedQuantMap []byte
}

// Load reads the weight's tensors through read.
func (w Weight) Load(read TensorBytes) (WeightData, error) {
	var d WeightData
	dst := []*[]byte{&d.Packed, &d.Absmax, &d.QuantMap}
	keys := []string{w.Keys.Weight, w.Keys.Absmax, w.Keys.QuantMap}
	if w.State.Nested {
		dst = append(dst, &d.NestedAbsmax, &d.NestedQuantMap)
		keys = append(keys, w.Keys.NestedAbsmax, w.Keys.NestedQuantMap)
	}
	for i, k := range keys {
		b, err := read(k)
		if err != nil {
			return d, fmt.Errorf("%s: tensor %s: read: %w", w.File, k, err)
		}
		*dst[i] = b
	}
	return d, nil
}

// Absmax returns the weight's float32 per-block absmax, rebuilding it from
// the nested encoding (with the stored nested_quant_map) when nested.
func Absmax(st QuantState, d WeightData) ([]float32, error) {
	n := int(st.Numel())
	if st.Blocksize <= 0 || st.Blocksize%2 != 0 {
		return nil, fmt.Errorf("blocksize %d", st.Blocksize)
	}
	nb := Blocks(n, st.Blocksize)
	am := make([]float32, nb)
	if !st.Nested {
		if len(d.Absmax) != 4*nb {
			return nil, fmt.Errorf("absmax: %d bytes, want %d", len(d.Absmax), 4*nb)
		}
		decodeF32(am, d.Absmax)
		return am, nil
	}
	if st.NestedBlocksize <= 0 {
		return nil, fmt.Errorf("nested_blocksize %d", st.NestedBlocksize)
	}
	nnb := Blocks(nb, st.NestedBlocksize)
	switch {
	case len(d.Absmax) != nb:
		return nil, fmt.Errorf("absmax: %d bytes, want %d", len(d.Absmax), nb)
	case len(d.NestedAbsmax) != 4*nnb:
		return nil, fmt.Errorf("nested_absmax: %d bytes, want %d", len(d.NestedAbsmax), 4*nnb)
	case len(d.NestedQuantMap) != 4*256:
		return nil, fmt.Errorf("nested_quant_map: %d bytes, want 1024", len(d.NestedQuantMap))
	}
	var m [256]float32
	decodeF32(m[:], d.NestedQuantMap)
	nabs := make([]float32, nnb)
	decodeF32(nabs, d.NestedAbsmax)
	DequantizeNested(am, d.Absmax, nabs, &m, float32(st.NestedOffset), st.NestedBlocksize)
	return am, nil
}

func decodeF32(dst []float32, b []byte) {
	for i := range dst {
		dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
}

// DequantizeWeight decodes a whole weight into dst (Numel() float32 values)
// exactly as bitsandbytes' dequantize_4bit computes it before the final cast
// to the logical dtype. Like bitsandbytes' kernels, it decodes with the
// built-in table of the quant type (NF4 or FP4), not the stored quant_map.
func DequantizeWeight(dst []float32, st QuantState, d WeightData) error {
	n, am, err := prepare(st, d)
	if err != nil {
		return err
	}
	if len(dst) != n {
		return fmt.Errorf("dequantize: dst holds %d values, want %d", len(dst), n)
	}
	Dequantize(dst, d.Packed, am, st.QuantType.Table(), n, st.Blocksize)
	return nil
}

// DequantizeWeightTo decodes a whole weight into dst in its logical dtype
// (st.DType, little-endian, Numel()*size bytes): bitsandbytes'
// dequantize_4bit output, bit for bit.
func DequantizeWeightTo(dst []byte, st QuantState, d WeightData) error {
	n, am, err := prepare(st, d)
	if err != nil {
		return err
	}
	sz := st.DType.Size()
	if sz == 0 {
		return fmt.Errorf("dequantize: unknown dtype %q", st.DType)
	}
	if len(dst) != n*sz {
		return fmt.Errorf("dequantize: dst holds %d bytes, want %d", len(dst), n*sz)
	}
	DequantizeTo(dst, st.DType, d.Packed, am, st.QuantType.Table(), n, st.Blocksize)
	return nil
}

func prepare(st QuantState, d WeightData) (int, []float32, error) {
	if st.QuantType.Table() == nil {
		return 0, nil, fmt.Errorf("dequantize: unknown quant type %q", st.QuantType)
	}
	n64 := st.Numel()
	if n64 <= 0 || n64 > math.MaxInt32*16 {
		return 0, nil, fmt.Errorf("dequantize: %d elements", n64)
	}
	n := int(n64)
	if len(d.Packed) != PackedLen(n) {
		return 0, nil, fmt.Errorf("dequantize: packed: %d bytes, want %d", len(d.Packed), PackedLen(n))
	}
	am, err := Absmax(st, d)
	if err != nil {
		return 0, nil, fmt.Errorf("dequantize: %w", err)
	}
	return n, am, nil
}

// DequantizeF32 reads and decodes the weight to float32.
func (w Weight) DequantizeF32(read TensorBytes) ([]float32, error) {
	d, err := w.Load(read)
	if err != nil {
		return nil, err
	}
	out := make([]float32, w.Numel())
	if err := DequantizeWeight(out, w.State, d); err != nil {
		return nil, fmt.Errorf("%s: tensor %s: %w", w.File, w.Name, err)
	}
	return out, nil
}

// DequantizeDType reads and decodes the weight to its logical dtype
// (little-endian bytes), exactly as bitsandbytes' dequantize_4bit.
func (w Weight) DequantizeDType(read TensorBytes) ([]byte, error) {
	d, err := w.Load(read)
	if err != nil {
		return nil, err
	}
	out := make([]byte, w.Numel()*w.State.DType.Size())
	if err := DequantizeWeightTo(out, w.State, d); err != nil {
		return nil, fmt.Errorf("%s: tensor %s: %w", w.File, w.Name, err)
	}
	return out, nil
}

// Entry is one tensor of an encoded weight, ready for a safetensors writer.
type Entry struct {
	Key   string
	DType string // safetensors spelling
	Shape []int64
	Data  []byte
}

// Encoded is a dense weight quantized into bitsandbytes' full key set.
type Encoded struct {
	State          QuantState
	Packed         []byte    // PackedLen(n) bytes, stored as U8 [(n+1)/2, 1]
	Absmax         []float32 // float32 per-block absmax (before nesting)
	QuantAbsmax    []byte    // nested: the 8-bit codes of absmax-offset
	NestedAbsmax   []float32 // nested: per-256-block absmax of absmax-offset
	NestedQuantMap [256]float32
	QuantMap       [16]float32
}

// Encode quantizes a dense weight to NF4 (see EncodeType).
func Encode(src []float32, shape []int64, dtype string, blocksize int, nested bool) (*Encoded, error) {
	return EncodeType(src, shape, dtype, blocksize, nested, QuantNF4)
}

// EncodeType quantizes a dense weight (row-major src, the values of a dtype
// tensor widened to float32) as bitsandbytes' quantize_4bit does on CUDA:
// Quantize, then, when nested, QuantizeNested with DynamicMap(). dtype is
// the logical dtype recorded in the quant state ("bfloat16", "float16" or
// "float32"); blocksize a power of two from 32 to 4096.
func EncodeType(src []float32, shape []int64, dtype string, blocksize int, nested bool, qt QuantType) (*Encoded, error) {
	st := QuantState{QuantType: qt, Blocksize: blocksize, DType: DType(dtype), Shape: slices.Clone(shape)}
	switch {
	case qt.Table() == nil:
		return nil, fmt.Errorf("encode: unknown quant type %q", qt)
	case st.DType.Size() == 0:
		return nil, fmt.Errorf("encode: dtype %q is not bfloat16, float16 or float32", dtype)
	case !ValidBlocksize(blocksize):
		return nil, fmt.Errorf("encode: blocksize %d is not a power of two from 32 to 4096", blocksize)
	case len(src) == 0:
		return nil, errors.New("encode: no elements")
	}
	if n, ok := shapeBytes(shape, 1); !ok || n != int64(len(src)) {
		return nil, fmt.Errorf("encode: shape %v does not hold %d elements", shape, len(src))
	}
	e := &Encoded{
		Packed:   make([]byte, PackedLen(len(src))),
		Absmax:   make([]float32, Blocks(len(src), blocksize)),
		QuantMap: qt.QuantMap(),
	}
	Quantize(e.Packed, e.Absmax, src, blocksize, qt)
	if nested {
		q, nabs, off := QuantizeNested(e.Absmax)
		e.QuantAbsmax, e.NestedAbsmax, e.NestedQuantMap = q, nabs, DynamicMap()
		st.Nested, st.NestedBlocksize, st.NestedDType, st.NestedOffset = true, NestedBlocksize, Float32, float64(off)
	}
	e.State = st
	return e, nil
}

// Data returns the encoded tensors as they would be stored (the form
// DequantizeWeight reads).
func (e *Encoded) Data() WeightData {
	d := WeightData{Packed: e.Packed, QuantMap: f32Bytes(e.QuantMap[:])}
	if e.State.Nested {
		d.Absmax = e.QuantAbsmax
		d.NestedAbsmax = f32Bytes(e.NestedAbsmax)
		d.NestedQuantMap = f32Bytes(e.NestedQuantMap[:])
	} else {
		d.Absmax = f32Bytes(e.Absmax)
	}
	return d
}

// Entries returns the weight's tensors under weightName ("X.weight") in the
// order bitsandbytes' Linear4bit state dict lists them: the packed weight,
// absmax, quant_map, then nested_absmax and nested_quant_map when nested,
// then the quant-state JSON.
func (e *Encoded) Entries(weightName string) []Entry {
	d := e.Data()
	n := int64(len(e.Absmax))
	out := []Entry{{Key: weightName, DType: "U8", Shape: []int64{int64(len(e.Packed)), 1}, Data: e.Packed}}
	if e.State.Nested {
		out = append(out, Entry{weightName + SuffixAbsmax, "U8", []int64{n}, d.Absmax})
	} else {
		out = append(out, Entry{weightName + SuffixAbsmax, "F32", []int64{n}, d.Absmax})
	}
	out = append(out, Entry{weightName + SuffixQuantMap, "F32", []int64{16}, d.QuantMap})
	if e.State.Nested {
		out = append(out,
			Entry{weightName + SuffixNestedAbsmax, "F32", []int64{int64(len(e.NestedAbsmax))}, d.NestedAbsmax},
			Entry{weightName + SuffixNestedQuantMap, "F32", []int64{256}, d.NestedQuantMap})
	}
	js := e.State.MarshalPython()
	suffix := SuffixQuantStateNF4
	if e.State.QuantType == QuantFP4 {
		suffix = SuffixQuantStateFP4
	}
	return append(out, Entry{weightName + suffix, "U8", []int64{int64(len(js))}, js})
}

func f32Bytes(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, f := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(f))
	}
	return b
}
