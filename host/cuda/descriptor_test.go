package cuda

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"os/exec"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/shared/gpu"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

func testLocation() arena.Location {
	h := make([]byte, HandleSize)
	for i := range h {
		h[i] = byte(255 - i)
	}
	return arena.Location{Kind: arena.KindCUDA, SegmentID: 5, Size: 64 << 20, HostPID: 4321, IPCHandle: h, Device: 2}
}

func TestSlabRoundTrip(t *testing.T) {
	loc := testLocation()
	s, err := SlabProto(loc)
	if err != nil {
		t.Fatal(err)
	}
	wire, err := proto.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	var back pluginv1.CUDASlab
	if err := proto.Unmarshal(wire, &back); err != nil {
		t.Fatal(err)
	}
	got, err := LocationFromSlab(&back)
	if err != nil {
		t.Fatal(err)
	}
	if got.Kind != loc.Kind || got.SegmentID != loc.SegmentID || got.Size != loc.Size || got.HostPID != loc.HostPID ||
		got.Device != loc.Device || !bytes.Equal(got.IPCHandle, loc.IPCHandle) {
		t.Fatalf("round trip: %+v, want %+v", got, loc)
	}
	loc.IPCHandle[0] ^= 1 // SlabProto copied the handle
	if s.IpcHandle[0] == loc.IPCHandle[0] {
		t.Fatal("SlabProto aliases the location's handle")
	}
}

func TestSlabErrors(t *testing.T) {
	tests := []struct {
		name string
		mod  func(*arena.Location)
		want string
	}{
		{"cpu", func(l *arena.Location) { l.Kind = arena.KindCPU }, `kind "cpu"`},
		{"short handle", func(l *arena.Location) { l.IPCHandle = l.IPCHandle[:63] }, "ipc_handle has 63 bytes, want 64"},
		{"size", func(l *arena.Location) { l.Size = 0 }, "size 0"},
		{"id", func(l *arena.Location) { l.SegmentID = 0 }, "id 0"},
		{"device", func(l *arena.Location) { l.Device = -1 }, "device -1"},
		{"pid", func(l *arena.Location) { l.HostPID = 0 }, "host_pid 0"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			loc := testLocation()
			tc.mod(&loc)
			if _, err := SlabProto(loc); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want %q", err, tc.want)
			}
		})
	}
	if _, err := LocationFromSlab(nil); err == nil {
		t.Fatal("nil slab accepted")
	}
	s, _ := SlabProto(testLocation())
	if _, _, err := gpu.RegionAddr(&pluginv1.Region{Segment: &pluginv1.Region_Cuda{Cuda: s}, Offset: 64<<20 - 8, Length: 16}); err == nil ||
		!strings.Contains(err.Error(), "past the slab") {
		t.Fatalf("region past the slab: %v", err)
	}
	if _, off, err := gpu.RegionAddr(&pluginv1.Region{Segment: &pluginv1.Region_Cuda{Cuda: s}, Offset: 4096, Length: 16}); err != nil || off != 4096 {
		t.Fatalf("region: %d %v", off, err)
	}
	if _, _, err := gpu.RegionAddr(&pluginv1.Region{Segment: &pluginv1.Region_Cpu{Cpu: &pluginv1.CPUSegment{Id: 1}}}); err == nil {
		t.Fatal("cpu region accepted")
	}
}

// TestPythonDecodesSlab: a descriptor the host encodes from an arena
// Location decodes in the Python SDK (arenahost.cuda.tensor_layout) to the
// same slab, offset, dtype, shape and strides.
func TestPythonDecodesSlab(t *testing.T) {
	py := testenv.Python(t)
	loc := testLocation()
	s, err := SlabProto(loc)
	if err != nil {
		t.Fatal(err)
	}
	d := &pluginv1.TensorDescriptor{
		Name: "double_blocks.0.img_attn.qkv.weight", Dtype: pluginv1.DType_DTYPE_BF16, Shape: []int64{9216, 3072},
		Nbytes: 9216 * 3072 * 2,
		Region: &pluginv1.Region{Segment: &pluginv1.Region_Cuda{Cuda: s}, Offset: 1 << 20, Length: 9216 * 3072 * 2, Generation: 77},
	}
	wire, err := proto.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	script := `
import json, sys
from arenahost.cuda import tensor_layout
from arenahost.plugin.v1 import plugin_pb2 as pb
d = pb.TensorDescriptor.FromString(bytes.fromhex(sys.stdin.read()))
l = tensor_layout(d)
print(json.dumps(dict(id=l.slab.id, handle=l.slab.handle.hex(), size=l.slab.size, device=l.slab.device,
    pid=l.slab.host_pid, offset=l.offset, nbytes=l.nbytes, dtype=l.dtype, shape=l.shape, strides=l.strides)))
`
	cmd := exec.Command(py, "-c", script)
	cmd.Stdin = strings.NewReader(hex.EncodeToString(wire))
	cmd.Dir = testenv.RepoRoot(t)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("python: %v\n%s", err, errText(err))
	}
	var got struct {
		ID, Size, Device, Pid, Offset, Nbytes int
		Handle, Dtype                         string
		Shape, Strides                        []int
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("python output %q: %v", out, err)
	}
	if got.ID != 5 || got.Size != 64<<20 || got.Device != 2 || got.Pid != 4321 || got.Offset != 1<<20 ||
		got.Nbytes != 9216*3072*2 || got.Handle != hex.EncodeToString(loc.IPCHandle) || got.Dtype != "bfloat16" ||
		len(got.Shape) != 2 || got.Shape[0] != 9216 || got.Shape[1] != 3072 || got.Strides[0] != 3072 || got.Strides[1] != 1 {
		t.Fatalf("python decoded %+v", got)
	}
}

func errText(err error) string {
	if ee, ok := err.(*exec.ExitError); ok {
		return string(ee.Stderr)
	}
	return ""
}
