// Package tensor owns what both sides of the plugin protocol need to hand a
// tensor across a process boundary without copying it: element sizes and
// safetensors names for pluginv1.DType, descriptor checks, a Mapper that maps
// a descriptor's CPU segment (memfd or /dev/shm file) into this process, and
// typed zero-copy views over the mapped bytes.
//
// CUDA locations are refused by the CPU Mapper with ErrCUDALocation; a CUDA
// mapper will live behind a build tag.
package tensor

import (
	"errors"
	"fmt"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// Errors callers can test with errors.Is. Every error this package returns
// wraps one of them and names the tensor, segment or field at fault.
var (
	// ErrBadDescriptor: a descriptor is missing a field or contradicts itself.
	ErrBadDescriptor = errors.New("bad tensor descriptor")
	// ErrOutOfBounds: a byte range does not lie inside its segment or region.
	ErrOutOfBounds = errors.New("out of bounds")
	// ErrCUDALocation: a CUDA descriptor was given to the CPU mapper.
	ErrCUDALocation = errors.New("cuda location not supported by the cpu mapper")
	// ErrReadOnly: write access was asked of a read-only descriptor.
	ErrReadOnly = errors.New("read-only tensor")
	// ErrUnknownDType: a dtype without a known element size or name.
	ErrUnknownDType = errors.New("unknown dtype")
	// ErrMisaligned: a typed view over bytes not aligned to the element.
	ErrMisaligned = errors.New("misaligned")
	// ErrClosed: the Mapper was closed.
	ErrClosed = errors.New("mapper closed")
)

type dtypeInfo struct {
	name string // safetensors spelling
	size int    // bytes per element
}

var dtypes = map[pluginv1.DType]dtypeInfo{
	pluginv1.DType_DTYPE_F32:     {"F32", 4},
	pluginv1.DType_DTYPE_F16:     {"F16", 2},
	pluginv1.DType_DTYPE_BF16:    {"BF16", 2},
	pluginv1.DType_DTYPE_U8:      {"U8", 1},
	pluginv1.DType_DTYPE_I8:      {"I8", 1},
	pluginv1.DType_DTYPE_I16:     {"I16", 2},
	pluginv1.DType_DTYPE_I32:     {"I32", 4},
	pluginv1.DType_DTYPE_I64:     {"I64", 8},
	pluginv1.DType_DTYPE_F8_E4M3: {"F8_E4M3", 1},
	pluginv1.DType_DTYPE_F8_E5M2: {"F8_E5M2", 1},
	pluginv1.DType_DTYPE_BOOL:    {"BOOL", 1},
	pluginv1.DType_DTYPE_F64:     {"F64", 8},
	pluginv1.DType_DTYPE_U16:     {"U16", 2},
	pluginv1.DType_DTYPE_U32:     {"U32", 4},
	pluginv1.DType_DTYPE_U64:     {"U64", 8},
}

var dtypeByName = func() map[string]pluginv1.DType {
	m := make(map[string]pluginv1.DType, len(dtypes))
	for d, info := range dtypes {
		m[info.name] = d
	}
	return m
}()

// ElemSize returns the size in bytes of one element of d.
func ElemSize(d pluginv1.DType) (int, error) {
	info, ok := dtypes[d]
	if !ok {
		return 0, fmt.Errorf("element size of %v: %w", d, ErrUnknownDType)
	}
	return info.size, nil
}

// DTypeName returns d spelled as in a safetensors header ("F32", "BF16").
func DTypeName(d pluginv1.DType) (string, error) {
	info, ok := dtypes[d]
	if !ok {
		return "", fmt.Errorf("safetensors name of %v: %w", d, ErrUnknownDType)
	}
	return info.name, nil
}

// ParseDType returns the DType for a safetensors dtype name ("F32", "BF16").
func ParseDType(name string) (pluginv1.DType, error) {
	d, ok := dtypeByName[name]
	if !ok {
		return pluginv1.DType_DTYPE_UNSPECIFIED, fmt.Errorf("dtype %q: %w", name, ErrUnknownDType)
	}
	return d, nil
}

// NBytes returns the byte size of a dense tensor of dtype d and shape shape,
// refusing negative dimensions and sizes that overflow uint64.
func NBytes(d pluginv1.DType, shape []int64) (uint64, error) {
	size, err := ElemSize(d)
	if err != nil {
		return 0, err
	}
	n := uint64(size)
	for i, dim := range shape {
		if dim < 0 {
			return 0, fmt.Errorf("shape %v: dimension %d is negative: %w", shape, i, ErrBadDescriptor)
		}
		if dim != 0 && n > ^uint64(0)/uint64(dim) {
			return 0, fmt.Errorf("shape %v: size overflows: %w", shape, ErrBadDescriptor)
		}
		n *= uint64(dim)
	}
	return n, nil
}

// Check validates a descriptor without mapping it: a region is present, its
// nbytes fit in the region, and for a dense tensor (no quant info) nbytes
// equals dtype size × shape. It names the tensor in its error.
func Check(d *pluginv1.TensorDescriptor) error {
	if d == nil {
		return fmt.Errorf("nil descriptor: %w", ErrBadDescriptor)
	}
	r := d.GetRegion()
	if r == nil {
		return fmt.Errorf("tensor %q: no region: %w", d.GetName(), ErrBadDescriptor)
	}
	if r.GetCpu() == nil && r.GetCuda() == nil {
		return fmt.Errorf("tensor %q: region has no segment: %w", d.GetName(), ErrBadDescriptor)
	}
	if d.GetNbytes() > r.GetLength() {
		return fmt.Errorf("tensor %q: nbytes %d exceed region length %d: %w", d.GetName(), d.GetNbytes(), r.GetLength(), ErrOutOfBounds)
	}
	if d.GetQuant() == nil && d.GetDtype() != pluginv1.DType_DTYPE_UNSPECIFIED && len(d.GetShape()) > 0 {
		want, err := NBytes(d.GetDtype(), d.GetShape())
		if err != nil {
			return fmt.Errorf("tensor %q: %w", d.GetName(), err)
		}
		if want != d.GetNbytes() {
			return fmt.Errorf("tensor %q: %s %v is %d bytes but nbytes is %d: %w", d.GetName(), dtypes[d.GetDtype()].name, d.GetShape(), want, d.GetNbytes(), ErrBadDescriptor)
		}
	}
	return nil
}
