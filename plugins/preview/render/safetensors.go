package render

import (
	"encoding/binary"
	"encoding/json"
	"fmt"

	"github.com/arenahost/arenahost/shared/half"
)

// stTensor is one tensor of a safetensors file, widened to fp32.
type stTensor struct {
	shape []int
	data  []float32
}

// maxHeader bounds a safetensors JSON header (the format's own limit is
// 100 MB; a decoder's header is a few KB).
const maxHeader = 100 << 20

// readSafetensors parses a safetensors file held in memory: an 8-byte
// little-endian header length, a JSON header mapping names to dtype, shape
// and data_offsets (relative to the end of the header), then the data.
// Floating-point tensors (F32, F16, BF16) are widened to fp32; other dtypes
// are rejected by name. Every offset and size is checked.
func readSafetensors(b []byte) (map[string]stTensor, error) {
	if len(b) < 8 {
		return nil, fmt.Errorf("header length: file has %d bytes, need 8", len(b))
	}
	n := binary.LittleEndian.Uint64(b)
	if n > maxHeader || n > uint64(len(b)-8) {
		return nil, fmt.Errorf("header length: %d bytes, file has %d after the length", n, len(b)-8)
	}
	var hdr map[string]json.RawMessage
	if err := json.Unmarshal(b[8:8+n], &hdr); err != nil {
		return nil, fmt.Errorf("header: %w", err)
	}
	data := b[8+n:]
	out := make(map[string]stTensor, len(hdr))
	for name, raw := range hdr {
		if name == "__metadata__" {
			continue
		}
		var e struct {
			DType   string   `json:"dtype"`
			Shape   []int    `json:"shape"`
			Offsets []uint64 `json:"data_offsets"`
		}
		if err := json.Unmarshal(raw, &e); err != nil {
			return nil, fmt.Errorf("tensor %s: header entry: %w", name, err)
		}
		var es int
		switch e.DType {
		case "F32":
			es = 4
		case "F16", "BF16":
			es = 2
		default:
			return nil, fmt.Errorf("tensor %s: dtype %q unsupported (want F32, F16 or BF16)", name, e.DType)
		}
		count := 1
		for _, d := range e.Shape {
			if d < 0 || d > maxElements {
				return nil, fmt.Errorf("tensor %s: shape %v invalid", name, e.Shape)
			}
			count *= d
			if count > maxElements {
				return nil, fmt.Errorf("tensor %s: shape %v too large", name, e.Shape)
			}
		}
		if len(e.Offsets) != 2 || e.Offsets[0] > e.Offsets[1] || e.Offsets[1] > uint64(len(data)) {
			return nil, fmt.Errorf("tensor %s: data_offsets %v outside the %d data bytes", name, e.Offsets, len(data))
		}
		if got := e.Offsets[1] - e.Offsets[0]; got != uint64(count*es) {
			return nil, fmt.Errorf("tensor %s: shape %v %s needs %d bytes, data_offsets give %d", name, e.Shape, e.DType, count*es, got)
		}
		raw := data[e.Offsets[0]:e.Offsets[1]]
		t := stTensor{shape: e.Shape, data: make([]float32, count)}
		switch e.DType {
		case "F32":
			half.DecodeF32(t.data, raw)
		case "F16":
			half.DecodeF16(t.data, raw)
		case "BF16":
			half.DecodeBF16(t.data, raw)
		}
		out[name] = t
	}
	return out, nil
}
