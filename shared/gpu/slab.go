package gpu

import (
	"fmt"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// HandleSize is the size of a CUipcMemHandle (CU_IPC_HANDLE_SIZE).
const HandleSize = 64

// DevicePtr is a device address (CUdeviceptr).
type DevicePtr uint64

// Slab is one device allocation with its IPC handle.
type Slab struct {
	Ptr    DevicePtr
	Size   uint64
	Handle [HandleSize]byte // cuIpcGetMemHandle of Ptr, the allocation's base
}

// SlabLocation is a device slab as a descriptor names it: what a plugin
// needs to open it (the IPC handle) and to check a region against it.
type SlabLocation struct {
	ID      uint32 // the host arena's segment id
	Handle  [HandleSize]byte
	Size    uint64
	Device  int // device ordinal
	HostPID int // the process that allocated the slab
}

// Proto is the protocol form of the location.
func (l SlabLocation) Proto() (*pluginv1.CUDASlab, error) {
	if err := l.check(); err != nil {
		return nil, err
	}
	return &pluginv1.CUDASlab{Id: l.ID, IpcHandle: append([]byte(nil), l.Handle[:]...), Size: l.Size,
		Device: int32(l.Device), HostPid: int32(l.HostPID)}, nil
}

// SlabFromProto checks a received CUDASlab and returns its location.
func SlabFromProto(s *pluginv1.CUDASlab) (SlabLocation, error) {
	if s == nil {
		return SlabLocation{}, fmt.Errorf("cuda slab: missing")
	}
	if len(s.GetIpcHandle()) != HandleSize {
		return SlabLocation{}, fmt.Errorf("cuda slab %d: ipc_handle has %d bytes, want %d", s.GetId(), len(s.GetIpcHandle()), HandleSize)
	}
	l := SlabLocation{ID: s.GetId(), Size: s.GetSize(), Device: int(s.GetDevice()), HostPID: int(s.GetHostPid())}
	copy(l.Handle[:], s.GetIpcHandle())
	if err := l.check(); err != nil {
		return SlabLocation{}, err
	}
	return l, nil
}

func (l SlabLocation) check() error {
	switch {
	case l.ID == 0:
		return fmt.Errorf("cuda slab: id 0 (segment ids start at 1)")
	case l.Size == 0:
		return fmt.Errorf("cuda slab %d: size 0", l.ID)
	case l.Device < 0:
		return fmt.Errorf("cuda slab %d: device %d", l.ID, l.Device)
	case l.HostPID <= 0:
		return fmt.Errorf("cuda slab %d: host_pid %d", l.ID, l.HostPID)
	}
	return nil
}

// RegionAddr checks that a region lies inside its slab and returns the
// slab and the byte offset of the region's first element: the address a
// reader uses is the opened slab's base plus this offset.
func RegionAddr(r *pluginv1.Region) (SlabLocation, uint64, error) {
	c, ok := r.GetSegment().(*pluginv1.Region_Cuda)
	if !ok {
		return SlabLocation{}, 0, fmt.Errorf("region at offset %d: not a cuda slab", r.GetOffset())
	}
	loc, err := SlabFromProto(c.Cuda)
	if err != nil {
		return SlabLocation{}, 0, err
	}
	end := r.GetOffset() + r.GetLength()
	if end < r.GetOffset() || end > loc.Size {
		return SlabLocation{}, 0, fmt.Errorf("cuda slab %d: region offset %d length %d past the slab's %d bytes",
			loc.ID, r.GetOffset(), r.GetLength(), loc.Size)
	}
	return loc, r.GetOffset(), nil
}
