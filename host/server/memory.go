package server

// memInfo is what a device reports about its memory (gpu.Device and
// gpusim's device both do).
type memInfo interface {
	MemInfo() (free, total uint64, err error)
}

// DeviceMemory returns the free and total memory of the device a device
// arena lives on; ok is false on a CPU arena or when the device cannot
// tell.
func (s *Server) DeviceMemory() (free, total uint64, ok bool) {
	d, isMem := s.device.(memInfo)
	if !isMem || d == nil {
		return 0, 0, false
	}
	free, total, err := d.MemInfo()
	if err != nil {
		return 0, 0, false
	}
	return free, total, true
}
