package safetensors

import (
	"encoding/binary"
	"math"
)

// FirstNonFinite returns the index and value of the first NaN or ±Inf in
// little-endian data of dtype (F32, F16, BF16, F64; other dtypes hold no
// such values), or -1.
func FirstNonFinite(dtype DType, data []byte) (int, float64) {
	switch dtype {
	case F32:
		for i := 0; i+4 <= len(data); i += 4 {
			if b := binary.LittleEndian.Uint32(data[i:]); b&0x7f800000 == 0x7f800000 {
				return i / 4, float64(math.Float32frombits(b))
			}
		}
	case BF16:
		for i := 0; i+2 <= len(data); i += 2 {
			if b := binary.LittleEndian.Uint16(data[i:]); b&0x7f80 == 0x7f80 {
				return i / 2, float64(math.Float32frombits(uint32(b) << 16))
			}
		}
	case F16:
		for i := 0; i+2 <= len(data); i += 2 {
			if b := binary.LittleEndian.Uint16(data[i:]); b&0x7c00 == 0x7c00 {
				if b&0x3ff != 0 {
					return i / 2, math.NaN()
				}
				return i / 2, math.Inf(1 - 2*int(b>>15))
			}
		}
	case F64:
		for i := 0; i+8 <= len(data); i += 8 {
			if v := math.Float64frombits(binary.LittleEndian.Uint64(data[i:])); math.IsNaN(v) || math.IsInf(v, 0) {
				return i / 8, v
			}
		}
	}
	return -1, 0
}
