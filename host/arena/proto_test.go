package arena

import (
	"errors"
	"testing"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

func TestRegionProtoRoundTrip(t *testing.T) {
	handle := make([]byte, 64)
	handle[0], handle[63] = 0xAB, 0xCD
	tests := []struct {
		name string
		loc  Location
		kind string
	}{
		{"cpu memfd", Location{Kind: KindCPU, SegmentID: 3, Path: "/proc/42/fd/7", Size: 64 << 20, HostPID: 42}, "cpu"},
		{"cuda slab", Location{Kind: KindCUDA, SegmentID: 9, Size: 1 << 30, HostPID: 42, IPCHandle: handle, Device: 1}, "cuda"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := Region{Segment: tc.loc.SegmentID, Offset: 4096, Length: 1000, Generation: 17}
			pr := RegionProto(r, tc.loc)
			switch tc.kind {
			case "cpu":
				c := pr.GetCpu()
				if c == nil || c.Path != tc.loc.Path || c.Size != tc.loc.Size || c.HostPid != 42 || c.Id != 3 {
					t.Fatalf("cpu segment = %v", c)
				}
			case "cuda":
				c := pr.GetCuda()
				if c == nil || len(c.IpcHandle) != 64 || c.IpcHandle[63] != 0xCD || c.Device != 1 || c.Id != 9 {
					t.Fatalf("cuda slab = %v", c)
				}
			}
			back, err := RegionFromProto(pr)
			if err != nil || back != r {
				t.Fatalf("round trip = %v, %v; want %v", back, err, r)
			}
		})
	}
	if _, err := RegionFromProto(&pluginv1.Region{Offset: 5}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("region without segment: err = %v, want ErrInvalid", err)
	}
}
