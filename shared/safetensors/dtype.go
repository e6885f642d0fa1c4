// Package safetensors owns the safetensors file format: a validated header
// parser, a read-only mmap-backed reader and a writer whose output is byte for
// byte what the reference implementation (huggingface/safetensors, the Rust
// crate behind the Python package) writes for the same tensors.
//
// The format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
// (an object mapping tensor names to {"dtype","shape","data_offsets"} plus an
// optional "__metadata__" string→string object), padded with spaces, then the
// data section. Offsets are relative to the data section. Like the reference
// reader, this package requires the tensors, sorted by offset, to cover the
// data section exactly: no gaps, no overlap, nothing after the last tensor.
package safetensors

import (
	"fmt"
)

// DType is a safetensors element type, spelled as in the header ("F32").
type DType string

// The element types this package reads and writes. The reference format also
// defines sub-byte types (F4, F6_E2M3, F6_E3M2); they are rejected as
// unsupported because nothing in this project stores them.
const (
	F64        DType = "F64"
	F32        DType = "F32"
	F16        DType = "F16"
	BF16       DType = "BF16"
	I64        DType = "I64"
	I32        DType = "I32"
	I16        DType = "I16"
	I8         DType = "I8"
	U64        DType = "U64"
	U32        DType = "U32"
	U16        DType = "U16"
	U8         DType = "U8"
	BOOL       DType = "BOOL"
	F8E4M3     DType = "F8_E4M3"
	F8E5M2     DType = "F8_E5M2"
	F8E8M0     DType = "F8_E8M0"
	F8E4M3FNUZ DType = "F8_E4M3FNUZ"
	F8E5M2FNUZ DType = "F8_E5M2FNUZ"
	C64        DType = "C64"
)

// dtypeInfo holds an element size and the dtype's position in the reference
// implementation's Dtype enum, whose order ("increasing alignment") decides
// where the writer places each tensor in the data section.
type dtypeInfo struct {
	size int
	rank int
}

// dtypes follows the declaration order of safetensors' `enum Dtype`
// (safetensors/src/tensor.rs): BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2,
// F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ, I16, U16, F16, BF16, I32, U32,
// F32, C64, F64, I64, U64. Ranks keep the gaps of the sub-byte types so the
// numbers read against the source.
var dtypes = map[DType]dtypeInfo{
	BOOL:       {1, 0},
	U8:         {1, 4},
	I8:         {1, 5},
	F8E5M2:     {1, 6},
	F8E4M3:     {1, 7},
	F8E8M0:     {1, 8},
	F8E4M3FNUZ: {1, 9},
	F8E5M2FNUZ: {1, 10},
	I16:        {2, 11},
	U16:        {2, 12},
	F16:        {2, 13},
	BF16:       {2, 14},
	I32:        {4, 15},
	U32:        {4, 16},
	F32:        {4, 17},
	C64:        {8, 18},
	F64:        {8, 19},
	I64:        {8, 20},
	U64:        {8, 21},
}

// subByte names the reference dtypes narrower than a byte.
var subByte = map[string]bool{"F4": true, "F6_E2M3": true, "F6_E3M2": true}

// ParseDType returns the dtype spelled s, or an error for an unknown or
// unsupported spelling.
func ParseDType(s string) (DType, error) {
	d := DType(s)
	if _, ok := dtypes[d]; ok {
		return d, nil
	}
	if subByte[s] {
		return "", fmt.Errorf("dtype %q: sub-byte dtypes are not supported", s)
	}
	return "", fmt.Errorf("unknown dtype %q", s)
}

// Valid reports whether d is a dtype this package knows.
func (d DType) Valid() bool { _, ok := dtypes[d]; return ok }

// Size returns the size of one element in bytes, or 0 for an unknown dtype.
func (d DType) Size() int { return dtypes[d].size }

// String returns the header spelling.
func (d DType) String() string { return string(d) }

// rank is the position in the reference enum; -1 when unknown.
func (d DType) rank() int {
	if i, ok := dtypes[d]; ok {
		return i.rank
	}
	return -1
}
