package tensor

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

func TestDTypeNames(t *testing.T) {
	for d := range dtypes {
		name, err := DTypeName(d)
		if err != nil {
			t.Fatalf("DTypeName(%v): %v", d, err)
		}
		back, err := ParseDType(name)
		if err != nil || back != d {
			t.Errorf("ParseDType(%q) = %v, %v; want %v", name, back, err, d)
		}
	}
	tests := []struct {
		name string
		size int
	}{{"F32", 4}, {"BF16", 2}, {"F16", 2}, {"U8", 1}, {"I64", 8}, {"F8_E4M3", 1}, {"BOOL", 1}, {"F64", 8}}
	for _, tc := range tests {
		d, err := ParseDType(tc.name)
		if err != nil {
			t.Fatalf("ParseDType(%q): %v", tc.name, err)
		}
		if got, _ := ElemSize(d); got != tc.size {
			t.Errorf("ElemSize(%s) = %d, want %d", tc.name, got, tc.size)
		}
	}
	if _, err := ParseDType("F4"); !errors.Is(err, ErrUnknownDType) {
		t.Errorf("ParseDType(F4) err = %v, want ErrUnknownDType", err)
	}
	if _, err := ElemSize(pluginv1.DType_DTYPE_UNSPECIFIED); !errors.Is(err, ErrUnknownDType) {
		t.Errorf("ElemSize(unspecified) err = %v, want ErrUnknownDType", err)
	}
}

func TestNBytes(t *testing.T) {
	tests := []struct {
		dtype   pluginv1.DType
		shape   []int64
		want    uint64
		wantErr error
	}{
		{pluginv1.DType_DTYPE_F32, []int64{3, 4}, 48, nil},
		{pluginv1.DType_DTYPE_BF16, nil, 2, nil},
		{pluginv1.DType_DTYPE_U8, []int64{0, 7}, 0, nil},
		{pluginv1.DType_DTYPE_F32, []int64{2, -1}, 0, ErrBadDescriptor},
		{pluginv1.DType_DTYPE_I64, []int64{math.MaxInt64, 4}, 0, ErrBadDescriptor},
		{pluginv1.DType_DTYPE_UNSPECIFIED, []int64{1}, 0, ErrUnknownDType},
	}
	for _, tc := range tests {
		got, err := NBytes(tc.dtype, tc.shape)
		if !errors.Is(err, tc.wantErr) || got != tc.want {
			t.Errorf("NBytes(%v, %v) = %d, %v; want %d, %v", tc.dtype, tc.shape, got, err, tc.want, tc.wantErr)
		}
	}
}

// memfdSegment creates a memfd of size bytes filled by fill and returns its
// descriptor segment, reachable through /proc/self/fd like the host's.
func memfdSegment(t *testing.T, id uint32, size int, fill func([]byte)) *pluginv1.CPUSegment {
	t.Helper()
	fd, err := unix.MemfdCreate("tensor-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatalf("memfd_create: %v", err)
	}
	f := os.NewFile(uintptr(fd), "memfd")
	t.Cleanup(func() { f.Close() })
	buf := make([]byte, size)
	if fill != nil {
		fill(buf)
	}
	if _, err := f.Write(buf); err != nil {
		t.Fatalf("write memfd: %v", err)
	}
	return &pluginv1.CPUSegment{Id: id, Path: fmt.Sprintf("/proc/self/fd/%d", fd), Size: uint64(size), HostPid: int32(os.Getpid())}
}

func f32Desc(name string, seg *pluginv1.CPUSegment, offset uint64, n int64, access pluginv1.Access) *pluginv1.TensorDescriptor {
	return &pluginv1.TensorDescriptor{
		Name: name, Dtype: pluginv1.DType_DTYPE_F32, Shape: []int64{n}, Nbytes: uint64(4 * n), Access: access,
		Region: &pluginv1.Region{Segment: &pluginv1.Region_Cpu{Cpu: seg}, Offset: offset, Length: uint64(4 * n), Generation: 1},
	}
}

func TestMapperReadsAndWritesShared(t *testing.T) {
	seg := memfdSegment(t, 7, 4096, func(b []byte) {
		for i := 0; i < 1024; i++ {
			binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(float32(i)))
		}
	})
	m := NewMapper()
	defer m.Close()

	ro, err := m.Bytes(f32Desc("x", seg, 64, 16, pluginv1.Access_ACCESS_READ_ONLY))
	if err != nil {
		t.Fatalf("Bytes: %v", err)
	}
	xs, err := Float32s(ro)
	if err != nil {
		t.Fatalf("Float32s: %v", err)
	}
	if len(xs) != 16 || xs[0] != 16 || xs[15] != 31 {
		t.Fatalf("read %v, want 16..31", xs)
	}
	if _, err := m.Writable(f32Desc("x", seg, 64, 16, pluginv1.Access_ACCESS_READ_ONLY)); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("Writable(read-only) err = %v, want ErrReadOnly", err)
	}

	rw, err := m.Writable(f32Desc("y", seg, 120, 4, pluginv1.Access_ACCESS_READ_WRITE))
	if err != nil {
		t.Fatalf("Writable: %v", err)
	}
	ys, _ := Float32s(rw)
	ys[1] = -1.5 // byte 124: element 15 of the read-only view
	// The write is visible through the earlier read-only mapping: both
	// map the same shared pages.
	if got := xs[15]; got != -1.5 {
		t.Fatalf("read-only view sees %v after a write of -1.5", got)
	}
	if n := m.Mapped(); n != 2 {
		t.Fatalf("Mapped() = %d, want 2 (one read-only, one read-write remap)", n)
	}
	// Further descriptors into the same segment reuse the mapping.
	if _, err := m.Bytes(f32Desc("z", seg, 0, 8, pluginv1.Access_ACCESS_READ_ONLY)); err != nil {
		t.Fatal(err)
	}
	if n := m.Mapped(); n != 2 {
		t.Fatalf("Mapped() = %d after a cached lookup, want 2", n)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := m.Bytes(f32Desc("z", seg, 0, 8, pluginv1.Access_ACCESS_READ_ONLY)); !errors.Is(err, ErrClosed) {
		t.Fatalf("Bytes after Close err = %v, want ErrClosed", err)
	}
}

func TestMapperRefuses(t *testing.T) {
	seg := memfdSegment(t, 1, 1024, nil)
	short := &pluginv1.CPUSegment{Id: 2, Path: seg.Path, Size: 8192, HostPid: seg.HostPid}
	missing := &pluginv1.CPUSegment{Id: 3, Path: "/nonexistent/segment", Size: 1024, HostPid: seg.HostPid}
	cuda := &pluginv1.TensorDescriptor{Name: "gpu", Dtype: pluginv1.DType_DTYPE_F32, Shape: []int64{1}, Nbytes: 4,
		Region: &pluginv1.Region{Segment: &pluginv1.Region_Cuda{Cuda: &pluginv1.CUDASlab{Id: 1, Size: 1 << 20}}, Length: 4}}
	badShape := f32Desc("bad", seg, 0, 4, pluginv1.Access_ACCESS_READ_ONLY)
	badShape.Shape = []int64{5}
	tests := []struct {
		name    string
		desc    *pluginv1.TensorDescriptor
		wantErr error
	}{
		{"past segment end", f32Desc("t", seg, 1020, 2, pluginv1.Access_ACCESS_READ_ONLY), ErrOutOfBounds},
		{"nbytes beyond region", func() *pluginv1.TensorDescriptor {
			d := f32Desc("t", seg, 0, 4, pluginv1.Access_ACCESS_READ_ONLY)
			d.Region.Length = 8
			return d
		}(), ErrOutOfBounds},
		{"file shorter than segment", f32Desc("t", short, 0, 4, pluginv1.Access_ACCESS_READ_ONLY), ErrOutOfBounds},
		{"missing file", f32Desc("t", missing, 0, 4, pluginv1.Access_ACCESS_READ_ONLY), os.ErrNotExist},
		{"cuda", cuda, ErrCUDALocation},
		{"shape vs nbytes", badShape, ErrBadDescriptor},
		{"no region", &pluginv1.TensorDescriptor{Name: "t"}, ErrBadDescriptor},
		{"nil", nil, ErrBadDescriptor},
	}
	m := NewMapper()
	defer m.Close()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := m.Bytes(tc.desc)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if tc.desc != nil && tc.desc.Name != "" && !contains(err.Error(), fmt.Sprintf("%q", tc.desc.Name)) {
				t.Errorf("error %q does not name the tensor", err)
			}
		})
	}
	if n := m.Mapped(); n != 0 {
		t.Errorf("refused descriptors left %d mappings", n)
	}
}

func contains(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}

func TestView(t *testing.T) {
	buf := make([]byte, 33)
	aligned := buf[:32]
	if uintptr(unsafePtr(aligned))%8 != 0 {
		t.Skip("allocator returned an unaligned buffer")
	}
	if v, err := Float64s(aligned); err != nil || len(v) != 4 {
		t.Fatalf("Float64s(32 bytes) = %d elems, %v", len(v), err)
	}
	if _, err := Float32s(buf[1:5]); !errors.Is(err, ErrMisaligned) {
		t.Errorf("Float32s(misaligned) err = %v, want ErrMisaligned", err)
	}
	if _, err := Int32s(buf[:6]); !errors.Is(err, ErrBadDescriptor) {
		t.Errorf("Int32s(6 bytes) err = %v, want ErrBadDescriptor", err)
	}
	if v, err := Uint16s(nil); err != nil || len(v) != 0 {
		t.Errorf("Uint16s(nil) = %v, %v", v, err)
	}
	u, _ := Uint32s(aligned)
	u[1] = 0xdeadbeef
	if binary.NativeEndian.Uint32(aligned[4:]) != 0xdeadbeef {
		t.Error("a write through the view did not reach the bytes: the view copied")
	}
}
