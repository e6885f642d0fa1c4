package tensor

import (
	"fmt"
	"unsafe"
)

// Elem is an element type a byte slice can be viewed as.
type Elem interface {
	~int8 | ~uint8 | ~int16 | ~uint16 | ~int32 | ~uint32 | ~int64 | ~uint64 | ~float32 | ~float64
}

// View reinterprets b as a []T sharing b's memory (no copy). b's length must
// be a multiple of the element size and its start aligned to it; an empty b
// gives an empty view. Writes through the view change b (and, for a mapped
// tensor, the shared segment).
func View[T Elem](b []byte) ([]T, error) {
	var zero T
	size := int(unsafe.Sizeof(zero))
	align := uintptr(unsafe.Alignof(zero))
	if len(b) == 0 {
		return []T{}, nil
	}
	if len(b)%size != 0 {
		return nil, fmt.Errorf("view %d bytes as %T: not a multiple of %d: %w", len(b), zero, size, ErrBadDescriptor)
	}
	p := unsafe.Pointer(unsafe.SliceData(b))
	if uintptr(p)%align != 0 {
		return nil, fmt.Errorf("view bytes at %#x as %T: not %d-byte aligned: %w", uintptr(p), zero, align, ErrMisaligned)
	}
	return unsafe.Slice((*T)(p), len(b)/size), nil
}

// Float32s views b as float32 (F32).
func Float32s(b []byte) ([]float32, error) { return View[float32](b) }

// Float64s views b as float64 (F64).
func Float64s(b []byte) ([]float64, error) { return View[float64](b) }

// Uint16s views b as uint16 (U16, and the raw bits of F16 and BF16).
func Uint16s(b []byte) ([]uint16, error) { return View[uint16](b) }

// Int8s views b as int8 (I8).
func Int8s(b []byte) ([]int8, error) { return View[int8](b) }

// Int16s views b as int16 (I16).
func Int16s(b []byte) ([]int16, error) { return View[int16](b) }

// Int32s views b as int32 (I32).
func Int32s(b []byte) ([]int32, error) { return View[int32](b) }

// Int64s views b as int64 (I64).
func Int64s(b []byte) ([]int64, error) { return View[int64](b) }

// Uint32s views b as uint32 (U32).
func Uint32s(b []byte) ([]uint32, error) { return View[uint32](b) }

// Uint64s views b as uint64 (U64).
func Uint64s(b []byte) ([]uint64, error) { return View[uint64](b) }
